//! Storage: where bytes live. A file (regular or block device) driven by io_uring or
//! AIO, a RAM disk (`mem`), or nothing at all (`null`).
//!
//! [`Storage`] is the shared description (Send + Sync, one per open file);
//! [`StorageChannel`] is its per-reactor handle, and its I/O is *pure*: requests must
//! already satisfy the storage's [`Alignment`] (the [`crate::align`] layer makes sure of
//! that). Short reads at end of file read as zeros; short writes are retried.
//!
//! Only data I/O and fdatasync go through the engines' rings. Write-zeroes and discard
//! use `fallocate` (an io_uring op, or an offload worker under AIO); block status uses
//! `lseek(SEEK_DATA/SEEK_HOLE)` on an offload worker.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::align::StripeLocks;
use crate::engine::offload::{BlockingOp, Offload};
use crate::engine::{self, EngineRef, IoOp, check};
use crate::error::{IoError, OpenError};
use crate::probe::{self, Alignment};
use crate::seg::{self, IoSeg};
use crate::sim::SimDisk;

/// Which kernel interface drives a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    IoUring,
    Aio,
}

/// The largest single kernel I/O we issue (io_uring lengths are 32-bit).
pub const MAX_IO_BYTES: usize = 1 << 30;

/// An allocation status for a byte range, for block status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allocation {
    /// Bytes are stored (they may still be zero).
    Data,
    /// A hole: reads as zeros and takes no space.
    Hole,
}

/// A run of bytes with one allocation status, starting at the queried offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    pub allocation: Allocation,
}

enum Backend {
    File { file: File, engine: EngineKind, block_device: bool },
    Mem(MemDisk),
    Null,
    Sim(Arc<SimDisk>),
}

/// A shared, opened store of bytes.
pub struct Storage {
    path: Option<PathBuf>,
    backend: Backend,
    align: Alignment,
    read_only: bool,
    direct: bool,
    size: AtomicU64,
    /// Serialises read-modify-write of partial alignment units (see `align`).
    pub(crate) rmw: StripeLocks,
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Storage")
            .field("path", &self.path)
            .field("align", &self.align)
            .field("read_only", &self.read_only)
            .finish()
    }
}

impl Storage {
    /// Opens a file or block device, probing its O_DIRECT alignment when `direct`.
    pub fn open_file(
        path: &Path,
        engine: EngineKind,
        direct: bool,
        read_only: bool,
    ) -> Result<Arc<Storage>, OpenError> {
        let mut opts = OpenOptions::new();
        opts.read(true).write(!read_only);
        if direct {
            opts.custom_flags(libc::O_DIRECT);
        }
        let file = opts.open(path).map_err(|e| {
            if e.raw_os_error() == Some(libc::EINVAL) && direct {
                OpenError::invalid(
                    path,
                    "the file system does not support O_DIRECT; set `direct = false` for this disk",
                )
            } else {
                OpenError::io(path, e)
            }
        })?;
        let meta = file.metadata().map_err(|e| OpenError::io(path, e))?;
        let block_device = meta.file_type().is_block_device();
        if !block_device && !meta.is_file() {
            return Err(OpenError::invalid(path, "neither a regular file nor a block device"));
        }
        let size = if block_device {
            probe::block_device_size(&file).map_err(|e| OpenError::io(path, e))?
        } else {
            meta.len()
        };
        crate::lock::lock_image(&file, path, !read_only)?;
        let align = probe::probe(&file, path, direct)?;
        Ok(Arc::new(Storage {
            path: Some(path.to_path_buf()),
            backend: Backend::File { file, engine, block_device },
            align,
            read_only,
            direct,
            size: AtomicU64::new(size),
            rmw: StripeLocks::new(),
        }))
    }

    /// A RAM disk of `size` bytes (zero-filled, allocated lazily).
    pub fn mem(size: u64) -> Result<Arc<Storage>, OpenError> {
        let mem = MemDisk::new(size as usize).map_err(|e| OpenError::io("<mem>", e))?;
        Ok(Arc::new(Storage {
            path: None,
            backend: Backend::Mem(mem),
            align: Alignment::NONE,
            read_only: false,
            direct: false,
            size: AtomicU64::new(size),
            rmw: StripeLocks::new(),
        }))
    }

