//! The zero-hop path: mapping hints any reactor reads without a lock, and the lease
//! that keeps a cluster a reader found from being reused under it.
//!
//! A read, or an in-place write to an allocated cluster, needs one thing from the
//! owner of its L2 table: the host offset. The owner publishes what it maps in a
//! [`MapHints`] table; a channel on any reactor that finds its clusters there submits
//! the data I/O itself, on its own storage channel, and never crosses to the owner.
//! Everything else (a miss, allocation, zeroes, discards, FUA, block status) takes the
//! one hop to the owner as before.
//!
//! # The table
//! Direct-mapped, split into one region per shard; only the owner of a guest cluster
//! writes its slot (its region is indexed by the cluster's number within the owner's
//! L2 tables, so an image the table covers has no collisions at all). A slot is two
//! words, a key (the cluster's owner-local number plus one; 0 is empty) and a value
//! (host offset, writable bit, metadata generation). The owner changes a slot as a
//! seqlock whose sequence is the key: key to 0, value, key back. A reader that sees the
//! same key before and after the value has a value the cluster mapped to at some point
//! during its look-up: for the latest mapping that the requester could know of, because
//! every owner update happens before that update's request completes.
//!
//! The owner publishes from its cache as it maps (a look-up that changes nothing
//! writes nothing) and changes or clears the slot in the same step (no await) as the
//! L2 entry: linking a new cluster publishes it, zeroing or discarding clears it.
//!
//! Writable means the entry is COPIED (refcount 1, not shared with a snapshot) and the
//! host cluster was not metadata when published. The metadata generation guards the
//! rest: allocating a metadata cluster (an L2 table, a refcount block or table) bumps
//! the image's generation, and a writable hint of another generation is not used, so a
//! corrupt image that maps a data cluster the allocator then hands to metadata gets
//! the owner's overlap check, as before. The value keeps 16 bits of the generation.
//!
//! # The lease
//! A reader that found a stale hint (the owner just cleared it) may still be reading or
//! writing the old host cluster; the cluster must not be freed, and so reused, until it
//! is done. Readers register in an epoch, as in read-copy-update: a global epoch and,
//! per channel, a pair of in-flight counters by epoch parity. A reader increments its
//! counter for the current epoch before it looks at the table and decrements it when
//! its I/O completes. The owner tags each free with the epoch it read after clearing
//! the hint; the free is applied only once the epoch has moved on twice, and the epoch
//! moves from `e` to `e + 1` only when no reader of parity `e + 1` (epoch `e - 1`) is
//! in flight. So every reader that could have seen the hint has finished. Readers never
//! wait; frees wait about one I/O.

use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering, fence};

use super::image::{AtomicTable, Image};
use super::overlap::MetaMap;

/// Channels of one image that may take the zero-hop path at once; more use the hop.
pub(crate) const LEASE_SLOTS: usize = 256;

/// A direct-mapped table of guest cluster → host cluster hints.
pub(crate) struct MapHints {
    keys: AtomicTable,
    vals: AtomicTable,
    shards: u64,
    /// log2 of L2 entries per table (the ownership unit, in clusters).
    l2_bits: u32,
    /// log2 of slots per shard's region.
    region_bits: u32,
}

/// A hint's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Hint {
    /// Host offset of the cluster.
    pub host: u64,
    pub writable: bool,
    /// Low 16 bits of the image's metadata generation at publication.
    pub generation: u16,
}

const WRITABLE: u64 = 1;
/// Host offsets are cluster-aligned (at least 512 bytes) and below 2^56: bits 1..9 and
/// 56..64 are free.
const HOST_MASK: u64 = ((1 << 56) - 1) & !0x1ff;

impl Hint {
    fn encode(self) -> u64 {
        debug_assert_eq!(self.host & !HOST_MASK, 0, "host offset {:#x} not a cluster", self.host);
        let g = u64::from(self.generation);
        self.host | ((g & 0xff) << 1) | ((g >> 8) << 56) | u64::from(self.writable)
    }

    fn decode(v: u64) -> Hint {
        let generation = (((v >> 1) & 0xff) | ((v >> 56) << 8)) as u16;
        Hint { host: v & HOST_MASK, writable: v & WRITABLE != 0, generation }
    }
}

impl MapHints {
    /// A table for `clusters` guest clusters over `shards`, of at most `max_slots`
    /// slots (rounded to powers of two per region).
    pub(crate) fn new(clusters: u64, l2_bits: u32, shards: usize, max_slots: u64) -> MapHints {
        let shards = shards.max(1) as u64;
        let want = clusters.div_ceil(shards).max(1).next_power_of_two();
        let cap = (max_slots / shards).max(1);
        let cap = if cap.is_power_of_two() { cap } else { cap.next_power_of_two() >> 1 };
        let region_bits = want.min(cap).trailing_zeros();
        let n = (shards << region_bits) as usize;
        // Zeroed, so only slots ever published are resident.
        MapHints {
            keys: AtomicTable::zeroed(n),
            vals: AtomicTable::zeroed(n),
            shards,
            l2_bits,
            region_bits,
        }
    }

