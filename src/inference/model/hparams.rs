//! Hyper-parameters, all read from GGUF metadata (`<arch>.*` keys), with the
//! per-family rules in `arch/`.

use super::arch::{self, Family};
use crate::gguf::{Gguf, Value};
use crate::inference::InferenceError;

/// Hyper-parameters, all read from the GGUF metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct HParams {
    /// `general.architecture`.
    pub arch: String,
    /// Number of transformer blocks.
    pub n_layer: usize,
    /// Hidden size.
    pub n_embd: usize,
    /// Feed-forward inner size.
    pub n_ff: usize,
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads (grouped-query attention).
    pub n_head_kv: usize,
    /// Per-head dimension (`attention.key_length`; may differ from
    /// `n_embd / n_head`, as in Qwen 3 and Gemma 3).
    pub head_dim: usize,
    /// Dimensions rotated by RoPE (≤ head_dim).
    pub rope_dim: usize,
    /// RoPE base frequency (of the global layers when the model has
    /// sliding-window layers).
    pub rope_theta: f32,
    /// Linear RoPE scaling: positions are multiplied by this (1/factor).
    pub rope_freq_scale: f32,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// Context length this model runs with: the trained context
    /// ([`HParams::context_train`]) unless `ModelConfig::context` lowers it.
    pub context_length: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// RoPE rotates the two halves of each head (GPT-NeoX style: Qwen, Gemma,
    /// Phi-3) instead of adjacent pairs (llama).
    pub rope_neox: bool,
    /// Multiplier of RoPE's cos/sin (`rope.scaling.attn_factor`, Phi-3
    /// LongRoPE); 1 otherwise.
    pub rope_attn_factor: f32,
    /// The context the model was pre-trained with before RoPE scaling
    /// (`rope.scaling.original_context_length`, else the trained context).
    pub rope_orig_context: usize,
    /// RoPE base of the sliding-window layers (Gemma 3: `rope.freq_base_swa`,
    /// else 10000, as llama.cpp).
    pub rope_theta_swa: f32,
    /// Sliding-window size in tokens (a local layer at position `p` attends
    /// to `p - window + 1 ..= p`); 0 = no sliding-window layers.
    pub sliding_window: usize,
    /// Per layer: true for a sliding-window (local) layer.
    pub swa_layers: Vec<bool>,
    /// Attention score scale (usually `1/sqrt(head_dim)`).
    pub attn_scale: f32,
    /// Scale of the token embeddings (Gemma: `sqrt(n_embd)`), else 1.
    pub embd_scale: f32,
    /// Final logit soft-capping `c * tanh(logit / c)`; 0 = off.
    pub final_logit_softcap: f32,
    /// `context_length` from the file (the trained context).
    pub context_train: usize,
}

fn meta_u(g: &Gguf, key: &str) -> Option<usize> {
    g.get(key)
        .and_then(Value::as_u64)
        .and_then(|v| usize::try_from(v).ok())
}

fn bad(key: &str, what: impl std::fmt::Display) -> InferenceError {
    InferenceError::BadModel(format!("metadata {key}: {what}"))
}

/// An optional unsigned key: absent is `None`, present but not an unsigned
/// integer is an error naming the key.
pub(super) fn opt_u(g: &Gguf, key: &str) -> Result<Option<usize>, InferenceError> {
    match g.get(key) {
        None => Ok(None),
        Some(_) => meta_u(g, key)
            .map(Some)
            .ok_or_else(|| bad(key, "not an unsigned integer")),
    }
}

/// A required unsigned key.
pub(super) fn req_u(g: &Gguf, key: &str) -> Result<usize, InferenceError> {
    opt_u(g, key)?.ok_or_else(|| InferenceError::BadModel(format!("missing metadata {key}")))
}

/// An optional float key: present but not a finite number is an error.
pub(super) fn opt_f(g: &Gguf, key: &str) -> Result<Option<f32>, InferenceError> {
    match g.get(key) {
        None => Ok(None),
        Some(v) => match v.as_f64().map(|v| v as f32) {
            Some(f) if f.is_finite() => Ok(Some(f)),
            _ => Err(bad(key, "not a finite number")),
        },
    }
}

/// An optional positive float key.
pub(super) fn opt_pos_f(g: &Gguf, key: &str) -> Result<Option<f32>, InferenceError> {
    match opt_f(g, key)? {
        Some(f) if f <= 0.0 => Err(bad(key, format!("must be positive, is {f}"))),
        v => Ok(v),
    }
}

/// Upper bound on sizes read from metadata, so hostile values cannot make
/// us allocate absurd buffers before the tensor checks refuse the file.
const MAX_DIM: usize = 1 << 20;

impl HParams {
    /// Reads the hyper-parameters of a supported model from metadata
    /// (llama, mistral, qwen2, qwen3, gemma3, phi3).
    pub fn from_gguf(g: &Gguf) -> Result<Self, InferenceError> {
        let arch = g
            .architecture()
            .ok_or_else(|| InferenceError::BadModel("missing general.architecture".into()))?
            .to_owned();
        let fam = arch::family(&arch)
            .ok_or_else(|| InferenceError::UnsupportedArchitecture(arch.clone()))?;
        Self::read(g, arch, fam)
    }

