//! I/O drivers: where bytes live. Every backend implements [`Backend`] (shared,
//! control plane) and [`BackendChannel`] (per reactor, pure aligned I/O):
//! - [`file`]: a regular file or block device driven by io_uring or Linux AIO (the
//!   engines of [`engine`]), O_DIRECT with its alignment probed ([`probe`]), locked the
//!   way QEMU locks images ([`lock`]);
//! - [`nvme`]: an NVMe namespace driven with NVMe commands (`nvme_uring`);
//! - [`mem`]: a RAM disk; [`null`]: stores nothing; [`sim`]: the fault-injecting disk
//!   of the crash tests (volatile cache, seeded power cuts).
//!
//! [`Storage`] is what the layers above hold: a backend plus its alignment, size and
//! the read-modify-write locks of the shared alignment layer ([`align`]), which turns
//! byte-granular requests into the aligned ones backends accept. A [`StorageChannel`]
//! checks (in debug builds) that requests really are aligned, tracks the file's end and
//! hands the request to the backend's channel. Backend futures are stored inline
//! ([`StoreFuture`]): no allocation per I/O.

pub mod align;
pub(crate) mod engine;
pub mod file;
pub mod lock;
pub mod mem;
pub mod nbd;
pub mod net;
pub mod null;
pub mod nvme;
pub mod probe;
pub mod rbd;
pub mod sim;
pub mod tls;

use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use poller::InlineFuture;

use crate::error::{IoError, OpenError};
use crate::seg::{self, IoSeg};

use self::align::StripeLocks;
use self::probe::Alignment;

/// Which kernel interface drives a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    IoUring,
    Aio,
}

/// The largest single kernel I/O we issue (io_uring lengths are 32-bit).
pub const MAX_IO_BYTES: usize = 1 << 30;

/// The inline capacity of a backend request's future.
pub const STORE_FUTURE_BYTES: usize = 512;

/// What a backend channel's request method returns.
pub type StoreFuture<'a, T = ()> = InlineFuture<'a, Result<T, IoError>, STORE_FUTURE_BYTES>;

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

/// An I/O driver: the shared side (control-plane access and channel creation).
pub trait Backend: Send + Sync + 'static {
    /// A name for messages: `<mem>`, `<null>`, `<sim>` (files are named by their path).
    fn kind(&self) -> &'static str;

    /// Opens the backend's channel on the current reactor.
    fn open_channel(&self) -> Result<Box<dyn BackendChannel>, IoError>;

    /// Synchronous positional read for the control plane; bytes past the end read as
    /// zeros; returns `buf.len()`.
    fn read_sync(&self, buf: &mut [u8], off: u64) -> std::io::Result<usize>;

    /// Synchronous positional write for the control plane.
    fn write_sync(&self, _buf: &[u8], _off: u64) -> std::io::Result<()> {
        Err(std::io::Error::from_raw_os_error(libc::EOPNOTSUPP))
    }

    /// Synchronous flush for the control plane.
    fn sync(&self) -> std::io::Result<()> {
        Ok(())
    }

    /// Sets the size of storage that is not a file but can change size (an RBD image);
    /// regular files are resized through their descriptor.
    fn resize(&self, _len: u64) -> std::io::Result<()> {
        Err(std::io::ErrorKind::Unsupported.into())
    }

    /// Counters for the metrics endpoint (`rbd_requests_timed_out`, say).
    fn stats(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }

    /// The file descriptor, for file backends.
    fn raw_fd(&self) -> Option<RawFd> {
        None
    }

    fn is_block_device(&self) -> bool {
        false
    }

    /// Whether block status can tell holes from data.
    fn reports_holes(&self) -> bool {
        false
    }
}

