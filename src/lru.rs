//! A byte-budget LRU map: the one eviction policy behind the KV cache's RAM
//! tier and disk index ([`crate::kvcache`]) and the response cache
//! ([`crate::respcache`]).
//!
//! Each entry carries a size given by the caller; the sum of the sizes
//! never exceeds the budget. Inserting evicts least recently used entries
//! until the new one fits, and an entry larger than the whole budget is not
//! stored. Reading with [`Lru::get`] marks an entry recently used;
//! [`Lru::peek`] and [`Lru::contains`] do not. Time-to-live and side effects
//! of eviction (deleting a file) are the caller's: evicted entries are
//! handed back. A leaf module: it imports nothing from the crate.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;

struct Slot<V> {
    value: V,
    size: u64,
    tick: u64,
}

/// A map bounded by the sum of its entries' sizes, evicting least recently
/// used entries first.
pub struct Lru<K, V> {
    budget: u64,
    used: u64,
    tick: u64,
    map: HashMap<K, Slot<V>>,
    /// Recency order: tick of last use -> key (oldest first).
    order: BTreeMap<u64, K>,
}

impl<K, V> std::fmt::Debug for Lru<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lru")
            .field("budget", &self.budget)
            .field("used", &self.used)
            .field("entries", &self.map.len())
            .finish()
    }
}

impl<K: Hash + Eq + Clone, V> Lru<K, V> {
    /// An empty map holding at most `budget` bytes.
    pub fn new(budget: u64) -> Lru<K, V> {
        Lru {
            budget,
            used: 0,
            tick: 0,
            map: HashMap::new(),
            order: BTreeMap::new(),
        }
    }

