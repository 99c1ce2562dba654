//! Model-level tests: every supported weight type against an unquantized
//! reference, bad files, KV export/import continuation, streaming,
//! cancellation, stop sequences and seeded sampling.

use crate::util::demo_model_path;
use crate::util::synth::tiny_llama;
use shoal::gguf::GgmlType;
use shoal::inference::{
    GenerateConfig, InferenceError, KvCache, KvDtype, Model, ModelConfig, SamplerConfig,
    StopReason, generate,
};
use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

fn write_tmp(bytes: &[u8]) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().expect("tmp");
    std::io::Write::write_all(&mut f, bytes).expect("write");
    f
}

fn cfg(threads: usize, reference: bool) -> ModelConfig {
    ModelConfig {
        threads,
        reference_matmul: reference,
        ..Default::default()
    }
}

/// Our quantized kernels (8-bit activations) against dequantized weights
/// times f32 activations, for every weight type we run.
#[test]
fn every_weight_type_matches_the_f32_reference() {
    use GgmlType::*;
    let tokens: Vec<u32> = vec![258, 104, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100];
    for ty in [
        F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K,
    ] {
        let f = write_tmp(&tiny_llama(ty, "llama"));
        let ours = Model::load_with(f.path(), &cfg(2, false)).expect("load");
        let reference = Model::load_with(f.path(), &cfg(1, true)).expect("load");
        let a = ours
            .forward(&mut ours.new_cache(), &tokens)
            .expect("forward");
        let b = reference
            .forward(&mut reference.new_cache(), &tokens)
            .expect("forward");
        let range =
            b.iter().copied().fold(f32::MIN, f32::max) - b.iter().copied().fold(f32::MAX, f32::min);
        let diff = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        // 8-bit activations: a few percent of the logit range at most.
        let tol = if matches!(ty, F32 | F16) { 1e-3 } else { 0.05 } * range;
        assert!(range > 0.1, "{ty:?}: degenerate logits");
        assert!(
            diff <= tol,
            "{ty:?}: max |Δ| {diff} > {tol} (range {range})"
        );
        // Batched prompt processing and one-by-one decoding agree.
        let mut c = ours.new_cache();
        let mut last = Vec::new();
        for t in &tokens {
            last = ours.forward(&mut c, &[*t]).expect("forward");
        }
        let d2 = a
            .iter()
            .zip(&last)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        assert!(d2 <= 1e-3 * range, "{ty:?}: batch vs sequential {d2}");
    }
}

#[test]
fn bad_files_are_clear_errors() {
    let f = write_tmp(&tiny_llama(GgmlType::Q8_0, "gptneox"));
    match Model::load(f.path()) {
        Err(InferenceError::UnsupportedArchitecture(a)) => assert_eq!(a, "gptneox"),
        other => panic!("expected UnsupportedArchitecture, got {other:?}"),
    }
    let f = write_tmp(&tiny_llama(GgmlType::BF16, "llama"));
    match Model::load(f.path()) {
        Err(InferenceError::UnsupportedTensorType { ty, .. }) => assert_eq!(ty, "bf16"),
        other => panic!("expected UnsupportedTensorType, got {other:?}"),
    }
    let good = tiny_llama(GgmlType::Q4_K, "llama");
    for cut in [10, 100, 5000, good.len() / 2, good.len() - 1] {
        let f = write_tmp(&good[..cut]);
        let e = Model::load(f.path()).expect_err("truncated file loaded");
        assert!(matches!(e, InferenceError::Gguf(_)), "cut {cut}: {e}");
    }
    let f = write_tmp(b"");
    assert!(Model::load(f.path()).is_err());
    assert!(matches!(
        Model::load("/nonexistent/model.gguf"),
        Err(InferenceError::Io(_))
    ));
    // Tokens outside the vocabulary are refused.
    let f = write_tmp(&good);
    let m = Model::load(f.path()).expect("load");
    assert!(matches!(
        m.forward(&mut m.new_cache(), &[100_000]),
        Err(InferenceError::BadToken(100_000))
    ));
}

