//! The side-by-side benchmark: the same fio jobs against the appliance,
//! qemu-storage-daemon and qemu-nbd (each pinned to one core, fio on another), plus fio
//! straight on the raw file, in ABBA rounds.
//!
//! Per job and round the targets run back to back, in one order on even rounds and the
//! reverse on odd ones, so slow drifts of a shared machine hit every server alike. The
//! figure of merit is the per-round ratio appliance/peer (both measured minutes apart
//! at most), summarised by its median and range over the rounds.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::fio::{self, Job, Measure};
use crate::servers::{Format, Kind, Server, Spec};
use crate::sysinfo::Stamp;

/// Everything a harness run is told.
#[derive(Debug, Clone, Serialize)]
pub struct Options {
    pub smoke: bool,
    pub rounds: usize,
    pub runtime_s: f64,
    pub ramp_s: f64,
    /// Results go to `out/<UTC date-time>/`, and `out/latest` points there.
    pub out: PathBuf,
    /// Images and sockets live in a fresh directory under this one (O_DIRECT capable).
    pub work_root: PathBuf,
    /// Size of the data-filled raw image (and of the allocated qcow2 made from it).
    pub image_size: u64,
    /// Virtual size of the empty images of the write-to-empty job.
    pub empty_size: u64,
    /// Bytes a job on an empty image writes at most (bounds the space allocations take).
    pub empty_io_size: u64,
    pub formats: Vec<Format>,
    pub servers: Vec<Kind>,
    /// Only the jobs with these names (all when empty).
    pub jobs: Vec<String>,
    /// `APPLIANCE_DEBUG_DELAY_US` for the appliance.
    pub slow_appliance_us: u64,
    /// The appliance binary; built with cargo when `None`.
    pub appliance_bin: Option<PathBuf>,
    pub appliance_idle: String,
    pub server_core: usize,
    /// The appliance's reactors (empty: one, on `server_core`).
    pub appliance_cores: Vec<usize>,
    pub fio_core: usize,
    /// CPU fio runs on for the `device` baseline (default: the server core, so the
    /// device sees the same CPU, interrupt routing included, as the servers);
    /// `device-client-core` runs it on `fio_core`, and the limit takes the better.
    pub device_core: usize,
    pub keep_work: bool,
}

impl Options {
    /// The defaults of a full run (3 rounds of 5 s per case).
    pub fn full(out: PathBuf) -> Options {
        Options {
            smoke: false,
            rounds: 3,
            runtime_s: 5.0,
            ramp_s: 0.5,
            out,
            work_root: PathBuf::from("/var/tmp"),
            image_size: 2 << 30,
            empty_size: 64 << 30,
            empty_io_size: 512 << 20,
            formats: vec![Format::Raw, Format::Qcow2],
            servers: Kind::ALL.to_vec(),
            jobs: Vec::new(),
            slow_appliance_us: 0,
            appliance_bin: None,
            appliance_idle: "busy".into(),
            server_core: 0,
            appliance_cores: vec![],
            fio_core: 1,
            device_core: 0,
            keep_work: false,
        }
    }

    /// Turns these options into a smoke run: one round of about a second per case on
    /// small images.
    pub fn make_smoke(&mut self) {
        self.smoke = true;
        self.rounds = 1;
        self.runtime_s = 1.0;
        self.ramp_s = 0.0;
        self.image_size = 64 << 20;
        self.empty_size = 4 << 30;
        self.empty_io_size = 64 << 20;
    }
}

/// One fio run against one target.
#[derive(Debug, Clone, Serialize)]
pub struct RunRecord {
    /// Position in the whole run.
    pub seq: usize,
    pub round: usize,
    pub job: String,
    /// The image format; `None` for the device (fio on the raw file).
    pub format: Option<Format>,
    pub server: Kind,
    pub error: Option<String>,
    #[serde(flatten)]
    pub measure: Measure,
    /// Server CPU time over the fio run, in cores (1.0 = one core busy all along).
    pub server_cpu_cores: Option<f64>,
    /// Server CPU time per I/O, microseconds.
    pub server_cpu_us_per_io: Option<f64>,
    /// Requests in flight at the block device holding the images, averaged over the run
    /// (`/sys/dev/block/*/stat`: time in queue over wall time): how much of the job's
    /// queue depth the storage sees, the rest being in the client, the transport or
    /// the server.
    pub disk_queue: Option<f64>,
    /// Time a request spent at that device on average over the run, microseconds
    /// (fields 4 and 8 over fields 1 and 5): with `disk_queue`, whether the storage was
    /// slower per request or was given fewer requests.
    pub disk_us_per_request: Option<f64>,
    pub fio_output: String,
}

