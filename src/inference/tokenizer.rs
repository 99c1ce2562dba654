//! The GGUF tokenizer: gpt2-style byte-level BPE from `tokenizer.ggml.*`.
//!
//! Text is first cut at special tokens (control and user-defined tokens are
//! matched literally, longest first), then each piece is pre-tokenized with
//! the regex llama.cpp uses for the file's `tokenizer.ggml.pre`, mapped to
//! the gpt2 byte alphabet and merged by rank. One tokenizer is built per
//! file and shared process-wide ([`Tokenizer::shared`]).

use super::InferenceError;
use crate::gguf::{Gguf, Value};
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
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

/// How text is split before BPE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PreTok {
    /// The gpt2 regex.
    Gpt2,
    /// Every digit alone, then the gpt2 regex (smollm, starcoder, ...).
    DigitsGpt2,
}

fn gpt2_regex() -> &'static regex::Regex {
    static RE: OnceLock<regex::Regex> = OnceLock::new();
    // `\s+(?!\S)` is emulated in `split_gpt2` (the regex crate has no lookahead).
    RE.get_or_init(|| {
        regex::Regex::new(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+")
            .unwrap_or_else(|_| unreachable!("constant regex"))
    })
}

/// Splits with `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`.
fn split_gpt2<'a>(text: &'a str, out: &mut Vec<&'a str>) {
    let re = gpt2_regex();
    let mut at = 0;
    while at < text.len() {
        let Some(m) = re.find_at(text, at) else {
            out.push(&text[at..]);
            break;
        };
        if m.start() > at {
            out.push(&text[at..m.start()]);
        }
        let s = m.as_str();
        let mut end = m.end();
        // A whitespace run followed by a non-space leaves its last char to
        // the next piece (`\s+(?!\S)`).
        if end < text.len() && s.chars().all(char::is_whitespace) {
            let mut it = s.char_indices();
            if let (Some(_), Some(_)) = (it.next(), it.next())
                && let Some((last, _)) = s.char_indices().last()
            {
                end = m.start() + last;
            }
        }
        out.push(&text[m.start()..end]);
        at = end;
    }
}

fn pair(a: u32, b: u32) -> u64 {
    u64::from(a) << 32 | u64::from(b)
}

/// A byte-level BPE tokenizer built from GGUF metadata.
#[derive(Debug)]
pub struct Tokenizer {
    /// Bytes of all tokens, concatenated (specials: their text).
    bytes: Vec<u8>,
    /// Token `i` is `bytes[offsets[i]..offsets[i + 1]]`.
    offsets: Vec<u32>,
    /// GGUF token types (1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte).
    token_type: Vec<i32>,
    /// Token id of each single byte.
    byte_ids: [u32; 256],
    /// (left << 32 | right) → (rank, merged id).
    merges: FxMap<u64, (u32, u32)>,
    /// Special tokens, longest first: (text, id).
    specials: Vec<(String, u32)>,
    pre: PreTok,
    bos: Option<u32>,
    eos: Option<u32>,
    eot: Option<u32>,
    add_bos: bool,
}

type FileKey = (u64, u64, u64, i64, i64);

