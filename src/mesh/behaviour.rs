//! The libp2p behaviour and swarm construction.
// The derive generates an undocumented `BehaviourEvent` enum.
#![allow(missing_docs)]

use super::wire::{IDENTIFY_VERSION, KAD_PROTOCOL, META_PROTOCOL, MetaCodec};
use super::{MeshConfig, MeshError};
use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::{Boxed, upgrade::Version};
use libp2p::swarm::{NetworkBehaviour, behaviour::toggle::Toggle};
use libp2p::{
    PeerId, Swarm, Transport, allow_block_list, connection_limits, gossipsub, identify,
    identity::Keypair, kad, mdns, ping, pnet::PnetConfig, request_response, tcp,
};
use std::time::Duration;

/// Everything a shoal node speaks.
#[derive(NetworkBehaviour)]
pub struct Behaviour {
    /// Refuses peers outside the allow-list (when one is configured).
    pub allow: Toggle<allow_block_list::Behaviour<allow_block_list::AllowedPeers>>,
    /// Refuses banned peers.
    pub blocked: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    /// Turns newcomers away before the handshake while at the bound.
    pub gate: super::gate::Gate,
    /// Connection limits.
    pub limits: connection_limits::Behaviour,
    /// Peer info exchange (listen addresses, protocols).
    pub identify: identify::Behaviour,
    /// Liveness.
    pub ping: ping::Behaviour,
    /// Provider records per artifact (`/shoal/kad/1.0.0`, server mode).
    pub kad: kad::Behaviour<kad::store::MemoryStore>,
    /// Release and have announcements.
    pub gossipsub: gossipsub::Behaviour,
    /// Manifests, have-maps, artifact lists (`/shoal/meta/1`).
    pub meta: request_response::Behaviour<MetaCodec>,
    /// Raw chunk streams (`/shoal/chunk/1`).
    pub stream: libp2p_stream::Behaviour,
    /// LAN discovery.
    pub mdns: Toggle<mdns::tokio::Behaviour>,
    /// Addresses learnt beyond mDNS's and Kademlia's table, for every dial.
    pub book: super::book::AddressBook,
}

/// Kademlia's replication factor (its k): closest peers a lookup looks for.
pub(super) const KAD_REPLICATION: std::num::NonZeroUsize =
    std::num::NonZeroUsize::MIN.saturating_add(7);

/// Fewest handshakes in flight allowed each way (incoming; half outgoing).
const PENDING_MIN: u32 = 32;

