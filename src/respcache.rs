//! The response cache: answers to deterministic requests (temperature 0, or
//! a fixed seed), keyed by the model id and the normalized request.
//!
//! The key is `BLAKE3("shoal-resp-v1" ‖ model id ‖ endpoint ‖ canonical
//! JSON of the request without stream, stream_options and user)`; the
//! canonical JSON has object keys sorted and no whitespace. Because the
//! model id is in the key, replacing the model behind a name makes old
//! entries unreachable (they age out by TTL and budget). Entries are bounded
//! by a TTL and a byte budget (LRU, [`crate::lru::Lru`]). The key's hex is the HTTP `ETag`.

use crate::lru::Lru;
use crate::metrics::Metrics;
use parking_lot::Mutex;
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Errors of the response cache.
#[derive(Debug, thiserror::Error)]
pub enum RespCacheError {
    /// The request is not a JSON object.
    #[error("request is not a JSON object")]
    NotAnObject,
}

/// Fields that do not change the answer and are removed before keying.
pub const IGNORED_FIELDS: &[&str] = &["stream", "stream_options", "user"];

/// True if the request asks for a deterministic answer: `temperature` is 0,
/// or a `seed` is given.
pub fn is_deterministic(req: &Value) -> bool {
    let t0 = req
        .get("temperature")
        .and_then(Value::as_f64)
        .is_some_and(|t| t == 0.0);
    let seeded = req.get("seed").is_some_and(|s| s.is_u64() || s.is_i64());
    t0 || seeded
}

/// The cache key of a request to `endpoint` of model `model_id`.
pub fn key(model_id: &[u8; 32], endpoint: &str, req: &Value) -> Result<[u8; 32], RespCacheError> {
    let obj = req.as_object().ok_or(RespCacheError::NotAnObject)?;
    let mut h = blake3::Hasher::new();
    h.update(b"shoal-resp-v1");
    h.update(model_id);
    h.update(&(endpoint.len() as u32).to_le_bytes());
    h.update(endpoint.as_bytes());
    let mut buf = Vec::new();
    canonical(
        &Value::Object(
            obj.iter()
                .filter(|(k, _)| !IGNORED_FIELDS.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        ),
        &mut buf,
    );
    h.update(&buf);
    Ok(*h.finalize().as_bytes())
}

/// Canonical JSON: object keys sorted, no whitespace, numbers as serde_json prints them.
fn canonical(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Object(m) => {
            let sorted: BTreeMap<&String, &Value> = m.iter().collect();
            out.push(b'{');
            for (i, (k, v)) in sorted.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(Value::String(k.clone()).to_string().as_bytes());
                out.push(b':');
                canonical(v, out);
            }
            out.push(b'}');
        }
        Value::Array(a) => {
            out.push(b'[');
            for (i, v) in a.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                canonical(v, out);
            }
            out.push(b']');
        }
        other => out.extend_from_slice(other.to_string().as_bytes()),
    }
}

/// A cached answer: the complete non-streaming body and the text pieces a
/// stream is rebuilt from.
#[derive(Debug, Clone, PartialEq)]
pub struct CachedAnswer {
    /// The non-streaming JSON body, byte for byte.
    pub body: Vec<u8>,
    /// Text pieces in generation order (one per streamed chunk).
    pub pieces: Vec<String>,
    /// OpenAI `finish_reason`.
    pub finish_reason: String,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Completion tokens.
    pub completion_tokens: usize,
    /// Response id.
    pub id: String,
    /// Creation time (Unix seconds).
    pub created: u64,
}

impl CachedAnswer {
    fn size(&self) -> u64 {
        (self.body.len()
            + self.pieces.iter().map(|p| p.len() + 24).sum::<usize>()
            + self.finish_reason.len()
            + self.id.len()
            + 128) as u64
    }
}

struct Entry {
    answer: Arc<CachedAnswer>,
    stored: Instant,
}

/// Settings of the response cache: the `[response_cache]` section of the
/// configuration file ([`SETTINGS`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ResponseCacheConfig {
    /// Bytes of cached responses; 0 turns the cache off.
    #[serde(with = "crate::config::size")]
    pub budget: u64,
    /// Cached responses older than this are not served (also the `max-age` served).
    #[serde(with = "crate::config::duration")]
    pub ttl: Duration,
}

impl Default for ResponseCacheConfig {
    /// The configuration file's defaults (`[response_cache]`).
    fn default() -> Self {
        ResponseCacheConfig {
            budget: 64 << 20,
            ttl: Duration::from_secs(3600),
        }
    }
}

/// The `[response_cache]` section's settings, in file order.
pub const SETTINGS: &[crate::config::Setting] = &[
    crate::config::Setting::new(
        "response_cache.budget",
        Some("SHOAL_RESPONSE_CACHE"),
        crate::config::Kind::Str,
        "Bytes of cached whole responses; 0 turns the response cache off.",
        "\"64M\"",
    ),
    crate::config::Setting::new(
        "response_cache.ttl",
        Some("SHOAL_RESPONSE_CACHE_TTL"),
        crate::config::Kind::Str,
        "Cached responses older than this are not served.",
        "\"1h\"",
    ),
];

