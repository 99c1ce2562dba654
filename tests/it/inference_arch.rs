//! Logits parity with llama.cpp, one tiny random-weight GGUF per
//! architecture (`tests/fixtures/arch/`, built by
//! `scripts/fixtures/make-arch-fixtures.sh`; see docs/INFERENCE.md,
//! "Parity fixtures"). Each `<name>.logits.json` holds llama.cpp's logits at
//! every prompt position and along its 16-token greedy continuation; we run
//! the same ids one at a time (so every position's logits come out), feed
//! llama.cpp's greedy ids back in (teacher forcing keeps the rows
//! comparable) and compare.
//!
//! Tolerances, as max |Δ| over a row relative to that row's largest |logit|
//! (the logits here span about ±6..±10):
//! - F32 weights: both sides keep K/V in f16 (llama-server's default
//!   cache type; shoal rounds every K/V through f16 too), but llama.cpp also
//!   rounds Q and the softmax weights to f16 inside its f16 K·Q and KQ·V
//!   products, and sums in another order: measured 4e-4 (llama, qwen2,
//!   qwen3) to 1e-3 (gemma3, six layers) relative; [`F32_TOL`] is 5x that.
//! - Quantized weights (Q4_K_M, Q8_0): the weights are bit-identical on both
//!   sides, but each side quantizes the activations to 8 bits per block
//!   (ggml's Q8_K/Q8_0) with its own rounding and accumulation order, and
//!   those errors add up over the layers: measured 1.9 % (llama Q8_0),
//!   2.6 % (llama Q4_K_M), 3.2 % (gemma3 Q4_K_M, six layers); [`QUANT_TOL`]
//!   is about twice the worst. A wrong formula (rope, norm, scaling) is off
//!   by the size of the logits themselves.
//! - Greedy ids must match, except at a near-tie: llama.cpp's top-2 margin
//!   below [`TIE`] times the row's tolerance.

use shoal::inference::{HParams, Model, ModelConfig};
use std::path::PathBuf;

/// Relative tolerance for F32 fixtures.
const F32_TOL: f32 = 5e-3;
/// Relative tolerance for quantized fixtures.
const QUANT_TOL: f32 = 6e-2;
/// A greedy step whose top-2 margin (in llama.cpp) is below `TIE` times the
/// absolute tolerance may pick the other token.
const TIE: f32 = 2.0;

struct Reference {
    llama_cpp: String,
    prompt: Vec<u32>,
    logits: Vec<Vec<f32>>,
    greedy: Vec<u32>,
    greedy_margin: Vec<f32>,
    greedy_logits: Vec<Vec<f32>>,
}

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/arch")
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

fn rows(v: &serde_json::Value) -> Vec<Vec<f32>> {
    v.as_array().expect("rows").iter().map(floats).collect()
}

fn reference(name: &str) -> Reference {
    let p = dir().join(format!("{name}.logits.json"));
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let j: serde_json::Value = serde_json::from_str(&text).expect("json");
    Reference {
        llama_cpp: j["llama_cpp"].as_str().unwrap_or_default().to_owned(),
        prompt: ids(&j["prompt"]),
        logits: rows(&j["logits"]),
        greedy: ids(&j["greedy"]),
        greedy_margin: floats(&j["greedy_margin"]),
        greedy_logits: rows(&j["greedy_logits"]),
    }
}

fn argmax(v: &[f32]) -> u32 {
    let mut b = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[b] {
            b = i;
        }
    }
    b as u32
}

/// Max |Δ| of a row and the absolute tolerance for it.
fn check_row(what: &str, ours: &[f32], theirs: &[f32], rel: f32) -> (f32, f32) {
    assert_eq!(ours.len(), theirs.len(), "{what}: vocabulary size");
    let scale = theirs.iter().fold(1.0f32, |m, x| m.max(x.abs()));
    let tol = rel * scale;
    let diff = ours
        .iter()
        .zip(theirs)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        diff.is_finite() && diff <= tol,
        "{what}: max |Δ| {diff:.6} > {tol:.6} (scale {scale:.3})"
    );
    (diff, tol)
}

/// Runs one fixture; `rel` is the relative tolerance of its weight type.
fn parity(name: &str, arch: &str, rel: f32) {
    let r = reference(name);
    let path = dir().join(format!("{name}.gguf"));
    let model = Model::load_with(
        &path,
        &ModelConfig {
            threads: 1,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("{name}: load: {e}"));
    let hp: &HParams = model.hparams();
    assert_eq!(hp.arch, arch, "{name}");
    assert_eq!(hp.vocab_size, r.logits[0].len(), "{name}: vocabulary");

    // Every prompt position, one token per forward call.
    let mut cache = model.new_cache();
    let mut worst = 0.0f32;
    let mut last = Vec::new();
    for (i, (&id, want)) in r.prompt.iter().zip(&r.logits).enumerate() {
        last = model.forward(&mut cache, &[id]).expect("forward");
        let (d, _) = check_row(&format!("{name} prompt position {i}"), &last, want, rel);
        worst = worst.max(d);
    }
    // The batched prompt gives the same last row.
    let mut batch_cache = model.new_cache();
    let batched = model.forward(&mut batch_cache, &r.prompt).expect("forward");
    check_row(
        &format!("{name} batched prompt"),
        &batched,
        r.logits.last().expect("rows"),
        rel,
    );

    // The greedy continuation, fed llama.cpp's ids.
    assert_eq!(r.greedy.len(), r.greedy_logits.len());
    let mut ties = 0;
    for (g, (&want_id, want)) in r.greedy.iter().zip(&r.greedy_logits).enumerate() {
        if g > 0 {
            last = model
                .forward(&mut cache, &[r.greedy[g - 1]])
                .expect("forward");
        }
        let (d, tol) = check_row(&format!("{name} greedy step {g}"), &last, want, rel);
        worst = worst.max(d);
        let ours = argmax(&last);
        if ours != want_id {
            assert!(
                r.greedy_margin[g] < TIE * tol,
                "{name} greedy step {g}: we pick {ours}, llama.cpp {want_id} (margin {} is no near-tie)",
                r.greedy_margin[g]
            );
            ties += 1;
        }
    }
    eprintln!(
        "{name}: {} rows, max |Δ| {worst:.2e}, greedy near-ties {ties}, reference: {}",
        r.logits.len() + r.greedy_logits.len(),
        r.llama_cpp
    );
}

#[test]
fn arch_llama_f32_matches_llama_cpp() {
    parity("llama", "llama", F32_TOL);
}

#[test]
fn arch_llama_q4_k_m_matches_llama_cpp() {
    parity("llama-q4_k_m", "llama", QUANT_TOL);
}

#[test]
fn arch_llama_q8_0_matches_llama_cpp() {
    parity("llama-q8_0", "llama", QUANT_TOL);
}

#[test]
fn arch_qwen2_f32_matches_llama_cpp() {
    parity("qwen2", "qwen2", F32_TOL);
}

#[test]
fn arch_qwen3_f32_matches_llama_cpp() {
    parity("qwen3", "qwen3", F32_TOL);
}

#[test]
fn arch_gemma3_f32_matches_llama_cpp() {
    parity("gemma3", "gemma3", F32_TOL);
}

#[test]
fn arch_gemma3_q4_k_m_matches_llama_cpp() {
    parity("gemma3-q4_k_m", "gemma3", QUANT_TOL);
}

#[test]
fn arch_phi3_f32_matches_llama_cpp() {
    parity("phi3", "phi3", F32_TOL);
}
