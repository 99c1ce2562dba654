//! The one task that owns the swarm. Everything else talks to it through a [`Client`].

use super::behaviour::{Behaviour, BehaviourEvent, build_swarm};
use super::client::{Client, Command, MeshEvent, PeerInfo, Shared};
use super::connmgr::{Activity, ConnManager, Found};
use super::provider::Provider;
use super::wire::{self, CHUNK_PROTOCOL, KAD_PROTOCOL, MetaRequest, MetaResponse, RELEASES_TOPIC};
use super::{MeshConfig, MeshError};
use crate::store::{HaveMap, SignedRelease, Store};
use futures::StreamExt;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{DialError, NetworkBehaviour, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, Swarm, gossipsub, identify, kad, mdns, multiaddr::Protocol, ping,
    request_response,
};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

/// Owns the swarm; runs until every [`Client`] is dropped or one calls `shutdown`.
pub struct EventLoop {
    swarm: Swarm<Behaviour>,
    rx: mpsc::Receiver<Command>,
    self_tx: mpsc::WeakSender<Command>,
    shared: Arc<Shared>,
    provider: Provider,
    /// The node's metrics: peer gauges and bans.
    metrics: Arc<crate::metrics::Metrics>,
    store: Store,
    static_peers: Vec<(Multiaddr, Option<PeerId>)>,
    connected: HashMap<PeerId, Connected>,
    pending_meta: HashMap<
        request_response::OutboundRequestId,
        oneshot::Sender<Result<MetaResponse, MeshError>>,
    >,
    pending_providers: HashMap<kad::QueryId, (HashSet<PeerId>, oneshot::Sender<HashSet<PeerId>>)>,
    bans: HashMap<PeerId, (Instant, String)>,
    ban_duration: Duration,
    stopped: watch::Sender<bool>,
    /// Artifacts advertised in Kademlia (re-advertised when the routing table grows).
    provided: HashSet<crate::store::ArtifactId>,
    /// The routing table's size at the last re-advertisement.
    routing_size: usize,
    /// The node's key: it signs the node's gossip envelopes.
    key: libp2p::identity::Keypair,
    /// The next gossip envelope's sequence number.
    gossip_seq: u64,
    /// Addresses of the peers found by mDNS (until their records expire).
    mdns_peers: HashMap<PeerId, Vec<Multiaddr>>,
    /// Peer-exchange requests this loop sent (answers are taken here).
    pex_pending: HashSet<request_response::OutboundRequestId>,
    /// Release-list requests this loop sent (anti-entropy, answers taken here).
    releases_pending: HashSet<request_response::OutboundRequestId>,
    /// When to ask a neighbour for its releases next.
    next_release_sync: Instant,
    /// Which connections to keep, close and start ([`super::connmgr`]).
    conns: ConnManager,
    /// What other tasks did with each peer, fed to `conns` every tick.
    activity: Arc<Activity>,
    /// When the next Kademlia random walk runs (discovery without mDNS).
    next_walk: Instant,
    /// This node's non-loopback IPv4 listen addresses: where its own mDNS queries go out.
    iface_addrs: HashSet<std::net::Ipv4Addr>,
    /// Rediscovery while no peer is connected.
    rediscover: Backoff,
    /// When the last rediscovery round ran (rounds asked for by downloads are rate-limited).
    last_round: Option<Instant>,
    /// Remote IPs whose failed handshake was logged (one warning per address).
    handshake_warned: HashSet<std::net::IpAddr>,
    /// Failed handshakes seen (every retry), for tests and diagnostics.
    handshake_failures: u64,
}

/// A rediscovery schedule: rounds at `next`, each pause twice the one before.
struct Backoff {
    next: Instant,
    pause: Duration,
}

/// First pause between rediscovery rounds while no peer is connected.
const REDISCOVER_FIRST: Duration = Duration::from_millis(500);
/// The first Kademlia random walk runs this long after start.
const WALK_FIRST: Duration = Duration::from_secs(4);
/// Random walks while few peers are known (fewer than twice `mesh.max_connections`).
const WALK_FEW: Duration = Duration::from_secs(60);
/// Random walks once enough peers are known.
const WALK_MANY: Duration = Duration::from_secs(600);
/// The next walk, while few peers are known and the last walk found new ones:
/// mDNS answers are lost now and then (a late joiner on a busy LAN hears only
/// part of them until the next query, 30 s on), and walks fill the gaps.
const WALK_AGAIN: Duration = Duration::from_secs(5);
/// Releases taken from one peer's list at most (anti-entropy).
const MAX_SYNCED_RELEASES: usize = 256;
/// Rediscovery rounds asked for by downloads run at most this often.
const ROUND_MIN_GAP: Duration = Duration::from_secs(1);
/// The mDNS service name libp2p peers answer for.
const MDNS_SERVICE: &[&[u8]] = &[b"_p2p", b"_udp", b"local"];

struct Connected {
    addr: Multiaddr,
    since: Instant,
    agent: String,
}

