//! Weight matrices viewed in place over the mapping, activation quantization
//! and the threaded quantized matrix multiply.

use super::InferenceError;
use super::kernels::{
    self, BlockA8, BlockA8K, BlockA8S, BlockQ2K, BlockQ3K, BlockQ4_0, BlockQ4_1, BlockQ4K,
    BlockQ5_0, BlockQ5_1, BlockQ5K, BlockQ6K, BlockQ8_0, Isa, Plain, view, view_mut,
};
use crate::gguf::GgmlType;
use candle_core::quantized::k_quants as ck;
use half::f16;
use rayon::prelude::*;

/// A 2-D weight tensor in its GGUF encoding: `rows` output features, each a
/// row of `cols` input features (GGUF dims are `[cols, rows]`).
#[derive(Debug, Clone)]
pub(crate) struct QMatrix {
    /// Tensor name (shown by `Debug`).
    #[allow(dead_code)]
    pub name: String,
    /// Element type.
    pub ty: GgmlType,
    /// Number of rows (output features).
    pub rows: usize,
    /// Elements per row (input features).
    pub cols: usize,
    /// Absolute byte range of the tensor in the mapping.
    pub start: usize,
    /// Bytes per row.
    pub row_bytes: usize,
}

/// The activation encoding a weight type multiplies against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ActKind {
    /// Plain f32 (F32 and F16 weights).
    F32,
    /// Our [`BlockA8`] (Q4_0, Q5_0, Q8_0 weights).
    A8,
    /// Our [`BlockA8S`] (Q4_1, Q5_1 weights).
    A8S,
    /// Our [`BlockA8K`] (Q4_K, Q5_K, Q6_K weights).
    A8K,
}

impl ActKind {
    fn for_weight(ty: GgmlType) -> Option<Self> {
        use GgmlType::*;
        Some(match ty {
            F32 | F16 => ActKind::F32,
            Q4_0 | Q5_0 | Q8_0 => ActKind::A8,
            Q4_1 | Q5_1 => ActKind::A8S,
            Q2_K | Q3_K | Q4_K | Q5_K | Q6_K => ActKind::A8K,
            _ => return None,
        })
    }
    /// Bytes that encode `cols` values.
    fn row_bytes(self, cols: usize) -> usize {
        match self {
            ActKind::F32 => cols * 4,
            ActKind::A8 => cols / 32 * 36,
            ActKind::A8S => cols / 32 * 40,
            ActKind::A8K => cols / 256 * std::mem::size_of::<BlockA8K>(),
        }
    }
}

/// Weight types with a matmul kernel here.
pub(crate) fn supported(ty: GgmlType) -> bool {
    ActKind::for_weight(ty).is_some()
}

impl QMatrix {
    /// Builds the view of a 2-D tensor, checking type, shape and alignment.
    pub(crate) fn new(
        name: &str,
        ty: GgmlType,
        dims: &[u64],
        start: u64,
        size: u64,
        base: &[u8],
    ) -> Result<Self, InferenceError> {
        if !supported(ty) {
            return Err(InferenceError::UnsupportedTensorType {
                tensor: name.to_owned(),
                ty: ty.name(),
            });
        }
        let (cols, rows) = match dims {
            [c] => (*c, 1),
            [c, r] => (*c, *r),
            [c, r, 1] | [c, r, 1, 1] => (*c, *r),
            _ => {
                return Err(InferenceError::BadModel(format!(
                    "tensor {name}: expected a matrix, got dims {dims:?}"
                )));
            }
        };
        let (blk, bpb) = ty.block_layout();
        let need_block = match ActKind::for_weight(ty) {
            Some(ActKind::A8K) => 256,
            Some(ActKind::A8 | ActKind::A8S) => 32,
            _ => 1,
        };
        if cols % blk != 0 || cols % need_block != 0 {
            return Err(InferenceError::BadModel(format!(
                "tensor {name}: row length {cols} is not a multiple of the block size"
            )));
        }
        let row_bytes = cols / blk * bpb;
        if row_bytes * rows != size {
            return Err(InferenceError::BadModel(format!(
                "tensor {name}: size {size} does not match dims {dims:?}"
            )));
        }
        let (start, rows, cols, row_bytes) = (
            usize::try_from(start).map_err(|_| InferenceError::BadModel("offset".into()))?,
            usize::try_from(rows).map_err(|_| InferenceError::BadModel("rows".into()))?,
            usize::try_from(cols).map_err(|_| InferenceError::BadModel("cols".into()))?,
            usize::try_from(row_bytes).map_err(|_| InferenceError::BadModel("row".into()))?,
        );
        let m = QMatrix {
            name: name.to_owned(),
            ty,
            rows,
            cols,
            start,
            row_bytes,
        };
        // Every row must be viewable as its block type (alignment).
        let bytes = base
            .get(start..start + row_bytes * rows)
            .ok_or_else(|| InferenceError::BadModel(format!("tensor {name}: out of file")))?;
        let align_ok = (0..rows.min(2)).all(|r| {
            let row = &bytes[r * row_bytes..(r + 1) * row_bytes];
            row_viewable(ty, row)
        });
        if !align_ok {
            return Err(InferenceError::BadModel(format!(
                "tensor {name}: data is not aligned for {}",
                ty.name()
            )));
        }
        Ok(m)
    }

