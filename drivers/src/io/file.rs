//! The file backend: a regular file or a block device, driven by the reactor's
//! io_uring or Linux AIO engine.
//!
//! Only data I/O, fdatasync and (with io_uring) fallocate go through the engine's ring.
//! Without io_uring, fallocate runs on an offload worker; block status uses
//! `lseek(SEEK_DATA/SEEK_HOLE)` on an offload worker; growing a file is an `ftruncate`
//! there too. Short reads mean end of file (zeros) unless a retry finds more data,
//! which a concurrent extension of the file can cause; short writes are retried.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

use crate::error::{IoError, OpenError};
use crate::seg::{self, IoSeg};

use super::engine::offload::{BlockingOp, Offload};
use super::engine::{self, EngineRef, IoOp, check};
use super::{
    Allocation, Backend, BackendChannel, EngineKind, Extent, Storage, StoreFuture, io_len, probe,
};

struct FileBackend {
    file: File,
    engine: EngineKind,
    block_device: bool,
}

/// Opens `path` (a regular file or block device), probes its O_DIRECT alignment when
/// `direct`, and takes QEMU-compatible image locks when `lock`.
pub(crate) fn open(
    path: &Path,
    engine: EngineKind,
    direct: bool,
    read_only: bool,
    lock: bool,
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
    if lock {
        super::lock::lock_image(&file, path, !read_only)?;
    }
    let align = probe::probe(&file, path, direct)?;
    let backend = FileBackend { file, engine, block_device };
    let s =
        Storage::new(Box::new(backend), Some(path.to_path_buf()), align, size, read_only, direct);
    if lock {
        s.set_locked();
    }
    Ok(s)
}

impl Backend for FileBackend {
    fn kind(&self) -> &'static str {
        "<file>"
    }

    fn open_channel(&self) -> Result<Box<dyn BackendChannel>, IoError> {
        let engine = match self.engine {
            EngineKind::IoUring => EngineRef::Uring(engine::uring::current()?),
            EngineKind::Aio => EngineRef::Aio(engine::aio::current()?),
        };
        Ok(Box::new(FileChannel {
            fd: self.file.as_raw_fd(),
            engine,
            block_device: self.block_device,
        }))
    }

    fn read_sync(&self, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            let n = self.file.read_at(&mut buf[done..], off + done as u64)?;
            if n == 0 {
                buf[done..].fill(0);
                break;
            }
            done += n;
        }
        Ok(buf.len())
    }

    fn write_sync(&self, buf: &[u8], off: u64) -> std::io::Result<()> {
        self.file.write_all_at(buf, off)
    }

    fn sync(&self) -> std::io::Result<()> {
        self.file.sync_all()
    }

    fn raw_fd(&self) -> Option<RawFd> {
        Some(self.file.as_raw_fd())
    }

    fn is_block_device(&self) -> bool {
        self.block_device
    }

    fn reports_holes(&self) -> bool {
        !self.block_device
    }
}

struct FileChannel {
    fd: RawFd,
    engine: EngineRef,
    block_device: bool,
}