/// Builds the swarm, starts listening and returns the client and the (not yet running) loop.
pub async fn new(
    config: MeshConfig,
    store: Store,
    metrics: Arc<crate::metrics::Metrics>,
) -> Result<(Client, EventLoop), MeshError> {
    let (mut swarm, key) = build_swarm(&config)?;
    for addr in &config.listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|e| MeshError::Listen {
                addr: addr.clone(),
                reason: e.to_string(),
            })?;
    }
    for topic in [
        wire::RELEASES_TOPIC,
        wire::RELEASE_MANIFESTS_TOPIC,
        wire::HAVE_TOPIC,
        wire::CARDS_TOPIC,
    ] {
        swarm
            .behaviour_mut()
            .gossipsub
            .subscribe(&gossipsub::IdentTopic::new(topic))
            .map_err(|e| MeshError::Swarm(e.to_string()))?;
    }
    let mut control = swarm.behaviour().stream.new_control();
    let incoming = control
        .accept(CHUNK_PROTOCOL)
        .map_err(|e| MeshError::Swarm(e.to_string()))?;
    let activity = Arc::new(Activity::default());
    let manifests = Arc::new(super::manifests::ManifestCache::default());
    let provider = Provider::new(
        store.clone(),
        config.test_corrupt_chunks,
        activity.clone(),
        manifests.clone(),
    );
    let (stopped_tx, stopped) = watch::channel(false);
    tokio::spawn(provider.clone().serve_chunks(incoming, stopped.clone()));

    let (tx, rx) = mpsc::channel(256);
    let (events, _) = broadcast::channel(1024);
    let shared = Arc::new(Shared {
        peer_id: *swarm.local_peer_id(),
        events,
        serve_stats: provider.stats().clone(),
        config: config.clone(),
        stopped,
        activity: activity.clone(),
        manifests,
    });
    let client = Client::new(tx.clone(), control, shared.clone(), store.clone());
    let mut lp = EventLoop {
        swarm,
        rx,
        self_tx: tx.downgrade(),
        shared,
        provider,
        metrics,
        store: store.clone(),
        static_peers: config
            .peers
            .iter()
            .map(|a| (a.clone(), peer_of(a)))
            .collect(),
        connected: HashMap::new(),
        pending_meta: HashMap::new(),
        pending_providers: HashMap::new(),
        bans: HashMap::new(),
        ban_duration: config.ban_duration,
        stopped: stopped_tx,
        provided: HashSet::new(),
        routing_size: 0,
        mdns_peers: HashMap::new(),
        pex_pending: HashSet::new(),
        releases_pending: HashSet::new(),
        next_release_sync: Instant::now() + config.release_sync_interval,
        conns: ConnManager::new(
            config.max_connections,
            config.min_connections,
            random_seed_u64(),
        ),
        activity,
        next_walk: Instant::now() + WALK_FIRST,
        iface_addrs: HashSet::new(),
        rediscover: Backoff {
            next: Instant::now() + REDISCOVER_FIRST,
            pause: REDISCOVER_FIRST,
        },
        last_round: None,
        handshake_warned: HashSet::new(),
        handshake_failures: 0,
        key,
        // Never repeated by this node: its start time in nanoseconds, then
        // one more per message (a restart starts above what it sent).
        gossip_seq: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX / 2)),
    };
    let now = Instant::now();
    for p in lp
        .static_peers
        .iter()
        .filter_map(|(_, p)| *p)
        .collect::<Vec<_>>()
    {
        lp.conns.learn(p, Found::Static, now);
    }
    // Advertise what we already hold.
    let held = super::blocking(move || store.list()).await?;
    for a in held {
        lp.provide(a.id);
    }
    Ok((client, lp))
}

fn peer_of(addr: &Multiaddr) -> Option<PeerId> {
    addr.iter().find_map(|p| match p {
        Protocol::P2p(id) => Some(id),
        _ => None,
    })
}

