//! Tensor views and per-layer weights: every tensor the forward pass reads
//! is checked here (name, shape, type, bounds) before the model is returned.

use super::arch::Family;
use super::hparams::HParams;
use crate::gguf::{GgmlType, Gguf, TensorInfo};
use crate::inference::InferenceError;
use crate::inference::quant::QMatrix;

/// Q, K and V projections: separate or one stacked matrix.
pub(super) enum Qkv {
    /// `attn_q`, `attn_k`, `attn_v`.
    Split {
        wq: QMatrix,
        wk: QMatrix,
        wv: QMatrix,
    },
    /// `attn_qkv`: Q rows, then K rows, then V rows.
    Fused(QMatrix),
}

/// Gate and up projections: separate or one stacked matrix.
pub(super) enum GateUp {
    /// `ffn_gate`, `ffn_up`.
    Split { gate: QMatrix, up: QMatrix },
    /// `ffn_up` with `2 * n_ff` rows: gate rows, then up rows.
    Fused(QMatrix),
}

/// One transformer block.
pub(super) struct Layer {
    pub attn_norm: Vec<f32>,
    pub qkv: Qkv,
    /// Q, K and V biases (each present or absent).
    pub bq: Option<Vec<f32>>,
    pub bk: Option<Vec<f32>>,
    pub bv: Option<Vec<f32>>,
    pub q_norm: Option<Vec<f32>>,
    pub k_norm: Option<Vec<f32>>,
    pub wo: QMatrix,
    pub bo: Option<Vec<f32>>,
    pub attn_post_norm: Option<Vec<f32>>,
    pub ffn_norm: Vec<f32>,
    pub gate_up: GateUp,
    pub w_down: QMatrix,
    pub ffn_post_norm: Option<Vec<f32>>,
}

pub(super) fn tensor<'a>(g: &'a Gguf, name: &str) -> Result<&'a TensorInfo, InferenceError> {
    g.tensor(name)
        .ok_or_else(|| InferenceError::BadModel(format!("missing tensor {name}")))
}

pub(super) fn matrix(
    g: &Gguf,
    map: &[u8],
    name: &str,
    cols: usize,
    rows: usize,
) -> Result<QMatrix, InferenceError> {
    let t = tensor(g, name)?;
    let r = g.tensor_range(t);
    let m = QMatrix::new(name, t.ty, &t.dims, r.start, t.size, map)?;
    if m.cols != cols || m.rows != rows {
        return Err(InferenceError::BadModel(format!(
            "tensor {name}: shape {}x{}, expected {rows}x{cols}",
            m.rows, m.cols
        )));
    }
    Ok(m)
}

pub(super) fn vector(
    g: &Gguf,
    map: &[u8],
    name: &str,
    len: usize,
) -> Result<Vec<f32>, InferenceError> {
    let t = tensor(g, name)?;
    if t.elements() != len as u64 || !matches!(t.ty, GgmlType::F32 | GgmlType::F16) {
        return Err(InferenceError::BadModel(format!(
            "tensor {name}: expected {len} f32/f16 values, got {:?} {}",
            t.dims,
            t.ty.name()
        )));
    }
    let r = g.tensor_range(t);
    let bytes = usize::try_from(r.start)
        .ok()
        .zip(usize::try_from(r.end).ok())
        .and_then(|(a, b)| map.get(a..b))
        .ok_or_else(|| InferenceError::BadModel(format!("tensor {name}: out of file")))?;
    let mut out = vec![0f32; len];
    match t.ty {
        GgmlType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        _ => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
    }
    Ok(out)
}

/// A vector that may be absent.
pub(super) fn opt_vector(
    g: &Gguf,
    map: &[u8],
    name: &str,
    len: usize,
) -> Result<Option<Vec<f32>>, InferenceError> {
    if g.tensor(name).is_some() {
        vector(g, map, name, len).map(Some)
    } else {
        Ok(None)
    }
}

/// Loads block `i`.
pub(super) fn layer(
    g: &Gguf,
    map: &[u8],
    hp: &HParams,
    fam: &Family,
    i: usize,
) -> Result<Layer, InferenceError> {
    let (d, hd) = (hp.n_embd, hp.head_dim);
    let (nq, nkv) = (hp.n_head * hd, hp.n_head_kv * hd);
    let w = |s: &str| format!("blk.{i}.{s}.weight");
    let b = |s: &str| format!("blk.{i}.{s}.bias");
    let qkv = if g.tensor(&w("attn_qkv")).is_some() {
        Qkv::Fused(matrix(g, map, &w("attn_qkv"), d, nq + 2 * nkv)?)
    } else {
        Qkv::Split {
            wq: matrix(g, map, &w("attn_q"), d, nq)?,
            wk: matrix(g, map, &w("attn_k"), d, nkv)?,
            wv: matrix(g, map, &w("attn_v"), d, nkv)?,
        }
    };
    let (bq, bk, bv) = match opt_vector(g, map, &b("attn_qkv"), nq + 2 * nkv)? {
        Some(all) => (
            Some(all[..nq].to_vec()),
            Some(all[nq..nq + nkv].to_vec()),
            Some(all[nq + nkv..].to_vec()),
        ),
        None => (
            opt_vector(g, map, &b("attn_q"), nq)?,
            opt_vector(g, map, &b("attn_k"), nkv)?,
            opt_vector(g, map, &b("attn_v"), nkv)?,
        ),
    };
    let (q_norm, k_norm) = if fam.qk_norm {
        (
            Some(vector(g, map, &w("attn_q_norm"), hd)?),
            Some(vector(g, map, &w("attn_k_norm"), hd)?),
        )
    } else {
        (None, None)
    };
    let (attn_post_norm, ffn_post_norm) = if fam.post_norms {
        (
            Some(vector(g, map, &w("post_attention_norm"), d)?),
            Some(vector(g, map, &w("post_ffw_norm"), d)?),
        )
    } else {
        (None, None)
    };
    let gate_up = if fam.fused_up && g.tensor(&w("ffn_gate")).is_none() {
        GateUp::Fused(matrix(g, map, &w("ffn_up"), d, 2 * hp.n_ff)?)
    } else {
        GateUp::Split {
            gate: matrix(g, map, &w("ffn_gate"), d, hp.n_ff)?,
            up: matrix(g, map, &w("ffn_up"), d, hp.n_ff)?,
        }
    };
    Ok(Layer {
        attn_norm: vector(g, map, &w("attn_norm"), d)?,
        qkv,
        bq,
        bk,
        bv,
        q_norm,
        k_norm,
        wo: matrix(g, map, &w("attn_output"), nq, d)?,
        bo: opt_vector(g, map, &b("attn_output"), d)?,
        attn_post_norm,
        ffn_norm: vector(g, map, &w("ffn_norm"), d)?,
        gate_up,
        w_down: matrix(g, map, &w("ffn_down"), hp.n_ff, d)?,
        ffn_post_norm,
    })
}
