//! The fetching side: a multi-peer, verified, resumable chunk downloader.
//!
//! 1. The manifest comes from the store (resume) or from any peer; it verifies
//!    itself against the id.
//! 2. `Store::begin` registers the artifact and copies chunks already present
//!    in any local artifact (local dedupe) or verified before a restart (resume).
//! 3. Sources are learnt from connected peers, Kademlia providers and have
//!    announcements; each source gets up to `window` pipelined requests
//!    (`fast_window` once it is fast), each on its own chunk stream.
//! 4. Each request picks the rarest missing chunk the source holds (ties broken
//!    uniformly at random, so downloaders spread out; from a seed, this node's
//!    share of the chunks only the seed holds comes first). When every missing
//!    chunk is in flight, idle sources duplicate the oldest late request (endgame).
//! 5. Every chunk is hashed by `Store::put_chunk` before it is written. A source
//!    that sends a bad chunk is dropped and banned; the chunk goes back to the
//!    pool. A peer that keeps failing is paused, then asked again.
//! 6. New chunks are made durable and pushed to the fellow downloaders (the
//!    partial sources) as have-maps every `announce_every`.
//! 7. Chunks no peer holds may come from the release's origin over HTTP Range
//!    requests, unless the node is offline.
//!
//! Layout: `sched` is the pure scheduler (which chunk from which source; no
//! IO, the time passed in), `driver` the async IO around it, `manifest`
//! the manifest discovery, and `registry` the running downloads
//! ([`Downloads`]).

mod driver;
mod manifest;
mod prefix;
mod registry;
mod sched;

pub use driver::{FindDeadline, MAX_FIND_TIMEOUT, download, download_until};
pub use prefix::{Prefix, fetch_prefix};
pub use registry::{Downloads, KEEP_FINISHED};

use crate::store::{ArtifactId, StoreError};
use libp2p::PeerId;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::time::Duration;

/// Download tuning.
#[derive(Debug, Clone)]
pub struct DownloadOptions {
    /// Requests in flight per peer (each on its own stream).
    pub window: usize,
    /// Requests in flight per peer once that peer delivers at least
    /// [`DownloadOptions::fast_rate`]: on a fast link the time per chunk is
    /// mostly processing at both ends, and more requests keep both busy; on
    /// a slow link `window` already fills it, and more would only delay each
    /// chunk's completion, and so its announcement to the swarm.
    pub fast_window: usize,
    /// Bytes per second from one peer above which it gets `fast_window`.
    pub fast_rate: f64,
    /// Requests in flight to the origin.
    pub origin_window: usize,
    /// Failures (timeouts, resets) in a row, with no chunk delivered between
    /// them, before a source is paused. A peer is paused for `pause` (doubled
    /// at each further pause, up to `max_pause`) and then asked again; the
    /// origin is dropped from the download.
    pub max_failures: u32,
    /// First pause of a peer after `max_failures` failures in a row.
    pub pause: Duration,
    /// Longest pause of a peer.
    pub max_pause: Duration,
    /// How long to look for a first source of the manifest.
    pub find_timeout: Duration,
    /// Fail when no chunk arrived for this long.
    pub stall_timeout: Duration,
    /// Per-chunk request timeout.
    pub request_timeout: Duration,
    /// Have announcements are sent at most this often.
    pub announce_every: Duration,
    /// Ask a second source for the last chunks.
    pub endgame: bool,
    /// The origin is not used during the first moments of a download (to hear
    /// from other downloaders and split the origin's chunks with them).
    pub origin_delay: Duration,
    /// A chunk another downloader should fetch from the origin is fetched here
    /// anyway when no chunk arrived for this long.
    pub origin_grace: Duration,
}

