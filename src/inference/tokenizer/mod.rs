//! The GGUF tokenizer, as llama.cpp reads `tokenizer.ggml.*`.
//!
//! Three vocabulary types:
//! * `gpt2`: byte-level BPE. Text is cut at special tokens, pre-tokenized
//!   with the regexes llama.cpp uses for the file's `tokenizer.ggml.pre`
//!   ([`pre`]), mapped to the gpt2 byte alphabet and merged by rank.
//! * `llama`: SentencePiece ([`spm`]): spaces become `▁`, symbols are merged
//!   by token score, leftovers fall back to `<0xXX>` byte tokens.
//! * `gemma4`: SPM-style BPE over raw UTF-8 (spaces as `▁`, merges by rank,
//!   byte-token fallback).
//!
//! Special tokens are matched first (control, unknown and user-defined token
//! texts; control and unknown ones only when asked to parse specials), as
//! llama.cpp's `tokenizer_st_partition` does. End-of-generation tokens are
//! collected as llama.cpp does (EOS, EOT, EOM ids and the usual end texts).
//! One tokenizer is built per file and shared process-wide
//! ([`Tokenizer::shared`]).

mod pre;
mod spm;
mod unicode_data;

use super::InferenceError;
use crate::gguf::{Gguf, Value};
use aho_corasick::{AhoCorasick, AhoCorasickKind, MatchKind};
use pre::PreTok;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock, Weak};

/// A small, fast, non-cryptographic hasher (the rustc "Fx" scheme) for the
/// vocabulary and merge tables; their keys are not attacker-chosen at a
/// volume where flooding matters (they come from the model file).
#[derive(Default, Clone, Copy)]
struct Fx(u64);

const FX_K: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl Hasher for Fx {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.write_u64(u64::from_le_bytes(w));
        }
        let mut w = [0u8; 8];
        let rest = chunks.remainder();
        w[..rest.len()].copy_from_slice(rest);
        self.write_u64(u64::from_le_bytes(w) ^ rest.len() as u64);
    }
    fn write_u8(&mut self, i: u8) {
        self.write_u64(u64::from(i));
    }
    fn write_u32(&mut self, i: u32) {
        self.write_u64(u64::from(i));
    }
    fn write_u64(&mut self, i: u64) {
        self.0 = (self.0.rotate_left(5) ^ i).wrapping_mul(FX_K);
    }
    fn write_usize(&mut self, i: usize) {
        self.write_u64(i as u64);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

type FxMap<K, V> = HashMap<K, V, BuildHasherDefault<Fx>>;

fn fx_hash(b: &[u8]) -> u64 {
    let mut h = Fx::default();
    h.write(b);
    h.finish()
}

/// gpt2's reversible byte → printable-char map.
fn byte_to_char() -> [char; 256] {
    let mut out = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xa1..=0xac | 0xae..=0xff);
        out[b as usize] = if printable {
            char::from(b)
        } else {
            let c = char::from_u32(256 + n).unwrap_or('\0');
            n += 1;
            c
        };
    }
    out
}

/// Token types (`tokenizer.ggml.token_type`).
const T_NORMAL: i32 = 1;
const T_UNKNOWN: i32 = 2;
const T_CONTROL: i32 = 3;
const T_USER: i32 = 4;
const T_BYTE: i32 = 6;

/// The vocabulary type (`tokenizer.ggml.model`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `gpt2`: byte-level BPE.
    Bpe,
    /// `llama`: SentencePiece.
    Spm,
    /// `gemma4`: BPE over raw UTF-8 with `▁` for spaces.
    RawBpe,
}

/// Open-addressing map from token text to id over the concatenated texts
/// (no per-token allocation). Later duplicates win, as in llama.cpp.
#[derive(Debug)]
struct Index {
    /// `id + 1` per slot, 0 = empty.
    slots: Vec<u32>,
    mask: usize,
    /// Slot = the hash's top bits (a multiplicative hash's low bits only
    /// see the key's first bytes, and most tokens start with `▁` or `Ġ`).
    shift: u32,
}

