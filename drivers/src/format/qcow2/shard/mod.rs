//! A shard: the part of an open qcow2 image that one reactor owns — the L2 tables of
//! its guest range and their cache, the refcount blocks of its allocation groups and
//! their cache, its allocator, its half of the flush barrier — and the request
//! algorithms (see `image` for who owns what). With one shard it owns the whole image;
//! the request code is the same for one shard or many.
//!
//! # Across shards
//! Every cluster a shard allocates is in its own groups and is linked only into its own
//! L2 tables, so rules 1 and 2 below hold within each shard, and a shard's flush alone
//! makes its writes durable (the fdatasync covers the whole file). What crosses shards:
//! - a free of a cluster in another shard's group is sent to that owner only after the
//!   flush that made the L2 change durable (rule 3), and the owner applies it at once;
//! - new refcount blocks and refcount table growth are done by the leader, written and
//!   synced before they are published in the shared table (rule 4);
//! - the dirty bit (rule 5) is set by the leader before the requester allocates;
//! - a guest flush is a barrier over every shard: the leader runs a flush round on all
//!   of them at once and answers when all are done (rule 6).
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

mod alloc;
mod compressed;
mod flush;
mod leader;
mod read;
mod tables;
mod write;
mod zero;

mod serve;
mod subcluster;

use std::cell::{Cell, RefCell};
use std::pin::Pin as StdPin;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;

use poller::WaitList;

use crate::error::IoError;
use crate::seg::{self, IoSeg, window};

use super::cache::{GetError, MetaCache, Snapshot};
use super::image::Image;
use super::layer::{Layer, MAX_SEGS, Qcow2Layer, Run, RunKind, corrupt, read_chain, status_chain};
use super::overlap::MetaMap;
use super::refcount::Refcounts;
use super::route::{Class, Op, Route};
use super::types::*;

/// Dirty slices written per flush round.
const FLUSH_BATCH: usize = 1024;
/// Concurrent metadata writes within a round.
const WRITE_FANOUT: usize = 16;
/// Flush rounds a clean shutdown runs at most (two suffice: see `Shard::close`).
pub(crate) const CLOSE_ROUNDS: usize = 4;
/// Times a flush round yields to let zero-hop I/O on clusters it frees finish.
const GRACE_YIELDS: usize = 64;
/// Pending frees that force a flush.
const MAX_PENDING_FREES: usize = 8192;
/// Free clusters scanned per allocation before settling for a shorter run.
const SCAN_LIMIT: u64 = 1 << 16;
/// The image file grows ahead of allocation by an eighth of its size, within these
/// bounds, so allocating writes land inside the file (see `ensure_file_len`).
const GROW_MIN: u64 = 16 << 20;
const GROW_MAX: u64 = 1 << 30;
/// Space reserved ahead of a shard's allocations: a first window of `RESERVE_MIN`, each
/// next one twice the last, up to `RESERVE_MAX` (see `make_room`).
const RESERVE_MIN: u64 = 16 << 20;
const RESERVE_MAX: u64 = 256 << 20;

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
    /// The lease epoch after the cluster's hint was cleared (see `hints`).
    lease: u64,
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

impl FlushState {
    fn new() -> FlushState {
        FlushState {
            requested: Cell::new(0),
            completed: Cell::new(0),
            running: Cell::new(false),
            result: Cell::new(Ok(())),
            done: WaitList::new(),
        }
    }
}

/// One shard of an open image, on its reactor.
pub(crate) struct Shard {
    pub name: String,
    /// This shard's index (0 leads).
    pub idx: usize,
    pub img: Arc<Image>,
    /// Routes to every shard of the image (this one's is local), set once all exist.
    pub peers: std::cell::OnceCell<Vec<Route>>,
    /// `chain[0]` is this image (a qcow2 layer); the rest is its backing chain, of
    /// which the first `chain_len` count (see [`Shard::chain`]).
    chain: Vec<Layer>,
    chain_len: Cell<usize>,
    pub rc: Refcounts,
    pub read_only: bool,
    lazy: bool,
    corrupt_marked: Cell<bool>,
    locks: ClusterLocks,
    /// New and copied L2 tables, made in batches (L1 entry changes).
    tables: tables::TableBatch,
    /// Refcount structure changes (new blocks, table growth).
    rc_lock: MetaLock,
    /// Serialises allocations: the free-cluster search awaits refcount reads, and two
    /// searches interleaved would hand out the same clusters.
    alloc_lock: MetaLock,
    /// Header field changes (the dirty bit).
    header_lock: MetaLock,
    /// One file extension at a time.
    grow_lock: MetaLock,
    /// The end of the last window of clusters this shard reserved (see `make_room`).
    reserved_end: Cell<u64>,
    /// Bytes the next reservation takes (doubling up to `RESERVE_MAX`); 0 once the
    /// storage could not reserve: the file then grows sparsely.
    reserve_step: Cell<u64>,
    cursor: Cell<u64>,
    /// One past the last cluster this shard allocated: clusters of its groups past
    /// both this and the file's end at open were never written (see `alloc_run`).
    own_end: Cell<u64>,
    pending: RefCell<Vec<PendingFree>>,
    snap_gen: Cell<u64>,
    inflight: Inflight,
    flush_state: FlushState,
    /// The leader's barrier over all shards (guest flushes).
    global_flush: FlushState,
    /// Wakes the leader's barrier task.
    global_kick: WaitList,
    closing: Cell<bool>,
    scratch: RefCell<Vec<u32>>,
    snaps: RefCell<Vec<Snapshot>>,
    allocations: Cell<u64>,
    /// Compressed writes' buffers and context, made at the first one.
    zip: RefCell<Option<super::compress::Compressor>>,
    /// Where the next compressed bytes go, and the end of their host cluster.
    ctail: Cell<(u64, u64)>,
    /// Host clusters holding metadata (see `overlap`).
    pub meta: Rc<MetaMap>,
}

