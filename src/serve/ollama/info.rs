//! Model details for `/api/tags`, `/api/show` and `/api/ps`, read from the
//! GGUF header (metadata and tensor directory, never tensor data) once per
//! artifact: family, parameter count, quantization, file size and time.

use crate::gguf::{Gguf, GgufError, Value as GgufValue};
use serde_json::{Map, Value, json};
use std::path::Path;

/// What a model's header and file say about it.
#[derive(Debug, Clone)]
pub(super) struct Info {
    /// `general.architecture`.
    pub(super) family: String,
    /// Weights in the file, summed over the tensor directory.
    pub(super) parameters: u64,
    /// `general.file_type` as llama.cpp names it (`Q4_1`, `Q4_K_M`, ...).
    pub(super) quantization: String,
    /// File size in bytes.
    pub(super) size: u64,
    /// The file's modification time (RFC 3339).
    pub(super) modified_at: String,
    /// The metadata, arrays left out (as Ollama's `model_info` without
    /// `verbose`), with `general.parameter_count` added.
    pub(super) model_info: Map<String, Value>,
    /// The chat template in the file, if any.
    pub(super) template: Option<String>,
}

/// Reads the header of the GGUF file at `path` (growing the read until the
/// header fits, at most [`crate::inference::MAX_HEADER_BYTES`]). Blocking IO.
pub(super) fn read(path: &Path) -> Result<Info, String> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let meta = f
        .metadata()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let len = meta.len();
    let limit = len.min(crate::inference::MAX_HEADER_BYTES);
    let mut want = (1u64 << 20).min(limit);
    let mut buf = Vec::new();
    let g = loop {
        let have = buf.len() as u64;
        (&f).take(want - have)
            .read_to_end(&mut buf)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        match Gguf::parse_header(&buf, len) {
            Ok((g, _)) => break g,
            Err(GgufError::Truncated { .. }) if want < limit && buf.len() as u64 == want => {
                want = (want * 2).min(limit);
            }
            Err(e) => return Err(format!("{}: {e}", path.display())),
        }
    };
    let modified_at = meta
        .modified()
        .map(super::rfc3339)
        .unwrap_or_else(|_| super::rfc3339(std::time::UNIX_EPOCH));
    Ok(from_header(&g, len, modified_at))
}

fn from_header(g: &Gguf, size: u64, modified_at: String) -> Info {
    let parameters: u64 = g.tensors.iter().map(|t| t.elements()).sum();
    let family = g.architecture().unwrap_or("unknown").to_owned();
    let quantization = g
        .get("general.file_type")
        .and_then(GgufValue::as_u64)
        .and_then(file_type_name)
        .map(str::to_owned)
        .unwrap_or_else(|| most_common_type(g));
    let mut model_info = Map::new();
    for (k, v) in &g.metadata {
        if k == "tokenizer.chat_template" {
            continue;
        }
        model_info.insert(k.clone(), to_json(v));
    }
    model_info.insert("general.parameter_count".into(), json!(parameters));
    Info {
        family,
        parameters,
        quantization,
        size,
        modified_at,
        model_info,
        template: g
            .get("tokenizer.chat_template")
            .and_then(GgufValue::as_str)
            .map(str::to_owned),
    }
}

fn to_json(v: &GgufValue) -> Value {
    if v.as_array().is_some() {
        return Value::Null;
    }
    if let Some(s) = v.as_str() {
        return json!(s);
    }
    if let Some(b) = v.as_bool() {
        return json!(b);
    }
    if let Some(u) = v.as_u64() {
        return json!(u);
    }
    if let Some(i) = v.as_i64() {
        return json!(i);
    }
    v.as_f64().map_or(Value::Null, |f| json!(f))
}

/// The tensor type most weights have, when `general.file_type` is absent.
fn most_common_type(g: &Gguf) -> String {
    let mut by: std::collections::BTreeMap<&'static str, u64> = Default::default();
    for t in &g.tensors {
        *by.entry(t.ty.name()).or_default() += t.elements();
    }
    by.into_iter()
        .max_by_key(|(_, n)| *n)
        .map_or_else(|| "unknown".to_owned(), |(n, _)| n.to_ascii_uppercase())
}

/// llama.cpp's names of `general.file_type` (`llama_ftype`).
fn file_type_name(t: u64) -> Option<&'static str> {
    Some(match t {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        19 => "IQ2_XXS",
        20 => "IQ2_XS",
        21 => "Q2_K_S",
        22 => "IQ3_XS",
        23 => "IQ3_XXS",
        24 => "IQ1_S",
        25 => "IQ4_NL",
        26 => "IQ3_S",
        27 => "IQ3_M",
        28 => "IQ2_S",
        29 => "IQ2_M",
        30 => "IQ4_XS",
        31 => "IQ1_M",
        32 => "BF16",
        36 => "TQ1_0",
        37 => "TQ2_0",
        _ => return None,
    })
}

/// A parameter count as Ollama shows it: `134.52M`, `1.2B`.
pub(super) fn parameter_size(n: u64) -> String {
    let f = n as f64;
    if f >= 1e9 {
        format!("{:.1}B", f / 1e9)
    } else if f >= 1e6 {
        format!("{:.2}M", f / 1e6)
    } else if f >= 1e3 {
        format!("{:.2}K", f / 1e3)
    } else {
        n.to_string()
    }
}

impl Info {
    /// Ollama's `details` object.
    pub(super) fn details(&self) -> Value {
        json!({
            "parent_model": "",
            "format": "gguf",
            "family": self.family,
            "families": [self.family],
            "parameter_size": parameter_size(self.parameters),
            "quantization_level": self.quantization,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_types_read_as_ollama_shows_them() {
        assert_eq!(parameter_size(134_515_008), "134.52M");
        assert_eq!(parameter_size(268_098_176), "268.10M");
        assert_eq!(parameter_size(8_030_261_248), "8.0B");
        assert_eq!(file_type_name(3), Some("Q4_1"));
        assert_eq!(file_type_name(15), Some("Q4_K_M"));
        assert_eq!(file_type_name(4), None);
    }

    #[test]
    fn a_truncated_or_foreign_file_is_an_error_not_a_panic() {
        let d = tempfile::tempdir().expect("tmp");
        let p = d.path().join("x.gguf");
        std::fs::write(&p, b"GGUF\x03\x00\x00\x00").expect("write");
        assert!(read(&p).is_err());
        std::fs::write(&p, b"not a model").expect("write");
        assert!(read(&p).is_err());
        assert!(read(&d.path().join("missing")).is_err());
    }
}
