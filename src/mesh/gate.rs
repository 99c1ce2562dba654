//! The gate: a node at its connection bound refuses newcomers before the
//! secure handshake, not after it.
//!
//! libp2p's connection limits count established connections, so a node at
//! `mesh.max_connections` accepts a newcomer's TCP connection, runs the TLS
//! (or noise) handshake with it, and only then refuses it. Each handshake
//! costs both ends an X25519 exchange, an ed25519 signature and a check of
//! the other's; on a bounded mesh where many downloaders ask the same full
//! holders again and again, those refused handshakes were a tenth of the
//! CPU of the 300-node scale benchmark's pulls. This behaviour counts the
//! established connections itself and turns incoming ones away while the
//! count is at the bound, when the socket has just been accepted. The
//! dialer sees its connection closed during negotiation (a failed dial, on
//! the same backoff as before). The limits behaviour stays as the backstop
//! for handshakes that finish together.

use libp2p::Multiaddr;
use libp2p::swarm::behaviour::ConnectionClosed;
use libp2p::swarm::{ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour};

/// The reason an incoming connection was turned away.
#[derive(Debug, thiserror::Error)]
#[error("at the connection bound ({max} established)")]
pub struct AtBound {
    /// The bound.
    pub max: u32,
}

/// The gate behaviour (no protocol, no events).
#[derive(Debug)]
pub struct Gate {
    max: u32,
    established: u32,
}

impl Gate {
    /// A gate for at most `max` established connections.
    pub fn new(max: u32) -> Self {
        Self {
            max: max.max(1),
            established: 0,
        }
    }

    /// Whether an incoming connection would be turned away now.
    pub fn full(&self) -> bool {
        self.established >= self.max
    }
}

impl NetworkBehaviour for Gate {
    no_protocol!();

    fn handle_pending_inbound_connection(
        &mut self,
        _: ConnectionId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        if self.full() {
            return Err(ConnectionDenied::new(AtBound { max: self.max }));
        }
        Ok(())
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::ConnectionEstablished(_) => self.established += 1,
            FromSwarm::ConnectionClosed(ConnectionClosed { .. }) => {
                self.established = self.established.saturating_sub(1);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::PeerId;
    use libp2p::core::ConnectedPoint;
    use libp2p::swarm::behaviour::ConnectionEstablished;

    #[test]
    fn turns_newcomers_away_only_while_at_the_bound() {
        let mut g = Gate::new(2);
        let (l, r): (Multiaddr, Multiaddr) = (
            "/ip4/127.0.0.1/tcp/1".parse().expect("addr"),
            "/ip4/127.0.0.1/tcp/2".parse().expect("addr"),
        );
        let endpoint = ConnectedPoint::Listener {
            local_addr: l.clone(),
            send_back_addr: r.clone(),
        };
        let peer = PeerId::random();
        let pending = |g: &mut Gate, id| {
            g.handle_pending_inbound_connection(ConnectionId::new_unchecked(id), &l, &r)
        };
        for id in 1..=2 {
            assert!(pending(&mut g, id).is_ok(), "room for connection {id}");
            g.on_swarm_event(FromSwarm::ConnectionEstablished(ConnectionEstablished {
                peer_id: peer,
                connection_id: ConnectionId::new_unchecked(id),
                endpoint: &endpoint,
                failed_addresses: &[],
                other_established: id - 1,
            }));
        }
        let denied = pending(&mut g, 3);
        assert!(denied.is_err_and(|e| e.downcast_ref::<AtBound>().is_some_and(|b| b.max == 2)));
        g.on_swarm_event(FromSwarm::ConnectionClosed(ConnectionClosed {
            peer_id: peer,
            connection_id: ConnectionId::new_unchecked(1),
            endpoint: &endpoint,
            cause: None,
            remaining_established: 1,
        }));
        assert!(pending(&mut g, 4).is_ok(), "room again after a close");
    }
}
