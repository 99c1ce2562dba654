//! aarch64 NEON kernels, the same functions as [`super::scalar`], in two
//! flavours that differ only in the 8-bit integer dot product:
//!
//! - [`Sdot`]: one `sdot` instruction (FEAT_DotProd, Cortex-A55/A76 and
//!   later: Raspberry Pi 5, most current ARM boards);
//! - [`Mull`]: plain NEON (`smull`/`smull2` to i16, `sadalp` into i32, as
//!   ggml does without dotprod: Cortex-A53/A72, Raspberry Pi 3 and 4).
//!
//! Every dot kernel is one `#[inline(always)]` body generic over the flavour
//! ([`Idot`]) and the number of activation rows `N`, with two entry points:
//! `name` (`#[target_feature(enable = "neon")]`) and `name_dot`
//! (`#[target_feature(enable = "neon,dotprod")]`). They are reached only
//! through the dispatch in [`super`] with [`super::Isa::Neon`] or
//! [`super::Isa::NeonDot`], whose tokens exist only after run-time detection.
//!
//! `vdotq_s32` is still unstable in `std::arch`, so `sdot` is written as
//! inline assembly (with `.arch_extension dotprod`, since the generic bodies
//! carry no target feature of their own).
//!
//! Per row, the `N`-row kernels do the same operations in the same order as
//! the single-row ones (even blocks into one accumulator, odd blocks into
//! another), so a row's result is bit for bit the same alone or in a group
//! of four.

use super::blocks::{
    BlockA8, BlockA8K, BlockA8S, BlockQ4_0, BlockQ4_1, BlockQ4K, BlockQ5_0, BlockQ5_1, BlockQ5K,
    BlockQ6K, BlockQ8_0, QK, QK_K,
};
use half::f16;
use std::arch::aarch64::*;
use std::arch::asm;

/// The 8-bit dot product of one kernel flavour.
trait Idot {
    /// `acc` plus the 16 products `a[i] * b[i]`, summed into the four i32
    /// lanes. Which lane holds which products differs between flavours:
    /// only the sum of the four lanes is defined.
    ///
    /// # Safety
    /// The CPU must support the flavour's instructions ([`Sdot`]:
    /// FEAT_DotProd).
    unsafe fn dot(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t;
}

/// Plain NEON: widening multiplies to i16, pairwise widening adds to i32.
struct Mull;

/// FEAT_DotProd: `sdot`, four products per i32 lane in one instruction.
struct Sdot;

impl Idot for Mull {
    #[inline(always)]
    unsafe fn dot(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
        // SAFETY: NEON is part of every aarch64 target shoal builds for.
        unsafe {
            // Each i16 holds one product (|p| <= 2^14): no overflow before
            // the pairwise widening add.
            let lo = vmull_s8(vget_low_s8(a), vget_low_s8(b));
            let hi = vmull_high_s8(a, b);
            vpadalq_s16(vpadalq_s16(acc, lo), hi)
        }
    }
}

impl Idot for Sdot {
    #[inline(always)]
    unsafe fn dot(mut acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
        // SAFETY: the caller guarantees FEAT_DotProd; registers only.
        unsafe {
            asm!(
                ".arch_extension dotprod",
                "sdot {0:v}.4s, {1:v}.16b, {2:v}.16b",
                inout(vreg) acc,
                in(vreg) a,
                in(vreg) b,
                options(pure, nomem, nostack, preserves_flags)
            );
        }
        acc
    }
}

/// An f16 as f32: one `fcvt` (base ARMv8 floating point, no FEAT_FP16).
#[inline(always)]
fn f16s(h: f16) -> f32 {
    let x = f32::from_bits(u32::from(h.to_bits()));
    let out: f32;
    // SAFETY: a register-to-register conversion every aarch64 CPU has.
    unsafe {
        asm!(
            "fcvt {0:s}, {1:h}",
            out(vreg) out,
            in(vreg) x,
            options(pure, nomem, nostack, preserves_flags)
        );
    }
    out
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
#[inline(always)]
unsafe fn at<'a, A, const N: usize>(a: &[&'a [A]; N], i: usize) -> [&'a A; N] {
    // SAFETY: caller keeps `i` in bounds.
    std::array::from_fn(|c| unsafe { a[c].get_unchecked(i) })
}

/// Four zero lanes.
#[inline(always)]
fn zero_f32() -> float32x4_t {
    // SAFETY: NEON is part of every aarch64 target shoal builds for.
    unsafe { vdupq_n_f32(0.0) }
}

