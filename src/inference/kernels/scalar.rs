//! Portable scalar kernels: the reference every ISA version must match
//! (bit for bit for the quantizers, within rounding for the dot products).

use super::blocks::{BlockA8, BlockA8S, BlockQ4_0, BlockQ4_1, BlockQ8_0, BlockQ8_1, QK};
use half::f16;

/// Quantizes a row to Q8_0 (`x.len() == out.len() * 32`).
pub(crate) fn quantize_q8_0_scalar(x: &[f32], out: &mut [BlockQ8_0]) {
    for (b, xs) in out.iter_mut().zip(x.chunks_exact(QK)) {
        let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        b.d = f16::from_f32(d);
        for (q, v) in b.qs.iter_mut().zip(xs) {
            *q = (v * id).round() as i8;
        }
    }
}

/// Quantizes a row to Q8_1 (`x.len() == out.len() * 32`).
pub(crate) fn quantize_q8_1_scalar(x: &[f32], out: &mut [BlockQ8_1]) {
    for (b, xs) in out.iter_mut().zip(x.chunks_exact(QK)) {
        let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        b.d = f16::from_f32(d);
        let mut sum = 0i32;
        for (q, v) in b.qs.iter_mut().zip(xs) {
            *q = (v * id).round() as i8;
            sum += i32::from(*q);
        }
        b.s = f16::from_f32(sum as f32 * d);
    }
}

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
