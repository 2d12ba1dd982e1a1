//! New L2 tables (for guest ranges without one, or copies of tables shared with a
//! snapshot), made in batches.
//!
//! A table costs a cluster, a table write, the refcount writeback and an fdatasync
//! before its L1 entry may point at it (rules 2 and 4). On a fresh image under random
//! writes nearly every early request reaches a range without a table: made one at a
//! time, each behind the last one's fdatasync, they stalled the whole queue (an empty
//! 64 GiB image took 1.5x longer over its first seconds than once its tables existed).
//! So the requests of a shard that need tables join a batch: the first becomes its
//! maker and yields once, so the requests of the same tick can join; then it takes a
//! cluster for every table asked for, writes them all at once, writes the refcounts
//! back and syncs once, and hooks every table into L1. Requests that ask meanwhile wait
//! for the next batch, which one of them makes.

use super::flush::join_all;
use super::*;
use poller::DmaBuf;

/// Tables made per batch.
const TABLE_BATCH: usize = WRITE_FANOUT;
/// Table requests remembered without allocating (one per waiting request).
pub(super) const WANTED_CAP: usize = 256;

/// The L1 indices requests wait for, and whether a batch is being made.
pub(super) struct TableBatch {
    wanted: RefCell<Vec<usize>>,
    /// L1 indices whose entry is set in memory but not yet written to disk: a request
    /// must not use the table before the write completes, or a flush it asks for could
    /// pass before the entry is on disk, and a power cut then lose what it acknowledged.
    hooking: RefCell<Vec<usize>>,
    running: Cell<bool>,
    done: WaitList,
}

impl TableBatch {
    pub(super) fn new() -> TableBatch {
        TableBatch {
            wanted: RefCell::new(Vec::with_capacity(WANTED_CAP)),
            hooking: RefCell::new(Vec::with_capacity(TABLE_BATCH)),
            running: Cell::new(false),
            done: WaitList::new(),
        }
    }
}

/// Ends a batch however its maker leaves (done, failed, dropped).
struct BatchEnd<'a>(&'a TableBatch);

impl Drop for BatchEnd<'_> {
    fn drop(&mut self) {
        self.0.hooking.borrow_mut().clear();
        self.0.running.set(false);
        self.0.done.wake_all();
    }
}

/// One table of a batch.
struct NewTable {
    l1i: usize,
    /// The shared table it copies, or 0.
    old: u64,
    new: u64,
    buf: DmaBuf,
}

impl Shard {
    /// Makes sure the L2 table covering `guest_off` exists and is not shared. The
    /// table's owner alone changes its L1 entry.
    pub(super) async fn ensure_l2(&self, guest_off: u64) -> Result<(), IoError> {
        assert_eq!(self.img.guest_owner(guest_off), self.idx, "an L2 table changes on its owner");
        let g = self.g();
        let l1i = (guest_off >> (g.cluster_bits + g.l2_bits())) as usize;
        let tb = &self.tables;
        loop {
            let ready = self.l1_entry(l1i)?.1;
            if ready && !tb.hooking.borrow().contains(&l1i) {
                return Ok(());
            }
            if !ready {
                let mut w = tb.wanted.borrow_mut();
                if !w.contains(&l1i) {
                    w.push(l1i);
                }
            }
            // Being hooked only happens inside a running batch, which wakes us.
            if tb.running.get() {
                tb.done.wait().await;
                continue;
            }
            self.make_tables().await?;
        }
    }

    /// L1 entry `l1i`: (table offset, whether it is there and not shared).
    fn l1_entry(&self, l1i: usize) -> Result<(u64, bool), IoError> {
        let raw = self.top().l1.get(l1i).unwrap_or(0);
        let (off, copied) = decode_l1(raw, &self.g())
            .map_err(|e| self.fail(format_args!("L1 entry {l1i} ({raw:#x}) invalid: {e:?}")))?;
        Ok((off, off != 0 && copied))
    }

