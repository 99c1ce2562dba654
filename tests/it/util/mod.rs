//! Helpers shared by the library's integration tests: the demo model (one
//! lookup, [`demo_model_path`]), synthetic GGUF files ([`synth`]), a raw
//! HTTP/1.1 client ([`http`]) and serving nodes on loopback, alone or as the
//! two-node mesh fixture ([`serving`]).

pub mod demo;
pub mod http;
pub mod serving;
pub mod synth;

use shoal::inference::Model;
use std::sync::{Arc, OnceLock};

pub use demo::{demo_model_path, gemma3_model_path};

/// The demo model ([`demo_model_path`]) with two compute threads, loaded
/// anew (a model of its own, not shared with other tests).
pub fn demo_model_2_threads() -> Option<Arc<Model>> {
    let p = demo_model_path()?;
    let cfg = shoal::inference::ModelConfig {
        threads: 2,
        ..Default::default()
    };
    Some(Model::load_with(p, &cfg).expect("load demo model"))
}

/// The demo model ([`demo_model_path`]), loaded once per test binary.
pub fn demo_model() -> Option<Arc<Model>> {
    static M: OnceLock<Option<Arc<Model>>> = OnceLock::new();
    M.get_or_init(|| demo_model_path().map(|p| Model::load(p).expect("load demo model")))
        .clone()
}
