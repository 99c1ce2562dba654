//! Operations subcommands: `config show`, `import`.

use super::Ctx;
use anyhow::{Context, Result};
use clap::Subcommand;
use shoal::config::Config;
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
            cfg.store.quota = shoal::config::ByteSize(q);
        }
        Ok(cfg)
    }
}

/// Operations commands.
#[derive(Subcommand, Debug)]
pub enum OpsCmd {
    /// Configuration file commands.
    #[command(subcommand)]
    Config(ConfigCmd),
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