impl Index {
    fn build(text: &[u8], off: &[u32]) -> Self {
        let n = off.len().saturating_sub(1);
        let cap = (n * 2).max(16).next_power_of_two();
        let mut ix = Index {
            slots: vec![0; cap],
            mask: cap - 1,
            shift: 64 - cap.trailing_zeros(),
        };
        for id in 0..n {
            let key = &text[off[id] as usize..off[id + 1] as usize];
            let mut s = (fx_hash(key) >> ix.shift) as usize;
            loop {
                match ix.slots[s] {
                    0 => {
                        ix.slots[s] = id as u32 + 1;
                        break;
                    }
                    v => {
                        let o = (v - 1) as usize;
                        if &text[off[o] as usize..off[o + 1] as usize] == key {
                            ix.slots[s] = id as u32 + 1;
                            break;
                        }
                    }
                }
                s = (s + 1) & ix.mask;
            }
        }
        ix
    }

    fn get(&self, text: &[u8], off: &[u32], key: &[u8]) -> Option<u32> {
        let mut s = (fx_hash(key) >> self.shift) as usize;
        loop {
            match self.slots[s] {
                0 => return None,
                v => {
                    let o = (v - 1) as usize;
                    if &text[off[o] as usize..off[o + 1] as usize] == key {
                        return Some(v - 1);
                    }
                }
            }
            s = (s + 1) & self.mask;
        }
    }
}

/// Special-token matchers: all specials, and the user-defined ones only.
#[derive(Debug)]
struct Specials {
    all: Option<(AhoCorasick, Vec<u32>)>,
    user: Option<(AhoCorasick, Vec<u32>)>,
}

fn matcher(
    texts: &[(Vec<u8>, u32)],
    keep: impl Fn(u32) -> bool,
) -> Result<Option<(AhoCorasick, Vec<u32>)>, InferenceError> {
    let (pats, ids): (Vec<&[u8]>, Vec<u32>) = texts
        .iter()
        .filter(|(_, id)| keep(*id))
        .map(|(t, id)| (t.as_slice(), *id))
        .unzip();
    if pats.is_empty() {
        return Ok(None);
    }
    let ac = AhoCorasick::builder()
        .match_kind(MatchKind::LeftmostLongest)
        // Thousands of specials (Gemma 3 has 6,414): a DFA would take ~1 s to build.
        .kind(Some(AhoCorasickKind::ContiguousNFA))
        .build(&pats)
        .map_err(|e| InferenceError::Tokenizer(format!("special tokens: {e}")))?;
    Ok(Some((ac, ids)))
}

/// A tokenizer built from GGUF metadata.
#[derive(Debug)]
pub struct Tokenizer {
    kind: Kind,
    /// Token texts as stored in the file, concatenated (lookup keys).
    text: Vec<u8>,
    text_off: Vec<u32>,
    /// Bytes each token stands for (specials: their text), concatenated.
    bytes: Vec<u8>,
    /// Token `i` is `bytes[offsets[i]..offsets[i + 1]]`.
    offsets: Vec<u32>,
    /// GGUF token types (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte).
    token_type: Vec<i32>,
    /// SentencePiece scores (empty for BPE).
    scores: Vec<f32>,
    index: Index,
    /// Token id of each single byte (byte fallback).
    byte_ids: [u32; 256],
    /// (left << 32 | right) → (rank, merged id).
    merges: FxMap<u64, (u32, u32)>,
    specials: Specials,
    /// Specials after which whitespace is dropped (Phi-3's `rstrip`).
    rstrip: Vec<u32>,
    pre: PreTok,
    ignore_merges: bool,
    bos: Option<u32>,
    eos: Option<u32>,
    eot: Option<u32>,
    /// End-of-generation tokens, sorted.
    eog: Vec<u32>,
    add_bos: bool,
    add_eos: bool,
    add_space_prefix: bool,
}

type FileKey = (u64, u64, u64, i64, i64);

fn registry() -> &'static Mutex<HashMap<FileKey, Weak<Tokenizer>>> {
    static R: OnceLock<Mutex<HashMap<FileKey, Weak<Tokenizer>>>> = OnceLock::new();
    R.get_or_init(Default::default)
}

/// Checks, without building any table, that the file's tokenizer model and
/// pre-tokenizer are supported; the error names what is missing.
pub(crate) fn check(g: &Gguf) -> Result<(), InferenceError> {
    kind_and_pre(g).map(|_| ())
}

