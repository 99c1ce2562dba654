//! The connection manager: which connections a node keeps, which it closes
//! and whom it dials, so that it holds a bounded set of connections however
//! many nodes share the LAN.
//!
//! Discovery (mDNS, Kademlia, identify, static peers) tells the manager of
//! every node it finds; the manager dials only while fewer than
//! `mesh.min_connections` peers are connected, a few random picks at a time.
//! Connections that a transfer, a forwarded request or a lookup opens on
//! demand come on top. Each tick ([`ConnManager::tick`]) it closes:
//!
//! - above `min_connections`, every connection it dialled that is *idle
//!   and useless*: past its grace period ([`GRACE`]), not to a static peer,
//!   not used within [`USEFUL_FOR`] (see [`Activity`]), nothing open on it,
//!   and not one of gossipsub's mesh peers. A connection the peer dialled is
//!   the peer's to close (it may hold it for its own minimum: closing it
//!   would only make the peer dial someone else, and a mesh at rest would
//!   reconnect all the time), unless this node turned a newcomer away at its
//!   bound within [`PRESSURE_FOR`]: then every idle one goes, whoever
//!   dialled it and gossip-mesh peers too (gossipsub grafts others among
//!   those left), to make room;
//! - above three quarters of `mesh.max_connections` (the *high mark*), the
//!   least useful of the others too, down to the high mark: gossip-mesh peers
//!   before recently used ones, the least recently used and the slowest
//!   (ping round trip) first. Static peers and connections with something
//!   open on them are never closed by the manager.
//!
//! `mesh.max_connections` itself is a hard cap (libp2p's connection limits
//! refuse a connection beyond it); the quarter above the high mark is the room
//! newcomers and downloads find on a busy node.
//!
//! The manager is IO-free: the event loop feeds it events and carries out the
//! [`Plan`] it returns, so the policy is tested without a network.

use libp2p::PeerId;
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A new connection is not closed by the manager before this age (the
/// handshake, identify, the gossip subscriptions and a first request fit in
/// it; a Kademlia lookup's connections are done well before).
pub const GRACE: Duration = Duration::from_secs(5);
/// On a node above its high mark or making room (see [`PRESSURE_FOR`]), a
/// connection nothing was asked over within this long is closed, grace or
/// not: the room above the high mark is for newcomers that want something
/// (a downloader's first request follows its handshake at once), and a
/// seat held for the whole [`GRACE`] by a peer's fill dial or Kademlia
/// lookup is a seat a downloader's retries keep missing.
pub const NEWCOMER_GRACE: Duration = Duration::from_secs(2);
/// A peer used within this long is useful: its connection is kept.
pub const USEFUL_FOR: Duration = Duration::from_secs(30);
/// Most dials the manager starts per tick.
pub const DIALS_PER_TICK: usize = 4;
/// First pause before a peer whose dial failed is tried again (doubles).
pub const DIAL_BACKOFF_FIRST: Duration = Duration::from_secs(2);
/// Longest pause before a peer whose dial failed is tried again.
pub const DIAL_BACKOFF_MAX: Duration = Duration::from_secs(120);
/// Longest pause before a static peer whose dial failed is dialled again
/// (the configuration asks for it, so it is tried more often than others).
pub const STATIC_BACKOFF_MAX: Duration = Duration::from_secs(16);
/// A peer known from Kademlia or identify only (not mDNS, not static) is
/// forgotten after this many failed dials in a row.
pub const FORGET_AFTER_FAILURES: u32 = 6;
/// A dial the manager started counts as pending this long at most.
const DIAL_PENDING: Duration = Duration::from_secs(10);
/// A connection that ends younger than this was refused in effect (the
/// other side at its cap, or trimming us at once): the peer is backed off as
/// after a failed dial, not dialled again at the next tick.
pub const SHORT_LIVED: Duration = Duration::from_secs(15);
/// A peer this node closed as useless is not dialled again by the manager
/// before this (it would be as useless): the set rotates, it does not churn.
pub const REDIAL_CLOSED_AFTER: Duration = Duration::from_secs(60);
/// After turning a newcomer away at the bound, a node closes idle
/// connections whoever dialled them, gossip-mesh peers too, for this long.
pub const PRESSURE_FOR: Duration = Duration::from_secs(30);

/// The high mark for a cap of `max` connections: three quarters of it (at
/// least 1). Above it the manager closes even useful connections.
pub fn high_mark(max: u32) -> u32 {
    (max - max / 4).max(1)
}

/// How a peer was learnt of (several may hold).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// Multicast DNS on the link (until its record expires).
    Mdns,
    /// Kademlia's routing table or identify.
    Kad,
    /// A configured static peer (`mesh.peers`).
    Static,
}

