//! Whether this build can serve a GGUF file, decided from its header alone
//! (metadata and tensor directory, no tensor data): the architecture and
//! its hyper-parameters, the type of every tensor, and the tokenizer.
//!
//! A node asked for a model it does not hold fetches only the chunks that
//! hold the header, runs [`check_header`] over them, and pulls the rest only
//! when the model is servable; `/v1/models` reports the same verdict for
//! each model. See `docs/SERVING.md` ("Models this node cannot serve").

use super::{HParams, InferenceError, quant, tokenizer};
use crate::gguf::{GgmlType, Gguf, GgufError};

/// Why this build cannot serve a model, named from its header.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Unservable {
    /// The header is not a GGUF header this build reads.
    #[error("invalid GGUF header: {0}")]
    Header(GgufError),
    /// `general.architecture` is missing or names a family without a forward here.
    #[error("architecture: {0}")]
    Architecture(String),
    /// The architecture's hyper-parameters are missing or out of range.
    #[error("model metadata: {0}")]
    Model(String),
    /// A tensor has a type this build has no kernel for.
    #[error("tensor {tensor} has type {ty}, which this build cannot compute with{also}")]
    TensorType {
        /// The first such tensor, in file order.
        tensor: String,
        /// Its type (as llama.cpp names it, or `unknown type N`).
        ty: String,
        /// The others, e.g. ` (144 tensors in all, of types iq4_xs, iq2_s)`,
        /// or empty when it is the only one.
        also: String,
    },
    /// The tokenizer model or pre-tokenizer is not implemented here.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
}

impl Unservable {
    /// A short machine-readable name of what is missing: `header`,
    /// `architecture`, `model_metadata`, `tensor_type` or `tokenizer`.
    pub fn kind(&self) -> &'static str {
        match self {
            Unservable::Header(_) => "header",
            Unservable::Architecture(_) => "architecture",
            Unservable::Model(_) => "model_metadata",
            Unservable::TensorType { .. } => "tensor_type",
            Unservable::Tokenizer(_) => "tokenizer",
        }
    }
}