    /// A device of `size` bytes that stores nothing: reads leave buffers untouched.
    pub fn null(size: u64) -> Arc<Storage> {
        Arc::new(Storage {
            path: None,
            backend: Backend::Null,
            align: Alignment::NONE,
            read_only: false,
            direct: false,
            size: AtomicU64::new(size),
            rmw: StripeLocks::new(),
        })
    }

    /// A simulated disk (fault injection for tests), with 512-byte request alignment so
    /// the read-modify-write paths run as on a real disk.
    pub fn sim(disk: Arc<SimDisk>) -> Arc<Storage> {
        let size = disk.len();
        Arc::new(Storage {
            path: None,
            backend: Backend::Sim(disk),
            align: Alignment { mem: 1, request: 512 },
            read_only: false,
            direct: false,
            size: AtomicU64::new(size),
            rmw: StripeLocks::new(),
        })
    }

    /// Synchronous positional write for control-plane repairs.
    pub fn write_sync(&self, buf: &[u8], off: u64) -> std::io::Result<()> {
        self.note_end(off + buf.len() as u64);
        match &self.backend {
            Backend::File { file, .. } => {
                use std::os::unix::fs::FileExt;
                file.write_all_at(buf, off)
            }
            Backend::Sim(d) => d
                .write_bytes(off, buf.to_vec())
                .map_err(|e| std::io::Error::from_raw_os_error(e.errno())),
            _ => Err(std::io::Error::from_raw_os_error(libc::EOPNOTSUPP)),
        }
    }

