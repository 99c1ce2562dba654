//! The shared forward pass: one batch of tokens through every block, the
//! family differences switched on by the loaded tensors and [`HParams`].

use super::Model;
use super::arch::Act;
use super::load::{GateUp, Layer, Qkv};
use crate::inference::kernels::{self, Isa};
use crate::inference::kv::KvCache;
use crate::inference::quant::{Exec, QMatrix};
use rayon::prelude::*;

/// Which logits a batch returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Want {
    /// None (a prompt batch before the last).
    None,
    /// The last token's.
    Last,
    /// Every token's, row-major.
    All,
}

/// RoPE frequencies of one kind of layer, computed as ggml's
/// `rope_cache_init` (theta multiplied by `theta_scale` step by step, in
/// f32) so positions far into the context rotate as llama.cpp's do.
#[derive(Debug, Clone)]
pub(super) struct Rope {
    pub theta_scale: f32,
    pub freq_scale: f32,
    /// Per-pair divisors (`rope_freqs`, Phi-3 LongRoPE factors).
    pub factors: Option<Vec<f32>>,
    /// cos/sin multiplier.
    pub mscale: f32,
}

impl Rope {
    pub(super) fn new(base: f32, dim: usize, freq_scale: f32) -> Self {
        Rope {
            theta_scale: base.powf(-2.0 / dim as f32),
            freq_scale,
            factors: None,
            mscale: 1.0,
        }
    }

    /// (cos, sin) of each of the `half` pairs for the `n` positions from `pos0`.
    fn table(&self, pos0: usize, n: usize, half: usize) -> Vec<(f32, f32)> {
        let mut rot = Vec::with_capacity(n * half);
        for i in 0..n {
            let mut theta = (pos0 + i) as f32;
            for j in 0..half {
                let ff = self.factors.as_ref().map_or(1.0, |f| f[j]);
                let (s, c) = (self.freq_scale * (theta / ff)).sin_cos();
                rot.push((c * self.mscale, s * self.mscale));
                theta *= self.theta_scale;
            }
        }
        rot
    }
}

/// `y = x · W` with activations encoded once for `w`'s kind.
fn project(exec: &Exec, base: &[u8], w: &QMatrix, x: &[f32], n: usize, out: &mut [f32]) {
    let a = exec.acts(w, x, n, w.cols);
    exec.matmul(base, w, &a, out);
}

fn add_bias(y: &mut [f32], b: Option<&Vec<f32>>) {
    if let Some(b) = b {
        for row in y.chunks_exact_mut(b.len()) {
            for (v, bv) in row.iter_mut().zip(b) {
                *v += bv;
            }
        }
    }
}

/// Scratch buffers of one batch.
struct Bufs {
    xb: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    fused: Vec<f32>,
    att: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    tmp: Vec<f32>,
}

/// One sequence's part of a multi-sequence batch: its cache and the
/// tokens to run after the cache's contents.
pub(super) struct Seg<'a> {
    pub cache: &'a mut KvCache,
    pub tokens: &'a [u32],
    pub want: Want,
}

/// Where a batch row belongs: its sequence and its position in it.
#[derive(Clone, Copy)]
struct RowAt {
    seg: usize,
    pos: usize,
}

impl Model {
    /// Runs one batch: appends its keys and values to `cache` and returns
    /// the logits `want` asks for.
    pub(super) fn forward_batch(
        &self,
        cache: &mut KvCache,
        tokens: &[u32],
        want: Want,
    ) -> Vec<f32> {
        let mut segs = [Seg {
            cache,
            tokens,
            want,
        }];
        self.forward_segs(&mut segs).pop().unwrap_or_default()
    }

