//! Pre-tokenizers: how text is cut into words before BPE, as llama.cpp does
//! for each `tokenizer.ggml.pre` (`llm_tokenizer_bpe` in `llama-vocab.cpp`).
//!
//! llama.cpp applies a list of regexes in turn; each one cuts every piece
//! from the previous step into its matches and the gaps between them. The
//! gpt2, llama3, qwen2 and qwen3.5 regexes use lookahead, which the `regex`
//! crate lacks, so llama.cpp hand-codes them (`unicode.cpp`); they are ported
//! here state machine for state machine. The other regexes are simple enough
//! to match by hand with llama.cpp's own Unicode categories
//! ([`super::unicode_data`]), so `\p{L}` means the same thing on both sides.

use super::unicode_data::{RANGES, WHITESPACE};
use std::ops::Range;

const NUMBER: u16 = 0x02;
const LETTER: u16 = 0x04;
const MARK: u16 = 0x10;
const PUNCT: u16 = 0x20;
const WS: u16 = 0x100;

/// llama.cpp's category flags of `cp` (plus [`WS`] for whitespace).
fn flags(cp: u32) -> u16 {
    let i = RANGES.partition_point(|r| r.0 <= cp);
    let cat = match i.checked_sub(1).and_then(|i| RANGES.get(i)) {
        Some(r) => u16::from(r.1),
        None => 1,
    };
    let ws = if (cp < 0x80 && matches!(cp, 9..=13 | 32)) || (cp >= 0x80 && WHITESPACE.contains(&cp))
    {
        WS
    } else {
        0
    };
    cat | ws
}

/// A pre-tokenizer: the regex list llama.cpp uses for a `tokenizer.ggml.pre`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PreTok {
    /// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)` (gpt-2, phi-2, mpt, olmo, ...).
    Gpt2,
    /// Every `\p{N}` alone, then the gpt2 regex (starcoder, refact, smollm, command-r, ...).
    DigitsGpt2,
    /// llama.cpp's fallback (`default` or absent): punctuation runs, gpt2, digit runs, digit triples.
    Default,
    /// Llama 3: case-insensitive contractions, letters with one leading non-letter, `\p{N}{1,3}`, ...
    Llama3,
    /// Qwen 2: as Llama 3 but single digits.
    Qwen2,
    /// Qwen 3.5: as Qwen 2, letter runs take combining marks.
    Qwen35,
    /// DeepSeek LLM: newlines, explicit Latin/Greek/Cyrillic/... letter and punctuation sets, CJK, digit runs.
    DeepseekLlm,
    /// DeepSeek Coder: newlines, letters, punctuation, CJK, single digits.
    DeepseekCoder,
    /// Falcon: punctuation runs, gpt2, digit triples.
    Falcon,
    /// Gemma 4 (SPM-style BPE over raw UTF-8): only newline runs are cut off.
    Newlines,
}

/// The pre-tokenizer llama.cpp selects for `tokenizer.ggml.pre = name`, and
/// whether it enables `ignore_merges` (a word that is a token is not merged).
pub(super) fn by_name(name: &str) -> Option<(PreTok, bool)> {
    Some(match name {
        "default" => (PreTok::Default, false),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" | "dbrx" | "smaug-bpe" => {
            (PreTok::Llama3, name != "dbrx" && name != "smaug-bpe")
        }
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" | "stablelm2" | "hunyuan"
        | "solar-open" => (PreTok::Qwen2, false),
        "qwen35" => (PreTok::Qwen35, false),
        "deepseek-llm" => (PreTok::DeepseekLlm, false),
        "deepseek-coder" => (PreTok::DeepseekCoder, false),
        "falcon" => (PreTok::Falcon, false),
        "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone" | "minerva-7b"
        | "mellum2" => (PreTok::DigitsGpt2, false),
        "gpt-2" | "gpt2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es"
        | "jina-v2-de" | "a.x-4.0" | "mellum" | "modern-bert" | "jina-v1-en" | "jina-v2-code"
        | "roberta-bpe" | "mpt" | "olmo" | "jais" | "trillion" | "granite-docling" | "exaone4" => {
            (PreTok::Gpt2, false)
        }
        "gemma4" | "granite-embed-multi-311m" => (PreTok::Newlines, false),
        _ => return None,
    })
}

