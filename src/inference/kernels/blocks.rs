//! GGUF block types (viewed in place over the memory mapping), the 8-bit
//! activation blocks they are multiplied with, and the [`Plain`] views that
//! turn mapped bytes into block slices without copying.

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

/// Elements per block of the K-quant ("super-block") types.
pub(crate) const QK_K: usize = 256;

/// Q5_0: 32 weights as 5-bit values with one scale, `w = d * (q - 16)`;
/// bit `i` of `qh` is the fifth bit of weight `i`.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub(crate) struct BlockQ5_0 {
    pub d: f16,
    pub qh: [u8; 4],
    pub qs: [u8; QK / 2],
}

/// Q5_1: 32 weights as 5-bit values with scale and minimum, `w = d * q + m`.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub(crate) struct BlockQ5_1 {
    pub d: f16,
    pub m: f16,
    pub qh: [u8; 4],
    pub qs: [u8; QK / 2],
}

/// Q4_K: 256 weights in 8 sub-blocks of 32, each with a 6-bit scale and a
/// 6-bit minimum packed in `scales` (see `scale_min_k4`):
/// `w = d * sc * q - dmin * m`. `qs` holds 4 groups of 32 bytes; group `j`'s
/// low nibbles are weights `64j..64j+32`, its high nibbles `64j+32..64j+64`.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub(crate) struct BlockQ4K {
    pub d: f16,
    pub dmin: f16,
    pub scales: [u8; 12],
    pub qs: [u8; QK_K / 2],
}

/// Q5_K: Q4_K plus a fifth bit per weight: bit `2j` of `qh[l]` for weight
/// `64j + l`, bit `2j + 1` for weight `64j + 32 + l`.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub(crate) struct BlockQ5K {
    pub d: f16,
    pub dmin: f16,
    pub scales: [u8; 12],
    pub qh: [u8; QK_K / 8],
    pub qs: [u8; QK_K / 2],
}

/// Q6_K: 256 weights as 6-bit values (4 low bits in `ql`, 2 high bits in
/// `qh`) in 16 sub-blocks of 16 with i8 scales, `w = d * sc * (q - 32)`.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub(crate) struct BlockQ6K {
    pub ql: [u8; QK_K / 2],
    pub qh: [u8; QK_K / 4],
    pub scales: [i8; QK_K / 16],
    pub d: f16,
}

/// Q2_K: 256 weights as 2-bit values in 16 sub-blocks of 16; each byte of
/// `scales` holds a sub-block's 4-bit scale (low nibble) and 4-bit minimum
/// (high nibble): `w = d * sc * q - dmin * m`. Weight `128h + 32k + l`
/// (`h < 2`, `k < 4`, `l < 32`) is bits `2k..2k+2` of `qs[32h + l]`.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub(crate) struct BlockQ2K {
    pub scales: [u8; QK_K / 16],
    pub qs: [u8; QK_K / 4],
    pub d: f16,
    pub dmin: f16,
}

/// Q3_K: 256 weights as 3-bit values in 16 sub-blocks of 16 with 6-bit
/// scales packed in `scales` (see `scales_q3k`), `w = d * (sc - 32) * q`,
/// `q` in -4..=3. Weight `128h + 32k + l` has its two low bits at bits
/// `2k..2k+2` of `qs[32h + l]`; bit `4h + k` of `hmask[l]` clear means
/// `q -= 4`.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub(crate) struct BlockQ3K {
    pub hmask: [u8; QK_K / 8],
    pub qs: [u8; QK_K / 4],
    pub scales: [u8; 12],
    pub d: f16,
}

/// Activation block for the K-quants: 256 i8 with an f32 scale and the sums
/// of each 16 quants (the minimums and Q6_K's offset need them).
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub(crate) struct BlockA8K {
    pub d: f32,
    pub qs: [i8; QK_K],
    pub bsums: [i16; QK_K / 16],
}

const _: () = assert!(std::mem::size_of::<BlockQ5_0>() == 22);
const _: () = assert!(std::mem::size_of::<BlockQ5_1>() == 24);
const _: () = assert!(std::mem::size_of::<BlockQ2K>() == 84);
const _: () = assert!(std::mem::size_of::<BlockQ3K>() == 110);
const _: () = assert!(std::mem::size_of::<BlockQ4K>() == 144);
const _: () = assert!(std::mem::size_of::<BlockQ5K>() == 176);
const _: () = assert!(std::mem::size_of::<BlockQ6K>() == 210);
const _: () = assert!(std::mem::size_of::<BlockA8K>() == 292);
const _: () = assert!(std::mem::size_of::<BlockA8>() == 36);
const _: () = assert!(std::mem::size_of::<BlockA8S>() == 40);
const _: () = assert!(std::mem::size_of::<BlockQ4_0>() == 18);
const _: () = assert!(std::mem::size_of::<BlockQ4_1>() == 20);
const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);

