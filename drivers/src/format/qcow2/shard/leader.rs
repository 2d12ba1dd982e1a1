//! Image-wide changes: refcount table growth, the dirty bit (lazy refcounts) and the
//! corrupt bit. (New L2 tables are in `tables`.)

use super::*;

impl Shard {
    /// On a corruption error: stop writing, and set the image's corrupt bit (as QEMU
    /// does) so no tool trusts it until it is checked.
    pub(crate) async fn signal_if_corrupt<T>(&self, r: Result<T, IoError>) -> Result<T, IoError> {
        if r.as_ref().err() == Some(&IoError::Corrupt)
            && !self.read_only
            && !self.corrupt_marked.replace(true)
        {
            self.img.set_corrupt();
            let _ = self.leader_op(Op::MarkCorrupt, 0).await;
        }
        r
    }

    /// Sets the corrupt bit in the header (leader only).
    pub(super) async fn mark_corrupt(&self) -> Result<(), IoError> {
        let _m = self.header_lock.lock().await;
        let old = self.img.incompatible.load(Ordering::Acquire);
        if old & INCOMPAT_CORRUPT != 0 {
            return Ok(());
        }
        tracing::error!(
            image = self.name,
            "marking the image corrupt; it stays read-only until repaired (appliance check --repair all)"
        );
        let v = old | INCOMPAT_CORRUPT;
        self.write_u64(OFF_INCOMPATIBLE, v).await?;
        self.top().io.flush().await?;
        self.img.incompatible.store(v, Ordering::Release);
        Ok(())
    }

    pub(super) fn l1_offset(&self) -> u64 {
        self.img.l1_table_offset
    }

    /// Writes one big-endian u64 (an L1 entry, a refcount table entry, a header field).
    pub(super) async fn write_u64(&self, off: u64, v: u64) -> Result<(), IoError> {
        let mut b = v.to_be_bytes();
        self.top().io.write(off, &[IoSeg::new(&mut b)], false).await
    }

    /// Grows the refcount table to at least `min_entries` (leader only): a new table and
    /// the blocks that describe it go past every cluster allocated so far, are written
    /// and synced, then the header switches to the new table in one write, and the old
    /// table is freed. The area's clusters are counted in blocks made for it, or in the
    /// leader's own block when it starts in a group of the leader's that has one; never
    /// in another shard's block (the area moves to the next group boundary instead).
    /// Callers hold `alloc_lock` (the area is taken without a free-cluster search).
    pub(super) async fn grow_refcount_table(&self, min_entries: u64) -> Result<(), IoError> {
        assert!(self.is_leader(), "the refcount table grows on the leader");
        let _m = self.rc_lock.lock().await;
        let g = self.g();
        let top = self.top();
        let cs = g.cluster_size();
        let per = self.rc.block_entries();
        let old_len = self.rc.table_len();
        if old_len >= min_entries {
            return Ok(());
        }
        let mut start = self.img.host_end();
        if !self.owns_cluster(start) && self.rc.entry(start / per) & !REFT_RESERVED != 0 {
            start = (start / per + 1) * per;
        }
        let entries_per_cluster = cs / 8;
        let new_len = min_entries.max(old_len * 2).max(start / per + 2);
        let new_len = new_len.div_ceil(entries_per_cluster) * entries_per_cluster;
        if new_len * 8 > MAX_REFTABLE_BYTES {
            return Err(IoError::NoSpace);
        }
        let table_clusters = new_len * 8 / cs;
        // Blocks needed for the area [start, start + T + R) whose table entries are empty.
        let missing = |end: u64| -> Vec<u64> {
            (start / per..=(end - 1) / per)
                .filter(|&ti| ti >= old_len || self.rc.entry(ti) & !REFT_RESERVED == 0)
                .collect()
        };
        let mut blocks: Vec<u64> = Vec::new();
        loop {
            let end = start + table_clusters + blocks.len() as u64;
            let m = missing(end);
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
        self.new_metadata();
        // Area clusters covered by existing blocks (the leader's, see above): counted
        // through the cache, and written with the other dirty refcounts below.
        for c in start..area_end {
            let ti = c / per;
            if ti < old_len && self.rc.entry(ti) & !REFT_RESERVED != 0 {
                self.set_refcount(c, 1).await?;
            }
        }
        let mut new_table: Vec<u64> = (0..new_len).map(|ti| self.rc.entry(ti)).collect();
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
        let rt = &self.img.reftable;
        let old_off = rt.offset.load(Ordering::Acquire);
        let old_clusters = u64::from(rt.clusters.load(Ordering::Acquire));
        // Publish: the new entries first, then the length that makes them visible.
        for &ti in &blocks {
            rt.entries.set(ti as usize, new_table[ti as usize]);
        }
        rt.offset.store(start << g.cluster_bits, Ordering::Release);
        rt.clusters.store(table_clusters as u32, Ordering::Release);
        rt.len.store(new_len, Ordering::Release);
        // The new table and its blocks are metadata from now on.
        self.meta.mark(start, table_clusters + blocks.len() as u64);
        self.img.note_end(area_end);
        self.own_end.set(self.own_end.get().max(area_end));
        for k in 0..old_clusters {
            self.queue_free((old_off >> g.cluster_bits) + k, false);
        }
        tracing::debug!(image = self.name, old_len, new_len, "refcount table grown");
        Ok(())
    }

    /// Rule 5: with lazy refcounts, the dirty bit is on disk before any allocation.
    pub(super) async fn ensure_dirty_bit(&self) -> Result<(), IoError> {
        if !self.lazy || self.dirty_bit_on_disk() {
            return Ok(());
        }
        self.leader_op(Op::DirtyBit, 1).await
    }

    /// Sets (or clears) the dirty bit in the header, synced (leader only).
    pub(super) async fn set_dirty_bit(&self, on: bool) -> Result<(), IoError> {
        assert!(self.is_leader(), "the header changes on the leader");
        let _m = self.header_lock.lock().await;
        if self.dirty_bit_on_disk() == on {
            return Ok(());
        }
        let old = self.img.incompatible.load(Ordering::Acquire);
        let v = if on { old | INCOMPAT_DIRTY } else { old & !INCOMPAT_DIRTY };
        self.write_u64(OFF_INCOMPATIBLE, v).await?;
        self.top().io.flush().await?;
        self.img.incompatible.store(v, Ordering::Release);
        // Release: a shard that sees the bit set allocates after it is on disk.
        self.img.dirty_bit_on_disk.store(on, Ordering::Release);
        Ok(())
    }
}
