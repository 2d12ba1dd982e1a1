//! The consumer side of block devices: what exports see.
//!
//! A [`Bdev`] is the shared, immutable description of one configured disk (size, block
//! sizes, capabilities) plus its format state; [`Bdev::channel`] opens its per-reactor
//! handle, a [`BdevChannel`] (SPDK's io_channel), through which a reactor's tasks submit
//! requests. Every request passes one validation step here ([`BdevInfo::admit`]: range,
//! read-only, transfer size, zero length) before it reaches a driver, so format drivers
//! and storage below only ever see valid, non-empty requests; exports call the same
//! function when they must decide before touching the device (to size a buffer, say).
//! Exports never touch the layers below this one.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::align::Aligned;
use crate::error::{IoError, OpenError};
use crate::qcow2::{Qcow2Channel, Qcow2Device};
use crate::qos::{Qos, QosLimits};
use crate::seg::{self, IoSeg};
use crate::storage::{Allocation, EngineKind, Storage};

/// The largest request the device accepts in one piece.
pub const MAX_TRANSFER_BYTES: u32 = 32 << 20;

/// What a device is and can do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BdevInfo {
    pub size: u64,
    /// The smallest request that needs no read-modify-write (the storage's request
    /// alignment, at least 1).
    pub min_block_size: u32,
    /// The block size that performs best.
    pub preferred_block_size: u32,
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

/// What a request asks of a device, for the shared validation step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReqKind {
    Read,
    Write,
    Flush,
    WriteZeroes,
    Discard,
    BlockStatus,
    Cache,
}

impl ReqKind {
    /// Changes the device's contents (refused on a read-only device).
    pub fn modifies(self) -> bool {
        matches!(self, ReqKind::Write | ReqKind::WriteZeroes | ReqKind::Discard)
    }

    /// Moves `len` bytes through memory (bounded by `max_transfer`, charged by QoS).
    pub fn moves_data(self) -> bool {
        matches!(self, ReqKind::Read | ReqKind::Write)
    }
}

/// What the shared validation step lets through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// A request for the driver.
    Go,
    /// A request of no bytes: done, successfully, without reaching a driver.
    Nothing,
}

impl BdevInfo {
    /// The one validation every request passes before it reaches a driver, whichever
    /// export sent it: read-only devices refuse changes, ranges must lie inside the
    /// device, data transfers are at most `max_transfer` bytes, zero-length requests
    /// complete at once (NBD and virtio leave them unspecified; both servers in QEMU
    /// answer success), and a block-status query must cover at least one byte (its
    /// reply describes a non-empty extent). Exports map the error to their wire status.
    pub fn admit(&self, kind: ReqKind, off: u64, len: u64) -> Result<Admit, IoError> {
        if kind.modifies() && self.read_only {
            return Err(IoError::ReadOnly);
        }
        if kind == ReqKind::Flush {
            return Ok(Admit::Go);
        }
        match off.checked_add(len) {
            Some(end) if end <= self.size => {}
            _ => return Err(IoError::OutOfRange),
        }
        if kind.moves_data() && len > u64::from(self.max_transfer) {
            return Err(IoError::TooLarge);
        }
        match (len, kind) {
            (0, ReqKind::BlockStatus) => Err(IoError::Invalid),
            (0, _) => Ok(Admit::Nothing),
            _ => Ok(Admit::Go),
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
    pub len: u64,
    /// Takes no space in the image (a hole or an unallocated cluster).
    pub hole: bool,
    /// Reads as zeros.
    pub zero: bool,
}

fn qos_of(disk: &config::Disk) -> QosLimits {
    disk.qos.map_or_else(QosLimits::default, |q| QosLimits {
        iops: q.iops,
        bandwidth: q.bandwidth,
        burst: q.burst,
    })
}

enum Format {
    Raw(Arc<Storage>),
    Qcow2(Arc<Qcow2Device>),
}

/// A configured, opened disk.
pub struct Bdev {
    name: String,
    info: BdevInfo,
    format: Format,
    qos: Qos,
    /// Set when the disk is being removed: no new channel opens.
    retired: AtomicBool,
}

impl std::fmt::Debug for Bdev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bdev").field("name", &self.name).field("info", &self.info).finish()
    }
}

