//! A fixed-capacity cache of metadata slices (L2 table slices, refcount block slices).
//!
//! - Memory: one anonymous mapping of `capacity × slice_bytes`, page-aligned, so slices
//!   are read straight into place with O_DIRECT; pages are touched only when used.
//! - Lookup: a hash index from key (the slice number in the structure's own address
//!   space) to slot, sized by the cache's capacity — never by the key space, which an
//!   image header controls (a petabyte of virtual size must not cost a direct index).
//!   A hit is a multiply, usually one probe, and an array read; no allocation.
//! - Replacement: the clock algorithm over clean, unpinned slots. Dirty slots are never
//!   evicted: they are written back only by the shard's ordered flush, which is what
//!   enforces the qcow2 ordering rules; a cache with no clean victim reports `Full`
//!   and the caller flushes and retries.
//! - Pins: a [`Pin`] keeps its slot resident across awaits; it is released on drop.
//! - Writeback takes a *snapshot* of a dirty slot (a copy, with the slot's modification
//!   count); the slot is marked clean only if nothing changed it since the snapshot, so
//!   concurrent updates are never lost or written half-done.

use std::cell::{Cell, RefCell};
use std::io;
use std::ptr::NonNull;

use poller::{DmaBuf, WaitList};

use crate::error::IoError;
use crate::io::align::Aligned;
use crate::seg::IoSeg;

use super::hash::HashIndex;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    Free,
    Loading,
    Ready,
}

#[derive(Clone, Copy, Debug)]
struct Slot {
    key: u64,
    /// Where the slice lives in the image file.
    host: u64,
    state: State,
    pins: u32,
    dirty: bool,
    referenced: bool,
    /// Bumped on every modification.
    mods: u64,
    /// A snapshot of this slot is being written: the next one waits, so writes of one
    /// slice never overtake each other on disk.
    writing: bool,
}

/// Why a lookup failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GetError {
    Io(IoError),
    /// Every slot is pinned, loading or dirty: flush, then retry.
    Full,
}

impl From<IoError> for GetError {
    fn from(e: IoError) -> Self {
        GetError::Io(e)
    }
}

/// Fresh slice keys a cache remembers at most (see [`MetaCache::mark_fresh`]).
const FRESH_CAP: usize = 4096;

pub(crate) struct MetaCache {
    slice_bytes: usize,
    base: NonNull<u8>,
    map_len: usize,
    slots: RefCell<Box<[Slot]>>,
    index: RefCell<HashIndex>,
    hand: Cell<usize>,
    dirty_count: Cell<usize>,
    changed: WaitList,
    hits: Cell<u64>,
    misses: Cell<u64>,
    /// A resident slice was evicted to make room since the last writeback began.
    evicted: Cell<bool>,
    /// Slices known to be zeros on disk that were never loaded since (new tables):
    /// their first load fills zeros instead of reading. Made on first use, at most
    /// [`FRESH_CAP`] keys.
    fresh: RefCell<Option<std::collections::HashSet<u64>>>,
    /// One writer of snapshots at a time: two writebacks of one slice must not race.
    writeback_held: Cell<bool>,
    writeback_waiters: WaitList,
}

/// Holds a cache's writeback lock.
pub(crate) struct WritebackGuard<'a>(&'a MetaCache);

impl Drop for WritebackGuard<'_> {
    fn drop(&mut self) {
        self.0.writeback_held.set(false);
        self.0.writeback_waiters.wake_all();
    }
}

/// A pinned, resident slot.
pub(crate) struct Pin<'a> {
    cache: &'a MetaCache,
    slot: u32,
}

impl Drop for Pin<'_> {
    fn drop(&mut self) {
        let mut slots = self.cache.slots.borrow_mut();
        let s = &mut slots[self.slot as usize];
        debug_assert!(s.pins > 0);
        s.pins -= 1;
        let unpinned = s.pins == 0;
        drop(slots);
        if unpinned {
            self.cache.changed.wake_all();
        }
    }
}

