//! The shared alignment layer: byte-granular I/O over storage that needs aligned I/O.
//!
//! Format drivers and exports issue requests at any offset and length from any memory;
//! [`Aligned`] passes aligned ones straight through and pads the rest, as QEMU's
//! `bdrv_co_preadv`/`bdrv_co_pwritev` do:
//! - a read is widened to whole alignment units into a DMA bounce buffer and copied out;
//! - a write whose offset and length are aligned but whose memory is not is copied into
//!   a bounce buffer and written;
//! - a write with a partial unit at either end is a read-modify-write of those units.
//!
//! Read-modify-write must be serialised against other read-modify-writes of the same
//! units, or two writes to different bytes of one unit lose one another. Because
//! connections of one disk may sit on different reactors, the serialisation is
//! process-wide: a table of striped try-locks (one bit per stripe, hashed by unit index)
//! in the [`Storage`](crate::io::Storage). A request takes its head and tail
//! stripes all-or-nothing and yields to the reactor while another holds them, so nothing
//! blocks. Aligned writes never take stripes: an aligned write that overlaps a partial
//! write overlaps its bytes, which is a client race with no defined outcome anyway.
//! Large padded requests are processed in chunks of at most half the largest DMA buffer.

use std::sync::atomic::{AtomicU64, Ordering};

use poller::dma;

use crate::error::IoError;
use crate::io::probe::Alignment;
use crate::io::{Extent, StorageChannel};
use crate::seg::{self, IoSeg};

/// Stripes in a storage's read-modify-write lock table.
pub(crate) const RMW_STRIPES: usize = 4096;

/// Striped try-locks for read-modify-write (see the module docs).
pub(crate) struct StripeLocks {
    words: Box<[AtomicU64]>,
}

impl StripeLocks {
    pub(crate) fn new() -> Self {
        StripeLocks { words: (0..RMW_STRIPES / 64).map(|_| AtomicU64::new(0)).collect() }
    }

    fn stripe(unit: u64) -> usize {
        // Fibonacci hashing spreads neighbouring units over the table.
        (unit.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 52) as usize % RMW_STRIPES
    }

    fn try_lock(&self, stripe: usize) -> bool {
        let bit = 1u64 << (stripe % 64);
        // Acquire: the holder's writes to the units happen before we read them.
        self.words[stripe / 64].fetch_or(bit, Ordering::Acquire) & bit == 0
    }

    fn unlock(&self, stripe: usize) {
        let bit = 1u64 << (stripe % 64);
        // Release: our writes to the units happen before the next holder's reads.
        self.words[stripe / 64].fetch_and(!bit, Ordering::Release);
    }
}

/// Held stripes; released on drop.
struct StripeGuard<'a> {
    locks: &'a StripeLocks,
    stripes: [usize; 2],
    held: usize,
}

impl Drop for StripeGuard<'_> {
    fn drop(&mut self) {
        for &s in &self.stripes[..self.held] {
            self.locks.unlock(s);
        }
    }
}

async fn lock_units<'a>(locks: &'a StripeLocks, units: &[u64]) -> StripeGuard<'a> {
    let mut stripes: [usize; 2] = [usize::MAX; 2];
    let mut n = 0;
    for &u in units {
        let s = StripeLocks::stripe(u);
        if !stripes[..n].contains(&s) {
            stripes[n] = s;
            n += 1;
        }
    }
    stripes[..n].sort_unstable();
    loop {
        let mut guard = StripeGuard { locks, stripes, held: 0 };
        while guard.held < n && locks.try_lock(stripes[guard.held]) {
            guard.held += 1;
        }
        if guard.held == n {
            return guard;
        }
        drop(guard);
        poller::yield_now().await;
    }
}

fn align_down(v: u64, a: usize) -> u64 {
    v - v % a as u64
}

fn align_up(v: u64, a: usize) -> u64 {
    v.div_ceil(a as u64) * a as u64
}

/// Byte-granular I/O over a storage channel.
pub struct Aligned {
    ch: StorageChannel,
    align: Alignment,
}

impl Aligned {
    pub fn new(ch: StorageChannel) -> Self {
        let align = ch.storage().alignment();
        Aligned { ch, align }
    }

    pub fn channel(&self) -> &StorageChannel {
        &self.ch
    }

    pub fn alignment(&self) -> Alignment {
        self.align
    }