impl Default for DownloadOptions {
    fn default() -> Self {
        Self {
            window: 4,
            fast_window: 8,
            // Three times a 100 Mbit/s link: LAN swarms stay at `window`.
            fast_rate: 40e6,
            origin_window: 4,
            max_failures: 8,
            pause: Duration::from_secs(2),
            max_pause: Duration::from_secs(30),
            find_timeout: Duration::from_secs(30),
            stall_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(30),
            announce_every: Duration::from_millis(250),
            endgame: true,
            origin_delay: Duration::from_secs(1),
            origin_grace: Duration::from_secs(10),
        }
    }
}

/// Where a download stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Phase {
    /// Looking for the manifest.
    #[default]
    Finding,
    /// Fetching chunks.
    Fetching,
    /// Activated.
    Done,
    /// Gave up (see `error`).
    Failed,
}

impl Phase {
    /// Done or failed: nothing more will happen to this download.
    pub fn is_final(self) -> bool {
        matches!(self, Phase::Done | Phase::Failed)
    }
}

/// Live progress of one download (served by `/admin/pull/{id}`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Progress {
    /// Artifact id (hex).
    pub id: String,
    /// Phase.
    pub phase: Phase,
    /// File size.
    pub total_bytes: u64,
    /// Bytes verified and present.
    pub have_bytes: u64,
    /// Chunk count.
    pub total_chunks: u32,
    /// Chunks present.
    pub have_chunks: u32,
    /// Chunks that were already local (resume or dedupe) when the download began.
    pub local_chunks: u32,
    /// Bytes of those chunks.
    pub local_bytes: u64,
    /// Sources currently serving this download.
    pub peers: usize,
    /// Verified bytes received from peers.
    pub bytes_from_peers: u64,
    /// Verified bytes received from the origin.
    pub bytes_from_origin: u64,
    /// Chunks that failed verification (each got its sender banned).
    pub bad_chunks: u32,
    /// Chunks received twice (endgame).
    pub duplicate_chunks: u32,
    /// Peers banned during this download.
    pub banned: Vec<String>,
    /// Milliseconds since the download began.
    pub elapsed_ms: u64,
    /// Why it failed.
    pub error: Option<String>,
    /// While finding the manifest: the peers connected at the last round
    /// (`Some(0)`: waiting for peers to appear; `None`: not asked yet).
    #[serde(default)]
    pub connected: Option<usize>,
}

/// Per-source figures.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SourceStats {
    /// Verified bytes received.
    pub bytes: u64,
    /// Verified chunks received.
    pub chunks: u32,
    /// Timeouts, resets, refusals.
    pub failures: u32,
    /// Times the source was paused after failures in a row.
    #[serde(default)]
    pub pauses: u32,
    /// Chunks that failed verification.
    pub bad: u32,
    /// Score: verified bytes per second of request time.
    pub rate: f64,
}

/// What a finished download did.
#[derive(Debug, Clone, Default)]
pub struct DownloadReport {
    /// The artifact.
    pub id: Option<ArtifactId>,
    /// Chunk indexes fetched over the network, in completion order.
    pub fetched: Vec<u32>,
    /// Figures per peer.
    pub peers: HashMap<PeerId, SourceStats>,
    /// Figures for the origin.
    pub origin: SourceStats,
    /// Final progress.
    pub progress: Progress,
}

/// The progress of a download of `id` before anything is fetched: the
/// chunks a previous, interrupted download left (resume) are counted, so
/// the first report of a resumed pull does not say 0 bytes.
pub fn initial_progress(
    store: &crate::store::Store,
    id: &ArtifactId,
) -> Result<Progress, StoreError> {
    let mut p = Progress {
        id: id.to_hex(),
        ..Progress::default()
    };
    if let Some(m) = store.manifest(id)?
        && let Some(have) = store.have_map(id)?
        && have.len() == m.chunk_count()
    {
        p.total_bytes = m.size;
        p.total_chunks = m.chunk_count();
        p.have_chunks = have.count();
        p.have_bytes = have
            .present()
            .filter_map(|i| m.chunks.get(i as usize))
            .map(|c| u64::from(c.len))
            .sum();
        p.local_chunks = p.have_chunks;
        p.local_bytes = p.have_bytes;
    }
    Ok(p)
}
