//! Prometheus metrics, one set per node.
//!
//! Each node owns an `Arc<`[`Metrics`]`>` and hands it to its layers, which
//! report through typed calls on it (plain numbers and label enums; they
//! know nothing of rendering);
//! `GET /metrics` serves [`Metrics::render`] in the Prometheus text exposition
//! format (version 0.0.4). Names follow Prometheus conventions: a `shoal_`
//! prefix, `_total` on counters, base units (`_bytes`, `_seconds`) in names.
//!
//! | layer | families |
//! | --- | --- |
//! | store | `shoal_store_artifacts{status}`, `shoal_store_bytes`, `shoal_store_quota_bytes`, `shoal_store_added_bytes_total`, `shoal_store_evictions_total`, `shoal_store_evicted_bytes_total` |
//! | mesh | `shoal_chunk_fetches_total{source,outcome}`, `shoal_chunk_fetch_bytes_total{source}`, `shoal_chunk_fetch_duration_seconds{source}`, `shoal_bad_chunks_total{source}`, `shoal_peer_bans_total`, `shoal_peers_banned`, `shoal_peers_connected`, `shoal_peers_known`, `shoal_connections_trimmed_total` |
//! | KV cache | `shoal_kv_blocks{tier}`, `shoal_kv_bytes{tier}`, `shoal_kv_lookups_total{tier,result}`, `shoal_kv_disk_written_bytes_total`, `shoal_kv_disk_writes_skipped_total` |
//! | response cache | `shoal_response_cache_lookups_total{result}`, `shoal_response_cache_bytes` |
//! | serving | `shoal_ttft_seconds{cache}`, `shoal_generation_tokens_per_second`, `shoal_generated_tokens_total`, `shoal_requests_total{status}`, `shoal_queue_depth{model}` |
//!
//! Sources of chunk bytes: `local` (deduplicated from another artifact in
//! this node's store), `peer` (the mesh), `origin` (an origin URL).//!
//! Layout: `labels` holds the label values and label sets, `registry` the
//! families and the event calls, `render` the text exposition, and
//! `summary` the totals for people. The module imports nothing from the
//! rest of the crate.

mod labels;
mod registry;
mod render;
mod summary;

pub use labels::{
    ArtifactState, CacheOutcome, Lookup, Outcome, RouteOutcome, RouteReason, Source, Tier,
};
pub use registry::Metrics;
pub use render::CONTENT_TYPE;
pub use summary::{HitRatio, RECENT_TTFT, Summary, TtftSample};

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
        m.peers_known(5);
        m.connections_trimmed(3);
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
        assert_eq!(v("shoal_peers_known"), Some(5.0));
        assert_eq!(v("shoal_connections_trimmed_total"), Some(3.0));
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

/// The `[metrics]` section of the configuration file. (Its settings are
/// described in `crate::settings`: this module imports nothing from the crate.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