fn registry() -> &'static Mutex<HashMap<FileKey, Weak<Tokenizer>>> {
    static R: OnceLock<Mutex<HashMap<FileKey, Weak<Tokenizer>>>> = OnceLock::new();
    R.get_or_init(Default::default)
}

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

    /// Builds a tokenizer from GGUF metadata.
    pub fn from_gguf(g: &Gguf) -> Result<Self, InferenceError> {
        let err = |m: String| InferenceError::Tokenizer(m);
        let model = g
            .get("tokenizer.ggml.model")
            .and_then(Value::as_str)
            .ok_or_else(|| err("missing tokenizer.ggml.model".into()))?;
        if model != "gpt2" {
            return Err(err(format!(
                "tokenizer model {model:?} is not supported (only gpt2 byte-level BPE)"
            )));
        }
        let tokens = g
            .get("tokenizer.ggml.tokens")
            .and_then(Value::as_array)
            .ok_or_else(|| err("missing tokenizer.ggml.tokens".into()))?;
        let tokens: Vec<&str> = tokens
            .iter()
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| err("token is not a string".into()))
            })
            .collect::<Result<_, _>>()?;
        let n = tokens.len();
        let token_type: Vec<i32> =
            match g.get("tokenizer.ggml.token_type").and_then(Value::as_array) {
                Some(a) if a.len() == n => a
                    .iter()
                    .map(|v| v.as_i64().and_then(|x| i32::try_from(x).ok()).unwrap_or(1))
                    .collect(),
                Some(_) => return Err(err("token_type length differs from tokens".into())),
                None => vec![1; n],
            };
        let b2c = byte_to_char();
        let (bytes, offsets, ids) = vocab_bytes(&tokens, &token_type, &b2c)?;
        let unk = g
            .get("tokenizer.ggml.unknown_token_id")
            .and_then(Value::as_u64)
            .map(|v| v as u32);
        let byte_ids = byte_token_ids(&ids, &b2c, unk)?;
        let merges = merge_table(g, &ids)?;
        let mut specials: Vec<(String, u32)> = tokens
            .iter()
            .zip(&token_type)
            .enumerate()
            .filter(|(_, (t, ty))| matches!(ty, 3 | 4) && !t.is_empty())
            .map(|(i, (t, _))| ((*t).to_owned(), i as u32))
            .collect();
        specials.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        let pre = pre_tokenizer(
            g.get("tokenizer.ggml.pre")
                .and_then(Value::as_str)
                .unwrap_or("default"),
        )?;
        let id_of = |key: &str| -> Option<u32> {
            g.get(key)
                .and_then(Value::as_u64)
                .and_then(|v| u32::try_from(v).ok())
                .filter(|&v| (v as usize) < n)
        };
        let eos = id_of("tokenizer.ggml.eos_token_id");
        Ok(Tokenizer {
            bytes,
            offsets,
            token_type,
            byte_ids,
            merges,
            specials,
            pre,
            bos: id_of("tokenizer.ggml.bos_token_id"),
            eos,
            eot: id_of("tokenizer.ggml.eot_token_id"),
            add_bos: g
                .get("tokenizer.ggml.add_bos_token")
                .and_then(Value::as_bool)
                .unwrap_or(false),
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

    /// Whether the file asks for a BOS token before the prompt.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// True for tokens that end generation (EOS, EOT).
    pub fn is_end(&self, id: u32) -> bool {
        Some(id) == self.eos || Some(id) == self.eot
    }

    /// True for control tokens (not rendered in generated text).
    pub fn is_control(&self, id: u32) -> bool {
        self.token_type.get(id as usize) == Some(&3)
    }

    /// The bytes a token stands for (control tokens: their literal text).
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        let i = id as usize;
        match (self.offsets.get(i), self.offsets.get(i + 1)) {
            (Some(&a), Some(&b)) => &self.bytes[a as usize..b as usize],
            _ => &[],
        }
    }

    /// Token ids for `text`. With `parse_special`, control and user-defined
    /// token texts (e.g. `<|im_start|>`) become their ids; otherwise they are
    /// tokenized as plain text. With `add_bos`, the BOS id is prepended when
    /// the file asks for it.
    pub fn encode(&self, text: &str, parse_special: bool, add_bos: bool) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_bos
            && self.add_bos
            && let Some(b) = self.bos
        {
            out.push(b);
        }
        if !parse_special || self.specials.is_empty() {
            self.encode_plain(text, &mut out);
            return out;
        }
        let mut start = 0;
        let mut i = 0;
        let bytes = text.as_bytes();
        while i < bytes.len() {
            let hit = self
                .specials
                .iter()
                .find(|(s, _)| bytes[i..].starts_with(s.as_bytes()));
            if let Some((s, id)) = hit {
                self.encode_plain(&text[start..i], &mut out);
                out.push(*id);
                i += s.len();
                start = i;
            } else {
                i += 1;
                while i < bytes.len() && !text.is_char_boundary(i) {
                    i += 1;
                }
            }
        }
        self.encode_plain(&text[start..], &mut out);
        out
    }

    fn encode_plain(&self, text: &str, out: &mut Vec<u32>) {
        if text.is_empty() {
            return;
        }
        let mut pieces = Vec::new();
        match self.pre {
            PreTok::Gpt2 => split_gpt2(text, &mut pieces),
            PreTok::DigitsGpt2 => {
                let mut seg = 0;
                for (i, c) in text.char_indices() {
                    if c.is_numeric() {
                        if seg < i {
                            split_gpt2(&text[seg..i], &mut pieces);
                        }
                        pieces.push(&text[i..i + c.len_utf8()]);
                        seg = i + c.len_utf8();
                    }
                }
                if seg < text.len() {
                    split_gpt2(&text[seg..], &mut pieces);
                }
            }
        }
        let mut syms = Vec::new();
        for p in pieces {
            syms.clear();
            syms.extend(p.bytes().map(|b| self.byte_ids[b as usize]));
            self.bpe(&mut syms);
            out.extend_from_slice(&syms);
        }
    }

    fn bpe(&self, syms: &mut Vec<u32>) {
        while syms.len() > 1 {
            let mut best: Option<(u32, usize, u32)> = None;
            for i in 0..syms.len() - 1 {
                if let Some(&(rank, id)) = self.merges.get(&pair(syms[i], syms[i + 1]))
                    && best.is_none_or(|b| rank < b.0)
                {
                    best = Some((rank, i, id));
                }
            }
            let Some((rank, _, _)) = best else { break };
            // Merge every occurrence of the best pair, left to right.
            let mut w = 0;
            let mut r = 0;
            while r < syms.len() {
                if r + 1 < syms.len()
                    && let Some(&(rk, id)) = self.merges.get(&pair(syms[r], syms[r + 1]))
                    && rk == rank
                {
                    syms[w] = id;
                    r += 2;
                } else {
                    syms[w] = syms[r];
                    r += 1;
                }
                w += 1;
            }
            syms.truncate(w);
        }
    }

    /// Concatenated bytes of `ids`; control tokens are skipped unless
    /// `with_special`.
    pub fn decode_bytes(&self, ids: &[u32], with_special: bool) -> Vec<u8> {
        let mut out = Vec::new();
        for &id in ids {
            if with_special || !self.is_control(id) {
                out.extend_from_slice(self.token_bytes(id));
            }
        }
        out
    }

    /// Text of `ids` (invalid UTF-8 replaced); control tokens are skipped
    /// unless `with_special`.
    pub fn decode(&self, ids: &[u32], with_special: bool) -> String {
        String::from_utf8_lossy(&self.decode_bytes(ids, with_special)).into_owned()
    }
}

