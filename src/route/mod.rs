//! The room as one endpoint: each generation request goes to the node where
//! its model is loaded and its prefix warm, over the mesh, and falls back
//! to the next node when one fails.
//!
//! - [`card`]: serving cards, gossiped often: what a node serves, how busy it
//!   is, which prompt prefixes it holds warm.
//! - [`heads`]: tokenizer-free prompt prefix hashes, so a node that lacks the
//!   model can still match a prompt against peers' warm prefixes.
//! - [`choose`]: the pure ranking of candidate nodes.
//! - [`forward`]: `/shoal/serve/1`, a request streamed to a peer and its answer
//!   streamed back (heartbeats, cancellation both ways).
//! - [`proxy`]: the HTTP middleware that decides, forwards, retries and ends a
//!   broken answer cleanly.
//!
//! [`Routing`] holds the state: the peers' cards, what this node forwarded
//! and has not finished, peers paused after a failure, the heads this node
//! served, recent decisions (for the dashboard and `GET /admin/route`).
//! Protocol details: docs/PROTOCOL.md ("Routing requests across the mesh").

pub mod card;
pub mod choose;
pub mod forward;
pub mod heads;
pub mod proxy;

use crate::config::{Kind, Setting};
use crate::mesh::{Client, PeerId, client::MeshEvent};
use crate::metrics::{Metrics, RouteOutcome, RouteReason};
use crate::serve::Serving;
use card::{CardModel, ServingCard};
use choose::{Offer, Target};
use heads::Head;
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// When a node that lacks a model pulls it while a peer serves its requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PullPolicy {
    /// On the first request for it (the default).
    FirstUse,
    /// Never: peers serve it.
    Never,
    /// Only names listed in `store.prefetch`.
    Pinned,
}

/// Settings of routing: the `[route]` section ([`SETTINGS`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouteConfig {
    /// Route requests across the mesh (else every request is served here).
    pub enabled: bool,
    /// When to pull a model that peers serve for this node.
    pub pull: PullPolicy,
    /// A peer that sends nothing (not even a heartbeat) for this long before
    /// the first byte of its answer is given up for the next node.
    #[serde(with = "crate::config::duration")]
    pub stall_timeout: Duration,
    /// How often this node's serving card is sent when it changed.
    #[serde(with = "crate::config::duration")]
    pub card_interval: Duration,
    /// A peer's card is forgotten this long after it arrived.
    #[serde(with = "crate::config::duration")]
    pub card_ttl: Duration,
}

impl Default for RouteConfig {
    /// The configuration file's defaults (`[route]`).
    fn default() -> Self {
        RouteConfig {
            enabled: true,
            pull: PullPolicy::FirstUse,
            stall_timeout: Duration::from_secs(5),
            card_interval: Duration::from_secs(1),
            card_ttl: Duration::from_secs(10),
        }
    }
}

impl RouteConfig {
    /// Checks ranges the types do not.
    pub fn validate(&self) -> Result<(), crate::config::ConfigError> {
        let bad = |k: &str, d: Duration, lo: Duration, hi: Duration| {
            (d < lo || d > hi).then(|| {
                crate::config::ConfigError::Invalid(format!(
                    "{k} = {} is outside {}..{}",
                    crate::config::HumanDuration(d),
                    crate::config::HumanDuration(lo),
                    crate::config::HumanDuration(hi)
                ))
            })
        };
        let ms = Duration::from_millis;
        let s = Duration::from_secs;
        if let Some(e) = bad("route.stall_timeout", self.stall_timeout, s(2), s(600))
            .or_else(|| bad("route.card_interval", self.card_interval, ms(100), s(60)))
            .or_else(|| bad("route.card_ttl", self.card_ttl, s(1), s(3600)))
        {
            return Err(e);
        }
        if self.card_ttl <= self.card_interval {
            return Err(crate::config::ConfigError::Invalid(
                "route.card_ttl must be longer than route.card_interval".into(),
            ));
        }
        Ok(())
    }
}