/// Names [`by_name`] knows, for error messages.
pub(super) const SUPPORTED: &str = "default, gpt-2 family (gpt-2, phi-2, mpt, olmo, ...), \
     llama3/llama-bpe, qwen2, deepseek-r1-qwen, qwen35, deepseek-llm, deepseek-coder, falcon, \
     starcoder/refact/smollm/command-r family, gemma4";

/// Text as codepoints with their flags and byte offsets.
struct Cps {
    cp: Vec<u32>,
    fl: Vec<u16>,
    /// Byte offset of codepoint `i`; one extra entry: the text length.
    at: Vec<usize>,
}

impl Cps {
    fn new(text: &str) -> Self {
        let n = text.len();
        let mut s = Cps {
            cp: Vec::with_capacity(n),
            fl: Vec::with_capacity(n),
            at: Vec::with_capacity(n + 1),
        };
        for (i, c) in text.char_indices() {
            s.cp.push(c as u32);
            s.fl.push(flags(c as u32));
            s.at.push(i);
        }
        s.at.push(n);
        s
    }
}

/// One regex of the list: cuts a piece into matches and gaps.
type Pass<'a> = dyn Fn(&Cps, Range<usize>, &mut Vec<Range<usize>>) + 'a;

/// Cuts `text` into words (byte ranges, in order, covering all of it).
// long: one arm per pre-tokenizer, each llama.cpp's regex list in order
pub(super) fn split(pre: PreTok, text: &str, out: &mut Vec<Range<usize>>) {
    if text.is_empty() {
        return;
    }
    let c = Cps::new(text);
    let n = c.cp.len();
    let mut pieces: Vec<Range<usize>> = Vec::with_capacity(n / 2 + 1);
    pieces.push(0..n);
    let mut next = Vec::new();
    let mut step = |pieces: &mut Vec<Range<usize>>, f: &Pass<'_>| {
        next.clear();
        for p in pieces.iter() {
            f(&c, p.clone(), &mut next);
        }
        std::mem::swap(pieces, &mut next);
    };
    let is_num = |c: &Cps, i: usize| c.fl[i] & NUMBER != 0;
    let is_digit = |c: &Cps, i: usize| matches!(c.cp[i], 0x30..=0x39);
    let is_rn = |c: &Cps, i: usize| matches!(c.cp[i], 10 | 13);
    let is_ws = |c: &Cps, i: usize| c.fl[i] & WS != 0;
    // `[\p{P}\$\+<=>\^~\|]` (with the backquote for falcon).
    let punct_sym = |c: &Cps, i: usize, tick: bool| {
        c.fl[i] & PUNCT != 0
            || matches!(c.cp[i], 0x24 | 0x2B | 0x3C..=0x3E | 0x5E | 0x7E | 0x7C)
            || (tick && c.cp[i] == 0x60)
    };
    match pre {
        PreTok::Gpt2 => step(&mut pieces, &gpt2),
        PreTok::DigitsGpt2 => {
            step(&mut pieces, &|c, r, o| {
                runs(c, r, o, &|c, i| is_num(c, i), Some(1))
            });
            step(&mut pieces, &gpt2);
        }
        PreTok::Default => {
            step(&mut pieces, &|c, r, o| {
                runs(c, r, o, &|c, i| punct_sym(c, i, false), None)
            });
            step(&mut pieces, &gpt2);
            step(&mut pieces, &|c, r, o| {
                runs(c, r, o, &|c, i| is_num(c, i), None)
            });
            step(&mut pieces, &|c, r, o| {
                runs(c, r, o, &|c, i| is_digit(c, i), Some(3))
            });
        }
        PreTok::Falcon => {
            step(&mut pieces, &|c, r, o| {
                runs(c, r, o, &|c, i| punct_sym(c, i, true), None)
            });
            step(&mut pieces, &gpt2);
            step(&mut pieces, &|c, r, o| {
                runs(c, r, o, &|c, i| is_digit(c, i), Some(3))
            });
        }
        PreTok::Llama3 => step(&mut pieces, &|c, r, o| llama3(c, r, o, 3, false)),
        PreTok::Qwen2 => step(&mut pieces, &|c, r, o| llama3(c, r, o, 1, false)),
        PreTok::Qwen35 => step(&mut pieces, &|c, r, o| llama3(c, r, o, 1, true)),
        PreTok::DeepseekCoder => {
            step(&mut pieces, &|c, r, o| {
                runs(c, r, o, &|c, i| is_rn(c, i), Some(1))
            });
            step(&mut pieces, &|c, r, o| {
                ws_opt_run(c, r, o, &|c, i| c.fl[i] & LETTER != 0)
            });
            step(&mut pieces, &|c, r, o| {
                ws_opt_run(c, r, o, &|c, i| c.fl[i] & PUNCT != 0)
            });
            step(&mut pieces, &|c, r, o| {
                runs(c, r, o, &|c, i| in_set(c, i, CJK_HANGUL), None)
            });
            step(&mut pieces, &|c, r, o| {
                runs(c, r, o, &|c, i| is_num(c, i), Some(1))
            });
        }
        PreTok::DeepseekLlm => {
            step(&mut pieces, &|c, r, o| {
                runs(c, r, o, &|c, i| is_rn(c, i), Some(1))
            });
            step(&mut pieces, &|c, r, o| {
                ws_opt_run(c, r, o, &|c, i| in_set(c, i, DS_LLM_LETTERS))
            });
            step(&mut pieces, &|c, r, o| {
                ws_opt_run(c, r, o, &|c, i| in_set(c, i, DS_LLM_PUNCT))
            });
            step(&mut pieces, &|c, r, o| {
                // `\s+$`: the piece's trailing whitespace.
                let mut s = r.end;
                while s > r.start && is_ws(c, s - 1) {
                    s -= 1;
                }
                push(o, r.start..s);
                push(o, s..r.end);
            });
            step(&mut pieces, &|c, r, o| {
                runs(c, r, o, &|c, i| in_set(c, i, CJK_HANGUL), None)
            });
            step(&mut pieces, &|c, r, o| {
                runs(c, r, o, &|c, i| is_num(c, i), None)
            });
        }
        PreTok::Newlines => step(&mut pieces, &|c, r, o| {
            let mut s = r.start;
            while s < r.end {
                let nl = c.cp[s] == 10;
                let mut e = s + 1;
                while e < r.end && (c.cp[e] == 10) == nl {
                    e += 1;
                }
                o.push(s..e);
                s = e;
            }
        }),
    }
    out.extend(pieces.into_iter().map(|r| c.at[r.start]..c.at[r.end]));
}