/// Decides from the parsed header of `g` whether this build can serve it:
/// the architecture and its hyper-parameters ([`HParams::from_gguf`]), the
/// type of every tensor in the file (each must have a matmul kernel here;
/// norm vectors are F32), and the tokenizer (model and pre-tokenizer).
/// Reads no tensor data. The first failing check is the answer.
pub fn check(g: &Gguf) -> Result<(), Unservable> {
    HParams::from_gguf(g).map_err(|e| match e {
        InferenceError::UnsupportedArchitecture(_) => Unservable::Architecture(e.to_string()),
        InferenceError::BadModel(m) if m.contains("general.architecture") => {
            Unservable::Architecture(m)
        }
        other => Unservable::Model(strip_prefix(other)),
    })?;
    let bad: Vec<&crate::gguf::TensorInfo> = g
        .tensors
        .iter()
        .filter(|t| !quant::supported(t.ty))
        .collect();
    if let Some(first) = bad.first() {
        let mut types: Vec<GgmlType> = Vec::new();
        for t in &bad {
            if !types.contains(&t.ty) {
                types.push(t.ty);
            }
        }
        let also = match bad.len() {
            1 => String::new(),
            n => format!(
                " ({n} tensors in all, of types {})",
                types
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        return Err(Unservable::TensorType {
            tensor: first.name.clone(),
            ty: first.ty.to_string(),
            also,
        });
    }
    tokenizer::check(g).map_err(|e| Unservable::Tokenizer(strip_prefix(e)))
}

/// The message of an inference error without its variant's prefix
/// (`bad model: `, `tokenizer: `): the [`Unservable`] variant says it.
fn strip_prefix(e: InferenceError) -> String {
    match e {
        InferenceError::BadModel(m) | InferenceError::Tokenizer(m) => m,
        other => other.to_string(),
    }
}

/// The verdict of [`check_header`] on a prefix of a file.
#[derive(Debug, Clone, PartialEq)]
pub enum HeaderCheck {
    /// The prefix ends inside the header: fetch more and ask again.
    NeedMore,
    /// This build can serve the file (as far as its header tells).
    Servable,
    /// This build cannot serve it.
    Unservable(Unservable),
}

/// [`check`] over `prefix`, the first bytes of a GGUF file of `file_len`
/// bytes (for instance its first chunks, fetched and verified): parses the
/// header with [`Gguf::parse_header`] and checks it, or answers
/// [`HeaderCheck::NeedMore`] when the header runs past the prefix.
pub fn check_header(prefix: &[u8], file_len: u64) -> HeaderCheck {
    match Gguf::parse_header(prefix, file_len) {
        Ok((g, _)) => match check(&g) {
            Ok(()) => HeaderCheck::Servable,
            Err(u) => HeaderCheck::Unservable(u),
        },
        // The reader ran out of prefix (a tensor past the file's end reports
        // the file's length instead).
        Err(GgufError::Truncated { have, .. })
            if have == prefix.len() as u64 && have < file_len =>
        {
            HeaderCheck::NeedMore
        }
        Err(e) => HeaderCheck::Unservable(Unservable::Header(e)),
    }
}

/// Largest GGUF header read to decide servability (a 262k-token vocabulary
/// takes about 6 MiB). A larger header is not checked first: the model's
/// load decides.
pub const MAX_HEADER_BYTES: u64 = 64 << 20;

/// [`check_header`] over a local file: reads its first bytes (1 MiB, then
/// doubling while the header runs on, up to `max_bytes`). `None` when the
/// file cannot be read or its header is longer than `max_bytes`.
pub fn check_file(path: &std::path::Path, max_bytes: u64) -> Option<Result<(), Unservable>> {
    use std::io::Read;
    let f = std::fs::File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    let limit = len.min(max_bytes);
    let mut want = (1u64 << 20).min(limit);
    let mut buf = Vec::new();
    loop {
        let have = buf.len() as u64;
        (&f).take(want - have).read_to_end(&mut buf).ok()?;
        match check_header(&buf, len) {
            HeaderCheck::Servable => return Some(Ok(())),
            HeaderCheck::Unservable(u) => return Some(Err(u)),
            HeaderCheck::NeedMore if want < limit && buf.len() as u64 == want => {
                want = (want * 2).min(limit);
            }
            HeaderCheck::NeedMore => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::Value;
    use crate::gguf::writer::{TensorSpec, write};

    /// A header-complete tiny llama: metadata plus tensors of `ty` (data is
    /// never read by the check).
    fn tiny(arch: &str, ty: GgmlType, tok: &str, pre: &str) -> Vec<u8> {
        let k = |s: &str| format!("{arch}.{s}");
        let meta: Vec<(String, Value)> = vec![
            ("general.architecture".into(), Value::String(arch.into())),
            (k("block_count"), Value::U32(1)),
            (k("embedding_length"), Value::U32(256)),
            (k("feed_forward_length"), Value::U32(256)),
            (k("attention.head_count"), Value::U32(4)),
            (k("context_length"), Value::U32(64)),
            ("tokenizer.ggml.model".into(), Value::String(tok.into())),
            ("tokenizer.ggml.pre".into(), Value::String(pre.into())),
            (
                "tokenizer.ggml.tokens".into(),
                Value::Array(vec![Value::String("a".into()); 4]),
            ),
            (
                "tokenizer.ggml.merges".into(),
                Value::Array(vec![Value::String("a a".into())]),
            ),
        ];
        let meta: Vec<(&str, Value)> = meta.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        let (blk, bpb) = ty.layout().unwrap_or((1, 1));
        let n = 256 * 4 / blk * bpb;
        write(
            &meta,
            &[
                TensorSpec {
                    name: "blk.0.attn_q.weight".into(),
                    dims: vec![256, 4],
                    ty,
                    data: vec![0; n as usize],
                },
                TensorSpec {
                    name: "output_norm.weight".into(),
                    dims: vec![256],
                    ty: GgmlType::F32,
                    data: vec![0; 1024],
                },
            ],
        )
    }

    #[test]
    fn a_supported_header_is_servable_and_each_gap_is_named() {
        let ok = tiny("llama", GgmlType::Q8_0, "gpt2", "smollm");
        assert_eq!(check_header(&ok, ok.len() as u64), HeaderCheck::Servable);

        let b = tiny("grok", GgmlType::Q8_0, "gpt2", "smollm");
        match check_header(&b, b.len() as u64) {
            HeaderCheck::Unservable(u @ Unservable::Architecture(_)) => {
                assert!(u.to_string().contains("\"grok\""), "{u}");
                assert_eq!(u.kind(), "architecture");
            }
            other => panic!("{other:?}"),
        }

        let b = tiny("llama", GgmlType::IQ4_XS, "gpt2", "smollm");
        match check_header(&b, b.len() as u64) {
            HeaderCheck::Unservable(Unservable::TensorType { tensor, ty, also }) => {
                assert_eq!(tensor, "blk.0.attn_q.weight");
                assert_eq!(ty, "iq4_xs");
                assert_eq!(also, "");
            }
            other => panic!("{other:?}"),
        }

        let b = tiny("llama", GgmlType::Q8_0, "gpt2", "no-such-pre");
        match check_header(&b, b.len() as u64) {
            HeaderCheck::Unservable(u @ Unservable::Tokenizer(_)) => {
                assert!(u.to_string().contains("no-such-pre"), "{u}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_short_prefix_asks_for_more_and_a_bad_header_is_refused() {
        let ok = tiny("llama", GgmlType::Q8_0, "gpt2", "smollm");
        let g = Gguf::parse(&ok).expect("parse");
        let len = ok.len() as u64;
        for cut in [0usize, 4, 30, g.data_offset as usize / 2] {
            assert_eq!(
                check_header(&ok[..cut], len),
                HeaderCheck::NeedMore,
                "{cut}"
            );
        }
        assert_eq!(
            check_header(&ok[..g.data_offset as usize], len),
            HeaderCheck::Servable
        );
        // The whole file but a wrong length: tensors past the end.
        assert!(matches!(
            check_header(&ok[..g.data_offset as usize], g.data_offset + 1),
            HeaderCheck::Unservable(Unservable::Header(GgufError::Truncated { .. }))
        ));
        let mut bad = ok.clone();
        bad[0] = b'X';
        assert!(matches!(
            check_header(&bad, len),
            HeaderCheck::Unservable(Unservable::Header(GgufError::BadMagic))
        ));
    }
}
