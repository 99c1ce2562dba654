//! Serving: the OpenAI-compatible HTTP API over per-model [`Engine`]s, the
//! prefix KV cache ([`crate::kvcache`]) and the response cache
//! ([`crate::respcache`]).
//!
//! [`Serving`] holds the served models and caches; [`router`] gives the
//! axum routes (`/v1/chat/completions`, `/v1/completions`, `/v1/models`)
//! to merge into a node's router; [`serve`] runs them on a listener with
//! graceful shutdown (in-flight requests are drained). See `docs/SERVING.md`.

pub mod engine;
pub mod openai;

pub use engine::{Engine, EngineStats, Job, JobEvent};
pub use openai::router;

use crate::inference::{ChatTemplate, Model};
use crate::kvcache::{KvCacheConfig, KvCacheError, PrefixCache};
use crate::respcache::ResponseCache;
use std::future::Future;
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
}

/// Where models that are not served yet come from (the node's store and
/// mesh): resolves a name or id to a local GGUF file, fetching it first if
/// needed, and returns the file and the model id to bind KV to.
pub trait ModelSource: Send + Sync {
    /// Finds (and if needed fetches) the model named `name`.
    fn locate<'a>(
        &'a self,
        name: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<Located, LocateError>>;
}

/// A located model: the GGUF file and the model id to bind KV to.
pub type Located = (PathBuf, Option<[u8; 32]>);

/// Why a [`ModelSource`] could not provide a model.
#[derive(Debug, thiserror::Error)]
pub enum LocateError {
    /// No artifact or trusted name matches.
    #[error("{0}")]
    Unknown(String),
    /// It is known but could not be fetched (offline, no peer holds it, …).
    #[error("{0}")]
    Unavailable(String),
}

/// Settings of the serving layer.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Largest accepted request body in bytes (larger: 413).
    pub body_limit: usize,
    /// Requests that may wait behind the running one, per model (more: 429).
    pub queue_depth: usize,
    /// The prefix KV cache; `None` disables it.
    pub kv: Option<KvCacheConfig>,
    /// Response cache byte budget (0 disables it).
    pub response_cache_budget: u64,
    /// Response cache TTL (also the `max-age` served).
    pub response_cache_ttl: Duration,
    /// Worker threads per model (0 = all cores).
    pub threads: usize,
    /// Test hook: serve wrong (but validly signed) KV to neighbours.
    #[doc(hidden)]
    pub test_lie_kv: bool,
}

impl Default for ServeConfig {
    /// The configuration file's defaults (`[inference]`, `[response_cache]`):
    /// one source of truth for the numbers the docs quote.
    fn default() -> Self {
        let cfg = crate::config::Config::default();
        ServeConfig {
            body_limit: 1 << 20,
            queue_depth: cfg.inference.queue_depth,
            kv: Some(KvCacheConfig::default()),
            response_cache_budget: cfg.response_cache.budget.bytes(),
            response_cache_ttl: cfg.response_cache.ttl.get(),
            threads: 0,
            test_lie_kv: false,
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

    /// The serving settings of a node's configuration (`[kv]`,
    /// `[response_cache]`, `[inference]`), with the KV disk tier under
    /// `<data_dir>/kv`.
    pub fn from_config(cfg: &crate::config::Config, data_dir: &std::path::Path) -> ServeConfig {
        use crate::config::KvDtype as C;
        let kv = &cfg.kv;
        ServeConfig {
            queue_depth: cfg.inference.queue_depth,
            threads: cfg.inference.threads,
            kv: Some(KvCacheConfig {
                block_tokens: kv.block_size as usize,
                dtype: match kv.dtype {
                    C::F16 => crate::inference::KvDtype::F16,
                    C::Q8_0 => crate::inference::KvDtype::Q8_0,
                },
                ram_budget: kv.ram_budget.0,
                ram_ttl: kv.ttl.0,
                disk_dir: Some(data_dir.join("kv")),
                disk_budget: kv.disk_budget.0,
            }),
            response_cache_budget: cfg.response_cache.budget.0,
            response_cache_ttl: cfg.response_cache.ttl.0,
            ..ServeConfig::default()
        }
    }
}

/// A served model: its engine and chat template.
#[derive(Debug)]
pub struct Served {
    /// The engine.
    pub engine: Arc<Engine>,
    /// The compiled chat template (the model's, or ChatML).
    pub template: ChatTemplate,
    /// The model id in hex (also accepted as the model name).
    pub id_hex: String,
}

/// ChatML, used when a model carries no chat template.
pub const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// Everything the HTTP handlers need. Share it with `Arc`.
#[derive(Debug)]
pub struct Serving {
    cfg: ServeConfig,
    models: parking_lot::RwLock<Vec<Arc<Served>>>,
    kv: Option<Arc<PrefixCache>>,
    respcache: Option<Arc<ResponseCache>>,
    source: std::sync::OnceLock<Arc<dyn ModelSource>>,
    loading: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for dyn ModelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ModelSource")
    }
}

impl Serving {
    /// Opens the caches; add models with [`Serving::add_model`].
    pub fn new(cfg: ServeConfig) -> Result<Arc<Serving>, ServeError> {
        let kv = match &cfg.kv {
            Some(k) => Some(Arc::new(PrefixCache::open(k.clone())?)),
            None => None,
        };
        let respcache = (cfg.response_cache_budget > 0).then(|| {
            Arc::new(ResponseCache::new(
                cfg.response_cache_budget,
                cfg.response_cache_ttl,
            ))
        });
        Ok(Arc::new(Serving {
            cfg,
            models: parking_lot::RwLock::new(Vec::new()),
            kv,
            respcache,
            source: std::sync::OnceLock::new(),
            loading: tokio::sync::Mutex::new(()),
        }))
    }