impl FileChannel {
    async fn read(&self, off: u64, segs: &[IoSeg<'_>]) -> Result<(), IoError> {
        let total = seg::total_len(segs);
        let res = if segs.len() == 1 {
            let op = IoOp::Read { fd: self.fd, off, ptr: segs[0].as_ptr(), len: io_len(total)? };
            self.engine.submit(op).await
        } else {
            let iov = seg::as_iovecs(segs);
            let op = IoOp::Readv { fd: self.fd, off, iov, cnt: segs.len() as u32 };
            self.engine.submit(op).await
        };
        let n = check(res)?;
        if n < total {
            self.finish_short_read(off, segs, n).await?;
        }
        Ok(())
    }

    /// A short read means end of file (zeros) — unless a retry finds more data, which a
    /// concurrent extension of the file can cause. Retries whole segments one at a time
    /// from the first unfinished one.
    async fn finish_short_read(
        &self,
        off: u64,
        segs: &[IoSeg<'_>],
        mut done: usize,
    ) -> Result<(), IoError> {
        let total = seg::total_len(segs);
        let mut seg_start = 0;
        for s in segs {
            let seg_end = seg_start + s.len();
            if seg_end <= done {
                seg_start = seg_end;
                continue;
            }
            if done > seg_start {
                // The kernel stopped inside this segment: the file ends there.
                seg::zero_segs(segs, done, total - done);
                return Ok(());
            }
            let op = IoOp::Read {
                fd: self.fd,
                off: off + done as u64,
                ptr: s.as_ptr(),
                len: io_len(s.len())?,
            };
            let n = check(self.engine.submit(op).await)?;
            done += n;
            if n < s.len() {
                seg::zero_segs(segs, done, total - done);
                return Ok(());
            }
            seg_start = seg_end;
        }
        Ok(())
    }

    async fn write(&self, off: u64, segs: &[IoSeg<'_>], fua: bool) -> Result<(), IoError> {
        let total = seg::total_len(segs);
        let res = if segs.len() == 1 {
            let ptr = segs[0].as_ptr();
            let op = IoOp::Write { fd: self.fd, off, ptr, len: io_len(total)?, fua };
            self.engine.submit(op).await
        } else {
            let iov = seg::as_iovecs(segs);
            let op = IoOp::Writev { fd: self.fd, off, iov, cnt: segs.len() as u32, fua };
            self.engine.submit(op).await
        };
        let n = check(res)?;
        if n < total {
            self.finish_short_write(off, segs, n, fua).await?;
        }
        Ok(())
    }

    async fn finish_short_write(
        &self,
        off: u64,
        segs: &[IoSeg<'_>],
        mut done: usize,
        fua: bool,
    ) -> Result<(), IoError> {
        let mut seg_start = 0;
        for s in segs {
            let seg_end = seg_start + s.len();
            while done < seg_end {
                let skip = done - seg_start;
                let op = IoOp::Write {
                    fd: self.fd,
                    off: off + done as u64,
                    ptr: s.slice(skip, s.len() - skip).as_ptr(),
                    len: io_len(s.len() - skip)?,
                    fua,
                };
                let n = check(self.engine.submit(op).await)?;
                if n == 0 {
                    return Err(IoError::NoSpace);
                }
                done += n;
            }
            seg_start = seg_end;
        }
        Ok(())
    }

    /// fallocate through io_uring, or an offload worker under AIO.
    async fn fallocate(&self, off: u64, len: u64, mode: i32) -> Result<(), IoError> {
        let res = if self.engine.supports_fallocate() {
            self.engine.submit(IoOp::Fallocate { fd: self.fd, off, len, mode }).await
        } else {
            Offload::new(BlockingOp::Fallocate { fd: self.fd, off, len, mode }).await
        };
        check(res).map(|_| ()).map_err(IoError::from)
    }

    async fn zero_range(
        &self,
        off: u64,
        len: u64,
        unmap: bool,
        grows: bool,
    ) -> Result<(), IoError> {
        let keep = libc::FALLOC_FL_KEEP_SIZE;
        // Zeroing past the end of a regular file grows it (punching cannot).
        let mode = if grows {
            libc::FALLOC_FL_ZERO_RANGE
        } else if unmap {
            libc::FALLOC_FL_PUNCH_HOLE | keep
        } else {
            libc::FALLOC_FL_ZERO_RANGE | keep
        };
        match self.fallocate(off, len, mode).await {
            Ok(()) => Ok(()),
            Err(IoError::NotSupported) | Err(IoError::Os(libc::EINVAL)) if unmap && !grows => {
                // Punching holes unsupported: try zero-range.
                self.fallocate(off, len, libc::FALLOC_FL_ZERO_RANGE | keep)
                    .await
                    .map_err(|_| IoError::NotSupported)
            }
            Err(IoError::Os(libc::EINVAL)) => Err(IoError::NotSupported),
            Err(e) => Err(e),
        }
    }

    async fn discard(&self, off: u64, len: u64) -> Result<bool, IoError> {
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        match self.fallocate(off, len, mode).await {
            Ok(()) => Ok(true),
            Err(IoError::NotSupported) | Err(IoError::Os(libc::EINVAL)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn block_status(&self, off: u64, len: u64) -> Result<Extent, IoError> {
        if self.block_device {
            return Ok(Extent { len, allocation: Allocation::Data });
        }
        let fd = self.fd;
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

    /// fallocate mode 0: holes become unwritten extents, data stays, the size grows.
    async fn reserve(&self, off: u64, len: u64) -> Result<bool, IoError> {
        if self.block_device {
            return Ok(false);
        }
        match self.fallocate(off, len, 0).await {
            Ok(()) => Ok(true),
            Err(IoError::NotSupported | IoError::NoSpace | IoError::Os(libc::EINVAL)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn grow_to(&self, len: u64) -> Result<bool, IoError> {
        if self.block_device {
            return Ok(false);
        }
        let r = Offload::new(BlockingOp::Ftruncate { fd: self.fd, len }).await;
        check(r).map_err(IoError::from)?;
        Ok(true)
    }
}

impl BackendChannel for FileChannel {
    fn read<'a>(&'a self, off: u64, segs: &'a [IoSeg<'a>]) -> StoreFuture<'a> {
        StoreFuture::new(FileChannel::read(self, off, segs))
    }
    fn write<'a>(&'a self, off: u64, segs: &'a [IoSeg<'a>], fua: bool) -> StoreFuture<'a> {
        StoreFuture::new(FileChannel::write(self, off, segs, fua))
    }
    fn flush(&self) -> StoreFuture<'_> {
        StoreFuture::new(async move {
            check(self.engine.submit(IoOp::Fsync { fd: self.fd }).await)?;
            Ok(())
        })
    }
    fn zero_range(&self, off: u64, len: u64, unmap: bool, grows: bool) -> StoreFuture<'_> {
        StoreFuture::new(FileChannel::zero_range(self, off, len, unmap, grows))
    }
    fn discard(&self, off: u64, len: u64) -> StoreFuture<'_, bool> {
        StoreFuture::new(FileChannel::discard(self, off, len))
    }
    fn block_status(&self, off: u64, len: u64) -> StoreFuture<'_, Extent> {
        StoreFuture::new(FileChannel::block_status(self, off, len))
    }
    fn grow_to(&self, len: u64) -> StoreFuture<'_, bool> {
        StoreFuture::new(FileChannel::grow_to(self, len))
    }
    fn reserve(&self, off: u64, len: u64) -> StoreFuture<'_, bool> {
        StoreFuture::new(FileChannel::reserve(self, off, len))
    }
}
