//! Qwen 3: no biases, per-head RMSNorm of Q and K (`attn_q_norm`,
//! `attn_k_norm`, head_dim wide) before NeoX RoPE; head_dim comes from
//! `attention.key_length` and may differ from `n_embd / n_head`.

use super::{Act, Family, no_extra};

/// The qwen3 family.
pub(crate) const FAMILY: Family = Family {
    names: &["qwen3"],
    rope_neox: true,
    act: Act::Silu,
    qk_norm: true,
    post_norms: false,
    fused_up: false,
    rope_factors: false,
    rms_eps_required: true,
    hparams: no_extra,
};
