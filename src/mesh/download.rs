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

use super::client::{Client, MeshEvent};
use super::origin::Origin;
use super::wire::{self, ChunkRequest, ChunkStatus};
use super::{MeshError, blocking};
use crate::store::{ArtifactId, ArtifactStatus, HaveMap, Manifest, StoreError};
use futures::{AsyncReadExt, AsyncWriteExt};
use libp2p::{PeerId, Stream};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{Notify, broadcast, watch};

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

/// A source of chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Source {
    Peer(PeerId),
    Origin,
}

enum Pick {
    Chunk(u32),
    Wait,
    Stop,
}

enum Outcome {
    Ok {
        len: u64,
        took: Duration,
    },
    Bad,
    NotFound,
    Failed,
    /// A fresh stream was dropped by the peer before it answered (see
    /// [`FetchError::Refused`]): asked again, not held against the peer.
    Refused,
}

struct SourceState {
    have: HaveMap,
    stopped: bool,
    /// Failures since its last delivered chunk.
    strikes: u32,
    /// Not asked before this (a pause after failures in a row).
    paused_until: Option<Instant>,
    running: bool,
    stats: SourceStats,
    busy: Duration,
    /// When its workers started (for its delivered rate).
    since: Instant,
}

struct Sched {
    have: HaveMap,
    /// `inflight[i]`: the sources chunk `i` is requested from (indexed by
    /// chunk, so the pick scan tests a slot, not a map).
    inflight: Vec<Vec<Source>>,
    /// Chunks with at least one request in flight.
    inflight_chunks: u32,
    /// `asked_at[i]`: when chunk `i`'s first request in flight was sent.
    asked_at: Vec<Instant>,
    /// Mean time of a verified chunk request to a peer (moving average, s).
    took_avg: f64,
    avail: Vec<u32>,
    sources: HashMap<Source, SourceState>,
    fetched: Vec<u32>,
    progress: Progress,
    finished: bool,
    failed: Option<String>,
    /// The store reported a full disk (the download stops with that error).
    disk_full: Option<String>,
    last_chunk: Instant,
    started: Instant,
    endgame: bool,
    max_failures: u32,
    pause: Duration,
    max_pause: Duration,
    /// This node.
    me: PeerId,
    /// Peers downloading this artifact that may fetch from the origin.
    origin_peers: std::collections::BTreeSet<PeerId>,
    /// The origin is not used before this (time to hear from other downloaders).
    origin_after: Instant,
    /// A chunk assigned to another origin peer may be fetched here after this long without progress.
    origin_grace: Duration,
    /// State of the xorshift generator that breaks ties between equally rare chunks.
    rng: u64,
    /// The downloaders of this artifact this node knows (itself and every
    /// source with a partial have-map), sorted: a chunk that only a seed
    /// holds is fetched from it first by its owner among them (see
    /// [`Sched::is_my_share`]).
    sharers: Vec<PeerId>,
    /// This node's place in `sharers`.
    my_share: usize,
}

/// A random non-zero seed (the process's hash keys and the time).
fn random_seed() -> u64 {
    std::collections::hash_map::RandomState::new().hash_one(Instant::now()) | 1
}

impl Sched {
    /// Recomputes [`Sched::sharers`] from the live sources' have-maps.
    fn update_sharers(&mut self) {
        let mut v: Vec<PeerId> = self
            .sources
            .iter()
            .filter_map(|(k, s)| match k {
                Source::Peer(p) if !s.stopped && !s.have.is_complete() => Some(*p),
                _ => None,
            })
            .chain(std::iter::once(self.me))
            .collect();
        v.sort_unstable();
        v.dedup();
        self.my_share = v.iter().position(|p| *p == self.me).unwrap_or(0);
        self.sharers = v;
    }

    /// Whether chunk `i` is this node's to fetch from a seed while no other
    /// peer holds it. Seeds (complete sources) hold every chunk, and their
    /// uplink is a swarm's bottleneck: downloaders that choose at random
    /// among the chunks only a seed holds ask it for the same chunk before
    /// either has announced it, and the seed sends it twice. Split among the
    /// downloaders (the same hash on every node), each chunk leaves the seed
    /// once; a downloader takes another's share only when its own is all in
    /// flight or done, so no chunk waits for a slow or unknown owner.
    fn is_my_share(&self, i: u32) -> bool {
        let k = self.sharers.len().max(1) as u64;
        let slot = (u64::from(i).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 23) % k;
        slot as usize == self.my_share
    }

    /// The other downloaders this node knows: where its have-map is pushed.
    fn fellow_downloaders(&self) -> Vec<PeerId> {
        self.sharers
            .iter()
            .copied()
            .filter(|p| *p != self.me)
            .collect()
    }

    fn missing(&self) -> u32 {
        self.have.len() - self.have.count()
    }

    fn add_source(&mut self, src: Source, have: HaveMap) -> bool {
        if have.len() != self.have.len() {
            return false;
        }
        match self.sources.get_mut(&src) {
            Some(s) => {
                if s.stopped {
                    return false;
                }
                if src != Source::Origin {
                    for i in 0..have.len() {
                        match (s.have.get(i), have.get(i)) {
                            (false, true) => self.avail[i as usize] += 1,
                            (true, false) => self.avail[i as usize] -= 1,
                            _ => {}
                        }
                    }
                }
                s.have = have;
            }
            None => {
                if src != Source::Origin {
                    for i in have.present() {
                        self.avail[i as usize] += 1;
                    }
                }
                self.sources.insert(
                    src,
                    SourceState {
                        have,
                        stopped: false,
                        strikes: 0,
                        paused_until: None,
                        running: false,
                        stats: SourceStats::default(),
                        busy: Duration::ZERO,
                        since: Instant::now(),
                    },
                );
            }
        }
        self.update_sharers();
        // Start workers when this source holds something we miss.
        let useful = self
            .sources
            .get(&src)
            .is_some_and(|s| s.have.present().any(|i| !self.have.get(i)));
        match self.sources.get_mut(&src) {
            Some(s) if useful && !s.running => {
                s.running = true;
                true
            }
            _ => false,
        }
    }

    fn stop_source(&mut self, src: Source) {
        if let Source::Peer(p) = src {
            self.origin_peers.remove(&p);
        }
        if let Some(s) = self.sources.get_mut(&src)
            && !s.stopped
        {
            s.stopped = true;
            if src != Source::Origin {
                for i in s.have.present() {
                    self.avail[i as usize] -= 1;
                }
            }
        }
        self.update_sharers();
    }

    /// Whether `src` has delivered at least `rate` bytes/s since it was added
    /// (and for at least 250 ms, so one quick chunk does not count).
    fn is_fast(&self, src: Source, rate: f64) -> bool {
        self.sources.get(&src).is_some_and(|s| {
            let t = s.since.elapsed().as_secs_f64();
            t >= 0.25 && s.stats.bytes as f64 / t >= rate
        })
    }

    /// Whether [`Sched::pick`] would answer `Stop` for `src` (done, failed, or source stopped).
    fn pick_would_stop(&self, src: Source) -> bool {
        self.finished || self.failed.is_some() || self.sources.get(&src).is_none_or(|s| s.stopped)
    }

    /// Whether `src` is in a pause after failures in a row.
    fn is_paused(&self, src: Source) -> bool {
        self.sources
            .get(&src)
            .and_then(|s| s.paused_until)
            .is_some_and(|t| Instant::now() < t)
    }

