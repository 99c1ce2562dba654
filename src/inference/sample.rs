//! Token sampling: greedy, temperature, top-k, top-p, min-p, repetition
//! penalty, with a seeded generator (same seed and inputs → same tokens).

use super::InferenceError;

/// Sampling parameters. The default is greedy decoding.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplerConfig {
    /// Softmax temperature; `0` means greedy (argmax).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (0 = off).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1 = off).
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` × the best one (0 = off).
    pub min_p: f32,
    /// Penalty for tokens among the last `repeat_last_n` (1 = off), as in
    /// llama.cpp: positive logits are divided by it, negative ones multiplied.
    pub repeat_penalty: f32,
    /// How many recent tokens the repetition penalty looks at.
    pub repeat_last_n: usize,
    /// Seed of the random generator.
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 0,
        }
    }
}

impl SamplerConfig {
    /// Checks ranges.
    pub fn validate(&self) -> Result<(), InferenceError> {
        let bad = |m: &str| Err(InferenceError::InvalidParameter(m.to_owned()));
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad("temperature must be a finite number ≥ 0");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p must be in (0, 1]");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p must be in [0, 1]");
        }
        if !(self.repeat_penalty > 0.0 && self.repeat_penalty.is_finite()) {
            return bad("repeat_penalty must be > 0");
        }
        Ok(())
    }
}

/// A seeded sampler (xoshiro256** generator).
#[derive(Debug, Clone)]
pub struct Sampler {
    cfg: SamplerConfig,
    s: Xoshiro,
    /// Scratch of [`Sampler::sample`], kept between calls so a token costs
    /// no allocation: sort keys of the candidates sorted so far (a prefix
    /// of the full order), then their probabilities.
    keys: Vec<u64>,
    probs: Vec<f64>,
    /// Scratch of the repetition penalty: the distinct recent tokens.
    recent: Vec<u32>,
}

/// The xoshiro256** generator of a sampler, seeded through splitmix64.
#[derive(Debug, Clone)]
struct Xoshiro([u64; 4]);

impl Xoshiro {
    fn seeded(seed: u64) -> Xoshiro {
        let mut x = seed;
        Xoshiro([
            splitmix(&mut x),
            splitmix(&mut x),
            splitmix(&mut x),
            splitmix(&mut x),
        ])
    }

    fn next_u64(&mut self) -> u64 {
        let s = &mut self.0;
        let r = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        r
    }

    /// Uniform in [0, 1).
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Bands of the scaled logit `x = (l - max) / temperature` in which the
/// candidates are sorted, best first, one band at a time and only as far
/// as a step needs: band `j` holds `BANDS[j+1] <= x < BANDS[j]`.
/// Weights `exp(x)` of the bands: 1..0.05, ..1.2e-4, ..2e-9, ..4e-18, less.
const BANDS: [f32; 6] = [f32::INFINITY, -3.0, -9.0, -20.0, -40.0, f32::NEG_INFINITY];

/// Sort key of a candidate: ascending keys are descending logits (in
/// `f32::total_cmp` order), ties by ascending index: the definition's order.
fn key(logit: f32, index: usize) -> u64 {
    let b = logit.to_bits();
    // Ascending `total_cmp` order as an unsigned integer, then reversed.
    let ordered = if b >> 31 == 1 { !b } else { b | 0x8000_0000 };
    (u64::from(!ordered) << 32) | index as u64
}

fn key_index(k: u64) -> usize {
    (k & 0xffff_ffff) as usize
}

/// `2^(j/64)` for `j` in 0..64, the nearest f64 (bits; computed once with
/// 60-digit decimal arithmetic).
#[rustfmt::skip]
const EXP2_64THS: [u64; 64] = [
    0x3ff0_0000_0000_0000, 0x3ff0_2c9a_3e77_8061, 0x3ff0_59b0_d315_8574, 0x3ff0_8745_1875_9bc8,
    0x3ff0_b558_6cf9_890f, 0x3ff0_e3ec_32d3_d1a2, 0x3ff1_1301_d012_5b51, 0x3ff1_429a_aea9_2de0,
    0x3ff1_72b8_3c7d_517b, 0x3ff1_a35b_eb6f_cb75, 0x3ff1_d487_3168_b9aa, 0x3ff2_063b_8862_8cd6,
    0x3ff2_387a_6e75_6238, 0x3ff2_6b45_65e2_7cdd, 0x3ff2_9e9d_f51f_dee1, 0x3ff2_d285_a6e4_030b,
    0x3ff3_06fe_0a31_b715, 0x3ff3_3c08_b264_16ff, 0x3ff3_71a7_373a_a9cb, 0x3ff3_a7db_34e5_9ff7,
    0x3ff3_dea6_4c12_3422, 0x3ff4_160a_21f7_2e2a, 0x3ff4_4e08_6061_892d, 0x3ff4_86a2_b5c1_3cd0,
    0x3ff4_bfda_d536_2a27, 0x3ff4_f9b2_769d_2ca7, 0x3ff5_342b_569d_4f82, 0x3ff5_6f47_36b5_27da,
    0x3ff5_ab07_dd48_5429, 0x3ff5_e76f_15ad_2148, 0x3ff6_247e_b03a_5585, 0x3ff6_6238_8255_2225,
    0x3ff6_a09e_667f_3bcd, 0x3ff6_dfb2_3c65_1a2f, 0x3ff7_1f75_e8ec_5f74, 0x3ff7_5feb_5642_67c9,
    0x3ff7_a114_73eb_0187, 0x3ff7_e2f3_36cf_4e62, 0x3ff8_2589_994c_ce13, 0x3ff8_68d9_9b44_92ed,
    0x3ff8_ace5_422a_a0db, 0x3ff8_f1ae_9915_7736, 0x3ff9_3737_b0cd_c5e5, 0x3ff9_7d82_9fde_4e50,
    0x3ff9_c491_82a3_f090, 0x3ffa_0c66_7b5d_e565, 0x3ffa_5503_b23e_255d, 0x3ffa_9e6b_5579_fdbf,
    0x3ffa_e89f_995a_d3ad, 0x3ffb_33a2_b84f_15fb, 0x3ffb_7f76_f2fb_5e47, 0x3ffb_cc1e_904b_c1d2,
    0x3ffc_199b_dd85_529c, 0x3ffc_67f1_2e57_d14b, 0x3ffc_b720_dcef_9069, 0x3ffd_072d_4a07_897c,
    0x3ffd_5818_dcfb_a487, 0x3ffd_a9e6_03db_3285, 0x3ffd_fc97_337b_9b5f, 0x3ffe_502e_e78b_3ff6,
    0x3ffe_a4af_a2a4_90da, 0x3ffe_fa1b_ee61_5a27, 0x3fff_5076_5b6e_4540, 0x3fff_a7c1_819e_90d8,
];

/// `e^x` for `x <= 0` in f64, within 2 ulp; 0 below -708 (where `e^x` is
/// below 1e-307, nothing next to the best candidate's weight 1). As musl's
/// `exp`: `x = (64 q + j) ln2/64 + r`, `e^x = 2^q 2^(j/64) e^r` with a table
/// and a degree-5 Taylor series on `|r| <= ln2/128` (remainder < 4e-17).
/// Plain multiplications and additions (no fused multiply-add), so every
/// build, x86 or ARM, scalar or vectorized, gives the same bits.
#[inline(always)]
fn exp_neg(x: f64) -> f64 {
    const SHIFT: f64 = 6_755_399_441_055_744.0; // 1.5 * 2^52: rounds to an integer
    // ln 2 / 64 split as fdlibm's ln 2: the high part has 21 trailing zero
    // bits, so `n * LN2_HI` is exact for |n| < 2^21.
    const LN2_HI: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000) / 64.0;
    const LN2_LO: f64 = f64::from_bits(0x3dea_39ef_3579_3c76) / 64.0;
    const INV: f64 = 64.0 * std::f64::consts::LOG2_E;
    let xc = if x >= -708.0 { x } else { -708.0 };
    let t = xc * INV + SHIFT;
    let n = t - SHIFT;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0)))));
    // The low bits of `t` are n = 64 q + j; shifted by 46 they put q in the
    // exponent (n >= -65,400: q >= -1022, a normal number).
    let bits = t.to_bits();
    let j = (bits & 63) as usize;
    let scale = f64::from_bits(EXP2_64THS[j].wrapping_add(bits.wrapping_sub(j as u64) << 46));
    if x >= -708.0 { scale * p } else { 0.0 }
}

/// The softmax denominator over every finite logit: the sum of
/// `exp_neg((l - max) / t)` (0 for the others), in blocks of 256 weights
/// (a map the compiler vectorizes), each block summed in 8 lanes by index.
#[inline(always)]
fn weight_sum_body(logits: &[f32], max: f32, t: f32) -> f64 {
    const B: usize = 256;
    const L: usize = 8;
    let mut w = [0.0f64; B];
    let mut acc = [0.0f64; L];
    for block in logits.chunks(B) {
        let w = &mut w[..block.len()];
        for (w, &l) in w.iter_mut().zip(block) {
            let x = f64::from((l - max) / t);
            let e = exp_neg(x);
            *w = if l.is_finite() { e } else { 0.0 };
        }
        for (i, &v) in w.iter().enumerate() {
            acc[i % L] += v;
        }
    }
    acc.iter().sum()
}

/// [`weight_sum_body`] with 4-lane f64 vectors (same operations, same
/// order: the same bits as the baseline build).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn weight_sum_avx2(logits: &[f32], max: f32, t: f32) -> f64 {
    weight_sum_body(logits, max, t)
}

fn weight_sum(logits: &[f32], max: f32, t: f32) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above).
        return unsafe { weight_sum_avx2(logits, max, t) };
    }
    weight_sum_body(logits, max, t)
}

/// The largest finite logit and how many logits are finite (one pass,
/// vectorized by lanes).
#[inline(always)]
fn finite_max_body(logits: &[f32]) -> (f32, usize) {
    const L: usize = 16;
    let mut m = [f32::NEG_INFINITY; L];
    let mut n = [0u32; L];
    let chunks = logits.chunks_exact(L);
    let rest = chunks.remainder();
    for c in chunks {
        let c: &[f32; L] = c.try_into().unwrap_or(&[0.0; L]);
        for j in 0..L {
            // Finite: the exponent bits are not all ones.
            let fin = (c[j].to_bits() & 0x7f80_0000) != 0x7f80_0000;
            n[j] += u32::from(fin);
            let v = if fin { c[j] } else { f32::NEG_INFINITY };
            m[j] = if v > m[j] { v } else { m[j] };
        }
    }
    let mut max = f32::NEG_INFINITY;
    let mut count: usize = n.iter().map(|&x| x as usize).sum();
    for &v in m.iter().chain(rest.iter().filter(|l| l.is_finite())) {
        if v > max {
            max = v;
        }
    }
    count += rest.iter().filter(|l| l.is_finite()).count();
    (max, count)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn finite_max_avx2(logits: &[f32]) -> (f32, usize) {
    finite_max_body(logits)
}

fn finite_max(logits: &[f32]) -> (f32, usize) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above).
        return unsafe { finite_max_avx2(logits) };
    }
    finite_max_body(logits)
}

/// The sorted prefix of the candidates, grown one band at a time.
struct Sorted<'a> {
    logits: &'a [f32],
    max: f32,
    t: f32,
    /// Bands collected so far.
    bands: usize,
}

impl Sorted<'_> {
    fn scaled(&self, l: f32) -> f32 {
        (l - self.max) / self.t
    }

    /// Appends the next band's candidates, sorted, to `keys`; false when
    /// every band is in.
    fn grow(&mut self, keys: &mut Vec<u64>) -> bool {
        if self.bands + 1 >= BANDS.len() {
            return false;
        }
        let (hi, lo) = (BANDS[self.bands], BANDS[self.bands + 1]);
        self.bands += 1;
        let from = keys.len();
        let inside = |l: f32| {
            let x = (l - self.max) / self.t;
            l.is_finite() && x >= lo && x < hi
        };
        // A cheap bound first: `x >= lo` implies `l >= max + 1.001 lo t`
        // (rounding moves `x` by far less), and rounding that bound to f32
        // keeps every such `l` at or above it.
        let floor = (f64::from(self.max) + 1.001 * f64::from(lo) * f64::from(self.t)) as f32;
        const L: usize = 16;
        for (ci, chunk) in self.logits.chunks(L).enumerate() {
            if chunk.len() == L {
                let mut any = false;
                for &l in chunk {
                    any |= l >= floor;
                }
                if !any {
                    continue;
                }
            }
            for (j, &l) in chunk.iter().enumerate() {
                if inside(l) {
                    keys.push(key(l, ci * L + j));
                }
            }
        }
        keys[from..].sort_unstable();
        true
    }
}

impl Sampler {
    /// A sampler with its generator seeded from `cfg.seed`.
    pub fn new(cfg: SamplerConfig) -> Result<Self, InferenceError> {
        cfg.validate()?;
        let s = Xoshiro::seeded(cfg.seed);
        Ok(Sampler {
            cfg,
            s,
            keys: Vec::new(),
            probs: Vec::new(),
            recent: Vec::new(),
        })
    }

    /// Uniform in [0, 1).
    fn uniform(&mut self) -> f64 {
        self.s.uniform()
    }

    /// Picks the next token from `logits` (modified in place by the
    /// penalty); `history` is the sequence so far (prompt and output).
    ///
    /// The definition is in `docs/INFERENCE.md` ("Sampling"): sort the
    /// finite logits, top-k, softmax at the temperature, top-p, min-p,
    /// draw. It is computed without sorting the vocabulary: one pass finds
    /// the maximum, one sums the softmax denominator (vectorized), and the
    /// candidates are sorted band by band, best first, only as far as top-p,
    /// min-p and the draw look.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        self.penalize(logits, history);
        if self.cfg.temperature <= 0.0 {
            return argmax(logits);
        }
        let (max, finite) = finite_max(logits);
        if finite == 0 {
            return argmax(logits);
        }
        let u = self.uniform();
        self.draw(logits, max, finite, u)
    }

    /// The repetition penalty, once per distinct token among the last
    /// `repeat_last_n` of `history`.
    fn penalize(&mut self, logits: &mut [f32], history: &[u32]) {
        let c = &self.cfg;
        if c.repeat_penalty == 1.0 || c.repeat_last_n == 0 {
            return;
        }
        let from = history.len().saturating_sub(c.repeat_last_n);
        self.recent.clear();
        self.recent.extend_from_slice(&history[from..]);
        self.recent.sort_unstable();
        self.recent.dedup();
        for &t in &self.recent {
            if let Some(l) = logits.get_mut(t as usize) {
                *l = if *l > 0.0 {
                    *l / c.repeat_penalty
                } else {
                    *l * c.repeat_penalty
                };
            }
        }
    }

    /// Top-k, softmax, top-p, min-p and the draw `u` over the `finite`
    /// finite logits (at least one), whose maximum is `max`.
    // long: the definition's steps in order, each growing the sorted prefix
    // as far as it needs
    fn draw(&mut self, logits: &[f32], max: f32, finite: usize, u: f64) -> u32 {
        let c = &self.cfg;
        let mut s = Sorted {
            logits,
            max,
            t: c.temperature,
            bands: 0,
        };
        let keys = &mut self.keys;
        let probs = &mut self.probs;
        keys.clear();
        probs.clear();
        // Top-k: the candidates are the k best; sorted whole, the sum of
        // their weights in order is the denominator. Without it, every
        // finite logit is a candidate and the denominator one vectorized
        // pass.
        let (count, z) = if c.top_k > 0 && c.top_k < finite {
            while keys.len() < c.top_k && s.grow(keys) {}
            keys.truncate(c.top_k);
            let z: f64 = keys
                .iter()
                .map(|&k| exp_neg(f64::from(s.scaled(logits[key_index(k)]))))
                .sum();
            (c.top_k, z)
        } else {
            (finite, weight_sum(logits, max, c.temperature))
        };
        // Probabilities of the sorted prefix, extended by a band on demand;
        // false when there is no more.
        let mut more = |keys: &mut Vec<u64>, probs: &mut Vec<f64>| -> bool {
            if keys.len() == probs.len() && (keys.len() >= count || !s.grow(keys)) {
                return false;
            }
            keys.truncate(count);
            for &k in &keys[probs.len()..] {
                let w = exp_neg(f64::from(s.scaled(logits[key_index(k)])));
                probs.push(w / z);
            }
            true
        };
        more(keys, probs);
        // Top-p: the shortest prefix whose probability reaches top_p.
        let mut keep = count;
        if c.top_p < 1.0 {
            let mut acc = 0.0;
            let mut i = 0;
            'p: loop {
                while i < probs.len() {
                    acc += probs[i];
                    i += 1;
                    if acc >= f64::from(c.top_p) {
                        keep = i;
                        break 'p;
                    }
                }
                if !more(keys, probs) {
                    break;
                }
            }
        }
        // Min-p: the prefix at or above min_p times the best probability.
        if c.min_p > 0.0 {
            let floor = probs[0] * f64::from(c.min_p);
            let mut i = 0;
            loop {
                while i < probs.len() && i < keep && probs[i] >= floor {
                    i += 1;
                }
                if i < probs.len() || i >= keep || !more(keys, probs) {
                    break;
                }
            }
            keep = keep.min(i.max(1));
        }
        // The draw: over the kept prefix, whose total is 1 when nothing
        // was cut.
        let total = if keep == count {
            1.0
        } else {
            probs[..keep].iter().sum()
        };
        let mut r = u * total;
        let mut i = 0;
        loop {
            while i < probs.len().min(keep) {
                r -= probs[i];
                if r < 0.0 {
                    return key_index(keys[i]) as u32;
                }
                i += 1;
            }
            if i >= keep || !more(keys, probs) {
                break;
            }
        }
        // Rounding left the draw past the last kept candidate.
        keys.get(keep.min(keys.len()) - 1)
            .map_or(max_index(logits, max), |&k| key_index(k) as u32)
    }
}

/// The first index of `max` (in `total_cmp` order among finite logits).
fn max_index(logits: &[f32], max: f32) -> u32 {
    logits
        .iter()
        .position(|&l| l == max)
        .map_or(0, |i| i as u32)
}

/// Index of the largest logit (first one on ties).
pub(crate) fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        (0..100).map(|i| ((i * 37) % 17) as f32 / 4.0).collect()
    }

    #[test]
    fn greedy_is_argmax() {
        let mut s = Sampler::new(SamplerConfig::default()).expect("cfg");
        let mut l = logits();
        let want = argmax(&l);
        assert_eq!(s.sample(&mut l, &[]), want);
        assert_eq!(l[want as usize], 4.0);
    }

    #[test]
    fn same_seed_same_tokens_and_filters_hold() {
        let cfg = SamplerConfig {
            temperature: 1.0,
            top_k: 10,
            top_p: 0.9,
            min_p: 0.05,
            seed: 42,
            ..Default::default()
        };
        let run = |cfg: &SamplerConfig| {
            let mut s = Sampler::new(cfg.clone()).expect("cfg");
            (0..50)
                .map(|_| s.sample(&mut logits(), &[]))
                .collect::<Vec<_>>()
        };
        let a = run(&cfg);
        assert_eq!(a, run(&cfg));
        assert_ne!(
            a,
            run(&SamplerConfig {
                seed: 43,
                ..cfg.clone()
            })
        );
        // top_k = 1 is greedy whatever the temperature.
        let g = run(&SamplerConfig {
            top_k: 1,
            ..cfg.clone()
        });
        assert!(g.iter().all(|&t| t == argmax(&logits())));
        // Every sampled token is among the 10 best.
        let mut sorted: Vec<(usize, f32)> = logits().into_iter().enumerate().collect();
        sorted.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let top: Vec<u32> = sorted[..10].iter().map(|x| x.0 as u32).collect();
        assert!(a.iter().all(|t| top.contains(t)));
    }

    #[test]
    fn repetition_penalty_changes_choice() {
        let mut l = vec![1.0, 0.9, 0.1];
        let mut s = Sampler::new(SamplerConfig {
            repeat_penalty: 2.0,
            ..Default::default()
        })
        .expect("cfg");
        assert_eq!(s.sample(&mut l, &[0]), 1);
    }

    #[test]
    fn bad_parameters_are_refused() {
        assert!(
            Sampler::new(SamplerConfig {
                temperature: -1.0,
                ..Default::default()
            })
            .is_err()
        );
        assert!(
            Sampler::new(SamplerConfig {
                top_p: 0.0,
                ..Default::default()
            })
            .is_err()
        );
    }
}

/// The sampler as it was before it worked on partial selections (a full
/// sort and an f64 `exp` of every finite logit per token), kept verbatim as
/// the oracle the fast one must equal, token for token.
#[cfg(test)]
mod oracle {
    use super::{SamplerConfig, Xoshiro, argmax};

    pub(super) struct Oracle {
        cfg: SamplerConfig,
        s: Xoshiro,
    }

    impl Oracle {
        pub(super) fn new(cfg: SamplerConfig) -> Self {
            let s = Xoshiro::seeded(cfg.seed);
            Oracle { cfg, s }
        }

        fn uniform(&mut self) -> f64 {
            self.s.uniform()
        }

        pub(super) fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
            let c = &self.cfg;
            if c.repeat_penalty != 1.0 && c.repeat_last_n > 0 {
                let from = history.len().saturating_sub(c.repeat_last_n);
                let mut seen = std::collections::HashSet::new();
                for &t in &history[from..] {
                    if seen.insert(t)
                        && let Some(l) = logits.get_mut(t as usize)
                    {
                        *l = if *l > 0.0 {
                            *l / c.repeat_penalty
                        } else {
                            *l * c.repeat_penalty
                        };
                    }
                }
            }
            if c.temperature <= 0.0 {
                return argmax(logits);
            }
            let mut cand: Vec<(u32, f32)> = logits
                .iter()
                .enumerate()
                .filter(|(_, l)| l.is_finite())
                .map(|(i, &l)| (i as u32, l))
                .collect();
            if cand.is_empty() {
                return argmax(logits);
            }
            cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            if c.top_k > 0 {
                cand.truncate(c.top_k);
            }
            let max = cand[0].1;
            let mut probs: Vec<f64> = cand
                .iter()
                .map(|(_, l)| f64::from((l - max) / c.temperature).exp())
                .collect();
            let sum: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= sum);
            let mut keep = probs.len();
            if c.top_p < 1.0 {
                let mut acc = 0.0;
                for (i, p) in probs.iter().enumerate() {
                    acc += p;
                    if acc >= f64::from(c.top_p) {
                        keep = i + 1;
                        break;
                    }
                }
            }
            if c.min_p > 0.0 {
                let floor = probs[0] * f64::from(c.min_p);
                keep = keep.min(probs.iter().take_while(|&&p| p >= floor).count().max(1));
            }
            probs.truncate(keep);
            let total: f64 = probs.iter().sum();
            let mut r = self.uniform() * total;
            for (i, p) in probs.iter().enumerate() {
                r -= p;
                if r < 0.0 {
                    return cand[i].0;
                }
            }
            cand[keep - 1].0
        }
    }
}

/// The fast sampler against the oracle on random logits and settings.
#[cfg(test)]
mod equivalence {
    use super::oracle::Oracle;
    use super::*;

    /// A test generator (splitmix64).
    struct Rng(u64);

    impl Rng {
        fn u64(&mut self) -> u64 {
            splitmix(&mut self.0)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.u64() % n as u64) as usize
        }
        fn unit(&mut self) -> f64 {
            (self.u64() >> 11) as f64 / (1u64 << 53) as f64
        }
        fn normal(&mut self) -> f64 {
            let (a, b) = (self.unit().max(1e-300), self.unit());
            (-2.0 * a.ln()).sqrt() * (std::f64::consts::TAU * b).cos()
        }
        fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
            xs[self.below(xs.len())]
        }
    }

    /// Logits of one of several shapes: language-model-like (a few high,
    /// a broad bulk), flat, quantized (many exact ties), signed zeros, huge
    /// magnitudes, with NaN and infinities sprinkled in.
    fn logits(r: &mut Rng, n: usize) -> Vec<f32> {
        let shape = r.below(7);
        let scale = r.pick(&[0.01, 0.3, 1.0, 3.0, 10.0, 100.0]);
        let mut v: Vec<f32> = (0..n)
            .map(|_| match shape {
                0 => (r.normal() * scale) as f32,
                1 => 1.5,
                2 => ((r.normal() * scale * 2.0).round() / 2.0) as f32,
                3 => r.pick(&[0.0, -0.0, 1e-45, -1e-45]),
                4 => (r.normal() * 1e37).clamp(-3e38, 3e38) as f32,
                5 => (r.normal() * scale - 30.0 * r.unit() * scale) as f32,
                _ => (r.normal() * 2.0) as f32,
            })
            .collect();
        // Language-model-like: a handful of tokens far above the bulk.
        if shape == 6 {
            for _ in 0..r.below(6) {
                let i = r.below(n);
                v[i] = (8.0 + r.unit() * 25.0) as f32;
            }
        }
        for _ in 0..r.below(4) {
            let i = r.below(n);
            v[i] = r.pick(&[f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -f32::NAN]);
        }
        if r.below(40) == 0 {
            // Nothing finite at all.
            v.fill(r.pick(&[f32::NAN, f32::NEG_INFINITY, f32::INFINITY]));
        }
        v
    }

    fn config(r: &mut Rng) -> SamplerConfig {
        SamplerConfig {
            temperature: r.pick(&[
                0.0, 1e-30, 1e-6, 0.01, 0.3, 0.7, 1.0, 2.0, 100.0, 1e30, 3e38,
            ]),
            top_k: r.pick(&[0, 0, 0, 1, 2, 5, 40, 1000, usize::MAX]),
            top_p: r.pick(&[1.0, 1.0, 0.999_999, 0.95, 0.9, 0.5, 1e-7]),
            min_p: r.pick(&[0.0, 0.0, 1e-40, 1e-20, 1e-9, 0.05, 0.5, 1.0]),
            repeat_penalty: r.pick(&[1.0, 1.0, 1.3, 0.5]),
            repeat_last_n: r.pick(&[0, 3, 64]),
            seed: r.u64(),
        }
    }

    #[test]
    fn equals_the_full_sort_definition() {
        let mut r = Rng(7);
        let mut draws = 0;
        for case in 0..3000 {
            let n = r.pick(&[1, 2, 3, 7, 16, 17, 100, 1000, 5000]);
            let cfg = config(&mut r);
            let base = logits(&mut r, n);
            let history: Vec<u32> = (0..r.below(80)).map(|_| r.below(n + 3) as u32).collect();
            let mut fast = Sampler::new(cfg.clone()).expect("valid config");
            let mut slow = Oracle::new(cfg.clone());
            for step in 0..8 {
                let (mut a, mut b) = (base.clone(), base.clone());
                let got = fast.sample(&mut a, &history);
                let want = slow.sample(&mut b, &history);
                assert_eq!(got, want, "case {case} step {step}: {cfg:?}");
                // The penalty left the same logits behind (NaN-aware).
                assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
                draws += 1;
            }
        }
        assert_eq!(draws, 24_000);
    }

    /// Vocabulary-sized language-model-like logits, many draws each.
    #[test]
    fn equals_the_definition_on_vocabulary_sized_logits() {
        let mut r = Rng(11);
        for &n in &[49_152usize, 262_144] {
            for _ in 0..3 {
                let mut base: Vec<f32> = (0..n).map(|_| (r.normal() * 2.5) as f32).collect();
                for _ in 0..20 {
                    let i = r.below(n);
                    base[i] = (6.0 + r.unit() * 14.0) as f32;
                }
                for cfg in [
                    SamplerConfig {
                        temperature: 0.7,
                        top_p: 0.95,
                        seed: r.u64(),
                        ..Default::default()
                    },
                    SamplerConfig {
                        temperature: 1.0,
                        seed: r.u64(),
                        ..Default::default()
                    },
                    SamplerConfig {
                        temperature: 0.8,
                        top_k: 40,
                        top_p: 0.9,
                        min_p: 0.05,
                        repeat_penalty: 1.1,
                        seed: r.u64(),
                        ..Default::default()
                    },
                ] {
                    let mut fast = Sampler::new(cfg.clone()).expect("valid config");
                    let mut slow = Oracle::new(cfg.clone());
                    let history: Vec<u32> = (0..64).map(|_| r.below(n) as u32).collect();
                    for _ in 0..20 {
                        let got = fast.sample(&mut base.clone(), &history);
                        assert_eq!(got, slow.sample(&mut base.clone(), &history), "{cfg:?}");
                    }
                }
            }
        }
    }

    /// `exp_neg` against the platform's `exp`: within 2 ulp on [-708, 0],
    /// exact at 0, 0 below.
    #[test]
    fn exp_neg_is_exp() {
        let mut r = Rng(5);
        let mut worst = 0.0f64;
        for i in 0..200_000 {
            let x = match i % 3 {
                0 => -r.unit() * 708.0,
                1 => -r.unit() * 40.0,
                _ => -r.unit(),
            };
            let (got, want) = (exp_neg(x), x.exp());
            worst = worst.max(((got - want) / want).abs() / f64::EPSILON);
        }
        assert!(worst <= 2.0, "{worst} ulp");
        assert_eq!(exp_neg(0.0), 1.0);
        assert_eq!(exp_neg(-0.0), 1.0);
        assert_eq!(exp_neg(-709.0), 0.0);
        assert_eq!(exp_neg(f64::NEG_INFINITY), 0.0);
    }

    /// The vectorized denominator (AVX2 where the CPU has it) equals the
    /// plain one bit for bit.
    #[test]
    fn weight_sum_is_the_same_everywhere() {
        let mut r = Rng(9);
        for n in [1usize, 7, 8, 9, 1000, 49_152] {
            let l = logits(&mut r, n);
            let (max, finite) = finite_max(&l);
            if finite == 0 {
                continue;
            }
            for t in [0.01f32, 0.7, 1.0, 50.0] {
                assert_eq!(
                    weight_sum(&l, max, t).to_bits(),
                    weight_sum_body(&l, max, t).to_bits()
                );
            }
        }
    }

    /// Draws near the top of [0, 1) with nothing cut walk into the last
    /// bands (the flat tail) and still pick the oracle's token.
    #[test]
    fn draws_reach_the_last_bands() {
        let mut r = Rng(3);
        for case in 0..300 {
            let n = 2000;
            let l: Vec<f32> = (0..n)
                .map(|i| -(i as f32) * 0.03 + (r.normal() * 0.01) as f32)
                .collect();
            let cfg = SamplerConfig {
                temperature: r.pick(&[0.5, 1.0, 4.0]),
                min_p: r.pick(&[0.0, 1e-40]),
                ..Default::default()
            };
            let mut s = Sampler::new(cfg.clone()).expect("valid config");
            let (max, finite) = finite_max(&l);
            let u = 1.0 - r.unit() * 1e-6;
            let got = s.draw(&l, max, finite, u);
            let mut sorted: Vec<(usize, f32)> = l.iter().copied().enumerate().collect();
            sorted.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            let rank = sorted
                .iter()
                .position(|x| x.0 == got as usize)
                .expect("a token");
            // The draw is in the upper 1e-6 of the mass: near the end.
            let z: f64 = sorted
                .iter()
                .map(|x| f64::from((x.1 - max) / cfg.temperature).exp())
                .sum();
            let before: f64 = sorted[..rank]
                .iter()
                .map(|x| f64::from((x.1 - max) / cfg.temperature).exp())
                .sum();
            assert!(
                before / z <= u + 1e-12
                    && (before + f64::from((sorted[rank].1 - max) / cfg.temperature).exp()) / z
                        >= u - 1e-12,
                "case {case}"
            );
            assert!(s.keys.len() > 1);
        }
    }
}

/// Cost probe (`cargo test --release --lib inference::sample::probe --
/// --ignored --nocapture`): ns per token of the oracle (full sort) and of
/// [`Sampler::sample`] on real logits of the demo model (49,152 tokens,
/// `SHOAL_TEST_MODEL`) and Gemma 3 270M (262,144, `SHOAL_GEMMA3_MODEL`),
/// with the head size (candidates sorted).
#[cfg(test)]
mod probe {
    use super::oracle::Oracle;
    use super::*;
    use crate::inference::Model;
    use std::time::Instant;

