//! The manifest: what an artifact is, chunk by chunk.
//!
//! Encoded canonically with postcard, version first. The artifact id is the
//! BLAKE3 of that encoding, so a manifest received from anyone can be checked
//! against the id it was asked for ([`Manifest::decode_verified`]).

use super::chunker::{MAX_CHUNK, Span};
use super::id::{ArtifactId, ChunkHash};
use serde::{Deserialize, Serialize};

/// The manifest format this build writes and reads.
pub const MANIFEST_FORMAT: u16 = 1;
/// Upper bound on the encoded size we are willing to decode (64 MiB).
pub const MAX_MANIFEST_BYTES: usize = 64 << 20;

/// Errors decoding or validating a manifest.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    /// The bytes are not a postcard manifest.
    #[error("manifest does not decode: {0}")]
    Decode(String),
    /// Written by a format this build does not read.
    #[error("manifest format {0} is not supported (this build reads format {MANIFEST_FORMAT})")]
    UnsupportedFormat(u16),
    /// Decodes, but re-encoding gives other bytes (trailing data or non-canonical varints).
    #[error("manifest encoding is not canonical")]
    NotCanonical,
    /// The manifest's hash is not the id it was fetched for.
    #[error("manifest hashes to {got}, expected {expected}")]
    IdMismatch {
        /// Id asked for.
        expected: ArtifactId,
        /// Id the bytes hash to.
        got: ArtifactId,
    },
    /// Structurally inconsistent (chunks do not tile the file, bad tensor ranges, ...).
    #[error("invalid manifest: {0}")]
    Invalid(String),
    /// Larger than [`MAX_MANIFEST_BYTES`].
    #[error("manifest of {0} bytes is too large")]
    TooLarge(usize),
}

/// What kind of file an artifact is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ArtifactKind {
    /// GGUF model weights.
    Gguf,
    /// A tokenizer (e.g. `tokenizer.json`).
    Tokenizer,
    /// A block of KV cache.
    KvBlock,
    /// Anything else.
    Other,
}

impl ArtifactKind {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            ArtifactKind::Gguf => "gguf",
            ArtifactKind::Tokenizer => "tokenizer",
            ArtifactKind::KvBlock => "kv",
            ArtifactKind::Other => "other",
        }
    }
}

/// One chunk: its place in the file and its hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    /// Byte offset in the file.
    pub offset: u64,
    /// Length in bytes.
    pub len: u32,
    /// BLAKE3 of the chunk's bytes.
    pub hash: ChunkHash,
}

impl ChunkRef {
    /// The chunk's place as a [`Span`].
    pub fn span(&self) -> Span {
        Span {
            offset: self.offset,
            len: self.len,
        }
    }
}

/// Where a GGUF tensor lives, so a node can fetch only some layers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorRef {
    /// Tensor name.
    pub name: String,
    /// ggml type id.
    pub ggml_type: u32,
    /// Dimensions, innermost first.
    pub dims: Vec<u64>,
    /// Absolute byte offset in the file.
    pub offset: u64,
    /// Size in bytes.
    pub size: u64,
    /// Index of the first chunk holding the tensor's bytes.
    pub first_chunk: u32,
    /// Number of chunks holding the tensor's bytes.
    pub chunk_count: u32,
}

/// An artifact's manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Encoding format ([`MANIFEST_FORMAT`]).
    pub format: u16,
    /// Kind of file.
    pub kind: ArtifactKind,
    /// File size in bytes.
    pub size: u64,
    /// BLAKE3 of the whole file.
    pub blake3: [u8; 32],
    /// Chunks tiling the file in order.
    pub chunks: Vec<ChunkRef>,
    /// GGUF tensor map (empty for other kinds).
    pub tensors: Vec<TensorRef>,
}

impl Manifest {
    /// Canonical encoding.
    pub fn encode(&self) -> Vec<u8> {
        // Serializing plain data to a Vec cannot fail.
        postcard::to_stdvec(self).unwrap_or_default()
    }

    /// The artifact id: BLAKE3 of [`Manifest::encode`].
    pub fn id(&self) -> ArtifactId {
        blake3::hash(&self.encode()).into()
    }

    /// Whole-file hash as hex.
    pub fn blake3_hex(&self) -> String {
        hex::encode(self.blake3)
    }

