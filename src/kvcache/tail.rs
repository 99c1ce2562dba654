//! Tail records: the partial last block of a sequence, reusable token by
//! token.
//!
//! Full blocks leave up to `block_tokens − 1` tokens at the end of a shared
//! prefix that block keys cannot name; recomputing them dominated a
//! follow-up's time to first token. After a request, [`super::PrefixCache::save`] stores the
//! positions after the last full block (`< block_tokens` of them) as a tail
//! record under
//!
//! ```text
//! tail_key = BLAKE3("shoal-kv-tail-v1" ‖ model id ‖ tokenizer id ‖ [KV dtype, KV format version]
//!                   ‖ block_tokens (u32 LE) ‖ parent)
//! ```
//!
//! where `parent` is the key of the last full block before the tail (32 zero
//! bytes at the start). The record carries its tokens; a later request
//! whose walk over full blocks stops at that parent imports the record's
//! longest common prefix with its own next tokens. The parent key pins
//! everything before the tail, the stored tokens everything in it, so the
//! reused positions are exactly the ones the request would compute. One
//! record per parent (the latest replaces the previous one). Records live
//! in the RAM and disk tiers beside blocks, are never served to neighbours,
//! and are checked like blocks (a bad one is dropped, never used).
//!
//! A record either holds the KV of its tokens itself (the partial last
//! block of a sequence) or refers to a full block whose first tokens they
//! are: after every full block a request computed, [`super::PrefixCache::save`] stores a
//! small reference record (the next block's tokens and key), so a later
//! prompt that diverges anywhere inside that next block still reuses the
//! tokens it shares with it, from the full block's KV.
//!
//! # Format (version 1, little-endian)
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `SHOALKVT` |
//! | 8 | 4 | version (1) |
//! | 12 | 1 | kind: 0 = the KV follows, 1 = refers to a full block |
//! | 13 | 3 | zero |
//! | 16 | 4 | token count `n` |
//! | 20 | 4·n | the tokens (u32 each) |
//! | 20+4n | 32 | kind 1 only: the full block's key (its first `n` positions are these tokens) |
//! | … | 32 | BLAKE3 of all the bytes before it |
//! | … | … | kind 0 only: the KV export of exactly those `n` positions (`SHOAL-KV`, with its own checksum) |

use super::{BlockKey, KvCacheError};
use crate::inference::KvCache;

/// Magic bytes of a tail record.
pub const TAIL_MAGIC: &[u8; 8] = b"SHOALKVT";
/// Tail record format version.
pub const TAIL_VERSION: u32 = 1;
/// Domain separator of tail keys (and their version).
pub const TAIL_DOMAIN: &[u8] = b"shoal-kv-tail-v1";
const MAX_TOKENS: usize = 4096;
const HEAD: usize = 20;

/// Where a tail record's KV is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TailKv<'a> {
    /// In the record: the KV export of its tokens' positions.
    Inline(&'a [u8]),
    /// In the first positions of this full block.
    Block(BlockKey),
}

/// A decoded tail record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TailRecord<'a> {
    /// The tokens whose KV the record gives.
    pub tokens: Vec<u32>,
    /// Where that KV is.
    pub kv: TailKv<'a>,
}

/// Encodes a tail record.
pub fn encode(tokens: &[u32], kv: &TailKv<'_>) -> Vec<u8> {
    let inline = match kv {
        TailKv::Inline(b) => b.len(),
        TailKv::Block(_) => 32,
    };
    let mut out = Vec::with_capacity(HEAD + 4 * tokens.len() + 32 + inline);
    out.extend_from_slice(TAIL_MAGIC);
    out.extend_from_slice(&TAIL_VERSION.to_le_bytes());
    out.extend_from_slice(&[u8::from(matches!(kv, TailKv::Block(_))), 0, 0, 0]);
    out.extend_from_slice(&(tokens.len() as u32).to_le_bytes());
    for t in tokens {
        out.extend_from_slice(&t.to_le_bytes());
    }
    if let TailKv::Block(k) = kv {
        out.extend_from_slice(&k.0);
    }
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    if let TailKv::Inline(b) = kv {
        out.extend_from_slice(b);
    }
    out
}

