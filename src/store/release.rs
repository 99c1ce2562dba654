//! Signed releases: a publisher's ed25519 signature binding a name to an artifact id.
//!
//! Fetching by id needs no trust (ids are self-certifying). Resolving a name
//! does: a node only follows a release signed by a key in its trust store,
//! and a release with a higher sequence number replaces the one it has.

use super::id::ArtifactId;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

/// The release format this build writes and reads.
pub const RELEASE_FORMAT: u16 = 1;
/// Domain separation for release signatures.
const SIGNING_CONTEXT: &[u8] = b"shoal-release-v1\0";
/// Longest name accepted.
pub const MAX_NAME: usize = 128;

/// Errors from release handling.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReleaseError {
    /// The bytes are not a release.
    #[error("release does not decode: {0}")]
    Decode(String),
    /// Written by a release format this build does not read.
    #[error("release format {0} is not supported (this build reads format {RELEASE_FORMAT})")]
    UnsupportedFormat(u16),
    /// The signature does not verify under the embedded key.
    #[error("release signature is invalid")]
    BadSignature,
    /// The embedded public key is not a valid ed25519 point.
    #[error("release publisher key is invalid")]
    BadKey,
    /// The name is not of the form `name[:tag]` in `[a-z0-9._-]`.
    #[error(
        "invalid release name {0:?}: use lower-case letters, digits, '.', '_', '-', and one optional ':tag'"
    )]
    BadName(String),
}

/// What a release says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    /// Format version.
    pub format: u16,
    /// The name, e.g. `smollm2-135m-instruct:q4_1`.
    pub name: String,
    /// The artifact it names.
    pub id: ArtifactId,
    /// Sequence number: a higher one replaces a lower one.
    pub seq: u64,
    /// Optional origin URL to fetch chunks from when no peer has them.
    pub origin: Option<String>,
    /// Unix seconds at signing (informational).
    pub created: u64,
}

/// A release with its publisher's key and signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedRelease {
    /// Format version.
    pub format: u16,
    /// Canonical encoding of the [`Release`].
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
    /// Publisher's ed25519 public key.
    pub publisher: [u8; 32],
    /// Signature over the signing context and `body`.
    pub signature: serde_bytes::ByteArray<64>,
}

/// Checks a release name.
pub fn check_name(name: &str) -> Result<(), ReleaseError> {
    let ok_part = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
    };
    let valid = name.len() <= MAX_NAME
        && match name.split_once(':') {
            Some((a, b)) => ok_part(a) && ok_part(b),
            None => ok_part(name),
        };
    if valid {
        Ok(())
    } else {
        Err(ReleaseError::BadName(name.to_owned()))
    }
}

impl SignedRelease {
    /// Signs a release.
    pub fn sign(release: &Release, key: &SigningKey) -> Result<Self, ReleaseError> {
        check_name(&release.name)?;
        let body = postcard::to_stdvec(release).map_err(|e| ReleaseError::Decode(e.to_string()))?;
        let msg = [SIGNING_CONTEXT, &body].concat();
        let sig = key.sign(&msg);
        Ok(Self {
            format: RELEASE_FORMAT,
            body,
            publisher: key.verifying_key().to_bytes(),
            signature: serde_bytes::ByteArray::new(sig.to_bytes()),
        })
    }

    /// Checks the signature under the embedded key and decodes the release.
    /// Says nothing about whether the key is trusted: that is the store's job.
    pub fn verify(&self) -> Result<Release, ReleaseError> {
        if self.format != RELEASE_FORMAT {
            return Err(ReleaseError::UnsupportedFormat(self.format));
        }
        let key = VerifyingKey::from_bytes(&self.publisher).map_err(|_| ReleaseError::BadKey)?;
        let msg = [SIGNING_CONTEXT, &self.body].concat();
        let sig = Signature::from_bytes(&self.signature);
        key.verify_strict(&msg, &sig)
            .map_err(|_| ReleaseError::BadSignature)?;
        let r: Release =
            postcard::from_bytes(&self.body).map_err(|e| ReleaseError::Decode(e.to_string()))?;
        if r.format != RELEASE_FORMAT {
            return Err(ReleaseError::UnsupportedFormat(r.format));
        }
        check_name(&r.name)?;
        Ok(r)
    }

