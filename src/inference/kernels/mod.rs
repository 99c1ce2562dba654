//! Quantized dot-product kernels for the hot weight types.
//!
//! Weights stay in their GGUF block format (viewed in place over the memory
//! mapping); activations are quantized once per row to the matching 8-bit
//! block type (Q8_0 or Q8_1, as llama.cpp does), and each output element is an
//! integer dot product per block scaled by the two block scales.
//!
//! Every kernel has a portable scalar version and SIMD versions chosen at
//! run time ([`Isa::detect`]): AVX2+FMA on x86-64; on aarch64 NEON with
//! `sdot` (FEAT_DotProd) or plain NEON (`smull`/`sadalp`) without it.
//!
//! Layout (as ggml's): `blocks` holds the block types and byte views,
//! `scalar` the portable reference kernels, one module per instruction set
//! (`avx2`, `neon`) the SIMD versions, and this module the run-time
//! dispatch on [`Isa`].
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks, clippy::missing_safety_doc)]

#[cfg(target_arch = "x86_64")]
mod avx2;
mod blocks;
#[cfg(test)]
mod ktests;
#[cfg(target_arch = "aarch64")]
mod neon;
mod scalar;

pub(crate) use blocks::{
    BlockA8, BlockA8K, BlockA8S, BlockQ2K, BlockQ3K, BlockQ4_0, BlockQ4_1, BlockQ4K, BlockQ5_0,
    BlockQ5_1, BlockQ5K, BlockQ6K, BlockQ8_0, Plain, view, view_mut,
};
pub(crate) use scalar::{
    axpy_scalar, dot_f16_scalar, dot_f32_scalar, dot_q2_k_a8k_scalar, dot_q3_k_a8k_scalar,
    dot_q4_0_a8_scalar, dot_q4_1_a8s_scalar, dot_q4_k_a8k_scalar, dot_q5_0_a8_scalar,
    dot_q5_1_a8s_scalar, dot_q5_k_a8k_scalar, dot_q6_k_a8k_scalar, dot_q8_0_a8_scalar,
    quantize_a8_scalar, quantize_a8k_scalar, quantize_a8s_scalar,
};

/// Proof that this CPU has AVX2, FMA and F16C.
///
/// Its field is private: only [`Isa::detect`] (after
/// `is_x86_feature_detected!`) can make one, so an [`Isa::Avx2`] value, and
/// with it a call into the AVX2 kernels, cannot exist on a CPU without them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Avx2Token(());

/// Proof that this CPU has NEON (aarch64 Advanced SIMD); made only by
/// [`Isa::available`] after `is_aarch64_feature_detected!("neon")`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NeonToken(());

/// Proof that this CPU has NEON and the 8-bit dot product instructions
/// (FEAT_DotProd, `sdot`); made only by [`Isa::available`] after
/// `is_aarch64_feature_detected!("dotprod")`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DotprodToken(());

/// The instruction set the kernels run with: [`Isa::Scalar`] anywhere, every
/// other variant only through run-time detection ([`Isa::detect`],
/// [`Isa::available`]), which alone can make its token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// Portable Rust.
    Scalar,
    /// x86-64 AVX2 + FMA + F16C.
    Avx2(Avx2Token),
    /// aarch64 NEON without the dot product instructions (Cortex-A53/A72:
    /// Raspberry Pi 3 and 4).
    Neon(NeonToken),
    /// aarch64 NEON with FEAT_DotProd (Cortex-A55/A76 and later:
    /// Raspberry Pi 5).
    NeonDot(DotprodToken),
}

impl Isa {
    /// The best instruction set this CPU supports (checked at run time).
    /// `SHOAL_ISA=scalar` forces the portable kernels and `SHOAL_ISA=neon`
    /// plain NEON without `sdot` where NEON is available (for tests and
    /// comparisons).
    pub fn detect() -> Self {
        Self::choose(
            std::env::var("SHOAL_ISA").ok().as_deref(),
            &Self::available(),
        )
    }

