//! The remote (mesh) tier: KV blocks fetched from neighbours over `/shoal/kv/1`
//! (a libp2p stream protocol on the mesh's swarm), with an explicit trust
//! policy.
//!
//! # Protocol (version 1)
//!
//! Request: `SKV1` ‖ op ‖ `n: u16 LE` ‖ `n` block keys (32 bytes each); op
//! `2` (have) asks how many, op `1` (run) asks for the blocks.
//! Have response: `m: u16 LE`, the longest run of the requested keys, from
//! the first, that the peer holds and produced itself (`m ≤ n`).
//! Run response: `m: u16 LE` (as for have), then per block:
//! `len: u32 LE` ‖ the KV blob (`SHOAL-KV` format) ‖ the producer's
//! protobuf-encoded public key (`u16 LE` length ‖ bytes) ‖ `sig_len: u16 LE`
//! ‖ the signature over `"shoal-kv-sig-v1" ‖ key ‖ BLAKE3(blob)`.
//! Requests and have responses are encoded and decoded by [`wire`]
//! (fuzzed by `fuzz/fuzz_targets/wire_kv.rs`, pinned by a fixture).
//!
//! # Finding the best peer
//!
//! One round: every connected member (not banned) is asked at once which
//! of the keys it holds (op 2). The peer with the longest run is chosen (on
//! a tie the first to answer) and its run fetched (op 1) if that is
//! cheaper than computing: the estimated fetch time (the have round trip +
//! the run's bytes at the bandwidth last measured from that peer, 1 Gbit/s
//! until measured, + one block recomputed when the run must be
//! spot-checked) against the run's compute time at the engine's measured
//! prompt rate ([`FetchCost`]). A failed fetch falls to the next-longest
//! run; when none is worth it, the request computes.
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
//! 3. Spot checks: [`PrefixCache::restore`] recomputes the first block it takes from a
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
const SIG_DOMAIN: &[u8] = b"shoal-kv-sig-v1";
use wire::MAX_RUN;
const MAX_BLOB: usize = 64 << 20;
/// Time allowed for one peer's answer.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// The wire messages of `/shoal/kv/1` that are not streamed: requests and
/// have responses. Decoders never panic and refuse anything malformed.
pub mod wire {
    use super::BlockKey;

    /// Magic (and version) of a request.
    pub const MAGIC: &[u8; 4] = b"SKV1";
    /// Op: send the longest run of the keys.
    pub const OP_RUN: u8 = 1;
    /// Op: say how long a run of the keys is held.
    pub const OP_HAVE: u8 = 2;
    /// Most keys in one request.
    pub const MAX_RUN: usize = 1024;
    /// Bytes before the keys: magic, op, count.
    pub const REQUEST_HEAD: usize = 7;

    /// Errors of the kv wire decoders.
    #[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
    pub enum KvWireError {
        /// Not a `/shoal/kv/1` request.
        #[error("not a kv/1 request (bad magic)")]
        Magic,
        /// An op this version does not know.
        #[error("unknown kv op {0}")]
        Op(u8),
        /// More keys than [`MAX_RUN`].
        #[error("run of {0} keys is too long")]
        TooLong(usize),
        /// The bytes do not match the declared length.
        #[error("kv message length {got}, expected {want}")]
        Length {
            /// Bytes given.
            got: usize,
            /// Bytes the header declares.
            want: usize,
        },
        /// A have answer claims more keys than asked.
        #[error("peer claims {claimed} of {asked} keys")]
        Claim {
            /// Keys claimed.
            claimed: usize,
            /// Keys asked.
            asked: usize,
        },
    }

