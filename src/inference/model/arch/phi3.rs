//! Phi-3 / Phi-3.5 / Phi-4 (`phi3` architecture): fused `attn_qkv` (Q, K, V
//! stacked by rows), fused `ffn_up` (gate rows then up rows, SwiGLU), NeoX
//! RoPE, scores scaled by `1/sqrt(head_dim)`. LongRoPE models carry
//! `rope_factors_long` / `rope_factors_short`: the short factors are used
//! when the context we run with is at most
//! `rope.scaling.original_context_length`, the long ones otherwise (as
//! llama.cpp's `get_rope_factors`), and cos/sin are multiplied by
//! `rope.scaling.attn_factor`. llama.cpp disables Phi-3's sliding window
//! (its converter writes it inconsistently), and so do we.

use super::super::hparams::opt_pos_f;
use super::{Act, Family, HParams};
use crate::gguf::Gguf;
use crate::inference::InferenceError;

/// The phi3 family.
pub(crate) const FAMILY: Family = Family {
    names: &["phi3"],
    rope_neox: true,
    act: Act::Silu,
    qk_norm: false,
    post_norms: false,
    fused_up: true,
    rope_factors: true,
    rms_eps_required: true,
    hparams,
};

fn hparams(g: &Gguf, hp: &mut HParams) -> Result<(), InferenceError> {
    if let Some(f) = opt_pos_f(g, &format!("{}.rope.scaling.attn_factor", hp.arch))? {
        hp.rope_attn_factor = f;
    }
    Ok(())
}