    /// Logits of `steps` greedy steps after a chat-like prompt.
    fn real_logits(path: &str, steps: usize) -> Option<Vec<Vec<f32>>> {
        if !std::path::Path::new(path).exists() {
            eprintln!("SKIPPING: {path} is absent");
            return None;
        }
        let model = Model::load(path).ok()?;
        let tok = model.tokenizer();
        let prompt = tok.encode(
            "A student asks: why is the sky blue? Answer in two short paragraphs.\n",
            false,
            true,
        );
        let mut cache = model.new_cache();
        let mut l = model.forward(&mut cache, &prompt).ok()?;
        let mut out = Vec::new();
        for _ in 0..steps {
            let next = argmax(&l);
            out.push(l);
            l = model.forward(&mut cache, &[next]).ok()?;
        }
        Some(out)
    }

    fn median(mut v: Vec<f64>) -> f64 {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    }

    #[test]
    #[ignore = "timing probe, run by hand"]
    fn probe() {
        let demo = std::env::var("SHOAL_TEST_MODEL").unwrap_or_default();
        let gemma = std::env::var("SHOAL_GEMMA3_MODEL")
            .unwrap_or_else(|_| "/root/.cache/shoal/models/gemma-3-270m-Q4_K_M.gguf".to_owned());
        for path in [demo, gemma] {
            let Some(all) = real_logits(&path, 32) else {
                continue;
            };
            let n = all[0].len();
            for cfg in [
                SamplerConfig {
                    temperature: 0.7,
                    top_p: 0.95,
                    ..Default::default()
                },
                SamplerConfig {
                    temperature: 1.0,
                    ..Default::default()
                },
                SamplerConfig {
                    temperature: 0.8,
                    top_k: 40,
                    top_p: 0.95,
                    min_p: 0.05,
                    repeat_penalty: 1.1,
                    ..Default::default()
                },
            ] {
                let history: Vec<u32> = (0..64).map(|i| i * 97 % n as u32).collect();
                let (mut old, mut new, mut head) = (Vec::new(), Vec::new(), Vec::new());
                let mut s = Sampler::new(cfg.clone()).expect("valid config");
                let mut o = Oracle::new(cfg.clone());
                for l in &all {
                    let mut a = l.clone();
                    let t = Instant::now();
                    let x = o.sample(&mut a, &history);
                    old.push(t.elapsed().as_nanos() as f64);
                    let mut b = l.clone();
                    let t = Instant::now();
                    let y = s.sample(&mut b, &history);
                    new.push(t.elapsed().as_nanos() as f64);
                    assert_eq!(x, y);
                    head.push(s.keys.len() as f64);
                }
                eprintln!(
                    "vocab {n}: T {} top_k {} top_p {} min_p {}: full sort {:.0} ns, partial {:.0} ns ({:.0}x), head median {:.0} max {:.0}",
                    cfg.temperature,
                    cfg.top_k,
                    cfg.top_p,
                    cfg.min_p,
                    median(old.clone()),
                    median(new.clone()),
                    median(old) / median(new),
                    median(head.clone()),
                    head.iter().copied().fold(0.0, f64::max),
                );
            }
        }
    }
}

