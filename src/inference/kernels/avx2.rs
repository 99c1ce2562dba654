//! x86-64 AVX2 + FMA + F16C kernels, the same functions as [`super::scalar`].
//!
//! Every function here is compiled with `#[target_feature(enable = "avx2,fma,f16c")]`
//! and is only reached through the dispatch in [`super`] when
//! [`super::Isa::detect`] returned [`super::Isa::Avx2`].

use super::blocks::{
    BlockA8, BlockA8K, BlockA8S, BlockQ2K, BlockQ3K, BlockQ4_0, BlockQ4_1, BlockQ4K, BlockQ5_0,
    BlockQ5_1, BlockQ5K, BlockQ6K, BlockQ8_0, QK, QK_K,
};
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

/// f32 · f32 over the common length (see [`super::dot_f32`]).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C (guaranteed when called through
/// [`super`]'s dispatch with [`super::Isa::Avx2`]).
#[inline]
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

/// `y += alpha * x` over the common length (see [`super::axpy`]); one fused
/// multiply-add per element, as the scalar reference.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C (guaranteed when called through
/// [`super`]'s dispatch with [`super::Isa::Avx2`]).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
    let n = y.len().min(x.len());
    let va = _mm256_set1_ps(alpha);
    let mut i = 0;
    // SAFETY: every load and store touches 8 floats below `n`.
    unsafe {
        while i + 8 <= n {
            let p = y.as_mut_ptr().add(i);
            let r = _mm256_fmadd_ps(va, _mm256_loadu_ps(x.as_ptr().add(i)), _mm256_loadu_ps(p));
            _mm256_storeu_ps(p, r);
            i += 8;
        }
    }
    while i < n {
        y[i] = alpha.mul_add(x[i], y[i]);
        i += 1;
    }
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

/// An f16 as f32 (lane 0).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn f16s(h: f16) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(h.to_bits()))))
}

/// 32 bits at `p` → 32 bytes, byte `i` = 0xFF where bit `i` is set, else 0.
///
/// # Safety
/// `p` must point to 4 readable bytes.
/// The CPU must support AVX2, FMA and F16C (guaranteed when called through
/// [`super`]'s dispatch with [`super::Isa::Avx2`]).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn bits_to_bytes(p: *const u8) -> __m256i {
    // SAFETY: caller passes 4 readable bytes.
    let bits = unsafe { std::ptr::read_unaligned(p.cast::<i32>()) };
    // Byte i takes source byte i / 8 ...
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(bits),
        _mm256_set_epi64x(
            0x0303_0303_0303_0303,
            0x0202_0202_0202_0202,
            0x0101_0101_0101_0101,
            0,
        ),
    );
    // ... and is all ones once every bit but bit i % 8 is forced on.
    let others = _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe);
    _mm256_cmpeq_epi8(_mm256_or_si256(spread, others), _mm256_set1_epi64x(-1))
}

/// One signed 32-weight block (`bx` in -128..=127, scale `dw`) times the
/// matching [`BlockA8`] of each of `N` rows, into `acc`.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C (guaranteed when called through
/// [`super`]'s dispatch with [`super::Isa::Avx2`]).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn sym_block<const N: usize>(
    bx: __m256i,
    dw: f32,
    ys: [&BlockA8; N],
    acc: &mut [__m256; N],
) {
    let ax = _mm256_sign_epi8(bx, bx);
    for c in 0..N {
        let y = ys[c];
        // SAFETY: `qs` holds 32 bytes.
        let by = unsafe { _mm256_loadu_si256(y.qs.as_ptr().cast()) };
        let d = _mm256_set1_ps(dw * y.d);
        acc[c] = _mm256_fmadd_ps(d, mul_sum_us8(ax, _mm256_sign_epi8(by, bx)), acc[c]);
    }
}

