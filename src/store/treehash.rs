//! The whole-file BLAKE3 of a download, computed from its chunks as they arrive.
//!
//! A download writes chunks in any order, at offsets that follow the file's
//! own structure (tensors, content-defined cuts), not BLAKE3's 1 KiB grid.
//! BLAKE3 is a tree over 1 KiB leaves, so the file hash can still be built
//! from pieces: the part of a chunk that covers whole leaves is hashed at
//! once, from the bytes in memory, as the largest aligned subtrees that fit
//! (their chaining values, `blake3::hazmat`); the leaf cut by a chunk
//! boundary keeps the piece it got (under 1 KiB per side) until its
//! neighbour arrives. At the end the chaining values are merged along
//! BLAKE3's tree into the root: a few thousand merges, no pass over the file.
//!
//! That is what lets the store drop a download's pages from the page cache
//! as soon as they are durable: the check at activation no longer reads the
//! file back. Each byte is still hashed twice on the way in (its chunk hash
//! and this tree), as before; what goes away is the read-back pass.
//!
//! The tracker lives in memory only. A download resumed after a restart
//! has no complete tracker, and the store falls back to hashing the file.

use blake3::hazmat::{
    ChainingValue, HasherExt, Mode, merge_subtrees_non_root, merge_subtrees_root,
};
use std::collections::{BTreeMap, HashMap, HashSet};

const LEAF: u64 = blake3::CHUNK_LEN as u64;

/// Files at most this large are not tracked: their root is a single leaf
/// (or a few), and hashing the file at the end costs nothing.
pub const MIN_TRACKED: u64 = 64 << 10;

/// Builds the BLAKE3 of a file of known size from pieces written in any order.
#[derive(Debug)]
pub struct TreeHasher {
    size: u64,
    /// Chaining values of complete subtrees, by start offset: (length, CV).
    nodes: BTreeMap<u64, (u64, ChainingValue)>,
    /// Leaves cut by a chunk boundary, by leaf index: bytes so far, filled count.
    open: HashMap<u64, OpenLeaf>,
    /// Chunks already fed (a chunk fetched twice in the endgame counts once).
    fed: HashSet<u32>,
    covered: u64,
}

#[derive(Debug)]
struct OpenLeaf {
    bytes: Box<[u8; blake3::CHUNK_LEN]>,
    filled: u64,
}

/// Chaining values of one piece, computed without holding the tracker.
#[derive(Debug, Default)]
pub struct Hashed {
    index: u32,
    nodes: Vec<(u64, u64, ChainingValue)>,
    /// Sub-leaf pieces at the edges: (file offset, bytes).
    edges: Vec<(u64, Vec<u8>)>,
    len: u64,
}

impl TreeHasher {
    /// A tracker for a file of `size` bytes; `None` when the file is too
    /// small to be worth it ([`MIN_TRACKED`]).
    pub fn new(size: u64) -> Option<Self> {
        (size > MIN_TRACKED).then(|| Self {
            size,
            nodes: BTreeMap::new(),
            open: HashMap::new(),
            fed: HashSet::new(),
            covered: 0,
        })
    }

