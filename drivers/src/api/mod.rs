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
//!
//! What sits under a disk can change while it is served — a block job's write filter
//! ([`filter`]) put in or taken out, the driver swapped for a mirror's target — but only
//! while the disk is quiesced ([`gate`]): the change bumps the disk's generation, and
//! each channel, at its next request, reopens itself on the new driver and filter.
//! Checking costs each request one atomic load of a value that changes a few times in
//! a disk's life.

pub mod bitmap;
pub mod bitmaps;
mod channel;
pub mod filter;
mod gate;
pub mod open;
pub mod qos;
pub mod snapshots;
pub mod view;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

pub use crate::driver::{BlockStatus, DeviceInfo, ZeroFlags};

use crate::driver::BlockDriver;
use crate::error::IoError;

pub use self::channel::BdevChannel;
pub use self::filter::{Decision, WriteFilter};
pub use self::gate::Quiesced;
use self::qos::{Qos, QosLimits};
pub use self::snapshots::ChangeError;

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

/// The driver under a disk and the filter in front of it (if a job put one there).
#[derive(Clone)]
struct Stack {
    driver: Arc<dyn BlockDriver>,
    filter: Option<Arc<dyn WriteFilter>>,
    /// The enabled named bitmaps, which every change marks.
    tracking: Arc<[Arc<bitmap::DirtyBitmap>]>,
    /// A point-in-time view: what of the origin reads from the driver.
    view: Option<Arc<dyn view::PointInTime>>,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A configured, opened disk.
pub struct Bdev {
    id: u64,
    name: String,
    /// What the disk is, but for its size, which `size` holds.
    info: DeviceInfo,
    /// Changed only while quiesced ([`Bdev::resize`]).
    size: AtomicU64,
    /// Changed only while quiesced, with `generation` bumped after.
    stack: Mutex<Stack>,
    generation: AtomicU64,
    qos: Qos,
    /// Set when the disk is being removed: no new channel opens.
    retired: AtomicBool,
    bitmaps: bitmaps::Bitmaps,
}

impl std::fmt::Debug for Bdev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bdev").field("name", &self.name).field("info", &self.info()).finish()
    }
}

impl Bdev {
    /// A disk served by `driver`.
    pub fn new(name: &str, driver: Arc<dyn BlockDriver>, qos: QosLimits) -> Arc<Bdev> {
        let b = Arc::new(Bdev {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            name: name.to_string(),
            info: *driver.info(),
            size: AtomicU64::new(driver.info().size),
            stack: Mutex::new(Stack { driver, filter: None, tracking: Arc::new([]), view: None }),
            generation: AtomicU64::new(0),
            qos: Qos::default(),
            retired: AtomicBool::new(false),
            bitmaps: bitmaps::Bitmaps::default(),
        });
        b.set_qos(qos);
        let stored = b.driver().stored_bitmaps();
        b.bitmaps.restore(stored, b.info.read_only);
        // No channel exists yet: the tracking set needs no quiesce.
        let tracking = b.bitmaps.tracking();
        b.stack.lock().unwrap_or_else(|p| p.into_inner()).tracking = tracking;
        b
    }

    /// A read-only point-in-time view of `view.origin()` whose saved chunks `driver`
    /// (the temporary image) holds (see `view`).
    pub fn point_in_time(
        name: &str,
        driver: Arc<dyn BlockDriver>,
        view: Arc<dyn view::PointInTime>,
    ) -> Arc<Bdev> {
        assert!(driver.info().read_only, "a point-in-time view is read-only");
        assert_eq!(driver.info().size, view.origin().info().size, "a view has its origin's size");
        let b = Self::new(name, driver, QosLimits::default());
        b.stack.lock().unwrap_or_else(|p| p.into_inner()).view = Some(view);
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

    fn stack(&self) -> Stack {
        self.stack.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The driver serving the disk now.
    pub fn driver(&self) -> Arc<dyn BlockDriver> {
        self.stack().driver
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
        self.driver().close_storing(&self.bitmaps.persistent())
    }

    /// The driver's counters (cache hits, allocations...), for the metrics endpoint.
    pub fn driver_stats(&self) -> Vec<(&'static str, u64)> {
        self.driver().stats()
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

    /// What the disk is now (its size changes with [`Bdev::resize`]).
    pub fn info(&self) -> DeviceInfo {
        DeviceInfo { size: self.size.load(Ordering::Acquire), ..self.info }
    }

    /// Puts `filter` in front of the disk (or takes the current one out), while every
    /// reactor is quiesced.
    pub fn set_filter(&self, q: &Quiesced, filter: Option<Arc<dyn WriteFilter>>) {
        assert_eq!(q.id(), self.id, "a filter changes while its own disk is quiesced");
        self.stack.lock().unwrap_or_else(|p| p.into_inner()).filter = filter;
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Serves the disk from `driver` from now on (a mirror's pivot), while quiesced;
    /// returns the driver it replaces, for the caller to close. The new driver must
    /// describe a device of the same size.
    pub fn replace_driver(
        &self,
        q: &Quiesced,
        driver: Arc<dyn BlockDriver>,
    ) -> Result<Arc<dyn BlockDriver>, IoError> {
        assert_eq!(q.id(), self.id, "a driver changes while its own disk is quiesced");
        if driver.info().size != self.info().size {
            return Err(IoError::Invalid);
        }
        let old = {
            let mut s = self.stack.lock().unwrap_or_else(|p| p.into_inner());
            std::mem::replace(&mut s.driver, driver)
        };
        self.generation.fetch_add(1, Ordering::AcqRel);
        Ok(old)
    }

    /// Opens the device's handle on the current reactor.
    pub fn channel(self: &Arc<Self>) -> Result<BdevChannel, IoError> {
        if self.is_retired() {
            return Err(IoError::Shutdown);
        }
        BdevChannel::open(self, false)
    }

    /// A handle for a block job on this disk: it is not held back while the disk is
    /// quiesced, and its requests are not waited for.
    pub fn internal_channel(self: &Arc<Self>) -> Result<BdevChannel, IoError> {
        BdevChannel::open(self, true)
    }
}