/// One unsigned 32-weight block (`bx`, scale and minimum at `dm`) times the
/// matching [`BlockA8S`] of each of `N` rows, into `acc` and `accm` (as
/// [`q4_1_block`]).
///
/// # Safety
/// `dm` must point to 4 readable bytes (two f16).
/// The CPU must support AVX2, FMA and F16C (guaranteed when called through
/// [`super`]'s dispatch with [`super::Isa::Avx2`]).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn min_block<const N: usize>(
    bx: __m256i,
    dm: *const u8,
    ys: [&BlockA8S; N],
    acc: &mut [__m256; N],
    accm: &mut [__m128; N],
) {
    // SAFETY: caller passes 4 readable bytes.
    let dm = unsafe { f16x2(dm) };
    for c in 0..N {
        let y = ys[c];
        // SAFETY: the block is 40 bytes: `d`, `s` then 32 quants.
        unsafe {
            let ds = _mm_castpd_ps(_mm_load_sd((y as *const BlockA8S).cast()));
            let p = _mm_mul_ps(dm, ds);
            accm[c] = _mm_add_ps(accm[c], p);
            let by = _mm256_loadu_si256(y.qs.as_ptr().cast());
            acc[c] = _mm256_fmadd_ps(_mm256_broadcastss_ps(p), mul_sum_us8(bx, by), acc[c]);
        }
    }
}

/// The shortest of `n` and every row's length.
fn common_len<A, const N: usize>(n: usize, a: &[&[A]; N]) -> usize {
    a.iter().fold(n, |n, r| n.min(r.len()))
}

/// Calls `even(i)` and `odd(i + 1)` for each pair of blocks below `n`, then
/// `even` for a last odd block: two independent accumulator chains.
#[inline(always)]
fn pairs(n: usize, mut even: impl FnMut(usize), mut odd: impl FnMut(usize)) {
    let mut i = 0;
    while i + 2 <= n {
        even(i);
        odd(i + 1);
        i += 2;
    }
    if i < n {
        even(i);
    }
}

/// The blocks at `i` of every row.
///
/// # Safety
/// `i` must be below every row's length.
#[inline]
unsafe fn at<'a, A, const N: usize>(a: &[&'a [A]; N], i: usize) -> [&'a A; N] {
    // SAFETY: caller keeps `i` in bounds.
    std::array::from_fn(|c| unsafe { a[c].get_unchecked(i) })
}

/// Q8_0 weights · `N` rows of 8-bit activations (see [`super::dot_q8_0_a8`]).
/// Even blocks go to one accumulator, odd ones to another, per row, so every
/// `N` gives the same bits per row.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C (guaranteed when called through
/// [`super`]'s dispatch with [`super::Isa::Avx2`]).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_q8_0_a8<const N: usize>(w: &[BlockQ8_0], a: [&[BlockA8]; N]) -> [f32; N] {
    let n = common_len(w.len(), &a);
    let (mut acc0, mut acc1) = ([_mm256_setzero_ps(); N], [_mm256_setzero_ps(); N]);
    let step = |i: usize, acc: &mut [__m256; N]| {
        // SAFETY: `i < n`; the block holds 32 quants.
        unsafe {
            let x = w.get_unchecked(i);
            let bx = _mm256_loadu_si256(x.qs.as_ptr().cast());
            sym_block(bx, f16s(x.d), at(&a, i), acc);
        }
    };
    pairs(n, |i| step(i, &mut acc0), |i| step(i, &mut acc1));
    std::array::from_fn(|c| hsum_ps(_mm256_add_ps(acc0[c], acc1[c])))
}

/// Q5_0 weights · `N` rows of 8-bit activations (see [`super::dot_q5_0_a8`]).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C (guaranteed when called through
/// [`super`]'s dispatch with [`super::Isa::Avx2`]).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_q5_0_a8<const N: usize>(w: &[BlockQ5_0], a: [&[BlockA8]; N]) -> [f32; N] {
    let n = common_len(w.len(), &a);
    let (mut acc0, mut acc1) = ([_mm256_setzero_ps(); N], [_mm256_setzero_ps(); N]);
    let hi = _mm256_set1_epi8(0xF0u8 as i8);
    let step = |i: usize, acc: &mut [__m256; N]| {
        // SAFETY: `i < n`; the block holds 4 bytes of high bits, 16 of nibbles.
        unsafe {
            let x = w.get_unchecked(i);
            // q - 16: the nibble where the fifth bit is set, else nibble | 0xF0.
            let bits = bits_to_bytes(x.qh.as_ptr());
            let bx = _mm256_or_si256(nibbles(x.qs.as_ptr()), _mm256_andnot_si256(bits, hi));
            sym_block(bx, f16s(x.d), at(&a, i), acc);
        }
    };
    pairs(n, |i| step(i, &mut acc0), |i| step(i, &mut acc1));
    std::array::from_fn(|c| hsum_ps(_mm256_add_ps(acc0[c], acc1[c])))
}