    /// A request: an op over a run of keys.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Request {
        /// [`OP_RUN`] or [`OP_HAVE`].
        pub op: u8,
        /// The keys, in prompt order.
        pub keys: Vec<BlockKey>,
    }

    /// Encodes a request (at most [`MAX_RUN`] keys are sent).
    pub fn encode_request(r: &Request) -> Vec<u8> {
        let keys = &r.keys[..r.keys.len().min(MAX_RUN)];
        let mut out = Vec::with_capacity(REQUEST_HEAD + 32 * keys.len());
        out.extend_from_slice(MAGIC);
        out.push(r.op);
        out.extend_from_slice(&(keys.len() as u16).to_le_bytes());
        for k in keys {
            out.extend_from_slice(&k.0);
        }
        out
    }

    /// The total length of a request from its first [`REQUEST_HEAD`] bytes.
    pub fn request_len(head: &[u8]) -> Result<usize, KvWireError> {
        if head.len() < REQUEST_HEAD {
            return Err(KvWireError::Length {
                got: head.len(),
                want: REQUEST_HEAD,
            });
        }
        if &head[..4] != MAGIC {
            return Err(KvWireError::Magic);
        }
        if !matches!(head[4], OP_RUN | OP_HAVE) {
            return Err(KvWireError::Op(head[4]));
        }
        let n = u16::from_le_bytes([head[5], head[6]]) as usize;
        if n > MAX_RUN {
            return Err(KvWireError::TooLong(n));
        }
        Ok(REQUEST_HEAD + 32 * n)
    }

    /// Decodes a whole request.
    pub fn decode_request(bytes: &[u8]) -> Result<Request, KvWireError> {
        let want = request_len(bytes)?;
        if bytes.len() != want {
            return Err(KvWireError::Length {
                got: bytes.len(),
                want,
            });
        }
        let keys = bytes[REQUEST_HEAD..]
            .chunks_exact(32)
            .map(|c| {
                let mut k = [0u8; 32];
                k.copy_from_slice(c);
                BlockKey(k)
            })
            .collect();
        Ok(Request { op: bytes[4], keys })
    }

    /// Encodes a have answer: `m` keys held from the first.
    pub fn encode_have(m: usize) -> [u8; 2] {
        (m.min(MAX_RUN) as u16).to_le_bytes()
    }

    /// Decodes a have answer to a request of `asked` keys.
    pub fn decode_have(bytes: &[u8], asked: usize) -> Result<usize, KvWireError> {
        let [a, b] = bytes else {
            return Err(KvWireError::Length {
                got: bytes.len(),
                want: 2,
            });
        };
        let m = u16::from_le_bytes([*a, *b]) as usize;
        if m > asked {
            return Err(KvWireError::Claim { claimed: m, asked });
        }
        Ok(m)
    }
}

/// What fetching a run costs against computing it, for
/// [`RemoteTier::fetch_run`].
#[derive(Debug, Clone, Copy)]
pub struct FetchCost {
    /// Bytes of one block on the wire (its KV blob).
    pub block_bytes: u64,
    /// Time this engine takes to compute one block of prompt.
    pub compute_per_block: Duration,
}

/// Bandwidth assumed from a peer until a fetch measured it (1 Gbit/s).
pub const DEFAULT_BYTES_PER_SEC: f64 = 125e6;

impl FetchCost {
    /// True if fetching `m` blocks (a have round trip of `rtt`, at
    /// `bytes_per_sec`, plus one block recomputed when `check`) is faster
    /// than computing them.
    pub fn worth_fetching(&self, m: usize, rtt: Duration, bytes_per_sec: f64, check: bool) -> bool {
        if m == 0 {
            return false;
        }
        let transfer = (m as f64 * self.block_bytes as f64) / bytes_per_sec.max(1.0);
        let checking = if check {
            self.compute_per_block
        } else {
            Duration::ZERO
        };
        let fetch = rtt + Duration::from_secs_f64(transfer.min(1e6)) + checking;
        fetch < self.compute_per_block * m as u32
    }
}

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
pub struct RemoteTier {
    control: libp2p_stream::Control,
    mesh: crate::mesh::Client,
    rt: tokio::runtime::Handle,
    /// Peers whose KV passed a spot check.
    checked: Mutex<HashSet<PeerId>>,
    /// Blocks taken from each peer (dropped if it is caught lying).
    taken: Mutex<HashMap<PeerId, Vec<BlockKey>>>,
    /// Peers caught lying.
    pub banned: Mutex<HashSet<PeerId>>,
    /// Bandwidth measured from each peer (bytes per second).
    bandwidth: Mutex<HashMap<PeerId, f64>>,
    /// Test hook: serve perturbed (but validly signed) KV.
    #[doc(hidden)]
    pub test_lie: bool,
}

impl std::fmt::Debug for RemoteTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteTier").finish_non_exhaustive()
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

impl RemoteTier {
    /// Starts serving `cache`'s own blocks on the mesh and returns the tier.
    /// Must be called within a tokio runtime.
    pub fn start(
        mesh: crate::mesh::Client,
        cache: Arc<PrefixCache>,
        test_lie: bool,
    ) -> Result<Arc<RemoteTier>, String> {
        let rt = tokio::runtime::Handle::try_current().map_err(|e| e.to_string())?;
        let keypair = mesh
            .config()
            .keypair
            .clone()
            .ok_or_else(|| "the mesh has no identity key".to_owned())?;
        let mut control = mesh.stream_control();
        let incoming = control.accept(KV_PROTOCOL).map_err(|e| e.to_string())?;
        let tier = Arc::new(RemoteTier {
            control,
            mesh,
            rt: rt.clone(),
            checked: Mutex::new(HashSet::new()),
            taken: Mutex::new(HashMap::new()),
            banned: Mutex::new(HashSet::new()),
            bandwidth: Mutex::new(HashMap::new()),
            test_lie,
        });
        let weak_cache = Arc::downgrade(&cache);
        rt.spawn(serve(
            incoming,
            weak_cache,
            keypair,
            test_lie,
            tier.mesh.activity(),
        ));
        Ok(tier)
    }

