//! Serving: the OpenAI-compatible HTTP API over per-model [`Engine`]s, the
//! prefix KV cache ([`crate::kvcache`]) and the response cache
//! ([`crate::respcache`]).
//!
//! [`Serving`] holds the served models and caches; [`router`] gives the
//! axum routes (`/v1/chat/completions`, `/v1/completions`, `/v1/models`)
//! to merge into a node's router; [`serve`] runs them on a listener with
//! graceful shutdown (in-flight requests are drained). See `docs/SERVING.md`.

pub mod engine;
pub mod ollama;
pub mod openai;

pub use crate::inference::{HeaderCheck, MAX_HEADER_BYTES, Unservable, check_file, check_header};
pub use engine::{Engine, EngineConfig, EngineLoad, EngineStats, Job, JobEvent};
pub use openai::{SERVED_BY_HEADER, router};

use crate::config::{ConfigError, Setting};
use crate::inference::{ChatTemplate, Model};
use crate::kvcache::{KvCacheConfig, KvCacheError, PrefixCache};
use crate::respcache::{ResponseCache, ResponseCacheConfig};
use futures::FutureExt;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Errors setting up or running the server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Loading a model failed.
    #[error("model {name}: {source}")]
    Model {
        /// The served name.
        name: String,
        /// Why.
        source: crate::inference::InferenceError,
    },
    /// The KV cache could not be opened.
    #[error(transparent)]
    KvCache(#[from] KvCacheError),
    /// Socket or thread errors.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// No room for one more model (`inference.max_loaded`,
    /// `inference.memory_budget`) and every loaded one is in use.
    #[error("{0}")]
    Full(String),
}

/// Longest accepted model name, alias or id, in bytes. Longer names are
/// refused at the HTTP edge with 400 (`string_above_max_length`) before
/// any lookup: release names are far shorter, and an id is 64 hex digits.
pub const MAX_MODEL_NAME: usize = 256;

/// Where models that are not served yet come from (the node's store and
/// mesh). Serving first [resolves](ModelSource::resolve) a name to an
/// artifact id (cheap, no load, no fetch) and looks its engines up by id;
/// only an id with no engine is [located](ModelSource::locate), which may
/// fetch it.
pub trait ModelSource: Send + Sync {
    /// The artifact id that `name` (a trusted name, an id or a unique id
    /// prefix of 8+ hex digits, in any letter case) stands for. Does not
    /// load or fetch anything.
    fn resolve<'a>(
        &'a self,
        name: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<[u8; 32], LocateError>>;

    /// The local GGUF file of artifact `id` (requested as `name`), fetching
    /// it first if needed. Fails fast when no peer has it, and with
    /// [`LocateError::Unservable`] when the model's header (fetched first,
    /// alone) shows that this build cannot serve it.
    fn locate<'a>(
        &'a self,
        id: [u8; 32],
        name: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<Located, LocateError>>;

    /// The models this source knows: those it holds locally (each trusted
    /// name of an artifact once, an artifact without one under its id in
    /// hex), each with whether this build can serve it (from its header),
    /// and those known only by a trusted name whose artifact is elsewhere
    /// (`local: false`): what `/v1/models` lists besides the loaded models.
    /// None by default.
    fn catalog(&self) -> futures::future::BoxFuture<'_, Vec<CatalogEntry>> {
        Box::pin(async { Vec::new() })
    }

    /// The file of artifact `id` if it is local already, never fetching
    /// it (Ollama's `/api/tags` and `/api/show` read its header). `None` by
    /// default.
    fn local_file(&self, id: [u8; 32]) -> futures::future::BoxFuture<'_, Option<Located>> {
        let _ = id;
        Box::pin(async { None })
    }

    /// [`locate`](ModelSource::locate), reporting a download's progress
    /// as `(completed, total)` bytes to `progress` while it runs (Ollama's
    /// `/api/pull`). By default: locates and reports nothing.
    fn locate_reporting<'a>(
        &'a self,
        id: [u8; 32],
        name: &'a str,
        progress: tokio::sync::mpsc::UnboundedSender<(u64, u64)>,
    ) -> futures::future::BoxFuture<'a, Result<Located, LocateError>> {
        drop(progress);
        self.locate(id, name)
    }
}

/// A model a [`ModelSource`] holds, for `/v1/models`.
#[derive(Debug, Clone)]
pub struct CatalogEntry {
    /// The artifact id.
    pub id: [u8; 32],
    /// The name it is listed under (a trusted name, or the id in hex).
    pub name: String,
    /// Whether this build can serve it, decided from its header (`Ok` for
    /// a remote model whose header has not been checked yet).
    pub servable: Result<(), Unservable>,
    /// Whether its file is in the local store (else it is known by a
    /// trusted name only and would be pulled on first use).
    pub local: bool,
}

/// Where a model listed by [`Serving::listing`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelState {
    /// An engine serves it now.
    Loaded,
    /// Its file is in the local store; loaded on first use.
    Local,
    /// Known by a trusted name; pulled from the mesh on first use.
    Remote,
}

/// One entry of `/v1/models` ([`Serving::listing`]): a name once, with the
/// artifact it stands for.
#[derive(Debug, Clone)]
pub struct ListedModel {
    /// The name (a trusted name, a served name, or the id in hex when the
    /// artifact has no name).
    pub name: String,
    /// The artifact id.
    pub id: [u8; 32],
    /// Loaded, local or remote.
    pub state: ModelState,
    /// Whether this build can serve it (see [`CatalogEntry::servable`]).
    pub servable: Result<(), Unservable>,
    /// The model's context length, when it is loaded.
    pub context_length: Option<usize>,
}