/// Q5_1 weights · `N` rows of 8-bit activations with sums (see
/// [`super::dot_q5_1_a8s`]).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C (guaranteed when called through
/// [`super`]'s dispatch with [`super::Isa::Avx2`]).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_q5_1_a8s<const N: usize>(
    w: &[BlockQ5_1],
    a: [&[BlockA8S]; N],
) -> [f32; N] {
    let n = common_len(w.len(), &a);
    let (mut acc0, mut acc1) = ([_mm256_setzero_ps(); N], [_mm256_setzero_ps(); N]);
    let (mut m0, mut m1) = ([_mm_setzero_ps(); N], [_mm_setzero_ps(); N]);
    let five = _mm256_set1_epi8(0x10);
    let step = |i: usize, acc: &mut [__m256; N], accm: &mut [__m128; N]| {
        // SAFETY: `i < n`; the block starts with `d`, `m`, then 4 bytes of
        // high bits and 16 of nibbles.
        unsafe {
            let x = w.get_unchecked(i);
            let bits = _mm256_and_si256(bits_to_bytes(x.qh.as_ptr()), five);
            let bx = _mm256_or_si256(nibbles(x.qs.as_ptr()), bits);
            let dm = (x as *const BlockQ5_1).cast::<u8>();
            min_block(bx, dm, at(&a, i), acc, accm);
        }
    };
    pairs(
        n,
        |i| step(i, &mut acc0, &mut m0),
        |i| step(i, &mut acc1, &mut m1),
    );
    std::array::from_fn(|c| {
        let m = _mm_add_ps(m0[c], m1[c]);
        hsum_ps(_mm256_add_ps(acc0[c], acc1[c])) + _mm_cvtss_f32(_mm_movehdup_ps(m))
    })
}

/// The 8 scales and 8 minimums of a Q4_K/Q5_K block as bytes (see
/// `scale_min_k4`), unpacked with 32-bit masks.
#[inline]
fn k4_scales(q: &[u8; 12]) -> (u64, u64) {
    let w = |k: usize| u32::from_le_bytes([q[4 * k], q[4 * k + 1], q[4 * k + 2], q[4 * k + 3]]);
    let (u0, u1, u2) = (w(0), w(1), w(2));
    let (low6, low4, top2) = (0x3f3f_3f3f, 0x0f0f_0f0f, 0x0303_0303);
    let sc_lo = u0 & low6;
    let sc_hi = (u2 & low4) | (((u0 >> 6) & top2) << 4);
    let mn_lo = u1 & low6;
    let mn_hi = ((u2 >> 4) & low4) | (((u1 >> 6) & top2) << 4);
    (
        u64::from(sc_lo) | (u64::from(sc_hi) << 32),
        u64::from(mn_lo) | (u64::from(mn_hi) << 32),
    )
}

/// The 8 scale bytes of [`k4_scales`] as i16 in both 128-bit lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn k4_scale_vec(sc: u64) -> __m256i {
    _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(sc as i64)))
}

/// From `v` holding the same 8 i16 in both 128-bit lanes: i16 `s` in every
/// slot of the low lane, `t` in every slot of the high lane (the scales of
/// the two 16-quant halves of a 32-quant vector). One byte shuffle.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn pick16(v: __m256i, s: usize, t: usize) -> __m256i {
    let idx = |k: usize| (((2 * k + 1) << 8) | (2 * k)) as i16;
    _mm256_shuffle_epi8(
        v,
        _mm256_set_m128i(_mm_set1_epi16(idx(t)), _mm_set1_epi16(idx(s))),
    )
}

