//! A shard's flush round (ordering rules 1-3 and 6): snapshots of dirty L2 and
//! refcount slices, refcounts written, one fdatasync, L2 written, one fdatasync, then
//! the frees that the now-durable L2 changes allow (sent to their group's owner when it
//! is another shard); and the clean shutdown. The guest's flush, a barrier over all
//! shards, is in `serve`.

use super::*;

impl Shard {
    /// Makes every write this shard completed before this call durable (a FUA write's
    /// flush: its clusters are all in this shard's L2 tables and groups).
    pub(crate) async fn flush(&self) -> Result<(), IoError> {
        if self.read_only {
            return Ok(());
        }
        self.flush_round(false).await
    }

    /// An internal flush (a full cache, piled-up frees), with refcounts when asked.
    pub(super) async fn flush_now(&self, refcounts: bool) -> Result<(), IoError> {
        self.flush_round(refcounts).await
    }

    pub(super) async fn flush_round(&self, refcounts: bool) -> Result<(), IoError> {
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

    pub(super) async fn do_flush(&self, include_refcounts: bool) -> Result<(), IoError> {
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
    pub(super) async fn flush_batch(
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
            // Rules 1 and 2: data (in the data file too) and refcounts durable before
            // any L2 write.
            match top.flush_all().await {
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
    pub(super) async fn take_snapshots(
        &self,
        cache: &crate::format::qcow2::cache::MetaCache,
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
    pub(super) async fn write_back_refcounts(&self) -> Result<(), IoError> {
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
    /// and whose clusters no in-place write still targets, waiting a little for
    /// zero-hop I/O that may still use them (see `hints`); a free still held back
    /// stays queued for a later round.
    pub(super) async fn apply_frees(&self, cutoff: u64) -> Result<(), IoError> {
        for _ in 0..GRACE_YIELDS {
            if !self.apply_some_frees(cutoff).await? {
                return Ok(());
            }
            poller::yield_now().await;
        }
        Ok(())
    }

    /// One pass of `apply_frees`: whether a free was held back by the lease only.
    async fn apply_some_frees(&self, cutoff: u64) -> Result<bool, IoError> {
        let g = self.g();
        let cs = g.cluster_size();
        let mut held = false;
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
            if !self.img.lease.elapsed(p.lease) {
                held = true;
                i += 1;
                continue;
            }
            self.pending.borrow_mut().swap_remove(i);
            if self.owns_cluster(p.cluster) {
                self.free_cluster(p.cluster, p.punch).await?;
            } else {
                // Rule 3 holds: the L2 change is durable; the group's owner frees it.
                let owner = self.img.group_owner(p.cluster);
                let op = Op::Free { punch: p.punch };
                self.peer_call(owner, Class::Control, op, p.cluster, &[]).await.0?;
            }
        }
        Ok(held)
    }

    /// Drops the refcount of `cluster` (of this shard's groups) by one.
    pub(super) async fn free_cluster(&self, cluster: u64, punch: bool) -> Result<(), IoError> {
        let cs = self.g().cluster_size();
        if !self.owns_cluster(cluster) {
            return Err(self.fail(format_args!(
                "shard {} asked to free cluster {cluster}, of another shard's group",
                self.idx
            )));
        }
        let rc = self.refcount(cluster).await?;
        if rc == 0 {
            return Err(
                self.fail(format_args!("freeing cluster {cluster} whose refcount is already 0"))
            );
        }
        if rc == 1 && punch {
            // Punch while the cluster is still allocated: once its refcount drops, an
            // allocating write may take it at once, and a hole punched after that write
            // would erase its data.
            let _ = self.top().io.discard(cluster * cs, cs).await;
        }
        self.set_refcount(cluster, rc - 1).await?;
        if rc == 1 {
            self.forget_compressed_tail(cluster);
            self.meta.unmark(cluster);
            self.cursor.set(self.cursor.get().min(cluster));
        }
        Ok(())
    }

    /// One round of a clean shutdown: everything written, refcounts too. A round
    /// applies the frees whose L2 change it made durable only after it wrote the
    /// refcounts (and frees sent to other shards land in their caches), so the image's
    /// close runs rounds on every shard until all are clean (see [`Shard::is_clean`]).
    pub(crate) async fn close_round(&self) -> Result<(), IoError> {
        if self.read_only {
            return Ok(());
        }
        self.flush_round(true).await
    }

    /// Nothing left to write: no pending free, no dirty refcount or L2 slice.
    pub(crate) fn is_clean(&self) -> bool {
        self.read_only
            || (self.pending.borrow().is_empty()
                && self.rc.cache.dirty_count() == 0
                && self.top().l2.dirty_count() == 0)
    }

    /// The end of a clean shutdown, on the leader once every shard is clean: the dirty
    /// bit cleared (lazy refcounts are all on disk now).
    pub(crate) async fn finish_close(&self) -> Result<(), IoError> {
        if self.read_only || !self.dirty_bit_on_disk() || self.img.is_corrupt() {
            return Ok(());
        }
        self.set_dirty_bit(false).await
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
        join_all(futs).await?;
    }
    Ok(())
}

/// Runs the futures given together, without allocating, until every one is done;
/// returns the first error.
pub(super) async fn join_all<F, const N: usize>(futs: [Option<F>; N]) -> Result<(), IoError>
where
    F: Future<Output = Result<(), IoError>>,
{
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
    first_err.map_or(Ok(()), Err)
}
