//! Where chunk boundaries fall.
//!
//! GGUF files are cut along their own structure: the header (metadata and
//! tensor directory) forms its own chunk(s); every tensor starts a new chunk;
//! a tensor larger than [`MAX_CHUNK`] is cut into pieces of at most that size,
//! counted from the tensor's start so that the same tensor bytes always give
//! the same chunks wherever the tensor sits in the file; runs of tiny tensors
//! (norm weights, biases) are grouped so they do not make a chunk each.
//! Two versions of a model that share tensors therefore share chunks.
//!
//! Any other file is cut with content-defined chunking (FastCDC 2020), with
//! the same upper bound, so an edit in the middle of a file shifts nothing
//! outside the chunks it touches.

use crate::gguf::Gguf;

/// Largest chunk, in bytes (1 MiB).
pub const MAX_CHUNK: u32 = 1 << 20;
/// Smallest content-defined chunk (except the last).
pub const CDC_MIN: u32 = 64 << 10;
/// Average content-defined chunk.
pub const CDC_AVG: u32 = 256 << 10;
/// A tensor region smaller than this may be grouped with its neighbours.
pub const SMALL_TENSOR: u64 = 16 << 10;
/// A group of small tensors is closed before it exceeds this size.
pub const SMALL_GROUP: u64 = 64 << 10;

/// A chunk's place in its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// Byte offset in the file.
    pub offset: u64,
    /// Length in bytes, `1..=MAX_CHUNK`.
    pub len: u32,
}

impl Span {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.offset + u64::from(self.len)
    }
}

/// Cuts `[start, end)` into pieces of at most [`MAX_CHUNK`], counted from `start`.
fn fixed(out: &mut Vec<Span>, start: u64, end: u64) {
    let mut at = start;
    while at < end {
        let len = (end - at).min(u64::from(MAX_CHUNK));
        out.push(Span {
            offset: at,
            len: len as u32,
        });
        at += len;
    }
}

/// Chunk boundaries for a parsed GGUF file of `file_len` bytes.
///
/// The spans cover `[0, file_len)` exactly, in order. Every tensor's first
/// byte is the first byte of some span (unless it was grouped with other
/// small tensors, in which case the group starts at the first of them).
pub fn gguf_spans(g: &Gguf, file_len: u64) -> Vec<Span> {
    let mut out = Vec::new();
    let mut starts: Vec<(u64, u64)> = g
        .tensors
        .iter()
        .map(|t| (g.data_offset + t.offset, t.size))
        .filter(|(s, _)| *s < file_len)
        .collect();
    starts.sort_unstable();
    starts.dedup_by_key(|s| s.0);
    let header_end = starts
        .first()
        .map(|s| s.0)
        .unwrap_or(file_len)
        .min(file_len);
    fixed(&mut out, 0, header_end);
    let mut i = 0;
    while i < starts.len() {
        let start = starts[i].0;
        let region_end = |j: usize| starts.get(j + 1).map(|s| s.0).unwrap_or(file_len);
        let mut end = region_end(i);
        // Group a run of tiny tensors.
        if end - start < SMALL_TENSOR {
            while i + 1 < starts.len() {
                let next_end = region_end(i + 1);
                if next_end - starts[i + 1].0 >= SMALL_TENSOR || next_end - start > SMALL_GROUP {
                    break;
                }
                i += 1;
                end = next_end;
            }
        }
        fixed(&mut out, start, end);
        i += 1;
    }
    out
}

/// Content-defined chunk boundaries for arbitrary bytes.
pub fn cdc_spans(data: &[u8]) -> Vec<Span> {
    if data.is_empty() {
        return Vec::new();
    }
    fastcdc::v2020::FastCDC::new(data, CDC_MIN as usize, CDC_AVG as usize, MAX_CHUNK as usize)
        .map(|c| Span {
            offset: c.offset as u64,
            len: c.length as u32,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::writer::{TensorSpec, write};
    use crate::gguf::{GgmlType, Value};
    use proptest::prelude::*;

    fn covers(spans: &[Span], len: u64) {
        let mut at = 0;
        for s in spans {
            assert_eq!(s.offset, at, "gap or overlap");
            assert!(s.len >= 1 && s.len <= MAX_CHUNK, "bad length {}", s.len);
            at = s.end();
        }
        assert_eq!(at, len);
    }

    fn model(sizes: &[usize]) -> Vec<u8> {
        let tensors: Vec<TensorSpec> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| TensorSpec {
                name: format!("t{i}"),
                dims: vec![n as u64],
                ty: GgmlType::I8,
                data: (0..n).map(|k| (k * 31 + i) as u8).collect(),
            })
            .collect();
        write(
            &[("general.architecture", Value::String("llama".into()))],
            &tensors,
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn gguf_spans_cover_and_start_at_tensors(sizes in prop::collection::vec(1usize..3_000_000, 1..8)) {
            let b = model(&sizes);
            let g = Gguf::parse(&b).expect("parse");
            let spans = gguf_spans(&g, b.len() as u64);
            covers(&spans, b.len() as u64);
            let starts: std::collections::HashSet<u64> = spans.iter().map(|s| s.offset).collect();
            for t in &g.tensors {
                if t.size >= SMALL_TENSOR {
                    prop_assert!(starts.contains(&(g.data_offset + t.offset)), "tensor {} not at a boundary", t.name);
                }
            }
            // Reassembly is identical.
            let mut re = Vec::new();
            for s in &spans { re.extend_from_slice(&b[s.offset as usize..s.end() as usize]); }
            prop_assert_eq!(re, b);
        }

        #[test]
        fn cdc_spans_cover(data in prop::collection::vec(any::<u8>(), 0..3_000_000)) {
            let spans = cdc_spans(&data);
            covers(&spans, data.len() as u64);
        }
    }

    #[test]
    fn same_tensor_same_chunks_at_other_offset() {
        let a = model(&[100, 2_500_000]);
        let b = model(&[5000, 2_500_000]);
        let (ga, gb) = (Gguf::parse(&a).expect("a"), Gguf::parse(&b).expect("b"));
        let ha: Vec<_> = gguf_spans(&ga, a.len() as u64)
            .iter()
            .map(|s| blake3::hash(&a[s.offset as usize..s.end() as usize]))
            .collect();
        let hb: Vec<_> = gguf_spans(&gb, b.len() as u64)
            .iter()
            .map(|s| blake3::hash(&b[s.offset as usize..s.end() as usize]))
            .collect();
        // The big tensor's pieces (the last three chunks) are shared.
        assert_eq!(ha[ha.len() - 3..], hb[hb.len() - 3..]);
    }

    #[test]
    fn tiny_tensors_are_grouped() {
        let b = model(&[64; 40]);
        let g = Gguf::parse(&b).expect("parse");
        let spans = gguf_spans(&g, b.len() as u64);
        // header chunk + one group
        assert!(spans.len() <= 3, "{} spans", spans.len());
    }
}