/// The `[route]` section's settings, in file order.
pub const SETTINGS: &[Setting] = &[
    Setting::new(
        "route.enabled",
        Some("SHOAL_ROUTE"),
        Kind::Bool,
        "Send each generation request to the mesh node where its model is loaded and its\nprompt prefix warm (else this node serves every request itself). A client can\nask for this node only with the header X-Shoal-Route: local.",
        "true",
    ),
    Setting::new(
        "route.pull",
        Some("SHOAL_ROUTE_PULL"),
        Kind::Str,
        "When a peer serves a model this node lacks, pull it in the background:\n\"first-use\", \"never\", or \"pinned\" (only names in store.prefetch).",
        "\"first-use\"",
    ),
    Setting::new(
        "route.stall_timeout",
        Some("SHOAL_ROUTE_STALL_TIMEOUT"),
        Kind::Str,
        "A peer that sends nothing (it sends a heartbeat every second while it works) for\nthis long is given up: before the first byte of the answer the next node is\ntried, after it the client gets an error event.",
        "\"5s\"",
    ),
    Setting::new(
        "route.card_interval",
        Some("SHOAL_ROUTE_CARD_INTERVAL"),
        Kind::Str,
        "How often this node's serving card (models, load, warm prefixes) is gossiped\nwhen it changed (at least every 5 seconds).",
        "\"1s\"",
    ),
    Setting::new(
        "route.card_ttl",
        Some("SHOAL_ROUTE_CARD_TTL"),
        Kind::Str,
        "A peer's serving card is forgotten this long after it arrived.",
        "\"10s\"",
    ),
];

/// What the host node does for routing (implemented by `crate::node`).
pub trait RouteHost: Send + Sync {
    /// The artifact id a name resolves to on this node (trusted names, ids).
    /// Blocking (reads the store).
    fn resolve(&self, name: &str) -> Option<[u8; 32]>;
    /// Starts pulling `name` in the background (no wait).
    fn pull(&self, name: &str);
    /// Whether `name` is one the operator keeps (`store.prefetch`).
    fn pinned(&self, name: &str) -> bool;
}

/// What happened to a routed request (the dashboard draws these).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RouteEvent {
    /// When (Unix milliseconds).
    pub at_ms: u64,
    /// The node that received the client's request.
    pub from: String,
    /// The node that served it (or was tried).
    pub to: String,
    /// The model asked for.
    pub model: String,
    /// `local`, `forwarded`, `served_for_peer`, `retried` or `failed`.
    pub outcome: RouteOutcome,
    /// Why (`best`, `warm`, `only_holder`, `stalled`, `died`, `busy`, ...).
    pub reason: RouteReason,
    /// Details for people (an error message), if any.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub detail: String,
    /// Time to the first byte of the answer, when there was one.
    pub ttft_ms: Option<u64>,
}

/// A peer's card as held.
#[derive(Debug, Clone)]
struct Held {
    card: ServingCard,
    at: Instant,
}

/// How long a failed peer is skipped.
pub const PAUSE: Duration = Duration::from_secs(30);
/// Recent events kept.
const RECENT: usize = 64;
/// Warm heads remembered per model.
const WARM_KEEP: usize = card::MAX_WARM;
/// A served head counts as warm this long.
const WARM_FOR: Duration = Duration::from_secs(15 * 60);

/// Routing state of one node. Share it with `Arc`.
pub struct Routing {
    cfg: RouteConfig,
    me: PeerId,
    mesh: Client,
    serving: Arc<Serving>,
    metrics: Arc<Metrics>,
    host: Arc<dyn RouteHost>,
    needs_key: bool,
    cards: Mutex<HashMap<PeerId, Held>>,
    /// Open forwards per peer (id, start): those started after the peer's
    /// card arrived are not in its counts yet.
    inflight: Mutex<HashMap<PeerId, Vec<(u64, Instant)>>>,
    inflight_ids: AtomicU64,
    paused: Mutex<HashMap<PeerId, (Instant, String)>>,
    banned: Mutex<HashSet<PeerId>>,
    /// Heads this node served, per model name (lower case), newest first.
    warm: Mutex<HashMap<String, VecDeque<(Head, Instant)>>>,
    recent: Mutex<VecDeque<RouteEvent>>,
    /// Models in this node's store (name, id), refreshed with each card.
    on_disk: Mutex<Vec<(String, [u8; 32])>>,
    pulling: Mutex<HashSet<String>>,
    seq: AtomicU64,
    /// The generation routes forwarded requests are served by, and the key
    /// scope check ([`proxy::serve_forwarded`]).
    app: std::sync::OnceLock<(axum::Router, forward::Authorize)>,
}