#[derive(Debug)]
struct Known {
    mdns: bool,
    static_peer: bool,
    /// Not dialled by the manager before this.
    next_dial: Instant,
    backoff: Duration,
    failures: u32,
}

impl Known {
    fn backoff_max(&self) -> Duration {
        if self.static_peer {
            STATIC_BACKOFF_MAX
        } else {
            DIAL_BACKOFF_MAX
        }
    }
}

#[derive(Debug)]
struct Conn {
    /// This node dialled it (else the peer did).
    dialed: bool,
    since: Instant,
    last_used: Option<Instant>,
    busy: u32,
    rtt: Option<Duration>,
}

/// What the event loop should do after a tick.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Close every connection to these peers.
    pub close: Vec<PeerId>,
    /// Dial these peers (by peer id; addresses come from discovery).
    pub dial: Vec<PeerId>,
}

/// The connection policy of one node. See the module docs.
#[derive(Debug)]
pub struct ConnManager {
    min: usize,
    high: usize,
    conns: HashMap<PeerId, Conn>,
    known: HashMap<PeerId, Known>,
    banned: HashSet<PeerId>,
    dialing: HashMap<PeerId, Instant>,
    /// When this node last turned a newcomer away at its bound.
    refused_at: Option<Instant>,
    rng: u64,
}

impl ConnManager {
    /// A manager for at most `max` connections that dials while fewer than
    /// `min` peers are connected; `seed` drives its random picks.
    pub fn new(max: u32, min: u32, seed: u64) -> Self {
        let max = max.max(1) as usize;
        Self {
            min: (min as usize).clamp(1, max),
            high: high_mark(max as u32) as usize,
            conns: HashMap::new(),
            known: HashMap::new(),
            banned: HashSet::new(),
            dialing: HashMap::new(),
            refused_at: None,
            rng: seed | 1,
        }
    }

    /// Peers discovered and not forgotten, connected or not.
    pub fn known(&self) -> usize {
        self.known.len()
    }

    /// Whether `peer` is known (discovered and not forgotten).
    pub fn is_known(&self, peer: PeerId) -> bool {
        self.known.contains_key(&peer)
    }

    /// Peers connected.
    pub fn connected(&self) -> usize {
        self.conns.len()
    }

    /// The high mark: above it the manager closes even useful connections.
    pub fn high_mark(&self) -> usize {
        self.high
    }

    /// Discovery found `peer`.
    pub fn learn(&mut self, peer: PeerId, how: Found, now: Instant) {
        let k = self.known.entry(peer).or_insert_with(|| Known {
            mdns: false,
            static_peer: false,
            next_dial: now,
            backoff: DIAL_BACKOFF_FIRST,
            failures: 0,
        });
        match how {
            Found::Mdns => k.mdns = true,
            Found::Static => k.static_peer = true,
            Found::Kad => {}
        }
    }

    /// `peer`'s mDNS record expired; it stays known while other discovery holds it.
    pub fn mdns_expired(&mut self, peer: PeerId) {
        if let Some(k) = self.known.get_mut(&peer) {
            k.mdns = false;
        }
    }

    /// `peer` is banned (or no longer): never dialled, closed if connected.
    pub fn set_banned(&mut self, peer: PeerId, banned: bool) {
        if banned {
            self.banned.insert(peer);
        } else {
            self.banned.remove(&peer);
        }
    }

    /// A first connection to `peer` is established, dialled by this node.
    pub fn connected_to(&mut self, peer: PeerId, now: Instant) {
        self.add_conn(peer, now, true);
    }

    /// A first connection to `peer` is established, dialled by the peer.
    pub fn connected_from(&mut self, peer: PeerId, now: Instant) {
        self.add_conn(peer, now, false);
    }

