//! Manifests that came with release announcements, kept in memory.
//!
//! A publisher gossips a release's manifest beside the release itself
//! ([`wire::RELEASE_MANIFESTS_TOPIC`]). Every node that trusts the publisher
//! keeps the manifest here, checked against the id the release names, so on
//! a mesh where each node holds a few connections a pull starts without
//! looking for a holder of the manifest (a holder may be at its connection
//! cap), and any node can answer a neighbour's manifest request.
//!
//! Bounded by entries and bytes; the oldest go first. Nothing is written to
//! disk: after a restart a node looks for manifests as before.
//!
//! [`wire::RELEASE_MANIFESTS_TOPIC`]: super::wire::RELEASE_MANIFESTS_TOPIC

use crate::store::{ArtifactId, Manifest};
use libp2p::PeerId;
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::Arc;

/// Manifests kept at most.
pub const MAX_ENTRIES: usize = 16;
/// Encoded bytes kept at most, over all entries.
pub const MAX_BYTES: usize = 16 << 20;

/// One verified manifest: its canonical bytes and the decoded form.
#[derive(Debug)]
pub struct Cached {
    /// The canonical encoding (what a manifest request is answered with).
    pub bytes: Vec<u8>,
    /// Decoded.
    pub manifest: Manifest,
    /// Who published it (the gossip message's author): likely a holder.
    pub from: PeerId,
}

/// The cache; clone the `Arc` to share it.
#[derive(Debug, Default)]
pub struct ManifestCache {
    inner: Mutex<VecDeque<(ArtifactId, Arc<Cached>)>>,
}

impl ManifestCache {
    /// Keeps `bytes`, published by `from`, as the manifest of `id` if they
    /// verify against it; returns whether they were kept (false: they do not
    /// hash to `id`, do not decode, or are larger than the cache).
    pub fn insert_verified(&self, id: ArtifactId, bytes: Vec<u8>, from: PeerId) -> bool {
        if bytes.len() > MAX_BYTES {
            return false;
        }
        let manifest = match Manifest::decode_verified(&bytes, &id) {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(%id, error = %e, "gossiped manifest refused");
                return false;
            }
        };
        let mut q = self.inner.lock();
        if q.iter().any(|(k, _)| *k == id) {
            return true;
        }
        q.push_back((
            id,
            Arc::new(Cached {
                bytes,
                manifest,
                from,
            }),
        ));
        while q.len() > MAX_ENTRIES || total(&q) > MAX_BYTES {
            q.pop_front();
        }
        true
    }

    /// The manifest of `id`, if kept.
    pub fn get(&self, id: &ArtifactId) -> Option<Arc<Cached>> {
        self.inner
            .lock()
            .iter()
            .find(|(k, _)| k == id)
            .map(|(_, c)| c.clone())
    }

    /// Manifests kept.
    pub fn len(&self) -> usize {
        self.inner.lock().len()
    }

    /// Whether none is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn total(q: &VecDeque<(ArtifactId, Arc<Cached>)>) -> usize {
    q.iter().map(|(_, c)| c.bytes.len()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{AddOptions, Store, StoreOptions};

    fn manifest_of(dir: &std::path::Path, seed: u8) -> (ArtifactId, Vec<u8>) {
        let store = Store::open(&dir.join(format!("s{seed}")), StoreOptions::default())
            .expect("open store");
        let f = dir.join(format!("f{seed}"));
        std::fs::write(&f, vec![seed; 100_000 + usize::from(seed)]).expect("write");
        let id = store
            .add_file(&f, &AddOptions::default())
            .expect("add file");
        (
            id,
            store.manifest_bytes(&id).expect("read").expect("stored"),
        )
    }

    #[test]
    fn keeps_only_manifests_that_hash_to_their_id() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, ma) = manifest_of(dir.path(), 1);
        let (b, mb) = manifest_of(dir.path(), 2);
        let c = ManifestCache::default();
        // Another artifact's manifest under this id, and damaged bytes.
        assert!(!c.insert_verified(a, mb.clone(), PeerId::random()));
        let mut bad = ma.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(!c.insert_verified(a, bad, PeerId::random()));
        assert!(c.get(&a).is_none());
        assert!(c.insert_verified(a, ma.clone(), PeerId::random()));
        assert!(c.insert_verified(b, mb, PeerId::random()));
        let got = c.get(&a).expect("kept");
        assert_eq!(got.bytes, ma);
        assert_eq!(got.manifest.id(), a);
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn the_oldest_go_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = ManifestCache::default();
        let ids: Vec<_> = (0..=MAX_ENTRIES as u8)
            .map(|i| {
                let (id, m) = manifest_of(dir.path(), i);
                assert!(c.insert_verified(id, m, PeerId::random()));
                id
            })
            .collect();
        assert_eq!(c.len(), MAX_ENTRIES);
        assert!(c.get(&ids[0]).is_none());
        assert!(c.get(&ids[MAX_ENTRIES]).is_some());
    }
}