/// Cost of each pass on 262,144 synthetic logits (`cargo test --release
/// --lib inference::sample::parts_probe -- --ignored --nocapture`).
#[cfg(test)]
mod parts_probe {
    use super::*;
    use std::time::Instant;

    #[test]
    #[ignore = "timing probe, run by hand"]
    fn parts() {
        let n = 262_144;
        let l: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 1000) as f32 * 0.01 - 5.0)
            .collect();
        let time = |name: &str, f: &mut dyn FnMut() -> f64| {
            let mut best = f64::MAX;
            let mut sink = 0.0;
            for _ in 0..20 {
                let t = Instant::now();
                sink += f();
                best = best.min(t.elapsed().as_nanos() as f64);
            }
            eprintln!(
                "{name}: {:.0} ns ({:.2} ns/elt) {sink}",
                best,
                best / n as f64
            );
        };
        time("finite_max", &mut || finite_max(&l).0 as f64);
        time("weight_sum", &mut || weight_sum(&l, 4.99, 0.7));
        time("weight_sum_body", &mut || weight_sum_body(&l, 4.99, 0.7));
        let mut keys = Vec::new();
        time("grow band 0", &mut || {
            keys.clear();
            let mut s = Sorted {
                logits: &l,
                max: 4.99,
                t: 0.7,
                bands: 0,
            };
            s.grow(&mut keys);
            keys.len() as f64
        });
    }
}
