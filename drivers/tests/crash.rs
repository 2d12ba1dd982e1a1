//! Crash consistency of the qcow2 engine, by simulated power loss.
//!
//! Each trial, from a seed (see `crash/workload.rs`):
//! 1. **An image**: a fresh qcow2 image whose geometry the seed picks — 512-byte
//!    clusters in most trials (every few requests then need a new L2 table, and with
//!    64-bit refcounts a new refcount block every 32 KiB of host space), 4 KiB and
//!    64 KiB in the rest (four in ten of the v3 ones with extended L2 entries: 32
//!    subclusters of 2 KiB, allocated, zeroed and discarded one by one; discards there
//!    zero whole subclusters); refcount widths 1, 16 and 64 bits; v2 and v3; lazy
//!    refcounts. About one v3 trial in five (4 KiB clusters and up, no snapshot, no
//!    resize) puts the guest data in an external data file (`data_file`, half of them
//!    `data_file_raw`), on a second simulated disk sharing the image's power: one cut,
//!    one count of operations over both, and a crash image of each; `qemu-img check`
//!    reads the data file at the absolute path the image names.
//!    Most images are *aged* first (prefill, no power cut): written, partly zeroed
//!    (zero clusters keeping their host cluster) and discarded (freed clusters, reused
//!    later), up to a seeded file size, then closed cleanly. Images with 512-byte
//!    clusters and 64-bit refcounts are filled to just below the 2 MiB of host space
//!    the first refcount table cluster covers, so the workers grow the refcount table
//!    (about one trial in nine). Some aged images get an internal snapshot (`qemu-img
//!    snapshot -c`): writes then copy shared L2 tables and clusters (with their old
//!    bytes) and drop refcounts from 2 to 1.
//! 2. **Workers**: four concurrent workers on one reactor, on a [`SimDisk`] (volatile
//!    write cache, power cut on a seeded disk operation, crash image = durable contents
//!    plus a seeded subset of unflushed writes, torn at 512 bytes). Each issues up to 40
//!    requests in its own quarter of the disk (neighbours share clusters):
//!
//!    | share | request | what it exercises |
//!    |---|---|---|
//!    | 33% | write anywhere | allocation of clusters, L2 tables, refcount blocks, refcount table growth; partial clusters (COW, or known zeros) |
//!    | 20% | write inside what the prefill wrote | in-place writes to allocated clusters (COW under a snapshot) |
//!    | 10% | write-zeroes with unmap | zero clusters / deallocation, frees |
//!    | 10% | write-zeroes without unmap | zero clusters keeping their host cluster |
//!    | 12% | discard | deallocation of whole clusters, frees |
//!    | 15% | flush | the barrier |
//!
//!    15% of writes carry FUA. Writes are classified by block status just before they
//!    are issued: in place, allocating whole clusters, allocating a partial cluster.
//! 3. **Checks** after the cut: our check and `qemu-img check` find no corruption in
//!    the crash image (leaks are allowed after a cut, none after a clean shutdown;
//!    dirty lazy-refcount images are checked after the repair opening them performs);
//!    the image opens, and every byte reads what the model (`crash/model.rs`) allows:
//!    the value of the last durable request on it (completed before a flush that
//!    completed, or completed with FUA, with no flush after it) or of a later one —
//!    never an older value or garbage. Written bytes read back; write-zeroes (with or
//!    without unmap) reads zeros; discarded whole clusters read zeros and the partial
//!    clusters at the ends of a discard keep their bytes (what `Shard::discard`
//!    promises with no backing file). After a clean close the image checks again.
//! 4. **Resize** (a quarter of the trials, `crash/resize.rs`): the checked image is
//!    grown offline through `resize_io` on a sim disk cut on a seeded one of the
//!    resize's disk operations (or not at all); the result checks clean, has the old or
//!    the new size (the new one if the resize returned), keeps its data, reads zeros in
//!    the grown area and takes a write at its end.
//!
//! Coverage counts (per request kind: completed, and durable when the power went; FUA
//! writes durable by FUA alone; trials that allocated L2 tables and refcount blocks,
//! grew the refcount table, resized, cut a resize midway...) are printed at the end,
//! and a run of at least [`COVERAGE_MIN_TRIALS`] trials fails if any is zero, so a
//! change cannot silently stop covering an operation.
//!
//! **Shards**: a third of the trials open the image with 1 shard, a third with 2 and a
//! third with 4, each shard on its own reactor (the workers run on the first, so most
//! requests are forwarded; 512-byte clusters give an L2 table per 32 KiB of guest
//! space, so every worker's quarter spans all shards, and refcount blocks of 32 KiB to
//! 2 MiB of host space give each shard its allocation groups).
//!
//! A trial with one shard is deterministic for its seed (one reactor, no real I/O,
//! seeded yields); with more, the reactors' threads interleave as they will, and a
//! failing seed may need a few runs to fail again. Trials run on two lanes (threads
//! with four reactors each) side by side. A failing trial prints its seed.
//! - `cargo test --release -p drivers --test crash` runs seeds 1..=2000 and the
//!   [`REGRESSION_SEEDS`] and [`SHARDED_REGRESSION_SEEDS`] (about 40 s on two cores),
//!   stopping at the first failure.
//! - `CRASH_TRIALS=N` runs seeds 1..=N and the regression seeds; `CRASH_SEED=N` runs
//!   seed N alone; `CRASH_THREADS=N` sets the lanes; `CRASH_DUMP=dir` keeps each
//!   trial's images (initial, crash, reopened) in `dir`.
//! - The campaign, which runs every trial even when some fail and ends with a summary
//!   line (trials run, failures, failing seeds, time) and the coverage counts:
//!
//!   ```sh
//!   CRASH_TRIALS=10000 CRASH_KEEP_GOING=1 cargo test --release -p drivers --test crash -- --nocapture
//!   ```

