//! The node's whole configuration: a TOML file, `SHOAL_*` environment
//! overrides and command-line flags, merged in that order over built-in
//! defaults.
//!
//! Precedence, lowest first: [`Config::default`] < the file < environment
//! variables < command-line flags ([`Config::set`]). Every setting is listed
//! in [`SETTINGS`] with its documentation and environment variable; the same
//! table renders [`Config::effective_toml`] (what `shoal config show` prints)
//! and the shipped example `docs/shoal.example.toml`, which a test keeps equal
//! to the defaults.
//!
//! Each layer owns the serde type of its section and its settings (a field
//! and one [`Setting`] each): [`StoreOptions`] (`[store]`), [`MeshConfig`]
//! (`[mesh]`), [`ApiOptions`] (`[api]`), [`ServeConfig`] (`[inference]`),
//! [`KvCacheConfig`] (`[kv]`), [`ResponseCacheConfig`] (`[response_cache]`)
//! and [`MetricsConfig`] (`[metrics]`). This module composes them, checks
//! what no single section can, and maps the result to what
//! [`crate::node::Node::start`] and the serving layer need. The generic
//! machinery (parsing, overrides, rendering) is in [`crate::config`].

use crate::api::ApiOptions;
use crate::config::{self, CONFIG_VERSION, ConfigError, Kind, Section, Setting};
use crate::kvcache::KvCacheConfig;
use crate::mesh::MeshConfig;
use crate::metrics::MetricsConfig;
use crate::node::NodeConfig;
use crate::respcache::ResponseCacheConfig;
use crate::serve::ServeConfig;
use crate::store::StoreOptions;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

/// The whole configuration of a node. See [`SETTINGS`] for what each field means.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Configuration format version ([`CONFIG_VERSION`]).
    pub version: u32,
    /// Data directory; `None` means `$XDG_DATA_HOME/shoal` or `~/.local/share/shoal`.
    pub data_dir: Option<PathBuf>,
    /// Log filter (tracing `EnvFilter` syntax).
    pub log: String,
    /// Worker threads of the daemon's async runtime; 0 uses one per core.
    pub async_threads: usize,
    /// `[store]`: the content store.
    pub store: StoreOptions,
    /// `[mesh]`: peers and transfers.
    pub mesh: MeshConfig,
    /// `[api]`: the HTTP API (OpenAI-compatible, admin, metrics, dashboard).
    pub api: ApiOptions,
    /// `[inference]`: running models.
    pub inference: ServeConfig,
    /// `[kv]`: the KV (prefix) cache.
    pub kv: KvCacheConfig,
    /// `[response_cache]`: whole-response cache.
    pub response_cache: ResponseCacheConfig,
    /// `[route]`: routing requests across the mesh.
    pub route: crate::route::RouteConfig,
    /// `[metrics]`: Prometheus metrics.
    pub metrics: MetricsConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            version: CONFIG_VERSION,
            data_dir: None,
            log: "warn".into(),
            async_threads: 1,
            store: StoreOptions::default(),
            mesh: MeshConfig::default(),
            api: ApiOptions::default(),
            inference: ServeConfig::default(),
            kv: KvCacheConfig::default(),
            response_cache: ResponseCacheConfig::default(),
            route: crate::route::RouteConfig::default(),
            metrics: MetricsConfig::default(),
        }
    }
}

/// The sections, in file order, with their documentation.
pub const SECTIONS: &[Section] = &[
    (
        "store",
        "The content store: model artifacts on this node's disk.",
    ),
    (
        "mesh",
        "The mesh: how this node finds peers and fetches chunks from them.",
    ),
    (
        "api",
        "The HTTP API: OpenAI-compatible endpoints, the admin API, /metrics and the dashboard at /.",
    ),
    ("inference", "Running models."),
    (
        "kv",
        "The KV cache: attention state of prompt prefixes, reused across requests (RAM, then disk).",
    ),
    (
        "response_cache",
        "Whole responses to identical deterministic requests (temperature 0 or fixed seed).",
    ),
    (
        "route",
        "Routing: each generation request goes to the node where its model and prefix are warm.",
    ),
    ("metrics", "Prometheus metrics."),
];