    /// Runs the tokens of several sequences as one batch: every weight
    /// matrix is read once for all their rows, attention is per sequence
    /// over its own cache. Row results do not depend on the other rows, so
    /// each sequence gets exactly what running it alone gives. Returns the
    /// logits each segment's `want` asks for, in order.
    pub(super) fn forward_segs(&self, segs: &mut [Seg<'_>]) -> Vec<Vec<f32>> {
        let hp = &self.hp;
        let base: &[u8] = &self.map;
        let n: usize = segs.iter().map(|s| s.tokens.len()).sum();
        let (d, hd, nh, nkv) = (hp.n_embd, hp.head_dim, hp.n_head, hp.n_head_kv);
        let mut rows = Vec::with_capacity(n);
        let half = hp.rope_dim / 2;
        let mut rot_global = Vec::with_capacity(n * half);
        let mut rot_local = Vec::new();
        for (si, s) in segs.iter_mut().enumerate() {
            let pos0 = s.cache.len();
            s.cache.reserve(s.tokens.len());
            rows.extend((0..s.tokens.len()).map(|i| RowAt {
                seg: si,
                pos: pos0 + i,
            }));
            rot_global.extend(self.rope[0].table(pos0, s.tokens.len(), half));
            if hp.sliding_window > 0 {
                rot_local.extend(self.rope[1].table(pos0, s.tokens.len(), half));
            }
        }

        let mut x = vec![0f32; n * d];
        let all_tokens = segs.iter().flat_map(|s| s.tokens.iter());
        for (row, &t) in x.chunks_exact_mut(d).zip(all_tokens) {
            self.tok_embd.dequant_row(base, t as usize, row);
            if hp.embd_scale != 1.0 {
                row.iter_mut().for_each(|v| *v *= hp.embd_scale);
            }
        }
        let fused_qkv = self.layers.iter().any(|l| matches!(l.qkv, Qkv::Fused(_)));
        let fused_up = self
            .layers
            .iter()
            .any(|l| matches!(l.gate_up, GateUp::Fused(_)));
        let mut b = Bufs {
            xb: vec![0f32; n * d],
            q: vec![0f32; n * nh * hd],
            k: vec![0f32; n * nkv * hd],
            v: vec![0f32; n * nkv * hd],
            fused: vec![
                0f32;
                if fused_qkv {
                    n * (nh + 2 * nkv) * hd
                } else {
                    0
                }
            ],
            att: vec![0f32; n * nh * hd],
            gate: vec![0f32; if fused_up { 2 } else { 1 } * n * hp.n_ff],
            up: vec![0f32; n * hp.n_ff],
            tmp: vec![0f32; n * d],
        };

        for (li, l) in self.layers.iter().enumerate() {
            let rot = if hp.is_swa(li) {
                &rot_local
            } else {
                &rot_global
            };
            self.attention(segs, &rows, li, l, &mut x, &mut b, rot);
            self.feed_forward(l, &mut x, &mut b);
        }
        // Rows whose logits are wanted, and how many per segment.
        let mut picked: Vec<f32> = Vec::new();
        let mut counts = Vec::with_capacity(segs.len());
        let mut at = 0;
        for s in segs.iter_mut() {
            let m = s.tokens.len();
            s.cache.commit(m);
            let take = match s.want {
                Want::None => 0..0,
                Want::Last => m - 1..m,
                Want::All => 0..m,
            };
            picked.extend_from_slice(&x[(at + take.start) * d..(at + take.end) * d]);
            counts.push(take.len());
            at += m;
        }
        let m = picked.len() / d;
        if m == 0 {
            return counts.iter().map(|_| Vec::new()).collect();
        }
        let mut normed = picked.clone();
        if let Some(w) = &self.output_norm {
            rms_norm(&picked, w, hp.rms_eps, d, &mut normed);
        }
        let vocab = hp.vocab_size;
        let mut logits = vec![0f32; m * vocab];
        project(&self.exec, base, &self.output, &normed, m, &mut logits);
        let cap = hp.final_logit_softcap;
        if cap > 0.0 {
            logits.iter_mut().for_each(|v| *v = cap * (*v / cap).tanh());
        }
        if counts.len() == 1 {
            return vec![logits];
        }
        let mut out = Vec::with_capacity(counts.len());
        let mut from = 0;
        for c in counts {
            out.push(logits[from * vocab..(from + c) * vocab].to_vec());
            from += c;
        }
        out
    }

    /// Self-attention of block `li`, added into the residual stream `x`.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        segs: &mut [Seg<'_>],
        rows: &[RowAt],
        li: usize,
        l: &Layer,
        x: &mut [f32],
        b: &mut Bufs,
        rot: &[(f32, f32)],
    ) {
        let hp = &self.hp;
        let base: &[u8] = &self.map;
        let (d, hd, nh, nkv) = (hp.n_embd, hp.head_dim, hp.n_head, hp.n_head_kv);
        let n = x.len() / d;
        rms_norm(x, &l.attn_norm, hp.rms_eps, d, &mut b.xb);
        match &l.qkv {
            Qkv::Split { wq, wk, wv } => {
                let a = self.exec.acts(wq, &b.xb, n, d);
                self.exec.matmul(base, wq, &a, &mut b.q);
                for (w, out) in [(wk, &mut b.k), (wv, &mut b.v)] {
                    if w.act_kind() == wq.act_kind() {
                        self.exec.matmul(base, w, &a, out);
                    } else {
                        project(&self.exec, base, w, &b.xb, n, out);
                    }
                }
            }
            Qkv::Fused(w) => {
                project(&self.exec, base, w, &b.xb, n, &mut b.fused);
                let (q_w, k_w) = (nh * hd, nkv * hd);
                for (i, row) in b.fused.chunks_exact((nh + 2 * nkv) * hd).enumerate() {
                    b.q[i * q_w..(i + 1) * q_w].copy_from_slice(&row[..q_w]);
                    b.k[i * k_w..(i + 1) * k_w].copy_from_slice(&row[q_w..q_w + k_w]);
                    b.v[i * k_w..(i + 1) * k_w].copy_from_slice(&row[q_w + k_w..]);
                }
            }
        }
        add_bias(&mut b.q, l.bq.as_ref());
        add_bias(&mut b.k, l.bk.as_ref());
        add_bias(&mut b.v, l.bv.as_ref());
        if let Some(w) = &l.q_norm {
            rms_norm_inplace(&mut b.q, w, hp.rms_eps, hd);
        }
        if let Some(w) = &l.k_norm {
            rms_norm_inplace(&mut b.k, w, hp.rms_eps, hd);
        }
        let half = hp.rope_dim / 2;
        let rope_fn = if hp.rope_neox { rope_neox } else { rope_norm };
        for i in 0..n {
            let r = &rot[i * half..(i + 1) * half];
            for h in b.q[i * nh * hd..(i + 1) * nh * hd].chunks_exact_mut(hd) {
                rope_fn(h, r);
            }
            for h in b.k[i * nkv * hd..(i + 1) * nkv * hd].chunks_exact_mut(hd) {
                rope_fn(h, r);
            }
        }
        for (i, r) in rows.iter().enumerate() {
            for h in 0..nkv {
                let o = (i * nkv + h) * hd;
                segs[r.seg]
                    .cache
                    .write(li, r.pos, h, &b.k[o..o + hd], &b.v[o..o + hd]);
            }
        }
        // One task per (token, kv head) covering its query heads.
        let caches: Vec<&KvCache> = segs.iter().map(|s| &*s.cache).collect();
        let group = nh / nkv;
        let q_ref = &b.q;
        let window = if hp.is_swa(li) { hp.sliding_window } else { 0 };
        let scale = hp.attn_scale;
        let isa = self.exec.isa;
        b.att
            .par_chunks_mut(group * hd)
            .enumerate()
            .for_each(|(idx, out)| {
                let (i, g) = (idx / nkv, idx % nkv);
                let qs = &q_ref[idx * group * hd..(idx + 1) * group * hd];
                let r = rows[i];
                let upto = r.pos + 1;
                let from = if window > 0 {
                    upto.saturating_sub(window)
                } else {
                    0
                };
                attend(isa, caches[r.seg], li, g, from, upto, qs, scale, out);
            });
        project(&self.exec, base, &l.wo, &b.att, n, &mut b.tmp);
        add_bias(&mut b.tmp, l.bo.as_ref());
        if let Some(w) = &l.attn_post_norm {
            rms_norm_inplace(&mut b.tmp, w, hp.rms_eps, d);
        }
        for (xv, t) in x.iter_mut().zip(&b.tmp) {
            *xv += t;
        }
    }

