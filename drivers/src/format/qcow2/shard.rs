//! A shard: the part of an open qcow2 image that one reactor owns — the L2 and
//! refcount caches, the allocator, the flush barrier — and the request algorithms.
//! With one reactor (or one shard per image, as now) it owns the whole image; the
//! request code does not change when the guest space is split over several shards.
//!
//! # Ordering rules, and where they are enforced
//! 1. *Data and COW before the L2 entry that points at them*: L2 slices reach the disk
//!    only in [`Shard::flush`], after an fdatasync that follows the snapshot of the
//!    dirty L2 slices; an entry is linked into a slice only after its data write
//!    completed, so every linked entry's data is covered by that fdatasync.
//! 2. *Refcount increases before the L2/L1 entries that use them*: a cluster's refcount
//!    is raised in the cache before its data is written; the flush snapshots L2 slices
//!    first, then refcount slices (so every increment an L2 snapshot depends on is in
//!    the refcount snapshot), writes refcounts, syncs, then writes L2. A new L2 table
//!    is hooked into L1 only after its refcount and contents are synced.
//! 3. *An L2 entry removed on disk before the refcount that freed its cluster drops*:
//!    frees are queued and applied to the refcount cache only after a flush has made
//!    the L2 change durable; a freed cluster cannot be reused before that, nor while an
//!    in-place write to it is still in flight.
//! 4. *New refcount blocks and tables written and synced before they are hooked in*;
//!    header switches are single small writes; the old table is freed last. An L2
//!    table copied on write (shared with a snapshot) moves in one step: its L1 entry
//!    in memory and the home of its cached slices change together, with no await in
//!    between, so no writeback of a slice ever lands in the table the snapshot keeps
//!    (and the cache asks where a slice lives when it fills a slot, not when the
//!    caller looked it up).
//! 5. *Lazy refcounts*: the dirty bit is written and synced before the first
//!    allocation; refcount blocks then reach the disk only at shutdown (or when their
//!    cache fills); a clean shutdown runs flush rounds until no free is pending and no
//!    refcount slice is dirty, syncs and clears the bit.
//! 6. *Flush is a barrier*: concurrent flush requests are coalesced into rounds, and a
//!    request returns only after a round that started after it has completed.

use std::cell::{Cell, RefCell};
use std::pin::Pin as StdPin;
use std::task::Poll;

use poller::WaitList;

use crate::error::IoError;
use crate::seg::{self, IoSeg, window};

use super::cache::{GetError, Snapshot};
use super::layer::{Layer, MAX_SEGS, Qcow2Layer, Run, RunKind, corrupt, read_chain, status_chain};
use super::overlap::MetaMap;
use super::refcount::Refcounts;
use super::types::*;

/// Dirty slices written per flush round.
const FLUSH_BATCH: usize = 1024;
/// Concurrent metadata writes within a round.
const WRITE_FANOUT: usize = 16;
/// Flush rounds a clean shutdown runs at most (two suffice: see `Shard::close`).
const CLOSE_ROUNDS: usize = 4;
/// Pending frees that force a flush.
const MAX_PENDING_FREES: usize = 8192;
/// Free clusters scanned per allocation before settling for a shorter run.
const SCAN_LIMIT: u64 = 1 << 16;
/// The image file grows ahead of allocation by an eighth of its size, within these
/// bounds, so allocating writes land inside the file (see `ensure_file_len`).
const GROW_MIN: u64 = 16 << 20;
const GROW_MAX: u64 = 1 << 30;

/// A run of free clusters found by `find_free`.
struct FreeRun {
    start: u64,
    len: u64,
    /// The first free cluster the search met (the run's start, or before it).
    first_free: u64,
}

/// A cluster to release once the L2 change that dropped it is durable.
#[derive(Clone, Copy, Debug)]
struct PendingFree {
    cluster: u64,
    /// `Shard::snap_gen` when queued.
    generation: u64,
    /// Punch a hole in the file once free (guest discards).
    punch: bool,
}

/// Guest cluster ranges whose mapping is being changed.
struct ClusterLocks {
    held: RefCell<Vec<(u64, u64)>>,
    waiters: WaitList,
}

struct ClusterGuard<'a> {
    locks: &'a ClusterLocks,
    range: (u64, u64),
}

impl Drop for ClusterGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.locks.held.borrow_mut();
        if let Some(i) = held.iter().position(|r| *r == self.range) {
            held.swap_remove(i);
        }
        drop(held);
        self.locks.waiters.wake_all();
    }
}

impl ClusterLocks {
    async fn lock(&self, start: u64, end: u64) -> ClusterGuard<'_> {
        loop {
            let busy = self.held.borrow().iter().any(|&(s, e)| s < end && start < e);
            if !busy {
                self.held.borrow_mut().push((start, end));
                return ClusterGuard { locks: self, range: (start, end) };
            }
            self.waiters.wait().await;
        }
    }
}

/// A lock for rare metadata updates (L1 entries, refcount table, header).
struct MetaLock {
    held: Cell<bool>,
    waiters: WaitList,
}

struct MetaGuard<'a>(&'a MetaLock);

impl Drop for MetaGuard<'_> {
    fn drop(&mut self) {
        self.0.held.set(false);
        self.0.waiters.wake_all();
    }
}

impl MetaLock {
    async fn lock(&self) -> MetaGuard<'_> {
        while self.held.get() {
            self.waiters.wait().await;
        }
        self.held.set(true);
        MetaGuard(self)
    }
}

/// Host ranges of in-place data writes in flight.
struct Inflight {
    slots: RefCell<Vec<Option<(u64, u64)>>>,
    free: RefCell<Vec<usize>>,
}

impl Inflight {
    fn begin(&self, host: u64, len: u64) -> usize {
        let i = self.free.borrow_mut().pop();
        let mut slots = self.slots.borrow_mut();
        match i {
            Some(i) => {
                slots[i] = Some((host, len));
                i
            }
            None => {
                slots.push(Some((host, len)));
                slots.len() - 1
            }
        }
    }
    fn end(&self, i: usize) {
        self.slots.borrow_mut()[i] = None;
        self.free.borrow_mut().push(i);
    }
    fn overlaps(&self, host: u64, len: u64) -> bool {
        self.slots.borrow().iter().flatten().any(|&(h, l)| h < host + len && host < h + l)
    }
}

struct FlushState {
    requested: Cell<u64>,
    completed: Cell<u64>,
    running: Cell<bool>,
    result: Cell<Result<(), IoError>>,
    done: WaitList,
}