/// The images every run uses.
struct Images {
    dir: PathBuf,
    data_raw: PathBuf,
    alloc_qcow2: PathBuf,
}

/// Removes the work directory at the end (unless kept).
struct WorkDir {
    path: PathBuf,
    keep: bool,
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// The workspace this crate belongs to.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// The appliance binary of the same profile as this executable, rebuilt with cargo so
/// it is never stale (falls back to an existing one if cargo is unavailable).
pub fn locate_appliance(explicit: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(p) = explicit {
        return if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            Err(format!("{}: no such file", p.display()))
        };
    }
    let exe = std::env::current_exe().map_err(|e| format!("current exe: {e}"))?;
    // <target>/<profile>/harness, or <target>/<profile>/deps/<test> for tests.
    let mut profile_dir = exe.parent().ok_or("exe without a directory")?.to_path_buf();
    if profile_dir.file_name().is_some_and(|n| n == "deps") {
        profile_dir.pop();
    }
    let target_dir = profile_dir.parent().ok_or("exe outside a target directory")?.to_path_buf();
    let profile =
        profile_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let bin = profile_dir.join("appliance");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace())
        .args(["build", "--quiet", "-p", "appliance", "--bin", "appliance"])
        .env("CARGO_TARGET_DIR", &target_dir);
    match profile.as_str() {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    eprintln!("harness: building the appliance ({profile}) in {}", target_dir.display());
    match cmd.status() {
        Ok(s) if s.success() => Ok(bin),
        other => {
            if bin.is_file() {
                eprintln!(
                    "harness: cargo build failed ({other:?}); using the existing {}",
                    bin.display()
                );
                Ok(bin)
            } else {
                Err(format!("cannot build the appliance ({other:?}); pass --appliance PATH"))
            }
        }
    }
}

fn require(tool: &str, args: &[&str]) -> Result<(), String> {
    match Command::new(tool).args(args).output() {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!(
            "`{tool} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => {
            Err(format!("`{tool}` is required ({e}): apt-get install -y fio libnbd-bin qemu-utils"))
        }
    }
}

fn check_tools(o: &Options) -> Result<(), String> {
    require("taskset", &["-c", "0", "true"])?;
    require("fio", &["--version"])?;
    let engines = Command::new("fio").arg("--enghelp").output().map_err(|e| e.to_string())?;
    if !String::from_utf8_lossy(&engines.stdout).contains("nbd") {
        return Err("this fio has no nbd engine".into());
    }
    if o.formats.contains(&Format::Qcow2) || o.jobs_selected().iter().any(|j| j.empty) {
        require("qemu-img", &["--version"])?;
    }
    if o.servers.contains(&Kind::Qsd) {
        require("qemu-storage-daemon", &["--version"])?;
    }
    if o.servers.contains(&Kind::QemuNbd) {
        require("qemu-nbd", &["--version"])?;
    }
    Ok(())
}

impl Options {
    /// The jobs this run does.
    pub fn jobs_selected(&self) -> Vec<Job> {
        fio::jobs()
            .into_iter()
            .filter(|j| self.jobs.is_empty() || self.jobs.iter().any(|n| n == j.name))
            .collect()
    }

    /// The targets of one job in round `round`: every (server, format) pair, then the
    /// device and the `null` disk (one run each, whatever the format), reversed on odd
    /// rounds (ABBA).
    pub fn order(&self, round: usize) -> Vec<(Kind, Option<Format>)> {
        let mut v = Vec::new();
        for &f in &self.formats {
            for &k in self.servers.iter().filter(|k| k.per_format()) {
                v.push((k, Some(f)));
            }
        }
        for &k in self.servers.iter().filter(|k| !k.per_format()) {
            v.push((k, None));
        }
        if round % 2 == 1 {
            v.reverse();
        }
        v
    }
}

