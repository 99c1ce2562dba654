//! The serving side: answers meta requests and chunk streams from the store.
//!
//! Chunks of partial artifacts are served as soon as the store marks them
//! present; `Store::read_chunk_into` hashes each chunk again unless it was
//! hashed within the store's `reverify_after` window (see `docs/DESIGN.md`).

use super::wire::{self, ArtifactSummary, ChunkStatus, MetaRequest, MetaResponse};
use crate::store::{ArtifactId, ArtifactStatus, ReadError, Store};
use futures::{AsyncWriteExt, StreamExt};
use libp2p::{PeerId, Stream};
use serde::Serialize;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::Semaphore;

/// Counters of what this node served.
#[derive(Debug, Default)]
pub struct ServeStats {
    /// Chunk bytes sent.
    pub bytes: AtomicU64,
    /// Chunks sent.
    pub chunks: AtomicU64,
    /// Chunks deliberately corrupted (test mode only).
    pub corrupted: AtomicU64,
    /// Requests for chunks we did not have.
    pub not_found: AtomicU64,
}

/// A snapshot of [`ServeStats`].
#[derive(Debug, Clone, Copy, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ServeSnapshot {
    /// Chunk bytes sent.
    pub bytes: u64,
    /// Chunks sent.
    pub chunks: u64,
    /// Chunks deliberately corrupted (test mode only).
    pub corrupted: u64,
    /// Requests for chunks we did not have.
    pub not_found: u64,
}

impl ServeStats {
    /// Reads the counters.
    pub fn snapshot(&self) -> ServeSnapshot {
        ServeSnapshot {
            bytes: self.bytes.load(Ordering::Relaxed),
            chunks: self.chunks.load(Ordering::Relaxed),
            corrupted: self.corrupted.load(Ordering::Relaxed),
            not_found: self.not_found.load(Ordering::Relaxed),
        }
    }
}

/// Serves the local store to peers.
#[derive(Clone)]
pub struct Provider {
    store: Store,
    corrupt: bool,
    stats: Arc<ServeStats>,
    /// Bounds concurrent disk reads for chunk requests.
    reads: Arc<Semaphore>,
    /// Who fetched from us, for the connection manager.
    activity: Arc<super::connmgr::Activity>,
    /// Manifests that came with release announcements (answered when the
    /// store has none).
    manifests: Arc<super::manifests::ManifestCache>,
}

impl Provider {
    /// A provider over `store`; `corrupt` flips a byte in every served chunk
    /// (test mode); each chunk request is reported to `activity`; manifest
    /// requests the store cannot answer are answered from `manifests`.
    pub fn new(
        store: Store,
        corrupt: bool,
        activity: Arc<super::connmgr::Activity>,
        manifests: Arc<super::manifests::ManifestCache>,
    ) -> Self {
        Self {
            store,
            corrupt,
            activity,
            manifests,
            stats: Arc::new(ServeStats::default()),
            reads: Arc::new(Semaphore::new(32)),
        }
    }

    /// What has been served so far.
    pub fn stats(&self) -> &Arc<ServeStats> {
        &self.stats
    }

    /// Answers one meta request.
    pub async fn meta(&self, req: MetaRequest) -> MetaResponse {
        let store = self.store.clone();
        let manifests = self.manifests.clone();
        let res = tokio::task::spawn_blocking(
            move || -> Result<MetaResponse, crate::store::StoreError> {
                Ok(match req {
                    // The stored bytes are canonical (checked when stored),
                    // and so are the kept ones (checked against the id).
                    MetaRequest::Manifest(id) => match store.manifest_bytes(&id)? {
                        Some(m) => MetaResponse::Manifest(m),
                        None => match manifests.get(&id) {
                            Some(c) => MetaResponse::Manifest(c.bytes.clone()),
                            None => MetaResponse::NotFound,
                        },
                    },
                    MetaRequest::HaveMap(id) => match store.have_map(&id)? {
                        Some(h) => MetaResponse::HaveMap(h.to_bytes()),
                        None => MetaResponse::NotFound,
                    },
                    MetaRequest::List => MetaResponse::List(
                        store
                            .list()?
                            .into_iter()
                            .map(|a| ArtifactSummary {
                                id: a.id,
                                complete: a.status == ArtifactStatus::Active,
                            })
                            .collect(),
                    ),
                    // Pushed have-maps are taken by the event loop.
                    MetaRequest::Have(_) => MetaResponse::Ack,
                    // Peer lists are answered by the event loop (it knows the peers).
                    MetaRequest::Peers => MetaResponse::Peers(Vec::new()),
                    MetaRequest::Releases => MetaResponse::Releases(
                        store
                            .releases()?
                            .iter()
                            .map(|r| serde_bytes::ByteBuf::from(r.encode()))
                            .collect(),
                    ),
                })
            },
        )
        .await;
        match res {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => MetaResponse::Error(e.to_string()),
            Err(e) => MetaResponse::Error(e.to_string()),
        }
    }