impl std::fmt::Debug for Routing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Routing")
            .field("me", &self.me)
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A snapshot for `GET /admin/route` and the dashboard.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RouteSnapshot {
    /// This node.
    pub me: String,
    /// Routing on.
    pub enabled: bool,
    /// This node's own card as it would send it now.
    pub local: ServingCardView,
    /// Fresh cards of peers.
    pub cards: Vec<ServingCardView>,
    /// Peers skipped after a failure, with the reason.
    pub paused: Vec<(String, String)>,
    /// Recent routing events, newest last.
    pub recent: Vec<RouteEvent>,
}

/// A card for people.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ServingCardView {
    /// Its author.
    pub peer: String,
    /// Seconds since it arrived.
    pub age_secs: f64,
    /// Its models.
    pub models: Vec<CardModelView>,
}

/// A card's model for people.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CardModelView {
    /// Name.
    pub name: String,
    /// Id in hex.
    pub id: String,
    /// Loaded or on disk.
    pub loaded: bool,
    /// Slots.
    pub parallel: u16,
    /// Running.
    pub running: u16,
    /// Waiting.
    pub waiting: u16,
    /// Prompt tokens/s.
    pub prompt_tps: f32,
    /// Decode tokens/s.
    pub decode_tps: f32,
    /// Warm prefixes.
    pub warm: usize,
}

fn view(peer: String, age: Duration, card: &ServingCard) -> ServingCardView {
    ServingCardView {
        peer,
        age_secs: age.as_secs_f64(),
        models: card
            .models
            .iter()
            .map(|m| CardModelView {
                name: m.name.clone(),
                id: hex::encode(m.id),
                loaded: m.loaded,
                parallel: m.parallel,
                running: m.running,
                waiting: m.waiting,
                prompt_tps: m.prompt_tps,
                decode_tps: m.decode_tps,
                warm: m.warm.len(),
            })
            .collect(),
    }
}

/// How a request asks for a model, for matching it against cards.
#[derive(Debug, Clone)]
pub struct Wanted {
    /// The name in the request.
    pub name: String,
    /// What it resolves to on this node, if it does.
    pub id: Option<[u8; 32]>,
}

impl Wanted {
    /// Whether a model of this node (its id, when known, and its name) is
    /// the one asked for: by id when the name resolves here, else by name.
    fn is(&self, id: Option<[u8; 32]>, name: &str) -> bool {
        match self.id {
            Some(w) => id == Some(w),
            None => name.eq_ignore_ascii_case(&self.name),
        }
    }

    fn matches(&self, m: &CardModel) -> bool {
        match self.id {
            Some(id) => m.id == id,
            None => {
                m.name.eq_ignore_ascii_case(&self.name)
                    || (self.name.len() >= 8
                        && hex::encode(m.id).starts_with(&self.name.to_ascii_lowercase()))
            }
        }
    }
}

impl Routing {
    /// Starts routing for a node: takes peers' cards and the mesh's bans,
    /// and sends this node's card (see `announce`). The `/shoal/serve/1`
    /// server starts with [`proxy::serve_forwarded`] once the HTTP routes
    /// exist.
    pub fn start(
        cfg: RouteConfig,
        mesh: Client,
        serving: Arc<Serving>,
        host: Arc<dyn RouteHost>,
        needs_key: bool,
    ) -> Arc<Routing> {
        let r = Arc::new(Routing {
            cfg,
            me: mesh.peer_id(),
            metrics: serving.metrics().clone(),
            mesh,
            serving,
            host,
            needs_key,
            cards: Mutex::new(HashMap::new()),
            inflight: Mutex::new(HashMap::new()),
            inflight_ids: AtomicU64::new(0),
            paused: Mutex::new(HashMap::new()),
            banned: Mutex::new(HashSet::new()),
            warm: Mutex::new(HashMap::new()),
            recent: Mutex::new(VecDeque::new()),
            on_disk: Mutex::new(Vec::new()),
            pulling: Mutex::new(HashSet::new()),
            seq: AtomicU64::new(unix_ms()),
            app: std::sync::OnceLock::new(),
        });
        tokio::spawn(listen(Arc::downgrade(&r), r.mesh.events()));
        tokio::spawn(announce(Arc::downgrade(&r)));
        r
    }