    /// Finds the connected member holding the longest run of `keys` (one
    /// parallel have round), and fetches that run if it is cheaper than
    /// computing it (see the module docs); a failed fetch falls to the next
    /// longest run. Returns the verified blocks, or nothing.
    /// Blocking: call from a non-async thread.
    pub fn fetch_run(&self, keys: &[BlockKey], cost: FetchCost) -> Vec<Fetched> {
        if keys.is_empty() {
            return Vec::new();
        }
        let keys = &keys[..keys.len().min(MAX_RUN)];
        self.rt.block_on(async {
            let peers = self.mesh.connected().await.unwrap_or_default();
            let peers: Vec<PeerId> = {
                let banned = self.banned.lock();
                peers.into_iter().filter(|p| !banned.contains(p)).collect()
            };
            let asks = peers.into_iter().map(|peer| async move {
                let t0 = std::time::Instant::now();
                match tokio::time::timeout(FETCH_TIMEOUT, self.have(peer, keys)).await {
                    Ok(Ok(m)) => Some((peer, m, t0.elapsed())),
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "kv have failed");
                        None
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "kv have timed out");
                        None
                    }
                }
            });
            // In answer order, so a stable sort keeps the fastest first on a tie.
            let mut offers: Vec<(PeerId, usize, Duration)> = futures::future::join_all(asks)
                .await
                .into_iter()
                .flatten()
                .filter(|(_, m, _)| *m > 0)
                .collect();
            offers.sort_by_key(|(_, m, rtt)| (std::cmp::Reverse(*m), *rtt));
            for (peer, m, rtt) in offers {
                let bw = self
                    .bandwidth
                    .lock()
                    .get(&peer)
                    .copied()
                    .unwrap_or(DEFAULT_BYTES_PER_SEC);
                let check = !self.is_checked(&peer);
                if !cost.worth_fetching(m, rtt, bw, check) {
                    tracing::debug!(%peer, blocks = m, "computing is cheaper than fetching");
                    continue;
                }
                let t0 = std::time::Instant::now();
                match tokio::time::timeout(FETCH_TIMEOUT, self.ask(peer, &keys[..m])).await {
                    Ok(Ok(run)) if !run.is_empty() => {
                        let bytes: usize = run.iter().map(|f| f.blob.len()).sum();
                        let secs = t0.elapsed().as_secs_f64().max(1e-6);
                        let mut bws = self.bandwidth.lock();
                        let old = bws.get(&peer).copied().unwrap_or(bytes as f64 / secs);
                        bws.insert(peer, (old + bytes as f64 / secs) / 2.0);
                        return run;
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "kv fetch failed"),
                    Err(_) => tracing::debug!(%peer, "kv fetch timed out"),
                }
            }
            Vec::new()
        })
    }

    async fn open(
        &self,
        peer: PeerId,
        op: u8,
        keys: &[BlockKey],
    ) -> std::io::Result<libp2p::Stream> {
        self.mesh.touch(peer);
        let mut control = self.control.clone();
        let mut s = control
            .open_stream(peer, KV_PROTOCOL)
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let req = wire::encode_request(&wire::Request {
            op,
            keys: keys.to_vec(),
        });
        s.write_all(&req).await?;
        s.flush().await?;
        Ok(s)
    }

    /// How long a run of `keys` `peer` holds (op 2).
    async fn have(&self, peer: PeerId, keys: &[BlockKey]) -> std::io::Result<usize> {
        let mut s = self.open(peer, wire::OP_HAVE, keys).await?;
        let b = read_exact(&mut s, 2).await?;
        wire::decode_have(&b, keys.len()).map_err(|e| bad(&e.to_string()))
    }

    async fn ask(&self, peer: PeerId, keys: &[BlockKey]) -> std::io::Result<Vec<Fetched>> {
        let mut s = self.open(peer, wire::OP_RUN, keys).await?;
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
    activity: Arc<crate::mesh::connmgr::Activity>,
) {
    let pk = keypair.public().encode_protobuf();
    while let Some((peer, stream)) = incoming.next().await {
        // A neighbour asking for blocks: its connection is useful.
        activity.touch(peer);
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
    let head = read_exact(&mut s, wire::REQUEST_HEAD).await?;
    let len = wire::request_len(&head).map_err(|e| bad(&e.to_string()))?;
    let mut req = head;
    req.extend_from_slice(&read_exact(&mut s, len - wire::REQUEST_HEAD).await?);
    let wire::Request { op, keys } = wire::decode_request(&req).map_err(|e| bad(&e.to_string()))?;
    if op == wire::OP_HAVE {
        let c = cache.clone();
        let m =
            tokio::task::spawn_blocking(move || keys.iter().take_while(|k| c.holds_own(k)).count())
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))?;
        s.write_all(&wire::encode_have(m)).await?;
        s.flush().await?;
        s.close().await?;
        return Ok(());
    }
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

