//! The raw format driver: the guest sees the storage as it is, byte for byte, through
//! the shared alignment layer ([`crate::io::align`]), which pads what the storage's
//! O_DIRECT alignment refuses.

use std::sync::Arc;

use crate::driver::{
    BlockDriver, BlockStatus, DeviceInfo, DriverChannel, IoFuture, Reopened, Resizable,
    StoredBitmap, ZeroFlags,
};
use crate::error::IoError;
use crate::error::OpenError;
use crate::io::align::Aligned;
use crate::io::{Allocation, Storage};
use crate::seg::IoSeg;

/// A raw disk.
pub struct RawDriver {
    storage: Arc<Storage>,
    info: DeviceInfo,
}

impl RawDriver {
    pub fn new(storage: Arc<Storage>, read_only: bool) -> RawDriver {
        let mut info = DeviceInfo::new(
            storage.size(),
            storage.alignment(),
            read_only || storage.is_read_only(),
        );
        // A block device cannot promise that zeroing is fast; only a sparse file tells
        // holes from data.
        info.can_fast_zero = !storage.is_block_device();
        info.has_block_status = storage.reports_holes();
        RawDriver { storage, info }
    }
}

impl BlockDriver for RawDriver {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn open_channel(&self) -> Result<Box<dyn DriverChannel>, IoError> {
        Ok(Box::new(RawChannel(Aligned::new(self.storage.channel()?))))
    }

    fn lock_images(&self) -> Result<(), crate::error::OpenError> {
        self.storage.lock_image()
    }

    fn close(&self) -> Result<(), IoError> {
        if self.info.read_only {
            return Ok(());
        }
        self.storage.sync_all().map_err(|e| IoError::Os(e.raw_os_error().unwrap_or(libc::EIO)))
    }

    fn resizable(&self) -> Option<&dyn Resizable> {
        Some(self)
    }

    fn stats(&self) -> Vec<(&'static str, u64)> {
        self.storage.stats()
    }
}

impl Resizable for RawDriver {
    /// Grows the file (sparsely: the new tail reads as zeros), or shrinks it when
    /// nothing past the new end holds data (a hole there, as `SEEK_DATA` reports), and
    /// describes the new size in a new driver over the same storage. Refused: read-only
    /// disks, shrinking over data, storage that is not a regular file.
    fn resize(&self, new_size: u64, _bitmaps: &[StoredBitmap]) -> Result<Reopened, OpenError> {
        let name = self.storage.display_name();
        let refuse = |m: String| Err(OpenError::invalid(&name, m));
        if self.info.read_only {
            return refuse("the disk is read-only".into());
        }
        if self.storage.path().is_none() || self.storage.is_block_device() {
            return refuse("only a disk in a regular file changes size".into());
        }
        let outcome = self.storage.resize_sync(new_size).map_err(|e| match e.kind() {
            std::io::ErrorKind::InvalidData => OpenError::invalid(&name, e.to_string()),
            _ => OpenError::io(&name, e),
        });
        // A raw disk is its file: the storage's size is the new one, or still the old.
        let driver = RawDriver::new(self.storage.clone(), self.info.read_only);
        Ok(Reopened { outcome, driver: Ok(Arc::new(driver)) })
    }
}

struct RawChannel(Aligned);

impl RawChannel {
    async fn write_zeroes(&self, off: u64, len: u64, flags: ZeroFlags) -> Result<(), IoError> {
        let a = &self.0;
        match a.zero_range(off, len, flags.may_unmap).await {
            Ok(()) if flags.fua => a.flush().await,
            Ok(()) => Ok(()),
            Err(IoError::NotSupported) if !flags.fast_only => {
                a.write_zero_bytes(off, len, flags.fua).await
            }
            Err(e) => Err(e),
        }
    }

    async fn block_status(&self, off: u64, len: u64) -> Result<BlockStatus, IoError> {
        let e = self.0.block_status(off, len).await?;
        let hole = e.allocation == Allocation::Hole;
        Ok(BlockStatus { len: e.len.clamp(1, len), hole, zero: hole, depth: 1 })
    }
}

impl DriverChannel for RawChannel {
    fn read<'a>(&'a self, off: u64, segs: &'a [IoSeg<'a>]) -> IoFuture<'a> {
        IoFuture::new(self.0.read(off, segs))
    }
    fn write<'a>(&'a self, off: u64, segs: &'a [IoSeg<'a>], fua: bool) -> IoFuture<'a> {
        IoFuture::new(self.0.write(off, segs, fua))
    }
    fn flush(&self) -> IoFuture<'_> {
        IoFuture::new(self.0.flush())
    }
    fn write_zeroes(&self, off: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_> {
        IoFuture::new(RawChannel::write_zeroes(self, off, len, flags))
    }
    fn discard(&self, off: u64, len: u64) -> IoFuture<'_> {
        IoFuture::new(async move { self.0.discard(off, len).await.map(|_| ()) })
    }
    fn block_status(&self, off: u64, len: u64) -> IoFuture<'_, BlockStatus> {
        IoFuture::new(RawChannel::block_status(self, off, len))
    }
}
