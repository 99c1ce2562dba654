//! The mesh tier: KV blocks fetched from neighbours over `/shoal/kv/1`
//! (a libp2p stream protocol on the mesh's swarm), with an explicit trust
//! policy.
//!
//! # Protocol (version 1)
//!
//! Request: `SKV1` ‖ op `1` (run) ‖ `n: u16 LE` ‖ `n` block keys (32 bytes each).
//! Response: `m: u16 LE` (the longest run of the requested keys, from the
//! first, that the peer holds and produced itself; `m ≤ n`), then per block:
//! `len: u32 LE` ‖ the KV blob (`SHOAL-KV` format) ‖ the producer's
//! protobuf-encoded public key (`u16 LE` length ‖ bytes) ‖ `sig_len: u16 LE`
//! ‖ the signature over `"shoal-kv-sig-v1" ‖ key ‖ BLAKE3(blob)`.
//!
//! # Trust policy
//!
//! KV from a neighbour cannot be checked by hashing (the key hashes the
//! inputs, not the outputs), so:
//!
//! 1. Only authenticated mesh members are asked: streams run over the mesh's
//!    Noise-authenticated (and, with a PSK, private) connections, after its
//!    allow-list and ban list.
//! 2. Every block is signed by its producer's libp2p identity key, and the
//!    producer must be the peer that sent it: a node serves only blocks it
//!    computed itself (blocks it fetched are kept in RAM only and never
//!    re-served), so a liar cannot pass off or launder anyone else's KV.
//! 3. Spot checks: the engine recomputes the first block it takes from a
//!    peer it has not checked yet, and afterwards one block of a fetched run
//!    with probability [`SPOT_CHECK_P`]; keys and values must match within a
//!    relative L2 error of [`SPOT_CHECK_TOL`]. A mismatch bans the peer on the
//!    mesh and drops every block it sent; the request recomputes.

use super::{BlockKey, PrefixCache};
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::identity::{Keypair, PublicKey};
use libp2p::{PeerId, StreamProtocol};
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

/// The protocol name.
pub const KV_PROTOCOL: StreamProtocol = StreamProtocol::new("/shoal/kv/1");
/// Probability of spot-checking a run from an already checked peer.
pub const SPOT_CHECK_P: f64 = 0.1;
/// Largest accepted relative L2 error between fetched and recomputed KV.
pub const SPOT_CHECK_TOL: f32 = 0.05;
const MAGIC: &[u8; 4] = b"SKV1";
const SIG_DOMAIN: &[u8] = b"shoal-kv-sig-v1";
const MAX_RUN: usize = 1024;
const MAX_BLOB: usize = 64 << 20;
/// Time allowed for one peer's answer.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// A block fetched from a peer.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// Its key.
    pub key: BlockKey,
    /// The KV blob.
    pub blob: Arc<Vec<u8>>,
    /// The peer that produced and sent it.
    pub peer: PeerId,
}

fn sig_message(key: &BlockKey, blob: &[u8]) -> Vec<u8> {
    let mut m = SIG_DOMAIN.to_vec();
    m.extend_from_slice(&key.0);
    m.extend_from_slice(blake3::hash(blob).as_bytes());
    m
}

/// The mesh tier of one node: serves its own blocks and fetches others'.
pub struct MeshTier {
    control: libp2p_stream::Control,
    mesh: crate::mesh::Client,
    rt: tokio::runtime::Handle,
    /// Peers whose KV passed a spot check.
    checked: Mutex<HashSet<PeerId>>,
    /// Blocks taken from each peer (dropped if it is caught lying).
    taken: Mutex<HashMap<PeerId, Vec<BlockKey>>>,
    /// Peers caught lying.
    pub banned: Mutex<HashSet<PeerId>>,
    /// Test hook: serve perturbed (but validly signed) KV.
    #[doc(hidden)]
    pub test_lie: bool,
}

impl std::fmt::Debug for MeshTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshTier").finish_non_exhaustive()
    }
}

async fn read_exact(s: &mut libp2p::Stream, n: usize) -> std::io::Result<Vec<u8>> {
    let mut b = vec![0u8; n];
    s.read_exact(&mut b).await?;
    Ok(b)
}

async fn read_u16(s: &mut libp2p::Stream) -> std::io::Result<usize> {
    let b = read_exact(s, 2).await?;
    Ok(u16::from_le_bytes([b[0], b[1]]) as usize)
}

fn bad(m: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_owned())
}