/// An I/O driver's per-reactor side. Requests are aligned to the storage's alignment
/// and inside what the caller may touch; reads past the end return zeros.
pub trait BackendChannel {
    fn read<'a>(&'a self, off: u64, segs: &'a [IoSeg<'a>]) -> StoreFuture<'a>;
    fn write<'a>(&'a self, off: u64, segs: &'a [IoSeg<'a>], fua: bool) -> StoreFuture<'a>;
    fn flush(&self) -> StoreFuture<'_>;
    /// Zeroes the range; `NotSupported` if it cannot without writing zeros.
    fn zero_range(&self, off: u64, len: u64, unmap: bool, grows: bool) -> StoreFuture<'_>;
    /// Releases the range if it can; whether it now reads as zeros.
    fn discard(&self, off: u64, len: u64) -> StoreFuture<'_, bool>;
    fn block_status(&self, off: u64, len: u64) -> StoreFuture<'_, Extent>;
    /// Grows a regular file sparsely to `len` bytes (others: nothing to do).
    fn grow_to(&self, _len: u64) -> StoreFuture<'_, bool> {
        StoreFuture::ready(Ok(false))
    }
    /// Reserves space for `off..off+len` in a regular file (its holes become
    /// allocated blocks reading as zeros, data is left as it is, the file grows to
    /// cover the range); whether it did (others: nothing to do).
    fn reserve(&self, _off: u64, _len: u64) -> StoreFuture<'_, bool> {
        StoreFuture::ready(Ok(false))
    }
}

/// A shared, opened store of bytes.
pub struct Storage {
    path: Option<PathBuf>,
    backend: Box<dyn Backend>,
    align: Alignment,
    read_only: bool,
    direct: bool,
    size: AtomicU64,
    /// Whether this handle took the image locks (at open or later).
    locked: AtomicBool,
    /// Serialises read-modify-write of partial alignment units (see `align`).
    pub(crate) rmw: StripeLocks,
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Storage")
            .field("name", &self.display_name())
            .field("align", &self.align)
            .field("read_only", &self.read_only)
            .finish()
    }
}

impl Storage {
    /// Storage over `backend` of `size` bytes.
    pub fn new(
        backend: Box<dyn Backend>,
        path: Option<PathBuf>,
        align: Alignment,
        size: u64,
        read_only: bool,
        direct: bool,
    ) -> Arc<Storage> {
        Arc::new(Storage {
            path,
            backend,
            align,
            read_only,
            direct,
            size: AtomicU64::new(size),
            locked: AtomicBool::new(false),
            rmw: StripeLocks::new(),
        })
    }

    /// Opens a file or block device, probing its O_DIRECT alignment when `direct`.
    pub fn open_file(
        path: &Path,
        engine: EngineKind,
        direct: bool,
        read_only: bool,
    ) -> Result<Arc<Storage>, OpenError> {
        file::open(path, engine, direct, read_only, true)
    }

    /// [`Storage::open_file`] without taking image locks: for a block job writing an
    /// image this process already holds locked, read-only, as a disk's backing file
    /// (a commit's base, which the disk keeps reading meanwhile).
    pub fn open_file_unlocked(
        path: &Path,
        engine: EngineKind,
        direct: bool,
        read_only: bool,
    ) -> Result<Arc<Storage>, OpenError> {
        file::open(path, engine, direct, read_only, false)
    }

    /// A RAM disk of `size` bytes (zero-filled, allocated lazily).
    pub fn mem(size: u64) -> Result<Arc<Storage>, OpenError> {
        mem::open(size)
    }

    /// A file in RAM: empty, growing as written up to `capacity` bytes (reserved, not
    /// touched).
    pub fn mem_file(capacity: u64) -> Result<Arc<Storage>, OpenError> {
        mem::open_file(capacity)
    }

    /// A device of `size` bytes that stores nothing: reads leave buffers untouched.
    pub fn null(size: u64) -> Arc<Storage> {
        null::open(size)
    }

    /// A simulated disk (fault injection for tests), with 512-byte request alignment so
    /// the read-modify-write paths run as on a real disk.
    pub fn sim(disk: Arc<sim::SimDisk>) -> Arc<Storage> {
        sim::open(disk)
    }

    /// Synchronous positional write for control-plane repairs.
    pub fn write_sync(&self, buf: &[u8], off: u64) -> std::io::Result<()> {
        self.note_end(off + buf.len() as u64);
        self.backend.write_sync(buf, off)
    }