    fn is_aligned(&self, off: u64, segs: &[IoSeg<'_>]) -> bool {
        let a = self.align;
        off.is_multiple_of(a.request as u64) && seg::segs_aligned(segs, a.mem, a.request)
    }

    /// Bytes a bounce chunk may cover.
    fn chunk_bytes(&self) -> usize {
        let half = dma::max_len() / 2;
        (half - half % self.align.request).max(self.align.request)
    }

    pub async fn read(&self, off: u64, segs: &[IoSeg<'_>]) -> Result<(), IoError> {
        let total = seg::total_len(segs);
        if total == 0 {
            return Ok(());
        }
        if self.is_aligned(off, segs) {
            return self.ch.read(off, segs).await;
        }
        let req = self.align.request;
        let chunk = self.chunk_bytes();
        let mut done = 0usize;
        while done < total {
            let pos = off + done as u64;
            let start = align_down(pos, req);
            let want = (total - done).min(chunk - (pos - start) as usize);
            let end = align_up(pos + want as u64, req);
            let mut buf =
                dma::alloc_wait((end - start) as usize).await.map_err(|_| IoError::TooLarge)?;
            self.ch.read(start, &[IoSeg::from_dma(&mut buf)]).await?;
            // SAFETY: `buf` holds `end - start` bytes and `pos - start + want <= end - start`.
            unsafe {
                seg::copy_into_segs(segs, done, buf.as_ptr().add((pos - start) as usize), want)
            };
            done += want;
        }
        Ok(())
    }

    pub async fn write(&self, off: u64, segs: &[IoSeg<'_>], fua: bool) -> Result<(), IoError> {
        let total = seg::total_len(segs);
        if total == 0 {
            return Ok(());
        }
        if self.is_aligned(off, segs) {
            return self.ch.write(off, segs, fua).await;
        }
        let req = self.align.request;
        let chunk = self.chunk_bytes();
        let locks = &self.ch.storage().rmw;
        let mut done = 0usize;
        while done < total {
            let pos = off + done as u64;
            let start = align_down(pos, req);
            let want = (total - done).min(chunk - (pos - start) as usize);
            let end = align_up(pos + want as u64, req);
            let head_partial = pos != start;
            let tail_partial = pos + want as u64 != end;
            let mut units = [0u64; 2];
            let mut n = 0;
            if head_partial {
                units[n] = start / req as u64;
                n += 1;
            }
            if tail_partial {
                units[n] = (end - req as u64) / req as u64;
                n += 1;
            }
            let _guard = if n > 0 { Some(lock_units(locks, &units[..n]).await) } else { None };
            let len = (end - start) as usize;
            let mut buf = dma::alloc_wait(len).await.map_err(|_| IoError::TooLarge)?;
            if head_partial {
                let mut head = [IoSeg::from_dma(&mut buf)];
                head[0] = head[0].slice(0, req);
                self.ch.read(start, &head).await?;
            }
            if tail_partial && (end - start > req as u64 || !head_partial) {
                let tail = IoSeg::from_dma(&mut buf).slice(len - req, req);
                self.ch.read(end - req as u64, &[tail]).await?;
            }
            // SAFETY: `buf` holds `len` bytes; the copy ends at `pos - start + want <= len`.
            unsafe {
                seg::copy_from_segs(segs, done, buf.as_mut_ptr().add((pos - start) as usize), want)
            };
            self.ch.write(start, &[IoSeg::from_dma(&mut buf)], fua).await?;
            done += want;
        }
        Ok(())
    }

    pub async fn flush(&self) -> Result<(), IoError> {
        self.ch.flush().await
    }

    /// See [`StorageChannel::grow_to`].
    pub async fn grow_to(&self, len: u64) -> Result<(), IoError> {
        self.ch.grow_to(len).await
    }

    /// See [`StorageChannel::reserve`].
    pub async fn reserve(&self, off: u64, len: u64) -> Result<bool, IoError> {
        self.ch.reserve(off, len).await
    }

    /// The storage's current size in bytes.
    pub fn size(&self) -> u64 {
        self.ch.storage().size()
    }

    /// See [`StorageChannel::zero_range`]. Byte-granular: fallocate zeroes partial units.
    /// Zeroes `off..off+len`. Devices of fixed size zero whole blocks only (an NVMe
    /// WRITE ZEROES, a block device's BLKZEROOUT): there, a partial block at either end
    /// is written with zeros (read-modify-write), the blocks between are zeroed by the
    /// device. A file system zeroes any byte range itself.
    pub async fn zero_range(&self, off: u64, len: u64, unmap: bool) -> Result<(), IoError> {
        let a = self.alignment().request as u64;
        let whole = off.is_multiple_of(a) && len.is_multiple_of(a);
        if whole || !self.ch.storage().is_block_device() {
            return self.ch.zero_range(off, len, unmap).await;
        }
        let end = off + len;
        let head_end = off.next_multiple_of(a).min(end);
        let tail = (end / a * a).max(head_end);
        if head_end > off {
            self.write_zero_bytes(off, head_end - off, false).await?;
        }
        if tail > head_end {
            self.ch.zero_range(head_end, tail - head_end, unmap).await?;
        }
        if end > tail {
            self.write_zero_bytes(tail, end - tail, false).await?;
        }
        Ok(())
    }

    pub async fn discard(&self, off: u64, len: u64) -> Result<bool, IoError> {
        self.ch.discard(off, len).await
    }

    pub async fn block_status(&self, off: u64, len: u64) -> Result<Extent, IoError> {
        self.ch.block_status(off, len).await
    }

    /// Writes zeros the slow way: for storage that cannot zero a range itself.
    pub async fn write_zero_bytes(&self, off: u64, len: u64, fua: bool) -> Result<(), IoError> {
        let chunk = (self.chunk_bytes() as u64).min(len.max(1)) as usize;
        let mut buf = dma::alloc_wait(chunk).await.map_err(|_| IoError::TooLarge)?;
        buf.as_mut_slice().fill(0);
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(chunk as u64) as usize;
            let seg = IoSeg::from_dma(&mut buf).slice(0, n);
            self.write(off + done, &[seg], fua).await?;
            done += n as u64;
        }
        Ok(())
    }
}
