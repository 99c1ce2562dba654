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

/// The parts of a [`libp2p::swarm::NetworkBehaviour`] that speaks no
/// protocol of its own ([`book::AddressBook`], [`gate::Gate`]): a dummy
/// handler on every connection, no handler events, nothing to poll.
macro_rules! no_protocol {
    () => {
        type ConnectionHandler = libp2p::swarm::dummy::ConnectionHandler;
        type ToSwarm = std::convert::Infallible;

        fn handle_established_inbound_connection(
            &mut self,
            _: libp2p::swarm::ConnectionId,
            _: libp2p::PeerId,
            _: &libp2p::Multiaddr,
            _: &libp2p::Multiaddr,
        ) -> Result<libp2p::swarm::THandler<Self>, libp2p::swarm::ConnectionDenied> {
            Ok(libp2p::swarm::dummy::ConnectionHandler)
        }

        fn handle_established_outbound_connection(
            &mut self,
            _: libp2p::swarm::ConnectionId,
            _: libp2p::PeerId,
            _: &libp2p::Multiaddr,
            _: libp2p::core::Endpoint,
            _: libp2p::core::transport::PortUse,
        ) -> Result<libp2p::swarm::THandler<Self>, libp2p::swarm::ConnectionDenied> {
            Ok(libp2p::swarm::dummy::ConnectionHandler)
        }

        fn on_connection_handler_event(
            &mut self,
            _: libp2p::PeerId,
            _: libp2p::swarm::ConnectionId,
            event: libp2p::swarm::THandlerOutEvent<Self>,
        ) {
            match event {}
        }

        fn poll(
            &mut self,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<
            libp2p::swarm::ToSwarm<Self::ToSwarm, libp2p::swarm::THandlerInEvent<Self>>,
        > {
            std::task::Poll::Pending
        }
    };
}

pub mod behaviour;
pub mod book;
pub mod client;
pub mod connmgr;
pub mod download;
pub mod event_loop;
pub mod gate;
pub mod gossip;
pub mod manifests;
pub mod muxer;
pub mod origin;
pub mod provider;
pub mod secure;
pub mod wire;

pub use client::{Client, PeerInfo};
pub use download::{DownloadOptions, DownloadReport, Downloads, Progress};
pub use event_loop::EventLoop;
pub use libp2p::{Multiaddr, PeerId};

use crate::config::{ConfigError, Setting};
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

/// How a node takes part in the mesh: the `[mesh]` section of the
/// configuration file ([`SETTINGS`]), plus runtime fields the file does not
/// hold (the PSK itself, read from [`MeshConfig::psk_file`] by
/// [`MeshConfig::read_files`]; the identity; test hooks; download tuning).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MeshConfig {
    /// Addresses to listen on (default: all interfaces, TCP port
    /// [`DEFAULT_MESH_PORT`]; `mesh.listen`).
    #[serde(with = "multiaddrs")]
    pub listen: Vec<Multiaddr>,
    /// Static peers, dialled at start and re-dialled while disconnected (`mesh.peers`).
    #[serde(with = "multiaddrs")]
    pub peers: Vec<Multiaddr>,
    /// LAN discovery via mDNS (`mesh.mdns`). Off for any node in the machine's own network namespace.
    pub mdns: bool,
    /// Pre-shared key file making a private mesh (libp2p pnet; `mesh.psk_file`);
    /// [`MeshConfig::read_files`] reads it into [`MeshConfig::psk`].
    pub psk_file: Option<PathBuf>,
    /// Secure channels offered, in order of preference (default: TLS, then
    /// noise; `mesh.security`).
    pub security: Vec<secure::SecureChannel>,
    /// Never contact anything but the mesh (no origin fetches; `mesh.offline`).
    pub offline: bool,
    /// Extra CA certificates (a PEM file) trusted for `https://` origins, on
    /// top of the system's CA bundle: for origins with an internal CA
    /// (`mesh.origin_ca_file`).
    pub origin_ca_file: Option<PathBuf>,
    /// When non-empty, only these peers may connect (`mesh.allow_peers`).
    #[serde(with = "peer_ids")]
    pub allow_peers: Vec<PeerId>,
    /// How long a peer that sent a bad chunk stays banned (`mesh.ban_duration`).
    #[serde(with = "crate::config::duration")]
    pub ban_duration: Duration,
    /// Largest yamux data frame sent ([`muxer::SPLIT_SEND_SIZE`] by default;
    /// `mesh.frame_size`, 1K to 1M).
    #[serde(with = "crate::config::usize_size")]
    pub frame_size: usize,
    /// mDNS query period once a first answer arrived (libp2p probes at 0.5 s,
    /// 1 s, 2 s, ... before that). Besides, while no peer is connected the
    /// node sends its own queries, 0.5 s apart and doubling up to
    /// [`REDISCOVER_MAX`], and it redials every discovered peer it lost
    /// (`mesh.mdns_query_interval`).
    #[serde(with = "crate::config::duration")]
    pub mdns_query_interval: Duration,
    /// How often the node asks a random neighbour for the releases it knows
    /// and applies those it trusts and lacks (anti-entropy: a release whose
    /// gossip a node missed arrives within about this long)
    /// (`mesh.release_sync_interval`).
    #[serde(with = "crate::config::duration")]
    pub release_sync_interval: Duration,
    /// Most downloads running at once; a further pull fails with
    /// [`MeshError::TooManyDownloads`] (`mesh.max_downloads`).
    pub max_downloads: usize,
    /// Private mesh: only nodes holding this key can connect (TCP only).
    /// Not in the file: read from [`MeshConfig::psk_file`].
    #[serde(skip)]
    pub psk: Option<PreSharedKey>,
    /// Most established connections at once, incoming and outgoing
    /// together (`mesh.max_connections`): a connection beyond it is refused.
    /// The connection manager ([`connmgr`]) keeps a quarter of it free for
    /// newcomers and downloads by closing the least useful connections.
    pub max_connections: u32,
    /// While fewer peers than this are connected, the node dials peers it
    /// discovered but is not connected to, a few at a time
    /// (`mesh.min_connections`). Discovery learns every node; only these
    /// and the ones a download, a forward or a lookup needs are dialled.
    pub min_connections: u32,
    /// Idle connections are kept this long.
    #[serde(skip)]
    pub idle_timeout: Duration,
    /// Node identity; a fresh one when `None`.
    #[serde(skip)]
    pub keypair: Option<Keypair>,
    /// Test mode: serve chunks with flipped bytes (a lying peer).
    #[serde(skip)]
    pub test_corrupt_chunks: bool,
    /// Download tuning.
    #[serde(skip)]
    pub download: DownloadOptions,
}

