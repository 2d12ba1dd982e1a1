//! Dirty bitmaps: one bit per `granularity` bytes of a disk, shared by every reactor.
//! A mirror keeps one for what it has still to copy; a disk keeps named ones (see
//! `bitmaps`) for what changed since a backup.
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

    /// Clears every chunk.
    pub fn clear_all(&self) {
        for c in 0..self.chunks() {
            self.clear(c);
        }
    }

    /// Words (64 chunks each, chunk `64 * w + k` in bit `k`): the layout of a qcow2
    /// bitmap's data clusters once each word is stored little-endian.
    pub fn words(&self) -> usize {
        self.words.len()
    }

    /// Word `w` (see [`DirtyBitmap::words`]).
    pub fn word(&self, w: usize) -> u64 {
        self.words[w].load(Ordering::SeqCst)
    }

    /// Sets the chunks `v` has set in word `w` (bits past the last chunk are ignored).
    pub fn or_word(&self, w: usize, v: u64) {
        let first = w as u64 * 64;
        let valid = self.chunks().saturating_sub(first).min(64);
        let v = if valid == 64 { v } else { v & ((1u64 << valid) - 1) };
        if v == 0 {
            return;
        }
        let old = self.words[w].fetch_or(v, Ordering::SeqCst);
        let added = (v & !old).count_ones();
        if added > 0 {
            let c = self.counter();
            c.count.fetch_add(i64::from(added), Ordering::Relaxed);
            c.sets.fetch_add(u64::from(added), Ordering::Relaxed);
        }
    }

    /// Sets every chunk `other` has set; `other` may have another granularity (a chunk
    /// here is set when it overlaps a set chunk there).
    pub fn merge_from(&self, other: &DirtyBitmap) {
        let mut c = 0;
        while c < other.chunks() {
            if self.words_clean_from(other, c) {
                c = (c / 64 + 1) * 64;
                continue;
            }
            if other.is_set(c) {
                let (off, len) = other.range(c);
                self.set_range(off, len);
            }
            c += 1;
        }
    }

    /// Whether `other`'s word holding chunk `c` is clean (a fast skip for merges).
    fn words_clean_from(&self, other: &DirtyBitmap, c: u64) -> bool {
        c.is_multiple_of(64) && other.words[(c / 64) as usize].load(Ordering::SeqCst) == 0
    }

    /// From byte `off` (inside the bitmap): whether it is dirty, and how many bytes
    /// from it, at most `max`, share that state.
    pub fn extent(&self, off: u64, max: u64) -> (bool, u64) {
        debug_assert!(off < self.len && max > 0);
        let end = off.saturating_add(max).min(self.len);
        let first = off >> self.bits;
        let dirty = self.is_set(first);
        let mut c = first + 1;
        while (c << self.bits) < end && self.is_set(c) == dirty {
            c += 1;
        }
        (dirty, (c << self.bits).min(end) - off)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_and_merges() {
        let b = DirtyBitmap::new(1 << 20, 4096);
        b.set_range(8192, 100);
        b.set_range(12288, 4096);
        assert_eq!(b.extent(0, 1 << 20), (false, 8192));
        assert_eq!(b.extent(8192, 1 << 20), (true, 8192));
        assert_eq!(b.extent(9000, 100), (true, 100));
        assert_eq!(b.extent(16384, 1 << 20), (false, (1 << 20) - 16384));
        let coarse = DirtyBitmap::new(1 << 20, 65536);
        coarse.merge_from(&b);
        assert_eq!(coarse.count(), 1);
        assert_eq!(coarse.extent(0, 1 << 20), (true, 65536));
        let fine = DirtyBitmap::new(1 << 20, 512);
        fine.merge_from(&coarse);
        assert_eq!(fine.count(), 128);
        fine.clear_all();
        assert_eq!((fine.count(), fine.next_set(0)), (0, None));
    }
}
