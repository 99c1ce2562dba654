//! The one task that owns the swarm. Everything else talks to it through a [`Client`].

use super::behaviour::{Behaviour, BehaviourEvent, build_swarm};
use super::client::{Client, Command, MeshEvent, PeerInfo, Shared};
use super::provider::Provider;
use super::wire::{self, CHUNK_PROTOCOL, KAD_PROTOCOL, MetaRequest, MetaResponse, RELEASES_TOPIC};
use super::{MeshConfig, MeshError};
use crate::store::{HaveMap, SignedRelease, Store};
use futures::StreamExt;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{DialError, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, Swarm, gossipsub, identify, kad, mdns, multiaddr::Protocol, request_response,
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
    routing_size: usize,
}

struct Connected {
    addr: Multiaddr,
    since: Instant,
    agent: String,
}

/// Builds the swarm, starts listening and returns the client and the (not yet running) loop.
pub async fn new(config: MeshConfig, store: Store) -> Result<(Client, EventLoop), MeshError> {
    let mut swarm = build_swarm(&config)?;
    for addr in &config.listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|e| MeshError::Listen {
                addr: addr.clone(),
                reason: e.to_string(),
            })?;
    }
    for topic in [wire::RELEASES_TOPIC, wire::HAVE_TOPIC] {
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
    let provider = Provider::new(store.clone(), config.test_corrupt_chunks);
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
    });
    let client = Client::new(tx.clone(), control, shared.clone(), store.clone());
    let mut lp = EventLoop {
        swarm,
        rx,
        self_tx: tx.downgrade(),
        shared,
        provider,
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
    };
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
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                cmd = self.rx.recv() => match cmd {
                    Some(Command::Shutdown) | None => break,
                    Some(cmd) => self.on_command(cmd),
                },
                _ = tick.tick() => self.on_tick(),
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

    fn on_tick(&mut self) {
        // Provider records only reach peers in the routing table: re-advertise when it grows.
        let size: usize = self
            .swarm
            .behaviour_mut()
            .kad
            .kbuckets()
            .map(|b| b.num_entries())
            .sum();
        if size > self.routing_size {
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
        for p in expired {
            self.bans.remove(&p);
            self.swarm.behaviour_mut().blocked.unblock_peer(p);
            tracing::info!(peer = %p, "ban expired");
        }
        let redial: Vec<Multiaddr> = self
            .static_peers
            .iter()
            .filter(|(_, p)| {
                p.is_none_or(|p| !self.connected.contains_key(&p) && !self.bans.contains_key(&p))
            })
            .map(|(a, _)| a.clone())
            .collect();
        for a in redial {
            self.dial(a);
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
            Command::Publish { topic, data } => {
                let t = gossipsub::IdentTopic::new(topic);
                if let Err(e) = self.swarm.behaviour_mut().gossipsub.publish(t, data) {
                    tracing::debug!(topic, error = %e, "gossip publish failed");
                }
            }
            Command::Ban { peer, reason } => {
                tracing::warn!(%peer, %reason, "banning peer");
                self.bans
                    .insert(peer, (Instant::now() + self.ban_duration, reason));
                self.swarm.behaviour_mut().blocked.block_peer(peer);
                let _ = self.swarm.disconnect_peer_id(peer);
                crate::metrics::global().peer_banned(self.bans.len());
                let _ = self.shared.events.send(MeshEvent::Banned(peer));
            }
            Command::Shutdown => {}
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, peer = %self.shared.peer_id, "listening");
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                endpoint,
                num_established,
                ..
            } => {
                let addr = endpoint.get_remote_address().clone();
                if endpoint.is_dialer() {
                    for (a, p) in &mut self.static_peers {
                        if a == &addr || peer_of(a) == Some(peer_id) {
                            *p = Some(peer_id);
                        }
                    }
                }
                if num_established.get() == 1 {
                    tracing::info!(peer = %peer_id, %addr, "peer connected");
                    self.connected.insert(
                        peer_id,
                        Connected {
                            addr,
                            since: Instant::now(),
                            agent: String::new(),
                        },
                    );
                    crate::metrics::global().peers_connected(self.connected.len());
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
                crate::metrics::global().peers_connected(self.connected.len());
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

    fn on_behaviour_event(&mut self, ev: BehaviourEvent) {
        match ev {
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                if let Some(c) = self.connected.get_mut(&peer_id) {
                    c.agent = info.agent_version.clone();
                }
                if info.protocols.contains(&KAD_PROTOCOL) {
                    for a in info.listen_addrs {
                        if !is_unspecified(&a) {
                            self.swarm.behaviour_mut().kad.add_address(&peer_id, a);
                        }
                    }
                }
            }
            BehaviourEvent::Mdns(mdns::Event::Discovered(found)) => {
                let mut by_peer: HashMap<PeerId, Vec<Multiaddr>> = HashMap::new();
                for (p, a) in found {
                    self.swarm.behaviour_mut().kad.add_address(&p, a.clone());
                    by_peer.entry(p).or_default().push(a);
                }
                for (p, addrs) in by_peer {
                    if !self.connected.contains_key(&p) && !self.bans.contains_key(&p) {
                        tracing::info!(peer = %p, "discovered via mDNS");
                        let opts = DialOpts::peer_id(p)
                            .addresses(addrs)
                            .condition(PeerCondition::DisconnectedAndNotDialing)
                            .build();
                        let _ = self.swarm.dial(opts);
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
                        request, channel, ..
                    } => {
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
                if let Some((found, _)) = self.pending_providers.get_mut(&id)
                    && let Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) = res
                {
                    found.extend(providers);
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
            BehaviourEvent::Gossipsub(gossipsub::Event::Message { message, .. }) => {
                self.on_gossip(message)
            }
            _ => {}
        }
    }

    fn on_gossip(&mut self, message: gossipsub::Message) {
        let Some(source) = message.source else { return };
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
        } else {
            match wire::decode_have(&message.data) {
                Ok(h) => self.on_have(source, h),
                Err(e) => tracing::debug!(%source, error = %e, "bad have announcement"),
            }
        }
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

fn is_unspecified(a: &Multiaddr) -> bool {
    a.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_unspecified(),
        Protocol::Ip6(ip) => ip.is_unspecified(),
        _ => false,
    })
}
