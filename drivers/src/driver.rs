//! The implementor API: what a block driver implements (SPDK's bdev module interface).
//!
//! Format drivers (`format::raw`, `format::qcow2`) implement [`BlockDriver`]; the
//! consumer API (`api`) holds any of them as `Arc<dyn BlockDriver>` and never names
//! one. A driver describes its device ([`DeviceInfo`]) and opens a per-reactor
//! [`DriverChannel`] (SPDK's io_channel) through which that reactor's tasks submit
//! requests. The consumer API validates every request before it reaches a channel
//! (`api::DeviceInfo::admit`): ranges inside the device, nothing empty, nothing larger
//! than `max_transfer`, no change to a read-only device. Drivers may rely on that and
//! `debug_assert!` it.
//!
//! Channel methods return an [`IoFuture`]: the driver's future stored inline in a fixed
//! buffer of [`IO_FUTURE_BYTES`] (no allocation per request), a compile-time error if a
//! driver's request state outgrows it — the driver's declared per-I/O context, as in
//! SPDK. Drivers whose requests need more state (the qcow2 engine) keep it in their own
//! preallocated task pools and return a small future that waits for them.

use poller::InlineFuture;

use crate::error::{IoError, OpenError};
pub use crate::format::qcow2::snapshot::SnapshotInfo;
pub use crate::format::qcow2::snapshots::Op as SnapshotOp;
use crate::io::probe::Alignment;
use crate::seg::IoSeg;

/// The inline capacity of a driver request's future.
pub const IO_FUTURE_BYTES: usize = 2048;

/// What a driver channel's request method returns.
pub type IoFuture<'a, T = ()> = InlineFuture<'a, Result<T, IoError>, IO_FUTURE_BYTES>;

/// What a device is and can do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceInfo {
    pub size: u64,
    /// The smallest request that needs no read-modify-write (the storage's request
    /// alignment, at least 1).
    pub min_block_size: u32,
    /// The block size that performs best.
    pub preferred_block_size: u32,
    /// The largest read or write accepted in one piece.
    pub max_transfer: u32,
    /// Buffer address alignment that avoids bounce buffers.
    pub mem_align: u32,
    pub read_only: bool,
    pub can_discard: bool,
    pub can_write_zeroes: bool,
    /// Write-zeroes can be asked to fail rather than be slow.
    pub can_fast_zero: bool,
    /// Flushes on one channel make writes completed on every channel durable.
    pub can_multi_conn: bool,
    /// The format reports holes and zeroes in block status.
    pub has_block_status: bool,
}

impl DeviceInfo {
    /// A device of `size` bytes over storage with `align`, with the capabilities every
    /// driver here has (discard, write-zeroes, multi-connection flushes).
    pub fn new(size: u64, align: Alignment, read_only: bool) -> DeviceInfo {
        DeviceInfo {
            size,
            min_block_size: align.request.max(1) as u32,
            preferred_block_size: align.request.max(4096) as u32,
            max_transfer: crate::api::MAX_TRANSFER_BYTES,
            mem_align: align.mem.max(1) as u32,
            read_only,
            can_discard: true,
            can_write_zeroes: true,
            can_fast_zero: true,
            can_multi_conn: true,
            has_block_status: true,
        }
    }
}

/// Flags of a write-zeroes request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// Space may be released (NBD without NO_HOLE; virtio-blk's unmap flag).
    pub may_unmap: bool,
    /// Fail with `NotSupported` instead of writing zeros slowly (NBD FAST_ZERO).
    pub fast_only: bool,
    /// Durable on completion.
    pub fua: bool,
}

/// The status of a range from its start, for NBD `base:allocation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockStatus {
    /// Bytes from the queried offset with this status (at least 1).
    pub len: u64,
    /// Takes no space in the image (a hole or an unallocated cluster).
    pub hole: bool,
    /// Reads as zeros.
    pub zero: bool,
    /// Which image of the chain provides these bytes: 1 the disk's own image, 2 its
    /// backing file, and so on; 0 none (they read as zeros because nothing holds
    /// them). A format without backing files says 1 (QEMU's `qemu:allocation-depth`).
    pub depth: u8,
}

/// One image file of a disk's chain (the disk's own image first, then its backing
/// files), as block jobs see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainLink {
    pub path: std::path::PathBuf,
    /// `qcow2` or `raw`.
    pub format: &'static str,
}

/// A dirty bitmap the image stores (a qcow2 persistent bitmap): loaded at open, and
/// handed back at close to be stored.
#[derive(Clone)]
pub struct StoredBitmap {
    pub name: String,
    pub map: std::sync::Arc<crate::api::bitmap::DirtyBitmap>,
    /// Recording writes (qcow2's `auto` flag).
    pub auto: bool,
    /// Found in use at open (not stored by a clean close): its bits are not trusted.
    pub inconsistent: bool,
}