fn push(o: &mut Vec<Range<usize>>, r: Range<usize>) {
    if r.start < r.end {
        o.push(r);
    }
}

/// Matches of `class+` (or of `class{len}` when `len` is set) and the gaps between them.
fn runs(
    c: &Cps,
    r: Range<usize>,
    o: &mut Vec<Range<usize>>,
    class: &dyn Fn(&Cps, usize) -> bool,
    len: Option<usize>,
) {
    let mut gap = r.start;
    let mut i = r.start;
    while i < r.end {
        if !class(c, i) {
            i += 1;
            continue;
        }
        let mut e = i;
        while e < r.end && class(c, e) && len.is_none_or(|l| e - i < l) {
            e += 1;
        }
        if len.is_some_and(|l| e - i < l) {
            i += 1;
            continue;
        }
        push(o, gap..i);
        o.push(i..e);
        gap = e;
        i = e;
    }
    push(o, gap..r.end);
}

/// Matches of `\s?class+` and the gaps between them.
fn ws_opt_run(
    c: &Cps,
    r: Range<usize>,
    o: &mut Vec<Range<usize>>,
    class: &dyn Fn(&Cps, usize) -> bool,
) {
    let mut gap = r.start;
    let mut i = r.start;
    while i < r.end {
        let start = if class(c, i) {
            i
        } else if c.fl[i] & WS != 0 && i + 1 < r.end && class(c, i + 1) {
            i + 1
        } else {
            i += 1;
            continue;
        };
        let mut e = start;
        while e < r.end && class(c, e) {
            e += 1;
        }
        push(o, gap..i);
        o.push(i..e);
        gap = e;
        i = e;
    }
    push(o, gap..r.end);
}