    /// The bytes of row `r`.
    #[inline]
    pub(crate) fn row<'a>(&self, base: &'a [u8], r: usize) -> &'a [u8] {
        let s = self.start + r * self.row_bytes;
        &base[s..s + self.row_bytes]
    }

    /// The activation encoding this matrix multiplies against.
    pub(crate) fn act_kind(&self) -> ActKind {
        ActKind::for_weight(self.ty).unwrap_or(ActKind::F32)
    }

    /// Dequantizes row `r` into `out` (`out.len() == cols`).
    pub(crate) fn dequant_row(&self, base: &[u8], r: usize, out: &mut [f32]) {
        let row = self.row(base, r);
        dequant(self.ty, row, out);
    }
}

fn row_viewable(ty: GgmlType, row: &[u8]) -> bool {
    use GgmlType::*;
    match ty {
        F32 => view::<f32>(row).is_some(),
        F16 => view::<f16>(row).is_some(),
        Q4_0 => view::<BlockQ4_0>(row).is_some(),
        Q4_1 => view::<BlockQ4_1>(row).is_some(),
        Q8_0 => view::<BlockQ8_0>(row).is_some(),
        Q5_0 => view::<BlockQ5_0>(row).is_some(),
        Q5_1 => view::<BlockQ5_1>(row).is_some(),
        Q2_K => view::<BlockQ2K>(row).is_some(),
        Q3_K => view::<BlockQ3K>(row).is_some(),
        Q4_K => view::<BlockQ4K>(row).is_some(),
        Q5_K => view::<BlockQ5K>(row).is_some(),
        Q6_K => view::<BlockQ6K>(row).is_some(),
        _ => false,
    }
}

fn v<T: Plain>(b: &[u8]) -> &[T] {
    // Alignment and size were checked when the matrix was built.
    view::<T>(b).unwrap_or(&[])
}

fn candle_to_float<T: ck::GgmlType + Plain>(row: &[u8], out: &mut [f32]) {
    T::to_float(v::<T>(row), out)
}