/// A located model: its GGUF file and a guard that keeps the file from
/// being evicted from the store (a store lease) for as long as the engine
/// serving it lives.
pub struct Located {
    /// The GGUF file.
    pub path: PathBuf,
    /// Held by the engine until it is unloaded; opaque to serving.
    pub guard: Option<Box<dyn std::any::Any + Send + Sync>>,
}

impl std::fmt::Debug for Located {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Located")
            .field("path", &self.path)
            .field("guard", &self.guard.is_some())
            .finish()
    }
}

/// Why a [`ModelSource`] (or the serving layer) could not provide a model.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LocateError {
    /// No artifact or trusted name matches, or no peer has it (HTTP 404).
    #[error("{0}")]
    Unknown(String),
    /// It is known but could not be fetched or loaded (HTTP 503).
    #[error("{0}")]
    Unavailable(String),
    /// The local copy failed verification; it is being re-fetched (HTTP 503).
    #[error("{0}")]
    Corrupt(String),
    /// Loading it would exceed `inference.max_loaded` or
    /// `inference.memory_budget` and every loaded model is in use (HTTP 503
    /// with `Retry-After`).
    #[error("{message}")]
    Busy {
        /// What is full.
        message: String,
        /// Seconds to wait before retrying.
        retry_after: u64,
    },
    /// The name itself is invalid (too long; HTTP 400).
    #[error("{0}")]
    Invalid(String),
    /// The model exists but this build cannot serve it (architecture,
    /// tensor type or tokenizer), as its header shows (HTTP 422,
    /// `model_not_supported`: retrying will not help).
    #[error("{0}")]
    Unservable(Unservable),
}

impl LocateError {
    /// The error of a model file that failed to load: [`LocateError::Unservable`]
    /// when this build lacks what it needs (architecture, tensor type,
    /// tokenizer; the reason read again from the file's header, so blocking
    /// IO: call it off the async runtime), [`LocateError::Unavailable`]
    /// otherwise.
    pub fn from_load(path: &std::path::Path, e: crate::inference::InferenceError) -> LocateError {
        use crate::inference::InferenceError as E;
        match e {
            E::UnsupportedArchitecture(_) | E::UnsupportedTensorType { .. } | E::Tokenizer(_) => {
                // The header check names the reason fully (an unknown type's id, how many tensors).
                match check_file(path, MAX_HEADER_BYTES) {
                    Some(Err(u)) => LocateError::Unservable(u),
                    _ => LocateError::Unservable(match e {
                        E::UnsupportedArchitecture(_) => Unservable::Architecture(e.to_string()),
                        E::Tokenizer(m) => Unservable::Tokenizer(m),
                        other => Unservable::Model(other.to_string()),
                    }),
                }
            }
            other => LocateError::Unavailable(format!("loading {}: {other}", path.display())),
        }
    }
}

/// Settings of the serving layer: the `[inference]` section of the
/// configuration file ([`SETTINGS`]), plus what the node fills in from the
/// `[kv]` and `[response_cache]` sections and runtime fields.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServeConfig {
    /// Worker threads per model (0 = all cores; `inference.threads`).
    pub threads: usize,
    /// Requests that may wait behind the running one, per model (more: 429;
    /// `inference.queue_depth`).
    pub queue_depth: usize,
    /// Sequences of one model decoded together (continuous batching), at
    /// least 1 (`inference.parallel`).
    pub parallel: usize,
    /// Bytes the running sequences' keys and values may take per model
    /// (`inference.kv_budget`): beyond it new requests wait, and a sequence
    /// that would grow past it is put back to wait and recomputed later.
    #[serde(with = "crate::config::size")]
    pub kv_budget: u64,
    /// Model used when a request names none (a release name or artifact id;
    /// `inference.default_model`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_model: Option<String>,
    /// Models loaded at once, at least 1 (`inference.max_loaded`). Loading
    /// one more unloads the least recently used idle one.
    pub max_loaded: usize,
    /// Bytes the loaded models may take together, as [`memory_estimate`]
    /// counts them (`inference.memory_budget`); `None`:
    /// [`default_memory_budget`] ([`ServeConfig::memory_budget_bytes`]).
    #[serde(
        with = "crate::config::opt_size",
        skip_serializing_if = "Option::is_none"
    )]
    pub memory_budget: Option<u64>,
    /// Largest accepted request body in bytes (larger: 413).
    #[serde(skip)]
    pub body_limit: usize,
    /// The prefix KV cache (the `[kv]` section); `None` disables it.
    #[serde(skip)]
    pub kv: Option<KvCacheConfig>,
    /// Response cache byte budget (0 disables it; `response_cache.budget`).
    #[serde(skip)]
    pub response_cache_budget: u64,
    /// Response cache TTL (also the `max-age` served; `response_cache.ttl`).
    #[serde(skip)]
    pub response_cache_ttl: Duration,
    /// Test hook: serve wrong (but validly signed) KV to neighbours.
    #[doc(hidden)]
    #[serde(skip)]
    pub test_lie_kv: bool,
    /// This node's peer id (not a setting: set by the node). When set,
    /// every generation response names it in [`SERVED_BY_HEADER`] and in a
    /// top-level `served_by` field (the JSON body, or the first chunk or
    /// line of a stream).
    #[serde(skip)]
    pub node_id: Option<String>,
    /// Where the engines and the prefix cache report (not a setting: the
    /// node hands in its own; by default a fresh, detached set).
    #[serde(skip)]
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl PartialEq for ServeConfig {
    /// Compares the settings; where the metrics go and the node's id are
    /// not settings.
    fn eq(&self, o: &Self) -> bool {
        let ServeConfig {
            threads,
            queue_depth,
            parallel,
            kv_budget,
            default_model,
            max_loaded,
            memory_budget,
            body_limit,
            kv,
            response_cache_budget,
            response_cache_ttl,
            test_lie_kv,
            node_id: _,
            metrics: _,
        } = self;
        *threads == o.threads
            && *queue_depth == o.queue_depth
            && *parallel == o.parallel
            && *kv_budget == o.kv_budget
            && *default_model == o.default_model
            && *max_loaded == o.max_loaded
            && *memory_budget == o.memory_budget
            && *body_limit == o.body_limit
            && *kv == o.kv
            && *response_cache_budget == o.response_cache_budget
            && *response_cache_ttl == o.response_cache_ttl
            && *test_lie_kv == o.test_lie_kv
    }
}

