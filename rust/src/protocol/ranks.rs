//! A set of ranks as a fixed-size bitmap.

use std::fmt;

/// Ranks `0..world` as a bitmap; every operation is bounded by `world`.
#[derive(Clone, PartialEq, Eq, Default, Hash)]
pub struct RankSet {
    world: u32,
    words: Vec<u64>,
}

impl RankSet {
    /// The empty set over `0..world`.
    pub fn new(world: u32) -> RankSet {
        RankSet {
            world,
            words: vec![0; (world as usize).div_ceil(64)],
        }
    }

    /// Every rank of `0..world`.
    pub fn full(world: u32) -> RankSet {
        let mut s = RankSet::new(world);
        for r in 0..world {
            s.insert(r);
        }
        s
    }

    pub fn world(&self) -> u32 {
        self.world
    }

    /// Adds `r`; ranks outside `0..world` are ignored. Returns true if new.
    pub fn insert(&mut self, r: u32) -> bool {
        if r >= self.world {
            return false;
        }
        let (w, b) = ((r / 64) as usize, r % 64);
        let had = self.words[w] & (1 << b) != 0;
        self.words[w] |= 1 << b;
        !had
    }

    pub fn remove(&mut self, r: u32) {
        if r < self.world {
            self.words[(r / 64) as usize] &= !(1u64 << (r % 64));
        }
    }

    pub fn contains(&self, r: u32) -> bool {
        r < self.world && self.words[(r / 64) as usize] & (1 << (r % 64)) != 0
    }

    pub fn len(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// The lowest rank in the set.
    pub fn min(&self) -> Option<u32> {
        self.words
            .iter()
            .enumerate()
            .find(|(_, &w)| w != 0)
            .map(|(i, w)| i as u32 * 64 + w.trailing_zeros())
    }

    /// Union in place (sets over different worlds: only common ranks count).
    pub fn union_with(&mut self, other: &RankSet) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
        self.clear_tail();
    }

    /// True if every rank of `other` is in `self`.
    pub fn is_superset(&self, other: &RankSet) -> bool {
        other.iter().all(|r| self.contains(r))
    }

    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.world).filter(move |&r| self.contains(r))
    }

    /// Little-endian bitmap bytes, `ceil(world / 8)` long.
    pub fn to_bytes(&self) -> Vec<u8> {
        let n = (self.world as usize).div_ceil(8);
        self.words
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .take(n)
            .collect()
    }

    /// Inverse of [`RankSet::to_bytes`]; `None` if the length is wrong or a
    /// bit beyond `world` is set.
    pub fn from_bytes(world: u32, b: &[u8]) -> Option<RankSet> {
        if b.len() != (world as usize).div_ceil(8) {
            return None;
        }
        let mut s = RankSet::new(world);
        for (i, &byte) in b.iter().enumerate() {
            for bit in 0..8 {
                if byte & (1 << bit) != 0 {
                    let r = u32::try_from(i * 8 + bit).ok()?;
                    if r >= world {
                        return None;
                    }
                    s.insert(r);
                }
            }
        }
        Some(s)
    }

    fn clear_tail(&mut self) {
        let extra = self.words.len() * 64 - self.world as usize;
        if extra > 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= u64::MAX >> extra;
            }
        }
    }
}

impl fmt::Debug for RankSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_operations_and_bytes() {
        let mut s = RankSet::new(70);
        assert!(s.is_empty() && s.min().is_none());
        assert!(s.insert(69) && !s.insert(69) && !s.insert(70));
        s.insert(3);
        assert_eq!(s.min(), Some(3));
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![3, 69]);
        let b = s.to_bytes();
        assert_eq!(b.len(), 9);
        assert_eq!(RankSet::from_bytes(70, &b), Some(s.clone()));
        assert_eq!(RankSet::from_bytes(69, &b), None);
        assert_eq!(RankSet::from_bytes(70, &b[..8]), None);
        let full = RankSet::full(70);
        assert!(full.is_superset(&s) && !s.is_superset(&full));
        assert_eq!(full.len(), 70);
        s.remove(3);
        assert_eq!(s.min(), Some(69));
    }
}
