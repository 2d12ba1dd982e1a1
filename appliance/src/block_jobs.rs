//! Block jobs over the control socket: `mirror_start`, `job_list`, `job_complete`,
//! `job_cancel`, `job_pause`, `job_resume`, `job_set_speed`.
//!
//! Starting a mirror is control-plane work: the parameters are checked (each error
//! names its key), the target is created if asked (a raw or qcow2 file of the disk's
//! size) and opened like a disk of the appliance (O_DIRECT, its own shards), and then
//! the job runs on a reactor (`jobs::mirror`). A target must not be the disk's own
//! file nor any file the appliance serves, and a file target must lie inside
//! `[control] allowed_target_dirs` (by default the disk's own directory): the path is
//! canonicalised (symlinks resolved, `..` gone) before the check, so neither a `..` nor
//! a symlink leads out. NBD targets are always allowed. When a mirror pivots, the
//! disk's entry in the running configuration follows it to the target.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use jobs::{CopyMode, Ending, ErrorPolicy, Job, JobError, Mirror, MirrorOptions, SyncMode};
use serde_json::{Value, json};

use crate::control::{Args, FAILED, Fail, INVALID_PARAMS, Params, only};
use crate::serve::Appliance;

/// The methods this module answers.
pub const METHODS: &[&str] = &[
    "mirror_start",
    "stream_start",
    "commit_start",
    "job_list",
    "job_complete",
    "job_cancel",
    "job_pause",
    "job_resume",
    "job_set_speed",
];

impl From<JobError> for Fail {
    fn from(e: JobError) -> Fail {
        let data = match &e {
            JobError::NotFound(j) | JobError::WrongState(j, ..) => Some(json!({"job": j})),
            JobError::Busy(d, j) => Some(json!({"disk": d, "job": j})),
            JobError::Invalid(_) => None,
        };
        Fail(FAILED, e.to_string(), data)
    }
}

/// Answers a job method.
pub(crate) fn call(app: &Arc<Appliance>, method: &str, params: &Params) -> Result<Value, Fail> {
    let a = Args { method, params };
    match method {
        "mirror_start" => mirror_start(app, &a),
        "stream_start" => stream_start(app, &a),
        "commit_start" => commit_start(app, &a),
        "job_list" => {
            only(params, method, &["job"])?;
            match a.opt_str("job")? {
                Some(id) => Ok(app.jobs().get(id)?.to_json()),
                None => Ok(app.jobs().to_json()),
            }
        }
        "job_complete" => control(app, &a, &["job"], |j| j.complete()),
        "job_cancel" => {
            let force = a.opt_bool("force")?.unwrap_or(false);
            control(app, &a, &["job", "force"], |j| j.cancel(force))
        }
        "job_pause" => control(app, &a, &["job"], |j| j.pause()),
        "job_resume" => control(app, &a, &["job"], |j| j.resume()),
        "job_set_speed" => {
            only(params, method, &["job", "speed"])?;
            let speed = a.opt_u64("speed")?.ok_or_else(|| a.bad("speed", "is required"))?;
            let job = app.jobs().get(a.str("job")?)?;
            job.set_speed(speed);
            Ok(job.to_json())
        }
        _ => unreachable!("not a job method: {method}"),
    }
}

fn control(
    app: &Appliance,
    a: &Args<'_>,
    keys: &[&str],
    f: impl Fn(&Job) -> Result<(), JobError>,
) -> Result<Value, Fail> {
    only(a.params, a.method, keys)?;
    let job = app.jobs().get(a.str("job")?)?;
    f(&job)?;
    Ok(job.to_json())
}

const MIRROR_KEYS: &[&str] = &[
    "disk",
    "target",
    "format",
    "create",
    "sync",
    "granularity",
    "buf_size",
    "copy_mode",
    "speed",
    "unmap",
    "on_source_error",
    "on_target_error",
];