    fn pick(&mut self, src: Source) -> Pick {
        if self.pick_would_stop(src) {
            return Pick::Stop;
        }
        if self.is_paused(src) {
            return Pick::Wait;
        }
        let Some(s) = self.sources.get(&src) else {
            return Pick::Stop;
        };
        let n = self.have.len();
        if n == 0 {
            return Pick::Stop;
        }
        let origin_ok = Instant::now() >= self.origin_after;
        let stalled = self.last_chunk.elapsed() >= self.origin_grace;
        // Rarest first; among the equally rare, one chosen uniformly at
        // random. Uniformly, not "the first free one from some place": such
        // walks put downloaders in step (the next free chunk after a run of
        // taken ones is the same for all of them), so they ask a seeder for
        // the same chunks and its uplink (the swarm's bottleneck) sends them
        // twice. First a few uniform random probes: a probed chunk as rare as
        // any can be (only this source has it; for the origin, no peer has
        // it) is a uniform choice among those, found without a pass over
        // every chunk. Otherwise a full pass samples the rarest (reservoir).
        let floor = match src {
            Source::Origin => 0,
            Source::Peer(_) => 1,
        };
        // Rank: twice the holders. From a seed, a chunk no one else holds
        // is ranked by whose share it is: this node's own first, then the
        // others' (after every chunk as rare, before any chunk held twice).
        let seed = src != Source::Origin && s.have.is_complete() && self.sharers.len() > 1;
        let free = |this: &Self, i: u32| this.inflight[i as usize].is_empty() && !this.have.get(i);
        // The holders of a free chunk `i`, if this source may be asked for it.
        let eligible = |this: &Self, i: u32| -> Option<u32> {
            let a = this.avail[i as usize];
            // The origin only serves chunks no live peer holds, split among
            // the downloaders that may use it (each byte leaves the origin once).
            let ok = match src {
                Source::Origin => {
                    a == 0 && origin_ok && (stalled || this.origin_owner(i) == this.me)
                }
                Source::Peer(_) => s.have.get(i),
            };
            let others = seed && a <= 1 && !this.is_my_share(i);
            ok.then_some(2 * a + u32::from(others))
        };
        for _ in 0..PICK_PROBES {
            let i = (xorshift(&mut self.rng) % u64::from(n)) as u32;
            if free(self, i) && eligible(self, i).is_some_and(|r| r <= 2 * floor) {
                return self.take(i, src);
            }
        }
        let mut best: Option<(u32, u32)> = None;
        let mut ties = 0u64;
        // A missing chunk no request is out for (from any source).
        let unassigned = self.missing() > self.inflight_chunks;
        // Only what this source holds and this node lacks, a byte of the
        // maps at a time: most of a late download's chunks are skipped.
        for i in s.have.present_not_in(&self.have) {
            if !self.inflight[i as usize].is_empty() {
                continue;
            }
            let Some(a) = eligible(self, i) else {
                continue;
            };
            match best {
                Some((_, b)) if a > b => {}
                Some((_, b)) if a == b => {
                    ties += 1;
                    if xorshift(&mut self.rng).is_multiple_of(ties) {
                        best = Some((i, a));
                    }
                }
                _ => {
                    best = Some((i, a));
                    ties = 1;
                }
            }
        }
        if let Some((i, _)) = best {
            return self.take(i, src);
        }
        if self.endgame && !unassigned && src != Source::Origin {
            // Endgame: the oldest request that is late (in flight for twice
            // the mean request time) gets a second source. Late only: every
            // lane that falls idle near the end would otherwise duplicate a
            // request on time, and on a shared link the copies slow the
            // originals (and a seed's uplink sends chunks twice).
            let late = Duration::from_secs_f64((2.0 * self.took_avg).max(ENDGAME_MIN_AGE));
            let now = Instant::now();
            let dup = (0..n)
                .filter(|&i| {
                    let by = &self.inflight[i as usize];
                    by.len() == 1 && !by.contains(&src) && s.have.get(i)
                })
                .map(|i| (i, self.asked_at[i as usize]))
                .filter(|(_, t)| now.duration_since(*t) >= late)
                .min_by_key(|(_, t)| *t);
            if let Some((i, _)) = dup {
                self.inflight[i as usize].push(src);
                return Pick::Chunk(i);
            }
        }
        Pick::Wait
    }

    /// Puts chunk `i` in flight from `src` (its first request).
    fn take(&mut self, i: u32, src: Source) -> Pick {
        if self.inflight[i as usize].is_empty() {
            self.inflight_chunks += 1;
        }
        self.inflight[i as usize].push(src);
        self.asked_at[i as usize] = Instant::now();
        Pick::Chunk(i)
    }

    /// Removes `src`'s request of chunk `i`.
    fn release(&mut self, i: u32, src: Source) {
        if let Some(by) = self.inflight.get_mut(i as usize)
            && !by.is_empty()
        {
            by.retain(|s| *s != src);
            if by.is_empty() {
                self.inflight_chunks -= 1;
            }
        }
    }

    fn complete(&mut self, src: Source, i: u32, outcome: Outcome) {
        self.release(i, src);
        let (max_failures, base_pause, max_pause) = (self.max_failures, self.pause, self.max_pause);
        report_fetch(src, &outcome);
        let Some(s) = self.sources.get_mut(&src) else {
            return;
        };
        match outcome {
            Outcome::Ok { len, took } => {
                s.strikes = 0;
                if matches!(src, Source::Peer(_)) {
                    let t = took.as_secs_f64();
                    self.took_avg = match self.took_avg {
                        0.0 => t,
                        avg => avg + (t - avg) / 16.0,
                    };
                }
                s.stats.bytes += len;
                s.stats.chunks += 1;
                s.busy += took;
                s.stats.rate = s.stats.bytes as f64 / s.busy.as_secs_f64().max(1e-6);
                tracing::trace!(
                    ?src,
                    chunk = i,
                    ms = took.as_millis() as u64,
                    dup = self.have.get(i),
                    "chunk verified"
                );
                if self.have.get(i) {
                    self.progress.duplicate_chunks += 1;
                    return;
                }
                self.have.set(i);
                // The other requests of this chunk (endgame) are moot.
                if let Some(by) = self.inflight.get_mut(i as usize)
                    && !by.is_empty()
                {
                    by.clear();
                    self.inflight_chunks -= 1;
                }
                self.fetched.push(i);
                self.last_chunk = Instant::now();
                self.progress.have_bytes += len;
                self.progress.have_chunks += 1;
                match src {
                    Source::Origin => self.progress.bytes_from_origin += len,
                    Source::Peer(_) => self.progress.bytes_from_peers += len,
                }
                if self.have.is_complete() {
                    self.finished = true;
                }
            }
            Outcome::Bad => {
                s.stats.bad += 1;
                self.progress.bad_chunks += 1;
                if let Source::Peer(p) = src
                    && !s.stopped
                {
                    self.progress.banned.push(p.to_string());
                }
                self.stop_source(src);
            }
            Outcome::Refused => {}
            Outcome::NotFound => {
                if s.have.get(i) {
                    s.have.clear(i);
                    if src != Source::Origin {
                        self.avail[i as usize] -= 1;
                    }
                }
            }
            Outcome::Failed => {
                s.stats.failures += 1;
                s.strikes += 1;
                if s.strikes > max_failures {
                    s.strikes = 0;
                    match src {
                        // An origin that keeps failing (e.g. the file changed
                        // under its ETag) will not heal: drop it.
                        Source::Origin => {
                            tracing::info!("dropping the origin after repeated failures");
                            self.stop_source(src);
                        }
                        // A peer may be busy, or a connection to it closed:
                        // pause it, then ask again, for longer each time.
                        Source::Peer(peer) => {
                            let shift = s.stats.pauses.min(16);
                            let pause = base_pause.saturating_mul(1 << shift).min(max_pause);
                            s.stats.pauses += 1;
                            s.paused_until = Some(Instant::now() + pause);
                            tracing::info!(%peer, ?pause, "pausing source after repeated failures");
                        }
                    }
                }
            }
        }
    }