#[cfg(test)]
mod tests {
    use super::wire::*;
    use super::*;

    fn req(op: u8, n: u8) -> Request {
        Request {
            op,
            keys: (0..n).map(|i| BlockKey([i; 32])).collect(),
        }
    }

    #[test]
    fn wire_roundtrip_and_refusals() {
        for r in [req(OP_HAVE, 0), req(OP_HAVE, 3), req(OP_RUN, 2)] {
            let b = encode_request(&r);
            assert_eq!(request_len(&b[..REQUEST_HEAD]), Ok(b.len()));
            assert_eq!(decode_request(&b), Ok(r));
        }
        let b = encode_request(&req(OP_HAVE, 2));
        assert!(decode_request(&b[..b.len() - 1]).is_err());
        let mut long = b.clone();
        long.push(0);
        assert!(decode_request(&long).is_err());
        let mut m = b.clone();
        m[0] = b'X';
        assert_eq!(decode_request(&m), Err(KvWireError::Magic));
        let mut op = b.clone();
        op[4] = 9;
        assert_eq!(decode_request(&op), Err(KvWireError::Op(9)));
        let mut n = b.clone();
        n[5..7].copy_from_slice(&2000u16.to_le_bytes());
        assert_eq!(request_len(&n), Err(KvWireError::TooLong(2000)));
        assert!(decode_request(&b[..3]).is_err());
        assert_eq!(decode_have(&encode_have(2), 3), Ok(2));
        assert!(decode_have(&encode_have(4), 3).is_err(), "more than asked");
        assert!(decode_have(&[1], 3).is_err());
        assert!(decode_have(&[1, 0, 0], 3).is_err());
    }

    /// The wire format is pinned by a fixture: a have request of 2 keys, a
    /// run request of 1 key, a have answer of 1.
    #[test]
    fn wire_fixture_v1() {
        let mut b = encode_request(&req(OP_HAVE, 2));
        b.extend(encode_request(&req(OP_RUN, 1)));
        b.extend(encode_have(1));
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/kv-wire-v1.bin");
        if std::env::var_os("SHOAL_REGEN_FIXTURES").is_some() {
            std::fs::write(&path, &b).expect("write");
        }
        let want = include_bytes!("../../tests/fixtures/kv-wire-v1.bin");
        assert_eq!(&b[..], &want[..]);
        assert_eq!(&want[..4], b"SKV1");
        let (have, rest) = want.split_at(REQUEST_HEAD + 64);
        let (run, ans) = rest.split_at(REQUEST_HEAD + 32);
        assert_eq!(decode_request(have), Ok(req(OP_HAVE, 2)));
        assert_eq!(decode_request(run), Ok(req(OP_RUN, 1)));
        assert_eq!(decode_have(ans, 1), Ok(1));
    }

    #[test]
    fn fetch_only_when_cheaper_than_computing() {
        let c = FetchCost {
            block_bytes: 368_748,
            compute_per_block: Duration::from_millis(32),
        };
        let rtt = Duration::from_millis(1);
        // 10 blocks at 1 Gbit/s: ~30 ms against 320 ms of compute.
        assert!(c.worth_fetching(10, rtt, DEFAULT_BYTES_PER_SEC, false));
        assert!(c.worth_fetching(10, rtt, DEFAULT_BYTES_PER_SEC, true));
        // At 1 MB/s the same run takes ~3.7 s: compute.
        assert!(!c.worth_fetching(10, rtt, 1e6, false));
        // A slow round trip or a spot check tips a one-block run.
        assert!(!c.worth_fetching(1, Duration::from_millis(40), DEFAULT_BYTES_PER_SEC, false));
        assert!(!c.worth_fetching(1, rtt, DEFAULT_BYTES_PER_SEC, true));
        assert!(!c.worth_fetching(0, rtt, DEFAULT_BYTES_PER_SEC, false));
    }
}