/// The top-level settings (no section), in file order.
pub const TOP_SETTINGS: &[Setting] = &[
    Setting::new(
        "version",
        None,
        Kind::Int,
        "Format of this file. Only 1 exists.",
        "1",
    ),
    Setting::new(
        "data_dir",
        Some("SHOAL_DATA_DIR"),
        Kind::Str,
        "Data directory (store, keys, KV spill). Unset: $XDG_DATA_HOME/shoal or\n~/.local/share/shoal (the systemd unit sets /var/lib/shoal).",
        "\"/var/lib/shoal\"",
    ),
    Setting::new(
        "log",
        Some("SHOAL_LOG"),
        Kind::Str,
        "Log filter, e.g. \"info\" or \"warn,shoal::mesh=debug\". RUST_LOG wins when set.",
        "\"info\"",
    ),
    Setting::new(
        "async_threads",
        Some("SHOAL_ASYNC_THREADS"),
        Kind::Int,
        "Worker threads of the daemon's async runtime (network I/O, the mesh protocol, the\nHTTP API); 0 uses one per core. The heavy work runs elsewhere (hashing and disk on\nthe blocking pool, generation on its own threads), and one worker avoids the\ncross-thread wake-ups that cost about 15 % of a transfer's CPU (docs/benchmarks.md).",
        "1",
    ),
];

/// The `[metrics]` section's settings (here, not in [`crate::metrics`]:
/// that module imports nothing from the crate).
pub const METRICS_SETTINGS: &[Setting] = &[Setting::new(
    "metrics.enabled",
    Some("SHOAL_METRICS"),
    Kind::Bool,
    "Serve Prometheus metrics at GET /metrics on the API address.",
    "true",
)];

/// Every setting of the node, in file order: the top-level ones, then each
/// layer's table in the order of [`SECTIONS`].
pub static SETTINGS: LazyLock<Vec<Setting>> = LazyLock::new(|| {
    [
        TOP_SETTINGS,
        crate::store::SETTINGS,
        crate::mesh::SETTINGS,
        crate::api::SETTINGS,
        crate::serve::SETTINGS,
        crate::kvcache::SETTINGS,
        crate::respcache::SETTINGS,
        crate::route::SETTINGS,
        METRICS_SETTINGS,
    ]
    .concat()
});

/// Looks up a setting by dotted key.
pub fn setting(key: &str) -> Option<&'static Setting> {
    config::setting(&SETTINGS, key)
}

/// The first lines of a rendered configuration file.
const HEADER: &str = "# shoal configuration.\n\
     #\n\
     # Precedence, lowest first: built-in defaults < this file < SHOAL_* environment\n\
     # variables < command-line flags. Sizes: \"20G\", \"512M\", \"64K\", bytes, or\n\
     # \"unlimited\". Durations: \"500ms\", \"90s\", \"30m\", \"24h\", \"7d\", or seconds.\n\
     # Missing keys take their defaults; unknown keys are an error.\n";

