//! Gossip envelopes: each gossip message signed once by its author and
//! checked once by each node.
//!
//! Gossipsub's own signatures are checked on every copy a node receives,
//! before its duplicate filter: with each node hearing a message from most
//! of its gossip-mesh peers, 50 downloads' have announcements on 300
//! in-process nodes spent a tenth of the CPU of their pulls checking
//! copies. So gossipsub runs unsigned (anonymous, a message's id is a hash
//! of its topic and data, as Ethereum's consensus gossip does) and every
//! message is a [`GossipEnvelope`]: the author's key, a sequence number,
//! the payload and an ed25519 signature over the topic, the sequence number
//! and the payload. A node checks it for the first copy only, and
//! gossipsub forwards a message only after the check passed
//! (`validate_messages`), so a forged one goes no further than the node
//! that received it.

use super::wire::{self, GossipEnvelope, WireError};
use libp2p::PeerId;
use libp2p::identity::{Keypair, PublicKey, ed25519};

/// Domain separation of envelope signatures.
const CONTEXT: &[u8] = b"shoal-gossip/2";

/// What is wrong with a gossip envelope.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GossipError {
    /// It does not decode (see [`wire::decode_gossip_envelope`]).
    #[error("malformed gossip envelope: {0}")]
    Wire(#[from] WireError),
    /// The author's key is not an ed25519 public key.
    #[error("gossip envelope with an invalid author key")]
    BadKey,
    /// The signature does not match the author, topic and payload.
    #[error("gossip envelope with a bad signature")]
    BadSignature,
    /// This node's key cannot sign (not ed25519).
    #[error("this node's key cannot sign gossip: {0}")]
    Sign(String),
}

fn signed_bytes(topic: &str, seq: u64, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(CONTEXT.len() + 4 + topic.len() + 8 + payload.len());
    m.extend_from_slice(CONTEXT);
    // Topic names are short constants.
    m.extend_from_slice(&u32::try_from(topic.len()).unwrap_or(u32::MAX).to_be_bytes());
    m.extend_from_slice(topic.as_bytes());
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(payload);
    m
}

/// Wraps `payload` for `topic`, signed with `key` (an ed25519 node key).
pub fn seal(
    key: &Keypair,
    topic: &str,
    seq: u64,
    payload: Vec<u8>,
) -> Result<Vec<u8>, GossipError> {
    let ed = key
        .clone()
        .try_into_ed25519()
        .map_err(|e| GossipError::Sign(e.to_string()))?;
    let sig = ed.sign(&signed_bytes(topic, seq, &payload));
    Ok(wire::encode(&GossipEnvelope {
        author: ed.public().to_bytes().to_vec(),
        seq,
        payload,
        sig,
    }))
}

/// Checks an envelope received on `topic`: its author and payload.
pub fn open(topic: &str, data: &[u8]) -> Result<(PeerId, Vec<u8>), GossipError> {
    let e = wire::decode_gossip_envelope(data)?;
    let key = ed25519::PublicKey::try_from_bytes(&e.author).map_err(|_| GossipError::BadKey)?;
    if !key.verify(&signed_bytes(topic, e.seq, &e.payload), &e.sig) {
        return Err(GossipError::BadSignature);
    }
    Ok((PeerId::from_public_key(&PublicKey::from(key)), e.payload))
}

/// A gossip message's id: the first 20 bytes of the BLAKE3 hash of its
/// topic and data (the envelope's sequence number keeps equal payloads apart).
pub fn message_id(topic: &str, data: &[u8]) -> Vec<u8> {
    let mut h = blake3::Hasher::new();
    h.update(&u32::try_from(topic.len()).unwrap_or(u32::MAX).to_be_bytes());
    h.update(topic.as_bytes());
    h.update(data);
    h.finalize().as_bytes()[..20].to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_message_opens_with_its_author_and_nothing_else_does() {
        let key = Keypair::generate_ed25519();
        let sealed = seal(&key, "t/2", 5, vec![1, 2, 3]).expect("seal");
        assert_eq!(
            open("t/2", &sealed),
            Ok((key.public().to_peer_id(), vec![1, 2, 3]))
        );
        // Another topic, a changed payload or sequence number, another author.
        assert_eq!(open("u/2", &sealed), Err(GossipError::BadSignature));
        let mut e = wire::decode_gossip_envelope(&sealed).expect("decode");
        e.payload[0] ^= 1;
        assert_eq!(
            open("t/2", &wire::encode(&e)),
            Err(GossipError::BadSignature)
        );
        let mut e = wire::decode_gossip_envelope(&sealed).expect("decode");
        e.seq += 1;
        assert_eq!(
            open("t/2", &wire::encode(&e)),
            Err(GossipError::BadSignature)
        );
        let other = Keypair::generate_ed25519();
        let mut e = wire::decode_gossip_envelope(&sealed).expect("decode");
        e.author = other
            .public()
            .try_into_ed25519()
            .expect("ed25519")
            .to_bytes()
            .to_vec();
        assert_eq!(
            open("t/2", &wire::encode(&e)),
            Err(GossipError::BadSignature)
        );
        assert!(matches!(open("t/2", &[1, 2]), Err(GossipError::Wire(_))));
        assert!(matches!(open("t/2", &[]), Err(GossipError::Wire(_))));
    }

    #[test]
    fn message_ids_tell_topics_and_data_apart() {
        assert_eq!(message_id("a", b"x"), message_id("a", b"x"));
        assert_ne!(message_id("a", b"x"), message_id("b", b"x"));
        assert_ne!(message_id("a", b"x"), message_id("a", b"y"));
        assert_eq!(message_id("a", b"x").len(), 20);
    }
}
