//! Gemma 3 (text), as llama.cpp's `src/models/gemma3.cpp`:
//! - token embeddings scaled by `sqrt(n_embd)`;
//! - RMSNorm weights used as stored (the converter already added Gemma's +1:
//!   `norm_shift` in llama.cpp's `conversion/gemma.py`);
//! - per-head Q/K RMSNorm, post-attention and post-FFN RMSNorm;
//! - GeGLU (tanh-approximated GELU) feed-forward;
//! - sliding-window layers: pattern `attention.sliding_window_pattern`
//!   (default 6: layer `il` is local unless `il % 6 == 5`), window
//!   `attention.sliding_window`, local RoPE base `rope.freq_base_swa`
//!   (default 10000, no frequency scaling); global layers use
//!   `rope.freq_base` and the file's RoPE scaling;
//! - attention scale `1/sqrt(head_dim)`, except for the 27B (62 layers):
//!   `1/sqrt(n_embd / n_head)` (Gemma's `query_pre_attn_scalar`);
//! - optional final logit soft-capping (`final_logit_softcapping`).

use super::super::hparams::{opt_f, opt_pos_f, opt_u};
use super::{Act, Family, HParams};
use crate::gguf::{Gguf, Value};
use crate::inference::InferenceError;

/// The gemma3 family.
pub(crate) const FAMILY: Family = Family {
    names: &["gemma3"],
    rope_neox: true,
    act: Act::GeluTanh,
    qk_norm: true,
    post_norms: true,
    fused_up: false,
    rope_factors: false,
    rms_eps_required: true,
    hparams,
};

fn hparams(g: &Gguf, hp: &mut HParams) -> Result<(), InferenceError> {
    let k = |s: &str| format!("{}.{s}", hp.arch);
    hp.embd_scale = (hp.n_embd as f32).sqrt();
    hp.attn_scale = if hp.n_layer == 62 {
        1.0 / ((hp.n_embd / hp.n_head) as f32).sqrt()
    } else {
        1.0 / (hp.head_dim as f32).sqrt()
    };
    let cap_key = k("final_logit_softcapping");
    if let Some(c) = opt_f(g, &cap_key)? {
        if c < 0.0 {
            return Err(InferenceError::BadModel(format!(
                "metadata {cap_key}: negative {c}"
            )));
        }
        hp.final_logit_softcap = c;
    }
    let window = opt_u(g, &k("attention.sliding_window"))?.unwrap_or(0);
    if window == 0 {
        return Ok(());
    }
    hp.sliding_window = window;
    if let Some(b) = opt_pos_f(g, &k("rope.freq_base_swa"))? {
        hp.rope_theta_swa = b;
    }
    let pat_key = k("attention.sliding_window_pattern");
    hp.swa_layers = match g.get(&pat_key).and_then(Value::as_array) {
        // An explicit per-layer array.
        Some(arr) => {
            if arr.len() != hp.n_layer {
                return Err(InferenceError::BadModel(format!(
                    "metadata {pat_key}: {} entries for {} layers",
                    arr.len(),
                    hp.n_layer
                )));
            }
            arr.iter()
                .map(|x| {
                    x.as_bool()
                        .or_else(|| x.as_u64().map(|n| n != 0))
                        .ok_or_else(|| {
                            InferenceError::BadModel(format!("metadata {pat_key}: not booleans"))
                        })
                })
                .collect::<Result<_, _>>()?
        }
        None => {
            let n = opt_u(g, &pat_key)?.unwrap_or(6);
            // llama.cpp `set_swa_pattern(n, dense_first = false)`.
            (0..hp.n_layer).map(|il| n == 0 || il % n < n - 1).collect()
        }
    };
    Ok(())
}