/// Q4_K/Q5_K minimum term of one block per row: `dmin * d_a * Σ m_j·bsum_j`
/// accumulated into `accm` (subtracted at the end).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C (guaranteed when called through
/// [`super`]'s dispatch with [`super::Isa::Avx2`]).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn k4_mins<const N: usize>(
    mins: u64,
    dmin: f32,
    ys: &[&BlockA8K; N],
    accm: &mut [__m128; N],
) {
    let m16 = _mm_cvtepu8_epi16(_mm_set_epi64x(0, mins as i64));
    for c in 0..N {
        let y = ys[c];
        // SAFETY: `bsums` holds 16 i16 (32 bytes).
        let bs = unsafe { _mm256_loadu_si256(y.bsums.as_ptr().cast()) };
        // Sums per 32-quant sub-block.
        let s32 = _mm_hadd_epi16(_mm256_castsi256_si128(bs), _mm256_extracti128_si256(bs, 1));
        let prod = _mm_cvtepi32_ps(_mm_madd_epi16(m16, s32));
        accm[c] = _mm_fmadd_ps(_mm_set1_ps(dmin * y.d), prod, accm[c]);
    }
}

/// Adds `Σ madd(maddubs(q, a), scales)` of one 32-quant vector for each row.
///
/// # Safety
/// `off + 32 <= 256`.
/// The CPU must support AVX2, FMA and F16C (guaranteed when called through
/// [`super`]'s dispatch with [`super::Isa::Avx2`]).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn k_part<const N: usize>(
    q: __m256i,
    sc: __m256i,
    off: usize,
    ys: &[&BlockA8K; N],
    sumi: &mut [__m256i; N],
) {
    for c in 0..N {
        // SAFETY: caller keeps `off + 32` within the 256 quants.
        let by = unsafe { _mm256_loadu_si256(ys[c].qs.as_ptr().add(off).cast()) };
        let p = _mm256_madd_epi16(_mm256_maddubs_epi16(q, by), sc);
        sumi[c] = _mm256_add_epi32(sumi[c], p);
    }
}

/// Final sum of a K-quant kernel: `Σ acc - Σ accm` per row.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn k_finish<const N: usize>(acc: [__m256; N], accm: [__m128; N]) -> [f32; N] {
    std::array::from_fn(|c| {
        let m = accm[c];
        let m = _mm_add_ps(m, _mm_movehl_ps(m, m));
        let m = _mm_add_ss(m, _mm_movehdup_ps(m));
        hsum_ps(acc[c]) - _mm_cvtss_f32(m)
    })
}

/// Q4_K weights · `N` rows of [`BlockA8K`] (see [`super::dot_q4_k_a8k`]).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C (guaranteed when called through
/// [`super`]'s dispatch with [`super::Isa::Avx2`]).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_q4_k_a8k<const N: usize>(w: &[BlockQ4K], a: [&[BlockA8K]; N]) -> [f32; N] {
    let n = common_len(w.len(), &a);
    let mut acc = [_mm256_setzero_ps(); N];
    let mut accm = [_mm_setzero_ps(); N];
    let m4 = _mm256_set1_epi8(0x0f);
    for i in 0..n {
        // SAFETY: `i < n`; all loads stay inside the 144- and 292-byte blocks.
        unsafe {
            let x = w.get_unchecked(i);
            let ys = at(&a, i);
            let (sc, mn) = k4_scales(&x.scales);
            k4_mins(mn, f16s(x.dmin), &ys, &mut accm);
            let mut sumi = [_mm256_setzero_si256(); N];
            let sc = k4_scale_vec(sc);
            for j in 0..4 {
                let q4 = _mm256_loadu_si256(x.qs.as_ptr().add(32 * j).cast());
                let lo = _mm256_and_si256(q4, m4);
                let hi = _mm256_and_si256(_mm256_srli_epi16(q4, 4), m4);
                k_part(lo, pick16(sc, 2 * j, 2 * j), 64 * j, &ys, &mut sumi);
                k_part(
                    hi,
                    pick16(sc, 2 * j + 1, 2 * j + 1),
                    64 * j + 32,
                    &ys,
                    &mut sumi,
                );
            }
            let d = f16s(x.d);
            for c in 0..N {
                let dc = _mm256_set1_ps(d * ys[c].d);
                acc[c] = _mm256_fmadd_ps(dc, _mm256_cvtepi32_ps(sumi[c]), acc[c]);
            }
        }
    }
    k_finish(acc, accm)
}

