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
    s: [u64; 4],
    /// Scratch of [`Sampler::sample`], kept between calls so a token costs
    /// no allocation: sort keys of the candidates, then their weights.
    keys: Vec<u64>,
    weights: Vec<f64>,
    /// Scratch of the repetition penalty: the distinct recent tokens.
    recent: Vec<u32>,
}

fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Candidates whose scaled logit `(l - max) / temperature` (f32) is below
/// this have a weight `exp(x) < 4.3e-18 < 2^-54`: added to any sum that
/// already holds the best candidate's weight (1, or `1/sum` once
/// normalized), they do not change a single bit of it. See
/// `docs/INFERENCE.md`, "Sampling".
const NEGLIGIBLE_X: f32 = -40.0;

/// An upper bound of a negligible candidate's normalized probability
/// (`exp(-40) = 4.25e-18`, with margin).
const NEGLIGIBLE_P: f64 = 5e-18;

/// Sort key of a candidate: ascending keys are descending logits (in
/// `f32::total_cmp` order), ties by ascending index, the order of the
/// definition.
fn key(logit: f32, index: usize) -> u64 {
    let b = logit.to_bits();
    // Ascending `total_cmp` order as an unsigned integer, then reversed.
    let ordered = if b >> 31 == 1 { !b } else { b | 0x8000_0000 };
    (u64::from(!ordered) << 32) | index as u64
}

fn key_index(k: u64) -> usize {
    (k & 0xffff_ffff) as usize
}