    /// Accepts chunk streams until the swarm goes away.
    pub async fn serve_chunks(
        self,
        mut incoming: libp2p_stream::IncomingStreams,
        mut stopped: tokio::sync::watch::Receiver<bool>,
    ) {
        loop {
            let next = tokio::select! {
                n = incoming.next() => n,
                _ = stopped.wait_for(|s| *s) => None,
            };
            let Some((peer, stream)) = next else { break };
            let me = self.clone();
            tokio::spawn(async move {
                if let Err(e) = me.chunk_stream(peer, stream).await {
                    tracing::debug!(%peer, error = %e, "chunk stream ended");
                }
            });
        }
    }

    /// Reads chunk `index` into `buf[..n]` (a buffer reused across a stream's chunks).
    async fn read_chunk(
        &self,
        id: ArtifactId,
        index: u32,
        mut buf: Vec<u8>,
    ) -> (Vec<u8>, Result<usize, ChunkStatus>) {
        let Ok(_permit) = self.reads.acquire().await else {
            return (buf, Err(ChunkStatus::Busy));
        };
        let store = self.store.clone();
        let joined = tokio::task::spawn_blocking(move || {
            let r = store.read_chunk_into(&id, index, &mut buf);
            (buf, r)
        })
        .await;
        let Ok((buf, r)) = joined else {
            return (Vec::new(), Err(ChunkStatus::Error));
        };
        let r = r.map_err(|e| match e {
            ReadError::NoChunk { .. } | ReadError::Unknown(_) => ChunkStatus::NotFound,
            e => {
                tracing::warn!(%id, index, error = %e, "cannot read chunk");
                ChunkStatus::Error
            }
        });
        (buf, r)
    }

    /// Serves one pipelined chunk stream: requests in, header + raw body out, in order.
    async fn chunk_stream(&self, peer: PeerId, mut stream: Stream) -> std::io::Result<()> {
        let mut body = Vec::new();
        while let Some(req) = wire::read_chunk_request(&mut stream).await? {
            // The connection is in use while a chunk is being served (the
            // connection manager does not close it under a transfer).
            let _busy = self.activity.busy(peer);
            let (buf, read) = self
                .read_chunk(req.id, req.index, std::mem::take(&mut body))
                .await;
            body = buf;
            match read {
                Ok(n) => {
                    let chunk = &mut body[..n];
                    if self.corrupt
                        && let Some(b) = chunk.first_mut()
                    {
                        *b ^= 0xff;
                        self.stats.corrupted.fetch_add(1, Ordering::Relaxed);
                    }
                    wire::write_chunk_response(&mut stream, req.index, Ok(chunk)).await?;
                    self.stats.bytes.fetch_add(n as u64, Ordering::Relaxed);
                    self.stats.chunks.fetch_add(1, Ordering::Relaxed);
                }
                Err(status) => {
                    if status == ChunkStatus::NotFound {
                        self.stats.not_found.fetch_add(1, Ordering::Relaxed);
                    }
                    tracing::debug!(%peer, id = %req.id, index = req.index, ?status, "chunk not served");
                    wire::write_chunk_response(&mut stream, req.index, Err(status)).await?;
                }
            }
            stream.flush().await?;
        }
        stream.close().await
    }
}