    /// (slot, key) of guest cluster `c`.
    fn slot(&self, c: u64) -> (usize, u64) {
        let table = c >> self.l2_bits;
        let owner = table % self.shards;
        let local = ((table / self.shards) << self.l2_bits) | (c & ((1 << self.l2_bits) - 1));
        let idx = (owner << self.region_bits) | (local & ((1 << self.region_bits) - 1));
        (idx as usize, local + 1)
    }

    /// Publishes `h` for cluster `c`. Only `c`'s owner calls this.
    pub(crate) fn publish(&self, c: u64, h: Hint) {
        let (i, key) = self.slot(c);
        let v = h.encode();
        if self.keys.slot(i).load(Ordering::Relaxed) == key
            && self.vals.slot(i).load(Ordering::Relaxed) == v
        {
            return;
        }
        self.keys.slot(i).store(0, Ordering::Relaxed);
        // Release: a reader that sees the new value sees the key cleared (and retries).
        fence(Ordering::Release);
        self.vals.slot(i).store(v, Ordering::Relaxed);
        self.keys.slot(i).store(key, Ordering::Release);
    }

    /// Clears the hint of cluster `c`, if it has one. Only `c`'s owner calls this.
    pub(crate) fn clear(&self, c: u64) {
        let (i, key) = self.slot(c);
        if self.keys.slot(i).load(Ordering::Relaxed) == key {
            self.keys.slot(i).store(0, Ordering::Release);
        }
    }

    /// The hint of cluster `c`. Call inside a lease (see [`Lease::enter`]).
    pub(crate) fn get(&self, c: u64) -> Option<Hint> {
        let (i, key) = self.slot(c);
        if self.keys.slot(i).load(Ordering::Acquire) != key {
            return None;
        }
        let v = self.vals.slot(i).load(Ordering::Relaxed);
        // Acquire: if `v` is a newer value, the key's clearing before it is visible.
        fence(Ordering::Acquire);
        (self.keys.slot(i).load(Ordering::Relaxed) == key).then(|| Hint::decode(v))
    }
}

/// Clusters of one mapped run published at most (a long run's tail is published when
/// it is mapped again).
const PUBLISH_MAX: u64 = 64;

/// The owner's side: publishes what its top layer maps.
pub(crate) struct Publisher {
    pub img: Arc<Image>,
    /// The owner's metadata map: a cluster holding metadata is never writable.
    pub meta: Rc<MetaMap>,
}

impl Publisher {
    /// Publishes the data run the owner just mapped: `len` bytes from guest offset
    /// `off` at host offset `host`.
    pub(crate) fn data_run(&self, off: u64, host: u64, len: u64, copied: bool) {
        let cb = self.img.g.cluster_bits;
        let in_cluster = off & ((1 << cb) - 1);
        let (c0, h0) = (off >> cb, (host - in_cluster) >> cb);
        let n = (in_cluster + len).div_ceil(1 << cb).min(PUBLISH_MAX);
        let generation = self.img.meta_generation();
        let end = self.img.host_end();
        for k in 0..n {
            let hc = h0 + k;
            if hc >= end || hc == 0 {
                return; // Corrupt: the owner's path reports it.
            }
            let writable = copied && !self.meta.any(hc, 1);
            self.img.hints.publish(c0 + k, Hint { host: hc << cb, writable, generation });
        }
    }
}

#[repr(align(64))]
struct LeaseSlot {
    used: AtomicBool,
    inflight: [AtomicU64; 2],
    /// Requests served on the zero-hop path (written by the slot's channel only).
    served: AtomicU64,
}

/// The epochs that hold frees back until readers of stale hints are done.
pub(crate) struct Lease {
    epoch: AtomicU64,
    slots: Box<[LeaseSlot]>,
    /// One past the highest slot ever claimed: the scans stop there.
    high: AtomicUsize,
}

/// A reader's registration; ends on drop.
pub(crate) struct LeaseGuard<'a> {
    counter: &'a AtomicU64,
}

impl Drop for LeaseGuard<'_> {
    fn drop(&mut self) {
        // Release: our I/O on the cluster completed before a free can see us gone.
        self.counter.fetch_sub(1, Ordering::Release);
    }
}

impl Lease {
    pub(crate) fn new() -> Lease {
        let slots = (0..LEASE_SLOTS)
            .map(|_| LeaseSlot {
                used: AtomicBool::new(false),
                inflight: [AtomicU64::new(0), AtomicU64::new(0)],
                served: AtomicU64::new(0),
            })
            .collect();
        Lease { epoch: AtomicU64::new(2), slots, high: AtomicUsize::new(0) }
    }