    /// This node turned an incoming connection away at its bound: for
    /// [`PRESSURE_FOR`] it makes room (see the module docs).
    pub fn refused(&mut self, now: Instant) {
        self.refused_at = Some(now);
    }

    /// Whether this node turned a newcomer away at its bound within
    /// [`PRESSURE_FOR`] before `now` (it is making room).
    pub fn pressed(&self, now: Instant) -> bool {
        self.refused_at
            .is_some_and(|t| now.duration_since(t) < PRESSURE_FOR)
    }

    fn add_conn(&mut self, peer: PeerId, now: Instant, dialed: bool) {
        self.dialing.remove(&peer);
        self.conns.entry(peer).or_insert(Conn {
            dialed,
            since: now,
            last_used: None,
            busy: 0,
            rtt: None,
        });
    }

    /// The last connection to `peer` closed. One that lived less than
    /// [`SHORT_LIVED`] counts as a failed dial (backoff; the other side is
    /// full or does not want this node); a longer one clears the backoff.
    /// Either way the peer is not dialled again before the first backoff.
    pub fn disconnected(&mut self, peer: PeerId, now: Instant) {
        self.dialing.remove(&peer);
        let Some(c) = self.conns.remove(&peer) else {
            return;
        };
        let Some(k) = self.known.get_mut(&peer) else {
            return;
        };
        if now.duration_since(c.since) < SHORT_LIVED {
            k.next_dial = now + k.backoff;
            k.backoff = (k.backoff * 2).min(k.backoff_max());
        } else {
            k.failures = 0;
            k.backoff = DIAL_BACKOFF_FIRST;
            k.next_dial = now + DIAL_BACKOFF_FIRST;
        }
    }

    /// Whether the manager would dial `peer` now (known, out of backoff, not
    /// connected, dialling or banned); if so it counts as being dialled.
    /// For the static peers the event loop redials itself.
    pub fn take_dial(&mut self, peer: PeerId, now: Instant) -> bool {
        let ok = !self.conns.contains_key(&peer)
            && !self.dialing.contains_key(&peer)
            && !self.banned.contains(&peer)
            && self.known.get(&peer).is_none_or(|k| k.next_dial <= now);
        if ok {
            self.dialing.insert(peer, now);
            if let Some(k) = self.known.get_mut(&peer) {
                k.next_dial = now + k.backoff;
            }
        }
        ok
    }

    /// A dial of `peer` was stopped by this node (its own limits), not
    /// failed by the peer: no longer pending, no backoff.
    pub fn dial_stopped(&mut self, peer: PeerId) {
        self.dialing.remove(&peer);
    }

    /// A dial of `peer` failed: it is tried again after a growing pause, and
    /// forgotten after [`FORGET_AFTER_FAILURES`] unless mDNS or the
    /// configuration vouches for it.
    pub fn dial_failed(&mut self, peer: PeerId, now: Instant) {
        self.dialing.remove(&peer);
        if let Some(k) = self.known.get_mut(&peer) {
            k.failures += 1;
            k.next_dial = now + k.backoff;
            k.backoff = (k.backoff * 2).min(k.backoff_max());
            if k.failures >= FORGET_AFTER_FAILURES && !k.mdns && !k.static_peer {
                self.known.remove(&peer);
            }
        }
    }

    /// `peer` answered a ping in `rtt`.
    pub fn rtt(&mut self, peer: PeerId, rtt: Duration) {
        if let Some(c) = self.conns.get_mut(&peer) {
            c.rtt = Some(rtt);
        }
    }

    /// `peer` was last used at `at`, and `busy` things are open on it now
    /// (from [`Activity::take`]).
    pub fn used(&mut self, peer: PeerId, at: Instant, busy: u32) {
        if let Some(c) = self.conns.get_mut(&peer) {
            c.last_used = Some(c.last_used.map_or(at, |l| l.max(at)));
            c.busy = busy;
        }
    }

    /// Whether the manager would dial now: fewer than `min` peers connected
    /// or being dialled.
    pub fn wants_peers(&self) -> bool {
        self.conns.len() + self.dialing.len() < self.min
    }

