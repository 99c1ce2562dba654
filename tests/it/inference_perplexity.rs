//! `shoal::inference::perplexity` against `llama-perplexity`'s figures for
//! the same files (committed fixtures written by
//! `scripts/fixtures/perplexity.sh`), and its refusals.

use crate::util::{demo_model_path, gemma3_model_path};
use shoal::inference::{InferenceError, Model, ModelConfig, PerplexityConfig, perplexity};
use std::path::Path;

const TEXT: &str = include_str!("../fixtures/text/gpl-3.0.txt");

#[derive(serde::Deserialize)]
struct Fixture {
    ctx: usize,
    chunks: usize,
    perplexity: f64,
}

fn fixture(name: &str) -> Fixture {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/perplexity")
        .join(name);
    let s = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&s).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn check(model: &Path, fixture_name: &str) {
    let f = fixture(fixture_name);
    let m = Model::load_with(
        model,
        &ModelConfig {
            threads: 2,
            ..Default::default()
        },
    )
    .expect("load");
    let cfg = PerplexityConfig {
        ctx: f.ctx,
        chunks: Some(f.chunks),
        ..Default::default()
    };
    let mut seen = Vec::new();
    let r = perplexity(&m, TEXT, &cfg, |i, p| seen.push((i, p))).expect("perplexity");
    assert_eq!(r.chunks, f.chunks);
    assert_eq!(r.scored, f.chunks * (f.ctx - f.ctx / 2 - 1));
    assert_eq!(seen.len(), f.chunks);
    assert_eq!(seen.last().map(|s| s.1), Some(r.perplexity));
    let rel = (r.perplexity - f.perplexity).abs() / f.perplexity;
    eprintln!(
        "{fixture_name}: shoal {:.4} +/- {:.4}, llama-perplexity {:.4}: {:.3}% apart",
        r.perplexity,
        r.uncertainty,
        f.perplexity,
        rel * 100.0
    );
    // The bar: within 1% of llama-perplexity on the same file.
    assert!(rel < 0.01, "{} vs {}", r.perplexity, f.perplexity);
}

#[test]
fn demo_model_perplexity_matches_llama_cpp() {
    let Some(p) = demo_model_path() else { return };
    check(&p, "smollm2-135m-q4_1.json");
}

#[test]
fn gemma3_perplexity_matches_llama_cpp() {
    let Some(p) = gemma3_model_path() else { return };
    check(&p, "gemma3-270m-q4_k_m.json");
}

#[test]
fn perplexity_refuses_bad_requests() {
    let Some(p) = demo_model_path() else { return };
    let m = Model::load_with(&p, &ModelConfig::default()).expect("load");
    let short = perplexity(&m, "too short", &PerplexityConfig::default(), |_, _| {});
    match short {
        Err(InferenceError::InvalidParameter(msg)) => {
            assert!(msg.contains("needs at least"), "{msg}")
        }
        other => panic!("{other:?}"),
    }
    for ctx in [0, 7, 9, 1 << 20] {
        let r = perplexity(
            &m,
            TEXT,
            &PerplexityConfig {
                ctx,
                ..Default::default()
            },
            |_, _| {},
        );
        assert!(
            matches!(r, Err(InferenceError::InvalidParameter(_))),
            "ctx {ctx}: {r:?}"
        );
    }
    let r = perplexity(
        &m,
        TEXT,
        &PerplexityConfig {
            ctx: 64,
            chunks: Some(0),
            ..Default::default()
        },
        |_, _| {},
    );
    assert!(matches!(r, Err(InferenceError::InvalidParameter(_))));
}
