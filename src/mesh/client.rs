//! The cloneable handle to the mesh.

use super::provider::{ServeSnapshot, ServeStats};
use super::wire::{self, CHUNK_PROTOCOL, HaveAnnounce, MetaRequest, MetaResponse, ReleaseAnnounce};
use super::{MeshConfig, MeshError};
use crate::store::{ArtifactId, HaveMap, Manifest, SignedRelease, Store};
use libp2p::request_response::ResponseChannel;
use libp2p::{Multiaddr, PeerId, Stream};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, oneshot, watch};

/// Commands from clients to the event loop.
pub(crate) enum Command {
    Dial(Multiaddr),
    Peers(oneshot::Sender<Vec<PeerInfo>>),
    ListenAddrs(oneshot::Sender<Vec<Multiaddr>>),
    Meta {
        peer: PeerId,
        req: MetaRequest,
        reply: oneshot::Sender<Result<MetaResponse, MeshError>>,
    },
    Respond {
        channel: ResponseChannel<MetaResponse>,
        res: MetaResponse,
    },
    Provide(ArtifactId),
    GetProviders(ArtifactId, oneshot::Sender<HashSet<PeerId>>),
    Publish {
        topic: &'static str,
        data: Vec<u8>,
    },
    PushHave {
        peers: Vec<PeerId>,
        msg: wire::HaveAnnounce,
    },
    Ban {
        peer: PeerId,
        reason: String,
    },
    Rediscover,
    HandshakeFailures(oneshot::Sender<u64>),
    Shutdown,
}

/// Something that happened in the mesh.
#[derive(Debug, Clone)]
pub enum MeshEvent {
    /// A peer connected.
    Connected(PeerId),
    /// A peer's last connection closed.
    Disconnected(PeerId),
    /// A peer was banned.
    Banned(PeerId),
    /// A peer announced its have-map for an artifact.
    Have {
        /// Who.
        peer: PeerId,
        /// Which artifact.
        id: ArtifactId,
        /// What it holds.
        have: Arc<HaveMap>,
        /// It takes part in fetching from the origin.
        origin: bool,
    },
    /// A release announcement was processed.
    Release,
    /// A peer's serving card arrived on the gossip topic
    /// [`wire::CARDS_TOPIC`] (signed by its author, checked by gossipsub;
    /// the bytes are decoded by `crate::route`).
    Card {
        /// The author.
        peer: PeerId,
        /// The encoded card (at most [`wire::MAX_CARD_BYTES`]).
        data: Arc<[u8]>,
    },
}

/// A peer as shown by `shoal peers`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PeerInfo {
    /// Peer id.
    pub peer_id: String,
    /// Remote address of the connection (empty when banned and not connected).
    pub addr: String,
    /// Seconds since it connected.
    pub connected_secs: u64,
    /// Its agent string (from identify).
    pub agent: String,
    /// Ban reason and remaining time, when banned.
    pub banned: Option<String>,
}

pub(crate) struct Shared {
    pub peer_id: PeerId,
    pub events: broadcast::Sender<MeshEvent>,
    pub serve_stats: Arc<ServeStats>,
    pub config: MeshConfig,
    /// Becomes true when the event loop has stopped.
    pub stopped: watch::Receiver<bool>,
    /// Use of each peer, for the connection manager.
    pub activity: Arc<super::connmgr::Activity>,
    /// Manifests that came with release announcements.
    pub manifests: Arc<super::manifests::ManifestCache>,
}

/// A handle to the mesh; clone freely. The event loop stops when every clone is dropped.
#[derive(Clone)]
pub struct Client {
    tx: mpsc::Sender<Command>,
    control: libp2p_stream::Control,
    shared: Arc<Shared>,
    store: Store,
}

const META_TIMEOUT: Duration = Duration::from_secs(30);

impl Client {
    pub(crate) fn new(
        tx: mpsc::Sender<Command>,
        control: libp2p_stream::Control,
        shared: Arc<Shared>,
        store: Store,
    ) -> Self {
        Self {
            tx,
            control,
            shared,
            store,
        }
    }