fn options(a: &Args<'_>) -> Result<MirrorOptions, Fail> {
    let d = MirrorOptions::default();
    let policy = |key| a.opt_enum(key, "report, ignore, stop", ErrorPolicy::parse);
    let sync = a.opt_enum("sync", "full, none", |s| match s {
        "full" => Some(SyncMode::Full),
        "none" => Some(SyncMode::None),
        _ => None,
    })?;
    let o = MirrorOptions {
        sync: sync.unwrap_or(d.sync),
        granularity: a.opt_u64("granularity")?.unwrap_or(d.granularity),
        buf_size: a.opt_u64("buf_size")?.unwrap_or(d.buf_size),
        copy_mode: a
            .opt_enum("copy_mode", "background, write-blocking, adaptive", CopyMode::parse)?
            .unwrap_or(d.copy_mode),
        speed: a.opt_u64("speed")?.unwrap_or(d.speed),
        unmap: a.opt_bool("unmap")?.unwrap_or(d.unmap),
        on_source_error: policy("on_source_error")?.unwrap_or(d.on_source_error),
        on_target_error: policy("on_target_error")?.unwrap_or(d.on_target_error),
    };
    let g = o.granularity;
    if !g.is_power_of_two()
        || !(jobs::bitmap::MIN_GRANULARITY..=jobs::bitmap::MAX_GRANULARITY).contains(&g)
    {
        return Err(a.bad("granularity", "must be a power of two from 4096 to 64 MiB"));
    }
    if o.buf_size < g.min(jobs::mirror::MAX_COPY) {
        return Err(a.bad("buf_size", "must hold at least one copy (the granularity, up to 1 MiB)"));
    }
    Ok(o)
}

fn mirror_start(app: &Arc<Appliance>, a: &Args<'_>) -> Result<Value, Fail> {
    only(a.params, a.method, MIRROR_KEYS)?;
    let disk = a.str("disk")?;
    let (source, disk_cfg) = app.served_disk(disk).map_err(|e| {
        let mut f = Fail::from(e);
        f.2 = Some(json!({"key": "disk", "disk": disk}));
        f
    })?;
    let opts = options(a)?;
    let target = a.str("target")?;
    let create = a.opt_bool("create")?.unwrap_or(false);
    let format = target_format(a)?;
    let reactors = app.job_reactors();
    if target.contains("://") {
        let tbdev = open_nbd_target(app, a, disk, target, create, format, &reactors)?;
        let tcfg = config::Disk {
            path: Some(PathBuf::from(target)),
            driver: config::Driver::Nbd,
            direct: false,
            format: config::Format::Raw,
            ..disk_cfg.clone()
        };
        return start(app, disk, source, tbdev, target.to_string(), false, tcfg, reactors, opts);
    }
    if target.starts_with("rbd:") {
        let size = source.info().size;
        let (tbdev, tcfg) =
            open_rbd_target(a, &disk_cfg, target, create, format, size, "mirror", &reactors)?;
        let name = tcfg.path.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
        return start(app, disk, source, tbdev, name, create, tcfg, reactors, opts);
    }
    let path = app.resolve(Path::new(target));
    let path = confine(app, a, &path, &disk_cfg)?;
    if app.serves_file(&path) {
        return Err(
            a.bad("target", &format!("is {}, a file this appliance serves", path.display()))
        );
    }
    let format = prepare_target(a, &path, create, format, disk_cfg.format, source.info().size)?;
    let tcfg = target_config(&disk_cfg, &path, format);
    let tbdev = drivers::Bdev::open(&tcfg, &reactors)
        .map_err(|e| a.bad("target", &format!("cannot be opened: {e}")))?;
    let name = path.display().to_string();
    let tcfg = config::Disk { name: disk_cfg.name.clone(), ..tcfg };
    start(app, disk, source, tbdev, name, create, tcfg, reactors, opts)
}

/// Starts the job; when it pivots, the disk's configuration becomes `moved` (the
/// target's path, format and driver, with the disk's own exports and limits).
#[allow(clippy::too_many_arguments)]
fn start(
    app: &Arc<Appliance>,
    disk: &str,
    source: Arc<drivers::Bdev>,
    target: Arc<drivers::Bdev>,
    target_name: String,
    target_zeroed: bool,
    moved: config::Disk,
    reactors: Vec<poller::ReactorHandle>,
    opts: MirrorOptions,
) -> Result<Value, Fail> {
    let weak = Arc::downgrade(app);
    let name = disk.to_string();
    let m = Mirror {
        kind: jobs::JobKind::Mirror,
        source,
        target,
        target_name,
        target_zeroed,
        reactors,
        opts,
        on_end: Box::new(move |ending| {
            if ending == Ending::Pivoted
                && let Some(app) = weak.upgrade()
            {
                app.disk_moved(&name, moved);
            }
        }),
    };
    let job = jobs::mirror::start(app.jobs(), m)?;
    Ok(json!({"job": job.id}))
}