    /// Sets where unknown model names are looked up (once).
    pub fn set_source(&self, source: Arc<dyn ModelSource>) {
        let _ = self.source.set(source);
    }

    /// The model served under `name`, loading it from the [`ModelSource`]
    /// (which may fetch it from the mesh) on first use.
    pub async fn resolve(&self, name: &str) -> Result<Arc<Served>, LocateError> {
        if let Some(s) = self.model(name) {
            return Ok(s);
        }
        let Some(src) = self.source.get().cloned() else {
            return Err(LocateError::Unknown(format!(
                "The model `{name}` does not exist or is not served by this node."
            )));
        };
        let _one_at_a_time = self.loading.lock().await;
        if let Some(s) = self.model(name) {
            return Ok(s);
        }
        let (path, id) = src.locate(name).await?;
        let threads = self.cfg.threads;
        let p = path.clone();
        let model = tokio::task::spawn_blocking(move || {
            Model::load_with(
                &p,
                &crate::inference::ModelConfig {
                    threads,
                    model_id: id,
                    ..Default::default()
                },
            )
        })
        .await
        .map_err(|e| LocateError::Unavailable(e.to_string()))?
        .map_err(|e| LocateError::Unavailable(format!("loading {}: {e}", path.display())))?;
        tracing::info!(model = name, path = %path.display(), "model loaded for serving");
        self.add_model(name, model)
            .map_err(|e| LocateError::Unavailable(e.to_string()))
    }

    /// The configuration.
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
    pub fn add_model(&self, name: &str, model: Arc<Model>) -> Result<Arc<Served>, ServeError> {
        let tok = model.tokenizer().clone();
        let text = |id: Option<u32>| {
            id.map(|i| String::from_utf8_lossy(tok.token_bytes(i)).into_owned())
                .unwrap_or_default()
        };
        let src = model.chat_template().unwrap_or(CHATML);
        let template = ChatTemplate::new(src, &text(tok.bos()), &text(tok.eos()))
            .or_else(|e| {
                tracing::warn!(model = name, error = %e, "chat template does not compile; using ChatML");
                ChatTemplate::new(CHATML, &text(tok.bos()), &text(tok.eos()))
            })
            .map_err(|source| ServeError::Model {
                name: name.to_owned(),
                source,
            })?;
        let id_hex = hex::encode(model.id());
        let engine = Engine::start(name, model, self.kv.clone(), self.cfg.queue_depth)?;
        let served = Arc::new(Served {
            engine,
            template,
            id_hex,
        });
        let mut m = self.models.write();
        m.retain(|s| s.engine.name() != name);
        m.push(served.clone());
        Ok(served)
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

    /// The model served under `name` (or whose id is `name` in hex).
    pub fn model(&self, name: &str) -> Option<Arc<Served>> {
        self.models
            .read()
            .iter()
            .find(|s| s.engine.name() == name || s.id_hex == name)
            .cloned()
    }

    /// All served models.
    pub fn models(&self) -> Vec<Arc<Served>> {
        self.models.read().clone()
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

/// Serves the OpenAI routes of `serving` on `listener` until `shutdown`
/// completes, then stops accepting, lets in-flight requests finish and
/// drains the engines.
pub async fn serve(
    listener: tokio::net::TcpListener,
    serving: Arc<Serving>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let app = router(serving.clone());
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    serving.drain().await;
    Ok(())
}