impl Bdev {
    /// Opens the disk a config entry describes. A qcow2 image's shard is set up on
    /// `owner` (the reactor that will serve its metadata).
    pub fn open(
        disk: &config::Disk,
        owner: &poller::ReactorHandle,
    ) -> Result<Arc<Bdev>, OpenError> {
        if disk.format == config::Format::Qcow2 {
            return Self::open_qcow2(disk, owner);
        }
        let storage = match disk.driver {
            config::Driver::Null => Storage::null(disk.size.unwrap_or(0)),
            config::Driver::Mem => Storage::mem(disk.size.unwrap_or(0))?,
            config::Driver::IoUring | config::Driver::Aio => {
                let engine = if disk.driver == config::Driver::Aio {
                    EngineKind::Aio
                } else {
                    EngineKind::IoUring
                };
                let path = disk.path.as_deref().unwrap_or(Path::new(""));
                Storage::open_file(path, engine, disk.direct, disk.read_only)?
            }
        };
        let b = Self::raw(&disk.name, storage, disk.read_only);
        b.set_qos(qos_of(disk));
        Ok(b)
    }

    fn open_qcow2(
        disk: &config::Disk,
        owner: &poller::ReactorHandle,
    ) -> Result<Arc<Bdev>, OpenError> {
        let path = disk.path.as_deref().unwrap_or(Path::new(""));
        let engine =
            if disk.driver == config::Driver::Aio { EngineKind::Aio } else { EngineKind::IoUring };
        let opts = crate::qcow2::OpenOptions {
            engine,
            direct: disk.direct,
            read_only: disk.read_only,
            allowed_backing_dirs: disk.allowed_backing_dirs.clone(),
            l2_cache_bytes: disk.l2_cache_bytes,
            refcount_cache_bytes: disk.refcount_cache_bytes,
            storage: None,
        };
        let dev = Qcow2Device::open(path, opts, owner.clone())?;
        let align = dev.alignment();
        let info = BdevInfo {
            size: dev.header().size,
            min_block_size: align.request.max(1) as u32,
            preferred_block_size: align.request.max(4096) as u32,
            max_transfer: MAX_TRANSFER_BYTES,
            mem_align: align.mem.max(1) as u32,
            read_only: disk.read_only,
            can_discard: true,
            can_write_zeroes: true,
            can_fast_zero: true,
            can_multi_conn: true,
            has_block_status: true,
        };
        let b = Arc::new(Bdev {
            name: disk.name.clone(),
            info,
            format: Format::Qcow2(dev),
            qos: Qos::default(),
            retired: AtomicBool::new(false),
        });
        b.set_qos(qos_of(disk));
        Ok(b)
    }

    /// The qcow2 image behind this device, if it is one.
    pub fn qcow2(&self) -> Option<&Arc<Qcow2Device>> {
        match &self.format {
            Format::Qcow2(d) => Some(d),
            Format::Raw(_) => None,
        }
    }