impl EventLoop {
    /// Runs the loop.
    pub async fn run(mut self) {
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The next rediscovery round, armed only while no peer is connected:
        // a connected node (nearly always) has no timer of its own here but
        // the tick (a thousand nodes in one process wake less).
        let discover = tokio::time::sleep_until(self.rediscover.next.into());
        tokio::pin!(discover);
        loop {
            if self.connected.is_empty() && discover.deadline() != self.rediscover.next.into() {
                discover.as_mut().reset(self.rediscover.next.into());
            }
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                cmd = self.rx.recv() => match cmd {
                    Some(Command::Shutdown) | None => break,
                    Some(cmd) => self.on_command(cmd),
                },
                _ = tick.tick() => self.on_tick(),
                _ = &mut discover, if self.connected.is_empty() => self.on_discover_tick(),
            }
        }
        tracing::info!(peer = %self.shared.peer_id, "mesh event loop stopped");
        let peer_id = self.shared.peer_id;
        let stopped = self.stopped.clone();
        // Dropping the swarm closes every connection; then report.
        drop(self);
        tracing::debug!(peer = %peer_id, "swarm dropped");
        stopped.send_replace(true);
    }

    fn provide(&mut self, id: crate::store::ArtifactId) {
        self.provided.insert(id);
        if let Err(e) = self
            .swarm
            .behaviour_mut()
            .kad
            .start_providing(kad::RecordKey::new(&id.0))
        {
            tracing::warn!(%id, error = %e, "cannot advertise artifact");
        }
    }

    fn dial(&mut self, addr: Multiaddr) {
        let opts = match peer_of(&addr) {
            Some(p) => DialOpts::peer_id(p)
                .addresses(vec![addr.clone()])
                .condition(PeerCondition::DisconnectedAndNotDialing)
                .build(),
            None => DialOpts::unknown_peer_id().address(addr.clone()).build(),
        };
        match self.swarm.dial(opts) {
            Ok(()) | Err(DialError::DialPeerConditionFalse(_)) => {}
            Err(e) => tracing::debug!(%addr, error = %e, "dial failed"),
        }
    }

    /// While no peer is connected: a rediscovery round at 0.5 s, 1 s, 2 s, ...
    /// up to [`super::REDISCOVER_MAX`] apart. Lost peers are redialled by the
    /// connection manager (each on its own backoff) while fewer than
    /// `mesh.min_connections` are connected.
    fn on_discover_tick(&mut self) {
        let now = Instant::now();
        if self.connected.is_empty() && now >= self.rediscover.next {
            self.rediscover_round("no peer connected");
            self.rediscover.pause = (self.rediscover.pause * 2).min(super::REDISCOVER_MAX);
            self.rediscover.next = now + self.rediscover.pause;
        }
    }

    /// One rediscovery round: an mDNS query of our own (libp2p's stop once it
    /// heard one answer, and an answer it already knows is not reported
    /// again), dials of known peers not connected (up to
    /// `mesh.min_connections`, backoffs ignored), a redial of every static
    /// peer, and a Kademlia bootstrap.
    fn rediscover_round(&mut self, why: &str) {
        self.last_round = Some(Instant::now());
        let queried = if self.shared.config.mdns {
            self.send_mdns_query()
        } else {
            0
        };
        tracing::debug!(why, queried, "rediscovery round");
        self.dial_known(true);
        self.redial_static();
        // Fails harmlessly when the routing table is empty.
        let _ = self.swarm.behaviour_mut().kad.bootstrap();
    }

    /// Sends an mDNS query for libp2p peers (`_p2p._udp.local` PTR) from each
    /// listen address; the answers (multicast) reach the mDNS behaviour.
    /// Returns on how many interfaces it went out.
    fn send_mdns_query(&self) -> usize {
        let packet = mdns_query_packet();
        let dst = std::net::SocketAddr::from(([224, 0, 0, 251], 5353));
        let mut sent = 0;
        for ip in &self.iface_addrs {
            let res = std::net::UdpSocket::bind((*ip, 0)).and_then(|s| {
                s.set_nonblocking(true)?;
                s.send_to(&packet, dst)
            });
            match res {
                Ok(_) => sent += 1,
                Err(e) => tracing::debug!(%ip, error = %e, "mDNS query not sent"),
            }
        }
        sent
    }

    /// Starts the dials the connection manager picks (`force`: ignoring backoffs).
    fn dial_known(&mut self, force: bool) {
        let picks = self.conns.dials(Instant::now(), force);
        self.dial_picks(picks);
    }

    fn dial_picks(&mut self, picks: Vec<PeerId>) {
        for p in picks {
            // The address book adds what it knows to every dial by id; a
            // static peer's configured address is not in it.
            let mut addrs = self.mdns_peers.get(&p).cloned().unwrap_or_default();
            addrs.extend(
                self.static_peers
                    .iter()
                    .filter(|(_, sp)| *sp == Some(p))
                    .map(|(a, _)| a.clone()),
            );
            tracing::debug!(peer = %p, "dialling a known peer");
            self.dial_peer(p, addrs);
        }
    }

    fn dial_peer(&mut self, p: PeerId, addrs: Vec<Multiaddr>) {
        let opts = DialOpts::peer_id(p)
            .addresses(addrs)
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .build();
        match self.swarm.dial(opts) {
            Ok(()) | Err(DialError::DialPeerConditionFalse(_)) => {}
            Err(e) => {
                tracing::debug!(peer = %p, error = %e, "dial failed");
                self.conns.dial_failed(p, Instant::now());
            }
        }
    }

    /// Dials the static peers that are not connected, at each tick once out
    /// of their backoff (a static peer at its bound refuses; redialling it
    /// every tick kept 1,000 in-process nodes making 30 connections a second
    /// for nothing). A static address whose peer id is not known yet is
    /// dialled at every tick. The manager counts them as dialled.
    fn redial_static(&mut self) {
        let now = Instant::now();
        let mut redial = Vec::new();
        for (a, p) in &self.static_peers {
            match p {
                None => redial.push(a.clone()),
                Some(p) => {
                    if !self.connected.contains_key(p)
                        && !self.bans.contains_key(p)
                        && self.conns.take_dial(*p, now)
                    {
                        redial.push(a.clone());
                    }
                }
            }
        }
        for a in redial {
            self.dial(a);
        }
    }

    /// A connection that failed after its TCP connection was made (pnet, the
    /// secure channel or the muxer): one warning per remote address, since
    /// the cause (most often a different swarm key) does not go away by itself.
    fn on_handshake_failure(&mut self, ip: std::net::IpAddr, addr: &Multiaddr, error: &str) {
        self.handshake_failures += 1;
        tracing::debug!(%addr, error, "handshake failed");
        if self.handshake_warned.insert(ip) {
            let cause = if self.shared.config.psk.is_some() {
                "most likely a different swarm key (mesh.psk_file) on the other side, or none \
                 (or the other side was at its connection bound, or had as many connections in \
                 handshake as it accepts)"
            } else {
                "most likely the other side uses a swarm key (mesh.psk_file) and this node does not \
                 (or the other side was at its connection bound, or had as many connections in \
                 handshake as it accepts)"
            };
            tracing::warn!(
                %addr,
                error,
                "handshake with {ip} failed: {cause}; logged once per address"
            );
        }
    }

    fn on_tick(&mut self) {
        // Provider records only reach peers in the routing table: re-advertise
        // when it grows, at each new entry while it is small, then each time
        // it doubles (each advertisement is a lookup that dials the peers on
        // its path: 50 downloads on 1,000 in-process nodes re-advertising at
        // every new entry sent 7,000 Kademlia requests during their pulls).
        let size: usize = self
            .swarm
            .behaviour_mut()
            .kad
            .kbuckets()
            .map(|b| b.num_entries())
            .sum();
        if size > self.routing_size
            && (self.routing_size < super::behaviour::KAD_REPLICATION.get()
                || size >= 2 * self.routing_size)
        {
            self.routing_size = size;
            let ids: Vec<_> = self.provided.iter().copied().collect();
            for id in ids {
                self.provide(id);
            }
        }
        let now = Instant::now();
        let expired: Vec<PeerId> = self
            .bans
            .iter()
            .filter(|(_, (until, _))| *until <= now)
            .map(|(p, _)| *p)
            .collect();
        let any_expired = !expired.is_empty();
        for p in expired {
            self.bans.remove(&p);
            self.conns.set_banned(p, false);
            self.swarm.behaviour_mut().blocked.unblock_peer(p);
            tracing::info!(peer = %p, "ban expired");
        }
        if any_expired {
            self.metrics.peers_banned(self.bans.len());
        }
        self.redial_static();
        self.manage_connections(now);
    }

    /// The connection manager's tick: feed it what was used, close what it
    /// no longer wants, dial what it lacks.
    fn manage_connections(&mut self, now: Instant) {
        for (p, at, busy) in self.activity.take(now) {
            self.conns.used(p, at, busy);
        }
        let mesh: HashSet<PeerId> = self
            .swarm
            .behaviour()
            .gossipsub
            .all_mesh_peers()
            .copied()
            .collect();
        let plan = self.conns.tick(now, &mesh);
        if !plan.close.is_empty() {
            tracing::debug!(
                closing = plan.close.len(),
                connected = self.connected.len(),
                "closing idle or surplus connections"
            );
            self.metrics.connections_trimmed(plan.close.len());
        }
        for p in plan.close {
            let _ = self.swarm.disconnect_peer_id(p);
        }
        self.dial_picks(plan.dial);
        // Kademlia learns of peers it never connected to only through
        // lookups: a random walk now and then (rarely once enough are known).
        // It dials, so it waits for room below the high mark.
        if now >= self.next_walk
            && !self.connected.is_empty()
            && self.connected.len() < self.conns.high_mark()
        {
            let few = self.conns.known() < 2 * self.shared.config.max_connections as usize;
            self.next_walk = now + if few { WALK_FEW } else { WALK_MANY };
            // A walk dials the peers on its path (about 70 Kademlia requests
            // a walk on 1,000 in-process nodes, whose walks were a third of
            // their connections at rest): only while few peers are known.
            // Once enough are, the peer exchange below goes on alone.
            if few {
                self.swarm
                    .behaviour_mut()
                    .kad
                    .get_closest_peers(PeerId::random());
            }
            // And a connected peer for the peers it knows (no dial).
            if let Some(p) = self.random_connected() {
                let id = self
                    .swarm
                    .behaviour_mut()
                    .meta
                    .send_request(&p, MetaRequest::Peers);
                self.pex_pending.insert(id);
            }
        }
        // Anti-entropy for releases: a node that missed a release's gossip
        // (it was down, or its part of the mesh was cut off) gets it from a
        // random neighbour's list within a minute or so.
        if now >= self.next_release_sync {
            self.next_release_sync = now + self.shared.config.release_sync_interval;
            if let Some(p) = self.random_connected() {
                let id = self
                    .swarm
                    .behaviour_mut()
                    .meta
                    .send_request(&p, MetaRequest::Releases);
                self.releases_pending.insert(id);
            }
        }
        self.metrics.peers_known(self.conns.known());
    }

    /// Publishes `data` on `topic` in a signed envelope (`super::gossip`).
    fn publish(&mut self, topic: &'static str, data: Vec<u8>) {
        self.gossip_seq = self.gossip_seq.wrapping_add(1);
        let sealed = match super::gossip::seal(&self.key, topic, self.gossip_seq, data) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(topic, error = %e, "gossip not sent");
                return;
            }
        };
        let t = gossipsub::IdentTopic::new(topic);
        if let Err(e) = self.swarm.behaviour_mut().gossipsub.publish(t, sealed) {
            tracing::debug!(topic, error = %e, "gossip publish failed");
        }
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Dial(addr) => {
                if !self.static_peers.iter().any(|(a, _)| a == &addr) {
                    self.static_peers.push((addr.clone(), peer_of(&addr)));
                }
                self.dial(addr);
            }
            Command::Peers(reply) => {
                let now = Instant::now();
                let mut out: Vec<PeerInfo> = self
                    .connected
                    .iter()
                    .map(|(p, c)| PeerInfo {
                        peer_id: p.to_string(),
                        addr: c.addr.to_string(),
                        connected_secs: now.duration_since(c.since).as_secs(),
                        agent: c.agent.clone(),
                        banned: self.bans.get(p).map(|(until, reason)| {
                            format!(
                                "{reason} ({}s left)",
                                until.saturating_duration_since(now).as_secs()
                            )
                        }),
                    })
                    .collect();
                for (p, (until, reason)) in self
                    .bans
                    .iter()
                    .filter(|(p, _)| !self.connected.contains_key(p))
                {
                    out.push(PeerInfo {
                        peer_id: p.to_string(),
                        addr: String::new(),
                        connected_secs: 0,
                        agent: String::new(),
                        banned: Some(format!(
                            "{reason} ({}s left)",
                            until.saturating_duration_since(now).as_secs()
                        )),
                    });
                }
                let _ = reply.send(out);
            }
            Command::ListenAddrs(reply) => {
                let _ = reply.send(self.swarm.listeners().cloned().collect());
            }
            Command::Meta { peer, req, reply } => {
                if self.bans.contains_key(&peer) {
                    let _ = reply.send(Err(MeshError::Request {
                        peer,
                        reason: "peer is banned".into(),
                    }));
                    return;
                }
                // A have-map question keeps no connection by itself: a
                // download asks every peer it reaches, most answer
                // "nothing", and a connection kept for each such answer left
                // a starving node no seat for the holder it needed. The
                // download keeps its holders and fellows itself, and chunk
                // streams keep their sources.
                if !matches!(req, MetaRequest::HaveMap(_)) {
                    self.activity.touch(peer);
                }
                let id = self.swarm.behaviour_mut().meta.send_request(&peer, req);
                self.pending_meta.insert(id, reply);
            }
            Command::Respond { channel, res } => {
                if self
                    .swarm
                    .behaviour_mut()
                    .meta
                    .send_response(channel, res)
                    .is_err()
                {
                    tracing::debug!("meta response dropped: requester went away");
                }
            }
            Command::Provide(id) => self.provide(id),
            Command::GetProviders(id, reply) => {
                let q = self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .get_providers(kad::RecordKey::new(&id.0));
                self.pending_providers.insert(q, (HashSet::new(), reply));
            }
            Command::PushHave { peers, msg } => {
                for p in peers {
                    if !self.bans.contains_key(&p) && self.connected.contains_key(&p) {
                        // Not tracked: the answer is an Ack, dropped on arrival.
                        let req = MetaRequest::Have(msg.clone());
                        self.swarm.behaviour_mut().meta.send_request(&p, req);
                    }
                }
            }
            Command::Publish { topic, data } => self.publish(topic, data),
            Command::Ban { peer, reason } => {
                tracing::warn!(%peer, %reason, "banning peer");
                self.bans
                    .insert(peer, (Instant::now() + self.ban_duration, reason));
                self.swarm.behaviour_mut().blocked.block_peer(peer);
                self.conns.set_banned(peer, true);
                let _ = self.swarm.disconnect_peer_id(peer);
                self.metrics.peer_banned(self.bans.len());
                let _ = self.shared.events.send(MeshEvent::Banned(peer));
            }
            Command::Rediscover => {
                let recent = self.last_round.is_some_and(|t| t.elapsed() < ROUND_MIN_GAP);
                if !recent {
                    self.rediscover_round("a download found no source");
                }
            }
            Command::HandshakeFailures(reply) => {
                let _ = reply.send(self.handshake_failures);
            }
            Command::Shutdown => {}
        }
    }

    /// A dial of this node's failed: the manager backs the peer off (unless
    /// this node's own limits stopped it), and a failed handshake is logged.
    fn on_dial_error(&mut self, peer_id: Option<PeerId>, error: DialError) {
        if let Some(p) = peer_id {
            match &error {
                // Stopped here, not by the peer: no backoff for it.
                DialError::Denied { .. } => self.conns.dial_stopped(p),
                _ => self.conns.dial_failed(p, Instant::now()),
            }
        }
        let DialError::Transport(errs) = error else {
            return;
        };
        for (addr, e) in &errs {
            if let libp2p::TransportError::Other(e) = e
                && !is_connect_error(e)
                && let Some(ip) = ip_of(addr)
            {
                self.on_handshake_failure(ip, addr, &error_chain(e));
            }
        }
    }

    /// An incoming connection was denied (at the bound, banned, not allowed).
    fn on_refused(&mut self, cause: &libp2p::swarm::ConnectionDenied) {
        self.metrics.connection_refused();
        // At the bound: the gate (before the handshake) or libp2p's limits
        // (handshakes that finished together).
        if cause.downcast_ref::<super::gate::AtBound>().is_some()
            || cause
                .downcast_ref::<libp2p::connection_limits::Exceeded>()
                .is_some()
        {
            self.conns.refused(Instant::now());
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, peer = %self.shared.peer_id, "listening");
                if let Some(Protocol::Ip4(ip)) = address.iter().next()
                    && !ip.is_loopback()
                    && !ip.is_unspecified()
                {
                    self.iface_addrs.insert(ip);
                }
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                if let Some(Protocol::Ip4(ip)) = address.iter().next() {
                    self.iface_addrs.remove(&ip);
                }
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                self.on_dial_error(peer_id, error);
            }
            SwarmEvent::IncomingConnectionError {
                error: libp2p::swarm::ListenError::Denied { cause },
                ..
            } => self.on_refused(&cause),
            SwarmEvent::IncomingConnectionError {
                send_back_addr,
                error: libp2p::swarm::ListenError::Transport(libp2p::TransportError::Other(e)),
                ..
            } => {
                // Accepted, then failed: the handshake (the port is the peer's ephemeral one).
                if let Some(ip) = ip_of(&send_back_addr) {
                    self.on_handshake_failure(ip, &send_back_addr, &error_chain(&e));
                }
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                endpoint,
                num_established,
                ..
            } => {
                let addr = endpoint.get_remote_address().clone();
                if endpoint.is_dialer() {
                    let mut is_static = false;
                    for (a, p) in &mut self.static_peers {
                        if a == &addr || peer_of(a) == Some(peer_id) {
                            *p = Some(peer_id);
                            is_static = true;
                        }
                    }
                    if is_static {
                        self.conns.learn(peer_id, Found::Static, Instant::now());
                    }
                }
                if let Some(ip) = ip_of(&addr) {
                    self.handshake_warned.remove(&ip);
                }
                self.metrics.connection_opened();
                if num_established.get() == 1 {
                    if endpoint.is_dialer() {
                        self.conns.connected_to(peer_id, Instant::now());
                    } else {
                        self.conns.connected_from(peer_id, Instant::now());
                    }
                    tracing::info!(peer = %peer_id, %addr, "peer connected");
                    self.connected.insert(
                        peer_id,
                        Connected {
                            addr,
                            since: Instant::now(),
                            agent: String::new(),
                        },
                    );
                    self.metrics.peers_connected(self.connected.len());
                    let _ = self.shared.events.send(MeshEvent::Connected(peer_id));
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                cause,
                ..
            } => {
                tracing::info!(peer = %peer_id, ?cause, "peer disconnected");
                self.connected.remove(&peer_id);
                if self.connected.is_empty() {
                    // The last peer went: rediscovery starts fast again.
                    self.rediscover.pause = REDISCOVER_FIRST;
                    self.rediscover.next = Instant::now() + REDISCOVER_FIRST;
                }
                self.conns.disconnected(peer_id, Instant::now());
                self.metrics.peers_connected(self.connected.len());
                let _ = self.shared.events.send(MeshEvent::Disconnected(peer_id));
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established,
                cause,
                ..
            } => {
                tracing::debug!(peer = %peer_id, ?cause, num_established, "one connection closed");
            }
            SwarmEvent::Behaviour(ev) => self.on_behaviour_event(ev),
            _ => {}
        }
    }

    /// Adds `addr` of `peer` to Kademlia's routing table unless the peer's
    /// bucket is full: Kademlia would then dial the bucket's oldest
    /// disconnected peer to test it, and with bounded connections most are
    /// disconnected (see `behaviour.rs`). The peer stays known to the
    /// connection manager either way; full buckets are the far ones, which
    /// lookups reach through other peers.
    /// Up to [`wire::MAX_PEX_PEERS`] known peers with addresses (mDNS's and
    /// the routing table's), a random choice, for `asker`'s peer exchange.
    fn peer_records(&mut self, asker: PeerId) -> Vec<wire::PeerRecord> {
        let mut all: HashMap<PeerId, Vec<Multiaddr>> = self.mdns_peers.clone();
        for (p, addrs) in self.swarm.behaviour().book.iter() {
            if self.conns.is_known(*p) {
                let v = all.entry(*p).or_default();
                for a in addrs {
                    if !v.contains(a) {
                        v.push(a.clone());
                    }
                }
            }
        }
        for b in self.swarm.behaviour_mut().kad.kbuckets() {
            for e in b.iter() {
                let v = all.entry(*e.node.key.preimage()).or_default();
                for a in e.node.value.iter() {
                    if !v.contains(a) {
                        v.push(a.clone());
                    }
                }
            }
        }
        let mut list: Vec<(PeerId, Vec<Multiaddr>)> = all
            .into_iter()
            .filter(|(p, a)| *p != asker && !a.is_empty() && !self.bans.contains_key(p))
            .collect();
        // A random choice: a partial shuffle of the first MAX_PEX_PEERS.
        let mut seed = random_seed_u64() | 1;
        let n = list.len();
        for i in 0..n.min(wire::MAX_PEX_PEERS) {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let j = i + (seed as usize) % (n - i);
            list.swap(i, j);
        }
        list.truncate(wire::MAX_PEX_PEERS);
        list.into_iter()
            .map(|(p, addrs)| wire::PeerRecord {
                peer: p.to_bytes(),
                addrs: addrs
                    .iter()
                    .take(wire::MAX_PEX_ADDRS)
                    .map(|a| serde_bytes::ByteBuf::from(a.to_vec()))
                    .collect(),
            })
            .collect()
    }

    /// A peer list from `from` (peer exchange): each valid id with a usable
    /// address is learnt (known, in the routing table if there is room),
    /// never dialled here. Loopback addresses count only from a peer on this
    /// host; more than the bound, bad ids and bad addresses are dropped.
    fn on_peer_records(&mut self, from: PeerId, list: Vec<wire::PeerRecord>) {
        let local = self
            .connected
            .get(&from)
            .is_some_and(|c| is_loopback(&c.addr));
        let now = Instant::now();
        let mut new = 0usize;
        for (p, addrs) in wire::usable_peers(list, &self.shared.peer_id, local) {
            if self.bans.contains_key(&p) {
                continue;
            }
            if !self.conns.is_known(p) {
                new += 1;
            }
            for a in &addrs {
                self.kad_add(p, a.clone());
            }
            self.note_addrs(p, addrs);
            self.conns.learn(p, Found::Kad, now);
        }
        let few = self.conns.known() < 2 * self.shared.config.max_connections as usize;
        if new > 0 && few {
            self.next_walk = self.next_walk.min(now + WALK_AGAIN);
        }
        tracing::debug!(%from, new, "peer exchange");
        self.metrics.peers_known(self.conns.known());
    }

    /// Keeps `addrs` for `peer` in the address book
    /// ([`super::book::AddressBook`], offered to every dial); when it is
    /// full, peers the manager no longer knows go first.
    fn note_addrs(&mut self, peer: PeerId, addrs: Vec<Multiaddr>) {
        let conns = &self.conns;
        self.swarm
            .behaviour_mut()
            .book
            .note(peer, addrs, |p| conns.is_known(*p));
    }

    /// Copies the addresses Kademlia holds for `peer` (its routing table and
    /// its running queries) into the address book, which outlives queries.
    fn note_query_addrs(&mut self, peer: PeerId) {
        // Kademlia's answer to a dial by id: a read of its tables, no side effect.
        let addrs = NetworkBehaviour::handle_pending_outbound_connection(
            &mut self.swarm.behaviour_mut().kad,
            libp2p::swarm::ConnectionId::new_unchecked(0),
            Some(peer),
            &[],
            libp2p::core::Endpoint::Dialer,
        )
        .unwrap_or_default()
        .into_iter()
        .filter(|a| !is_unspecified(a))
        .collect();
        self.note_addrs(peer, addrs);
    }

    /// A connected peer picked at random.
    fn random_connected(&self) -> Option<PeerId> {
        let n = self.connected.len();
        if n == 0 {
            return None;
        }
        self.connected
            .keys()
            .nth(random_seed_u64() as usize % n)
            .copied()
    }

    fn kad_add(&mut self, peer: PeerId, addr: Multiaddr) {
        let kad = &mut self.swarm.behaviour_mut().kad;
        if kad
            .kbucket(peer)
            .is_some_and(|b| b.num_entries() >= libp2p::kad::K_VALUE.get())
        {
            return;
        }
        kad.add_address(&peer, addr);
    }

    // long: one short arm per behaviour event (the rust-libp2p event-loop
    // shape); each arm only updates state or answers a pending request.
    fn on_behaviour_event(&mut self, ev: BehaviourEvent) {
        match ev {
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                if let Some(c) = self.connected.get_mut(&peer_id) {
                    c.agent = info.agent_version.clone();
                }
                if info.protocols.contains(&KAD_PROTOCOL) {
                    self.conns.learn(peer_id, Found::Kad, Instant::now());
                    let local = self
                        .connected
                        .get(&peer_id)
                        .is_some_and(|c| is_loopback(&c.addr));
                    let mut usable = Vec::new();
                    for a in info.listen_addrs {
                        if !is_unspecified(&a) {
                            if local || !is_loopback(&a) {
                                usable.push(a.clone());
                            }
                            self.kad_add(peer_id, a);
                        }
                    }
                    self.note_addrs(peer_id, usable);
                }
            }
            BehaviourEvent::Mdns(mdns::Event::Discovered(found)) => {
                let mut by_peer: HashMap<PeerId, Vec<Multiaddr>> = HashMap::new();
                for (p, a) in found {
                    self.kad_add(p, a.clone());
                    by_peer.entry(p).or_default().push(a);
                }
                let now = Instant::now();
                for (p, addrs) in by_peer {
                    // Remembered, so a failed dial is retried (mDNS reports an address once).
                    let m = self.mdns_peers.entry(p).or_default();
                    for a in addrs {
                        if !m.contains(&a) {
                            m.push(a);
                        }
                    }
                    if !self.connected.contains_key(&p) && !self.conns.is_known(p) {
                        tracing::info!(peer = %p, "discovered via mDNS");
                    }
                    self.conns.learn(p, Found::Mdns, now);
                }
                // Discovery learns every node; the manager dials only while
                // fewer than mesh.min_connections are connected.
                self.dial_known(false);
                self.metrics.peers_known(self.conns.known());
            }
            BehaviourEvent::Mdns(mdns::Event::Expired(gone)) => {
                for (p, a) in gone {
                    if let Some(m) = self.mdns_peers.get_mut(&p) {
                        m.retain(|x| x != &a);
                        if m.is_empty() {
                            self.mdns_peers.remove(&p);
                            self.conns.mdns_expired(p);
                        }
                    }
                }
            }
            BehaviourEvent::Meta(request_response::Event::Message { peer, message, .. }) => {
                match message {
                    request_response::Message::Request {
                        request: MetaRequest::Have(h),
                        channel,
                        ..
                    } => {
                        self.activity.touch(peer);
                        self.on_have(peer, h);
                        let ack = self
                            .swarm
                            .behaviour_mut()
                            .meta
                            .send_response(channel, MetaResponse::Ack);
                        if ack.is_err() {
                            tracing::debug!(%peer, "have ack dropped: requester went away");
                        }
                    }
                    request_response::Message::Request {
                        request: MetaRequest::Peers,
                        channel,
                        ..
                    } => {
                        let list = self.peer_records(peer);
                        let sent = self
                            .swarm
                            .behaviour_mut()
                            .meta
                            .send_response(channel, MetaResponse::Peers(list));
                        if sent.is_err() {
                            tracing::debug!(%peer, "peer list dropped: requester went away");
                        }
                    }
                    request_response::Message::Request {
                        request, channel, ..
                    } => {
                        self.activity.touch(peer);
                        let provider = self.provider.clone();
                        let tx = self.self_tx.clone();
                        tokio::spawn(async move {
                            let res = provider.meta(request).await;
                            if let Some(tx) = tx.upgrade() {
                                let _ = tx.send(Command::Respond { channel, res }).await;
                            }
                        });
                    }
                    request_response::Message::Response {
                        request_id,
                        response,
                    } => {
                        if let Some(reply) = self.pending_meta.remove(&request_id) {
                            let _ = reply.send(Ok(response));
                        } else if self.pex_pending.remove(&request_id) {
                            if let MetaResponse::Peers(list) = response {
                                self.on_peer_records(peer, list);
                            }
                        } else if self.releases_pending.remove(&request_id) {
                            if let MetaResponse::Releases(list) = response {
                                self.on_release_list(peer, list);
                            }
                        } else if response != MetaResponse::Ack {
                            tracing::debug!(%peer, "unexpected meta response");
                        }
                    }
                }
            }
            BehaviourEvent::Meta(request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            }) => {
                self.pex_pending.remove(&request_id);
                self.releases_pending.remove(&request_id);
                if let Some(reply) = self.pending_meta.remove(&request_id) {
                    let _ = reply.send(Err(MeshError::Request {
                        peer,
                        reason: error.to_string(),
                    }));
                }
            }
            BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                id,
                result: kad::QueryResult::GetProviders(res),
                step,
                ..
            }) => {
                if let Ok(kad::GetProvidersOk::FoundProviders { mut providers, .. }) = res {
                    // This node's own record (a download provides what it
                    // fetches from the start) is no find: counted as one, it
                    // ended every lookup at its first step, before any peer
                    // was asked.
                    providers.remove(&self.shared.peer_id);
                    // Kademlia keeps a provider's addresses (from its record)
                    // only while the query runs, and offers them to dials
                    // only then: they go to the address book before the query
                    // ends, or the download's dial of the provider by id finds
                    // no address (the provider is not in this node's routing
                    // table on a mesh larger than a bucket).
                    for p in &providers {
                        self.note_query_addrs(*p);
                    }
                    if let Some((found, _)) = self.pending_providers.get_mut(&id) {
                        found.extend(providers);
                    }
                }
                // Answer with the first providers found: waiting for the query to
                // visit every closest peer costs seconds on a large mesh, and a
                // download looks up providers again while it runs.
                let have_some = self
                    .pending_providers
                    .get(&id)
                    .is_some_and(|(found, _)| !found.is_empty());
                if (step.last || have_some)
                    && let Some((found, reply)) = self.pending_providers.remove(&id)
                {
                    let _ = reply.send(found);
                    if !step.last
                        && let Some(mut q) = self.swarm.behaviour_mut().kad.query_mut(&id)
                    {
                        q.finish();
                    }
                }
            }
            BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            }) => self.on_gossip(propagation_source, message_id, message),
            BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                result: kad::QueryResult::GetClosestPeers(Ok(ok)),
                ..
            }) => {
                // A random walk's finds: known (and in the routing table), not dialled.
                let now = Instant::now();
                let mut new = 0usize;
                for p in ok.peers {
                    if p.peer_id == self.shared.peer_id {
                        continue;
                    }
                    let addrs: Vec<Multiaddr> = p
                        .addrs
                        .iter()
                        .filter(|a| !is_unspecified(a))
                        .cloned()
                        .collect();
                    for a in &addrs {
                        self.kad_add(p.peer_id, a.clone());
                    }
                    self.note_addrs(p.peer_id, addrs);
                    if !self.conns.is_known(p.peer_id) {
                        new += 1;
                    }
                    self.conns.learn(p.peer_id, Found::Kad, now);
                }
                // Still finding new peers while few are known: walk again
                // soon (bounded: once twice `max_connections` are known,
                // walks slow to WALK_MANY, and each waits for room to dial).
                let few = self.conns.known() < 2 * self.shared.config.max_connections as usize;
                if new > 0 && few {
                    self.next_walk = self.next_walk.min(now + WALK_AGAIN);
                }
            }
            BehaviourEvent::Kad(kad::Event::RoutingUpdated { peer, .. }) => {
                self.conns.learn(peer, Found::Kad, Instant::now());
            }
            // A connected peer that speaks Kademlia (inserts are manual).
            BehaviourEvent::Kad(
                kad::Event::RoutablePeer { peer, address }
                | kad::Event::PendingRoutablePeer { peer, address },
            ) => {
                self.kad_add(peer, address);
                self.conns.learn(peer, Found::Kad, Instant::now());
            }
            BehaviourEvent::Ping(ping::Event {
                peer,
                result: Ok(rtt),
                ..
            }) => self.conns.rtt(peer, rtt),
            _ => {}
        }
    }

    /// A gossip message's first copy: its envelope is checked here, once,
    /// and gossipsub told whether to forward it.
    fn on_gossip(
        &mut self,
        from: PeerId,
        id: gossipsub::MessageId,
        mut message: gossipsub::Message,
    ) {
        let opened = super::gossip::open(message.topic.as_str(), &message.data);
        let acceptance = if opened.is_ok() {
            gossipsub::MessageAcceptance::Accept
        } else {
            gossipsub::MessageAcceptance::Reject
        };
        self.swarm
            .behaviour_mut()
            .gossipsub
            .report_message_validation_result(&id, &from, acceptance);
        let source = match opened {
            Ok((author, payload)) => {
                message.data = payload;
                author
            }
            Err(e) => {
                tracing::debug!(peer = %from, topic = %message.topic, error = %e, "gossip refused");
                return;
            }
        };
        if message.topic == gossipsub::IdentTopic::new(RELEASES_TOPIC).hash() {
            let signed = match wire::decode_release(&message.data)
                .map_err(|e| e.to_string())
                .and_then(|r| SignedRelease::decode(&r.signed).map_err(|e| e.to_string()))
            {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(%source, error = %e, "bad release announcement");
                    return;
                }
            };
            let store = self.store.clone();
            let events = self.shared.events.clone();
            tokio::spawn(async move {
                match super::blocking(move || store.apply_release(&signed)).await {
                    Ok(outcome) => {
                        tracing::info!(%source, ?outcome, "release announcement");
                        let _ = events.send(MeshEvent::Release);
                    }
                    Err(e) => tracing::info!(%source, error = %e, "release announcement refused"),
                }
            });
        } else if message.topic == gossipsub::IdentTopic::new(wire::RELEASE_MANIFESTS_TOPIC).hash()
        {
            self.on_release_with_manifest(source, &message.data);
        } else if message.topic == gossipsub::IdentTopic::new(wire::CARDS_TOPIC).hash() {
            if message.data.len() <= wire::MAX_CARD_BYTES {
                let _ = self.shared.events.send(MeshEvent::Card {
                    peer: source,
                    data: message.data.into(),
                });
            } else {
                tracing::debug!(%source, len = message.data.len(), "oversized serving card");
            }
        } else {
            match wire::decode_have(&message.data) {
                Ok(h) => self.on_have(source, h),
                Err(e) => tracing::debug!(%source, error = %e, "bad have announcement"),
            }
        }
    }

    /// A peer's releases (anti-entropy): each is applied as a gossiped one
    /// (signature, trust and sequence checked by the store); at most
    /// [`MAX_SYNCED_RELEASES`] are looked at.
    fn on_release_list(&mut self, from: PeerId, list: Vec<serde_bytes::ByteBuf>) {
        let store = self.store.clone();
        let events = self.shared.events.clone();
        tokio::spawn(async move {
            let applied = super::blocking(move || {
                Ok(list
                    .iter()
                    .take(MAX_SYNCED_RELEASES)
                    .filter_map(|b| SignedRelease::decode(b).ok())
                    .filter(|r| {
                        matches!(
                            store.apply_release(r),
                            Ok(crate::store::ReleaseOutcome::Applied)
                        )
                    })
                    .count())
            })
            .await
            .unwrap_or(0);
            if applied > 0 {
                tracing::info!(%from, applied, "releases caught up from a peer");
                let _ = events.send(MeshEvent::Release);
            }
        });
    }

    /// A release with its manifest: applied like a release announcement, and
    /// the manifest kept if the publisher is trusted and it hashes to the
    /// release's id.
    fn on_release_with_manifest(&mut self, source: PeerId, data: &[u8]) {
        let (signed, manifest) = match wire::decode_release_with_manifest(data)
            .map_err(|e| e.to_string())
            .and_then(|m| {
                SignedRelease::decode(&m.signed)
                    .map(|s| (s, m.manifest))
                    .map_err(|e| e.to_string())
            }) {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(%source, error = %e, "bad release-with-manifest announcement");
                return;
            }
        };
        let store = self.store.clone();
        let events = self.shared.events.clone();
        let cache = self.shared.manifests.clone();
        tokio::spawn(async move {
            let applied = super::blocking(move || {
                let outcome = store.apply_release(&signed)?;
                Ok((outcome, signed.verify().map(|r| r.id)))
            })
            .await;
            match applied {
                Ok((outcome, Ok(id))) => {
                    if cache.insert_verified(id, manifest, source) {
                        tracing::debug!(%source, %id, "manifest kept from a release announcement");
                    } else {
                        tracing::warn!(%source, %id, "a release came with a manifest that does not match it");
                    }
                    if outcome == crate::store::ReleaseOutcome::Applied {
                        tracing::info!(%source, ?outcome, "release announcement");
                        let _ = events.send(MeshEvent::Release);
                    }
                }
                Ok((_, Err(e))) => tracing::debug!(%source, error = %e, "release does not verify"),
                Err(e) => tracing::info!(%source, error = %e, "release announcement refused"),
            }
        });
    }

    /// A have-map from `peer` (gossiped or pushed): tell the downloads.
    fn on_have(&mut self, peer: PeerId, h: wire::HaveAnnounce) {
        match HaveMap::from_bytes(&h.have) {
            Some(have) => {
                let _ = self.shared.events.send(MeshEvent::Have {
                    peer,
                    id: h.id,
                    have: Arc::new(have),
                    origin: h.origin,
                });
            }
            None => tracing::debug!(%peer, "malformed have-map"),
        }
    }
}