fn kind_and_pre(g: &Gguf) -> Result<(Kind, PreTok, bool), InferenceError> {
    let err = |m: String| Err(InferenceError::Tokenizer(m));
    let Some(model) = g.get("tokenizer.ggml.model").and_then(Value::as_str) else {
        return err("missing tokenizer.ggml.model".into());
    };
    let pre_name = g.get("tokenizer.ggml.pre").and_then(Value::as_str);
    let kind = match model {
        "gpt2" => Kind::Bpe,
        "llama" => Kind::Spm,
        "gemma4" => Kind::RawBpe,
        other => {
            return err(format!(
                "tokenizer model {other:?} is not supported (supported: gpt2 byte-level BPE, \
                 llama SentencePiece, gemma4)"
            ));
        }
    };
    if g.get("tokenizer.ggml.tokens")
        .and_then(Value::as_array)
        .is_none()
    {
        return err("missing tokenizer.ggml.tokens".into());
    }
    match kind {
        Kind::Spm => Ok((kind, PreTok::Default, false)),
        Kind::RawBpe => Ok((kind, PreTok::Newlines, false)),
        Kind::Bpe => {
            if g.get("tokenizer.ggml.merges")
                .and_then(Value::as_array)
                .is_none()
            {
                return err("missing tokenizer.ggml.merges".into());
            }
            let Some(name) = pre_name else {
                return err(format!(
                    "tokenizer.ggml.pre is missing (a gpt2 vocabulary needs its pre-tokenizer; \
                     supported: {})",
                    pre::SUPPORTED
                ));
            };
            match pre::by_name(name) {
                Some((p, ignore)) => Ok((kind, p, ignore)),
                None => err(format!(
                    "pre-tokenizer {name:?} is not supported (supported: {})",
                    pre::SUPPORTED
                )),
            }
        }
    }
}

/// `<0xXX>` → the byte.
fn byte_token_value(t: &[u8]) -> Option<u8> {
    let h = t.strip_prefix(b"<0x")?.strip_suffix(b">")?;
    let s = std::str::from_utf8(h).ok()?;
    if s.len() != 2 {
        return None;
    }
    u8::from_str_radix(s, 16).ok()
}

/// End-of-generation token texts llama.cpp recognises (`llama-vocab.cpp`).
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<｜end▁of▁sentence｜>",
    "[e~[",
];

/// Texts llama.cpp takes as EOT when `eot_token_id` is absent.
const EOT_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
];