fn in_set(c: &Cps, i: usize, set: &[(u32, u32)]) -> bool {
    let cp = c.cp[i];
    // Non-ASCII whitespace is replaced by \x0B before llama.cpp matches.
    if cp >= 0x80 && c.fl[i] & WS != 0 {
        return false;
    }
    set.iter().any(|&(a, b)| (a..=b).contains(&cp))
}

/// Port of llama.cpp's `unicode_regex_split_custom_gpt2`.
fn gpt2(c: &Cps, r: Range<usize>, o: &mut Vec<Range<usize>>) {
    let end = r.end;
    let cpt = |p: usize| if p < end { c.cp[p] } else { u32::MAX };
    // Out of range: no flags at all (not even "undefined").
    let fl = |p: usize| if p < end { c.fl[p] } else { 0 };
    let mut prev = r.start;
    let mut pos = r.start;
    let mut add = |o: &mut Vec<Range<usize>>, e: usize| {
        push(o, prev..e);
        prev = e;
    };
    while pos < end {
        let cp = cpt(pos);
        let f = fl(pos);
        if cp == u32::from(b'\'') && pos + 1 < end {
            let n1 = cpt(pos + 1);
            if matches!(n1, 0x73 | 0x74 | 0x6D | 0x64) {
                pos += 2;
                add(o, pos);
                continue;
            }
            if pos + 2 < end {
                let n2 = cpt(pos + 2);
                if matches!((n1, n2), (0x72, 0x65) | (0x76, 0x65) | (0x6C, 0x6C)) {
                    pos += 3;
                    add(o, pos);
                    continue;
                }
            }
        }
        let sp = usize::from(cp == 0x20);
        let mut f2 = if sp == 1 { fl(pos + 1) } else { f };
        if f2 & LETTER != 0 {
            pos += sp;
            while f2 & LETTER != 0 {
                pos += 1;
                f2 = fl(pos);
            }
            add(o, pos);
            continue;
        }
        if f2 & NUMBER != 0 {
            pos += sp;
            while f2 & NUMBER != 0 {
                pos += 1;
                f2 = fl(pos);
            }
            add(o, pos);
            continue;
        }
        if f2 & (WS | LETTER | NUMBER) == 0 && f2 != 0 {
            pos += sp;
            while f2 & (WS | LETTER | NUMBER) == 0 && f2 != 0 {
                pos += 1;
                f2 = fl(pos);
            }
            add(o, pos);
            continue;
        }
        let mut nws = 0;
        while fl(pos + nws) & WS != 0 {
            nws += 1;
        }
        if nws > 1 && cpt(pos + nws) != u32::MAX {
            pos += nws - 1;
            add(o, pos);
            continue;
        }
        if nws > 0 {
            pos += nws;
            add(o, pos);
            continue;
        }
        pos += 1;
        add(o, pos);
    }
}