impl Default for ServeConfig {
    /// The configuration file's defaults (`[inference]`, `[kv]`,
    /// `[response_cache]`): one source of truth for the numbers the docs quote.
    fn default() -> Self {
        let rc = ResponseCacheConfig::default();
        ServeConfig {
            threads: 0,
            queue_depth: 16,
            parallel: engine::DEFAULT_PARALLEL,
            kv_budget: engine::DEFAULT_KV_BUDGET,
            default_model: None,
            max_loaded: DEFAULT_MAX_LOADED,
            memory_budget: None,
            body_limit: 1 << 20,
            kv: Some(KvCacheConfig::default()),
            response_cache_budget: rc.budget,
            response_cache_ttl: rc.ttl,
            test_lie_kv: false,
            node_id: None,
            metrics: Arc::new(crate::metrics::Metrics::new()),
        }
    }
}

impl ServeConfig {
    /// Defaults with the KV disk tier under `<data_dir>/kv`.
    pub fn with_data_dir(data_dir: impl Into<PathBuf>) -> ServeConfig {
        let mut c = ServeConfig::default();
        if let Some(kv) = &mut c.kv {
            kv.disk_dir = Some(data_dir.into().join("kv"));
        }
        c
    }

    /// These `[inference]` settings with the `[kv]` and `[response_cache]`
    /// sections, the KV disk tier under `<data_dir>/kv`.
    pub fn with_caches(
        &self,
        kv: &KvCacheConfig,
        response_cache: &ResponseCacheConfig,
        data_dir: &std::path::Path,
    ) -> ServeConfig {
        ServeConfig {
            kv: Some(KvCacheConfig {
                disk_dir: Some(data_dir.join("kv")),
                ..kv.clone()
            }),
            response_cache_budget: response_cache.budget,
            response_cache_ttl: response_cache.ttl,
            ..self.clone()
        }
    }

    /// The memory budget in bytes: [`ServeConfig::memory_budget`], or
    /// [`default_memory_budget`] when unset.
    pub fn memory_budget_bytes(&self) -> u64 {
        self.memory_budget.unwrap_or_else(default_memory_budget)
    }

    /// Checks ranges that the types alone do not.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
        if self.queue_depth == 0 {
            return bad("inference.queue_depth must be at least 1");
        }
        if self.parallel == 0 {
            return bad("inference.parallel must be at least 1");
        }
        if self.kv_budget == 0 {
            return bad("inference.kv_budget must not be 0");
        }
        if self.max_loaded == 0 {
            return bad("inference.max_loaded must be at least 1");
        }
        if self.memory_budget == Some(0) {
            return bad("inference.memory_budget must not be 0");
        }
        let max_threads = max_inference_threads();
        if self.threads > max_threads {
            return Err(ConfigError::Invalid(format!(
                "inference.threads = {} is more than 4 x this machine's cores ({max_threads}); \
                 use 0 for one per core",
                self.threads
            )));
        }
        Ok(())
    }
}

/// The most inference threads `inference.threads` accepts: 4 x the cores of
/// this machine (more only adds contention; 1,857 threads hung a request).
pub fn max_inference_threads() -> usize {
    4 * std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The `[inference]` section's settings, in file order.
pub const SETTINGS: &[Setting] = {
    use crate::config::Kind::{Int, Str};
    use crate::config::Setting as S;
    &[
        S::new(
            "inference.threads",
            Some("SHOAL_THREADS"),
            Int,
            "Compute threads for inference; 0 uses one per available core. At most 4 x the\ncores (a larger value is refused).",
            "4",
        ),
        S::new(
            "inference.queue_depth",
            Some("SHOAL_QUEUE_DEPTH"),
            Int,
            "Requests that may wait per model; more are refused with HTTP 429 and Retry-After.",
            "16",
        ),
        S::new(
            "inference.parallel",
            Some("SHOAL_PARALLEL"),
            Int,
            "Requests of one model generated together (continuous batching): each step runs one\nforward pass over all of them. More wait in the queue.",
            "16",
        ),
        S::new(
            "inference.kv_budget",
            Some("SHOAL_KV_BUDGET"),
            Str,
            "Memory the running requests' keys and values may take per model. When it is full new\nrequests wait, and a request that would grow past it is paused and resumed later.",
            "\"1G\"",
        ),
        S::new(
            "inference.default_model",
            Some("SHOAL_MODEL"),
            Str,
            "Model used when a request names none or names \"default\" (release name or id);\nloaded (pulled if needed) as the daemon starts, so the first request finds it ready.",
            "\"smollm2-135m-instruct:q4_1\"",
        ),
        // -- bounded models (issue 14, item 2) --
        S::new(
            "inference.max_loaded",
            Some("SHOAL_MAX_LOADED"),
            Int,
            "Models loaded at once (at least 1). A request for one more unloads the least recently\nused idle model; if every loaded model is busy it gets HTTP 503 with Retry-After.",
            "2",
        ),
        S::new(
            "inference.memory_budget",
            Some("SHOAL_MEMORY_BUDGET"),
            Str,
            "Memory the loaded models may take together, each counted as its file size plus the f32 KV\nof one 4096-token sequence. Unset: three quarters of the machine's RAM.",
            "\"6G\"",
        ),
    ]
};

/// Models loaded at once by default (`inference.max_loaded`).
pub const DEFAULT_MAX_LOADED: usize = 2;

/// Tokens of KV counted per model by [`memory_estimate`] (or the model's
/// context length, if shorter).
pub const KV_ESTIMATE_TOKENS: usize = 4096;

/// The default `inference.memory_budget`: three quarters of the machine's
/// RAM (`MemTotal` of `/proc/meminfo`), or 4 GiB where that is unknown.
pub fn default_memory_budget() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(4 << 30, |kib| kib.saturating_mul(1024) / 4 * 3)
}