    async fn send(&self, cmd: Command) -> Result<(), MeshError> {
        self.tx.send(cmd).await.map_err(|_| MeshError::Stopped)
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, MeshError> {
        let (tx, rx) = oneshot::channel();
        self.send(make(tx)).await?;
        rx.await.map_err(|_| MeshError::Stopped)
    }

    /// This node's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.shared.peer_id
    }

    /// The configuration the mesh was started with.
    pub fn config(&self) -> &MeshConfig {
        &self.shared.config
    }

    /// The store this mesh serves.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Addresses the swarm listens on (with concrete ports).
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, MeshError> {
        self.ask(Command::ListenAddrs).await
    }

    /// Dials `addr` and keeps re-dialling it while disconnected (a static peer).
    pub async fn dial(&self, addr: Multiaddr) -> Result<(), MeshError> {
        self.send(Command::Dial(addr)).await
    }

    /// Connected and banned peers.
    pub async fn peers(&self) -> Result<Vec<PeerInfo>, MeshError> {
        self.ask(Command::Peers).await
    }

    /// Peer ids currently connected (not banned).
    pub async fn connected(&self) -> Result<Vec<PeerId>, MeshError> {
        Ok(self
            .peers()
            .await?
            .into_iter()
            .filter(|p| p.banned.is_none())
            .filter_map(|p| p.peer_id.parse().ok())
            .collect())
    }

    /// Subscribes to mesh events.
    pub fn events(&self) -> broadcast::Receiver<MeshEvent> {
        self.shared.events.subscribe()
    }

    /// What this node has served.
    pub fn serve_stats(&self) -> ServeSnapshot {
        self.shared.serve_stats.snapshot()
    }

    /// Sends a meta request and waits for the answer.
    pub async fn meta(&self, peer: PeerId, req: MetaRequest) -> Result<MetaResponse, MeshError> {
        let fut = self.ask(|reply| Command::Meta { peer, req, reply });
        match tokio::time::timeout(META_TIMEOUT, fut).await {
            Ok(r) => r?,
            Err(_) => Err(MeshError::Request {
                peer,
                reason: "timed out".into(),
            }),
        }
    }

    /// Fetches and verifies an artifact's manifest from `peer`. `Ok(None)`: the peer lacks it.
    /// A manifest that does not hash to `id` is a protocol violation.
    pub async fn manifest(
        &self,
        peer: PeerId,
        id: ArtifactId,
    ) -> Result<Option<Manifest>, MeshError> {
        match self.meta(peer, MetaRequest::Manifest(id)).await? {
            MetaResponse::Manifest(bytes) => Manifest::decode_verified(&bytes, &id)
                .map(Some)
                .map_err(|e| MeshError::Protocol {
                    peer,
                    reason: e.to_string(),
                }),
            MetaResponse::NotFound => Ok(None),
            other => Err(unexpected(peer, &other)),
        }
    }

    /// Fetches `peer`'s have-map for `id`. `Ok(None)`: the peer lacks the artifact.
    pub async fn have_map(
        &self,
        peer: PeerId,
        id: ArtifactId,
    ) -> Result<Option<HaveMap>, MeshError> {
        match self.meta(peer, MetaRequest::HaveMap(id)).await? {
            MetaResponse::HaveMap(bytes) => {
                HaveMap::from_bytes(&bytes)
                    .map(Some)
                    .ok_or_else(|| MeshError::Protocol {
                        peer,
                        reason: "malformed have-map".into(),
                    })
            }
            MetaResponse::NotFound => Ok(None),
            other => Err(unexpected(peer, &other)),
        }
    }

    /// Lists the artifacts `peer` holds.
    pub async fn list(&self, peer: PeerId) -> Result<Vec<wire::ArtifactSummary>, MeshError> {
        match self.meta(peer, MetaRequest::List).await? {
            MetaResponse::List(l) => Ok(l),
            other => Err(unexpected(peer, &other)),
        }
    }