/// A block driver: shared by every reactor (`Send + Sync`), opened on the control
/// plane.
pub trait BlockDriver: Send + Sync + 'static {
    /// What the device is. Stable for the driver's life.
    fn info(&self) -> &DeviceInfo;

    /// Opens the device's channel on the current reactor.
    fn open_channel(&self) -> Result<Box<dyn DriverChannel>, IoError>;

    /// Makes every completed write durable and releases the driver's per-reactor state.
    /// Control plane, after the last request.
    fn close(&self) -> Result<(), IoError>;

    /// The bitmaps the image stores, as loaded at open (a read-write open flags them
    /// in use until [`BlockDriver::close_storing`]). Control plane.
    fn stored_bitmaps(&self) -> Vec<StoredBitmap> {
        Vec::new()
    }

    /// Why the driver cannot store persistent bitmaps; `None` when it can.
    fn bitmap_store_refusal(&self) -> Option<String> {
        Some("persistent bitmaps are stored in qcow2 images only".into())
    }

    /// [`BlockDriver::close`], then stores `bitmaps` as the image's persistent bitmaps
    /// (replacing those it held). Drivers that store none just close.
    fn close_storing(&self, bitmaps: &[StoredBitmap]) -> Result<(), IoError> {
        let _ = bitmaps;
        self.close()
    }

    /// Counters for the metrics endpoint: (name, value), exported as
    /// `appliance_<name>_total` (`qcow2_l2_cache_hits`, say). Control plane.
    fn stats(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }

    /// The image files under the disk, its own first, then its backing chain (what
    /// stream and commit jobs work on). Formats without backing files: empty.
    fn chain(&self) -> Vec<ChainLink> {
        Vec::new()
    }

    /// Makes the disk's image stand alone: it must already hold everything its backing
    /// chain provided (a stream job copied it). Everything is flushed, the header stops
    /// naming a backing file, and reads no longer go through the chain. Control plane,
    /// with the disk quiesced.
    fn drop_backing(&self) -> Result<(), IoError> {
        Err(IoError::NotSupported)
    }

    /// Takes the image locks of a driver opened without them for a block job (a
    /// commit's base), once it serves the disk alone. Control plane.
    fn lock_images(&self) -> Result<(), OpenError> {
        Ok(())
    }

    /// Whether [`DriverChannel::write_compressed`] compresses (a writable qcow2 image).
    fn compresses(&self) -> bool {
        false
    }

    /// The image's internal snapshots, if its format has them (qcow2).
    fn internal_snapshots(&self) -> Option<&dyn InternalSnapshots> {
        None
    }

    /// The driver's way to grow a served device, if it has one.
    fn resizable(&self) -> Option<&dyn Resizable> {
        None
    }
}

/// Internal snapshots of a served image (qcow2's snapshot table). Control plane.
pub trait InternalSnapshots {
    /// The snapshots the image holds.
    fn list(&self) -> Result<Vec<SnapshotInfo>, OpenError>;

    /// Creates or deletes a snapshot (applying one is offline only, as in QEMU), with
    /// the disk quiesced. `Err`: refused before anything changed (the driver serves on).
    /// Otherwise the driver is closed, storing `bitmaps`, the image is changed and
    /// reopened: the disk must be served by [`Reopened::driver`] from now on.
    fn change(&self, op: &SnapshotOp<'_>, bitmaps: &[StoredBitmap]) -> Result<Reopened, OpenError>;
}

/// Growing a served device (`disk_resize`). Control plane, with the disk quiesced.
pub trait Resizable {
    /// Grows the device to `new_size` bytes. `Err`: refused before anything changed (the
    /// driver serves on). Otherwise the disk must be served by [`Reopened::driver`],
    /// which describes the new size, from now on; on a failed [`Reopened::outcome`] it
    /// describes the old one.
    fn resize(&self, new_size: u64, bitmaps: &[StoredBitmap]) -> Result<Reopened, OpenError>;
}

/// What [`InternalSnapshots::change`] or [`Resizable::resize`] did.
pub struct Reopened {
    /// The change's outcome: on an error the image is as it was (with leaked clusters
    /// at worst).
    pub outcome: Result<(), OpenError>,
    /// The image opened again, or why it could not be.
    pub driver: Result<std::sync::Arc<dyn BlockDriver>, OpenError>,
}

/// A driver's per-reactor handle. Requests arrive already validated.
pub trait DriverChannel {
    /// Reads `segs` (at least one byte) from `off`.
    fn read<'a>(&'a self, off: u64, segs: &'a [IoSeg<'a>]) -> IoFuture<'a>;

    /// Writes `segs` at `off`; with `fua` the data is durable on completion.
    fn write<'a>(&'a self, off: u64, segs: &'a [IoSeg<'a>], fua: bool) -> IoFuture<'a>;

    /// Makes every write completed before the call durable, on every channel.
    fn flush(&self) -> IoFuture<'_>;

    /// Makes `off..off+len` read as zeros.
    fn write_zeroes(&self, off: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_>;

    /// Releases the range if the device can; contents become unspecified.
    fn discard(&self, off: u64, len: u64) -> IoFuture<'_>;

    /// The status of the bytes from `off`, at most `len` of them.
    fn block_status(&self, off: u64, len: u64) -> IoFuture<'_, BlockStatus>;

    /// Writes `segs` at `off` only where the disk's own image holds nothing yet (data
    /// its backing chain provides, pulled up by a stream job); what the image holds,
    /// the guest wrote, and stays. Formats without backing files: `NotSupported`.
    fn populate<'a>(&'a self, _off: u64, _segs: &'a [IoSeg<'a>]) -> IoFuture<'a> {
        IoFuture::ready(Err(IoError::NotSupported))
    }

    /// Writes `segs` at `off`, compressing the whole clusters the format can (qcow2:
    /// those the image does not hold yet, whose data shrinks); the rest is written
    /// plainly. Drivers that do not compress: `NotSupported` (see
    /// [`BlockDriver::compresses`]).
    fn write_compressed<'a>(&'a self, _off: u64, _segs: &'a [IoSeg<'a>]) -> IoFuture<'a> {
        IoFuture::ready(Err(IoError::NotSupported))
    }
}
