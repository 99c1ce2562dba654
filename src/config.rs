//! The node's configuration: a TOML file, `SHOAL_*` environment overrides and
//! command-line flags, merged in that order over built-in defaults.
//!
//! Precedence, lowest first: [`Config::default`] < the file < environment
//! variables < command-line flags ([`Config::set`]). Every setting is listed
//! in [`SETTINGS`] with its documentation and environment variable; the same
//! table renders [`Config::effective_toml`] (what `shoal config show` prints)
//! and the shipped example `docs/shoal.example.toml`, which a test keeps equal
//! to the defaults.
//!
//! Sizes are written like `"20G"`, `"512M"`, `"64K"` or a plain number of
//! bytes (binary units), or `"unlimited"`; durations like `"90s"`, `"30m"`,
//! `"24h"`, `"7d"` or a plain number of seconds.
//!
//! Other layers read their section: [`Config::store`], [`Config::mesh`],
//! [`Config::api`], [`Config::inference`], [`Config::kv`],
//! [`Config::response_cache`], [`Config::metrics`].

use libp2p::Multiaddr;
use serde::{Deserialize, Deserializer, Serialize, Serializer, de};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

/// The configuration-file format this build reads and writes.
pub const CONFIG_VERSION: u32 = 1;

/// Errors from loading or overriding the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or holds a bad value, at this line and column (1-based).
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Line, from 1.
        line: usize,
        /// Column, from 1 (in characters).
        column: usize,
        /// What is wrong.
        message: String,
    },
    /// An environment variable holds a bad value.
    #[error("environment variable {var}={value:?}: {message}")]
    Env {
        /// The variable.
        var: String,
        /// Its value.
        value: String,
        /// What is wrong.
        message: String,
    },
    /// A setting given on the command line (or through [`Config::set`]) is bad.
    #[error("setting {key} = {value:?}: {message}")]
    Override {
        /// Dotted key, e.g. `store.quota`.
        key: String,
        /// The value given.
        value: String,
        /// What is wrong.
        message: String,
    },
    /// No setting has this key.
    #[error("unknown setting {0:?} (see `shoal config show` for the list)")]
    UnknownKey(String),
    /// The file was written for a configuration format this build does not read.
    #[error("config version {0} is not supported (this build reads version {CONFIG_VERSION})")]
    UnsupportedVersion(u32),
    /// Settings that are each valid but make no sense together, or out of range.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

// ---------------------------------------------------------------------------
// Value types

/// A byte size written for people: `"20G"`, `"512M"`, `"64K"`, `1024`, `"unlimited"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// No limit.
    pub const UNLIMITED: ByteSize = ByteSize(u64::MAX);

    /// The number of bytes (`u64::MAX` when unlimited).
    pub fn bytes(self) -> u64 {
        self.0
    }

    /// Whether this is the "no limit" value.
    pub fn is_unlimited(self) -> bool {
        self.0 == u64::MAX
    }
}

/// Why a size or duration does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseValueError(String);

impl FromStr for ByteSize {
    type Err = ParseValueError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("unlimited") || s.eq_ignore_ascii_case("none") {
            return Ok(ByteSize::UNLIMITED);
        }
        let bad = || {
            ParseValueError(format!(
                "not a size: {s:?} (use e.g. 20G, 512M, 64K, 1024 or \"unlimited\")"
            ))
        };
        let split = s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let unit = unit.to_ascii_uppercase();
        let mult: u64 = match unit.trim_end_matches("IB").trim_end_matches('B') {
            "" => 1,
            "K" => 1 << 10,
            "M" => 1 << 20,
            "G" => 1 << 30,
            "T" => 1 << 40,
            _ => return Err(bad()),
        };
        let num = num.trim();
        if let Ok(n) = num.parse::<u64>() {
            return n.checked_mul(mult).map(ByteSize).ok_or_else(bad);
        }
        let n: f64 = num.parse().map_err(|_| bad())?;
        let v = n * mult as f64;
        if !(0.0..1.8e19).contains(&v) {
            return Err(bad());
        }
        Ok(ByteSize(v as u64))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_unlimited() {
            return f.write_str("unlimited");
        }
        for (unit, shift) in [("T", 40), ("G", 30), ("M", 20), ("K", 10)] {
            let m = 1u64 << shift;
            if self.0 >= m && self.0.is_multiple_of(m) {
                return write!(f, "{}{unit}", self.0 / m);
            }
        }
        write!(f, "{}", self.0)
    }
}

/// A duration written for people: `"500ms"`, `"90s"`, `"30m"`, `"24h"`, `"7d"`, or seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    /// The duration.
    pub fn get(self) -> Duration {
        self.0
    }

    /// From whole seconds.
    pub const fn secs(s: u64) -> Self {
        HumanDuration(Duration::from_secs(s))
    }
}

impl FromStr for HumanDuration {
    type Err = ParseValueError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let bad = || {
            ParseValueError(format!(
                "not a duration: {s:?} (use e.g. 500ms, 90s, 30m, 24h, 7d)"
            ))
        };
        let split = s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num.trim().parse().map_err(|_| bad())?;
        let ms: u64 = match unit {
            "ms" => 1,
            "" | "s" => 1000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(bad()),
        };
        n.checked_mul(ms)
            .map(|ms| HumanDuration(Duration::from_millis(ms)))
            .ok_or_else(bad)
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if !ms.is_multiple_of(1000) {
            return write!(f, "{ms}ms");
        }
        let s = ms / 1000;
        for (unit, n) in [("d", 86_400), ("h", 3600), ("m", 60)] {
            if s >= n && s.is_multiple_of(n) {
                return write!(f, "{}{unit}", s / n);
            }
        }
        write!(f, "{s}s")
    }
}

