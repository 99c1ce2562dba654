//! Tests of the Q5 and K-quant kernels: every SIMD kernel of every
//! instruction set the CPU has ([`Isa::available`]) against its scalar
//! version, both against the exact product of the weights as candle
//! dequantizes them (an independent reference), and the 1×4 kernels bit for
//! bit against the single-row ones.

use super::*;
use crate::gguf::GgmlType;
use crate::inference::quant::dequant;
use half::f16;

fn lcg(seed: &mut u64) -> u64 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    *seed >> 33
}

fn rand_f32(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| (lcg(&mut s) as f32 / (1u64 << 31) as f32 * 2.0 - 1.0) * 3.0)
        .collect()
}

/// How the weight blocks are filled.
#[derive(Clone, Copy, Debug)]
enum Fill {
    /// Random bytes, small random scales.
    Random,
    /// Every quant bit set, scales at f16 max.
    AllMax,
    /// Random quants, zero scales.
    ZeroScale,
}

/// `nb` weight blocks of `T` (byte size `size`) in an 8-aligned buffer,
/// with `set` fixing the scale fields.
fn blocks<T: Plain>(nb: usize, fill: Fill, seed: u64, set: impl Fn(&mut T, f16, f16)) -> Vec<u64> {
    let size = std::mem::size_of::<T>();
    let mut buf = vec![0u64; (nb * size).div_ceil(8)];
    let mut s = seed;
    // SAFETY: u64 storage viewed as bytes within its length.
    let bytes = unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast::<u8>(), nb * size) };
    for b in bytes.iter_mut() {
        *b = match fill {
            Fill::AllMax => 0xff,
            _ => lcg(&mut s) as u8,
        };
    }
    let mut s2 = seed ^ 0x5555;
    let Some(bl) = view_mut::<T>(bytes) else {
        panic!("block view");
    };
    for b in bl {
        let (d, m) = match fill {
            Fill::Random => (
                f16::from_f32(0.001 + (lcg(&mut s2) % 1000) as f32 * 1e-5),
                f16::from_f32((lcg(&mut s2) % 1000) as f32 * 1e-5 - 0.005),
            ),
            Fill::AllMax => (f16::MAX, f16::MAX),
            Fill::ZeroScale => (f16::ZERO, f16::ZERO),
        };
        set(b, d, m);
    }
    buf
}

fn bytes_of(buf: &[u64], len: usize) -> &[u8] {
    // SAFETY: u64 storage viewed as bytes within its length.
    unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), len) }
}

/// Σ w_i · a_i in f64 over the dequantized weights, and Σ |w_i · a_i|.
fn exact(ty: GgmlType, wbytes: &[u8], acts: &[f32]) -> (f64, f64) {
    let mut w = vec![0f32; acts.len()];
    dequant(ty, wbytes, &mut w);
    w.iter().zip(acts).fold((0.0, 0.0), |(s, m), (&x, &y)| {
        let p = f64::from(x) * f64::from(y);
        (s + p, m + p.abs())
    })
}

fn check(what: &str, got: f32, want: f64, mag: f64) {
    let tol = 2e-5 * mag + 1e-6;
    assert!(
        got.is_finite() && (f64::from(got) - want).abs() <= tol,
        "{what}: {got} vs exact {want} (tol {tol})"
    );
}

/// 32-wide activations for 32-wide weight blocks: (A8, A8S, the values they
/// encode).
fn acts32(nb: usize, seed: u64) -> (Vec<BlockA8>, Vec<BlockA8S>, Vec<f32>) {
    let x = rand_f32(nb * 32, seed);
    let za = BlockA8 {
        d: 0.0,
        qs: [0; 32],
    };
    let zs = BlockA8S {
        d: 0.0,
        s: 0.0,
        qs: [0; 32],
    };
    let (mut a, mut s) = (vec![za; nb], vec![zs; nb]);
    quantize_a8(Isa::detect(), &x, &mut a);
    quantize_a8s(Isa::detect(), &x, &mut s);
    let vals = a
        .iter()
        .flat_map(|b| b.qs.map(|q| f32::from(q) * b.d))
        .collect();
    (a, s, vals)
}