/// TCP port of the mesh transport by default.
pub const DEFAULT_MESH_PORT: u16 = 7071;

impl Default for MeshConfig {
    /// The configuration file's defaults (`[mesh]`).
    fn default() -> Self {
        Self {
            listen: vec![
                Multiaddr::from(std::net::Ipv4Addr::UNSPECIFIED)
                    .with(libp2p::multiaddr::Protocol::Tcp(DEFAULT_MESH_PORT)),
            ],
            peers: Vec::new(),
            mdns: true,
            psk_file: None,
            security: secure::SecureChannel::defaults(),
            offline: false,
            origin_ca_file: None,
            allow_peers: Vec::new(),
            ban_duration: Duration::from_secs(3600),
            frame_size: muxer::SPLIT_SEND_SIZE,
            mdns_query_interval: Duration::from_secs(30),
            release_sync_interval: Duration::from_secs(60),
            max_downloads: 4,
            psk: None,
            max_connections: 48,
            min_connections: 8,
            idle_timeout: Duration::from_secs(300),
            keypair: None,
            test_corrupt_chunks: false,
            download: DownloadOptions::default(),
        }
    }
}

impl PartialEq for MeshConfig {
    /// Compares the settings of the file and the plain runtime ones; the key
    /// material (PSK, keypair) and the download tuning are not compared.
    fn eq(&self, o: &Self) -> bool {
        self.listen == o.listen
            && self.peers == o.peers
            && self.mdns == o.mdns
            && self.psk_file == o.psk_file
            && self.security == o.security
            && self.offline == o.offline
            && self.origin_ca_file == o.origin_ca_file
            && self.allow_peers == o.allow_peers
            && self.ban_duration == o.ban_duration
            && self.frame_size == o.frame_size
            && self.mdns_query_interval == o.mdns_query_interval
            && self.release_sync_interval == o.release_sync_interval
            && self.max_downloads == o.max_downloads
            && self.idle_timeout == o.idle_timeout
            && self.max_connections == o.max_connections
            && self.min_connections == o.min_connections
            && self.test_corrupt_chunks == o.test_corrupt_chunks
    }
}