/// True if `bytes` starts like a tail record.
pub fn is_tail(bytes: &[u8]) -> bool {
    bytes.starts_with(TAIL_MAGIC)
}

/// Checks a tail record (magic, version, kind, lengths, its checksum and,
/// for inline KV, the export's header and checksum and that it covers
/// exactly the record's tokens) and returns it.
pub fn decode(bytes: &[u8]) -> Result<TailRecord<'_>, KvCacheError> {
    let bad = |r: &str| KvCacheError::Corrupt {
        key: "tail record".into(),
        reason: r.to_owned(),
    };
    if bytes.len() < HEAD + 32 || !is_tail(bytes) {
        return Err(bad("not a KV tail record"));
    }
    let u32_at =
        |o: usize| u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
    let version = u32_at(8);
    if version != TAIL_VERSION {
        return Err(bad(&format!("unsupported tail record version {version}")));
    }
    let kind = bytes[12];
    if kind > 1 || bytes[13..16] != [0, 0, 0] {
        return Err(bad("unknown tail record kind"));
    }
    let n = u32_at(16) as usize;
    let head = HEAD + 4 * n + if kind == 1 { 32 } else { 0 };
    if n > MAX_TOKENS || bytes.len() < head + 32 {
        return Err(bad("token count does not fit the record"));
    }
    if blake3::hash(&bytes[..head]).as_bytes()[..] != bytes[head..head + 32] {
        return Err(bad("checksum mismatch: the tail record is corrupted"));
    }
    let tokens = (0..n).map(|i| u32_at(HEAD + 4 * i)).collect();
    let rest = &bytes[head + 32..];
    let kv = if kind == 1 {
        if !rest.is_empty() {
            return Err(bad("trailing bytes after a block reference"));
        }
        let mut k = [0u8; 32];
        k.copy_from_slice(&bytes[head - 32..head]);
        TailKv::Block(BlockKey(k))
    } else {
        let h = KvCache::inspect(rest).map_err(|e| bad(&e.to_string()))?;
        if h.range.len() != n {
            return Err(bad("the KV export does not cover the record's tokens"));
        }
        TailKv::Inline(rest)
    };
    Ok(TailRecord { tokens, kv })
}

/// Whose KV a stored blob (a block's KV export or a tail record) is, read
/// from its header alone (no checksum pass).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Owner {
    /// KV computed by this model (a block, or a tail record holding it inline).
    Model([u8; 32]),
    /// A tail record referring to this full block (it holds no KV).
    Refers(BlockKey),
    /// Not recognizable: left alone.
    Unknown,
}

/// Bytes of a blob's start that [`owner`] needs at most (a tail record with
/// the most tokens, then the start of its inline export).
pub(crate) const OWNER_PREFIX: usize = HEAD + 4 * MAX_TOKENS + 32 + 44;

