//! Logits parity of our forward pass with candle-transformers'
//! `quantized_llama` (an independent implementation) on the demo model.
//!
//! Tolerance: after each step the max |Δ| over all 49152 logits must stay
//! below `TOL` (logits of this model span about ±30; both sides quantize
//! activations to 8 bits per block, but round and accumulate differently),
//! and the greedy token must be the same for 64 steps, except at a near-tie
//! (top-2 margin below `TIE` in both models; at most `MAX_TIES` per prompt),
//! after which both continue with our token.

use crate::util::demo_model_path;
use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use shoal::inference::{Model, ModelConfig};

const TOL: f32 = 1.5;
const MEAN_TOL: f32 = 0.2;
const STEPS: usize = 64;
/// Largest top-2 logit margin under which the two models may pick different
/// greedy tokens (both then continue with ours).
const TIE: f32 = 0.5;
/// Near-ties allowed per prompt.
const MAX_TIES: usize = 3;

fn argmax(v: &[f32]) -> u32 {
    let mut b = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[b] {
            b = i;
        }
    }
    b as u32
}

fn centered(a: &[f32]) -> impl Iterator<Item = f32> + '_ {
    let mean = a.iter().sum::<f32>() / a.len() as f32;
    a.iter().map(move |x| x - mean)
}

/// Mean |Δ| of the logits after removing each side's mean (a uniform shift
/// does not change any probability).
fn mean_diff(a: &[f32], b: &[f32]) -> f32 {
    centered(a)
        .zip(centered(b))
        .map(|(x, y)| (x - y).abs())
        .sum::<f32>()
        / a.len() as f32
}

/// Max |Δ| of the mean-centred logits.
fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    centered(a)
        .zip(centered(b))
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn logits_and_greedy_tokens_match_candle() {
    let Some(path) = demo_model_path() else {
        return;
    };
    let ours = Model::load_with(
        &path,
        &ModelConfig {
            threads: 1,
            ..Default::default()
        },
    )
    .expect("load");
    let mut f = std::fs::File::open(&path).expect("open");
    let ct = gguf_file::Content::read(&mut f).expect("gguf");
    let mut theirs = ModelWeights::from_gguf(ct, &mut f, &Device::Cpu).expect("candle load");
    let reference = Model::load_with(
        &path,
        &ModelConfig {
            threads: 1,
            reference_matmul: true,
            ..Default::default()
        },
    )
    .expect("load");
    {
        let ids = ours
            .tokenizer()
            .encode("The capital of France is", true, true);
        let r = reference
            .forward(&mut reference.new_cache(), &ids)
            .expect("f");
        let m = ours.forward(&mut ours.new_cache(), &ids).expect("f");
        let input = Tensor::new(ids.as_slice(), &Device::Cpu)
            .expect("t")
            .unsqueeze(0)
            .expect("u");
        let c: Vec<f32> = theirs
            .forward(&input, 0)
            .expect("c")
            .squeeze(0)
            .expect("s")
            .to_vec1()
            .expect("v");
        theirs.clear_kv_cache();
        let (ours_ref, candle_ref) = (max_diff(&m, &r), max_diff(&c, &r));
        eprintln!("max |Δlogit| vs f32 reference: ours {ours_ref}, candle {candle_ref}");
        // Both sides quantize activations to 8 bits; each must stay within TOL
        // of the unquantized computation.
        assert!(
            ours_ref < TOL && candle_ref < TOL,
            "ours {ours_ref} / candle {candle_ref} vs reference"
        );
        assert_eq!(argmax(&m), argmax(&r));
    }
    let tok = ours.tokenizer();
    // (prompt, greedy steps): candle's Q4_1 kernel is scalar, so the
    // reference side is slow; 64 steps on the first prompt, fewer on others.
    let prompts = [
        ("The capital of France is", STEPS),
        (
            "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
            32,
        ),
        (
            "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
            16,
        ),
    ];
    let mut worst = 0f32;
    let mut worst_mean = 0f32;
    for (p, steps) in prompts {
        let ids = tok.encode(p, true, true);
        theirs.clear_kv_cache();
        let mut cache = ours.new_cache();
        let mut mine = ours.forward(&mut cache, &ids).expect("forward");
        let input = Tensor::new(ids.as_slice(), &Device::Cpu)
            .expect("t")
            .unsqueeze(0)
            .expect("u");
        let mut other: Vec<f32> = theirs
            .forward(&input, 0)
            .expect("candle forward")
            .squeeze(0)
            .expect("s")
            .to_vec1()
            .expect("v");
        let mut generated = Vec::new();
        let mut ties = 0;
        let mut t_ours = std::time::Duration::ZERO;
        let mut t_theirs = std::time::Duration::ZERO;
        for (step, pos) in (0..steps).zip(ids.len()..) {
            let d = max_diff(&mine, &other);
            let mean = mean_diff(&mine, &other);
            worst = worst.max(d);
            worst_mean = worst_mean.max(mean);
            assert!(
                mean < MEAN_TOL,
                "prompt {p:?} step {step}: mean |Δlogit| {mean} ≥ {MEAN_TOL}"
            );
            assert!(
                d < TOL,
                "prompt {p:?} step {step}: max |Δlogit| {d} ≥ {TOL}"
            );
            let (a, b) = (argmax(&mine), argmax(&other));
            if a != b {
                // Only a near-tie in *both* models may flip (8-bit activation
                // rounding differs between the implementations).
                let (ma, mb) = (
                    mine[a as usize] - mine[b as usize],
                    other[b as usize] - other[a as usize],
                );
                ties += 1;
                eprintln!("prompt {p:?} step {step}: near-tie {a} vs {b}, margins {ma} / {mb}");
                assert!(
                    ma < TIE && mb < TIE,
                    "prompt {p:?} step {step}: greedy tokens differ ({a} vs {b}, margins {ma} / {mb})"
                );
                assert!(
                    ties <= MAX_TIES,
                    "prompt {p:?}: more than {MAX_TIES} near-ties"
                );
            }
            generated.push(a);
            let t0 = std::time::Instant::now();
            mine = ours.forward(&mut cache, &[a]).expect("forward");
            t_ours += t0.elapsed();
            let t0 = std::time::Instant::now();
            let input = Tensor::new(&[a], &Device::Cpu)
                .expect("t")
                .unsqueeze(0)
                .expect("u");
            other = theirs
                .forward(&input, pos)
                .expect("candle forward")
                .squeeze(0)
                .expect("s")
                .to_vec1()
                .expect("v");
            t_theirs += t0.elapsed();
        }
        eprintln!("decode time: ours {t_ours:?}, candle {t_theirs:?}");
        eprintln!("{p:?} → {:?}", tok.decode(&generated, false));
    }
    eprintln!("worst max |Δlogit| over all steps: {worst}, worst mean {worst_mean}");
}