impl Config {
    /// Defaults, then the file at `path` (if any), then `SHOAL_*` environment
    /// variables. Command-line flags go on top with [`Config::set`].
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_with(path, |var| std::env::var(var).ok())
    }

    /// [`Config::load`] with the environment given as a function (for tests and embedding).
    pub fn load_with(
        path: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut cfg = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_owned(),
                    source,
                })?;
                Self::from_toml(&text, p)?
            }
            None => Config::default(),
        };
        config::apply_env(&mut cfg, &SETTINGS, env, Config::validate)?;
        Ok(cfg)
    }

    /// Parses a configuration file's text (missing keys take their defaults).
    /// `path` is only used in error messages.
    pub fn from_toml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let cfg: Config = config::parse_toml(text, path)?;
        if cfg.version != CONFIG_VERSION {
            return Err(ConfigError::UnsupportedVersion(cfg.version));
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Sets one setting from its string form, as written on a command line:
    /// `set("store.quota", "20G")`, `set("mesh.peers", "/ip4/…,/ip4/…")`.
    /// On an error nothing changes.
    pub fn set(&mut self, key: &str, raw: &str) -> Result<(), ConfigError> {
        *self = config::set_value(self, &SETTINGS, key, raw, Config::validate)?;
        Ok(())
    }

    /// Checks ranges that the types alone do not: each section's own rules,
    /// then the top-level ones.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.kv.validate()?;
        self.inference.validate()?;
        self.mesh.validate()?;
        if self
            .data_dir
            .as_ref()
            .is_some_and(|d| d.as_os_str().is_empty())
        {
            return Err(ConfigError::Invalid(
                "data_dir is empty (it would mean the current directory); \
                 give a path, or leave it unset for the default"
                    .into(),
            ));
        }
        self.api.validate()?;
        self.route.validate()?;
        Ok(())
    }

    /// The effective configuration as a commented TOML file: every setting with
    /// its documentation and environment variable; unset optional settings are
    /// shown commented out with an example. Parsing it gives back `self`.
    pub fn effective_toml(&self) -> String {
        config::render_toml(self, HEADER, &SETTINGS, SECTIONS)
    }

    /// The store options this configuration asks for.
    pub fn store_options(&self) -> StoreOptions {
        self.store.clone()
    }

    /// The mesh settings this configuration asks for, with the files they
    /// name read ([`MeshConfig::read_files`]: the PSK, the CA file).
    pub fn mesh_config(&self) -> Result<MeshConfig, ConfigError> {
        let mut mesh = self.mesh.clone();
        mesh.read_files()?;
        Ok(mesh)
    }

    /// The serving settings (`[inference]`, `[kv]`, `[response_cache]`), with
    /// the KV disk tier under `<data_dir>/kv`.
    pub fn serve_config(&self, data_dir: &Path) -> ServeConfig {
        self.inference
            .with_caches(&self.kv, &self.response_cache, data_dir)
    }

    /// The API options (`[api]` and `[metrics] enabled`).
    pub fn api_options(&self) -> ApiOptions {
        ApiOptions {
            metrics: self.metrics.enabled,
            ..self.api.clone()
        }
    }

    /// Everything [`crate::node::Node::start`] needs; `default_data_dir` is
    /// used when `data_dir` is unset.
    pub fn node_config(&self, default_data_dir: &Path) -> Result<NodeConfig, ConfigError> {
        Ok(NodeConfig {
            data_dir: self
                .data_dir
                .clone()
                .unwrap_or_else(|| default_data_dir.to_owned()),
            store: self.store_options(),
            mesh: self.mesh_config()?,
        })
    }

    /// Where to look for a configuration file when none is given
    /// ([`config::discover`]).
    pub fn discover() -> Option<PathBuf> {
        config::discover()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ByteSize, HumanDuration};
    use crate::inference::KvDtype;
    use crate::serve::max_inference_threads;
    use std::collections::HashMap;
    use std::time::Duration;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    fn write_tmp(text: &str) -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("shoal.toml");
        std::fs::write(&p, text).expect("write");
        (d, p)
    }

    #[test]
    fn loaded_model_bounds_parse_and_are_validated() {
        let mut cfg = Config::default();
        assert_eq!(cfg.inference.max_loaded, 2);
        assert_eq!(cfg.inference.memory_budget, None);
        cfg.set("inference.max_loaded", "1").expect("set");
        cfg.set("inference.memory_budget", "6G").expect("set");
        assert_eq!(cfg.inference.max_loaded, 1);
        assert_eq!(
            cfg.inference.memory_budget.map(ByteSize),
            Some(ByteSize(6 << 30))
        );
        assert!(cfg.set("inference.max_loaded", "0").is_err());
        assert!(cfg.set("inference.memory_budget", "0").is_err());
        let serve = cfg.serve_config(Path::new("/x"));
        assert_eq!(
            (serve.max_loaded, serve.memory_budget_bytes()),
            (1, 6 << 30)
        );
    }

    /// Every serialized key has a documented setting, and every setting exists.
    #[test]
    fn settings_table_covers_every_field() {
        let mut cfg = Config {
            data_dir: Some("/x".into()),
            ..Default::default()
        };
        cfg.mesh.psk_file = Some("/k".into());
        cfg.mesh.origin_ca_file = Some("/ca.pem".into());
        cfg.inference.default_model = Some("m".into());
        cfg.api.admin_token_file = Some("/t".into());
        cfg.api.keys_file = Some("/k".into());
        cfg.inference.memory_budget = Some(6 << 30);
        let tree = toml::Value::try_from(&cfg).expect("serialize");
        let mut keys = Vec::new();
        for (k, v) in tree.as_table().expect("table") {
            match v.as_table() {
                Some(t) => keys.extend(t.keys().map(|n| format!("{k}.{n}"))),
                None => keys.push(k.clone()),
            }
        }
        keys.sort();
        let mut documented: Vec<String> = SETTINGS.iter().map(|s| s.key.to_owned()).collect();
        documented.sort();
        assert_eq!(keys, documented);
        for st in SETTINGS.iter() {
            if let Some((sec, _)) = st.key.split_once('.') {
                assert!(
                    SECTIONS.iter().any(|(n, _)| *n == sec),
                    "{sec} undocumented"
                );
            }
            assert!(!st.doc.is_empty());
        }
    }

    /// The shipped example is exactly the rendered defaults, and parses back to them.
    /// Regenerate with `SHOAL_BLESS=1 cargo test --release -p shoal --lib settings::`.
    #[test]
    fn example_file_matches_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/shoal.example.toml");
        let want = Config::default().effective_toml();
        if std::env::var_os("SHOAL_BLESS").is_some() {
            std::fs::write(&path, &want).expect("write example");
        }
        let have = std::fs::read_to_string(&path).expect("docs/shoal.example.toml");
        assert_eq!(
            have, want,
            "docs/shoal.example.toml is stale (SHOAL_BLESS=1 to regenerate)"
        );
        let parsed = Config::from_toml(&have, &path).expect("example parses");
        assert_eq!(parsed, Config::default());
        // Uncommenting every example value gives a valid file too.
        let uncommented: String = have
            .lines()
            .map(|l| match l.strip_prefix('#') {
                Some(rest) if rest.contains(" = ") && !rest.starts_with(' ') => rest,
                _ => l,
            })
            .collect::<Vec<_>>()
            .join("\n");
        let with_examples = Config::from_toml(&uncommented, &path).expect("examples parse");
        assert!(with_examples.data_dir.is_some());
        assert!(with_examples.mesh.psk_file.is_some());
        assert!(with_examples.mesh.origin_ca_file.is_some());
        assert!(with_examples.inference.default_model.is_some());
        assert!(with_examples.api.keys_file.is_some());
        assert!(with_examples.api.admin_token_file.is_some());
    }

    #[test]
    fn effective_toml_round_trips() {
        let mut cfg = Config::default();
        cfg.set("data_dir", "/srv/shoal").expect("set");
        cfg.set("store.quota", "20G").expect("set");
        cfg.set(
            "mesh.peers",
            "/ip4/127.0.0.1/tcp/7101, /ip4/127.0.0.1/tcp/7102",
        )
        .expect("set");
        cfg.set("mesh.mdns", "off").expect("set");
        cfg.set("kv.dtype", "q8_0").expect("set");
        cfg.set("inference.default_model", "smollm2:q4_1")
            .expect("set");
        let text = cfg.effective_toml();
        let back = Config::from_toml(&text, Path::new("x")).expect("parses");
        assert_eq!(back, cfg);
        assert_eq!(ByteSize(back.store.quota_bytes), ByteSize(20 << 30));
        assert_eq!(back.mesh.peers.len(), 2);
        assert!(!back.mesh.mdns);
        assert_eq!(back.kv.dtype, KvDtype::Q8_0);
    }

    #[test]
    fn node_config_carries_the_settings() {
        let d = tempfile::tempdir().expect("tempdir");
        let key = d.path().join("swarm.key");
        std::fs::write(&key, crate::mesh::new_psk().expect("psk")).expect("write");
        let mut cfg = Config::default();
        cfg.set("mesh.peers", "/ip4/127.0.0.1/tcp/7101")
            .expect("set");
        cfg.set("mesh.mdns", "false").expect("set");
        cfg.set("mesh.offline", "true").expect("set");
        cfg.set("mesh.ban_duration", "5m").expect("set");
        cfg.set("store.quota", "1G").expect("set");
        cfg.set("mesh.psk_file", key.to_str().expect("utf-8"))
            .expect("set");
        let n = cfg.node_config(Path::new("/default")).expect("node config");
        assert_eq!(n.data_dir, Path::new("/default"));
        assert_eq!(n.store.quota_bytes, 1 << 30);
        assert_eq!(n.mesh.peers, cfg.mesh.peers);
        assert!(!n.mesh.mdns && n.mesh.offline && n.mesh.psk.is_some());
        assert_eq!(n.mesh.ban_duration, Duration::from_secs(300));
        assert_eq!(n.mesh.origin_ca_file, None);
        assert_eq!(n.mesh.frame_size, 256 << 10);
        cfg.set("mesh.frame_size", "64K").expect("set");
        let n = cfg.node_config(Path::new("/d")).expect("64K frames");
        assert_eq!(n.mesh.frame_size, 64 << 10);
        for bad in ["2M", "512"] {
            cfg.set("mesh.frame_size", bad).expect("set");
            assert!(
                matches!(cfg.node_config(Path::new("/d")), Err(ConfigError::Invalid(m)) if m.contains("frame_size")),
                "{bad}"
            );
        }
        cfg.set("mesh.frame_size", "256K").expect("set");
        cfg.set("mesh.psk_file", "/nonexistent/swarm.key")
            .expect("set");
        assert!(matches!(
            cfg.node_config(Path::new("/d")),
            Err(ConfigError::Invalid(_))
        ));
        // A CA file that does not hold a certificate stops the node at start.
        cfg.set("mesh.psk_file", key.to_str().expect("utf-8"))
            .expect("set");
        let not_pem = d.path().join("ca.pem");
        std::fs::write(&not_pem, "not a certificate\n").expect("write");
        cfg.set("mesh.origin_ca_file", not_pem.to_str().expect("utf-8"))
            .expect("set");
        match cfg.node_config(Path::new("/d")) {
            Err(ConfigError::Invalid(m)) => assert!(m.contains("mesh.origin_ca_file"), "{m}"),
            other => panic!("expected an invalid CA file, got {other:?}"),
        }
    }

    #[test]
    fn precedence_defaults_file_env_cli() {
        let (_d, p) = write_tmp(
            "[store]\nquota = \"10G\"\npartial_ttl = \"2h\"\n[api]\nlisten = \"0.0.0.0:8080\"\n[mesh]\nmdns = false\n",
        );
        // File over defaults.
        let cfg = Config::load_with(Some(&p), env_of(&[])).expect("load");
        assert_eq!(ByteSize(cfg.store.quota_bytes), ByteSize(10 << 30));
        assert_eq!(
            HumanDuration(cfg.store.partial_ttl),
            HumanDuration::secs(7200)
        );
        assert_eq!(cfg.api.listen.port(), 8080);
        assert!(!cfg.mesh.mdns);
        assert_eq!(cfg.kv, KvCacheConfig::default());
        // Environment over file.
        let mut cfg = Config::load_with(
            Some(&p),
            env_of(&[
                ("SHOAL_STORE_QUOTA", "20G"),
                ("SHOAL_API", "127.0.0.1:9000"),
                ("SHOAL_PEERS", "/ip4/127.0.0.1/tcp/1,/ip4/127.0.0.1/tcp/2"),
                ("SHOAL_MDNS", "yes"),
                ("SHOAL_QUEUE_DEPTH", "3"),
            ]),
        )
        .expect("load");
        assert_eq!(ByteSize(cfg.store.quota_bytes), ByteSize(20 << 30));
        assert_eq!(
            HumanDuration(cfg.store.partial_ttl),
            HumanDuration::secs(7200)
        );
        assert_eq!(cfg.api.listen, "127.0.0.1:9000".parse().expect("addr"));
        assert_eq!(cfg.mesh.peers.len(), 2);
        assert!(cfg.mesh.mdns);
        assert_eq!(cfg.inference.queue_depth, 3);
        // Command line over environment.
        cfg.set("store.quota", "30G").expect("set");
        assert_eq!(ByteSize(cfg.store.quota_bytes), ByteSize(30 << 30));
        assert_eq!(cfg.store_options().quota_bytes, 30 << 30);
        // No file: defaults and environment.
        let cfg = Config::load_with(None, env_of(&[("SHOAL_KV_RAM", "1G")])).expect("load");
        assert_eq!(ByteSize(cfg.kv.ram_budget), ByteSize(1 << 30));
        assert_eq!(cfg.store, StoreOptions::default());
    }

    #[test]
    fn file_errors_carry_line_and_column() {
        let cases: &[(&str, usize, usize, &str)] = &[
            ("[store]\nquota = \"20Q\"\n", 2, 9, "not a size"),
            ("log = \"info\"\n\n[kv]\ndtype = \"f32\"\n", 4, 9, "f16"),
            ("[mesh]\nmnds = true\n", 2, 1, "unknown field"),
            ("[api]\nlisten = \"localhost\"\n", 2, 10, ""),
            ("[store\nquota = 1\n", 1, 7, ""),
            (
                "[mesh]\npeers = [\"/ip4/1.2.3.4/tcp/1\", \"nonsense\"]\n",
                2,
                9,
                "multiaddr",
            ),
            ("[inference]\nthreads = -2\n", 2, 11, ""),
        ];
        for (text, line, col, needle) in cases {
            let (_d, p) = write_tmp(text);
            match Config::load_with(Some(&p), env_of(&[])) {
                Err(ConfigError::Parse {
                    line: l,
                    column: c,
                    message,
                    ..
                }) => {
                    assert_eq!((l, c), (*line, *col), "{text:?}: {message}");
                    assert!(message.contains(needle), "{text:?}: {message}");
                }
                other => panic!("{text:?}: expected a parse error, got {other:?}"),
            }
        }
        // The error's text names the file, line and column.
        let (_d, p) = write_tmp("[store]\nquota = \"20Q\"\n");
        let msg = Config::load_with(Some(&p), env_of(&[]))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(msg.contains("shoal.toml:2:9:"), "{msg}");
    }

    /// `inference.threads = 100000` started 1,857 threads and hung a request;
    /// `data_dir = ""` silently meant the current directory. Both are refused.
    #[test]
    fn threads_data_dir_and_api_values_are_validated() {
        let invalid = |text: &str| {
            let (_d, p) = write_tmp(text);
            match Config::load_with(Some(&p), env_of(&[])) {
                Err(ConfigError::Invalid(m)) => m,
                other => panic!("{text:?}: expected an invalid configuration, got {other:?}"),
            }
        };
        let m = invalid("[inference]\nthreads = 100000\n");
        assert!(m.contains("inference.threads") && m.contains("4 x"), "{m}");
        let max = max_inference_threads();
        let (_d, p) = write_tmp(&format!("[inference]\nthreads = {max}\n"));
        assert_eq!(
            Config::load_with(Some(&p), env_of(&[]))
                .expect("the largest thread count is fine")
                .inference
                .threads,
            max
        );
        let m = invalid(&format!("[inference]\nthreads = {}\n", max + 1));
        assert!(m.contains("inference.threads"), "{m}");
        assert!(invalid("data_dir = \"\"\n").contains("data_dir is empty"));
        let mut cfg = Config::default();
        assert!(cfg.set("data_dir", "").is_err());
        assert!(cfg.set("inference.threads", "100000").is_err());
        assert_eq!(cfg, Config::default());
        assert!(matches!(
            Config::load_with(None, env_of(&[("SHOAL_DATA_DIR", "")])),
            Err(ConfigError::Env { .. })
        ));
        assert!(invalid("[api]\nmax_pulls = 0\n").contains("api.max_pulls"));
        assert!(invalid("[api]\nheader_timeout = \"0s\"\n").contains("api.header_timeout"));
        assert!(invalid("[api]\nidle_timeout = \"30d\"\n").contains("api.idle_timeout"));
        assert!(invalid("[api]\nallowed_hosts = [\"http://pi\"]\n").contains("allowed_hosts"));
        assert!(
            invalid("[api]\nallowed_origins = [\"notebook.lan\"]\n").contains("allowed_origins")
        );
        // Good values of the [api] section parse.
        let (_d, p) = write_tmp(
            "[api]\nadmin_token_file = \"/t\"\nkeys_file = \"/k\"\nallowed_hosts = [\"pi.local\", \"*.lan\"]\n\
             allowed_origins = [\"http://nb.lan:8888\", \"*\"]\nmax_pulls = 2\nheader_timeout = \"5s\"\n",
        );
        let cfg = Config::load_with(Some(&p), env_of(&[])).expect("valid [api]");
        assert_eq!(cfg.api.max_pulls, 2);
        assert_eq!(
            HumanDuration(cfg.api.header_timeout),
            HumanDuration::secs(5)
        );
        assert_eq!(cfg.api.keys_file.as_deref(), Some(Path::new("/k")));
    }

    /// The serving layer's built-in defaults are the configuration's, and the
    /// documents quote the same numbers (queue full is 429, depth 16, TTL 1h).
    #[test]
    fn serving_defaults_and_docs_agree_with_the_config() {
        let cfg = Config::default();
        let serve = crate::serve::ServeConfig::default();
        assert_eq!(serve.queue_depth, cfg.inference.queue_depth);
        assert_eq!(serve.response_cache_ttl, cfg.response_cache.ttl);
        assert_eq!(serve.response_cache_budget, cfg.response_cache.budget);
        let from = cfg.serve_config(Path::new("/d"));
        assert_eq!(from.queue_depth, serve.queue_depth);
        assert_eq!(from.response_cache_ttl, serve.response_cache_ttl);
        let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
        let read = |f: &str| std::fs::read_to_string(docs.join(f)).expect("doc");
        let ops = read("OPERATIONS.md");
        let serving = read("SERVING.md");
        for (doc, text) in [("OPERATIONS.md", &ops), ("SERVING.md", &serving)] {
            // Each sentence (or table row) about a full queue must not say 503.
            for s in text
                .split(['.', '\n'])
                .filter(|s| s.contains("queue") && s.contains("full"))
            {
                assert!(!s.contains("503"), "{doc} says a full queue is 503:\n{s}");
            }
        }
        assert!(ops.contains("HTTP 429 with `Retry-After`"), "OPERATIONS.md");
        let depth = format!("default depth\n{}", cfg.inference.queue_depth);
        let depth_flat = format!("default depth {}", cfg.inference.queue_depth);
        assert!(
            serving.contains(&depth) || serving.contains(&depth_flat),
            "SERVING.md must quote queue depth {}",
            cfg.inference.queue_depth
        );
        let quoted = serving
            .split_once("TTL (default ")
            .map(|(_, rest)| rest.split([',', ')']).next().unwrap_or(rest));
        assert_eq!(
            quoted,
            Some(HumanDuration(cfg.response_cache.ttl).to_string().as_str()),
            "SERVING.md's response-cache TTL"
        );
        for st in SETTINGS.iter().filter(|s| s.doc.contains("queue")) {
            assert!(!st.doc.contains("HTTP 503"), "{}: {}", st.key, st.doc);
        }
    }

    #[test]
    fn semantic_and_env_errors() {
        let (_d, p) = write_tmp("[kv]\nblock_size = 0\n");
        assert!(matches!(
            Config::load_with(Some(&p), env_of(&[])),
            Err(ConfigError::Invalid(_))
        ));
        let (_d, p) = write_tmp("version = 2\n");
        assert!(matches!(
            Config::load_with(Some(&p), env_of(&[])),
            Err(ConfigError::UnsupportedVersion(2))
        ));
        match Config::load_with(None, env_of(&[("SHOAL_MDNS", "maybe")])) {
            Err(ConfigError::Env { var, .. }) => assert_eq!(var, "SHOAL_MDNS"),
            other => panic!("expected an env error, got {other:?}"),
        }
        match Config::load_with(None, env_of(&[("SHOAL_STORE_QUOTA", "lots")])) {
            Err(ConfigError::Env { var, message, .. }) => {
                assert_eq!(var, "SHOAL_STORE_QUOTA");
                assert!(message.contains("not a size"), "{message}");
            }
            other => panic!("expected an env error, got {other:?}"),
        }
        let mut cfg = Config::default();
        assert!(matches!(
            cfg.set("store.quotaa", "1G"),
            Err(ConfigError::UnknownKey(_))
        ));
        assert!(cfg.set("kv.block_size", "0").is_err());
        assert_eq!(cfg, Config::default(), "a failed set changes nothing");
        let missing = Path::new("/nonexistent/shoal.toml");
        assert!(matches!(
            Config::load_with(Some(missing), env_of(&[])),
            Err(ConfigError::Read { .. })
        ));
    }
}
