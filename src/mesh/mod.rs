//! The mesh: nodes on a LAN that find each other and fill each other's stores.
//!
//! Shape (after rust-libp2p's `file-sharing` example): one [`EventLoop`] task
//! owns the libp2p `Swarm`; the rest of the program holds cloneable
//! [`Client`]s that send it commands over a channel and get answers on
//! oneshots. Serving ([`provider`]) and fetching ([`download`]) are kept
//! apart and both talk to the store. Chunk bodies travel on raw
//! `/shoal/chunk/1` streams ([`wire`]); small metadata on request-response.
//!
//! Every byte from a peer is verified before it is stored or served onward:
//! manifests against the id they were asked for, chunks by the store's hash
//! check. A peer that sends a bad chunk is banned for [`MeshConfig::ban_duration`].

pub mod behaviour;
pub mod client;
pub mod download;
pub mod event_loop;
pub mod muxer;
pub mod origin;
pub mod provider;
pub mod secure;
pub mod wire;

pub use client::{Client, PeerInfo};
pub use download::{DownloadOptions, DownloadReport, Downloads, Progress};
pub use event_loop::EventLoop;
pub use libp2p::{Multiaddr, PeerId};

use crate::store::{Store, StoreError};
use libp2p::{identity::Keypair, pnet::PreSharedKey};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Errors from the mesh.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// The event loop is gone (node shutting down).
    #[error("the mesh event loop has stopped")]
    Stopped,
    /// Building the transport or swarm failed.
    #[error("cannot build the swarm: {0}")]
    Swarm(String),
    /// Listening on an address failed.
    #[error("cannot listen on {addr}: {reason}")]
    Listen {
        /// The address.
        addr: Multiaddr,
        /// Why.
        reason: String,
    },
    /// Dialing failed.
    #[error("cannot dial {0}")]
    Dial(String),
    /// A request to a peer failed (timeout, connection closed, refused protocol).
    #[error("request to {peer} failed: {reason}")]
    Request {
        /// The peer.
        peer: PeerId,
        /// Why.
        reason: String,
    },
    /// A peer answered with something we did not ask for or cannot use.
    #[error("peer {peer} misbehaved: {reason}")]
    Protocol {
        /// The peer.
        peer: PeerId,
        /// What it did.
        reason: String,
    },
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// No peer (and no origin) could supply the artifact.
    #[error("no source for {0}")]
    NoSource(String),
    /// Reading or writing a pre-shared key file.
    #[error("pre-shared key file {path}: {reason}")]
    Psk {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// An origin (HTTP or HTTPS) could not be used.
    #[error("origin: {0}")]
    Origin(#[from] origin::OriginError),
    /// A blocking task panicked or was cancelled.
    #[error("background task failed: {0}")]
    Join(String),
    /// The local disk is full: the download stopped (what was verified is kept).
    #[error("the disk is full: cannot store {id} ({detail})")]
    DiskFull {
        /// The artifact being stored.
        id: String,
        /// The store's error.
        detail: String,
    },
    /// As many downloads as `mesh.max_downloads` allows are running already.
    #[error(
        "too many downloads: {limit} are running (mesh.max_downloads); try again when one ends"
    )]
    TooManyDownloads {
        /// The limit.
        limit: usize,
    },
}

impl MeshError {
    /// Whether a store error is a full disk: an `io::ErrorKind::StorageFull`
    /// (ENOSPC) or a quota error (EDQUOT) anywhere in its source chain.
    pub fn is_disk_full(e: &(dyn std::error::Error + 'static)) -> bool {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(err) = cur {
            if let Some(io) = err.downcast_ref::<std::io::Error>()
                && (io.kind() == std::io::ErrorKind::StorageFull
                    || io.kind() == std::io::ErrorKind::QuotaExceeded
                    || io.raw_os_error() == Some(libc::ENOSPC))
            {
                return true;
            }
            cur = err.source();
        }
        false
    }
}

