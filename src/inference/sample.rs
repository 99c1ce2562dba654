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
}

fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
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
        Ok(Sampler { cfg, s })
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
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
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
