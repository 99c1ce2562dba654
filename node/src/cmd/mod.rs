//! Subcommands, one module per layer.

pub mod infer;
pub mod mesh;
pub mod ops;
pub mod store;

use anyhow::{Context, Result};
use shoal::api::client::AdminClient;
use shoal::store::{Store, StoreOptions};
use std::path::PathBuf;

/// What every subcommand gets: global options.
pub struct Ctx {
    /// The data directory.
    pub data_dir: PathBuf,
    /// Store options from the command line / environment.
    pub store_opts: StoreOptions,
    /// JSON output.
    pub json: bool,
    /// Why the configuration could not be loaded, if it could not.
    pub config_error: Option<String>,
    /// The running node's admin token (`api.admin_token_file`, else `<data_dir>/admin.token`).
    pub admin_token_file: PathBuf,
    /// `api.listen` of the configuration (where a daemon on this data dir
    /// listens unless it wrote another address to `<data_dir>/api.addr`).
    pub api_listen: Option<std::net::SocketAddr>,
}

impl Ctx {
    /// Builds the context from parsed arguments.
    pub fn new(cli: &crate::Cli) -> Self {
        // The effective configuration (defaults < file < environment < flags)
        // decides the data dir and the store options for every command.
        let (data_dir, store_opts, token_file, config_error, api_listen) =
            match ops::ConfigSource::from_cli(cli).load() {
                Ok(cfg) => (
                    cfg.data_dir.clone().unwrap_or_else(default_data_dir),
                    cfg.store_options(),
                    cfg.api.admin_token_file.clone(),
                    None,
                    Some(cfg.api.listen),
                ),
                Err(e) => (
                    cli.data_dir.clone().unwrap_or_else(default_data_dir),
                    StoreOptions::default(),
                    None,
                    Some(format!("{e:#}")),
                    None,
                ),
            };
        let admin_token_file =
            token_file.unwrap_or_else(|| data_dir.join(shoal::api::auth::ADMIN_TOKEN_FILE));
        Ctx {
            data_dir,
            store_opts,
            json: cli.json,
            config_error,
            admin_token_file,
            api_listen,
        }
    }

    /// A client for the running node's admin API at `addr` (`host:port`),
    /// sending the node's admin token read from [`Ctx::admin_token_file`].
    pub fn admin_client(&self, addr: &str) -> AdminClient {
        AdminClient::new(addr).with_token_file(&self.admin_token_file)
    }

    /// Opens the content store (fails clearly when a daemon holds it).
    pub fn store(&self) -> Result<Store> {
        if let Some(e) = &self.config_error {
            anyhow::bail!("configuration: {e}");
        }
        Store::open(&self.data_dir, self.store_opts.clone())
            .with_context(|| format!("opening the store in {}", self.data_dir.display()))
    }

    /// Prints a value as pretty JSON.
    pub fn print_json<T: serde::Serialize>(&self, v: &T) -> Result<()> {
        println!("{}", serde_json::to_string_pretty(v)?);
        Ok(())
    }
}

/// `$XDG_DATA_HOME/shoal`, else `~/.local/share/shoal`, else `./shoal-data`.
pub fn default_data_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|s| !s.is_empty()) {
        return PathBuf::from(x).join("shoal");
    }
    if let Some(h) = std::env::var_os("HOME").filter(|s| !s.is_empty()) {
        return PathBuf::from(h).join(".local/share/shoal");
    }
    PathBuf::from("shoal-data")
}

/// Parses sizes like `1024`, `64K`, `512M`, `20G`, `1T` or `unlimited`
/// (binary units), the same way the config file does.
pub fn parse_size(s: &str) -> Result<u64> {
    s.parse::<shoal::config::ByteSize>()
        .map(|b| b.0)
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// Formats bytes for people.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1024").ok(), Some(1024));
        assert_eq!(parse_size("64K").ok(), Some(65536));
        assert_eq!(parse_size("1.5G").ok(), Some(3 << 29));
        assert_eq!(parse_size("2GiB").ok(), Some(2 << 30));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("-1").is_err());
        assert_eq!(parse_size("unlimited").ok(), Some(u64::MAX));
    }
}