/// Dequantizes one row of type `ty`.
pub(crate) fn dequant(ty: GgmlType, row: &[u8], out: &mut [f32]) {
    use GgmlType::*;
    match ty {
        F32 => out.copy_from_slice(v::<f32>(row)),
        F16 => {
            for (o, h) in out.iter_mut().zip(v::<f16>(row)) {
                *o = h.to_f32();
            }
        }
        Q4_0 => {
            for (o, b) in out.chunks_exact_mut(32).zip(v::<BlockQ4_0>(row)) {
                let d = b.d.to_f32();
                for j in 0..16 {
                    o[j] = (f32::from(b.qs[j] & 15) - 8.0) * d;
                    o[j + 16] = (f32::from(b.qs[j] >> 4) - 8.0) * d;
                }
            }
        }
        Q4_1 => {
            for (o, b) in out.chunks_exact_mut(32).zip(v::<BlockQ4_1>(row)) {
                let (d, m) = (b.d.to_f32(), b.m.to_f32());
                for j in 0..16 {
                    o[j] = f32::from(b.qs[j] & 15) * d + m;
                    o[j + 16] = f32::from(b.qs[j] >> 4) * d + m;
                }
            }
        }
        Q8_0 => {
            for (o, b) in out.chunks_exact_mut(32).zip(v::<BlockQ8_0>(row)) {
                let d = b.d.to_f32();
                for (x, q) in o.iter_mut().zip(&b.qs) {
                    *x = f32::from(*q) * d;
                }
            }
        }
        Q5_0 => candle_to_float::<ck::BlockQ5_0>(row, out),
        Q5_1 => candle_to_float::<ck::BlockQ5_1>(row, out),
        Q2_K => candle_to_float::<ck::BlockQ2K>(row, out),
        Q3_K => candle_to_float::<ck::BlockQ3K>(row, out),
        Q4_K => candle_to_float::<ck::BlockQ4K>(row, out),
        Q5_K => candle_to_float::<ck::BlockQ5K>(row, out),
        Q6_K => candle_to_float::<ck::BlockQ6K>(row, out),
        _ => out.fill(0.0),
    }
}

/// A batch of activation rows encoded for one [`ActKind`].
pub(crate) struct Acts {
    kind: ActKind,
    n: usize,
    row_bytes: usize,
    // u64 backing keeps every block type aligned.
    buf: Vec<u64>,
}

impl Acts {
    /// Encodes `n` rows of `cols` floats (`x.len() == n * cols`).
    pub(crate) fn new(isa: Isa, kind: ActKind, x: &[f32], n: usize, cols: usize) -> Self {
        let row_bytes = kind.row_bytes(cols);
        let mut a = Acts {
            kind,
            n,
            row_bytes,
            buf: vec![0u64; (row_bytes * n).div_ceil(8)],
        };
        let bytes = a.bytes_mut();
        let rows = bytes.chunks_exact_mut(row_bytes.max(1));
        for (dst, src) in rows.zip(x.chunks_exact(cols.max(1))).take(n) {
            match kind {
                ActKind::F32 => {
                    if let Some(d) = view_mut::<f32>(dst) {
                        d.copy_from_slice(src);
                    }
                }
                ActKind::A8 => {
                    if let Some(d) = view_mut::<BlockA8>(dst) {
                        kernels::quantize_a8(isa, src, d);
                    }
                }
                ActKind::A8S => {
                    if let Some(d) = view_mut::<BlockA8S>(dst) {
                        kernels::quantize_a8s(isa, src, d);
                    }
                }
                ActKind::A8K => {
                    if let Some(d) = view_mut::<BlockA8K>(dst) {
                        kernels::quantize_a8k(isa, src, d);
                    }
                }
            }
        }
        a
    }

    /// The f32 rows (reference path only: activations kept unquantized).
    fn dequant_all(&self, cols: usize) -> Vec<f32> {
        let mut out = vec![0f32; self.n * cols];
        if self.kind == ActKind::F32 {
            for (i, o) in out.chunks_exact_mut(cols.max(1)).enumerate() {
                dequant(GgmlType::F32, self.row(i), o);
            }
        }
        out
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        let len = self.row_bytes * self.n;
        // SAFETY: u64 storage reinterpreted as bytes; `len` is within it.
        unsafe { std::slice::from_raw_parts_mut(self.buf.as_mut_ptr().cast::<u8>(), len) }
    }

    fn row(&self, i: usize) -> &[u8] {
        // SAFETY: u64 storage reinterpreted as bytes, row within the buffer.
        let all = unsafe {
            std::slice::from_raw_parts(self.buf.as_ptr().cast::<u8>(), self.row_bytes * self.n)
        };
        &all[i * self.row_bytes..(i + 1) * self.row_bytes]
    }
}