impl Pin<'_> {
    pub(crate) fn set_u64(&self, i: usize, v: u64) {
        self.modify(|b| b[8 * i..8 * i + 8].copy_from_slice(&v.to_be_bytes()));
    }

    /// L2 entry `i` of a slice of `g`'s image: its raw words, decoded.
    pub(crate) fn l2_entry(
        &self,
        i: usize,
        g: &super::types::Geometry,
    ) -> ((u64, u64), Result<super::types::L2Entry, super::types::EntryError>) {
        let (w0, w1) = super::types::l2_raw_at(self.bytes(), i, g);
        ((w0, w1), super::types::L2Entry::decode2(w0, w1, g))
    }

    /// Writes L2 entry `i` of a slice of `g`'s image.
    pub(crate) fn set_l2_entry(
        &self,
        i: usize,
        e: &super::types::L2Entry,
        g: &super::types::Geometry,
    ) {
        self.modify(|b| super::types::set_l2_at(b, i, e, g));
    }

    /// The slice's bytes. Valid while the pin lives; callers must not hold the slice
    /// across an await that could modify it (the shard never does).
    pub(crate) fn bytes(&self) -> &[u8] {
        // SAFETY: the slot is pinned, so its memory is not reused; it lies inside the
        // mapping; all access happens on this reactor thread.
        unsafe {
            std::slice::from_raw_parts(
                self.cache.base.as_ptr().add(self.slot as usize * self.cache.slice_bytes),
                self.cache.slice_bytes,
            )
        }
    }

    /// Modifies the slice in place and marks it dirty.
    pub(crate) fn modify<R>(&self, f: impl FnOnce(&mut [u8]) -> R) -> R {
        // SAFETY: as in `bytes`; the closure gets exclusive access for its duration
        // (single thread, no re-entrancy into the cache from inside `f`).
        let b = unsafe {
            std::slice::from_raw_parts_mut(
                self.cache.base.as_ptr().add(self.slot as usize * self.cache.slice_bytes),
                self.cache.slice_bytes,
            )
        };
        let r = f(b);
        let mut slots = self.cache.slots.borrow_mut();
        let s = &mut slots[self.slot as usize];
        if !s.dirty {
            s.dirty = true;
            self.cache.dirty_count.set(self.cache.dirty_count.get() + 1);
        }
        s.mods += 1;
        r
    }
}

/// A copy of a dirty slot, ready to be written.
pub(crate) struct Snapshot {
    pub slot: u32,
    pub host: u64,
    pub mods: u64,
    pub buf: DmaBuf,
}

