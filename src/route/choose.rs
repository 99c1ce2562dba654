//! Which node should serve a request: a pure ranking over offers (what
//! this node and each peer's card say about the model), no I/O, no clock.
//!
//! Order, best first:
//! 1. tier: the model loaded with a free slot > loaded, the request would
//!    queue > only on disk (it must be loaded first) > loaded and full;
//! 2. within a tier, the longest warm prefix match ([`super::heads`]);
//! 3. then the least busy: (running + waiting + requests this node has
//!    forwarded there since its card and not finished) / parallel, in
//!    steps of an eighth;
//! 4. then this node before a peer (a tie stays here: no hop for nothing),
//!    then a random order (so that equal peers share the load instead of
//!    all picking the first).

use libp2p::PeerId;

/// Who would serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    /// This node.
    Local,
    /// A peer, over `/shoal/serve/1`.
    Peer(PeerId),
}

/// What one node offers for a request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Offer {
    /// Who.
    pub target: Target,
    /// An engine runs the model (else it is only in the store).
    pub loaded: bool,
    /// `inference.parallel` there (at least 1).
    pub parallel: u32,
    /// `inference.queue_depth` there.
    pub queue_depth: u32,
    /// Running + waiting there, plus what this node forwarded there since
    /// that count and is still open.
    pub busy: u32,
    /// The longest warm prefix cut it matches, in bytes (0: none).
    pub warm: usize,
    /// Tie-break among equal peers (random per request).
    pub jitter: u32,
}

/// The tier of an offer (lower is better).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Tier {
    /// Loaded, a slot is free.
    Free,
    /// Loaded, the request would wait in the queue.
    Queueing,
    /// In the store only: loading comes first.
    OnDisk,
    /// Loaded, slots and queue full (it would answer 429).
    Full,
}

impl Offer {
    /// The tier of this offer.
    pub fn tier(&self) -> Tier {
        let busy = self.busy;
        match self.loaded {
            false => Tier::OnDisk,
            true if busy < self.parallel => Tier::Free,
            true if busy < self.parallel + self.queue_depth => Tier::Queueing,
            true => Tier::Full,
        }
    }

    /// Load in steps of an eighth of the slots (two requests at 16):
    /// cards are up to a second old, so finer differences are noise, and
    /// equal steps leave the choice to the random order, which spreads a
    /// burst instead of sending it all to one node.
    fn load_step(&self) -> u64 {
        u64::from(self.busy) * 8 / u64::from(self.parallel.max(1))
    }
}

/// Ranks `offers`, best first (see the module docs).
pub fn rank(mut offers: Vec<Offer>) -> Vec<Offer> {
    offers.sort_by(|a, b| {
        a.tier()
            .cmp(&b.tier())
            .then(b.warm.cmp(&a.warm))
            .then(a.load_step().cmp(&b.load_step()))
            .then((a.target != Target::Local).cmp(&(b.target != Target::Local)))
            .then(a.jitter.cmp(&b.jitter))
    });
    offers
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(target: Target, loaded: bool, busy: u32, warm: usize) -> Offer {
        Offer {
            target,
            loaded,
            parallel: 4,
            queue_depth: 4,
            busy,
            warm,
            jitter: 0,
        }
    }

    fn order(v: Vec<Offer>) -> Vec<Target> {
        rank(v).into_iter().map(|o| o.target).collect()
    }

    #[test]
    fn loaded_beats_warm_beats_idle_beats_disk() {
        let (a, b, c) = (
            Target::Peer(PeerId::random()),
            Target::Peer(PeerId::random()),
            Target::Peer(PeerId::random()),
        );
        // On disk only, even idle, comes after a loaded busy one.
        assert_eq!(
            order(vec![offer(a, false, 0, 0), offer(b, true, 3, 0)]),
            vec![b, a]
        );
        // Warm wins over less busy within the free tier.
        assert_eq!(
            order(vec![offer(a, true, 0, 0), offer(b, true, 3, 2048)]),
            vec![b, a]
        );
        // ... but not over a free slot when it would queue.
        assert_eq!(
            order(vec![offer(a, true, 0, 0), offer(b, true, 5, 2048)]),
            vec![a, b]
        );
        // Least busy next; full ones last.
        assert_eq!(
            order(vec![
                offer(c, true, 8, 0),
                offer(a, true, 2, 0),
                offer(b, true, 1, 0)
            ]),
            vec![b, a, c]
        );
    }

    #[test]
    fn a_tie_stays_here_and_a_freer_peer_takes_the_request() {
        let p = Target::Peer(PeerId::random());
        assert_eq!(
            order(vec![offer(p, true, 1, 0), offer(Target::Local, true, 1, 0)]),
            vec![Target::Local, p]
        );
        assert_eq!(
            order(vec![offer(Target::Local, true, 2, 0), offer(p, true, 1, 0)]),
            vec![p, Target::Local]
        );
    }

    #[test]
    fn equal_peers_are_ordered_by_jitter() {
        let (a, b) = (
            Target::Peer(PeerId::random()),
            Target::Peer(PeerId::random()),
        );
        let mut x = offer(a, true, 1, 0);
        let mut y = offer(b, true, 1, 0);
        x.jitter = 5;
        y.jitter = 2;
        assert_eq!(order(vec![x, y]), vec![b, a]);
        x.jitter = 1;
        assert_eq!(order(vec![x, y]), vec![a, b]);
    }
}
