//! x86-64 AVX2 + FMA + F16C kernels, the same functions as [`super::scalar`].
//!
//! Every function here is compiled with `#[target_feature(enable = "avx2,fma,f16c")]`
//! and is only reached through the dispatch in [`super`] when
//! [`super::Isa::detect`] returned [`super::Isa::Avx2`].

use super::blocks::{BlockA8, BlockA8S, BlockQ4_0, BlockQ4_1, BlockQ8_0, BlockQ8_1, QK};
use half::f16;
use std::arch::x86_64::*;

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hsum_ps(v: __m256) -> f32 {
    let lo = _mm256_castps256_ps128(v);
    let hi = _mm256_extractf128_ps(v, 1);
    let s = _mm_add_ps(lo, hi);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// 16 packed bytes of nibbles → 32 bytes: low nibbles then high nibbles.
///
/// # Safety
/// `p` must point to 16 readable bytes.
/// The CPU must support AVX2, FMA and F16C (guaranteed when called through
/// [`super`]'s dispatch with [`super::Isa::Avx2`]).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn nibbles(p: *const u8) -> __m256i {
    // SAFETY: caller passes a pointer to 16 readable bytes.
    let t = unsafe { _mm_loadu_si128(p.cast()) };
    let b = _mm256_insertf128_si256(_mm256_castsi128_si256(t), _mm_srli_epi16(t, 4), 1);
    _mm256_and_si256(b, _mm256_set1_epi8(0x0f))
}

/// Sum of unsigned(x) * signed(y) byte pairs, as 8 f32 lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn mul_sum_us8(x: __m256i, y: __m256i) -> __m256 {
    let dot = _mm256_maddubs_epi16(x, y);
    _mm256_cvtepi32_ps(_mm256_madd_epi16(dot, _mm256_set1_epi16(1)))
}

/// Sum of signed(x) * signed(y) byte pairs, as 8 f32 lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn mul_sum_i8(x: __m256i, y: __m256i) -> __m256 {
    let ax = _mm256_sign_epi8(x, x);
    let sy = _mm256_sign_epi8(y, x);
    mul_sum_us8(ax, sy)
}

/// The two f16 at `p` as f32 lanes 0 and 1.
///
/// # Safety
/// `p` must point to 4 readable bytes.
/// The CPU must support AVX2, FMA and F16C (guaranteed when called through
/// [`super`]'s dispatch with [`super::Isa::Avx2`]).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16x2(p: *const u8) -> __m128 {
    // SAFETY: caller passes 4 readable bytes.
    let bits = unsafe { std::ptr::read_unaligned(p.cast::<i32>()) };
    _mm_cvtph_ps(_mm_cvtsi32_si128(bits))
}

/// One Q4_1 block times one [`BlockA8S`] block, accumulated into `acc`
/// (quant products) and `accm` (lane 0 `d_w * d_a`, lane 1 `m_w * s_a`).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C (guaranteed when called through
/// [`super`]'s dispatch with [`super::Isa::Avx2`]).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_1_block(x: &BlockQ4_1, y: &BlockA8S, acc: &mut __m256, accm: &mut __m128) {
    // SAFETY: blocks are 20 and 40 bytes; the loads stay inside them.
    unsafe {
        let dm = f16x2((x as *const BlockQ4_1).cast());
        let ds = _mm_castpd_ps(_mm_load_sd((y as *const BlockA8S).cast()));
        // [dw * da, mw * sa, 0, 0]
        let p = _mm_mul_ps(dm, ds);
        *accm = _mm_add_ps(*accm, p);
        let d = _mm256_broadcastss_ps(p);
        let bx = nibbles(x.qs.as_ptr());
        let by = _mm256_loadu_si256(y.qs.as_ptr().cast());
        *acc = _mm256_fmadd_ps(d, mul_sum_us8(bx, by), *acc);
    }
}