/// The owner-reactor state of an open image.
pub(crate) struct Shard {
    pub name: String,
    /// `chain[0]` is this image (a qcow2 layer); the rest is its backing chain.
    pub chain: Vec<Layer>,
    pub rc: Refcounts,
    pub read_only: bool,
    lazy: bool,
    corrupt: Cell<bool>,
    corrupt_marked: Cell<bool>,
    dirty_bit_on_disk: Cell<bool>,
    incompatible: Cell<u64>,
    locks: ClusterLocks,
    /// L1 entry changes (new or copied L2 tables). Taken before `rc_lock`.
    l1_lock: MetaLock,
    /// Refcount structure changes (new blocks, table growth).
    rc_lock: MetaLock,
    /// Serialises allocations: the free-cluster search awaits refcount reads, and two
    /// searches interleaved would hand out the same clusters.
    alloc_lock: MetaLock,
    /// Header field changes (the dirty bit).
    header_lock: MetaLock,
    /// One file extension at a time.
    grow_lock: MetaLock,
    cursor: Cell<u64>,
    host_end: Cell<u64>,
    pending: RefCell<Vec<PendingFree>>,
    snap_gen: Cell<u64>,
    inflight: Inflight,
    flush_state: FlushState,
    scratch: RefCell<Vec<u32>>,
    snaps: RefCell<Vec<Snapshot>>,
    allocations: Cell<u64>,
    l1_table_offset: Cell<u64>,
    /// Host clusters holding metadata (see `overlap`).
    pub meta: MetaMap,
}

impl Shard {
    pub(crate) fn new(
        name: String,
        chain: Vec<Layer>,
        rc: Refcounts,
        read_only: bool,
        lazy: bool,
        incompatible: u64,
        file_end: u64,
    ) -> Shard {
        let cb = rc.g.cluster_bits;
        Shard {
            name,
            chain,
            rc,
            read_only,
            lazy,
            corrupt: Cell::new(false),
            corrupt_marked: Cell::new(false),
            dirty_bit_on_disk: Cell::new(incompatible & INCOMPAT_DIRTY != 0),
            incompatible: Cell::new(incompatible),
            locks: ClusterLocks {
                held: RefCell::new(Vec::with_capacity(1024)),
                waiters: WaitList::new(),
            },
            l1_lock: MetaLock { held: Cell::new(false), waiters: WaitList::new() },
            rc_lock: MetaLock { held: Cell::new(false), waiters: WaitList::new() },
            alloc_lock: MetaLock { held: Cell::new(false), waiters: WaitList::new() },
            header_lock: MetaLock { held: Cell::new(false), waiters: WaitList::new() },
            grow_lock: MetaLock { held: Cell::new(false), waiters: WaitList::new() },
            cursor: Cell::new(0),
            host_end: Cell::new(file_end.div_ceil(1 << cb)),
            pending: RefCell::new(Vec::with_capacity(MAX_PENDING_FREES)),
            snap_gen: Cell::new(0),
            inflight: Inflight {
                slots: RefCell::new(Vec::with_capacity(1024)),
                free: RefCell::new(Vec::with_capacity(1024)),
            },
            flush_state: FlushState {
                requested: Cell::new(0),
                completed: Cell::new(0),
                running: Cell::new(false),
                result: Cell::new(Ok(())),
                done: WaitList::new(),
            },
            scratch: RefCell::new(Vec::with_capacity(FLUSH_BATCH)),
            snaps: RefCell::new(Vec::with_capacity(FLUSH_BATCH)),
            allocations: Cell::new(0),
            l1_table_offset: Cell::new(0),
            meta: MetaMap::default(),
        }
    }

    pub(crate) fn top(&self) -> &Qcow2Layer {
        match &self.chain[0] {
            Layer::Qcow2(q) => q,
            Layer::Raw { .. } => unreachable!("the top layer of a shard is qcow2"),
        }
    }

    fn g(&self) -> Geometry {
        self.rc.g
    }

    /// (L2 hits, L2 misses, refcount hits, refcount misses, clusters allocated).
    pub(crate) fn stats(&self) -> (u64, u64, u64, u64, u64) {
        let (a, b) = self.top().l2.stats();
        let (c, d) = self.rc.cache.stats();
        (a, b, c, d, self.allocations.get())
    }

    fn fail(&self, what: std::fmt::Arguments<'_>) -> IoError {
        self.corrupt.set(true);
        corrupt(&self.name, what)
    }

    /// Marks the image corrupt before any request (an inconsistency found at open).
    pub(crate) fn mark_corrupt_at_open(&self, what: &str) {
        tracing::error!(
            image = self.name,
            "{what}; writes are refused (repair with `appliance check -r all`)"
        );
        self.corrupt.set(true);
    }

    /// Fails (marking the image corrupt) if host clusters `first..first + n` hold
    /// metadata: a data write there would destroy it.
    fn guard_data(&self, first: u64, n: u64) -> Result<(), IoError> {
        match self.meta.first_in(first, n) {
            None => Ok(()),
            Some(c) => Err(self.fail(format_args!(
                "a data write would overwrite metadata in cluster {c} (refcounts or tables are inconsistent)"
            ))),
        }
    }

    fn check_writable(&self) -> Result<(), IoError> {
        if self.read_only {
            return Err(IoError::ReadOnly);
        }
        if self.corrupt.get() {
            return Err(IoError::Corrupt);
        }
        Ok(())
    }

    // --- mapping ------------------------------------------------------------------

    /// Maps on the top layer, flushing when the cache is full of dirty slices.
    async fn map_top(&self, off: u64, max: u64) -> Result<Run, IoError> {
        loop {
            match self.top().map(off, max).await {
                Ok(r) => return Ok(r),
                Err(GetError::Io(e)) => {
                    if e == IoError::Corrupt {
                        self.corrupt.set(true);
                    }
                    return Err(e);
                }
                Err(GetError::Full) => self.flush_now(false).await?,
            }
        }
    }

    // --- reads --------------------------------------------------------------------