    /// The feed-forward part of a block, added into the residual stream `x`.
    fn feed_forward(&self, l: &Layer, x: &mut [f32], b: &mut Bufs) {
        let hp = &self.hp;
        let base: &[u8] = &self.map;
        let (d, ff) = (hp.n_embd, hp.n_ff);
        let n = x.len() / d;
        rms_norm(x, &l.ffn_norm, hp.rms_eps, d, &mut b.xb);
        match &l.gate_up {
            GateUp::Split { gate, up } => {
                let a = self.exec.acts(gate, &b.xb, n, d);
                self.exec.matmul(base, gate, &a, &mut b.gate[..n * ff]);
                if up.act_kind() == gate.act_kind() {
                    self.exec.matmul(base, up, &a, &mut b.up);
                } else {
                    project(&self.exec, base, up, &b.xb, n, &mut b.up);
                }
            }
            GateUp::Fused(w) => {
                project(&self.exec, base, w, &b.xb, n, &mut b.gate);
                // Rows of 2*ff: gate then up. Compact gate in place, copy up.
                for i in 0..n {
                    b.up[i * ff..(i + 1) * ff]
                        .copy_from_slice(&b.gate[i * 2 * ff + ff..(i + 1) * 2 * ff]);
                    b.gate.copy_within(i * 2 * ff..i * 2 * ff + ff, i * ff);
                }
            }
        }
        let g = &mut b.gate[..n * ff];
        match self.act {
            Act::Silu => {
                g.par_chunks_mut(GELU_CHUNK)
                    .zip(b.up.par_chunks(GELU_CHUNK))
                    .for_each(|(g, u)| {
                        for (g, u) in g.iter_mut().zip(u) {
                            *g = *g / (1.0 + (-*g).exp()) * u;
                        }
                    });
            }
            Act::GeluTanh => {
                // Chunks in parallel: a whole prompt's gate is n × ff values.
                let table = gelu_table();
                g.par_chunks_mut(GELU_CHUNK)
                    .zip(b.up.par_chunks(GELU_CHUNK))
                    .for_each(|(g, u)| geglu_chunk(table, g, u));
            }
        }
        project(&self.exec, base, &l.w_down, g, n, &mut b.tmp);
        if let Some(w) = &l.ffn_post_norm {
            rms_norm_inplace(&mut b.tmp, w, hp.rms_eps, d);
        }
        for (xv, t) in x.iter_mut().zip(&b.tmp) {
            *xv += t;
        }
    }
}