/// The sum of the four lanes.
#[inline(always)]
fn hsum(v: float32x4_t) -> f32 {
    // SAFETY: NEON is part of every aarch64 target shoal builds for.
    unsafe { vaddvq_f32(v) }
}

/// The 32-quant dot product of the weights `x0` (quants 0..16) and `x1`
/// (16..32) with the 32 activation quants at `q`.
///
/// # Safety
/// `q` must point to 32 readable bytes; the CPU must support `D`.
#[inline(always)]
unsafe fn dot32<D: Idot>(x0: int8x16_t, x1: int8x16_t, q: *const i8) -> int32x4_t {
    // SAFETY: the caller passes 32 readable bytes and a CPU supporting `D`.
    unsafe {
        let y0 = vld1q_s8(q);
        let y1 = vld1q_s8(q.add(16));
        D::dot(D::dot(vdupq_n_s32(0), x0, y0), x1, y1)
    }
}

/// 16 packed bytes of nibbles at `p`: (low nibbles, high nibbles), i.e.
/// quants 0..16 and 16..32 of a 32-wide block.
///
/// # Safety
/// `p` must point to 16 readable bytes.
#[inline(always)]
unsafe fn nibbles(p: *const u8) -> (uint8x16_t, uint8x16_t) {
    // SAFETY: the caller passes 16 readable bytes.
    unsafe {
        let v = vld1q_u8(p);
        (vandq_u8(v, vdupq_n_u8(0x0f)), vshrq_n_u8::<4>(v))
    }
}

/// Source byte of each mask byte (bit `i` lives in byte `i / 8`).
static SEL_LO: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1];
static SEL_HI: [u8; 16] = [2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3];
/// The bit of each mask byte within its source byte.
static BIT: [u8; 16] = [1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128];

/// The 32 bits at `p` as byte masks (0xFF where bit `i` is set, else 0):
/// (bits 0..16, bits 16..32).
///
/// # Safety
/// `p` must point to 4 readable bytes.
#[inline(always)]
unsafe fn bit_masks(p: *const u8) -> (uint8x16_t, uint8x16_t) {
    // SAFETY: the caller passes 4 readable bytes; the tables hold 16 bytes.
    unsafe {
        let bits = std::ptr::read_unaligned(p.cast::<u32>());
        let v = vreinterpretq_u8_u32(vdupq_n_u32(bits));
        let bit = vld1q_u8(BIT.as_ptr());
        let lo = vqtbl1q_u8(v, vld1q_u8(SEL_LO.as_ptr()));
        let hi = vqtbl1q_u8(v, vld1q_u8(SEL_HI.as_ptr()));
        (vtstq_u8(lo, bit), vtstq_u8(hi, bit))
    }
}

/// One signed 32-weight block (`x0`, `x1`; scale `dw`) times the matching
/// [`BlockA8`] of each of `N` rows, into `acc`.
///
/// # Safety
/// The CPU must support `D`.
#[inline(always)]
unsafe fn sym_block<D: Idot, const N: usize>(
    x0: int8x16_t,
    x1: int8x16_t,
    dw: f32,
    ys: [&BlockA8; N],
    acc: &mut [float32x4_t; N],
) {
    for c in 0..N {
        let y = ys[c];
        // SAFETY: `qs` holds 32 bytes; the caller guarantees `D`.
        unsafe {
            let s = vcvtq_f32_s32(dot32::<D>(x0, x1, y.qs.as_ptr()));
            acc[c] = vfmaq_f32(acc[c], s, vdupq_n_f32(dw * y.d));
        }
    }
}

/// One unsigned 32-weight block (`x0`, `x1`; scale `dw`, minimum `mw`) times
/// the matching [`BlockA8S`] of each of `N` rows: the quant products into
/// `acc`, `mw * s_a` into `accm`.
///
/// # Safety
/// The CPU must support `D`.
#[inline(always)]
unsafe fn min_block<D: Idot, const N: usize>(
    x0: int8x16_t,
    x1: int8x16_t,
    dw: f32,
    mw: f32,
    ys: [&BlockA8S; N],
    acc: &mut [float32x4_t; N],
    accm: &mut [f32; N],
) {
    for c in 0..N {
        let y = ys[c];
        accm[c] += mw * y.s;
        // SAFETY: `qs` holds 32 bytes; the caller guarantees `D`.
        unsafe {
            let s = vcvtq_f32_s32(dot32::<D>(x0, x1, y.qs.as_ptr()));
            acc[c] = vfmaq_f32(acc[c], s, vdupq_n_f32(dw * y.d));
        }
    }
}