impl MetaCache {
    pub(crate) fn new(slice_bytes: usize, capacity: usize) -> io::Result<Self> {
        assert!(slice_bytes.is_power_of_two() && slice_bytes >= 512 && capacity > 0);
        let map_len = slice_bytes * capacity;
        // SAFETY: an anonymous private mapping with no address hint.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let free = Slot {
            key: u64::MAX,
            host: 0,
            state: State::Free,
            pins: 0,
            dirty: false,
            referenced: false,
            mods: 0,
            writing: false,
        };
        Ok(MetaCache {
            slice_bytes,
            base: NonNull::new(p.cast()).expect("mmap returned null"),
            map_len,
            slots: RefCell::new(vec![free; capacity].into_boxed_slice()),
            index: RefCell::new(HashIndex::new(capacity)),
            hand: Cell::new(0),
            dirty_count: Cell::new(0),
            changed: WaitList::new(),
            hits: Cell::new(0),
            misses: Cell::new(0),
            evicted: Cell::new(false),
            fresh: RefCell::new(None),
            writeback_held: Cell::new(false),
            writeback_waiters: WaitList::new(),
        })
    }

    pub(crate) fn slice_bytes(&self) -> usize {
        self.slice_bytes
    }

    pub(crate) fn capacity(&self) -> usize {
        self.slots.borrow().len()
    }

    pub(crate) fn dirty_count(&self) -> usize {
        self.dirty_count.get()
    }

    pub(crate) fn stats(&self) -> (u64, u64) {
        (self.hits.get(), self.misses.get())
    }

    /// Records that slices `keys` are zeros on disk (a table just written and synced
    /// with no entry in it), so their first load need not read them. Past
    /// [`FRESH_CAP`] remembered keys the rest are simply read when needed.
    pub(crate) fn mark_fresh(&self, keys: std::ops::Range<u64>) {
        let mut fresh = self.fresh.borrow_mut();
        let set = fresh.get_or_insert_with(|| std::collections::HashSet::with_capacity(FRESH_CAP));
        for k in keys {
            if set.len() >= FRESH_CAP {
                break;
            }
            if self.resident(k).is_none() {
                set.insert(k);
            }
        }
    }

    /// Whether `key` is still known to be zeros on disk; forgets it (it is about to
    /// be loaded, and may change on disk afterwards).
    fn take_fresh(&self, key: u64) -> bool {
        self.fresh.borrow_mut().as_mut().is_some_and(|s| s.remove(&key))
    }

    /// Whether the cache has had to evict a resident slice since its last writeback
    /// began: only then are clean slots worth making ahead of need. A cache that holds
    /// its whole working set keeps its dirty slices until a flush asks for them.
    pub(crate) fn under_pressure(&self) -> bool {
        self.evicted.get()
    }

    /// The slot of a resident, ready key (no I/O).
    fn resident(&self, key: u64) -> Option<(u32, State)> {
        let slot = self.index.borrow().get(key)?;
        Some((slot, self.slots.borrow()[slot as usize].state))
    }

    fn pick_victim(&self) -> Option<u32> {
        let mut slots = self.slots.borrow_mut();
        let n = slots.len();
        let mut hand = self.hand.get();
        for _ in 0..2 * n {
            let i = hand;
            hand = (hand + 1) % n;
            let s = &mut slots[i];
            match s.state {
                State::Free => {
                    self.hand.set(hand);
                    return Some(i as u32);
                }
                State::Loading => continue,
                State::Ready => {
                    if s.pins > 0 || s.dirty {
                        continue;
                    }
                    if s.referenced {
                        s.referenced = false;
                        continue;
                    }
                    self.hand.set(hand);
                    return Some(i as u32);
                }
            }
        }
        self.hand.set(hand);
        None
    }

    /// The slice `key`, loaded if needed from where `host()` says it lives. With
    /// `fresh`, a missing slice is not read but zero-filled (a newly allocated table)
    /// and marked dirty.
    ///
    /// `host` is asked when a slot is filled, not when the caller looked the slice up:
    /// a lookup may wait here for a load, and a slice can move meanwhile (an L2 table
    /// copied on write); a slot filled from a stale place would later write back there.
    pub(crate) async fn get<'a>(
        &'a self,
        io: &Aligned,
        key: u64,
        host: impl Fn() -> u64,
        fresh: bool,
    ) -> Result<Pin<'a>, GetError> {
        loop {
            match self.resident(key) {
                Some((slot, State::Ready)) => {
                    let mut slots = self.slots.borrow_mut();
                    let s = &mut slots[slot as usize];
                    s.pins += 1;
                    s.referenced = true;
                    debug_assert_eq!(s.host, host(), "slice {key} moved without rehost");
                    self.hits.set(self.hits.get() + 1);
                    return Ok(Pin { cache: self, slot });
                }
                Some((_, _)) => {
                    self.changed.wait().await;
                    continue;
                }
                None => {}
            }
            let Some(slot) = self.pick_victim() else {
                return Err(GetError::Full);
            };
            self.misses.set(self.misses.get() + 1);
            let host = host();
            {
                let mut slots = self.slots.borrow_mut();
                let s = &mut slots[slot as usize];
                let mut index = self.index.borrow_mut();
                if s.state == State::Ready {
                    index.remove(s.key);
                    self.evicted.set(true);
                }
                *s = Slot {
                    key,
                    host,
                    state: State::Loading,
                    pins: 1,
                    dirty: false,
                    referenced: true,
                    mods: s.mods,
                    writing: false,
                };
                index.insert(key, slot);
            }
            let pin = Pin { cache: self, slot };
            if self.take_fresh(key) || fresh {
                pin.modify(|b| b.fill(0));
            } else {
                // SAFETY: the slot's memory is exclusively ours while it is Loading and
                // pinned; it stays mapped for the cache's life, beyond this read.
                let seg = unsafe {
                    IoSeg::from_raw(
                        self.base.as_ptr().add(slot as usize * self.slice_bytes),
                        self.slice_bytes,
                    )
                };
                if let Err(e) = io.read(host, &[seg]).await {
                    self.discard_slot(slot);
                    std::mem::forget(pin);
                    self.changed.wake_all();
                    return Err(GetError::Io(e));
                }
            }
            self.slots.borrow_mut()[slot as usize].state = State::Ready;
            self.changed.wake_all();
            return Ok(pin);
        }
    }

    fn discard_slot(&self, slot: u32) {
        let mut slots = self.slots.borrow_mut();
        let s = &mut slots[slot as usize];
        let mut index = self.index.borrow_mut();
        if index.get(s.key) == Some(slot) {
            index.remove(s.key);
        }
        if s.dirty {
            self.dirty_count.set(self.dirty_count.get() - 1);
        }
        s.state = State::Free;
        s.pins = 0;
        s.dirty = false;
        s.key = u64::MAX;
    }

    /// Records that slice `key` now lives at `host` (its table was copied on write).
    pub(crate) fn rehost(&self, key: u64, host: u64) {
        if let Some((slot, _)) = self.resident(key) {
            self.slots.borrow_mut()[slot as usize].host = host;
        }
    }

    /// Takes the writeback lock: snapshots are taken and written under it, so writes
    /// of one slice never overtake each other on disk.
    pub(crate) async fn lock_writeback(&self) -> WritebackGuard<'_> {
        while self.writeback_held.get() {
            self.writeback_waiters.wait().await;
        }
        self.writeback_held.set(true);
        self.evicted.set(false);
        WritebackGuard(self)
    }

    /// Dirty slots, up to `max`, into `out` (cleared first).
    pub(crate) fn dirty_slots(&self, out: &mut Vec<u32>, max: usize) {
        out.clear();
        for (i, s) in self.slots.borrow().iter().enumerate() {
            if s.dirty && s.state == State::Ready {
                out.push(i as u32);
                if out.len() == max {
                    break;
                }
            }
        }
    }

    /// Copies a dirty slot for writeback.
    pub(crate) async fn snapshot(&self, slot: u32) -> Result<Snapshot, IoError> {
        let mut buf =
            poller::dma::alloc_wait(self.slice_bytes).await.map_err(|_| IoError::TooLarge)?;
        debug_assert!(self.writeback_held.get(), "snapshot outside the writeback lock");
        let (host, mods) = {
            let mut slots = self.slots.borrow_mut();
            let s = &mut slots[slot as usize];
            debug_assert!(!s.writing, "two snapshots of one slot in flight");
            s.writing = true;
            // Pinned until written: the slot cannot be evicted and reused meanwhile.
            s.pins += 1;
            (s.host, s.mods)
        };
        // SAFETY: the slot lies inside the mapping; copying on the owning thread.
        let src = unsafe {
            std::slice::from_raw_parts(
                self.base.as_ptr().add(slot as usize * self.slice_bytes),
                self.slice_bytes,
            )
        };
        buf.as_mut_slice().copy_from_slice(src);
        Ok(Snapshot { slot, host, mods, buf })
    }

    /// Ends a snapshot's writeback. If it reached the disk (`ok`), the slot is clean
    /// unless it changed since (or moved: then the snapshot went to the old place).
    pub(crate) fn written(&self, snap: &Snapshot, ok: bool) {
        let mut slots = self.slots.borrow_mut();
        let s = &mut slots[snap.slot as usize];
        debug_assert!(s.writing && s.pins > 0);
        s.writing = false;
        s.pins -= 1;
        if ok && s.dirty && s.mods == snap.mods && s.host == snap.host {
            s.dirty = false;
            self.dirty_count.set(self.dirty_count.get() - 1);
        }
        drop(slots);
        self.changed.wake_all();
    }

    /// Waits until some slot may have become evictable.
    pub(crate) async fn wait_change(&self) {
        self.changed.wait().await
    }
}

impl Drop for MetaCache {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping made in `new`, once; no Pin outlives the cache.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.map_len) };
    }
}
