//! The pure chunk scheduler of one download: which chunk to ask which
//! source for, and what a finished request changes. No IO and no clock: every
//! method that needs the time takes `now` (as iroh-blobs' downloader state
//! machine does), so the policy is tested without a network or sleeps. The
//! driver ([`super::driver`]) owns the IO and calls it under a lock.

use super::{DownloadOptions, Progress, SourceStats};
use crate::store::HaveMap;
use libp2p::PeerId;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::time::{Duration, Instant};

/// A source of chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum ChunkSource {
    Peer(PeerId),
    Origin,
}

pub(super) enum Pick {
    Chunk(u32),
    Wait,
    Stop,
}

pub(super) enum FetchOutcome {
    Ok {
        len: u64,
        took: Duration,
    },
    Bad,
    NotFound,
    Failed,
    /// A fresh stream was dropped by the peer before it answered (see
    /// `FetchError::Refused` in the driver): asked again, not held against the peer.
    Refused,
    /// No stream could be opened (the peer is not connected and the dial
    /// failed): the source waits [`UNREACHABLE_FIRST`], doubling up to
    /// [`UNREACHABLE_MAX`] while two other sources deliver (else no longer
    /// than the first wait), or until it connects ([`Sched::reachable`]).
    Unreachable,
}

/// First wait of a source that could not be reached.
pub(super) const UNREACHABLE_FIRST: Duration = Duration::from_secs(1);
/// Longest wait of a source that could not be reached.
pub(super) const UNREACHABLE_MAX: Duration = Duration::from_secs(8);

pub(super) struct SourceState {
    pub(super) have: HaveMap,
    pub(super) stopped: bool,
    /// Failures since its last delivered chunk.
    pub(super) strikes: u32,
    /// Not asked before this (a pause after failures in a row).
    pub(super) paused_until: Option<Instant>,
    /// Failed dials in a row (each doubles the wait, see [`FetchOutcome::Unreachable`]).
    pub(super) unreached: u32,
    /// Not asked before this after a failed dial (unless it connects).
    pub(super) unreachable_until: Option<Instant>,
    pub(super) running: bool,
    pub(super) stats: SourceStats,
    pub(super) busy: Duration,
    /// When its workers started (for its delivered rate).
    pub(super) since: Instant,
    /// When its have-map last gained a chunk (or it was added).
    pub(super) grew_at: Instant,
}

impl SourceState {
    /// Not to be asked now: paused after failures, or waiting after a failed dial.
    pub(super) fn asleep(&self, now: Instant) -> bool {
        self.paused_until.is_some_and(|t| now < t)
            || self.unreachable_until.is_some_and(|t| now < t)
    }
}

pub(super) struct Sched {
    pub(super) have: HaveMap,
    /// `inflight[i]`: the sources chunk `i` is requested from (indexed by
    /// chunk, so the pick scan tests a slot, not a map).
    pub(super) inflight: Vec<Vec<ChunkSource>>,
    /// Chunks with at least one request in flight.
    pub(super) inflight_chunks: u32,
    /// `asked_at[i]`: when chunk `i`'s first request in flight was sent.
    pub(super) asked_at: Vec<Instant>,
    /// Mean time of a verified chunk request to a peer (moving average, s).
    pub(super) took_avg: f64,
    pub(super) avail: Vec<u32>,
    pub(super) sources: HashMap<ChunkSource, SourceState>,
    pub(super) fetched: Vec<u32>,
    pub(super) progress: Progress,
    pub(super) finished: bool,
    pub(super) failed: Option<String>,
    /// The store reported a full disk (the download stops with that error).
    pub(super) disk_full: Option<String>,
    pub(super) last_chunk: Instant,
    pub(super) started: Instant,
    pub(super) endgame: bool,
    pub(super) max_failures: u32,
    pub(super) pause: Duration,
    pub(super) max_pause: Duration,
    /// This node.
    pub(super) me: PeerId,
    /// Peers downloading this artifact that may fetch from the origin.
    pub(super) origin_peers: std::collections::BTreeSet<PeerId>,
    /// The origin is not used before this (time to hear from other downloaders).
    pub(super) origin_after: Instant,
    /// A chunk assigned to another origin peer may be fetched here after this long without progress.
    pub(super) origin_grace: Duration,
    /// State of the xorshift generator that breaks ties between equally rare chunks.
    pub(super) rng: u64,
    /// The downloaders of this artifact this node knows (itself and every
    /// source with a partial have-map), sorted: a chunk that only a seed
    /// holds is fetched from it first by its owner among them (see
    /// [`Sched::share_slot`]).
    pub(super) sharers: Vec<PeerId>,
    /// This node's place in `sharers`.
    pub(super) my_share: usize,
}

/// A random non-zero seed (the process's hash keys and the time).
pub(super) fn random_seed() -> u64 {
    std::collections::hash_map::RandomState::new().hash_one(Instant::now()) | 1
}

impl Sched {
    /// The scheduler of a download that holds `have` already, run by `me`
    /// with `opts`' policy; `started` is when the download began (its
    /// progress counts from there), `now` the current time. A pure value: no
    /// method reads the clock, every time-dependent one takes `now`.
    pub(super) fn new(
        have: HaveMap,
        progress: Progress,
        me: PeerId,
        opts: &DownloadOptions,
        started: Instant,
        now: Instant,
    ) -> Sched {
        let n = have.len() as usize;
        Sched {
            finished: have.is_complete(),
            have,
            inflight: vec![Vec::new(); n],
            inflight_chunks: 0,
            asked_at: vec![now; n],
            took_avg: 0.0,
            avail: vec![0; n],
            sources: HashMap::new(),
            fetched: Vec::new(),
            progress,
            failed: None,
            disk_full: None,
            last_chunk: now,
            started,
            endgame: opts.endgame,
            max_failures: opts.max_failures,
            pause: opts.pause,
            max_pause: opts.max_pause,
            me,
            origin_peers: Default::default(),
            origin_after: now + opts.origin_delay,
            origin_grace: opts.origin_grace,
            rng: random_seed(),
            sharers: vec![me],
            my_share: 0,
        }
    }

