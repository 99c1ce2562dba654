//! Serving cards: what a node can serve and how busy it is, gossiped on
//! `shoal/cards/2` (the mesh's [`crate::mesh::wire::CARDS_TOPIC`]).
//!
//! A card is small (a few hundred bytes per model) and sent often: every
//! `route.card_interval` when something changed, at least every 5 s. It is
//! encoded like every mesh message (the wire version byte, then postcard:
//! [`crate::mesh::wire::encode`]) and signed by its author's libp2p key
//! (gossipsub, strict validation: a card whose signature does not verify,
//! or whose author is not the connection's authenticated peer chain, never
//! reaches [`decode`]). A receiver keeps the newest card (by `seq`) of each
//! peer for `route.card_ttl`, then forgets it.

use super::heads::Head;
use crate::mesh::wire::{self, WireError};
use serde::{Deserialize, Serialize};

/// Most models on one card.
pub const MAX_MODELS: usize = 64;
/// Most warm prefix heads per model.
pub const MAX_WARM: usize = 32;
/// Longest model name on a card.
pub const MAX_NAME: usize = 256;

/// A node's serving card.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServingCard {
    /// Grows with every card of its author (older ones are ignored).
    pub seq: u64,
    /// When it was made (Unix milliseconds; informative, clocks differ).
    pub unix_ms: u64,
    /// The author's API needs an API key (`api.keys_file`).
    pub needs_key: bool,
    /// What it can serve.
    pub models: Vec<CardModel>,
}

/// One model on a card.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CardModel {
    /// The name it is served under (a trusted name or the id in hex).
    pub name: String,
    /// Its artifact id.
    pub id: [u8; 32],
    /// Loaded (an engine runs it) or only in the store.
    pub loaded: bool,
    /// Sequences decoded together (`inference.parallel`).
    pub parallel: u16,
    /// Requests that may wait beyond those (`inference.queue_depth`).
    pub queue_depth: u16,
    /// Sequences running now.
    pub running: u16,
    /// Requests waiting now.
    pub waiting: u16,
    /// Measured prompt rate, tokens per second (0 until measured).
    pub prompt_tps: f32,
    /// Measured decode rate of one sequence, tokens per second (0 until measured).
    pub decode_tps: f32,
    /// Heads of prompts it served recently, whose prefixes it holds warm
    /// (newest first; [`super::heads`]).
    pub warm: Vec<Head>,
}

impl CardModel {
    /// Requests it holds (running and waiting).
    pub fn busy(&self) -> u32 {
        u32::from(self.running) + u32::from(self.waiting)
    }
}

/// Errors decoding a card.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum CardError {
    /// Not a card of a wire version this build speaks.
    #[error("malformed serving card: {0}")]
    Wire(#[from] WireError),
    /// Over one of the bounds.
    #[error("serving card over its bounds: {0}")]
    Bounds(&'static str),
}

/// Encodes a card (wire version byte + postcard).
pub fn encode(card: &ServingCard) -> Vec<u8> {
    wire::encode(card)
}

/// Decodes and bounds-checks a card from a peer.
pub fn decode(bytes: &[u8]) -> Result<ServingCard, CardError> {
    if bytes.len() > wire::MAX_CARD_BYTES {
        return Err(CardError::Bounds("card too large"));
    }
    let card: ServingCard = wire::decode(bytes)?;
    if card.models.len() > MAX_MODELS {
        return Err(CardError::Bounds("too many models"));
    }
    for m in &card.models {
        if m.name.is_empty() || m.name.len() > MAX_NAME {
            return Err(CardError::Bounds("model name length"));
        }
        if m.warm.len() > MAX_WARM {
            return Err(CardError::Bounds("too many warm heads"));
        }
        if m.parallel == 0 && m.loaded {
            return Err(CardError::Bounds("a loaded model with no slot"));
        }
        if !(m.prompt_tps.is_finite() && m.decode_tps.is_finite())
            || m.prompt_tps < 0.0
            || m.decode_tps < 0.0
        {
            return Err(CardError::Bounds("rates"));
        }
    }
    Ok(card)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn card() -> ServingCard {
        ServingCard {
            seq: 7,
            unix_ms: 1_700_000_000_000,
            needs_key: false,
            models: vec![CardModel {
                name: "demo".into(),
                id: [0xab; 32],
                loaded: true,
                parallel: 16,
                queue_depth: 16,
                running: 3,
                waiting: 1,
                prompt_tps: 1000.0,
                decode_tps: 50.0,
                warm: vec![[1, 2, 3, 4, 5, 6, 7, 8]],
            }],
        }
    }

    /// The encoding of version 1 is pinned: a change here is a wire change.
    #[test]
    fn fixture_version_1() {
        let enc = encode(&card());
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/serving-card-v1.bin");
        if std::env::var_os("SHOAL_REGEN_FIXTURES").is_some() {
            std::fs::write(&path, &enc).expect("write fixture");
        }
        let want = include_bytes!("../../tests/fixtures/serving-card-v1.bin");
        assert_eq!(hex::encode(&enc), hex::encode(want));
        assert_eq!(decode(want), Ok(card()));
    }

    #[test]
    fn hostile_cards_are_refused() {
        let mut c = card();
        c.models[0].warm = vec![[0; 8]; MAX_WARM + 1];
        assert!(matches!(decode(&encode(&c)), Err(CardError::Bounds(_))));
        let mut c = card();
        c.models[0].decode_tps = f32::NAN;
        assert!(decode(&encode(&c)).is_err());
        let mut c = card();
        c.models[0].name = String::new();
        assert!(decode(&encode(&c)).is_err());
        let mut c = card();
        c.models[0].parallel = 0;
        assert!(decode(&encode(&c)).is_err());
        let mut bytes = encode(&card());
        bytes[0] = 9;
        assert!(matches!(
            decode(&bytes),
            Err(CardError::Wire(WireError::UnsupportedVersion(9)))
        ));
        assert!(decode(&bytes[..bytes.len() - 1]).is_err());
        assert!(decode(&[]).is_err());
        assert!(decode(&vec![1u8; wire::MAX_CARD_BYTES + 1]).is_err());
        let mut long = encode(&card());
        long.push(0);
        assert!(decode(&long).is_err(), "trailing bytes");
    }
}