/// What a loaded model is counted as against `inference.memory_budget`:
/// its file size (the mapping: every weight is paged in by the first
/// request) plus the f32 KV of one sequence of [`KV_ESTIMATE_TOKENS`]
/// tokens (or the context length, if shorter). Worker thread stacks are
/// not counted (a few pages each).
pub fn memory_estimate(model: &Model) -> u64 {
    let file_bytes = model.file_len() as u64;
    let l = model.kv_layout();
    let per_token = (l.n_layer * l.n_kv_head * l.head_dim * 2 * 4) as u64;
    let tokens = model.hparams().context_length.clamp(1, KV_ESTIMATE_TOKENS) as u64;
    file_bytes.saturating_add(per_token.saturating_mul(tokens))
}

/// A served model: its engine and chat template.
#[derive(Debug)]
pub struct Served {
    /// The engine.
    pub engine: Arc<Engine>,
    /// The compiled chat template (the model's, or ChatML).
    pub template: ChatTemplate,
    /// A stop sequence the template implies but the vocabulary cannot end
    /// on: ChatML's `<|im_end|>` when ChatML stands in for a missing template
    /// and the vocabulary has no such token (see [`chatml_stop`]).
    pub template_stop: Option<&'static str>,
    /// The model id in hex (also accepted as the model name).
    pub id_hex: String,
    /// What it counts against `inference.memory_budget` ([`memory_estimate`]).
    pub mem_bytes: u64,
    /// Keeps the file from eviction while the engine lives (see [`Located`]).
    /// Dropped after the engine (fields drop in order).
    _guard: Option<Box<dyn std::any::Any + Send + Sync>>,
}

/// The stop sequence to add when `model` is chatted with through [`CHATML`]
/// (it has no template of its own) and its vocabulary has no `<|im_end|>`
/// token to end on: without it the model writes the marker as text and
/// goes on (llama-server renders the same ChatML and does not stop there).
pub fn chatml_stop(model: &Model) -> Option<&'static str> {
    const END: &str = "<|im_end|>";
    (model.chat_template().is_none() && model.tokenizer().token_id(END).is_none()).then_some(END)
}

/// ChatML, used when a model carries no chat template.
pub const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// A loaded model in the table.
#[derive(Debug)]
struct Slot {
    served: Arc<Served>,
    /// Tick of the last request that reached it (LRU order).
    last_used: u64,
    /// Added with [`Serving::add_model`]: never unloaded for room.
    fixed: bool,
}

/// The loaded models: one engine per artifact id, and the names it was
/// loaded or added under.
#[derive(Debug, Default)]
struct Table {
    slots: HashMap<[u8; 32], Slot>,
    names: HashMap<String, [u8; 32]>,
    tick: u64,
}

impl Table {
    /// The loaded model `id`, marked as just used. A model whose file
    /// shrank while it was mapped (`Model::mapping_damaged`) is unloaded
    /// instead: nothing more may be computed from it, and the next request
    /// loads the file again (which fails while it stays truncated).
    fn touch(&mut self, id: &[u8; 32]) -> Option<Arc<Served>> {
        if self
            .slots
            .get(id)
            .is_some_and(|s| s.served.engine.model().mapping_damaged())
        {
            if let Some(slot) = self.remove(id) {
                tracing::error!(
                    model = slot.served.engine.name(),
                    "{}; unloaded",
                    engine::damaged_model_message(slot.served.engine.model())
                );
            }
            return None;
        }
        self.tick += 1;
        let t = self.tick;
        self.slots.get_mut(id).map(|s| {
            s.last_used = t;
            s.served.clone()
        })
    }

    fn remove(&mut self, id: &[u8; 32]) -> Option<Slot> {
        self.names.retain(|_, v| v != id);
        self.slots.remove(id)
    }
}

type SharedLoad =
    futures::future::Shared<futures::future::BoxFuture<'static, Result<Arc<Served>, LocateError>>>;

/// Everything the HTTP handlers need. Share it with `Arc`.
#[derive(Debug)]
pub struct Serving {
    cfg: ServeConfig,
    table: parking_lot::Mutex<Table>,
    kv: Option<Arc<PrefixCache>>,
    respcache: Option<Arc<ResponseCache>>,
    source: std::sync::OnceLock<Arc<dyn ModelSource>>,
    /// Loads (and pulls) in progress, one per artifact id: requests for the
    /// same id share it, other ids are not held up by it.
    loads: parking_lot::Mutex<HashMap<[u8; 32], SharedLoad>>,
    /// Bounds the model files being mapped and set up at once.
    load_permits: tokio::sync::Semaphore,
}