/// Port of llama.cpp's `unicode_regex_split_custom_llama3` (`max_digits` 3),
/// `_qwen2` (1) and `_qwen35` (1, `marks`).
fn llama3(c: &Cps, r: Range<usize>, o: &mut Vec<Range<usize>>, max_digits: usize, marks: bool) {
    let end = r.end;
    let cpt = |p: usize| if p < end { c.cp[p] } else { u32::MAX };
    let fl = |p: usize| if p < end { c.fl[p] } else { 0 };
    let letter = if marks { LETTER | MARK } else { LETTER };
    let lower = |x: u32| {
        if (0x41..=0x5A).contains(&x) {
            x + 32
        } else {
            x
        }
    };
    let mut prev = r.start;
    let mut pos = r.start;
    let mut add = |o: &mut Vec<Range<usize>>, e: usize| {
        push(o, prev..e);
        prev = e;
    };
    while pos < end {
        let cp = cpt(pos);
        let f = fl(pos);
        if cp == u32::from(b'\'') && pos + 1 < end {
            let n1 = lower(cpt(pos + 1));
            if matches!(n1, 0x73 | 0x74 | 0x6D | 0x64) {
                pos += 2;
                add(o, pos);
                continue;
            }
            if pos + 2 < end {
                let n2 = lower(cpt(pos + 2));
                if matches!((n1, n2), (0x72, 0x65) | (0x76, 0x65) | (0x6C, 0x6C)) {
                    pos += 3;
                    add(o, pos);
                    continue;
                }
            }
        }
        // [^\r\n\p{L}\p{N}]?\p{L}+
        if !(cp == 13 || cp == 10 || f & NUMBER != 0)
            && (f & letter != 0 || fl(pos + 1) & letter != 0)
        {
            pos += 1;
            while fl(pos) & letter != 0 {
                pos += 1;
            }
            add(o, pos);
            continue;
        }
        // \p{N}{1,max}
        if f & NUMBER != 0 {
            if max_digits == 1 {
                pos += 1;
            } else {
                let mut ini = pos;
                while fl(pos) & NUMBER != 0 {
                    pos += 1;
                    if pos - ini >= max_digits {
                        add(o, pos);
                        ini = pos;
                    }
                }
            }
            add(o, pos);
            continue;
        }
        // <space>?[^\s\p{L}\p{N}]+[\r\n]*
        let mut f2 = if cp == 0x20 { fl(pos + 1) } else { f };
        if f2 & (WS | letter | NUMBER) == 0 && f != 0 {
            pos += usize::from(cp == 0x20);
            while f2 & (WS | letter | NUMBER) == 0 && f2 != 0 {
                pos += 1;
                f2 = fl(pos);
            }
            let mut c2 = cpt(pos);
            while c2 == 13 || c2 == 10 {
                pos += 1;
                c2 = cpt(pos);
            }
            add(o, pos);
            continue;
        }
        let mut nws = 0;
        let mut last_rn = 0;
        while fl(pos + nws) & WS != 0 {
            let c2 = cpt(pos + nws);
            if c2 == 13 || c2 == 10 {
                last_rn = pos + nws + 1;
            }
            nws += 1;
        }
        // \s*[\r\n]+
        if last_rn > 0 {
            pos = last_rn;
            add(o, pos);
            continue;
        }
        // \s+(?!\S)
        if nws > 1 && cpt(pos + nws) != u32::MAX {
            pos += nws - 1;
            add(o, pos);
            continue;
        }
        // \s+
        if nws > 0 {
            pos += nws;
            add(o, pos);
            continue;
        }
        pos += 1;
        add(o, pos);
    }
}