/// What [`vocab_bytes`] makes: token bytes, their offsets, the id of each text.
type VocabBytes<'a> = (Vec<u8>, Vec<u32>, FxMap<&'a str, u32>);

/// The vocabulary as one byte buffer with offsets (token `i` is
/// `bytes[offsets[i]..offsets[i + 1]]`), and the id of each token text.
/// Normal tokens are written in gpt2's byte-to-char alphabet and decoded
/// back to bytes; control, user-defined and unused tokens are their text.
fn vocab_bytes<'a>(
    tokens: &[&'a str],
    token_type: &[i32],
    b2c: &[char; 256],
) -> Result<VocabBytes<'a>, InferenceError> {
    // Inverse map; every gpt2 byte char is below U+0200.
    let mut c2b = [None::<u8>; 512];
    for (b, c) in b2c.iter().enumerate() {
        if let Some(slot) = c2b.get_mut(*c as usize) {
            *slot = Some(b as u8);
        }
    }
    let n = tokens.len();
    let mut ids: FxMap<&str, u32> = FxMap::with_capacity_and_hasher(n, Default::default());
    let mut bytes = Vec::with_capacity(n * 6);
    let mut offsets = Vec::with_capacity(n + 1);
    offsets.push(0u32);
    for (i, (t, ty)) in tokens.iter().zip(token_type).enumerate() {
        ids.entry(t).or_insert(i as u32);
        let start = bytes.len();
        let mut ok = true;
        if !matches!(ty, 2..=4) {
            for c in t.chars() {
                match c2b.get(c as usize).copied().flatten() {
                    Some(b) => bytes.push(b),
                    None => {
                        ok = false;
                        break;
                    }
                }
            }
        }
        if matches!(ty, 2..=4) || !ok {
            bytes.truncate(start);
            bytes.extend_from_slice(t.as_bytes());
        }
        let end = u32::try_from(bytes.len())
            .map_err(|_| InferenceError::Tokenizer("vocabulary text over 4 GiB".into()))?;
        offsets.push(end);
    }
    Ok((bytes, offsets, ids))
}