/// Q4_1 weights · 8-bit activations with sums (see [`super::dot_q4_1_a8s`]).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C (guaranteed when called through
/// [`super`]'s dispatch with [`super::Isa::Avx2`]).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_q4_1_a8s(w: &[BlockQ4_1], a: &[BlockA8S]) -> f32 {
    let n = w.len().min(a.len());
    let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let (mut m0, mut m1) = (_mm_setzero_ps(), _mm_setzero_ps());
    let mut i = 0;
    // SAFETY: indices are below `n`.
    unsafe {
        while i + 2 <= n {
            q4_1_block(w.get_unchecked(i), a.get_unchecked(i), &mut acc0, &mut m0);
            q4_1_block(
                w.get_unchecked(i + 1),
                a.get_unchecked(i + 1),
                &mut acc1,
                &mut m1,
            );
            i += 2;
        }
        if i < n {
            q4_1_block(w.get_unchecked(i), a.get_unchecked(i), &mut acc0, &mut m0);
        }
    }
    let m = _mm_add_ps(m0, m1);
    hsum_ps(_mm256_add_ps(acc0, acc1)) + _mm_cvtss_f32(_mm_movehdup_ps(m))
}

/// Four [`dot_q4_1_a8s`] at once, bit for bit: the same operations in
/// the same order per activation row (even blocks into one accumulator,
/// odd blocks into another, summed at the end), so a token's result
/// does not depend on whether its batch had it in a group of four.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C (guaranteed when called through
/// [`super`]'s dispatch with [`super::Isa::Avx2`]).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_q4_1_a8s_x4(w: &[BlockQ4_1], a: [&[BlockA8S]; 4]) -> [f32; 4] {
    let n = a.iter().fold(w.len(), |n, r| n.min(r.len()));
    let mut acc = [[_mm256_setzero_ps(); 4]; 2];
    let mut accm = [[_mm_setzero_ps(); 4]; 2];
    for i in 0..n {
        let par = i % 2;
        // SAFETY: `i < n` bounds every slice; blocks are 20 and 40 bytes.
        unsafe {
            let x = w.get_unchecked(i);
            let dm = f16x2((x as *const BlockQ4_1).cast());
            let bx = nibbles(x.qs.as_ptr());
            for c in 0..4 {
                let y = a[c].get_unchecked(i);
                let ds = _mm_castpd_ps(_mm_load_sd((y as *const BlockA8S).cast()));
                let p = _mm_mul_ps(dm, ds);
                accm[par][c] = _mm_add_ps(accm[par][c], p);
                let by = _mm256_loadu_si256(y.qs.as_ptr().cast());
                acc[par][c] =
                    _mm256_fmadd_ps(_mm256_broadcastss_ps(p), mul_sum_us8(bx, by), acc[par][c]);
            }
        }
    }
    std::array::from_fn(|c| {
        let m = _mm_add_ps(accm[0][c], accm[1][c]);
        hsum_ps(_mm256_add_ps(acc[0][c], acc[1][c])) + _mm_cvtss_f32(_mm_movehdup_ps(m))
    })
}

/// `d_w * d_a` broadcast, for blocks whose first two bytes are an f16 scale.
///
/// # Safety
/// `w` must point to 2 readable bytes.
/// The CPU must support AVX2, FMA and F16C (guaranteed when called through
/// [`super`]'s dispatch with [`super::Isa::Avx2`]).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scale(w: *const u8, da: f32) -> __m256 {
    // SAFETY: caller passes 2 readable bytes.
    let bits = unsafe { std::ptr::read_unaligned(w.cast::<u16>()) };
    let dw = _mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits)));
    _mm256_broadcastss_ps(_mm_mul_ss(dw, _mm_set_ss(da)))
}

/// Q4_0 weights · 8-bit activations (see [`super::dot_q4_0_a8`]).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C (guaranteed when called through
/// [`super`]'s dispatch with [`super::Isa::Avx2`]).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_q4_0_a8(w: &[BlockQ4_0], a: &[BlockA8]) -> f32 {
    let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    for (k, (x, y)) in w.iter().zip(a).enumerate() {
        // SAFETY: the blocks hold 16 and 32 bytes of quants.
        unsafe {
            let d = scale((x as *const BlockQ4_0).cast(), y.d);
            let bx = _mm256_sub_epi8(nibbles(x.qs.as_ptr()), _mm256_set1_epi8(8));
            let by = _mm256_loadu_si256(y.qs.as_ptr().cast());
            if k % 2 == 0 {
                acc0 = _mm256_fmadd_ps(d, mul_sum_i8(bx, by), acc0);
            } else {
                acc1 = _mm256_fmadd_ps(d, mul_sum_i8(bx, by), acc1);
            }
        }
    }
    hsum_ps(_mm256_add_ps(acc0, acc1))
}