/// Q5_K weights · `N` rows of [`BlockA8K`] (see [`super::dot_q5_k_a8k`]).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C (guaranteed when called through
/// [`super`]'s dispatch with [`super::Isa::Avx2`]).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_q5_k_a8k<const N: usize>(w: &[BlockQ5K], a: [&[BlockA8K]; N]) -> [f32; N] {
    let n = common_len(w.len(), &a);
    let mut acc = [_mm256_setzero_ps(); N];
    let mut accm = [_mm_setzero_ps(); N];
    let m4 = _mm256_set1_epi8(0x0f);
    let b5 = _mm256_set1_epi8(0x10);
    for i in 0..n {
        // SAFETY: `i < n`; all loads stay inside the 176- and 292-byte blocks.
        unsafe {
            let x = w.get_unchecked(i);
            let ys = at(&a, i);
            let (sc, mn) = k4_scales(&x.scales);
            k4_mins(mn, f16s(x.dmin), &ys, &mut accm);
            let mut sumi = [_mm256_setzero_si256(); N];
            let mut hb = _mm256_loadu_si256(x.qh.as_ptr().cast());
            let sc = k4_scale_vec(sc);
            for j in 0..4 {
                let q4 = _mm256_loadu_si256(x.qs.as_ptr().add(32 * j).cast());
                // Bits 2j and 2j + 1 of qh (now bits 0 and 1) to bit 4.
                let h_lo = _mm256_and_si256(_mm256_slli_epi16(hb, 4), b5);
                let h_hi = _mm256_and_si256(_mm256_slli_epi16(hb, 3), b5);
                hb = _mm256_srli_epi16(hb, 2);
                let lo = _mm256_or_si256(_mm256_and_si256(q4, m4), h_lo);
                let hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q4, 4), m4), h_hi);
                k_part(lo, pick16(sc, 2 * j, 2 * j), 64 * j, &ys, &mut sumi);
                k_part(
                    hi,
                    pick16(sc, 2 * j + 1, 2 * j + 1),
                    64 * j + 32,
                    &ys,
                    &mut sumi,
                );
            }
            let d = f16s(x.d);
            for c in 0..N {
                let dc = _mm256_set1_ps(d * ys[c].d);
                acc[c] = _mm256_fmadd_ps(dc, _mm256_cvtepi32_ps(sumi[c]), acc[c]);
            }
        }
    }
    k_finish(acc, accm)
}

/// Q6_K weights · `N` rows of [`BlockA8K`] (see [`super::dot_q6_k_a8k`]).
/// The quants are used unsigned (0..64); the `- 32` offset is folded in
/// once per block through the activation sums.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C (guaranteed when called through
/// [`super`]'s dispatch with [`super::Isa::Avx2`]).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_q6_k_a8k<const N: usize>(w: &[BlockQ6K], a: [&[BlockA8K]; N]) -> [f32; N] {
    let n = common_len(w.len(), &a);
    let mut acc = [_mm256_setzero_ps(); N];
    let m4 = _mm256_set1_epi8(0x0f);
    let m2 = _mm256_set1_epi8(0x30);
    for i in 0..n {
        // SAFETY: `i < n`; all loads stay inside the 210- and 292-byte blocks.
        unsafe {
            let x = w.get_unchecked(i);
            let ys = at(&a, i);
            let sc = &x.scales;
            let mut sumi = [_mm256_setzero_si256(); N];
            for h in 0..2 {
                // This half's 8 scales as i16 in both 128-bit lanes.
                let s8 = _mm_loadl_epi64(sc.as_ptr().add(8 * h).cast());
                let sh = _mm256_broadcastsi128_si256(_mm_cvtepi8_epi16(s8));
                let qh = _mm256_loadu_si256(x.qh.as_ptr().add(32 * h).cast());
                let l0 = _mm256_loadu_si256(x.ql.as_ptr().add(64 * h).cast());
                let l1 = _mm256_loadu_si256(x.ql.as_ptr().add(64 * h + 32).cast());
                let v = [
                    _mm256_or_si256(
                        _mm256_and_si256(l0, m4),
                        _mm256_and_si256(_mm256_slli_epi16(qh, 4), m2),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(l1, m4),
                        _mm256_and_si256(_mm256_slli_epi16(qh, 2), m2),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16(l0, 4), m4),
                        _mm256_and_si256(qh, m2),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                        _mm256_and_si256(_mm256_srli_epi16(qh, 2), m2),
                    ),
                ];
                for (k, vk) in v.into_iter().enumerate() {
                    let svec = pick16(sh, 2 * k, 2 * k + 1);
                    k_part(vk, svec, 128 * h + 32 * k, &ys, &mut sumi);
                }
            }
            // Minus 32 · Σ scale_j · bsum_j.
            let sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(sc.as_ptr().cast()));
            let d = f16s(x.d);
            for c in 0..N {
                let bs = _mm256_loadu_si256(ys[c].bsums.as_ptr().cast());
                let off = _mm256_slli_epi32(_mm256_madd_epi16(sc16, bs), 5);
                let s = _mm256_sub_epi32(sumi[c], off);
                let dc = _mm256_set1_ps(d * ys[c].d);
                acc[c] = _mm256_fmadd_ps(dc, _mm256_cvtepi32_ps(s), acc[c]);
            }
        }
    }
    std::array::from_fn(|c| hsum_ps(acc[c]))
}

