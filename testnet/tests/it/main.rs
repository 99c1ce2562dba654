//! The mesh simulation's tests: one test binary (ripgrep's `tests/tests.rs`
//! shape), a module per concern; the shared harness is the crate itself
//! (`shoal_testnet`: in-process nodes, each a `shoal::daemon::Daemon` with
//! its own metrics). Run one module with
//! `cargo test -p shoal-testnet --test it inprocess::`.

mod connections;
mod inprocess;
mod mesh_faults;
mod ops;
mod origin_https;
mod release_sync;
mod repair;
