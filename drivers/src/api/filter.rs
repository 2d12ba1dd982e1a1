//! Write filters: what a block job puts between a disk's consumers and its driver.
//!
//! A mirror (or backup, or commit) must see every change to the disk — writes,
//! zero writes, discards — on every reactor and export, and a write-blocking mirror
//! must also make them reach its target before the guest is told they are done. The
//! consumer API calls the disk's filter around each change: [`WriteFilter::begin`]
//! before it goes to the driver decides whether the change is only *tracked* (marked
//! dirty once it has reached the disk, for the job to copy later), *mirrored* (also
//! written to [`WriteFilter::target`] by the request itself, then reported with
//! [`WriteFilter::mirrored`]), *copied before* (a backup's copy-before-write: the old
//! contents of the ranges [`WriteFilter::copy_before`] names are read from the disk and
//! written to the target first, reported with [`WriteFilter::copied`], then the change
//! is applied and the filter's reservation released with [`WriteFilter::release`]), or
//! must wait for a copy of its range to finish first. A filter is put in or taken out only while the disk is
//! quiesced (see `gate`), so no change is ever half-seen, and it costs a disk without a
//! job nothing but a branch. Filters set bits in shared bitmaps with atomic operations;
//! they never lock or allocate.

use std::sync::Arc;

use super::Bdev;

/// What [`WriteFilter::begin`] decides for one change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Report the change with [`WriteFilter::changed`] once it reached the disk.
    Track,
    /// Write the change to the target as well, then report it with
    /// [`WriteFilter::mirrored`]; the filter has reserved the range meanwhile.
    Mirror,
    /// Copy the old contents of what [`WriteFilter::copy_before`] names to the target
    /// first, then apply the change, then [`WriteFilter::release`] the range; the
    /// filter has reserved it meanwhile.
    CopyBefore,
    /// The range is busy (being copied): ask again shortly.
    Wait,
}

/// Sees every change to a disk. Shared by every reactor.
pub trait WriteFilter: Send + Sync + 'static {
    /// Before a change of `off..off+len` goes to the disk.
    fn begin(&self, off: u64, len: u64) -> Decision;

    /// After a tracked change went to the disk (whether or not it succeeded: a failed
    /// write may have changed part of the range).
    fn changed(&self, off: u64, len: u64);

    /// After a mirrored change: `source_ok` if the disk took it, `target_ok` if the
    /// target did too (it is not tried when the disk failed). Releases the range.
    fn mirrored(&self, off: u64, len: u64, source_ok: bool, target_ok: bool);

    /// Where mirrored changes and copied-before contents go.
    fn target(&self) -> Option<Arc<Bdev>>;

    /// Copied-before contents reach the target compressed (a backup with `compress`).
    fn compress(&self) -> bool {
        false
    }

    /// After [`Decision::CopyBefore`]: the first range at or after `off`, inside
    /// `off..end`, whose old contents must reach the target before the change does.
    fn copy_before(&self, _off: u64, _end: u64) -> Option<(u64, u64)> {
        None
    }

    /// A range [`WriteFilter::copy_before`] named was copied (`ok`) or not.
    fn copied(&self, _off: u64, _len: u64, _ok: bool) {}

    /// After a [`Decision::CopyBefore`] change was applied (whether it succeeded or
    /// not): the reservation ends.
    fn release(&self, _off: u64, _len: u64) {}
}
