//! Block devices for the appliance.
//!
//! Layers, top to bottom (SPDK's split of consumer and implementor APIs):
//! - [`bdev`]: the consumer API exports use: a shared [`Bdev`] describing a device and a
//!   per-reactor [`BdevChannel`] with async read, write, flush, write-zeroes, discard
//!   and block status; bounds and read-only checks happen here;
//! - format drivers: `raw` (inside `bdev`) and [`qcow2`];
//! - [`align`]: byte-granular I/O over storage that needs aligned I/O
//!   (bounce buffers, serialised read-modify-write);
//! - [`storage`]: pure, pre-aligned I/O to a file through an engine, a RAM disk or a
//!   null device, with [`probe`] finding a file's O_DIRECT alignment;
//! - `engine`: the per-reactor io_uring and Linux AIO engines and the offload workers;
//! - [`lock`]: image file locks that QEMU honours (and that honour QEMU's).

pub mod align;
pub mod bdev;
mod engine;
pub mod error;
pub mod lock;
pub mod probe;
pub mod qcow2;
pub mod qos;
pub mod seg;
pub mod sim;
pub mod storage;

pub use bdev::{Admit, Bdev, BdevChannel, BdevInfo, BlockStatus, ReqKind, ZeroFlags};
pub use engine::ENGINE_DEPTH;
pub use error::{IoError, OpenError};
pub use seg::IoSeg;
pub use storage::{EngineKind, Storage, StorageChannel};
