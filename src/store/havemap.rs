//! Which chunks of an artifact a node holds: a plain bitset.

use serde::{Deserialize, Serialize};

/// A bitset over an artifact's chunk indexes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HaveMap {
    len: u32,
    #[serde(with = "serde_bytes")]
    bits: Vec<u8>,
}

impl HaveMap {
    /// An empty map for `len` chunks.
    pub fn new(len: u32) -> Self {
        Self {
            len,
            bits: vec![0; (len as usize).div_ceil(8)],
        }
    }
    /// A full map for `len` chunks.
    pub fn full(len: u32) -> Self {
        let mut m = Self::new(len);
        for i in 0..len {
            m.set(i);
        }
        m
    }
    /// Number of chunks the map covers.
    pub fn len(&self) -> u32 {
        self.len
    }
    /// True when the map covers no chunk.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Whether chunk `i` is present.
    pub fn get(&self, i: u32) -> bool {
        i < self.len && self.bits[(i / 8) as usize] & (1 << (i % 8)) != 0
    }
    /// Marks chunk `i` present (ignored when out of range).
    pub fn set(&mut self, i: u32) {
        if i < self.len {
            self.bits[(i / 8) as usize] |= 1 << (i % 8);
        }
    }
    /// Marks chunk `i` absent.
    pub fn clear(&mut self, i: u32) {
        if i < self.len {
            self.bits[(i / 8) as usize] &= !(1 << (i % 8));
        }
    }
    /// Number of chunks present.
    pub fn count(&self) -> u32 {
        self.bits.iter().map(|b| b.count_ones()).sum()
    }
    /// True when every chunk is present.
    pub fn is_complete(&self) -> bool {
        self.count() == self.len
    }
    /// Indexes of chunks not present.
    pub fn missing(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.len).filter(|&i| !self.get(i))
    }
    /// Indexes of chunks present.
    pub fn present(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.len).filter(|&i| self.get(i))
    }
    /// Indexes present here and absent from `other`, in order, a byte of
    /// the maps at a time (the downloader's scan: what a source has that
    /// this node lacks). Bits past `other`'s end count as absent.
    pub fn present_not_in<'a>(&'a self, other: &'a HaveMap) -> impl Iterator<Item = u32> + 'a {
        let theirs = other.bits.iter().copied().chain(std::iter::repeat(0));
        self.bits
            .iter()
            .zip(theirs)
            .enumerate()
            .flat_map(|(at, (mine, theirs))| {
                let mut m = mine & !theirs;
                std::iter::from_fn(move || {
                    (m != 0).then(|| {
                        let bit = m.trailing_zeros();
                        m &= m - 1;
                        at as u32 * 8 + bit
                    })
                })
            })
            .filter(move |&i| i < self.len)
    }
    /// Compact encoding (postcard).
    pub fn to_bytes(&self) -> Vec<u8> {
        postcard::to_stdvec(self).unwrap_or_default()
    }
    /// Decodes [`HaveMap::to_bytes`]; `None` when malformed.
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        let m: HaveMap = postcard::from_bytes(b).ok()?;
        if m.bits.len() != (m.len as usize).div_ceil(8) {
            return None;
        }
        // No bit past the end: `count` would count it.
        let tail = m.len % 8;
        match m.bits.last() {
            Some(&last) if tail != 0 && last >> tail != 0 => None,
            _ => Some(m),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits() {
        let mut m = HaveMap::new(13);
        assert_eq!(m.count(), 0);
        m.set(0);
        m.set(12);
        m.set(99);
        assert!(m.get(0) && m.get(12) && !m.get(5) && !m.get(99));
        assert_eq!(m.count(), 2);
        assert_eq!(m.missing().count(), 11);
        let back = HaveMap::from_bytes(&m.to_bytes()).expect("decode");
        assert_eq!(back, m);
        m.clear(0);
        assert_eq!(m.count(), 1);
        assert!(HaveMap::full(9).is_complete());
        assert!(HaveMap::from_bytes(&[5, 0]).is_none());
        // A bit past the end is malformed (len 3, bits 0b1000).
        assert!(HaveMap::from_bytes(&[3, 1, 0b1000]).is_none());
        assert!(HaveMap::from_bytes(&[3, 1, 0b0111]).is_some());
    }

    #[test]
    fn present_not_in_is_the_difference() {
        let (mut a, mut b) = (HaveMap::new(21), HaveMap::new(21));
        for i in [0, 3, 7, 8, 15, 16, 20] {
            a.set(i);
        }
        for i in [3, 8, 9, 20] {
            b.set(i);
        }
        let got: Vec<u32> = a.present_not_in(&b).collect();
        assert_eq!(got, vec![0, 7, 15, 16]);
        let want: Vec<u32> = a.present().filter(|&i| !b.get(i)).collect();
        assert_eq!(got, want);
        assert_eq!(HaveMap::full(21).present_not_in(&a).count(), 14);
        assert_eq!(a.present_not_in(&HaveMap::new(0)).count(), 7);
    }
}