    /// Hashes chunk `index`, `data` at `offset`, into chaining values. Pure
    /// work on the bytes, so callers run it outside any lock and then hand
    /// the result to [`TreeHasher::add`].
    pub fn hash_piece(size: u64, index: u32, offset: u64, data: &[u8]) -> Hashed {
        let end = offset + data.len() as u64;
        let mut out = Hashed {
            index,
            len: data.len() as u64,
            ..Hashed::default()
        };
        if data.is_empty() || end > size {
            return out;
        }
        // Whole leaves inside the piece: [lo, hi). The file's last leaf may
        // be short; it is whole when the piece reaches the end of the file.
        let lo = offset.div_ceil(LEAF) * LEAF;
        let hi = if end == size { end } else { end / LEAF * LEAF };
        // Sub-leaf pieces either side; with no whole leaf inside, the
        // piece splits at the one leaf boundary it may cross.
        let head_end = lo.min(end);
        let tail_start = hi.max(head_end);
        if offset < head_end {
            out.edges
                .push((offset, data[..(head_end - offset) as usize].to_vec()));
        }
        if tail_start < end {
            out.edges
                .push((tail_start, data[(tail_start - offset) as usize..].to_vec()));
        }
        let mut at = lo;
        while at < hi {
            let len = subtree_len(at, hi, size);
            let slice = &data[(at - offset) as usize..(at + len - offset) as usize];
            let cv = blake3::Hasher::new()
                .set_input_offset(at)
                .update(slice)
                .finalize_non_root();
            out.nodes.push((at, len, cv));
            at += len;
        }
        out
    }

    /// Records a hashed piece. A chunk seen before is ignored.
    pub fn add(&mut self, piece: Hashed) {
        if !self.fed.insert(piece.index) {
            return;
        }
        self.covered += piece.len;
        for (at, len, cv) in piece.nodes {
            self.nodes.insert(at, (len, cv));
        }
        for (at, bytes) in piece.edges {
            self.add_edge(at, &bytes);
        }
    }

    fn add_edge(&mut self, at: u64, bytes: &[u8]) {
        let leaf = at / LEAF;
        let start = leaf * LEAF;
        let leaf_len = LEAF.min(self.size - start);
        let o = self.open.entry(leaf).or_insert_with(|| OpenLeaf {
            bytes: Box::new([0; blake3::CHUNK_LEN]),
            filled: 0,
        });
        let from = (at - start) as usize;
        o.bytes[from..from + bytes.len()].copy_from_slice(bytes);
        o.filled += bytes.len() as u64;
        if o.filled >= leaf_len {
            let cv = blake3::Hasher::new()
                .set_input_offset(start)
                .update(&o.bytes[..leaf_len as usize])
                .finalize_non_root();
            self.open.remove(&leaf);
            self.nodes.insert(start, (leaf_len, cv));
        }
    }

    /// Bytes fed so far.
    pub fn covered(&self) -> u64 {
        self.covered
    }

    /// The file's BLAKE3, once every byte has been fed; `None` before.
    pub fn root(&self) -> Option<blake3::Hash> {
        if self.covered != self.size || !self.open.is_empty() {
            return None;
        }
        let half = blake3::hazmat::left_subtree_len(self.size);
        let left = self.node(0, half)?;
        let right = self.node(half, self.size)?;
        Some(merge_subtrees_root(&left, &right, Mode::Hash))
    }

    /// The chaining value of the tree node covering `[start, end)`.
    fn node(&self, start: u64, end: u64) -> Option<ChainingValue> {
        if let Some(&(len, cv)) = self.nodes.get(&start)
            && start + len == end
        {
            return Some(cv);
        }
        if end - start <= LEAF {
            return None;
        }
        let mid = start + blake3::hazmat::left_subtree_len(end - start);
        let left = self.node(start, mid)?;
        let right = self.node(mid, end)?;
        Some(merge_subtrees_non_root(&left, &right, Mode::Hash))
    }
}