    /// Dials to start now: random known peers, not connected, not banned,
    /// not in backoff, until `min` are connected or being dialled (at most
    /// [`DIALS_PER_TICK`]). `force` ignores the backoff (a rediscovery round).
    pub fn dials(&mut self, now: Instant, force: bool) -> Vec<PeerId> {
        self.dialing
            .retain(|_, t| now.duration_since(*t) < DIAL_PENDING);
        let want = self
            .min
            .saturating_sub(self.conns.len() + self.dialing.len())
            .min(DIALS_PER_TICK);
        if want == 0 {
            return Vec::new();
        }
        let mut cands: Vec<PeerId> = self
            .known
            .iter()
            .filter(|(p, k)| {
                !self.conns.contains_key(p)
                    && !self.dialing.contains_key(p)
                    && !self.banned.contains(p)
                    && (force || k.next_dial <= now)
            })
            .map(|(p, _)| *p)
            .collect();
        // Sorted first so the random picks depend on the seed only; static
        // peers first (the configuration names them).
        cands.sort();
        let mut out = Vec::with_capacity(want);
        cands.retain(|p| {
            let st = self.known.get(p).is_some_and(|k| k.static_peer);
            if st && out.len() < want {
                out.push(*p);
            }
            !st || !out.contains(p)
        });
        while out.len() < want && !cands.is_empty() {
            let i = (self.next_random() % cands.len() as u64) as usize;
            out.push(cands.swap_remove(i));
        }
        for p in &out {
            self.dialing.insert(*p, now);
            if let Some(k) = self.known.get_mut(p) {
                // Until it connects or fails, not picked again.
                k.next_dial = now + k.backoff;
            }
        }
        out
    }

    /// The periodic decision: connections to close (`gossip_mesh`: the peers
    /// in gossipsub's mesh of any topic), then dials to start.
    pub fn tick(&mut self, now: Instant, gossip_mesh: &HashSet<PeerId>) -> Plan {
        let close = self.to_close(now, gossip_mesh);
        for p in &close {
            self.conns.remove(p);
            if let Some(k) = self.known.get_mut(p) {
                k.next_dial = now + REDIAL_CLOSED_AFTER;
            }
        }
        let dial = self.dials(now, false);
        Plan { close, dial }
    }

