//! Dirty bitmaps: one bit per `granularity` bytes of a disk, shared by every reactor.
//!
//! Writers on any reactor set bits with atomic operations and no lock: a bit already
//! set costs one load (no write, so a hot region's cache line is not bounced between
//! cores). The count of set bits is kept per reactor, each reactor adding to its own
//! cache line, and summed by readers; the job clears bits on its own reactor's line, so
//! the sum is exact once every operation is done, and never negative in between.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// Counter lines per bitmap; reactors past this many share lines (still exact).
const COUNTER_LINES: usize = 64;

/// One reactor's counters, on their own cache line: set bits (net of the bits it
/// cleared) and bits it has set in all.
#[repr(align(64))]
#[derive(Default)]
struct Padded {
    count: AtomicI64,
    sets: AtomicU64,
}

/// A bitmap over a disk of `len` bytes.
pub struct DirtyBitmap {
    /// log2 of the bytes one bit covers.
    bits: u32,
    /// The bytes covered.
    len: u64,
    words: Box<[AtomicU64]>,
    counts: Box<[Padded]>,
}

/// The smallest and largest granularity (bytes per bit).
pub const MIN_GRANULARITY: u64 = 4096;
pub const MAX_GRANULARITY: u64 = 64 << 20;

impl DirtyBitmap {
    /// A clean bitmap of `len` bytes at `granularity` (a power of two).
    pub fn new(len: u64, granularity: u64) -> DirtyBitmap {
        assert!(granularity.is_power_of_two(), "granularity {granularity} is a power of two");
        let bits = granularity.trailing_zeros();
        let nbits = len.div_ceil(granularity);
        DirtyBitmap {
            bits,
            len,
            words: (0..nbits.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            counts: (0..COUNTER_LINES).map(|_| Padded::default()).collect(),
        }
    }

    pub fn granularity(&self) -> u64 {
        1 << self.bits
    }

    /// The bytes the bitmap covers.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Chunks (bits) in the bitmap.
    pub fn chunks(&self) -> u64 {
        self.len.div_ceil(self.granularity())
    }

    /// The byte range of chunk `c` (the last one may be short).
    pub fn range(&self, c: u64) -> (u64, u64) {
        let off = c << self.bits;
        (off, (self.granularity()).min(self.len - off))
    }

    /// Chunks `first..end` that `off..off+len` touches (none past the end).
    pub fn chunks_of(&self, off: u64, len: u64) -> (u64, u64) {
        let n = self.chunks();
        let end = off.saturating_add(len.max(1));
        ((off >> self.bits).min(n), (((end - 1) >> self.bits) + 1).min(n))
    }

    fn counter(&self) -> &Padded {
        let i = if poller::on_reactor() { poller::current_index() } else { 0 };
        &self.counts[i % COUNTER_LINES]
    }

    /// Marks `off..off+len` dirty.
    pub fn set_range(&self, off: u64, len: u64) {
        let (first, end) = self.chunks_of(off, len);
        let mut added = 0;
        for c in first..end {
            let (w, m) = ((c / 64) as usize, 1u64 << (c % 64));
            let word = &self.words[w];
            if word.load(Ordering::Relaxed) & m == 0 && word.fetch_or(m, Ordering::SeqCst) & m == 0
            {
                added += 1;
            }
        }
        if added > 0 {
            let c = self.counter();
            c.count.fetch_add(added, Ordering::Relaxed);
            c.sets.fetch_add(added as u64, Ordering::Relaxed);
        }
    }

    /// Marks every chunk dirty.
    pub fn set_all(&self) {
        self.set_range(0, self.len);
    }

    /// Clears chunk `c`; whether it was set.
    pub fn clear(&self, c: u64) -> bool {
        let (w, m) = ((c / 64) as usize, 1u64 << (c % 64));
        let was = self.words[w].fetch_and(!m, Ordering::SeqCst) & m != 0;
        if was {
            self.counter().count.fetch_sub(1, Ordering::Relaxed);
        }
        was
    }

    pub fn is_set(&self, c: u64) -> bool {
        self.words[(c / 64) as usize].load(Ordering::SeqCst) & (1 << (c % 64)) != 0
    }

    /// Whether any chunk of `first..end` is set.
    pub fn any_in(&self, first: u64, end: u64) -> bool {
        (first..end).any(|c| self.is_set(c))
    }

    /// The first set chunk at or after `from`, wrapping around to the start; `None`
    /// when the bitmap is clean.
    pub fn next_set(&self, from: u64) -> Option<u64> {
        let n = self.words.len();
        if n == 0 {
            return None;
        }
        let start = (from / 64) as usize % n;
        // Every word from `from`'s on, then that word again whole (its low bits).
        for k in 0..=n {
            let w = (start + k) % n;
            let mut v = self.words[w].load(Ordering::SeqCst);
            if k == 0 {
                v &= !0u64 << (from % 64);
            }
            if v != 0 {
                let c = (w as u64) * 64 + u64::from(v.trailing_zeros());
                if c < self.chunks() {
                    return Some(c);
                }
            }
        }
        None
    }

    /// Set chunks now (exact when no writer is between its bit and its count).
    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.count.load(Ordering::Relaxed)).sum::<i64>().max(0) as u64
    }

    /// Bits set (from clean to dirty) since the bitmap was made: with the bits the job
    /// cleared, the rate at which writers dirty the disk against the rate it copies.
    pub fn sets(&self) -> u64 {
        self.counts.iter().map(|c| c.sets.load(Ordering::Relaxed)).sum()
    }

    /// Bytes the set chunks cover.
    pub fn dirty_bytes(&self) -> u64 {
        self.count().saturating_mul(self.granularity()).min(self.len)
    }
}

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