/// Quantizes a row to [`BlockA8K`] (see [`super::quantize_a8k`]).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C (guaranteed when called through
/// [`super`]'s dispatch with [`super::Isa::Avx2`]).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn quantize_a8k(x: &[f32], out: &mut [BlockA8K]) {
    let sign = _mm256_set1_ps(-0.0);
    for (b, xs) in out.iter_mut().zip(x.chunks_exact(QK_K)) {
        let mut m = _mm256_setzero_ps();
        for k in 0..QK_K / 8 {
            // SAFETY: the chunk holds 256 floats.
            let v = unsafe { _mm256_loadu_ps(xs.as_ptr().add(8 * k)) };
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v));
        }
        let m4 = _mm_max_ps(_mm256_extractf128_ps(m, 1), _mm256_castps256_ps128(m));
        let m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        let amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        b.d = amax / 127.0;
        for (g, xg) in xs.chunks_exact(32).enumerate() {
            // SAFETY: 32 floats in, 32 bytes out at `32 * g < 256`.
            unsafe {
                let q = round32(xg, id);
                _mm256_storeu_si256(b.qs.as_mut_ptr().add(32 * g).cast(), q);
            }
        }
        super::scalar::fill_bsums(b);
    }
}

/// 32 floats times `mul`, rounded half away from zero to i8 in order.
///
/// # Safety
/// `x` must hold at least 32 floats.
/// The CPU must support AVX2, FMA and F16C (guaranteed when called through
/// [`super`]'s dispatch with [`super::Isa::Avx2`]).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn round32(x: &[f32], mul: f32) -> __m256i {
    let sign = _mm256_set1_ps(-0.0);
    let mul = _mm256_set1_ps(mul);
    let rnd = |k: usize| {
        // SAFETY: caller passes 32 floats; `k < 4`.
        let v = unsafe { _mm256_loadu_ps(x.as_ptr().add(8 * k)) };
        let v = _mm256_mul_ps(v, mul);
        let s = _mm256_and_ps(v, sign);
        let a = _mm256_add_ps(_mm256_andnot_ps(sign, v), _mm256_set1_ps(0.5));
        let a = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(a);
        _mm256_cvtps_epi32(_mm256_or_ps(a, s))
    };
    let p01 = _mm256_packs_epi32(rnd(0), rnd(1));
    let p23 = _mm256_packs_epi32(rnd(2), rnd(3));
    let p = _mm256_packs_epi16(p01, p23);
    _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
}