impl MeshConfig {
    /// Checks ranges that the types alone do not.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
        if self.listen.is_empty() {
            return bad("mesh.listen needs at least one address");
        }
        if self.security.is_empty() {
            return bad("mesh.security needs at least one channel (tls, noise)");
        }
        if self.max_downloads == 0 {
            return bad("mesh.max_downloads must be at least 1");
        }
        if self.max_connections < 4 {
            return bad("mesh.max_connections must be at least 4");
        }
        if self.min_connections == 0 || self.min_connections > self.max_connections {
            return bad("mesh.min_connections must be 1 to mesh.max_connections");
        }
        if self.mdns_query_interval < Duration::from_secs(1) {
            return bad("mesh.mdns_query_interval must be at least 1s");
        }
        if self.release_sync_interval < Duration::from_secs(1) {
            return bad("mesh.release_sync_interval must be at least 1s");
        }
        Ok(())
    }

    /// Reads the files the settings name, as the node does at start: the PSK
    /// from [`MeshConfig::psk_file`] into [`MeshConfig::psk`], and checks the
    /// origin CA file (so a bad file stops the node at start, not at its
    /// first pull) and the frame size.
    pub fn read_files(&mut self) -> Result<(), ConfigError> {
        if let Some(p) = &self.psk_file {
            self.psk =
                Some(read_psk(p).map_err(|e| ConfigError::Invalid(format!("mesh.psk_file: {e}")))?);
        }
        if let Some(p) = &self.origin_ca_file {
            origin::read_ca_file(p)
                .map_err(|e| ConfigError::Invalid(format!("mesh.origin_ca_file: {e}")))?;
        }
        if !(1 << 10..=1 << 20).contains(&self.frame_size) {
            return Err(ConfigError::Invalid(format!(
                "mesh.frame_size: {} is outside 1K..1M",
                crate::config::ByteSize(self.frame_size as u64)
            )));
        }
        Ok(())
    }
}

/// Serde of the multiaddr lists (`mesh.listen`, `mesh.peers`).
mod multiaddrs {
    use super::Multiaddr;
    use serde::{Deserialize, Deserializer, Serializer, de};

    pub fn serialize<S: Serializer>(v: &[Multiaddr], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|a| a.to_string()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Multiaddr>, D::Error> {
        let v = Vec::<String>::deserialize(d)?;
        v.iter()
            .map(|s| {
                s.parse::<Multiaddr>().map_err(|e| {
                    de::Error::custom(format!(
                        "{s:?} is not a multiaddr ({e}); e.g. \"/ip4/192.168.1.20/tcp/7071\""
                    ))
                })
            })
            .collect()
    }
}

/// Serde of the peer id list (`mesh.allow_peers`).
mod peer_ids {
    use super::PeerId;
    use serde::{Deserialize, Deserializer, Serializer, de};

