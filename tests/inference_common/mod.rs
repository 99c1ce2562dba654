//! Shared helpers of the inference integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// The demo model: `$SHOAL_TEST_MODEL`, else the cache path
/// `scripts/fetch-model.sh` uses. `None` (test skipped) when it is missing,
/// except under `CI=true`, where a missing model fails the test.
pub fn demo_model() -> Option<PathBuf> {
    let p = match std::env::var_os("SHOAL_TEST_MODEL") {
        Some(p) => PathBuf::from(p),
        None => {
            let home = std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_default();
            let cache = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| home.join(".cache"));
            cache.join("shoal/models/SmolLM2-135M-Instruct.Q4_1.gguf")
        }
    };
    if p.is_file() {
        return Some(p);
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!(
            "demo model missing at {} (run scripts/fetch-model.sh or set SHOAL_TEST_MODEL)",
            p.display()
        );
    }
    eprintln!("skipping: demo model not found at {}", p.display());
    None
}