fn acts256(nb: usize, seed: u64) -> (Vec<BlockA8K>, Vec<f32>) {
    let x = rand_f32(nb * 256, seed);
    let z = BlockA8K {
        d: 0.0,
        qs: [0; 256],
        bsums: [0; 16],
    };
    let mut a = vec![z; nb];
    quantize_a8k(Isa::detect(), &x, &mut a);
    let vals = a
        .iter()
        .flat_map(|b| b.qs.map(|q| f32::from(q) * b.d))
        .collect();
    (a, vals)
}

const FILLS: [Fill; 3] = [Fill::Random, Fill::AllMax, Fill::ZeroScale];

/// Runs one weight type through single-row SIMD, scalar, x4 and exact.
macro_rules! check_type {
    ($ty:expr, $w:ty, $acts:expr, $one:ident, $four:ident, $scalar:ident, $set:expr) => {{
        for isa in Isa::available() {
            for nb in [1usize, 2, 3, 7, 8] {
                for fill in FILLS {
                    let buf = blocks::<$w>(nb, fill, 11 + nb as u64, $set);
                    let wb = bytes_of(&buf, nb * std::mem::size_of::<$w>());
                    let Some(w) = view::<$w>(wb) else {
                        panic!("view");
                    };
                    let rows: Vec<_> = (0..3).map(|k| $acts(nb, 100 + k)).collect();
                    let what = format!("{} {:?} {nb} blocks {fill:?}", isa.name(), $ty);
                    for (a, vals) in &rows {
                        let (want, mag) = exact($ty, wb, vals);
                        let simd = $one(isa, w, a);
                        check(&format!("{what} simd"), simd, want, mag);
                        check(&format!("{what} scalar"), $scalar(w, a), want, mag);
                        if matches!(fill, Fill::ZeroScale) {
                            assert_eq!(simd, 0.0, "{what}");
                        }
                    }
                    // Lanes 0..4 hold rows 0, 1, 2, 1: every lane must be the
                    // single-row result bit for bit.
                    let order = [0, 1, 2, 1];
                    let four = $four(isa, w, order.map(|k| &rows[k].0[..]));
                    for (lane, k) in order.into_iter().enumerate() {
                        assert_eq!(
                            four[lane].to_bits(),
                            $one(isa, w, &rows[k].0).to_bits(),
                            "{what} x4 lane {lane}"
                        );
                    }
                }
            }
        }
    }};
}

fn a8(nb: usize, seed: u64) -> (Vec<BlockA8>, Vec<f32>) {
    let (a, _, v) = acts32(nb, seed);
    (a, v)
}

fn a8s(nb: usize, seed: u64) -> (Vec<BlockA8S>, Vec<f32>) {
    let (_, s, v) = acts32(nb, seed);
    (s, v)
}

/// Q4_0 has no 1×4 kernel: four single-row calls stand in for it.
fn dot_q4_0_a8_x4(isa: Isa, w: &[BlockQ4_0], a: [&[BlockA8]; 4]) -> [f32; 4] {
    a.map(|a| dot_q4_0_a8(isa, w, a))
}

#[test]
fn q4_0_kernel() {
    check_type!(
        GgmlType::Q4_0,
        BlockQ4_0,
        a8,
        dot_q4_0_a8,
        dot_q4_0_a8_x4,
        dot_q4_0_a8_scalar,
        |b: &mut BlockQ4_0, d, _| b.d = d
    );
}

#[test]
fn q4_1_kernel() {
    check_type!(
        GgmlType::Q4_1,
        BlockQ4_1,
        a8s,
        dot_q4_1_a8s,
        dot_q4_1_a8s_x4,
        dot_q4_1_a8s_scalar,
        |b: &mut BlockQ4_1, d, m| {
            b.d = d;
            b.m = m;
        }
    );
}

#[test]
fn q8_0_kernel() {
    check_type!(
        GgmlType::Q8_0,
        BlockQ8_0,
        a8,
        dot_q8_0_a8,
        dot_q8_0_a8_x4,
        dot_q8_0_a8_scalar,
        |b: &mut BlockQ8_0, d, _| b.d = d
    );
}

