//! The download driver: the async IO around the [`Sched`]uler. It looks for
//! the manifest ([`super::manifest`]), learns sources from mesh events, runs
//! one worker per request slot (fetch, verify, store), announces progress,
//! and counts every chunk fetch in the [`Metrics`] it was handed.

use super::manifest::find_manifest;
use super::sched::{ChunkSource, FetchOutcome, Pick, Sched, random_seed, xorshift};
use super::{DownloadOptions, DownloadReport, Phase, Progress, SourceStats, initial_progress};
use crate::mesh::client::{Client, MeshEvent};
use crate::mesh::origin::Origin;
use crate::mesh::wire::{self, ChunkRequest, ChunkStatus};
use crate::mesh::{MeshError, blocking};
use crate::metrics::Metrics;
use crate::store::{ArtifactId, ArtifactStatus, HaveMap, Manifest, StoreError};
use futures::{AsyncReadExt, AsyncWriteExt};
use libp2p::{PeerId, Stream};
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::{Notify, broadcast, watch};

struct Ctx {
    client: Client,
    id: ArtifactId,
    manifest: Arc<Manifest>,
    sched: Mutex<Sched>,
    notify: Notify,
    opts: DownloadOptions,
    origin: Option<Origin>,
    /// Where chunk fetches are counted.
    metrics: Arc<Metrics>,
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
    metrics: &Arc<Metrics>,
) -> Result<DownloadReport, MeshError> {
    let deadline = FindDeadline::after(opts.find_timeout);
    download_until(client, id, origin_url, opts, progress, &deadline, metrics).await
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

    pub(super) fn passed(&self) -> bool {
        Instant::now() >= *self.0.lock()
    }
}

