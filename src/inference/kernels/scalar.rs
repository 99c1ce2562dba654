//! Portable scalar kernels: the reference every ISA version must match
//! (bit for bit for the quantizers, within rounding for the dot products).

use super::blocks::{
    BlockA8, BlockA8K, BlockA8S, BlockQ2K, BlockQ3K, BlockQ4_0, BlockQ4_1, BlockQ4K, BlockQ5_0,
    BlockQ5_1, BlockQ5K, BlockQ6K, BlockQ8_0, QK, QK_K,
};
use half::f16;

/// Quantizes a row to [`BlockA8`].
pub(crate) fn quantize_a8_scalar(x: &[f32], out: &mut [BlockA8]) {
    for (b, xs) in out.iter_mut().zip(x.chunks_exact(QK)) {
        let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        b.d = d;
        for (q, v) in b.qs.iter_mut().zip(xs) {
            *q = (v * id).round() as i8;
        }
    }
}

/// Quantizes a row to [`BlockA8S`].
pub(crate) fn quantize_a8s_scalar(x: &[f32], out: &mut [BlockA8S]) {
    for (b, xs) in out.iter_mut().zip(x.chunks_exact(QK)) {
        let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        b.d = d;
        let mut sum = 0i32;
        for (q, v) in b.qs.iter_mut().zip(xs) {
            *q = (v * id).round() as i8;
            sum += i32::from(*q);
        }
        b.s = sum as f32 * d;
    }
}

pub(crate) fn dot_q4_0_a8_scalar(w: &[BlockQ4_0], a: &[BlockA8]) -> f32 {
    let mut sum = 0f32;
    for (x, y) in w.iter().zip(a) {
        let mut s = 0i32;
        for j in 0..QK / 2 {
            let v0 = i32::from(x.qs[j] & 0x0f) - 8;
            let v1 = i32::from(x.qs[j] >> 4) - 8;
            s += v0 * i32::from(y.qs[j]) + v1 * i32::from(y.qs[j + QK / 2]);
        }
        sum += s as f32 * (x.d.to_f32() * y.d);
    }
    sum
}

pub(crate) fn dot_q4_1_a8s_scalar(w: &[BlockQ4_1], a: &[BlockA8S]) -> f32 {
    let mut sum = 0f32;
    for (x, y) in w.iter().zip(a) {
        let mut s = 0i32;
        for j in 0..QK / 2 {
            let v0 = i32::from(x.qs[j] & 0x0f);
            let v1 = i32::from(x.qs[j] >> 4);
            s += v0 * i32::from(y.qs[j]) + v1 * i32::from(y.qs[j + QK / 2]);
        }
        sum += s as f32 * (x.d.to_f32() * y.d) + x.m.to_f32() * y.s;
    }
    sum
}

pub(crate) fn dot_q8_0_a8_scalar(w: &[BlockQ8_0], a: &[BlockA8]) -> f32 {
    let mut sum = 0f32;
    for (x, y) in w.iter().zip(a) {
        let s: i32 =
            x.qs.iter()
                .zip(&y.qs)
                .map(|(&p, &q)| i32::from(p) * i32::from(q))
                .sum();
        sum += s as f32 * (x.d.to_f32() * y.d);
    }
    sum
}

/// Quantizes a row to [`BlockA8K`] (`x.len() == out.len() * 256`): one
/// scale per 256 values (`127 / amax`, the same multiplier the SIMD version
/// uses, so both round identically) and the sum of every 16 quants.
pub(crate) fn quantize_a8k_scalar(x: &[f32], out: &mut [BlockA8K]) {
    for (b, xs) in out.iter_mut().zip(x.chunks_exact(QK_K)) {
        let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        b.d = amax / 127.0;
        for (q, v) in b.qs.iter_mut().zip(xs) {
            *q = (v * id).round() as i8;
        }
        fill_bsums(b);
    }
}

/// `b.bsums[k] = sum(b.qs[16k..16k+16])`.
pub(crate) fn fill_bsums(b: &mut BlockA8K) {
    for (s, q) in b.bsums.iter_mut().zip(b.qs.chunks_exact(16)) {
        *s = q.iter().map(|&v| i16::from(v)).sum();
    }
}

/// The fifth bits of a Q5 block, bit `i` for weight `i`.
fn qh32(qh: [u8; 4]) -> u32 {
    u32::from_le_bytes(qh)
}

