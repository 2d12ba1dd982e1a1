//! Changes a served disk's driver makes to its image, internal snapshots and growth:
//! the driver does the work ([`crate::driver::InternalSnapshots`],
//! [`crate::driver::Resizable`]); the disk swaps in the reopened image while quiesced,
//! as a mirror's pivot swaps in its target.

use std::sync::atomic::Ordering;

use crate::driver::{Reopened, SnapshotInfo, SnapshotOp};
use crate::error::OpenError;

use super::{Bdev, Quiesced};

/// Why a snapshot or resize call on a served disk did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error("{0}")]
    NotSupported(&'static str),
    /// Refused before anything changed.
    #[error("{0}")]
    Refused(OpenError),
    /// The change failed; the disk is served from the image as it was.
    #[error("{0}")]
    Failed(OpenError),
    /// The image could not be opened again: the disk fails every request.
    #[error("{0}: the disk fails every request until it is removed and added again")]
    Lost(String),
}

impl Bdev {
    /// The snapshots of the disk's image.
    pub fn snapshots(&self) -> Result<Vec<SnapshotInfo>, ChangeError> {
        let driver = self.driver();
        let s = driver.internal_snapshots().ok_or(ChangeError::NotSupported(SNAPSHOTS_NEED))?;
        s.list().map_err(ChangeError::Refused)
    }

    /// Creates or deletes an internal snapshot of the disk's image, with the disk
    /// quiesced (see [`crate::driver::InternalSnapshots::change`]); the disk is served
    /// by the reopened image from then on. The old driver goes when the last channel
    /// lets go of it (channels reopen at the new generation).
    pub fn change_snapshot(&self, q: &Quiesced, op: &SnapshotOp<'_>) -> Result<(), ChangeError> {
        let driver = self.driver();
        let s = driver.internal_snapshots().ok_or(ChangeError::NotSupported(SNAPSHOTS_NEED))?;
        let r = s.change(op, &self.bitmaps.persistent()).map_err(ChangeError::Refused)?;
        // Create and delete keep the size, which replace_driver insists on.
        self.swap_reopened(q, r, "the snapshot change", false)
    }

    /// Grows the disk to `new_size` bytes, with the disk quiesced (see
    /// [`crate::driver::Resizable`]). Refused while the disk has named bitmaps (sized to
    /// the disk; qcow2's resize would invalidate the persistent ones), a job's filter or
    /// a point-in-time view. Returns the old size.
    pub fn resize(&self, q: &Quiesced, new_size: u64) -> Result<u64, ChangeError> {
        let old = self.info().size;
        let driver = self.driver();
        let r = driver.resizable().ok_or(ChangeError::NotSupported(RESIZE_NEEDS))?;
        let refuse = |m: String| ChangeError::Refused(OpenError::invalid(self.name(), m));
        let names: Vec<String> = self.bitmaps.all().into_iter().map(|b| b.name).collect();
        if !names.is_empty() {
            return Err(refuse(format!(
                "the disk has bitmaps ({}); remove them first",
                names.join(", ")
            )));
        }
        let stack = self.stack();
        if stack.filter.is_some() || stack.view.is_some() {
            return Err(refuse("a job holds the disk".into()));
        }
        if new_size == old {
            return Ok(old);
        }
        let r = r.resize(new_size, &[]).map_err(ChangeError::Refused)?;
        self.swap_reopened(q, r, "the resize", true)?;
        Ok(old)
    }

    /// Serves the disk from a reopened driver (its size too when `resized`); a driver
    /// that could not be reopened loses the disk.
    fn swap_reopened(
        &self,
        q: &Quiesced,
        r: Reopened,
        what: &str,
        resized: bool,
    ) -> Result<(), ChangeError> {
        let new = match r.driver {
            Ok(d) => d,
            Err(e) => {
                let done = match &r.outcome {
                    Ok(()) => format!("{what} was made"),
                    Err(o) => format!("{what} failed ({o})"),
                };
                let m = format!("{done}; opening the image again failed: {e}");
                tracing::error!(disk = self.name(), "{m}");
                return Err(ChangeError::Lost(m));
            }
        };
        let swapped = if resized {
            assert_eq!(q.id(), self.id, "a driver changes while its own disk is quiesced");
            let size = new.info().size;
            self.stack.lock().unwrap_or_else(|p| p.into_inner()).driver = new;
            self.size.store(size, Ordering::Release);
            self.generation.fetch_add(1, Ordering::AcqRel);
            Ok(())
        } else {
            self.replace_driver(q, new).map(|_| ())
        };
        if let Err(e) = swapped {
            let m = format!("the reopened image does not match the disk ({e})");
            tracing::error!(disk = self.name(), "{m}");
            return Err(ChangeError::Lost(m));
        }
        r.outcome.map_err(ChangeError::Failed)
    }
}

const SNAPSHOTS_NEED: &str = "internal snapshots need a qcow2 image";
const RESIZE_NEEDS: &str = "this disk cannot change its size (a raw file or a qcow2 image can)";