// The literal sets of the deepseek-llm and deepseek-coder regexes (from
// llama.cpp's `llama-vocab.cpp`).
const DS_LLM_LETTERS: &[(u32, u32)] = &[
    (0x41, 0x5A),
    (0x61, 0x7A),
    (0xB5, 0xB5),
    (0xC0, 0xD6),
    (0xD8, 0xF6),
    (0xF8, 0x1BA),
    (0x1BC, 0x1BF),
    (0x1C4, 0x293),
    (0x295, 0x2AF),
    (0x370, 0x373),
    (0x376, 0x376),
    (0x377, 0x377),
    (0x37B, 0x37D),
    (0x37F, 0x37F),
    (0x386, 0x386),
    (0x388, 0x38A),
    (0x38C, 0x38C),
    (0x38E, 0x3A1),
    (0x3A3, 0x3F5),
    (0x3F7, 0x481),
    (0x48A, 0x52F),
    (0x531, 0x556),
    (0x10A0, 0x10C5),
    (0x13A0, 0x13F5),
    (0x13F8, 0x13FD),
    (0x1C90, 0x1CBA),
    (0x1CBD, 0x1CBF),
    (0x1D00, 0x1D2B),
    (0x1D6B, 0x1D77),
    (0x1D79, 0x1D9A),
    (0x1E00, 0x1F15),
    (0x1F18, 0x1F1D),
    (0x1F20, 0x1F45),
    (0x1F48, 0x1F4D),
    (0x1F50, 0x1F57),
    (0x1F59, 0x1F59),
    (0x1F5B, 0x1F5B),
    (0x1F5D, 0x1F5D),
    (0x1F5F, 0x1F7D),
    (0x1F80, 0x1FB4),
    (0x1FB6, 0x1FBC),
    (0x1FBE, 0x1FBE),
    (0x1FC2, 0x1FC4),
    (0x1FC6, 0x1FCC),
    (0x1FD0, 0x1FD3),
    (0x1FD6, 0x1FDB),
    (0x1FE0, 0x1FEC),
    (0x1FF2, 0x1FF4),
    (0x1FF6, 0x1FFC),
    (0x2102, 0x2102),
    (0x2107, 0x2107),
    (0x210A, 0x2113),
    (0x2115, 0x2115),
    (0x2119, 0x211D),
    (0x2124, 0x2124),
    (0x2126, 0x2126),
    (0x2128, 0x2128),
    (0x212A, 0x212D),
    (0x212F, 0x2134),
    (0x2139, 0x2139),
    (0x213C, 0x213F),
    (0x2145, 0x2149),
    (0x214E, 0x214E),
    (0x2183, 0x2183),
    (0x2184, 0x2184),
    (0x2C00, 0x2C7B),
    (0x2C7E, 0x2CE4),
    (0x2CEB, 0x2CEE),
    (0x2CF2, 0x2CF2),
    (0x2CF3, 0x2CF3),
    (0xA640, 0xA66D),
    (0xA680, 0xA69B),
    (0xA722, 0xA76F),
    (0xA771, 0xA787),
    (0xA78B, 0xA78E),
    (0xAB70, 0xABBF),
    (0xFB00, 0xFB06),
    (0xFB13, 0xFB17),
    (0xFF21, 0xFF3A),
    (0xFF41, 0xFF5A),
    (0x10400, 0x1044F),
    (0x104B0, 0x104D3),
    (0x104D8, 0x104FB),
    (0x10C80, 0x10CB2),
    (0x10CC0, 0x10CF2),
    (0x118A0, 0x118DF),
    (0x1E900, 0x1E943),
];
const DS_LLM_PUNCT: &[(u32, u32)] = &[
    (0x21, 0x2F),
    (0x3A, 0x7E),
    (0xFF01, 0xFF0F),
    (0xFF1A, 0xFF5E),
    (0x2018, 0x201F),
    (0x3000, 0x3002),
];
const CJK_HANGUL: &[(u32, u32)] = &[(0x4E00, 0x9FA5), (0x800, 0x4E00), (0xAC00, 0xD7FF)];

#[cfg(test)]
mod tests {
    use super::*;

    fn words(pre: PreTok, text: &str) -> Vec<&str> {
        let mut v = Vec::new();
        split(pre, text, &mut v);
        v.into_iter().map(|r| &text[r]).collect()
    }

    #[test]
    fn gpt2_split_matches_lookahead_semantics() {
        assert_eq!(
            words(PreTok::Gpt2, "Hello   world\n\nfoo  "),
            ["Hello", "  ", " world", "\n", "\n", "foo", "  "]
        );
        assert_eq!(
            words(PreTok::Gpt2, "it's 3.5%!  ok\tx"),
            ["it", "'s", " 3", ".", "5", "%!", " ", " ok", "\t", "x"]
        );
    }

    #[test]
    fn llama3_split() {
        assert_eq!(
            words(PreTok::Llama3, "I'M 12345 (ok)\n\n  x"),
            ["I", "'M", " ", "123", "45", " (", "ok", ")\n\n", " ", " x"]
        );
        assert_eq!(words(PreTok::Qwen2, "a 123"), ["a", " ", "1", "2", "3"]);
    }

    #[test]
    fn categories_follow_llama_cpp() {
        assert_eq!(flags(u32::from('a')) & LETTER, LETTER);
        assert_eq!(flags(u32::from('٣')) & NUMBER, NUMBER);
        assert_eq!(flags(0x3000) & WS, WS);
        assert_eq!(flags(u32::from('!')) & PUNCT, PUNCT);
    }
}