/// Bodies of the kernels over the symmetric 32-wide types (`w = d * q`):
/// `$quants(x)` gives the block's signed quants as two `int8x16_t`.
macro_rules! sym_kernel {
    ($body:ident, $w:ty, $quants:ident) => {
        /// # Safety
        /// The CPU must support `D`.
        #[inline(always)]
        unsafe fn $body<D: Idot, const N: usize>(w: &[$w], a: [&[BlockA8]; N]) -> [f32; N] {
            let n = common_len(w.len(), &a);
            let (mut acc0, mut acc1) = ([zero_f32(); N], [zero_f32(); N]);
            let step = |i: usize, acc: &mut [float32x4_t; N]| {
                // SAFETY: `i < n`; the quant loads stay inside the block;
                // the caller guarantees `D`.
                unsafe {
                    let x = w.get_unchecked(i);
                    let (x0, x1) = $quants(x);
                    sym_block::<D, N>(x0, x1, f16s(x.d), at(&a, i), acc);
                }
            };
            pairs(n, |i| step(i, &mut acc0), |i| step(i, &mut acc1));
            // SAFETY: NEON is part of every aarch64 target shoal builds for.
            std::array::from_fn(|c| hsum(unsafe { vaddq_f32(acc0[c], acc1[c]) }))
        }
    };
}

/// Bodies of the kernels over the 32-wide types with a minimum
/// (`w = d * q + m`).
macro_rules! min_kernel {
    ($body:ident, $w:ty, $quants:ident) => {
        /// # Safety
        /// The CPU must support `D`.
        #[inline(always)]
        unsafe fn $body<D: Idot, const N: usize>(w: &[$w], a: [&[BlockA8S]; N]) -> [f32; N] {
            let n = common_len(w.len(), &a);
            let (mut acc0, mut acc1) = ([zero_f32(); N], [zero_f32(); N]);
            let (mut m0, mut m1) = ([0f32; N], [0f32; N]);
            let step = |i: usize, acc: &mut [float32x4_t; N], accm: &mut [f32; N]| {
                // SAFETY: `i < n`; the quant loads stay inside the block;
                // the caller guarantees `D`.
                unsafe {
                    let x = w.get_unchecked(i);
                    let (x0, x1) = $quants(x);
                    let (dw, mw) = (f16s(x.d), f16s(x.m));
                    min_block::<D, N>(x0, x1, dw, mw, at(&a, i), acc, accm);
                }
            };
            pairs(
                n,
                |i| step(i, &mut acc0, &mut m0),
                |i| step(i, &mut acc1, &mut m1),
            );
            std::array::from_fn(|c| {
                // SAFETY: NEON is part of every aarch64 target shoal builds for.
                hsum(unsafe { vaddq_f32(acc0[c], acc1[c]) }) + (m0[c] + m1[c])
            })
        }
    };
}

/// Q4_0 quants minus 8.
///
#[inline(always)]
fn q4_0_quants(x: &BlockQ4_0) -> (int8x16_t, int8x16_t) {
    // SAFETY: `qs` holds 16 bytes.
    unsafe {
        let (lo, hi) = nibbles(x.qs.as_ptr());
        let eight = vdupq_n_s8(8);
        (
            vsubq_s8(vreinterpretq_s8_u8(lo), eight),
            vsubq_s8(vreinterpretq_s8_u8(hi), eight),
        )
    }
}

/// Q8_0 quants as they are.
///
#[inline(always)]
fn q8_0_quants(x: &BlockQ8_0) -> (int8x16_t, int8x16_t) {
    // SAFETY: `qs` holds 32 bytes.
    unsafe { (vld1q_s8(x.qs.as_ptr()), vld1q_s8(x.qs.as_ptr().add(16))) }
}

/// Q5_0 quants minus 16: the nibble where the fifth bit is set, else the
/// nibble with the top four bits set (`q - 16` as i8).
///
#[inline(always)]
fn q5_0_quants(x: &BlockQ5_0) -> (int8x16_t, int8x16_t) {
    // SAFETY: `qs` holds 16 bytes, `qh` 4.
    unsafe {
        let (lo, hi) = nibbles(x.qs.as_ptr());
        let (b0, b1) = bit_masks(x.qh.as_ptr());
        let top = vdupq_n_u8(0xf0);
        (
            vreinterpretq_s8_u8(vorrq_u8(lo, vbicq_u8(top, b0))),
            vreinterpretq_s8_u8(vorrq_u8(hi, vbicq_u8(top, b1))),
        )
    }
}