/// Flips the sign of every other f16 of a blob's payload and re-seals its
/// checksum: well-formed, validly signed, wrong KV (the lying-peer test hook).
fn perturb(blob: &[u8]) -> Vec<u8> {
    let mut b = blob.to_vec();
    let end = b.len().saturating_sub(32);
    let mut i = 76 + 1;
    while i < end {
        b[i] ^= 0x80;
        i += 4;
    }
    let sum = blake3::hash(&b[..end]);
    b.truncate(end);
    b.extend_from_slice(sum.as_bytes());
    b
}

impl MeshTier {
    /// Starts serving `cache`'s own blocks on the mesh and returns the tier.
    /// Must be called within a tokio runtime.
    pub fn start(
        mesh: crate::mesh::Client,
        cache: Arc<PrefixCache>,
        test_lie: bool,
    ) -> Result<Arc<MeshTier>, String> {
        let rt = tokio::runtime::Handle::try_current().map_err(|e| e.to_string())?;
        let keypair = mesh
            .config()
            .keypair
            .clone()
            .ok_or_else(|| "the mesh has no identity key".to_owned())?;
        let mut control = mesh.stream_control();
        let incoming = control.accept(KV_PROTOCOL).map_err(|e| e.to_string())?;
        let tier = Arc::new(MeshTier {
            control,
            mesh,
            rt: rt.clone(),
            checked: Mutex::new(HashSet::new()),
            taken: Mutex::new(HashMap::new()),
            banned: Mutex::new(HashSet::new()),
            test_lie,
        });
        let weak_cache = Arc::downgrade(&cache);
        rt.spawn(serve(incoming, weak_cache, keypair, test_lie));
        Ok(tier)
    }

    /// Asks connected peers, one after the other, for the longest run of
    /// `keys` from the first; returns the first non-empty verified run.
    /// Blocking: call from a non-async thread.
    pub fn fetch_run(&self, keys: &[BlockKey]) -> Vec<Fetched> {
        if keys.is_empty() {
            return Vec::new();
        }
        let keys = &keys[..keys.len().min(MAX_RUN)];
        self.rt.block_on(async {
            let peers = self.mesh.connected().await.unwrap_or_default();
            for peer in peers {
                if self.banned.lock().contains(&peer) {
                    continue;
                }
                match tokio::time::timeout(FETCH_TIMEOUT, self.ask(peer, keys)).await {
                    Ok(Ok(run)) if !run.is_empty() => return run,
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "kv fetch failed"),
                    Err(_) => tracing::debug!(%peer, "kv fetch timed out"),
                }
            }
            Vec::new()
        })
    }

    async fn ask(&self, peer: PeerId, keys: &[BlockKey]) -> std::io::Result<Vec<Fetched>> {
        let mut control = self.control.clone();
        let mut s = control
            .open_stream(peer, KV_PROTOCOL)
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let mut req = MAGIC.to_vec();
        req.push(1);
        req.extend_from_slice(&(keys.len() as u16).to_le_bytes());
        for k in keys {
            req.extend_from_slice(&k.0);
        }
        s.write_all(&req).await?;
        s.flush().await?;
        let m = read_u16(&mut s).await?;
        if m > keys.len() {
            return Err(bad("peer sent more blocks than asked"));
        }
        let mut out = Vec::with_capacity(m);
        for key in &keys[..m] {
            let len = {
                let b = read_exact(&mut s, 4).await?;
                u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize
            };
            if len > MAX_BLOB {
                return Err(bad("block too large"));
            }
            let blob = read_exact(&mut s, len).await?;
            let pk_len = read_u16(&mut s).await?;
            let pk = read_exact(&mut s, pk_len).await?;
            let sig_len = read_u16(&mut s).await?;
            let sig = read_exact(&mut s, sig_len).await?;
            let pk = PublicKey::try_decode_protobuf(&pk).map_err(|_| bad("bad public key"))?;
            if pk.to_peer_id() != peer {
                return Err(bad("block not produced by the peer that sent it"));
            }
            if !pk.verify(&sig_message(key, &blob), &sig) {
                return Err(bad("bad block signature"));
            }
            crate::inference::KvCache::inspect(&blob).map_err(|e| bad(&e.to_string()))?;
            out.push(Fetched {
                key: *key,
                blob: Arc::new(blob),
                peer,
            });
        }
        Ok(out)
    }

    /// True if a run from `peer` must be spot-checked now (always for a
    /// peer not yet checked, else with probability [`SPOT_CHECK_P`]).
    pub fn needs_check(&self, peer: &PeerId) -> bool {
        if !self.checked.lock().contains(peer) {
            return true;
        }
        let mut b = [0u8; 8];
        if getrandom::fill(&mut b).is_err() {
            return true;
        }
        (u64::from_le_bytes(b) as f64 / u64::MAX as f64) < SPOT_CHECK_P
    }

    /// True once a spot check of `peer` passed.
    pub fn is_checked(&self, peer: &PeerId) -> bool {
        self.checked.lock().contains(peer)
    }

    /// Records the outcome of a spot check of `peer`.
    pub fn passed(&self, peer: PeerId) {
        self.checked.lock().insert(peer);
    }

    /// Records blocks taken from `peer`.
    pub fn took(&self, peer: PeerId, keys: impl IntoIterator<Item = BlockKey>) {
        self.taken.lock().entry(peer).or_default().extend(keys);
    }

    /// A spot check failed: bans `peer` on the mesh and drops its blocks from `cache`.
    pub fn caught(&self, peer: PeerId, cache: &PrefixCache) {
        tracing::warn!(%peer, "KV spot check failed: banning the peer and dropping its blocks");
        self.banned.lock().insert(peer);
        self.checked.lock().remove(&peer);
        for k in self.taken.lock().remove(&peer).unwrap_or_default() {
            cache.remove(&k);
        }
        let mesh = self.mesh.clone();
        self.rt.spawn(async move {
            if let Err(e) = mesh.ban(peer, "served wrong KV (spot check)").await {
                tracing::warn!(%peer, error = %e, "ban failed");
            }
        });
    }
}

