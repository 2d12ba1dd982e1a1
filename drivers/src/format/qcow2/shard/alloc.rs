//! Allocation: refcount lookups and updates through the refcount cache, the free-run
//! search in this shard's allocation groups, refcount blocks for groups the table does
//! not cover yet (made by the leader), file growth.

use super::*;

impl Shard {
    /// Allocates up to `n` contiguous clusters (at least one) with refcount 1; returns
    /// (host offset, count).
    pub(crate) async fn alloc(&self, n: u64) -> Result<(u64, u64), IoError> {
        self.alloc_run(n).await.map(|(off, got, _)| (off, got))
    }

    /// [`Shard::alloc`], also saying whether the run is fresh: past every cluster this
    /// file ever held (its end at open and every allocation since), so never written
    /// and reading as zeros (a hole, or past the end of the file).
    pub(super) async fn alloc_run(&self, n: u64) -> Result<(u64, u64, bool), IoError> {
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
            self.make_room(f.start, f.len).await?;
            // Only this shard allocates in its groups: past its own high-water mark
            // (which starts at the file's end at open) nothing was ever written.
            let fresh = f.start >= self.own_end.get();
            self.own_end.set(self.own_end.get().max(f.start + f.len));
            self.img.note_end(f.start + f.len);
            self.allocations.set(self.allocations.get() + f.len);
            return Ok((f.start << g.cluster_bits, f.len, fresh));
        }
    }

    /// Makes room in the file for the new clusters `start..start+len`: reserves their
    /// space and a window after them (within their allocation group) where the storage
    /// can, so the writes into them overwrite reserved blocks instead of filling holes
    /// (see `StorageChannel::reserve`; 4k random writes into an empty image ran
    /// 1.21-1.24x). A cluster then takes its whole size on the host however little of
    /// it is written, as with QEMU's own driver, which zeroes a new cluster's untouched
    /// parts by reserving them. Subclusters exist to take less, so an image with
    /// extended L2 entries, like storage that cannot reserve, grows sparsely
    /// (`ensure_file_len`).
    /// The window is per shard, after its own allocations: shards allocate in groups
    /// far apart, and one window over the gap between them would reserve all of it.
    /// Windows only move forward: clusters below the last one's end (reused after a
    /// free, or a hole punched there) are written where they are, so an image whose
    /// frees send allocation back and forth costs one reservation per new window, not
    /// one per allocation.
    async fn make_room(&self, start: u64, len: u64) -> Result<(), IoError> {
        let g = self.g();
        let end = start + len;
        let step = self.reserve_step.get();
        if !g.extended_l2 && step != 0 {
            let done = self.reserved_end.get();
            if end <= done {
                return Ok(());
            }
            let from = start.max(done);
            let group_end = ((from >> self.img.group_bits()) + 1) << self.img.group_bits();
            let to = (from + (step >> g.cluster_bits)).min(group_end).max(end);
            let cb = g.cluster_bits;
            if self.top().io.reserve(from << cb, (to - from) << cb).await? {
                self.reserved_end.set(to);
                self.reserve_step.set((step * 2).min(RESERVE_MAX));
                return Ok(());
            }
            self.reserve_step.set(0);
        }
        self.ensure_file_len(end << g.cluster_bits).await
    }

    /// Grows the image file (sparsely) so it holds `end` bytes, by a margin: writes
    /// into newly allocated clusters then land inside the file. A direct write that
    /// extends a file serialises on its inode (and hands the work to io_uring's kernel
    /// workers, which then spin on the lock on a busy reactor's core); inside the file
    /// they proceed in parallel. The margin is never counted by refcounts: a file
    /// longer than its last cluster is valid qcow2.
    pub(super) async fn ensure_file_len(&self, end: u64) -> Result<(), IoError> {
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
    pub(super) async fn refcount(&self, cluster: u64) -> Result<u64, IoError> {
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

    pub(super) async fn set_refcount(&self, cluster: u64, v: u64) -> Result<(), IoError> {
        debug_assert!(
            self.owns_cluster(cluster),
            "shard {} changes a refcount of another's group",
            self.idx
        );
        if !self.owns_cluster(cluster) {
            return Err(self.fail(format_args!(
                "shard {} would change the refcount of cluster {cluster}, in another shard's group",
                self.idx
            )));
        }
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

    /// Finds a run of free clusters of this shard's groups, at most `n` long, first-fit
    /// from `from` (skipping other shards' groups).
    ///
    /// A run ends where refcount-block coverage ends: clusters past the last block (or
    /// under an empty table entry) are free, but their block must be placed first, and
    /// it goes at the first cluster it covers. Ending runs there keeps the new block
    /// at the start of a run, so placing it never splits the run the search returned
    /// (which, with 64 clusters per block, would chain block after block).
    pub(super) async fn find_free(&self, from: u64, n: u64) -> Result<FreeRun, IoError> {
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
            if !self.owns_cluster(c) {
                if run > 0 {
                    break;
                }
                c = self.next_own_group(c);
                continue;
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

    /// The first cluster of this shard's next group after the one holding `c`.
    fn next_own_group(&self, c: u64) -> u64 {
        let bits = self.img.group_bits();
        let n = self.img.n as u64;
        let group = (c >> bits) + 1;
        let own = group + (self.idx as u64 + n - group % n) % n;
        own << bits
    }

    /// Creates refcount blocks (and grows the table) so `start..start+n` (in this
    /// shard's groups) is covered: on the leader, asked by message from the others.
    /// Returns true if metadata was placed (the caller searches again).
    pub(super) async fn ensure_coverage(&self, start: u64, n: u64) -> Result<bool, IoError> {
        let per = self.rc.block_entries();
        let last_ti = (start + n - 1) / per;
        if last_ti >= self.rc.table_len() {
            self.leader_op(Op::GrowReftable, last_ti + 1).await?;
            return Ok(true);
        }
        let mut placed = false;
        for ti in start / per..=last_ti {
            if self.rc.entry(ti) & !REFT_RESERVED == 0 {
                self.leader_op(Op::CreateRefblock, ti).await?;
                // The block is the group's first cluster (see `create_refblock`).
                self.meta.mark(ti * per, 1);
                placed = true;
            }
        }
        Ok(placed)
    }

    /// A new refcount block for table entry `ti`, describing itself from the first
    /// cluster of the range it covers (free, since nothing counts it yet). Leader only:
    /// it writes the block, syncs it, then publishes it in the table.
    pub(super) async fn create_refblock(&self, ti: u64) -> Result<(), IoError> {
        assert!(self.is_leader(), "refcount blocks are made by the leader");
        if ti >= self.rc.table_len() {
            self.grow_refcount_table(ti + 1).await?;
        }
        let _m = self.rc_lock.lock().await;
        if self.rc.entry(ti) != 0 {
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
        self.new_metadata();
        top.io.write(host, &[IoSeg::from_dma(&mut buf)], false).await?;
        // Rule 4: written and synced before it is hooked into the table.
        top.io.flush().await?;
        self.meta.mark(block_cluster, 1);
        self.write_u64(self.img.reftable.offset.load(Ordering::Acquire) + ti * 8, host).await?;
        self.img.reftable.entries.set(ti as usize, host);
        self.img.note_end(block_cluster + 1);
        Ok(())
    }

    /// Undoes an allocation that was never linked (its refcounts go straight back).
    pub(super) async fn release_unlinked(&self, host: u64, n: u64) {
        if self.g().external_data {
            return;
        }
        let c = host >> self.g().cluster_bits;
        for k in 0..n {
            let _ = self.set_refcount(c + k, 0).await;
        }
        self.cursor.set(self.cursor.get().min(c));
    }
}