#[path = "crash/coverage.rs"]
mod coverage;
#[path = "crash/model.rs"]
mod model;
#[path = "crash/resize.rs"]
mod resize;
#[path = "crash/workload.rs"]
mod workload;

use std::cell::{Cell, RefCell};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use drivers::io::sim::SimDisk;
use drivers::qcow2::check::{Repair, check_io};
use drivers::qcow2::{OpenOptions, Qcow2Device};
use drivers::{EngineKind, IoSeg, Storage};
use poller::{HugepageMode, IdlePolicy, ReactorHandle, ReactorOptions, Reactors, TaskPool};

use coverage::{Coverage, Shape, shape};
use model::{Model, Outcome};
use workload::{Layout, Profile, SIZE, WORKERS};

/// Seeds run by default.
const DEFAULT_TRIALS: u64 = 2000;
/// Seeds that failed before a fix: always run, whatever `CRASH_TRIALS` says. They
/// replay their scenario only while the trial's construction stays the same; a change
/// to it should find new ones (revert the fix, run the campaign).
const REGRESSION_SEEDS: &[u64] = &[
    // An L2 table copied on write (shared with an internal snapshot) switched its L1
    // entry in memory before its cached slices were told their new home, across an
    // await: a flush in between wrote a slice over the snapshot's table.
    28, 373, 1428, 1904, 3623, 3830, 3934, 4011, 4749, 5195, 5951, 6738, 7776, 9230, 9617,
    // A clean shutdown left the refcount decrements of the frees its last flush round
    // applied in the cache: leaked clusters (and, with lazy refcounts, a cleared dirty
    // bit over stale refcounts).
    85, 140, 163, 201,
];
/// Seeds that failed before a fix, replayed with the shards their seed gives them.
const SHARDED_REGRESSION_SEEDS: &[u64] = &[
    // A request used a new L2 table whose L1 entry was set in memory while its disk
    // write was in flight: its FUA flush passed before that write, and the power cut
    // lost the acknowledged data (2 shards).
    2533,
];
/// Runs at least this long must cover every counted operation.
const COVERAGE_MIN_TRIALS: usize = 500;

/// What every trial shares.
pub struct Env {
    pub owner: ReactorHandle,
    /// The lane's reactors (the first is `owner`); a trial's image has a shard on each
    /// of the first `shards`.
    pub reactors: Vec<ReactorHandle>,
    pub shards: Cell<usize>,
    /// Where image files go (tmpfs when there is one).
    pub dir: PathBuf,
    pub have_qemu: bool,
    /// Image files written so far (for unique names).
    pub files: Cell<u64>,
}

/// Opens the image on `disk` as the appliance would.
pub fn open(disk: Arc<SimDisk>, env: &Env, name: &str) -> Arc<Qcow2Device> {
    open_with(disk, None, env, name)
}