    /// The signed releases `peer` knows. Undecodable entries are skipped; the
    /// caller verifies signatures and trust (`Store::apply_release`).
    pub async fn releases(&self, peer: PeerId) -> Result<Vec<SignedRelease>, MeshError> {
        match self.meta(peer, MetaRequest::Releases).await? {
            MetaResponse::Releases(l) => Ok(l
                .iter()
                .filter_map(|b| SignedRelease::decode(b).ok())
                .collect()),
            other => Err(unexpected(peer, &other)),
        }
    }

    /// The peers `peer` knows, with addresses (peer exchange; the event loop
    /// asks a connected peer the same on its discovery walks). Entries that
    /// are malformed or unusable are dropped ([`wire::usable_peers`]).
    pub async fn peer_list(
        &self,
        peer: PeerId,
    ) -> Result<Vec<(PeerId, Vec<libp2p::Multiaddr>)>, MeshError> {
        match self.meta(peer, MetaRequest::Peers).await? {
            MetaResponse::Peers(l) => Ok(wire::usable_peers(l, &self.shared.peer_id, true)),
            other => Err(unexpected(peer, &other)),
        }
    }

    /// Advertises that this node provides `id` (Kademlia provider record).
    pub async fn provide(&self, id: ArtifactId) -> Result<(), MeshError> {
        self.send(Command::Provide(id)).await
    }

    /// Kademlia providers of `id` (may be empty on a small mesh; combine with connected peers).
    pub async fn providers(&self, id: ArtifactId) -> Result<HashSet<PeerId>, MeshError> {
        let fut = self.ask(|reply| Command::GetProviders(id, reply));
        tokio::time::timeout(Duration::from_secs(15), fut)
            .await
            .unwrap_or_else(|_| Ok(HashSet::new()))
    }

    /// Tells peers which chunks of `id` this node now holds.
    /// `origin`: this node is downloading `id` and may fetch from its origin.
    pub async fn announce_have(
        &self,
        id: ArtifactId,
        have: &HaveMap,
        origin: bool,
    ) -> Result<(), MeshError> {
        let data = wire::encode(&HaveAnnounce {
            id,
            have: have.to_bytes(),
            origin,
        });
        self.send(Command::Publish {
            topic: wire::HAVE_TOPIC,
            data,
        })
        .await
    }

    /// Pushes this node's have-map of `id` to `peers` directly (fire and
    /// forget; a peer that misses one gets the next).
    /// `origin`: this node is downloading `id` and may fetch from its origin.
    pub async fn push_have(
        &self,
        peers: Vec<PeerId>,
        id: ArtifactId,
        have: &HaveMap,
        origin: bool,
    ) -> Result<(), MeshError> {
        if peers.is_empty() {
            return Ok(());
        }
        let msg = wire::HaveAnnounce {
            id,
            have: have.to_bytes(),
            origin,
        };
        self.send(Command::PushHave { peers, msg }).await
    }

    /// Publishes a signed release to the mesh (receivers apply it only if they trust its key).
    ///
    /// When this node holds the manifest of the artifact the release names
    /// and it is at most [`wire::MAX_GOSSIP_MANIFEST`] bytes, the release is
    /// also published with it ([`wire::RELEASE_MANIFESTS_TOPIC`]): nodes then
    /// start a pull of it without looking for a holder of the manifest.
    pub async fn publish_release(&self, release: &SignedRelease) -> Result<(), MeshError> {
        let signed = release.encode();
        self.send(Command::Publish {
            topic: wire::RELEASES_TOPIC,
            data: wire::encode(&ReleaseAnnounce {
                signed: signed.clone(),
            }),
        })
        .await?;
        let Ok(r) = release.verify() else {
            return Ok(());
        };
        let store = self.store.clone();
        let manifest = super::blocking(move || store.manifest_bytes(&r.id))
            .await
            .ok()
            .flatten();
        match manifest {
            Some(manifest) if manifest.len() <= wire::MAX_GOSSIP_MANIFEST => {
                self.send(Command::Publish {
                    topic: wire::RELEASE_MANIFESTS_TOPIC,
                    data: wire::encode(&wire::ReleaseWithManifest { signed, manifest }),
                })
                .await
            }
            _ => Ok(()),
        }
    }