/// One dot product of a weight row with an activation row.
#[inline]
fn dot(isa: Isa, ty: GgmlType, w: &[u8], a: &[u8]) -> f32 {
    use GgmlType::*;
    match ty {
        Q4_1 => kernels::dot_q4_1_a8s(isa, v(w), v(a)),
        Q8_0 => kernels::dot_q8_0_a8(isa, v(w), v(a)),
        Q4_0 => kernels::dot_q4_0_a8(isa, v(w), v(a)),
        F32 => kernels::dot_f32(isa, v(w), v(a)),
        F16 => kernels::dot_f16(isa, v(w), v(a)),
        Q5_0 => kernels::dot_q5_0_a8(isa, v(w), v(a)),
        Q5_1 => kernels::dot_q5_1_a8s(isa, v(w), v(a)),
        Q4_K => kernels::dot_q4_k_a8k(isa, v(w), v(a)),
        Q5_K => kernels::dot_q5_k_a8k(isa, v(w), v(a)),
        Q6_K => kernels::dot_q6_k_a8k(isa, v(w), v(a)),
        Q2_K => kernels::dot_q2_k_a8k(isa, v(w), v(a)),
        Q3_K => kernels::dot_q3_k_a8k(isa, v(w), v(a)),
        _ => 0.0,
    }
}

#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint elements (distinct rows of the weight matrix).
unsafe impl Send for OutPtr {}
// SAFETY: shared between tasks only to write disjoint elements, as above.
unsafe impl Sync for OutPtr {}

/// Execution context: instruction set and the worker pool.
pub(crate) struct Exec {
    pub isa: Isa,
    pub pool: Option<rayon::ThreadPool>,
    pub threads: usize,
    /// Use dequantized f32 matmuls (accuracy reference, slow).
    pub reference: bool,
}

impl Exec {
    pub(crate) fn new(threads: usize) -> Result<Self, InferenceError> {
        let threads = threads.max(1);
        let pool = if threads > 1 {
            Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .thread_name(|i| format!("shoal-infer-{i}"))
                    .build()
                    .map_err(|e| InferenceError::Io(std::io::Error::other(e.to_string())))?,
            )
        } else {
            None
        };
        Ok(Exec {
            isa: Isa::detect(),
            pool,
            threads,
            reference: false,
        })
    }

    /// Encodes activations for multiplying with `w`.
    pub(crate) fn acts(&self, w: &QMatrix, x: &[f32], n: usize, cols: usize) -> Acts {
        let kind = if self.reference {
            ActKind::F32
        } else {
            w.act_kind()
        };
        Acts::new(self.isa, kind, x, n, cols)
    }

    /// Runs `f` inside the pool (or inline when single-threaded).
    pub(crate) fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        match &self.pool {
            Some(p) => p.install(f),
            None => f(),
        }
    }

    /// `out[b][r] = sum_k w[r][k] * x[b][k]` for every batch row `b`.
    /// `out.len() == acts.n * w.rows`. Must be called inside [`Exec::install`].
    pub(crate) fn matmul(&self, base: &[u8], w: &QMatrix, acts: &Acts, out: &mut [f32]) {
        debug_assert!(acts.kind == w.act_kind() || self.reference);
        let n = acts.n;
        let rows = w.rows;
        debug_assert_eq!(out.len(), n * rows);
        let tasks = if self.threads > 1 {
            self.threads * 8
        } else {
            1
        };
        let per = rows.div_ceil(tasks).max(1);
        let ptr = OutPtr(out.as_mut_ptr());
        let isa = self.isa;
        let ntasks = rows.div_ceil(per);
        let span = |t: usize| (t * per, ((t + 1) * per).min(rows));
        if !self.reference {
            // Types with a 1×4 kernel: four activation rows per weight pass.
            macro_rules! batched {
                ($w:ty, $one:ident, $four:ident) => {
                    self.par(ntasks, |t| {
                        let (r0, r1) = span(t);
                        rows_x4(
                            base,
                            w,
                            acts,
                            ptr,
                            r0..r1,
                            |wr: &[$w], a| kernels::$one(isa, wr, a),
                            |wr: &[$w], a| kernels::$four(isa, wr, a),
                        );
                    })
                };
            }
            match w.ty {
                GgmlType::Q4_1 => batched!(BlockQ4_1, dot_q4_1_a8s, dot_q4_1_a8s_x4),
                GgmlType::Q8_0 => batched!(BlockQ8_0, dot_q8_0_a8, dot_q8_0_a8_x4),
                GgmlType::Q5_0 => batched!(BlockQ5_0, dot_q5_0_a8, dot_q5_0_a8_x4),
                GgmlType::Q5_1 => batched!(BlockQ5_1, dot_q5_1_a8s, dot_q5_1_a8s_x4),
                GgmlType::Q4_K => batched!(BlockQ4K, dot_q4_k_a8k, dot_q4_k_a8k_x4),
                GgmlType::Q5_K => batched!(BlockQ5K, dot_q5_k_a8k, dot_q5_k_a8k_x4),
                GgmlType::Q6_K => batched!(BlockQ6K, dot_q6_k_a8k, dot_q6_k_a8k_x4),
                GgmlType::Q2_K => batched!(BlockQ2K, dot_q2_k_a8k, dot_q2_k_a8k_x4),
                GgmlType::Q3_K => batched!(BlockQ3K, dot_q3_k_a8k, dot_q3_k_a8k_x4),
                GgmlType::F16 => batched!(f16, dot_f16, dot_f16_x4),
                ty => self.par(ntasks, |t| {
                    let (r0, r1) = span(t);
                    rows_with(base, w, acts, ptr, r0..r1, |wr, ar| dot(isa, ty, wr, ar));
                }),
            }
            return;
        }
        if self.reference {
            // Dequantized weights × f32 activations (slow; accuracy reference).
            let cols = w.cols;
            let x = acts.dequant_all(cols);
            let job = |t: usize| {
                let p = ptr;
                let mut row = vec![0f32; cols];
                for r in t * per..((t + 1) * per).min(rows) {
                    w.dequant_row(base, r, &mut row);
                    for b in 0..n {
                        let val = kernels::dot_f32_scalar(&row, &x[b * cols..(b + 1) * cols]);
                        // SAFETY: as below.
                        unsafe { *p.0.add(b * rows + r) = val };
                    }
                }
            };
            self.par(ntasks, job);
        }
    }

    /// Runs `job(0..ntasks)` on the pool (inline when single-threaded).
    fn par(&self, ntasks: usize, job: impl Fn(usize) + Sync + Send) {
        if self.pool.is_some() && ntasks > 1 {
            (0..ntasks).into_par_iter().for_each(job);
        } else {
            (0..ntasks).for_each(job);
        }
    }
}

