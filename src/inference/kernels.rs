//! Quantized dot-product kernels for the hot weight types.
//!
//! Weights stay in their GGUF block format (viewed in place over the memory
//! mapping); activations are quantized once per row to the matching 8-bit
//! block type (Q8_0 or Q8_1, as llama.cpp does), and each output element is an
//! integer dot product per block scaled by the two block scales.
//!
//! Every kernel has a portable scalar version and, on x86-64, an AVX2+FMA
//! version chosen at run time ([`Isa::detect`]). A NEON version slots in the
//! same way: add an `Isa` variant and a `neon` module with the same functions.

use half::f16;

/// Elements per block of the 32-wide block types.
pub(crate) const QK: usize = 32;

/// Q4_0: 32 weights as 4-bit values with one scale, `w = d * (q - 8)`.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub(crate) struct BlockQ4_0 {
    pub d: f16,
    pub qs: [u8; QK / 2],
}

/// Q4_1: 32 weights as 4-bit values with scale and minimum, `w = d * q + m`.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub(crate) struct BlockQ4_1 {
    pub d: f16,
    pub m: f16,
    pub qs: [u8; QK / 2],
}

/// Q8_0: 32 values as i8 with one scale.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub(crate) struct BlockQ8_0 {
    pub d: f16,
    pub qs: [i8; QK],
}

/// Q8_1: 32 values as i8 with a scale and `s = d * sum(qs)`.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub(crate) struct BlockQ8_1 {
    pub d: f16,
    pub s: f16,
    pub qs: [i8; QK],
}

const _: () = assert!(std::mem::size_of::<BlockQ4_0>() == 18);
const _: () = assert!(std::mem::size_of::<BlockQ4_1>() == 20);
const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);
const _: () = assert!(std::mem::size_of::<BlockQ8_1>() == 36);

/// Types that may be viewed over arbitrary bytes: `repr(C)`, no padding
/// with meaning, every bit pattern valid.
///
/// # Safety
/// Implementors must be plain old data: any byte pattern of
/// `size_of::<Self>()` bytes is a valid value.
pub(crate) unsafe trait Plain: Sized {}
// SAFETY: all four are repr(C) aggregates of f16/u8/i8 (any bit pattern valid).
unsafe impl Plain for BlockQ4_0 {}
unsafe impl Plain for BlockQ4_1 {}
unsafe impl Plain for BlockQ8_0 {}
unsafe impl Plain for BlockQ8_1 {}
// SAFETY: primitive numbers.
unsafe impl Plain for f32 {}
unsafe impl Plain for f16 {}
// SAFETY: candle's k-quant blocks are repr(C) aggregates of f16/f32/u8/i8/i16.
unsafe impl Plain for candle_core::quantized::k_quants::BlockQ4K {}
unsafe impl Plain for candle_core::quantized::k_quants::BlockQ5K {}
unsafe impl Plain for candle_core::quantized::k_quants::BlockQ6K {}
unsafe impl Plain for candle_core::quantized::k_quants::BlockQ2K {}
unsafe impl Plain for candle_core::quantized::k_quants::BlockQ3K {}
unsafe impl Plain for candle_core::quantized::k_quants::BlockQ8K {}
unsafe impl Plain for candle_core::quantized::k_quants::BlockQ5_0 {}
unsafe impl Plain for candle_core::quantized::k_quants::BlockQ5_1 {}
unsafe impl Plain for candle_core::quantized::k_quants::BlockQ8_0 {}
unsafe impl Plain for candle_core::quantized::k_quants::BlockQ8_1 {}

/// Views bytes as a slice of `T` without copying. `None` when the length is
/// not a multiple of the element size or the start is misaligned.
pub(crate) fn view<T: Plain>(bytes: &[u8]) -> Option<&[T]> {
    let size = std::mem::size_of::<T>();
    if !bytes.len().is_multiple_of(size)
        || !(bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>())
    {
        return None;
    }
    // SAFETY: length and alignment checked above, T is Plain (any bits valid),
    // and the lifetime is tied to `bytes`.
    Some(unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), bytes.len() / size) })
}

/// Mutable counterpart of [`view`].
pub(crate) fn view_mut<T: Plain>(bytes: &mut [u8]) -> Option<&mut [T]> {
    let size = std::mem::size_of::<T>();
    if !bytes.len().is_multiple_of(size)
        || !(bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>())
    {
        return None;
    }
    // SAFETY: as in `view`; the borrow is exclusive.
    Some(unsafe {
        std::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast::<T>(), bytes.len() / size)
    })
}

/// The instruction set the kernels run with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// Portable Rust.
    Scalar,
    /// x86-64 AVX2 + FMA + F16C.
    Avx2,
}

impl Isa {
    /// The best instruction set this CPU supports (checked at run time).
    /// `SHOAL_ISA=scalar` forces the portable kernels (for tests and
    /// comparisons).
    pub fn detect() -> Self {
        if std::env::var("SHOAL_ISA").is_ok_and(|v| v == "scalar") {
            return Isa::Scalar;
        }
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("fma")
                && std::is_x86_feature_detected!("f16c")
            {
                return Isa::Avx2;
            }
        }
        Isa::Scalar
    }
}

