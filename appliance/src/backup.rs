//! The push backup over the control socket: `backup_start {disk, target, sync?,
//! bitmap?, speed?, compress?, create?, format?}` → `{job}` (QEMU's `blockdev-backup`).
//! With `compress` (a qcow2 target), every whole cluster the job or a copy-before-write
//! writes is stored compressed where it shrinks, as `qemu-img convert -c` does.
//!
//! The target is opened like a mirror's (see `block_jobs`): a file inside the allowed
//! target directories (created, raw or qcow2, when `create` is set), an NBD export, or
//! an RBD image (`rbd:POOL/IMAGE`, created raw and thin).
//! An incremental backup usually goes into a qcow2 overlay whose backing file is the
//! previous backup (`qemu-img create -f qcow2 -b full.qcow2 -F qcow2 inc1.qcow2`):
//! the job writes only the chunks the bitmap marks, zero chunks as zero clusters, so
//! the overlay reads as the disk at the backup's instant. `sync`: `full` (default),
//! `incremental` (the bitmap's chunks; the bitmap is cleared at the start, and gets its
//! bits back if the backup fails) or `bitmap` (the same, the bitmap left alone).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use jobs::backup::{Backup, BackupSync};
use serde_json::{Value, json};

use crate::block_jobs::{
    confine, job_disk, open_nbd_target, open_rbd_target, prepare_target, target_config,
    target_format,
};
use crate::control::{Args, Fail, Params, only};
use crate::serve::Appliance;

/// The methods this module answers.
pub const METHODS: &[&str] = &["backup_start"];

const KEYS: &[&str] =
    &["disk", "target", "sync", "bitmap", "speed", "compress", "create", "format"];

/// Answers a backup method.
pub(crate) fn call(app: &Arc<Appliance>, method: &str, params: &Params) -> Result<Value, Fail> {
    let a = Args { method, params };
    only(params, method, KEYS)?;
    let (source, disk_cfg) = job_disk(app, &a)?;
    let sync = sync_of(&a, &source)?;
    let compress = a.opt_bool("compress")?.unwrap_or(false);
    let speed = a.opt_u64("speed")?.unwrap_or(0);
    let target = a.str("target")?;
    let create = a.opt_bool("create")?.unwrap_or(false);
    let format = target_format(&a)?;
    let reactors = app.job_reactors();
    let disk = disk_cfg.name.clone();
    let (tbdev, name, zeroed) = if target.contains("://") {
        if compress {
            return Err(a.bad("compress", "needs a qcow2 file target, not an NBD export"));
        }
        let t = open_nbd_target(app, &a, &disk, target, create, format, &reactors)?;
        (t, target.to_string(), false)
    } else if target.starts_with("rbd:") {
        if compress {
            return Err(a.bad("compress", "needs a qcow2 file target, not an RBD image"));
        }
        let size = source.info().size;
        let (t, tcfg) =
            open_rbd_target(&a, &disk_cfg, target, create, format, size, "backup", &reactors)?;
        (t, tcfg.path.unwrap_or_default().display().to_string(), create)
    } else {
        let path = confine(app, &a, &app.resolve(Path::new(target)), &disk_cfg)?;
        if app.serves_file(&path) {
            let m = format!("is {}, a file this appliance serves", path.display());
            return Err(a.bad("target", &m));
        }
        let fmt = prepare_target(&a, &path, create, format, disk_cfg.format, source.info().size)?;
        let mut tcfg = target_config(&disk_cfg, &path, fmt);
        tcfg.name = format!("{disk}.backup");
        // An incremental target's backing file (the previous backup) lies beside it.
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("/"));
        tcfg.allowed_backing_dirs = vec![dir];
        let t = drivers::Bdev::open(&tcfg, &reactors)
            .map_err(|e| a.bad("target", &format!("cannot be opened: {e}")))?;
        if compress && !t.driver().compresses() {
            let _ = t.close();
            if create {
                let _ = std::fs::remove_file(&path);
            }
            return Err(a.bad("compress", "needs a qcow2 target (compressed clusters)"));
        }
        (t, path.display().to_string(), create)
    };
    let b = Backup {
        source,
        target: tbdev,
        compress,
        target_name: name,
        target_zeroed: zeroed,
        sync,
        speed,
        reactors,
        on_end: Box::new(move |done| {
            tracing::info!(disk = %disk, complete = done, "backup ended");
        }),
    };
    let job = jobs::backup::start(app.jobs(), b)?;
    Ok(json!({"job": job.id}))
}

/// `sync` and `bitmap`.
fn sync_of(a: &Args<'_>, source: &drivers::Bdev) -> Result<BackupSync, Fail> {
    let sync = a.opt_str("sync")?.unwrap_or("full");
    let clear = match sync {
        "full" => {
            if a.opt_str("bitmap")?.is_some() {
                return Err(a.bad("bitmap", "applies to sync incremental or bitmap, not full"));
            }
            return Ok(BackupSync::Full);
        }
        "incremental" => true,
        "bitmap" => false,
        _ => return Err(a.bad("sync", "must be one of full, incremental, bitmap")),
    };
    let name = a
        .opt_str("bitmap")?
        .ok_or_else(|| a.bad("bitmap", &format!("is required with sync {sync}")))?;
    let b = source.bitmaps().get(name)?;
    b.usable()?;
    Ok(BackupSync::Bitmap { name: name.to_string(), map: b.map.clone(), clear })
}
