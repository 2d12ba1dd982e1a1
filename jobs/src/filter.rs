//! The mirror's write filter. In the background mode every change to the source marks
//! its chunks dirty, for the copy loop. In write-blocking mode (QEMU's active mirror)
//! every change is also written to the target by the guest's own request before it
//! completes; the chunks it covers whole are then clean, the ones it covers in part
//! keep their state (clean stays clean: the target got the same bytes; dirty stays
//! dirty: the rest of the chunk is still to copy). So the dirty set only shrinks.
//!
//! Correctness rests on two bitmaps and their order of operations:
//! - the copy loop takes a chunk as busy, *then* clears its dirty bit, then reads the
//!   source and writes the target, then releases it; a tracked change that lands on
//!   the source meanwhile sets the bit again (after it completed), so the chunk is
//!   copied again;
//! - a write-blocking change waits until none of its chunks is busy, takes them all,
//!   writes the source and then the target, clears the bits of the chunks it covered
//!   whole, and releases them; a failed target write marks them dirty instead. Two
//!   changes to one chunk, or a change and a copy, never write the target at once.
//!
//! So a chunk that is clean and not busy holds the same bytes on both sides.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use drivers::{Bdev, Decision, WriteFilter};

use crate::bitmap::{Busy, DirtyBitmap};

/// Tracks changes for a mirror, mirroring some synchronously when active.
pub struct MirrorFilter {
    pub dirty: Arc<DirtyBitmap>,
    pub busy: Arc<Busy>,
    /// Write-blocking: mirror changes to clean chunks.
    active: AtomicBool,
    target: Arc<Bdev>,
    /// Changes the target refused (each left its chunks dirty).
    target_errors: AtomicU64,
}

impl MirrorFilter {
    pub fn new(dirty: Arc<DirtyBitmap>, busy: Arc<Busy>, target: Arc<Bdev>, active: bool) -> Self {
        MirrorFilter {
            dirty,
            busy,
            active: AtomicBool::new(active),
            target,
            target_errors: AtomicU64::new(0),
        }
    }

    /// Turns write-blocking mirroring on or off (takes effect at the next change).
    pub fn set_active(&self, on: bool) {
        self.active.store(on, Ordering::SeqCst);
    }

    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::SeqCst)
    }

    /// Target write failures of mirrored changes so far.
    pub fn target_errors(&self) -> u64 {
        self.target_errors.load(Ordering::Relaxed)
    }
}

impl WriteFilter for MirrorFilter {
    fn begin(&self, off: u64, len: u64) -> Decision {
        if !self.active.load(Ordering::Relaxed) {
            return Decision::Track;
        }
        let (first, end) = self.dirty.chunks_of(off, len);
        if self.busy.try_take(first, end) { Decision::Mirror } else { Decision::Wait }
    }

    fn changed(&self, off: u64, len: u64) {
        self.dirty.set_range(off, len);
    }

    fn mirrored(&self, off: u64, len: u64, source_ok: bool, target_ok: bool) {
        if source_ok && target_ok {
            // Chunks covered whole hold the same new bytes on both sides.
            let g = self.dirty.granularity();
            let (first, end) = (off.div_ceil(g), (off + len) / g);
            let end =
                if off + len >= self.dirty.len() { end.max(self.dirty.chunks()) } else { end };
            for c in first..end.min(self.dirty.chunks()) {
                self.dirty.clear(c);
            }
        } else {
            // Dirty before released: the copy loop never sees it clean and idle.
            self.dirty.set_range(off, len);
            if source_ok {
                self.target_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        let (first, end) = self.dirty.chunks_of(off, len);
        self.busy.release(first, end);
    }

    fn target(&self) -> Option<Arc<Bdev>> {
        Some(self.target.clone())
    }
}