    /// Which origin-capable downloader fetches chunk `i` from the origin.
    fn origin_owner(&self, i: u32) -> PeerId {
        let k = self.origin_peers.len() as u64 + u64::from(!self.origin_peers.contains(&self.me));
        let slot = (u64::from(i).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 17) % k.max(1);
        std::iter::once(self.me)
            .chain(self.origin_peers.iter().copied())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .nth(slot as usize)
            .unwrap_or(self.me)
    }

    fn snapshot(&mut self) -> Progress {
        self.progress.peers = self
            .sources
            .iter()
            .filter(|(k, s)| {
                matches!(k, Source::Peer(_))
                    && !s.stopped
                    && s.running
                    && s.paused_until.is_none_or(|t| Instant::now() >= t)
            })
            .count();
        self.progress.elapsed_ms = self.started.elapsed().as_millis() as u64;
        self.progress.clone()
    }
}

struct Ctx {
    client: Client,
    id: ArtifactId,
    manifest: Arc<Manifest>,
    sched: Mutex<Sched>,
    notify: Notify,
    opts: DownloadOptions,
    origin: Option<Origin>,
}

/// Stops the workers when the download future is dropped (cancelled).
struct CancelGuard(Arc<Ctx>);

impl Drop for CancelGuard {
    fn drop(&mut self) {
        let mut s = self.0.sched.lock();
        let cancelled = !s.finished && s.failed.is_none();
        if cancelled {
            s.failed = Some("cancelled".into());
        }
        drop(s);
        self.0.notify.notify_waiters();
        if cancelled {
            // Keep what was verified: a restart resumes from it. One fdatasync, at most.
            if let Err(e) = self.0.client.store().flush(&self.0.id) {
                tracing::warn!(id = %self.0.id, error = %e, "flush on cancel failed");
            }
        }
    }
}

/// Fetches an artifact into the local store from the mesh (and the origin, when given and allowed).
///
/// Returns once the artifact is verified and activated. Progress is published on `progress`.
/// The manifest is looked for during [`DownloadOptions::find_timeout`].
pub async fn download(
    client: &Client,
    id: ArtifactId,
    origin_url: Option<String>,
    opts: &DownloadOptions,
    progress: Option<&watch::Sender<Progress>>,
) -> Result<DownloadReport, MeshError> {
    let deadline = FindDeadline::after(opts.find_timeout);
    download_until(client, id, origin_url, opts, progress, &deadline).await
}

/// Longest time a pull may ask to wait for a manifest holder.
pub const MAX_FIND_TIMEOUT: Duration = Duration::from_secs(3600);

/// Until when a download looks for a first holder of the manifest; a pull
/// that joins the download may push it later.
#[derive(Debug, Clone)]
pub struct FindDeadline(Arc<Mutex<Instant>>);

impl FindDeadline {
    /// `wait` from now (at most [`MAX_FIND_TIMEOUT`]).
    pub fn after(wait: Duration) -> Self {
        Self(Arc::new(Mutex::new(
            Instant::now() + wait.min(MAX_FIND_TIMEOUT),
        )))
    }

    /// Moves the deadline to `wait` from now if that is later.
    pub fn extend(&self, wait: Duration) {
        let t = Instant::now() + wait.min(MAX_FIND_TIMEOUT);
        let mut d = self.0.lock();
        if t > *d {
            *d = t;
        }
    }

    fn passed(&self) -> bool {
        Instant::now() >= *self.0.lock()
    }
}