    // long: one straight read of every key, each with its own check
    pub(super) fn read(g: &Gguf, arch: String, fam: &Family) -> Result<Self, InferenceError> {
        let k = |s: &str| format!("{arch}.{s}");
        let dim = |key: String| -> Result<usize, InferenceError> {
            let v = req_u(g, &key)?;
            if v == 0 || v > MAX_DIM {
                return Err(bad(&key, format!("out of range: {v}")));
            }
            Ok(v)
        };
        let n_layer = dim(k("block_count"))?;
        let n_embd = dim(k("embedding_length"))?;
        let n_ff = dim(k("feed_forward_length"))?;
        let n_head = dim(k("attention.head_count"))?;
        let n_head_kv = opt_u(g, &k("attention.head_count_kv"))?.unwrap_or(n_head);
        if n_head_kv == 0 || !n_head.is_multiple_of(n_head_kv) {
            return Err(bad(
                &k("attention.head_count_kv"),
                format!("{n_head_kv} kv heads for {n_head} query heads"),
            ));
        }
        let head_dim = match opt_u(g, &k("attention.key_length"))? {
            Some(h) if h == 0 || h > MAX_DIM => {
                return Err(bad(
                    &k("attention.key_length"),
                    format!("out of range: {h}"),
                ));
            }
            Some(h) => h,
            None if n_embd.is_multiple_of(n_head) => n_embd / n_head,
            None => {
                return Err(bad(
                    &k("embedding_length"),
                    format!("{n_embd} is not a multiple of {n_head} heads"),
                ));
            }
        };
        if opt_u(g, &k("attention.value_length"))?.is_some_and(|v| v != head_dim) {
            return Err(bad(
                &k("attention.value_length"),
                "key and value head sizes differ",
            ));
        }
        let rope_dim = opt_u(g, &k("rope.dimension_count"))?.unwrap_or(head_dim);
        if rope_dim == 0 || rope_dim > head_dim || !rope_dim.is_multiple_of(2) {
            return Err(bad(
                &k("rope.dimension_count"),
                format!("bad rope dimension {rope_dim}"),
            ));
        }
        let mut rope_freq_scale = 1.0;
        let scaling = k("rope.scaling.type");
        match g.get(&scaling).map(Value::as_str) {
            None | Some(Some("none")) => {}
            // llama.cpp's converter bakes Llama 3 scaling into the
            // `rope_freqs` tensor: nothing to do with the key itself.
            Some(Some("llama3")) => {}
            Some(Some("linear")) => {
                if let Some(f) = opt_pos_f(g, &k("rope.scaling.factor"))? {
                    rope_freq_scale = 1.0 / f;
                }
            }
            // Phi-3 LongRoPE: factors come as tensors, see `arch::phi3`.
            Some(Some("longrope")) if fam.rope_factors => {}
            Some(other) => {
                return Err(bad(&scaling, format!("unsupported rope scaling {other:?}")));
            }
        }
        if let Some(f) = opt_pos_f(g, &k("rope.scale_linear"))? {
            rope_freq_scale = 1.0 / f;
        }
        let vocab_size = match opt_u(g, &k("vocab_size"))? {
            Some(v) => v,
            None => g
                .get("tokenizer.ggml.tokens")
                .and_then(Value::as_array)
                .map(<[Value]>::len)
                .ok_or_else(|| {
                    InferenceError::BadModel(
                        "unknown vocabulary size (no vocab_size, no tokenizer.ggml.tokens)".into(),
                    )
                })?,
        };
        let context_train = opt_u(g, &k("context_length"))?.unwrap_or(2048).max(1);
        let rms_key = k("attention.layer_norm_rms_epsilon");
        let rms_eps = if fam.rms_eps_required {
            opt_pos_f(g, &rms_key)?
                .ok_or_else(|| InferenceError::BadModel(format!("missing metadata {rms_key}")))?
        } else {
            opt_pos_f(g, &rms_key)?.unwrap_or(1e-5)
        };
        let mut hp = HParams {
            n_layer,
            n_embd,
            n_ff,
            n_head,
            n_head_kv,
            head_dim,
            rope_dim,
            rope_theta: opt_pos_f(g, &k("rope.freq_base"))?.unwrap_or(10000.0),
            rope_freq_scale,
            rms_eps,
            context_length: context_train,
            vocab_size,
            rope_neox: fam.rope_neox,
            rope_attn_factor: 1.0,
            rope_orig_context: opt_u(g, &k("rope.scaling.original_context_length"))?
                .unwrap_or(context_train),
            rope_theta_swa: 10000.0,
            sliding_window: 0,
            swa_layers: vec![false; n_layer],
            attn_scale: 1.0 / (head_dim as f32).sqrt(),
            embd_scale: 1.0,
            final_logit_softcap: 0.0,
            context_train,
            arch,
        };
        (fam.hparams)(g, &mut hp)?;
        Ok(hp)
    }

    /// Whether layer `il` is a sliding-window (local) layer.
    pub fn is_swa(&self, il: usize) -> bool {
        self.sliding_window > 0 && self.swa_layers.get(il).copied().unwrap_or(false)
    }
}