    /// Refuses new channels from now on (the disk is being removed); channels already
    /// open keep working until their owners drop them.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::SeqCst);
    }

    /// Whether [`Bdev::retire`] was called.
    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::SeqCst)
    }

    /// Makes every completed write durable and releases the device's per-reactor state
    /// (writing qcow2 metadata back and clearing its dirty bit). Control plane, after
    /// the last request.
    pub fn close(&self) -> Result<(), IoError> {
        match &self.format {
            Format::Qcow2(d) => d.close(),
            Format::Raw(s) if !self.info.read_only => {
                s.sync_all().map_err(|e| IoError::Os(e.raw_os_error().unwrap_or(libc::EIO)))
            }
            Format::Raw(_) => Ok(()),
        }
    }

    /// A raw-format device over `storage`.
    pub fn raw(name: &str, storage: Arc<Storage>, read_only: bool) -> Arc<Bdev> {
        let align = storage.alignment();
        let file_backed = storage.path().is_some();
        let info = BdevInfo {
            size: storage.size(),
            min_block_size: align.request.max(1) as u32,
            preferred_block_size: align.request.max(4096) as u32,
            max_transfer: MAX_TRANSFER_BYTES,
            mem_align: align.mem.max(1) as u32,
            read_only: read_only || storage.is_read_only(),
            can_discard: true,
            can_write_zeroes: true,
            can_fast_zero: !storage.is_block_device(),
            can_multi_conn: true,
            has_block_status: file_backed && !storage.is_block_device(),
        };
        Arc::new(Bdev {
            name: name.to_string(),
            info,
            format: Format::Raw(storage),
            qos: Qos::default(),
            retired: AtomicBool::new(false),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The disk's QoS limits (shared by every channel; changeable live).
    pub fn qos(&self) -> &Qos {
        &self.qos
    }

    /// Sets the QoS limits.
    pub fn set_qos(&self, limits: QosLimits) {
        self.qos.set(limits);
    }

    pub fn info(&self) -> &BdevInfo {
        &self.info
    }

    /// Opens the device's handle on the current reactor.
    pub fn channel(self: &Arc<Self>) -> Result<BdevChannel, IoError> {
        if self.is_retired() {
            return Err(IoError::Shutdown);
        }
        let kind = match &self.format {
            Format::Raw(storage) => ChannelKind::Raw(Aligned::new(storage.channel()?)),
            Format::Qcow2(dev) => ChannelKind::Qcow2(dev.channel()?),
        };
        Ok(BdevChannel { bdev: self.clone(), kind })
    }
}

enum ChannelKind {
    Raw(Aligned),
    Qcow2(Qcow2Channel),
}

/// A device's handle on one reactor.
pub struct BdevChannel {
    bdev: Arc<Bdev>,
    kind: ChannelKind,
}

impl BdevChannel {
    pub fn bdev(&self) -> &Arc<Bdev> {
        &self.bdev
    }

    pub fn info(&self) -> &BdevInfo {
        &self.bdev.info
    }

    /// The shared validation step, then QoS admission; `false` means there is nothing
    /// to do (a zero-length request) and the caller answers success.
    async fn enter(&self, kind: ReqKind, off: u64, len: u64) -> Result<bool, IoError> {
        if self.bdev.info.admit(kind, off, len)? == Admit::Nothing {
            return Ok(false);
        }
        self.bdev.qos.admit(if kind.moves_data() { len } else { 0 }).await;
        Ok(true)
    }

    pub async fn read(&self, off: u64, segs: &[IoSeg<'_>]) -> Result<(), IoError> {
        if !self.enter(ReqKind::Read, off, seg::total_len(segs) as u64).await? {
            return Ok(());
        }
        match &self.kind {
            ChannelKind::Raw(a) => a.read(off, segs).await,
            ChannelKind::Qcow2(q) => q.read(off, segs).await,
        }
    }

    /// Writes `segs` at `off`; with `fua` the data is durable on completion.
    pub async fn write(&self, off: u64, segs: &[IoSeg<'_>], fua: bool) -> Result<(), IoError> {
        if !self.enter(ReqKind::Write, off, seg::total_len(segs) as u64).await? {
            return Ok(());
        }
        match &self.kind {
            ChannelKind::Raw(a) => a.write(off, segs, fua).await,
            ChannelKind::Qcow2(q) => q.write(off, segs, fua).await,
        }
    }

    /// Makes every write completed before this call durable, whichever channel or
    /// reactor completed it.
    pub async fn flush(&self) -> Result<(), IoError> {
        match &self.kind {
            ChannelKind::Raw(a) => a.flush().await,
            ChannelKind::Qcow2(q) => q.flush().await,
        }
    }

    pub async fn write_zeroes(&self, off: u64, len: u64, flags: ZeroFlags) -> Result<(), IoError> {
        if !self.enter(ReqKind::WriteZeroes, off, len).await? {
            return Ok(());
        }
        match &self.kind {
            ChannelKind::Raw(a) => match a.zero_range(off, len, flags.may_unmap).await {
                Ok(()) => {
                    if flags.fua {
                        a.flush().await?;
                    }
                    Ok(())
                }
                Err(IoError::NotSupported) if !flags.fast_only => {
                    a.write_zero_bytes(off, len, flags.fua).await
                }
                Err(e) => Err(e),
            },
            ChannelKind::Qcow2(q) => {
                q.write_zeroes(off, len, flags.may_unmap, flags.fast_only).await?;
                if flags.fua {
                    q.flush().await?;
                }
                Ok(())
            }
        }
    }

    /// Releases the range if the device can; contents become unspecified.
    pub async fn discard(&self, off: u64, len: u64) -> Result<(), IoError> {
        if !self.enter(ReqKind::Discard, off, len).await? {
            return Ok(());
        }
        match &self.kind {
            ChannelKind::Raw(a) => a.discard(off, len).await.map(|_| ()),
            ChannelKind::Qcow2(q) => q.discard(off, len).await,
        }
    }

    /// The status of the bytes from `off`, at most `len` (> 0) of them.
    pub async fn block_status(&self, off: u64, len: u64) -> Result<BlockStatus, IoError> {
        self.bdev.info.admit(ReqKind::BlockStatus, off, len)?;
        match &self.kind {
            ChannelKind::Raw(a) => {
                let e = a.block_status(off, len).await?;
                let hole = e.allocation == Allocation::Hole;
                Ok(BlockStatus { len: e.len.max(1).min(len), hole, zero: hole })
            }
            ChannelKind::Qcow2(q) => {
                let (l, data, zero) = q.block_status(off, len).await?;
                Ok(BlockStatus { len: l.max(1).min(len), hole: !data, zero })
            }
        }
    }

    /// A hint that the range will be read soon.
    pub async fn cache(&self, off: u64, len: u64) -> Result<(), IoError> {
        self.bdev.info.admit(ReqKind::Cache, off, len).map(|_| ())
    }
}
