//! Which host clusters hold metadata, so a data write can never land on it.
//!
//! In a consistent image, data clusters and metadata never share a cluster. A corrupt
//! image can make them: an L2 entry pointing at the L1 table, a refcount block whose
//! zeroed entry lets the allocator hand out an L2 table's cluster as data. Writing
//! there would silently corrupt the image further (QEMU guards the same way, with its
//! "overlap checks"). The shard records the header, the L1 table, the refcount table
//! and blocks, the active L2 tables, the snapshot table and the snapshots' L1 tables,
//! and checks every in-place data write and every freshly allocated run against them:
//! a hit marks the image corrupt and fails the request.
//!
//! Memory follows the metadata, never the file's or the header's sizes: single
//! clusters (the header, L1 and refcount table clusters, L2 tables, refcount blocks,
//! which the engine allocates and frees one by one) live in a hash set, 24 bytes per
//! cluster at most; the structures that never change while an image is served (the
//! snapshot table and snapshot L1 tables) are a sorted list of ranges. The header's
//! limits (`header::MAX_L1_BYTES`, `header::MAX_REFTABLE_BYTES`) bound both.
//!
//! The map is plain state on the owner reactor (no lock); a check costs one probe per
//! cluster written, plus a binary search when snapshots exist.

use std::cell::RefCell;

use super::hash::ClusterSet;

#[derive(Default)]
pub(crate) struct MetaMap {
    singles: RefCell<ClusterSet>,
    /// Sorted, disjoint `[start, end)` cluster ranges that stay metadata for the life
    /// of the shard.
    ranges: RefCell<Vec<(u64, u64)>>,
}

impl MetaMap {
    /// Marks clusters `first..first + n` as metadata that the engine may free one
    /// cluster at a time.
    pub(crate) fn mark(&self, first: u64, n: u64) {
        let mut s = self.singles.borrow_mut();
        for c in first..first.saturating_add(n) {
            s.insert(c);
        }
    }

    /// Marks clusters `first..first + n` as metadata for the shard's whole life.
    pub(crate) fn mark_fixed(&self, first: u64, n: u64) {
        let end = first.saturating_add(n);
        if first >= end {
            return;
        }
        let mut r = self.ranges.borrow_mut();
        let i = r.partition_point(|&(_, e)| e < first);
        let mut start = first;
        let mut stop = end;
        let mut j = i;
        while j < r.len() && r[j].0 <= stop {
            start = start.min(r[j].0);
            stop = stop.max(r[j].1);
            j += 1;
        }
        r.splice(i..j, [(start, stop)]);
        debug_assert!(r.windows(2).all(|w| w[0].1 < w[1].0), "ranges sorted and disjoint");
    }

    /// Clears cluster `c` (metadata freed).
    pub(crate) fn unmark(&self, c: u64) {
        self.singles.borrow_mut().remove(c);
    }

    /// Whether any of clusters `first..first + n` is metadata.
    pub(crate) fn any(&self, first: u64, n: u64) -> bool {
        self.first_in(first, n).is_some()
    }

    /// The first cluster of `first..first + n` that is metadata.
    pub(crate) fn first_in(&self, first: u64, n: u64) -> Option<u64> {
        let end = first.saturating_add(n);
        let in_range = {
            let r = self.ranges.borrow();
            let i = r.partition_point(|&(_, e)| e <= first);
            r.get(i).filter(|&&(s, _)| s < end).map(|&(s, _)| s.max(first))
        };
        let s = self.singles.borrow();
        let limit = in_range.unwrap_or(end);
        (first..limit).find(|&c| s.contains(c)).or(in_range)
    }

    /// Bytes the map takes.
    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.singles.borrow().bytes() + self.ranges.borrow().capacity() * 16
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
        m.unmark(100);
        assert_eq!(m.first_in(1, 200), Some(101));
        assert!(!m.any(10_000, 5));
        m.mark(u64::MAX - 2, 5);
        assert!(m.any(u64::MAX - 2, 2));
    }

    #[test]
    fn fixed_ranges_merge_and_are_found() {
        let m = MetaMap::default();
        m.mark_fixed(10, 5);
        m.mark_fixed(30, 10);
        m.mark_fixed(14, 2);
        m.mark_fixed(1 << 40, 1 << 20);
        assert_eq!(*m.ranges.borrow(), vec![(10, 16), (30, 40), (1 << 40, (1 << 40) + (1 << 20))]);
        assert_eq!(m.first_in(0, 10), None);
        assert_eq!(m.first_in(0, 11), Some(10));
        assert_eq!(m.first_in(16, 14), None);
        assert_eq!(m.first_in(20, 100), Some(30));
        m.mark(25, 1);
        assert_eq!(m.first_in(20, 100), Some(25), "a single before a range");
        assert_eq!(m.first_in((1 << 40) + 5, 1), Some((1 << 40) + 5));
        assert!(m.bytes() < 4096, "a terabyte-sized range costs nothing");
    }
}
