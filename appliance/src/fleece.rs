//! Point-in-time exports for pull backups (image fleecing) over the control socket:
//! `export_snapshot {disk, name, bitmap?, temp?}` and `export_snapshot_remove {name}`.
//!
//! `export_snapshot` makes a read-only NBD export `name` that shows the disk as it is
//! at that instant while the guest keeps writing, as QEMU's fleecing does (a backup job
//! with `sync = none` into a temporary image, and a `snapshot-access` export): a job of
//! type `backup` puts a copy-before-write filter in front of the disk (see
//! `jobs::backup`), which saves the old contents of each 64 KiB chunk into a sparse
//! temporary file before the first change to it lands; the export reads saved chunks
//! from that file and the rest from the disk (`drivers::api::view`). The temporary
//! file (`temp`, by default `.DISK.NAME.fleece` beside the disk, inside the allowed
//! target directories) is made for it and deleted when the export is removed. With
//! `bitmap`, that bitmap of the disk is copied and cleared at the same instant: the
//! export offers the copy as `qemu:dirty-bitmap:BITMAP` (what changed since the last
//! backup, to read), and the disk's bitmap records from the instant on (the next
//! incremental). The export takes the disk's NBD allow list.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use drivers::format::raw::RawDriver;
use jobs::backup::{Backup, BackupSync, FleeceView};
use jobs::{JobState, bitmap::DirtyBitmap};
use serde_json::{Value, json};

use crate::block_jobs::{confine, job_disk};
use crate::control::{Args, FAILED, Fail, Params, only};
use crate::serve::Appliance;

/// The methods this module answers.
pub const METHODS: &[&str] = &["export_snapshot", "export_snapshot_remove"];

/// How long the export waits for its job to take the point in time.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Answers a point-in-time export method.
pub(crate) fn call(app: &Arc<Appliance>, method: &str, params: &Params) -> Result<Value, Fail> {
    let a = Args { method, params };
    match method {
        "export_snapshot" => create(app, &a),
        "export_snapshot_remove" => {
            only(params, method, &["name"])?;
            remove(app, &a)
        }
        _ => unreachable!("not a point-in-time export method: {method}"),
    }
}

fn create(app: &Arc<Appliance>, a: &Args<'_>) -> Result<Value, Fail> {
    only(a.params, a.method, &["disk", "name", "bitmap", "temp"])?;
    let (source, disk_cfg) = job_disk(app, a)?;
    let name = a.str("name")?;
    if name.is_empty() || name.len() > 4096 || app.exports_name(name) {
        return Err(a.bad("name", &format!("{name:?} is empty, too long or an export already")));
    }
    let bitmap = match a.opt_str("bitmap")? {
        Some(b) => {
            let nb = source.bitmaps().get(b)?;
            nb.usable()?;
            let copy = Arc::new(DirtyBitmap::new(nb.map.len(), nb.map.granularity()));
            Some((b.to_string(), nb.map.clone(), copy))
        }
        None => None,
    };
    let temp = match a.opt_str("temp")? {
        Some(t) => app.resolve(Path::new(t)),
        None => {
            let dir = disk_cfg.path.as_deref().and_then(Path::parent).unwrap_or(Path::new("/tmp"));
            dir.join(format!(".{}.{name}.fleece", disk_cfg.name))
        }
    };
    let temp = confine(app, a, &temp, &disk_cfg).map_err(|mut f| {
        f.1 = f.1.replace("target", "temp");
        f
    })?;
    let size = source.info().size;
    std::fs::File::create_new(&temp)
        .and_then(|f| f.set_len(size))
        .map_err(|e| a.bad("temp", &format!("{}: {e}", temp.display())))?;
    let made = Made { path: temp.clone() };
    let engine = if disk_cfg.driver == config::Driver::Aio {
        drivers::EngineKind::Aio
    } else {
        drivers::EngineKind::IoUring
    };
    let storage = drivers::Storage::open_file(&temp, engine, disk_cfg.direct, false)
        .map_err(|e| a.bad("temp", &format!("cannot be opened: {e}")))?;
    let rw = Arc::new(RawDriver::new(storage.clone(), false));
    let target = drivers::Bdev::new(&format!("{name}.temp"), rw, Default::default());
    let view = FleeceView::new(source.clone());
    let exported =
        drivers::Bdev::point_in_time(name, Arc::new(RawDriver::new(storage, true)), view.clone());
    if let Some((b, _, copy)) = &bitmap {
        exported.add_frozen_bitmap(b, copy.clone())?;
    }
    let (weak, export) = (Arc::downgrade(app), name.to_string());
    let b = Backup {
        source,
        target,
        target_name: temp.display().to_string(),
        target_zeroed: true,
        compress: false,
        sync: BackupSync::Fleece { bitmap: bitmap.map(|(_, m, c)| (m, c)), view },
        speed: 0,
        reactors: app.job_reactors(),
        on_end: Box::new(move |_| {
            if let Some(app) = weak.upgrade() {
                app.unexport_view(&export);
            }
            drop(made);
        }),
    };
    let job = jobs::backup::start(app.jobs(), b)?;
    job.set_detail("export", name.into());
    let deadline = Instant::now() + START_TIMEOUT;
    while job.state() != JobState::Running {
        if job.state().ended() || Instant::now() > deadline {
            let _ = job.cancel(true);
            let e = job.error().unwrap_or_else(|| "the point in time was not taken".into());
            return Err(Fail(FAILED, format!("export_snapshot of {}: {e}", disk_cfg.name), None));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    if !app.export_view(exported, disk_cfg.nbd_allow.clone()) {
        let _ = job.cancel(true);
        return Err(a.bad("name", "cannot be exported (no [nbd] server, or the name is taken)"));
    }
    tracing::info!(disk = disk_cfg.name, export = name, temp = %temp.display(), job = job.id, "point-in-time export created");
    Ok(json!({"export": name, "job": job.id, "temp": temp}))
}

/// Deletes the temporary file once the job that used it has ended.
struct Made {
    path: PathBuf,
}

impl Drop for Made {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!(temp = %self.path.display(), "removing the temporary image: {e}");
        }
    }
}

fn remove(app: &Arc<Appliance>, a: &Args<'_>) -> Result<Value, Fail> {
    let name = a.str("name")?;
    let job = app
        .jobs()
        .all()
        .into_iter()
        .find(|j| !j.state().ended() && j.to_json()["export"] == name)
        .ok_or_else(|| a.bad("name", &format!("{name:?} is not a point-in-time export")))?;
    app.unexport_view(name);
    job.cancel(false)?;
    if !job.wait_finished(Instant::now() + START_TIMEOUT) {
        return Err(Fail(FAILED, format!("the job {} of export {name} did not end", job.id), None));
    }
    tracing::info!(export = name, job = job.id, "point-in-time export removed");
    Ok(json!({"export": name, "job": job.to_json()}))
}