/// Q4_1 quants (0..16).
///
#[inline(always)]
fn q4_1_quants(x: &BlockQ4_1) -> (int8x16_t, int8x16_t) {
    // SAFETY: `qs` holds 16 bytes.
    unsafe {
        let (lo, hi) = nibbles(x.qs.as_ptr());
        (vreinterpretq_s8_u8(lo), vreinterpretq_s8_u8(hi))
    }
}

/// Q5_1 quants (0..32).
///
#[inline(always)]
fn q5_1_quants(x: &BlockQ5_1) -> (int8x16_t, int8x16_t) {
    // SAFETY: `qs` holds 16 bytes, `qh` 4.
    unsafe {
        let (lo, hi) = nibbles(x.qs.as_ptr());
        let (b0, b1) = bit_masks(x.qh.as_ptr());
        let five = vdupq_n_u8(0x10);
        (
            vreinterpretq_s8_u8(vorrq_u8(lo, vandq_u8(b0, five))),
            vreinterpretq_s8_u8(vorrq_u8(hi, vandq_u8(b1, five))),
        )
    }
}

sym_kernel!(q4_0_body, BlockQ4_0, q4_0_quants);
sym_kernel!(q8_0_body, BlockQ8_0, q8_0_quants);
sym_kernel!(q5_0_body, BlockQ5_0, q5_0_quants);
min_kernel!(q4_1_body, BlockQ4_1, q4_1_quants);
min_kernel!(q5_1_body, BlockQ5_1, q5_1_quants);

/// The 8 scales and 8 minimums of a Q4_K/Q5_K block as bytes (see
/// `scale_min_k4`), unpacked with 32-bit masks.
#[inline(always)]
fn k4_scales(q: &[u8; 12]) -> ([u8; 8], u64) {
    let w = |k: usize| u32::from_le_bytes([q[4 * k], q[4 * k + 1], q[4 * k + 2], q[4 * k + 3]]);
    let (u0, u1, u2) = (w(0), w(1), w(2));
    let (low6, low4, top2) = (0x3f3f_3f3f, 0x0f0f_0f0f, 0x0303_0303);
    let sc_lo = u0 & low6;
    let sc_hi = (u2 & low4) | (((u0 >> 6) & top2) << 4);
    let mn_lo = u1 & low6;
    let mn_hi = ((u2 >> 4) & low4) | (((u1 >> 6) & top2) << 4);
    (
        (u64::from(sc_lo) | (u64::from(sc_hi) << 32)).to_le_bytes(),
        u64::from(mn_lo) | (u64::from(mn_hi) << 32),
    )
}

/// `Σ_j m_j · (bsum_2j + bsum_2j+1)`: the Q4_K/Q5_K minimum term of one
/// block (minimums as 8 bytes in `mins`).
#[inline(always)]
fn k4_min_sum(mins: u64, y: &BlockA8K) -> i32 {
    // SAFETY: `bsums` holds 16 i16; NEON is baseline.
    unsafe {
        let b0 = vld1q_s16(y.bsums.as_ptr());
        let b1 = vld1q_s16(y.bsums.as_ptr().add(8));
        // Sums per 32-quant sub-block (|s| <= 32 * 127, fits i16).
        let s = vpaddq_s16(b0, b1);
        let m = vreinterpretq_s16_u16(vmovl_u8(vcreate_u8(mins)));
        let p = vaddq_s32(
            vmull_s16(vget_low_s16(m), vget_low_s16(s)),
            vmull_high_s16(m, s),
        );
        vaddvq_s32(p)
    }
}