/// [`download`] with a deadline for finding the manifest that others may extend.
// long: (~330 lines), kept whole: one task whose select loop
// shares its locals (event receiver, have-map timers, peers told and asked)
// between branches; splitting it needs a state struct (a follow-up).
pub async fn download_until(
    client: &Client,
    id: ArtifactId,
    origin_url: Option<String>,
    opts: &DownloadOptions,
    progress: Option<&watch::Sender<Progress>>,
    find_deadline: &FindDeadline,
    metrics: &Arc<Metrics>,
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
        sched: Mutex::new(Sched::new(
            have,
            pr,
            client.peer_id(),
            opts,
            started,
            Instant::now(),
        )),
        notify: Notify::new(),
        opts: opts.clone(),
        origin,
        metrics: metrics.clone(),
    });
    let _guard = CancelGuard(ctx.clone());
    if ctx.origin.is_some() {
        add_source(&ctx, ChunkSource::Origin, HaveMap::full(n));
    }
    let mut asked: HashSet<PeerId> = HashSet::new();
    let mut discover = tokio::time::interval(Duration::from_secs(1));
    let (prov_tx, mut prov_rx) = tokio::sync::mpsc::channel::<HashSet<PeerId>>(4);
    let kad_busy = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut kad_round = 0u64;
    // Peers whose have-map request failed (a peer at its connection cap
    // refuses newcomers), sent back after a pause and asked again, the
    // pause doubling up to ASK_AGAIN_MAX.
    let (unreachable, mut ask_again) = tokio::sync::mpsc::unbounded_channel::<PeerId>();
    let mut unreached: HashMap<PeerId, u32> = HashMap::new();
    // Fellow downloaders this node tried to link to, and when.
    let mut linking: HashMap<PeerId, Instant> = HashMap::new();
    if let Some(p) = manifest_from {
        asked.insert(p);
        query_have(&ctx, p, &unreachable, ASK_AGAIN_AFTER, true);
    }
    let mut announce = tokio::time::interval(opts.announce_every);
    let mut announced = u32::MAX;
    let mut pushed_at = Instant::now();
    // Fellow downloaders that have our have-map (see the announce tick).
    let mut told: HashSet<PeerId> = HashSet::new();
    loop {
        {
            let mut s = ctx.sched.lock();
            let p = s.snapshot(Instant::now());
            // Stalled: no chunk for stall_timeout, none in flight, and no
            // source grew either (fellow downloaders that gain chunks will
            // have some for us: a swarm that is still moving is waited for).
            let stalled = s.last_chunk.elapsed() > opts.stall_timeout
                && s.inflight.iter().all(Vec::is_empty)
                && !s.sources_grew_within(Instant::now(), opts.stall_timeout);
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
                    add_source(&ctx, ChunkSource::Peer(peer), (*have).clone());
                }
                Ok(MeshEvent::Connected(peer)) => {
                    // A source that could not be reached is asked at once.
                    if ctx.sched.lock().reachable(ChunkSource::Peer(peer), Instant::now()) {
                        ctx.notify.notify_waiters();
                    }
                    asked.insert(peer);
                    query_have(&ctx, peer, &unreachable, ASK_AGAIN_AFTER, false);
                }
                Ok(MeshEvent::Banned(peer) | MeshEvent::Disconnected(peer)) => {
                    asked.remove(&peer);
                    ctx.sched.lock().origin_peers.remove(&peer);
                    if matches!(ev, Ok(MeshEvent::Banned(_))) {
                        unreached.insert(peer, u32::MAX);
                        ctx.sched.lock().stop_source(ChunkSource::Peer(peer));
                    }
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => {
                    ctx.sched.lock().failed = Some("mesh stopped".into());
                }
            },
            Some(p) = ask_again.recv() => {
                let n = unreached.entry(p).or_default();
                if *n == u32::MAX {
                    // Banned meanwhile: not asked again.
                    continue;
                }
                *n += 1;
                // While no source delivered anything (a far node whose only
                // holder is a busy seeder), every second: a seat frees
                // whenever the holder's manager trims, and a refusal before
                // the handshake costs both ends little.
                let pause = if ctx.sched.lock().any_delivered() {
                    ASK_AGAIN_AFTER.saturating_mul(1 << (*n).min(4)).min(ASK_AGAIN_MAX)
                } else {
                    ASK_AGAIN_STARVING
                };
                query_have(&ctx, p, &unreachable, pause, false);
            },
            Some(found) = prov_rx.recv() => {
                for p in found {
                    if p != client.peer_id() && asked.insert(p) {
                        query_have(&ctx, p, &unreachable, ASK_AGAIN_AFTER, true);
                    }
                }
            },
            _ = discover.tick() => {
                let cands: HashSet<PeerId> = client.connected().await.unwrap_or_default().into_iter().collect();
                // Kademlia lookups can take seconds: run them beside the loop,
                // one at a time, and only for a download that no source has
                // delivered a chunk to after 2 s (at 2, 4, 8, 12... s): a far
                // node whose holders it has not heard of. The others find
                // their holders and fellows by gossip and from the
                // release's author. Each lookup dials the peers on its path,
                // the same few closest to the artifact's key for every
                // download of it, and finds the same seed for all: 50
                // downloads on 300 in-process nodes looking up from their
                // first second and then every 30 s took 2.6 times as long
                // (84 s against 33 s, the seed refusing 26,000 dials), and
                // on 1,000 nodes looking up every 5 s throughout opened
                // 18,000 connections in 90 s; looking up every second, a far
                // node whose only holder was full crowded out its own
                // retries of that holder.
                kad_round += 1;
                let due = !ctx.sched.lock().any_delivered()
                    && kad_round >= KAD_FIRST
                    && (kad_round.is_power_of_two() || kad_round.is_multiple_of(KAD_EVERY));
                if due
                    && !kad_busy.swap(true, std::sync::atomic::Ordering::AcqRel)
                {
                    let (c, tx, busy) = (client.clone(), prov_tx.clone(), kad_busy.clone());
                    tokio::spawn(async move {
                        let found = c.providers(id).await.unwrap_or_default();
                        let _ = tx.send(found).await;
                        busy.store(false, std::sync::atomic::Ordering::Release);
                    });
                }
                // Links to fellow downloaders heard by gossip, even those
                // with nothing yet: have-maps are pushed over connections, so
                // on a mesh of bounded connections a downloader linked to no
                // fellow would never hear who has what (BitTorrent connects
                // to swarm peers, not to pieces).
                let fellows = ctx.sched.lock().fellow_downloaders();
                let linked = fellows.iter().filter(|p| cands.contains(*p)).count();
                if linked < SWARM_LINKS {
                    let now = Instant::now();
                    linking.retain(|_, t| now.duration_since(*t) < LINK_AGAIN_AFTER);
                    let pick: Vec<PeerId> = fellows
                        .into_iter()
                        .filter(|p| !cands.contains(p) && !linking.contains_key(p))
                        .take(SWARM_LINKS - linked)
                        .collect();
                    for p in pick {
                        linking.insert(p, now);
                        query_have(&ctx, p, &unreachable, ASK_AGAIN_AFTER, true);
                    }
                }
                // No chunk for a while: the have-maps held may be stale (a
                // fellow that finished while its last announcement went
                // elsewhere); the connected peers are asked again.
                let starving = {
                    let s = ctx.sched.lock();
                    s.missing() > 0 && s.last_chunk.elapsed() >= REFRESH_HAVES_AFTER
                };
                for p in cands {
                    if p != client.peer_id() && (asked.insert(p) || starving) {
                        query_have(&ctx, p, &unreachable, ASK_AGAIN_AFTER, false);
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
                let (count, total, sharers) = {
                    let s = ctx.sched.lock();
                    (s.have.count(), s.have.len(), s.fellow_downloaders())
                };
                let first = announced == u32::MAX;
                // New chunks go out in batches of PUSH_BATCH, or at least
                // every PUSH_AT_LEAST_EVERY: each push is a request to every
                // fellow, and a download gaining a chunk or two per tick
                // (50 swarms in one process) pushed four times a second to
                // each for little news.
                let due = count != announced
                    && (first
                        || count.saturating_sub(announced) >= PUSH_BATCH
                        || count == total
                        || pushed_at.elapsed() >= PUSH_AT_LEAST_EVERY);
                let targets: Vec<PeerId> = if due {
                    sharers
                } else {
                    sharers.into_iter().filter(|p| !told.contains(p)).collect()
                };
                // (`due` covers the first push: `announced` starts at u32::MAX.)
                if due || !targets.is_empty() {
                    if due {
                        announced = count;
                        pushed_at = Instant::now();
                    }
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
                ChunkSource::Peer(p) => {
                    peers.insert(*p, v.stats.clone());
                }
                ChunkSource::Origin => origin_stats = v.stats.clone(),
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
    let mut p = ctx.sched.lock().snapshot(Instant::now());
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

/// A peer whose have-map request failed is asked again after this pause,
/// doubled after each failure in a row up to [`ASK_AGAIN_MAX`].
const ASK_AGAIN_AFTER: Duration = Duration::from_secs(2);
/// The longest pause before a failed peer is asked again.
const ASK_AGAIN_MAX: Duration = Duration::from_secs(8);
/// The pause before a failed have-map request is sent again while no source
/// delivered a chunk.
const ASK_AGAIN_STARVING: Duration = Duration::from_secs(1);
/// Fellow downloaders a download keeps a connection to (it dials those it
/// heard of while fewer are connected).
const SWARM_LINKS: usize = 4;
/// New chunks pushed to fellow downloaders in batches of this many...
const PUSH_BATCH: u32 = 4;
/// ...or at least this often while there are any.
const PUSH_AT_LEAST_EVERY: Duration = Duration::from_secs(1);
/// The first of a download's Kademlia provider lookups, in seconds (then at
/// 4 s and every [`KAD_EVERY`] s, while no source has delivered a chunk).
const KAD_FIRST: u64 = 2;
/// Seconds between a starving download's Kademlia provider lookups.
const KAD_EVERY: u64 = 4;
/// A download that gained no chunk for this long asks its connected peers
/// for their have-maps again (each second while it lasts).
const REFRESH_HAVES_AFTER: Duration = Duration::from_secs(3);

/// A fellow this node tried to link to is not tried again before this.
const LINK_AGAIN_AFTER: Duration = Duration::from_secs(10);

/// Asks `peer` for its have-map and adds it as a source; on failure (a peer
/// at its connection cap refuses newcomers) `peer` goes back to `unreachable`
/// after `pause`, to be asked again rather than never. `keep`: the peer is a
/// holder or a fellow downloader this download chose, whose connection is
/// kept as useful; else (a connected peer asked in passing) the question
/// alone does not keep it, an answer with chunks in it does.
fn query_have(
    ctx: &Arc<Ctx>,
    peer: PeerId,
    unreachable: &UnboundedSender<PeerId>,
    pause: Duration,
    keep: bool,
) {
    let ctx = ctx.clone();
    let unreachable = unreachable.clone();
    if keep {
        ctx.client.touch(peer);
    }
    tokio::spawn(async move {
        match ctx.client.have_map(peer, ctx.id).await {
            Ok(Some(have)) => {
                if have.count() > 0 {
                    ctx.client.touch(peer);
                }
                add_source(&ctx, ChunkSource::Peer(peer), have);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::debug!(%peer, error = %e, "have-map request failed");
                tokio::time::sleep(pause).await;
                let _ = unreachable.send(peer);
            }
        }
    });
}

fn add_source(ctx: &Arc<Ctx>, src: ChunkSource, have: HaveMap) {
    let start = ctx.sched.lock().add_source(src, have, Instant::now());
    if start {
        let slots = match src {
            ChunkSource::Origin => ctx.opts.origin_window,
            ChunkSource::Peer(_) => ctx.opts.window.max(ctx.opts.fast_window),
        };
        for slot in 0..slots.max(1) {
            tokio::spawn(worker(ctx.clone(), src, slot));
        }
    }
    ctx.notify.notify_waiters();
}

/// One request slot for one source: picks a chunk, fetches, verifies, stores,
/// repeats. Slots from `window` up work only while the source is fast.
// long: (~160 lines), kept whole: one request loop whose
// per-outcome bookkeeping (stream reuse, refusals, pauses) shares its locals.
async fn worker(ctx: Arc<Ctx>, src: ChunkSource, slot: usize) {
    let extra = matches!(src, ChunkSource::Peer(_)) && slot >= ctx.opts.window.max(1);
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
            if extra && !sched.is_fast(src, ctx.opts.fast_rate, Instant::now()) {
                // Idle, not stopped: the source may speed up (or the download end).
                if sched.pick_would_stop(src) {
                    Pick::Stop
                } else {
                    Pick::Wait
                }
            } else {
                sched.pick(src, Instant::now())
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
            ChunkSource::Peer(peer) => {
                // The connection is in use while a chunk is in flight: the
                // connection manager does not close it under the transfer
                // (an idle stream between chunks does not hold it).
                let _busy = ctx.client.busy(peer);
                let fut = fetch_from_peer(&ctx, peer, &mut stream, i, chunk.len, &mut buf);
                let limit = ctx.sched.lock().request_limit(ctx.opts.request_timeout);
                match tokio::time::timeout(limit, fut).await {
                    Ok(r) => r,
                    Err(_) => Err(FetchError::Failed("timed out".into())),
                }
            }
            ChunkSource::Origin => match &ctx.origin {
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
                    FetchOutcome::Ok {
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
                        Ok(Ok(())) => FetchOutcome::Ok {
                            len,
                            took: t0.elapsed(),
                        },
                        Ok(Err(StoreError::ChunkMismatch { .. })) => FetchOutcome::Bad,
                        Ok(Err(e)) => {
                            let mut s = ctx.sched.lock();
                            if MeshError::is_disk_full(&e) {
                                s.disk_full.get_or_insert_with(|| e.to_string());
                            }
                            s.failed = Some(format!("store: {e}"));
                            FetchOutcome::Failed
                        }
                        Err(e) => {
                            ctx.sched.lock().failed = Some(format!("store task: {e}"));
                            FetchOutcome::Failed
                        }
                    }
                }
            }
            Err(FetchError::Lied(reason)) => {
                tracing::warn!(?src, chunk = i, %reason, "source sent malformed data");
                FetchOutcome::Bad
            }
            Err(FetchError::NotFound) => FetchOutcome::NotFound,
            Err(FetchError::Unreachable(reason)) => {
                tracing::debug!(?src, chunk = i, %reason, "source unreachable");
                FetchOutcome::Unreachable
            }
            Err(FetchError::Refused(reason)) if refusals < MAX_REFUSALS => {
                tracing::debug!(?src, chunk = i, %reason, "fresh chunk stream refused");
                stream = None;
                refusals += 1;
                FetchOutcome::Refused
            }
            Err(FetchError::Refused(reason) | FetchError::Failed(reason)) => {
                tracing::debug!(?src, chunk = i, %reason, "chunk request failed");
                stream = None;
                FetchOutcome::Failed
            }
        };
        let bad = matches!(outcome, FetchOutcome::Bad);
        let failed = matches!(outcome, FetchOutcome::Failed);
        let refused = matches!(outcome, FetchOutcome::Refused);
        if matches!(outcome, FetchOutcome::Ok { .. }) {
            refusals = 0;
        }
        if bad {
            // Ban before the failure shows in the progress.
            match src {
                ChunkSource::Peer(peer) => {
                    tracing::warn!(%peer, chunk = i, "chunk failed verification: banning the peer");
                    let _ = ctx
                        .client
                        .ban(peer, format!("sent a corrupt chunk of {}", ctx.id.short()))
                        .await;
                }
                ChunkSource::Origin => tracing::warn!(chunk = i, "origin sent a corrupt chunk"),
            }
        }
        report_fetch(&ctx.metrics, src, &outcome);
        ctx.sched.lock().complete(src, i, outcome, Instant::now());
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

enum FetchError {
    /// The source does not hold the chunk.
    NotFound,
    /// A stream opened for this request was closed before the answer began.
    /// libp2p-stream hands inbound streams to the provider through a channel
    /// with room for one: a peer that receives several new streams at once
    /// (many downloaders starting together) drops the others, and the writer
    /// sees "connection is closed". Not a failure of the peer: asked again.
    Refused(String),
    /// No stream could be opened: the peer is not connected and the dial
    /// failed (most often a holder at its connection bound). Asked again
    /// after a pause, or once it connects; not held against the peer.
    Unreachable(String),
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
    // Each chunk keeps the connection useful to the connection manager.
    ctx.client.touch(peer);
    let fresh = stream.is_none();
    let s =
        match stream {
            Some(s) => s,
            None => stream.insert(ctx.client.open_chunk_stream(peer).await.map_err(
                |e| match e {
                    MeshError::Dial(reason) => FetchError::Unreachable(reason),
                    e => FetchError::Failed(e.to_string()),
                },
            )?),
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

/// Counts a finished chunk fetch in `metrics` (by source and outcome).
fn report_fetch(metrics: &Metrics, src: ChunkSource, outcome: &FetchOutcome) {
    use crate::metrics::{Outcome as M, Source as S};
    let source = match src {
        ChunkSource::Peer(_) => S::Peer,
        ChunkSource::Origin => S::Origin,
    };
    let (o, bytes, secs) = match outcome {
        FetchOutcome::Ok { len, took } => (M::Ok, *len, took.as_secs_f64()),
        FetchOutcome::Bad => (M::BadHash, 0, 0.0),
        FetchOutcome::Failed | FetchOutcome::Refused | FetchOutcome::Unreachable => {
            (M::Failed, 0, 0.0)
        }
        FetchOutcome::NotFound => return,
    };
    metrics.chunk_fetch(source, o, bytes, secs);
}