/// Opens the image on `disk`, its external data file (if any) on `data`.
pub fn open_with(
    disk: Arc<SimDisk>,
    data: Option<Arc<SimDisk>>,
    env: &Env,
    name: &str,
) -> Arc<Qcow2Device> {
    let opts = OpenOptions {
        engine: EngineKind::IoUring,
        direct: false,
        read_only: false,
        allowed_backing_dirs: vec![],
        l2_cache_bytes: Some(64 << 10),
        refcount_cache_bytes: Some(16 << 10),
        storage: Some(Storage::sim(disk)),
        data_storage: data.map(Storage::sim),
        zero_hop: true,
        locking: true,
        encryption_key: None,
    };
    Qcow2Device::open(Path::new(name), opts, &env.reactors[..env.shards.get()])
        .unwrap_or_else(|e| panic!("{name}: open failed: {e}"))
}

/// A `qemu-img check` of a copy of an image, running while the trial goes on.
pub struct QemuCheck {
    child: Option<std::process::Child>,
    path: PathBuf,
    ctx: String,
}

impl QemuCheck {
    /// Waits for the check; panics if it found corruption (leaks are allowed).
    pub fn finish(mut self) {
        let child = self.child.take().expect("a running check");
        let out = child.wait_with_output().expect("qemu-img check");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{}: qemu-img check output: {e}: {}",
                self.ctx,
                String::from_utf8_lossy(&out.stderr)
            )
        });
        let bad = v["corruptions"].as_u64().unwrap_or(0) + v["check-errors"].as_u64().unwrap_or(0);
        assert_eq!(bad, 0, "{}: qemu-img check finds corruption: {v}", self.ctx);
    }
}

impl Drop for QemuCheck {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// How clean an image must check.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Clean {
    /// No corruption; leaks are allowed (after a power cut).
    NoCorruption,
    /// No corruption and no leaks (after a clean shutdown).
    NoLeaks,
}