/// The largest finite logit and how many logits are finite (one pass,
/// vectorized by lanes).
fn finite_max(logits: &[f32]) -> (f32, usize) {
    const L: usize = 16;
    let mut m = [f32::NEG_INFINITY; L];
    let mut n = [0u32; L];
    let chunks = logits.chunks_exact(L);
    let rest = chunks.remainder();
    for c in chunks {
        for j in 0..L {
            let fin = c[j].is_finite();
            n[j] += u32::from(fin);
            let v = if fin { c[j] } else { f32::NEG_INFINITY };
            if v > m[j] {
                m[j] = v;
            }
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

impl Sampler {
    /// A sampler with its generator seeded from `cfg.seed`.
    pub fn new(cfg: SamplerConfig) -> Result<Self, InferenceError> {
        cfg.validate()?;
        let mut x = cfg.seed;
        let s = [
            splitmix(&mut x),
            splitmix(&mut x),
            splitmix(&mut x),
            splitmix(&mut x),
        ];
        Ok(Sampler {
            cfg,
            s,
            keys: Vec::new(),
            weights: Vec::new(),
            recent: Vec::new(),
        })
    }

    fn next_u64(&mut self) -> u64 {
        let r = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        r
    }

    /// Uniform in [0, 1).
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Picks the next token from `logits` (modified in place by the
    /// penalty); `history` is the sequence so far (prompt and output).
    ///
    /// The result is the one of the definition in `docs/INFERENCE.md`
    /// (sort every finite logit, softmax, top-k/top-p/min-p, draw), bit
    /// for bit, but computed on the few candidates that can matter: one
    /// pass finds the maximum, a second one the candidates within
    /// `40 × temperature` of it; only those are sorted and exponentiated.
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
        match self.sample_head(logits, max, finite, u) {
            Some(t) => t,
            None => sample_sorted(&self.cfg, logits, u),
        }
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

    /// The definition computed on the head of the sorted candidates (those
    /// whose weight is not negligible); `None` in the rare cases where the
    /// negligible tail could decide (the draw ran past the head, or a tiny
    /// `min_p` reaches into the tail): the caller then sorts everything.
    // long: one pass of the definition, step by step, with the proofs
    // that the negligible tail cannot change its result
    fn sample_head(&mut self, logits: &[f32], max: f32, finite: usize, u: f64) -> Option<u32> {
        let c = &self.cfg;
        let t = c.temperature;
        let scaled = |l: f32| (l - max) / t;
        // A cheap bound first: `scaled(l) >= -40` implies `l > max - 41 t`
        // (rounding moves both sides by far less than one `t`), and
        // rounding `max - 41 t` to f32 keeps every such `l` at or above it.
        let lo = (f64::from(max) - 41.0 * f64::from(t)) as f32;
        self.keys.clear();
        const L: usize = 16;
        for (ci, chunk) in logits.chunks(L).enumerate() {
            if chunk.len() == L {
                let mut any = false;
                for &l in chunk {
                    any |= l >= lo;
                }
                if !any {
                    continue;
                }
            }
            for (j, &l) in chunk.iter().enumerate() {
                if l >= lo && l.is_finite() && scaled(l) >= NEGLIGIBLE_X {
                    self.keys.push(key(l, ci * L + j));
                }
            }
        }
        // Top-k: the k first of the sorted order are the k smallest keys.
        let k = if c.top_k > 0 {
            c.top_k.min(finite)
        } else {
            finite
        };
        if k < self.keys.len() {
            self.keys.select_nth_unstable(k - 1);
            self.keys.truncate(k);
        }
        self.keys.sort_unstable();
        let h = self.keys.len();
        // The candidates are the first `k` of the sorted finite logits; the
        // head is the first `h` of them, and `k > h` means a tail of
        // negligible ones follows.
        let tail = k > h;
        // Weights and their sum, in the sorted order. The first weight is
        // exp(0) = 1, so the sum is at least 1 and a tail weight (< 2^-54)
        // is below half an ulp of it: adding the tail changes nothing.
        self.weights.clear();
        let mut sum = 0.0f64;
        for &kk in &self.keys {
            let l = logits.get(key_index(kk)).copied().unwrap_or(max);
            let w = f64::from(scaled(l)).exp();
            sum += w;
            self.weights.push(w);
        }
        for w in &mut self.weights {
            *w /= sum;
        }
        let p = &self.weights;
        // Normalized, the first probability is 1/sum and every running sum
        // is at least that, while a tail probability is below 2^-54 of it:
        // again below half an ulp, so a running sum that does not reach
        // `top_p` in the head never does.
        let mut keep_p = k;
        if c.top_p < 1.0 {
            let mut acc = 0.0;
            for (i, q) in p.iter().enumerate() {
                acc += q;
                if acc >= f64::from(c.top_p) {
                    keep_p = i + 1;
                    break;
                }
            }
        }
        // min-p counts the prefix at or above the floor. The count is known
        // unless the whole head passes and a tail element might too; it is
        // then at least `h`, and left at `k`: `keep` is exact whenever it
        // is at most `h` (`keep_p <= h`), and beyond the head otherwise.
        let mut keep_m = k;
        if c.min_p > 0.0 {
            let floor = p.first().copied().unwrap_or(0.0) * f64::from(c.min_p);
            let n = p.iter().take_while(|&&q| q >= floor).count();
            if n < h || !tail || floor > NEGLIGIBLE_P {
                keep_m = n.max(1);
            }
        }
        let keep = keep_p.min(keep_m);
        // The draw: the total of the kept probabilities equals the head's
        // (a kept tail adds nothing, as above).
        let n = keep.min(h);
        let total: f64 = p[..n].iter().sum();
        let mut r = u * total;
        for (i, q) in p[..n].iter().enumerate() {
            r -= q;
            if r < 0.0 {
                return Some(key_index(self.keys[i]) as u32);
            }
        }
        // The walk ran off the head: the answer is the last kept token if
        // it is in the head; otherwise the tail decides.
        if keep <= h {
            return self.keys.get(keep - 1).map(|&kk| key_index(kk) as u32);
        }
        None
    }
}

/// The definition, by a full sort: every finite logit sorted (descending,
/// ties by index), top-k, f64 softmax at the temperature, top-p, min-p,
/// then the draw `u`. The fallback of [`Sampler::sample`]; `logits` has a
/// finite value.
fn sample_sorted(c: &SamplerConfig, logits: &[f32], u: f64) -> u32 {
    let mut cand: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .filter(|(_, l)| l.is_finite())
        .map(|(i, &l)| (i as u32, l))
        .collect();
    let Some(first) = cand.first().copied() else {
        return argmax(logits);
    };
    cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if c.top_k > 0 {
        cand.truncate(c.top_k);
    }
    let max = cand.first().map_or(first.1, |x| x.1);
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
    let mut r = u * total;
    for (i, p) in probs.iter().enumerate() {
        r -= p;
        if r < 0.0 {
            return cand[i].0;
        }
    }
    cand[keep - 1].0
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
    use super::{SamplerConfig, argmax, splitmix};

    pub(super) struct Oracle {
        cfg: SamplerConfig,
        s: [u64; 4],
    }

    impl Oracle {
        pub(super) fn new(cfg: SamplerConfig) -> Self {
            let mut x = cfg.seed;
            let s = [
                splitmix(&mut x),
                splitmix(&mut x),
                splitmix(&mut x),
                splitmix(&mut x),
            ];
            Oracle { cfg, s }
        }

        fn next_u64(&mut self) -> u64 {
            let r = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
            let t = self.s[1] << 17;
            self.s[2] ^= self.s[0];
            self.s[3] ^= self.s[1];
            self.s[1] ^= self.s[2];
            self.s[0] ^= self.s[3];
            self.s[2] ^= t;
            self.s[3] = self.s[3].rotate_left(45);
            r
        }

        fn uniform(&mut self) -> f64 {
            (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
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
            temperature: r.pick(&[0.0, 1e-30, 1e-6, 0.01, 0.3, 0.7, 1.0, 2.0, 100.0, 1e30, 3e38]),
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

    /// The head alone decides or says it cannot, and the fallback then
    /// agrees with the oracle: draws at the very top of [0, 1) with a tail
    /// of negligible candidates and a tiny `min_p` keeping it.
    #[test]
    fn head_declines_only_when_the_tail_could_decide() {
        let mut r = Rng(3);
        let mut declined = 0;
        let top = 1.0 - f64::EPSILON / 2.0;
        for case in 0..400 {
            let n = 64;
            let mut l: Vec<f32> = (0..n).map(|_| (r.normal() * 0.5) as f32).collect();
            for x in l.iter_mut().skip(8) {
                *x -= 60.0;
            }
            let cfg = SamplerConfig {
                temperature: 1.0,
                min_p: r.pick(&[0.0, 1e-40]),
                top_p: r.pick(&[1.0, 0.95]),
                ..Default::default()
            };
            let mut s = Sampler::new(cfg.clone()).expect("valid config");
            let (max, finite) = finite_max(&l);
            for u in [0.0, 0.5, r.unit(), top] {
                let want = sample_sorted(&cfg, &l, u);
                match s.sample_head(&l, max, finite, u) {
                    Some(t) => assert_eq!(t, want, "case {case} u {u}"),
                    None => declined += 1,
                }
            }
        }
        // The tail could decide only at the top draws, when rounding left
        // the walk short of the head's total.
        assert!(declined < 400, "{declined}");
    }
}
