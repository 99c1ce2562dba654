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
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            body_limit: 1 << 20,
            queue_depth: 8,
            kv: Some(KvCacheConfig::default()),
            response_cache_budget: 64 << 20,
            response_cache_ttl: Duration::from_secs(600),
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
        }))
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