/// The token of each byte value (its gpt2 char), else the unknown token.
fn byte_token_ids(
    ids: &FxMap<&str, u32>,
    b2c: &[char; 256],
    unk: Option<u32>,
) -> Result<[u32; 256], InferenceError> {
    let mut byte_ids = [0u32; 256];
    let mut buf = [0u8; 4];
    for (b, id) in byte_ids.iter_mut().enumerate() {
        let s = b2c[b].encode_utf8(&mut buf);
        *id = match ids.get(&*s) {
            Some(&i) => i,
            None => unk.ok_or_else(|| {
                InferenceError::Tokenizer(format!(
                    "byte {b:#x} has no token and there is no unknown token"
                ))
            })?,
        };
    }
    Ok(byte_ids)
}

/// `tokenizer.ggml.merges` as (left id, right id) -> (rank, merged id);
/// merges whose parts or result are not tokens are skipped.
fn merge_table(g: &Gguf, ids: &FxMap<&str, u32>) -> Result<FxMap<u64, (u32, u32)>, InferenceError> {
    let err = |m: String| InferenceError::Tokenizer(m);
    let merges_v = g
        .get("tokenizer.ggml.merges")
        .and_then(Value::as_array)
        .ok_or_else(|| err("missing tokenizer.ggml.merges".into()))?;
    let mut merges: FxMap<u64, (u32, u32)> =
        FxMap::with_capacity_and_hasher(merges_v.len(), Default::default());
    let mut joined = String::new();
    for (rank, m) in merges_v.iter().enumerate() {
        let m = m
            .as_str()
            .ok_or_else(|| err("merge is not a string".into()))?;
        let (a, b) = m
            .split_once(' ')
            .ok_or_else(|| err(format!("bad merge {m:?}")))?;
        joined.clear();
        joined.push_str(a);
        joined.push_str(b);
        if let (Some(&ia), Some(&ib), Some(&ij)) = (ids.get(a), ids.get(b), ids.get(&*joined)) {
            merges
                .entry(u64::from(ia) << 32 | u64::from(ib))
                .or_insert((rank as u32, ij));
        }
    }
    Ok(merges)
}

/// The pre-tokenizer a `tokenizer.ggml.pre` name selects.
fn pre_tokenizer(name: &str) -> Result<PreTok, InferenceError> {
    match name {
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva" => {
            Ok(PreTok::DigitsGpt2)
        }
        "default" | "gpt-2" | "gpt2" | "phi-2" | "jina-es" | "jina-de" | "jina-v2-es"
        | "jina-v2-de" | "jina-v2-code" | "roberta-bpe" => Ok(PreTok::Gpt2),
        other => Err(InferenceError::Tokenizer(format!(
            "pre-tokenizer {other:?} is not supported (supported: gpt2 and smollm families)"
        ))),
    }
}

/// Whether this build can tokenize for `g`, from its metadata alone (no
/// vocabulary is built): the tokenizer model and the pre-tokenizer.
/// Used by `support::check` to refuse a model from its header.
pub(crate) fn check(g: &Gguf) -> Result<(), InferenceError> {
    let model = g
        .get("tokenizer.ggml.model")
        .and_then(Value::as_str)
        .ok_or_else(|| InferenceError::Tokenizer("missing tokenizer.ggml.model".into()))?;
    if model != "gpt2" {
        return Err(InferenceError::Tokenizer(format!(
            "tokenizer model {model:?} is not supported (only gpt2 byte-level BPE)"
        )));
    }
    pre_tokenizer(
        g.get("tokenizer.ggml.pre")
            .and_then(Value::as_str)
            .unwrap_or("default"),
    )
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_split_matches_lookahead_semantics() {
        let mut v = Vec::new();
        split_gpt2("Hello   world\n\nfoo  ", &mut v);
        assert_eq!(v, ["Hello", "  ", " world", "\n", "\n", "foo", "  "]);
        v.clear();
        split_gpt2("it's 3.5%!  ok\tx", &mut v);
        assert_eq!(v, ["it", "'s", " 3", ".", "5", "%!", " ", " ok", "\t", "x"]);
    }

    #[test]
    fn byte_map_is_a_bijection() {
        let m = byte_to_char();
        let set: std::collections::HashSet<char> = m.iter().copied().collect();
        assert_eq!(set.len(), 256);
        assert_eq!(m[b' ' as usize], 'Ġ');
        assert_eq!(m[b'\n' as usize], 'Ċ');
    }
}