    pub fn serialize<S: Serializer>(v: &[PeerId], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|p| p.to_string()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<PeerId>, D::Error> {
        let v = Vec::<String>::deserialize(d)?;
        v.iter()
            .map(|s| {
                s.parse::<PeerId>()
                    .map_err(|e| de::Error::custom(format!("{s:?} is not a peer id ({e})")))
            })
            .collect()
    }
}

/// The `[mesh]` section's settings, in file order.
pub const SETTINGS: &[Setting] = {
    use crate::config::Kind::{Bool, Int, List, Str};
    use crate::config::Setting as S;
    &[
        S::new(
            "mesh.listen",
            Some("SHOAL_LISTEN"),
            List,
            "Multiaddrs the mesh listens on (TCP, then TLS or noise, then yamux).",
            "[\"/ip4/0.0.0.0/tcp/7071\"]",
        ),
        S::new(
            "mesh.peers",
            Some("SHOAL_PEERS"),
            List,
            "Static peers, dialled at start and redialled when lost, e.g.\n\"/ip4/192.168.1.20/tcp/7071\". Needed where mDNS cannot reach (routed networks,\ncontainers) or is off.",
            "[\"/ip4/192.168.1.20/tcp/7071\"]",
        ),
        S::new(
            "mesh.mdns",
            Some("SHOAL_MDNS"),
            Bool,
            "Find peers on the local link by multicast DNS.",
            "true",
        ),
        S::new(
            "mesh.psk_file",
            Some("SHOAL_PSK_FILE"),
            Str,
            "Pre-shared key file (libp2p pnet, 'swarm.key' format): only nodes with the same key\ncan connect. Unset: an open mesh (peers still verify every chunk by hash).",
            "\"/etc/shoal/swarm.key\"",
        ),
        S::new(
            "mesh.security",
            Some("SHOAL_SECURITY"),
            List,
            "Secure channels offered to peers, most preferred first: \"tls\" (TLS 1.3 with the\nnode's ed25519 key as a raw public key, AES-GCM first: the fast one on CPUs with AES\ninstructions) and \"noise\" (libp2p noise, ChaCha20-Poly1305). Peers use the first\nchannel both offer.",
            "[\"tls\", \"noise\"]",
        ),
        S::new(
            "mesh.offline",
            Some("SHOAL_OFFLINE"),
            Bool,
            "Never fetch from origin URLs (the internet); use only the local store and peers.",
            "false",
        ),
        S::new(
            "mesh.origin_ca_file",
            Some("SHOAL_ORIGIN_CA_FILE"),
            Str,
            "Extra CA certificates (a PEM file) trusted for https:// origin URLs, on top of the\nsystem's CA bundle: for an origin with a certificate from an internal CA. The\ncertificate must still be valid for the URL's host name. Unset: the system bundle only.",
            "\"/etc/shoal/origin-ca.pem\"",
        ),
        S::new(
            "mesh.allow_peers",
            Some("SHOAL_ALLOW_PEERS"),
            List,
            "Peer ids allowed to connect. Empty: any peer (that holds the PSK, when one is set).",
            "[\"12D3KooW...\"]",
        ),
        S::new(
            "mesh.ban_duration",
            Some("SHOAL_BAN_DURATION"),
            Str,
            "How long a peer that served a chunk failing its hash is banned.",
            "\"1h\"",
        ),
        S::new(
            "mesh.frame_size",
            Some("SHOAL_FRAME_SIZE"),
            Str,
            "Largest yamux data frame this node sends, 1K to 1M. Each frame is one flush of the\nconnection and its own TLS record for the frame header: 256K frames cost a 16th of\nthe flushes of yamux's usual 16K (docs/benchmarks.md). Any yamux peer reads them.",
            "\"256K\"",
        ),
        S::new(
            "mesh.mdns_query_interval",
            Some("SHOAL_MDNS_QUERY_INTERVAL"),
            Str,
            "How often mDNS asks the link for peers once some answered (at start it asks at\n0.5 s, 1 s, 2 s, ...). While no peer is connected the node also asks by itself,\n0.5 s apart and doubling up to 8 s, and redials every peer it found and lost.",
            "\"30s\"",
        ),
        S::new(
            "mesh.release_sync_interval",
            Some("SHOAL_RELEASE_SYNC_INTERVAL"),
            Str,
            "How often the node asks a random neighbour for its releases and applies those it\ntrusts and lacks: a release whose gossip a node missed (it was down, or its part\nof the mesh was cut off) arrives within about this long.",
            "\"60s\"",
        ),
        S::new(
            "mesh.max_downloads",
            Some("SHOAL_MAX_DOWNLOADS"),
            Int,
            "Most downloads running at once; a further pull is refused (HTTP 429) until one ends.",
            "4",
        ),
        S::new(
            "mesh.max_connections",
            Some("SHOAL_MAX_CONNECTIONS"),
            Int,
            "Most connections to other nodes at once (a connection beyond it is refused). Above\nthree quarters of it the node closes the least useful ones (idle, no transfer, not a\nstatic peer), oldest first, so newcomers and downloads always find room.",
            "48",
        ),
        S::new(
            "mesh.min_connections",
            Some("SHOAL_MIN_CONNECTIONS"),
            Int,
            "The node dials discovered peers while fewer than this many are connected. Discovery\n(mDNS, Kademlia) learns every node of the LAN; only this many, plus the ones a\ndownload or a forwarded request needs, are dialled.",
            "8",
        ),
    ]
};

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
