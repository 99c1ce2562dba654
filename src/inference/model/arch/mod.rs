//! What differs between the model families, one file per family (as
//! llama.cpp's `src/models/*.cpp`). The forward pass in `forward.rs` is
//! shared; a family is a [`Family`] value: its RoPE style, activation, which
//! optional tensors it requires, and a function that reads its own metadata.
//!
//! Adding a family: write `arch/<name>.rs` with a `FAMILY` constant, list it
//! in [`FAMILIES`], and add to `forward.rs` only what no flag here covers.

use super::hparams::HParams;
use crate::gguf::Gguf;
use crate::inference::InferenceError;

mod gemma3;
mod llama;
mod phi3;
mod qwen2;
mod qwen3;

/// The feed-forward activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Act {
    /// SwiGLU: `silu(gate) * up`.
    Silu,
    /// GeGLU with the tanh approximation of GELU: `gelu(gate) * up`.
    GeluTanh,
}

/// One model family.
pub(crate) struct Family {
    /// `general.architecture` values this family runs.
    pub names: &'static [&'static str],
    /// NeoX-style RoPE (rotate halves) instead of adjacent pairs.
    pub rope_neox: bool,
    /// Feed-forward activation.
    pub act: Act,
    /// Per-head RMSNorm of Q and K (`attn_q_norm`, `attn_k_norm`) before RoPE.
    pub qk_norm: bool,
    /// RMSNorm of the attention and FFN outputs before the residual add
    /// (`post_attention_norm`, `post_ffw_norm`).
    pub post_norms: bool,
    /// `ffn_up` may hold gate and up stacked (`2 * n_ff` rows, no `ffn_gate`).
    pub fused_up: bool,
    /// Per-layer-independent RoPE factor tensors `rope_factors_long/short`.
    pub rope_factors: bool,
    /// `attention.layer_norm_rms_epsilon` must be present.
    pub rms_eps_required: bool,
    /// Reads the family's own metadata into the common hyper-parameters.
    pub hparams: fn(&Gguf, &mut HParams) -> Result<(), InferenceError>,
}

/// Every family we run.
pub(crate) const FAMILIES: &[&Family] = &[
    &llama::FAMILY,
    &qwen2::FAMILY,
    &qwen3::FAMILY,
    &gemma3::FAMILY,
    &phi3::FAMILY,
];

/// The family running `general.architecture = arch`.
pub(crate) fn family(arch: &str) -> Option<&'static Family> {
    FAMILIES.iter().copied().find(|f| f.names.contains(&arch))
}

/// A family without metadata of its own.
fn no_extra(_: &Gguf, _: &mut HParams) -> Result<(), InferenceError> {
    Ok(())
}