fn behaviour(key: &Keypair, config: &MeshConfig) -> Result<Behaviour, MeshError> {
    let peer_id = key.public().to_peer_id();
    let allow = (!config.allow_peers.is_empty()).then(|| {
        let mut b = allow_block_list::Behaviour::<allow_block_list::AllowedPeers>::default();
        for p in &config.allow_peers {
            b.allow_peer(*p);
        }
        b
    });
    let limits = connection_limits::Behaviour::new(
        connection_limits::ConnectionLimits::default()
            .with_max_established(Some(config.max_connections))
            .with_max_established_per_peer(Some(2))
            // Handshakes in flight: a dial refused here fails at the dialer
            // as unreachable (Kademlia drops the address, then looks for
            // peers again, which dials more), so the room is generous; the
            // cap on established connections is what bounds the set.
            .with_max_pending_incoming(Some(config.max_connections.max(PENDING_MIN)))
            .with_max_pending_outgoing(Some(
                config.max_connections.div_ceil(2).max(PENDING_MIN / 2),
            )),
    );
    let identify = identify::Behaviour::new(identify::Config::new(
        IDENTIFY_VERSION.to_owned(),
        key.public(),
    ));
    let mut kad_config = kad::Config::new(KAD_PROTOCOL);
    kad_config.set_query_timeout(Duration::from_secs(10));
    // Small meshes: no periodic random walks (they only warn when the table is empty).
    kad_config.set_periodic_bootstrap_interval(None);
    // The event loop fills the routing table itself, and only buckets with
    // room: with automatic inserts, every new connection to a peer whose
    // bucket is full makes Kademlia dial the bucket's oldest disconnected
    // peer to test it. On a mesh of hundreds with bounded connections most
    // entries are disconnected, so each connection set off another dial
    // that the connection manager then closed: a storm of connections.
    kad_config.set_kbucket_inserts(kad::BucketInserts::Manual);
    // Lookups look for the 8 closest peers, not 20: on a LAN 8 copies of a
    // provider record are plenty, and each lookup (a new node's bootstrap
    // is one per bucket) dials less than half as many peers.
    kad_config.set_replication_factor(KAD_REPLICATION);
    let mut kad =
        kad::Behaviour::with_config(peer_id, kad::store::MemoryStore::new(peer_id), kad_config);
    kad.set_mode(Some(kad::Mode::Server));
    let gossip_config = gossipsub::ConfigBuilder::default()
        .heartbeat_interval(Duration::from_millis(500))
        // Unsigned at the gossipsub layer: each message is a signed envelope
        // checked once per node, after the duplicate filter, and forwarded
        // only once it passed (`super::gossip`).
        .validation_mode(gossipsub::ValidationMode::Anonymous)
        .validate_messages()
        .message_id_fn(|m: &gossipsub::Message| {
            gossipsub::MessageId::new(&super::gossip::message_id(m.topic.as_str(), &m.data))
        })
        // A release may carry its manifest (up to 1 MiB), in its envelope.
        .max_transmit_size(super::wire::MAX_GOSSIP_BYTES + super::wire::GOSSIP_ENVELOPE_OVERHEAD)
        .build()
        .map_err(|e| MeshError::Swarm(e.to_string()))?;
    let gossipsub =
        gossipsub::Behaviour::new(gossipsub::MessageAuthenticity::Anonymous, gossip_config)
            .map_err(|e| MeshError::Swarm(e.to_string()))?;
    let meta = request_response::Behaviour::with_codec(
        MetaCodec,
        [(META_PROTOCOL, request_response::ProtocolSupport::Full)],
        request_response::Config::default()
            .with_request_timeout(Duration::from_secs(30))
            .with_max_concurrent_streams(256),
    );
    let mdns = if config.mdns {
        Some(
            mdns::tokio::Behaviour::new(
                mdns::Config {
                    query_interval: config.mdns_query_interval,
                    ..mdns::Config::default()
                },
                peer_id,
            )
            .map_err(|e| MeshError::Swarm(e.to_string()))?,
        )
    } else {
        None
    };
    Ok(Behaviour {
        allow: allow.into(),
        blocked: Default::default(),
        gate: super::gate::Gate::new(config.max_connections),
        limits,
        identify,
        ping: ping::Behaviour::default(),
        kad,
        gossipsub,
        meta,
        stream: libp2p_stream::Behaviour::new(),
        mdns: mdns.into(),
        book: Default::default(),
    })
}

/// Builds the swarm: TCP (+ pnet when a key is set) + TLS or noise ([`super::secure`]) + yamux.
/// Returns it with the node's key (which signs its gossip).
pub fn build_swarm(config: &MeshConfig) -> Result<(Swarm<Behaviour>, Keypair), MeshError> {
    let key = config
        .keypair
        .clone()
        .unwrap_or_else(Keypair::generate_ed25519);
    let node_key = key.clone();
    let psk = config.psk;
    let security = config.security.clone();
    let frame_size = config.frame_size;
    let built = behaviour(&key, config)?;
    let swarm = libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_other_transport(
            |key| -> Result<_, Box<dyn std::error::Error + Send + Sync>> {
                let secure = super::secure::Config::new(key, &security)?;
                let yamux = super::muxer::Config::new(1024, frame_size);
                let tcp = tcp::tokio::Transport::new(tcp::Config::default().nodelay(true));
                let transport: Boxed<(PeerId, StreamMuxerBox)> = match psk {
                    Some(psk) => tcp
                        .and_then(move |socket, _| PnetConfig::new(psk).handshake(socket))
                        .upgrade(Version::V1Lazy)
                        .authenticate(secure)
                        .multiplex(yamux)
                        .map(|(p, m), _| (p, StreamMuxerBox::new(m)))
                        .boxed(),
                    None => tcp
                        .upgrade(Version::V1Lazy)
                        .authenticate(secure)
                        .multiplex(yamux)
                        .map(|(p, m), _| (p, StreamMuxerBox::new(m)))
                        .boxed(),
                };
                Ok(transport)
            },
        )
        .map_err(|e| MeshError::Swarm(e.to_string()))?
        .with_behaviour(|_| built)
        .map_err(|e| MeshError::Swarm(e.to_string()))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(config.idle_timeout))
        .build();
    Ok((swarm, node_key))
}