impl std::fmt::Debug for dyn ModelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ModelSource")
    }
}

/// Refuses names longer than [`MAX_MODEL_NAME`].
pub fn check_model_name(name: &str) -> Result<(), LocateError> {
    if name.len() > MAX_MODEL_NAME {
        return Err(LocateError::Invalid(format!(
            "The model name is {} bytes long; at most {MAX_MODEL_NAME} are accepted.",
            name.len()
        )));
    }
    Ok(())
}

/// Whether a name is an id or id prefix (8+ hex digits) rather than a name
/// given by someone.
fn looks_like_id(s: &str) -> bool {
    s.len() >= 8 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn parse_id(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    (s.len() == 64 && hex::decode_to_slice(s, &mut out).is_ok()).then_some(out)
}

impl Serving {
    /// Opens the caches; add models with [`Serving::add_model`].
    pub fn new(mut cfg: ServeConfig) -> Result<Arc<Serving>, ServeError> {
        // Resolved once: the default reads /proc/meminfo.
        cfg.memory_budget = Some(cfg.memory_budget_bytes());
        let kv = match &cfg.kv {
            Some(k) => Some(Arc::new(PrefixCache::open(k.clone(), cfg.metrics.clone())?)),
            None => None,
        };
        let respcache = (cfg.response_cache_budget > 0).then(|| {
            Arc::new(ResponseCache::new(
                cfg.response_cache_budget,
                cfg.response_cache_ttl,
                cfg.metrics.clone(),
            ))
        });
        let permits = cfg.max_loaded.max(1);
        Ok(Arc::new(Serving {
            cfg,
            table: parking_lot::Mutex::new(Table::default()),
            kv,
            respcache,
            source: std::sync::OnceLock::new(),
            loads: parking_lot::Mutex::new(HashMap::new()),
            load_permits: tokio::sync::Semaphore::new(permits),
        }))
    }

    /// Every model this node can name, each name once: the loaded models
    /// (under their served and trusted names; an id without a name in hex),
    /// then the [`catalog`](Serving::catalog) (local, then remote), an id
    /// already listed under a name not repeated in hex. Loaded first, then
    /// by name.
    pub async fn listing(&self) -> Vec<ListedModel> {
        let cat = match self.source.get().cloned() {
            Some(src) => src.catalog().await,
            None => Vec::new(),
        };
        let loaded: Vec<([u8; 32], Vec<String>, Option<usize>)> = {
            let t = self.table.lock();
            t.slots
                .iter()
                .map(|(id, slot)| {
                    let mut names: Vec<String> = t
                        .names
                        .iter()
                        .filter(|(n, v)| *v == id && !looks_like_id(n))
                        .map(|(n, _)| n.clone())
                        .collect();
                    names.sort();
                    let ctx = slot.served.engine.model().hparams().context_length;
                    (*id, names, Some(ctx))
                })
                .collect()
        };
        let mut out: Vec<ListedModel> = Vec::new();
        let mut seen = std::collections::HashSet::<String>::new();
        let mut named = std::collections::HashSet::<[u8; 32]>::new();
        let mut push = |out: &mut Vec<ListedModel>, m: ListedModel| {
            if seen.insert(m.name.clone()) {
                out.push(m);
            }
        };
        for (id, mut names, ctx) in loaded {
            names.extend(
                cat.iter()
                    .filter(|e| e.id == id && !looks_like_id(&e.name))
                    .map(|e| e.name.clone()),
            );
            if names.is_empty() {
                names.push(hex::encode(id));
            }
            for name in names {
                push(
                    &mut out,
                    ListedModel {
                        name,
                        id,
                        state: ModelState::Loaded,
                        servable: Ok(()),
                        context_length: ctx,
                    },
                );
            }
            named.insert(id);
        }
        let mut rest: Vec<&CatalogEntry> = cat
            .iter()
            .filter(|e| {
                !out.iter()
                    .any(|m| m.id == e.id && m.state == ModelState::Loaded)
            })
            .collect();
        rest.sort_by(|a, b| (!a.local, &a.name).cmp(&(!b.local, &b.name)));
        for e in &rest {
            if !looks_like_id(&e.name) {
                named.insert(e.id);
            }
        }
        for e in rest {
            if looks_like_id(&e.name) && named.contains(&e.id) {
                continue;
            }
            push(
                &mut out,
                ListedModel {
                    name: e.name.clone(),
                    id: e.id,
                    state: if e.local {
                        ModelState::Local
                    } else {
                        ModelState::Remote
                    },
                    servable: e.servable.clone(),
                    context_length: None,
                },
            );
        }
        out
    }

    /// Sets where unknown model names are looked up (once).
    pub fn set_source(&self, source: Arc<dyn ModelSource>) {
        let _ = self.source.set(source);
    }

    /// Where unknown model names are looked up, once set.
    pub fn source(&self) -> Option<Arc<dyn ModelSource>> {
        self.source.get().cloned()
    }

    /// The models the [`ModelSource`] holds that are not loaded, each with
    /// whether this build can serve it ([`ModelSource::catalog`]).
    pub async fn catalog(&self) -> Vec<CatalogEntry> {
        let Some(src) = self.source.get().cloned() else {
            return Vec::new();
        };
        let mut v = src.catalog().await;
        let t = self.table.lock();
        v.retain(|e| !t.slots.contains_key(&e.id));
        v
    }

    /// The model served under `name` (a served name, an artifact id, a
    /// unique id prefix or a trusted name, in any letter case), loading it
    /// from the [`ModelSource`] (which may fetch it from the mesh) on first
    /// use. Every name of one artifact reaches the same engine. Loading one
    /// model does not hold up requests for another; concurrent requests for
    /// the same model share one load.
    pub async fn resolve(self: &Arc<Self>, name: &str) -> Result<Arc<Served>, LocateError> {
        check_model_name(name)?;
        if let Some(s) = self.lookup(name) {
            return Ok(s);
        }
        let Some(src) = self.source.get().cloned() else {
            return Err(LocateError::Unknown(format!(
                "The model `{name}` does not exist or is not served by this node."
            )));
        };
        let id = src.resolve(name).await?;
        if let Some(s) = self.table.lock().touch(&id) {
            return Ok(s);
        }
        self.load_shared(src, id, name).await
    }

    /// Loads artifact `id` (requested as `name`), or joins the load of it
    /// already running.
    async fn load_shared(
        self: &Arc<Self>,
        src: Arc<dyn ModelSource>,
        id: [u8; 32],
        name: &str,
    ) -> Result<Arc<Served>, LocateError> {
        let load = {
            let mut loads = self.loads.lock();
            match loads.get(&id) {
                Some(l) => l.clone(),
                None => {
                    let me = self.clone();
                    let name = name.to_owned();
                    // A task of its own: a client that goes away does not
                    // abort a load others wait for.
                    let task = tokio::spawn(async move {
                        let r = me.load_id(src, id, &name).await;
                        me.loads.lock().remove(&id);
                        r
                    });
                    let l = async move {
                        task.await
                            .unwrap_or_else(|e| Err(LocateError::Unavailable(e.to_string())))
                    }
                    .boxed()
                    .shared();
                    loads.insert(id, l.clone());
                    l
                }
            }
        };
        load.await
    }

    /// A trusted release now binds `name` to artifact `id` (the node calls
    /// this for every release it applies). If `name` is served by another
    /// artifact, the release is switched live: `id` is located (pulled if
    /// needed) and loaded beside the old engine, which keeps answering the
    /// name until then; new requests for `name` then reach the new engine,
    /// the old one finishes its in-flight requests ([`Engine::drained`]) and
    /// is unloaded, unless another name still maps to it or it was added
    /// with [`Serving::add_model`] (whose name is the operator's, not a
    /// release's: it is not switched). If the new model cannot be loaded,
    /// `name` is forgotten, so the next request resolves it afresh and gets
    /// the reason. Returns at once; the switch runs on the runtime.
    pub fn on_rebind(self: &Arc<Self>, name: &str, id: [u8; 32]) {
        let old = {
            let t = self.table.lock();
            match t.names.get(name) {
                Some(old) if *old != id => {
                    if t.slots.get(old).is_some_and(|s| s.fixed) {
                        return;
                    }
                    *old
                }
                _ => return,
            }
        };
        let Some(src) = self.source.get().cloned() else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            self.forget_name(name, &old);
            return;
        };
        tracing::info!(
            model = name,
            from = %hex::encode(old),
            to = %hex::encode(id),
            "release switch: loading the new model beside the old one"
        );
        let me = self.clone();
        let name = name.to_owned();
        rt.spawn(async move { me.switch(src, name, old, id).await });
    }

    /// The background half of [`Serving::on_rebind`].
    async fn switch(
        self: Arc<Self>,
        src: Arc<dyn ModelSource>,
        name: String,
        old: [u8; 32],
        id: [u8; 32],
    ) {
        if let Err(e) = self.load_shared(src, id, &name).await {
            tracing::error!(model = %name, to = %hex::encode(id), error = %e,
                "release switch: the new model cannot be served; the name is resolved again on its next request");
            self.forget_name(&name, &old);
            return;
        }
        let gone = {
            let mut t = self.table.lock();
            // From now on `name` reaches the new engine (whatever name the
            // load ran under).
            t.names.insert(name.clone(), id);
            let still_named = t.names.values().any(|v| *v == old);
            match t.slots.get(&old) {
                Some(s) if !s.fixed && !still_named => t.remove(&old),
                _ => None,
            }
        };
        let Some(slot) = gone else {
            tracing::info!(model = %name, to = %hex::encode(id), "release switch: done");
            return;
        };
        let engine = slot.served.engine.clone();
        drop(slot);
        let pending = engine.pending();
        engine.drained().await;
        tracing::info!(
            model = %name,
            from = %hex::encode(old),
            to = %hex::encode(id),
            drained = pending,
            "release switch: done; the old model drained its requests and is unloaded"
        );
    }

    /// Drops `name` from the table if it still maps to `old`.
    fn forget_name(&self, name: &str, old: &[u8; 32]) {
        let mut t = self.table.lock();
        if t.names.get(name) == Some(old) {
            t.names.remove(name);
        }
    }

    /// Locates, loads and starts serving artifact `id`, making room for it.
    async fn load_id(
        self: &Arc<Self>,
        src: Arc<dyn ModelSource>,
        id: [u8; 32],
        name: &str,
    ) -> Result<Arc<Served>, LocateError> {
        if let Some(s) = self.table.lock().touch(&id) {
            return Ok(s);
        }
        let located = src.locate(id, name).await?;
        let _permit = self
            .load_permits
            .acquire()
            .await
            .map_err(|e| LocateError::Unavailable(e.to_string()))?;
        let threads = self.cfg.threads;
        let path = located.path.clone();
        let model = tokio::task::spawn_blocking(move || {
            Model::load_with(
                &path,
                &crate::inference::ModelConfig {
                    threads,
                    model_id: Some(id),
                    ..Default::default()
                },
            )
            // On this blocking thread: the reason may read the file's header.
            .map_err(|e| LocateError::from_load(&path, e))
        })
        .await
        .map_err(|e| LocateError::Unavailable(e.to_string()))??;
        let mem = memory_estimate(&model);
        let served = self
            .insert(name, model, mem, located.guard, false)
            .map_err(|e| match e {
                InsertError::Room(l) => l,
                InsertError::Serve(e) => LocateError::Unavailable(e.to_string()),
            })?;
        tracing::info!(
            model = name,
            id = %hex::encode(id),
            path = %located.path.display(),
            mem_bytes = mem,
            "model loaded for serving"
        );
        Ok(served)
    }

    /// Unloads least recently used idle, non-fixed engines until one more
    /// model of `need` bytes fits both bounds. Returns the unloaded slots
    /// (to drop outside the lock).
    fn make_room(&self, t: &mut Table, need: u64) -> Result<Vec<Slot>, LocateError> {
        let mut gone = Vec::new();
        loop {
            let used: u64 = t.slots.values().map(|s| s.served.mem_bytes).sum();
            let fits_count = t.slots.len() < self.cfg.max_loaded.max(1);
            // A model alone larger than the budget is still served, alone.
            let fits_mem =
                t.slots.is_empty() || used.saturating_add(need) <= self.cfg.memory_budget_bytes();
            if fits_count && fits_mem {
                return Ok(gone);
            }
            let victim = t
                .slots
                .iter()
                .filter(|(_, s)| {
                    !s.fixed && s.served.engine.pending() == 0 && Arc::strong_count(&s.served) == 1
                })
                .min_by_key(|(_, s)| s.last_used)
                .map(|(id, _)| *id);
            let Some(victim) = victim else {
                let retry_after = t
                    .slots
                    .values()
                    .map(|s| s.served.engine.retry_after_secs())
                    .min()
                    .unwrap_or(1);
                return Err(LocateError::Busy {
                    message: format!(
                        "{} model(s) are loaded ({} bytes of the memory budget of {}; at most {}) and all are in use; retry later.",
                        t.slots.len(),
                        used,
                        self.cfg.memory_budget_bytes(),
                        self.cfg.max_loaded
                    ),
                    retry_after,
                });
            };
            if let Some(slot) = t.remove(&victim) {
                tracing::info!(
                    model = slot.served.engine.name(),
                    id = %slot.served.id_hex,
                    "unloading the least recently used idle model"
                );
                gone.push(slot);
            }
        }
    }

    fn insert(
        &self,
        name: &str,
        model: Arc<Model>,
        mem_bytes: u64,
        guard: Option<Box<dyn std::any::Any + Send + Sync>>,
        fixed: bool,
    ) -> Result<Arc<Served>, InsertError> {
        let id = model.id();
        let tok = model.tokenizer().clone();
        let text = |id: Option<u32>| {
            id.map(|i| String::from_utf8_lossy(tok.token_bytes(i)).into_owned())
                .unwrap_or_default()
        };
        let src = model.chat_template().unwrap_or(CHATML);
        let template_stop = chatml_stop(&model);
        let template = ChatTemplate::new(src, &text(tok.bos()), &text(tok.eos()))
            .or_else(|e| {
                tracing::warn!(model = name, error = %e, "chat template does not compile; using ChatML");
                ChatTemplate::new(CHATML, &text(tok.bos()), &text(tok.eos()))
            })
            .map_err(|source| {
                InsertError::Serve(ServeError::Model {
                    name: name.to_owned(),
                    source,
                })
            })?;
        let mut gone = Vec::new();
        let served = {
            let mut t = self.table.lock();
            if let Some(s) = t.touch(&id) {
                // Already served (another name of the same bytes).
                t.names.insert(name.to_owned(), id);
                if fixed && let Some(slot) = t.slots.get_mut(&id) {
                    slot.fixed = true;
                }
                return Ok(s);
            }
            if fixed {
                // Replaces the model served under that name.
                if let Some(old) = t.names.get(name).copied()
                    && let Some(slot) = t.remove(&old)
                {
                    gone.push(slot);
                }
            }
            gone.extend(
                self.make_room(&mut t, mem_bytes)
                    .map_err(InsertError::Room)?,
            );
            let engine = Engine::start(
                name,
                model,
                self.kv.clone(),
                engine::EngineConfig {
                    parallel: self.cfg.parallel,
                    queue_depth: self.cfg.queue_depth,
                    kv_budget: self.cfg.kv_budget,
                },
                self.cfg.metrics.clone(),
            )
            .map_err(|e| InsertError::Serve(e.into()))?;
            let served = Arc::new(Served {
                engine,
                template,
                template_stop,
                id_hex: hex::encode(id),
                mem_bytes,
                _guard: guard,
            });
            t.tick += 1;
            let last_used = t.tick;
            t.slots.insert(
                id,
                Slot {
                    served: served.clone(),
                    last_used,
                    fixed,
                },
            );
            t.names.insert(name.to_owned(), id);
            served
        };
        drop(gone);
        Ok(served)
    }

    /// The configuration.
    pub fn metrics(&self) -> &Arc<crate::metrics::Metrics> {
        &self.cfg.metrics
    }

    /// The settings this layer runs with.
    pub fn config(&self) -> &ServeConfig {
        &self.cfg
    }

    /// The prefix KV cache.
    pub fn kv(&self) -> Option<&Arc<PrefixCache>> {
        self.kv.as_ref()
    }

    /// The response cache.
    pub fn response_cache(&self) -> Option<&Arc<ResponseCache>> {
        self.respcache.as_ref()
    }

    /// Serves a loaded model under `name` (replacing a model of that name).
    /// Models added this way are never unloaded for room, but count against
    /// `max_loaded` and the memory budget. If its bytes are already served
    /// under another name, `name` becomes one more name of that engine.
    pub fn add_model(&self, name: &str, model: Arc<Model>) -> Result<Arc<Served>, ServeError> {
        let mem = memory_estimate(&model);
        self.insert(name, model, mem, None, true)
            .map_err(|e| match e {
                InsertError::Serve(e) => e,
                InsertError::Room(l) => ServeError::Full(l.to_string()),
            })
    }

    /// Loads a GGUF file and serves it under `name`.
    pub fn load_model(
        &self,
        name: &str,
        path: &std::path::Path,
    ) -> Result<Arc<Served>, ServeError> {
        let model = Model::load(path).map_err(|source| ServeError::Model {
            name: name.to_owned(),
            source,
        })?;
        self.add_model(name, model)
    }

    /// The model loaded under `name` or whose id is `name` in hex (any
    /// case), without loading anything. Aliases (id prefixes, other
    /// trusted names) are found by [`Serving::resolve`].
    pub fn model(&self, name: &str) -> Option<Arc<Served>> {
        let t = self.table.lock();
        let id = t.names.get(name).copied().or_else(|| parse_id(name))?;
        t.slots.get(&id).map(|s| s.served.clone())
    }

    fn lookup(&self, name: &str) -> Option<Arc<Served>> {
        let mut t = self.table.lock();
        let id = t.names.get(name).copied().or_else(|| parse_id(name))?;
        t.touch(&id)
    }

    /// All loaded models.
    pub fn models(&self) -> Vec<Arc<Served>> {
        let t = self.table.lock();
        let mut v: Vec<(u64, Arc<Served>)> = t
            .slots
            .values()
            .map(|s| (s.last_used, s.served.clone()))
            .collect();
        v.sort_by_key(|(u, _)| *u);
        v.into_iter().map(|(_, s)| s).collect()
    }

    /// Stops serving artifact `id` because its file was found corrupt: its
    /// engine is unloaded (requests already running finish on their own
    /// reference), so the next request asks the [`ModelSource`] again,
    /// which answers [`LocateError::Corrupt`] until the file is repaired.
    /// Returns whether an engine was unloaded.
    pub fn on_model_corrupt(&self, id: &[u8; 32]) -> bool {
        let gone = self.table.lock().remove(id);
        // KV blocks computed from the corrupt bytes must not outlive them:
        // drop this model's blocks from every tier (disk work: off the
        // async runtime when there is one).
        if let Some(kv) = self.kv.clone() {
            let id = *id;
            let drop_kv = move || {
                let n = kv.drop_model(&id);
                tracing::warn!(id = %hex::encode(id), blocks = n, "KV blocks of a corrupt model dropped");
            };
            match tokio::runtime::Handle::try_current() {
                Ok(h) => {
                    h.spawn_blocking(drop_kv);
                }
                Err(_) => drop_kv(),
            }
        }
        if let Some(slot) = &gone {
            tracing::warn!(
                model = slot.served.engine.name(),
                id = %slot.served.id_hex,
                "model found corrupt: unloaded"
            );
        }
        gone.is_some()
    }

    /// Waits until every engine is idle and flushes the KV disk writes.
    pub async fn drain(&self) {
        for s in self.models() {
            s.engine.drained().await;
        }
        if let Some(kv) = self.kv.clone() {
            let _ = tokio::task::spawn_blocking(move || kv.flush()).await;
        }
    }
}