/// Q4_K/Q5_K body: `$quants(x, g)` gives group `g`'s 64 quants as
/// (low half 0..16, 16..32, high half 0..16, 16..32) and `$setup(x)` runs
/// once per block before the groups (state for `$quants`).
macro_rules! k4_kernel {
    ($body:ident, $w:ty, |$x:ident| $setup:expr, |$st:ident, $g:ident| $quants:expr) => {
        /// # Safety
        /// The CPU must support `D`.
        #[inline(always)]
        unsafe fn $body<D: Idot, const N: usize>(w: &[$w], a: [&[BlockA8K]; N]) -> [f32; N] {
            let n = common_len(w.len(), &a);
            let mut acc = [zero_f32(); N];
            let mut accm = [0f32; N];
            for i in 0..n {
                // SAFETY: `i < n`; every load stays inside the weight block
                // and the 256 activation quants; the caller guarantees `D`.
                unsafe {
                    let $x = w.get_unchecked(i);
                    let ys = at(&a, i);
                    let (sc, mn) = k4_scales(&$x.scales);
                    let dmin = f16s($x.dmin);
                    for c in 0..N {
                        accm[c] += dmin * ys[c].d * k4_min_sum(mn, ys[c]) as f32;
                    }
                    #[allow(unused_mut)]
                    let mut $st = $setup;
                    let mut sumi = [vdupq_n_s32(0); N];
                    for $g in 0..4 {
                        let (l0, l1, h0, h1) = $quants;
                        for c in 0..N {
                            let q = ys[c].qs.as_ptr().add(64 * $g);
                            let lo = dot32::<D>(l0, l1, q);
                            let hi = dot32::<D>(h0, h1, q.add(32));
                            sumi[c] = vmlaq_n_s32(sumi[c], lo, i32::from(sc[2 * $g]));
                            sumi[c] = vmlaq_n_s32(sumi[c], hi, i32::from(sc[2 * $g + 1]));
                        }
                    }
                    let d = f16s($x.d);
                    for c in 0..N {
                        let dc = vdupq_n_f32(d * ys[c].d);
                        acc[c] = vfmaq_f32(acc[c], vcvtq_f32_s32(sumi[c]), dc);
                    }
                }
            }
            std::array::from_fn(|c| hsum(acc[c]) - accm[c])
        }
    };
}

/// Group `g`'s nibbles of a Q4_K/Q5_K block as signed bytes: (low nibbles
/// of bytes 0..16, 16..32, high nibbles of 0..16, 16..32).
///
/// # Safety
/// `g < 4`.
#[inline(always)]
unsafe fn k4_nibbles(qs: &[u8; 128], g: usize) -> [uint8x16_t; 4] {
    // SAFETY: `32 * g + 32 <= 128`.
    unsafe {
        let m4 = vdupq_n_u8(0x0f);
        let q0 = vld1q_u8(qs.as_ptr().add(32 * g));
        let q1 = vld1q_u8(qs.as_ptr().add(32 * g + 16));
        [
            vandq_u8(q0, m4),
            vandq_u8(q1, m4),
            vshrq_n_u8::<4>(q0),
            vshrq_n_u8::<4>(q1),
        ]
    }
}

/// Reinterprets four quant vectors (all below 128) as signed.
#[inline(always)]
fn signed4(v: [uint8x16_t; 4]) -> (int8x16_t, int8x16_t, int8x16_t, int8x16_t) {
    // SAFETY: NEON is part of every aarch64 target shoal builds for.
    unsafe {
        (
            vreinterpretq_s8_u8(v[0]),
            vreinterpretq_s8_u8(v[1]),
            vreinterpretq_s8_u8(v[2]),
            vreinterpretq_s8_u8(v[3]),
        )
    }
}

k4_kernel!(q4_k_body, BlockQ4K, |x| (), |_st, g| signed4(k4_nibbles(
    &x.qs, g
)));

k4_kernel!(
    q5_k_body,
    BlockQ5K,
    |x| (vld1q_u8(x.qh.as_ptr()), vld1q_u8(x.qh.as_ptr().add(16))),
    |st, g| {
        // Bits 2g and 2g + 1 of qh (shifted down to bits 0 and 1 of `st`)
        // to bit 4.
        let [l0, l1, h0, h1] = k4_nibbles(&x.qs, g);
        let b5 = vdupq_n_u8(0x10);
        let (q0, q1) = st;
        st = (vshrq_n_u8::<2>(q0), vshrq_n_u8::<2>(q1));
        signed4([
            vorrq_u8(l0, vandq_u8(vshlq_n_u8::<4>(q0), b5)),
            vorrq_u8(l1, vandq_u8(vshlq_n_u8::<4>(q1), b5)),
            vorrq_u8(h0, vandq_u8(vshlq_n_u8::<3>(q0), b5)),
            vorrq_u8(h1, vandq_u8(vshlq_n_u8::<3>(q1), b5)),
        ])
    }
);

