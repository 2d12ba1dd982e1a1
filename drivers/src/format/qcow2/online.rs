//! Changes to a served image that the offline tools make: internal snapshots
//! (`snapshot_create` and `snapshot_delete` on the control socket, as QEMU's
//! `blockdev-snapshot-internal-sync` and `blockdev-snapshot-delete-internal-sync`) and
//! resizing it (`disk_resize`, as QEMU's `block_resize`).
//!
//! The change is the offline tool's transaction (`tools::snapshots`, `tools::resize`), which is
//! crash-safe on its own, run on the image taken briefly out of service: with the
//! disk quiesced (no request in flight, new ones held), the device closes — every
//! shard writes its metadata back, the dirty bit is cleared, the persistent bitmaps
//! are stored — the transaction runs on the file, and the image is opened again, with
//! the same options, on the same reactors. The guest sees a pause, as under QEMU,
//! whose snapshot also runs with the disk drained; its length is the transaction's
//! (a walk of the image's metadata), not the data's size.
//!
//! The reopened handle takes the image locks before the old handle goes, so the file
//! is never unlocked for another process to grab. The cheap refusals (a name in use, a
//! missing snapshot, 1-bit refcounts, a read-only disk) come before the close, so a
//! refused call leaves the disk as it was; a failure after it (an I/O error, an image
//! that does not check clean) still reopens the image, as it was.

use std::path::Path;
use std::sync::Arc;

use crate::driver::{
    BlockDriver, InternalSnapshots, Reopened, Resizable, SnapshotInfo, SnapshotOp, StoredBitmap,
};
use crate::error::OpenError;
use crate::io::Storage;

use super::open::MetaIo;
use super::snapshots::{change_io, precheck_io};
use super::tools::resize::resize_io;
use super::{OpenOptions, Qcow2Driver, meta_file};

impl InternalSnapshots for Qcow2Driver {
    fn list(&self) -> Result<Vec<SnapshotInfo>, OpenError> {
        let dev = &self.dev;
        with_meta(&dev.path, dev.meta.as_ref(), true, |f| {
            let (h, size) = super::open::read_header_any_crypt(&dev.path, f)?;
            Ok(super::snapshot::read_snapshots(&dev.path, f, &h, size)?.1)
        })
    }

    fn change(&self, op: &SnapshotOp<'_>, bitmaps: &[StoredBitmap]) -> Result<Reopened, OpenError> {
        let dev = &self.dev;
        let path = dev.path.as_path();
        if dev.read_only {
            return Err(OpenError::invalid(path, "the disk is read-only"));
        }
        if let SnapshotOp::Apply(_) = op {
            return Err(OpenError::invalid(
                path,
                "a snapshot is applied offline only (`appliance snapshot -a`), as in QEMU",
            ));
        }
        with_meta(path, dev.meta.as_ref(), false, |f| precheck_io(path, f, op))?;
        Ok(self.closed_changed_reopened(bitmaps, |f| change_io(path, f, *op)))
    }
}

impl Resizable for Qcow2Driver {
    /// The offline resize (`tools::resize`: grow, or shrink over an unallocated tail; no
    /// backing file), on the image
    /// taken briefly out of service as for a snapshot. Persistent bitmaps would be
    /// invalidated by it: the caller refuses disks that have any.
    fn resize(&self, new_size: u64, bitmaps: &[StoredBitmap]) -> Result<Reopened, OpenError> {
        let dev = &self.dev;
        let path = dev.path.as_path();
        if dev.read_only {
            return Err(OpenError::invalid(path, "the disk is read-only"));
        }
        if !new_size.is_multiple_of(512) {
            return Err(OpenError::invalid(
                path,
                format!("the new size {new_size} is not a multiple of 512 bytes"),
            ));
        }
        if dev.chain.lock().unwrap_or_else(|p| p.into_inner()).len() > 1 {
            return Err(OpenError::invalid(
                path,
                "images with a backing file are not resized: the new area would show the \
                 backing file's data instead of zeros",
            ));
        }
        Ok(self.closed_changed_reopened(bitmaps, |f| resize_io(path, f, new_size).map(|_| ())))
    }
}

impl Qcow2Driver {
    /// Closes the device (every shard writes its metadata back, `bitmaps` are stored),
    /// runs `change` on the image file and opens it again with the same options on the
    /// same reactors, taking over the image locks. The image is reopened whatever the
    /// change's outcome.
    fn closed_changed_reopened(
        &self,
        bitmaps: &[StoredBitmap],
        change: impl FnOnce(&dyn MetaIo) -> Result<(), OpenError>,
    ) -> Reopened {
        let dev = &self.dev;
        let path = dev.path.as_path();
        let closed = dev.close_storing(bitmaps).map_err(|e| {
            OpenError::invalid(path, format!("writing the image's metadata back failed: {e}"))
        });
        let outcome = closed.and_then(|()| with_meta(path, dev.meta.as_ref(), false, change));
        let reactors: Vec<_> = dev.shards.iter().map(|s| s.reactor.clone()).collect();
        let opts = OpenOptions { locking: false, ..dev.opts.clone() };
        let driver = Qcow2Driver::open(path, opts, &reactors).map(|d| {
            if dev.top.holds_image_locks()
                && let Err(e) = d.dev.top.adopt_image_locks()
            {
                tracing::warn!(image = %path.display(), "taking the image locks over: {e}");
            }
            Arc::new(d) as Arc<dyn BlockDriver>
        });
        Reopened { outcome, driver }
    }
}

/// Runs `f` on the image's metadata: through `storage` when it is not the file (the
/// simulated disks of tests), else a buffered handle (the image's own is O_DIRECT).
fn with_meta<R>(
    path: &Path,
    storage: Option<&Arc<Storage>>,
    read_only: bool,
    f: impl FnOnce(&dyn MetaIo) -> Result<R, OpenError>,
) -> Result<R, OpenError> {
    match storage {
        Some(s) => f(&**s),
        None => f(&meta_file(path, read_only).map_err(|e| OpenError::io(path, e))?),
    }
}
