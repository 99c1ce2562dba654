//! The RAM tier: a byte-budget LRU ([`crate::lru::Lru`]) with a TTL. It holds
//! KV blobs and decoded storage blocks (ready to share into a cache with
//! no copy), both counted against the one budget.

use super::BlockKey;
use crate::inference::SharedBlock;
use crate::lru::Lru;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Clone)]
enum Val {
    Blob(Arc<Vec<u8>>),
    /// A decoded storage block and the id of the model that computed it.
    Decoded(SharedBlock, [u8; 32]),
}

impl Val {
    fn size(&self) -> u64 {
        match self {
            Val::Blob(b) => b.len() as u64,
            Val::Decoded(d, _) => d.bytes() as u64,
        }
    }
}

/// What one RAM entry holds, as shown to [`RamTier::remove_if`].
#[derive(Debug, Clone, Copy)]
pub enum RamEntry<'a> {
    /// A KV blob or a tail record.
    Blob(&'a [u8]),
    /// A decoded storage block computed by this model.
    Decoded {
        /// The model id it was stored under.
        model: &'a [u8; 32],
    },
}

struct Entry {
    val: Val,
    stored: Instant,
}

/// Blocks in memory. The sum of the stored blobs' lengths never exceeds the
/// budget: inserting evicts least recently used blocks first, and a block
/// larger than the whole budget is not stored.
pub struct RamTier {
    ttl: Duration,
    lru: Lru<BlockKey, Entry>,
}

impl std::fmt::Debug for RamTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RamTier")
            .field("budget", &self.lru.budget())
            .field("used", &self.lru.used())
            .field("blocks", &self.lru.len())
            .finish()
    }
}

impl RamTier {
    /// An empty tier.
    pub fn new(budget: u64, ttl: Duration) -> RamTier {
        RamTier {
            ttl,
            lru: Lru::new(budget),
        }
    }

    /// Bytes held.
    pub fn used(&self) -> u64 {
        self.lru.used()
    }

    /// The byte budget.
    pub fn budget(&self) -> u64 {
        self.lru.budget()
    }

    /// Blocks held.
    pub fn len(&self) -> usize {
        self.lru.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.lru.is_empty()
    }

    /// True if the block is held and not expired.
    pub fn contains(&self, key: &BlockKey) -> bool {
        self.lru
            .peek(key)
            .is_some_and(|e| e.stored.elapsed() <= self.ttl)
    }

    /// The blob, marking it recently used; expired blocks are dropped.
    pub fn get(&mut self, key: &BlockKey) -> Option<Arc<Vec<u8>>> {
        match self.get_val(key)? {
            Val::Blob(b) => Some(b),
            Val::Decoded(..) => None,
        }
    }

    /// The decoded block, marking it recently used; expired ones are dropped.
    pub fn get_decoded(&mut self, key: &BlockKey) -> Option<SharedBlock> {
        match self.get_val(key)? {
            Val::Decoded(d, _) => Some(d),
            Val::Blob(_) => None,
        }
    }

    fn get_val(&mut self, key: &BlockKey) -> Option<Val> {
        let expired = self.lru.peek(key)?.stored.elapsed() > self.ttl;
        if expired {
            self.remove(key);
            return None;
        }
        self.lru.get(key).map(|e| e.val.clone())
    }

    /// Stores a block, evicting expired then least recently used blocks
    /// until it fits. Returns false if it is larger than the budget.
    pub fn insert(&mut self, key: BlockKey, blob: Arc<Vec<u8>>) -> bool {
        self.insert_val(key, Val::Blob(blob))
    }

    /// Stores a decoded block computed by `model`, like [`RamTier::insert`].
    pub fn insert_decoded(&mut self, key: BlockKey, block: SharedBlock, model: [u8; 32]) -> bool {
        self.insert_val(key, Val::Decoded(block, model))
    }

    /// Drops every entry (expired or not) for which `f` is true; returns
    /// their keys.
    pub fn remove_if(
        &mut self,
        mut f: impl FnMut(&BlockKey, RamEntry<'_>) -> bool,
    ) -> Vec<BlockKey> {
        self.lru
            .remove_if(|k, e| {
                f(
                    k,
                    match &e.val {
                        Val::Blob(b) => RamEntry::Blob(b),
                        Val::Decoded(_, m) => RamEntry::Decoded { model: m },
                    },
                )
            })
            .into_iter()
            .map(|(k, _)| k)
            .collect()
    }

    fn insert_val(&mut self, key: BlockKey, val: Val) -> bool {
        let size = val.size();
        self.remove(&key);
        if size > self.lru.budget() {
            return false;
        }
        self.expire();
        let entry = Entry {
            val,
            stored: Instant::now(),
        };
        self.lru.insert(key, entry, size).is_ok()
    }

    /// Drops a block.
    pub fn remove(&mut self, key: &BlockKey) {
        self.lru.remove(key);
    }

    fn expire(&mut self) {
        let ttl = self.ttl;
        self.lru.remove_if(|_, e| e.stored.elapsed() > ttl);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(i: u8) -> BlockKey {
        BlockKey([i; 32])
    }

    #[test]
    fn lru_respects_budget_and_recency() {
        let mut r = RamTier::new(100, Duration::from_secs(60));
        assert!(r.insert(k(1), Arc::new(vec![0; 40])));
        assert!(r.insert(k(2), Arc::new(vec![0; 40])));
        assert!(r.get(&k(1)).is_some()); // 2 is now the LRU
        assert!(r.insert(k(3), Arc::new(vec![0; 40])));
        assert!(r.used() <= 100);
        assert!(r.contains(&k(1)) && r.contains(&k(3)) && !r.contains(&k(2)));
        assert!(
            !r.insert(k(4), Arc::new(vec![0; 101])),
            "larger than the budget"
        );
        assert!(r.used() <= 100);
        // Re-inserting the same key does not double count.
        assert!(r.insert(k(1), Arc::new(vec![0; 10])));
        assert_eq!(r.used(), 50);
    }

    #[test]
    fn ttl_expires() {
        let mut r = RamTier::new(100, Duration::ZERO);
        r.insert(k(1), Arc::new(vec![0; 10]));
        std::thread::sleep(Duration::from_millis(2));
        assert!(r.get(&k(1)).is_none());
        assert_eq!(r.used(), 0);
    }

    proptest::proptest! {
        #[test]
        fn never_over_budget(ops in proptest::collection::vec((0u8..16, 0usize..60, proptest::bool::ANY), 1..200)) {
            let mut r = RamTier::new(128, Duration::from_secs(60));
            for (key, size, get) in ops {
                if get { r.get(&k(key)); } else { r.insert(k(key), Arc::new(vec![0; size])); }
                proptest::prop_assert!(r.used() <= 128);
                let sum: u64 = r.lru.iter().map(|(_, e, _)| e.val.size()).sum();
                proptest::prop_assert_eq!(sum, r.used());
            }
        }
    }
}
