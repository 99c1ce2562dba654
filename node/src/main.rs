//! `shoal`: the daemon and command-line interface, thin over the `shoal` library.
//!
//! Results go to stdout (`--json` for machine-readable output); logs go to stderr.
#![deny(clippy::unwrap_used)]

mod cmd;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// A cooperative, content-addressed cache for generative AI on a LAN.
#[derive(Parser, Debug)]
#[command(name = "shoal", version, about, propagate_version = true)]
pub struct Cli {
    /// Data directory (default: $XDG_DATA_HOME/shoal or ~/.local/share/shoal).
    #[arg(long, global = true, env = "SHOAL_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Byte quota of the content store (e.g. 20G, 512M); unlimited when unset.
    #[arg(long, global = true, env = "SHOAL_STORE_QUOTA", value_parser = cmd::parse_size)]
    pub store_quota: Option<u64>,
    /// Configuration file (TOML; see `shoal config show`). Default: $SHOAL_CONFIG,
    /// else ~/.config/shoal/shoal.toml or /etc/shoal/shoal.toml if present.
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// Machine-readable JSON output.
    #[arg(long, global = true)]
    pub json: bool,
    /// Log filter (e.g. `info`, `shoal=debug`); also RUST_LOG.
    #[arg(long, global = true, env = "SHOAL_LOG", default_value = "warn")]
    pub log: String,
    #[command(subcommand)]
    pub command: Command,
}

/// All subcommands, grouped by layer.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Content-store commands.
    #[command(flatten)]
    Store(cmd::store::StoreCmd),
    /// Inference commands.
    #[command(flatten)]
    Infer(cmd::infer::InferCmd),
    /// Operations commands.
    #[command(flatten)]
    Ops(cmd::ops::OpsCmd),
    /// Mesh commands.
    #[command(flatten)]
    Mesh(cmd::mesh::MeshCmd),
}

fn main() {
    // Die quietly on a closed pipe (`shoal ls | head`), like other Unix tools.
    // SAFETY: setting a signal disposition to its default before any threads exist.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| cli.log.clone());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let ctx = cmd::Ctx::new(&cli);
    let config = cmd::ops::ConfigSource::from_cli(&cli);
    match cli.command {
        Command::Store(c) => cmd::store::run(&ctx, c),
        Command::Infer(c) => cmd::infer::run(&ctx, c),
        Command::Ops(c) => cmd::ops::run(&ctx, &config, c),
        Command::Mesh(c) => cmd::mesh::run(&ctx, &config, c),
    }
}