impl Shard {
    pub(crate) fn new(
        idx: usize,
        chain: Vec<Layer>,
        rc: Refcounts,
        meta: Rc<MetaMap>,
        read_only: bool,
        lazy: bool,
    ) -> Shard {
        let img = rc.img.clone();
        // The first cluster of this shard's first group (cluster 0 is the header).
        let cursor = (idx as u64) << img.group_bits();
        Shard {
            name: img.name.clone(),
            idx,
            peers: std::cell::OnceCell::new(),
            own_end: Cell::new(img.open_end),
            img,
            chain_len: Cell::new(chain.len()),
            chain,
            rc,
            read_only,
            lazy,
            corrupt_marked: Cell::new(false),
            locks: ClusterLocks {
                held: RefCell::new(Vec::with_capacity(1024)),
                waiters: WaitList::new(),
            },
            tables: tables::TableBatch::new(),
            rc_lock: MetaLock { held: Cell::new(false), waiters: WaitList::new() },
            alloc_lock: MetaLock { held: Cell::new(false), waiters: WaitList::new() },
            header_lock: MetaLock { held: Cell::new(false), waiters: WaitList::new() },
            grow_lock: MetaLock { held: Cell::new(false), waiters: WaitList::new() },
            reserved_end: Cell::new(0),
            reserve_step: Cell::new(RESERVE_MIN),
            cursor: Cell::new(cursor),
            pending: RefCell::new(Vec::with_capacity(MAX_PENDING_FREES)),
            snap_gen: Cell::new(0),
            inflight: Inflight {
                slots: RefCell::new(Vec::with_capacity(1024)),
                free: RefCell::new(Vec::with_capacity(1024)),
            },
            flush_state: FlushState::new(),
            global_flush: FlushState::new(),
            global_kick: WaitList::new(),
            closing: Cell::new(false),
            scratch: RefCell::new(Vec::with_capacity(FLUSH_BATCH)),
            snaps: RefCell::new(Vec::with_capacity(FLUSH_BATCH)),
            allocations: Cell::new(0),
            zip: RefCell::new(None),
            ctail: Cell::new((0, 0)),
            meta,
        }
    }

    /// The image and the backing files it reads through (all of them, until a stream
    /// job makes it stand alone: [`Shard::drop_backing`]).
    pub(crate) fn chain(&self) -> &[Layer] {
        &self.chain[..self.chain_len.get()]
    }

    /// Stops reading through the backing chain: the image holds everything now (a
    /// stream job copied it and the header no longer names a backing file). With the
    /// disk quiesced.
    pub(crate) fn drop_backing(&self) {
        self.chain_len.set(1);
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
        self.img.set_corrupt();
        corrupt(&self.name, what)
    }

    /// Marks the image corrupt before any request (an inconsistency found at open).
    pub(crate) fn mark_corrupt_at_open(&self, what: &str) {
        tracing::error!(
            image = self.name,
            "{what}; writes are refused (repair with `appliance check -r all`)"
        );
        self.img.set_corrupt();
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
        if self.img.is_corrupt() {
            return Err(IoError::Corrupt);
        }
        Ok(())
    }

    /// Maps on the top layer, flushing when the cache is full of dirty slices.
    async fn map_top(&self, off: u64, max: u64) -> Result<Run, IoError> {
        loop {
            match self.top().map(off, max).await {
                Ok(r) => return Ok(r),
                Err(GetError::Io(e)) => {
                    if e == IoError::Corrupt {
                        self.img.set_corrupt();
                    }
                    return Err(e);
                }
                Err(GetError::Full) => self.flush_now(false).await?,
            }
        }
    }
}

impl Shard {
    pub(crate) fn is_leader(&self) -> bool {
        self.idx == 0
    }

    /// Whether this shard allocates in host cluster `c`'s group.
    fn owns_cluster(&self, c: u64) -> bool {
        self.img.group_owner(c) == self.idx
    }

    /// A cluster is about to become metadata: writable hints published before are no
    /// longer used (see `hints`).
    fn new_metadata(&self) {
        self.img.meta_gen.fetch_add(1, Ordering::AcqRel);
    }

    fn dirty_bit_on_disk(&self) -> bool {
        self.img.dirty_bit_on_disk.load(Ordering::Acquire)
    }
}
