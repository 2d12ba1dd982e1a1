//! Open-addressing hash tables keyed by cluster or slice numbers, sized by what they
//! hold rather than by the key space an image header describes.
//!
//! A direct index (one entry per possible key) costs memory in proportion to the
//! image's virtual size or refcount table, which a 6 MB hostile image can make a
//! petabyte; these tables cost in proportion to their contents. Linear probing with a
//! multiplicative hash; deletion shifts later entries back, so there are no
//! tombstones and a lookup stops at the first empty slot. Neither table allocates
//! after it is built, except [`ClusterSet`] when it grows (a metadata structure was
//! added: never on the data path).

/// Marks an empty slot (no key is `u64::MAX`: keys are cluster or slice numbers).
const EMPTY: u64 = u64::MAX;

fn slot_of(key: u64, mask: usize) -> usize {
    // Fibonacci hashing: neighbouring keys spread over the table.
    (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize & mask
}

/// A fixed-capacity map from key to slot number (a metadata cache's index).
pub(crate) struct HashIndex {
    keys: Box<[u64]>,
    vals: Box<[u32]>,
    mask: usize,
    len: usize,
}

impl HashIndex {
    /// A map for at most `max_len` keys (its table is twice that, rounded up).
    pub(crate) fn new(max_len: usize) -> Self {
        let size = (max_len.max(1) * 2).next_power_of_two();
        HashIndex {
            keys: vec![EMPTY; size].into_boxed_slice(),
            vals: vec![0; size].into_boxed_slice(),
            mask: size - 1,
            len: 0,
        }
    }

    fn find(&self, key: u64) -> Result<usize, usize> {
        let mut i = slot_of(key, self.mask);
        loop {
            match self.keys[i] {
                k if k == key => return Ok(i),
                EMPTY => return Err(i),
                _ => i = (i + 1) & self.mask,
            }
        }
    }

    pub(crate) fn get(&self, key: u64) -> Option<u32> {
        self.find(key).ok().map(|i| self.vals[i])
    }

    /// Maps `key` to `val`, replacing any earlier value.
    pub(crate) fn insert(&mut self, key: u64, val: u32) {
        assert!(key != EMPTY, "key {key:#x} is reserved");
        match self.find(key) {
            Ok(i) => self.vals[i] = val,
            Err(i) => {
                assert!(self.len < self.keys.len() / 2, "hash index over capacity");
                self.keys[i] = key;
                self.vals[i] = val;
                self.len += 1;
            }
        }
    }

    /// Removes `key` if present.
    pub(crate) fn remove(&mut self, key: u64) {
        let Ok(mut hole) = self.find(key) else { return };
        self.len -= 1;
        // Backward-shift deletion: move later entries of the probe run into the hole
        // when the hole lies between their home slot and where they sit.
        let mut i = hole;
        loop {
            i = (i + 1) & self.mask;
            let k = self.keys[i];
            if k == EMPTY {
                break;
            }
            let home = slot_of(k, self.mask);
            let dist_here = i.wrapping_sub(home) & self.mask;
            let dist_hole = hole.wrapping_sub(home) & self.mask;
            if dist_hole < dist_here {
                self.keys[hole] = k;
                self.vals[hole] = self.vals[i];
                hole = i;
            }
        }
        self.keys[hole] = EMPTY;
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

/// A set of cluster numbers that grows with its contents (the metadata map).
#[derive(Default)]
pub(crate) struct ClusterSet {
    map: Option<HashIndex>,
}

impl ClusterSet {
    pub(crate) fn contains(&self, c: u64) -> bool {
        self.map.as_ref().is_some_and(|m| m.get(c).is_some())
    }

    pub(crate) fn insert(&mut self, c: u64) {
        let full = self.map.as_ref().is_none_or(|m| m.len() + 1 > m.keys.len() / 2);
        if full {
            let len = self.map.as_ref().map_or(0, HashIndex::len);
            let mut bigger = HashIndex::new((len + 1).max(64) * 2);
            if let Some(old) = self.map.take() {
                for &k in old.keys.iter().filter(|&&k| k != EMPTY) {
                    bigger.insert(k, 0);
                }
            }
            self.map = Some(bigger);
        }
        if let Some(m) = self.map.as_mut() {
            m.insert(c, 0);
        }
    }

    pub(crate) fn remove(&mut self, c: u64) {
        if let Some(m) = self.map.as_mut() {
            m.remove(c);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.as_ref().map_or(0, HashIndex::len)
    }

    /// Bytes the table takes.
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> usize {
        self.map.as_ref().map_or(0, |m| m.keys.len() * 12)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn agrees_with_a_std_map_under_random_inserts_and_removes() {
        let mut ours = HashIndex::new(500);
        let mut theirs = HashMap::new();
        let mut x = 0x1234_5678u64;
        for step in 0..200_000u32 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // A small key space forces collisions, long probe runs and wrap-around.
            let key = x % 1500;
            if x >> 60 < 9 && theirs.len() < 500 {
                ours.insert(key, step);
                theirs.insert(key, step);
            } else {
                ours.remove(key);
                theirs.remove(&key);
            }
            assert_eq!(ours.len(), theirs.len());
        }
        for key in 0..1500 {
            assert_eq!(ours.get(key), theirs.get(&key).copied(), "key {key}");
        }
    }

    #[test]
    fn cluster_set_grows_with_its_contents() {
        let mut s = ClusterSet::default();
        assert!(!s.contains(7) && s.bytes() == 0);
        for c in (0..100_000u64).map(|i| i * 8191) {
            s.insert(c);
        }
        assert_eq!(s.len(), 100_000);
        assert!(s.contains(8191 * 99_999) && !s.contains(8190));
        assert!(s.bytes() <= 100_000 * 12 * 4 + 4096, "{} bytes", s.bytes());
        s.remove(0);
        assert!(!s.contains(0) && s.contains(8191));
    }
}