/// Q2_K weights · `N` rows of [`BlockA8K`] (see [`super::dot_q2_k_a8k`]).
/// The 2-bit quants multiply the activations unsigned with their 4-bit
/// scales; the minimums go through the activation sums.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C (guaranteed when called through
/// [`super`]'s dispatch with [`super::Isa::Avx2`]).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_q2_k_a8k<const N: usize>(w: &[BlockQ2K], a: [&[BlockA8K]; N]) -> [f32; N] {
    let n = common_len(w.len(), &a);
    let mut acc = [_mm256_setzero_ps(); N];
    let mut accm = [_mm256_setzero_ps(); N];
    let m3 = _mm256_set1_epi8(3);
    let m4 = _mm_set1_epi8(0x0f);
    for i in 0..n {
        // SAFETY: `i < n`; all loads stay inside the 84- and 292-byte blocks.
        unsafe {
            let x = w.get_unchecked(i);
            let ys = at(&a, i);
            let sc8 = _mm_loadu_si128(x.scales.as_ptr().cast());
            let scales = _mm_and_si128(sc8, m4);
            let mins = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(sc8, 4), m4));
            let mut sumi = [_mm256_setzero_si256(); N];
            for h in 0..2 {
                // This half's 8 scales as i16 in both 128-bit lanes.
                let s8 = if h == 0 {
                    scales
                } else {
                    _mm_unpackhi_epi64(scales, scales)
                };
                let sh = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(s8));
                // Bits 2k..2k+2 of every byte, moved down two per step.
                let mut q = _mm256_loadu_si256(x.qs.as_ptr().add(32 * h).cast());
                for k in 0..4 {
                    let v = _mm256_and_si256(q, m3);
                    q = _mm256_srli_epi16(q, 2);
                    k_part(
                        v,
                        pick16(sh, 2 * k, 2 * k + 1),
                        128 * h + 32 * k,
                        &ys,
                        &mut sumi,
                    );
                }
            }
            let (d, dmin) = (f16s(x.d), f16s(x.dmin));
            for c in 0..N {
                let yd = ys[c].d;
                let bs = _mm256_loadu_si256(ys[c].bsums.as_ptr().cast());
                let pm = _mm256_cvtepi32_ps(_mm256_madd_epi16(mins, bs));
                acc[c] =
                    _mm256_fmadd_ps(_mm256_set1_ps(d * yd), _mm256_cvtepi32_ps(sumi[c]), acc[c]);
                accm[c] = _mm256_fmadd_ps(_mm256_set1_ps(dmin * yd), pm, accm[c]);
            }
        }
    }
    std::array::from_fn(|c| hsum_ps(acc[c]) - hsum_ps(accm[c]))
}

/// The 16 Q3_K scales (see `scales_q3k`) as i8, minus 32, with 32-bit masks.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q3k_scales(q: &[u8; 12]) -> __m128i {
    let w = |k: usize| u32::from_le_bytes([q[4 * k], q[4 * k + 1], q[4 * k + 2], q[4 * k + 3]]);
    let (a0, a1, t) = (w(0), w(1), w(2));
    let (low4, top2) = (0x0f0f_0f0f, 0x0303_0303);
    let s0 = (a0 & low4) | ((t & top2) << 4);
    let s1 = (a1 & low4) | (((t >> 2) & top2) << 4);
    let s2 = ((a0 >> 4) & low4) | (((t >> 4) & top2) << 4);
    let s3 = ((a1 >> 4) & low4) | (((t >> 6) & top2) << 4);
    let v = _mm_setr_epi32(s0 as i32, s1 as i32, s2 as i32, s3 as i32);
    _mm_sub_epi8(v, _mm_set1_epi8(32))
}

/// Q3_K weights · `N` rows of [`BlockA8K`] (see [`super::dot_q3_k_a8k`]).
/// The quants are used unsigned (`q + 4`, 0..8: the two low bits plus 4 for
/// a set high bit); the `- 4` is folded in once per block through the
/// activation sums.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C (guaranteed when called through
/// [`super`]'s dispatch with [`super::Isa::Avx2`]).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_q3_k_a8k<const N: usize>(w: &[BlockQ3K], a: [&[BlockA8K]; N]) -> [f32; N] {
    let n = common_len(w.len(), &a);
    let mut acc = [_mm256_setzero_ps(); N];
    let m3 = _mm256_set1_epi8(3);
    let b2 = _mm256_set1_epi8(4);
    for i in 0..n {
        // SAFETY: `i < n`; all loads stay inside the 110- and 292-byte blocks.
        unsafe {
            let x = w.get_unchecked(i);
            let ys = at(&a, i);
            let sc = q3k_scales(&x.scales);
            // Bit 4h + k of every byte, moved down one per step.
            let mut hm = _mm256_loadu_si256(x.hmask.as_ptr().cast());
            let mut sumi = [_mm256_setzero_si256(); N];
            for h in 0..2 {
                let s8 = if h == 0 {
                    sc
                } else {
                    _mm_unpackhi_epi64(sc, sc)
                };
                let sh = _mm256_broadcastsi128_si256(_mm_cvtepi8_epi16(s8));
                let mut q = _mm256_loadu_si256(x.qs.as_ptr().add(32 * h).cast());
                for k in 0..4 {
                    let high = _mm256_and_si256(_mm256_slli_epi16(hm, 2), b2);
                    hm = _mm256_srli_epi16(hm, 1);
                    let v = _mm256_or_si256(_mm256_and_si256(q, m3), high);
                    q = _mm256_srli_epi16(q, 2);
                    k_part(
                        v,
                        pick16(sh, 2 * k, 2 * k + 1),
                        128 * h + 32 * k,
                        &ys,
                        &mut sumi,
                    );
                }
            }
            // Minus 4 · Σ scale_j · bsum_j.
            let sc16 = _mm256_cvtepi8_epi16(sc);
            let d = f16s(x.d);
            for c in 0..N {
                let bs = _mm256_loadu_si256(ys[c].bsums.as_ptr().cast());
                let off = _mm256_slli_epi32(_mm256_madd_epi16(sc16, bs), 2);
                let s = _mm256_sub_epi32(sumi[c], off);
                let dc = _mm256_set1_ps(d * ys[c].d);
                acc[c] = _mm256_fmadd_ps(dc, _mm256_cvtepi32_ps(s), acc[c]);
            }
        }
    }
    std::array::from_fn(|c| hsum_ps(acc[c]))
}

