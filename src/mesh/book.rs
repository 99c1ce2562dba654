//! The address book: addresses the event loop learnt for peers (Kademlia
//! walks, peer lists, identify), offered to every dial by peer id.
//!
//! Request-response, chunk streams and Kademlia dial a peer by its id and
//! take its addresses from the behaviours; Kademlia offers only its routing
//! table, which on a large mesh holds a part of the known peers (a bucket
//! keeps 20). A download that has a holder's id from a release or a
//! provider record but no address in that table would fail to dial it;
//! this behaviour offers what the node learnt anywhere else.

use libp2p::core::Endpoint;
use libp2p::swarm::{ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour};
use libp2p::{Multiaddr, PeerId};
use std::collections::HashMap;

/// Peers with addresses kept at most.
pub const MAX_PEERS: usize = 4096;
/// Addresses kept per peer at most.
pub const MAX_ADDRS: usize = 4;

/// The address book behaviour (no protocol, no events).
#[derive(Debug, Default)]
pub struct AddressBook {
    map: HashMap<PeerId, Vec<Multiaddr>>,
}

impl AddressBook {
    /// Adds `addrs` for `peer` (the newest [`MAX_ADDRS`] kept). When the book
    /// is full, peers for which `keep` is false are dropped first, and a new
    /// peer is not added if there is still no room.
    pub fn note(&mut self, peer: PeerId, addrs: Vec<Multiaddr>, keep: impl Fn(&PeerId) -> bool) {
        if addrs.is_empty() {
            return;
        }
        if !self.map.contains_key(&peer) && self.map.len() >= MAX_PEERS {
            self.map.retain(|p, _| keep(p));
            if self.map.len() >= MAX_PEERS {
                return;
            }
        }
        let v = self.map.entry(peer).or_default();
        for a in addrs {
            if !v.contains(&a) {
                if v.len() >= MAX_ADDRS {
                    v.remove(0);
                }
                v.push(a);
            }
        }
    }

    /// The addresses of `peer`, if any.
    pub fn get(&self, peer: &PeerId) -> Option<&Vec<Multiaddr>> {
        self.map.get(peer)
    }

    /// Every peer with its addresses.
    pub fn iter(&self) -> impl Iterator<Item = (&PeerId, &Vec<Multiaddr>)> {
        self.map.iter()
    }
}

impl NetworkBehaviour for AddressBook {
    no_protocol!();

    fn handle_pending_outbound_connection(
        &mut self,
        _: ConnectionId,
        peer: Option<PeerId>,
        _: &[Multiaddr],
        _: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        Ok(peer
            .and_then(|p| self.map.get(&p).cloned())
            .unwrap_or_default())
    }

    fn on_swarm_event(&mut self, _: FromSwarm) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_addresses_and_stays_bounded() {
        let mut b = AddressBook::default();
        let p = PeerId::random();
        let addrs: Vec<Multiaddr> = (1..=6)
            .map(|i| format!("/ip4/10.0.0.{i}/tcp/1").parse().expect("addr"))
            .collect();
        b.note(p, addrs.clone(), |_| true);
        assert_eq!(b.get(&p).map(Vec::as_slice), Some(&addrs[2..]));
        for _ in 0..MAX_PEERS {
            b.note(PeerId::random(), addrs[..1].to_vec(), |_| true);
        }
        assert_eq!(b.iter().count(), MAX_PEERS);
        // Full, and every peer still wanted: no room for a new one.
        let q = PeerId::random();
        b.note(q, addrs[..1].to_vec(), |_| true);
        assert!(b.get(&q).is_none());
        // Peers no longer wanted make room.
        b.note(q, addrs[..1].to_vec(), |x| *x == p);
        assert!(b.get(&q).is_some() && b.get(&p).is_some());
        assert_eq!(b.iter().count(), 2);
    }
}