    /// Recomputes [`Sched::sharers`] from the live sources' have-maps.
    pub(super) fn update_sharers(&mut self) {
        let mut v: Vec<PeerId> = self
            .sources
            .iter()
            .filter_map(|(k, s)| match k {
                ChunkSource::Peer(p) if !s.stopped && !s.have.is_complete() => Some(*p),
                _ => None,
            })
            .chain(std::iter::once(self.me))
            .collect();
        v.sort_unstable();
        v.dedup();
        self.my_share = v.iter().position(|p| *p == self.me).unwrap_or(0);
        self.sharers = v;
    }

    /// Whether chunk `i` is this node's share (see [`Sched::share_slot`]).
    #[cfg(test)]
    pub(super) fn is_my_share(&self, i: u32) -> bool {
        self.share_slot(i) == self.my_share
    }

    /// The place in [`Sched::sharers`] of the downloader whose share chunk
    /// `i` is: the one to fetch it from a seed while no other downloader
    /// holds it. Seeds (complete sources) hold every chunk, and their uplink
    /// is a swarm's bottleneck: downloaders that choose at random among the
    /// chunks only a seed holds ask it for the same chunk before either has
    /// announced it, and the seed sends it twice. Split among the
    /// downloaders (the same hash on every node), each chunk leaves the seed
    /// once; a downloader takes another's share only once it is overdue
    /// ([`Sched::overdue_below`]), so no chunk waits for a slow or unknown
    /// owner, and a fast downloader does not race the owner for it.
    pub(super) fn share_slot(&self, i: u32) -> usize {
        let k = self.sharers.len().max(1) as u64;
        ((u64::from(i).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 23) % k) as usize
    }

    /// For each place in [`Sched::sharers`]: the chunks of that downloader's
    /// share with a [`share_key`] below this are overdue, and another
    /// downloader may fetch them from a seed. Each downloader fetches its
    /// share from the seeds in key order, so one that holds
    /// [`OVERDUE_AFTER`] chunks of its share with higher keys has passed
    /// (or never had, its view of the downloaders being another) the
    /// lower ones; one whose have-map gained nothing for [`STALL_AFTER`]
    /// is not fetching: its whole share is overdue. This node's own place: 0.
    pub(super) fn overdue_below(&self, now: Instant) -> Vec<u64> {
        let owners: Vec<Option<&SourceState>> = self
            .sharers
            .iter()
            .map(|p| self.sources.get(&ChunkSource::Peer(*p)))
            .collect();
        let mut held: Vec<Vec<u64>> = vec![Vec::new(); owners.len()];
        for i in 0..self.have.len() {
            let o = self.share_slot(i);
            if o != self.my_share
                && let Some(Some(s)) = owners.get(o)
                && s.have.get(i)
                && let Some(keys) = held.get_mut(o)
            {
                keys.push(share_key(i));
            }
        }
        owners
            .iter()
            .zip(held)
            .enumerate()
            .map(|(o, (s, mut keys))| match s {
                _ if o == self.my_share => 0,
                None => u64::MAX,
                Some(s) if now.saturating_duration_since(s.grew_at) >= STALL_AFTER => u64::MAX,
                Some(_) if keys.len() >= OVERDUE_AFTER => {
                    let at = keys.len() - OVERDUE_AFTER;
                    *keys.select_nth_unstable(at).1
                }
                Some(_) => 0,
            })
            .collect()
    }

    /// The other downloaders this node knows: where its have-map is pushed.
    pub(super) fn fellow_downloaders(&self) -> Vec<PeerId> {
        self.sharers
            .iter()
            .copied()
            .filter(|p| *p != self.me)
            .collect()
    }

    /// Whether a live peer source gained chunks (or appeared) within
    /// `within` before `now`: the swarm is still moving.
    pub(super) fn sources_grew_within(&self, now: Instant, within: Duration) -> bool {
        self.sources.iter().any(|(k, s)| {
            matches!(k, ChunkSource::Peer(_))
                && !s.stopped
                && now.saturating_duration_since(s.grew_at) < within
        })
    }

    pub(super) fn missing(&self) -> u32 {
        self.have.len() - self.have.count()
    }