    /// A slot for one channel, or `None` when all are taken.
    pub(crate) fn claim(&self) -> Option<usize> {
        let i = self.slots.iter().position(|s| {
            s.used.compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed).is_ok()
        })?;
        // SeqCst: an advance that scans after a reader of this slot registered sees it.
        self.high.fetch_max(i + 1, Ordering::SeqCst);
        Some(i)
    }

    /// Counts a request slot `slot`'s channel served without a hop.
    pub(crate) fn served(&self, slot: usize) {
        let c = &self.slots[slot].served;
        c.store(c.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    }

    /// Requests served without a hop, over every channel so far.
    pub(crate) fn served_total(&self) -> u64 {
        self.slots.iter().map(|s| s.served.load(Ordering::Relaxed)).sum()
    }

    pub(crate) fn release(&self, slot: usize) {
        let s = &self.slots[slot];
        debug_assert!(s.inflight.iter().all(|c| c.load(Ordering::Acquire) == 0));
        s.used.store(false, Ordering::Release);
    }

    /// Registers a reader on `slot` before it looks up hints.
    pub(crate) fn enter(&self, slot: usize) -> LeaseGuard<'_> {
        let e = self.epoch.load(Ordering::SeqCst);
        let counter = &self.slots[slot].inflight[(e & 1) as usize];
        counter.fetch_add(1, Ordering::SeqCst);
        // The look-ups that follow come after the registration, for every free.
        fence(Ordering::SeqCst);
        LeaseGuard { counter }
    }

    /// The tag of a free whose hint was cleared before this call.
    pub(crate) fn tag(&self) -> u64 {
        // The clearing comes before the epoch read, for every reader.
        fence(Ordering::SeqCst);
        self.epoch.load(Ordering::SeqCst)
    }

    /// Moves the epoch on if the readers it waits for are done; whether it moved.
    fn advance(&self) -> bool {
        let e = self.epoch.load(Ordering::SeqCst);
        let parity = ((e + 1) & 1) as usize;
        let high = self.high.load(Ordering::SeqCst);
        if self.slots[..high].iter().any(|s| s.inflight[parity].load(Ordering::SeqCst) != 0) {
            return false;
        }
        // A concurrent advance from `e` did the same: either way the epoch moved.
        let _ = self.epoch.compare_exchange(e, e + 1, Ordering::SeqCst, Ordering::SeqCst);
        true
    }

    /// Whether a free tagged `tag` may be applied (moving the epoch on if it can).
    pub(crate) fn elapsed(&self, tag: u64) -> bool {
        while self.epoch.load(Ordering::SeqCst) < tag + 2 {
            if !self.advance() {
                return false;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_round_trip_and_regions_do_not_collide() {
        let h = MapHints::new(1 << 14, 13, 2, 1 << 20);
        let a = Hint { host: 0x7f_0000_0000, writable: true, generation: 0xabcd };
        assert_eq!(Hint::decode(a.encode()), a);
        // Two clusters in neighbouring tables (different owners), same offset in each.
        h.publish(5, a);
        let b = Hint { host: 0x20000, writable: false, generation: 1 };
        h.publish((1 << 13) + 5, b);
        assert_eq!(h.get(5), Some(a));
        assert_eq!(h.get((1 << 13) + 5), Some(b));
        h.clear(5);
        assert_eq!(h.get(5), None);
        assert_eq!(h.get((1 << 13) + 5), Some(b));
        // Beyond the table's coverage: the slot is shared, the key tells them apart.
        let far = (4u64 << 13) + 5;
        h.publish(far, a);
        assert_eq!(h.get(far), Some(a));
        assert_eq!(h.get(5), None);
    }

    #[test]
    fn the_table_is_bounded() {
        let h = MapHints::new(1 << 40, 13, 3, 1 << 16);
        assert!(h.keys.len() <= 1 << 16, "{}", h.keys.len());
        let small = MapHints::new(10, 13, 2, 1 << 16);
        assert_eq!(small.keys.len(), 2 * 8);
    }

    #[test]
    fn a_free_waits_for_readers_of_its_epoch() {
        let l = Lease::new();
        let s = l.claim().unwrap();
        let reader = l.enter(s);
        let tag = l.tag();
        assert!(!l.elapsed(tag), "a reader that may have seen the hint is in flight");
        // Readers that start now see the cleared hint; they do not hold the free.
        let later = l.enter(s);
        assert!(!l.elapsed(tag));
        drop(reader);
        assert!(l.elapsed(tag), "only readers from before the tag hold it");
        let tag2 = l.tag();
        assert!(!l.elapsed(tag2), "a reader of the epoch before is still in flight");
        drop(later);
        assert!(l.elapsed(tag2));
        l.release(s);
    }

    #[test]
    fn with_no_reader_a_free_goes_at_once() {
        let l = Lease::new();
        let tag = l.tag();
        assert!(l.elapsed(tag));
        assert!(l.elapsed(l.tag()));
    }
}