    /// Canonical encoding for the wire and disk.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).unwrap_or_default()
    }

    /// Decodes [`SignedRelease::encode`] (does not verify).
    pub fn decode(b: &[u8]) -> Result<Self, ReleaseError> {
        let (format, _) =
            postcard::take_from_bytes::<u16>(b).map_err(|e| ReleaseError::Decode(e.to_string()))?;
        if format != RELEASE_FORMAT {
            return Err(ReleaseError::UnsupportedFormat(format));
        }
        let (s, rest): (SignedRelease, _) =
            postcard::take_from_bytes(b).map_err(|e| ReleaseError::Decode(e.to_string()))?;
        if !rest.is_empty() {
            return Err(ReleaseError::Decode("trailing bytes".into()));
        }
        Ok(s)
    }

    /// Publisher key as hex.
    pub fn publisher_hex(&self) -> String {
        hex::encode(self.publisher)
    }
}

/// Generates a fresh ed25519 signing key from the OS RNG.
pub fn generate_key() -> Result<SigningKey, std::io::Error> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Parses a public key given as 64 hex digits.
pub fn parse_public_key(s: &str) -> Result<[u8; 32], ReleaseError> {
    let mut k = [0u8; 32];
    hex::decode_to_slice(s.trim(), &mut k).map_err(|_| ReleaseError::BadKey)?;
    VerifyingKey::from_bytes(&k).map_err(|_| ReleaseError::BadKey)?;
    Ok(k)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(seq: u64) -> Release {
        Release {
            format: RELEASE_FORMAT,
            name: "smollm2-135m-instruct:q4_1".into(),
            id: ArtifactId([4; 32]),
            seq,
            origin: None,
            created: 0,
        }
    }

    #[test]
    fn sign_verify_and_forgeries() {
        let k = SigningKey::from_bytes(&[1; 32]);
        let s = SignedRelease::sign(&rel(3), &k).expect("sign");
        assert_eq!(s.verify().expect("verify"), rel(3));
        let back = SignedRelease::decode(&s.encode()).expect("decode");
        assert_eq!(back, s);
        // Tampered body: signature fails.
        let mut t = s.clone();
        let r4 = postcard::to_stdvec(&rel(4)).expect("enc");
        t.body = r4;
        assert_eq!(t.verify(), Err(ReleaseError::BadSignature));
        // Someone else's key on our signature.
        let mut t = s.clone();
        t.publisher = SigningKey::from_bytes(&[2; 32]).verifying_key().to_bytes();
        assert_eq!(t.verify(), Err(ReleaseError::BadSignature));
        // Zeroed signature ("unsigned").
        let mut t = s;
        t.signature = serde_bytes::ByteArray::new([0; 64]);
        assert!(t.verify().is_err());
    }

    #[test]
    fn names() {
        for ok in ["a", "smollm2-135m-instruct:q4_1", "x.y_z:v2"] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "A", "a:b:c", "a b", ":x", "x:", &"a".repeat(200)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    /// The format-1 encoding of a release signed by a fixed key: a change here
    /// is a wire/disk format change.
    #[test]
    fn fixture_format_1() {
        let k = SigningKey::from_bytes(&[1; 32]);
        let s = SignedRelease::sign(&rel(3), &k).expect("sign");
        let enc = hex::encode(s.encode());
        assert_eq!(
            blake3::hash(enc.as_bytes()).to_hex().as_str(),
            RELEASE_FIXTURE_HASH
        );
        let decoded = SignedRelease::decode(&s.encode()).expect("decode");
        assert_eq!(decoded.verify().expect("verify").seq, 3);
    }
    const RELEASE_FIXTURE_HASH: &str =
        "499be42ac8d46c1f37ee17219dc20a8247f532f479720efbf10f3f8519c8006c";
}