    /// The instruction set `SHOAL_ISA=choice` picks among `available`
    /// (worst first): `scalar`, `neon` (when available), else the best.
    fn choose(choice: Option<&str>, available: &[Isa]) -> Self {
        let best = available.last().copied().unwrap_or(Isa::Scalar);
        match choice {
            Some("scalar") => Isa::Scalar,
            Some("neon") => available
                .iter()
                .copied()
                .find(|i| matches!(i, Isa::Neon(_)))
                .unwrap_or(best),
            _ => best,
        }
    }

    /// Every instruction set this CPU supports, worst first (always starts
    /// with [`Isa::Scalar`]): the kernel tests check each against the scalar
    /// reference.
    pub fn available() -> Vec<Isa> {
        #[allow(unused_mut)]
        let mut v = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("fma")
                && std::is_x86_feature_detected!("f16c")
            {
                v.push(Isa::Avx2(Avx2Token(())));
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            if std::arch::is_aarch64_feature_detected!("neon") {
                v.push(Isa::Neon(NeonToken(())));
                if std::arch::is_aarch64_feature_detected!("dotprod") {
                    v.push(Isa::NeonDot(DotprodToken(())));
                }
            }
        }
        v
    }

    /// A short name for logs and metrics (`scalar`, `avx2`, `neon`,
    /// `neon-dotprod`).
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2(_) => "avx2",
            Isa::Neon(_) => "neon",
            Isa::NeonDot(_) => "neon-dotprod",
        }
    }
}

/// Quantizes a row to [`BlockA8`] with the best kernel for `isa`.
pub(crate) fn quantize_a8(isa: Isa, x: &[f32], out: &mut [BlockA8]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: an `Avx2Token` exists only where the CPU has AVX2/FMA/F16C.
        Isa::Avx2(_) => unsafe { avx2::quantize_a8(x, out) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: a `NeonToken` or `DotprodToken` exists only where the CPU
        // has NEON.
        Isa::Neon(_) | Isa::NeonDot(_) => unsafe { neon::quantize_a8(x, out) },
        _ => quantize_a8_scalar(x, out),
    }
}

/// Quantizes a row to [`BlockA8S`] with the best kernel for `isa`.
pub(crate) fn quantize_a8s(isa: Isa, x: &[f32], out: &mut [BlockA8S]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: see `quantize_a8`.
        Isa::Avx2(_) => unsafe { avx2::quantize_a8s(x, out) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: a `NeonToken` or `DotprodToken` exists only where the CPU
        // has NEON.
        Isa::Neon(_) | Isa::NeonDot(_) => unsafe { neon::quantize_a8s(x, out) },
        _ => quantize_a8s_scalar(x, out),
    }
}

/// Q4_0 weights · 8-bit activations.
pub(crate) fn dot_q4_0_a8(isa: Isa, w: &[BlockQ4_0], a: &[BlockA8]) -> f32 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: see `quantize_a8`.
        Isa::Avx2(_) => unsafe { avx2::dot_q4_0_a8(w, a) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: a `NeonToken` exists only where the CPU has NEON.
        Isa::Neon(_) => unsafe { neon::dot_q4_0_a8::<1>(w, [a])[0] },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: a `DotprodToken` exists only where the CPU has NEON and
        // FEAT_DotProd.
        Isa::NeonDot(_) => unsafe { neon::dot_q4_0_a8_dot::<1>(w, [a])[0] },
        _ => dot_q4_0_a8_scalar(w, a),
    }
}

/// Q4_1 weights · 8-bit activations with sums.
pub(crate) fn dot_q4_1_a8s(isa: Isa, w: &[BlockQ4_1], a: &[BlockA8S]) -> f32 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: see `quantize_a8`.
        Isa::Avx2(_) => unsafe { avx2::dot_q4_1_a8s(w, a) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: a `NeonToken` exists only where the CPU has NEON.
        Isa::Neon(_) => unsafe { neon::dot_q4_1_a8s::<1>(w, [a])[0] },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: a `DotprodToken` exists only where the CPU has NEON and
        // FEAT_DotProd.
        Isa::NeonDot(_) => unsafe { neon::dot_q4_1_a8s_dot::<1>(w, [a])[0] },
        _ => dot_q4_1_a8s_scalar(w, a),
    }
}