/// [`download`] with a deadline for finding the manifest that others may extend.
pub async fn download_until(
    client: &Client,
    id: ArtifactId,
    origin_url: Option<String>,
    opts: &DownloadOptions,
    progress: Option<&watch::Sender<Progress>>,
    find_deadline: &FindDeadline,
) -> Result<DownloadReport, MeshError> {
    let store = client.store().clone();
    let started = Instant::now();
    let publish = |p: &Progress| {
        if let Some(tx) = progress {
            tx.send_replace(p.clone());
        }
    };
    // Subscribe before asking anyone, so no announcement is missed.
    let mut events = client.events();
    let st = store.clone();
    let (status, local, mut pr) = blocking(move || {
        Ok((
            st.status(&id)?,
            st.manifest(&id)?,
            initial_progress(&st, &id)?,
        ))
    })
    .await?;
    // A resumed download shows the bytes it already has from its first report.
    publish(&pr);
    if status == Some(ArtifactStatus::Active)
        && let Some(m) = &local
    {
        pr.phase = Phase::Done;
        pr.total_bytes = m.size;
        pr.have_bytes = m.size;
        pr.total_chunks = m.chunk_count();
        pr.have_chunks = m.chunk_count();
        pr.local_chunks = m.chunk_count();
        pr.local_bytes = m.size;
        publish(&pr);
        return Ok(DownloadReport {
            id: Some(id),
            progress: pr,
            ..DownloadReport::default()
        });
    }
    let origin = match origin_url {
        Some(url) if !client.config().offline => Some(Origin::new(
            &url,
            client.config().origin_ca_file.as_deref(),
        )?),
        Some(_) => {
            tracing::info!(%id, "offline: the origin will not be contacted");
            None
        }
        None => None,
    };
    let (manifest, manifest_from) = match local {
        Some(m) => (m, None),
        None => {
            let waiting = |connected: usize| {
                if let Some(tx) = progress {
                    tx.send_modify(|p| p.connected = Some(connected));
                }
            };
            find_manifest(client, id, find_deadline, origin.as_ref(), waiting).await?
        }
    };
    let manifest = Arc::new(manifest);
    let m2 = manifest.clone();
    let st = store.clone();
    let have = blocking(move || st.begin(&m2))
        .await
        .map_err(|e| disk_full_or(id, e))?;
    let _ = client.provide(id).await;
    let local_chunks = have.count();
    pr.phase = Phase::Fetching;
    pr.total_bytes = manifest.size;
    pr.total_chunks = manifest.chunk_count();
    pr.local_chunks = local_chunks;
    pr.have_chunks = local_chunks;
    pr.have_bytes = have
        .present()
        .map(|i| u64::from(manifest.chunks[i as usize].len))
        .sum();
    pr.local_bytes = pr.have_bytes;
    let n = manifest.chunk_count();
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        id,
        manifest: manifest.clone(),
        sched: Mutex::new(Sched {
            finished: have.is_complete(),
            have,
            inflight: vec![Vec::new(); n as usize],
            inflight_chunks: 0,
            asked_at: vec![Instant::now(); n as usize],
            took_avg: 0.0,
            avail: vec![0; n as usize],
            sources: HashMap::new(),
            fetched: Vec::new(),
            progress: pr,
            failed: None,
            disk_full: None,
            last_chunk: Instant::now(),
            started,
            endgame: opts.endgame,
            max_failures: opts.max_failures,
            pause: opts.pause,
            max_pause: opts.max_pause,
            me: client.peer_id(),
            origin_peers: Default::default(),
            origin_after: Instant::now() + opts.origin_delay,
            origin_grace: opts.origin_grace,
            rng: random_seed(),
            sharers: vec![client.peer_id()],
            my_share: 0,
        }),
        notify: Notify::new(),
        opts: opts.clone(),
        origin,
    });
    let _guard = CancelGuard(ctx.clone());
    if ctx.origin.is_some() {
        add_source(&ctx, Source::Origin, HaveMap::full(n));
    }
    let mut asked: HashSet<PeerId> = HashSet::new();
    let mut discover = tokio::time::interval(Duration::from_secs(1));
    let (prov_tx, mut prov_rx) = tokio::sync::mpsc::channel::<HashSet<PeerId>>(4);
    let kad_busy = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut kad_round = 0u64;
    if let Some(p) = manifest_from {
        asked.insert(p);
        query_have(&ctx, p);
    }
    let mut announce = tokio::time::interval(opts.announce_every);
    let mut announced = u32::MAX;
    // Fellow downloaders that have our have-map (see the announce tick).
    let mut told: HashSet<PeerId> = HashSet::new();
    loop {
        {
            let mut s = ctx.sched.lock();
            let p = s.snapshot();
            let stalled =
                s.last_chunk.elapsed() > opts.stall_timeout && s.inflight.iter().all(Vec::is_empty);
            if stalled && s.failed.is_none() {
                s.failed = Some(format!(
                    "no source for the remaining {} chunks after {:?}",
                    s.missing(),
                    opts.stall_timeout
                ));
            }
            let done = s.finished || s.failed.is_some();
            drop(s);
            publish(&p);
            if done {
                break;
            }
        }
        tokio::select! {
            ev = events.recv() => match ev {
                Ok(MeshEvent::Have { peer, id: hid, have, origin }) if hid == id => {
                    asked.insert(peer);
                    {
                        let mut s = ctx.sched.lock();
                        if origin {
                            s.origin_peers.insert(peer);
                        } else {
                            s.origin_peers.remove(&peer);
                        }
                    }
                    add_source(&ctx, Source::Peer(peer), (*have).clone());
                }
                Ok(MeshEvent::Connected(peer)) => {
                    asked.insert(peer);
                    query_have(&ctx, peer);
                }
                Ok(MeshEvent::Banned(peer) | MeshEvent::Disconnected(peer)) => {
                    asked.remove(&peer);
                    ctx.sched.lock().origin_peers.remove(&peer);
                    if matches!(ev, Ok(MeshEvent::Banned(_))) {
                        ctx.sched.lock().stop_source(Source::Peer(peer));
                    }
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => {
                    ctx.sched.lock().failed = Some("mesh stopped".into());
                }
            },
            Some(found) = prov_rx.recv() => {
                for p in found {
                    if p != client.peer_id() && asked.insert(p) {
                        query_have(&ctx, p);
                    }
                }
            },
            _ = discover.tick() => {
                let cands: HashSet<PeerId> = client.connected().await.unwrap_or_default().into_iter().collect();
                // Kademlia lookups can take seconds: run them beside the loop, one at a time.
                kad_round += 1;
                if (asked.len() < 2 || kad_round % 5 == 1)
                    && !kad_busy.swap(true, std::sync::atomic::Ordering::AcqRel)
                {
                    let (c, tx, busy) = (client.clone(), prov_tx.clone(), kad_busy.clone());
                    tokio::spawn(async move {
                        let found = c.providers(id).await.unwrap_or_default();
                        let _ = tx.send(found).await;
                        busy.store(false, std::sync::atomic::Ordering::Release);
                    });
                }
                for p in cands {
                    if p != client.peer_id() && asked.insert(p) {
                        query_have(&ctx, p);
                    }
                }
            },
            _ = announce.tick() => {
                // Make new chunks durable (so they can be served) and tell the
                // fellow downloaders: all of them when we have new chunks, and
                // any we learnt of since. Pushed directly, not gossiped: a
                // gossip message is signed, relayed by several mesh peers, and
                // each copy's signature checked, which at four announcements a
                // second from each of 16 downloaders took a sixth of the CPU.
                // Gossip carries the first announcement (so downloaders that do
                // not know us yet learn of us) and the last.
                let (count, sharers) = {
                    let s = ctx.sched.lock();
                    (s.have.count(), s.fellow_downloaders())
                };
                let first = announced == u32::MAX;
                let targets: Vec<PeerId> = if count != announced {
                    sharers
                } else {
                    sharers.into_iter().filter(|p| !told.contains(p)).collect()
                };
                if first || count != announced || !targets.is_empty() {
                    announced = count;
                    let st = store.clone();
                    match blocking(move || { st.flush(&id)?; st.have_map(&id) }).await {
                        Ok(Some(h)) => {
                            let origin = ctx.origin.is_some();
                            if first {
                                let _ = client.announce_have(id, &h, origin).await;
                            }
                            told.extend(targets.iter().copied());
                            let _ = client.push_have(targets, id, &h, origin).await;
                        }
                        Ok(None) => {}
                        Err(e) => tracing::warn!(%id, error = %e, "flush failed"),
                    }
                }
            },
            _ = ctx.notify.notified() => {},
        }
    }
    ctx.notify.notify_waiters();
    let (failed, disk_full, fetched, peers, origin_stats) = {
        let s = ctx.sched.lock();
        let mut peers = HashMap::new();
        let mut origin_stats = SourceStats::default();
        for (k, v) in &s.sources {
            match k {
                Source::Peer(p) => {
                    peers.insert(*p, v.stats.clone());
                }
                Source::Origin => origin_stats = v.stats.clone(),
            }
        }
        (
            s.failed.clone(),
            s.disk_full.clone(),
            s.fetched.clone(),
            peers,
            origin_stats,
        )
    };
    let st = store.clone();
    let outcome = match (failed, disk_full) {
        (_, Some(detail)) => {
            let _ = blocking(move || st.flush(&id)).await;
            Err(MeshError::DiskFull {
                id: id.to_hex(),
                detail,
            })
        }
        (Some(e), None) => {
            let _ = blocking(move || st.flush(&id)).await;
            Err(MeshError::NoSource(format!("{id}: {e}")))
        }
        (None, None) => blocking(move || {
            st.flush(&id)?;
            st.finish(&id)
        })
        .await
        .map_err(|e| disk_full_or(id, e)),
    };
    let mut p = ctx.sched.lock().snapshot();
    for (peer, st) in &peers {
        tracing::debug!(%peer, bytes = st.bytes, chunks = st.chunks, failures = st.failures,
            pauses = st.pauses, "source figures");
    }
    match outcome {
        Ok(()) => {
            p.phase = Phase::Done;
            publish(&p);
            let have = HaveMap::full(n);
            let fellows = ctx.sched.lock().fellow_downloaders();
            let _ = client.push_have(fellows, id, &have, false).await;
            let _ = client.announce_have(id, &have, false).await;
            let _ = client.provide(id).await;
            tracing::info!(%id, bytes = p.total_bytes, from_peers = p.bytes_from_peers, from_origin = p.bytes_from_origin,
                ms = p.elapsed_ms, "artifact activated");
            Ok(DownloadReport {
                id: Some(id),
                fetched,
                peers,
                origin: origin_stats,
                progress: p,
            })
        }
        Err(e) => {
            p.phase = Phase::Failed;
            p.error = Some(e.to_string());
            publish(&p);
            Err(e)
        }
    }
}