/// The owner of a blob, from its first bytes (at least [`OWNER_PREFIX`] of
/// them, or all).
pub(crate) fn owner(bytes: &[u8]) -> Owner {
    let model_at = |b: &[u8]| -> Owner {
        if b.len() >= 44 && b.starts_with(crate::inference::KV_MAGIC) {
            let mut m = [0u8; 32];
            m.copy_from_slice(&b[12..44]);
            Owner::Model(m)
        } else {
            Owner::Unknown
        }
    };
    if !is_tail(bytes) {
        return model_at(bytes);
    }
    if bytes.len() < HEAD || bytes[8..12] != TAIL_VERSION.to_le_bytes() {
        return Owner::Unknown;
    }
    let n = u32::from_le_bytes([bytes[16], bytes[17], bytes[18], bytes[19]]) as usize;
    if n > MAX_TOKENS {
        return Owner::Unknown;
    }
    let at = HEAD + 4 * n;
    match bytes[12] {
        0 => bytes.get(at + 32..).map_or(Owner::Unknown, model_at),
        1 => bytes.get(at..at + 32).map_or(Owner::Unknown, |k| {
            let mut key = [0u8; 32];
            key.copy_from_slice(k);
            Owner::Refers(BlockKey(key))
        }),
        _ => Owner::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inference::{KvDtype, KvLayout};

    fn cache(n: usize) -> KvCache {
        let l = KvLayout {
            n_layer: 2,
            n_kv_head: 1,
            head_dim: 32,
        };
        let mut c = KvCache::new(l);
        for p in 0..n {
            let k: Vec<f32> = (0..64).map(|i| (p * 64 + i) as f32 / 16.0).collect();
            let v: Vec<f32> = k.iter().map(|x| -x).collect();
            c.append(&k, &v).expect("append");
        }
        c
    }

    #[test]
    fn roundtrip_and_corruption() {
        let c = cache(6);
        let kv = c.export(4..6, KvDtype::F16, &[3; 32]).expect("export");
        let rec = encode(&[10, 11], &TailKv::Inline(&kv));
        let d = decode(&rec).expect("decode");
        assert_eq!(d.tokens, vec![10, 11]);
        assert_eq!(d.kv, TailKv::Inline(&kv[..]));
        let r = encode(&[5; 16], &TailKv::Block(BlockKey([9; 32])));
        let d = decode(&r).expect("decode");
        assert_eq!(d.kv, TailKv::Block(BlockKey([9; 32])));
        for i in [12, 20, r.len() - 40, r.len() - 1] {
            let mut bad = r.clone();
            bad[i] ^= 1;
            assert!(decode(&bad).is_err(), "reference byte {i}");
        }
        let mut long = r.clone();
        long.push(0);
        assert!(decode(&long).is_err());
        // A flipped token, a flipped KV byte, a wrong count: all refused.
        for i in [16, 20, 60, rec.len() - 40] {
            let mut bad = rec.clone();
            bad[i] ^= 1;
            assert!(decode(&bad).is_err(), "byte {i}");
        }
        assert!(decode(&encode(&[10, 11, 12], &TailKv::Inline(&kv))).is_err());
        assert!(decode(&rec[..40]).is_err());
        assert!(decode(&kv).is_err());
    }

    /// The format is pinned by a checked-in fixture: an inline record (2
    /// tokens, f16) followed by a reference record (3 tokens).
    #[test]
    fn fixture_v1() {
        let c = cache(6);
        let kv = c.export(4..6, KvDtype::F16, &[0xab; 32]).expect("export");
        let mut rec = encode(&[7, 300_000], &TailKv::Inline(&kv));
        rec.extend(encode(&[1, 2, 3], &TailKv::Block(BlockKey([0xcd; 32]))));
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/kvtail-v1.bin");
        if std::env::var_os("SHOAL_REGEN_FIXTURES").is_some() {
            std::fs::write(&path, &rec).expect("write");
        }
        let want = include_bytes!("../../tests/fixtures/kvtail-v1.bin");
        assert_eq!(&rec[..], &want[..]);
        let (a, b) = want.split_at(want.len() - (HEAD + 12 + 64));
        let d = decode(a).expect("decode");
        assert_eq!(d.tokens, vec![7, 300_000]);
        let r = decode(b).expect("decode");
        assert_eq!(
            (r.tokens, r.kv),
            (vec![1, 2, 3], TailKv::Block(BlockKey([0xcd; 32])))
        );
        let TailKv::Inline(kv) = d.kv else {
            panic!("inline record expected");
        };
        let mut c2 = cache(4);
        assert_eq!(
            c2.import_append_prefix(kv, &[0xab; 32], 1, true)
                .expect("import"),
            1
        );
        assert_eq!(c2.len(), 5);
        assert_eq!(c2.get(1, 1, 0, 4), c.get(1, 1, 0, 4));
    }
}
