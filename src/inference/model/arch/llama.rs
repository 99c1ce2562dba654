//! Llama 1/2/3.x and Mistral: adjacent-pair RoPE (the converter permutes Q/K
//! for it), SwiGLU, optional `rope_freqs` (Llama 3.1+ bakes its
//! `rope.scaling.type = llama3` frequency scaling into that tensor), tied or
//! untied output, optional Q/K/V/O biases.

use super::{Act, Family, no_extra};

/// The llama family.
pub(crate) const FAMILY: Family = Family {
    names: &["llama", "mistral"],
    rope_neox: false,
    act: Act::Silu,
    qk_norm: false,
    post_norms: false,
    fused_up: false,
    rope_factors: false,
    rms_eps_required: false,
    hparams: no_extra,
};