/// The target's `format`, if given.
pub(crate) fn target_format(a: &Args<'_>) -> Result<Option<config::Format>, Fail> {
    a.opt_enum("format", "raw, qcow2", |s| match s {
        "raw" => Some(config::Format::Raw),
        "qcow2" => Some(config::Format::Qcow2),
        _ => None,
    })
}

/// Opens an NBD export as a raw target, refusing one that is this very disk.
pub(crate) fn open_nbd_target(
    app: &Appliance,
    a: &Args<'_>,
    disk: &str,
    uri: &str,
    create: bool,
    format: Option<config::Format>,
    reactors: &[poller::ReactorHandle],
) -> Result<Arc<drivers::Bdev>, Fail> {
    if create {
        return Err(a.bad("create", "applies to a file target, not an NBD export"));
    }
    if format == Some(config::Format::Qcow2) {
        return Err(a.bad("format", "of an NBD export is raw (the guest view the server exports)"));
    }
    let u = drivers::io::nbd::uri::NbdUri::parse(uri)
        .map_err(|e| a.bad("target", &format!("is not an NBD URI: {e}")))?;
    if u.export == disk && app.listens_at(&u.address) {
        return Err(a.bad("target", "is this disk's own export on this appliance"));
    }
    let storage = drivers::io::nbd::open(uri, &reactors[0])
        .map_err(|e| a.bad("target", &format!("cannot be opened: {e}")))?;
    let driver = drivers::format::raw::RawDriver::new(storage, false);
    Ok(drivers::Bdev::new(&format!("{disk}.mirror"), Arc::new(driver), Default::default()))
}

/// Opens (with `create`, first makes) an RBD image as a mirror target:
/// `rbd:POOL[/NS]/IMAGE`, with QEMU's `:conf=...:id=...:keyring=...` options, or without
/// them the source disk's cluster settings (an RBD disk) or the defaults. Returns the
/// target (named for its `role`: mirror, backup) and the disk's configuration once it
/// pivots.
#[allow(clippy::too_many_arguments)]
pub(crate) fn open_rbd_target(
    a: &Args<'_>,
    disk: &config::Disk,
    target: &str,
    create: bool,
    format: Option<config::Format>,
    size: u64,
    role: &str,
    reactors: &[poller::ReactorHandle],
) -> Result<(Arc<drivers::Bdev>, config::Disk), Fail> {
    let (image, mut how) = crate::rbd_tools::parse(target).map_err(|e| a.bad("target", &e))?;
    if !target["rbd:".len()..].contains(':')
        && let Some(own) = &disk.rbd
    {
        how = own.clone();
    }
    if disk.driver == config::Driver::Rbd
        && disk.path.as_deref() == Some(Path::new(&image))
        && disk.rbd.as_ref().is_some_and(|r| r.conf == how.conf)
    {
        return Err(a.bad("target", "is this disk's own RBD image"));
    }
    let format = format.unwrap_or(config::Format::Raw);
    if create {
        if format != config::Format::Raw {
            return Err(a.bad("format", "of a new RBD image is raw"));
        }
        drivers::io::rbd::create(&image, &how, size)
            .map_err(|e| a.bad("target", &format!("cannot be created: {e}")))?;
    }
    let tcfg = config::Disk {
        driver: config::Driver::Rbd,
        direct: false,
        allowed_backing_dirs: Vec::new(),
        rbd: Some(how),
        name: format!("{}.{role}", disk.name),
        ..target_config(disk, Path::new(&image), format)
    };
    let tbdev = drivers::Bdev::open(&tcfg, reactors)
        .map_err(|e| a.bad("target", &format!("cannot be opened: {e}")))?;
    if tbdev.info().size < size {
        return Err(a.bad(
            "target",
            &format!("{image} holds {} bytes, less than the disk's {size}", tbdev.info().size),
        ));
    }
    Ok((tbdev, config::Disk { name: disk.name.clone(), ..tcfg }))
}

