//! Point-in-time views (image fleecing): a read-only disk showing another disk, its
//! *origin*, as it was at an instant, while the origin keeps changing.
//!
//! A backup's copy-before-write filter on the origin saves the old contents of each
//! chunk to a temporary image before the first change to it lands (see
//! `jobs::backup`). The view's own driver is that temporary image; the view answers,
//! for each byte, whether it still reads from the origin (not saved yet) or from the
//! temporary image (saved). A read of a run still on the origin is checked again once
//! it completed: if the chunk was saved meanwhile, a change may have landed during the
//! read, and the run is read again from the temporary image. That is enough because a
//! change clears the chunk's "still on the origin" state *after* its old contents are
//! saved and *before* it reaches the origin.

use std::sync::Arc;

use super::Bdev;

/// What a view is a view of.
pub trait PointInTime: Send + Sync + 'static {
    /// The disk the view shows at an instant.
    fn origin(&self) -> &Arc<Bdev>;

    /// Whether `off` still reads from the origin, and how many bytes from it (at most
    /// `max`) share that.
    fn extent(&self, off: u64, max: u64) -> (bool, u64);
}