/// Q8_0 weights · 8-bit activations (see [`super::dot_q8_0_a8`]).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C (guaranteed when called through
/// [`super`]'s dispatch with [`super::Isa::Avx2`]).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_q8_0_a8(w: &[BlockQ8_0], a: &[BlockA8]) -> f32 {
    let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    for (k, (x, y)) in w.iter().zip(a).enumerate() {
        // SAFETY: both blocks hold 32 bytes of quants.
        unsafe {
            let d = scale((x as *const BlockQ8_0).cast(), y.d);
            let bx = _mm256_loadu_si256(x.qs.as_ptr().cast());
            let by = _mm256_loadu_si256(y.qs.as_ptr().cast());
            if k % 2 == 0 {
                acc0 = _mm256_fmadd_ps(d, mul_sum_i8(bx, by), acc0);
            } else {
                acc1 = _mm256_fmadd_ps(d, mul_sum_i8(bx, by), acc1);
            }
        }
    }
    hsum_ps(_mm256_add_ps(acc0, acc1))
}

/// f32 · f32 over the common length (see [`super::dot_f32`]).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C (guaranteed when called through
/// [`super`]'s dispatch with [`super::Isa::Avx2`]).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let mut acc0 = _mm256_setzero_ps();
    let mut acc1 = _mm256_setzero_ps();
    let mut i = 0;
    // SAFETY: every load reads 8 floats below `n`.
    unsafe {
        while i + 16 <= n {
            acc0 = _mm256_fmadd_ps(
                _mm256_loadu_ps(a.as_ptr().add(i)),
                _mm256_loadu_ps(b.as_ptr().add(i)),
                acc0,
            );
            acc1 = _mm256_fmadd_ps(
                _mm256_loadu_ps(a.as_ptr().add(i + 8)),
                _mm256_loadu_ps(b.as_ptr().add(i + 8)),
                acc1,
            );
            i += 16;
        }
        while i + 8 <= n {
            acc0 = _mm256_fmadd_ps(
                _mm256_loadu_ps(a.as_ptr().add(i)),
                _mm256_loadu_ps(b.as_ptr().add(i)),
                acc0,
            );
            i += 8;
        }
    }
    let mut s = hsum_ps(_mm256_add_ps(acc0, acc1));
    while i < n {
        s += a[i] * b[i];
        i += 1;
    }
    s
}

/// Quantizes 32 floats at `x` to i8 with scale 1/d; returns (d, qs as __m256i).
///
/// # Safety
/// `x` must hold at least 32 floats (only the first 32 are read).
/// The CPU must support AVX2, FMA and F16C (guaranteed when called through
/// [`super`]'s dispatch with [`super::Isa::Avx2`]).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quant32(x: &[f32]) -> (f32, __m256i) {
    // SAFETY: caller passes exactly 32 floats.
    let (v0, v1, v2, v3) = unsafe {
        (
            _mm256_loadu_ps(x.as_ptr()),
            _mm256_loadu_ps(x.as_ptr().add(8)),
            _mm256_loadu_ps(x.as_ptr().add(16)),
            _mm256_loadu_ps(x.as_ptr().add(24)),
        )
    };
    let sign = _mm256_set1_ps(-0.0);
    let mut m = _mm256_andnot_ps(sign, v0);
    m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v1));
    m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v2));
    m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v3));
    let m4 = _mm_max_ps(_mm256_extractf128_ps(m, 1), _mm256_castps256_ps128(m));
    let m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    let m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    let amax = _mm_cvtss_f32(m4);
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let mul = _mm256_set1_ps(id);
    // Round half away from zero like `f32::round` in the scalar path.
    let rnd = |v: __m256| {
        let v = _mm256_mul_ps(v, mul);
        let s = _mm256_and_ps(v, sign);
        let a = _mm256_add_ps(_mm256_andnot_ps(sign, v), _mm256_set1_ps(0.5));
        let a = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(a);
        _mm256_cvtps_epi32(_mm256_or_ps(a, s))
    };
    let i0 = rnd(v0);
    let i1 = rnd(v1);
    let i2 = rnd(v2);
    let i3 = rnd(v3);
    let p01 = _mm256_packs_epi32(i0, i1);
    let p23 = _mm256_packs_epi32(i2, i3);
    let p = _mm256_packs_epi16(p01, p23);
    let perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    (d, _mm256_permutevar8x32_epi32(p, perm))
}

