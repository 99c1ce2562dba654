//! Totals for people: the [`Summary`] the dashboard and the quickstart show,
//! and the recent time-to-first-token samples they plot.

use super::labels::{FetchLabels, KvLookupLabels, ResultLabel, SourceLabel};
use super::{CacheOutcome, Metrics, Outcome, Source, Tier};
use serde::Serialize;

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

impl Metrics {
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