/// Types that may be viewed over arbitrary bytes: `repr(C)`, no padding
/// with meaning, every bit pattern valid.
///
/// # Safety
/// Implementors must be plain old data: any byte pattern of
/// `size_of::<Self>()` bytes is a valid value.
pub(crate) unsafe trait Plain: Sized {}
// SAFETY: a repr(C) aggregate of f16/u8/i8 (any bit pattern valid).
unsafe impl Plain for BlockQ4_0 {}
// SAFETY: a repr(C) aggregate of f16/u8/i8 (any bit pattern valid).
unsafe impl Plain for BlockQ4_1 {}
// SAFETY: a repr(C) aggregate of f16/u8/i8 (any bit pattern valid).
unsafe impl Plain for BlockQ8_0 {}
// SAFETY: a repr(C) aggregate of f32 and i8.
unsafe impl Plain for BlockA8 {}
// SAFETY: a repr(C) aggregate of f32 and i8.
unsafe impl Plain for BlockA8S {}
// SAFETY: a repr(C) aggregate of f16/u8 (any bit pattern valid).
unsafe impl Plain for BlockQ5_0 {}
// SAFETY: a repr(C) aggregate of f16/u8 (any bit pattern valid).
unsafe impl Plain for BlockQ5_1 {}
// SAFETY: a repr(C) aggregate of f16/u8 (any bit pattern valid).
unsafe impl Plain for BlockQ2K {}
// SAFETY: a repr(C) aggregate of f16/u8 (any bit pattern valid).
unsafe impl Plain for BlockQ3K {}
// SAFETY: a repr(C) aggregate of f16/u8 (any bit pattern valid).
unsafe impl Plain for BlockQ4K {}
// SAFETY: a repr(C) aggregate of f16/u8 (any bit pattern valid).
unsafe impl Plain for BlockQ5K {}
// SAFETY: a repr(C) aggregate of f16/u8/i8 (any bit pattern valid).
unsafe impl Plain for BlockQ6K {}
// SAFETY: a repr(C) aggregate of f32/i8/i16 without padding.
unsafe impl Plain for BlockA8K {}
// SAFETY: a primitive number (any bit pattern valid).
unsafe impl Plain for f32 {}
// SAFETY: a primitive number (any bit pattern valid).
unsafe impl Plain for f16 {}
// SAFETY: candle's quant blocks are repr(C) aggregates of f16/f32/u8/i8/i16.
unsafe impl Plain for candle_core::quantized::k_quants::BlockQ4K {}
// SAFETY: candle's quant blocks are repr(C) aggregates of f16/f32/u8/i8/i16.
unsafe impl Plain for candle_core::quantized::k_quants::BlockQ5K {}
// SAFETY: candle's quant blocks are repr(C) aggregates of f16/f32/u8/i8/i16.
unsafe impl Plain for candle_core::quantized::k_quants::BlockQ6K {}
// SAFETY: candle's quant blocks are repr(C) aggregates of f16/f32/u8/i8/i16.
unsafe impl Plain for candle_core::quantized::k_quants::BlockQ2K {}
// SAFETY: candle's quant blocks are repr(C) aggregates of f16/f32/u8/i8/i16.
unsafe impl Plain for candle_core::quantized::k_quants::BlockQ3K {}
// SAFETY: candle's quant blocks are repr(C) aggregates of f16/f32/u8/i8/i16.
// (Only the speed probe still calls candle's Q8_K kernels, for comparison.)
#[cfg(test)]
unsafe impl Plain for candle_core::quantized::k_quants::BlockQ8K {}
// SAFETY: candle's quant blocks are repr(C) aggregates of f16/f32/u8/i8/i16.
unsafe impl Plain for candle_core::quantized::k_quants::BlockQ5_0 {}
// SAFETY: candle's quant blocks are repr(C) aggregates of f16/f32/u8/i8/i16.
unsafe impl Plain for candle_core::quantized::k_quants::BlockQ5_1 {}
// SAFETY: candle's quant blocks are repr(C) aggregates of f16/f32/u8/i8/i16.
unsafe impl Plain for candle_core::quantized::k_quants::BlockQ8_0 {}
// SAFETY: candle's quant blocks are repr(C) aggregates of f16/f32/u8/i8/i16.
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