    /// Sets a regular file's size to `len` bytes and makes it durable. Growing leaves
    /// the new tail unallocated (it reads as zeros); shrinking is refused
    /// (`InvalidData`) unless nothing past `len` holds data (`SEEK_DATA` finds none).
    /// Control plane, with nothing in flight. An RBD image grows through its backend;
    /// other storage (a block device, memory) has the size it has: `Unsupported`.
    pub fn resize_sync(&self, len: u64) -> std::io::Result<()> {
        match self.raw_fd() {
            Some(fd) if !self.is_block_device() && self.path.is_some() => resize_fd(fd, len)?,
            _ => self.backend.resize(len)?,
        }
        self.backend.sync()?;
        self.size.store(len, Ordering::Release);
        Ok(())
    }

    /// The backend's counters, for the metrics endpoint.
    pub fn stats(&self) -> Vec<(&'static str, u64)> {
        self.backend.stats()
    }

    /// Synchronous flush for control-plane repairs.
    pub fn sync_all(&self) -> std::io::Result<()> {
        self.backend.sync()
    }

    /// Synchronous positional read for control-plane code (opening an image, tools).
    /// Buffers must honour the alignment.
    pub fn read_sync(&self, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
        self.backend.read_sync(buf, off)
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// A name for messages: the path, or the kind of device.
    pub fn display_name(&self) -> String {
        match &self.path {
            Some(p) => p.display().to_string(),
            None => self.backend.kind().to_string(),
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
        self.backend.is_block_device()
    }

    /// Whether block status tells holes from data (a sparse regular file).
    pub fn reports_holes(&self) -> bool {
        self.backend.reports_holes()
    }

    /// Current size in bytes (files grow as formats append to them).
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn note_end(&self, end: u64) {
        // A plain load first: writes inside the file (nearly all) leave the shared
        // line unwritten, so reactors writing one file do not bounce it between cores.
        if end > self.size.load(Ordering::Acquire) {
            self.size.fetch_max(end, Ordering::AcqRel);
        }
    }

    /// Takes the image locks a writer (or, read-only, a reader) holds, on storage
    /// opened without them ([`Storage::open_file_unlocked`]) once nothing else in this
    /// process holds the file. Storage that is not a file has none to take.
    pub fn lock_image(&self) -> Result<(), OpenError> {
        self.with_file(lock::lock_image)
    }

    /// Takes the image locks without checking for conflicts, from another handle of
    /// this process that holds them and closes next (see [`lock::adopt_image_locks`]).
    pub fn adopt_image_locks(&self) -> Result<(), OpenError> {
        self.with_file(lock::adopt_image_locks)
    }

    /// Runs a locking function on the file's descriptor (nothing for non-files).
    fn with_file(
        &self,
        f: fn(&std::fs::File, &Path, bool) -> Result<(), OpenError>,
    ) -> Result<(), OpenError> {
        let (Some(fd), Some(path)) = (self.backend.raw_fd(), self.path()) else {
            return Ok(());
        };
        // SAFETY: the descriptor stays owned by the backend; the File is never dropped
        // (ManuallyDrop), so it is not closed here. OFD locks belong to the open file
        // description, which this borrowed handle shares.
        let file = std::mem::ManuallyDrop::new(unsafe {
            <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd)
        });
        f(&file, path, !self.read_only)?;
        self.locked.store(true, Ordering::Release);
        Ok(())
    }

    /// Whether this handle holds the image locks (see [`lock`]).
    pub fn holds_image_locks(&self) -> bool {
        self.locked.load(Ordering::Acquire)
    }

    /// Notes that the file was locked when opened.
    pub(crate) fn set_locked(&self) {
        self.locked.store(true, Ordering::Release);
    }

    /// The raw descriptor, for synchronous control-plane access (image tools, open).
    pub fn raw_fd(&self) -> Option<RawFd> {
        self.backend.raw_fd()
    }

    /// Opens this storage's handle on the current reactor.
    pub fn channel(self: &Arc<Self>) -> Result<StorageChannel, IoError> {
        Ok(StorageChannel { storage: self.clone(), ch: self.backend.open_channel()? })
    }
}

/// A storage's handle on one reactor.
pub struct StorageChannel {
    storage: Arc<Storage>,
    ch: Box<dyn BackendChannel>,
}

impl StorageChannel {
    pub fn storage(&self) -> &Arc<Storage> {
        &self.storage
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
        self.debug_check_aligned(off, segs);
        self.ch.read(off, segs).await
    }