    /// Synchronous flush for control-plane repairs.
    pub fn sync_all(&self) -> std::io::Result<()> {
        match &self.backend {
            Backend::File { file, .. } => file.sync_all(),
            Backend::Sim(d) => d.flush().map_err(|e| std::io::Error::from_raw_os_error(e.errno())),
            _ => Ok(()),
        }
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// A name for messages: the path, or the kind of memory device.
    pub fn display_name(&self) -> String {
        match (&self.path, &self.backend) {
            (Some(p), _) => p.display().to_string(),
            (None, Backend::Mem(_)) => "<mem>".into(),
            (None, Backend::Sim(_)) => "<sim>".into(),
            (None, _) => "<null>".into(),
        }
    }

    pub fn alignment(&self) -> Alignment {
        self.align
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    pub fn is_direct(&self) -> bool {
        self.direct
    }

    pub fn is_block_device(&self) -> bool {
        matches!(self.backend, Backend::File { block_device: true, .. })
    }

    /// Current size in bytes (files grow as formats append to them).
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn note_end(&self, end: u64) {
        self.size.fetch_max(end, Ordering::AcqRel);
    }

    /// The raw descriptor, for synchronous control-plane access (image tools, open).
    pub fn raw_fd(&self) -> Option<RawFd> {
        match &self.backend {
            Backend::File { file, .. } => Some(file.as_raw_fd()),
            _ => None,
        }
    }

    /// Opens this storage's handle on the current reactor.
    pub fn channel(self: &Arc<Self>) -> Result<StorageChannel, IoError> {
        let engine = match &self.backend {
            Backend::File { engine: EngineKind::IoUring, .. } => {
                Some(EngineRef::Uring(engine::uring::current()?))
            }
            Backend::File { engine: EngineKind::Aio, .. } => {
                Some(EngineRef::Aio(engine::aio::current()?))
            }
            _ => None,
        };
        Ok(StorageChannel { storage: self.clone(), engine })
    }

    /// Synchronous positional read for control-plane code (opening an image, tools).
    /// Buffers must honour the alignment.
    pub fn read_sync(&self, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
        match &self.backend {
            Backend::File { file, .. } => {
                use std::os::unix::fs::FileExt;
                let mut done = 0;
                while done < buf.len() {
                    let n = file.read_at(&mut buf[done..], off + done as u64)?;
                    if n == 0 {
                        buf[done..].fill(0);
                        break;
                    }
                    done += n;
                }
                Ok(buf.len())
            }
            Backend::Mem(m) => {
                m.read(off, buf.as_mut_ptr(), buf.len());
                Ok(buf.len())
            }
            Backend::Null => Ok(buf.len()),
            Backend::Sim(d) => Ok(d.read_sync(buf, off)),
        }
    }
}

/// A storage's handle on one reactor.
pub struct StorageChannel {
    storage: Arc<Storage>,
    engine: Option<EngineRef>,
}

impl StorageChannel {
    pub fn storage(&self) -> &Arc<Storage> {
        &self.storage
    }

    fn fd(&self) -> RawFd {
        match &self.storage.backend {
            Backend::File { file, .. } => file.as_raw_fd(),
            _ => -1,
        }
    }

    fn debug_check_aligned(&self, off: u64, segs: &[IoSeg<'_>]) {
        let a = self.storage.align;
        debug_assert!(
            off.is_multiple_of(a.request as u64) && seg::segs_aligned(segs, a.mem, a.request),
            "unaligned request reached storage {}: off {off}, align {a:?}",
            self.storage.display_name()
        );
    }

    /// Reads `segs` from `off`. Bytes past the end of the file read as zeros.
    pub async fn read(&self, off: u64, segs: &[IoSeg<'_>]) -> Result<(), IoError> {
        let total = seg::total_len(segs);
        self.debug_check_aligned(off, segs);
        match &self.storage.backend {
            Backend::Null => Ok(()),
            Backend::Mem(m) => {
                m.read_segs(off, segs);
                Ok(())
            }
            Backend::Sim(d) => {
                if d.should_yield() {
                    poller::yield_now().await;
                }
                d.read(off, segs)
            }
            Backend::File { .. } => {
                let engine = self.engine.as_ref().expect("file storage has an engine");
                let res = if segs.len() == 1 {
                    engine
                        .submit(IoOp::Read {
                            fd: self.fd(),
                            off,
                            ptr: segs[0].as_ptr(),
                            len: io_len(total)?,
                        })
                        .await
                } else {
                    engine
                        .submit(IoOp::Readv {
                            fd: self.fd(),
                            off,
                            iov: seg::as_iovecs(segs),
                            cnt: segs.len() as u32,
                        })
                        .await
                };
                let n = check(res)?;
                if n < total {
                    self.finish_short_read(off, segs, n).await?;
                }
                Ok(())
            }
        }
    }

    /// A short read means end of file (zeros) — unless a retry finds more data, which a
    /// concurrent extension of the file can cause.
    async fn finish_short_read(
        &self,
        off: u64,
        segs: &[IoSeg<'_>],
        mut done: usize,
    ) -> Result<(), IoError> {
        let total = seg::total_len(segs);
        let align = self.storage.align.request;
        // Retry whole aligned segments one at a time from the first unfinished one.
        let mut seg_start = 0;
        for s in segs {
            let seg_end = seg_start + s.len();
            if seg_end <= done {
                seg_start = seg_end;
                continue;
            }
            if !done.is_multiple_of(align) || done > seg_start {
                // The kernel stopped inside this segment: the file ends there.
                seg::zero_segs(segs, done, total - done);
                return Ok(());
            }
            let engine = self.engine.as_ref().expect("file storage has an engine");
            let res = engine
                .submit(IoOp::Read {
                    fd: self.fd(),
                    off: off + done as u64,
                    ptr: s.as_ptr(),
                    len: io_len(s.len())?,
                })
                .await;
            let n = check(res)?;
            done += n;
            if n < s.len() {
                seg::zero_segs(segs, done, total - done);
                return Ok(());
            }
            seg_start = seg_end;
        }
        Ok(())
    }

    /// Writes `segs` at `off`; with `fua`, the data is durable when this returns.
    pub async fn write(&self, off: u64, segs: &[IoSeg<'_>], fua: bool) -> Result<(), IoError> {
        if self.storage.read_only {
            return Err(IoError::ReadOnly);
        }
        let total = seg::total_len(segs);
        self.debug_check_aligned(off, segs);
        match &self.storage.backend {
            Backend::Null => Ok(()),
            Backend::Mem(m) => {
                if off + total as u64 > m.len as u64 {
                    return Err(IoError::NoSpace);
                }
                m.write_segs(off, segs);
                Ok(())
            }
            Backend::Sim(d) => {
                if d.should_yield() {
                    poller::yield_now().await;
                }
                d.write(off, segs)?;
                self.storage.note_end(off + total as u64);
                Ok(())
            }
            Backend::File { .. } => {
                let engine = self.engine.as_ref().expect("file storage has an engine");
                let res = if segs.len() == 1 {
                    engine
                        .submit(IoOp::Write {
                            fd: self.fd(),
                            off,
                            ptr: segs[0].as_ptr(),
                            len: io_len(total)?,
                            fua,
                        })
                        .await
                } else {
                    engine
                        .submit(IoOp::Writev {
                            fd: self.fd(),
                            off,
                            iov: seg::as_iovecs(segs),
                            cnt: segs.len() as u32,
                            fua,
                        })
                        .await
                };
                let n = check(res)?;
                if n < total {
                    self.finish_short_write(off, segs, n, fua).await?;
                }
                self.storage.note_end(off + total as u64);
                Ok(())
            }
        }
    }

    async fn finish_short_write(
        &self,
        off: u64,
        segs: &[IoSeg<'_>],
        mut done: usize,
        fua: bool,
    ) -> Result<(), IoError> {
        let engine = self.engine.as_ref().expect("file storage has an engine");
        let mut seg_start = 0;
        for s in segs {
            let seg_end = seg_start + s.len();
            while done < seg_end {
                let skip = done - seg_start;
                let res = engine
                    .submit(IoOp::Write {
                        fd: self.fd(),
                        off: off + done as u64,
                        ptr: s.slice(skip, s.len() - skip).as_ptr(),
                        len: io_len(s.len() - skip)?,
                        fua,
                    })
                    .await;
                let n = check(res)?;
                if n == 0 {
                    return Err(IoError::NoSpace);
                }
                done += n;
            }
            seg_start = seg_end;
        }
        Ok(())
    }

    /// Makes every completed write durable (fdatasync).
    pub async fn flush(&self) -> Result<(), IoError> {
        match &self.storage.backend {
            Backend::File { .. } => {
                let engine = self.engine.as_ref().expect("file storage has an engine");
                check(engine.submit(IoOp::Fsync { fd: self.fd() }).await)?;
                Ok(())
            }
            Backend::Sim(d) => {
                if d.should_yield() {
                    poller::yield_now().await;
                }
                d.flush()
            }
            _ => Ok(()),
        }
    }

    /// Runs fallocate through io_uring or an offload worker.
    async fn fallocate(&self, off: u64, len: u64, mode: i32) -> Result<(), IoError> {
        let engine = self.engine.as_ref().expect("file storage has an engine");
        let res = if engine.supports_fallocate() {
            engine.submit(IoOp::Fallocate { fd: self.fd(), off, len, mode }).await
        } else {
            Offload::new(BlockingOp::Fallocate { fd: self.fd(), off, len, mode }).await
        };
        check(res).map(|_| ()).map_err(IoError::from)
    }

    /// Grows a regular file to at least `len` bytes (a sparse extension: the new range
    /// reads as zeros and takes no space). Formats that append call it ahead of their
    /// writes, so those land inside the file: a direct write that extends a file
    /// serialises on the inode in most file systems, one inside it does not. Other
    /// storage (block devices, memory, simulated disks) is left as it is.
    pub async fn grow_to(&self, len: u64) -> Result<(), IoError> {
        if self.storage.read_only || len <= self.storage.size() {
            return Ok(());
        }
        match &self.storage.backend {
            Backend::File { block_device: false, .. } => {
                let r = Offload::new(BlockingOp::Ftruncate { fd: self.fd(), len }).await;
                check(r).map_err(IoError::from)?;
                self.storage.note_end(len);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Makes `off..off+len` read as zeros. With `unmap`, space may be released. Returns
    /// `NotSupported` when the storage cannot do it without writing zeros; the caller
    /// decides whether to fall back to writing them.
    pub async fn zero_range(&self, off: u64, len: u64, unmap: bool) -> Result<(), IoError> {
        if self.storage.read_only {
            return Err(IoError::ReadOnly);
        }
        match &self.storage.backend {
            Backend::Null => Ok(()),
            Backend::Mem(m) => {
                m.zero(off, len as usize);
                Ok(())
            }
            Backend::Sim(d) => {
                // As a real fallocate: other requests run while it is in flight.
                if d.should_yield() {
                    poller::yield_now().await;
                }
                d.write_bytes(off, vec![0u8; len as usize])?;
                self.storage.note_end(off + len);
                Ok(())
            }
            Backend::File { block_device, .. } => {
                let keep = libc::FALLOC_FL_KEEP_SIZE;
                let end = off + len;
                // Zeroing past the end of a regular file grows it (punching cannot).
                let grows = !block_device && end > self.storage.size();
                let mode = if grows {
                    libc::FALLOC_FL_ZERO_RANGE
                } else if unmap {
                    libc::FALLOC_FL_PUNCH_HOLE | keep
                } else {
                    libc::FALLOC_FL_ZERO_RANGE | keep
                };
                match self.fallocate(off, len, mode).await {
                    Ok(()) => {
                        self.storage.note_end(end);
                        Ok(())
                    }
                    Err(IoError::NotSupported) | Err(IoError::Os(libc::EINVAL))
                        if unmap && !grows =>
                    {
                        // Punching holes unsupported: try zero-range.
                        self.fallocate(off, len, libc::FALLOC_FL_ZERO_RANGE | keep)
                            .await
                            .map_err(|_| IoError::NotSupported)
                    }
                    Err(IoError::Os(libc::EINVAL)) => Err(IoError::NotSupported),
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// Releases `off..off+len` if the storage can (advisory: never an error when it
    /// cannot). Contents afterwards read as zeros only if this returns `Ok(true)`.
    pub async fn discard(&self, off: u64, len: u64) -> Result<bool, IoError> {
        if self.storage.read_only {
            return Err(IoError::ReadOnly);
        }
        match &self.storage.backend {
            Backend::Null => Ok(false),
            Backend::Mem(m) => {
                m.zero(off, len as usize);
                Ok(true)
            }
            Backend::Sim(d) => {
                if d.should_yield() {
                    poller::yield_now().await;
                }
                let end = (off + len).min(self.storage.size());
                if end > off {
                    d.write_bytes(off, vec![0u8; (end - off) as usize])?;
                }
                Ok(true)
            }
            Backend::File { .. } => {
                let end = (off + len).min(self.storage.size());
                if end <= off {
                    return Ok(true);
                }
                let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                match self.fallocate(off, end - off, mode).await {
                    Ok(()) => Ok(true),
                    Err(IoError::NotSupported) | Err(IoError::Os(libc::EINVAL)) => Ok(false),
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// The allocation status of the bytes from `off` (at most `len` of them).
    pub async fn block_status(&self, off: u64, len: u64) -> Result<Extent, IoError> {
        let size = self.storage.size();
        let len = len.min(size.saturating_sub(off));
        match &self.storage.backend {
            Backend::File { block_device: false, .. } if len > 0 => {
                let fd = self.fd();
                let data = Offload::new(BlockingOp::SeekData { fd, off }).await;
                if data == -i64::from(libc::ENXIO) {
                    // No data after `off`: the rest is a hole.
                    return Ok(Extent { len, allocation: Allocation::Hole });
                }
                if data < 0 {
                    // SEEK_DATA unsupported: report data.
                    return Ok(Extent { len, allocation: Allocation::Data });
                }
                let data = data as u64;
                if data > off {
                    return Ok(Extent { len: (data - off).min(len), allocation: Allocation::Hole });
                }
                let hole = Offload::new(BlockingOp::SeekHole { fd, off }).await;
                let hole = if hole < 0 { off + len } else { hole as u64 };
                Ok(Extent { len: (hole.max(off + 1) - off).min(len), allocation: Allocation::Data })
            }
            _ => Ok(Extent { len, allocation: Allocation::Data }),
        }
    }
}

fn io_len(n: usize) -> Result<u32, IoError> {
    if n > MAX_IO_BYTES { Err(IoError::TooLarge) } else { Ok(n as u32) }
}

/// A RAM disk: an anonymous mapping shared by every reactor.
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

    fn write_segs(&self, off: u64, segs: &[IoSeg<'_>]) {
        let n = self.clamp(off, seg::total_len(segs));
        // SAFETY: `off..off+n` is inside the mapping.
        unsafe { seg::copy_from_segs(segs, 0, self.base.add(off as usize), n) };
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
