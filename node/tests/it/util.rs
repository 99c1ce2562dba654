//! Helpers shared by the binary's tests.

use std::path::PathBuf;

/// Where the demo model is: `$SHOAL_TEST_MODEL` (what `scripts/test.sh`
/// sets), else the cache path `scripts/fetch-model.sh` uses.
pub fn demo_model_path() -> PathBuf {
    match std::env::var_os("SHOAL_TEST_MODEL") {
        Some(p) => PathBuf::from(p),
        None => {
            let home = std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_default();
            home.join(".cache/shoal/models/SmolLM2-135M-Instruct.Q4_1.gguf")
        }
    }
}

/// The demo model ([`demo_model_path`]); `None` (the test is skipped) when
/// it is missing, except under `CI=true`, where a missing model fails.
pub fn demo_model() -> Option<PathBuf> {
    let p = demo_model_path();
    if p.is_file() {
        return Some(p);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "demo model missing at {}",
        p.display()
    );
    eprintln!("skipping: demo model not found at {}", p.display());
    None
}