    /// Writes `segs` at `off`; with `fua`, the data is durable when this returns.
    pub async fn write(&self, off: u64, segs: &[IoSeg<'_>], fua: bool) -> Result<(), IoError> {
        if self.storage.read_only {
            return Err(IoError::ReadOnly);
        }
        self.debug_check_aligned(off, segs);
        self.ch.write(off, segs, fua).await?;
        self.storage.note_end(off + seg::total_len(segs) as u64);
        Ok(())
    }

    /// Makes every completed write durable (fdatasync).
    pub async fn flush(&self) -> Result<(), IoError> {
        self.ch.flush().await
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
        if self.ch.grow_to(len).await? {
            self.storage.note_end(len);
        }
        Ok(())
    }

    /// Reserves the space of `off..off+len` where the storage can: a regular file's
    /// holes in the range become allocated blocks that read as zeros (unwritten
    /// extents), its data stays, and it grows to cover the range. A direct write into
    /// reserved blocks is an overwrite, which ext4 and XFS run under the inode's shared
    /// lock in the submitter's context; one into a hole allocates under the exclusive
    /// lock (io_uring hands it to its kernel workers). Returns whether space was
    /// reserved: never an error when the storage cannot (no support, no space).
    pub async fn reserve(&self, off: u64, len: u64) -> Result<bool, IoError> {
        if self.storage.read_only {
            return Ok(false);
        }
        let done = self.ch.reserve(off, len).await?;
        if done {
            self.storage.note_end(off + len);
        }
        Ok(done)
    }

    /// Makes `off..off+len` read as zeros. With `unmap`, space may be released. Returns
    /// `NotSupported` when the storage cannot do it without writing zeros; the caller
    /// decides whether to fall back to writing them.
    pub async fn zero_range(&self, off: u64, len: u64, unmap: bool) -> Result<(), IoError> {
        if self.storage.read_only {
            return Err(IoError::ReadOnly);
        }
        let grows = !self.storage.is_block_device() && off + len > self.storage.size();
        self.ch.zero_range(off, len, unmap, grows).await?;
        self.storage.note_end(off + len);
        Ok(())
    }

    /// Releases `off..off+len` if the storage can (advisory: never an error when it
    /// cannot). Contents afterwards read as zeros only if this returns `Ok(true)`.
    pub async fn discard(&self, off: u64, len: u64) -> Result<bool, IoError> {
        if self.storage.read_only {
            return Err(IoError::ReadOnly);
        }
        let end = (off + len).min(self.storage.size());
        if end <= off {
            return Ok(true);
        }
        self.ch.discard(off, end - off).await
    }

    /// The allocation status of the bytes from `off` (at most `len` of them).
    pub async fn block_status(&self, off: u64, len: u64) -> Result<Extent, IoError> {
        let len = len.min(self.storage.size().saturating_sub(off));
        if len == 0 {
            return Ok(Extent { len, allocation: Allocation::Data });
        }
        self.ch.block_status(off, len).await
    }
}

/// The length of one kernel I/O, or `TooLarge`.
pub(crate) fn io_len(n: usize) -> Result<u32, IoError> {
    if n > MAX_IO_BYTES { Err(IoError::TooLarge) } else { Ok(n as u32) }
}

/// Sets the size of the regular file open at `fd` to `len` bytes (not synced).
/// Shrinking is refused (`InvalidData`, naming the first offset that holds data) unless
/// nothing past `len` holds data, as `SEEK_DATA` reports.
pub fn resize_fd(fd: std::os::fd::RawFd, len: u64) -> std::io::Result<()> {
    let len_off = libc::off_t::try_from(len).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    // SAFETY: fstat, lseek and ftruncate take a descriptor (a bad one is an error
    // return) and plain integers; `st` is plain data the kernel fills.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd, &mut st) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if st.st_size > len_off {
            let data = libc::lseek(fd, len_off, libc::SEEK_DATA);
            let e = std::io::Error::last_os_error();
            if data >= 0 || e.raw_os_error() != Some(libc::ENXIO) {
                let at = if data >= 0 { data as u64 } else { len };
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("shrinking to {len} bytes would lose data: offset {at:#x} holds data"),
                ));
            }
        }
        if st.st_size != len_off && libc::ftruncate(fd, len_off) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}
