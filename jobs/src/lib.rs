//! Block jobs: work that runs on a served disk alongside its consumers.
//!
//! - [`bitmap`]: dirty bitmaps set by every reactor without locks, and the busy map
//!   that keeps a copy and a mirrored write off one chunk at once;
//! - [`filter`]: the mirror's write filter, which the consumer API calls around every
//!   change to the disk (see `drivers::api::filter`);
//! - [`job`]: jobs as the control plane sees them (states, progress, speed, error
//!   policies) and their registry;
//! - [`mirror`]: the mirror job (QEMU's block/mirror.c is the model), with
//!   background, write-blocking and adaptive copy modes and the pivot;
//! - [`stream`]: the stream job (pull a backing chain up, drop the link);
//! - [`backup`]: the backup job (a point-in-time copy through copy-before-write, full
//!   or of what a dirty bitmap marks);
//! - [`speed`]: the speed limit.
//!
//! A job runs as a task on one reactor and reaches its disk through the consumer API
//! like any export (internal channels, which a quiesce does not hold back); it takes
//! no lock the data path takes.

pub mod backup;
pub mod bitmap;
pub mod filter;
pub mod job;
pub mod mirror;
pub mod speed;
pub mod stream;

pub use job::{ErrorPolicy, Job, JobError, JobKind, JobState, Jobs};
pub use mirror::{CopyMode, Ending, Mirror, MirrorOptions, SyncMode};