    /// Makes one batch of the wanted tables.
    async fn make_tables(&self) -> Result<(), IoError> {
        let tb = &self.tables;
        debug_assert!(!tb.running.get(), "one table batch at a time");
        tb.running.set(true);
        let _end = BatchEnd(tb);
        poller::yield_now().await;
        let mut batch: [Option<NewTable>; TABLE_BATCH] = std::array::from_fn(|_| None);
        let r = self.prepare_tables(&mut batch).await;
        let r = match r {
            Ok(()) => self.write_tables(&mut batch).await,
            Err(e) => Err(e),
        };
        if let Err(e) = r {
            for t in batch.iter().flatten() {
                self.release_unlinked(t.new, 1).await;
            }
            return Err(e);
        }
        self.hook_tables(&batch).await
    }

    /// Takes up to a batch of wanted tables: a cluster and the contents of each.
    async fn prepare_tables(
        &self,
        batch: &mut [Option<NewTable>; TABLE_BATCH],
    ) -> Result<(), IoError> {
        let cs = self.g().cluster_size() as usize;
        let mut n = 0;
        while n < TABLE_BATCH {
            let Some(l1i) = self.tables.wanted.borrow_mut().pop() else { break };
            let (old, ready) = self.l1_entry(l1i)?;
            if ready || batch[..n].iter().flatten().any(|t| t.l1i == l1i) {
                continue;
            }
            let mut buf = poller::dma::alloc_wait(cs).await.map_err(|_| IoError::TooLarge)?;
            if old == 0 {
                buf.as_mut_slice().fill(0);
            } else {
                // Copy on write of a table shared with a snapshot: the entries keep
                // their meaning; the data clusters' refcounts already count both views.
                self.top().io.read(old, &[IoSeg::from_dma(&mut buf)]).await?;
            }
            let (new, _) = self.alloc(1).await?;
            self.new_metadata();
            batch[n] = Some(NewTable { l1i, old, new, buf });
            n += 1;
        }
        Ok(())
    }

    /// Writes the batch's tables, then (rules 2 and 4) their refcounts, and syncs: the
    /// tables and their refcounts are durable before L1 points at them.
    async fn write_tables(
        &self,
        batch: &mut [Option<NewTable>; TABLE_BATCH],
    ) -> Result<(), IoError> {
        let io = &self.top().io;
        let mut it = batch.iter_mut();
        let writes: [Option<_>; TABLE_BATCH] = std::array::from_fn(|_| {
            it.next().and_then(Option::as_mut).map(|t| async move {
                io.write(t.new, &[IoSeg::from_dma(&mut t.buf)], false).await
            })
        });
        join_all(writes).await?;
        self.write_back_refcounts().await?;
        io.flush().await
    }

    /// Points the batch's L1 entries at their new tables, in memory and then on disk.
    async fn hook_tables(&self, batch: &[Option<NewTable>; TABLE_BATCH]) -> Result<(), IoError> {
        let g = self.g();
        let top = self.top();
        for t in batch.iter().flatten() {
            let entry = t.new | OFLAG_COPIED;
            self.tables.hooking.borrow_mut().push(t.l1i);
            self.meta.mark(t.new >> g.cluster_bits, 1);
            // The switch, with no await inside it: once the L1 entry says the table
            // is `new`, writers link entries into its cached slices at once, so those
            // slices must already write back to `new`. A writeback still aimed at
            // `old` would overwrite the table the snapshot keeps.
            top.l1.set(t.l1i, entry);
            let slices = 1u64 << (g.l2_bits() - top.slice_bits);
            let first = (t.l1i as u64) * slices;
            if t.old != 0 {
                for k in 0..slices {
                    top.l2.rehost(first + k, t.new + k * top.l2.slice_bytes() as u64);
                }
            } else {
                // All zeros on disk: the first use of each slice needs no read.
                top.l2.mark_fresh(first..first + slices);
            }
        }
        let l1 = self.l1_offset();
        let mut it = batch.iter().flatten();
        let writes: [Option<_>; TABLE_BATCH] = std::array::from_fn(|_| {
            it.next().map(|t| self.write_u64(l1 + t.l1i as u64 * 8, t.new | OFLAG_COPIED))
        });
        join_all(writes).await?;
        // On disk: requests may use the tables (the batch's end wakes them).
        self.tables.hooking.borrow_mut().clear();
        for t in batch.iter().flatten() {
            if t.old != 0 {
                self.queue_free(t.old >> g.cluster_bits, false);
            }
        }
        Ok(())
    }
}
