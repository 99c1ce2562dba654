//! Helpers shared by the binary's tests.

#[path = "../../../tests/it/util/demo.rs"]
mod demo;

/// The demo model ([`demo::demo_model_path`]: the workspace's one lookup);
/// `None` (the test is skipped) when it is missing, except under `CI=true`,
/// where a missing model fails.
pub use demo::demo_model_path as demo_model;
/// Where the demo model is expected, whether or not it is there.
pub use demo::expected_demo_model;
