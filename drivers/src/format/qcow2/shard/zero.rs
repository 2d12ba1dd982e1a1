//! Write-zeroes and discard: whole clusters change only L2 entries (queueing frees),
//! partial clusters are written with zeros.

use super::*;

impl Shard {
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
        // Whole clusters change their entries, whole subclusters their bits (with
        // extended L2 entries), and the bytes around them are written as zeros.
        let (cs, ss) = (g.cluster_size(), g.subcluster_size());
        let end = off + len;
        let (first, last) = (off.div_ceil(ss) * ss, end / ss * ss);
        if first >= last {
            return self.write_zero_bytes(off, len, fast_only).await;
        }
        if off < first {
            self.write_zero_bytes(off, first - off, fast_only).await?;
        }
        let mut pos = first;
        while pos < last {
            let cluster_end = (pos | (cs - 1)) + 1;
            pos += if pos.is_multiple_of(cs) && cluster_end <= last {
                self.zero_clusters(pos, last / cs * cs - pos, unmap, fast_only).await?
            } else {
                let n = cluster_end.min(last) - pos;
                if !self.zero_subclusters(pos, n, unmap, false).await? {
                    self.write_zero_bytes(pos, n, fast_only).await?;
                }
                n
            };
        }
        if last < end {
            self.write_zero_bytes(last, end - last, fast_only).await?;
        }
        Ok(())
    }

    pub(super) async fn write_zero_bytes(
        &self,
        off: u64,
        len: u64,
        fast_only: bool,
    ) -> Result<(), IoError> {
        // Already zero (unallocated without backing, or a zero cluster)? Nothing to do.
        let (slen, data, zero, _) = self.block_status(off, len).await?;
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
    pub(super) async fn zero_clusters(
        &self,
        pos: u64,
        len: u64,
        unmap: bool,
        fast_only: bool,
    ) -> Result<u64, IoError> {
        let g = self.g();
        let cb = g.cluster_bits;
        let run = self.map_top(pos, len).await?;
        // A run of some subclusters: the whole cluster's entry changes.
        let whole = run.len.is_multiple_of(g.cluster_size());
        let n = if whole { run.len } else { g.cluster_size() };
        let has_backing = self.chain().len() > 1;
        // Nothing to do where the clusters already read as zeros and stay that way.
        match run.kind {
            RunKind::Zero { host: None, .. } if whole => return Ok(n),
            RunKind::Unallocated if !has_backing && whole => return Ok(n),
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
        self.clear_data(pos, n, unmap).await?;
        self.set_entries(
            pos,
            n,
            |old| {
                Some(match old {
                    L2Entry::Normal { host, copied: true } if !unmap => {
                        L2Entry::Zero { host: Some(host), copied: true }
                    }
                    L2Entry::Zero { host: Some(host), copied: true }
                    | L2Entry::Sub { host: Some(host), copied: true, .. }
                        if !unmap =>
                    {
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
        let (cs, ss) = (g.cluster_size(), g.subcluster_size());
        let mut pos = off.div_ceil(ss) * ss;
        let end = (off + len) / ss * ss;
        let has_backing = self.chain().len() > 1;
        while pos < end {
            let cluster_end = (pos | (cs - 1)) + 1;
            if !pos.is_multiple_of(cs) || cluster_end > end {
                // Whole subclusters of a cluster (a compressed one is left alone).
                let n = cluster_end.min(end) - pos;
                self.zero_subclusters(pos, n, true, true).await?;
                pos += n;
                continue;
            }
            let run = self.map_top(pos, end / cs * cs - pos).await?;
            let whole = run.len.is_multiple_of(cs);
            let n = if whole { run.len } else { cs };
            // As QEMU: a discarded range reads as zeros on v3 images, so unallocated
            // clusters over a backing file become zero clusters too.
            let skip = whole
                && match run.kind {
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
                    self.clear_data(pos, n, true).await?;
                    self.set_entries(pos, n, |_| Some(replacement), true).await?;
                }
            }
            pos += n;
        }
        Ok(())
    }

    /// With an external data file, what zeroing whole clusters does there: a raw data
    /// file must read as the image does, so the range is zeroed (punched with `unmap`);
    /// another is only trimmed, and only with `unmap` (a kept cluster stays).
    pub(super) async fn clear_data(&self, pos: u64, n: u64, unmap: bool) -> Result<(), IoError> {
        let top = self.top();
        let Some(d) = &top.data else { return Ok(()) };
        if top.data_raw {
            return match d.zero_range(pos, n, unmap).await {
                Err(IoError::NotSupported) => d.write_zero_bytes(pos, n, false).await,
                r => r,
            };
        }
        if unmap {
            // Advisory: the entries no longer point there.
            let _ = d.discard(pos, n).await;
        }
        Ok(())
    }

    /// Rewrites the L2 entries of whole clusters `pos..pos+len` (within one slice)
    /// with `f(old)`, queueing frees for clusters no longer referenced.
    pub(super) async fn set_entries(
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
            let old = pin
                .l2_entry(idx, &g)
                .1
                .map_err(|e| self.fail(format_args!("L2 entry of cluster {c} invalid: {e:?}")))?;
            let Some(new) = f(old) else { continue };
            if new == old {
                continue;
            }
            pin.set_l2_entry(idx, &new, &g);
            // With the entry (no await between): the old mapping is no longer used by
            // new zero-hop I/O; I/O already in flight holds the free back (`hints`).
            self.img.hints.clear(c);
            match old.host_cluster() {
                Some(h) if new.host_cluster() == Some(h) => {}
                _ => self.release_entry(old, punch),
            }
        }
        drop(pin);
        self.maybe_writeback().await
    }
}
