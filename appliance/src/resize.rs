//! Growing (or shrinking) a served disk over the control socket (QEMU's `block_resize`):
//! `disk_resize {disk, size}`, `size` in bytes or with a unit ("20GiB").
//!
//! The disk is quiesced (its requests wait), its driver grows the image (a raw file
//! sparsely; a qcow2 image by the offline resize's crash-safe steps, with the image
//! briefly closed and reopened on the same reactors) and the disk is served at the new
//! size from then on. NBD clients see it on their next connection (NBD has no way to
//! tell a connected client); vhost-user-blk front-ends get a configuration-change
//! message and re-read the capacity, so a running guest sees the new size at once.
//!
//! Shrinking is done only when nothing past the new end holds data (a qcow2 tail with no
//! allocated cluster, a raw file's hole); else it is refused naming the first offset
//! that does. Refused too: read-only disks, images with a backing file, storage that is not
//! a regular file, and disks with a job running or with named bitmaps.

use std::sync::Arc;

use serde_json::{Value, json};

use crate::bitmaps::{disk, quiesced};
use crate::control::{Args, FAILED, Fail, Params, only};
use crate::serve::Appliance;

/// The methods this module answers.
pub const METHODS: &[&str] = &["disk_resize"];

/// Answers `disk_resize`.
pub(crate) fn call(app: &Arc<Appliance>, method: &str, params: &Params) -> Result<Value, Fail> {
    let a = Args { method, params };
    only(params, method, &["disk", "size"])?;
    let bdev = disk(app, &a)?;
    let size = match params.get("size") {
        Some(Value::Number(n)) => n.as_u64(),
        Some(Value::String(s)) => config::parse_byte_size(s).ok(),
        _ => None,
    };
    let Some(size) = size.filter(|s| *s > 0 && s.is_multiple_of(512)) else {
        return Err(a.bad("size", "must be bytes (a multiple of 512) or a size such as \"20GiB\""));
    };
    if let Some(job) = app.jobs().live_on(bdev.name()) {
        let m =
            format!("disk {} has a job running ({}); resizing waits for it", bdev.name(), job.id);
        return Err(Fail(FAILED, m, Some(json!({"disk": bdev.name(), "job": job.id}))));
    }
    let started = std::time::Instant::now();
    let old = quiesced(app, &bdev, |q| {
        bdev.resize(q, size).map_err(|e| {
            let d = bdev.name();
            Fail(FAILED, format!("disk {d}: {e}"), Some(json!({"disk": d})))
        })
    })?;
    crate::vhost::capacity_changed(&bdev);
    tracing::info!(
        disk = bdev.name(),
        old_size = old,
        new_size = size,
        paused_ms = started.elapsed().as_millis() as u64,
        "disk_resize"
    );
    Ok(json!({"disk": bdev.name(), "old_size": old, "size": bdev.info().size}))
}