    /// The byte budget.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Bytes held (the sum of the entries' sizes).
    pub fn used(&self) -> u64 {
        self.used
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// True if `key` is held (its recency is not changed).
    pub fn contains(&self, key: &K) -> bool {
        self.map.contains_key(key)
    }

    /// The value under `key`, without marking it used.
    pub fn peek(&self, key: &K) -> Option<&V> {
        self.map.get(key).map(|s| &s.value)
    }

    /// The value under `key`, marking it most recently used.
    pub fn get(&mut self, key: &K) -> Option<&V> {
        self.tick += 1;
        let tick = self.tick;
        let slot = self.map.get_mut(key)?;
        self.order.remove(&slot.tick);
        slot.tick = tick;
        self.order.insert(tick, key.clone());
        Some(&slot.value)
    }

    /// Stores `value` of `size` bytes under `key` as the most recently used
    /// entry, replacing what was there, and evicts least recently used
    /// entries until it fits. Returns the evicted entries (oldest first),
    /// or `Err(value)` when `size` exceeds the whole budget: nothing is
    /// stored then (and the old entry under `key`, if any, is gone).
    pub fn insert(&mut self, key: K, value: V, size: u64) -> Result<Vec<(K, V)>, V> {
        self.remove(&key);
        if size > self.budget {
            return Err(value);
        }
        let evicted = self.evict_to(self.budget - size);
        self.tick += 1;
        self.order.insert(self.tick, key.clone());
        self.map.insert(
            key,
            Slot {
                value,
                size,
                tick: self.tick,
            },
        );
        self.used += size;
        Ok(evicted)
    }

    /// Removes the entry under `key`.
    pub fn remove(&mut self, key: &K) -> Option<V> {
        let slot = self.map.remove(key)?;
        self.order.remove(&slot.tick);
        self.used -= slot.size;
        Some(slot.value)
    }

    /// Removes the least recently used entry.
    pub fn pop_lru(&mut self) -> Option<(K, V)> {
        let (_, key) = self.order.pop_first()?;
        let slot = self.map.remove(&key)?;
        self.used -= slot.size;
        Some((key, slot.value))
    }

    /// Evicts least recently used entries until at most `target` bytes are
    /// held; returns them, oldest first.
    pub fn evict_to(&mut self, target: u64) -> Vec<(K, V)> {
        let mut out = Vec::new();
        while self.used > target {
            let Some(e) = self.pop_lru() else {
                break;
            };
            out.push(e);
        }
        out
    }

    /// Removes every entry for which `f` is true; returns them (in no
    /// particular order).
    pub fn remove_if(&mut self, mut f: impl FnMut(&K, &V) -> bool) -> Vec<(K, V)> {
        let dead: Vec<K> = self
            .map
            .iter()
            .filter(|(k, s)| f(k, &s.value))
            .map(|(k, _)| k.clone())
            .collect();
        dead.into_iter()
            .filter_map(|k| self.remove(&k).map(|v| (k, v)))
            .collect()
    }

    /// Every entry with its size, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V, u64)> {
        self.map.iter().map(|(k, s)| (k, &s.value, s.size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(l: &Lru<u8, &'static str>) -> Vec<u8> {
        let mut v: Vec<u8> = l.iter().map(|(k, _, _)| *k).collect();
        v.sort();
        v
    }

    #[test]
    fn budget_is_never_exceeded() {
        let mut l = Lru::new(100);
        for i in 0..10u8 {
            l.insert(i, "x", 30).expect("fits");
            assert!(l.used() <= 100);
        }
        assert_eq!(l.len(), 3);
        assert_eq!(l.used(), 90);
        assert_eq!(keys(&l), vec![7, 8, 9], "the newest stay");
    }

    #[test]
    fn eviction_follows_recency_not_insertion() {
        let mut l = Lru::new(100);
        l.insert(1, "a", 40).expect("fits");
        l.insert(2, "b", 40).expect("fits");
        assert_eq!(l.get(&1), Some(&"a")); // 2 is now the least recently used
        let gone = l.insert(3, "c", 40).expect("fits");
        assert_eq!(gone, vec![(2, "b")]);
        assert_eq!(keys(&l), vec![1, 3]);
        // peek and contains do not change the order.
        assert!(l.contains(&1) && l.peek(&1).is_some());
        let gone = l.insert(4, "d", 40).expect("fits");
        assert_eq!(gone, vec![(1, "a")]);
        assert_eq!(l.pop_lru(), Some((3, "c")));
    }

    #[test]
    fn replace_counts_the_new_size_once() {
        let mut l = Lru::new(100);
        l.insert(1, "a", 40).expect("fits");
        l.insert(2, "b", 40).expect("fits");
        let gone = l.insert(1, "A", 10).expect("fits");
        assert!(gone.is_empty());
        assert_eq!(l.used(), 50);
        assert_eq!(l.len(), 2);
        assert_eq!(l.peek(&1), Some(&"A"));
        // The replaced entry is the most recent: 2 goes first.
        let gone = l.insert(3, "c", 60).expect("fits");
        assert_eq!(gone, vec![(2, "b")]);
    }

    #[test]
    fn remove_and_remove_if() {
        let mut l = Lru::new(100);
        for i in 0..5u8 {
            l.insert(i, "x", 10).expect("fits");
        }
        assert_eq!(l.remove(&2), Some("x"));
        assert_eq!(l.remove(&2), None);
        assert_eq!(l.used(), 40);
        let mut gone: Vec<u8> = l
            .remove_if(|k, _| k % 2 == 1)
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        gone.sort();
        assert_eq!(gone, vec![1, 3]);
        assert_eq!(keys(&l), vec![0, 4]);
        assert_eq!(l.used(), 20);
        assert_eq!(l.evict_to(10), vec![(0, "x")]);
        assert_eq!(l.used(), 10);
    }

    #[test]
    fn an_entry_over_the_budget_is_refused_and_evicts_nothing() {
        let mut l = Lru::new(100);
        l.insert(1, "a", 60).expect("fits");
        assert_eq!(l.insert(2, "big", 101), Err("big"));
        assert_eq!(keys(&l), vec![1], "nothing evicted for it");
        assert_eq!(l.used(), 60);
        // Replacing a key with an oversized value drops the old one.
        assert_eq!(l.insert(1, "big", 101), Err("big"));
        assert!(l.is_empty());
        assert_eq!(l.used(), 0);
        // Exactly the budget fits.
        assert!(l.insert(3, "c", 100).is_ok());
        assert_eq!(l.used(), 100);
    }

    proptest::proptest! {
        #[test]
        fn used_is_the_sum_of_sizes(ops in proptest::collection::vec((0u8..16, 0u64..60, 0u8..3), 1..200)) {
            let mut l: Lru<u8, ()> = Lru::new(128);
            for (key, size, op) in ops {
                match op {
                    0 => { let _ = l.insert(key, (), size); }
                    1 => { l.get(&key); }
                    _ => { l.remove(&key); }
                }
                proptest::prop_assert!(l.used() <= 128);
                let sum: u64 = l.iter().map(|(_, _, s)| s).sum();
                proptest::prop_assert_eq!(sum, l.used());
                proptest::prop_assert_eq!(l.map.len(), l.order.len());
            }
        }
    }
}
