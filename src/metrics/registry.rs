//! The metric families: the [`Metrics`] registry, its constructor, and the
//! typed event calls every layer reports through.

use super::labels::{
    CacheLabel, FetchLabels, HttpStatusLabel, KvLookupLabels, ModelLabel, ResultLabel, RouteLabels,
    SourceLabel, StatusLabel, TierLabel,
};
use super::summary::{RECENT_TTFT, TtftSample};
use super::{
    ArtifactState, CacheOutcome, Lookup, Outcome, RouteOutcome, RouteReason, Source, Tier,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

type FGauge = Gauge<f64, AtomicU64>;

fn fetch_duration() -> Histogram {
    // 1 ms … ~33 s
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

fn ttft() -> Histogram {
    // 10 ms … ~164 s
    Histogram::new(exponential_buckets(0.01, 2.0, 15))
}

/// The registry and a handle on every metric family.
pub struct Metrics {
    pub(super) registry: Registry,
    // store
    pub(super) store_artifacts: Family<StatusLabel, Gauge>,
    pub(super) store_bytes: Gauge,
    pub(super) store_quota: FGauge,
    pub(super) store_added: Counter,
    pub(super) store_evictions: Counter,
    pub(super) store_evicted_bytes: Counter,
    // mesh
    pub(super) fetches: Family<FetchLabels, Counter>,
    pub(super) fetch_bytes: Family<SourceLabel, Counter>,
    pub(super) fetch_seconds: Family<SourceLabel, Histogram, fn() -> Histogram>,
    pub(super) bad_chunks: Family<SourceLabel, Counter>,
    pub(super) peer_bans: Counter,
    pub(super) peers_banned: Gauge,
    pub(super) peers_connected: Gauge,
    pub(super) peers_known: Gauge,
    pub(super) connections_closed: Counter,
    pub(super) connections_opened: Counter,
    pub(super) connections_refused: Counter,
    // kv
    pub(super) kv_blocks: Family<TierLabel, Gauge>,
    pub(super) kv_bytes: Family<TierLabel, Gauge>,
    pub(super) kv_lookups: Family<KvLookupLabels, Counter>,
    pub(super) kv_disk_written: Counter,
    pub(super) kv_disk_skipped: Counter,
    // response cache
    pub(super) rc_lookups: Family<ResultLabel, Counter>,
    pub(super) rc_bytes: Gauge,
    // serving
    pub(super) ttft: Family<CacheLabel, Histogram, fn() -> Histogram>,
    pub(super) tokens_per_second: Histogram,
    pub(super) tokens: Counter,
    pub(super) requests: Family<HttpStatusLabel, Counter>,
    pub(super) queue_depth: Family<ModelLabel, Gauge>,
    // routing
    pub(super) route_requests: Family<RouteLabels, Counter>,
    pub(super) route_cards: Gauge,
    pub(super) recent_ttft: Mutex<VecDeque<TtftSample>>,
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

impl Metrics {
    /// A fresh, independent set of metrics (each node owns one).
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
            peers_known: Gauge::default(),
            connections_closed: Counter::default(),
            connections_opened: Counter::default(),
            connections_refused: Counter::default(),
            kv_blocks: Family::default(),
            kv_bytes: Family::default(),
            kv_lookups: Family::default(),
            kv_disk_written: Counter::default(),
            kv_disk_skipped: Counter::default(),
            rc_lookups: Family::default(),
            rc_bytes: Gauge::default(),
            ttft: Family::new_with_constructor(ttft),
            tokens_per_second: Histogram::new(exponential_buckets(0.25, 2.0, 14)),
            tokens: Counter::default(),
            requests: Family::default(),
            queue_depth: Family::default(),
            route_requests: Family::default(),
            route_cards: Gauge::default(),
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

    // long: (~120 lines) a declarative list, one registration per family.
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
            "peers_known",
            "Peers discovered (mDNS, Kademlia, static), connected or not",
            self.peers_known.clone(),
        );
        r.register(
            "connections_trimmed",
            "Connections the connection manager closed (idle, or above its bound)",
            self.connections_closed.clone(),
        );
        r.register(
            "connections_opened",
            "Mesh connections established (after the secure handshake), either direction",
            self.connections_opened.clone(),
        );
        r.register(
            "connections_refused",
            "Incoming mesh connections refused at the connection bound",
            self.connections_refused.clone(),
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
        r.register_with_unit(
            "kv_disk_written",
            "Bytes of KV-cache block files written to the disk tier",
            Unit::Bytes,
            self.kv_disk_written.clone(),
        );
        r.register(
            "kv_disk_writes_skipped",
            "KV-cache blocks kept in RAM only because the disk tier's hourly write budget was spent",
            self.kv_disk_skipped.clone(),
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
        r.register(
            "route_requests",
            "Generation requests routed, by outcome and reason",
            self.route_requests.clone(),
        );
        r.register(
            "route_cards",
            "Fresh serving cards of peers held",
            self.route_cards.clone(),
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

    /// Peers discovered, connected or not.
    pub fn peers_known(&self, n: usize) {
        self.peers_known.set(clamp(n as u64));
    }

    /// The connection manager closed `n` connections.
    pub fn connections_trimmed(&self, n: usize) {
        self.connections_closed.inc_by(n as u64);
    }

    /// A mesh connection was established.
    pub fn connection_opened(&self) {
        self.connections_opened.inc();
    }

    /// An incoming mesh connection was refused at the connection bound.
    pub fn connection_refused(&self) {
        self.connections_refused.inc();
    }

    /// Connections opened, refused at the bound, and trimmed so far: a
    /// bounded mesh's churn.
    pub fn connection_counts(&self) -> (u64, u64, u64) {
        (
            self.connections_opened.get(),
            self.connections_refused.get(),
            self.connections_closed.get(),
        )
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

    /// A KV block file of `bytes` bytes written to the disk tier.
    pub fn kv_disk_written(&self, bytes: u64) {
        self.kv_disk_written.inc_by(bytes);
    }

    /// A KV block not written to disk: the hourly write budget was spent.
    pub fn kv_disk_write_skipped(&self) {
        self.kv_disk_skipped.inc();
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
}

impl Metrics {
    // ---- routing ----

    /// A routed request's outcome.
    pub fn route_request(&self, outcome: RouteOutcome, reason: RouteReason) {
        self.route_requests
            .get_or_create(&RouteLabels { outcome, reason })
            .inc();
    }

    /// Fresh serving cards held.
    pub fn route_cards(&self, n: usize) {
        self.route_cards.set(clamp(n as u64));
    }
}

fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}
