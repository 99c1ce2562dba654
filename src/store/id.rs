//! Content identifiers: artifact ids and chunk hashes (both BLAKE3, 32 bytes).

use std::fmt;
use std::str::FromStr;

/// Error parsing a hex identifier.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("not a 64-digit hex id: {0:?}")]
pub struct ParseIdError(pub String);

fn parse_hex32(s: &str) -> Result<[u8; 32], ParseIdError> {
    let mut out = [0u8; 32];
    if s.len() != 64 {
        return Err(ParseIdError(s.to_owned()));
    }
    hex::decode_to_slice(s, &mut out).map_err(|_| ParseIdError(s.to_owned()))?;
    Ok(out)
}

macro_rules! hash_id {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub [u8; 32]);

        /// Hex in human-readable formats (JSON), 32 raw bytes in binary ones (postcard).
        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                if s.is_human_readable() {
                    s.serialize_str(&self.to_hex())
                } else {
                    self.0.serialize(s)
                }
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                if d.is_human_readable() {
                    let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                    s.parse().map_err(serde::de::Error::custom)
                } else {
                    <[u8; 32]>::deserialize(d).map(Self)
                }
            }
        }

        impl $name {
            /// The raw 32 bytes.
            pub fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }
            /// Lower-case hex, 64 digits.
            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }
            /// The first 12 hex digits, for logs and tables.
            pub fn short(&self) -> String {
                hex::encode(&self.0[..6])
            }
            /// Builds from a 32-byte slice.
            pub fn from_slice(b: &[u8]) -> Option<Self> {
                <[u8; 32]>::try_from(b).ok().map(Self)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.short())
            }
        }

        impl FromStr for $name {
            type Err = ParseIdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                parse_hex32(s).map(Self)
            }
        }

        impl From<blake3::Hash> for $name {
            fn from(h: blake3::Hash) -> Self {
                Self(*h.as_bytes())
            }
        }
    };
}

hash_id!(
    /// An artifact's id: the BLAKE3 of its canonical manifest encoding.
    /// Self-certifying: whoever holds the id can check any manifest offered for it.
    ArtifactId
);
hash_id!(
    /// The BLAKE3 of one chunk's bytes.
    ChunkHash
);

impl ChunkHash {
    /// Hashes a chunk body.
    pub fn of(data: &[u8]) -> Self {
        blake3::hash(data).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let id = ArtifactId([7; 32]);
        let s = id.to_string();
        assert_eq!(s.len(), 64);
        assert_eq!(s.parse::<ArtifactId>(), Ok(id));
        assert!("xyz".parse::<ArtifactId>().is_err());
        assert!("zz".repeat(32).parse::<ArtifactId>().is_err());
        let j = serde_json::to_string(&id).expect("json");
        assert_eq!(j, format!("\"{s}\""));
        assert_eq!(serde_json::from_str::<ArtifactId>(&j).expect("back"), id);
        let b = postcard::to_stdvec(&id).expect("postcard");
        assert_eq!(b, [7u8; 32]);
    }
}