impl Tokenizer {
    /// The tokenizer for the GGUF `file`, built once per file and process
    /// (keyed by device, inode, size and mtime) and shared.
    pub fn shared(g: &Gguf, file: &std::fs::File) -> Result<Arc<Self>, InferenceError> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            let m = file.metadata()?;
            let key = (m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec());
            let mut reg = registry().lock().unwrap_or_else(|e| e.into_inner());
            if let Some(t) = reg.get(&key).and_then(Weak::upgrade) {
                return Ok(t);
            }
            let t = Arc::new(Self::from_gguf(g)?);
            reg.retain(|_, w| w.strong_count() > 0);
            reg.insert(key, Arc::downgrade(&t));
            Ok(t)
        }
        #[cfg(not(unix))]
        {
            let _ = file;
            Ok(Arc::new(Self::from_gguf(g)?))
        }
    }

    /// The tokenizer of the GGUF file at `path`, reading only its header (a
    /// vocabulary-only file without tensors works); shared like [`Self::shared`].
    pub fn load(path: impl AsRef<Path>) -> Result<Arc<Self>, InferenceError> {
        let file = std::fs::File::open(path.as_ref())?;
        let map = super::mapguard::GuardedMap::map(&file)?;
        let (g, _) = Gguf::parse_header(&map, map.len() as u64)?;
        Self::shared(&g, &file)
    }

    /// Builds a tokenizer from GGUF metadata.
    // long: one pass over the metadata, in llama.cpp's order (types, defaults, ids, EOG rules)
    pub fn from_gguf(g: &Gguf) -> Result<Self, InferenceError> {
        let err = |m: String| InferenceError::Tokenizer(m);
        let (kind, pre, ignore_merges) = kind_and_pre(g)?;
        let tokens = g
            .get("tokenizer.ggml.tokens")
            .and_then(Value::as_array)
            .ok_or_else(|| err("missing tokenizer.ggml.tokens".into()))?;
        let n = tokens.len();
        if n == 0 || n >= u32::MAX as usize {
            return Err(err(format!("bad vocabulary size {n}")));
        }
        let mut token_type: Vec<i32> =
            match g.get("tokenizer.ggml.token_type").and_then(Value::as_array) {
                Some(a) if a.len() >= n => a[..n]
                    .iter()
                    .map(|v| v.as_i64().and_then(|x| i32::try_from(x).ok()).unwrap_or(1))
                    .collect(),
                Some(_) => return Err(err("token_type is shorter than tokens".into())),
                None => vec![T_NORMAL; n],
            };
        let scores: Vec<f32> = match (kind, g.get("tokenizer.ggml.scores")) {
            (Kind::Spm, Some(v)) => {
                let a = v
                    .as_array()
                    .ok_or_else(|| err("tokenizer.ggml.scores is not an array".into()))?;
                if a.len() < n {
                    return Err(err("scores are shorter than tokens".into()));
                }
                a[..n]
                    .iter()
                    .map(|v| v.as_f64().map(|x| x as f32).unwrap_or(0.0))
                    .collect()
            }
            (Kind::Spm, None) => vec![0.0; n],
            _ => Vec::new(),
        };
        // Raw texts.
        let mut text = Vec::with_capacity(n * 8);
        let mut text_off = Vec::with_capacity(n + 1);
        text_off.push(0u32);
        for v in tokens {
            let t = v
                .as_str()
                .ok_or_else(|| err("token is not a string".into()))?;
            text.extend_from_slice(t.as_bytes());
            text_off.push(
                u32::try_from(text.len()).map_err(|_| err("vocabulary text over 4 GiB".into()))?,
            );
        }
        let index = Index::build(&text, &text_off);
        let raw = |i: usize| &text[text_off[i] as usize..text_off[i + 1] as usize];
        let lookup = |k: &[u8]| index.get(&text, &text_off, k);

        // Special ids: llama.cpp's defaults per type, then the metadata.
        let in_range = |v: u32| ((v as usize) < n).then_some(v);
        let (mut bos, mut eos, mut unk) = match kind {
            Kind::Spm => (in_range(1), in_range(2), in_range(0)),
            Kind::Bpe => (in_range(11), in_range(11), None),
            Kind::RawBpe => (None, None, None),
        };
        let id_of = |key: &str| -> Option<u32> {
            g.get(key)
                .and_then(Value::as_u64)
                .and_then(|v| u32::try_from(v).ok())
                .and_then(in_range)
        };
        bos = id_of("tokenizer.ggml.bos_token_id").or(bos);
        eos = id_of("tokenizer.ggml.eos_token_id").or(eos);
        unk = id_of("tokenizer.ggml.unknown_token_id").or(unk);
        let mut eot = id_of("tokenizer.ggml.eot_token_id");
        let eom = id_of("tokenizer.ggml.eom_token_id");
        let meta_bool = |k: &str| g.get(k).and_then(Value::as_bool);
        let add_bos = match kind {
            Kind::Spm => true,
            Kind::RawBpe => true,
            Kind::Bpe => matches!(pre, PreTok::Llama3) && ignore_merges,
        };
        let mut add_bos = meta_bool("tokenizer.ggml.add_bos_token").unwrap_or(add_bos);
        if kind == Kind::RawBpe {
            add_bos = true;
        }
        let add_eos = meta_bool("tokenizer.ggml.add_eos_token").unwrap_or(false);
        let add_space_prefix =
            meta_bool("tokenizer.ggml.add_space_prefix").unwrap_or(kind == Kind::Spm);

        // End of generation, as llama.cpp collects it.
        if eot.is_none() {
            eot = EOT_TEXTS.iter().find_map(|t| lookup(t.as_bytes()));
        }
        let mut eog: Vec<u32> = Vec::new();
        for t in EOG_TEXTS {
            if let Some(id) = lookup(t.as_bytes()) {
                eog.push(id);
            }
        }
        for t in [
            "<|fim_pad|>",
            "<|fim_repo|>",
            "<|repo_name|>",
            "<|file_sep|>",
        ] {
            if let Some(id) = lookup(t.as_bytes()) {
                eog.push(id);
            }
        }
        eog.extend([eos, eot, eom].into_iter().flatten());
        let has = |eog: &[u32], t: &str| lookup(t.as_bytes()).is_some_and(|id| eog.contains(&id));
        if ((has(&eog, "<|return|>") && has(&eog, "<|call|>"))
            || (has(&eog, "<|calls|>") && has(&eog, "<|flush|>")))
            && let Some(end) = lookup(b"<|end|>")
        {
            eog.retain(|&x| x != end);
            token_type[end as usize] = T_USER;
        }
        if (has(&eog, "<|tool_response>") || has(&eog, "<|plamo:eos|>"))
            && let Some(s) = lookup(b"</s>")
        {
            eog.retain(|&x| x != s);
            token_type[s as usize] = T_NORMAL;
        }
        eog.sort_unstable();
        eog.dedup();
        for &id in &eog {
            let ty = &mut token_type[id as usize];
            if *ty != T_CONTROL && *ty != T_USER {
                *ty = T_CONTROL;
            }
        }

        // Decoded bytes of each token.
        let b2c = byte_to_char();
        let mut c2b = [None::<u8>; 512];
        for (b, c) in b2c.iter().enumerate() {
            if let Some(slot) = c2b.get_mut(*c as usize) {
                *slot = Some(b as u8);
            }
        }
        let mut bytes = Vec::with_capacity(text.len());
        let mut offsets = Vec::with_capacity(n + 1);
        offsets.push(0u32);
        for (i, &ty) in token_type.iter().enumerate() {
            let t = raw(i);
            let start = bytes.len();
            match ty {
                T_UNKNOWN | T_CONTROL | T_USER => bytes.extend_from_slice(t),
                T_BYTE if kind != Kind::Bpe && byte_token_value(t).is_some() => {
                    bytes.push(byte_token_value(t).unwrap_or(0));
                }
                _ if kind == Kind::Bpe => {
                    let s = std::str::from_utf8(t).unwrap_or("");
                    let mut ok = true;
                    for c in s.chars() {
                        match c2b.get(c as usize).copied().flatten() {
                            Some(b) => bytes.push(b),
                            None => {
                                ok = false;
                                break;
                            }
                        }
                    }
                    if !ok {
                        bytes.truncate(start);
                        bytes.extend_from_slice(t);
                    }
                }
                _ => {
                    // ▁ (E2 96 81) → space.
                    let mut k = 0;
                    while k < t.len() {
                        if t[k..].starts_with("\u{2581}".as_bytes()) {
                            bytes.push(b' ');
                            k += 3;
                        } else {
                            bytes.push(t[k]);
                            k += 1;
                        }
                    }
                }
            }
            offsets.push(
                u32::try_from(bytes.len()).map_err(|_| err("vocabulary text over 4 GiB".into()))?,
            );
        }

        // Byte fallback.
        let mut byte_ids = [0u32; 256];
        let mut buf = [0u8; 4];
        for (b, slot) in byte_ids.iter_mut().enumerate() {
            let found = match kind {
                Kind::Bpe => lookup(b2c[b].encode_utf8(&mut buf).as_bytes()),
                Kind::Spm | Kind::RawBpe => {
                    let hex = format!("<0x{b:02X}>");
                    lookup(hex.as_bytes()).or_else(|| lookup(&[b as u8]))
                }
            };
            *slot = match found.or(unk) {
                Some(id) => id,
                None => {
                    return Err(err(format!(
                        "byte {b:#04x} has no token and there is no unknown token"
                    )));
                }
            };
        }

        let merges = match kind {
            Kind::Spm => FxMap::default(),
            Kind::Bpe | Kind::RawBpe => merge_table(g, &lookup)?,
        };

        // Special tokens, longest match first.
        let mut special_texts: Vec<(Vec<u8>, u32)> = Vec::new();
        for (i, &ty) in token_type.iter().enumerate() {
            if matches!(ty, T_UNKNOWN | T_CONTROL | T_USER) && !raw(i).is_empty() {
                special_texts.push((raw(i).to_vec(), i as u32));
            }
        }
        let specials = Specials {
            all: matcher(&special_texts, |_| true)?,
            user: matcher(&special_texts, |id| token_type[id as usize] == T_USER)?,
        };
        let name = g
            .get("general.name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_lowercase();
        let mut rstrip = Vec::new();
        if name.contains("phi-3") || name.contains("phi3") {
            let keep: Vec<Option<u32>> = ["<unk>", "<s>", "<|endoftext|>"]
                .iter()
                .map(|t| lookup(t.as_bytes()))
                .collect();
            rstrip = special_texts
                .iter()
                .map(|(_, id)| *id)
                .chain(lookup(b"</s>"))
                .filter(|id| !keep.contains(&Some(*id)))
                .collect();
            rstrip.sort_unstable();
            rstrip.dedup();
        }
        Ok(Tokenizer {
            kind,
            text,
            text_off,
            bytes,
            offsets,
            token_type,
            scores,
            index,
            byte_ids,
            merges,
            specials,
            rstrip,
            pre,
            ignore_merges,
            bos,
            eos,
            eot,
            eog,
            add_bos,
            add_eos,
            add_space_prefix,
        })
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Beginning-of-sequence token.
    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    /// End-of-sequence token.
    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// End-of-turn token (metadata, else found by its text as llama.cpp does).
    pub fn eot(&self) -> Option<u32> {
        self.eot
    }

    /// All end-of-generation tokens, sorted (EOS, EOT, EOM and the texts
    /// llama.cpp treats as ends: `<|eot_id|>`, `<|im_end|>`, `<end_of_turn>`, ...).
    pub fn eog_ids(&self) -> &[u32] {
        &self.eog
    }

    /// Whether the file asks for a BOS token before the prompt.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// True for tokens that end generation ([`Self::eog_ids`]).
    pub fn is_end(&self, id: u32) -> bool {
        self.eog.binary_search(&id).is_ok()
    }

    /// True for control tokens (not rendered in generated text).
    pub fn is_control(&self, id: u32) -> bool {
        self.token_type.get(id as usize) == Some(&T_CONTROL)
    }

    /// The token's id, if `text` is exactly one token's text as stored in
    /// the file (e.g. `<end_of_turn>`).
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.lookup(text.as_bytes())
    }

    fn lookup(&self, key: &[u8]) -> Option<u32> {
        self.index.get(&self.text, &self.text_off, key)
    }

    /// The bytes a token stands for (control tokens: their literal text).
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        let i = id as usize;
        match (self.offsets.get(i), self.offsets.get(i + 1)) {
            (Some(&a), Some(&b)) => &self.bytes[a as usize..b as usize],
            _ => &[],
        }
    }

    /// Token ids for `text`. With `parse_special`, control token texts (e.g.
    /// `<|im_start|>`) become their ids; otherwise they are tokenized as
    /// plain text (user-defined tokens are always matched, as in llama.cpp).
    /// With `add_bos`, BOS (and EOS) are added when the file asks for them.
    pub fn encode(&self, text: &str, parse_special: bool, add_bos: bool) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_bos
            && self.add_bos
            && let Some(b) = self.bos
        {
            out.push(b);
        }
        let m = if parse_special {
            &self.specials.all
        } else {
            &self.specials.user
        };
        // SentencePiece prefixes a space to text that follows a special (or starts).
        let mut prev_special = true;
        let mut start = 0;
        if let Some((ac, ids)) = m {
            for hit in ac.find_iter(text) {
                if hit.start() < start {
                    continue;
                }
                if hit.start() > start {
                    self.encode_fragment(&text[start..hit.start()], prev_special, &mut out);
                }
                let id = ids[hit.pattern().as_usize()];
                out.push(id);
                prev_special = true;
                start = hit.end();
                if self.rstrip.binary_search(&id).is_ok() {
                    while text
                        .as_bytes()
                        .get(start)
                        .is_some_and(u8::is_ascii_whitespace)
                    {
                        start += 1;
                    }
                }
            }
        }
        if start < text.len() {
            self.encode_fragment(&text[start..], prev_special, &mut out);
        }
        if add_bos
            && self.add_eos
            && let Some(e) = self.eos
        {
            out.push(e);
        }
        out
    }

    fn encode_fragment(&self, text: &str, prev_special: bool, out: &mut Vec<u32>) {
        match self.kind {
            Kind::Spm => {
                let mut s = String::with_capacity(text.len() * 2 + 3);
                if self.add_space_prefix && prev_special {
                    s.push('\u{2581}');
                }
                for c in text.chars() {
                    if c == ' ' {
                        s.push('\u{2581}');
                    } else {
                        s.push(c);
                    }
                }
                spm::encode(self, &s, out);
            }
            Kind::RawBpe => {
                let s = text.replace(' ', "\u{2581}");
                let mut words = Vec::new();
                pre::split(self.pre, &s, &mut words);
                for w in words {
                    self.bpe_word(s[w].as_bytes(), false, out);
                }
            }
            Kind::Bpe => {
                let mut words = Vec::new();
                pre::split(self.pre, text, &mut words);
                for w in words {
                    self.bpe_word(text[w].as_bytes(), true, out);
                }
            }
        }
    }

    /// BPE over one word: symbols are bytes (byte-level) or UTF-8 chars.
    fn bpe_word(&self, word: &[u8], byte_level: bool, out: &mut Vec<u32>) {
        if self.ignore_merges {
            let id = if byte_level {
                let b2c = gpt2_chars();
                let mut s = String::with_capacity(word.len() * 2);
                s.extend(word.iter().map(|&b| b2c[b as usize]));
                self.lookup(s.as_bytes())
            } else {
                self.lookup(word)
            };
            if let Some(id) = id {
                out.push(id);
                return;
            }
        } else if !byte_level
            && word.iter().all(|&b| b == b'\n')
            && let Some(id) = self.lookup(word)
        {
            // llama.cpp's Gemma 4 rule: a newline run that is a token stays whole.
            out.push(id);
            return;
        }
        // (token id or NONE, byte range in `word`)
        const NONE: u32 = u32::MAX;
        let mut syms: Vec<(u32, u32, u32)> = Vec::with_capacity(word.len());
        if byte_level {
            syms.extend(
                word.iter()
                    .enumerate()
                    .map(|(i, &b)| (self.byte_ids[b as usize], i as u32, i as u32 + 1)),
            );
        } else {
            let mut i = 0;
            while i < word.len() {
                let l = utf8_len(word[i]).min(word.len() - i);
                let id = self.lookup(&word[i..i + l]).unwrap_or(NONE);
                syms.push((id, i as u32, (i + l) as u32));
                i += l;
            }
        }
        while syms.len() > 1 {
            let mut best: Option<u32> = None;
            for w in syms.windows(2) {
                if w[0].0 != NONE
                    && w[1].0 != NONE
                    && let Some(&(rank, _)) = self.merges.get(&pair(w[0].0, w[1].0))
                    && best.is_none_or(|b| rank < b)
                {
                    best = Some(rank);
                }
            }
            let Some(rank) = best else { break };
            // Merge every occurrence of the best pair, left to right.
            let mut w = 0;
            let mut r = 0;
            while r < syms.len() {
                if r + 1 < syms.len()
                    && syms[r].0 != NONE
                    && syms[r + 1].0 != NONE
                    && let Some(&(rk, id)) = self.merges.get(&pair(syms[r].0, syms[r + 1].0))
                    && rk == rank
                {
                    syms[w] = (id, syms[r].1, syms[r + 1].2);
                    r += 2;
                } else {
                    syms[w] = syms[r];
                    r += 1;
                }
                w += 1;
            }
            syms.truncate(w);
        }
        for (id, a, b) in syms {
            if id != NONE {
                out.push(id);
            } else {
                out.extend(
                    word[a as usize..b as usize]
                        .iter()
                        .map(|&x| self.byte_ids[x as usize]),
                );
            }
        }
    }

    /// Concatenated bytes of `ids`; control (and unknown) tokens are skipped
    /// unless `with_special`. No leading-space removal (see [`Self::decode`]).
    pub fn decode_bytes(&self, ids: &[u32], with_special: bool) -> Vec<u8> {
        let mut out = Vec::new();
        for &id in ids {
            let ty = self
                .token_type
                .get(id as usize)
                .copied()
                .unwrap_or(T_NORMAL);
            if with_special || !matches!(ty, T_CONTROL | T_UNKNOWN) {
                out.extend_from_slice(self.token_bytes(id));
            }
        }
        out
    }

    /// Text of `ids` (invalid UTF-8 replaced); control tokens are skipped
    /// unless `with_special`. As llama.cpp's detokenize: when the file adds a
    /// space prefix (SentencePiece), the first token's leading space is dropped.
    pub fn decode(&self, ids: &[u32], with_special: bool) -> String {
        let mut b = self.decode_bytes(ids.get(..1).unwrap_or(&[]), with_special);
        if self.add_space_prefix && b.first() == Some(&b' ') {
            b.remove(0);
        }
        b.extend(self.decode_bytes(ids.get(1..).unwrap_or(&[]), with_special));
        String::from_utf8_lossy(&b).into_owned()
    }
}

