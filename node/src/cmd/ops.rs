//! Operations subcommands: `config show`, `import`.

use super::{Ctx, human_bytes};
use anyhow::{Context, Result, bail};
use clap::Subcommand;
use shoal::import::{ImportOptions, import};
use shoal::settings::Config;
use std::path::PathBuf;

/// Where the configuration comes from: the file (`--config`, else
/// [`Config::discover`]) and the global flags that override it.
#[derive(Debug, Clone)]
pub struct ConfigSource {
    /// `--config`.
    pub path: Option<PathBuf>,
    /// `--data-dir` (or `SHOAL_DATA_DIR`).
    pub data_dir: Option<PathBuf>,
    /// `--store-quota` (or `SHOAL_STORE_QUOTA`), in bytes.
    pub store_quota: Option<u64>,
}

impl ConfigSource {
    /// Takes what matters from the parsed command line.
    pub fn from_cli(cli: &crate::Cli) -> Self {
        ConfigSource {
            path: cli.config.clone(),
            data_dir: cli.data_dir.clone(),
            store_quota: cli.store_quota,
        }
    }

    /// The effective configuration: defaults < file < `SHOAL_*` environment < flags.
    pub fn load(&self) -> Result<Config> {
        let path = self.path.clone().or_else(Config::discover);
        let mut cfg = Config::load(path.as_deref())?;
        if let Some(d) = &self.data_dir {
            cfg.data_dir = Some(d.clone());
        }
        if let Some(q) = self.store_quota {
            cfg.store.quota_bytes = q;
        }
        // Flags go through the same checks as the file (e.g. an empty --data-dir).
        cfg.validate()?;
        Ok(cfg)
    }
}

/// Operations commands.
#[derive(Subcommand, Debug)]
pub enum OpsCmd {
    /// Configuration file commands.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Import models you already have: GGUF files under a directory, Hugging Face
    /// cache folders (models--org--name) and Ollama's store (~/.ollama/models).
    /// Each is added sharing the source's blocks where the filesystem can
    /// (reflink) and named with a release signed by this node's key.
    Import {
        /// A file or directory (searched recursively).
        path: PathBuf,
        /// Pin the imported models (never evicted).
        #[arg(long)]
        pin: bool,
        /// Do not name them (no signed releases).
        #[arg(long)]
        no_names: bool,
        /// Only list what would be imported.
        #[arg(long)]
        dry_run: bool,
    },
    /// Ask the running node to fetch and pin the models in `store.prefetch`
    /// (plus any given here), one after the other; what the shoal-prefetch
    /// timer runs off-peak.
    Prefetch {
        /// More models (release names or ids).
        models: Vec<String>,
    },
}

/// `shoal config …`
#[derive(Subcommand, Debug)]
pub enum ConfigCmd {
    /// Print the effective configuration (defaults < file < SHOAL_* environment <
    /// flags) as a commented TOML file.
    Show,
    /// Print the path of the configuration file in use, if any.
    Path,
}

/// Runs an operations command.
// long: a dispatcher, one short arm per `shoal` operations subcommand.
pub fn run(ctx: &Ctx, src: &ConfigSource, cmd: OpsCmd) -> Result<()> {
    match cmd {
        OpsCmd::Config(ConfigCmd::Show) => {
            let mut cfg = src.load()?;
            if cfg.data_dir.is_none() {
                cfg.data_dir = Some(ctx.data_dir.clone());
            }
            if ctx.json {
                ctx.print_json(&cfg)?;
            } else {
                print!("{}", cfg.effective_toml());
            }
        }
        OpsCmd::Import {
            path,
            pin,
            no_names,
            dry_run,
        } => {
            if dry_run {
                let found = shoal::import::scan(&path)?;
                if ctx.json {
                    return ctx.print_json(&found);
                }
                for c in &found {
                    println!("{}\t{}\t{}", c.name, human_bytes(c.size), c.origin);
                }
                return Ok(());
            }
            let done = match ctx.store() {
                Ok(store) => import(&store, &path, &ImportOptions { pin, no_names })?,
                // A running daemon holds the store: it imports (issue 18).
                Err(e) if super::store::held_by_daemon(&e) => {
                    super::store::import_via_daemon(ctx, e, &path, pin, no_names)?
                }
                Err(e) => return Err(e),
            };
            let failed = done.iter().filter(|r| r.error.is_some()).count();
            if ctx.json {
                ctx.print_json(&done)?;
            } else {
                for r in &done {
                    let c = &r.candidate;
                    match (&r.id, &r.error) {
                        (Some(id), _) => println!(
                            "{}  {}  {}  {}{}",
                            &id.to_hex()[..12],
                            c.name,
                            human_bytes(c.size),
                            c.origin,
                            if r.already_present {
                                "  (already present)"
                            } else {
                                ""
                            }
                        ),
                        (None, Some(e)) => eprintln!("failed: {}: {e}", c.origin),
                        (None, None) => {}
                    }
                }
            }
            if failed > 0 {
                bail!("{failed} of {} models failed to import", done.len());
            }
        }
        OpsCmd::Prefetch { models } => {
            let cfg = src.load()?;
            let mut all = cfg.store.prefetch.clone();
            all.extend(models);
            if all.is_empty() {
                println!("nothing to prefetch: store.prefetch is empty");
                return Ok(());
            }
            // A node listening on every address is reached on loopback.
            let mut addr = cfg.api.listen;
            if addr.ip().is_unspecified() {
                addr.set_ip(match addr {
                    std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                    std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
                });
            }
            let api = ctx.admin_client(&addr.to_string());
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let done = rt.block_on(shoal::api::ops::prefetch(
                &api,
                &all,
                std::time::Duration::from_secs(1),
            ));
            if ctx.json {
                ctx.print_json(&done)?;
            } else {
                for r in &done {
                    match (&r.error, &r.progress) {
                        (Some(e), _) => eprintln!("{}: failed: {e}", r.model),
                        (None, Some(p)) => println!(
                            "{}: {} pinned ({} from peers, {} from origin)",
                            r.model,
                            &p.id[..12.min(p.id.len())],
                            human_bytes(p.bytes_from_peers),
                            human_bytes(p.bytes_from_origin)
                        ),
                        (None, None) => {}
                    }
                }
            }
            let failed = done.iter().filter(|r| r.error.is_some()).count();
            if failed > 0 {
                bail!("{failed} of {} models failed to prefetch", done.len());
            }
        }
        OpsCmd::Config(ConfigCmd::Path) => {
            let p = src.path.clone().or_else(Config::discover);
            match p {
                Some(p) => println!(
                    "{}",
                    p.canonicalize()
                        .with_context(|| format!("config file {}", p.display()))?
                        .display()
                ),
                None => println!("(none: built-in defaults and SHOAL_* environment)"),
            }
        }
    }
    Ok(())
}