/// RMSNorm of each `d`-wide row of `x` into `out`.
pub(super) fn rms_norm(x: &[f32], w: &[f32], eps: f32, d: usize, out: &mut [f32]) {
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let s = rms_scale(xr, eps);
        for ((o, xv), wv) in or.iter_mut().zip(xr).zip(w) {
            *o = xv * s * wv;
        }
    }
}

/// RMSNorm of each `d`-wide row of `x` in place (per-head Q/K norms, post
/// norms).
fn rms_norm_inplace(x: &mut [f32], w: &[f32], eps: f32, d: usize) {
    for xr in x.chunks_exact_mut(d) {
        let s = rms_scale(xr, eps);
        for (xv, wv) in xr.iter_mut().zip(w) {
            *xv *= s * wv;
        }
    }
}

fn rms_scale(x: &[f32], eps: f32) -> f32 {
    let ss: f32 = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    1.0 / (ss + eps).sqrt()
}

/// GELU (tanh approximation) as ggml computes it on the CPU: the input
/// rounded to f16, looked up in a table of f16 results, saturated beyond
/// ±10 (`ggml_vec_geglu_f32` with `GGML_GELU_FP16`): the reference for
/// [`geglu_chunk`], which computes the same through [`gelu_table`].
#[cfg(test)]
fn gelu_ggml(x: f32) -> f32 {
    if x <= -10.0 {
        return 0.0;
    }
    if x >= 10.0 {
        return x;
    }
    gelu_f16(half::f16::from_f32(x).to_f32())
}

/// The tanh-approximated GELU of an f16 value, rounded to f16.
fn gelu_f16(xh: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    const COEF_A: f32 = 0.044715;
    let y = 0.5 * xh * (1.0 + (SQRT_2_OVER_PI * xh * (1.0 + COEF_A * xh * xh)).tanh());
    half::f16::from_f32(y).to_f32()
}

/// Values per gated-activation task (and per f16 conversion batch).
const GELU_CHUNK: usize = 1024;

/// [`gelu_f16`] of every f16 bit pattern (256 KiB, made once), as ggml's
/// `ggml_table_gelu_f16`: one lookup instead of a `tanhf` per value.
fn gelu_table() -> &'static [f32] {
    static TABLE: std::sync::OnceLock<Vec<f32>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        (0..=u16::MAX)
            .map(|bits| gelu_f16(half::f16::from_bits(bits).to_f32()))
            .collect()
    })
}

/// `g = gelu(g) * u` over one chunk, bit for bit `gelu_ggml(g) * u`: the inputs
/// are rounded to f16 in one slice conversion (SIMD where the CPU has it),
/// then looked up.
fn geglu_chunk(table: &[f32], g: &mut [f32], u: &[f32]) {
    use half::slice::HalfFloatSliceExt;
    let mut bits = [half::f16::ZERO; GELU_CHUNK];
    let bits = &mut bits[..g.len().min(GELU_CHUNK)];
    bits.convert_from_f32_slice(&g[..bits.len()]);
    for ((x, h), u) in g.iter_mut().zip(bits.iter()).zip(u) {
        let y = if *x <= -10.0 {
            0.0
        } else if *x >= 10.0 {
            *x
        } else {
            table[usize::from(h.to_bits())]
        };
        *x = y * u;
    }
}

