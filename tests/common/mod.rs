//! Helpers shared by integration tests.
#![allow(dead_code)]

use shoal::gguf::writer::{TensorSpec, write};
use shoal::gguf::{GgmlType, Value};
use std::path::PathBuf;

/// Path of the demo model, or `None` (with a loud message) when it is missing
/// outside CI. In CI (`CI=true`) a missing model is a failure.
pub fn demo_model() -> Option<PathBuf> {
    let p = std::env::var_os("SHOAL_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_default();
            std::env::var_os("SHOAL_MODEL_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| home.join(".cache/shoal/models"))
                .join("SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    if p.exists() {
        return Some(p);
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!(
            "demo model missing at {} (run scripts/fetch-model.sh)",
            p.display()
        );
    }
    eprintln!(
        "SKIPPING: demo model missing at {} (run scripts/fetch-model.sh)",
        p.display()
    );
    None
}

/// A deterministic pseudo-random byte stream.
pub fn bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A synthetic GGUF "model" with tensors of the given byte sizes (I8), contents from `seed`.
pub fn gguf_model(sizes: &[usize], seed: u64) -> Vec<u8> {
    let tensors: Vec<TensorSpec> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| TensorSpec {
            name: format!("blk.{i}.weight"),
            dims: vec![n as u64],
            ty: GgmlType::I8,
            data: bytes(seed + i as u64, n),
        })
        .collect();
    write(
        &[
            ("general.architecture", Value::String("llama".into())),
            ("general.name", Value::String("synthetic".into())),
        ],
        &tensors,
    )
}
