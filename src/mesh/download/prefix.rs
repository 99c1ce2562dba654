//! Fetching only the first chunks of an artifact: what a node reads to
//! decide from a GGUF header whether it can serve a model before it pulls
//! the whole file (see `docs/SERVING.md`, "Models this node cannot serve").
//!
//! Chunks are taken in file order from the local store (a resumed partial
//! download) or fetched from a peer that holds them (or the origin), each
//! verified against the manifest's chunk hash, and kept in memory: nothing
//! is written to the store, so a refused model leaves no trace on disk.
//! [`Prefix::keep`] hands the fetched chunks to the store when the full
//! download follows, so no byte crosses the network twice.

use super::driver::FindDeadline;
use super::manifest::find_manifest;
use crate::mesh::client::Client;
use crate::mesh::origin::Origin;
use crate::mesh::wire::{self, ChunkRequest, ChunkStatus};
use crate::mesh::{MeshError, blocking};
use crate::metrics::{Metrics, Outcome, Source};
use crate::store::{ArtifactId, ChunkHash, ChunkRef, Manifest};
use futures::{AsyncReadExt, AsyncWriteExt};
use libp2p::PeerId;
use std::time::{Duration, Instant};

/// The first chunks of an artifact, verified.
#[derive(Debug)]
pub struct Prefix {
    /// The artifact's verified manifest.
    pub manifest: Manifest,
    /// The bytes of chunks `0..chunks` (the file's first `bytes.len()` bytes).
    pub bytes: Vec<u8>,
    /// How many chunks `bytes` holds.
    pub chunks: u32,
    /// Bytes that came over the network (the rest was local).
    pub fetched_bytes: u64,
    /// Which of the chunks were fetched (not local), to keep.
    fetched: Vec<u32>,
}

impl Prefix {
    /// Writes the fetched chunks into the store as the start of a partial
    /// download of the artifact (registering it), so the download that
    /// follows resumes after them. Verified again by the store.
    pub async fn keep(&self, client: &Client) -> Result<(), MeshError> {
        if self.fetched.is_empty() {
            return Ok(());
        }
        let store = client.store().clone();
        let manifest = self.manifest.clone();
        let id = manifest.id();
        let pieces: Vec<(u32, Vec<u8>)> = self
            .fetched
            .iter()
            .filter_map(|&i| {
                let c = manifest.chunks.get(i as usize)?;
                let (a, b) = (c.offset as usize, (c.offset + u64::from(c.len)) as usize);
                Some((i, self.bytes.get(a..b)?.to_vec()))
            })
            .collect();
        blocking(move || {
            store.begin(&manifest)?;
            for (i, data) in &pieces {
                store.put_chunk(&id, *i, data)?;
            }
            store.flush(&id)?;
            Ok(())
        })
        .await
    }
}

/// Fetches chunks 0, 1, 2, ... of `id` in order until `enough(prefix,
/// file_len)` is true, the prefix would pass `max_bytes`, or the file ends.
/// The manifest comes from the store or the mesh (looked for during
/// `find_timeout`), as for a download; each fetched chunk is counted in
/// `metrics` like a download's.
pub async fn fetch_prefix(
    client: &Client,
    id: ArtifactId,
    origin_url: Option<String>,
    find_timeout: Duration,
    max_bytes: u64,
    metrics: &Metrics,
    mut enough: impl FnMut(&[u8], u64) -> bool,
) -> Result<Prefix, MeshError> {
    let store = client.store().clone();
    let st = store.clone();
    let local = blocking(move || st.manifest(&id)).await?;
    let origin = match origin_url {
        Some(url) if !client.config().offline => Some(Origin::new(
            &url,
            client.config().origin_ca_file.as_deref(),
        )?),
        _ => None,
    };
    let (manifest, from) = match local {
        Some(m) => (m, None),
        None => {
            let deadline = FindDeadline::after(find_timeout);
            find_manifest(client, id, &deadline, origin.as_ref(), |_| {}).await?
        }
    };
    let mut p = Prefix {
        manifest,
        bytes: Vec::new(),
        chunks: 0,
        fetched_bytes: 0,
        fetched: Vec::new(),
    };
    let size = p.manifest.size;
    while (p.chunks as usize) < p.manifest.chunks.len() && !enough(&p.bytes, size) {
        let i = p.chunks;
        let c = p.manifest.chunks[i as usize];
        if p.bytes.len() as u64 + u64::from(c.len) > max_bytes {
            break;
        }
        let st = store.clone();
        let local = blocking(move || Ok(st.read_chunk(&id, i).ok())).await?;
        let data = match local {
            Some(d) => d,
            None => {
                let d = fetch_chunk(client, id, i, c, from, origin.as_ref(), metrics).await?;
                p.fetched.push(i);
                p.fetched_bytes += u64::from(c.len);
                d
            }
        };
        p.bytes.extend_from_slice(&data);
        p.chunks += 1;
    }
    Ok(p)
}

