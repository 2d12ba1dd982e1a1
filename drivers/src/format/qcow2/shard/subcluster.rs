//! Subclusters (extended L2 entries): allocating writes, write-zeroes and discards at
//! subcluster granularity.
//!
//! A cluster of an image with extended L2 entries is 32 subclusters, each allocated
//! (data at its place in the host cluster), zero, or unallocated (read from below),
//! recorded in the entry's bitmap. A write into a cluster that has a host cluster of
//! its own only writes its subclusters (padded at the ends, copying from what the image
//! reads there) and sets their bits; a cluster without one gets a new host cluster
//! holding just those subclusters, the rest keeping their state — so the first 4 KiB
//! write into a 2 MiB cluster over a backing file copies one 64 KiB subcluster, not the
//! cluster. A cluster shared with a snapshot, or compressed, is copied whole into a new
//! one. Rule 1 holds as for clusters: the bitmap says allocated only once the data is
//! written. The zero-hop hints map whole clusters: only clusters with every subcluster
//! allocated are published there (`map` publishes no run of a mixed cluster).

use super::*;

impl Shard {
    /// `write_alloc` with subclusters: within the cluster of `pos`; returns the bytes
    /// handled.
    pub(super) async fn write_alloc_sub(
        &self,
        pos: u64,
        len: u64,
        segs: &[IoSeg<'_>],
        seg_off: usize,
        populate: bool,
    ) -> Result<u64, IoError> {
        let g = self.g();
        let (cb, sb) = (g.cluster_bits, g.subcluster_bits());
        let c = pos >> cb;
        let base = c << cb;
        let _guard = self.locks.lock(c, c + 1).await;
        self.ensure_dirty_bit().await?;
        let run = self.map_top(pos, len.min(base + g.cluster_size() - pos)).await?;
        let len = run.len;
        if populate && !matches!(run.kind, RunKind::Unallocated) {
            return Ok(len);
        }
        if let RunKind::Data { host, copied: true } = run.kind {
            let mut win = super::super::scratch::SegBuf::take();
            self.write_in_place(host, window(segs, seg_off, len as usize, win.arr())?).await?;
            return Ok(len);
        }
        self.ensure_l2(pos).await?;
        let old = self.entry_of(c).await?;
        // Data the entry holds that is not this image's alone must move whole.
        let shared = matches!(old, L2Entry::Compressed { .. })
            || (!old.copied() && old.bitmaps().0 != 0 && !g.external_data);
        let (s0, s1) = if shared {
            (0, SUBCLUSTERS)
        } else {
            let m = g.subcluster_mask(pos, len);
            (m.trailing_zeros(), SUBCLUSTERS - m.leading_zeros())
        };
        let (a, b) = (base + (u64::from(s0) << sb), base + (u64::from(s1) << sb));
        let own = match old.host_cluster() {
            _ if g.external_data => Some(base),
            Some(h) if old.copied() => Some(h),
            _ => None,
        };
        let host = match own {
            Some(h) => {
                if !g.external_data {
                    self.guard_own(h)?;
                }
                h
            }
            None => self.alloc_run(1).await?.0,
        };
        if let Err(e) = self.write_padded(host + (a - base), a, pos, len, b, segs, seg_off).await {
            if own.is_none() {
                self.release_unlinked(host, 1).await;
            }
            return Err(e);
        }
        // Rule 1: the subclusters are written; only now may the bitmap say so.
        let m = sub_range(s0, s1);
        let pin = self.l2_slice_of(c).await?;
        let idx = (c & ((1u64 << self.top().slice_bits) - 1)) as usize;
        let cur = self.decode_entry(c, pin.l2_entry(idx, &g))?;
        if cur != old {
            return Err(self.fail(format_args!("L2 entry of cluster {c} changed under its lock")));
        }
        let (alloc, zero) = if shared { (ALL_SUBCLUSTERS, 0) } else { old.bitmaps() };
        let new = L2Entry::from_bitmaps(Some(host), true, alloc | m, zero & !m);
        pin.set_l2_entry(idx, &new, &g);
        // With the entry (no await between): a whole cluster of data is published for
        // the zero-hop path, anything else is not mapped there.
        self.publish(c, &new);
        if own.is_none() {
            self.release_entry(old, false);
        }
        drop(pin);
        self.maybe_writeback().await?;
        Ok(len)
    }

    /// Makes the whole subclusters `pos..pos+len` (within one cluster) read as zeros
    /// (`discard`: as what lies below, where nothing does). The host cluster goes with
    /// `unmap` once no subcluster is allocated. `false`: the cluster is compressed and
    /// the caller must write zeros.
    pub(super) async fn zero_subclusters(
        &self,
        pos: u64,
        len: u64,
        unmap: bool,
        discard: bool,
    ) -> Result<bool, IoError> {
        let g = self.g();
        let c = pos >> g.cluster_bits;
        let m = g.subcluster_mask(pos, len);
        let has_backing = self.chain().len() > 1;
        let _guard = self.locks.lock(c, c + 1).await;
        self.ensure_dirty_bit().await?;
        if self.top().slice_of(pos)?.is_none() && !has_backing {
            return Ok(true);
        }
        self.ensure_l2(pos).await?;
        self.clear_data(pos, len, unmap).await?;
        let pin = self.l2_slice_of(c).await?;
        let idx = (c & ((1u64 << self.top().slice_bits) - 1)) as usize;
        let old = self.decode_entry(c, pin.l2_entry(idx, &g))?;
        if matches!(old, L2Entry::Compressed { .. }) {
            return Ok(false);
        }
        let (alloc, zero) = old.bitmaps();
        let zero = if discard && !has_backing { zero & !m } else { zero | m };
        let alloc = alloc & !m;
        let host = old.host_cluster().filter(|_| !(unmap && alloc == 0) || g.external_data);
        let new = L2Entry::from_bitmaps(host, old.copied() && host.is_some(), alloc, zero);
        if new != old {
            pin.set_l2_entry(idx, &new, &g);
            self.publish(c, &new);
            if host.is_none() && old.host_cluster().is_some() {
                self.release_entry(old, unmap);
            }
        }
        drop(pin);
        self.maybe_writeback().await?;
        Ok(true)
    }

    /// Publishes guest cluster `c`'s new entry for the zero-hop path: hints map whole
    /// clusters, so only an entry with every subcluster allocated is there.
    fn publish(&self, c: u64, e: &L2Entry) {
        let g = self.g();
        match (&self.top().hints, *e) {
            (Some(p), L2Entry::Normal { host, copied }) => {
                p.data_run(c << g.cluster_bits, host, g.cluster_size(), copied)
            }
            _ => self.img.hints.clear(c),
        }
    }

    /// The L2 entry of guest cluster `c` (whose table exists).
    async fn entry_of(&self, c: u64) -> Result<L2Entry, IoError> {
        let pin = self.l2_slice_of(c).await?;
        let idx = (c & ((1u64 << self.top().slice_bits) - 1)) as usize;
        self.decode_entry(c, pin.l2_entry(idx, &self.g()))
    }

    fn decode_entry(
        &self,
        c: u64,
        (raw, e): ((u64, u64), Result<L2Entry, EntryError>),
    ) -> Result<L2Entry, IoError> {
        e.map_err(|e| self.fail(format_args!("L2 entry of cluster {c} ({raw:#x?}) invalid: {e:?}")))
    }

    /// Checks that the host cluster an entry of this image holds may take data.
    fn guard_own(&self, host: u64) -> Result<(), IoError> {
        let c = host >> self.g().cluster_bits;
        self.guard_data(c, 1)?;
        if c >= self.img.host_end() {
            return Err(self.fail(format_args!(
                "an L2 entry maps host cluster {c}, past the end of the image"
            )));
        }
        Ok(())
    }
}
