//! The `shoal` binary's integration tests: one test binary (ripgrep's
//! `tests/tests.rs` shape), a module per concern, shared helpers in [`util`].
//! Run one module with `cargo test -p shoal-node --test it signals::`.

mod api_security;
mod chat_page;
mod cli;
mod cli_daemon;
mod mesh_netns;
mod ollama_client;
mod ops_cli;
mod pull_wait;
mod signals;
mod systemd;
mod util;