    pub(crate) async fn read(&self, off: u64, segs: &[IoSeg<'_>]) -> Result<(), IoError> {
        let r = loop {
            match read_chain(&self.chain, 0, off, segs).await {
                Err(IoError::Os(libc::EAGAIN)) => self.flush_now(false).await?,
                r => break r,
            }
        };
        self.signal_if_corrupt(r).await
    }

    /// On a corruption error: stop writing, and set the image's corrupt bit (as QEMU
    /// does) so no tool trusts it until it is checked.
    pub(crate) async fn signal_if_corrupt<T>(&self, r: Result<T, IoError>) -> Result<T, IoError> {
        if r.as_ref().err() == Some(&IoError::Corrupt)
            && !self.read_only
            && !self.corrupt_marked.replace(true)
        {
            self.corrupt.set(true);
            tracing::error!(
                image = self.name,
                "marking the image corrupt; it stays read-only until repaired (appliance check --repair all)"
            );
            let v = self.incompatible.get() | INCOMPAT_CORRUPT;
            if self.write_u64(OFF_INCOMPATIBLE, v).await.is_ok() {
                let _ = self.top().io.flush().await;
                self.incompatible.set(v);
            }
        }
        r
    }

    pub(crate) async fn block_status(
        &self,
        off: u64,
        len: u64,
    ) -> Result<(u64, bool, bool), IoError> {
        let run = self.map_top(off, len).await?;
        Ok(match run.kind {
            RunKind::Data { .. } | RunKind::Compressed { .. } => (run.len, true, false),
            RunKind::Zero { .. } => (run.len, false, true),
            RunKind::Unallocated if self.chain.len() > 1 => {
                status_chain(&self.chain, 1, off, run.len).await?
            }
            RunKind::Unallocated => (run.len, false, true),
        })
    }

    // --- writes -------------------------------------------------------------------

    pub(crate) async fn write(
        &self,
        off: u64,
        segs: &[IoSeg<'_>],
        fua: bool,
    ) -> Result<(), IoError> {
        self.check_writable()?;
        let total = seg::total_len(segs) as u64;
        let mut done = 0u64;
        let mut win = [IoSeg::EMPTY; MAX_SEGS];
        while done < total {
            let pos = off + done;
            let run = self.map_top(pos, total - done).await?;
            match run.kind {
                RunKind::Data { host, copied: true } => {
                    let w = window(segs, done as usize, run.len as usize, &mut win)?;
                    self.write_in_place(host, w).await?;
                    done += run.len;
                }
                _ => done += self.write_alloc(pos, run.len, segs, done as usize).await?,
            }
        }
        if fua {
            self.flush().await?;
        }
        Ok(())
    }

    async fn write_in_place(&self, host: u64, w: &[IoSeg<'_>]) -> Result<(), IoError> {
        let len = seg::total_len(w) as u64;
        let cb = self.g().cluster_bits;
        let (first, last) = (host >> cb, (host + len.max(1) - 1) >> cb);
        self.guard_data(first, last - first + 1)?;
        // A consistent image never maps a cluster it has not allocated: past the end
        // of the file, nothing counts the cluster, and two entries may share it.
        if last >= self.host_end.get() {
            return Err(self.fail(format_args!(
                "an L2 entry maps host cluster {last}, past the end of the image"
            )));
        }
        let t = self.inflight.begin(host, len);
        let r = self.top().io.write(host, w, false).await;
        self.inflight.end(t);
        r
    }

    /// Writes `len` bytes at `pos` into clusters that need allocation (or whose
    /// mapping changed meanwhile). Returns the bytes handled.
    async fn write_alloc(
        &self,
        pos: u64,
        len: u64,
        segs: &[IoSeg<'_>],
        seg_off: usize,
    ) -> Result<u64, IoError> {
        let g = self.g();
        let cb = g.cluster_bits;
        let cs = g.cluster_size();
        let c0 = pos >> cb;
        let c1 = ((pos + len - 1) >> cb) + 1;
        let _guard = self.locks.lock(c0, c1).await;
        self.ensure_dirty_bit().await?;
        let run = self.map_top(pos, len).await?;
        let mut len = run.len;
        let mut win = [IoSeg::EMPTY; MAX_SEGS];
        if let RunKind::Data { host, copied: true } = run.kind {
            let w = window(segs, seg_off, len as usize, &mut win)?;
            self.write_in_place(host, w).await?;
            return Ok(len);
        }
        let mut c1 = ((pos + len - 1) >> cb) + 1;
        self.ensure_l2(pos).await?;
        let (host, got, fresh) = self.alloc_run(c1 - c0).await?;
        if got < c1 - c0 {
            c1 = c0 + got;
            len = (c1 << cb) - pos;
        }
        let head = pos - (c0 << cb);
        let tail = (c1 << cb) - (pos + len);
        // The clusters' old content is zeros (nothing below this image, no data in
        // it) and the new clusters already read as zeros (never written): only the
        // request's bytes need writing, not whole clusters of padding — a 4 KiB write
        // into a fresh 64 KiB cluster costs 4 KiB, as in QEMU.
        let zeros_below = self.chain.len() == 1
            && matches!(run.kind, RunKind::Unallocated | RunKind::Zero { .. });
        if fresh && zeros_below && (head > 0 || tail > 0) {
            let w = window(segs, seg_off, len as usize, &mut win)?;
            if let Err(e) = self.top().io.write(host + head, w, false).await {
                self.release_unlinked(host, got).await;
                return Err(e);
            }
            // Rule 1: the data is written; only now may an L2 entry point at it.
            self.link(c0, c1, host).await?;
            self.maybe_writeback().await?;
            return Ok(len);
        }
        let mut head_buf = None;
        let mut tail_buf = None;
        let cow = async {
            if head > 0 {
                let mut b =
                    poller::dma::alloc_wait(head as usize).await.map_err(|_| IoError::TooLarge)?;
                self.read(c0 << cb, &[IoSeg::from_dma(&mut b)]).await?;
                head_buf = Some(b);
            }
            if tail > 0 {
                let mut b =
                    poller::dma::alloc_wait(tail as usize).await.map_err(|_| IoError::TooLarge)?;
                self.read(pos + len, &[IoSeg::from_dma(&mut b)]).await?;
                tail_buf = Some(b);
            }
            Ok::<(), IoError>(())
        };
        if let Err(e) = cow.await {
            self.release_unlinked(host, got).await;
            return Err(e);
        }
        let mut iov = [IoSeg::EMPTY; MAX_SEGS];
        let mut n = 0;
        if let Some(b) = head_buf.as_mut() {
            iov[n] = IoSeg::from_dma(b);
            n += 1;
        }
        for s in window(segs, seg_off, len as usize, &mut win)? {
            if n == MAX_SEGS - 1 {
                self.release_unlinked(host, got).await;
                return Err(IoError::TooLarge);
            }
            iov[n] = *s;
            n += 1;
        }
        if let Some(b) = tail_buf.as_mut() {
            iov[n] = IoSeg::from_dma(b);
            n += 1;
        }
        debug_assert_eq!(seg::total_len(&iov[..n]) as u64, (c1 - c0) * cs);
        if let Err(e) = self.top().io.write(host, &iov[..n], false).await {
            self.release_unlinked(host, got).await;
            return Err(e);
        }
        // Rule 1: the data is written; only now may an L2 entry point at it.
        self.link(c0, c1, host).await?;
        self.maybe_writeback().await?;
        Ok(len)
    }

    /// Points guest clusters `c0..c1` (within one L2 slice) at host clusters from
    /// `host`, queueing frees for what they pointed at before.
    async fn link(&self, c0: u64, c1: u64, host: u64) -> Result<(), IoError> {
        let g = self.g();
        let top = self.top();
        let Some((key, slice_host)) = top.slice_of(c0 << g.cluster_bits)? else {
            return Err(self.fail(format_args!("L2 table vanished while linking cluster {c0}")));
        };
        let pin = loop {
            match top
                .l2
                .get(&top.io, key, || top.slice_host(key).unwrap_or(slice_host), false)
                .await
            {
                Ok(p) => break p,
                Err(GetError::Full) => self.flush_now(false).await?,
                Err(GetError::Io(e)) => return Err(e),
            }
        };
        let mask = (1u64 << top.slice_bits) - 1;
        for (i, c) in (c0..c1).enumerate() {
            let idx = (c & mask) as usize;
            let old = L2Entry::decode(pin.get_u64(idx), &g).map_err(|e| {
                self.fail(format_args!("L2 entry of cluster {c} invalid while linking: {e:?}"))
            })?;
            let new = L2Entry::Normal { host: host + ((i as u64) << g.cluster_bits), copied: true };
            pin.set_u64(idx, new.encode());
            self.release_entry(old, false);
        }
        Ok(())
    }

    /// Queues the clusters an old entry held for release.
    fn release_entry(&self, old: L2Entry, punch: bool) {
        let g = self.g();
        match old {
            L2Entry::Normal { host, .. } | L2Entry::Zero { host: Some(host), .. } => {
                self.queue_free(host >> g.cluster_bits, punch)
            }
            L2Entry::Compressed { host, max_len } => {
                let (first, count) = compressed_clusters(host, max_len, &g);
                for k in 0..count {
                    self.queue_free((first >> g.cluster_bits) + k, false);
                }
            }
            L2Entry::Unallocated | L2Entry::Zero { host: None, .. } => {}
        }
    }

    fn queue_free(&self, cluster: u64, punch: bool) {
        if cluster >= self.host_end.get() || cluster == 0 {
            // Never allocated: freeing it later could free whatever the allocator
            // puts there meanwhile.
            let _ = self.fail(format_args!(
                "an entry frees host cluster {cluster}, which the image never allocated"
            ));
            return;
        }
        self.pending.borrow_mut().push(PendingFree {
            cluster,
            generation: self.snap_gen.get(),
            punch,
        });
    }

    /// Flushes when metadata piles up (half the L2 cache dirty, many pending frees).
    async fn maybe_writeback(&self) -> Result<(), IoError> {
        let l2 = &self.top().l2;
        if l2.dirty_count() * 2 > l2.capacity()
            || self.rc.cache.dirty_count() * 2 > self.rc.cache.capacity()
            || self.pending.borrow().len() >= MAX_PENDING_FREES / 2
        {
            self.flush_now(false).await?;
        }
        Ok(())
    }

    // --- L2 tables ----------------------------------------------------------------

    /// Makes sure the L2 table covering `guest_off` exists and is not shared.
    async fn ensure_l2(&self, guest_off: u64) -> Result<(), IoError> {
        let g = self.g();
        let top = self.top();
        let l1i = (guest_off >> (g.cluster_bits + g.l2_bits())) as usize;
        let current = |s: &Self| -> Result<(u64, bool), IoError> {
            let raw = s.top().l1.borrow()[l1i];
            decode_l1(raw, &g)
                .map_err(|e| s.fail(format_args!("L1 entry {l1i} ({raw:#x}) invalid: {e:?}")))
        };
        if let (off, true) = current(self)?
            && off != 0
        {
            return Ok(());
        }
        let _m = self.l1_lock.lock().await;
        let (old, copied) = current(self)?;
        if old != 0 && copied {
            return Ok(());
        }
        let cs = g.cluster_size() as usize;
        let (new, _) = self.alloc(1).await?;
        let mut buf = poller::dma::alloc_wait(cs).await.map_err(|_| IoError::TooLarge)?;
        if old == 0 {
            buf.as_mut_slice().fill(0);
        } else {
            // Copy on write of a table shared with a snapshot: the entries keep their
            // meaning; the data clusters' refcounts already count both views.
            top.io.read(old, &[IoSeg::from_dma(&mut buf)]).await?;
        }
        if let Err(e) = top.io.write(new, &[IoSeg::from_dma(&mut buf)], false).await {
            self.release_unlinked(new, 1).await;
            return Err(e);
        }
        // Rules 1, 2 and 4: the new table and its refcount are durable before L1
        // points at it.
        self.write_back_refcounts().await?;
        top.io.flush().await?;
        let entry = new | OFLAG_COPIED;
        self.meta.mark(new >> g.cluster_bits, 1);
        // The switch, with no await inside it: once the L1 entry says the table is
        // `new`, writers link entries into its cached slices at once, so those slices
        // must already write back to `new`. A writeback still aimed at `old` would
        // overwrite the table the snapshot keeps.
        top.l1.borrow_mut()[l1i] = entry;
        if old != 0 {
            let slices = 1u64 << (g.l2_bits() - top.slice_bits);
            let first = (l1i as u64) * slices;
            for k in 0..slices {
                top.l2.rehost(first + k, new + k * top.l2.slice_bytes() as u64);
            }
        }
        let l1_off = self.l1_offset() + l1i as u64 * 8;
        self.write_u64(l1_off, entry).await?;
        if old != 0 {
            self.queue_free(old >> g.cluster_bits, false);
        }
        Ok(())
    }

    fn l1_offset(&self) -> u64 {
        self.l1_table_offset.get()
    }

    /// Writes one big-endian u64 (an L1 entry, a refcount table entry, a header field).
    async fn write_u64(&self, off: u64, v: u64) -> Result<(), IoError> {
        let mut b = v.to_be_bytes();
        self.top().io.write(off, &[IoSeg::new(&mut b)], false).await
    }

    // --- allocation ---------------------------------------------------------------

    /// Allocates up to `n` contiguous clusters (at least one) with refcount 1; returns
    /// (host offset, count).
    pub(crate) async fn alloc(&self, n: u64) -> Result<(u64, u64), IoError> {
        self.alloc_run(n).await.map(|(off, got, _)| (off, got))
    }

    /// [`Shard::alloc`], also saying whether the run is fresh: past every cluster this
    /// file ever held (its end at open and every allocation since), so never written
    /// and reading as zeros (a hole, or past the end of the file).
    async fn alloc_run(&self, n: u64) -> Result<(u64, u64, bool), IoError> {
        let _a = self.alloc_lock.lock().await;
        let g = self.g();
        let cursor = self.cursor.get();
        let mut from = cursor.max(1);
        let mut lowest_free = u64::MAX;
        loop {
            let f = self.find_free(from, n).await?;
            lowest_free = lowest_free.min(f.first_free);
            if self.ensure_coverage(f.start, f.len).await? {
                // The new block may sit in the run: look again from the run's start
                // (its first cluster is the block itself when the run began in the
                // uncovered range, so this terminates).
                from = f.start;
                continue;
            }
            // A free cluster holding metadata means the refcounts lie.
            self.guard_data(f.start, f.len)?;
            for c in f.start..f.start + f.len {
                self.set_refcount(c, 1).await?;
            }
            // Everything from the cursor to the first free cluster seen is in use now
            // (unless a free lowered the cursor meanwhile: then it stays).
            let first_free = if lowest_free == f.start { f.start + f.len } else { lowest_free };
            if self.cursor.get() == cursor {
                self.cursor.set(first_free.max(cursor));
            }
            self.ensure_file_len((f.start + f.len) << g.cluster_bits).await?;
            let fresh = f.start >= self.host_end.get();
            self.host_end.set(self.host_end.get().max(f.start + f.len));
            self.allocations.set(self.allocations.get() + f.len);
            return Ok((f.start << g.cluster_bits, f.len, fresh));
        }
    }

    /// Grows the image file (sparsely) so it holds `end` bytes, by a margin: writes
    /// into newly allocated clusters then land inside the file. A direct write that
    /// extends a file serialises on its inode (and hands the work to io_uring's kernel
    /// workers, which then spin on the lock on a busy reactor's core); inside the file
    /// they proceed in parallel. The margin is never counted by refcounts: a file
    /// longer than its last cluster is valid qcow2.
    async fn ensure_file_len(&self, end: u64) -> Result<(), IoError> {
        let io = &self.top().io;
        if end <= io.size() {
            return Ok(());
        }
        let _g = self.grow_lock.lock().await;
        let cur = io.size();
        if end <= cur {
            return Ok(());
        }
        let cs = self.g().cluster_size();
        let target = end.max(cur + (cur / 8).clamp(GROW_MIN, GROW_MAX)).div_ceil(cs) * cs;
        io.grow_to(target).await
    }

    /// Refcount of `cluster` (0 when no block covers it).
    async fn refcount(&self, cluster: u64) -> Result<u64, IoError> {
        let Some(Ok(loc)) = self.rc.locate(cluster) else { return Ok(0) };
        loop {
            match self.rc.pin(&self.top().io, &loc).await {
                Ok(p) => return Ok(self.rc.read(&p, &loc)),
                // Writing refcount slices early is always safe: increments may reach the
                // disk before the tables using them, and every decrement in the cache
                // already has its L2 change on disk (see `apply_frees`).
                Err(GetError::Full) => self.write_back_refcounts().await?,
                Err(GetError::Io(e)) => return Err(e),
            }
        }
    }

    async fn set_refcount(&self, cluster: u64, v: u64) -> Result<(), IoError> {
        let Some(Ok(loc)) = self.rc.locate(cluster) else {
            return Err(self.fail(format_args!("no refcount block covers cluster {cluster}")));
        };
        loop {
            match self.rc.pin(&self.top().io, &loc).await {
                Ok(p) => {
                    return if self.rc.write(&p, &loc, v) {
                        Ok(())
                    } else {
                        Err(self.fail(format_args!("refcount of cluster {cluster} would overflow")))
                    };
                }
                Err(GetError::Full) => self.write_back_refcounts().await?,
                Err(GetError::Io(e)) => return Err(e),
            }
        }
    }

    /// Finds a run of free clusters, at most `n` long, first-fit from `from`.
    ///
    /// A run ends where refcount-block coverage ends: clusters past the last block (or
    /// under an empty table entry) are free, but their block must be placed first, and
    /// it goes at the first cluster it covers. Ending runs there keeps the new block
    /// at the start of a run, so placing it never splits the run the search returned
    /// (which, with 64 clusters per block, would chain block after block).
    async fn find_free(&self, from: u64, n: u64) -> Result<FreeRun, IoError> {
        let per = self.rc.block_entries();
        let mut c = from.max(1);
        let mut run_start = c;
        let mut run = 0u64;
        let mut scanned = 0u64;
        let mut first_free = None;
        loop {
            if run == n || (run > 0 && scanned >= SCAN_LIMIT) {
                break;
            }
            if run > 0 && c.is_multiple_of(per) && !matches!(self.rc.locate(c), Some(Ok(_))) {
                break;
            }
            let free = self.refcount(c).await? == 0;
            if free {
                first_free.get_or_insert(c);
                if run == 0 {
                    run_start = c;
                }
                run += 1;
            } else {
                run = 0;
            }
            c += 1;
            scanned += 1;
        }
        Ok(FreeRun { start: run_start, len: run, first_free: first_free.unwrap_or(run_start) })
    }

    /// Creates refcount blocks (and grows the table) so `start..start+n` is covered.
    /// Returns true if metadata was placed (the caller searches again).
    async fn ensure_coverage(&self, start: u64, n: u64) -> Result<bool, IoError> {
        let per = self.rc.block_entries();
        let last_ti = (start + n - 1) / per;
        if last_ti >= self.rc.table_len() {
            self.grow_refcount_table(last_ti + 1).await?;
            return Ok(true);
        }
        let mut placed = false;
        for ti in start / per..=last_ti {
            if self.rc.table.borrow()[ti as usize] & !REFT_RESERVED == 0 {
                self.create_refblock(ti).await?;
                placed = true;
            }
        }
        Ok(placed)
    }

    /// A new refcount block for table entry `ti`, describing itself from the first
    /// cluster of the range it covers (free, since nothing counts it yet).
    async fn create_refblock(&self, ti: u64) -> Result<(), IoError> {
        let _m = self.rc_lock.lock().await;
        if self.rc.table.borrow()[ti as usize] != 0 {
            return Ok(());
        }
        let g = self.g();
        let top = self.top();
        let block_cluster = ti * self.rc.block_entries();
        self.guard_data(block_cluster, 1)?;
        let host = block_cluster << g.cluster_bits;
        self.ensure_file_len(host + g.cluster_size()).await?;
        let mut buf = poller::dma::alloc_wait(g.cluster_size() as usize)
            .await
            .map_err(|_| IoError::TooLarge)?;
        buf.as_mut_slice().fill(0);
        set_refcount(buf.as_mut_slice(), 0, g.refcount_order, 1);
        top.io.write(host, &[IoSeg::from_dma(&mut buf)], false).await?;
        // Rule 4: written and synced before it is hooked into the table.
        top.io.flush().await?;
        self.meta.mark(block_cluster, 1);
        self.rc.table.borrow_mut()[ti as usize] = host;
        self.write_u64(self.rc.table_offset.get() + ti * 8, host).await?;
        self.host_end.set(self.host_end.get().max(block_cluster + 1));
        Ok(())
    }

    /// Grows the refcount table to at least `min_entries`: a new table and the blocks
    /// that describe it go at the end of the file, are written and synced, then the
    /// header switches to the new table in one write, and the old table is freed.
    async fn grow_refcount_table(&self, min_entries: u64) -> Result<(), IoError> {
        let _m = self.rc_lock.lock().await;
        let g = self.g();
        let top = self.top();
        let cs = g.cluster_size();
        let per = self.rc.block_entries();
        let old_len = self.rc.table_len();
        if old_len >= min_entries {
            return Ok(());
        }
        let entries_per_cluster = cs / 8;
        let new_len =
            min_entries.max(old_len * 2).div_ceil(entries_per_cluster) * entries_per_cluster;
        if new_len * 8 > MAX_REFTABLE_BYTES {
            return Err(IoError::NoSpace);
        }
        let table_clusters = new_len * 8 / cs;
        let start = self.host_end.get();
        // Blocks needed for the area [start, start + T + R) whose table entries are empty.
        let missing = |end: u64, table: &[u64]| -> Vec<u64> {
            (start / per..=(end - 1) / per)
                .filter(|&ti| ti >= old_len || table[ti as usize] & !REFT_RESERVED == 0)
                .collect()
        };
        let mut blocks: Vec<u64> = Vec::new();
        loop {
            let end = start + table_clusters + blocks.len() as u64;
            let m = missing(end, &self.rc.table.borrow());
            if m.len() == blocks.len() {
                blocks = m;
                break;
            }
            blocks = m;
        }
        let area_end = start + table_clusters + blocks.len() as u64;
        if area_end >= new_len * per {
            return Err(IoError::NoSpace);
        }
        self.ensure_file_len(area_end << g.cluster_bits).await?;
        // Area clusters covered by existing blocks: counted through the cache, and
        // written with the other dirty refcounts below.
        for c in start..area_end {
            let ti = c / per;
            if ti < old_len && self.rc.table.borrow()[ti as usize] & !REFT_RESERVED != 0 {
                self.set_refcount(c, 1).await?;
            }
        }
        let mut new_table = self.rc.table.borrow().clone();
        new_table.resize(new_len as usize, 0);
        for (k, &ti) in blocks.iter().enumerate() {
            let block_cluster = start + table_clusters + k as u64;
            new_table[ti as usize] = block_cluster << g.cluster_bits;
            let mut buf =
                poller::dma::alloc_wait(cs as usize).await.map_err(|_| IoError::TooLarge)?;
            buf.as_mut_slice().fill(0);
            for c in start..area_end {
                if c / per == ti {
                    set_refcount(buf.as_mut_slice(), (c % per) as usize, g.refcount_order, 1);
                }
            }
            top.io
                .write(block_cluster << g.cluster_bits, &[IoSeg::from_dma(&mut buf)], false)
                .await?;
        }
        let mut tbuf = poller::dma::alloc_wait((table_clusters * cs) as usize)
            .await
            .map_err(|_| IoError::TooLarge)?;
        for (i, e) in new_table.iter().enumerate() {
            set_be64_at(tbuf.as_mut_slice(), i, *e);
        }
        top.io.write(start << g.cluster_bits, &[IoSeg::from_dma(&mut tbuf)], false).await?;
        self.write_back_refcounts().await?;
        top.io.flush().await?;
        // One write switches the header to the new table.
        let mut hdr = [0u8; 12];
        hdr[..8].copy_from_slice(&(start << g.cluster_bits).to_be_bytes());
        hdr[8..].copy_from_slice(&(table_clusters as u32).to_be_bytes());
        top.io.write(OFF_REFCOUNT_TABLE, &[IoSeg::new(&mut hdr)], false).await?;
        top.io.flush().await?;
        let old_off = self.rc.table_offset.get();
        let old_clusters = u64::from(self.rc.table_clusters.get());
        *self.rc.table.borrow_mut() = new_table;
        self.rc.table_offset.set(start << g.cluster_bits);
        self.rc.table_clusters.set(table_clusters as u32);
        // The new table and its blocks are metadata from now on.
        self.meta.mark(start, table_clusters + blocks.len() as u64);
        self.host_end.set(area_end);
        for k in 0..old_clusters {
            self.queue_free((old_off >> g.cluster_bits) + k, false);
        }
        tracing::debug!(image = self.name, old_len, new_len, "refcount table grown");
        Ok(())
    }

    /// Undoes an allocation that was never linked (its refcounts go straight back).
    async fn release_unlinked(&self, host: u64, n: u64) {
        let c = host >> self.g().cluster_bits;
        for k in 0..n {
            let _ = self.set_refcount(c + k, 0).await;
        }
        self.cursor.set(self.cursor.get().min(c));
    }

    // --- zeroes and discards --------------------------------------------------------

    /// Makes `off..off+len` read as zeros. Whole clusters change only metadata;
    /// partial clusters are written with zeros (refused with `fast_only`).
    pub(crate) async fn write_zeroes(
        &self,
        off: u64,
        len: u64,
        unmap: bool,
        fast_only: bool,
    ) -> Result<(), IoError> {
        self.check_writable()?;
        let g = self.g();
        let cs = g.cluster_size();
        let end = off + len;
        let first_full = off.div_ceil(cs) * cs;
        let last_full = end / cs * cs;
        if first_full >= last_full {
            return self.write_zero_bytes(off, len, fast_only).await;
        }
        if off < first_full {
            self.write_zero_bytes(off, first_full - off, fast_only).await?;
        }
        let mut pos = first_full;
        while pos < last_full {
            pos += self.zero_clusters(pos, last_full - pos, unmap, fast_only).await?;
        }
        if last_full < end {
            self.write_zero_bytes(last_full, end - last_full, fast_only).await?;
        }
        Ok(())
    }

    async fn write_zero_bytes(&self, off: u64, len: u64, fast_only: bool) -> Result<(), IoError> {
        // Already zero (unallocated without backing, or a zero cluster)? Nothing to do.
        let (slen, data, zero) = self.block_status(off, len).await?;
        if !data && zero && slen >= len {
            return Ok(());
        }
        if fast_only {
            return Err(IoError::NotSupported);
        }
        let mut buf = poller::dma::alloc_wait(len as usize).await.map_err(|_| IoError::TooLarge)?;
        buf.as_mut_slice().fill(0);
        self.write(off, &[IoSeg::from_dma(&mut buf)], false).await
    }

    /// Zeroes whole clusters from `pos` (within one L2 slice); returns bytes handled.
    async fn zero_clusters(
        &self,
        pos: u64,
        len: u64,
        unmap: bool,
        fast_only: bool,
    ) -> Result<u64, IoError> {
        let g = self.g();
        let cb = g.cluster_bits;
        let run = self.map_top(pos, len).await?;
        let n = run.len;
        let has_backing = self.chain.len() > 1;
        // Nothing to do where the clusters already read as zeros and stay that way.
        match run.kind {
            RunKind::Zero { host: None, .. } => return Ok(n),
            RunKind::Unallocated if !has_backing => return Ok(n),
            _ => {}
        }
        if g.version < 3 {
            // No zero flag: deallocate where no backing file shows through, else write.
            if !has_backing && (unmap || !matches!(run.kind, RunKind::Data { copied: true, .. })) {
                self.set_entries(pos, n, |_| Some(L2Entry::Unallocated), true).await?;
                return Ok(n);
            }
            if fast_only {
                return Err(IoError::NotSupported);
            }
            let mut buf =
                poller::dma::alloc_wait(n as usize).await.map_err(|_| IoError::TooLarge)?;
            buf.as_mut_slice().fill(0);
            self.write(pos, &[IoSeg::from_dma(&mut buf)], false).await?;
            return Ok(n);
        }
        let _ = cb;
        self.set_entries(
            pos,
            n,
            |old| {
                Some(match old {
                    L2Entry::Normal { host, copied: true } if !unmap => {
                        L2Entry::Zero { host: Some(host), copied: true }
                    }
                    L2Entry::Zero { host: Some(host), copied: true } if !unmap => {
                        L2Entry::Zero { host: Some(host), copied: true }
                    }
                    _ => L2Entry::Zero { host: None, copied: false },
                })
            },
            unmap,
        )
        .await?;
        Ok(n)
    }

    /// Discards whole clusters in `off..off+len`; partial clusters are left alone.
    pub(crate) async fn discard(&self, off: u64, len: u64) -> Result<(), IoError> {
        self.check_writable()?;
        let g = self.g();
        let cs = g.cluster_size();
        let mut pos = off.div_ceil(cs) * cs;
        let end = (off + len) / cs * cs;
        let has_backing = self.chain.len() > 1;
        while pos < end {
            let run = self.map_top(pos, end - pos).await?;
            let n = run.len;
            // As QEMU: a discarded range reads as zeros on v3 images, so unallocated
            // clusters over a backing file become zero clusters too.
            let skip = match run.kind {
                RunKind::Zero { host: None, .. } => true,
                RunKind::Unallocated => !has_backing || g.version < 3,
                _ => false,
            };
            if !skip {
                if has_backing && g.version < 3 {
                    // Nothing can hide the backing file here; discard is advisory.
                } else {
                    let replacement = if has_backing {
                        L2Entry::Zero { host: None, copied: false }
                    } else {
                        L2Entry::Unallocated
                    };
                    self.set_entries(pos, n, |_| Some(replacement), true).await?;
                }
            }
            pos += n;
        }
        Ok(())
    }

    /// Rewrites the L2 entries of whole clusters `pos..pos+len` (within one slice)
    /// with `f(old)`, queueing frees for clusters no longer referenced.
    async fn set_entries(
        &self,
        pos: u64,
        len: u64,
        f: impl Fn(L2Entry) -> Option<L2Entry>,
        punch: bool,
    ) -> Result<(), IoError> {
        let g = self.g();
        let cb = g.cluster_bits;
        let c0 = pos >> cb;
        let c1 = (pos + len) >> cb;
        let _guard = self.locks.lock(c0, c1).await;
        self.ensure_dirty_bit().await?;
        let top = self.top();
        if top.slice_of(pos)?.is_none() {
            // No L2 table: make one only if the new state needs recording.
            match f(L2Entry::Unallocated) {
                Some(L2Entry::Unallocated) | None => return Ok(()),
                Some(_) => {}
            }
        }
        self.ensure_l2(pos).await?;
        let Some((key, slice_host)) = top.slice_of(pos)? else {
            return Err(self.fail(format_args!("L2 table missing after allocation")));
        };
        let pin = loop {
            match top
                .l2
                .get(&top.io, key, || top.slice_host(key).unwrap_or(slice_host), false)
                .await
            {
                Ok(p) => break p,
                Err(GetError::Full) => self.flush_now(false).await?,
                Err(GetError::Io(e)) => return Err(e),
            }
        };
        let mask = (1u64 << top.slice_bits) - 1;
        for c in c0..c1 {
            let idx = (c & mask) as usize;
            let old = L2Entry::decode(pin.get_u64(idx), &g)
                .map_err(|e| self.fail(format_args!("L2 entry of cluster {c} invalid: {e:?}")))?;
            let Some(new) = f(old) else { continue };
            if new == old {
                continue;
            }
            pin.set_u64(idx, new.encode());
            let keeps = |h: u64| matches!(new, L2Entry::Zero { host: Some(x), .. } | L2Entry::Normal { host: x, .. } if x == h);
            match old {
                L2Entry::Normal { host, .. } | L2Entry::Zero { host: Some(host), .. }
                    if keeps(host) => {}
                _ => self.release_entry(old, punch),
            }
        }
        drop(pin);
        self.maybe_writeback().await
    }

    // --- flush --------------------------------------------------------------------

    /// Makes every write completed before this call durable (the barrier).
    pub(crate) async fn flush(&self) -> Result<(), IoError> {
        if self.read_only {
            return Ok(());
        }
        self.flush_round(false).await
    }

    /// An internal flush (a full cache, piled-up frees), with refcounts when asked.
    async fn flush_now(&self, refcounts: bool) -> Result<(), IoError> {
        self.flush_round(refcounts).await
    }

    async fn flush_round(&self, refcounts: bool) -> Result<(), IoError> {
        let fs = &self.flush_state;
        let me = fs.requested.get() + 1;
        fs.requested.set(me);
        loop {
            if fs.completed.get() >= me {
                return fs.result.get();
            }
            if fs.running.get() {
                fs.done.wait().await;
                continue;
            }
            fs.running.set(true);
            let covers = fs.requested.get();
            let include_rc = refcounts
                || !self.lazy
                || self.rc.cache.dirty_count() * 2 > self.rc.cache.capacity();
            let r = self.do_flush(include_rc).await;
            fs.running.set(false);
            fs.completed.set(covers);
            fs.result.set(r);
            fs.done.wake_all();
        }
    }

    async fn do_flush(&self, include_refcounts: bool) -> Result<(), IoError> {
        let top = self.top();
        loop {
            // Frees queued before this point may be applied once the L2 changes that
            // caused them are durable (rule 3).
            let cutoff = self.snap_gen.get();
            self.snap_gen.set(cutoff + 1);
            // Rule 2: L2 snapshots first, then refcount snapshots.
            let mut snaps = std::mem::take(&mut *self.snaps.borrow_mut());
            snaps.clear();
            let r = self.flush_batch(&mut snaps, include_refcounts).await;
            snaps.clear();
            *self.snaps.borrow_mut() = snaps;
            let (more_l2, more_rc) = r?;
            self.apply_frees(cutoff).await?;
            if !more_l2 && !more_rc {
                let _ = top;
                return Ok(());
            }
        }
    }

    /// One round: snapshot, write refcounts, sync, write L2, sync. Every snapshot taken
    /// is released (`written`) whatever happens.
    async fn flush_batch(
        &self,
        snaps: &mut Vec<Snapshot>,
        include_refcounts: bool,
    ) -> Result<(bool, bool), IoError> {
        let top = self.top();
        // Lock order: L2 cache, then refcount cache.
        let _l2_guard = top.l2.lock_writeback().await;
        let taken = self.take_snapshots(&top.l2, snaps).await;
        let l2_count = snaps.len();
        let _rc_guard =
            if include_refcounts { Some(self.rc.cache.lock_writeback().await) } else { None };
        let taken_rc = match (&taken, include_refcounts) {
            (Ok(_), true) => self.take_snapshots(&self.rc.cache, snaps).await,
            _ => Ok(false),
        };
        let (l2_snaps, rc_snaps) = snaps.split_at_mut(l2_count);
        let mut result = match (taken, taken_rc) {
            (Ok(a), Ok(b)) => Ok((a, b)),
            (Err(e), _) | (_, Err(e)) => Err(e),
        };
        let mut rc_ok = false;
        if result.is_ok() {
            result = write_snapshots(&top.io, rc_snaps).await.map(|()| result.unwrap_or_default());
            rc_ok = result.is_ok();
        }
        for s in rc_snaps.iter() {
            self.rc.cache.written(s, rc_ok);
        }
        let mut l2_ok = false;
        if result.is_ok() {
            // Rules 1 and 2: data and refcounts durable before any L2 write.
            match top.io.flush().await {
                Err(e) => result = Err(e),
                Ok(()) if !l2_snaps.is_empty() => match write_snapshots(&top.io, l2_snaps).await {
                    Ok(()) => {
                        l2_ok = true;
                    }
                    Err(e) => result = Err(e),
                },
                Ok(()) => {}
            }
        }
        for s in l2_snaps.iter() {
            top.l2.written(s, l2_ok);
        }
        if l2_ok {
            top.io.flush().await?;
        }
        result
    }

    /// Snapshots up to a batch of dirty slots of `cache`; true if more remain.
    async fn take_snapshots(
        &self,
        cache: &super::cache::MetaCache,
        out: &mut Vec<Snapshot>,
    ) -> Result<bool, IoError> {
        let mut slots = std::mem::take(&mut *self.scratch.borrow_mut());
        cache.dirty_slots(&mut slots, FLUSH_BATCH);
        let more = slots.len() == FLUSH_BATCH;
        for &s in &slots {
            out.push(cache.snapshot(s).await?);
        }
        slots.clear();
        *self.scratch.borrow_mut() = slots;
        Ok(more)
    }

    /// Writes every dirty refcount slice (rule 4 before hooking in new structures).
    async fn write_back_refcounts(&self) -> Result<(), IoError> {
        let _guard = self.rc.cache.lock_writeback().await;
        let mut snaps = Vec::new();
        loop {
            let taken = self.take_snapshots(&self.rc.cache, &mut snaps).await;
            let written = match taken {
                Ok(_) => write_snapshots(&self.top().io, &mut snaps).await,
                Err(e) => Err(e),
            };
            for s in &snaps {
                self.rc.cache.written(s, written.is_ok());
            }
            snaps.clear();
            if !taken? {
                return written;
            }
            written?;
        }
    }

    /// Applies queued frees whose L2 change is durable (queued at or before `cutoff`)
    /// and whose clusters no in-place write still targets.
    async fn apply_frees(&self, cutoff: u64) -> Result<(), IoError> {
        let g = self.g();
        let cs = g.cluster_size();
        let mut i = 0;
        loop {
            let next = {
                let pending = self.pending.borrow();
                pending.get(i).copied()
            };
            let Some(p) = next else { break };
            if p.generation > cutoff || self.inflight.overlaps(p.cluster * cs, cs) {
                i += 1;
                continue;
            }
            self.pending.borrow_mut().swap_remove(i);
            let rc = self.refcount(p.cluster).await?;
            if rc == 0 {
                return Err(self.fail(format_args!(
                    "freeing cluster {} whose refcount is already 0",
                    p.cluster
                )));
            }
            if rc == 1 && p.punch {
                // Punch while the cluster is still allocated: once its refcount drops,
                // an allocating write may take it at once, and a hole punched after
                // that write would erase its data.
                let _ = self.top().io.discard(p.cluster * cs, cs).await;
            }
            self.set_refcount(p.cluster, rc - 1).await?;
            if rc == 1 {
                self.meta.unmark(p.cluster);
                self.cursor.set(self.cursor.get().min(p.cluster));
            }
        }
        Ok(())
    }

    // --- lazy refcounts and shutdown ---------------------------------------------

    /// Rule 5: with lazy refcounts, the dirty bit is on disk before any allocation.
    async fn ensure_dirty_bit(&self) -> Result<(), IoError> {
        if !self.lazy || self.dirty_bit_on_disk.get() {
            return Ok(());
        }
        let _m = self.header_lock.lock().await;
        if self.dirty_bit_on_disk.get() {
            return Ok(());
        }
        let v = self.incompatible.get() | INCOMPAT_DIRTY;
        self.write_u64(OFF_INCOMPATIBLE, v).await?;
        self.top().io.flush().await?;
        self.incompatible.set(v);
        self.dirty_bit_on_disk.set(true);
        Ok(())
    }

    /// A clean shutdown: everything written (refcounts too), synced, dirty bit cleared.
    pub(crate) async fn close(&self) -> Result<(), IoError> {
        if self.read_only {
            return Ok(());
        }
        // A round applies the frees whose L2 change it made durable only after it wrote
        // the refcounts, so their decrements wait in the cache for the next round; a
        // shutdown that stopped there would leave them leaked on disk (and, with lazy
        // refcounts, clear the dirty bit over them). Rounds go on until nothing is left.
        for _ in 0..CLOSE_ROUNDS {
            self.flush_round(true).await?;
            if self.pending.borrow().is_empty() && self.rc.cache.dirty_count() == 0 {
                break;
            }
        }
        if self.dirty_bit_on_disk.get() && !self.corrupt.get() {
            let _m = self.header_lock.lock().await;
            let v = self.incompatible.get() & !INCOMPAT_DIRTY;
            self.write_u64(OFF_INCOMPATIBLE, v).await?;
            self.top().io.flush().await?;
            self.incompatible.set(v);
            self.dirty_bit_on_disk.set(false);
        }
        Ok(())
    }
}

/// Writes snapshots, up to WRITE_FANOUT at a time.
async fn write_snapshots(
    io: &crate::io::align::Aligned,
    snaps: &mut [Snapshot],
) -> Result<(), IoError> {
    for chunk in snaps.chunks_mut(WRITE_FANOUT) {
        let mut it = chunk.iter_mut();
        let futs: [Option<_>; WRITE_FANOUT] = std::array::from_fn(|_| {
            it.next().map(|s| async move {
                let host = s.host;
                io.write(host, &[IoSeg::from_dma(&mut s.buf)], false).await
            })
        });
        let mut futs = std::pin::pin!(futs);
        let mut first_err = None;
        std::future::poll_fn(|cx| {
            let mut pending = false;
            // SAFETY: the array is pinned and we never move its elements; each element
            // is projected in place and dropped in place when done.
            let arr = unsafe { futs.as_mut().get_unchecked_mut() };
            for slot in arr.iter_mut() {
                if let Some(f) = slot {
                    // SAFETY: as above: `f` lives in the pinned array.
                    match unsafe { StdPin::new_unchecked(f) }.poll(cx) {
                        Poll::Ready(r) => {
                            if let Err(e) = r {
                                first_err.get_or_insert(e);
                            }
                            *slot = None;
                        }
                        Poll::Pending => pending = true,
                    }
                }
            }
            if pending { Poll::Pending } else { Poll::Ready(()) }
        })
        .await;
        if let Some(e) = first_err {
            return Err(e);
        }
    }
    Ok(())
}

impl Shard {
    /// The L1 table offset is fixed for the life of the image (no resize).
    pub(crate) fn set_l1_offset(&self, off: u64) {
        self.l1_table_offset.set(off);
    }
}