    /// The manifest of `id` if it came with a release announcement
    /// (verified), and the announcement's author.
    pub fn gossiped_manifest(&self, id: &ArtifactId) -> Option<(Manifest, PeerId)> {
        self.shared
            .manifests
            .get(id)
            .map(|c| (c.manifest.clone(), c.from))
    }

    /// Publishes this node's serving card (encoded by `crate::route`) on
    /// [`wire::CARDS_TOPIC`]. Fails when no peer subscribes yet; callers
    /// publish again on their next tick.
    pub async fn publish_card(&self, data: Vec<u8>) -> Result<(), MeshError> {
        self.send(Command::Publish {
            topic: wire::CARDS_TOPIC,
            data,
        })
        .await
    }

    /// Bans `peer` for the configured time: disconnects it and refuses it.
    pub async fn ban(&self, peer: PeerId, reason: impl Into<String>) -> Result<(), MeshError> {
        self.send(Command::Ban {
            peer,
            reason: reason.into(),
        })
        .await
    }

    /// Looks for peers again now: an mDNS query, a redial of every known
    /// peer that is not connected, a Kademlia bootstrap. For a download that
    /// found no source; rounds run at most once a second.
    pub async fn rediscover(&self) -> Result<(), MeshError> {
        self.send(Command::Rediscover).await
    }

    /// Connections that failed in their handshake (pnet, secure channel,
    /// muxer) since start, every retry counted; each remote address is
    /// logged once.
    pub async fn handshake_failures(&self) -> Result<u64, MeshError> {
        self.ask(Command::HandshakeFailures).await
    }

    /// A handle on the swarm's stream behaviour, for other layers' stream
    /// protocols (e.g. the KV cache's `/shoal/kv/1`).
    pub fn stream_control(&self) -> libp2p_stream::Control {
        self.control.clone()
    }

    /// `peer` was useful just now (a chunk fetched, a KV block, a forwarded
    /// request): the connection manager keeps its connection for a while
    /// ([`super::connmgr::USEFUL_FOR`]).
    pub fn touch(&self, peer: PeerId) {
        self.shared.activity.touch(peer);
    }

    /// Keeps `peer`'s connection open until the guard is dropped (a
    /// long-lived stream, such as a forwarded generation).
    pub fn busy(&self, peer: PeerId) -> super::connmgr::PeerBusy {
        self.shared.activity.busy(peer)
    }

    /// The table [`Client::touch`] writes to, for tasks that must not hold
    /// a client (a client keeps the event loop running).
    pub fn activity(&self) -> Arc<super::connmgr::Activity> {
        self.shared.activity.clone()
    }

    /// Opens a raw chunk stream to `peer`, dialling it if not connected.
    ///
    /// [`MeshError::Dial`] when the peer could not be reached (no address,
    /// the dial failed, the peer at its connection bound turned us away);
    /// [`MeshError::Request`] when it does not speak the chunk protocol.
    pub async fn open_chunk_stream(&self, peer: PeerId) -> Result<Stream, MeshError> {
        self.touch(peer);
        let mut control = self.control.clone();
        control
            .open_stream(peer, CHUNK_PROTOCOL)
            .await
            .map_err(|e| match e {
                libp2p_stream::OpenStreamError::UnsupportedProtocol(_) => MeshError::Request {
                    peer,
                    reason: e.to_string(),
                },
                e => MeshError::Dial(format!("{peer}: {e}")),
            })
    }

    /// Stops the event loop and waits until it has stopped (connections closed).
    pub async fn shutdown(&self) {
        let _ = self.tx.send(Command::Shutdown).await;
        let mut stopped = self.shared.stopped.clone();
        let _ = stopped.wait_for(|s| *s).await;
    }
}

fn unexpected(peer: PeerId, res: &MetaResponse) -> MeshError {
    match res {
        MetaResponse::Error(e) => MeshError::Request {
            peer,
            reason: e.clone(),
        },
        _ => MeshError::Protocol {
            peer,
            reason: "answered another question".into(),
        },
    }
}
