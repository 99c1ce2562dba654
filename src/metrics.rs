//! Process-wide Prometheus metrics.
//!
//! Every layer reports through typed calls on [`global()`] (a [`Metrics`]);
//! `GET /metrics` serves [`Metrics::render`] in the Prometheus text exposition
//! format (version 0.0.4). Names follow Prometheus conventions: a `shoal_`
//! prefix, `_total` on counters, base units (`_bytes`, `_seconds`) in names.
//!
//! | layer | families |
//! | --- | --- |
//! | store | `shoal_store_artifacts{status}`, `shoal_store_bytes`, `shoal_store_quota_bytes`, `shoal_store_added_bytes_total`, `shoal_store_evictions_total`, `shoal_store_evicted_bytes_total` |
//! | mesh | `shoal_chunk_fetches_total{source,outcome}`, `shoal_chunk_fetch_bytes_total{source}`, `shoal_chunk_fetch_duration_seconds{source}`, `shoal_bad_chunks_total{source}`, `shoal_peer_bans_total`, `shoal_peers_banned`, `shoal_peers_connected` |
//! | KV cache | `shoal_kv_blocks{tier}`, `shoal_kv_bytes{tier}`, `shoal_kv_lookups_total{tier,result}` |
//! | response cache | `shoal_response_cache_lookups_total{result}`, `shoal_response_cache_bytes` |
//! | serving | `shoal_ttft_seconds{cache}`, `shoal_generation_tokens_per_second`, `shoal_generated_tokens_total`, `shoal_requests_total{status}`, `shoal_queue_depth{model}` |
//!
//! Sources of chunk bytes: `local` (deduplicated from another artifact in
//! this node's store), `peer` (the mesh), `origin` (an origin URL).

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use serde::Serialize;
use std::collections::VecDeque;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock};

/// The content type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Where a chunk's bytes came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// Another artifact in this node's store held the same chunk (deduplication).
    Local,
    /// A peer in the mesh.
    Peer,
    /// The artifact's origin URL.
    Origin,
}

impl Source {
    /// All sources, in display order.
    pub const ALL: [Source; 3] = [Source::Local, Source::Peer, Source::Origin];
}

/// How a chunk fetch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The chunk arrived and matched its hash.
    Ok,
    /// The bytes arrived but did not match the hash (counted in bad chunks too).
    BadHash,
    /// The transfer failed (refused, reset, not found at the source).
    Failed,
    /// The transfer took too long and was abandoned.
    Timeout,
}

/// A KV-cache tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    /// Blocks in RAM.
    Ram,
    /// Blocks spilled to disk.
    Disk,
}

/// Result of a cache lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lookup {
    /// Found.
    Hit,
    /// Not found.
    Miss,
}

impl From<bool> for Lookup {
    fn from(hit: bool) -> Self {
        if hit { Lookup::Hit } else { Lookup::Miss }
    }
}

/// Which cache served the start of a response (splits time to first token).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheOutcome {
    /// Nothing cached: the whole prompt was computed (cold).
    Miss,
    /// Part or all of the prompt's prefix came from the KV cache (warm).
    Kv,
    /// The whole response came from the response cache.
    Response,
}

/// State of a stored artifact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ArtifactState {
    /// Complete and verified.
    Active,
    /// Being filled.
    Partial,
}

/// Label values are the lower-case (snake_case) names of the variants.
macro_rules! label_values {
    ($($t:ty { $($v:ident => $s:literal),+ $(,)? })+) => {$(
        impl $t {
            /// The label value.
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$v => $s),+ }
            }
        }
        impl EncodeLabelValue for $t {
            fn encode(&self, e: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
                std::fmt::Write::write_str(e, self.as_str())
            }
        }
    )+};
}

