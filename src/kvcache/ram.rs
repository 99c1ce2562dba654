//! The RAM tier: a size-aware LRU with a byte budget and a TTL. It holds
//! KV blobs and decoded storage blocks (ready to share into a cache with
//! no copy), both counted against the one budget.

use super::BlockKey;
use crate::inference::SharedBlock;
use std::collections::{BTreeMap, HashMap};
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
    tick: u64,
}

/// Blocks in memory. The sum of the stored blobs' lengths never exceeds the
/// budget: inserting evicts least recently used blocks first, and a block
/// larger than the whole budget is not stored.
pub struct RamTier {
    budget: u64,
    ttl: Duration,
    used: u64,
    tick: u64,
    map: HashMap<BlockKey, Entry>,
    lru: BTreeMap<u64, BlockKey>,
}

impl std::fmt::Debug for RamTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RamTier")
            .field("budget", &self.budget)
            .field("used", &self.used)
            .field("blocks", &self.map.len())
            .finish()
    }
}

impl RamTier {
    /// An empty tier.
    pub fn new(budget: u64, ttl: Duration) -> RamTier {
        RamTier {
            budget,
            ttl,
            used: 0,
            tick: 0,
            map: HashMap::new(),
            lru: BTreeMap::new(),
        }
    }

    /// Bytes held.
    pub fn used(&self) -> u64 {
        self.used
    }

    /// The byte budget.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Blocks held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// True if the block is held and not expired.
    pub fn contains(&self, key: &BlockKey) -> bool {
        self.map
            .get(key)
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
        let expired = self.map.get(key)?.stored.elapsed() > self.ttl;
        if expired {
            self.remove(key);
            return None;
        }
        self.tick += 1;
        let tick = self.tick;
        let e = self.map.get_mut(key)?;
        self.lru.remove(&e.tick);
        e.tick = tick;
        self.lru.insert(tick, *key);
        Some(e.val.clone())
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
        let dead: Vec<BlockKey> = self
            .map
            .iter()
            .filter(|(k, e)| {
                f(
                    k,
                    match &e.val {
                        Val::Blob(b) => RamEntry::Blob(b),
                        Val::Decoded(_, m) => RamEntry::Decoded { model: m },
                    },
                )
            })
            .map(|(k, _)| *k)
            .collect();
        for k in &dead {
            self.remove(k);
        }
        dead
    }

    fn insert_val(&mut self, key: BlockKey, val: Val) -> bool {
        let size = val.size();
        self.remove(&key);
        if size > self.budget {
            return false;
        }
        self.expire();
        while self.used + size > self.budget {
            let Some((_, old)) = self.lru.pop_first() else {
                break;
            };
            if let Some(e) = self.map.remove(&old) {
                self.used -= e.val.size();
            }
        }
        self.tick += 1;
        self.lru.insert(self.tick, key);
        self.map.insert(
            key,
            Entry {
                val,
                stored: Instant::now(),
                tick: self.tick,
            },
        );
        self.used += size;
        true
    }

    /// Drops a block.
    pub fn remove(&mut self, key: &BlockKey) {
        if let Some(e) = self.map.remove(key) {
            self.lru.remove(&e.tick);
            self.used -= e.val.size();
        }
    }

    fn expire(&mut self) {
        let ttl = self.ttl;
        let dead: Vec<BlockKey> = self
            .map
            .iter()
            .filter(|(_, e)| e.stored.elapsed() > ttl)
            .map(|(k, _)| *k)
            .collect();
        for k in dead {
            self.remove(&k);
        }
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
                let sum: u64 = r.map.values().map(|e| e.val.size()).sum();
                proptest::prop_assert_eq!(sum, r.used());
                proptest::prop_assert_eq!(r.map.len(), r.lru.len());
            }
        }
    }
}
