//! The `mem` backend: a RAM disk in one anonymous mapping, shared by every reactor and
//! touched (so backed) only where written.

use std::sync::Arc;

use crate::error::{IoError, OpenError};
use crate::seg::{self, IoSeg};

use super::probe::Alignment;
use super::{Allocation, Backend, BackendChannel, Extent, Storage, StoreFuture};

/// A RAM disk of `size` bytes (zero-filled, allocated lazily).
pub(crate) fn open(size: u64) -> Result<Arc<Storage>, OpenError> {
    let mem = MemDisk::new(size as usize).map_err(|e| OpenError::io("<mem>", e))?;
    Ok(Storage::new(Box::new(Arc::new(mem)), None, Alignment::NONE, size, false, false))
}

/// A RAM file: empty at first, growing as it is written, up to `capacity` bytes (a
/// file system's file, without the kernel: a qcow2 image's home in benchmarks).
pub(crate) fn open_file(capacity: u64) -> Result<Arc<Storage>, OpenError> {
    let mem = MemDisk::new(capacity as usize).map_err(|e| OpenError::io("<mem>", e))?;
    Ok(Storage::new(Box::new(Arc::new(mem)), None, Alignment::NONE, 0, false, false))
}

/// The mapping.
struct MemDisk {
    base: *mut u8,
    len: usize,
}

// SAFETY: the mapping lives as long as the MemDisk; concurrent accesses are byte copies
// whose interleaving is the client's business, as on any disk.
unsafe impl Send for MemDisk {}
// SAFETY: as above.
unsafe impl Sync for MemDisk {}

impl MemDisk {
    fn new(len: usize) -> std::io::Result<Self> {
        // SAFETY: an anonymous private mapping with no address hint.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len.max(1),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(MemDisk { base: p.cast(), len })
    }

    fn clamp(&self, off: u64, len: usize) -> usize {
        (self.len as u64).saturating_sub(off).min(len as u64) as usize
    }

    fn read(&self, off: u64, dst: *mut u8, len: usize) {
        let n = self.clamp(off, len);
        // SAFETY: `off..off+n` is inside the mapping; the caller's buffer holds `len`.
        unsafe {
            std::ptr::copy(self.base.add(off as usize), dst, n);
            std::ptr::write_bytes(dst.add(n), 0, len - n);
        }
    }

    fn read_segs(&self, off: u64, segs: &[IoSeg<'_>]) {
        let total = seg::total_len(segs);
        let n = self.clamp(off, total);
        // SAFETY: `off..off+n` is inside the mapping.
        unsafe { seg::copy_into_segs(segs, 0, self.base.add(off as usize), n) };
        seg::zero_segs(segs, n, total - n);
    }

    fn write_segs(&self, off: u64, segs: &[IoSeg<'_>]) -> Result<(), IoError> {
        let total = seg::total_len(segs);
        if off + total as u64 > self.len as u64 {
            return Err(IoError::NoSpace);
        }
        // SAFETY: `off..off+total` is inside the mapping (checked above).
        unsafe { seg::copy_from_segs(segs, 0, self.base.add(off as usize), total) };
        Ok(())
    }

    fn zero(&self, off: u64, len: usize) {
        let n = self.clamp(off, len);
        // SAFETY: `off..off+n` is inside the mapping.
        unsafe { std::ptr::write_bytes(self.base.add(off as usize), 0, n) };
    }
}

impl Drop for MemDisk {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping made in `new`, once.
        unsafe { libc::munmap(self.base.cast(), self.len.max(1)) };
    }
}

impl Backend for Arc<MemDisk> {
    fn kind(&self) -> &'static str {
        "<mem>"
    }

    fn open_channel(&self) -> Result<Box<dyn BackendChannel>, IoError> {
        Ok(Box::new(self.clone()))
    }

    fn read_sync(&self, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
        MemDisk::read(self, off, buf.as_mut_ptr(), buf.len());
        Ok(buf.len())
    }

    fn write_sync(&self, buf: &[u8], off: u64) -> std::io::Result<()> {
        let mut b = buf.to_vec();
        self.write_segs(off, &[IoSeg::new(&mut b)])
            .map_err(|_| std::io::Error::from_raw_os_error(libc::ENOSPC))
    }
}

impl BackendChannel for Arc<MemDisk> {
    fn read<'a>(&'a self, off: u64, segs: &'a [IoSeg<'a>]) -> StoreFuture<'a> {
        MemDisk::read_segs(self, off, segs);
        StoreFuture::ready(Ok(()))
    }
    fn write<'a>(&'a self, off: u64, segs: &'a [IoSeg<'a>], _fua: bool) -> StoreFuture<'a> {
        StoreFuture::ready(self.write_segs(off, segs))
    }
    fn flush(&self) -> StoreFuture<'_> {
        StoreFuture::ready(Ok(()))
    }
    fn zero_range(&self, off: u64, len: u64, _unmap: bool, _grows: bool) -> StoreFuture<'_> {
        self.zero(off, len as usize);
        StoreFuture::ready(Ok(()))
    }
    fn discard(&self, off: u64, len: u64) -> StoreFuture<'_, bool> {
        self.zero(off, len as usize);
        StoreFuture::ready(Ok(true))
    }
    fn block_status(&self, _off: u64, len: u64) -> StoreFuture<'_, Extent> {
        StoreFuture::ready(Ok(Extent { len, allocation: Allocation::Data }))
    }
}