label_values! {
    Source { Local => "local", Peer => "peer", Origin => "origin" }
    Outcome { Ok => "ok", BadHash => "bad_hash", Failed => "failed", Timeout => "timeout" }
    Tier { Ram => "ram", Disk => "disk" }
    Lookup { Hit => "hit", Miss => "miss" }
    CacheOutcome { Miss => "miss", Kv => "kv", Response => "response" }
    ArtifactState { Active => "active", Partial => "partial" }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StatusLabel {
    status: ArtifactState,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct SourceLabel {
    source: Source,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct FetchLabels {
    source: Source,
    outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TierLabel {
    tier: Tier,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KvLookupLabels {
    tier: Tier,
    result: Lookup,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ResultLabel {
    result: Lookup,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CacheLabel {
    cache: CacheOutcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ModelLabel {
    model: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct HttpStatusLabel {
    status: String,
}

type FGauge = Gauge<f64, AtomicU64>;

fn fetch_duration() -> Histogram {
    // 1 ms … ~33 s
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

fn ttft() -> Histogram {
    // 10 ms … ~164 s
    Histogram::new(exponential_buckets(0.01, 2.0, 15))
}

/// The `[metrics]` section of the configuration file. (Its settings are
/// described in `crate::settings`: this module imports nothing from the crate.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Serve Prometheus metrics at `GET /metrics` on the API address.
    pub enabled: bool,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig { enabled: true }
    }
}

/// The registry and a handle on every metric family.
pub struct Metrics {
    registry: Registry,
    // store
    store_artifacts: Family<StatusLabel, Gauge>,
    store_bytes: Gauge,
    store_quota: FGauge,
    store_added: Counter,
    store_evictions: Counter,
    store_evicted_bytes: Counter,
    // mesh
    fetches: Family<FetchLabels, Counter>,
    fetch_bytes: Family<SourceLabel, Counter>,
    fetch_seconds: Family<SourceLabel, Histogram, fn() -> Histogram>,
    bad_chunks: Family<SourceLabel, Counter>,
    peer_bans: Counter,
    peers_banned: Gauge,
    peers_connected: Gauge,
    // kv
    kv_blocks: Family<TierLabel, Gauge>,
    kv_bytes: Family<TierLabel, Gauge>,
    kv_lookups: Family<KvLookupLabels, Counter>,
    // response cache
    rc_lookups: Family<ResultLabel, Counter>,
    rc_bytes: Gauge,
    // serving
    ttft: Family<CacheLabel, Histogram, fn() -> Histogram>,
    tokens_per_second: Histogram,
    tokens: Counter,
    requests: Family<HttpStatusLabel, Counter>,
    queue_depth: Family<ModelLabel, Gauge>,
    recent_ttft: Mutex<VecDeque<TtftSample>>,
}

/// How many recent time-to-first-token samples [`Metrics::recent_ttft`] keeps.
pub const RECENT_TTFT: usize = 200;

/// One time-to-first-token observation, for plots.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TtftSample {
    /// Which cache served the prompt.
    pub cache: CacheOutcome,
    /// Seconds to the first token.
    pub secs: f64,
    /// When (Unix milliseconds).
    pub at_ms: u64,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The process-wide metrics (being phased out: each node owns an
/// `Arc<Metrics>` and hands it to its layers).
pub fn global() -> Arc<Metrics> {
    static GLOBAL: OnceLock<Arc<Metrics>> = OnceLock::new();
    GLOBAL.get_or_init(|| Arc::new(Metrics::new())).clone()
}

impl Metrics {
    /// A fresh, independent set of metrics (the node uses [`global()`]).
    pub fn new() -> Self {
        let mut m = Metrics {
            registry: Registry::with_prefix("shoal"),
            store_artifacts: Family::default(),
            store_bytes: Gauge::default(),
            store_quota: FGauge::default(),
            store_added: Counter::default(),
            store_evictions: Counter::default(),
            store_evicted_bytes: Counter::default(),
            fetches: Family::default(),
            fetch_bytes: Family::default(),
            fetch_seconds: Family::new_with_constructor(fetch_duration),
            bad_chunks: Family::default(),
            peer_bans: Counter::default(),
            peers_banned: Gauge::default(),
            peers_connected: Gauge::default(),
            kv_blocks: Family::default(),
            kv_bytes: Family::default(),
            kv_lookups: Family::default(),
            rc_lookups: Family::default(),
            rc_bytes: Gauge::default(),
            ttft: Family::new_with_constructor(ttft),
            tokens_per_second: Histogram::new(exponential_buckets(0.25, 2.0, 14)),
            tokens: Counter::default(),
            requests: Family::default(),
            queue_depth: Family::default(),
            recent_ttft: Mutex::new(VecDeque::with_capacity(RECENT_TTFT)),
        };
        m.store_quota.set(f64::INFINITY);
        // Label values that should show as zero before their first event.
        for s in [ArtifactState::Active, ArtifactState::Partial] {
            let _ = m.store_artifacts.get_or_create(&StatusLabel { status: s });
        }
        for source in Source::ALL {
            let _ = m.fetch_bytes.get_or_create(&SourceLabel { source });
            let _ = m.bad_chunks.get_or_create(&SourceLabel { source });
            let _ = m.fetches.get_or_create(&FetchLabels {
                source,
                outcome: Outcome::Ok,
            });
        }
        for tier in [Tier::Ram, Tier::Disk] {
            let _ = m.kv_blocks.get_or_create(&TierLabel { tier });
            let _ = m.kv_bytes.get_or_create(&TierLabel { tier });
            for result in [Lookup::Hit, Lookup::Miss] {
                let _ = m.kv_lookups.get_or_create(&KvLookupLabels { tier, result });
            }
        }
        for result in [Lookup::Hit, Lookup::Miss] {
            let _ = m.rc_lookups.get_or_create(&ResultLabel { result });
        }
        m.register();
        m
    }

    fn register(&mut self) {
        let r = &mut self.registry;
        r.register(
            "store_artifacts",
            "Artifacts in the content store, by status",
            self.store_artifacts.clone(),
        );
        r.register_with_unit(
            "store",
            "Bytes of artifacts in the content store (active and partial)",
            Unit::Bytes,
            self.store_bytes.clone(),
        );
        r.register_with_unit(
            "store_quota",
            "Byte quota of the content store (+Inf when unlimited)",
            Unit::Bytes,
            self.store_quota.clone(),
        );
        r.register_with_unit(
            "store_added",
            "Bytes of artifacts added to the store (local adds and completed downloads)",
            Unit::Bytes,
            self.store_added.clone(),
        );
        r.register(
            "store_evictions",
            "Artifacts evicted to stay within the quota",
            self.store_evictions.clone(),
        );
        r.register_with_unit(
            "store_evicted",
            "Bytes of artifacts evicted to stay within the quota",
            Unit::Bytes,
            self.store_evicted_bytes.clone(),
        );
        r.register(
            "chunk_fetches",
            "Chunk fetches by source (local dedupe, peer, origin) and outcome",
            self.fetches.clone(),
        );
        r.register_with_unit(
            "chunk_fetch",
            "Verified chunk bytes obtained, by source",
            Unit::Bytes,
            self.fetch_bytes.clone(),
        );
        r.register_with_unit(
            "chunk_fetch_duration",
            "Time to fetch one chunk, by source",
            Unit::Seconds,
            self.fetch_seconds.clone(),
        );
        r.register(
            "bad_chunks",
            "Chunks whose bytes did not match their hash, by source",
            self.bad_chunks.clone(),
        );
        r.register(
            "peer_bans",
            "Peers banned for serving bad chunks",
            self.peer_bans.clone(),
        );
        r.register(
            "peers_banned",
            "Peers currently banned",
            self.peers_banned.clone(),
        );
        r.register(
            "peers_connected",
            "Peers currently connected",
            self.peers_connected.clone(),
        );
        r.register(
            "kv_blocks",
            "KV-cache blocks held, by tier",
            self.kv_blocks.clone(),
        );
        r.register_with_unit(
            "kv",
            "Bytes of KV-cache blocks held, by tier",
            Unit::Bytes,
            self.kv_bytes.clone(),
        );
        r.register(
            "kv_lookups",
            "KV-cache block lookups, by tier and result",
            self.kv_lookups.clone(),
        );
        r.register(
            "response_cache_lookups",
            "Response-cache lookups, by result",
            self.rc_lookups.clone(),
        );
        r.register_with_unit(
            "response_cache",
            "Bytes of cached responses",
            Unit::Bytes,
            self.rc_bytes.clone(),
        );
        r.register_with_unit(
            "ttft",
            "Time to first token, by which cache served the prompt (miss = cold)",
            Unit::Seconds,
            self.ttft.clone(),
        );
        r.register(
            "generation_tokens_per_second",
            "Decoding speed of finished generations",
            self.tokens_per_second.clone(),
        );
        r.register("generated_tokens", "Tokens generated", self.tokens.clone());
        r.register(
            "requests",
            "Inference requests finished, by HTTP status",
            self.requests.clone(),
        );
        r.register(
            "queue_depth",
            "Requests waiting, by model",
            self.queue_depth.clone(),
        );
    }

    // ---- store ----

    /// The store's quota (`u64::MAX`: unlimited).
    pub fn store_quota(&self, bytes: u64) {
        self.store_quota.set(if bytes == u64::MAX {
            f64::INFINITY
        } else {
            bytes as f64
        });
    }

    /// Counts the artifacts of a store just opened (`(state, size)` of
    /// each), and sets its quota.
    pub fn store_opened(
        &self,
        quota_bytes: u64,
        artifacts: impl IntoIterator<Item = (ArtifactState, u64)>,
    ) {
        self.store_quota(quota_bytes);
        for (state, size) in artifacts {
            self.store_artifacts
                .get_or_create(&StatusLabel { status: state })
                .inc();
            self.store_bytes.inc_by(clamp(size));
        }
    }

    /// An artifact appeared in the store (added locally, or begun as a partial).
    pub fn store_added(&self, state: ArtifactState, bytes: u64) {
        self.store_artifacts
            .get_or_create(&StatusLabel { status: state })
            .inc();
        self.store_bytes.inc_by(clamp(bytes));
        if state == ArtifactState::Active {
            self.store_added.inc_by(bytes);
        }
    }

    /// A partial artifact became active (its download completed).
    pub fn store_activated(&self, bytes: u64) {
        self.store_artifacts
            .get_or_create(&StatusLabel {
                status: ArtifactState::Partial,
            })
            .dec();
        self.store_artifacts
            .get_or_create(&StatusLabel {
                status: ArtifactState::Active,
            })
            .inc();
        self.store_added.inc_by(bytes);
    }

    /// An artifact left the store.
    pub fn store_removed(&self, state: ArtifactState, bytes: u64) {
        self.store_artifacts
            .get_or_create(&StatusLabel { status: state })
            .dec();
        self.store_bytes.dec_by(clamp(bytes));
    }

    /// An artifact was evicted for the quota (also call [`Metrics::store_removed`]).
    pub fn store_evicted(&self, bytes: u64) {
        self.store_evictions.inc();
        self.store_evicted_bytes.inc_by(bytes);
    }

    // ---- mesh ----

    /// One chunk fetch finished: where from, how it ended, verified bytes, seconds taken.
    pub fn chunk_fetch(&self, source: Source, outcome: Outcome, bytes: u64, secs: f64) {
        self.fetches
            .get_or_create(&FetchLabels { source, outcome })
            .inc();
        if outcome == Outcome::Ok {
            self.fetch_bytes
                .get_or_create(&SourceLabel { source })
                .inc_by(bytes);
        }
        if outcome == Outcome::BadHash {
            self.bad_chunk(source);
        }
        self.fetch_seconds
            .get_or_create(&SourceLabel { source })
            .observe(secs);
    }

    /// A chunk failed its hash check (from the network, or on local disk with `Local`).
    pub fn bad_chunk(&self, source: Source) {
        self.bad_chunks.get_or_create(&SourceLabel { source }).inc();
    }

    /// A peer was banned; `currently_banned` is the number banned now.
    pub fn peer_banned(&self, currently_banned: usize) {
        self.peer_bans.inc();
        self.peers_banned.set(clamp(currently_banned as u64));
    }

    /// Number of peers banned right now (after bans expire).
    pub fn peers_banned(&self, n: usize) {
        self.peers_banned.set(clamp(n as u64));
    }

    /// Number of peers connected right now.
    pub fn peers_connected(&self, n: usize) {
        self.peers_connected.set(clamp(n as u64));
    }

    // ---- KV cache ----

    /// Blocks and bytes held in a tier right now.
    pub fn kv_usage(&self, tier: Tier, blocks: u64, bytes: u64) {
        self.kv_blocks
            .get_or_create(&TierLabel { tier })
            .set(clamp(blocks));
        self.kv_bytes
            .get_or_create(&TierLabel { tier })
            .set(clamp(bytes));
    }

    /// `n` block lookups in a tier that hit (or missed).
    pub fn kv_lookup(&self, tier: Tier, hit: bool, n: u64) {
        self.kv_lookups
            .get_or_create(&KvLookupLabels {
                tier,
                result: hit.into(),
            })
            .inc_by(n);
    }

    // ---- response cache ----

    /// One response-cache lookup.
    pub fn response_cache_lookup(&self, hit: bool) {
        self.rc_lookups
            .get_or_create(&ResultLabel { result: hit.into() })
            .inc();
    }

    /// Bytes held by the response cache right now.
    pub fn response_cache_bytes(&self, bytes: u64) {
        self.rc_bytes.set(clamp(bytes));
    }

    // ---- serving ----

    /// Time to first token of one request, and which cache served its prompt.
    pub fn ttft(&self, cache: CacheOutcome, secs: f64) {
        self.ttft.get_or_create(&CacheLabel { cache }).observe(secs);
        let at_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        if let Ok(mut q) = self.recent_ttft.lock() {
            if q.len() == RECENT_TTFT {
                q.pop_front();
            }
            q.push_back(TtftSample { cache, secs, at_ms });
        }
    }

    /// The latest time-to-first-token observations, oldest first.
    pub fn recent_ttft(&self) -> Vec<TtftSample> {
        self.recent_ttft
            .lock()
            .map(|q| q.iter().copied().collect())
            .unwrap_or_default()
    }

    /// A generation finished: `tokens` generated in `secs` of decoding.
    pub fn generation(&self, tokens: u64, secs: f64) {
        self.tokens.inc_by(tokens);
        if secs > 0.0 && tokens > 0 {
            self.tokens_per_second.observe(tokens as f64 / secs);
        }
    }

    /// A request finished with this HTTP status.
    pub fn request(&self, status: u16) {
        self.requests
            .get_or_create(&HttpStatusLabel {
                status: status.to_string(),
            })
            .inc();
    }

    /// Requests waiting for a model right now.
    pub fn queue_depth(&self, model: &str, n: usize) {
        self.queue_depth
            .get_or_create(&ModelLabel {
                model: model.to_owned(),
            })
            .set(clamp(n as u64));
    }

    // ---- output ----

    /// All metrics in the Prometheus text exposition format 0.0.4 ([`CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        let mut om = String::new();
        if prometheus_client::encoding::text::encode_registry(&mut om, &self.registry).is_err() {
            tracing::error!("encoding metrics failed");
        }
        openmetrics_to_prometheus(&om)
    }

    /// Totals for people (the dashboard, the quickstart's summary).
    pub fn summary(&self) -> Summary {
        let bytes_by_source = Source::ALL
            .iter()
            .map(|&source| {
                let b = self
                    .fetch_bytes
                    .get_or_create(&SourceLabel { source })
                    .get();
                (source, b)
            })
            .collect();
        let count = |source, outcome| {
            self.fetches
                .get_or_create(&FetchLabels { source, outcome })
                .get()
        };
        let fetches_ok = Source::ALL.iter().map(|&s| count(s, Outcome::Ok)).sum();
        let fetches_failed = Source::ALL
            .iter()
            .map(|&s| {
                count(s, Outcome::BadHash) + count(s, Outcome::Failed) + count(s, Outcome::Timeout)
            })
            .sum();
        let kv = |tier| {
            let get = |hit: bool| {
                self.kv_lookups
                    .get_or_create(&KvLookupLabels {
                        tier,
                        result: hit.into(),
                    })
                    .get()
            };
            HitRatio::new(get(true), get(false))
        };
        let rc = |hit: bool| {
            self.rc_lookups
                .get_or_create(&ResultLabel { result: hit.into() })
                .get()
        };
        Summary {
            bytes_by_source,
            fetches_ok,
            fetches_failed,
            kv_ram: kv(Tier::Ram),
            kv_disk: kv(Tier::Disk),
            response_cache: HitRatio::new(rc(true), rc(false)),
            store_bytes: u64::try_from(self.store_bytes.get()).unwrap_or(0),
            store_quota: {
                let q = self.store_quota.get();
                q.is_finite().then_some(q as u64)
            },
            peers_connected: u64::try_from(self.peers_connected.get()).unwrap_or(0),
        }
    }
}

/// Hits and misses of one cache layer.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct HitRatio {
    /// Hits.
    pub hits: u64,
    /// Misses.
    pub misses: u64,
    /// hits / (hits + misses); `None` before the first lookup.
    pub ratio: Option<f64>,
}

impl HitRatio {
    fn new(hits: u64, misses: u64) -> Self {
        let total = hits + misses;
        HitRatio {
            hits,
            misses,
            ratio: (total > 0).then(|| hits as f64 / total as f64),
        }
    }
}

/// A summary of the counters for people.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    /// Verified chunk bytes obtained from each source.
    pub bytes_by_source: Vec<(Source, u64)>,
    /// Chunk fetches that succeeded.
    pub fetches_ok: u64,
    /// Chunk fetches that failed (bad hash, error, timeout).
    pub fetches_failed: u64,
    /// KV cache, RAM tier.
    pub kv_ram: HitRatio,
    /// KV cache, disk tier.
    pub kv_disk: HitRatio,
    /// Response cache.
    pub response_cache: HitRatio,
    /// Bytes in the content store.
    pub store_bytes: u64,
    /// Store quota; `None` when unlimited.
    pub store_quota: Option<u64>,
    /// Peers connected.
    pub peers_connected: u64,
}

fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Rewrites prometheus-client's OpenMetrics text as Prometheus text 0.0.4:
/// counters' HELP/TYPE lines take the `_total` name their samples carry,
/// and the OpenMetrics-only `# UNIT` and `# EOF` lines go.
fn openmetrics_to_prometheus(om: &str) -> String {
    let mut out = String::with_capacity(om.len());
    let lines: Vec<&str> = om.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if line.starts_with("# UNIT ") || *line == "# EOF" {
            continue;
        }
        let rename = |rest: &str, kind: &str| -> Option<String> {
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            let is_counter = if kind == "TYPE" {
                tail == "counter"
            } else {
                // A HELP line: look ahead for its TYPE line.
                lines[i + 1..]
                    .iter()
                    .take(3)
                    .any(|l| *l == format!("# TYPE {name} counter"))
            };
            (is_counter && !name.ends_with("_total")).then(|| {
                format!("# {kind} {name}_total {tail}")
                    .trim_end()
                    .to_owned()
            })
        };
        let rewritten = if !line.starts_with('#') {
            // Prometheus spells infinities +Inf/-Inf.
            line.strip_suffix(" inf")
                .map(|l| format!("{l} +Inf"))
                .or_else(|| line.strip_suffix(" -inf").map(|l| format!("{l} -Inf")))
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            rename(rest, "TYPE")
        } else if let Some(rest) = line.strip_prefix("# HELP ") {
            rename(rest, "HELP")
        } else {
            None
        };
        out.push_str(rewritten.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of a sample line `name{labels} value`, by exact name-and-labels prefix.
    pub(crate) fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn counters_move_with_events() {
        let m = Metrics::new();
        let before = m.render();
        assert_eq!(
            sample(&before, "shoal_chunk_fetch_bytes_total{source=\"peer\"}"),
            Some(0.0)
        );
        assert_eq!(
            sample(&before, "shoal_store_quota_bytes"),
            Some(f64::INFINITY)
        );
        m.chunk_fetch(Source::Peer, Outcome::Ok, 1000, 0.02);
        m.chunk_fetch(Source::Peer, Outcome::Ok, 500, 0.01);
        m.chunk_fetch(Source::Origin, Outcome::BadHash, 0, 0.5);
        m.chunk_fetch(Source::Local, Outcome::Ok, 7, 0.0001);
        m.peer_banned(1);
        m.peers_connected(2);
        m.store_quota(1 << 30);
        m.store_added(ArtifactState::Partial, 4096);
        m.store_activated(4096);
        m.store_added(ArtifactState::Active, 100);
        m.store_removed(ArtifactState::Active, 100);
        m.store_evicted(100);
        m.kv_usage(Tier::Ram, 3, 3 << 20);
        m.kv_lookup(Tier::Ram, true, 5);
        m.kv_lookup(Tier::Ram, false, 5);
        m.response_cache_lookup(true);
        m.ttft(CacheOutcome::Miss, 1.5);
        m.ttft(CacheOutcome::Kv, 0.05);
        m.generation(40, 2.0);
        m.request(200);
        m.queue_depth("smollm2:q4_1", 2);
        let t = m.render();
        let v = |s: &str| sample(&t, s);
        assert_eq!(
            v("shoal_chunk_fetches_total{source=\"peer\",outcome=\"ok\"}"),
            Some(2.0)
        );
        assert_eq!(
            v("shoal_chunk_fetch_bytes_total{source=\"peer\"}"),
            Some(1500.0)
        );
        assert_eq!(
            v("shoal_chunk_fetch_bytes_total{source=\"local\"}"),
            Some(7.0)
        );
        assert_eq!(
            v("shoal_chunk_fetch_bytes_total{source=\"origin\"}"),
            Some(0.0)
        );
        assert_eq!(v("shoal_bad_chunks_total{source=\"origin\"}"), Some(1.0));
        assert_eq!(
            v("shoal_chunk_fetch_duration_seconds_count{source=\"peer\"}"),
            Some(2.0)
        );
        assert_eq!(v("shoal_peer_bans_total"), Some(1.0));
        assert_eq!(v("shoal_peers_connected"), Some(2.0));
        assert_eq!(v("shoal_store_quota_bytes"), Some((1u64 << 30) as f64));
        assert_eq!(v("shoal_store_artifacts{status=\"active\"}"), Some(1.0));
        assert_eq!(v("shoal_store_artifacts{status=\"partial\"}"), Some(0.0));
        assert_eq!(v("shoal_store_bytes"), Some(4096.0));
        assert_eq!(v("shoal_store_added_bytes_total"), Some(4196.0));
        assert_eq!(v("shoal_store_evictions_total"), Some(1.0));
        assert_eq!(v("shoal_kv_bytes{tier=\"ram\"}"), Some((3u64 << 20) as f64));
        assert_eq!(
            v("shoal_kv_lookups_total{tier=\"ram\",result=\"hit\"}"),
            Some(5.0)
        );
        assert_eq!(
            v("shoal_response_cache_lookups_total{result=\"hit\"}"),
            Some(1.0)
        );
        assert_eq!(v("shoal_ttft_seconds_count{cache=\"miss\"}"), Some(1.0));
        assert_eq!(v("shoal_ttft_seconds_sum{cache=\"kv\"}"), Some(0.05));
        assert_eq!(v("shoal_generated_tokens_total"), Some(40.0));
        assert_eq!(v("shoal_requests_total{status=\"200\"}"), Some(1.0));
        assert_eq!(v("shoal_queue_depth{model=\"smollm2:q4_1\"}"), Some(2.0));
        // Counter HELP/TYPE lines carry the sample names.
        assert!(
            t.contains("# TYPE shoal_chunk_fetches_total counter\n"),
            "{t}"
        );
        assert!(t.contains("# HELP shoal_chunk_fetches_total "), "{t}");
        assert!(!t.contains("# EOF") && !t.contains("# UNIT"));
        let s = m.summary();
        assert_eq!(s.bytes_by_source[1], (Source::Peer, 1500));
        assert_eq!(s.fetches_ok, 3);
        assert_eq!(s.fetches_failed, 1);
        assert_eq!(s.kv_ram.ratio, Some(0.5));
        assert_eq!(s.kv_disk.ratio, None);
        assert_eq!(s.store_quota, Some(1 << 30));
        let recent = m.recent_ttft();
        assert_eq!(recent.len(), 2);
        assert_eq!((recent[0].cache, recent[0].secs), (CacheOutcome::Miss, 1.5));
        for i in 0..RECENT_TTFT {
            m.ttft(CacheOutcome::Response, i as f64);
        }
        let recent = m.recent_ttft();
        assert_eq!(recent.len(), RECENT_TTFT);
        assert_eq!(recent[RECENT_TTFT - 1].secs, (RECENT_TTFT - 1) as f64);
    }
}