/// Our check finds `image` as clean as `want`; with `qemu` (and qemu-img installed),
/// also starts `qemu-img check` on it (no corruption), to be finished later.
pub fn check_clean(
    image: &[u8],
    data: Option<(&Path, &[u8])>,
    env: &Env,
    ctx: &str,
    want: Clean,
    qemu: bool,
) -> Option<QemuCheck> {
    // The image names its data file by this path: qemu-img reads it there.
    if let Some((path, bytes)) = data {
        std::fs::write(path, bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }
    let n = env.files.get();
    env.files.set(n + 1);
    let path = env.dir.join(format!("check{n}.qcow2"));
    std::fs::write(&path, image).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let report = check_io(&path, &file, Repair::None, &mut |_, _| {})
        .unwrap_or_else(|e| panic!("{ctx}: check could not run: {e}"));
    assert_eq!(report.corruptions, 0, "{ctx}: corruption: {:?}", report.messages);
    if want == Clean::NoLeaks {
        assert_eq!(report.leaks, 0, "{ctx}: leaks after a clean shutdown: {:?}", report.messages);
    }
    let child = (qemu && env.have_qemu).then(|| {
        std::process::Command::new("qemu-img")
            .args(["check", "--output=json"])
            .arg(&path)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("qemu-img")
    });
    let check = QemuCheck { child, path, ctx: ctx.to_string() };
    check.child.is_some().then_some(check)
}

/// A trial's files: the image and, for an image with an external data file, that file
/// (at the path the image names it by).
pub struct Files {
    pub image: Vec<u8>,
    pub data: Option<(PathBuf, Vec<u8>)>,
}

impl Files {
    /// The files on simulated disks sharing one power supply (cut after `cut`).
    fn disks(self, seed: u64, cut: Option<u64>) -> (Arc<SimDisk>, Option<Arc<SimDisk>>) {
        let disk = Arc::new(SimDisk::new(self.image, seed, cut));
        let data =
            self.data.map(|(_, d)| Arc::new(SimDisk::on_power_of(d, seed ^ 0xda7a, disk.clone())));
        (disk, data)
    }

    fn data_ref(&self) -> Option<(&Path, &[u8])> {
        self.data.as_ref().map(|(p, d)| (p.as_path(), d.as_slice()))
    }
}

/// The image a trial starts from, its guest content, and where the prefill wrote.
fn aged_image(seed: u64, p: &Profile, env: &Env) -> (Files, Vec<u8>, Layout) {
    let path = env.dir.join(format!("seed{seed}.qcow2"));
    let fresh = workload::create_image(p, &path);
    if p.prefill_to == 0 {
        return (fresh, vec![0u8; SIZE as usize], Layout { extents: vec![Vec::new(); WORKERS] });
    }
    let data_path = fresh.data.as_ref().map(|(p, _)| p.clone());
    let (disk, data) = fresh.disks(seed, None);
    let dev = open_with(disk.clone(), data.clone(), env, "sim-prefill.qcow2");
    let (d, dk, pp) = (dev.clone(), disk.clone(), p.clone());
    let (content, layout) =
        env.owner.block_on(move || async move { workload::prefill(d, dk, pp, seed).await });
    dev.close().unwrap_or_else(|e| panic!("seed {seed}: closing after the prefill: {e}"));
    let image = disk.current();
    let image = if p.snapshot { workload::snapshot(image, &path) } else { image };
    let data = data_path.zip(data.map(|d| d.current()));
    (Files { image, data }, content, layout)
}

/// Runs the workers until they finish or the power is cut; closes the image.
/// Also returns the requests served on the zero-hop path.
fn run_workers(
    (disk, data): (&Arc<SimDisk>, Option<Arc<SimDisk>>),
    layout: Layout,
    env: &Env,
    seed: u64,
    p: &Profile,
) -> (Model, u64) {
    let dev = open_with(disk.clone(), data, env, &format!("sim-{seed}.qcow2"));
    let (d, cluster, unit) = (dev.clone(), p.cluster, p.discard_unit());
    // Images with an external data file hold no compressed clusters.
    let compress = p.data_file.is_none();
    let model = env.owner.block_on(move || async move {
        let model = Rc::new(RefCell::new(Model::new(WORKERS)));
        let layout = Rc::new(layout);
        let pool = TaskPool::new(WORKERS as u32);
        for w in 0..WORKERS {
            let f = workload::worker(
                d.clone(),
                model.clone(),
                layout.clone(),
                w,
                seed,
                (cluster, unit, compress),
            );
            let _ = pool.spawn(f);
        }
        pool.drain().await;
        std::mem::replace(&mut *model.borrow_mut(), Model::new(0))
    });
    let zero_hop = dev.zero_hop_ios();
    // After a cut the close fails; without one, it is the clean shutdown.
    let closed = dev.close();
    assert!(closed.is_ok() || disk.is_cut(), "seed {seed}: close failed: {closed:?}");
    (model, zero_hop)
}

/// Opens the crashed image (repairing a dirty lazy-refcounts image), reads it whole
/// and closes it. Returns the content and the image after the clean close.
fn read_back(crash: Files, env: &Env, ctx: &str) -> (Vec<u8>, Files) {
    let data_path = crash.data.as_ref().map(|(p, _)| p.clone());
    let (disk, data) = crash.disks(1, None);
    let dev = open_with(disk.clone(), data.clone(), env, "sim-reopened.qcow2");
    let d = dev.clone();
    let content = env.owner.block_on(move || async move {
        let ch = d.channel().expect("channel");
        let mut buf = vec![0u8; SIZE as usize];
        ch.read(0, &[IoSeg::new(&mut buf)]).await.map(|()| buf)
    });
    let content = content.unwrap_or_else(|e| panic!("{ctx}: reading the crashed image: {e}"));
    dev.close().unwrap_or_else(|e| panic!("{ctx}: closing the reopened image: {e}"));
    (content, Files { image: disk.current(), data: data_path.zip(data.map(|d| d.current())) })
}

/// With `CRASH_DUMP=dir`, keeps a trial's images there (for `qemu-img` and a debugger).
fn dump(seed: u64, what: &str, image: &[u8]) {
    if let Ok(dir) = std::env::var("CRASH_DUMP") {
        let path = Path::new(&dir).join(format!("seed{seed}-{what}.qcow2"));
        std::fs::write(&path, image).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}

/// One trial; returns what it covered.
fn trial(seed: u64, env: &Env) -> Coverage {
    let mut p = Profile::new(seed, env.have_qemu);
    if REGRESSION_SEEDS.contains(&seed) || SHARDED_REGRESSION_SEEDS.contains(&seed) {
        // Their scenarios predate these choices.
        (p.extended_l2, p.data_file) = (false, None);
    }
    // The regression seeds replay their one-shard scenarios.
    let shards = if REGRESSION_SEEDS.contains(&seed) { 1 } else { [1, 2, 4][(seed % 3) as usize] };
    env.shards.set(shards);
    let ctx = format!("seed {seed} ({}, {shards} shards)", p.describe());
    let (files, initial, layout) = aged_image(seed, &p, env);
    let before = shape(&files.image);
    dump(seed, "initial", &files.image);
    let data_path = files.data.as_ref().map(|(p, _)| p.clone());
    let (disk, data) = files.disks(seed, Some(p.cut_after));
    let (model, zero_hop) = run_workers((&disk, data.clone()), layout, env, seed, &p);
    let crash = Files {
        image: disk.crash_image(seed ^ 0xc0ffee),
        data: data_path.zip(data.map(|d| d.crash_image(seed ^ 0xda7a_c0ffee))),
    };
    let mut qemu = check_crash_image(&disk, &crash, &model, &p, seed, env, &ctx);
    let mut cov =
        coverage_of(&model, &p, &disk, [&before, &shape(&disk.current()), &shape(&crash.image)]);
    cov.shards2 = u64::from(shards == 2);
    cov.shards4 = u64::from(shards == 4);
    cov.zero_hop = u64::from(zero_hop > 0);
    let (content, final_files) = read_back(crash, env, &ctx);
    dump(seed, "reopened", &final_files.image);
    model.verify(&initial, &content).unwrap_or_else(|e| panic!("{ctx}: {e}"));
    let ctx2 = format!("{ctx}: after reopening");
    if final_files.data.is_some() {
        // The data file's path is the trial's: the crash image's check reads it first.
        qemu.drain(..).for_each(QemuCheck::finish);
    }
    let data = final_files.data_ref();
    qemu.extend(check_clean(&final_files.image, data, env, &ctx2, Clean::NoCorruption, p.lazy));
    if p.resize {
        resize::run(seed, final_files.image, &content, env, &ctx, &mut cov);
    }
    qemu.into_iter().for_each(QemuCheck::finish);
    cov
}

/// Checks what the disks hold after the cut (leaks allowed, none after a clean
/// shutdown; a dirty lazy-refcounts image is checked after its repair instead).
fn check_crash_image(
    disk: &SimDisk,
    crash: &Files,
    model: &Model,
    p: &Profile,
    seed: u64,
    env: &Env,
    ctx: &str,
) -> Vec<QemuCheck> {
    let failed = model.flush_failures > 0
        || model.ops.iter().flatten().any(|o| o.outcome == Outcome::Failed);
    assert!(!failed || disk.is_cut(), "{ctx}: a request failed with the power on");
    dump(seed, "crash", &crash.image);
    // Without a cut, the workers' close was a clean shutdown.
    let want = if disk.is_cut() { Clean::NoCorruption } else { Clean::NoLeaks };
    let mut qemu = Vec::new();
    if !p.lazy || want == Clean::NoLeaks {
        let ctx = format!("{ctx}: after the crash");
        qemu.extend(check_clean(&crash.image, crash.data_ref(), env, &ctx, want, true));
    }
    qemu
}

/// One trial's coverage; `shapes` are the image before the workers, when the power
/// went, and after the crash.
fn coverage_of(model: &Model, p: &Profile, disk: &SimDisk, shapes: [&Shape; 3]) -> Coverage {
    let mut cov = Coverage { trials: 1, ..Default::default() };
    cov.requests(model);
    cov.structures(shapes[0], shapes[1], shapes[2]);
    cov.cut = u64::from(disk.is_cut());
    cov.lazy = u64::from(p.lazy);
    cov.v2 = u64::from(p.version == 2);
    cov.snapshot = u64::from(p.snapshot);
    cov.extended_l2 = u64::from(p.extended_l2);
    cov.data_file = u64::from(p.data_file.is_some());
    cov.data_file_raw = u64::from(p.data_file == Some(true));
    cov
}

fn seeds() -> Vec<u64> {
    if let Ok(s) = std::env::var("CRASH_SEED") {
        return vec![s.parse().expect("CRASH_SEED must be a number")];
    }
    let n = std::env::var("CRASH_TRIALS")
        .map(|v| v.parse().expect("CRASH_TRIALS must be a number"))
        .unwrap_or(DEFAULT_TRIALS);
    let mut seeds: Vec<u64> = (1..=n).collect();
    seeds.extend(REGRESSION_SEEDS.iter().chain(SHARDED_REGRESSION_SEEDS).filter(|&&s| s > n));
    seeds.sort_unstable();
    seeds.dedup();
    seeds
}

/// Trials run side by side: `CRASH_THREADS`, else up to 2 (each lane is a thread and a
/// reactor, both mostly busy).
fn lanes(trials: usize) -> usize {
    let default = std::thread::available_parallelism().map_or(1, |n| n.get().min(2));
    let n = std::env::var("CRASH_THREADS")
        .map(|v| v.parse().expect("CRASH_THREADS must be a number"))
        .unwrap_or(default);
    n.clamp(1, trials.max(1))
}

/// Reactors for each lane (adaptive: they sleep while their lane checks images).
const REACTORS_PER_LANE: usize = 4;

fn start_reactors(lanes: usize) -> Reactors {
    Reactors::start(ReactorOptions {
        cores: (0..lanes * REACTORS_PER_LANE).collect(),
        idle: IdlePolicy::adaptive(),
        hugepages: HugepageMode::Off,
        dma_pool_bytes: 32 << 20,
        pin: false,
    })
    .expect("reactors")
}

type Panic = Box<dyn std::any::Any + Send>;

/// What the lanes found.
#[derive(Default)]
struct Results {
    cov: Coverage,
    failed: Vec<u64>,
    first_panic: Option<Panic>,
}

/// Shared by the lanes: the next seed to run, and whether to stop.
struct Queue<'a> {
    seeds: &'a [u64],
    next: AtomicUsize,
    stop: AtomicBool,
    keep_going: bool,
    results: Mutex<Results>,
}

/// A lane: takes seeds until none are left (or a failure stops the run).
fn lane(q: &Queue<'_>, env: &Env) {
    while !q.stop.load(SeqCst) {
        let Some(&seed) = q.seeds.get(q.next.fetch_add(1, SeqCst)) else { return };
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| trial(seed, env)));
        let mut res = q.results.lock().unwrap_or_else(|p| p.into_inner());
        match r {
            Ok(c) => res.cov.add(&c),
            Err(e) => {
                eprintln!("crash trial failed: rerun with CRASH_SEED={seed}");
                res.failed.push(seed);
                res.first_panic.get_or_insert(e);
                q.stop.store(!q.keep_going, SeqCst);
            }
        }
    }
}