/// Rotates adjacent pairs (llama.cpp "normal" RoPE; GGUF llama Q/K weights
/// are permuted for it).
fn rope_norm(h: &mut [f32], rot: &[(f32, f32)]) {
    for (pair, &(c, s)) in h.chunks_exact_mut(2).zip(rot) {
        let (a, b) = (pair[0], pair[1]);
        pair[0] = a * c - b * s;
        pair[1] = a * s + b * c;
    }
}

/// Rotates element `j` with element `j + rope_dim/2` (GPT-NeoX style).
fn rope_neox(h: &mut [f32], rot: &[(f32, f32)]) {
    let half = rot.len();
    let (lo, hi) = h[..2 * half].split_at_mut(half);
    for ((a, b), &(c, s)) in lo.iter_mut().zip(hi.iter_mut()).zip(rot) {
        let (x0, x1) = (*a, *b);
        *a = x0 * c - x1 * s;
        *b = x0 * s + x1 * c;
    }
}

/// Softmax attention of the query heads `qs` (consecutive, sharing one kv
/// head) over cache positions `from..upto`.
#[allow(clippy::too_many_arguments)]
fn attend(
    isa: Isa,
    cache: &KvCache,
    layer: usize,
    kv_head: usize,
    from: usize,
    upto: usize,
    qs: &[f32],
    scale: f32,
    out: &mut [f32],
) {
    let hd = cache.layout().head_dim;
    let g = qs.len() / hd;
    let len = upto - from;
    let mut scores = vec![0f32; g * len];
    // Whole runs of keys per call (a block's positions are contiguous).
    let mut t = 0;
    for run in cache.head_runs(layer, 0, kv_head, upto) {
        let run_len = run.len() / hd;
        let skip = from.saturating_sub(t).min(run_len);
        if skip == run_len {
            t += run_len;
            continue;
        }
        let keys = &run[skip * hd..];
        let at = t + skip - from;
        let m = run_len - skip;
        for (qi, q) in qs.chunks_exact(hd).enumerate() {
            let o = qi * len + at;
            kernels::dot_f32_rows(isa, q, keys, scale, &mut scores[o..o + m]);
        }
        t += run_len;
    }
    for row in scores.chunks_exact_mut(len) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for s in row.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        let inv = 1.0 / sum;
        row.iter_mut().for_each(|s| *s *= inv);
    }
    out.fill(0.0);
    let mut t = 0;
    for run in cache.head_runs(layer, 1, kv_head, upto) {
        let run_len = run.len() / hd;
        let skip = from.saturating_sub(t).min(run_len);
        if skip == run_len {
            t += run_len;
            continue;
        }
        let vals = &run[skip * hd..];
        let at = t + skip - from;
        let m = run_len - skip;
        for (qi, o) in out.chunks_exact_mut(hd).enumerate() {
            let w = qi * len + at;
            kernels::axpy_rows(isa, o, &scores[w..w + m], vals);
        }
        t += run_len;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table path is bit for bit the direct one, over the whole range
    /// (both saturations, f16 subnormals, NaN) and a short last chunk.
    #[test]
    fn geglu_table_is_the_direct_formula() {
        let mut xs: Vec<f32> = (-3000..3000).map(|i| i as f32 * 0.00437).collect();
        xs.extend([
            -10.0, 10.0, -10.001, 10.001, -65504.0, 65504.0, 1e-7, -1e-7, 0.0, -0.0, 3.3e-5,
        ]);
        let us: Vec<f32> = (0..xs.len()).map(|i| 0.5 + (i % 7) as f32 * 0.25).collect();
        let mut g = xs.clone();
        let table = gelu_table();
        for (g, u) in g.chunks_mut(GELU_CHUNK).zip(us.chunks(GELU_CHUNK)) {
            geglu_chunk(table, g, u);
        }
        for ((x, u), got) in xs.iter().zip(&us).zip(&g) {
            let want = gelu_ggml(*x) * u;
            assert_eq!(got.to_bits(), want.to_bits(), "x {x}: {got} vs {want}");
        }
        let mut nan = [f32::NAN];
        geglu_chunk(table, &mut nan, &[1.0]);
        assert!(nan[0].is_nan());
    }
}