/// Serde for types that are written as a string and may also be given as a
/// plain integer (bytes, seconds).
macro_rules! string_or_int_serde {
    ($t:ty, $what:literal) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl de::Visitor<'_> for V {
                    type Value = $t;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str($what)
                    }
                    fn visit_str<E: de::Error>(self, v: &str) -> Result<$t, E> {
                        v.parse().map_err(E::custom)
                    }
                    fn visit_i64<E: de::Error>(self, v: i64) -> Result<$t, E> {
                        u64::try_from(v)
                            .map_err(|_| E::custom(concat!("a negative ", $what)))
                            .and_then(|v| v.to_string().parse().map_err(E::custom))
                    }
                    fn visit_u64<E: de::Error>(self, v: u64) -> Result<$t, E> {
                        v.to_string().parse().map_err(E::custom)
                    }
                }
                d.deserialize_any(V)
            }
        }
    };
}

string_or_int_serde!(ByteSize, "a size such as \"20G\" or a number of bytes");
string_or_int_serde!(
    HumanDuration,
    "a duration such as \"24h\" or a number of seconds"
);

/// Element type of KV-cache blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum KvDtype {
    /// IEEE half precision: exact to what the model computed, 2 bytes per value.
    #[serde(rename = "f16")]
    F16,
    /// ggml's Q8_0 (blocks of 32 int8 with one f16 scale): about half the bytes of f16.
    #[serde(rename = "q8_0")]
    Q8_0,
}

fn multiaddrs<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Multiaddr>, D::Error> {
    let v = Vec::<String>::deserialize(d)?;
    v.iter()
        .map(|s| {
            s.parse::<Multiaddr>().map_err(|e| {
                de::Error::custom(format!(
                    "{s:?} is not a multiaddr ({e}); e.g. \"/ip4/192.168.1.20/tcp/7071\""
                ))
            })
        })
        .collect()
}

fn peer_ids<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let v = Vec::<String>::deserialize(d)?;
    for s in &v {
        s.parse::<libp2p::PeerId>()
            .map_err(|e| de::Error::custom(format!("{s:?} is not a peer id ({e})")))?;
    }
    Ok(v)
}

// ---------------------------------------------------------------------------
// The configuration

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
    pub store: StoreConfig,
    /// `[mesh]`: peers and transfers.
    pub mesh: MeshConfig,
    /// `[api]`: the HTTP API (OpenAI-compatible, admin, metrics, dashboard).
    pub api: ApiConfig,
    /// `[inference]`: running models.
    pub inference: InferenceConfig,
    /// `[kv]`: the KV (prefix) cache.
    pub kv: KvConfig,
    /// `[response_cache]`: whole-response cache.
    pub response_cache: ResponseCacheConfig,
    /// `[metrics]`: Prometheus metrics.
    pub metrics: MetricsConfig,
}

/// `[store]` settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// Byte quota for artifacts; least-recently-used unpinned ones are evicted beyond it.
    pub quota: ByteSize,
    /// Partial downloads untouched this long are removed by garbage collection.
    pub partial_ttl: HumanDuration,
    /// Models (release names or ids) that `shoal prefetch` fetches and pins.
    pub prefetch: Vec<String>,
}

/// `[mesh]` settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MeshConfig {
    /// Addresses the mesh transport listens on.
    #[serde(deserialize_with = "multiaddrs")]
    pub listen: Vec<Multiaddr>,
    /// Static peers dialled at start and kept connected.
    #[serde(deserialize_with = "multiaddrs")]
    pub peers: Vec<Multiaddr>,
    /// Discover peers on the local link with mDNS.
    pub mdns: bool,
    /// Pre-shared key file making a private mesh (libp2p pnet).
    pub psk_file: Option<PathBuf>,
    /// Secure channels offered to peers, most preferred first.
    pub security: Vec<crate::mesh::secure::SecureChannel>,
    /// Never fetch from an origin URL; only local store and peers.
    pub offline: bool,
    /// Extra CA certificates (PEM) trusted for `https://` origins, besides the system bundle.
    pub origin_ca_file: Option<PathBuf>,
    /// Peer ids allowed to connect; empty allows any peer (that knows the PSK, if set).
    #[serde(deserialize_with = "peer_ids")]
    pub allow_peers: Vec<String>,
    /// How long a peer that served a bad chunk is banned.
    pub ban_duration: HumanDuration,
    /// Largest yamux data frame this node sends (1K to 1M).
    pub frame_size: ByteSize,

    // Discovery and download bounds (issue 14).
    /// mDNS query period once peers answered.
    pub mdns_query_interval: HumanDuration,
    /// Most downloads running at once.
    pub max_downloads: usize,
}

/// `[api]` settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Address of the HTTP API (OpenAI-compatible API, admin API, `/metrics`, dashboard).
    pub listen: SocketAddr,
    /// On SIGTERM/SIGINT, how long open requests may run before the daemon
    /// exits anyway (non-zero, logging what was still running).
    pub drain_timeout: HumanDuration,
    /// Bearer token file of the admin API; unset: `<data_dir>/admin.token` (made at first start).
    pub admin_token_file: Option<PathBuf>,
    /// API keys of the OpenAI routes (one per line); unset: the `/v1/*` routes need no key.
    pub keys_file: Option<PathBuf>,
    /// Host names accepted in the `Host` header besides IP addresses and `localhost`.
    pub allowed_hosts: Vec<String>,
    /// Browser origins (`scheme://host[:port]`) allowed to call the API cross-origin.
    pub allowed_origins: Vec<String>,
    /// Downloads started through `POST /admin/pull` that may run at once (more: HTTP 429).
    pub max_pulls: usize,
    /// Time a client has to send a request's headers.
    pub header_timeout: HumanDuration,
    /// Time a client may leave a request body without sending more of it.
    pub body_timeout: HumanDuration,
    /// Keep-alive connections with no request for this long are closed.
    pub idle_timeout: HumanDuration,
}