/// Runs `seeds` on `n` lanes, each with its own reactor and file directory.
fn run_all(seeds: &[u64], n: usize, dir: &Path, keep_going: bool, have_qemu: bool) -> Results {
    let reactors = start_reactors(n);
    let q = Queue {
        seeds,
        next: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
        keep_going,
        results: Mutex::default(),
    };
    std::thread::scope(|s| {
        for (i, lane_reactors) in reactors.handles().chunks(REACTORS_PER_LANE).enumerate() {
            let dir = dir.join(format!("lane{i}"));
            std::fs::create_dir_all(&dir).expect("lane directory");
            let env = Env {
                owner: lane_reactors[0].clone(),
                reactors: lane_reactors.to_vec(),
                shards: Cell::new(1),
                dir,
                have_qemu,
                files: Cell::new(0),
            };
            let q = &q;
            s.spawn(move || lane(q, &env));
        }
    });
    reactors.stop();
    let mut r = q.results.into_inner().unwrap_or_else(|p| p.into_inner());
    r.failed.sort_unstable();
    r
}

#[test]
fn power_loss_never_corrupts_and_keeps_durable_writes() {
    // Images are written for qemu-img: into memory when there is a tmpfs.
    let shm = Path::new("/dev/shm");
    let dir = if shm.is_dir() { tempfile::tempdir_in(shm) } else { tempfile::tempdir() };
    let dir = dir.expect("temporary directory");
    let have_qemu = std::process::Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have_qemu {
        eprintln!("crash: qemu-img not found; only our own check runs, and no snapshot trials");
    }
    let keep_going = std::env::var("CRASH_KEEP_GOING").is_ok_and(|v| v != "0" && !v.is_empty());
    let seeds = seeds();
    let n = lanes(seeds.len());
    let started = Instant::now();
    let r = run_all(&seeds, n, dir.path(), keep_going, have_qemu);
    let list: Vec<String> = r.failed.iter().map(u64::to_string).collect();
    eprintln!(
        "crash: {} trials run, {} failed (seeds: [{}]), {:.1} s on {n} lane(s); coverage:\n{}",
        r.cov.trials as usize + r.failed.len(),
        r.failed.len(),
        list.join(", "),
        started.elapsed().as_secs_f64(),
        r.cov.report()
    );
    if let Some(e) = r.first_panic {
        if !keep_going {
            std::panic::resume_unwind(e);
        }
        panic!("{} crash trials failed, seeds: {}", r.failed.len(), list.join(" "));
    }
    if seeds.len() >= COVERAGE_MIN_TRIALS {
        r.cov.assert_everything_covered();
    }
}