/// How a node takes part in the mesh.
#[derive(Debug, Clone)]
pub struct MeshConfig {
    /// Addresses to listen on (default: all interfaces, an OS-chosen TCP port).
    pub listen: Vec<Multiaddr>,
    /// Static peers, dialled at start and re-dialled while disconnected.
    pub peers: Vec<Multiaddr>,
    /// LAN discovery via mDNS. Off for any node in the machine's own network namespace.
    pub mdns: bool,
    /// mDNS query period once a first answer arrived (libp2p probes at 0.5 s,
    /// 1 s, 2 s, ... before that). Besides, while no peer is connected the
    /// node sends its own queries, 0.5 s apart and doubling up to
    /// [`REDISCOVER_MAX`], and it redials every discovered peer it lost.
    pub mdns_query_interval: Duration,
    /// Most downloads running at once; a further pull fails with
    /// [`MeshError::TooManyDownloads`].
    pub max_downloads: usize,
    /// Private mesh: only nodes holding this key can connect (TCP only).
    pub psk: Option<PreSharedKey>,
    /// Secure channels offered, in order of preference (default: TLS, then noise).
    pub security: Vec<secure::SecureChannel>,
    /// When non-empty, only these peers may connect.
    pub allow_peers: Vec<PeerId>,
    /// Never contact anything but the mesh (no origin fetches).
    pub offline: bool,
    /// Extra CA certificates (a PEM file) trusted for `https://` origins, on
    /// top of the system's CA bundle: for origins with an internal CA.
    pub origin_ca_file: Option<PathBuf>,
    /// How long a peer that sent a bad chunk stays banned.
    pub ban_duration: Duration,
    /// Largest yamux data frame sent ([`muxer::SPLIT_SEND_SIZE`] by default).
    pub frame_size: usize,
    /// Idle connections are kept this long.
    pub idle_timeout: Duration,
    /// Most established connections in total.
    pub max_connections: u32,
    /// Node identity; a fresh one when `None`.
    pub keypair: Option<Keypair>,
    /// Test mode: serve chunks with flipped bytes (a lying peer).
    pub test_corrupt_chunks: bool,
    /// Download tuning.
    pub download: DownloadOptions,
}

impl Default for MeshConfig {
    fn default() -> Self {
        Self {
            listen: vec![default_listen()],
            peers: Vec::new(),
            mdns: true,
            mdns_query_interval: Duration::from_secs(30),
            max_downloads: 4,
            psk: None,
            security: secure::SecureChannel::defaults(),
            allow_peers: Vec::new(),
            offline: false,
            origin_ca_file: None,
            ban_duration: Duration::from_secs(600),
            frame_size: muxer::SPLIT_SEND_SIZE,
            idle_timeout: Duration::from_secs(300),
            max_connections: 512,
            keypair: None,
            test_corrupt_chunks: false,
            download: DownloadOptions::default(),
        }
    }
}

/// Longest pause between two rediscovery rounds while no peer is connected.
pub const REDISCOVER_MAX: Duration = Duration::from_secs(8);

/// `/ip4/0.0.0.0/tcp/0`.
pub fn default_listen() -> Multiaddr {
    Multiaddr::from(std::net::Ipv4Addr::UNSPECIFIED).with(libp2p::multiaddr::Protocol::Tcp(0))
}

/// `/ip4/127.0.0.1/tcp/0`, for tests and nodes in the machine's own namespace.
pub fn loopback_listen() -> Multiaddr {
    Multiaddr::from(std::net::Ipv4Addr::LOCALHOST).with(libp2p::multiaddr::Protocol::Tcp(0))
}

/// Reads a `swarm.key` file (`/key/swarm/psk/1.0.0/`, `/base16/`, 64 hex digits).
pub fn read_psk(path: &Path) -> Result<PreSharedKey, MeshError> {
    let err = |reason: String| MeshError::Psk {
        path: path.display().to_string(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    text.parse::<PreSharedKey>().map_err(|e| err(e.to_string()))
}

/// A fresh random pre-shared key, in `swarm.key` file format.
pub fn new_psk() -> Result<String, MeshError> {
    let mut k = [0u8; 32];
    getrandom::fill(&mut k).map_err(|e| MeshError::Psk {
        path: "-".into(),
        reason: e.to_string(),
    })?;
    Ok(PreSharedKey::new(k).to_string())
}

/// Starts the mesh for `store`: builds the swarm, listens, dials static peers,
/// spawns the event loop and the chunk provider on the current tokio runtime.
pub async fn start(
    config: MeshConfig,
    store: Store,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
) -> Result<Client, MeshError> {
    let (client, event_loop) = event_loop::new(config, store, metrics).await?;
    tokio::spawn(event_loop.run());
    Ok(client)
}

fn join_err(e: tokio::task::JoinError) -> MeshError {
    MeshError::Join(e.to_string())
}

/// Runs a blocking store call off the async runtime.
pub(crate) async fn blocking<T, F>(f: F) -> Result<T, MeshError>
where
    F: FnOnce() -> Result<T, StoreError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(join_err)?
        .map_err(MeshError::Store)
}

/// Helpers shared by the mesh's unit tests.
#[cfg(test)]
pub(crate) mod test_util {
    use libp2p::tcp::tokio::TcpStream;

    /// A connected pair of loopback TCP sockets (dialer, listener).
    pub(crate) async fn tcp_pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let (c, s) = tokio::join!(tokio::net::TcpStream::connect(addr), l.accept());
        (
            TcpStream(c.expect("connect")),
            TcpStream(s.expect("accept").0),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psk_file_round_trip() {
        let text = new_psk().expect("psk");
        assert!(text.starts_with("/key/swarm/psk/1.0.0/\n/base16/\n"));
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("swarm.key");
        std::fs::write(&p, &text).expect("write");
        let k = read_psk(&p).expect("read");
        assert_eq!(k.to_string(), text);
        std::fs::write(&p, "nonsense").expect("write");
        assert!(read_psk(&p).is_err());
    }
}
