//! Internal snapshots of a served disk: the driver does the work
//! ([`crate::driver::InternalSnapshots`]); the disk swaps in the reopened image while
//! quiesced, as a mirror's pivot swaps in its target.

use crate::driver::{SnapshotInfo, SnapshotOp};
use crate::error::OpenError;

use super::{Bdev, Quiesced};

/// Why a snapshot call on a served disk did not happen.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("internal snapshots need a qcow2 image")]
    NotSupported,
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
    pub fn snapshots(&self) -> Result<Vec<SnapshotInfo>, SnapshotError> {
        let driver = self.driver();
        let s = driver.internal_snapshots().ok_or(SnapshotError::NotSupported)?;
        s.list().map_err(SnapshotError::Refused)
    }

    /// Creates or deletes an internal snapshot of the disk's image, with the disk
    /// quiesced (see [`crate::driver::InternalSnapshots::change`]); the disk is served
    /// by the reopened image from then on. The old driver goes when the last channel
    /// lets go of it (channels reopen at the new generation).
    pub fn change_snapshot(&self, q: &Quiesced, op: &SnapshotOp<'_>) -> Result<(), SnapshotError> {
        let driver = self.driver();
        let s = driver.internal_snapshots().ok_or(SnapshotError::NotSupported)?;
        let r = s.change(op, &self.bitmaps.persistent()).map_err(SnapshotError::Refused)?;
        let new = match r.driver {
            Ok(d) => d,
            Err(e) => {
                let done = match &r.outcome {
                    Ok(()) => "the snapshot change was made".to_string(),
                    Err(o) => format!("the snapshot change failed ({o})"),
                };
                let m = format!("{done}; opening the image again failed: {e}");
                tracing::error!(disk = self.name(), "{m}");
                return Err(SnapshotError::Lost(m));
            }
        };
        // Create and delete keep the size, which replace_driver insists on.
        if let Err(e) = self.replace_driver(q, new) {
            let m = format!("the reopened image does not match the disk ({e})");
            tracing::error!(disk = self.name(), "{m}");
            return Err(SnapshotError::Lost(m));
        }
        r.outcome.map_err(SnapshotError::Failed)
    }
}