/// `[inference]` settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InferenceConfig {
    /// Compute threads; 0 uses one per available core.
    pub threads: usize,
    /// Requests waiting per model before new ones are refused (HTTP 429).
    pub queue_depth: usize,
    /// Model used when a request names none (a release name or artifact id).
    pub default_model: Option<String>,
    // -- bounded models (issue 14, item 2) --
    /// Models loaded at once; loading one more unloads the least recently
    /// used idle one.
    pub max_loaded: usize,
    /// Memory the loaded models may take together (file size plus the KV
    /// of one 4096-token sequence each); `None`: three quarters of the RAM.
    pub memory_budget: Option<ByteSize>,
}

/// `[kv]` settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KvConfig {
    /// Bytes of KV blocks kept in RAM.
    pub ram_budget: ByteSize,
    /// Bytes of KV blocks kept on disk (spilled from RAM).
    pub disk_budget: ByteSize,
    /// Tokens per KV block (the unit of prefix sharing).
    pub block_size: u32,
    /// Element type of stored KV blocks.
    pub dtype: KvDtype,
    /// KV blocks unused this long are dropped.
    pub ttl: HumanDuration,
}

/// `[response_cache]` settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ResponseCacheConfig {
    /// Bytes of cached responses; 0 turns the cache off.
    pub budget: ByteSize,
    /// Cached responses older than this are not served.
    pub ttl: HumanDuration,
}

/// `[metrics]` settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Serve Prometheus metrics at `GET /metrics` on the API address.
    pub enabled: bool,
}

/// The most inference threads `inference.threads` accepts: 4 x the cores of
/// this machine (more only adds contention; 1,857 threads hung a request).
pub fn max_inference_threads() -> usize {
    4 * std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Port of the HTTP API by default.
pub const DEFAULT_API_PORT: u16 = 7070;
/// TCP port of the mesh transport by default.
pub const DEFAULT_MESH_PORT: u16 = 7071;

impl Default for Config {
    fn default() -> Self {
        Config {
            version: CONFIG_VERSION,
            data_dir: None,
            log: "warn".into(),
            async_threads: 1,
            store: StoreConfig::default(),
            mesh: MeshConfig::default(),
            api: ApiConfig::default(),
            inference: InferenceConfig::default(),
            kv: KvConfig::default(),
            response_cache: ResponseCacheConfig::default(),
            metrics: MetricsConfig::default(),
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            quota: ByteSize::UNLIMITED,
            partial_ttl: HumanDuration::secs(24 * 3600),
            prefetch: Vec::new(),
        }
    }
}

impl Default for MeshConfig {
    fn default() -> Self {
        let listen = format!("/ip4/0.0.0.0/tcp/{DEFAULT_MESH_PORT}")
            .parse()
            .map(|a| vec![a])
            .unwrap_or_default();
        MeshConfig {
            listen,
            peers: Vec::new(),
            mdns: true,
            psk_file: None,
            security: crate::mesh::secure::SecureChannel::defaults(),
            offline: false,
            origin_ca_file: None,
            allow_peers: Vec::new(),
            ban_duration: HumanDuration::secs(3600),
            frame_size: ByteSize(crate::mesh::muxer::SPLIT_SEND_SIZE as u64),
            // Discovery and download bounds.
            mdns_query_interval: HumanDuration::secs(30),
            max_downloads: 4,
        }
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], DEFAULT_API_PORT)),
            drain_timeout: HumanDuration::secs(30),
            admin_token_file: None,
            keys_file: None,
            allowed_hosts: Vec::new(),
            allowed_origins: Vec::new(),
            max_pulls: 4,
            header_timeout: HumanDuration::secs(10),
            body_timeout: HumanDuration::secs(30),
            idle_timeout: HumanDuration::secs(30),
        }
    }
}

impl Default for InferenceConfig {
    fn default() -> Self {
        InferenceConfig {
            threads: 0,
            queue_depth: 16,
            default_model: None,
            max_loaded: 2,
            memory_budget: None,
        }
    }
}

impl Default for KvConfig {
    fn default() -> Self {
        KvConfig {
            ram_budget: ByteSize(512 << 20),
            disk_budget: ByteSize(4 << 30),
            block_size: 16,
            dtype: KvDtype::F16,
            ttl: HumanDuration::secs(7 * 86_400),
        }
    }
}

impl Default for ResponseCacheConfig {
    fn default() -> Self {
        ResponseCacheConfig {
            budget: ByteSize(64 << 20),
            ttl: HumanDuration::secs(3600),
        }
    }
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig { enabled: true }
    }
}

// ---------------------------------------------------------------------------
// The settings table

/// How a setting is written in TOML (and so how its environment variable is read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A string (paths, sizes, durations, addresses, names).
    Str,
    /// `true`/`false` (environment: also `1`/`0`, `yes`/`no`, `on`/`off`).
    Bool,
    /// An integer.
    Int,
    /// A list of strings (environment: comma-separated).
    List,
}

/// One setting: its dotted key, environment variable, TOML kind and documentation.
#[derive(Debug, Clone, Copy)]
pub struct Setting {
    /// Dotted key: `store.quota`; top-level keys have no dot.
    pub key: &'static str,
    /// The `SHOAL_*` environment variable overriding it, if any.
    pub env: Option<&'static str>,
    /// How it is written.
    pub kind: Kind,
    /// What it does (one or more lines).
    pub doc: &'static str,
    /// An example value shown (commented out) when the setting is unset.
    pub example: &'static str,
}

const fn s(
    key: &'static str,
    env: Option<&'static str>,
    kind: Kind,
    doc: &'static str,
    example: &'static str,
) -> Setting {
    Setting {
        key,
        env,
        kind,
        doc,
        example,
    }
}