/// The IP address of a multiaddr, if it starts with one.
fn ip_of(a: &Multiaddr) -> Option<std::net::IpAddr> {
    match a.iter().next()? {
        Protocol::Ip4(ip) => Some(ip.into()),
        Protocol::Ip6(ip) => Some(ip.into()),
        _ => None,
    }
}

/// Whether a dial failed before a TCP connection existed (refused,
/// unreachable): not a handshake failure.
fn is_connect_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind as K;
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                K::ConnectionRefused
                    | K::HostUnreachable
                    | K::NetworkUnreachable
                    | K::AddrNotAvailable
                    | K::AddrInUse
            )
        {
            return true;
        }
        cur = err.source();
    }
    false
}

/// An error and its sources, joined with ": ".
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(err) = cur {
        let s = err.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = err.source();
    }
    out
}

/// An mDNS query for `_p2p._udp.local` PTR records (what libp2p peers answer).
fn mdns_query_packet() -> Vec<u8> {
    let mut out = Vec::with_capacity(33);
    let id: u16 = random_seed_u16();
    out.extend_from_slice(&id.to_be_bytes());
    // Flags 0 (a query), one question, no answers/authorities/additionals.
    out.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in MDNS_SERVICE {
        out.push(label.len() as u8);
        out.extend_from_slice(label);
    }
    out.push(0);
    // PTR, class IN.
    out.extend_from_slice(&[0, 0x0c, 0, 0x01]);
    out
}

fn random_seed_u16() -> u16 {
    random_seed_u64() as u16
}

fn random_seed_u64() -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(Instant::now())
}

fn is_loopback(a: &Multiaddr) -> bool {
    a.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_loopback(),
        Protocol::Ip6(ip) => ip.is_loopback(),
        _ => false,
    })
}

fn is_unspecified(a: &Multiaddr) -> bool {
    a.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_unspecified(),
        Protocol::Ip6(ip) => ip.is_unspecified(),
        _ => false,
    })
}