/// Output rows `rows` of one matmul with a per-(row, column) dot product.
#[inline]
fn rows_with(
    base: &[u8],
    w: &QMatrix,
    acts: &Acts,
    p: OutPtr,
    rows: std::ops::Range<usize>,
    dot: impl Fn(&[u8], &[u8]) -> f32,
) {
    for r in rows {
        let wr = w.row(base, r);
        for b in 0..acts.n {
            let val = dot(wr, acts.row(b));
            // SAFETY: (b, r) is in bounds and written by this task only.
            unsafe { *p.0.add(b * w.rows + r) = val };
        }
    }
}

/// Output rows `rows` of one matmul, four activation rows per pass over a
/// weight row (`four` is bit for bit four calls of `one`, which takes the
/// leftover rows).
fn rows_x4<W: Plain, A: Plain>(
    base: &[u8],
    w: &QMatrix,
    acts: &Acts,
    p: OutPtr,
    rows: std::ops::Range<usize>,
    one: impl Fn(&[W], &[A]) -> f32,
    four: impl Fn(&[W], [&[A]; 4]) -> [f32; 4],
) {
    let n = acts.n;
    for r in rows {
        let wv = v::<W>(w.row(base, r));
        let mut b = 0;
        while b + 4 <= n {
            let vals = four(wv, [0, 1, 2, 3].map(|k| v::<A>(acts.row(b + k))));
            for (k, val) in vals.into_iter().enumerate() {
                // SAFETY: (b + k, r) is in bounds and written by this task only.
                unsafe { *p.0.add((b + k) * w.rows + r) = val };
            }
            b += 4;
        }
        while b < n {
            let val = one(wv, v::<A>(acts.row(b)));
            // SAFETY: (b, r) is in bounds and written by this task only.
            unsafe { *p.0.add(b * w.rows + r) = val };
            b += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> u64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *seed >> 33
    }

    /// A `rows × cols` matrix of type `ty` with random quants and sane f16
    /// scales: writes a valid small f16 into every 2-byte field the type
    /// keeps a scale in.
    fn matrix(ty: GgmlType, rows: usize, cols: usize, seed: u64) -> (Vec<u64>, QMatrix) {
        let (blk, bpb) = ty.block_layout();
        let (blk, bpb) = (blk as usize, bpb as usize);
        let size = rows * cols / blk * bpb;
        let mut buf = vec![0u64; size.div_ceil(8)];
        // SAFETY: u64 storage viewed as bytes within its length.
        let bytes = unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast::<u8>(), size) };
        let mut s = seed;
        for b in bytes.iter_mut() {
            *b = lcg(&mut s) as u8;
        }
        // Byte offsets of the f16 scales inside one block.
        let scales: &[usize] = match ty {
            GgmlType::Q6_K => &[208],
            GgmlType::Q2_K => &[80, 82],
            GgmlType::Q3_K => &[108],
            GgmlType::Q4_0 | GgmlType::Q8_0 | GgmlType::Q5_0 => &[0],
            GgmlType::F32 | GgmlType::F16 => &[],
            _ => &[0, 2],
        };
        let scale = |s: &mut u64| f16::from_f32(0.002 + (lcg(s) % 100) as f32 * 1e-4);
        if ty == GgmlType::F32 {
            for c in bytes.chunks_exact_mut(4) {
                c.copy_from_slice(&((lcg(&mut s) % 2000) as f32 * 1e-3 - 1.0).to_le_bytes());
            }
        }
        if ty == GgmlType::F16 {
            for c in bytes.chunks_exact_mut(2) {
                let h = f16::from_f32((lcg(&mut s) % 2000) as f32 * 1e-3 - 1.0);
                c.copy_from_slice(&h.to_le_bytes());
            }
        }
        for blockb in bytes.chunks_exact_mut(bpb) {
            for &o in scales {
                blockb[o..o + 2].copy_from_slice(&scale(&mut s).to_le_bytes());
            }
        }
        let dims = [cols as u64, rows as u64];
        let m = QMatrix::new("w", ty, &dims, 0, size as u64, bytes);
        let Ok(m) = m else {
            panic!("matrix {ty:?}: {m:?}");
        };
        (buf, m)
    }

    /// `Exec::matmul` on every type with our kernels equals the dequantized
    /// f32 reference within the activation quantization error, for batches
    /// of 1, 4 and 7 rows (the 1×4 kernel plus leftovers).
    #[test]
    fn matmul_matches_reference() {
        use GgmlType::*;
        let (rows, cols) = (9, 512);
        for ty in [
            F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K,
        ] {
            let (buf, w) = matrix(ty, rows, cols, 3);
            // SAFETY: u64 storage viewed as bytes within its length.
            let base = unsafe {
                std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), w.row_bytes * rows)
            };
            for n in [1usize, 4, 7] {
                check_matmul(base, &w, n, 77 + n as u64);
            }
        }
    }

    /// The real Gemma 3 270M Q4_K_M file: one tensor of each of its weight
    /// types (Q5_0, Q8_0, Q4_K, Q6_K) through `Exec::matmul` against the
    /// dequantized reference.
    #[test]
    fn gemma3_tensors_match_reference() {
        let path = std::env::var("SHOAL_GEMMA3_MODEL").unwrap_or_else(|_| {
            let cache = std::env::var("SHOAL_MODEL_CACHE").unwrap_or_else(|_| {
                let home = std::env::var("HOME").unwrap_or_default();
                std::env::var("XDG_CACHE_HOME").unwrap_or(home + "/.cache") + "/shoal/models"
            });
            cache + "/gemma-3-270m-Q4_K_M.gguf"
        });
        let Ok(file) = std::fs::File::open(&path) else {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "missing {path}"
            );
            eprintln!(
                "SKIPPING gemma3_tensors_match_reference: no {path} (scripts/fetch-gemma3.sh)"
            );
            return;
        };
        // SAFETY: a read-only mapping of a file nobody modifies during the test.
        let map = match unsafe { memmap2::Mmap::map(&file) } {
            Ok(m) => m,
            Err(e) => panic!("{e}"),
        };
        let g = match crate::gguf::Gguf::parse(&map) {
            Ok(g) => g,
            Err(e) => panic!("{e}"),
        };
        let mut seen = Vec::new();
        for name in [
            "blk.0.attn_q.weight",
            "blk.0.attn_v.weight",
            "blk.0.attn_output.weight",
            "blk.0.ffn_down.weight",
            "blk.17.ffn_gate.weight",
        ] {
            let Some(t) = g.tensor(name) else {
                panic!("no {name}");
            };
            let r = g.tensor_range(t);
            let w = match QMatrix::new(name, t.ty, &t.dims, r.start, t.size, &map) {
                Ok(w) => w,
                Err(e) => panic!("{name}: {e}"),
            };
            seen.push(w.ty);
            check_matmul(&map, &w, 5, 9);
        }
        use GgmlType::*;
        assert_eq!(seen, [Q5_0, Q8_0, Q4_K, Q6_K, Q5_0]);
    }

    /// `n` random activation rows through `w`: our kernels against the
    /// reference within the quantization bound (half a quantization step
    /// times Σ|w| per block), and row 0 bit for bit the single-row result.
    fn check_matmul(base: &[u8], w: &QMatrix, n: usize, seed: u64) {
        let (rows, cols, ty) = (w.rows, w.cols, w.ty);
        let mut s = seed;
        let x: Vec<f32> = (0..n * cols)
            .map(|_| (lcg(&mut s) % 2001) as f32 * 1e-3 - 1.0)
            .collect();
        let mut exec = match Exec::new(1) {
            Ok(e) => e,
            Err(e) => panic!("{e}"),
        };
        let mut fast = vec![0f32; n * rows];
        let acts = exec.acts(w, &x, n, cols);
        exec.matmul(base, w, &acts, &mut fast);
        exec.reference = true;
        let mut slow = vec![0f32; n * rows];
        let acts = exec.acts(w, &x, n, cols);
        exec.matmul(base, w, &acts, &mut slow);
        let blk = match w.act_kind() {
            ActKind::A8K => 256,
            ActKind::F32 => 1,
            _ => 32,
        };
        let mut wr = vec![0f32; cols];
        for r in 0..rows {
            w.dequant_row(base, r, &mut wr);
            for b in 0..n {
                let xb = &x[b * cols..(b + 1) * cols];
                let mut bound = 1e-4;
                if blk > 1 {
                    for (wc, xc) in wr.chunks(blk).zip(xb.chunks(blk)) {
                        let amax = xc.iter().fold(0f32, |m, v| m.max(v.abs()));
                        let sw: f32 = wc.iter().map(|v| v.abs()).sum();
                        bound += sw * amax / 127.0 * 0.5 * 1.001;
                    }
                }
                let (f, r0) = (fast[b * rows + r], slow[b * rows + r]);
                assert!(
                    (f - r0).abs() <= bound + 1e-5 * r0.abs(),
                    "{ty:?} n {n} row {r} batch {b}: {f} vs reference {r0} (bound {bound})"
                );
            }
        }
        // A token's result does not depend on its batch.
        let single = exec_one(w, base, &x[..cols]);
        for r in 0..rows {
            assert_eq!(single[r].to_bits(), fast[r].to_bits(), "{ty:?} n {n}");
        }
    }

    fn exec_one(w: &QMatrix, base: &[u8], x: &[f32]) -> Vec<f32> {
        let exec = match Exec::new(1) {
            Ok(e) => e,
            Err(e) => panic!("{e}"),
        };
        let acts = exec.acts(w, x, 1, w.cols);
        let mut out = vec![0f32; w.rows];
        exec.matmul(base, w, &acts, &mut out);
        out
    }
}