/// The sections, in file order, with their documentation.
pub const SECTIONS: &[(&str, &str)] = &[
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
    ("metrics", "Prometheus metrics."),
];

use Kind::{Bool, Int, List, Str};

/// Every setting of the node, in file order.
pub const SETTINGS: &[Setting] = &[
    s(
        "version",
        None,
        Int,
        "Format of this file. Only 1 exists.",
        "1",
    ),
    s(
        "data_dir",
        Some("SHOAL_DATA_DIR"),
        Str,
        "Data directory (store, keys, KV spill). Unset: $XDG_DATA_HOME/shoal or\n~/.local/share/shoal (the systemd unit sets /var/lib/shoal).",
        "\"/var/lib/shoal\"",
    ),
    s(
        "log",
        Some("SHOAL_LOG"),
        Str,
        "Log filter, e.g. \"info\" or \"warn,shoal::mesh=debug\". RUST_LOG wins when set.",
        "\"info\"",
    ),
    s(
        "async_threads",
        Some("SHOAL_ASYNC_THREADS"),
        Int,
        "Worker threads of the daemon's async runtime (network I/O, the mesh protocol, the\nHTTP API); 0 uses one per core. The heavy work runs elsewhere (hashing and disk on\nthe blocking pool, generation on its own threads), and one worker avoids the\ncross-thread wake-ups that cost about 15 % of a transfer's CPU (docs/benchmarks.md).",
        "1",
    ),
    s(
        "store.quota",
        Some("SHOAL_STORE_QUOTA"),
        Str,
        "Byte quota for artifacts (\"20G\", \"512M\", or \"unlimited\"). Beyond it the\nleast-recently-used unpinned artifacts are evicted; pinned ones never are.",
        "\"20G\"",
    ),
    s(
        "store.partial_ttl",
        Some("SHOAL_PARTIAL_TTL"),
        Str,
        "Partial downloads untouched for this long are deleted by garbage collection.",
        "\"24h\"",
    ),
    s(
        "store.prefetch",
        Some("SHOAL_PREFETCH"),
        List,
        "Models (release names or ids) that `shoal prefetch` fetches through the running\nnode and pins; the shoal-prefetch.timer runs it off-peak.",
        "[\"smollm2-135m-instruct:q4_1\"]",
    ),
    s(
        "mesh.listen",
        Some("SHOAL_LISTEN"),
        List,
        "Multiaddrs the mesh listens on (TCP, then TLS or noise, then yamux).",
        "[\"/ip4/0.0.0.0/tcp/7071\"]",
    ),
    s(
        "mesh.peers",
        Some("SHOAL_PEERS"),
        List,
        "Static peers, dialled at start and redialled when lost, e.g.\n\"/ip4/192.168.1.20/tcp/7071\". Needed where mDNS cannot reach (routed networks,\ncontainers) or is off.",
        "[\"/ip4/192.168.1.20/tcp/7071\"]",
    ),
    s(
        "mesh.mdns",
        Some("SHOAL_MDNS"),
        Bool,
        "Find peers on the local link by multicast DNS.",
        "true",
    ),
    s(
        "mesh.psk_file",
        Some("SHOAL_PSK_FILE"),
        Str,
        "Pre-shared key file (libp2p pnet, 'swarm.key' format): only nodes with the same key\ncan connect. Unset: an open mesh (peers still verify every chunk by hash).",
        "\"/etc/shoal/swarm.key\"",
    ),
    s(
        "mesh.security",
        Some("SHOAL_SECURITY"),
        List,
        "Secure channels offered to peers, most preferred first: \"tls\" (TLS 1.3 with the\nnode's ed25519 key as a raw public key, AES-GCM first: the fast one on CPUs with AES\ninstructions) and \"noise\" (libp2p noise, ChaCha20-Poly1305). Peers use the first\nchannel both offer.",
        "[\"tls\", \"noise\"]",
    ),
    s(
        "mesh.offline",
        Some("SHOAL_OFFLINE"),
        Bool,
        "Never fetch from origin URLs (the internet); use only the local store and peers.",
        "false",
    ),
    s(
        "mesh.origin_ca_file",
        Some("SHOAL_ORIGIN_CA_FILE"),
        Str,
        "Extra CA certificates (a PEM file) trusted for https:// origin URLs, on top of the\nsystem's CA bundle: for an origin with a certificate from an internal CA. The\ncertificate must still be valid for the URL's host name. Unset: the system bundle only.",
        "\"/etc/shoal/origin-ca.pem\"",
    ),
    s(
        "mesh.allow_peers",
        Some("SHOAL_ALLOW_PEERS"),
        List,
        "Peer ids allowed to connect. Empty: any peer (that holds the PSK, when one is set).",
        "[\"12D3KooW...\"]",
    ),
    s(
        "mesh.ban_duration",
        Some("SHOAL_BAN_DURATION"),
        Str,
        "How long a peer that served a chunk failing its hash is banned.",
        "\"1h\"",
    ),
    s(
        "mesh.frame_size",
        Some("SHOAL_FRAME_SIZE"),
        Str,
        "Largest yamux data frame this node sends, 1K to 1M. Each frame is one flush of the\nconnection and its own TLS record for the frame header: 256K frames cost a 16th of\nthe flushes of yamux's usual 16K (docs/benchmarks.md). Any yamux peer reads them.",
        "\"256K\"",
    ),
    s(
        "mesh.mdns_query_interval",
        Some("SHOAL_MDNS_QUERY_INTERVAL"),
        Str,
        "How often mDNS asks the link for peers once some answered (at start it asks at\n0.5 s, 1 s, 2 s, ...). While no peer is connected the node also asks by itself,\n0.5 s apart and doubling up to 8 s, and redials every peer it found and lost.",
        "\"30s\"",
    ),
    s(
        "mesh.max_downloads",
        Some("SHOAL_MAX_DOWNLOADS"),
        Int,
        "Most downloads running at once; a further pull is refused (HTTP 429) until one ends.",
        "4",
    ),
    s(
        "api.listen",
        Some("SHOAL_API"),
        Str,
        "Address of the HTTP API. Loopback by default; use \"0.0.0.0:7070\" to serve the LAN\n(or put NGINX in front, see docs/OPERATIONS.md). On a non-loopback address, set\napi.keys_file too (the node warns at start when it is unset).",
        "\"127.0.0.1:7070\"",
    ),
    s(
        "api.drain_timeout",
        Some("SHOAL_DRAIN_TIMEOUT"),
        Str,
        "On SIGTERM or Ctrl-C, how long running requests may finish before the daemon exits\nanyway (with a non-zero status, logging what was still running). A second signal\nexits at once.",
        "\"30s\"",
    ),
    s(
        "api.admin_token_file",
        Some("SHOAL_ADMIN_TOKEN_FILE"),
        Str,
        "Bearer token of the admin API (/admin/*: pull, pin, releases, status), required from\nevery caller. Unset: <data_dir>/admin.token, a random 256-bit token (hex) written\nat first start with mode 0600; the shoal CLI on the same machine reads it. A file\nyou write yourself must hold one token of at least 32 characters.",
        "\"/var/lib/shoal/admin.token\"",
    ),
    s(
        "api.keys_file",
        Some("SHOAL_KEYS_FILE"),
        Str,
        "API keys of the OpenAI-compatible routes (/v1/*): one key per line, # comments.\nClients send \"Authorization: Bearer <key>\" (the openai client's api_key). Unset:\n/v1/* needs no key (fine on loopback; read at start).",
        "\"/etc/shoal/api-keys\"",
    ),
    s(
        "api.allowed_hosts",
        Some("SHOAL_ALLOWED_HOSTS"),
        List,
        "Host names accepted in requests' Host header, besides IP addresses, \"localhost\"\nand *.localhost (a leading \"*.\" matches subdomains; \"*\" accepts any). Other\nnames get 403: this stops DNS-rebinding pages from reaching the node.",
        "[\"pi-07.local\", \"ai.example.lan\"]",
    ),
    s(
        "api.allowed_origins",
        Some("SHOAL_ALLOWED_ORIGINS"),
        List,
        "Web origins allowed to call the API from a browser (CORS), e.g.\n\"http://notebook.example.lan:8888\"; \"*\" allows any. The node's own pages (same\norigin) always may; requests from other origins get 403.",
        "[\"http://notebook.example.lan:8888\"]",
    ),
    s(
        "api.max_pulls",
        Some("SHOAL_MAX_PULLS"),
        Int,
        "Downloads started through POST /admin/pull that may run at once; more get HTTP 429\nwith Retry-After (joining a running download is always allowed).",
        "4",
    ),
    s(
        "api.header_timeout",
        Some("SHOAL_HEADER_TIMEOUT"),
        Str,
        "A client must send a request's headers within this time from its first byte; a\nslower one is disconnected.",
        "\"10s\"",
    ),
    s(
        "api.body_timeout",
        Some("SHOAL_BODY_TIMEOUT"),
        Str,
        "A request body that receives no bytes for this long fails (the connection closes).",
        "\"30s\"",
    ),
    s(
        "api.idle_timeout",
        Some("SHOAL_IDLE_TIMEOUT"),
        Str,
        "A keep-alive connection with no request in progress for this long is closed (a\nlong generation or event stream is a request in progress, not idle).",
        "\"30s\"",
    ),
    s(
        "inference.threads",
        Some("SHOAL_THREADS"),
        Int,
        "Compute threads for inference; 0 uses one per available core. At most 4 x the\ncores (a larger value is refused).",
        "4",
    ),
    s(
        "inference.queue_depth",
        Some("SHOAL_QUEUE_DEPTH"),
        Int,
        "Requests that may wait per model; more are refused with HTTP 429 and Retry-After.",
        "16",
    ),
    s(
        "inference.default_model",
        Some("SHOAL_MODEL"),
        Str,
        "Model used when a request names none or names \"default\" (release name or id).",
        "\"smollm2-135m-instruct:q4_1\"",
    ),
    // -- bounded models (issue 14, item 2) --
    s(
        "inference.max_loaded",
        Some("SHOAL_MAX_LOADED"),
        Int,
        "Models loaded at once (at least 1). A request for one more unloads the least recently\nused idle model; if every loaded model is busy it gets HTTP 503 with Retry-After.",
        "2",
    ),
    s(
        "inference.memory_budget",
        Some("SHOAL_MEMORY_BUDGET"),
        Str,
        "Memory the loaded models may take together, each counted as its file size plus the f32 KV\nof one 4096-token sequence. Unset: three quarters of the machine's RAM.",
        "\"6G\"",
    ),
    s(
        "kv.ram_budget",
        Some("SHOAL_KV_RAM"),
        Str,
        "RAM for KV-cache blocks of prompt prefixes. Least-recently-used blocks spill to disk.",
        "\"512M\"",
    ),
    s(
        "kv.disk_budget",
        Some("SHOAL_KV_DISK"),
        Str,
        "Disk for spilled KV-cache blocks (under data_dir); 0 keeps KV blocks in RAM only.",
        "\"4G\"",
    ),
    s(
        "kv.block_size",
        Some("SHOAL_KV_BLOCK_SIZE"),
        Int,
        "Tokens per KV block: prefixes are shared in whole blocks.",
        "16",
    ),
    s(
        "kv.dtype",
        Some("SHOAL_KV_DTYPE"),
        Str,
        "Element type of stored KV blocks: \"f16\" (exact) or \"q8_0\" (about half the bytes).",
        "\"f16\"",
    ),
    s(
        "kv.ttl",
        Some("SHOAL_KV_TTL"),
        Str,
        "KV blocks unused for this long are dropped.",
        "\"7d\"",
    ),
    s(
        "response_cache.budget",
        Some("SHOAL_RESPONSE_CACHE"),
        Str,
        "Bytes of cached whole responses; 0 turns the response cache off.",
        "\"64M\"",
    ),
    s(
        "response_cache.ttl",
        Some("SHOAL_RESPONSE_CACHE_TTL"),
        Str,
        "Cached responses older than this are not served.",
        "\"1h\"",
    ),
    s(
        "metrics.enabled",
        Some("SHOAL_METRICS"),
        Bool,
        "Serve Prometheus metrics at GET /metrics on the API address.",
        "true",
    ),
];