/// Fills `path` with `size` bytes of incompressible data.
fn write_data(path: &Path, size: u64) -> Result<(), String> {
    let mut f = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut left = size;
    while left > 0 {
        for c in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes());
        }
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n]).map_err(|e| format!("{}: {e}", path.display()))?;
        left -= n as u64;
    }
    f.sync_all().map_err(|e| format!("{}: {e}", path.display()))
}

fn run_cmd(cmd: &mut Command) -> Result<(), String> {
    let o = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if o.status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?} failed: {}", String::from_utf8_lossy(&o.stderr).trim()))
    }
}

/// The data images. Both are written by `qemu-img convert` from one source at the same
/// time, so they are equally fresh on the disk: on a virtual disk the speed of random
/// writes depends on how recently the blocks were written (here a file copied a minute
/// before took 4k random writes at 2.4x the rate of the same data written half an hour
/// before, with fio alone), and an image written later than the other would win every
/// write job for that reason alone.
fn make_images(o: &Options, dir: &Path) -> Result<Images, String> {
    let source = dir.join("source.raw");
    let data_raw = dir.join("data.raw");
    let alloc_qcow2 = dir.join("alloc.qcow2");
    eprintln!("harness: writing a {} data image", crate::fmt_size(o.image_size));
    write_data(&source, o.image_size)?;
    let convert = |fmt: &str, opts: &str, dst: &Path| {
        let mut c = Command::new("qemu-img");
        c.args(["convert", "-f", "raw", "-O", fmt]);
        if !opts.is_empty() {
            c.args(["-o", opts]);
        }
        c.arg(&source).arg(dst).stdout(Stdio::null()).stderr(Stdio::piped());
        c.spawn().map_err(|e| format!("qemu-img convert: {e}"))
    };
    let mut children = vec![convert("raw", "", &data_raw)?];
    if o.formats.contains(&Format::Qcow2) {
        children.push(convert("qcow2", "cluster_size=65536", &alloc_qcow2)?);
    }
    for c in children {
        let out = c.wait_with_output().map_err(|e| format!("qemu-img convert: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "qemu-img convert failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    std::fs::remove_file(&source).map_err(|e| format!("{}: {e}", source.display()))?;
    drop_cache(&data_raw)?;
    if o.formats.contains(&Format::Qcow2) {
        drop_cache(&alloc_qcow2)?;
    }
    Ok(Images { dir: dir.to_path_buf(), data_raw, alloc_qcow2 })
}

/// Writes `path` back and drops it from the page cache: O_DIRECT I/O to cached
/// pages makes io_uring hand requests to its kernel workers (it cannot invalidate the
/// pages without blocking), which would slow every target but the last one to cache.
fn drop_cache(path: &Path) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    f.sync_all().map_err(|e| format!("{}: {e}", path.display()))?;
    // SAFETY: posix_fadvise on a descriptor we own; it only advises the kernel.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        return Err(format!("{}: posix_fadvise: errno {rc}", path.display()));
    }
    Ok(())
}

/// A fresh empty image for one run of the write-to-empty job.
fn make_empty(o: &Options, dir: &Path, format: Format) -> Result<PathBuf, String> {
    let p = dir.join(format!("empty.{}", format.name()));
    let _ = std::fs::remove_file(&p);
    match format {
        Format::Raw => {
            let f = std::fs::File::create(&p).map_err(|e| format!("{}: {e}", p.display()))?;
            f.set_len(o.empty_size).map_err(|e| format!("{}: {e}", p.display()))?;
        }
        Format::Qcow2 => run_cmd(
            Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536"])
                .arg(&p)
                .arg(o.empty_size.to_string()),
        )?,
    }
    Ok(p)
}

/// Runs one job on one target; errors are recorded, not raised.
#[allow(clippy::too_many_arguments)]
fn run_one(
    o: &Options,
    appliance: &Path,
    images: &Images,
    logs: &Path,
    seq: usize,
    round: usize,
    job: &Job,
    kind: Kind,
    format: Option<Format>,
) -> RunRecord {
    let fmt_name = match (kind, format) {
        (Kind::Null, _) => "null",
        (_, Some(f)) => f.name(),
        (_, None) => "file",
    };
    let base = format!("{seq:04}-r{round}-{}-{fmt_name}-{}", job.name, kind.name());
    let log = logs.join(&base);
    let mut rec = RunRecord {
        seq,
        round,
        job: job.name.to_string(),
        format,
        server: kind,
        error: None,
        measure: Measure::default(),
        server_cpu_cores: None,
        server_cpu_us_per_io: None,
        disk_queue: None,
        disk_us_per_request: None,
        fio_output: format!("logs/{base}.json"),
    };
    let runopts = fio::RunOpts {
        runtime: Duration::from_secs_f64(o.runtime_s),
        ramp: Duration::from_secs_f64(o.ramp_s),
        cpu: Some(if kind == Kind::Device { o.device_core } else { o.fio_core }),
        io_size: job.empty.then_some(o.empty_io_size),
        slack: Duration::from_secs(60),
    };
    let result = (|| -> Result<(Measure, Option<f64>, Option<DiskSeen>), String> {
        // An empty image is made for each run of the write-to-empty job and removed
        // after it; the null disk opens no image at all.
        let fresh = match (job.empty, kind, format) {
            (_, Kind::Null, _) | (false, ..) => None,
            (true, k, _) if k.is_device() => Some(make_empty(o, &images.dir, Format::Raw)?),
            (true, _, f) => Some(make_empty(o, &images.dir, f.unwrap_or(Format::Raw))?),
        };
        let image = match (&fresh, format) {
            (Some(p), _) => p.clone(),
            (None, Some(Format::Qcow2)) => images.alloc_qcow2.clone(),
            (None, _) => images.data_raw.clone(),
        };
        let _remove = fresh.map(Remove);
        if kind.is_device() {
            let disk = DiskWatch::of(&images.dir);
            let m = fio::run(job, &fio::Target::File(image.clone()), &runopts, &log)?;
            return Ok((m, None, disk.and_then(|d| d.seen())));
        }
        let spec = Spec {
            kind,
            format: format.unwrap_or(Format::Raw),
            image: image.clone(),
            dir: images.dir.join("srv"),
            core: o.server_core,
            appliance_cores: o.appliance_cores.clone(),
            appliance_bin: appliance.to_path_buf(),
            appliance_idle: o.appliance_idle.clone(),
            appliance_delay_us: if kind == Kind::Null { 0 } else { o.slow_appliance_us },
            null_size: if job.empty { o.empty_size } else { o.image_size },
        };
        let server = Server::start(&spec)?;
        let cpu0 = server.cpu_time();
        let t0 = Instant::now();
        let disk = DiskWatch::of(&images.dir);
        let m = fio::run(job, &fio::Target::Nbd(server.uri()), &runopts, &log);
        let seen = disk.and_then(|d| d.seen());
        let wall = t0.elapsed();
        let cpu1 = server.cpu_time();
        let stopped = server.stop(Duration::from_secs(30));
        let m = m?;
        stopped?;
        let cores = match (cpu0, cpu1) {
            (Some(a), Some(b)) if !wall.is_zero() => {
                Some(b.saturating_sub(a).as_secs_f64() / wall.as_secs_f64())
            }
            _ => None,
        };
        Ok((m, cores, seen))
    })();
    match result {
        Ok((m, cores, seen)) => {
            rec.disk_queue = seen.map(|d| d.queue);
            rec.disk_us_per_request = seen.and_then(|d| d.us_per_request);
            rec.server_cpu_cores = cores;
            rec.server_cpu_us_per_io = cores.filter(|_| m.iops > 0.0).map(|c| c / m.iops * 1e6);
            rec.measure = m;
        }
        Err(e) => rec.error = Some(e),
    }
    rec
}

/// Removes a file when dropped (a run's fresh empty image, whatever the run's outcome).
struct Remove(PathBuf);

impl Drop for Remove {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The block device a directory lives on, and its counters when the measurement
/// started.
struct DiskWatch {
    stat: PathBuf,
    start: DiskCounters,
    at: Instant,
}

/// What the block layer's stat file counts (Documentation/block/stat.rst).
#[derive(Debug, Clone, Copy, PartialEq)]
struct DiskCounters {
    /// Reads and writes completed (fields 1 and 5).
    requests: u64,
    /// Milliseconds those requests spent at the device, summed (fields 4 and 8).
    request_ms: u64,
    /// Milliseconds in queue summed over all requests (field 11).
    queue_ms: u64,
}

impl DiskCounters {
    fn parse(text: &str) -> Option<DiskCounters> {
        let f: Vec<u64> =
            text.split_whitespace().take(11).map(str::parse).collect::<Result<_, _>>().ok()?;
        (f.len() == 11).then(|| DiskCounters {
            requests: f[0] + f[4],
            request_ms: f[3] + f[7],
            queue_ms: f[10],
        })
    }
}

/// What the disk saw of one run: requests in flight on average, and the time each one
/// took there (Little's law pairs them: in flight = rate x time).
#[derive(Debug, Clone, Copy, PartialEq)]
struct DiskSeen {
    queue: f64,
    us_per_request: Option<f64>,
}

impl DiskSeen {
    /// From the counters at the start and end of `wall_ms` milliseconds.
    fn between(a: DiskCounters, b: DiskCounters, wall_ms: f64) -> Option<DiskSeen> {
        let queue_ms = b.queue_ms.checked_sub(a.queue_ms)?;
        let requests = b.requests.checked_sub(a.requests)?;
        let request_ms = b.request_ms.checked_sub(a.request_ms)?;
        (wall_ms > 0.0).then(|| DiskSeen {
            queue: queue_ms as f64 / wall_ms,
            us_per_request: (requests > 0).then(|| request_ms as f64 * 1e3 / requests as f64),
        })
    }
}

impl DiskWatch {
    /// Starts measuring the device under `dir`; `None` when it is not a block device
    /// (tmpfs, overlay) or the kernel does not say.
    fn of(dir: &Path) -> Option<DiskWatch> {
        use std::os::unix::fs::MetadataExt;
        let dev = std::fs::metadata(dir).ok()?.dev();
        let stat =
            PathBuf::from(format!("/sys/dev/block/{}:{}/stat", libc::major(dev), libc::minor(dev)));
        let start = Self::read(&stat)?;
        Some(DiskWatch { stat, start, at: Instant::now() })
    }

    fn read(stat: &Path) -> Option<DiskCounters> {
        DiskCounters::parse(&std::fs::read_to_string(stat).ok()?)
    }

    /// What the disk saw since [`DiskWatch::of`].
    fn seen(&self) -> Option<DiskSeen> {
        let wall = self.at.elapsed().as_secs_f64() * 1e3;
        DiskSeen::between(self.start, Self::read(&self.stat)?, wall)
    }
}

#[cfg(test)]
mod disk_tests {
    use super::*;

    #[test]
    fn disk_counters_and_what_a_run_saw() {
        let a = DiskCounters::parse("100 0 800 50 200 0 1600 150 0 90 400 0 0 0 0 0 0").unwrap();
        assert_eq!(a, DiskCounters { requests: 300, request_ms: 200, queue_ms: 400 });
        let b = DiskCounters::parse("1100 0 0 350 1200 0 0 450 3 990 4400 0 0").unwrap();
        // 2000 requests took 600 ms at the disk between them: 300 us each; 4000 ms in
        // queue over 1000 ms of wall time: 4 in flight on average.
        let seen = DiskSeen::between(a, b, 1000.0).unwrap();
        assert_eq!(seen, DiskSeen { queue: 4.0, us_per_request: Some(300.0) });
        assert_eq!(DiskSeen::between(a, a, 1000.0).unwrap().us_per_request, None);
        assert!(DiskSeen::between(b, a, 1000.0).is_none(), "counters that went back");
        assert!(DiskCounters::parse("1 2 3").is_none());
        assert!(DiskCounters::parse("1 2 3 4 5 6 7 8 9 x 11").is_none());
    }
}

/// What a harness run produced.
pub struct Outcome {
    pub dir: PathBuf,
    pub failures: usize,
}

/// Runs the whole benchmark and writes its results.
pub fn run(o: &Options) -> Result<Outcome, String> {
    if o.rounds == 0 || o.runtime_s <= 0.0 {
        return Err("rounds and runtime must be positive".into());
    }
    let jobs = o.jobs_selected();
    if jobs.is_empty() {
        return Err(format!("no job matches {:?}", o.jobs));
    }
    check_tools(o)?;
    let appliance = if o.servers.contains(&Kind::Appliance) {
        locate_appliance(o.appliance_bin.as_deref())?
    } else {
        PathBuf::new()
    };
    let stamp = Stamp::collect(&workspace());
    let started = std::time::SystemTime::now();
    let dir = o.out.join(crate::sysinfo::utc_string(started, false));
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs).map_err(|e| format!("{}: {e}", logs.display()))?;
    std::fs::create_dir_all(&o.work_root).map_err(|e| format!("{}: {e}", o.work_root.display()))?;
    remove_stale_work_dirs(&o.work_root);
    let work = WorkDir {
        path: o.work_root.join(format!("appliance-bench-{}", std::process::id())),
        keep: o.keep_work,
    };
    let _ = std::fs::remove_dir_all(&work.path);
    std::fs::create_dir_all(&work.path).map_err(|e| format!("{}: {e}", work.path.display()))?;
    let images = make_images(o, &work.path)?;

    let per_round = jobs.len() * o.order(0).len();
    let total = per_round * o.rounds;
    eprintln!(
        "harness: {} rounds x {} jobs x {} targets, {:.1} s each (+{:.1} s ramp): about {:.0} s; results in {}",
        o.rounds,
        jobs.len(),
        o.order(0).len(),
        o.runtime_s,
        o.ramp_s,
        total as f64 * (o.runtime_s + o.ramp_s + 0.5),
        dir.display()
    );
    let t_start = Instant::now();
    let mut runs = Vec::new();
    for round in 0..o.rounds {
        for job in &jobs {
            for (kind, format) in o.order(round) {
                let seq = runs.len();
                let r = run_one(o, &appliance, &images, &logs, seq, round, job, kind, format);
                let what = format!(
                    "[{}/{} round {}] {:<24} {:<6} {:<9}",
                    seq + 1,
                    total,
                    round + 1,
                    job.name,
                    if kind == Kind::Null { "null" } else { format.map_or("file", Format::name) },
                    kind.name()
                );
                match &r.error {
                    None => eprintln!(
                        "{what} {:>9} IOPS {:>8.1} MiB/s p99 {:>8.1} us{}",
                        crate::stats::fmt_iops(r.measure.iops),
                        r.measure.mib_s,
                        r.measure.lat_p99_us,
                        r.server_cpu_cores
                            .map(|c| format!("  server CPU {c:.2} cores"))
                            .unwrap_or_default()
                    ),
                    Some(e) => eprintln!("{what} FAILED: {e}"),
                }
                runs.push(r);
            }
        }
    }
    let failures = runs.iter().filter(|r| r.error.is_some()).count();
    let results = crate::report::Results::new(stamp, o.clone(), jobs, runs, t_start.elapsed());
    crate::report::write_all(&results, &dir)?;
    update_latest(&o.out, &dir)?;
    Ok(Outcome { dir, failures })
}

/// Removes work directories of harness runs that were killed (their pid is gone).
fn remove_stale_work_dirs(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("appliance-bench-").and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("harness: removing {} left by a killed run", e.path().display());
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Points `out/latest` at `dir` (a relative symlink, or a copy where symlinks fail).
fn update_latest(out: &Path, dir: &Path) -> Result<(), String> {
    let latest = out.join("latest");
    if let Ok(m) = std::fs::symlink_metadata(&latest) {
        if m.is_dir() {
            std::fs::remove_dir_all(&latest).map_err(|e| format!("{}: {e}", latest.display()))?;
        } else {
            std::fs::remove_file(&latest).map_err(|e| format!("{}: {e}", latest.display()))?;
        }
    }
    let name = dir.file_name().ok_or("results dir without a name")?;
    if std::os::unix::fs::symlink(name, &latest).is_ok() {
        return Ok(());
    }
    std::fs::create_dir_all(&latest).map_err(|e| format!("{}: {e}", latest.display()))?;
    for f in ["results.md", "results.json", "iops.svg", "ratios.svg"] {
        std::fs::copy(dir.join(f), latest.join(f)).map_err(|e| format!("copying {f}: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abba_order() {
        let o = Options::full("x".into());
        let a = o.order(0);
        let b = o.order(1);
        assert_eq!(a.len(), 9);
        assert_eq!(a[0], (Kind::Appliance, Some(Format::Raw)));
        assert_eq!(a[6], (Kind::Device, None));
        assert_eq!(a[7], (Kind::DeviceClientCore, None));
        assert_eq!(a[8], (Kind::Null, None));
        let mut r = b.clone();
        r.reverse();
        assert_eq!(a, r);
        assert_eq!(o.order(2), a);
    }
}