/// One Q4_1 weight row · four activation rows (the weights are unpacked once).
pub(crate) fn dot_q4_1_a8s_x4(isa: Isa, w: &[BlockQ4_1], a: [&[BlockA8S]; 4]) -> [f32; 4] {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: see `quantize_a8`.
        Isa::Avx2(_) => unsafe { avx2::dot_q4_1_a8s_x4(w, a) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: a `NeonToken` exists only where the CPU has NEON.
        Isa::Neon(_) => unsafe { neon::dot_q4_1_a8s::<4>(w, a) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: a `DotprodToken` exists only where the CPU has NEON and
        // FEAT_DotProd.
        Isa::NeonDot(_) => unsafe { neon::dot_q4_1_a8s_dot::<4>(w, a) },
        _ => a.map(|a| dot_q4_1_a8s_scalar(w, a)),
    }
}

/// Quantizes a row to [`BlockA8K`] with the best kernel for `isa`.
pub(crate) fn quantize_a8k(isa: Isa, x: &[f32], out: &mut [BlockA8K]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: see `quantize_a8`.
        Isa::Avx2(_) => unsafe { avx2::quantize_a8k(x, out) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: a `NeonToken` or `DotprodToken` exists only where the CPU
        // has NEON.
        Isa::Neon(_) | Isa::NeonDot(_) => unsafe { neon::quantize_a8k(x, out) },
        _ => quantize_a8k_scalar(x, out),
    }
}

/// A single-row dot product and its 1×4 batch form over the same kernel:
/// the SIMD kernels are generic over the row count and do the same
/// operations in the same order per row, so a row's result is bit for bit
/// the same alone or in a group of four.
macro_rules! row_kernels {
    ($(#[$doc:meta])* $one:ident, $four:ident, $dot:ident, $scalar:ident, $w:ty, $a:ty) => {
        $(#[$doc])*
        pub(crate) fn $one(isa: Isa, w: &[$w], a: &[$a]) -> f32 {
            match isa {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: see `quantize_a8`.
                Isa::Avx2(_) => unsafe { avx2::$one::<1>(w, [a])[0] },
                #[cfg(target_arch = "aarch64")]
                // SAFETY: a `NeonToken` exists only where the CPU has NEON.
                Isa::Neon(_) => unsafe { neon::$one::<1>(w, [a])[0] },
                #[cfg(target_arch = "aarch64")]
                // SAFETY: a `DotprodToken` exists only where the CPU has NEON and
                // FEAT_DotProd.
                Isa::NeonDot(_) => unsafe { neon::$dot::<1>(w, [a])[0] },
                _ => $scalar(w, a),
            }
        }

        /// One weight row · four activation rows (weights unpacked once),
        /// bit for bit four calls of the single-row kernel.
        pub(crate) fn $four(isa: Isa, w: &[$w], a: [&[$a]; 4]) -> [f32; 4] {
            match isa {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: see `quantize_a8`.
                Isa::Avx2(_) => unsafe { avx2::$one::<4>(w, a) },
                #[cfg(target_arch = "aarch64")]
                // SAFETY: a `NeonToken` exists only where the CPU has NEON.
                Isa::Neon(_) => unsafe { neon::$one::<4>(w, a) },
                #[cfg(target_arch = "aarch64")]
                // SAFETY: a `DotprodToken` exists only where the CPU has NEON and
                // FEAT_DotProd.
                Isa::NeonDot(_) => unsafe { neon::$dot::<4>(w, a) },
                _ => a.map(|a| $scalar(w, a)),
            }
        }
    };
    // A type without a NEON kernel: scalar on aarch64.
    ($(#[$doc:meta])* $one:ident, $four:ident, $scalar:ident, $w:ty, $a:ty) => {
        $(#[$doc])*
        pub(crate) fn $one(isa: Isa, w: &[$w], a: &[$a]) -> f32 {
            match isa {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: see `quantize_a8`.
                Isa::Avx2(_) => unsafe { avx2::$one::<1>(w, [a])[0] },
                _ => $scalar(w, a),
            }
        }

        /// One weight row · four activation rows (weights unpacked once),
        /// bit for bit four calls of the single-row kernel.
        pub(crate) fn $four(isa: Isa, w: &[$w], a: [&[$a]; 4]) -> [f32; 4] {
            match isa {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: see `quantize_a8`.
                Isa::Avx2(_) => unsafe { avx2::$one::<4>(w, a) },
                _ => a.map(|a| $scalar(w, a)),
            }
        }
    };
}

row_kernels!(
    /// Q8_0 weights · 8-bit activations.
    dot_q8_0_a8, dot_q8_0_a8_x4, dot_q8_0_a8_dot, dot_q8_0_a8_scalar, BlockQ8_0, BlockA8
);
row_kernels!(
    /// Q5_0 weights · 8-bit activations.
    dot_q5_0_a8, dot_q5_0_a8_x4, dot_q5_0_a8_dot, dot_q5_0_a8_scalar, BlockQ5_0, BlockA8
);
row_kernels!(
    /// Q5_1 weights · 8-bit activations with sums.
    dot_q5_1_a8s, dot_q5_1_a8s_x4, dot_q5_1_a8s_dot, dot_q5_1_a8s_scalar, BlockQ5_1, BlockA8S
);
row_kernels!(
    /// Q4_K weights · 256-wide 8-bit activations.
    dot_q4_k_a8k, dot_q4_k_a8k_x4, dot_q4_k_a8k_dot, dot_q4_k_a8k_scalar, BlockQ4K, BlockA8K
);
row_kernels!(
    /// Q5_K weights · 256-wide 8-bit activations.
    dot_q5_k_a8k, dot_q5_k_a8k_x4, dot_q5_k_a8k_dot, dot_q5_k_a8k_scalar, BlockQ5K, BlockA8K
);
row_kernels!(
    /// Q6_K weights · 256-wide 8-bit activations.
    dot_q6_k_a8k, dot_q6_k_a8k_x4, dot_q6_k_a8k_dot, dot_q6_k_a8k_scalar, BlockQ6K, BlockA8K
);

/// f32 · f32.
pub(crate) fn dot_f32(isa: Isa, a: &[f32], b: &[f32]) -> f32 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: see `quantize_a8`.
        Isa::Avx2(_) => unsafe { avx2::dot_f32(a, b) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: a `NeonToken` or `DotprodToken` exists only where the CPU
        // has NEON.
        Isa::Neon(_) | Isa::NeonDot(_) => unsafe { neon::dot_f32(a, b) },
        _ => dot_f32_scalar(a, b),
    }
}

/// `y += alpha * x` over f32.
pub(crate) fn axpy(isa: Isa, y: &mut [f32], alpha: f32, x: &[f32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: see `quantize_a8`.
        Isa::Avx2(_) => unsafe { avx2::axpy(y, alpha, x) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: a `NeonToken` or `DotprodToken` exists only where the CPU
        // has NEON.
        Isa::Neon(_) | Isa::NeonDot(_) => unsafe { neon::axpy(y, alpha, x) },
        _ => axpy_scalar(y, alpha, x),
    }
}

/// `out[t] = dot_f32(q, row t of rows) * scale` for the `q.len()`-wide rows
/// of `rows` (a run of attention keys): bit for bit [`dot_f32`] per row, in
/// one call.
pub(crate) fn dot_f32_rows(isa: Isa, q: &[f32], rows: &[f32], scale: f32, out: &mut [f32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: see `quantize_a8`.
        Isa::Avx2(_) => unsafe { avx2::dot_f32_rows(q, rows, scale, out) },
        _ => {
            for (o, r) in out.iter_mut().zip(rows.chunks_exact(q.len())) {
                *o = dot_f32(isa, q, r) * scale;
            }
        }
    }
}

/// `y += alphas[t] * row t of rows` for the `y.len()`-wide rows of `rows`,
/// in order (a run of attention values): bit for bit [`axpy`] per row.
pub(crate) fn axpy_rows(isa: Isa, y: &mut [f32], alphas: &[f32], rows: &[f32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: see `quantize_a8`.
        Isa::Avx2(_) => unsafe { avx2::axpy_rows(y, alphas, rows) },
        _ => {
            for (a, r) in alphas.iter().zip(rows.chunks_exact(y.len())) {
                axpy(isa, y, *a, r);
            }
        }
    }
}

row_kernels!(
    /// Q2_K weights · 256-wide 8-bit activations.
    dot_q2_k_a8k, dot_q2_k_a8k_x4, dot_q2_k_a8k_scalar, BlockQ2K, BlockA8K
);
row_kernels!(
    /// Q3_K weights · 256-wide 8-bit activations.
    dot_q3_k_a8k, dot_q3_k_a8k_x4, dot_q3_k_a8k_scalar, BlockQ3K, BlockA8K
);
row_kernels!(
    /// F16 weights · f32 activations (accumulated in f32).
    dot_f16, dot_f16_x4, dot_f16_scalar, half::f16, f32
);

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

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

    /// Every instruction set this CPU has (not just the best) against the
    /// scalar reference.
    #[test]
    fn simd_matches_scalar() {
        let all = Isa::available();
        eprintln!(
            "instruction sets: {:?}",
            all.iter().map(|i| i.name()).collect::<Vec<_>>()
        );
        for isa in all {
            simd_matches_scalar_on(isa);
        }
    }

    fn simd_matches_scalar_on(isa: Isa) {
        let n = 256;
        let x = rand_vec(n, 1);
        let za = BlockA8 {
            d: 0.0,
            qs: [0; 32],
        };
        let zs = BlockA8S {
            d: 0.0,
            s: 0.0,
            qs: [0; 32],
        };
        let mut c0 = vec![za; n / 32];
        let mut d0 = vec![za; n / 32];
        quantize_a8_scalar(&x, &mut c0);
        quantize_a8(isa, &x, &mut d0);
        for (p, q) in c0.iter().zip(&d0) {
            assert_eq!(p.qs, q.qs, "{}", isa.name());
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
                    "{} x4 lane {k}, {nb} blocks",
                    isa.name()
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
        let close = |a: f32, b: f32| (a - b).abs() <= 1e-3 * (1.0 + a.abs());
        // Odd lengths exercise every tail of the f32 loops.
        for len in [n + 3, 21, 7, 0] {
            let y = rand_vec(len, 2);
            let z = rand_vec(len, 3);
            assert!(close(dot_f32_scalar(&y, &z), dot_f32(isa, &y, &z)));
            // axpy: one fused multiply-add per element, bit for bit.
            let (mut p, mut q) = (y.clone(), y.clone());
            axpy_scalar(&mut p, 0.37, &z);
            axpy(isa, &mut q, 0.37, &z);
            assert_eq!(p, q, "{} axpy, {len}", isa.name());
        }
    }

    #[test]
    fn shoal_isa_choice() {
        let all = Isa::available();
        let best = *all.last().unwrap_or(&Isa::Scalar);
        assert_eq!(Isa::choose(Some("scalar"), &all), Isa::Scalar);
        assert_eq!(Isa::choose(None, &all), best);
        assert_eq!(Isa::choose(Some("bogus"), &all), best);
        let neon = Isa::choose(Some("neon"), &all);
        #[cfg(target_arch = "aarch64")]
        {
            // Every aarch64 CPU shoal runs on has NEON; dotprod is optional
            // and must be listed exactly when the CPU reports it.
            assert!(matches!(neon, Isa::Neon(_)), "{neon:?}");
            let dot = std::arch::is_aarch64_feature_detected!("dotprod");
            assert_eq!(all.iter().any(|i| matches!(i, Isa::NeonDot(_))), dot);
            assert_eq!(best.name(), if dot { "neon-dotprod" } else { "neon" });
        }
        #[cfg(not(target_arch = "aarch64"))]
        assert_eq!(neon, best);
    }

    #[test]
    fn q8_quantization_is_accurate() {
        let x = rand_vec(64, 5);
        let mut q = vec![
            BlockA8 {
                d: 0.0,
                qs: [0; 32]
            };
            2
        ];
        for isa in Isa::available() {
            quantize_a8(isa, &x, &mut q);
            for (i, v) in x.iter().enumerate() {
                let b = &q[i / 32];
                let r = f32::from(b.qs[i % 32]) * b.d;
                assert!(
                    (r - v).abs() <= b.d * 0.5 + 1e-5,
                    "{}: {r} vs {v}",
                    isa.name()
                );
            }
        }
    }
}

#[cfg(test)]
mod speed {
    use super::*;
    use half::f16;

    /// Thread CPU time in seconds (contention-independent).
    fn cpu() -> f64 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: valid out-pointer.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
    }

    /// Times one weight type: rows of `cols` weights (`bsize` bytes per
    /// `blk`-wide block) dotted with one activation row (`one`) and four
    /// (`four`), over 1 MiB (cache-resident) and 64 MiB (streamed from RAM)
    /// of weights. Prints ns per weight block per activation row and GB/s of
    /// weights read.
    fn probe<W: Copy, A: Copy>(
        name: &str,
        cols: usize,
        blk: usize,
        w0: W,
        a0: A,
        one: impl Fn(&[W], &[A]) -> f32,
        four: impl Fn(&[W], [&[A]; 4]) -> [f32; 4],
    ) {
        let nb = cols / blk;
        let bsize = std::mem::size_of::<W>();
        let acts = vec![a0; nb];
        for total_mb in [1usize, 64] {
            let rows = (total_mb << 20) / (nb * bsize);
            let w = vec![w0; rows * nb];
            let reps = (128 / total_mb).max(2);
            let mut s = 0f32;
            let t = cpu();
            for _ in 0..reps {
                for r in w.chunks_exact(nb) {
                    s += one(r, &acts);
                }
            }
            let d1 = cpu() - t;
            let t = cpu();
            for _ in 0..reps / 2 {
                for r in w.chunks_exact(nb) {
                    s += four(r, [&acts, &acts, &acts, &acts])[3];
                }
            }
            let d4 = cpu() - t;
            let blocks = (reps * rows * nb) as f64;
            let b4 = (reps / 2 * rows * nb) as f64;
            eprintln!(
                "{name:6} {cols:5} wide, {total_mb:2} MiB: x1 {:6.2} ns/block {:5.1} GB/s | x4 {:6.2} ns/block/row {:5.1} GB/s ({})",
                d1 * 1e9 / blocks,
                blocks * bsize as f64 / d1 / 1e9,
                d4 * 1e9 / b4 / 4.0,
                b4 * bsize as f64 / d4 / 1e9,
                s.is_finite()
            );
        }
    }

    /// `cargo test --release --lib kernels::speed -- --ignored --nocapture`
    #[test]
    #[ignore = "timing probe, not a test"]
    fn throughput() {
        let isa = Isa::detect();
        eprintln!("isa {isa:?}");
        let h = f16::from_f32(0.01);
        let a8 = BlockA8 {
            d: 0.1,
            qs: [3; 32],
        };
        let a8s = BlockA8S {
            d: 0.1,
            s: 1.0,
            qs: [3; 32],
        };
        let a8k = BlockA8K {
            d: 0.1,
            qs: [3; 256],
            bsums: [48; 16],
        };
        for cols in [640usize, 2048] {
            let q41 = BlockQ4_1 {
                d: h,
                m: h,
                qs: [0x5a; 16],
            };
            probe(
                "Q4_1",
                cols,
                32,
                q41,
                a8s,
                |w, a| dot_q4_1_a8s(isa, w, a),
                |w, a| dot_q4_1_a8s_x4(isa, w, a),
            );
            let q80 = BlockQ8_0 { d: h, qs: [5; 32] };
            probe(
                "Q8_0",
                cols,
                32,
                q80,
                a8,
                |w, a| dot_q8_0_a8(isa, w, a),
                |w, a| dot_q8_0_a8_x4(isa, w, a),
            );
            let q50 = BlockQ5_0 {
                d: h,
                qh: [0xa5; 4],
                qs: [0x5a; 16],
            };
            probe(
                "Q5_0",
                cols,
                32,
                q50,
                a8,
                |w, a| dot_q5_0_a8(isa, w, a),
                |w, a| dot_q5_0_a8_x4(isa, w, a),
            );
            let q51 = BlockQ5_1 {
                d: h,
                m: h,
                qh: [0xa5; 4],
                qs: [0x5a; 16],
            };
            probe(
                "Q5_1",
                cols,
                32,
                q51,
                a8s,
                |w, a| dot_q5_1_a8s(isa, w, a),
                |w, a| dot_q5_1_a8s_x4(isa, w, a),
            );
        }
        // K-quant rows are multiples of 256 (Gemma 3 270M: 1024 for
        // attn_output, 2048 for ffn_down).
        for cols in [1024usize, 2048] {
            let q4k = BlockQ4K {
                d: h,
                dmin: h,
                scales: [0x9b; 12],
                qs: [0x5a; 128],
            };
            probe(
                "Q4_K",
                cols,
                256,
                q4k,
                a8k,
                |w, a| dot_q4_k_a8k(isa, w, a),
                |w, a| dot_q4_k_a8k_x4(isa, w, a),
            );
            let q5k = BlockQ5K {
                d: h,
                dmin: h,
                scales: [0x9b; 12],
                qh: [0xa5; 32],
                qs: [0x5a; 128],
            };
            probe(
                "Q5_K",
                cols,
                256,
                q5k,
                a8k,
                |w, a| dot_q5_k_a8k(isa, w, a),
                |w, a| dot_q5_k_a8k_x4(isa, w, a),
            );
            let q6k = BlockQ6K {
                ql: [0x5a; 128],
                qh: [0xa5; 64],
                scales: [7; 16],
                d: h,
            };
            probe(
                "Q6_K",
                cols,
                256,
                q6k,
                a8k,
                |w, a| dot_q6_k_a8k(isa, w, a),
                |w, a| dot_q6_k_a8k_x4(isa, w, a),
            );
        }
        low_k_and_f16(isa, h, a8k);
    }

    /// Bytes of a slice of plain blocks, viewed as candle's block type.
    fn as_candle<T: Plain, C: Plain>(s: &[T]) -> &[C] {
        // SAFETY: plain data viewed as bytes within its length.
        let b = unsafe {
            std::slice::from_raw_parts(s.as_ptr().cast::<u8>(), std::mem::size_of_val(s))
        };
        view::<C>(b).unwrap_or(&[])
    }

    /// F16, Q2_K and Q3_K: ours, then candle's `vec_dot` (what shoal called
    /// before; [`BlockA8K`] has ggml's `block_q8_K` layout) for comparison.
    fn low_k_and_f16(isa: Isa, h: f16, a8k: BlockA8K) {
        use candle_core::quantized::k_quants::{self as ck, GgmlType as _};
        for cols in [1024usize, 2048] {
            let q2k = BlockQ2K {
                scales: [0x9b; 16],
                qs: [0x5a; 64],
                d: h,
                dmin: h,
            };
            probe(
                "Q2_K",
                cols,
                256,
                q2k,
                a8k,
                |w, a| dot_q2_k_a8k(isa, w, a),
                |w, a| dot_q2_k_a8k_x4(isa, w, a),
            );
            let cq2 = |w: &[BlockQ2K], a: &[BlockA8K]| {
                ck::BlockQ2K::vec_dot(cols, as_candle(w), as_candle(a))
            };
            probe("Q2_Kc", cols, 256, q2k, a8k, cq2, |w, a| {
                a.map(|a| cq2(w, a))
            });
            let q3k = BlockQ3K {
                hmask: [0xa5; 32],
                qs: [0x5a; 64],
                scales: [0x9b; 12],
                d: h,
            };
            probe(
                "Q3_K",
                cols,
                256,
                q3k,
                a8k,
                |w, a| dot_q3_k_a8k(isa, w, a),
                |w, a| dot_q3_k_a8k_x4(isa, w, a),
            );
            let cq3 = |w: &[BlockQ3K], a: &[BlockA8K]| {
                ck::BlockQ3K::vec_dot(cols, as_candle(w), as_candle(a))
            };
            probe("Q3_Kc", cols, 256, q3k, a8k, cq3, |w, a| {
                a.map(|a| cq3(w, a))
            });
        }
        for cols in [640usize, 2048] {
            probe(
                "F16",
                cols,
                1,
                h,
                0.5f32,
                |w, a| dot_f16(isa, w, a),
                |w, a| dot_f16_x4(isa, w, a),
            );
            // candle multiplied F16 weights with an f16 activation row.
            let cf = |w: &[f16], a: &[f16]| <f16 as ck::GgmlType>::vec_dot(cols, w, a);
            probe("F16c", cols, 1, h, h, cf, |w, a| a.map(|a| cf(w, a)));
        }
    }
}
