//! The library's integration tests: one test binary (ripgrep's
//! `tests/tests.rs` shape), a module per concern, shared helpers in [`util`].
//! Run one module with `cargo test --test it serving_kv::`.

mod hostile;
mod import;
mod inference_arch;
mod inference_cache_parity;
mod inference_chat;
mod inference_model;
mod inference_parity;
mod inference_perplexity;
mod inference_tokenizer;
mod metrics;
mod openai_client;
mod serving_api;
mod serving_batch;
mod serving_bounds;
mod serving_corrupt;
mod serving_kv;
mod serving_mesh;
mod serving_models;
mod serving_node;
mod serving_ollama;
mod serving_refuse;
mod serving_route;
mod serving_route_bits;
mod store;
mod store_full_disk;
mod util;
