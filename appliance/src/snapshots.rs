//! Internal snapshots of served disks over the control socket (QEMU's
//! `blockdev-snapshot-internal-sync`, `blockdev-snapshot-delete-internal-sync` and
//! `query-snapshots`):
//! - `snapshot_create {disk, name}` — a snapshot of the disk as it is now, while the
//!   guest keeps running (its requests wait out the change);
//! - `snapshot_delete {disk, name}` — by name, else by id;
//! - `snapshot_list {disk}` — as `qemu-img info` lists them.
//!
//! Applying a snapshot is offline only (`appliance snapshot -a`), as in QEMU. A disk
//! with a block job or a point-in-time export is refused: the job holds the image.

use std::sync::Arc;

use drivers::Bdev;
use drivers::api::ChangeError;
use drivers::driver::SnapshotOp;
use serde_json::{Value, json};

use crate::bitmaps::{disk, quiesced};
use crate::control::{Args, FAILED, Fail, Params, only};
use crate::serve::Appliance;

/// The longest snapshot name (qcow2 stores its length in 16 bits).
const MAX_NAME: usize = 65535;

/// The methods this module answers.
pub const METHODS: &[&str] = &["snapshot_create", "snapshot_delete", "snapshot_list"];

/// A snapshot call's failure, naming the disk.
fn failed(bdev: &Bdev, e: ChangeError) -> Fail {
    let disk = bdev.name();
    Fail(FAILED, format!("disk {disk}: {e}"), Some(json!({"disk": disk})))
}

/// Answers a snapshot method.
pub(crate) fn call(app: &Arc<Appliance>, method: &str, params: &Params) -> Result<Value, Fail> {
    let a = Args { method, params };
    if method == "snapshot_list" {
        only(params, method, &["disk"])?;
        return list(&*disk(app, &a)?);
    }
    only(params, method, &["disk", "name"])?;
    let bdev = disk(app, &a)?;
    let name = a.str("name")?;
    if let Some(job) = app.jobs().live_on(bdev.name()) {
        let m =
            format!("disk {} has a job running ({}); snapshots wait for it", bdev.name(), job.id);
        return Err(Fail(FAILED, m, Some(json!({"disk": bdev.name(), "job": job.id}))));
    }
    let snaps = bdev.snapshots().map_err(|e| failed(&bdev, e))?;
    let op = match method {
        "snapshot_create" => {
            if name.is_empty() || name.len() > MAX_NAME {
                return Err(a.bad("name", &format!("must be 1 to {MAX_NAME} bytes")));
            }
            if snaps.iter().any(|s| s.name == name) {
                let m = format!("{name:?}: disk {} has a snapshot of that name", bdev.name());
                return Err(a.bad("name", &m));
            }
            SnapshotOp::Create { name, now: now() }
        }
        "snapshot_delete" => {
            if !snaps.iter().any(|s| s.name == name || s.id == name) {
                let m =
                    format!("{name:?}: disk {} has no snapshot of that name or id", bdev.name());
                return Err(a.bad("name", &m));
            }
            SnapshotOp::Delete(name)
        }
        _ => unreachable!("not a snapshot method: {method}"),
    };
    let started = std::time::Instant::now();
    quiesced(app, &bdev, |q| bdev.change_snapshot(q, &op).map_err(|e| failed(&bdev, e)))?;
    tracing::info!(
        disk = bdev.name(),
        snapshot = name,
        paused_ms = started.elapsed().as_millis() as u64,
        "{method}"
    );
    list(&bdev)
}

/// Seconds and nanoseconds since the Unix epoch.
fn now() -> (u32, u32) {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    (t.as_secs() as u32, t.subsec_nanos())
}

fn list(bdev: &Bdev) -> Result<Value, Fail> {
    let snaps = bdev.snapshots().map_err(|e| failed(bdev, e))?;
    let v: Vec<Value> = snaps
        .iter()
        .map(|s| {
            json!({
                "id": s.id,
                "name": s.name,
                "vm-state-size": s.vm_state_size,
                "date-sec": s.date_sec,
                "date-nsec": s.date_nsec,
                "vm-clock-sec": s.vm_clock_nsec / 1_000_000_000,
                "vm-clock-nsec": s.vm_clock_nsec % 1_000_000_000,
            })
        })
        .collect();
    Ok(json!({"disk": bdev.name(), "snapshots": v}))
}