fn demo() -> Option<Arc<Model>> {
    let p = demo_model_path()?;
    Some(Model::load_with(p, &cfg(2, false)).expect("load demo model"))
}

fn greedy(max: usize) -> GenerateConfig {
    GenerateConfig {
        max_tokens: max,
        stop_at_eos: false,
        ..Default::default()
    }
}

#[test]
fn kv_export_import_continues_identically() {
    let Some(m) = demo() else { return };
    let prompt = m
        .tokenizer()
        .encode("The three primary colors are red, yellow and", true, true);
    let n = 24;
    let full = generate(&m, &mut m.new_cache(), &prompt, &greedy(n), None, |_| {
        ControlFlow::Continue(())
    })
    .expect("generate");
    assert_eq!(full.tokens.len(), n);
    let id = m.id();
    // Compute the prefix but the last token, export it in two ranges.
    let mut c = m.new_cache();
    m.forward(&mut c, &prompt[..prompt.len() - 1])
        .expect("prefix");
    let cut = 3;
    for dtype in [KvDtype::F16, KvDtype::Q8_0] {
        let a = c.export(0..cut, dtype, &id).expect("export a");
        let b = c.export(cut..c.len(), dtype, &id).expect("export b");
        let mut restored = KvCache::import(&a, m.kv_layout(), &id).expect("import");
        restored.import_append(&b, &id).expect("append");
        assert_eq!(restored.len(), prompt.len() - 1);
        let cont = generate(
            &m,
            &mut restored,
            &prompt[prompt.len() - 1..],
            &greedy(n),
            None,
            |_| ControlFlow::Continue(()),
        )
        .expect("continue");
        if dtype == KvDtype::F16 {
            assert_eq!(cont.tokens, full.tokens, "{dtype:?}: continuation differs");
        } else {
            // A q8_0 export of f16 values is lossy: the start must agree,
            // later a near-tie may go the other way. A cache holding q8_0
            // values from the start continues exactly (below).
            assert_eq!(
                cont.tokens[..4],
                full.tokens[..4],
                "{dtype:?}: continuation differs"
            );
            let whole = generate(
                &m,
                &mut m.new_cache_with(dtype),
                &prompt,
                &greedy(n),
                None,
                |_| ControlFlow::Continue(()),
            )
            .expect("generate");
            let mut q = m.new_cache_with(dtype);
            m.forward(&mut q, &prompt[..prompt.len() - 1])
                .expect("prefix");
            let blob = q.export(0..q.len(), dtype, &id).expect("export");
            let mut restored = KvCache::import(&blob, m.kv_layout(), &id).expect("import");
            let cont = generate(
                &m,
                &mut restored,
                &prompt[prompt.len() - 1..],
                &greedy(n),
                None,
                |_| ControlFlow::Continue(()),
            )
            .expect("continue");
            assert_eq!(
                cont.tokens, whole.tokens,
                "q8_0 cache: continuation differs"
            );
        }
        // A corrupted or foreign blob is refused.
        let mut bad = a.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 0x40;
        let e = KvCache::import(&bad, m.kv_layout(), &id).expect_err("corrupt accepted");
        assert!(e.to_string().contains("checksum"), "{e}");
        let e = KvCache::import(&a, m.kv_layout(), &[0u8; 32]).expect_err("foreign accepted");
        assert!(e.to_string().contains("belongs to model"), "{e}");
    }
    // A fork shares the prefix and continues the same way.
    let mut f = c.fork(c.len());
    let cont = generate(
        &m,
        &mut f,
        &prompt[prompt.len() - 1..],
        &greedy(8),
        None,
        |_| ControlFlow::Continue(()),
    )
    .expect("fork");
    assert_eq!(cont.tokens, full.tokens[..8]);
}