#[test]
fn q5_0_kernel() {
    check_type!(
        GgmlType::Q5_0,
        BlockQ5_0,
        a8,
        dot_q5_0_a8,
        dot_q5_0_a8_x4,
        dot_q5_0_a8_scalar,
        |b: &mut BlockQ5_0, d, _| b.d = d
    );
}

#[test]
fn q5_1_kernel() {
    check_type!(
        GgmlType::Q5_1,
        BlockQ5_1,
        a8s,
        dot_q5_1_a8s,
        dot_q5_1_a8s_x4,
        dot_q5_1_a8s_scalar,
        |b: &mut BlockQ5_1, d, m| {
            b.d = d;
            b.m = m;
        }
    );
}

#[test]
fn q4_k_kernel() {
    check_type!(
        GgmlType::Q4_K,
        BlockQ4K,
        acts256,
        dot_q4_k_a8k,
        dot_q4_k_a8k_x4,
        dot_q4_k_a8k_scalar,
        |b: &mut BlockQ4K, d, m| {
            b.d = d;
            b.dmin = f16::from_f32(m.to_f32().abs());
        }
    );
}

#[test]
fn q5_k_kernel() {
    check_type!(
        GgmlType::Q5_K,
        BlockQ5K,
        acts256,
        dot_q5_k_a8k,
        dot_q5_k_a8k_x4,
        dot_q5_k_a8k_scalar,
        |b: &mut BlockQ5K, d, m| {
            b.d = d;
            b.dmin = f16::from_f32(m.to_f32().abs());
        }
    );
}

#[test]
fn q6_k_kernel() {
    check_type!(
        GgmlType::Q6_K,
        BlockQ6K,
        acts256,
        dot_q6_k_a8k,
        dot_q6_k_a8k_x4,
        dot_q6_k_a8k_scalar,
        |b: &mut BlockQ6K, d, _| b.d = d
    );
}

/// All-max Q6_K blocks have every scale at -1 (0xff); the most negative
/// and most positive i8 scales must work too.
#[test]
fn q6_k_extreme_scales() {
    for (isa, sc) in Isa::available()
        .into_iter()
        .flat_map(|isa| [(isa, i8::MIN), (isa, i8::MAX)])
    {
        let buf = blocks::<BlockQ6K>(3, Fill::AllMax, 5, |b: &mut BlockQ6K, d, _| {
            b.d = d;
            b.scales = [sc; 16];
        });
        let wb = bytes_of(&buf, 3 * std::mem::size_of::<BlockQ6K>());
        let Some(w) = view::<BlockQ6K>(wb) else {
            panic!("view");
        };
        let (a, vals) = acts256(3, 9);
        let (want, mag) = exact(GgmlType::Q6_K, wb, &vals);
        check("q6_k extreme", dot_q6_k_a8k(isa, w, &a), want, mag);
    }
}

#[test]
fn a8k_quantization() {
    for isa in Isa::available() {
        a8k_quantization_on(isa);
    }
}

fn a8k_quantization_on(isa: Isa) {
    let x = rand_f32(3 * 256, 21);
    let z = BlockA8K {
        d: 0.0,
        qs: [0; 256],
        bsums: [0; 16],
    };
    let (mut p, mut q) = (vec![z; 3], vec![z; 3]);
    quantize_a8k_scalar(&x, &mut p);
    quantize_a8k(isa, &x, &mut q);
    for (k, (p, q)) in p.iter().zip(&q).enumerate() {
        assert_eq!(p.qs, q.qs, "block {k}");
        assert_eq!(p.bsums, q.bsums);
        assert_eq!(p.d.to_bits(), q.d.to_bits());
        for (i, v) in x[k * 256..(k + 1) * 256].iter().enumerate() {
            let r = f32::from(q.qs[i]) * q.d;
            assert!((r - v).abs() <= q.d * 0.5 + 1e-5, "{r} vs {v}");
        }
        let s: i32 = q.qs[16..32].iter().map(|&v| i32::from(v)).sum();
        assert_eq!(i32::from(q.bsums[1]), s);
    }
    // A zero row quantizes to zeros with a zero scale.
    let mut zq = vec![z; 1];
    quantize_a8k(isa, &[0.0; 256], &mut zq);
    assert_eq!(zq[0].d, 0.0);
    assert!(zq[0].qs.iter().all(|&v| v == 0));
}