/// Looks up a setting by dotted key.
pub fn setting(key: &str) -> Option<&'static Setting> {
    SETTINGS.iter().find(|s| s.key == key)
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let col = before
        .rsplit('\n')
        .next()
        .map(|l| l.chars().count())
        .unwrap_or(0)
        + 1;
    (line, col)
}

/// Reads an environment value as TOML of the setting's kind.
fn env_value(kind: Kind, raw: &str) -> Result<toml::Value, String> {
    Ok(match kind {
        Kind::Str => toml::Value::String(raw.to_owned()),
        Kind::Bool => match raw.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => toml::Value::Boolean(true),
            "0" | "false" | "no" | "off" => toml::Value::Boolean(false),
            _ => return Err("expected true or false".into()),
        },
        Kind::Int => toml::Value::Integer(
            raw.trim()
                .parse()
                .map_err(|_| "expected an integer".to_owned())?,
        ),
        Kind::List => toml::Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|x| !x.is_empty())
                .map(|x| toml::Value::String(x.to_owned()))
                .collect(),
        ),
    })
}

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
        for st in SETTINGS {
            let Some(var) = st.env else { continue };
            let Some(raw) = env(var) else { continue };
            cfg.set(st.key, &raw).map_err(|e| ConfigError::Env {
                var: var.to_owned(),
                value: raw.clone(),
                message: match e {
                    ConfigError::Override { message, .. } => message,
                    other => other.to_string(),
                },
            })?;
        }
        Ok(cfg)
    }

    /// Parses a configuration file's text (missing keys take their defaults).
    /// `path` is only used in error messages.
    pub fn from_toml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| {
            let (line, column) = line_col(text, e.span().map(|s| s.start).unwrap_or(0));
            ConfigError::Parse {
                path: path.to_owned(),
                line,
                column,
                message: e.message().trim().to_owned(),
            }
        })?;
        if cfg.version != CONFIG_VERSION {
            return Err(ConfigError::UnsupportedVersion(cfg.version));
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Sets one setting from its string form, as written on a command line:
    /// `set("store.quota", "20G")`, `set("mesh.peers", "/ip4/…,/ip4/…")`.
    pub fn set(&mut self, key: &str, raw: &str) -> Result<(), ConfigError> {
        let st = setting(key).ok_or_else(|| ConfigError::UnknownKey(key.to_owned()))?;
        let err = |message: String| ConfigError::Override {
            key: key.to_owned(),
            value: raw.to_owned(),
            message,
        };
        let value = env_value(st.kind, raw).map_err(err)?;
        let mut tree = toml::Value::try_from(&*self).map_err(|e| err(e.to_string()))?;
        let (section, name) = match key.split_once('.') {
            Some((a, b)) => (Some(a), b),
            None => (None, key),
        };
        let table = match section {
            Some(sec) => tree.get_mut(sec),
            None => Some(&mut tree),
        }
        .and_then(toml::Value::as_table_mut)
        .ok_or_else(|| err("internal: section missing".into()))?;
        table.insert(name.to_owned(), value);
        let cfg: Config = tree
            .try_into()
            .map_err(|e: toml::de::Error| err(e.message().trim().to_owned()))?;
        cfg.validate().map_err(|e| err(e.to_string()))?;
        *self = cfg;
        Ok(())
    }

    /// Checks ranges that the types alone do not.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
        if self.kv.block_size == 0 || self.kv.block_size > 4096 {
            return bad("kv.block_size must be between 1 and 4096 tokens");
        }
        if self.inference.queue_depth == 0 {
            return bad("inference.queue_depth must be at least 1");
        }
        if self.inference.max_loaded == 0 {
            return bad("inference.max_loaded must be at least 1");
        }
        if self.inference.memory_budget.is_some_and(|b| b.bytes() == 0) {
            return bad("inference.memory_budget must not be 0");
        }
        if self.mesh.listen.is_empty() {
            return bad("mesh.listen needs at least one address");
        }
        if self.mesh.security.is_empty() {
            return bad("mesh.security needs at least one channel (tls, noise)");
        }
        if self
            .data_dir
            .as_ref()
            .is_some_and(|d| d.as_os_str().is_empty())
        {
            return bad("data_dir is empty (it would mean the current directory); \
                 give a path, or leave it unset for the default");
        }
        let max_threads = max_inference_threads();
        if self.inference.threads > max_threads {
            return Err(ConfigError::Invalid(format!(
                "inference.threads = {} is more than 4 x this machine's cores ({max_threads}); \
                 use 0 for one per core",
                self.inference.threads
            )));
        }
        if self.api.max_pulls == 0 {
            return bad("api.max_pulls must be at least 1");
        }
        for (key, d) in [
            ("api.header_timeout", self.api.header_timeout),
            ("api.body_timeout", self.api.body_timeout),
            ("api.idle_timeout", self.api.idle_timeout),
        ] {
            if d.get() < Duration::from_millis(100) || d.get() > Duration::from_secs(24 * 3600) {
                return Err(ConfigError::Invalid(format!(
                    "{key} = {d} is outside 100ms..24h"
                )));
            }
        }
        if let Some(h) = self
            .api
            .allowed_hosts
            .iter()
            .find(|h| h.is_empty() || h.contains(|c: char| c.is_whitespace() || c == '/'))
        {
            return Err(ConfigError::Invalid(format!(
                "api.allowed_hosts: {h:?} is not a host name (no scheme, path or spaces)"
            )));
        }
        if let Some(o) = self.api.allowed_origins.iter().find(|o| {
            let rest = o
                .strip_prefix("http://")
                .or_else(|| o.strip_prefix("https://"));
            o.as_str() != "*"
                && rest.is_none_or(|r| {
                    r.is_empty() || r.contains(|c: char| c.is_whitespace() || c == '/')
                })
        }) {
            return Err(ConfigError::Invalid(format!(
                "api.allowed_origins: {o:?} is not an origin (scheme://host[:port], no path, or \"*\")"
            )));
        }
        if self.mesh.max_downloads == 0 {
            return bad("mesh.max_downloads must be at least 1");
        }
        if self.mesh.mdns_query_interval.get() < std::time::Duration::from_secs(1) {
            return bad("mesh.mdns_query_interval must be at least 1s");
        }
        Ok(())
    }

    /// The effective configuration as a commented TOML file: every setting with
    /// its documentation and environment variable; unset optional settings are
    /// shown commented out with an example. Parsing it gives back `self`.
    pub fn effective_toml(&self) -> String {
        let tree = toml::Value::try_from(self).unwrap_or(toml::Value::Table(Default::default()));
        let mut out = String::new();
        out.push_str(
            "# shoal configuration.\n\
             #\n\
             # Precedence, lowest first: built-in defaults < this file < SHOAL_* environment\n\
             # variables < command-line flags. Sizes: \"20G\", \"512M\", \"64K\", bytes, or\n\
             # \"unlimited\". Durations: \"500ms\", \"90s\", \"30m\", \"24h\", \"7d\", or seconds.\n\
             # Missing keys take their defaults; unknown keys are an error.\n",
        );
        let mut current: Option<&str> = None;
        for st in SETTINGS {
            let (section, name) = match st.key.split_once('.') {
                Some((a, b)) => (Some(a), b),
                None => (None, st.key),
            };
            if section != current {
                current = section;
                if let Some(sec) = section {
                    out.push('\n');
                    if let Some((_, doc)) = SECTIONS.iter().find(|(n, _)| *n == sec) {
                        out.push_str(&format!("# {doc}\n"));
                    }
                    out.push_str(&format!("[{sec}]\n"));
                }
            }
            out.push('\n');
            for line in st.doc.lines() {
                out.push_str(&format!("# {line}\n"));
            }
            if let Some(var) = st.env {
                out.push_str(&format!("# Environment: {var}\n"));
            }
            let value = match section {
                Some(sec) => tree.get(sec).and_then(|t| t.get(name)),
                None => tree.get(name),
            };
            match value {
                Some(v) => out.push_str(&format!("{name} = {v}\n")),
                None => out.push_str(&format!("#{name} = {}\n", st.example)),
            }
        }
        out
    }

    /// The store options this configuration asks for.
    pub fn store_options(&self) -> crate::store::StoreOptions {
        crate::store::StoreOptions {
            quota_bytes: self.store.quota.bytes(),
            partial_ttl: self.store.partial_ttl.get(),
            ..Default::default()
        }
    }

    /// The mesh settings this configuration asks for (reads the PSK file).
    /// Settings the file does not cover keep the mesh's defaults.
    pub fn mesh_config(&self) -> Result<crate::mesh::MeshConfig, ConfigError> {
        let psk = match &self.mesh.psk_file {
            Some(p) => Some(
                crate::mesh::read_psk(p)
                    .map_err(|e| ConfigError::Invalid(format!("mesh.psk_file: {e}")))?,
            ),
            None => None,
        };
        if let Some(p) = &self.mesh.origin_ca_file {
            // Checked now, so a bad file stops the node at start, not at its first pull.
            crate::mesh::origin::read_ca_file(p)
                .map_err(|e| ConfigError::Invalid(format!("mesh.origin_ca_file: {e}")))?;
        }
        let allow_peers = self
            .mesh
            .allow_peers
            .iter()
            .map(|p| {
                p.parse()
                    .map_err(|e| ConfigError::Invalid(format!("mesh.allow_peers: {p:?}: {e}")))
            })
            .collect::<Result<_, _>>()?;
        let frame_size = self.mesh.frame_size.0;
        if !(1 << 10..=1 << 20).contains(&frame_size) {
            return Err(ConfigError::Invalid(format!(
                "mesh.frame_size: {} is outside 1K..1M",
                self.mesh.frame_size
            )));
        }
        Ok(crate::mesh::MeshConfig {
            listen: self.mesh.listen.clone(),
            peers: self.mesh.peers.clone(),
            mdns: self.mesh.mdns,
            psk,
            security: self.mesh.security.clone(),
            allow_peers,
            offline: self.mesh.offline,
            origin_ca_file: self.mesh.origin_ca_file.clone(),
            ban_duration: self.mesh.ban_duration.get(),
            frame_size: frame_size as usize,
            mdns_query_interval: self.mesh.mdns_query_interval.get(),
            max_downloads: self.mesh.max_downloads,
            ..Default::default()
        })
    }

    /// Everything [`crate::node::Node::start`] needs; `default_data_dir` is
    /// used when `data_dir` is unset.
    pub fn node_config(
        &self,
        default_data_dir: &Path,
    ) -> Result<crate::node::NodeConfig, ConfigError> {
        Ok(crate::node::NodeConfig {
            data_dir: self
                .data_dir
                .clone()
                .unwrap_or_else(|| default_data_dir.to_owned()),
            store: self.store_options(),
            mesh: self.mesh_config()?,
        })
    }

    /// Where to look for a configuration file when none is given: `$SHOAL_CONFIG`,
    /// else `$XDG_CONFIG_HOME/shoal/shoal.toml` (or `~/.config/shoal/shoal.toml`)
    /// if it exists, else `/etc/shoal/shoal.toml` if it exists.
    pub fn discover() -> Option<PathBuf> {
        if let Some(p) = std::env::var_os("SHOAL_CONFIG").filter(|s| !s.is_empty()) {
            return Some(PathBuf::from(p));
        }
        let user = std::env::var_os("XDG_CONFIG_HOME")
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME")
                    .filter(|s| !s.is_empty())
                    .map(|h| PathBuf::from(h).join(".config"))
            })
            .map(|d| d.join("shoal/shoal.toml"));
        user.into_iter()
            .chain([PathBuf::from("/etc/shoal/shoal.toml")])
            .find(|p| p.is_file())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

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
    fn sizes_and_durations() {
        let ok = |s: &str| s.parse::<ByteSize>().ok().map(|b| b.0);
        assert_eq!(ok("1024"), Some(1024));
        assert_eq!(ok("64K"), Some(65536));
        assert_eq!(ok("20G"), Some(20 << 30));
        assert_eq!(ok("2GiB"), Some(2 << 30));
        assert_eq!(ok("1.5G"), Some(3 << 29));
        assert_eq!(ok("unlimited"), Some(u64::MAX));
        assert_eq!(ok("12Q"), None);
        assert_eq!(ok("-1"), None);
        assert_eq!(ok("99999999T"), None);
        for s in ["20G", "512M", "1536M", "1000", "unlimited", "3K"] {
            assert_eq!(
                s.parse::<ByteSize>().map(|b| b.to_string()).ok(),
                Some(s.into())
            );
        }
        let d = |s: &str| s.parse::<HumanDuration>().ok().map(|d| d.0);
        assert_eq!(d("90s"), Some(Duration::from_secs(90)));
        assert_eq!(d("90"), Some(Duration::from_secs(90)));
        assert_eq!(d("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(d("7d"), Some(Duration::from_secs(7 * 86400)));
        assert_eq!(d("1w"), None);
        assert_eq!(d("h"), None);
        for s in ["90s", "30m", "2h", "7d", "1500ms", "25h"] {
            assert_eq!(
                s.parse::<HumanDuration>().map(|d| d.to_string()).ok(),
                Some(s.into())
            );
        }
    }

    // -- bounded models (issue 14, item 2) --
    #[test]
    fn loaded_model_bounds_parse_and_are_validated() {
        let mut cfg = Config::default();
        assert_eq!(cfg.inference.max_loaded, 2);
        assert_eq!(cfg.inference.memory_budget, None);
        cfg.set("inference.max_loaded", "1").expect("set");
        cfg.set("inference.memory_budget", "6G").expect("set");
        assert_eq!(cfg.inference.max_loaded, 1);
        assert_eq!(cfg.inference.memory_budget, Some(ByteSize(6 << 30)));
        assert!(cfg.set("inference.max_loaded", "0").is_err());
        assert!(cfg.set("inference.memory_budget", "0").is_err());
        let serve = crate::serve::ServeConfig::from_config(&cfg, Path::new("/x"));
        assert_eq!((serve.max_loaded, serve.memory_budget), (1, 6 << 30));
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
        cfg.inference.memory_budget = Some(ByteSize(6 << 30));
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
        for st in SETTINGS {
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
    /// Regenerate with `SHOAL_BLESS=1 cargo test --release -p shoal --lib config::`.
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
        assert_eq!(back.store.quota, ByteSize(20 << 30));
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
        assert_eq!(cfg.store.quota, ByteSize(10 << 30));
        assert_eq!(cfg.store.partial_ttl, HumanDuration::secs(7200));
        assert_eq!(cfg.api.listen.port(), 8080);
        assert!(!cfg.mesh.mdns);
        assert_eq!(cfg.kv, KvConfig::default());
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
        assert_eq!(cfg.store.quota, ByteSize(20 << 30));
        assert_eq!(cfg.store.partial_ttl, HumanDuration::secs(7200));
        assert_eq!(cfg.api.listen, "127.0.0.1:9000".parse().expect("addr"));
        assert_eq!(cfg.mesh.peers.len(), 2);
        assert!(cfg.mesh.mdns);
        assert_eq!(cfg.inference.queue_depth, 3);
        // Command line over environment.
        cfg.set("store.quota", "30G").expect("set");
        assert_eq!(cfg.store.quota, ByteSize(30 << 30));
        assert_eq!(cfg.store_options().quota_bytes, 30 << 30);
        // No file: defaults and environment.
        let cfg = Config::load_with(None, env_of(&[("SHOAL_KV_RAM", "1G")])).expect("load");
        assert_eq!(cfg.kv.ram_budget, ByteSize(1 << 30));
        assert_eq!(cfg.store, StoreConfig::default());
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
        assert_eq!(cfg.api.header_timeout, HumanDuration::secs(5));
        assert_eq!(cfg.api.keys_file.as_deref(), Some(Path::new("/k")));
    }

    /// The serving layer's built-in defaults are the configuration's, and the
    /// documents quote the same numbers (queue full is 429, depth 16, TTL 1h).
    #[test]
    fn serving_defaults_and_docs_agree_with_the_config() {
        let cfg = Config::default();
        let serve = crate::serve::ServeConfig::default();
        assert_eq!(serve.queue_depth, cfg.inference.queue_depth);
        assert_eq!(serve.response_cache_ttl, cfg.response_cache.ttl.get());
        assert_eq!(
            serve.response_cache_budget,
            cfg.response_cache.budget.bytes()
        );
        let from = crate::serve::ServeConfig::from_config(&cfg, Path::new("/d"));
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
            Some(cfg.response_cache.ttl.to_string().as_str()),
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
