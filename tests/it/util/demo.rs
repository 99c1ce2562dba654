//! The one demo-model lookup of every test and bench in the workspace
//! (std only, so `node/tests`, `testnet` and the benches include this file
//! with `#[path]`): `$SHOAL_TEST_MODEL`, else the cache
//! `scripts/fetch-model.sh` fills.

use std::path::PathBuf;

/// Where the demo model is expected: `$SHOAL_TEST_MODEL` (what
/// `scripts/test.sh` sets), else the cache `scripts/fetch-model.sh` fills
/// (`$SHOAL_MODEL_CACHE`, else `${XDG_CACHE_HOME:-$HOME/.cache}/shoal/models`).
pub fn expected_demo_model() -> PathBuf {
    if let Some(p) = std::env::var_os("SHOAL_TEST_MODEL") {
        return PathBuf::from(p);
    }
    let cache = std::env::var_os("SHOAL_MODEL_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_default();
            std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| home.join(".cache"))
                .join("shoal/models")
        });
    cache.join("SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// The demo model's path; `None` (the test is skipped, with a loud message)
/// when it is missing, except under `CI=true`, where a missing model fails.
pub fn demo_model_path() -> Option<PathBuf> {
    let p = expected_demo_model();
    if p.is_file() {
        return Some(p);
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!(
            "demo model missing at {} (run scripts/fetch-model.sh or set SHOAL_TEST_MODEL)",
            p.display()
        );
    }
    eprintln!(
        "SKIPPING: demo model missing at {} (run scripts/fetch-model.sh or set SHOAL_TEST_MODEL)",
        p.display()
    );
    None
}

#[allow(dead_code)] // not every includer of this file runs Gemma
/// Where Gemma 3 270M Q4_K_M is expected: `$SHOAL_GEMMA3_MODEL` (what
/// `scripts/test.sh` sets), else the cache `scripts/fetch-gemma3.sh` fills.
pub fn expected_gemma3_model() -> PathBuf {
    if let Some(p) = std::env::var_os("SHOAL_GEMMA3_MODEL") {
        return PathBuf::from(p);
    }
    expected_demo_model().with_file_name("gemma-3-270m-Q4_K_M.gguf")
}

#[allow(dead_code)]
/// Gemma 3 270M Q4_K_M's path; `None` (skipped, loudly) when it is missing,
/// except under `CI=true`, where a missing model fails.
pub fn gemma3_model_path() -> Option<PathBuf> {
    let p = expected_gemma3_model();
    if p.is_file() {
        return Some(p);
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!(
            "Gemma 3 model missing at {} (run scripts/fetch-gemma3.sh or set SHOAL_GEMMA3_MODEL)",
            p.display()
        );
    }
    eprintln!(
        "SKIPPING: Gemma 3 model missing at {} (run scripts/fetch-gemma3.sh or set SHOAL_GEMMA3_MODEL)",
        p.display()
    );
    None
}