#[test]
fn streaming_cancel_stop_and_seed() {
    let Some(m) = demo() else { return };
    let prompt = m.tokenizer().encode("Once upon a time", true, true);
    // Streamed pieces add up to the text.
    let mut streamed = String::new();
    let out = generate(&m, &mut m.new_cache(), &prompt, &greedy(20), None, |ev| {
        streamed.push_str(ev.text);
        ControlFlow::Continue(())
    })
    .expect("generate");
    assert_eq!(streamed, out.text);
    assert_eq!(out.stop, StopReason::MaxTokens);
    // Cancellation after the third token.
    let cancel = AtomicBool::new(false);
    let mut seen = 0;
    let c = generate(
        &m,
        &mut m.new_cache(),
        &prompt,
        &greedy(20),
        Some(&cancel),
        |_| {
            seen += 1;
            if seen == 3 {
                cancel.store(true, Ordering::Relaxed);
            }
            ControlFlow::Continue(())
        },
    )
    .expect("generate");
    assert_eq!(c.stop, StopReason::Cancelled);
    assert_eq!(c.tokens, out.tokens[..3]);
    // A stop sequence taken from the middle of the greedy text.
    let words: Vec<&str> = out.text.split_whitespace().collect();
    assert!(words.len() > 4, "{:?}", out.text);
    let stop = format!(" {}", words[3]);
    let at = out.text.find(&stop).expect("stop in text");
    let mut cfg = greedy(20);
    cfg.stop = vec![stop.clone()];
    let mut streamed = String::new();
    let s = generate(&m, &mut m.new_cache(), &prompt, &cfg, None, |ev| {
        streamed.push_str(ev.text);
        ControlFlow::Continue(())
    })
    .expect("generate");
    assert_eq!(s.stop, StopReason::StopSequence);
    assert_eq!(s.text, out.text[..at]);
    assert_eq!(streamed, s.text);
    // Seeded sampling is reproducible.
    let sample = |seed| {
        let cfg = GenerateConfig {
            max_tokens: 16,
            stop_at_eos: false,
            sampler: SamplerConfig {
                temperature: 0.9,
                top_k: 40,
                top_p: 0.95,
                min_p: 0.02,
                repeat_penalty: 1.1,
                seed,
                ..Default::default()
            },
            ..Default::default()
        };
        generate(&m, &mut m.new_cache(), &prompt, &cfg, None, |_| {
            ControlFlow::Continue(())
        })
        .expect("sample")
        .tokens
    };
    let a = sample(7);
    assert_eq!(a, sample(7));
    assert_ne!(a, sample(8));
}

#[test]
fn tokenizer_is_shared_per_file() {
    let Some(p) = demo_model_path() else { return };
    let a = Model::load_with(&p, &cfg(1, false)).expect("load");
    let b = Model::load_with(&p, &cfg(1, false)).expect("load");
    assert!(Arc::ptr_eq(a.tokenizer(), b.tokenizer()));
}

/// `forward_all` returns every token's logits: the last row is `forward`'s,
/// and each row equals the logits of a `forward` over that prefix.
#[test]
fn forward_all_returns_every_tokens_logits() {
    let f = write_tmp(&tiny_llama(GgmlType::Q8_0, "llama"));
    let small_batch = ModelConfig {
        batch: 5,
        ..cfg(2, false)
    };
    let m = Model::load_with(f.path(), &small_batch).expect("load");
    let vocab = m.hparams().vocab_size;
    let tokens: Vec<u32> = vec![258, 104, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100];
    let all = m.forward_all(&mut m.new_cache(), &tokens).expect("all");
    assert_eq!(all.len(), tokens.len() * vocab);
    for i in [0, 4, 5, tokens.len() - 1] {
        let one = m
            .forward(&mut m.new_cache(), &tokens[..=i])
            .expect("prefix");
        let row = &all[i * vocab..(i + 1) * vocab];
        let diff = one
            .iter()
            .zip(row)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(diff < 1e-3, "row {i}: max |Δ| {diff}");
    }
    // After a cached prefix, rows start at the new tokens.
    let mut c = m.new_cache();
    m.forward(&mut c, &tokens[..7]).expect("prefix");
    let tail = m.forward_all(&mut c, &tokens[7..]).expect("tail");
    assert_eq!(tail.len(), 5 * vocab);
    let d = tail
        .iter()
        .zip(&all[7 * vocab..])
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(d < 1e-3, "cached prefix: max |Δ| {d}");
}