// ---------------------------------------------------------------- scalar

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

pub(crate) fn dot_q4_0_q8_0_scalar(w: &[BlockQ4_0], a: &[BlockQ8_0]) -> f32 {
    let mut sum = 0f32;
    for (x, y) in w.iter().zip(a) {
        let mut s = 0i32;
        for j in 0..QK / 2 {
            let v0 = i32::from(x.qs[j] & 0x0f) - 8;
            let v1 = i32::from(x.qs[j] >> 4) - 8;
            s += v0 * i32::from(y.qs[j]) + v1 * i32::from(y.qs[j + QK / 2]);
        }
        sum += s as f32 * x.d.to_f32() * y.d.to_f32();
    }
    sum
}

pub(crate) fn dot_q4_1_q8_1_scalar(w: &[BlockQ4_1], a: &[BlockQ8_1]) -> f32 {
    let mut sum = 0f32;
    for (x, y) in w.iter().zip(a) {
        let mut s = 0i32;
        for j in 0..QK / 2 {
            let v0 = i32::from(x.qs[j] & 0x0f);
            let v1 = i32::from(x.qs[j] >> 4);
            s += v0 * i32::from(y.qs[j]) + v1 * i32::from(y.qs[j + QK / 2]);
        }
        sum += s as f32 * x.d.to_f32() * y.d.to_f32() + x.m.to_f32() * y.s.to_f32();
    }
    sum
}