    pub(super) fn add_source(&mut self, src: ChunkSource, have: HaveMap, now: Instant) -> bool {
        if have.len() != self.have.len() {
            return false;
        }
        match self.sources.get_mut(&src) {
            Some(s) => {
                if s.stopped {
                    return false;
                }
                if src != ChunkSource::Origin {
                    for i in 0..have.len() {
                        match (s.have.get(i), have.get(i)) {
                            (false, true) => {
                                self.avail[i as usize] += 1;
                                s.grew_at = now;
                            }
                            (true, false) => self.avail[i as usize] -= 1,
                            _ => {}
                        }
                    }
                }
                s.have = have;
            }
            None => {
                if src != ChunkSource::Origin {
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
                        unreached: 0,
                        unreachable_until: None,
                        running: false,
                        stats: SourceStats::default(),
                        busy: Duration::ZERO,
                        since: now,
                        grew_at: now,
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

    pub(super) fn stop_source(&mut self, src: ChunkSource) {
        if let ChunkSource::Peer(p) = src {
            self.origin_peers.remove(&p);
        }
        if let Some(s) = self.sources.get_mut(&src)
            && !s.stopped
        {
            s.stopped = true;
            if src != ChunkSource::Origin {
                for i in s.have.present() {
                    self.avail[i as usize] -= 1;
                }
            }
        }
        self.update_sharers();
    }

    /// For a pick from a seed: the live seeds (complete peer sources, every
    /// chunk's holders beyond them are fellow downloaders) and the fellow
    /// downloaders that are paused (not asked now, so a chunk
    /// only they hold may come from a seed).
    fn seed_view(&self, now: Instant) -> (u32, Vec<ChunkSource>) {
        let mut seeds = 0;
        let mut paused = Vec::new();
        for (k, s) in &self.sources {
            if *k == ChunkSource::Origin || s.stopped {
                continue;
            }
            if s.have.is_complete() {
                seeds += 1;
            } else if s.asleep(now) {
                paused.push(*k);
            }
        }
        (seeds, paused)
    }

    /// Whether `src` is a seed (a complete peer source) while other
    /// downloaders are known: the swarm's bottleneck, asked only for chunks
    /// no fellow downloader holds (see [`Sched::pick`]).
    pub(super) fn is_swarm_seed(&self, src: ChunkSource) -> bool {
        src != ChunkSource::Origin
            && self.sharers.len() > 1
            && self.sources.get(&src).is_some_and(|s| s.have.is_complete())
    }

    /// Whether `src` has delivered at least `rate` bytes/s since it was added
    /// (and for at least 250 ms, so one quick chunk does not count).
    pub(super) fn is_fast(&self, src: ChunkSource, rate: f64, now: Instant) -> bool {
        self.sources.get(&src).is_some_and(|s| {
            let t = now.saturating_duration_since(s.since).as_secs_f64();
            t >= 0.25 && s.stats.bytes as f64 / t >= rate
        })
    }

    /// Whether [`Sched::pick`] would answer `Stop` for `src` (done, failed, or source stopped).
    pub(super) fn pick_would_stop(&self, src: ChunkSource) -> bool {
        self.finished || self.failed.is_some() || self.sources.get(&src).is_none_or(|s| s.stopped)
    }

    /// `src` connected: if it was waiting after failed dials, it is asked
    /// again now (returns whether it was waiting). A pause after failures
    /// of its own (streams that broke, errors) stands.
    pub(super) fn reachable(&mut self, src: ChunkSource, now: Instant) -> bool {
        match self.sources.get_mut(&src) {
            Some(s) => {
                s.unreached = 0;
                s.unreachable_until.take().is_some_and(|t| now < t)
            }
            None => false,
        }
    }

    /// Whether `src` is in a pause after failures in a row, or waiting after a failed dial.
    pub(super) fn is_paused(&self, src: ChunkSource, now: Instant) -> bool {
        self.sources.get(&src).is_some_and(|s| s.asleep(now))
    }

    /// The next chunk to ask `src` for (or wait, or stop asking it).
    // long: one decision read top to bottom; the random probes, the full
    // pass and the endgame share the rank closure and the seed's view.
    pub(super) fn pick(&mut self, src: ChunkSource, now: Instant) -> Pick {
        if self.pick_would_stop(src) {
            return Pick::Stop;
        }
        if self.is_paused(src, now) {
            return Pick::Wait;
        }
        let Some(s) = self.sources.get(&src) else {
            return Pick::Stop;
        };
        let n = self.have.len();
        if n == 0 {
            return Pick::Stop;
        }
        let origin_ok = now >= self.origin_after;
        let since_chunk = now.saturating_duration_since(self.last_chunk);
        let stalled = since_chunk >= self.origin_grace;
        // No chunk for STARVING_AFTER: a seed may be asked for chunks
        // fellows are said to hold (their have-maps may be stale, or they
        // cannot be reached), rather than the download waiting on them.
        let starving = since_chunk >= STARVING_AFTER;
        // Rarest first; among the equally rare, one chosen uniformly at
        // random. Uniformly, not "the first free one from some place": such
        // walks put downloaders in step (the next free chunk after a run of
        // taken ones is the same for all of them), so they ask a seeder for
        // the same chunks and its uplink (the swarm's bottleneck) sends them
        // twice. First a few uniform random probes: a probed chunk as rare as
        // any can be (only this source has it; for the origin, no peer has
        // it) is a uniform choice among those, found without a pass over
        // every chunk. Otherwise a full pass samples the rarest (reservoir).
        // Rank: twice the holders. From a seed (a complete source, while
        // other downloaders are known), only chunks no fellow downloader
        // holds: the seeds' uplink is the swarm's bottleneck, and every chunk
        // it sends that a fellow could have sent delays one only the seeds
        // hold (each extra copy a seeder sends costs the last node its
        // time). Among those, this node's own share in key order (so the
        // others can tell which of its share it has passed), then, at random,
        // the chunks of the others' shares that are overdue (see
        // [`Sched::overdue_below`]); not the others' share before: the owner
        // would ask for it too, before either announced it.
        let seed = self.is_swarm_seed(src);
        let (seeds, paused, overdue) = match seed {
            true => {
                let (seeds, paused) = self.seed_view(now);
                (seeds, paused, self.overdue_below(now))
            }
            false => (0, Vec::new(), Vec::new()),
        };
        // The lowest rank a chunk can have from this source: the random
        // probes stop at one that low (from a seed, none: the key order).
        let floor: u64 = match src {
            ChunkSource::Origin => 0,
            ChunkSource::Peer(_) if seed => 0,
            ChunkSource::Peer(_) => 2,
        };
        let free = |this: &Self, i: u32| this.inflight[i as usize].is_empty() && !this.have.get(i);
        // The rank of a free chunk `i`, if this source may be asked for it.
        let eligible = |this: &Self, i: u32| -> Option<u64> {
            let a = this.avail[i as usize];
            // The origin only serves chunks no live peer holds, split among
            // the downloaders that may use it (each byte leaves the origin once).
            let ok = match src {
                ChunkSource::Origin => {
                    a == 0 && origin_ok && (stalled || this.origin_owner(i) == this.me)
                }
                ChunkSource::Peer(_) => s.have.get(i),
            };
            if !ok {
                return None;
            }
            if seed {
                // Fellow downloaders that hold it and may be asked (a paused one may not).
                let fellows = a.saturating_sub(seeds) as usize;
                let asleep = paused
                    .iter()
                    .filter(|k| this.sources.get(k).is_some_and(|p| p.have.get(i)))
                    .count();
                if fellows > asleep && !starving {
                    return None;
                }
                let slot = this.share_slot(i);
                if slot == this.my_share {
                    return Some(share_key(i) >> 1);
                }
                let late = overdue.get(slot).is_some_and(|&k| share_key(i) < k);
                return late.then_some(STEAL_RANK);
            }
            Some(2 * u64::from(a))
        };
        for _ in 0..PICK_PROBES * u32::from(!seed) {
            let i = (xorshift(&mut self.rng) % u64::from(n)) as u32;
            if free(self, i) && eligible(self, i).is_some_and(|r| r <= floor) {
                return self.take(i, src, now);
            }
        }
        let mut best: Option<(u32, u64)> = None;
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
            return self.take(i, src, now);
        }
        if self.endgame && !unassigned && src != ChunkSource::Origin {
            // Endgame: the oldest request that is late (in flight for twice
            // the mean request time) gets a second source. Late only: every
            // lane that falls idle near the end would otherwise duplicate a
            // request on time, and on a shared link the copies slow the
            // originals (and a seed's uplink sends chunks twice).
            let mut late = Duration::from_secs_f64((2.0 * self.took_avg).max(ENDGAME_MIN_AGE));
            // A seed's uplink may still owe other downloaders chunks only it
            // holds: it duplicates only requests twice as late.
            if seed {
                late *= 2;
            }
            // A request still unanswered four times as late (its duplicate
            // went to a source as stuck) gets a third.
            let dup = (0..n)
                .filter(|&i| {
                    let by = &self.inflight[i as usize];
                    !by.is_empty() && by.len() < 3 && !by.contains(&src) && s.have.get(i)
                })
                .map(|i| {
                    (
                        i,
                        self.asked_at[i as usize],
                        self.inflight[i as usize].len(),
                    )
                })
                .filter(|(_, t, k)| {
                    let waited = now.duration_since(*t);
                    waited >= late && (*k == 1 || waited >= late * 4)
                })
                .map(|(i, t, _)| (i, t))
                .min_by_key(|(_, t)| *t);
            if let Some((i, _)) = dup {
                self.inflight[i as usize].push(src);
                return Pick::Chunk(i);
            }
        }
        Pick::Wait
    }

    /// `src` could not be reached (see [`FetchOutcome::Unreachable`]). Its
    /// other lanes failed the same dial: one wait, not one each. With
    /// another source or two delivering, it may wait long; a download that
    /// has no other (a far node whose only holder is a busy seeder) tries it
    /// every second: a seat frees whenever the holder's manager trims, and a
    /// refusal before the handshake costs both ends little.
    fn unreachable(&mut self, src: ChunkSource, now: Instant) {
        if self
            .sources
            .get(&src)
            .is_none_or(|s| s.unreachable_until.is_some_and(|t| now < t))
        {
            return;
        }
        let others = self
            .sources
            .iter()
            .filter(|(k, o)| **k != src && o.stats.chunks > 0 && !o.stopped && !o.asleep(now))
            .count();
        let max = if others >= 2 {
            UNREACHABLE_MAX
        } else {
            UNREACHABLE_FIRST
        };
        if let Some(s) = self.sources.get_mut(&src) {
            s.stats.failures += 1;
            s.unreached += 1;
            let shift = (s.unreached - 1).min(8);
            s.unreachable_until = Some(now + UNREACHABLE_FIRST.saturating_mul(1 << shift).min(max));
        }
    }

    /// Whether any source has delivered a verified chunk yet.
    pub(super) fn any_delivered(&self) -> bool {
        self.sources.values().any(|s| s.stats.chunks > 0)
    }

    /// How long a chunk request may take before it counts as failed: ten
    /// times the mean verified request, at least [`REQUEST_LIMIT_MIN`], at
    /// most `max` (`request_timeout`, which is also the limit before any
    /// request finished). A request that hangs (a peer that stopped
    /// answering on a live connection) then frees its chunk in seconds, not
    /// at the end of a download that waits for nothing else.
    pub(super) fn request_limit(&self, max: Duration) -> Duration {
        if self.took_avg <= 0.0 {
            return max;
        }
        Duration::from_secs_f64(10.0 * self.took_avg)
            .max(REQUEST_LIMIT_MIN)
            .min(max)
    }

    /// Puts chunk `i` in flight from `src` (its first request).
    pub(super) fn take(&mut self, i: u32, src: ChunkSource, now: Instant) -> Pick {
        if self.inflight[i as usize].is_empty() {
            self.inflight_chunks += 1;
        }
        self.inflight[i as usize].push(src);
        self.asked_at[i as usize] = now;
        Pick::Chunk(i)
    }

    /// Removes `src`'s request of chunk `i`.
    pub(super) fn release(&mut self, i: u32, src: ChunkSource) {
        if let Some(by) = self.inflight.get_mut(i as usize)
            && !by.is_empty()
        {
            by.retain(|s| *s != src);
            if by.is_empty() {
                self.inflight_chunks -= 1;
            }
        }
    }

    pub(super) fn complete(
        &mut self,
        src: ChunkSource,
        i: u32,
        outcome: FetchOutcome,
        now: Instant,
    ) {
        self.release(i, src);
        let (max_failures, base_pause, max_pause) = (self.max_failures, self.pause, self.max_pause);
        let Some(s) = self.sources.get_mut(&src) else {
            return;
        };
        match outcome {
            FetchOutcome::Ok { len, took } => {
                s.strikes = 0;
                s.unreached = 0;
                if matches!(src, ChunkSource::Peer(_)) {
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
                self.last_chunk = now;
                self.progress.have_bytes += len;
                self.progress.have_chunks += 1;
                match src {
                    ChunkSource::Origin => self.progress.bytes_from_origin += len,
                    ChunkSource::Peer(_) => self.progress.bytes_from_peers += len,
                }
                if self.have.is_complete() {
                    self.finished = true;
                }
            }
            FetchOutcome::Bad => {
                s.stats.bad += 1;
                self.progress.bad_chunks += 1;
                if let ChunkSource::Peer(p) = src
                    && !s.stopped
                {
                    self.progress.banned.push(p.to_string());
                }
                self.stop_source(src);
            }
            FetchOutcome::Refused => {}
            FetchOutcome::Unreachable => self.unreachable(src, now),
            FetchOutcome::NotFound => {
                if s.have.get(i) {
                    s.have.clear(i);
                    if src != ChunkSource::Origin {
                        self.avail[i as usize] -= 1;
                    }
                }
            }
            FetchOutcome::Failed => {
                s.stats.failures += 1;
                s.strikes += 1;
                if s.strikes > max_failures {
                    s.strikes = 0;
                    match src {
                        // An origin that keeps failing (e.g. the file changed
                        // under its ETag) will not heal: drop it.
                        ChunkSource::Origin => {
                            tracing::info!("dropping the origin after repeated failures");
                            self.stop_source(src);
                        }
                        // A peer may be busy, or a connection to it closed:
                        // pause it, then ask again, for longer each time.
                        ChunkSource::Peer(peer) => {
                            let shift = s.stats.pauses.min(16);
                            let pause = base_pause.saturating_mul(1 << shift).min(max_pause);
                            s.stats.pauses += 1;
                            s.paused_until = Some(now + pause);
                            tracing::info!(%peer, ?pause, "pausing source after repeated failures");
                        }
                    }
                }
            }
        }
    }

    /// Which origin-capable downloader fetches chunk `i` from the origin.
    pub(super) fn origin_owner(&self, i: u32) -> PeerId {
        let k = self.origin_peers.len() as u64 + u64::from(!self.origin_peers.contains(&self.me));
        let slot = (u64::from(i).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 17) % k.max(1);
        std::iter::once(self.me)
            .chain(self.origin_peers.iter().copied())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .nth(slot as usize)
            .unwrap_or(self.me)
    }

    pub(super) fn snapshot(&mut self, now: Instant) -> Progress {
        self.progress.peers = self
            .sources
            .iter()
            .filter(|(k, s)| {
                matches!(k, ChunkSource::Peer(_)) && !s.stopped && s.running && !s.asleep(now)
            })
            .count();
        self.progress.elapsed_ms = now.saturating_duration_since(self.started).as_millis() as u64;
        self.progress.clone()
    }
}

/// Shortest time a request is in flight before the endgame asks a second source.
pub(super) const ENDGAME_MIN_AGE: f64 = 0.25;

/// The order in which a downloader fetches its share from a seed (see
/// [`Sched::overdue_below`]): a hash, so shares are not fetched front to back.
pub(super) fn share_key(i: u32) -> u64 {
    u64::from(i)
        .wrapping_mul(0xd6e8_feb8_6659_fd93)
        .rotate_right(29)
}

/// Rank of a chunk of another downloader's share taken from a seed: after
/// every chunk of this node's own share (those rank `share_key >> 1`).
const STEAL_RANK: u64 = 1 << 63;

/// Chunks of its share with higher keys a downloader holds before its lower
/// ones still missing count as overdue (more than its requests in flight,
/// which finish out of order).
pub(super) const OVERDUE_AFTER: usize = 12;

/// A downloader whose have-map gained nothing for this long is not
/// fetching its share: others may fetch it from a seed.
pub(super) const STALL_AFTER: Duration = Duration::from_secs(3);

/// Shortest limit [`Sched::request_limit`] gives a chunk request.
pub(super) const REQUEST_LIMIT_MIN: Duration = Duration::from_secs(5);

/// A download that gained no chunk for this long may ask a seed for
/// anything it lacks, fellows' chunks included.
pub(super) const STARVING_AFTER: Duration = Duration::from_secs(5);

/// Random probes [`Sched::pick`] makes before a full pass over the chunks.
pub(super) const PICK_PROBES: u32 = 32;

/// xorshift64: cheap, and random enough to keep downloaders out of step.
pub(super) fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn sched(n: u32) -> Sched {
        let now = Instant::now();
        let opts = DownloadOptions {
            endgame: false,
            origin_delay: Duration::ZERO,
            ..DownloadOptions::default()
        };
        let mut s = Sched::new(
            HaveMap::new(n),
            Progress::default(),
            PeerId::random(),
            &opts,
            now,
            now,
        );
        s.sharers.clear();
        s
    }

    fn have(n: u32, which: impl Iterator<Item = u32>) -> HaveMap {
        let mut h = HaveMap::new(n);
        for i in which {
            h.set(i);
        }
        h
    }

    #[test]
    fn a_swarm_that_still_grows_is_not_stalled() {
        let n = 8;
        let mut s = sched(n);
        let t0 = Instant::now();
        let wait = Duration::from_secs(20);
        let fellow = ChunkSource::Peer(PeerId::random());
        // A fellow downloader heard of with nothing yet: that is news.
        s.add_source(fellow, HaveMap::new(n), t0);
        assert!(s.sources_grew_within(t0 + wait / 2, wait));
        // The same have-map again is not.
        s.add_source(fellow, HaveMap::new(n), t0 + wait);
        assert!(!s.sources_grew_within(t0 + wait * 2, wait));
        // One more chunk is.
        let mut h = HaveMap::new(n);
        h.set(3);
        s.add_source(fellow, h, t0 + wait * 2);
        assert!(s.sources_grew_within(t0 + wait * 2 + wait / 2, wait));
        assert!(!s.sources_grew_within(t0 + wait * 4, wait));
    }

    #[test]
    fn a_single_source_gets_every_chunk_once() {
        let n = 1000;
        let mut s = sched(n);
        let p = ChunkSource::Peer(PeerId::random());
        assert!(s.add_source(p, HaveMap::full(n), Instant::now()));
        let mut seen = HashSet::new();
        for _ in 0..n {
            match s.pick(p, Instant::now()) {
                Pick::Chunk(i) => assert!(seen.insert(i), "chunk {i} picked twice"),
                _ => panic!("a chunk was left"),
            }
        }
        assert!(
            matches!(s.pick(p, Instant::now()), Pick::Wait),
            "nothing left to ask for"
        );
    }

    #[test]
    fn the_rarest_come_first_and_are_chosen_uniformly() {
        // Chunks 0..100 are held by two peers, 100..200 by `a` alone; no
        // one holds chunk 200 (neither is a seed, whose picks follow the
        // downloaders' shares instead).
        let n = 201;
        let (a, b) = (
            ChunkSource::Peer(PeerId::random()),
            ChunkSource::Peer(PeerId::random()),
        );
        let mut firsts = HashSet::new();
        for _ in 0..300 {
            let mut s = sched(n);
            s.add_source(a, have(n, 0..200), Instant::now());
            s.add_source(b, have(n, 0..100), Instant::now());
            for _ in 0..100 {
                match s.pick(a, Instant::now()) {
                    Pick::Chunk(i) => {
                        assert!(i >= 100, "picked {i}, held by two, before a rare one")
                    }
                    _ => panic!("rare chunks were left"),
                }
            }
            // Then the common ones.
            assert!(matches!(s.pick(a, Instant::now()), Pick::Chunk(i) if i < 100));
            let mut s = sched(n);
            s.add_source(a, HaveMap::full(n), Instant::now());
            if let Pick::Chunk(i) = s.pick(a, Instant::now()) {
                firsts.insert(i);
            }
        }
        // 300 fresh downloads do not start in step: their first picks spread
        // over the file (uniform over 200 chunks gives ~155 distinct values).
        assert!(firsts.len() > 100, "first picks: {} distinct", firsts.len());
    }

    #[test]
    fn unreachable_peers_wait_once_per_dial_and_come_back_when_connected() {
        let n = 8;
        let mut s = sched(n);
        let p = ChunkSource::Peer(PeerId::random());
        s.add_source(p, HaveMap::full(n), Instant::now());
        let t0 = Instant::now();
        // Four lanes ask at once; the one dial fails for all four.
        let picks: Vec<u32> = (0..4)
            .map(|_| match s.pick(p, t0) {
                Pick::Chunk(i) => i,
                _ => panic!("not asked"),
            })
            .collect();
        for i in picks {
            s.complete(p, i, FetchOutcome::Unreachable, t0);
        }
        assert_eq!(s.inflight_chunks, 0, "the chunks are free for others");
        assert!(
            matches!(s.pick(p, t0), Pick::Wait),
            "waits after a failed dial"
        );
        assert!(!s.pick_would_stop(p));
        assert_eq!(s.sources[&p].stats.failures, 1, "one dial, one failure");
        assert_eq!(s.sources[&p].stats.pauses, 0, "no pause held against it");
        // The only source: tried again every UNREACHABLE_FIRST, never stopped.
        let mut now = t0;
        let dial_again = |s: &mut Sched, now: Instant| {
            let Pick::Chunk(i) = s.pick(p, now) else {
                panic!("asked again after the wait")
            };
            s.complete(p, i, FetchOutcome::Unreachable, now);
            s.sources[&p].unreachable_until.map(|t| t - now)
        };
        for _ in 0..5 {
            now += UNREACHABLE_MAX;
            assert_eq!(dial_again(&mut s, now), Some(UNREACHABLE_FIRST));
        }
        // With two other sources that deliver, the wait doubles up to
        // UNREACHABLE_MAX (counted afresh once the peer connected in between).
        for _ in 0..2 {
            let q = ChunkSource::Peer(PeerId::random());
            s.add_source(q, HaveMap::full(n), now);
            now += UNREACHABLE_MAX;
            assert_eq!(dial_again(&mut s, now), Some(UNREACHABLE_FIRST));
            if let Some(st) = s.sources.get_mut(&q) {
                st.stats.chunks = 1;
            }
        }
        assert!(s.reachable(p, now), "was waiting");
        let mut waits = Vec::new();
        for _ in 0..30 {
            now += UNREACHABLE_MAX;
            waits.push(dial_again(&mut s, now));
        }
        assert_eq!(waits[0], Some(UNREACHABLE_FIRST));
        assert_eq!(waits[1], Some(UNREACHABLE_FIRST * 2));
        assert_eq!(waits[29], Some(UNREACHABLE_MAX));
        assert!(matches!(s.pick(p, now), Pick::Wait));
        // It connects: asked at once.
        assert!(s.reachable(p, now));
        assert!(matches!(s.pick(p, now), Pick::Chunk(_)));
        assert!(!s.reachable(p, now), "was not waiting any more");
    }

    #[test]
    fn failing_peers_are_paused_then_asked_again_and_the_origin_dropped() {
        let n = 8;
        let mut s = sched(n);
        let p = ChunkSource::Peer(PeerId::random());
        s.add_source(p, HaveMap::full(n), Instant::now());
        let fail = |s: &mut Sched, src: ChunkSource, times: u32| {
            for _ in 0..times {
                let Pick::Chunk(i) = s.pick(src, Instant::now()) else {
                    panic!("{src:?} was not asked");
                };
                s.complete(src, i, FetchOutcome::Failed, Instant::now());
            }
        };
        // Failures with a delivered chunk between them do not add up.
        fail(&mut s, p, 8);
        let Pick::Chunk(i) = s.pick(p, Instant::now()) else {
            panic!("not asked")
        };
        s.complete(
            p,
            i,
            FetchOutcome::Ok {
                len: 1,
                took: Duration::from_millis(1),
            },
            Instant::now(),
        );
        fail(&mut s, p, 8);
        let Pick::Chunk(i) = s.pick(p, Instant::now()) else {
            panic!("8 in a row: still asked")
        };
        // A ninth in a row: paused, not stopped, and not counted as a live peer.
        s.complete(p, i, FetchOutcome::Failed, Instant::now());
        assert_eq!(s.inflight_chunks, 0, "every request answered");
        assert!(matches!(s.pick(p, Instant::now()), Pick::Wait), "paused");
        assert!(!s.pick_would_stop(p));
        assert_eq!(s.snapshot(Instant::now()).peers, 0);
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
        s.add_source(ChunkSource::Origin, HaveMap::full(n), Instant::now());
        fail(&mut s, ChunkSource::Origin, 9);
        assert!(matches!(
            s.pick(ChunkSource::Origin, Instant::now()),
            Pick::Stop
        ));
    }

    #[test]
    fn from_a_seed_this_nodes_share_comes_first_in_key_order_then_the_others_when_overdue() {
        let n = 400;
        let mut s = sched(n);
        let seed = ChunkSource::Peer(PeerId::random());
        s.add_source(seed, HaveMap::full(n), Instant::now());
        // Three fellow downloaders with nothing yet, and one that holds 0..10.
        for _ in 0..3 {
            s.add_source(
                ChunkSource::Peer(PeerId::random()),
                HaveMap::new(n),
                Instant::now(),
            );
        }
        let holder = ChunkSource::Peer(PeerId::random());
        s.add_source(holder, have(n, 0..10), Instant::now());
        assert_eq!(s.sharers.len(), 5, "this node and four partial sources");
        let mine: HashSet<u32> = (10..n).filter(|&i| s.is_my_share(i)).collect();
        assert!(
            (40..120).contains(&mine.len()),
            "about a fifth of 390: {}",
            mine.len()
        );
        let mut picks = Vec::new();
        while let Pick::Chunk(i) = s.pick(seed, Instant::now()) {
            picks.push(i);
        }
        assert_eq!(
            picks.len(),
            mine.len(),
            "own share only: the others fetch theirs"
        );
        assert!(picks.iter().all(|i| mine.contains(i)), "own share first");
        assert!(
            picks.windows(2).all(|w| share_key(w[0]) < share_key(w[1])),
            "in key order"
        );
        // The others gain nothing for STALL_AFTER: their shares are overdue.
        let later = Instant::now() + STALL_AFTER;
        let mut rest = Vec::new();
        while let Pick::Chunk(i) = s.pick(seed, later) {
            rest.push(i);
        }
        assert_eq!(
            picks.len() + rest.len(),
            390,
            "every chunk no fellow holds, once"
        );
        assert!(
            rest.iter().all(|&i| i >= 10 && !mine.contains(&i)),
            "then the others' share; never what a fellow holds"
        );
        // Another node, with the same downloaders, owns other chunks: the
        // shares split the chunks (the same hash everywhere).
        let mut t = sched(n);
        t.me = s.sharers[(s.my_share + 1) % s.sharers.len()];
        t.add_source(seed, HaveMap::full(n), Instant::now());
        for p in s.sharers.clone() {
            if p != t.me {
                t.add_source(ChunkSource::Peer(p), HaveMap::new(n), Instant::now());
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
            ChunkSource::Peer(PeerId::random()),
            ChunkSource::Peer(PeerId::random()),
        );
        s.add_source(a, HaveMap::full(n), Instant::now());
        s.add_source(b, HaveMap::full(n), Instant::now());
        for _ in 0..n {
            assert!(matches!(s.pick(a, Instant::now()), Pick::Chunk(_)));
        }
        // Every chunk is in flight, none late yet: b waits.
        assert!(
            matches!(s.pick(b, Instant::now()), Pick::Wait),
            "nothing late"
        );
        // Requests take 100 ms on average: late is twice that (at least 250 ms).
        s.took_avg = 0.1;
        let now = Instant::now();
        s.asked_at[1] = now - Duration::from_millis(400);
        s.asked_at[3] = now - Duration::from_millis(900);
        s.asked_at[0] = now - Duration::from_millis(200);
        assert!(
            matches!(s.pick(b, Instant::now()), Pick::Chunk(3)),
            "the oldest late one"
        );
        assert!(matches!(s.pick(b, Instant::now()), Pick::Chunk(1)));
        assert!(
            matches!(s.pick(b, Instant::now()), Pick::Wait),
            "chunk 0 is not late"
        );
        // A third source: chunk 1 (asked of a and b 400 ms ago) is not late
        // enough for a third copy; chunk 3, four times as late, is.
        let c = ChunkSource::Peer(PeerId::random());
        s.add_source(c, HaveMap::full(n), Instant::now());
        assert!(matches!(s.pick(c, Instant::now()), Pick::Wait));
        s.asked_at[3] = Instant::now() - Duration::from_millis(1100);
        assert!(matches!(s.pick(c, Instant::now()), Pick::Chunk(3)));
        assert!(matches!(s.pick(c, Instant::now()), Pick::Wait));
        s.release(3, c);
        // The first copy wins; the second is a duplicate.
        let ok = || FetchOutcome::Ok {
            len: 1,
            took: Duration::from_millis(100),
        };
        s.complete(b, 3, ok(), Instant::now());
        s.complete(a, 3, ok(), Instant::now());
        assert_eq!(s.progress.duplicate_chunks, 1);
        assert_eq!(s.inflight_chunks, 3);
    }

    #[test]
    fn a_request_may_take_ten_times_the_mean_within_bounds() {
        let mut s = sched(4);
        let max = Duration::from_secs(30);
        assert_eq!(s.request_limit(max), max, "no request finished yet");
        s.took_avg = 0.1;
        assert_eq!(s.request_limit(max), REQUEST_LIMIT_MIN);
        s.took_avg = 1.5;
        assert_eq!(s.request_limit(max), Duration::from_secs(15));
        s.took_avg = 8.0;
        assert_eq!(s.request_limit(max), max);
    }

    #[test]
    fn a_source_is_fast_only_after_delivering_at_the_rate() {
        let mut s = sched(4);
        let p = ChunkSource::Peer(PeerId::random());
        s.add_source(p, HaveMap::full(4), Instant::now());
        assert!(!s.is_fast(p, 1.0, Instant::now()), "no bytes yet");
        if let Some(st) = s.sources.get_mut(&p) {
            st.since = Instant::now() - Duration::from_secs(1);
            st.stats.bytes = 50_000_000;
        }
        assert!(s.is_fast(p, 40e6, Instant::now()));
        assert!(!s.is_fast(p, 60e6, Instant::now()));
        assert!(
            !s.is_fast(ChunkSource::Peer(PeerId::random()), 1.0, Instant::now()),
            "unknown source"
        );
    }

    #[test]
    fn a_seed_is_asked_only_for_what_no_fellow_downloader_can_give() {
        let n = 40;
        let mut s = sched(n);
        s.endgame = true;
        s.pause = Duration::from_secs(60);
        let seed = ChunkSource::Peer(PeerId::random());
        let fellow = ChunkSource::Peer(PeerId::random());
        s.add_source(seed, HaveMap::full(n), Instant::now());
        s.add_source(fellow, have(n, 0..10), Instant::now());
        // The fellow's share too: it gains nothing for STALL_AFTER.
        let later = Instant::now() + STALL_AFTER;
        let mut from_seed = HashSet::new();
        while let Pick::Chunk(i) = s.pick(seed, later) {
            assert!(i >= 10, "the seed was asked for {i}, which a fellow holds");
            from_seed.insert(i);
        }
        assert_eq!(from_seed.len(), 30);
        // A download that gains nothing for STARVING_AFTER asks the seed
        // for the fellow's chunks too (the fellow's map may be stale).
        let starving = Instant::now() + STARVING_AFTER;
        let Pick::Chunk(j) = s.pick(seed, starving) else {
            panic!("a starving download did not ask the seed")
        };
        assert!(j < 10, "asked the seed for {j}");
        s.complete(seed, j, FetchOutcome::Refused, Instant::now());
        // The fellow's chunks come from the fellow.
        let Pick::Chunk(i) = s.pick(fellow, Instant::now()) else {
            panic!("the fellow was not asked")
        };
        assert!(i < 10);
        // A lying have-map: the fellow does not have chunk `i` after all.
        // Its bit is cleared and the seed may be asked for it.
        s.complete(fellow, i, FetchOutcome::NotFound, Instant::now());
        assert!(matches!(s.pick(seed, later), Pick::Chunk(j) if j == i));
        // A fellow that keeps failing is paused: while it sleeps, the seed
        // serves what only it held.
        let mut failed = 0;
        while let Pick::Chunk(j) = s.pick(fellow, Instant::now()) {
            s.complete(fellow, j, FetchOutcome::Failed, Instant::now());
            failed += 1;
        }
        assert_eq!(failed, 9, "paused after 8 failures in a row");
        let Pick::Chunk(j) = s.pick(seed, later) else {
            panic!("a paused fellow's chunk was not asked of the seed")
        };
        assert!(j < 10 && j != i);
        // A fellow that leaves (banned, stopped): the seed serves the rest.
        let mut t = sched(n);
        t.add_source(seed, HaveMap::full(n), Instant::now());
        t.add_source(fellow, have(n, 0..10), Instant::now());
        t.stop_source(fellow);
        let mut got = 0;
        while let Pick::Chunk(_) = t.pick(seed, later) {
            got += 1;
        }
        assert_eq!(got, n, "every chunk from the seed once the fellow is gone");
    }

    #[test]
    fn in_the_endgame_a_seed_duplicates_only_very_late_requests_and_a_lost_source_is_replaced() {
        let n = 4;
        let mut s = sched(n);
        s.endgame = true;
        let seed = ChunkSource::Peer(PeerId::random());
        let fellow = ChunkSource::Peer(PeerId::random());
        let other = ChunkSource::Peer(PeerId::random());
        s.add_source(seed, HaveMap::full(n), Instant::now());
        s.add_source(fellow, HaveMap::full(n), Instant::now());
        // `fellow` is complete too (a second seed); `other` is a downloader
        // holding nothing, so seeds are asked as seeds.
        s.add_source(other, HaveMap::new(n), Instant::now());
        assert_eq!(s.sharers.len(), 2);
        // `other` gains nothing for STALL_AFTER: its share may come from seeds.
        let now = Instant::now() + STALL_AFTER;
        let Pick::Chunk(a) = s.pick(fellow, now) else {
            panic!("not asked")
        };
        while let Pick::Chunk(_) = s.pick(fellow, now) {}
        assert_eq!(
            s.inflight_chunks, n,
            "everything is in flight from `fellow`"
        );
        s.took_avg = 0.1;
        s.asked_at[a as usize] = now - Duration::from_millis(300);
        assert!(
            matches!(s.pick(seed, now), Pick::Wait),
            "late, but not twice as late: a seed waits"
        );
        s.asked_at[a as usize] = now - Duration::from_millis(600);
        assert!(matches!(s.pick(seed, now), Pick::Chunk(j) if j == a));
        // `fellow` disappears in the endgame (banned): its requests fail and
        // go back to the pool; the seed takes them.
        s.stop_source(fellow);
        for i in 0..n {
            s.complete(fellow, i, FetchOutcome::Failed, now);
        }
        assert!(matches!(s.pick(fellow, now), Pick::Stop));
        let mut got = HashSet::new();
        while let Pick::Chunk(i) = s.pick(seed, now) {
            got.insert(i);
        }
        assert_eq!(got.len(), n as usize - 1, "the rest, each once");
        assert!(!got.contains(&a), "still in flight from the seed");
    }

    #[test]
    fn another_downloaders_share_is_taken_from_a_seed_only_below_what_it_has_passed() {
        let n = 600;
        let mut s = sched(n);
        let seed = ChunkSource::Peer(PeerId::random());
        let other = PeerId::random();
        s.add_source(seed, HaveMap::full(n), Instant::now());
        s.add_source(ChunkSource::Peer(other), HaveMap::new(n), Instant::now());
        let slot = s.sharers.iter().position(|p| *p == other).unwrap_or(0);
        let mut theirs: Vec<u32> = (0..n).filter(|&i| s.share_slot(i) == slot).collect();
        theirs.sort_by_key(|&i| share_key(i));
        assert!(theirs.len() > 200, "about half: {}", theirs.len());
        // This node has its own share already.
        let mine: Vec<u32> = (0..n).filter(|&i| s.is_my_share(i)).collect();
        for i in mine {
            s.have.set(i);
        }
        // The other fetched its share up to 100 in key order, but skipped
        // 20, 21 and 22 (or fetched them elsewhere, unannounced); it also
        // holds 5 chunks far ahead (requests finished out of order).
        let mut held: Vec<u32> = theirs[..100].to_vec();
        held.retain(|i| ![theirs[20], theirs[21], theirs[22]].contains(i));
        held.extend_from_slice(&theirs[150..155]);
        s.add_source(
            ChunkSource::Peer(other),
            have(n, held.into_iter()),
            Instant::now(),
        );
        let mut got = HashSet::new();
        while let Pick::Chunk(i) = s.pick(seed, Instant::now()) {
            got.insert(i);
        }
        // Only the skipped ones: everything from 100 on may be in flight
        // there (the 5 ahead are fewer than OVERDUE_AFTER).
        let want: HashSet<u32> = [theirs[20], theirs[21], theirs[22]].into();
        assert_eq!(got, want);
        // A downloader that gains nothing for STALL_AFTER: all of its share.
        let later = Instant::now() + STALL_AFTER;
        let mut more = 0;
        while let Pick::Chunk(i) = s.pick(seed, later) {
            assert!(!got.contains(&i));
            more += 1;
        }
        assert_eq!(more, theirs.len() - 105, "the rest of its share");
    }
}