/// Makes or checks the target file; returns its format.
pub(crate) fn prepare_target(
    a: &Args<'_>,
    path: &Path,
    create: bool,
    format: Option<config::Format>,
    source_format: config::Format,
    size: u64,
) -> Result<config::Format, Fail> {
    let exists = path.exists();
    if create {
        if exists {
            return Err(a.bad(
                "target",
                &format!("{} exists; leave out `create` to mirror into it", path.display()),
            ));
        }
        let format = format.unwrap_or(source_format);
        let r = match format {
            config::Format::Qcow2 => {
                let o = drivers::qcow2::create::CreateOptions { size, ..Default::default() };
                drivers::qcow2::create::create(path, &o).map_err(|e| e.to_string())
            }
            config::Format::Raw => std::fs::File::create_new(path)
                .and_then(|f| f.set_len(size))
                .map_err(|e| e.to_string()),
        };
        r.map_err(|e| a.bad("target", &format!("cannot be created: {}: {e}", path.display())))?;
        return Ok(format);
    }
    if !exists {
        return Err(a.bad(
            "target",
            &format!("{} does not exist (set `create` to make it)", path.display()),
        ));
    }
    Ok(format.unwrap_or_else(|| {
        if is_qcow2(path) { config::Format::Qcow2 } else { config::Format::Raw }
    }))
}

fn is_qcow2(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut magic)).is_ok()
        && magic == *b"QFI\xfb"
}

/// The target opened the way the disk is (same engine, O_DIRECT as the disk).
pub(crate) fn target_config(
    disk: &config::Disk,
    path: &Path,
    format: config::Format,
) -> config::Disk {
    let dir: PathBuf = path.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("/"));
    config::Disk {
        name: format!("{}.mirror", disk.name),
        path: Some(path.to_path_buf()),
        format,
        // A file target goes through the disk's file engine; a disk in memory, on
        // an NVMe namespace, on an NBD server or null writes its target with io_uring.
        driver: match disk.driver {
            config::Driver::Aio => config::Driver::Aio,
            _ => config::Driver::IoUring,
        },
        direct: disk.direct,
        read_only: false,
        size: None,
        allowed_backing_dirs: vec![dir],
        l2_cache_bytes: None,
        refcount_cache_bytes: None,
        shards: None,
        vhost_user_blk: None,
        qos: None,
        nbd_allow: None,
        encryption_key_file: None,
        rbd: None,
    }
}

/// The served disk a job names (`disk`), with its configuration; the error names the key.
pub(crate) fn job_disk(
    app: &Appliance,
    a: &Args<'_>,
) -> Result<(Arc<drivers::Bdev>, config::Disk), Fail> {
    let disk = a.str("disk")?;
    app.served_disk(disk).map_err(|e| {
        let mut f = Fail::from(e);
        f.2 = Some(json!({"key": "disk", "disk": disk}));
        f
    })
}

fn stream_start(app: &Arc<Appliance>, a: &Args<'_>) -> Result<Value, Fail> {
    only(a.params, a.method, &["disk", "speed"])?;
    let (disk, _) = job_disk(app, a)?;
    let s = jobs::stream::Stream {
        disk,
        reactors: app.job_reactors(),
        speed: a.opt_u64("speed")?.unwrap_or(0),
        on_end: Box::new(|_| {}),
    };
    let job = jobs::stream::start(app.jobs(), s).map_err(|e| keyed(e, "disk"))?;
    Ok(json!({"job": job.id}))
}

/// A job's refusal, naming `key` when it is about the request.
fn keyed(e: JobError, key: &str) -> Fail {
    let invalid = matches!(e, JobError::Invalid(_));
    let mut f = Fail::from(e);
    if invalid {
        f.0 = INVALID_PARAMS;
        f.2 = Some(json!({"key": key}));
    }
    f
}