/// Q6_K weights · `N` rows: quants `q - 32` as i8, one i8 scale per 16.
///
/// # Safety
/// The CPU must support `D`.
#[inline(always)]
unsafe fn q6_k_body<D: Idot, const N: usize>(w: &[BlockQ6K], a: [&[BlockA8K]; N]) -> [f32; N] {
    let n = common_len(w.len(), &a);
    let mut acc = [zero_f32(); N];
    for i in 0..n {
        // SAFETY: `i < n`; every load stays inside the 210-byte weight block
        // and the 256 activation quants; the caller guarantees `D`.
        unsafe {
            let x = w.get_unchecked(i);
            let ys = at(&a, i);
            let m4 = vdupq_n_u8(0x0f);
            let m2 = vdupq_n_u8(0x30);
            let off = vdupq_n_s8(32);
            let mut sumi = [vdupq_n_s32(0); N];
            for h in 0..2 {
                let ql = x.ql.as_ptr().add(64 * h);
                let qh = x.qh.as_ptr().add(32 * h);
                for half in 0..2 {
                    // Lanes 16 * half .. 16 * half + 16 of the four quarters.
                    let l0 = vld1q_u8(ql.add(16 * half));
                    let l1 = vld1q_u8(ql.add(32 + 16 * half));
                    let hb = vld1q_u8(qh.add(16 * half));
                    let q = [
                        vorrq_u8(vandq_u8(l0, m4), vandq_u8(vshlq_n_u8::<4>(hb), m2)),
                        vorrq_u8(vandq_u8(l1, m4), vandq_u8(vshlq_n_u8::<2>(hb), m2)),
                        vorrq_u8(vshrq_n_u8::<4>(l0), vandq_u8(hb, m2)),
                        vorrq_u8(vshrq_n_u8::<4>(l1), vandq_u8(vshrq_n_u8::<2>(hb), m2)),
                    ];
                    for (k, qk) in q.into_iter().enumerate() {
                        let qk = vsubq_s8(vreinterpretq_s8_u8(qk), off);
                        // Quants 128h + 32k + 16half .. +16: scale index /16.
                        let base = 128 * h + 32 * k + 16 * half;
                        let sc = i32::from(x.scales[base / 16]);
                        for c in 0..N {
                            let y = vld1q_s8(ys[c].qs.as_ptr().add(base));
                            let p = D::dot(vdupq_n_s32(0), qk, y);
                            sumi[c] = vmlaq_n_s32(sumi[c], p, sc);
                        }
                    }
                }
            }
            let d = f16s(x.d);
            for c in 0..N {
                let dc = vdupq_n_f32(d * ys[c].d);
                acc[c] = vfmaq_f32(acc[c], vcvtq_f32_s32(sumi[c]), dc);
            }
        }
    }
    std::array::from_fn(|c| hsum(acc[c]))
}