/// Fetches chunk `index` (`c` in the manifest) from the first source that
/// sends it right: the peer that gave the manifest, the other connected
/// peers, the origin. A peer that sends a wrong chunk is banned.
async fn fetch_chunk(
    client: &Client,
    id: ArtifactId,
    index: u32,
    c: ChunkRef,
    first: Option<PeerId>,
    origin: Option<&Origin>,
    metrics: &Metrics,
) -> Result<Vec<u8>, MeshError> {
    let (len, hash) = (c.len, c.hash);
    let mut peers: Vec<PeerId> = first.into_iter().collect();
    for p in client.connected().await.unwrap_or_default() {
        if !peers.contains(&p) && p != client.peer_id() {
            peers.push(p);
        }
    }
    let mut last = String::from("no connected peer holds it");
    for peer in peers {
        let t0 = Instant::now();
        let got = tokio::time::timeout(
            Duration::from_secs(30),
            from_peer(client, peer, id, index, len),
        )
        .await
        .unwrap_or_else(|_| Err("timed out".into()));
        match got {
            Ok(Some(d)) if d.len() == len as usize && ChunkHash::of(&d) == hash => {
                metrics.chunk_fetch(Source::Peer, Outcome::Ok, u64::from(len), secs(t0));
                return Ok(d);
            }
            Ok(Some(_)) => {
                metrics.chunk_fetch(Source::Peer, Outcome::BadHash, 0, 0.0);
                tracing::warn!(%peer, chunk = index, "header chunk failed verification: banning the peer");
                let _ = client
                    .ban(peer, format!("sent a corrupt chunk of {}", id.short()))
                    .await;
            }
            Ok(None) => {}
            Err(e) => {
                metrics.chunk_fetch(Source::Peer, Outcome::Failed, 0, 0.0);
                last = e;
            }
        }
    }
    if let Some(o) = origin {
        let t0 = Instant::now();
        match o.fetch(c.offset, len).await {
            Ok(d) if d.len() == len as usize && ChunkHash::of(&d) == hash => {
                metrics.chunk_fetch(Source::Origin, Outcome::Ok, u64::from(len), secs(t0));
                return Ok(d);
            }
            Ok(_) => {
                metrics.chunk_fetch(Source::Origin, Outcome::BadHash, 0, 0.0);
                last = "the origin sent a corrupt chunk".into();
            }
            Err(e) => {
                metrics.chunk_fetch(Source::Origin, Outcome::Failed, 0, 0.0);
                last = e.to_string();
            }
        }
    }
    Err(MeshError::NoSource(format!(
        "{id}: chunk {index} of the header: {last}"
    )))
}

fn secs(t0: Instant) -> f64 {
    t0.elapsed().as_secs_f64()
}

/// One chunk request on a fresh stream: `Ok(None)` when the peer does not
/// hold it, the bytes as sent otherwise (verified by the caller).
async fn from_peer(
    client: &Client,
    peer: PeerId,
    id: ArtifactId,
    index: u32,
    len: u32,
) -> Result<Option<Vec<u8>>, String> {
    let mut s = client
        .open_chunk_stream(peer)
        .await
        .map_err(|e| e.to_string())?;
    let io = |e: std::io::Error| e.to_string();
    wire::write_chunk_request(&mut s, &ChunkRequest { id, index })
        .await
        .map_err(io)?;
    s.flush().await.map_err(io)?;
    let h = wire::read_chunk_header(&mut s).await.map_err(io)?;
    if h.index != index {
        return Err(format!("answered chunk {} for {index}", h.index));
    }
    match h.status {
        ChunkStatus::Ok { len: got } if got == len => {
            let mut body = vec![0u8; len as usize];
            s.read_exact(&mut body).await.map_err(io)?;
            let _ = s.close().await;
            Ok(Some(body))
        }
        ChunkStatus::Ok { len: got } => Err(format!("chunk of {got} bytes, manifest says {len}")),
        ChunkStatus::NotFound => Ok(None),
        other => Err(format!("{other:?}")),
    }
}