    /// The settings.
    pub fn config(&self) -> &RouteConfig {
        &self.cfg
    }

    /// This node's peer id.
    pub fn me(&self) -> PeerId {
        self.me
    }

    /// The mesh client.
    pub fn mesh(&self) -> &Client {
        &self.mesh
    }

    /// The node's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// This node's card as it would be sent now.
    pub fn local_card(&self) -> ServingCard {
        let mut models = Vec::new();
        let mut loaded_ids = HashSet::new();
        for s in self.serving.models() {
            let name = s.engine.name().to_owned();
            let Some(id) = served_id(&s) else {
                continue;
            };
            loaded_ids.insert(id);
            let l = engine_load(&s);
            models.push(CardModel {
                warm: self.warm_of(&name),
                name,
                id,
                loaded: true,
                parallel: l.0,
                queue_depth: l.1,
                running: l.2,
                waiting: l.3,
                prompt_tps: l.4,
                decode_tps: l.5,
            });
        }
        for (name, id) in self.on_disk.lock().iter() {
            if !loaded_ids.contains(id) && models.len() < card::MAX_MODELS {
                models.push(CardModel {
                    name: name.clone(),
                    id: *id,
                    loaded: false,
                    parallel: 0,
                    queue_depth: 0,
                    running: 0,
                    waiting: 0,
                    prompt_tps: 0.0,
                    decode_tps: 0.0,
                    warm: Vec::new(),
                });
            }
        }
        models.truncate(card::MAX_MODELS);
        ServingCard {
            seq: self.seq.fetch_add(1, Ordering::Relaxed),
            unix_ms: unix_ms(),
            needs_key: self.needs_key,
            models,
        }
    }