/// The two entry points of a generic body: plain NEON (`$plain`) and
/// NEON + dotprod (`$dot`).
macro_rules! entries {
    ($(#[$doc:meta])* $plain:ident, $dot:ident, $body:ident, $w:ty, $a:ty) => {
        $(#[$doc])*
        ///
        /// # Safety
        /// The CPU must support NEON (guaranteed when called through
        /// [`super`]'s dispatch with [`super::Isa::Neon`]).
        #[target_feature(enable = "neon")]
        pub(super) unsafe fn $plain<const N: usize>(w: &[$w], a: [&[$a]; N]) -> [f32; N] {
            // SAFETY: `Mull` needs NEON only.
            unsafe { $body::<Mull, N>(w, a) }
        }

        $(#[$doc])*
        /// With `sdot`.
        ///
        /// # Safety
        /// The CPU must support NEON and FEAT_DotProd (guaranteed when called
        /// through [`super`]'s dispatch with [`super::Isa::NeonDot`]).
        #[target_feature(enable = "neon,dotprod")]
        pub(super) unsafe fn $dot<const N: usize>(w: &[$w], a: [&[$a]; N]) -> [f32; N] {
            // SAFETY: the caller guarantees FEAT_DotProd, all `Sdot` needs.
            unsafe { $body::<Sdot, N>(w, a) }
        }
    };
}

entries!(
    /// Q4_0 weights · `N` rows of 8-bit activations (see [`super::dot_q4_0_a8`]).
    dot_q4_0_a8, dot_q4_0_a8_dot, q4_0_body, BlockQ4_0, BlockA8
);
entries!(
    /// Q8_0 weights · `N` rows of 8-bit activations (see [`super::dot_q8_0_a8`]).
    dot_q8_0_a8, dot_q8_0_a8_dot, q8_0_body, BlockQ8_0, BlockA8
);
entries!(
    /// Q5_0 weights · `N` rows of 8-bit activations (see [`super::dot_q5_0_a8`]).
    dot_q5_0_a8, dot_q5_0_a8_dot, q5_0_body, BlockQ5_0, BlockA8
);
entries!(
    /// Q4_1 weights · `N` rows of 8-bit activations with sums (see
    /// [`super::dot_q4_1_a8s`]).
    dot_q4_1_a8s, dot_q4_1_a8s_dot, q4_1_body, BlockQ4_1, BlockA8S
);
entries!(
    /// Q5_1 weights · `N` rows of 8-bit activations with sums (see
    /// [`super::dot_q5_1_a8s`]).
    dot_q5_1_a8s, dot_q5_1_a8s_dot, q5_1_body, BlockQ5_1, BlockA8S
);
entries!(
    /// Q4_K weights · `N` rows of [`BlockA8K`] (see [`super::dot_q4_k_a8k`]).
    dot_q4_k_a8k, dot_q4_k_a8k_dot, q4_k_body, BlockQ4K, BlockA8K
);
entries!(
    /// Q5_K weights · `N` rows of [`BlockA8K`] (see [`super::dot_q5_k_a8k`]).
    dot_q5_k_a8k, dot_q5_k_a8k_dot, q5_k_body, BlockQ5K, BlockA8K
);
entries!(
    /// Q6_K weights · `N` rows of [`BlockA8K`] (see [`super::dot_q6_k_a8k`]).
    dot_q6_k_a8k, dot_q6_k_a8k_dot, q6_k_body, BlockQ6K, BlockA8K
);

/// The largest |x| of `v` (NaN ignored, as `f32::max` in the scalar path).
#[inline(always)]
fn amax(v: &[float32x4_t]) -> f32 {
    // SAFETY: NEON is part of every aarch64 target shoal builds for.
    unsafe {
        let m = v
            .iter()
            .fold(vdupq_n_f32(0.0), |m, &x| vmaxnmq_f32(m, vabsq_f32(x)));
        vmaxnmvq_f32(m)
    }
}

/// 16 floats at `x` times `mul`, rounded half away from zero (as
/// `f32::round`) and saturated to i8 (as `as i8`).
///
/// # Safety
/// `x` must point to 16 readable floats.
#[inline(always)]
unsafe fn round16(x: *const f32, mul: f32) -> int8x16_t {
    // SAFETY: the caller passes 16 readable floats.
    unsafe {
        let r = |k: usize| vcvtaq_s32_f32(vmulq_n_f32(vld1q_f32(x.add(4 * k)), mul));
        let a = vcombine_s16(vqmovn_s32(r(0)), vqmovn_s32(r(1)));
        let b = vcombine_s16(vqmovn_s32(r(2)), vqmovn_s32(r(3)));
        vcombine_s8(vqmovn_s16(a), vqmovn_s16(b))
    }
}

/// The 32 floats of `xs` as 8 vectors.
///
/// # Safety
/// `xs` must hold at least 32 floats.
#[inline(always)]
unsafe fn load32(xs: &[f32]) -> [float32x4_t; 8] {
    // SAFETY: the caller passes 32 floats.
    std::array::from_fn(|k| unsafe { vld1q_f32(xs.as_ptr().add(4 * k)) })
}

/// Quantizes a row to [`BlockA8`] (see [`super::quantize_a8`]); bit for
/// bit the scalar result.
///
/// # Safety
/// The CPU must support NEON (guaranteed when called through [`super`]'s
/// dispatch with [`super::Isa::Neon`] or [`super::Isa::NeonDot`]).
#[target_feature(enable = "neon")]
pub(super) unsafe fn quantize_a8(x: &[f32], out: &mut [BlockA8]) {
    for (b, xs) in out.iter_mut().zip(x.chunks_exact(QK)) {
        // SAFETY: chunks are 32 floats; `qs` holds 32 bytes.
        unsafe {
            let d = amax(&load32(xs)) / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            b.d = d;
            vst1q_s8(b.qs.as_mut_ptr(), round16(xs.as_ptr(), id));
            vst1q_s8(b.qs.as_mut_ptr().add(16), round16(xs.as_ptr().add(16), id));
        }
    }
}

/// Quantizes a row to [`BlockA8S`] (see [`super::quantize_a8s`]); bit for
/// bit the scalar result.
///
/// # Safety
/// The CPU must support NEON (guaranteed when called through [`super`]'s
/// dispatch with [`super::Isa::Neon`] or [`super::Isa::NeonDot`]).
#[target_feature(enable = "neon")]
pub(super) unsafe fn quantize_a8s(x: &[f32], out: &mut [BlockA8S]) {
    for (b, xs) in out.iter_mut().zip(x.chunks_exact(QK)) {
        // SAFETY: chunks are 32 floats; `qs` holds 32 bytes.
        unsafe {
            let d = amax(&load32(xs)) / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            b.d = d;
            let q0 = round16(xs.as_ptr(), id);
            let q1 = round16(xs.as_ptr().add(16), id);
            vst1q_s8(b.qs.as_mut_ptr(), q0);
            vst1q_s8(b.qs.as_mut_ptr().add(16), q1);
            let sum = i32::from(vaddlvq_s8(q0)) + i32::from(vaddlvq_s8(q1));
            b.s = sum as f32 * d;
        }
    }
}

/// Quantizes a row to [`BlockA8K`] (see [`super::quantize_a8k`]); bit for
/// bit the scalar result.
///
/// # Safety
/// The CPU must support NEON (guaranteed when called through [`super`]'s
/// dispatch with [`super::Isa::Neon`] or [`super::Isa::NeonDot`]).
#[target_feature(enable = "neon")]
pub(super) unsafe fn quantize_a8k(x: &[f32], out: &mut [BlockA8K]) {
    for (b, xs) in out.iter_mut().zip(x.chunks_exact(QK_K)) {
        // SAFETY: chunks are 256 floats; `qs` holds 256 bytes.
        unsafe {
            let v: [float32x4_t; QK_K / 4] =
                std::array::from_fn(|k| vld1q_f32(xs.as_ptr().add(4 * k)));
            let m = amax(&v);
            let id = if m != 0.0 { 127.0 / m } else { 0.0 };
            b.d = m / 127.0;
            for g in 0..QK_K / 16 {
                let q = round16(xs.as_ptr().add(16 * g), id);
                vst1q_s8(b.qs.as_mut_ptr().add(16 * g), q);
                b.bsums[g] = vaddlvq_s8(q);
            }
        }
    }
}

/// f32 · f32 over the common length (see [`super::dot_f32`]).
///
/// # Safety
/// The CPU must support NEON (guaranteed when called through [`super`]'s
/// dispatch with [`super::Isa::Neon`] or [`super::Isa::NeonDot`]).
#[target_feature(enable = "neon")]
pub(super) unsafe fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let mut acc = [vdupq_n_f32(0.0); 4];
    let mut i = 0;
    // SAFETY: every load reads 4 floats below `n`.
    unsafe {
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        while i + 16 <= n {
            for (k, s) in acc.iter_mut().enumerate() {
                let j = i + 4 * k;
                *s = vfmaq_f32(*s, vld1q_f32(pa.add(j)), vld1q_f32(pb.add(j)));
            }
            i += 16;
        }
        while i + 4 <= n {
            acc[0] = vfmaq_f32(acc[0], vld1q_f32(pa.add(i)), vld1q_f32(pb.add(i)));
            i += 4;
        }
    }
    let mut s = vaddvq_f32(vaddq_f32(
        vaddq_f32(acc[0], acc[1]),
        vaddq_f32(acc[2], acc[3]),
    ));
    while i < n {
        s += a[i] * b[i];
        i += 1;
    }
    s
}

/// `y += alpha * x` over the common length (see [`super::axpy`]); one fused
/// multiply-add per element, bit for bit the scalar reference.
///
/// # Safety
/// The CPU must support NEON (guaranteed when called through [`super`]'s
/// dispatch with [`super::Isa::Neon`] or [`super::Isa::NeonDot`]).
#[target_feature(enable = "neon")]
pub(super) unsafe fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
    let n = y.len().min(x.len());
    let mut i = 0;
    // SAFETY: every load and store touches 4 floats below `n`.
    unsafe {
        let va = vdupq_n_f32(alpha);
        while i + 4 <= n {
            let p = y.as_mut_ptr().add(i);
            vst1q_f32(p, vfmaq_f32(vld1q_f32(p), vld1q_f32(x.as_ptr().add(i)), va));
            i += 4;
        }
    }
    while i < n {
        y[i] = alpha.mul_add(x[i], y[i]);
        i += 1;
    }
}