/// F16 weights · `N` rows of f32 activations (see [`super::dot_f16`]): 16
/// weights per step converted once (F16C) and multiplied into two
/// accumulators per row; an 8-wide step and the scalar tail in order.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C (guaranteed when called through
/// [`super`]'s dispatch with [`super::Isa::Avx2`]).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_f16<const N: usize>(w: &[f16], a: [&[f32]; N]) -> [f32; N] {
    let n = common_len(w.len(), &a);
    let mut acc0 = [_mm256_setzero_ps(); N];
    let mut acc1 = [_mm256_setzero_ps(); N];
    let mut i = 0;
    // SAFETY: every load reads 8 values below `n`, within every slice.
    unsafe {
        let wp = w.as_ptr().cast::<u8>();
        while i + 16 <= n {
            let w0 = _mm256_cvtph_ps(_mm_loadu_si128(wp.add(2 * i).cast()));
            let w1 = _mm256_cvtph_ps(_mm_loadu_si128(wp.add(2 * i + 16).cast()));
            for c in 0..N {
                let ap = a[c].as_ptr().add(i);
                acc0[c] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(ap), acc0[c]);
                acc1[c] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(ap.add(8)), acc1[c]);
            }
            i += 16;
        }
        if i + 8 <= n {
            let w0 = _mm256_cvtph_ps(_mm_loadu_si128(wp.add(2 * i).cast()));
            for c in 0..N {
                let ap = a[c].as_ptr().add(i);
                acc0[c] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(ap), acc0[c]);
            }
            i += 8;
        }
    }
    std::array::from_fn(|c| {
        let mut s = hsum_ps(_mm256_add_ps(acc0[c], acc1[c]));
        for j in i..n {
            s += f16s(w[j]) * a[c][j];
        }
        s
    })
}

/// [`dot_f32`] of `q` with each `q.len()`-wide row of `rows`, times `scale`,
/// into `out` (see [`super::dot_f32_rows`]): one call for a run of keys.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C (guaranteed when called through
/// [`super`]'s dispatch with [`super::Isa::Avx2`]).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_f32_rows(q: &[f32], rows: &[f32], scale: f32, out: &mut [f32]) {
    for (o, r) in out.iter_mut().zip(rows.chunks_exact(q.len())) {
        // SAFETY: same CPU features as this function.
        *o = unsafe { dot_f32(q, r) } * scale;
    }
}

/// [`axpy`] of each `y.len()`-wide row of `rows` with its weight in
/// `alphas`, in order (see [`super::axpy_rows`]).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C (guaranteed when called through
/// [`super`]'s dispatch with [`super::Isa::Avx2`]).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn axpy_rows(y: &mut [f32], alphas: &[f32], rows: &[f32]) {
    let n = y.len();
    for (a, r) in alphas.iter().zip(rows.chunks_exact(n)) {
        // SAFETY: same CPU features as this function.
        unsafe { axpy(y, *a, r) };
    }
}