fn gemma3_path() -> Option<std::path::PathBuf> {
    crate::util::gemma3_model_path()
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Gemma 3 270M Q4_K_M: our greedy continuation of llama.cpp's prompt ids
/// equals llama.cpp's (`tests/fixtures/gemma3-270m-greedy.json`, made by
/// `scripts/fixtures/gemma3-greedy.sh`). One prompt is longer than the
/// 512-token sliding window, so the local layers' window is exercised.
#[test]
fn gemma3_greedy_matches_llama_cpp() {
    let Some(path) = gemma3_path() else { return };
    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("../fixtures/gemma3-270m-greedy.json")).expect("fixture");
    let m = match Model::load_with(&path, &cfg(2, false)) {
        Ok(m) => m,
        // The SentencePiece tokenizer lands with the tokenizer work of
        // issue 16; the forward pass does not need it.
        Err(InferenceError::Tokenizer(e)) if std::env::var("CI").as_deref() != Ok("true") => {
            eprintln!("SKIPPING: Gemma 3 tokenizer not supported in this build: {e}");
            return;
        }
        Err(e) => panic!("load {}: {e}", path.display()),
    };
    assert_eq!(m.hparams().arch, "gemma3");
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .expect("ids")
            .iter()
            .map(|x| x.as_u64().expect("id") as u32)
            .collect()
    };
    let mut reference: Option<Arc<Model>> = None;
    let (mut near_ties, mut steps) = (0, 0);
    for case in fixture["cases"].as_array().expect("cases") {
        let name: String = case["prompt"]
            .as_str()
            .unwrap_or("")
            .chars()
            .take(32)
            .collect();
        let prompt = ids(&case["prompt_ids"]);
        let want = ids(&case["greedy_ids"]);
        let mut c = m.new_cache();
        let mut logits = m.forward(&mut c, &prompt).expect("prompt");
        for (step, &w) in want.iter().enumerate() {
            steps += 1;
            let t = argmax(&logits);
            if t != w {
                // Only a near-tie may differ: our margin between the two
                // picks is within 8-bit activation noise (< 0.25; logits
                // span ≈ ±30), and our unquantized f32 reference path ranks
                // them as llama.cpp or as closely. We then follow
                // llama.cpp's token. Measured: 4 of 96 steps, our margins
                // 0.010-0.164, the f32 reference agreeing with llama.cpp
                // each time (docs/INFERENCE.md).
                let margin = logits[t as usize] - logits[w as usize];
                let r = reference.get_or_insert_with(|| {
                    Model::load_with(&path, &cfg(2, true)).expect("reference")
                });
                let mut seq = prompt.clone();
                seq.extend_from_slice(&want[..step]);
                let rl = r.forward(&mut r.new_cache(), &seq).expect("reference");
                let r_margin = rl[t as usize] - rl[w as usize];
                eprintln!(
                    "gemma3 near-tie: {name:?} step {step}: ours {t}, llama.cpp {w}, \
                     our margin {margin}, f32 reference margin {r_margin}"
                );
                near_ties += 1;
                assert!(
                    margin < 0.25 && r_margin < 0.25,
                    "{name:?} ({} tokens), step {step}: ours {t}, llama.cpp {w} \
                     (margin {margin}, f32 reference margin {r_margin})",
                    prompt.len()
                );
            }
            logits = m.forward(&mut c, &[w]).expect("decode");
        }
    }
    assert!(
        near_ties * 16 <= steps,
        "{near_ties} near-ties in {steps} greedy steps (more than 1 in 16)"
    );
}

/// A supported family whose file lacks a required key: the error names it.
#[test]
fn missing_required_metadata_names_the_key() {
    // `tiny_llama` writes `llama.*` keys only.
    for arch in ["qwen2", "qwen3", "gemma3", "phi3"] {
        let f = write_tmp(&tiny_llama(GgmlType::Q8_0, arch));
        match Model::load(f.path()) {
            Err(InferenceError::BadModel(m)) => {
                assert!(m.contains(&format!("{arch}.block_count")), "{arch}: {m}")
            }
            other => panic!("{arch}: expected BadModel, got {other:?}"),
        }
    }
}
