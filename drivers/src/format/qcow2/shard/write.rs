//! Writes: in place to allocated clusters, or allocating (with merged copy-on-write of
//! partial clusters), then linking the new clusters into the L2 slice (ordering rule 1).

use super::*;
use crate::format::qcow2::scratch::SegBuf;

impl Shard {
    pub(crate) async fn write(
        &self,
        off: u64,
        segs: &[IoSeg<'_>],
        fua: bool,
    ) -> Result<(), IoError> {
        self.check_writable()?;
        let total = seg::total_len(segs) as u64;
        let mut done = 0u64;
        let mut win = SegBuf::take();
        while done < total {
            let pos = off + done;
            let run = self.map_top(pos, total - done).await?;
            match run.kind {
                RunKind::Data { host, copied: true } => {
                    let w = window(segs, done as usize, run.len as usize, win.arr())?;
                    self.write_in_place(host, w).await?;
                    done += run.len;
                }
                _ => done += self.write_alloc(pos, run.len, segs, done as usize, false).await?,
            }
        }
        if fua {
            self.flush().await?;
        }
        Ok(())
    }

    /// Writes `segs` at `off` into the clusters this image does not hold yet, and
    /// skips the rest (a stream job pulling its backing chain up: what the guest
    /// wrote meanwhile stays). Unallocated is judged under the clusters' lock.
    pub(crate) async fn populate(&self, off: u64, segs: &[IoSeg<'_>]) -> Result<(), IoError> {
        self.check_writable()?;
        let total = seg::total_len(segs) as u64;
        let mut done = 0u64;
        while done < total {
            let pos = off + done;
            let run = self.map_top(pos, total - done).await?;
            done += match run.kind {
                RunKind::Unallocated => {
                    self.write_alloc(pos, run.len, segs, done as usize, true).await?
                }
                _ => run.len,
            };
        }
        Ok(())
    }

    pub(super) async fn write_in_place(&self, host: u64, w: &[IoSeg<'_>]) -> Result<(), IoError> {
        if self.top().data.is_some() {
            // The data file holds nothing else and frees nothing: no guard to keep.
            return self.top().write_data(host, w).await;
        }
        let len = seg::total_len(w) as u64;
        let cb = self.g().cluster_bits;
        let (first, last) = (host >> cb, (host + len.max(1) - 1) >> cb);
        self.guard_data(first, last - first + 1)?;
        // A consistent image never maps a cluster it has not allocated: past the end
        // of the file, nothing counts the cluster, and two entries may share it.
        if last >= self.img.host_end() {
            return Err(self.fail(format_args!(
                "an L2 entry maps host cluster {last}, past the end of the image"
            )));
        }
        let t = self.inflight.begin(host, len);
        let r = self.top().write_data(host, w).await;
        self.inflight.end(t);
        r
    }

    /// Writes `len` bytes at `pos` into clusters that need allocation (or whose
    /// mapping changed meanwhile). Returns the bytes handled. With `populate`, bytes
    /// found mapped once the clusters are locked are skipped, not written.
    pub(super) async fn write_alloc(
        &self,
        pos: u64,
        len: u64,
        segs: &[IoSeg<'_>],
        seg_off: usize,
        populate: bool,
    ) -> Result<u64, IoError> {
        let g = self.g();
        if g.extended_l2 {
            return self.write_alloc_sub(pos, len, segs, seg_off, populate).await;
        }
        let cb = g.cluster_bits;
        let c0 = pos >> cb;
        let c1 = ((pos + len - 1) >> cb) + 1;
        let _guard = self.locks.lock(c0, c1).await;
        self.ensure_dirty_bit().await?;
        let run = self.map_top(pos, len).await?;
        let mut len = run.len;
        if populate && !matches!(run.kind, RunKind::Unallocated) {
            return Ok(len);
        }
        let mut win = SegBuf::take();
        if let RunKind::Data { host, copied: true } = run.kind {
            let w = window(segs, seg_off, len as usize, win.arr())?;
            self.write_in_place(host, w).await?;
            return Ok(len);
        }
        let mut c1 = ((pos + len - 1) >> cb) + 1;
        self.ensure_l2(pos).await?;
        let (host, got, fresh) = match self.g().external_data {
            // A cluster of an external data file sits at its guest offset, not
            // refcounted, and may hold what a discard left there: not fresh.
            true => (c0 << cb, c1 - c0, false),
            false => self.alloc_run(c1 - c0).await?,
        };
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
        let zeros_below = self.chain().len() == 1
            && matches!(run.kind, RunKind::Unallocated | RunKind::Zero { .. });
        if fresh && zeros_below && (head > 0 || tail > 0) {
            let w = window(segs, seg_off, len as usize, win.arr())?;
            if let Err(e) = self.top().write_data(host + head, w).await {
                self.release_unlinked(host, got).await;
                return Err(e);
            }
            // Rule 1: the data is written; only now may an L2 entry point at it.
            self.link(c0, c1, host).await?;
            self.maybe_writeback().await?;
            return Ok(len);
        }
        if let Err(e) = self.write_padded(host, c0 << cb, pos, len, c1 << cb, segs, seg_off).await {
            self.release_unlinked(host, got).await;
            return Err(e);
        }
        // Rule 1: the data is written; only now may an L2 entry point at it.
        self.link(c0, c1, host).await?;
        self.maybe_writeback().await?;
        Ok(len)
    }

    /// Writes guest range `a..b` to host offset `host`: `pos..pos+len` from `segs` (from
    /// byte `seg_off`), the rest around it copied from what the image reads there now.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn write_padded(
        &self,
        host: u64,
        a: u64,
        pos: u64,
        len: u64,
        b: u64,
        segs: &[IoSeg<'_>],
        seg_off: usize,
    ) -> Result<(), IoError> {
        let (head, tail) = (pos - a, b - (pos + len));
        let pad = |n: u64| async move {
            match n {
                0 => Ok(None),
                n => poller::dma::alloc_wait(n as usize).await.map(Some),
            }
        };
        let mut head_buf = pad(head).await.map_err(|_| IoError::TooLarge)?;
        let mut tail_buf = pad(tail).await.map_err(|_| IoError::TooLarge)?;
        {
            // Both ends at once: a write into the middle of a cluster waits for one
            // read, not two in a row.
            let h = head_buf.as_mut().map(|buf| [IoSeg::from_dma(buf)]);
            let t = tail_buf.as_mut().map(|buf| [IoSeg::from_dma(buf)]);
            let reads =
                [h.as_ref().map(|s| self.read(a, s)), t.as_ref().map(|s| self.read(pos + len, s))];
            super::flush::join_all(reads).await?;
        }
        let mut win = SegBuf::take();
        let mut iov_buf = SegBuf::take();
        let iov = iov_buf.arr();
        let mut n = 0;
        if let Some(buf) = head_buf.as_mut() {
            iov[n] = IoSeg::from_dma(buf);
            n += 1;
        }
        for s in window(segs, seg_off, len as usize, win.arr())? {
            if n == MAX_SEGS - 1 {
                return Err(IoError::TooLarge);
            }
            iov[n] = *s;
            n += 1;
        }
        if let Some(buf) = tail_buf.as_mut() {
            iov[n] = IoSeg::from_dma(buf);
            n += 1;
        }
        debug_assert_eq!(seg::total_len(&iov[..n]) as u64, b - a);
        self.top().write_data(host, &iov[..n]).await
    }

    /// Points guest clusters `c0..c1` (within one L2 slice) at host clusters from
    /// `host`, queueing frees for what they pointed at before.
    pub(super) async fn link(&self, c0: u64, c1: u64, host: u64) -> Result<(), IoError> {
        let g = self.g();
        let top = self.top();
        let pin = self.l2_slice_of(c0).await?;
        let mask = (1u64 << top.slice_bits) - 1;
        for (i, c) in (c0..c1).enumerate() {
            let idx = (c & mask) as usize;
            let old = pin.l2_entry(idx, &g).1.map_err(|e| {
                self.fail(format_args!("L2 entry of cluster {c} invalid while linking: {e:?}"))
            })?;
            let h = host + ((i as u64) << g.cluster_bits);
            let new = L2Entry::Normal { host: h, copied: true };
            pin.set_l2_entry(idx, &new, &g);
            // With the entry (no await between): any reactor may now write it in place.
            if let Some(p) = &top.hints {
                p.data_run(c << g.cluster_bits, h, 1, true);
            }
            self.release_entry(old, false);
        }
        Ok(())
    }

    /// The cached L2 slice holding guest cluster `c`'s entry, pinned (for linking).
    pub(super) async fn l2_slice_of(
        &self,
        c: u64,
    ) -> Result<super::super::cache::Pin<'_>, IoError> {
        let top = self.top();
        let Some((key, slice_host)) = top.slice_of(c << self.g().cluster_bits)? else {
            return Err(self.fail(format_args!("L2 table vanished while linking cluster {c}")));
        };
        loop {
            match top
                .l2
                .get(&top.io, key, || top.slice_host(key).unwrap_or(slice_host), false)
                .await
            {
                Ok(p) => return Ok(p),
                Err(GetError::Full) => self.flush_now(false).await?,
                Err(GetError::Io(e)) => return Err(e),
            }
        }
    }

    /// Queues the clusters an old entry held for release (none in an external data
    /// file, which is not refcounted).
    pub(super) fn release_entry(&self, old: L2Entry, punch: bool) {
        let g = self.g();
        if g.external_data {
            return;
        }
        match old {
            L2Entry::Normal { host, .. }
            | L2Entry::Zero { host: Some(host), .. }
            | L2Entry::Sub { host: Some(host), .. } => {
                self.queue_free(host >> g.cluster_bits, punch)
            }
            L2Entry::Compressed { host, max_len } => {
                let (first, count) = compressed_clusters(host, max_len, &g);
                for k in 0..count {
                    self.queue_free((first >> g.cluster_bits) + k, false);
                }
            }
            L2Entry::Unallocated
            | L2Entry::Zero { host: None, .. }
            | L2Entry::Sub { host: None, .. } => {}
        }
    }

    pub(super) fn queue_free(&self, cluster: u64, punch: bool) {
        if cluster >= self.img.host_end() || cluster == 0 {
            // Never allocated: freeing it later could free whatever the allocator
            // puts there meanwhile.
            let _ = self.fail(format_args!(
                "an entry frees host cluster {cluster}, which the image never allocated"
            ));
            return;
        }
        let lease = self.img.lease.tag();
        self.pending.borrow_mut().push(PendingFree {
            cluster,
            generation: self.snap_gen.get(),
            lease,
            punch,
        });
    }

    /// Writes metadata back ahead of need: when a cache that has had to evict is half
    /// dirty (so misses keep finding clean victims), or frees pile up. A round already
    /// running may do it: its end is waited for and the need judged again, rather than
    /// a second round asked for behind it.
    pub(super) async fn maybe_writeback(&self) -> Result<(), IoError> {
        let pressed = |c: &MetaCache| c.under_pressure() && c.dirty_count() * 2 > c.capacity();
        loop {
            let needed = pressed(&self.top().l2)
                || pressed(&self.rc.cache)
                || self.pending.borrow().len() >= MAX_PENDING_FREES / 2;
            if !needed {
                return Ok(());
            }
            if !self.flush_state.running.get() {
                return self.flush_now(false).await;
            }
            self.flush_state.done.wait().await;
        }
    }
}