/// The cache. The sum of entry sizes never exceeds the budget.
pub struct ResponseCache {
    budget: u64,
    ttl: Duration,
    inner: Mutex<Lru<[u8; 32], Entry>>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for ResponseCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseCache")
            .field("budget", &self.budget)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl ResponseCache {
    /// An empty cache reporting its lookups and size to `metrics`.
    pub fn new(budget: u64, ttl: Duration, metrics: Arc<Metrics>) -> ResponseCache {
        ResponseCache {
            budget,
            ttl,
            inner: Mutex::new(Lru::new(budget)),
            metrics,
        }
    }

    /// The TTL (also the `max-age` served).
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Bytes held.
    pub fn used(&self) -> u64 {
        self.inner.lock().used()
    }

    /// The byte budget.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.inner.lock().len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The answer under `key`, if present and fresh (counted as a hit or
    /// a miss in the metrics).
    pub fn get(&self, key: &[u8; 32]) -> Option<Arc<CachedAnswer>> {
        let found = self.lookup(key);
        self.metrics.response_cache_lookup(found.is_some());
        found
    }

    fn lookup(&self, key: &[u8; 32]) -> Option<Arc<CachedAnswer>> {
        let mut lru = self.inner.lock();
        if lru.peek(key)?.stored.elapsed() > self.ttl {
            lru.remove(key);
            self.metrics.response_cache_bytes(lru.used());
            return None;
        }
        lru.get(key).map(|e| e.answer.clone())
    }

    /// Stores an answer, evicting least recently used entries to fit.
    /// Answers larger than the budget are not stored.
    pub fn insert(&self, key: [u8; 32], answer: CachedAnswer) {
        let size = answer.size();
        let entry = Entry {
            answer: Arc::new(answer),
            stored: Instant::now(),
        };
        let mut lru = self.inner.lock();
        let _ = lru.insert(key, entry, size);
        self.metrics.response_cache_bytes(lru.used());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn key_normalizes() {
        let m = [1u8; 32];
        let a = json!({"model":"x","temperature":0,"messages":[{"role":"user","content":"hi"}],"stream":true,"user":"u1"});
        let b: Value = serde_json::from_str(
            r#"{ "messages": [ {"content":"hi", "role":"user"} ], "temperature":0, "model":"x" }"#,
        )
        .expect("json");
        assert_eq!(
            key(&m, "chat", &a).expect("k"),
            key(&m, "chat", &b).expect("k")
        );
        assert_ne!(
            key(&m, "chat", &a).expect("k"),
            key(&m, "completions", &a).expect("k")
        );
        assert_ne!(
            key(&m, "chat", &a).expect("k"),
            key(&[2; 32], "chat", &a).expect("k")
        );
        let c = json!({"model":"x","temperature":0,"messages":[{"role":"user","content":"hi!"}]});
        assert_ne!(
            key(&m, "chat", &a).expect("k"),
            key(&m, "chat", &c).expect("k")
        );
        assert!(key(&m, "chat", &json!([1])).is_err());
    }

    #[test]
    fn determinism() {
        assert!(is_deterministic(&json!({"temperature":0})));
        assert!(is_deterministic(&json!({"temperature":0.0})));
        assert!(is_deterministic(&json!({"temperature":0.7,"seed":3})));
        assert!(!is_deterministic(&json!({"temperature":0.7})));
        assert!(!is_deterministic(&json!({})));
    }

    fn answer(n: usize) -> CachedAnswer {
        CachedAnswer {
            body: vec![b'x'; n],
            pieces: vec!["a".into()],
            finish_reason: "stop".into(),
            prompt_tokens: 1,
            completion_tokens: 1,
            id: "id".into(),
            created: 0,
        }
    }

    #[test]
    fn budget_lru_ttl() {
        let c = ResponseCache::new(1000, Duration::from_secs(60), Arc::default());
        for i in 0..20u8 {
            c.insert([i; 32], answer(200));
            assert!(c.used() <= 1000);
            c.get(&[0; 32]);
        }
        assert!(c.get(&[0; 32]).is_some(), "recently used survives");
        assert!(c.get(&[1; 32]).is_none(), "LRU evicted");
        c.insert([99; 32], answer(5000));
        assert!(c.get(&[99; 32]).is_none() && c.used() <= 1000);
        let c = ResponseCache::new(1000, Duration::ZERO, Arc::default());
        c.insert([1; 32], answer(10));
        std::thread::sleep(Duration::from_millis(2));
        assert!(c.get(&[1; 32]).is_none());
        assert_eq!(c.used(), 0);
    }
}