/// An active commit: the disk's image (and any between) written into `base` (default:
/// its backing file), new writes mirrored until ready; `job_complete` switches the
/// disk onto the base, which keeps its own backing chain.
fn commit_start(app: &Arc<Appliance>, a: &Args<'_>) -> Result<Value, Fail> {
    only(a.params, a.method, &["disk", "base", "top", "speed"])?;
    let (source, disk_cfg) = job_disk(app, a)?;
    let chain = source.driver().chain();
    if chain.len() < 2 {
        return Err(a.bad("disk", "has no backing file to commit into"));
    }
    if let Some(top) = a.opt_str("top")? {
        let p = app.resolve(Path::new(top));
        if p != chain[0].path {
            return Err(a.bad("top", "names an image below the disk's own; committing a layer below the active one is not built yet"));
        }
    }
    let depth = match a.opt_str("base")? {
        None => 1,
        Some(b) => {
            let p = app.resolve(Path::new(b));
            let same = |l: &drivers::driver::ChainLink| {
                l.path == p || std::fs::canonicalize(&p).is_ok_and(|c| c == l.path)
            };
            chain.iter().skip(1).position(same).map(|i| i + 1).ok_or_else(|| {
                let names: Vec<String> =
                    chain[1..].iter().map(|l| l.path.display().to_string()).collect();
                a.bad("base", &format!("is not in the disk's backing chain ({})", names.join(", ")))
            })?
        }
    };
    let base = &chain[depth];
    let format = if base.format == "qcow2" { config::Format::Qcow2 } else { config::Format::Raw };
    let dir = base.path.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("/"));
    let tcfg = config::Disk {
        path: Some(base.path.clone()),
        format,
        allowed_backing_dirs: if disk_cfg.allowed_backing_dirs.is_empty() {
            vec![dir]
        } else {
            disk_cfg.allowed_backing_dirs.clone()
        },
        l2_cache_bytes: None,
        refcount_cache_bytes: None,
        shards: None,
        ..disk_cfg.clone()
    };
    let reactors = app.job_reactors();
    let tbdev = drivers::api::open::open_unlocked(
        &config::Disk { name: format!("{}.commit", disk_cfg.name), ..tcfg.clone() },
        &reactors,
    )
    .map_err(|e| a.bad("base", &format!("cannot be opened for writing: {e}")))?;
    let opts = MirrorOptions {
        sync: SyncMode::Above(depth as u8 + 1),
        speed: a.opt_u64("speed")?.unwrap_or(0),
        // The base may have a backing file of its own: what the disk reads as zeros is
        // written as zeros there, never unmapped.
        unmap: false,
        ..MirrorOptions::default()
    };
    let weak = Arc::downgrade(app);
    let name = disk_cfg.name.clone();
    let m = Mirror {
        kind: jobs::JobKind::Commit,
        source,
        target: tbdev,
        target_name: base.path.display().to_string(),
        target_zeroed: false,
        reactors,
        opts,
        on_end: Box::new(move |ending| {
            if ending == Ending::Pivoted
                && let Some(app) = weak.upgrade()
            {
                app.disk_moved(&name, tcfg);
            }
        }),
    };
    let job = jobs::mirror::start(app.jobs(), m)?;
    Ok(json!({"job": job.id}))
}

/// The target's canonical path, if it lies inside an allowed directory: those of
/// `[control] allowed_target_dirs`, or else the directory of the disk's own image.
pub(crate) fn confine(
    app: &Appliance,
    a: &Args<'_>,
    path: &Path,
    disk: &config::Disk,
) -> Result<PathBuf, Fail> {
    let configured = app.config().control.map(|c| c.allowed_target_dirs).unwrap_or_default();
    let dirs = if configured.is_empty() {
        // A disk in a file may write targets beside it; one elsewhere (an RBD image, an
        // NVMe namespace, an NBD export) has no directory of its own.
        let own = disk.path.as_deref().and_then(Path::parent).map(Path::to_path_buf);
        let in_file = matches!(disk.driver, config::Driver::IoUring | config::Driver::Aio);
        own.filter(|_| in_file).into_iter().collect()
    } else {
        configured
    };
    let canonical =
        canonical_target(path).map_err(|e| a.bad("target", &format!("{}: {e}", path.display())))?;
    let inside = dirs
        .iter()
        .filter_map(|d| d.canonicalize().ok())
        .any(|d| canonical.starts_with(&d) && canonical != d);
    if dirs.is_empty() {
        let m = format!(
            "{}: disk `{}` is not in a local directory, so no target file is allowed until \
             [control] allowed_target_dirs names the directories",
            path.display(),
            disk.name
        );
        return Err(a.bad("target", &m));
    }
    if !inside {
        let list: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
        let m = format!(
            "{} (as {}) is outside the allowed target directories [{}] (set [control] \
             allowed_target_dirs)",
            path.display(),
            canonical.display(),
            list.join(", ")
        );
        return Err(a.bad("target", &m));
    }
    Ok(canonical)
}

/// `path` with every symlink and `..` resolved: the file itself when it exists, else
/// its directory's canonical path joined with its name (which must be a plain name).
fn canonical_target(path: &Path) -> std::io::Result<PathBuf> {
    if std::fs::symlink_metadata(path).is_ok() {
        return path.canonicalize();
    }
    let name = match path.file_name() {
        Some(n) if n != ".." && n != "." => n,
        _ => return Err(std::io::Error::other("does not name a file")),
    };
    let dir = path.parent().unwrap_or(Path::new("/"));
    Ok(dir.canonicalize()?.join(name))
}
