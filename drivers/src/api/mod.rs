//! The consumer API: what exports (NBD, vhost-user-blk), jobs and benchmarks see.
//!
//! A [`Bdev`] is one configured, opened disk: its name, what the device is
//! ([`DeviceInfo`]), its QoS limits, and the driver behind it as a `dyn BlockDriver`
//! (the implementor API in `driver`). [`Bdev::channel`] opens its per-reactor handle, a
//! [`BdevChannel`] (SPDK's io_channel), through which that reactor's tasks submit
//! requests. Every request passes one validation step here ([`DeviceInfo::admit`]:
//! range, read-only, transfer size, zero length) and QoS admission before it reaches a
//! driver, so drivers only ever see valid, non-empty requests; exports call the same
//! function when they must decide before touching the device (to size a buffer, say).
//! Exports never see a driver, and nothing here names one: [`open`] maps a config
//! entry to its driver once, at open.

pub mod open;
pub mod qos;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

pub use crate::driver::{BlockStatus, DeviceInfo, ZeroFlags};

use crate::driver::{BlockDriver, DriverChannel};
use crate::error::IoError;
use crate::seg::{self, IoSeg};

use self::qos::{Qos, QosLimits};

/// The largest request the device accepts in one piece.
pub const MAX_TRANSFER_BYTES: u32 = 32 << 20;

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

impl DeviceInfo {
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

/// A configured, opened disk.
pub struct Bdev {
    name: String,
    info: DeviceInfo,
    driver: Arc<dyn BlockDriver>,
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
    /// A disk served by `driver`.
    pub fn new(name: &str, driver: Arc<dyn BlockDriver>, qos: QosLimits) -> Arc<Bdev> {
        let b = Arc::new(Bdev {
            name: name.to_string(),
            info: driver.info().clone(),
            driver,
            qos: Qos::default(),
            retired: AtomicBool::new(false),
        });
        b.set_qos(qos);
        b
    }

    /// A raw-format disk over `storage` (tests and benchmarks).
    pub fn raw(name: &str, storage: Arc<crate::io::Storage>, read_only: bool) -> Arc<Bdev> {
        let driver = crate::format::raw::RawDriver::new(storage, read_only);
        Self::new(name, Arc::new(driver), QosLimits::default())
    }

    /// Opens the disk a config entry describes (see [`open`]).
    pub fn open(
        disk: &config::Disk,
        reactors: &[poller::ReactorHandle],
    ) -> Result<Arc<Bdev>, crate::error::OpenError> {
        open::open(disk, reactors)
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

    /// Makes every completed write durable and releases the driver's per-reactor state
    /// (writing qcow2 metadata back and clearing its dirty bit). Control plane, after
    /// the last request.
    pub fn close(&self) -> Result<(), IoError> {
        self.driver.close()
    }

    /// The driver's counters (cache hits, allocations...), for the metrics endpoint.
    pub fn driver_stats(&self) -> Vec<(&'static str, u64)> {
        self.driver.stats()
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

    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// Opens the device's handle on the current reactor.
    pub fn channel(self: &Arc<Self>) -> Result<BdevChannel, IoError> {
        if self.is_retired() {
            return Err(IoError::Shutdown);
        }
        Ok(BdevChannel { bdev: self.clone(), ch: self.driver.open_channel()? })
    }
}

/// A device's handle on one reactor.
pub struct BdevChannel {
    bdev: Arc<Bdev>,
    ch: Box<dyn DriverChannel>,
}

impl BdevChannel {
    pub fn bdev(&self) -> &Arc<Bdev> {
        &self.bdev
    }

    pub fn info(&self) -> &DeviceInfo {
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
        self.ch.read(off, segs).await
    }

    /// Writes `segs` at `off`; with `fua` the data is durable on completion.
    pub async fn write(&self, off: u64, segs: &[IoSeg<'_>], fua: bool) -> Result<(), IoError> {
        if !self.enter(ReqKind::Write, off, seg::total_len(segs) as u64).await? {
            return Ok(());
        }
        self.ch.write(off, segs, fua).await
    }

    /// Makes every write completed before this call durable, whichever channel or
    /// reactor completed it.
    pub async fn flush(&self) -> Result<(), IoError> {
        self.ch.flush().await
    }

    pub async fn write_zeroes(&self, off: u64, len: u64, flags: ZeroFlags) -> Result<(), IoError> {
        if !self.enter(ReqKind::WriteZeroes, off, len).await? {
            return Ok(());
        }
        self.ch.write_zeroes(off, len, flags).await
    }

    /// Releases the range if the device can; contents become unspecified.
    pub async fn discard(&self, off: u64, len: u64) -> Result<(), IoError> {
        if !self.enter(ReqKind::Discard, off, len).await? {
            return Ok(());
        }
        self.ch.discard(off, len).await
    }

    /// The status of the bytes from `off`, at most `len` (> 0) of them.
    pub async fn block_status(&self, off: u64, len: u64) -> Result<BlockStatus, IoError> {
        self.bdev.info.admit(ReqKind::BlockStatus, off, len)?;
        let st = self.ch.block_status(off, len).await?;
        debug_assert!(st.len > 0 && st.len <= len, "block status of {} bytes for {len}", st.len);
        Ok(BlockStatus { len: st.len.clamp(1, len), ..st })
    }

    /// A hint that the range will be read soon.
    pub async fn cache(&self, off: u64, len: u64) -> Result<(), IoError> {
        self.bdev.info.admit(ReqKind::Cache, off, len).map(|_| ())
    }
}
