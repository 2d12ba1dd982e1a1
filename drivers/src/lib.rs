//! Block devices for the appliance, in the layers a request travels through:
//! - [`api`]: the consumer API exports and jobs use — a [`Bdev`] per disk and a
//!   per-reactor [`BdevChannel`] (SPDK's io_channel); the one validation step every
//!   request passes; QoS; opening a disk from its config entry;
//! - [`driver`]: the implementor API — the [`driver::BlockDriver`] and
//!   [`driver::DriverChannel`] traits every format driver implements, with request
//!   futures stored inline (no allocation per I/O);
//! - [`format`]: format drivers — `raw` and the `qcow2` engine with its image tools;
//! - [`io`]: I/O drivers — files through the per-reactor io_uring and Linux AIO
//!   engines, RAM, null and the fault-injecting simulated disk, behind one backend
//!   trait; the shared alignment (read-modify-write) layer, O_DIRECT probing, image
//!   locks.

pub mod api;
pub mod driver;
pub mod error;
pub mod format;
pub mod io;
mod route;
pub mod seg;

pub use api::{
    Admit, Bdev, BdevChannel, BlockStatus, Decision, DeviceInfo, Quiesced, ReqKind, WriteFilter,
    ZeroFlags,
};
pub use error::{IoError, OpenError};
pub use format::qcow2;
pub use io::engine::ENGINE_DEPTH;
pub use io::{EngineKind, Storage, StorageChannel};
pub use seg::IoSeg;
