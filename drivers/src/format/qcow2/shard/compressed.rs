//! Compressed writes (a backup target with `compress`, as QEMU's
//! `write_compressed`): each whole cluster the image does not hold yet is compressed and
//! its bytes packed after the previous compressed cluster's, byte-granular, in a host
//! cluster this shard allocated for them; partial clusters, clusters the image already
//! holds and data that does not shrink are written plainly.
//!
//! A host cluster holding compressed bytes is counted once per compressed cluster in
//! it, so freeing each entry (`release_entry`) drops it by one and the last frees it.
//! The ordering rules hold as for allocating writes: the refcount is raised in the
//! cache before the data is written (rule 2) and the L2 entry is linked only after the
//! data write completed (rule 1); a failed write leaves a leak at worst.

use super::*;
use crate::format::qcow2::compress::Compressor;
use crate::format::qcow2::scratch::SegBuf;

impl Shard {
    /// Writes `segs` at `off`, compressing every whole cluster it can.
    pub(crate) async fn write_compressed(
        &self,
        off: u64,
        segs: &[IoSeg<'_>],
    ) -> Result<(), IoError> {
        self.check_writable()?;
        let total = seg::total_len(segs) as u64;
        let cs = self.g().cluster_size();
        let mut win = SegBuf::take();
        let mut done = 0u64;
        while done < total {
            let pos = off + done;
            let n = (cs - (pos & (cs - 1))).min(total - done);
            let w = window(segs, done as usize, n as usize, win.arr())?;
            // An external data file or an encrypted image holds no compressed
            // clusters: written plainly.
            let plain = n < cs || self.g().external_data || self.top().crypt.is_some();
            if plain || !self.write_one_compressed(pos, w).await? {
                self.write(pos, w, false).await?;
            }
            done += n;
        }
        Ok(())
    }

    /// Writes the cluster at `pos` compressed; false (nothing done) when it should be
    /// written plainly: the image holds the cluster already, or it does not shrink.
    async fn write_one_compressed(&self, pos: u64, w: &[IoSeg<'_>]) -> Result<bool, IoError> {
        let g = self.g();
        let cs = g.cluster_size();
        let c = pos >> g.cluster_bits;
        let _guard = self.locks.lock(c, c + 1).await;
        let run = self.map_top(pos, cs).await?;
        if !matches!(run.kind, RunKind::Unallocated | RunKind::Zero { .. }) {
            return Ok(false);
        }
        let mut buf = poller::dma::alloc_wait(cs as usize).await.map_err(|_| IoError::TooLarge)?;
        // No await while the compressor is borrowed: other requests of this shard use it.
        let n = {
            let mut zip = self.zip.borrow_mut();
            if zip.is_none() {
                let z = Compressor::new(self.top().decompressor.borrow().kind(), cs as usize)
                    .map_err(|e| IoError::Os(e.raw_os_error().unwrap_or(libc::ENOMEM)))?;
                *zip = Some(z);
            }
            let z = zip.as_mut().expect("made above");
            // SAFETY: `input` holds one cluster, the length of `w`, and is not aliased.
            unsafe { seg::copy_from_segs(w, 0, z.input.as_mut_ptr(), cs as usize) };
            let Some(n) = z.compress() else { return Ok(false) };
            buf.as_mut_slice()[..n].copy_from_slice(&z.out[..n]);
            n
        };
        self.ensure_dirty_bit().await?;
        self.ensure_l2(pos).await?;
        let host = self.alloc_bytes(n as u64).await?;
        self.top().io.write(host, &[IoSeg::from_dma(&mut buf).slice(0, n)], false).await?;
        // Rule 1: the data is written; only now may the L2 entry point at it.
        self.link_compressed(c, compressed_entry(host, n as u64, &g)).await?;
        self.maybe_writeback().await?;
        Ok(true)
    }

    /// `n` bytes (less than a cluster) for compressed data, counted: right after the
    /// last compressed bytes when they fit in the same host cluster, or spill into a
    /// newly allocated cluster that follows it (as QEMU packs them), else at the start
    /// of a newly allocated cluster.
    async fn alloc_bytes(&self, n: u64) -> Result<u64, IoError> {
        let g = self.g();
        let cs = g.cluster_size();
        assert!(n > 0 && n < cs, "compressed data of {n} bytes in {cs}-byte clusters");
        let (next, end) = self.ctail.get();
        if next > 0
            && next + n <= end
            && let Some(at) = self.append_to_tail((next, end), n, end).await?
        {
            return Ok(at);
        }
        let (host, _) = self.alloc(1).await?;
        let (next, end) = self.ctail.get();
        // Spilling: the bytes start in the tail's cluster and end in the new one.
        if next > 0
            && next < end
            && host == end
            && next + n > end
            && next + n <= end + cs
            && let Some(at) = self.append_to_tail((next, end), n, host + cs).await?
        {
            return Ok(at);
        }
        self.ctail.set((host + n, host + cs));
        Ok(host)
    }

    /// Places `n` bytes at the tail `(next, end)` (still the tail) and counts one more
    /// compressed cluster in the tail's host cluster; the tail then ends at `new_end`.
    /// `None` when the tail moved meanwhile or its cluster cannot count one more.
    async fn append_to_tail(
        &self,
        (next, end): (u64, u64),
        n: u64,
        new_end: u64,
    ) -> Result<Option<u64>, IoError> {
        let g = self.g();
        assert_eq!(next >> g.cluster_bits, (end - 1) >> g.cluster_bits, "compressed tail");
        let _a = self.alloc_lock.lock().await;
        let cluster = (end - 1) >> g.cluster_bits;
        // The cluster is counted by the compressed clusters already in it (the tail is
        // forgotten when a free empties it: `forget_compressed_tail`).
        let rc = self.refcount(cluster).await?;
        if rc == 0 || rc >= g.refcount_max() || self.ctail.get() != (next, end) {
            return Ok(None);
        }
        self.set_refcount(cluster, rc + 1).await?;
        self.ctail.set((next + n, new_end));
        Ok(Some(next))
    }

    /// Called when `cluster`'s refcount drops to 0: if compressed bytes were being
    /// packed into it, they go elsewhere from now on (the cluster may be reallocated).
    pub(super) fn forget_compressed_tail(&self, cluster: u64) {
        let (next, end) = self.ctail.get();
        if next > 0 && (end - 1) >> self.g().cluster_bits == cluster {
            self.ctail.set((0, 0));
        }
    }

    /// Points guest cluster `c` at compressed data (`raw`, an encoded entry), queueing
    /// the free of what it pointed at before.
    async fn link_compressed(&self, c: u64, raw: u64) -> Result<(), IoError> {
        let g = self.g();
        let top = self.top();
        let pin = self.l2_slice_of(c).await?;
        let idx = (c & ((1u64 << top.slice_bits) - 1)) as usize;
        let old = pin.l2_entry(idx, &g).1.map_err(|e| {
            self.fail(format_args!("L2 entry of cluster {c} invalid while linking: {e:?}"))
        })?;
        debug_assert!(
            matches!(L2Entry::decode(raw, &g), Ok(L2Entry::Compressed { .. })),
            "a compressed entry"
        );
        // A compressed cluster has no subclusters: an extended entry's bitmap is 0.
        pin.set_u64(idx * g.l2_words(), raw);
        if g.extended_l2 {
            pin.set_u64(idx * 2 + 1, 0);
        }
        // No zero-hop I/O may use an older mapping of the cluster from now on.
        self.img.hints.clear(c);
        self.release_entry(old, false);
        Ok(())
    }
}
