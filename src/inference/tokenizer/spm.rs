//! SentencePiece (`tokenizer.ggml.model = "llama"`), as llama.cpp's
//! `llm_tokenizer_spm_session`: the text (spaces already `▁`) starts as one
//! symbol per UTF-8 character; the adjacent pair whose concatenation is the
//! highest-scoring token is merged (ties: leftmost) until no pair is a
//! token; symbols that are not tokens fall back to `<0xXX>` byte tokens.

use super::Tokenizer;
use std::cmp::Ordering;
use std::collections::BinaryHeap;

#[derive(Clone, Copy)]
struct Sym {
    start: u32,
    len: u32,
    prev: i32,
    next: i32,
}

struct Bigram {
    score: f32,
    left: i32,
    right: i32,
    size: u32,
}

impl PartialEq for Bigram {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Bigram {
    /// Max-heap order: higher score first, then the leftmost pair.
    fn cmp(&self, o: &Self) -> Ordering {
        self.score
            .total_cmp(&o.score)
            .then_with(|| o.left.cmp(&self.left))
    }
}

/// Appends the SentencePiece tokens of `text` (already escaped) to `out`.
pub(super) fn encode(t: &Tokenizer, text: &str, out: &mut Vec<u32>) {
    let b = text.as_bytes();
    let mut syms: Vec<Sym> = Vec::with_capacity(b.len());
    let mut offs = 0usize;
    while offs < b.len() {
        let l = super::utf8_len(b[offs]).min(b.len() - offs);
        let i = syms.len() as i32;
        offs += l;
        syms.push(Sym {
            start: (offs - l) as u32,
            len: l as u32,
            prev: i - 1,
            next: if offs == b.len() { -1 } else { i + 1 },
        });
    }
    if syms.is_empty() {
        return;
    }
    let mut heap = BinaryHeap::with_capacity(syms.len());
    let try_add = |syms: &[Sym], heap: &mut BinaryHeap<Bigram>, left: i32, right: i32| {
        if left < 0 || right < 0 {
            return;
        }
        let (l, r) = (syms[left as usize], syms[right as usize]);
        let s = &b[l.start as usize..(l.start + l.len + r.len) as usize];
        if let Some(id) = t.lookup(s) {
            heap.push(Bigram {
                score: t.scores.get(id as usize).copied().unwrap_or(0.0),
                left,
                right,
                size: s.len() as u32,
            });
        }
    };
    for i in 1..syms.len() as i32 {
        try_add(&syms, &mut heap, i - 1, i);
    }
    while let Some(bg) = heap.pop() {
        let (l, r) = (syms[bg.left as usize], syms[bg.right as usize]);
        if l.len == 0 || r.len == 0 || l.len + r.len != bg.size {
            continue;
        }
        syms[bg.left as usize].len += r.len;
        syms[bg.right as usize].len = 0;
        syms[bg.left as usize].next = r.next;
        if r.next >= 0 {
            syms[r.next as usize].prev = bg.left;
        }
        let prev = syms[bg.left as usize].prev;
        let next = syms[bg.left as usize].next;
        try_add(&syms, &mut heap, prev, bg.left);
        try_add(&syms, &mut heap, bg.left, next);
    }
    let mut i = 0i32;
    while i >= 0 {
        let s = syms[i as usize];
        let piece = &b[s.start as usize..(s.start + s.len) as usize];
        match t.lookup(piece) {
            Some(id) => out.push(id),
            None => out.extend(piece.iter().map(|&x| t.byte_ids[x as usize])),
        }
        i = s.next;
    }
}