pub(crate) fn dot_q8_0_q8_0_scalar(w: &[BlockQ8_0], a: &[BlockQ8_0]) -> f32 {
    let mut sum = 0f32;
    for (x, y) in w.iter().zip(a) {
        let s: i32 =
            x.qs.iter()
                .zip(&y.qs)
                .map(|(&p, &q)| i32::from(p) * i32::from(q))
                .sum();
        sum += s as f32 * x.d.to_f32() * y.d.to_f32();
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

// ------------------------------------------------------------- dispatch

/// Quantizes a row to Q8_0 with the best kernel for `isa`.
pub(crate) fn quantize_q8_0(isa: Isa, x: &[f32], out: &mut [BlockQ8_0]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` is only produced when the CPU has AVX2/FMA/F16C.
        Isa::Avx2 => unsafe { avx2::quantize_q8_0(x, out) },
        _ => quantize_q8_0_scalar(x, out),
    }
}

/// Quantizes a row to Q8_1 with the best kernel for `isa`.
pub(crate) fn quantize_q8_1(isa: Isa, x: &[f32], out: &mut [BlockQ8_1]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: see `quantize_q8_0`.
        Isa::Avx2 => unsafe { avx2::quantize_q8_1(x, out) },
        _ => quantize_q8_1_scalar(x, out),
    }
}

/// Q4_0 weights · Q8_0 activations.
pub(crate) fn dot_q4_0_q8_0(isa: Isa, w: &[BlockQ4_0], a: &[BlockQ8_0]) -> f32 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: see `quantize_q8_0`.
        Isa::Avx2 => unsafe { avx2::dot_q4_0_q8_0(w, a) },
        _ => dot_q4_0_q8_0_scalar(w, a),
    }
}

/// Q4_1 weights · Q8_1 activations.
pub(crate) fn dot_q4_1_q8_1(isa: Isa, w: &[BlockQ4_1], a: &[BlockQ8_1]) -> f32 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: see `quantize_q8_0`.
        Isa::Avx2 => unsafe { avx2::dot_q4_1_q8_1(w, a) },
        _ => dot_q4_1_q8_1_scalar(w, a),
    }
}

/// Q8_0 weights · Q8_0 activations.
pub(crate) fn dot_q8_0_q8_0(isa: Isa, w: &[BlockQ8_0], a: &[BlockQ8_0]) -> f32 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: see `quantize_q8_0`.
        Isa::Avx2 => unsafe { avx2::dot_q8_0_q8_0(w, a) },
        _ => dot_q8_0_q8_0_scalar(w, a),
    }
}

/// f32 · f32.
pub(crate) fn dot_f32(isa: Isa, a: &[f32], b: &[f32]) -> f32 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: see `quantize_q8_0`.
        Isa::Avx2 => unsafe { avx2::dot_f32(a, b) },
        _ => dot_f32_scalar(a, b),
    }
}

/// `y += alpha * x` over f32.
pub(crate) fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
    for (a, b) in y.iter_mut().zip(x) {
        *a = alpha.mul_add(*b, *a);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{BlockQ4_0, BlockQ4_1, BlockQ8_0, BlockQ8_1, QK};
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

    #[inline]
    fn f(h: f16) -> f32 {
        h.to_f32()
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_q4_1_q8_1(w: &[BlockQ4_1], a: &[BlockQ8_1]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let mut summs = 0f32;
        for (x, y) in w.iter().zip(a) {
            summs += f(x.m) * f(y.s);
            let d = _mm256_set1_ps(f(x.d) * f(y.d));
            // SAFETY: the blocks hold 16 and 32 bytes of quants.
            let (bx, by) = unsafe {
                (
                    nibbles(x.qs.as_ptr()),
                    _mm256_loadu_si256(y.qs.as_ptr().cast()),
                )
            };
            acc = _mm256_fmadd_ps(d, mul_sum_us8(bx, by), acc);
        }
        hsum_ps(acc) + summs
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_q4_0_q8_0(w: &[BlockQ4_0], a: &[BlockQ8_0]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        for (x, y) in w.iter().zip(a) {
            let d = _mm256_set1_ps(f(x.d) * f(y.d));
            // SAFETY: the blocks hold 16 and 32 bytes of quants.
            let (bx, by) = unsafe {
                (
                    nibbles(x.qs.as_ptr()),
                    _mm256_loadu_si256(y.qs.as_ptr().cast()),
                )
            };
            let bx = _mm256_sub_epi8(bx, _mm256_set1_epi8(8));
            acc = _mm256_fmadd_ps(d, mul_sum_i8(bx, by), acc);
        }
        hsum_ps(acc)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_q8_0_q8_0(w: &[BlockQ8_0], a: &[BlockQ8_0]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        for (x, y) in w.iter().zip(a) {
            let d = _mm256_set1_ps(f(x.d) * f(y.d));
            // SAFETY: both blocks hold 32 bytes of quants.
            let (bx, by) = unsafe {
                (
                    _mm256_loadu_si256(x.qs.as_ptr().cast()),
                    _mm256_loadu_si256(y.qs.as_ptr().cast()),
                )
            };
            acc = _mm256_fmadd_ps(d, mul_sum_i8(bx, by), acc);
        }
        hsum_ps(acc)
    }

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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
    }

    fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n).map(|_| lcg(&mut s) * 3.0).collect()
    }

    #[test]
    fn simd_matches_scalar() {
        let isa = Isa::detect();
        let n = 256;
        let x = rand_vec(n, 1);
        let zero8 = BlockQ8_0 {
            d: f16::ZERO,
            qs: [0; 32],
        };
        let zero81 = BlockQ8_1 {
            d: f16::ZERO,
            s: f16::ZERO,
            qs: [0; 32],
        };
        let mut a0 = vec![zero8; n / 32];
        let mut b0 = vec![zero8; n / 32];
        quantize_q8_0_scalar(&x, &mut a0);
        quantize_q8_0(isa, &x, &mut b0);
        for (p, q) in a0.iter().zip(&b0) {
            assert_eq!(p.qs, q.qs);
            assert_eq!(p.d, q.d);
        }
        let mut a1 = vec![zero81; n / 32];
        let mut b1 = vec![zero81; n / 32];
        quantize_q8_1_scalar(&x, &mut a1);
        quantize_q8_1(isa, &x, &mut b1);
        for (p, q) in a1.iter().zip(&b1) {
            assert_eq!(p.qs, q.qs);
            assert_eq!(p.s, q.s);
        }
        // Random weight blocks.
        let mut s = 7u64;
        let mut byte = || (lcg(&mut s) * 127.0) as i8;
        let w41: Vec<BlockQ4_1> = (0..n / 32)
            .map(|_| BlockQ4_1 {
                d: f16::from_f32(0.01),
                m: f16::from_f32(-0.05),
                qs: std::array::from_fn(|_| byte() as u8),
            })
            .collect();
        let w40: Vec<BlockQ4_0> = w41.iter().map(|b| BlockQ4_0 { d: b.d, qs: b.qs }).collect();
        let w80: Vec<BlockQ8_0> = (0..n / 32)
            .map(|_| BlockQ8_0 {
                d: f16::from_f32(0.02),
                qs: std::array::from_fn(|_| byte()),
            })
            .collect();
        let close = |a: f32, b: f32| (a - b).abs() <= 1e-3 * (1.0 + a.abs());
        assert!(close(
            dot_q4_1_q8_1_scalar(&w41, &a1),
            dot_q4_1_q8_1(isa, &w41, &a1)
        ));
        assert!(close(
            dot_q4_0_q8_0_scalar(&w40, &a0),
            dot_q4_0_q8_0(isa, &w40, &a0)
        ));
        assert!(close(
            dot_q8_0_q8_0_scalar(&w80, &a0),
            dot_q8_0_q8_0(isa, &w80, &a0)
        ));
        let y = rand_vec(n + 3, 2);
        let z = rand_vec(n + 3, 3);
        assert!(close(dot_f32_scalar(&y, &z), dot_f32(isa, &y, &z)));
    }

    #[test]
    fn q8_quantization_is_accurate() {
        let x = rand_vec(64, 5);
        let mut q = vec![
            BlockQ8_0 {
                d: f16::ZERO,
                qs: [0; 32]
            };
            2
        ];
        quantize_q8_0(Isa::detect(), &x, &mut q);
        for (i, v) in x.iter().enumerate() {
            let b = &q[i / 32];
            let r = f32::from(b.qs[i % 32]) * b.d.to_f32();
            assert!((r - v).abs() <= b.d.to_f32() * 0.5 + 1e-3, "{r} vs {v}");
        }
    }
}