fn gpt2_chars() -> &'static [char; 256] {
    static M: OnceLock<[char; 256]> = OnceLock::new();
    M.get_or_init(byte_to_char)
}

fn utf8_len(b: u8) -> usize {
    match b {
        0x00..=0x7F => 1,
        0xC0..=0xDF => 2,
        0xE0..=0xEF => 3,
        0xF0..=0xF7 => 4,
        _ => 1,
    }
}

fn pair(a: u32, b: u32) -> u64 {
    u64::from(a) << 32 | u64::from(b)
}

/// `tokenizer.ggml.merges` as (left id, right id) -> (rank, merged id);
/// merges whose parts or result are not tokens are skipped.
fn merge_table(
    g: &Gguf,
    lookup: &dyn Fn(&[u8]) -> Option<u32>,
) -> Result<FxMap<u64, (u32, u32)>, InferenceError> {
    let err = |m: String| InferenceError::Tokenizer(m);
    let merges_v = g
        .get("tokenizer.ggml.merges")
        .and_then(Value::as_array)
        .ok_or_else(|| err("missing tokenizer.ggml.merges".into()))?;
    let mut merges: FxMap<u64, (u32, u32)> =
        FxMap::with_capacity_and_hasher(merges_v.len(), Default::default());
    let mut joined = Vec::new();
    for (rank, m) in merges_v.iter().enumerate() {
        let m = m
            .as_str()
            .ok_or_else(|| err("merge is not a string".into()))?;
        // llama.cpp splits at the first space after the first byte.
        let Some(sp) = m
            .as_bytes()
            .iter()
            .skip(1)
            .position(|&b| b == b' ')
            .map(|p| p + 1)
        else {
            return Err(err(format!("bad merge {m:?}")));
        };
        let (a, b) = (&m[..sp], &m[sp + 1..]);
        joined.clear();
        joined.extend_from_slice(a.as_bytes());
        joined.extend_from_slice(b.as_bytes());
        if let (Some(ia), Some(ib), Some(ij)) =
            (lookup(a.as_bytes()), lookup(b.as_bytes()), lookup(&joined))
        {
            merges.entry(pair(ia, ib)).or_insert((rank as u32, ij));
        }
    }
    Ok(merges)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_map_is_a_bijection() {
        let m = byte_to_char();
        let set: std::collections::HashSet<char> = m.iter().copied().collect();
        assert_eq!(set.len(), 256);
        assert_eq!(m[b' ' as usize], 'Ġ');
        assert_eq!(m[b'\n' as usize], 'Ċ');
    }

    #[test]
    fn index_finds_every_token_and_last_duplicate_wins() {
        let texts = ["a", "bc", "", "bc", "déf"];
        let mut text = Vec::new();
        let mut off = vec![0u32];
        for t in texts {
            text.extend_from_slice(t.as_bytes());
            off.push(text.len() as u32);
        }
        let ix = Index::build(&text, &off);
        assert_eq!(ix.get(&text, &off, b"a"), Some(0));
        assert_eq!(ix.get(&text, &off, b"bc"), Some(3));
        assert_eq!(ix.get(&text, &off, "déf".as_bytes()), Some(4));
        assert_eq!(ix.get(&text, &off, b"x"), None);
    }

    #[test]
    fn byte_tokens_parse() {
        assert_eq!(byte_token_value(b"<0x0A>"), Some(10));
        assert_eq!(byte_token_value(b"<0xFF>"), Some(255));
        assert_eq!(byte_token_value(b"<0x1>"), None);
        assert_eq!(byte_token_value(b"0x10"), None);
    }
}