// ---------------------------------------------------------------------------
// F16, Q2_K and Q3_K: our kernels (they replaced candle's in the hot path).
// Every instruction set this CPU has against the scalar reference, the scalar
// reference against candle's dequantization (an independent oracle), and the
// 1×4 kernels bit for bit against the single-row ones.

/// Σ w_i · a_i in f64 over the weights as candle dequantizes them (`T` is
/// candle's block type), and Σ |w_i · a_i|.
fn candle_exact<T: candle_core::quantized::k_quants::GgmlType + Plain>(
    wbytes: &[u8],
    acts: &[f32],
) -> (f64, f64) {
    let Some(blocks) = view::<T>(wbytes) else {
        panic!("candle view");
    };
    let mut w = vec![0f32; acts.len()];
    T::to_float(blocks, &mut w);
    w.iter().zip(acts).fold((0.0, 0.0), |(s, m), (&x, &y)| {
        let p = f64::from(x) * f64::from(y);
        (s + p, m + p.abs())
    })
}

/// One K-quant weight type against 256-wide activations on every ISA.
macro_rules! check_low_k {
    ($w:ty, $cw:ty, $one:ident, $four:ident, $scalar:ident, $set:expr) => {{
        for nb in [1usize, 2, 3, 5, 7, 8, 9] {
            for fill in FILLS {
                let buf = blocks::<$w>(nb, fill, 31 + nb as u64, $set);
                let wb = bytes_of(&buf, nb * std::mem::size_of::<$w>());
                let Some(w) = view::<$w>(wb) else {
                    panic!("view");
                };
                let rows: Vec<_> = (0..3).map(|k| acts256(nb, 200 + k)).collect();
                for isa in Isa::available() {
                    let what = format!("{} {nb} blocks {fill:?} {}", stringify!($w), isa.name());
                    for (a, vals) in &rows {
                        let (want, mag) = candle_exact::<$cw>(wb, vals);
                        let got = $one(isa, w, a);
                        let reference = $scalar(w, a);
                        check(&format!("{what} kernel"), got, want, mag);
                        check(&format!("{what} scalar"), reference, want, mag);
                        let tol = 2e-6 * mag + 1e-6;
                        assert!(
                            f64::from((got - reference).abs()) <= tol,
                            "{what}: {got} vs scalar {reference} (tol {tol})"
                        );
                        if matches!(fill, Fill::ZeroScale) {
                            assert_eq!(got, 0.0, "{what}");
                        }
                    }
                    let order = [0, 1, 2, 1];
                    let four = $four(isa, w, order.map(|k| &rows[k].0[..]));
                    for (lane, k) in order.into_iter().enumerate() {
                        assert_eq!(
                            four[lane].to_bits(),
                            $one(isa, w, &rows[k].0).to_bits(),
                            "{what} x4 lane {lane}"
                        );
                    }
                }
            }
        }
    }};
}

#[test]
fn q2_k_kernel() {
    check_low_k!(
        BlockQ2K,
        candle_core::quantized::k_quants::BlockQ2K,
        dot_q2_k_a8k,
        dot_q2_k_a8k_x4,
        dot_q2_k_a8k_scalar,
        |b: &mut BlockQ2K, d, m| {
            b.d = d;
            b.dmin = f16::from_f32(m.to_f32().abs());
        }
    );
}

#[test]
fn q3_k_kernel() {
    check_low_k!(
        BlockQ3K,
        candle_core::quantized::k_quants::BlockQ3K,
        dot_q3_k_a8k,
        dot_q3_k_a8k_x4,
        dot_q3_k_a8k_scalar,
        |b: &mut BlockQ3K, d, _| b.d = d
    );
}