pub(crate) fn dot_q5_0_a8_scalar(w: &[BlockQ5_0], a: &[BlockA8]) -> f32 {
    let mut sum = 0f32;
    for (x, y) in w.iter().zip(a) {
        let h = qh32(x.qh);
        let mut s = 0i32;
        for j in 0..QK / 2 {
            let v0 = i32::from(x.qs[j] & 0x0f) | (((h >> j) & 1) << 4) as i32;
            let v1 = i32::from(x.qs[j] >> 4) | (((h >> (j + 16)) & 1) << 4) as i32;
            s += (v0 - 16) * i32::from(y.qs[j]) + (v1 - 16) * i32::from(y.qs[j + QK / 2]);
        }
        sum += s as f32 * (x.d.to_f32() * y.d);
    }
    sum
}

pub(crate) fn dot_q5_1_a8s_scalar(w: &[BlockQ5_1], a: &[BlockA8S]) -> f32 {
    let mut sum = 0f32;
    for (x, y) in w.iter().zip(a) {
        let h = qh32(x.qh);
        let mut s = 0i32;
        for j in 0..QK / 2 {
            let v0 = i32::from(x.qs[j] & 0x0f) | (((h >> j) & 1) << 4) as i32;
            let v1 = i32::from(x.qs[j] >> 4) | (((h >> (j + 16)) & 1) << 4) as i32;
            s += v0 * i32::from(y.qs[j]) + v1 * i32::from(y.qs[j + QK / 2]);
        }
        sum += s as f32 * (x.d.to_f32() * y.d) + x.m.to_f32() * y.s;
    }
    sum
}

/// The 6-bit scale and minimum of sub-block `j` (0..8) of a Q4_K/Q5_K block:
/// sub-blocks 0..4 keep theirs in the low 6 bits of bytes `j` and `j + 4`;
/// 4..8 keep the low 4 bits in byte `j + 4` and the top 2 in the spare high
/// bits of bytes `j - 4` (scale) and `j` (minimum).
pub(crate) fn scale_min_k4(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Sum over one K-quant block of sub-block (scale, min) · (quant dot, act sum).
fn k4_block(scales: &[u8; 12], y: &BlockA8K, mut q: impl FnMut(usize) -> i32) -> (i32, i32) {
    let (mut sumi, mut summ) = (0i32, 0i32);
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, scales);
        let mut s = 0i32;
        for l in 0..32 {
            s += q(32 * j + l) * i32::from(y.qs[32 * j + l]);
        }
        sumi += i32::from(sc) * s;
        let bs = i32::from(y.bsums[2 * j]) + i32::from(y.bsums[2 * j + 1]);
        summ += i32::from(m) * bs;
    }
    (sumi, summ)
}

pub(crate) fn dot_q4_k_a8k_scalar(w: &[BlockQ4K], a: &[BlockA8K]) -> f32 {
    let mut sum = 0f32;
    for (x, y) in w.iter().zip(a) {
        let (sumi, summ) = k4_block(&x.scales, y, |i| {
            let (g, l) = (i / 64, i % 64);
            let b = x.qs[32 * g + l % 32];
            i32::from(if l < 32 { b & 0x0f } else { b >> 4 })
        });
        sum += x.d.to_f32() * y.d * sumi as f32 - x.dmin.to_f32() * y.d * summ as f32;
    }
    sum
}

pub(crate) fn dot_q5_k_a8k_scalar(w: &[BlockQ5K], a: &[BlockA8K]) -> f32 {
    let mut sum = 0f32;
    for (x, y) in w.iter().zip(a) {
        let (sumi, summ) = k4_block(&x.scales, y, |i| {
            let (g, l) = (i / 64, i % 64);
            let b = x.qs[32 * g + l % 32];
            let lo = if l < 32 { b & 0x0f } else { b >> 4 };
            let bit = 2 * g + usize::from(l >= 32);
            i32::from(lo) | (i32::from((x.qh[l % 32] >> bit) & 1) << 4)
        });
        sum += x.d.to_f32() * y.d * sumi as f32 - x.dmin.to_f32() * y.d * summ as f32;
    }
    sum
}

pub(crate) fn dot_q6_k_a8k_scalar(w: &[BlockQ6K], a: &[BlockA8K]) -> f32 {
    let mut sum = 0f32;
    for (x, y) in w.iter().zip(a) {
        let mut sumi = 0i32;
        for (i, &q8) in y.qs.iter().enumerate() {
            // Weight i: half h (128 each), quarter k (32 each), lane l.
            let (h, k, l) = (i / 128, (i % 128) / 32, i % 32);
            let lb = x.ql[64 * h + 32 * (k % 2) + l];
            let lo = if k < 2 { lb & 0x0f } else { lb >> 4 };
            let hi = (x.qh[32 * h + l] >> (2 * k)) & 3;
            let q = i32::from(lo | (hi << 4)) - 32;
            sumi += i32::from(x.scales[i / 16]) * q * i32::from(q8);
        }
        sum += x.d.to_f32() * y.d * sumi as f32;
    }
    sum
}

