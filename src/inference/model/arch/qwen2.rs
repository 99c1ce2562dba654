//! Qwen 2 / 2.5: the llama block with Q/K/V biases (loaded whenever present)
//! and NeoX RoPE (`LLAMA_ROPE_TYPE_NEOX` in llama.cpp).

use super::{Act, Family, no_extra};

/// The qwen2 family.
pub(crate) const FAMILY: Family = Family {
    names: &["qwen2"],
    rope_neox: true,
    act: Act::Silu,
    qk_norm: false,
    post_norms: false,
    fused_up: false,
    rope_factors: false,
    rms_eps_required: true,
    hparams: no_extra,
};
