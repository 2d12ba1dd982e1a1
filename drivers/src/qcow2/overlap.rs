//! Which host clusters hold metadata, so a data write can never land on it.
//!
//! In a consistent image, data clusters and metadata never share a cluster. A corrupt
//! image can make them: an L2 entry pointing at the L1 table, a refcount block whose
//! zeroed entry lets the allocator hand out an L2 table's cluster as data. Writing
//! there would silently corrupt the image further (QEMU guards the same way, with its
//! "overlap checks"). The shard keeps one bit per host cluster — the header, the L1
//! table, the refcount table and blocks, the active L2 tables, the snapshot table and
//! the snapshots' L1 tables — and checks every in-place data write and every freshly
//! allocated run against it: a hit marks the image corrupt and fails the request.
//!
//! The map is a plain bitset on the owner reactor (no lock; one load per check). It
//! covers the clusters of the file plus whatever metadata is added later; bits past
//! its end read as "not metadata".

use std::cell::RefCell;

/// The largest cluster index the map tracks (2^31 clusters: 256 MiB of bits at most,
/// reached only by multi-petabyte images).
const MAX_CLUSTERS: u64 = 1 << 31;

#[derive(Default)]
pub(crate) struct MetaMap {
    words: RefCell<Vec<u64>>,
}

impl MetaMap {
    /// Marks clusters `first..first + n` as metadata.
    pub(crate) fn mark(&self, first: u64, n: u64) {
        let end = (first.saturating_add(n)).min(MAX_CLUSTERS);
        if first >= end {
            return;
        }
        let mut w = self.words.borrow_mut();
        let need = end.div_ceil(64) as usize;
        if w.len() < need {
            w.resize(need, 0);
        }
        for c in first..end {
            w[(c / 64) as usize] |= 1 << (c % 64);
        }
    }

    /// Clears clusters `first..first + n` (metadata freed).
    pub(crate) fn unmark(&self, first: u64, n: u64) {
        let mut w = self.words.borrow_mut();
        let end = first.saturating_add(n).min(w.len() as u64 * 64);
        for c in first..end {
            w[(c / 64) as usize] &= !(1 << (c % 64));
        }
    }

    /// Whether any of clusters `first..first + n` is metadata.
    pub(crate) fn any(&self, first: u64, n: u64) -> bool {
        let w = self.words.borrow();
        let end = first.saturating_add(n).min(w.len() as u64 * 64);
        (first..end).any(|c| w[(c / 64) as usize] & (1 << (c % 64)) != 0)
    }

    /// The first cluster of `first..first + n` that is metadata.
    pub(crate) fn first_in(&self, first: u64, n: u64) -> Option<u64> {
        let w = self.words.borrow();
        let end = first.saturating_add(n).min(w.len() as u64 * 64);
        (first..end).find(|&c| w[(c / 64) as usize] & (1 << (c % 64)) != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_clears_and_finds() {
        let m = MetaMap::default();
        assert!(!m.any(0, 1000));
        m.mark(0, 1);
        m.mark(100, 3);
        assert!(m.any(0, 1));
        assert!(!m.any(1, 99));
        assert!(m.any(50, 51));
        assert_eq!(m.first_in(1, 200), Some(100));
        m.unmark(100, 1);
        assert_eq!(m.first_in(1, 200), Some(101));
        assert!(!m.any(10_000, 5));
        m.mark(u64::MAX - 2, 5);
        assert!(!m.any(u64::MAX - 2, 2));
    }
}