/// A [`MeshError::DiskFull`] when the store's error is a full disk, else [`MeshError::Store`].
fn disk_full_or(id: ArtifactId, e: MeshError) -> MeshError {
    match e {
        MeshError::Store(se) if MeshError::is_disk_full(&se) => MeshError::DiskFull {
            id: id.to_hex(),
            detail: se.to_string(),
        },
        other => other,
    }
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

/// Manifest requests in flight at once while looking for a first source.
const MANIFEST_FANOUT: usize = 16;

/// Asks connected peers and Kademlia providers for the manifest until one verifies.
///
/// Peers are asked in parallel (up to [`MANIFEST_FANOUT`] at a time) and the
/// first verified manifest wins: on a large mesh a node is connected to dozens
/// of peers that mostly lack the artifact, and asking them one after the other
/// cost a round trip each. The Kademlia lookup runs beside the connected round.
///
/// `connected(n)` reports the connected peers at each round. A round that
/// finds no holder asks the mesh to look for peers again
/// ([`Client::rediscover`]); rounds go on until `deadline`.
async fn find_manifest(
    client: &Client,
    id: ArtifactId,
    deadline: &FindDeadline,
    origin: Option<&Origin>,
    connected_now: impl Fn(usize),
) -> Result<(Manifest, Option<PeerId>), MeshError> {
    let mut waiting_logged = false;
    let mut tried: HashSet<PeerId> = HashSet::new();
    // The origin's last answer, so a failed pull says why (e.g. an untrusted certificate).
    let mut origin_error: Option<String> = None;
    loop {
        let c = client.clone();
        let kad = tokio::spawn(async move { c.providers(id).await.unwrap_or_default() });
        let connected = client.connected().await?;
        connected_now(connected.len());
        if connected.is_empty() && !waiting_logged {
            tracing::info!(%id, "waiting for peers to look for the manifest");
            waiting_logged = true;
        }
        tracing::debug!(
            connected = connected.len(),
            "manifest: asking connected peers"
        );
        if let Some(found) = ask_manifest(client, id, connected, &mut tried).await {
            kad.abort();
            return Ok(found);
        }
        let providers: Vec<PeerId> = kad.await.unwrap_or_default().into_iter().collect();
        tracing::debug!(
            found = providers.len(),
            "manifest: asking Kademlia providers"
        );
        if let Some(found) = ask_manifest(client, id, providers, &mut tried).await {
            return Ok(found);
        }
        if let Some(o) = origin {
            match o.manifest(&id).await {
                Ok(m) => return Ok((m, None)),
                Err(e) => {
                    if origin_error.is_none() {
                        tracing::warn!(%id, error = %e, "no manifest from the origin");
                    }
                    origin_error = Some(e.to_string());
                }
            }
        }
        if deadline.passed() {
            let peers = client.connected().await.map(|c| c.len()).unwrap_or(0);
            return Err(MeshError::NoSource(match origin_error {
                Some(e) => {
                    format!("no peer has the manifest of {id} ({peers} connected); origin: {e}")
                }
                None => format!("no peer has the manifest of {id} ({peers} connected)"),
            }));
        }
        // Nobody has it (or nobody is there): look for more peers. Peers
        // that lacked it may get it later.
        let _ = client.rediscover().await;
        tried.clear();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Asks `peers` (those not in `tried`) for the manifest, [`MANIFEST_FANOUT`]
/// at a time; the first that verifies wins and the other requests are dropped.
/// A peer whose manifest does not verify against `id` is banned.
async fn ask_manifest(
    client: &Client,
    id: ArtifactId,
    peers: Vec<PeerId>,
    tried: &mut HashSet<PeerId>,
) -> Option<(Manifest, Option<PeerId>)> {
    use futures::StreamExt;
    let me = client.peer_id();
    let mut queue = peers.into_iter().filter(|p| *p != me && tried.insert(*p));
    let mut running = futures::stream::FuturesUnordered::new();
    loop {
        while running.len() < MANIFEST_FANOUT {
            let Some(p) = queue.next() else { break };
            running.push(async move { (p, client.manifest(p, id).await) });
        }
        let (p, got) = running.next().await?;
        match got {
            Ok(Some(m)) => return Some((m, Some(p))),
            Ok(None) => {}
            Err(MeshError::Protocol { peer, reason }) => {
                tracing::warn!(%peer, %reason, "peer sent a manifest that does not verify");
                let _ = client.ban(peer, format!("bad manifest: {reason}")).await;
            }
            Err(e) => tracing::debug!(peer = %p, error = %e, "manifest request failed"),
        }
    }
}

fn query_have(ctx: &Arc<Ctx>, peer: PeerId) {
    let ctx = ctx.clone();
    tokio::spawn(async move {
        match ctx.client.have_map(peer, ctx.id).await {
            Ok(Some(have)) => add_source(&ctx, Source::Peer(peer), have),
            Ok(None) => {}
            Err(e) => tracing::debug!(%peer, error = %e, "have-map request failed"),
        }
    });
}

fn add_source(ctx: &Arc<Ctx>, src: Source, have: HaveMap) {
    let start = ctx.sched.lock().add_source(src, have);
    if start {
        let slots = match src {
            Source::Origin => ctx.opts.origin_window,
            Source::Peer(_) => ctx.opts.window.max(ctx.opts.fast_window),
        };
        for slot in 0..slots.max(1) {
            tokio::spawn(worker(ctx.clone(), src, slot));
        }
    }
    ctx.notify.notify_waiters();
}

/// One request slot for one source: picks a chunk, fetches, verifies, stores,
/// repeats. Slots from `window` up work only while the source is fast.
async fn worker(ctx: Arc<Ctx>, src: Source, slot: usize) {
    let extra = matches!(src, Source::Peer(_)) && slot >= ctx.opts.window.max(1);
    let mut stream: Option<Stream> = None;
    // One body buffer per worker, reused: no fresh zeroed pages per chunk.
    let mut buf: Vec<u8> = Vec::new();
    let mut refusals = 0u32;
    let mut rng = random_seed();
    // The lanes to a new source open their streams a little apart: a burst
    // of new streams is what a peer refuses (see `FetchError::Refused`).
    if slot > 0 {
        let ms = 2 * slot as u64 + xorshift(&mut rng) % 8;
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    loop {
        let notified = ctx.notify.notified();
        let pick = {
            let mut sched = ctx.sched.lock();
            if extra && !sched.is_fast(src, ctx.opts.fast_rate) {
                // Idle, not stopped: the source may speed up (or the download end).
                if sched.pick_would_stop(src) {
                    Pick::Stop
                } else {
                    Pick::Wait
                }
            } else {
                sched.pick(src)
            }
        };
        let i = match pick {
            Pick::Stop => return,
            Pick::Wait => {
                tokio::select! {
                    _ = notified => {},
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {},
                }
                continue;
            }
            Pick::Chunk(i) => i,
        };
        let Some(chunk) = ctx.manifest.chunks.get(i as usize).copied() else {
            return;
        };
        let t0 = Instant::now();
        let fetched = match src {
            Source::Peer(peer) => {
                let fut = fetch_from_peer(&ctx, peer, &mut stream, i, chunk.len, &mut buf);
                match tokio::time::timeout(ctx.opts.request_timeout, fut).await {
                    Ok(r) => r,
                    Err(_) => Err(FetchError::Failed("timed out".into())),
                }
            }
            Source::Origin => match &ctx.origin {
                Some(o) => match o.fetch(chunk.offset, chunk.len).await {
                    Ok(body) => {
                        let n = body.len();
                        buf = body;
                        Ok(n)
                    }
                    Err(e) => Err(FetchError::Failed(e.to_string())),
                },
                None => return,
            },
        };
        let outcome = match fetched {
            // The chunk is buf[..n].
            Ok(n) => {
                let len = n as u64;
                if ctx.sched.lock().have.get(i) {
                    Outcome::Ok {
                        len,
                        took: t0.elapsed(),
                    }
                } else {
                    let store = ctx.client.store().clone();
                    let id = ctx.id;
                    let body = std::mem::take(&mut buf);
                    let put = tokio::task::spawn_blocking(move || {
                        let r = store.put_chunk(&id, i, &body[..n]);
                        (body, r)
                    })
                    .await
                    .map(|(body, r)| {
                        buf = body;
                        r
                    });
                    match put {
                        Ok(Ok(())) => Outcome::Ok {
                            len,
                            took: t0.elapsed(),
                        },
                        Ok(Err(StoreError::ChunkMismatch { .. })) => Outcome::Bad,
                        Ok(Err(e)) => {
                            let mut s = ctx.sched.lock();
                            if MeshError::is_disk_full(&e) {
                                s.disk_full.get_or_insert_with(|| e.to_string());
                            }
                            s.failed = Some(format!("store: {e}"));
                            Outcome::Failed
                        }
                        Err(e) => {
                            ctx.sched.lock().failed = Some(format!("store task: {e}"));
                            Outcome::Failed
                        }
                    }
                }
            }
            Err(FetchError::Lied(reason)) => {
                tracing::warn!(?src, chunk = i, %reason, "source sent malformed data");
                Outcome::Bad
            }
            Err(FetchError::NotFound) => Outcome::NotFound,
            Err(FetchError::Refused(reason)) if refusals < MAX_REFUSALS => {
                tracing::debug!(?src, chunk = i, %reason, "fresh chunk stream refused");
                stream = None;
                refusals += 1;
                Outcome::Refused
            }
            Err(FetchError::Refused(reason) | FetchError::Failed(reason)) => {
                tracing::debug!(?src, chunk = i, %reason, "chunk request failed");
                stream = None;
                Outcome::Failed
            }
        };
        let bad = matches!(outcome, Outcome::Bad);
        let failed = matches!(outcome, Outcome::Failed);
        let refused = matches!(outcome, Outcome::Refused);
        if matches!(outcome, Outcome::Ok { .. }) {
            refusals = 0;
        }
        if bad {
            // Ban before the failure shows in the progress.
            match src {
                Source::Peer(peer) => {
                    tracing::warn!(%peer, chunk = i, "chunk failed verification: banning the peer");
                    let _ = ctx
                        .client
                        .ban(peer, format!("sent a corrupt chunk of {}", ctx.id.short()))
                        .await;
                }
                Source::Origin => tracing::warn!(chunk = i, "origin sent a corrupt chunk"),
            }
        }
        ctx.sched.lock().complete(src, i, outcome);
        ctx.notify.notify_waiters();
        if bad {
            return;
        }
        if failed {
            tokio::time::sleep(Duration::from_millis(200)).await;
        } else if refused {
            // A short random wait, so the lanes that were refused together
            // do not all come back in the same instant.
            let ms = 5 + xorshift(&mut rng) % (20 * u64::from(refusals));
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
    }
}

/// Refused fresh streams in a row (see [`FetchError::Refused`]) before a
/// worker counts the next one as a failure.
const MAX_REFUSALS: u32 = 5;

/// Shortest time a request is in flight before the endgame asks a second source.
const ENDGAME_MIN_AGE: f64 = 0.25;

/// Random probes [`Sched::pick`] makes before a full pass over the chunks.
const PICK_PROBES: u32 = 32;

/// xorshift64: cheap, and random enough to keep downloaders out of step.
fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

enum FetchError {
    /// The source does not hold the chunk.
    NotFound,
    /// A stream opened for this request was closed before the answer began.
    /// libp2p-stream hands inbound streams to the provider through a channel
    /// with room for one: a peer that receives several new streams at once
    /// (many downloaders starting together) drops the others, and the writer
    /// sees "connection is closed". Not a failure of the peer: asked again.
    Refused(String),
    /// The source broke the protocol (wrong length, wrong index): as bad as a corrupt chunk.
    Lied(String),
    /// Transport trouble; try again elsewhere.
    Failed(String),
}

async fn fetch_from_peer(
    ctx: &Ctx,
    peer: PeerId,
    stream: &mut Option<Stream>,
    index: u32,
    len: u32,
    body: &mut Vec<u8>,
) -> Result<usize, FetchError> {
    let fresh = stream.is_none();
    let s = match stream {
        Some(s) => s,
        None => stream.insert(
            ctx.client
                .open_chunk_stream(peer)
                .await
                .map_err(|e| FetchError::Failed(e.to_string()))?,
        ),
    };
    let io = |e: std::io::Error| FetchError::Failed(e.to_string());
    // Before the answer's header, a fresh stream's error is a refusal.
    let early = |e: std::io::Error| match fresh {
        true => FetchError::Refused(e.to_string()),
        false => FetchError::Failed(e.to_string()),
    };
    wire::write_chunk_request(s, &ChunkRequest { id: ctx.id, index })
        .await
        .map_err(early)?;
    s.flush().await.map_err(early)?;
    let h = wire::read_chunk_header(s).await.map_err(early)?;
    if h.index != index {
        return Err(FetchError::Lied(format!(
            "answered chunk {} for {index}",
            h.index
        )));
    }
    match h.status {
        ChunkStatus::Ok { len: got } if got == len => {
            // The buffer only grows: no fresh zeroing for every larger chunk.
            let n = len as usize;
            if body.len() < n {
                body.resize(n, 0);
            }
            s.read_exact(&mut body[..n]).await.map_err(io)?;
            Ok(n)
        }
        ChunkStatus::Ok { len: got } => Err(FetchError::Lied(format!(
            "chunk of {got} bytes, manifest says {len}"
        ))),
        ChunkStatus::NotFound => Err(FetchError::NotFound),
        ChunkStatus::Busy | ChunkStatus::Error => {
            Err(FetchError::Failed(format!("{:?}", h.status)))
        }
    }
}

/// Finished (done or failed) downloads kept for `/admin/pull/{id}` and the
/// status; beyond this many the oldest are forgotten.
pub const KEEP_FINISHED: usize = 32;

/// Running downloads, one per artifact: a second pull of the same artifact
/// joins the first. At most [`super::MeshConfig::max_downloads`] run at once;
/// at most [`KEEP_FINISHED`] finished ones are remembered.
#[derive(Clone, Default)]
pub struct Downloads {
    jobs: Arc<Mutex<Jobs>>,
}

#[derive(Default)]
struct Jobs {
    map: HashMap<ArtifactId, Job>,
    /// Start order of the next job.
    next_seq: u64,
}

struct Job {
    progress: watch::Receiver<Progress>,
    task: tokio::task::AbortHandle,
    deadline: FindDeadline,
    seq: u64,
}

impl Jobs {
    /// Forgets the oldest finished downloads beyond [`KEEP_FINISHED`].
    fn prune(&mut self) {
        let mut finished: Vec<(u64, ArtifactId)> = self
            .map
            .iter()
            .filter(|(_, j)| j.is_final())
            .map(|(k, j)| (j.seq, *k))
            .collect();
        if finished.len() > KEEP_FINISHED {
            finished.sort_unstable();
            let drop_n = finished.len() - KEEP_FINISHED;
            for (_, k) in finished.into_iter().take(drop_n) {
                self.map.remove(&k);
            }
        }
    }
}

impl Job {
    fn is_final(&self) -> bool {
        self.progress.borrow().phase.is_final() || self.task.is_finished()
    }
}

impl Downloads {
    /// Starts fetching `id` in the background, or joins the download already
    /// running (or done). `find_timeout`: how long to wait for a peer holding
    /// the manifest (default [`DownloadOptions::find_timeout`], at most
    /// [`MAX_FIND_TIMEOUT`]); joining a download that is still looking
    /// extends its wait to this. Fails with [`MeshError::TooManyDownloads`]
    /// when `max_downloads` are running.
    pub async fn start(
        &self,
        client: &Client,
        id: ArtifactId,
        origin: Option<String>,
        find_timeout: Option<Duration>,
    ) -> Result<watch::Receiver<Progress>, MeshError> {
        // Read before taking the registry: a resumed download's first report
        // carries the bytes already present.
        let st = client.store().clone();
        let first = blocking(move || initial_progress(&st, &id)).await?;
        let opts = client.config().download.clone();
        let limit = client.config().max_downloads.max(1);
        let wait = find_timeout.unwrap_or(opts.find_timeout);
        let mut jobs = self.jobs.lock();
        if let Some(j) = jobs.map.get(&id)
            && !matches!(j.progress.borrow().phase, Phase::Failed)
        {
            j.deadline.extend(wait);
            return Ok(j.progress.clone());
        }
        let running = jobs.map.values().filter(|j| !j.is_final()).count();
        if running >= limit {
            return Err(MeshError::TooManyDownloads { limit });
        }
        let (tx, rx) = watch::channel(first);
        let deadline = FindDeadline::after(wait);
        let client = client.clone();
        let span = tracing::info_span!("pull", node = %client.peer_id(), id = %id.short());
        let d2 = deadline.clone();
        let task = tokio::spawn(tracing::Instrument::instrument(
            async move {
                if let Err(e) = download_until(&client, id, origin, &opts, Some(&tx), &d2).await {
                    tracing::warn!(%id, error = %e, "download failed");
                    tx.send_modify(|p| {
                        p.phase = Phase::Failed;
                        p.error.get_or_insert_with(|| e.to_string());
                    });
                }
            },
            span,
        ));
        let seq = jobs.next_seq;
        jobs.next_seq += 1;
        jobs.map.insert(
            id,
            Job {
                progress: rx.clone(),
                task: task.abort_handle(),
                deadline,
                seq,
            },
        );
        jobs.prune();
        Ok(rx)
    }

    /// Stops the download of `id` (what was verified stays; a later pull resumes).
    pub fn cancel(&self, id: &ArtifactId) -> bool {
        match self.jobs.lock().map.remove(id) {
            Some(j) => {
                j.task.abort();
                true
            }
            None => false,
        }
    }

    /// Stops every download.
    pub fn cancel_all(&self) {
        for (_, j) in self.jobs.lock().map.drain() {
            j.task.abort();
        }
    }

    /// A receiver of the progress of the download of `id`, if one was started.
    pub fn watch(&self, id: &ArtifactId) -> Option<watch::Receiver<Progress>> {
        self.jobs.lock().map.get(id).map(|j| j.progress.clone())
    }

    /// The current progress of the download of `id`, if one was started.
    pub fn get(&self, id: &ArtifactId) -> Option<Progress> {
        self.jobs
            .lock()
            .map
            .get(id)
            .map(|j| j.progress.borrow().clone())
    }

    /// Progress of every download remembered (running, and the latest finished), oldest first.
    pub fn all(&self) -> Vec<Progress> {
        let mut jobs = self.jobs.lock();
        // Downloads that ended since the last start count against the bound too.
        jobs.prune();
        let mut v: Vec<(u64, Progress)> = jobs
            .map
            .values()
            .map(|j| (j.seq, j.progress.borrow().clone()))
            .collect();
        v.sort_unstable_by_key(|(seq, _)| *seq);
        v.into_iter().map(|(_, p)| p).collect()
    }

    /// Downloads running now.
    pub fn running(&self) -> usize {
        self.jobs
            .lock()
            .map
            .values()
            .filter(|j| !j.is_final())
            .count()
    }
}

/// Counts a finished chunk fetch in the process metrics (by source and outcome).
fn report_fetch(src: Source, outcome: &Outcome) {
    use crate::metrics::{Outcome as M, Source as S};
    let source = match src {
        Source::Peer(_) => S::Peer,
        Source::Origin => S::Origin,
    };
    let (o, bytes, secs) = match outcome {
        Outcome::Ok { len, took } => (M::Ok, *len, took.as_secs_f64()),
        Outcome::Bad => (M::BadHash, 0, 0.0),
        Outcome::Failed | Outcome::Refused => (M::Failed, 0, 0.0),
        Outcome::NotFound => return,
    };
    crate::metrics::global().chunk_fetch(source, o, bytes, secs);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(n: u32) -> Sched {
        Sched {
            finished: false,
            have: HaveMap::new(n),
            inflight: vec![Vec::new(); n as usize],
            inflight_chunks: 0,
            asked_at: vec![Instant::now(); n as usize],
            took_avg: 0.0,
            avail: vec![0; n as usize],
            sources: HashMap::new(),
            fetched: Vec::new(),
            progress: Progress::default(),
            failed: None,
            disk_full: None,
            last_chunk: Instant::now(),
            started: Instant::now(),
            endgame: false,
            max_failures: 8,
            pause: Duration::from_secs(2),
            max_pause: Duration::from_secs(30),
            me: PeerId::random(),
            origin_peers: Default::default(),
            origin_after: Instant::now(),
            origin_grace: Duration::from_secs(10),
            rng: random_seed(),
            sharers: Vec::new(),
            my_share: 0,
        }
    }

    fn have(n: u32, which: impl Iterator<Item = u32>) -> HaveMap {
        let mut h = HaveMap::new(n);
        for i in which {
            h.set(i);
        }
        h
    }

    #[test]
    fn a_single_source_gets_every_chunk_once() {
        let n = 1000;
        let mut s = sched(n);
        let p = Source::Peer(PeerId::random());
        assert!(s.add_source(p, HaveMap::full(n)));
        let mut seen = HashSet::new();
        for _ in 0..n {
            match s.pick(p) {
                Pick::Chunk(i) => assert!(seen.insert(i), "chunk {i} picked twice"),
                _ => panic!("a chunk was left"),
            }
        }
        assert!(matches!(s.pick(p), Pick::Wait), "nothing left to ask for");
    }

    #[test]
    fn the_rarest_come_first_and_are_chosen_uniformly() {
        // Chunks 0..100 are held by two peers, 100..200 by `a` alone.
        let n = 200;
        let (a, b) = (
            Source::Peer(PeerId::random()),
            Source::Peer(PeerId::random()),
        );
        let mut firsts = HashSet::new();
        for _ in 0..300 {
            let mut s = sched(n);
            s.add_source(a, HaveMap::full(n));
            s.add_source(b, have(n, 0..100));
            for _ in 0..100 {
                match s.pick(a) {
                    Pick::Chunk(i) => {
                        assert!(i >= 100, "picked {i}, held by two, before a rare one")
                    }
                    _ => panic!("rare chunks were left"),
                }
            }
            // Then the common ones.
            assert!(matches!(s.pick(a), Pick::Chunk(i) if i < 100));
            let mut s = sched(n);
            s.add_source(a, HaveMap::full(n));
            if let Pick::Chunk(i) = s.pick(a) {
                firsts.insert(i);
            }
        }
        // 300 fresh downloads do not start in step: their first picks spread
        // over the file (uniform over 200 chunks gives ~155 distinct values).
        assert!(firsts.len() > 100, "first picks: {} distinct", firsts.len());
    }

    #[test]
    fn failing_peers_are_paused_then_asked_again_and_the_origin_dropped() {
        let n = 8;
        let mut s = sched(n);
        let p = Source::Peer(PeerId::random());
        s.add_source(p, HaveMap::full(n));
        let fail = |s: &mut Sched, src: Source, times: u32| {
            for _ in 0..times {
                let Pick::Chunk(i) = s.pick(src) else {
                    panic!("{src:?} was not asked");
                };
                s.complete(src, i, Outcome::Failed);
            }
        };
        // Failures with a delivered chunk between them do not add up.
        fail(&mut s, p, 8);
        let Pick::Chunk(i) = s.pick(p) else {
            panic!("not asked")
        };
        s.complete(
            p,
            i,
            Outcome::Ok {
                len: 1,
                took: Duration::from_millis(1),
            },
        );
        fail(&mut s, p, 8);
        let Pick::Chunk(i) = s.pick(p) else {
            panic!("8 in a row: still asked")
        };
        // A ninth in a row: paused, not stopped, and not counted as a live peer.
        s.complete(p, i, Outcome::Failed);
        assert_eq!(s.inflight_chunks, 0, "every request answered");
        assert!(matches!(s.pick(p), Pick::Wait), "paused");
        assert!(!s.pick_would_stop(p));
        assert_eq!(s.snapshot().peers, 0);
        assert_eq!(s.sources[&p].stats.pauses, 1);
        let first = s.sources[&p].paused_until.map(|t| t - Instant::now());
        assert!(first.is_some_and(|d| d <= Duration::from_secs(2)));
        // After the pause it is asked again; the next pause is longer.
        if let Some(st) = s.sources.get_mut(&p) {
            st.paused_until = Some(Instant::now());
        }
        fail(&mut s, p, 9);
        let second = s.sources[&p].paused_until.map(|t| t - Instant::now());
        assert!(second.is_some_and(|d| d > Duration::from_secs(2) && d <= Duration::from_secs(4)));
        assert_eq!(s.sources[&p].stats.failures, 8 + 8 + 1 + 9);
        // The origin is dropped for good after as many.
        let mut s = sched(n);
        s.add_source(Source::Origin, HaveMap::full(n));
        fail(&mut s, Source::Origin, 9);
        assert!(matches!(s.pick(Source::Origin), Pick::Stop));
    }

    #[test]
    fn from_a_seed_this_nodes_share_comes_first_then_the_others() {
        let n = 400;
        let mut s = sched(n);
        let seed = Source::Peer(PeerId::random());
        s.add_source(seed, HaveMap::full(n));
        // Three fellow downloaders with nothing yet, and one that holds 0..10.
        for _ in 0..3 {
            s.add_source(Source::Peer(PeerId::random()), HaveMap::new(n));
        }
        let holder = Source::Peer(PeerId::random());
        s.add_source(holder, have(n, 0..10));
        assert_eq!(s.sharers.len(), 5, "this node and four partial sources");
        let mine: HashSet<u32> = (10..n).filter(|&i| s.is_my_share(i)).collect();
        assert!(
            (40..120).contains(&mine.len()),
            "about a fifth of 390: {}",
            mine.len()
        );
        let mut picks = Vec::new();
        while let Pick::Chunk(i) = s.pick(seed) {
            picks.push(i);
        }
        assert_eq!(picks.len(), n as usize, "every chunk, once");
        let (first, rest) = picks.split_at(mine.len());
        assert!(first.iter().all(|i| mine.contains(i)), "own share first");
        let (others, common) = rest.split_at(390 - mine.len());
        assert!(
            others.iter().all(|&i| i >= 10 && !mine.contains(&i)),
            "then the others' share"
        );
        assert!(common.iter().all(|&i| i < 10), "then what a peer holds too");
        // Another node, with the same downloaders, owns other chunks: the
        // shares split the chunks (the same hash everywhere).
        let mut t = sched(n);
        t.me = s.sharers[(s.my_share + 1) % s.sharers.len()];
        t.add_source(seed, HaveMap::full(n));
        for p in s.sharers.clone() {
            if p != t.me {
                t.add_source(Source::Peer(p), HaveMap::new(n));
            }
        }
        assert_eq!(t.sharers, s.sharers);
        assert!((0..n).all(|i| !(s.is_my_share(i) && t.is_my_share(i))));
    }

    #[test]
    fn the_endgame_duplicates_only_late_requests_oldest_first() {
        let n = 4;
        let mut s = sched(n);
        s.endgame = true;
        let (a, b) = (
            Source::Peer(PeerId::random()),
            Source::Peer(PeerId::random()),
        );
        s.add_source(a, HaveMap::full(n));
        s.add_source(b, HaveMap::full(n));
        for _ in 0..n {
            assert!(matches!(s.pick(a), Pick::Chunk(_)));
        }
        // Every chunk is in flight, none late yet: b waits.
        assert!(matches!(s.pick(b), Pick::Wait), "nothing late");
        // Requests take 100 ms on average: late is twice that (at least 250 ms).
        s.took_avg = 0.1;
        let now = Instant::now();
        s.asked_at[1] = now - Duration::from_millis(400);
        s.asked_at[3] = now - Duration::from_millis(900);
        s.asked_at[0] = now - Duration::from_millis(200);
        assert!(matches!(s.pick(b), Pick::Chunk(3)), "the oldest late one");
        assert!(matches!(s.pick(b), Pick::Chunk(1)));
        assert!(matches!(s.pick(b), Pick::Wait), "chunk 0 is not late");
        // The first copy wins; the second is a duplicate.
        let ok = || Outcome::Ok {
            len: 1,
            took: Duration::from_millis(100),
        };
        s.complete(b, 3, ok());
        s.complete(a, 3, ok());
        assert_eq!(s.progress.duplicate_chunks, 1);
        assert_eq!(s.inflight_chunks, 3);
    }

    #[test]
    fn a_source_is_fast_only_after_delivering_at_the_rate() {
        let mut s = sched(4);
        let p = Source::Peer(PeerId::random());
        s.add_source(p, HaveMap::full(4));
        assert!(!s.is_fast(p, 1.0), "no bytes yet");
        if let Some(st) = s.sources.get_mut(&p) {
            st.since = Instant::now() - Duration::from_secs(1);
            st.stats.bytes = 50_000_000;
        }
        assert!(s.is_fast(p, 40e6));
        assert!(!s.is_fast(p, 60e6));
        assert!(
            !s.is_fast(Source::Peer(PeerId::random()), 1.0),
            "unknown source"
        );
    }
}