/// Names the node that ran the model on a generation response: the
/// [`SERVED_BY_HEADER`] header set to `node_id` (this node's peer id,
/// [`ServeConfig::node_id`]), unless the response already names one (an
/// answer a peer served keeps its name). Nothing when `node_id` is unset or
/// not a header value.
pub fn name_server(r: &mut axum::response::Response, node_id: Option<&str>) {
    let Some(v) = node_id.and_then(|n| axum::http::HeaderValue::from_str(n).ok()) else {
        return;
    };
    r.headers_mut().entry(SERVED_BY_HEADER).or_insert(v);
}

/// Adds a top-level `"served_by": node_id` to `v` (a JSON object; anything
/// else is left alone), unless `node_id` is `None`.
pub fn add_served_by(v: &mut serde_json::Value, node_id: Option<&str>) {
    if let (Some(n), Some(o)) = (node_id, v.as_object_mut()) {
        o.insert("served_by".into(), serde_json::Value::from(n));
    }
}

/// How long preparing a request (rendering the chat template, tokenizing)
/// may take before the request fails.
pub const PREPARE_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs `prepare` (template rendering and tokenizing: CPU work a hostile
/// template can stretch) on the blocking pool, bounded by
/// [`PREPARE_TIMEOUT`]. The error is the message a client gets (HTTP 500):
/// a panic in `prepare`, or the time limit.
pub async fn prepare_off_runtime<T: Send + 'static>(
    prepare: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    let job = tokio::task::spawn_blocking(prepare);
    match tokio::time::timeout(PREPARE_TIMEOUT, job).await {
        Ok(Ok(p)) => Ok(p),
        Ok(Err(e)) => Err(format!("preparing the prompt failed: {e}")),
        Err(_) => Err(format!(
            "template limit: rendering the chat template and tokenizing the prompt took longer than {PREPARE_TIMEOUT:?}"
        )),
    }
}

/// Why a model could not be added to the table.
enum InsertError {
    /// No room (every loaded model in use).
    Room(LocateError),
    /// Starting it failed.
    Serve(ServeError),
}