/// Q3_K's extreme scales (6-bit 0 and 63, i.e. -32 and 31) and high-bit
/// patterns (all clear: every quant -4..=-1; all set: 0..=3), on every ISA.
#[test]
fn q3_k_extremes() {
    for (scale_byte, hmask) in [(0x00u8, 0x00u8), (0xff, 0xff), (0x00, 0xff), (0xff, 0x00)] {
        let buf = blocks::<BlockQ3K>(3, Fill::Random, 77, |b: &mut BlockQ3K, d, _| {
            b.d = d;
            b.scales = [scale_byte; 12];
            b.hmask = [hmask; 32];
        });
        let wb = bytes_of(&buf, 3 * std::mem::size_of::<BlockQ3K>());
        let Some(w) = view::<BlockQ3K>(wb) else {
            panic!("view");
        };
        let (a, vals) = acts256(3, 9);
        let (want, mag) = candle_exact::<candle_core::quantized::k_quants::BlockQ3K>(wb, &vals);
        for isa in Isa::available() {
            let what = format!(
                "q3_k scales {scale_byte:#x} hmask {hmask:#x} {}",
                isa.name()
            );
            check(&what, dot_q3_k_a8k(isa, w, &a), want, mag);
        }
        check(
            "q3_k extremes scalar",
            dot_q3_k_a8k_scalar(w, &a),
            want,
            mag,
        );
    }
}

/// The Q3_K scale unpacking against candle's dequantization: a block whose
/// quants are all 1 (low bits 01, high bit set) dequantizes to `d * (sc -
/// 32)` per sub-block.
#[test]
fn q3_k_scales_unpack() {
    let mut s = 5u64;
    for _ in 0..20 {
        let b = BlockQ3K {
            hmask: [0xff; 32],
            qs: [0x55; 64],
            scales: std::array::from_fn(|_| lcg(&mut s) as u8),
            d: f16::ONE,
        };
        let cb: &candle_core::quantized::k_quants::BlockQ3K = {
            let bytes = {
                // SAFETY: a plain repr(C) block viewed as its bytes.
                unsafe {
                    std::slice::from_raw_parts(
                        (&b as *const BlockQ3K).cast::<u8>(),
                        std::mem::size_of::<BlockQ3K>(),
                    )
                }
            };
            match view::<candle_core::quantized::k_quants::BlockQ3K>(bytes) {
                Some([c]) => c,
                _ => panic!("view"),
            }
        };
        let mut w = [0f32; 256];
        candle_core::quantized::k_quants::GgmlType::to_float(std::slice::from_ref(cb), &mut w);
        let sc = scalar::scales_q3k(&b.scales);
        for (j, chunk) in w.chunks_exact(16).enumerate() {
            assert!(chunk.iter().all(|&v| v == f32::from(sc[j])), "scale {j}");
        }
    }
}

/// F16 weights · f32 activations: odd lengths (the 8-wide step and the
/// scalar tail), every ISA against the scalar reference and the exact f64
/// product, and the 1×4 form bit for bit.
#[test]
fn f16_kernel() {
    for n in [1usize, 7, 8, 15, 16, 17, 31, 33, 640, 1003, 2048] {
        let w: Vec<f16> = rand_f32(n, 300 + n as u64)
            .into_iter()
            .map(f16::from_f32)
            .collect();
        let rows: Vec<Vec<f32>> = (0..3).map(|k| rand_f32(n, 400 + k)).collect();
        for isa in Isa::available() {
            let what = format!("f16 {n} {}", isa.name());
            for a in &rows {
                let (want, mag) = w.iter().zip(a).fold((0f64, 0f64), |(s, m), (x, y)| {
                    let p = f64::from(x.to_f32()) * f64::from(*y);
                    (s + p, m + p.abs())
                });
                check(&format!("{what} kernel"), dot_f16(isa, &w, a), want, mag);
                check(&format!("{what} scalar"), dot_f16_scalar(&w, a), want, mag);
            }
            let order = [0, 1, 2, 1];
            let four = dot_f16_x4(isa, &w, order.map(|k| &rows[k][..]));
            for (lane, k) in order.into_iter().enumerate() {
                assert_eq!(
                    four[lane].to_bits(),
                    dot_f16(isa, &w, &rows[k]).to_bits(),
                    "{what} x4 lane {lane}"
                );
            }
        }
    }
    // Extreme values stay finite where the exact product is.
    let w = vec![f16::MAX; 40];
    let a = vec![1.0f32; 40];
    for isa in Isa::available() {
        assert_eq!(dot_f16(isa, &w, &a), 65504.0 * 40.0, "{}", isa.name());
    }
}