/// Quantizes a row to Q8_0 (see [`super::quantize_q8_0`]).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C (guaranteed when called through
/// [`super`]'s dispatch with [`super::Isa::Avx2`]).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn quantize_q8_0(x: &[f32], out: &mut [BlockQ8_0]) {
    for (b, xs) in out.iter_mut().zip(x.chunks_exact(QK)) {
        // SAFETY: chunks are 32 floats; qs holds 32 bytes.
        unsafe {
            let (d, q) = quant32(xs);
            b.d = f16::from_f32(d);
            _mm256_storeu_si256(b.qs.as_mut_ptr().cast(), q);
        }
    }
}

/// Quantizes a row to Q8_1 (see [`super::quantize_q8_1`]).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C (guaranteed when called through
/// [`super`]'s dispatch with [`super::Isa::Avx2`]).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn quantize_q8_1(x: &[f32], out: &mut [BlockQ8_1]) {
    for (b, xs) in out.iter_mut().zip(x.chunks_exact(QK)) {
        // SAFETY: chunks are 32 floats; qs holds 32 bytes.
        let d = unsafe {
            let (d, q) = quant32(xs);
            b.d = f16::from_f32(d);
            _mm256_storeu_si256(b.qs.as_mut_ptr().cast(), q);
            d
        };
        let sum: i32 = b.qs.iter().map(|&v| i32::from(v)).sum();
        b.s = f16::from_f32(sum as f32 * d);
    }
}

/// Quantizes a row to [`BlockA8`] (see [`super::quantize_a8`]).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C (guaranteed when called through
/// [`super`]'s dispatch with [`super::Isa::Avx2`]).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn quantize_a8(x: &[f32], out: &mut [BlockA8]) {
    for (b, xs) in out.iter_mut().zip(x.chunks_exact(QK)) {
        // SAFETY: chunks are 32 floats; qs holds 32 bytes.
        unsafe {
            let (d, q) = quant32(xs);
            b.d = d;
            _mm256_storeu_si256(b.qs.as_mut_ptr().cast(), q);
        }
    }
}

/// Quantizes a row to [`BlockA8S`] (see [`super::quantize_a8s`]).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C (guaranteed when called through
/// [`super`]'s dispatch with [`super::Isa::Avx2`]).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn quantize_a8s(x: &[f32], out: &mut [BlockA8S]) {
    for (b, xs) in out.iter_mut().zip(x.chunks_exact(QK)) {
        // SAFETY: chunks are 32 floats; qs holds 32 bytes.
        unsafe {
            let (d, q) = quant32(xs);
            b.d = d;
            _mm256_storeu_si256(b.qs.as_mut_ptr().cast(), q);
            // Sum of the 32 i8: widen to i16 pairs, then to i32.
            let s16 = _mm256_maddubs_epi16(_mm256_set1_epi8(1), q);
            let s32 = _mm256_madd_epi16(s16, _mm256_set1_epi16(1));
            let h = _mm_add_epi32(
                _mm256_castsi256_si128(s32),
                _mm256_extracti128_si256(s32, 1),
            );
            let h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0b01_00_11_10));
            let h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0b10_11_00_01));
            b.s = _mm_cvtsi128_si32(h) as f32 * d;
        }
    }
}
