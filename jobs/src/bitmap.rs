//! The mirror's bitmaps: what is dirty ([`DirtyBitmap`], shared with the disks' named
//! bitmaps in the drivers crate) and what is busy.

use std::sync::atomic::{AtomicU64, Ordering};

pub use drivers::api::bitmap::DirtyBitmap;

/// The smallest and largest granularity of a mirror (bytes per bit).
pub const MIN_GRANULARITY: u64 = 4096;
pub const MAX_GRANULARITY: u64 = 64 << 20;

/// Chunks with an operation on them (a copy, or a guest write being mirrored): one
/// bit each, taken and released atomically.
pub struct Busy {
    words: Box<[AtomicU64]>,
}

impl Busy {
    pub fn new(chunks: u64) -> Busy {
        Busy { words: (0..chunks.div_ceil(64)).map(|_| AtomicU64::new(0)).collect() }
    }

    /// Takes chunks `first..end` if none is taken; all or nothing.
    pub fn try_take(&self, first: u64, end: u64) -> bool {
        for c in first..end {
            let (w, m) = ((c / 64) as usize, 1u64 << (c % 64));
            if self.words[w].fetch_or(m, Ordering::SeqCst) & m != 0 {
                self.release(first, c);
                return false;
            }
        }
        true
    }

    pub fn release(&self, first: u64, end: u64) {
        for c in first..end {
            let (w, m) = ((c / 64) as usize, 1u64 << (c % 64));
            self.words[w].fetch_and(!m, Ordering::SeqCst);
        }
    }

    pub fn is_taken(&self, c: u64) -> bool {
        self.words[(c / 64) as usize].load(Ordering::SeqCst) & (1 << (c % 64)) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_clear_count_and_search() {
        let b = DirtyBitmap::new(10 * 65536 + 100, 65536);
        assert_eq!(b.chunks(), 11);
        assert_eq!(b.next_set(0), None);
        b.set_range(65536 + 1, 10);
        b.set_range(65536, 65536);
        assert_eq!(b.count(), 1);
        b.set_range(10 * 65536, 1);
        assert_eq!(b.count(), 2);
        assert_eq!(b.next_set(0), Some(1));
        assert_eq!(b.next_set(2), Some(10));
        assert_eq!(b.next_set(11), Some(1), "wraps around");
        assert!(b.clear(1));
        assert!(!b.clear(1));
        assert_eq!(b.count(), 1);
        assert_eq!(b.range(10), (10 * 65536, 100));
        b.set_all();
        assert_eq!(b.count(), 11);
        assert_eq!(b.dirty_bytes(), 10 * 65536 + 100);
    }

    #[test]
    fn busy_is_all_or_nothing() {
        let b = Busy::new(130);
        assert!(b.try_take(60, 70));
        assert!(!b.try_take(69, 72));
        assert!(!b.is_taken(70) && !b.is_taken(71), "a failed take leaves nothing taken");
        assert!(b.try_take(70, 72));
        b.release(60, 72);
        assert!(b.try_take(0, 130));
    }

    #[test]
    fn wide_bitmaps_find_bits_in_later_words() {
        let b = DirtyBitmap::new(1 << 40, 1 << 16);
        b.set_range(1 << 39, 1);
        assert_eq!(b.next_set(5), Some((1 << 39) >> 16));
        assert_eq!(b.next_set(((1 << 39) >> 16) + 1), Some((1 << 39) >> 16));
    }
}