    /// Decodes and validates a manifest.
    pub fn decode(bytes: &[u8]) -> Result<Self, ManifestError> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge(bytes.len()));
        }
        // Read the version before anything else, so a future format gets a clear error.
        let (format, _) = postcard::take_from_bytes::<u16>(bytes)
            .map_err(|e| ManifestError::Decode(e.to_string()))?;
        if format != MANIFEST_FORMAT {
            return Err(ManifestError::UnsupportedFormat(format));
        }
        let m: Manifest =
            postcard::from_bytes(bytes).map_err(|e| ManifestError::Decode(e.to_string()))?;
        if m.encode() != bytes {
            return Err(ManifestError::NotCanonical);
        }
        m.validate()?;
        Ok(m)
    }

    /// Decodes a manifest fetched for `expect` and checks that it is that artifact's.
    pub fn decode_verified(bytes: &[u8], expect: &ArtifactId) -> Result<Self, ManifestError> {
        let got: ArtifactId = blake3::hash(bytes).into();
        if &got != expect {
            return Err(ManifestError::IdMismatch {
                expected: *expect,
                got,
            });
        }
        Self::decode(bytes)
    }

    /// Checks structural invariants: chunks tile `[0, size)` within size bounds,
    /// and tensors point at chunks that hold them.
    pub fn validate(&self) -> Result<(), ManifestError> {
        let mut at = 0u64;
        for (i, c) in self.chunks.iter().enumerate() {
            if c.offset != at {
                return Err(ManifestError::Invalid(format!(
                    "chunk {i} starts at {} not {at}",
                    c.offset
                )));
            }
            if c.len == 0 || c.len > MAX_CHUNK {
                return Err(ManifestError::Invalid(format!(
                    "chunk {i} has length {}",
                    c.len
                )));
            }
            at = at
                .checked_add(u64::from(c.len))
                .ok_or_else(|| ManifestError::Invalid("chunk offsets overflow".into()))?;
        }
        if at != self.size {
            return Err(ManifestError::Invalid(format!(
                "chunks cover {at} bytes, file has {}",
                self.size
            )));
        }
        for t in &self.tensors {
            let first = t.first_chunk as usize;
            let last = first + t.chunk_count as usize;
            let (Some(a), Some(b)) = (
                self.chunks.get(first),
                last.checked_sub(1).and_then(|l| self.chunks.get(l)),
            ) else {
                return Err(ManifestError::Invalid(format!(
                    "tensor {} points outside the chunk list",
                    t.name
                )));
            };
            let end = t.offset.checked_add(t.size);
            if t.offset < a.offset || end.is_none_or(|e| e > b.offset + u64::from(b.len)) {
                return Err(ManifestError::Invalid(format!(
                    "tensor {} is not inside its chunks",
                    t.name
                )));
            }
        }
        Ok(())
    }

    /// Index of the chunk containing byte `offset`.
    pub fn chunk_at(&self, offset: u64) -> Option<usize> {
        let i = self
            .chunks
            .partition_point(|c| c.offset + u64::from(c.len) <= offset);
        (i < self.chunks.len()).then_some(i)
    }

    /// Number of chunks, as u32 (manifests are bounded well below u32::MAX chunks).
    pub fn chunk_count(&self) -> u32 {
        self.chunks.len() as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            format: MANIFEST_FORMAT,
            kind: ArtifactKind::Gguf,
            size: 10,
            blake3: [1; 32],
            chunks: vec![
                ChunkRef {
                    offset: 0,
                    len: 4,
                    hash: ChunkHash([2; 32]),
                },
                ChunkRef {
                    offset: 4,
                    len: 6,
                    hash: ChunkHash([3; 32]),
                },
            ],
            tensors: vec![TensorRef {
                name: "w".into(),
                ggml_type: 0,
                dims: vec![1],
                offset: 4,
                size: 4,
                first_chunk: 1,
                chunk_count: 1,
            }],
        }
    }

    /// The format-1 encoding of [`sample`] and its id, checked in: if either
    /// changes, the on-disk and wire format changed and needs a new version.
    const FIXTURE_HEX: &str = "01000a010101010101010101010101010101010101010101010101010101010101010102000402020202020202020202020202020202020202020202020202020202020202020406030303030303030303030303030303030303030303030303030303030303030301017700010104040101";
    const FIXTURE_ID: &str = "4d8f50fe33bc8c6985a6b2af09f2798535aab7c8462421bb158e58978c6c16b7";

    #[test]
    fn fixture_format_1() {
        let m = sample();
        let enc = hex::encode(m.encode());
        assert_eq!(enc, FIXTURE_HEX);
        assert_eq!(m.id().to_hex(), FIXTURE_ID);
        let bytes = hex::decode(FIXTURE_HEX).expect("hex");
        assert_eq!(Manifest::decode(&bytes).expect("decode"), m);
    }

    #[test]
    fn rejects_bad_input() {
        let m = sample();
        let mut b = m.encode();
        b.push(0);
        assert!(Manifest::decode(&b).is_err(), "trailing byte");
        let mut b = m.encode();
        b[0] = 2;
        assert_eq!(
            Manifest::decode(&b),
            Err(ManifestError::UnsupportedFormat(2))
        );
        let b = m.encode();
        for n in 0..b.len() {
            assert!(Manifest::decode(&b[..n]).is_err(), "prefix {n}");
        }
        let other = ArtifactId([9; 32]);
        assert!(matches!(
            Manifest::decode_verified(&b, &other),
            Err(ManifestError::IdMismatch { .. })
        ));
        assert_eq!(Manifest::decode_verified(&b, &m.id()).expect("ok"), m);
        let mut bad = m.clone();
        bad.chunks[1].offset = 5;
        assert!(matches!(
            Manifest::decode(&bad.encode()),
            Err(ManifestError::Invalid(_))
        ));
        let mut bad = m;
        bad.tensors[0].first_chunk = 7;
        assert!(matches!(
            Manifest::decode(&bad.encode()),
            Err(ManifestError::Invalid(_))
        ));
    }

    #[test]
    fn chunk_at() {
        let m = sample();
        assert_eq!(m.chunk_at(0), Some(0));
        assert_eq!(m.chunk_at(3), Some(0));
        assert_eq!(m.chunk_at(4), Some(1));
        assert_eq!(m.chunk_at(9), Some(1));
        assert_eq!(m.chunk_at(10), None);
    }
}
