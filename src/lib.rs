//! shoal: a cooperative, content-addressed cache for generative AI.
//!
//! Data flows one way: CLI/HTTP → [`node`] → store / mesh / inference / KV.
//! Each cache layer lives in the module named after it.
#![deny(clippy::unwrap_used)]
#![warn(missing_docs)]

pub mod api;
pub mod config;
pub mod daemon;
pub mod gguf;
pub mod import;
pub mod inference;
pub mod kvcache;
pub mod lru;
pub mod mesh;
pub mod metrics;
pub mod node;
pub mod respcache;
pub mod route;
pub mod serve;
pub mod settings;
pub mod store;

#[cfg(test)]
mod architecture;