/// The 2-bit quant of weight `i` (0..256) of a Q2_K/Q3_K block: weight
/// `128h + 32k + l` is bits `2k..2k+2` of `qs[32h + l]`.
#[inline]
fn q2_at(qs: &[u8; QK_K / 4], i: usize) -> i32 {
    let (h, k, l) = (i / 128, (i % 128) / 32, i % 32);
    i32::from((qs[32 * h + l] >> (2 * k)) & 3)
}

pub(crate) fn dot_q2_k_a8k_scalar(w: &[BlockQ2K], a: &[BlockA8K]) -> f32 {
    let mut sum = 0f32;
    for (x, y) in w.iter().zip(a) {
        let (mut sumi, mut summ) = (0i32, 0i32);
        for (j, &sc) in x.scales.iter().enumerate() {
            let mut s = 0i32;
            for i in 16 * j..16 * j + 16 {
                s += q2_at(&x.qs, i) * i32::from(y.qs[i]);
            }
            sumi += i32::from(sc & 0x0f) * s;
            summ += i32::from(sc >> 4) * i32::from(y.bsums[j]);
        }
        sum += x.d.to_f32() * y.d * sumi as f32 - x.dmin.to_f32() * y.d * summ as f32;
    }
    sum
}

/// The 16 scales of a Q3_K block, `sc - 32` (-32..=31): scale `j` has its
/// low 4 bits in the low (`j < 8`) or high (`j >= 8`) nibble of byte
/// `j % 8`, and its top 2 bits at bits `2 * (j / 4)` of byte `8 + j % 4`.
pub(crate) fn scales_q3k(q: &[u8; 12]) -> [i8; 16] {
    std::array::from_fn(|j| {
        let lo = if j < 8 { q[j] & 0x0f } else { q[j - 8] >> 4 };
        let hi = (q[8 + j % 4] >> (2 * (j / 4))) & 3;
        (lo | (hi << 4)) as i8 - 32
    })
}

pub(crate) fn dot_q3_k_a8k_scalar(w: &[BlockQ3K], a: &[BlockA8K]) -> f32 {
    let mut sum = 0f32;
    for (x, y) in w.iter().zip(a) {
        let scales = scales_q3k(&x.scales);
        let mut sumi = 0i32;
        for (j, &sc) in scales.iter().enumerate() {
            let mut s = 0i32;
            for i in 16 * j..16 * j + 16 {
                let (h, k, l) = (i / 128, (i % 128) / 32, i % 32);
                let high = (x.hmask[l] >> (4 * h + k)) & 1;
                let q = q2_at(&x.qs, i) - if high == 0 { 4 } else { 0 };
                s += q * i32::from(y.qs[i]);
            }
            sumi += i32::from(sc) * s;
        }
        sum += x.d.to_f32() * y.d * sumi as f32;
    }
    sum
}

/// F16 weights · f32 activations, accumulated in f32 (eight lanes, so the
/// compiler vectorizes; the tail in order).
pub(crate) fn dot_f16_scalar(w: &[f16], a: &[f32]) -> f32 {
    let n = w.len().min(a.len());
    let (w, a) = (&w[..n], &a[..n]);
    let mut acc = [0f32; 8];
    let (cw, rw) = w.as_chunks::<8>();
    let (ca, ra) = a.as_chunks::<8>();
    for (x, y) in cw.iter().zip(ca) {
        for i in 0..8 {
            acc[i] = x[i].to_f32().mul_add(y[i], acc[i]);
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in rw.iter().zip(ra) {
        s += x.to_f32() * y;
    }
    s
}

pub(crate) fn dot_f32_scalar(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent accumulators so the compiler vectorizes.
    let mut acc = [0f32; 8];
    let (ca, ra) = a.as_chunks::<8>();
    let (cb, rb) = b.as_chunks::<8>();
    for (x, y) in ca.iter().zip(cb) {
        for i in 0..8 {
            acc[i] = x[i].mul_add(y[i], acc[i]);
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// `y += alpha * x` over the common length (the reference for the SIMD
/// versions; the same fused multiply-add per element).
pub(crate) fn axpy_scalar(y: &mut [f32], alpha: f32, x: &[f32]) {
    for (a, b) in y.iter_mut().zip(x) {
        *a = alpha.mul_add(*b, *a);
    }
}
