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

/// Activation block for Q4_0/Q8_0 weights: 32 i8 with an f32 scale.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub(crate) struct BlockA8 {
    pub d: f32,
    pub qs: [i8; QK],
}

/// Activation block for Q4_1 weights: 32 i8, f32 scale and `s = d * sum(qs)`.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub(crate) struct BlockA8S {
    pub d: f32,
    pub s: f32,
    pub qs: [i8; QK],
}

const _: () = assert!(std::mem::size_of::<BlockA8>() == 36);
const _: () = assert!(std::mem::size_of::<BlockA8S>() == 40);
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
// SAFETY: repr(C) aggregates of f32 and i8.
unsafe impl Plain for BlockA8 {}
unsafe impl Plain for BlockA8S {}
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

/// Quantizes a row to [`BlockA8`] with the best kernel for `isa`.
pub(crate) fn quantize_a8(isa: Isa, x: &[f32], out: &mut [BlockA8]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` is only produced when the CPU has AVX2/FMA/F16C.
        Isa::Avx2 => unsafe { avx2::quantize_a8(x, out) },
        _ => quantize_a8_scalar(x, out),
    }
}

/// Quantizes a row to [`BlockA8S`] with the best kernel for `isa`.
pub(crate) fn quantize_a8s(isa: Isa, x: &[f32], out: &mut [BlockA8S]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: see `quantize_a8`.
        Isa::Avx2 => unsafe { avx2::quantize_a8s(x, out) },
        _ => quantize_a8s_scalar(x, out),
    }
}

/// Q4_0 weights · 8-bit activations.
pub(crate) fn dot_q4_0_a8(isa: Isa, w: &[BlockQ4_0], a: &[BlockA8]) -> f32 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: see `quantize_a8`.
        Isa::Avx2 => unsafe { avx2::dot_q4_0_a8(w, a) },
        _ => dot_q4_0_a8_scalar(w, a),
    }
}

/// Q4_1 weights · 8-bit activations with sums.
pub(crate) fn dot_q4_1_a8s(isa: Isa, w: &[BlockQ4_1], a: &[BlockA8S]) -> f32 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: see `quantize_a8`.
        Isa::Avx2 => unsafe { avx2::dot_q4_1_a8s(w, a) },
        _ => dot_q4_1_a8s_scalar(w, a),
    }
}

/// One Q4_1 weight row · four activation rows (the weights are unpacked once).
pub(crate) fn dot_q4_1_a8s_x4(isa: Isa, w: &[BlockQ4_1], a: [&[BlockA8S]; 4]) -> [f32; 4] {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: see `quantize_a8`.
        Isa::Avx2 => unsafe { avx2::dot_q4_1_a8s_x4(w, a) },
        _ => a.map(|a| dot_q4_1_a8s_scalar(w, a)),
    }
}

/// Q8_0 weights · 8-bit activations.
pub(crate) fn dot_q8_0_a8(isa: Isa, w: &[BlockQ8_0], a: &[BlockA8]) -> f32 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: see `quantize_a8`.
        Isa::Avx2 => unsafe { avx2::dot_q8_0_a8(w, a) },
        _ => dot_q8_0_a8_scalar(w, a),
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
    use super::{BlockA8, BlockA8S, BlockQ4_0, BlockQ4_1, BlockQ8_0, BlockQ8_1, QK};
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

    /// The two f16 at `p` as f32 lanes 0 and 1.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn f16x2(p: *const u8) -> __m128 {
        // SAFETY: caller passes 4 readable bytes.
        let bits = unsafe { std::ptr::read_unaligned(p.cast::<i32>()) };
        _mm_cvtph_ps(_mm_cvtsi32_si128(bits))
    }

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
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn scale(w: *const u8, da: f32) -> __m256 {
        // SAFETY: caller passes 2 readable bytes.
        let bits = unsafe { std::ptr::read_unaligned(w.cast::<u16>()) };
        let dw = _mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits)));
        _mm256_broadcastss_ps(_mm_mul_ss(dw, _mm_set_ss(da)))
    }

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
        let za = BlockA8 {
            d: 0.0,
            qs: [0; 32],
        };
        let zs = BlockA8S {
            d: 0.0,
            s: 0.0,
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
        let mut c0 = vec![za; n / 32];
        let mut d0 = vec![za; n / 32];
        quantize_a8_scalar(&x, &mut c0);
        quantize_a8(isa, &x, &mut d0);
        for (p, q) in c0.iter().zip(&d0) {
            assert_eq!(p.qs, q.qs);
            assert!((p.d - q.d).abs() <= p.d * 1e-6);
        }
        let mut c1 = vec![zs; n / 32];
        let mut d1 = vec![zs; n / 32];
        quantize_a8s_scalar(&x, &mut c1);
        quantize_a8s(isa, &x, &mut d1);
        for (p, q) in c1.iter().zip(&d1) {
            assert_eq!(p.qs, q.qs);
            assert!(
                (p.s - q.s).abs() <= p.s.abs() * 1e-5 + 1e-6,
                "{} {}",
                p.s,
                q.s
            );
        }
        // Random weight blocks; odd block counts exercise the tails.
        let mut s = 7u64;
        let mut byte = || (lcg(&mut s) * 127.0) as i8;
        for nb in [n / 32, n / 32 - 1] {
            let w41: Vec<BlockQ4_1> = (0..nb)
                .map(|_| BlockQ4_1 {
                    d: f16::from_f32(0.01),
                    m: f16::from_f32(-0.05),
                    qs: std::array::from_fn(|_| byte() as u8),
                })
                .collect();
            let w40: Vec<BlockQ4_0> = w41.iter().map(|b| BlockQ4_0 { d: b.d, qs: b.qs }).collect();
            let w80: Vec<BlockQ8_0> = (0..nb)
                .map(|_| BlockQ8_0 {
                    d: f16::from_f32(0.02),
                    qs: std::array::from_fn(|_| byte()),
                })
                .collect();
            let close = |a: f32, b: f32| (a - b).abs() <= 1e-4 * (1.0 + a.abs());
            let (c0, c1) = (&c0[..nb], &c1[..nb]);
            assert!(close(
                dot_q4_1_a8s_scalar(&w41, c1),
                dot_q4_1_a8s(isa, &w41, c1)
            ));
            assert!(close(
                dot_q4_0_a8_scalar(&w40, c0),
                dot_q4_0_a8(isa, &w40, c0)
            ));
            let d1r: Vec<BlockA8S> = d1[..nb].iter().rev().copied().collect();
            let four = dot_q4_1_a8s_x4(isa, &w41, [c1, &d1r, c1, &d1r]);
            assert!(close(four[0], dot_q4_1_a8s_scalar(&w41, c1)));
            assert!(close(four[1], dot_q4_1_a8s_scalar(&w41, &d1r)));
            assert_eq!(four[0], four[2]);
            // Bit for bit the single-row kernel: a token's matmul result
            // must not depend on its place in the batch.
            for (k, r) in [c1, &d1r[..], c1, &d1r[..]].into_iter().enumerate() {
                assert_eq!(
                    four[k].to_bits(),
                    dot_q4_1_a8s(isa, &w41, r).to_bits(),
                    "x4 lane {k}, {nb} blocks"
                );
            }
            assert!(close(
                dot_q8_0_a8_scalar(&w80, c0),
                dot_q8_0_a8(isa, &w80, c0)
            ));
            // The integer dot against the exact dequantized product.
            let mut exact = 0f32;
            for (wb, ab) in w41.iter().zip(c1) {
                for j in 0..16 {
                    let lo = f32::from(wb.qs[j] & 15) * wb.d.to_f32() + wb.m.to_f32();
                    let hi = f32::from(wb.qs[j] >> 4) * wb.d.to_f32() + wb.m.to_f32();
                    exact += lo * f32::from(ab.qs[j]) * ab.d + hi * f32::from(ab.qs[j + 16]) * ab.d;
                }
            }
            assert!(close(exact, dot_q4_1_a8s(isa, &w41, c1)), "{exact}");
        }
        let y = rand_vec(n + 3, 2);
        let z = rand_vec(n + 3, 3);
        let close = |a: f32, b: f32| (a - b).abs() <= 1e-3 * (1.0 + a.abs());
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

#[cfg(test)]
mod speed {
    use super::*;

    /// `cargo test --release --lib kernels::speed -- --ignored --nocapture`
    #[test]
    #[ignore = "timing probe, not a test"]
    fn q4_1_throughput() {
        let isa = Isa::detect();
        let nb = 18; // a 576-wide row
        let acts = vec![
            BlockA8S {
                d: 0.1,
                s: 1.0,
                qs: [3; 32]
            };
            nb
        ];
        for total_mb in [1usize, 96] {
            let rows = total_mb * (1 << 20) / (nb * 20);
            let w = vec![
                BlockQ4_1 {
                    d: f16::from_f32(0.01),
                    m: f16::from_f32(0.02),
                    qs: [0x5a; 16]
                };
                rows * nb
            ];
            let mut s = 0f32;
            let cpu = || {
                let mut ts = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                };
                // SAFETY: valid out-pointer.
                unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
                ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
            };
            let t = cpu();
            let reps = 96 / total_mb;
            for _ in 0..reps {
                for r in w.chunks_exact(nb) {
                    s += dot_q4_1_a8s(isa, r, &acts);
                }
            }
            let dt = cpu() - t;
            let blocks = (reps * rows * nb) as f64;
            eprintln!(
                "{total_mb} MiB: {:.2} ns/block, {:.2} GB/s ({s})",
                dt * 1e9 / blocks,
                blocks * 20.0 / dt / 1e9
            );
        }
    }
}