    fn to_close(&self, now: Instant, gossip_mesh: &HashSet<PeerId>) -> Vec<PeerId> {
        let n = self.conns.len();
        if n <= self.min {
            return self
                .conns
                .keys()
                .filter(|p| self.banned.contains(p))
                .copied()
                .collect();
        }
        let is_static = |p: &PeerId| self.known.get(p).is_some_and(|k| k.static_peer);
        let recently_used = |c: &Conn| {
            c.busy > 0
                || c.last_used
                    .is_some_and(|t| now.duration_since(t) < USEFUL_FOR)
        };
        let pressed = self.pressed(now);
        // Past its grace, or (on a node above its high mark or making room)
        // past the newcomer's grace with nothing asked over it.
        let aged = |c: &Conn| {
            let age = now.duration_since(c.since);
            age >= GRACE
                || ((pressed || n > self.high) && c.last_used.is_none() && age >= NEWCOMER_GRACE)
        };
        // Everything the manager may close at all, least useful first.
        let mut cands: Vec<(&PeerId, &Conn)> = self
            .conns
            .iter()
            .filter(|(p, c)| self.banned.contains(p) || (c.busy == 0 && !is_static(p) && aged(c)))
            .collect();
        // Ordering key: banned first, then idle non-mesh, idle mesh, used;
        // within: least recently used, then slowest, then oldest.
        let key = |p: &PeerId, c: &Conn| {
            (
                !self.banned.contains(p),
                recently_used(c),
                gossip_mesh.contains(p),
                c.last_used,
                std::cmp::Reverse(c.rtt),
                c.since,
                *p,
            )
        };
        cands.sort_by_key(|(p, c)| key(p, c));
        let mut close = Vec::new();
        let mut left = n;
        for (p, c) in cands {
            // Those the peer dialled are the peer's to close, and gossip-mesh
            // peers are kept, unless this node needs the room.
            let useless = self.banned.contains(p)
                || (!recently_used(c) && (pressed || (c.dialed && !gossip_mesh.contains(p))));
            let over_min = left > self.min;
            let over_high = left > self.high;
            // Within its grace, a newcomer goes only to make room.
            let young = now.duration_since(c.since) < GRACE;
            let room = over_high || (pressed && over_min);
            if young && !self.banned.contains(p) && !room {
                continue;
            }
            if (useless && over_min) || (over_high && c.busy == 0) {
                close.push(*p);
                left -= 1;
            }
        }
        close
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64*
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// What other tasks did with each peer (chunk streams opened or served,
/// KV and serve streams), read by the event loop every tick. Shared by the
/// mesh [`super::Client`] clones and the chunk provider.
#[derive(Debug, Default)]
pub struct Activity {
    inner: Mutex<HashMap<PeerId, Use>>,
}

#[derive(Debug, Clone, Copy)]
struct Use {
    last: Instant,
    busy: u32,
}

impl Activity {
    /// `peer` was useful just now.
    pub fn touch(&self, peer: PeerId) {
        let now = Instant::now();
        self.inner
            .lock()
            .entry(peer)
            .and_modify(|u| u.last = now)
            .or_insert(Use { last: now, busy: 0 });
    }

    /// Something long-lived is open on `peer` until the guard is dropped
    /// (a forwarded generation): its connection is not closed meanwhile.
    pub fn busy(self: &Arc<Self>, peer: PeerId) -> PeerBusy {
        let now = Instant::now();
        let mut m = self.inner.lock();
        let u = m.entry(peer).or_insert(Use { last: now, busy: 0 });
        u.busy += 1;
        u.last = now;
        PeerBusy {
            activity: self.clone(),
            peer,
        }
    }

    /// Every peer's last use and open count; peers idle for longer than
    /// [`USEFUL_FOR`] are dropped from the table once reported.
    pub fn take(&self, now: Instant) -> Vec<(PeerId, Instant, u32)> {
        let mut m = self.inner.lock();
        let out = m.iter().map(|(p, u)| (*p, u.last, u.busy)).collect();
        m.retain(|_, u| u.busy > 0 || now.duration_since(u.last) < USEFUL_FOR);
        out
    }
}

/// Keeps a peer's connection open while held ([`Activity::busy`]).
#[derive(Debug)]
pub struct PeerBusy {
    activity: Arc<Activity>,
    peer: PeerId,
}

impl Drop for PeerBusy {
    fn drop(&mut self) {
        let now = Instant::now();
        let mut m = self.activity.inner.lock();
        if let Some(u) = m.get_mut(&self.peer) {
            u.busy = u.busy.saturating_sub(1);
            u.last = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peers(n: usize) -> Vec<PeerId> {
        (0..n).map(|_| PeerId::random()).collect()
    }

    fn none() -> HashSet<PeerId> {
        HashSet::new()
    }

    #[test]
    fn dials_only_up_to_min_whatever_is_known() {
        let t0 = Instant::now();
        let mut m = ConnManager::new(48, 8, 7);
        let ps = peers(1000);
        for p in &ps {
            m.learn(*p, Found::Mdns, t0);
        }
        assert_eq!(m.known(), 1000);
        let first = m.dials(t0, false);
        assert_eq!(first.len(), DIALS_PER_TICK);
        let second = m.dials(t0, false);
        assert_eq!(second.len(), DIALS_PER_TICK);
        // 8 pending: no more until some fail or time out.
        assert!(m.dials(t0, false).is_empty());
        assert!(!m.wants_peers());
        for p in first.iter().chain(&second) {
            m.connected_to(*p, t0);
        }
        assert!(m.dials(t0 + Duration::from_secs(1), false).is_empty());
        // Distinct picks.
        let all: HashSet<_> = first.iter().chain(&second).collect();
        assert_eq!(all.len(), 8);
    }

    #[test]
    fn failed_dials_back_off_and_kad_peers_are_forgotten() {
        let t0 = Instant::now();
        let mut m = ConnManager::new(48, 2, 1);
        let [a, b] = [PeerId::random(), PeerId::random()];
        m.learn(a, Found::Kad, t0);
        m.learn(b, Found::Mdns, t0);
        let mut t = t0;
        for _ in 0..FORGET_AFTER_FAILURES {
            // Force: ignore the backoff, as a rediscovery round does.
            for p in m.dials(t, true) {
                m.dial_failed(p, t);
            }
            // In backoff: not picked without force.
            assert!(m.dials(t, false).is_empty());
            t += Duration::from_secs(1);
        }
        assert_eq!(
            m.known(),
            1,
            "the Kademlia-only peer is forgotten, the mDNS one kept"
        );
        assert!(m.known.contains_key(&b));
        m.mdns_expired(b);
        m.dial_failed(b, t);
        assert_eq!(m.known(), 0);
    }

    #[test]
    fn a_static_peer_is_redialled_on_a_short_backoff_and_never_forgotten() {
        let t0 = Instant::now();
        let mut m = ConnManager::new(48, 2, 1);
        let s = PeerId::random();
        m.learn(s, Found::Static, t0);
        let mut t = t0;
        let mut waits = Vec::new();
        for _ in 0..8 {
            assert!(m.take_dial(s, t), "due at {:?}", t - t0);
            assert!(!m.take_dial(s, t), "a dial in flight is not doubled");
            m.dial_failed(s, t);
            // The first moment it is due again.
            let mut w = Duration::ZERO;
            while !m.take_dial(s, t + w) {
                w += Duration::from_millis(500);
                assert!(w <= STATIC_BACKOFF_MAX, "waited past the static cap");
            }
            m.dial_failed(s, t + w);
            waits.push(w);
            t += w + STATIC_BACKOFF_MAX;
        }
        assert_eq!(waits[0], DIAL_BACKOFF_FIRST);
        assert!(waits.windows(2).all(|w| w[0] <= w[1]), "{waits:?}");
        assert_eq!(waits.last(), Some(&STATIC_BACKOFF_MAX), "{waits:?}");
        assert!(m.is_known(s), "a static peer is never forgotten");
    }

    #[test]
    fn banned_peers_are_neither_dialled_nor_kept() {
        let t0 = Instant::now();
        let mut m = ConnManager::new(48, 4, 3);
        let ps = peers(3);
        for p in &ps {
            m.learn(*p, Found::Mdns, t0);
        }
        m.set_banned(ps[0], true);
        let d = m.dials(t0, false);
        assert_eq!(d.len(), 2);
        assert!(!d.contains(&ps[0]));
        m.connected_to(ps[0], t0);
        let plan = m.tick(t0, &none());
        assert_eq!(plan.close, vec![ps[0]]);
    }

    #[test]
    fn idle_useless_connections_close_down_to_min_but_not_in_grace() {
        let t0 = Instant::now();
        let mut m = ConnManager::new(48, 4, 5);
        let ps = peers(12);
        for p in &ps {
            m.connected_to(*p, t0);
        }
        // Young: nothing closes.
        assert!(m.tick(t0 + GRACE / 2, &none()).close.is_empty());
        let t1 = t0 + GRACE + Duration::from_secs(1);
        // Two are used, two are in the gossip mesh, one is static.
        m.used(ps[0], t1, 0);
        m.used(ps[1], t0, 1);
        m.learn(ps[2], Found::Static, t0);
        let mesh: HashSet<_> = [ps[3], ps[4]].into();
        let plan = m.tick(t1, &mesh);
        // 12 connected, min 4: the 7 idle useless ones close (12 - 7 = 5 left:
        // used, busy, static, two mesh), never below min.
        assert_eq!(plan.close.len(), 7);
        for kept in &ps[..5] {
            assert!(!plan.close.contains(kept));
        }
        assert_eq!(m.connected(), 5);
        // Later, the used one went idle: closed, since 5 > min.
        let t2 = t1 + USEFUL_FOR + Duration::from_secs(1);
        let plan = m.tick(t2, &mesh);
        assert_eq!(plan.close, vec![ps[0]]);
        // Now at min: nothing more closes, even idle.
        assert_eq!(m.connected(), 4);
        assert!(m.tick(t2 + USEFUL_FOR * 4, &none()).close.is_empty());
    }

    #[test]
    fn idle_connections_the_peers_dialled_stay_unless_a_newcomer_was_refused() {
        let t0 = Instant::now();
        let mut m = ConnManager::new(16, 2, 11);
        assert_eq!(m.high_mark(), 12);
        let ours = peers(3);
        let theirs = peers(12);
        for p in &ours {
            m.connected_to(*p, t0);
        }
        for p in &theirs[..8] {
            m.connected_from(*p, t0);
        }
        // All idle and useless, 11 connected: the ones this node dialled
        // close, those the peers dialled stay (they count towards the minimum).
        let t1 = t0 + GRACE + USEFUL_FOR;
        let mut closed = m.tick(t1, &none()).close;
        closed.sort();
        let mut expect = ours.clone();
        expect.sort();
        assert_eq!(closed, expect, "only the connections this node dialled");
        assert_eq!(m.connected(), 8);
        assert!(m.tick(t1 + USEFUL_FOR, &none()).close.is_empty());
        // Above the high mark, theirs go too, down to it.
        for p in &theirs[8..] {
            m.connected_from(*p, t1);
        }
        m.connected_from(PeerId::random(), t1);
        assert_eq!(m.tick(t1 + GRACE, &none()).close.len(), 1);
        assert_eq!(m.connected(), 12);
        // A newcomer turned away at the bound: idle ones go down to the
        // minimum, whoever dialled them, gossip-mesh peers too; a used one stays.
        let t2 = t1 + GRACE + USEFUL_FOR;
        m.used(theirs[1], t2, 0);
        m.refused(t2);
        let mesh: HashSet<_> = [theirs[0]].into();
        let plan = m.tick(t2 + Duration::from_secs(1), &mesh);
        assert_eq!(plan.close.len(), 10, "{plan:?}");
        assert!(!plan.close.contains(&theirs[1]), "recently used kept");
        assert_eq!(m.connected(), 2);
        // Once the pressure is over, new ones the peers dialled stay again.
        let t3 = t2 + PRESSURE_FOR + GRACE;
        for p in peers(3) {
            m.connected_from(p, t3 - GRACE);
        }
        assert!(m.tick(t3, &mesh).close.is_empty());
    }

    #[test]
    fn above_the_high_mark_even_useful_ones_close_but_never_busy_or_static() {
        let t0 = Instant::now();
        let mut m = ConnManager::new(16, 2, 9);
        assert_eq!(m.high_mark(), 12);
        let ps = peers(16);
        for p in &ps {
            m.connected_to(*p, t0);
        }
        let t1 = t0 + GRACE + Duration::from_secs(1);
        // All used recently; four busy; two static.
        for (i, p) in ps.iter().enumerate() {
            m.used(*p, t1 - Duration::from_secs(i as u64), u32::from(i < 4));
        }
        m.learn(ps[4], Found::Static, t0);
        m.learn(ps[5], Found::Static, t0);
        let mesh: HashSet<_> = ps[6..10].iter().copied().collect();
        let plan = m.tick(t1, &mesh);
        assert_eq!(plan.close.len(), 4, "down to the high mark: {plan:?}");
        for kept in &ps[..10] {
            assert!(
                !plan.close.contains(kept),
                "busy, static and mesh peers kept"
            );
        }
        // The least recently used went first.
        assert!(plan.close.contains(&ps[15]) && plan.close.contains(&ps[14]));
    }

    #[test]
    fn activity_reports_use_and_busy_guards() {
        let a = Arc::new(Activity::default());
        let p = PeerId::random();
        let q = PeerId::random();
        a.touch(p);
        let guard = a.busy(q);
        let now = Instant::now();
        let seen: HashMap<_, _> = a.take(now).into_iter().map(|(p, _, b)| (p, b)).collect();
        assert_eq!(seen.get(&p), Some(&0));
        assert_eq!(seen.get(&q), Some(&1));
        drop(guard);
        let later = now + USEFUL_FOR * 2;
        let seen: HashMap<_, _> = a.take(later).into_iter().map(|(p, _, b)| (p, b)).collect();
        assert_eq!(seen.get(&q), Some(&0));
        // Idle for long: dropped from the table after that report.
        assert!(a.take(later).is_empty());
    }

    #[test]
    fn a_connection_the_other_side_ends_at_once_backs_the_peer_off() {
        let t0 = Instant::now();
        let mut m = ConnManager::new(12, 2, 3);
        let ps = peers(2);
        for p in &ps {
            m.learn(*p, Found::Kad, t0);
        }
        // A full peer: connected, closed a moment later, again and again.
        let full = ps[0];
        let mut t = t0;
        let mut pauses = Vec::new();
        assert!(m.take_dial(full, t), "out of backoff: dialled");
        for _ in 0..4 {
            m.connected_to(full, t);
            m.disconnected(full, t + Duration::from_millis(50));
            t += Duration::from_millis(50);
            assert!(!m.take_dial(full, t), "not redialled at once");
            let mut wait = Duration::ZERO;
            while !m.take_dial(full, t + wait) {
                wait += Duration::from_millis(500);
            }
            pauses.push(wait);
            t += wait;
        }
        assert!(
            pauses.windows(2).all(|w| w[1] > w[0]),
            "the pause grows: {pauses:?}"
        );
        // A connection that held clears the backoff (after a short pause).
        let ok = ps[1];
        assert!(m.take_dial(ok, t0));
        m.connected_to(ok, t0);
        m.disconnected(ok, t0 + SHORT_LIVED);
        assert!(!m.take_dial(ok, t0 + SHORT_LIVED));
        assert!(m.take_dial(ok, t0 + SHORT_LIVED + DIAL_BACKOFF_FIRST));
    }

    #[test]
    fn static_peers_are_dialled_first_and_closed_peers_not_redialled_soon() {
        let t0 = Instant::now();
        let mut m = ConnManager::new(12, 4, 5);
        let ps = peers(200);
        for p in &ps {
            m.learn(*p, Found::Kad, t0);
        }
        m.learn(ps[7], Found::Static, t0);
        m.learn(ps[9], Found::Static, t0);
        let d = m.dials(t0, false);
        assert!(d.contains(&ps[7]) && d.contains(&ps[9]), "{d:?}");
        // Connected, then useless above the minimum: closed, and left alone
        // by the manager's dials for REDIAL_CLOSED_AFTER.
        let mut m = ConnManager::new(12, 1, 5);
        for p in &ps[..3] {
            m.learn(*p, Found::Kad, t0);
            m.connected_to(*p, t0);
        }
        let plan = m.tick(t0 + GRACE, &none());
        assert_eq!(plan.close.len(), 2);
        for p in &plan.close {
            m.disconnected(*p, t0 + GRACE);
            assert!(!m.take_dial(*p, t0 + GRACE + Duration::from_secs(30)));
            assert!(m.take_dial(*p, t0 + GRACE + REDIAL_CLOSED_AFTER));
        }
    }

    #[test]
    fn newcomers_nothing_was_asked_over_leave_room_above_the_high_mark() {
        let t0 = Instant::now();
        // Cap 8: high mark 6, the last two seats for newcomers that ask.
        let mut m = ConnManager::new(8, 3, 5);
        let ps = peers(8);
        for p in &ps {
            m.connected_from(*p, t0);
        }
        // A downloader asked for chunks over the last one at once.
        m.used(ps[7], t0 + Duration::from_millis(50), 0);
        // Within the newcomer's grace nothing closes.
        assert!(m.tick(t0 + NEWCOMER_GRACE / 2, &none()).close.is_empty());
        // Past it, back to the high mark, never the one that was asked.
        let plan = m.tick(t0 + NEWCOMER_GRACE, &none());
        assert_eq!(plan.close.len(), 2, "{plan:?}");
        assert!(!plan.close.contains(&ps[7]));
        // At the high mark and not pressed, young ones keep their grace.
        assert!(m.tick(t0 + NEWCOMER_GRACE, &none()).close.is_empty());
        // Pressed (a newcomer turned away), never-used newcomers go down to
        // the minimum before their full grace; the used one stays.
        m.refused(t0 + NEWCOMER_GRACE);
        let plan = m.tick(t0 + NEWCOMER_GRACE, &none());
        assert_eq!(plan.close.len(), 3, "{plan:?}");
        assert!(!plan.close.contains(&ps[7]));
        assert_eq!(m.connected(), 3);
        assert!(m.pressed(t0 + NEWCOMER_GRACE + PRESSURE_FOR / 2));
        assert!(!m.pressed(t0 + NEWCOMER_GRACE + PRESSURE_FOR));
    }
}