/// The longest BLAKE3 subtree that starts at `at` (a leaf boundary) and
/// ends at or before `hi` (a leaf boundary, or the end of a `size`-byte file).
///
/// Either a power-of-two run of leaves that `at` is aligned to (a complete
/// subtree), or, at the end of the file, the rest of the file when it fits
/// in the largest subtree `at` may start (a node on the tree's right edge).
/// Never the whole file: that is the root, finalized differently.
fn subtree_len(at: u64, hi: u64, size: u64) -> u64 {
    let rest = hi - at;
    let max = blake3::hazmat::max_subtree_len(at)
        .unwrap_or_else(|| blake3::hazmat::left_subtree_len(size));
    if hi == size && rest <= max && rest < size {
        return rest;
    }
    let cap = rest.min(max);
    1u64 << (63 - cap.leading_zeros())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn data(n: usize, seed: u64) -> Vec<u8> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                s as u8
            })
            .collect()
    }

    /// Feeds `file` cut at `cuts` (sorted, inside the file), in `order`.
    fn feed(file: &[u8], cuts: &[u64], order: &[usize]) -> TreeHasher {
        let size = file.len() as u64;
        let mut bounds = vec![0];
        bounds.extend(cuts.iter().copied().filter(|&c| c > 0 && c < size));
        bounds.push(size);
        bounds.dedup();
        let pieces: Vec<(u64, u64)> = bounds.windows(2).map(|w| (w[0], w[1])).collect();
        let mut t = TreeHasher::new(size).expect("tracked");
        for &k in order {
            let (a, b) = pieces[k % pieces.len()];
            let h = TreeHasher::hash_piece(
                size,
                (k % pieces.len()) as u32,
                a,
                &file[a as usize..b as usize],
            );
            t.add(h);
        }
        for (k, &(a, b)) in pieces.iter().enumerate() {
            t.add(TreeHasher::hash_piece(
                size,
                k as u32,
                a,
                &file[a as usize..b as usize],
            ));
        }
        t
    }

    #[test]
    fn root_matches_blake3_for_awkward_sizes_and_cuts() {
        for size in [
            MIN_TRACKED + 1,
            (1 << 20) - 1,
            1 << 20,
            (1 << 20) + 1,
            (3 << 20) + 1000,
            (5 << 20) + 1024,
        ] {
            let file = data(size as usize, size);
            let want = blake3::hash(&file);
            // Aligned, unaligned, tiny and sub-leaf pieces.
            let cuts: Vec<u64> = [1, 1023, 1024, 1025, 4096, 70_000, 70_001, 300_000, 1 << 20]
                .into_iter()
                .filter(|&c| c < size)
                .chain((1..8).map(|i| size * i / 8 + 17))
                .chain([size - 1, size - 1024])
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            let order: Vec<usize> = (0..cuts.len() + 1).rev().collect();
            let t = feed(&file, &cuts, &order);
            assert_eq!(t.covered(), size);
            assert_eq!(t.root(), Some(want), "size {size}");
        }
    }

    #[test]
    fn incomplete_or_wrong_input_gives_no_match() {
        let size = (2 << 20) + 333;
        let file = data(size as usize, 9);
        let mut t = TreeHasher::new(size as u64).expect("tracked");
        let cut = 1_000_001usize;
        t.add(TreeHasher::hash_piece(size as u64, 0, 0, &file[..cut]));
        assert_eq!(t.root(), None, "half a file has no root");
        // The same chunk again (an endgame duplicate) changes nothing.
        t.add(TreeHasher::hash_piece(size as u64, 0, 0, &file[..cut]));
        assert_eq!(t.covered(), cut as u64);
        let mut bad = file[cut..].to_vec();
        bad[5] ^= 1;
        t.add(TreeHasher::hash_piece(size as u64, 1, cut as u64, &bad));
        let root = t.root().expect("complete");
        assert_ne!(
            root,
            blake3::hash(&file),
            "one flipped bit changes the root"
        );
        assert!(TreeHasher::new(MIN_TRACKED).is_none());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn any_cuts_any_order(
            size in (MIN_TRACKED + 1)..(600u64 << 10),
            cuts in proptest::collection::btree_set(1u64..(600 << 10), 0..40),
            order in proptest::collection::vec(0usize..64, 0..64),
        ) {
            let file = data(size as usize, size ^ 0x5eed);
            let cuts: Vec<u64> = cuts.into_iter().filter(|&c| c < size).collect();
            let t = feed(&file, &cuts, &order);
            prop_assert_eq!(t.root(), Some(blake3::hash(&file)));
        }
    }
}