    /// The heads of `model` this node served recently, newest first.
    fn warm_of(&self, model: &str) -> Vec<Head> {
        let now = Instant::now();
        self.warm
            .lock()
            .get(&model.to_ascii_lowercase())
            .map(|v| {
                v.iter()
                    .filter(|(_, t)| now.duration_since(*t) < WARM_FOR)
                    .map(|(h, _)| *h)
                    .take(card::MAX_WARM)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The engine of this node that runs `wanted`, if one is loaded.
    fn loaded_here(&self, wanted: &Wanted) -> Option<Arc<crate::serve::Served>> {
        self.serving
            .models()
            .into_iter()
            .find(|s| wanted.is(served_id(s), s.engine.name()))
    }

    /// Whether `wanted` is in this node's store (loaded or not).
    fn on_disk_here(&self, wanted: &Wanted) -> bool {
        self.on_disk
            .lock()
            .iter()
            .any(|(name, id)| wanted.is(Some(*id), name))
    }

    /// Remembers that this node served `heads` of `model` (its prefix KV is
    /// now warm here).
    pub fn note_served(&self, model: &str, heads: &[(usize, Head)]) {
        if heads.is_empty() {
            return;
        }
        let mut w = self.warm.lock();
        let list = w.entry(model.to_ascii_lowercase()).or_default();
        let now = Instant::now();
        for (_, h) in heads {
            list.retain(|(x, _)| x != h);
            list.push_front((*h, now));
        }
        list.truncate(WARM_KEEP);
    }

    /// Records an event (and counts it in the metrics).
    pub fn record(&self, ev: RouteEvent) {
        self.metrics.route_request(ev.outcome, ev.reason);
        let mut r = self.recent.lock();
        if r.len() == RECENT {
            r.pop_front();
        }
        r.push_back(ev);
    }

    /// An event from this node to `to`.
    pub fn event(
        &self,
        to: Target,
        model: &str,
        outcome: RouteOutcome,
        reason: RouteReason,
        detail: impl Into<String>,
        ttft: Option<Duration>,
    ) -> RouteEvent {
        RouteEvent {
            at_ms: unix_ms(),
            from: self.me.to_string(),
            to: match to {
                Target::Local => self.me.to_string(),
                Target::Peer(p) => p.to_string(),
            },
            model: model.to_owned(),
            outcome,
            reason,
            detail: detail.into(),
            ttft_ms: ttft.map(|d| d.as_millis() as u64),
        }
    }

    /// Skips `peer` for [`PAUSE`].
    pub fn pause(&self, peer: PeerId, why: &str) {
        tracing::info!(%peer, reason = why, "routing: peer paused");
        self.paused
            .lock()
            .insert(peer, (Instant::now() + PAUSE, why.to_owned()));
    }

    /// Counts a request forwarded to `peer` until the guard drops.
    pub fn inflight(self: &Arc<Self>, peer: PeerId) -> InFlight {
        let id = self.inflight_ids.fetch_add(1, Ordering::Relaxed);
        self.inflight
            .lock()
            .entry(peer)
            .or_default()
            .push((id, Instant::now()));
        InFlight {
            routing: self.clone(),
            peer,
            id,
            _busy: self.mesh.busy(peer),
        }
    }

    /// The candidates for a request, best first (this node included when
    /// it holds the model). Empty when nobody holds it.
    /// `has_key`: the request came with an API key (a peer whose card says
    /// it needs one is not offered a request without).
    pub async fn rank(
        &self,
        wanted: &Wanted,
        heads: &[(usize, Head)],
        has_key: bool,
    ) -> Vec<Offer> {
        let mut offers = Vec::new();
        let jitter = |p: &PeerId| {
            let mut h = blake3::Hasher::new();
            h.update(&p.to_bytes());
            h.update(&unix_ms().to_le_bytes());
            h.update(&heads.first().map(|h| h.1).unwrap_or_default());
            let b = h.finalize();
            u32::from_le_bytes([
                b.as_bytes()[0],
                b.as_bytes()[1],
                b.as_bytes()[2],
                b.as_bytes()[3],
            ])
        };
        // This node.
        if let Some(s) = self.loaded_here(wanted) {
            let l = engine_load(&s);
            offers.push(Offer {
                target: Target::Local,
                loaded: true,
                parallel: u32::from(l.0),
                queue_depth: u32::from(l.1),
                busy: u32::from(l.2) + u32::from(l.3),
                warm: heads::warm_match(heads, &self.warm_of(&wanted.name)),
                jitter: 0,
            });
        } else if self.on_disk_here(wanted) {
            offers.push(Offer {
                target: Target::Local,
                loaded: false,
                parallel: 1,
                queue_depth: 0,
                busy: 0,
                warm: 0,
                jitter: 0,
            });
        }
        // Peers: fresh cards of unbanned, unpaused peers, connected or not:
        // cards travel by gossip over a partial mesh, and a forward dials
        // its peer when the connection manager has closed the connection.
        let now = Instant::now();
        let banned = self.banned.lock().clone();
        let paused: HashSet<PeerId> = {
            let mut p = self.paused.lock();
            p.retain(|_, (until, _)| *until > now);
            p.keys().copied().collect()
        };
        let inflight = self.inflight.lock().clone();
        let cards = self.cards.lock();
        let mut last_resort = Vec::new();
        for (peer, held) in cards.iter() {
            if now.duration_since(held.at) > self.cfg.card_ttl
                || banned.contains(peer)
                || (held.card.needs_key && !has_key)
            {
                continue;
            }
            // A paused peer is tried only after every other candidate.
            let list = if paused.contains(peer) {
                &mut last_resort
            } else {
                &mut offers
            };
            if let Some(m) = held.card.models.iter().find(|m| wanted.matches(m)) {
                list.push(Offer {
                    target: Target::Peer(*peer),
                    loaded: m.loaded,
                    parallel: u32::from(m.parallel).max(1),
                    queue_depth: u32::from(m.queue_depth),
                    // Forwards started before the card arrived are in its
                    // counts already; the later ones are not.
                    busy: m.busy()
                        + inflight
                            .get(peer)
                            .map_or(0, |v| v.iter().filter(|(_, t)| *t > held.at).count() as u32),
                    warm: heads::warm_match(heads, &m.warm),
                    jitter: jitter(peer),
                });
            }
        }
        let mut ranked = choose::rank(offers);
        ranked.extend(choose::rank(last_resort));
        ranked
    }

    /// Whether this node holds `wanted` (loaded or in its store).
    pub fn holds(&self, wanted: &Wanted) -> bool {
        self.loaded_here(wanted).is_some() || self.on_disk_here(wanted)
    }

    /// Resolves a requested name on this node (off the runtime).
    pub async fn wanted(&self, name: &str) -> Wanted {
        let host = self.host.clone();
        let n = name.to_owned();
        let id = tokio::task::spawn_blocking(move || host.resolve(&n))
            .await
            .ok()
            .flatten();
        Wanted {
            name: name.to_owned(),
            id,
        }
    }

    /// Loads `name` from this node's store in the background (a peer serves
    /// the request meanwhile), so that the next requests have one more node
    /// to go to. Once per name at a time.
    pub fn load_in_background(self: &Arc<Self>, name: &str) {
        let key = format!("load:{}", name.to_ascii_lowercase());
        if !self.pulling.lock().insert(key.clone()) {
            return;
        }
        let r = self.clone();
        let name = name.to_owned();
        tokio::spawn(async move {
            match r.serving.resolve(&name).await {
                Ok(_) => tracing::info!(model = name, "routing: loaded in the background"),
                Err(e) => {
                    tracing::info!(model = name, error = %e, "routing: background load failed")
                }
            }
            r.pulling.lock().remove(&key);
        });
    }

    /// Starts a background pull of `name` when the policy allows (once per name).
    pub fn maybe_pull(&self, name: &str) {
        let allowed = match self.cfg.pull {
            PullPolicy::FirstUse => true,
            PullPolicy::Never => false,
            PullPolicy::Pinned => self.host.pinned(name),
        };
        if allowed && self.pulling.lock().insert(name.to_ascii_lowercase()) {
            tracing::info!(
                model = name,
                "routing: a peer serves it; pulling it in the background"
            );
            self.host.pull(name);
        }
    }

    /// The snapshot for `GET /admin/route` and the dashboard.
    pub fn snapshot(&self) -> RouteSnapshot {
        let now = Instant::now();
        let local = view(self.me.to_string(), Duration::ZERO, &self.local_card());
        let cards = self
            .cards
            .lock()
            .iter()
            .filter(|(_, h)| now.duration_since(h.at) <= self.cfg.card_ttl)
            .map(|(p, h)| view(p.to_string(), now.duration_since(h.at), &h.card))
            .collect();
        let paused = self
            .paused
            .lock()
            .iter()
            .filter(|(_, (until, _))| *until > now)
            .map(|(p, (_, why))| (p.to_string(), why.clone()))
            .collect();
        RouteSnapshot {
            me: self.me.to_string(),
            enabled: self.cfg.enabled,
            local,
            cards,
            paused,
            recent: self.recent.lock().iter().cloned().collect(),
        }
    }

    /// Takes a peer's card (the newest by `seq` wins).
    fn take_card(&self, peer: PeerId, bytes: &[u8]) {
        match card::decode(bytes) {
            Ok(c) => {
                let mut cards = self.cards.lock();
                let newer = cards.get(&peer).is_none_or(|h| h.card.seq < c.seq);
                if newer {
                    cards.insert(
                        peer,
                        Held {
                            card: c,
                            at: Instant::now(),
                        },
                    );
                }
                let ttl = self.cfg.card_ttl;
                cards.retain(|_, h| h.at.elapsed() <= ttl);
                self.metrics.route_cards(cards.len());
            }
            Err(e) => tracing::debug!(%peer, error = %e, "bad serving card"),
        }
    }
}

/// The artifact id of a loaded model.
fn served_id(s: &crate::serve::Served) -> Option<[u8; 32]> {
    let mut id = [0u8; 32];
    hex::decode_to_slice(&s.id_hex, &mut id).ok()?;
    Some(id)
}

/// (parallel, queue_depth, running, waiting, prompt_tps, decode_tps) of a
/// loaded model ([`crate::serve::Engine::load`]), in the card's widths.
fn engine_load(s: &crate::serve::Served) -> (u16, u16, u16, u16, f32, f32) {
    let l = s.engine.load();
    let sat = |n: u32| u16::try_from(n).unwrap_or(u16::MAX);
    let rate = |r: f32| if r.is_finite() && r > 0.0 { r } else { 0.0 };
    (
        sat(l.parallel.max(1)),
        sat(l.queue_depth),
        sat(l.running),
        sat(l.waiting),
        rate(l.prompt_tps),
        rate(l.decode_tps),
    )
}

/// Counts one open forwarded request (see [`Routing::inflight`]).
pub struct InFlight {
    routing: Arc<Routing>,
    peer: PeerId,
    id: u64,
    /// Keeps the connection to `peer` open meanwhile (the connection manager).
    _busy: crate::mesh::connmgr::PeerBusy,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut m = self.routing.inflight.lock();
        if let Some(v) = m.get_mut(&self.peer) {
            v.retain(|(id, _)| *id != self.id);
            if v.is_empty() {
                m.remove(&self.peer);
            }
        }
    }
}

/// Takes cards and bans from the mesh.
async fn listen(
    routing: std::sync::Weak<Routing>,
    mut events: tokio::sync::broadcast::Receiver<MeshEvent>,
) {
    loop {
        let ev = match events.recv().await {
            Ok(ev) => ev,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
            Err(_) => return,
        };
        let Some(r) = routing.upgrade() else { return };
        match ev {
            MeshEvent::Card { peer, data } => r.take_card(peer, &data),
            MeshEvent::Banned(peer) => {
                r.banned.lock().insert(peer);
                r.cards.lock().remove(&peer);
            }
            _ => {}
        }
    }
}

/// Sends this node's card: at once (within 200 ms) when what it serves,
/// its warm prefixes or a model's load by two requests or more changed;
/// every `card_interval` when anything else changed; at least every 5 s.
/// Refreshes the list of models in the store every 5 s.
async fn announce(routing: std::sync::Weak<Routing>) {
    const AT_LEAST: Duration = Duration::from_secs(5);
    const STEP: Duration = Duration::from_millis(200);
    let interval = match routing.upgrade() {
        Some(r) => r.cfg.card_interval,
        None => return,
    };
    let mut tick = tokio::time::interval(STEP.min(interval));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last: Option<(Vec<CardModel>, Instant)> = None;
    let mut disk_at: Option<Instant> = None;
    loop {
        tick.tick().await;
        let Some(r) = routing.upgrade() else { return };
        if disk_at.is_none_or(|t| t.elapsed() >= AT_LEAST) {
            let list: Vec<(String, [u8; 32])> = r
                .serving
                .catalog()
                .await
                .into_iter()
                .filter(|e| e.local && e.servable.is_ok())
                .map(|e| (e.name, e.id))
                .collect();
            *r.on_disk.lock() = list;
            disk_at = Some(Instant::now());
        }
        let card = r.local_card();
        let send = match &last {
            None => true,
            Some((m, at)) => {
                let age = at.elapsed();
                age >= AT_LEAST
                    || (*m != card.models && (age >= interval || big_change(m, &card.models)))
            }
        };
        // A node that serves nothing is silent, after one empty card that
        // retracts what it sent before.
        let had = last.as_ref().is_some_and(|(m, _)| !m.is_empty());
        if send && (!card.models.is_empty() || had) {
            let _ = r.mesh.publish_card(card::encode(&card)).await;
            last = Some((card.models, Instant::now()));
        }
    }
}

/// Whether a card differs from the last one sent by more than a small
/// change of load: other models, other warm prefixes, a model's running +
/// waiting by two or more.
fn big_change(before: &[CardModel], now: &[CardModel]) -> bool {
    before.len() != now.len()
        || before.iter().zip(now).any(|(a, b)| {
            a.name != b.name
                || a.id != b.id
                || a.loaded != b.loaded
                || a.warm != b.warm
                || a.busy().abs_diff(b.busy()) >= 2
        })
}
