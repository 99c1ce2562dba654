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
// SAFETY: a repr(C) aggregate of f16/u8/i8 (any bit pattern valid).
unsafe impl Plain for BlockQ4_0 {}
// SAFETY: a repr(C) aggregate of f16/u8/i8 (any bit pattern valid).
unsafe impl Plain for BlockQ4_1 {}
// SAFETY: a repr(C) aggregate of f16/u8/i8 (any bit pattern valid).
unsafe impl Plain for BlockQ8_0 {}
// SAFETY: a repr(C) aggregate of f16/u8/i8 (any bit pattern valid).
unsafe impl Plain for BlockQ8_1 {}
// SAFETY: a repr(C) aggregate of f32 and i8.
unsafe impl Plain for BlockA8 {}
// SAFETY: a repr(C) aggregate of f32 and i8.
unsafe impl Plain for BlockA8S {}
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