async fn serve(
    mut incoming: libp2p_stream::IncomingStreams,
    cache: std::sync::Weak<PrefixCache>,
    keypair: Keypair,
    lie: bool,
) {
    let pk = keypair.public().encode_protobuf();
    while let Some((peer, stream)) = incoming.next().await {
        let Some(cache) = cache.upgrade() else {
            return;
        };
        let (kp, pk) = (keypair.clone(), pk.clone());
        tokio::spawn(async move {
            if let Err(e) = answer(stream, &cache, &kp, &pk, lie).await {
                tracing::debug!(%peer, error = %e, "kv request failed");
            }
        });
    }
}

async fn answer(
    mut s: libp2p::Stream,
    cache: &Arc<PrefixCache>,
    kp: &Keypair,
    pk: &[u8],
    lie: bool,
) -> std::io::Result<()> {
    let head = read_exact(&mut s, 5).await?;
    if &head[..4] != MAGIC || head[4] != 1 {
        return Err(bad("not a kv/1 run request"));
    }
    let n = read_u16(&mut s).await?;
    if n > MAX_RUN {
        return Err(bad("run too long"));
    }
    let raw = read_exact(&mut s, n * 32).await?;
    let keys: Vec<BlockKey> = raw
        .chunks_exact(32)
        .map(|c| {
            let mut k = [0u8; 32];
            k.copy_from_slice(c);
            BlockKey(k)
        })
        .collect();
    let c = cache.clone();
    let blobs = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        for k in keys {
            if c.is_foreign(&k) {
                break;
            }
            match c.get(&k) {
                // Full blocks only: tail records stay local.
                Some((b, _)) if !super::tail::is_tail(&b) => out.push((k, b)),
                _ => break,
            }
        }
        out
    })
    .await
    .map_err(|e| std::io::Error::other(e.to_string()))?;
    let mut resp = (blobs.len() as u16).to_le_bytes().to_vec();
    for (k, b) in blobs {
        let blob = if lie { perturb(&b) } else { b.to_vec() };
        let sig = kp
            .sign(&sig_message(&k, &blob))
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        resp.extend_from_slice(&(blob.len() as u32).to_le_bytes());
        resp.extend_from_slice(&blob);
        resp.extend_from_slice(&(pk.len() as u16).to_le_bytes());
        resp.extend_from_slice(pk);
        resp.extend_from_slice(&(sig.len() as u16).to_le_bytes());
        resp.extend_from_slice(&sig);
    }
    s.write_all(&resp).await?;
    s.flush().await?;
    s.close().await?;
    Ok(())
}

/// Relative L2 error of the keys and values of positions `range` of two caches.
pub fn kv_rel_error(
    a: &crate::inference::KvCache,
    b: &crate::inference::KvCache,
    range: std::ops::Range<usize>,
) -> f32 {
    let l = a.layout();
    let (mut num, mut den) = (0f64, 0f64);
    for pos in range {
        for layer in 0..l.n_layer {
            for kv in 0..2 {
                for h in 0..l.n_kv_head {
                    match (a.get(layer, kv, h, pos), b.get(layer, kv, h, pos)) {
                        (Some(x), Some(y)) => {
                            for (p, q) in x.iter().zip(y) {
                                num += f64::from(p - q).powi(2);
                                den += f64::from(*q).powi(2);
                            }
                        }
                        _ => return f32::INFINITY,
                    }
                }
            }
        }
    }
    if den == 0.0 {
        return if num == 0.0 { 0.0 } else { f32::INFINITY };
    }
    (num / den).sqrt() as f32
}
