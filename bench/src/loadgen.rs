//! A bdevperf-style load generator: block I/O straight into a [`drivers::Bdev`] from
//! tasks on the appliance's reactors, with no protocol in between.
//!
//! Each reactor opens its own channel and runs `qd` worker tasks in a [`TaskPool`]; a
//! worker owns one DMA buffer and loops: pick an offset, submit, await, record the
//! latency in the reactor's HDR histogram. Workers stop at the deadline (or when the
//! reactor's share of `--ios` is used up). At the end each reactor reports its I/O
//! count, histogram and thread CPU time (`CLOCK_THREAD_CPUTIME_ID`, read on the
//! reactor), and the control thread adds the process CPU time (`getrusage`, which also
//! counts io_uring's kernel workers).

use std::cell::{Cell, RefCell};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use drivers::{Bdev, BdevChannel, IoSeg};
use hdrhistogram::Histogram;
use poller::{HugepageMode, IdlePolicy, ReactorOptions, Reactors, TaskPool, dma};
use serde::Serialize;

/// What the load goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Completes at once without touching memory: the ceiling of the stack.
    Null,
    /// A RAM disk.
    Mem,
    Raw(PathBuf),
    Qcow2(PathBuf),
    /// A qcow2 image (64 KiB clusters) of `--size` on in-memory storage: the format
    /// driver's cost and its cross-core traffic, without the kernel (as SPDK measures
    /// bdevs on malloc).
    Qcow2Mem,
}

impl std::str::FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "null" => Ok(Target::Null),
            "mem" => Ok(Target::Mem),
            "qcow2-mem" => Ok(Target::Qcow2Mem),
            _ => match s.split_once(':') {
                Some(("raw", p)) if !p.is_empty() => Ok(Target::Raw(p.into())),
                Some(("qcow2", p)) if !p.is_empty() => Ok(Target::Qcow2(p.into())),
                _ => Err(format!(
                    "target {s:?}: expected null, mem, qcow2-mem, raw:PATH or qcow2:PATH"
                )),
            },
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Null => write!(f, "null"),
            Target::Mem => write!(f, "mem"),
            Target::Qcow2Mem => write!(f, "qcow2-mem"),
            Target::Raw(p) => write!(f, "raw:{}", p.display()),
            Target::Qcow2(p) => write!(f, "qcow2:{}", p.display()),
        }
    }
}

/// The access pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    Randread,
    Randwrite,
    Read,
    Write,
    /// Random reads and writes, `rwmixread` percent reads.
    Randrw,
}

impl Workload {
    fn random(self) -> bool {
        matches!(self, Workload::Randread | Workload::Randwrite | Workload::Randrw)
    }
    fn name(self) -> &'static str {
        match self {
            Workload::Randread => "randread",
            Workload::Randwrite => "randwrite",
            Workload::Read => "read",
            Workload::Write => "write",
            Workload::Randrw => "randrw",
        }
    }
}

/// The I/O engine under file targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
pub enum EngineArg {
    #[value(name = "io_uring")]
    #[serde(rename = "io_uring")]
    IoUring,
    #[value(name = "aio")]
    #[serde(rename = "aio")]
    Aio,
    /// NVMe passthrough on a generic character device (`raw:/dev/ngXnY`).
    #[value(name = "nvme_uring")]
    #[serde(rename = "nvme_uring")]
    NvmeUring,
    /// The userspace NVMe driver over VFIO (`raw:pci:0000:00:04.0[/ns=N]`).
    #[value(name = "nvme")]
    #[serde(rename = "nvme")]
    Nvme,
}

/// A complete run description.
#[derive(Debug, Clone)]
pub struct Options {
    pub target: Target,
    pub engine: EngineArg,
    pub workload: Workload,
    /// Percent of reads for `randrw`.
    pub rwmixread: u32,
    pub bs: usize,
    /// I/Os in flight per reactor.
    pub qd: u32,
    /// One reactor per core.
    pub cores: Vec<usize>,
    /// Run for this long (after `warmup`), unless `ios` is set.
    pub duration: Duration,
    /// Stop after this many I/Os in total (split across reactors).
    pub ios: Option<u64>,
    /// Unmeasured run before the measured one.
    pub warmup: Duration,
    /// Size of `null` and `mem` devices.
    pub size: u64,
    pub direct: bool,
    pub idle: IdlePolicy,
    pub pin: bool,
    /// Print a progress line each second on stderr.
    pub progress: bool,
    /// Write every cluster before the measured run (allocated clusters, not holes).
    pub prefill: bool,
    /// qcow2: every request takes the hop to the owning shard (no zero-hop path), to
    /// measure what the hop costs.
    pub hop: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            target: Target::Null,
            engine: EngineArg::IoUring,
            workload: Workload::Randread,
            rwmixread: 70,
            bs: 4096,
            qd: 32,
            cores: vec![0],
            duration: Duration::from_secs(5),
            ios: None,
            warmup: Duration::ZERO,
            size: 1 << 30,
            direct: true,
            idle: IdlePolicy::Busy,
            pin: true,
            progress: false,
            prefill: false,
            hop: false,
        }
    }
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub mean_us: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Latency {
        let us = |ns: u64| ns as f64 / 1000.0;
        if h.is_empty() {
            return Latency { mean_us: 0.0, p50_us: 0.0, p99_us: 0.0, p999_us: 0.0, max_us: 0.0 };
        }
        Latency {
            mean_us: h.mean() / 1000.0,
            p50_us: us(h.value_at_quantile(0.50)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
        }
    }
}

/// One reactor's share of the result.
#[derive(Debug, Clone, Serialize)]
pub struct ReactorReport {
    pub index: usize,
    pub core: usize,
    pub ios: u64,
    pub elapsed_s: f64,
    pub iops: f64,
    /// CPU time of the reactor thread during the measured run.
    pub cpu_s: f64,
    pub cpu_ns_per_io: f64,
}

/// The result of a run (also the `--json` output).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub tool: &'static str,
    pub target: String,
    pub engine: EngineArg,
    pub workload: Workload,
    pub rwmixread: Option<u32>,
    pub bs: usize,
    pub qd_per_reactor: u32,
    pub reactors: usize,
    pub cores: Vec<usize>,
    pub idle: String,
    pub device_size: u64,
    pub elapsed_s: f64,
    pub ios: u64,
    pub reads: u64,
    pub writes: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub iops: f64,
    pub mib_s: f64,
    pub latency: Latency,
    /// CPU time of all reactor threads during the measured run.
    pub reactor_cpu_s: f64,
    pub reactor_cpu_ns_per_io: f64,
    /// CPU time of the whole process (reactors, io_uring workers, control thread).
    pub process_cpu_s: f64,
    pub process_cpu_ns_per_io: f64,
    pub per_reactor: Vec<ReactorReport>,
}

/// What every worker of a reactor shares.
struct Shared {
    ch: BdevChannel,
    workload: Workload,
    rwmixread: u32,
    bs: u64,
    /// Random offsets: blocks of the device; sequential: the reactor's region.
    region_start: u64,
    region_blocks: u64,
    cursor: Cell<u64>,
    deadline: Cell<Instant>,
    /// I/Os this reactor may still start (`u64::MAX`: unlimited).
    tickets: Cell<u64>,
    record: Cell<bool>,
    hist: RefCell<Histogram<u64>>,
    ios: Cell<u64>,
    reads: Cell<u64>,
    writes: Cell<u64>,
    errors: Cell<u64>,
    first_error: RefCell<Option<String>>,
    live: Arc<AtomicU64>,
}

impl Shared {
    /// Whether a worker may start another I/O at `now`.
    fn take_ticket(&self, now: Instant) -> bool {
        let t = self.tickets.get();
        if t == u64::MAX {
            return now < self.deadline.get();
        }
        if t == 0 {
            return false;
        }
        self.tickets.set(t - 1);
        true
    }

    fn next(&self, rng: &mut Rng) -> (u64, bool) {
        let block = if self.workload.random() {
            rng.below(self.region_blocks)
        } else {
            let c = self.cursor.get();
            self.cursor.set(if c + 1 >= self.region_blocks { 0 } else { c + 1 });
            c
        };
        let read = match self.workload {
            Workload::Randread | Workload::Read => true,
            Workload::Randwrite | Workload::Write => false,
            Workload::Randrw => rng.below(100) < u64::from(self.rwmixread),
        };
        (self.region_start + block * self.bs, read)
    }

    fn complete(&self, lat_ns: u64, read: bool, r: Result<(), drivers::IoError>) {
        if !self.record.get() {
            return;
        }
        match r {
            Ok(()) => {
                self.hist.borrow_mut().saturating_record(lat_ns.max(1));
                self.ios.set(self.ios.get() + 1);
                if read {
                    self.reads.set(self.reads.get() + 1);
                } else {
                    self.writes.set(self.writes.get() + 1);
                }
                // Single writer: a relaxed store, never a locked read-modify-write.
                self.live.store(self.ios.get(), Ordering::Relaxed);
            }
            Err(e) => {
                self.errors.set(self.errors.get() + 1);
                let mut first = self.first_error.borrow_mut();
                if first.is_none() {
                    *first = Some(format!("{e:?}"));
                }
            }
        }
    }
}

/// xorshift64*: cheap, good enough to scatter offsets.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        // splitmix64 of the seed, so small seeds give unrelated streams.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng((z ^ (z >> 31)) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n.max(1))) >> 64) as u64
    }
}

/// I/Os a worker completes between yields.
const COOP_IOS: u32 = 16;

async fn worker(s: Rc<Shared>, seed: u64) {
    let mut buf = match dma::alloc_wait(s.bs as usize).await {
        Ok(b) => b,
        Err(e) => {
            s.errors.set(s.errors.get() + 1);
            s.first_error.borrow_mut().get_or_insert_with(|| format!("DMA buffer: {e:?}"));
            return;
        }
    };
    buf.set_len(s.bs as usize);
    for (i, b) in buf.as_mut_slice().iter_mut().enumerate() {
        *b = (i as u64 ^ seed) as u8 | 1;
    }
    let mut rng = Rng::new(seed);
    let mut now = Instant::now();
    let mut n = 0u32;
    while s.take_ticket(now) {
        // Storage that completes at once (memory, and qcow2's zero-hop path over it)
        // never makes a worker wait: yield now and then so the other workers, and the
        // reactor's mailboxes (other reactors' calls to this one's shard), get a turn.
        n = n.wrapping_add(1);
        if n.is_multiple_of(COOP_IOS) {
            poller::yield_now().await;
        }
        let (off, read) = s.next(&mut rng);
        let r = if read {
            s.ch.read(off, &[IoSeg::from_dma(&mut buf)]).await
        } else {
            s.ch.write(off, &[IoSeg::from_dma(&mut buf)], false).await
        };
        let end = Instant::now();
        s.complete(end.duration_since(now).as_nanos() as u64, read, r);
        now = end;
    }
}

/// CPU time of the calling thread.
pub fn thread_cpu_time() -> Duration {
    clock(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// CPU time of the whole process (every thread, including io_uring's workers).
pub fn process_cpu_time() -> Duration {
    clock(libc::CLOCK_PROCESS_CPUTIME_ID)
}

fn clock(id: libc::clockid_t) -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec into the valid, exclusively borrowed `ts`.
    let rc = unsafe { libc::clock_gettime(id, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// What one reactor sends back to the control thread.
struct ReactorResult {
    index: usize,
    ios: u64,
    reads: u64,
    writes: u64,
    errors: u64,
    first_error: Option<String>,
    elapsed: Duration,
    cpu: Duration,
    hist: Histogram<u64>,
}

struct JobCfg {
    workload: Workload,
    rwmixread: u32,
    bs: u64,
    qd: u32,
    duration: Duration,
    warmup: Duration,
    tickets: Option<u64>,
    reactors: usize,
}

fn new_hist() -> Histogram<u64> {
    // 1 ns .. 100 s at 3 significant digits.
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("histogram bounds")
}

async fn run_phase(s: &Rc<Shared>, qd: u32, index: usize, phase: u64) {
    let pool = TaskPool::new(qd);
    for w in 0..qd {
        let seed = (index as u64) << 40 | phase << 32 | u64::from(w);
        if pool.spawn(worker(s.clone(), seed)).is_err() {
            unreachable!("the pool has room for every worker");
        }
    }
    pool.drain().await;
}

async fn reactor_job(
    bdev: Arc<Bdev>,
    cfg: Arc<JobCfg>,
    index: usize,
    live: Arc<AtomicU64>,
) -> Result<ReactorResult, String> {
    let ch = bdev.channel().map_err(|e| format!("channel: {e:?}"))?;
    let size = bdev.info().size;
    let blocks = size / cfg.bs;
    if blocks == 0 {
        return Err(format!("device of {size} bytes is smaller than one block"));
    }
    let (region_start, region_blocks) = if cfg.workload.random() {
        (0, blocks)
    } else {
        let per = (blocks / cfg.reactors as u64).max(1);
        ((index as u64 * per).min(blocks - 1) * cfg.bs, per.min(blocks))
    };
    let s = Rc::new(Shared {
        ch,
        workload: cfg.workload,
        rwmixread: cfg.rwmixread,
        bs: cfg.bs,
        region_start,
        region_blocks,
        cursor: Cell::new(0),
        deadline: Cell::new(Instant::now() + cfg.warmup),
        tickets: Cell::new(u64::MAX),
        record: Cell::new(false),
        hist: RefCell::new(new_hist()),
        ios: Cell::new(0),
        reads: Cell::new(0),
        writes: Cell::new(0),
        errors: Cell::new(0),
        first_error: RefCell::new(None),
        live,
    });
    if !cfg.warmup.is_zero() {
        run_phase(&s, cfg.qd, index, 0).await;
    }
    s.record.set(true);
    s.tickets.set(cfg.tickets.unwrap_or(u64::MAX));
    let cpu0 = thread_cpu_time();
    let t0 = Instant::now();
    s.deadline.set(t0 + cfg.duration);
    run_phase(&s, cfg.qd, index, 1).await;
    let elapsed = t0.elapsed();
    let cpu = thread_cpu_time().saturating_sub(cpu0);
    let hist = s.hist.replace(new_hist());
    Ok(ReactorResult {
        index,
        ios: s.ios.get(),
        reads: s.reads.get(),
        writes: s.writes.get(),
        errors: s.errors.get(),
        first_error: s.first_error.borrow_mut().take(),
        elapsed,
        cpu,
        hist,
    })
}

fn disk_config(o: &Options) -> Result<config::Disk, String> {
    let mut body = String::from("name = \"loadgen\"\n");
    match &o.target {
        Target::Qcow2Mem => unreachable!("qcow2-mem is opened by `open_qcow2_mem`"),
        Target::Null | Target::Mem => {
            let driver = if o.target == Target::Null { "null" } else { "mem" };
            body += &format!("driver = \"{driver}\"\nsize = {}\n", o.size);
        }
        Target::Raw(p) | Target::Qcow2(p) => {
            let format = if matches!(o.target, Target::Qcow2(_)) { "qcow2" } else { "raw" };
            let driver = match o.engine {
                EngineArg::IoUring => "io_uring",
                EngineArg::Aio => "aio",
                EngineArg::NvmeUring => "nvme_uring",
                EngineArg::Nvme => "nvme",
            };
            let abs = match o.engine {
                EngineArg::Nvme => p.clone(),
                _ => std::path::absolute(p).unwrap_or_else(|_| p.clone()),
            };
            body += &format!(
                "path = {}\nformat = \"{format}\"\ndriver = \"{driver}\"\ndirect = {}\n",
                crate::toml_str(&abs.to_string_lossy()),
                o.direct
            );
        }
    }
    let read_only = matches!(o.workload, Workload::Randread | Workload::Read) && !o.prefill;
    body += &format!("read_only = {read_only}\n");
    crate::disk_from_toml(&body)
}

fn idle_name(p: IdlePolicy) -> String {
    match p {
        IdlePolicy::Busy => "busy".into(),
        IdlePolicy::Adaptive { spin } => format!("adaptive({}us)", spin.as_micros()),
    }
}

/// Runs the load described by `o` and returns its report.
pub fn run(o: &Options) -> Result<Report, String> {
    if o.cores.is_empty() {
        return Err("no cores".into());
    }
    if o.qd == 0 || o.bs == 0 {
        return Err("qd and bs must be positive".into());
    }
    if o.rwmixread > 100 {
        return Err("rwmixread is a percentage".into());
    }
    let max_buf = (o.bs * o.qd as usize).next_power_of_two();
    let reactors = Reactors::start(ReactorOptions {
        cores: o.cores.clone(),
        idle: o.idle,
        hugepages: HugepageMode::Auto,
        dma_pool_bytes: (128usize << 20).max(max_buf * 8),
        pin: o.pin,
    })
    .map_err(|e| format!("starting reactors: {e}"))?;
    let result = run_on(o, &reactors);
    reactors.stop();
    result
}

/// A fresh qcow2 image of `o.size` in memory, with a shard on every reactor. The
/// memory is reserved, not touched: each shard allocates in its own groups (2 GiB of
/// host space each with 64 KiB clusters), so host offsets reach past the guest size.
fn open_qcow2_mem(o: &Options, handles: &[poller::ReactorHandle]) -> Result<Arc<Bdev>, String> {
    use drivers::qcow2::create::{CreateOptions, create};
    use drivers::qcow2::{OpenOptions, Qcow2Driver};
    let path = std::env::temp_dir().join(format!("loadgen-{}.qcow2", std::process::id()));
    let made = create(&path, &CreateOptions { size: o.size, ..CreateOptions::default() });
    let bytes = std::fs::read(&path);
    let _ = std::fs::remove_file(&path);
    made.map_err(|e| format!("creating the image: {e}"))?;
    let bytes = bytes.map_err(|e| format!("reading the image: {e}"))?;
    let n = handles.len() as u64;
    let mem_size = (2 * o.size + n * (4 << 30)).next_multiple_of(1 << 20);
    let storage = drivers::Storage::mem_file(mem_size).map_err(|e| format!("memory: {e}"))?;
    storage.write_sync(&bytes, 0).map_err(|e| format!("writing the image: {e}"))?;
    let read_only = matches!(o.workload, Workload::Randread | Workload::Read) && !o.prefill;
    let opts = OpenOptions {
        engine: drivers::EngineKind::IoUring,
        direct: false,
        read_only,
        allowed_backing_dirs: vec![],
        l2_cache_bytes: None,
        refcount_cache_bytes: None,
        storage: Some(storage),
        data_storage: None,
        zero_hop: !o.hop,
        locking: true,
        encryption_key: None,
    };
    let driver = Qcow2Driver::open(Path::new("qcow2-mem"), opts, handles)
        .map_err(|e| format!("opening qcow2-mem: {e}"))?;
    Ok(Bdev::new("loadgen", Arc::new(driver), drivers::api::qos::QosLimits::default()))
}

/// Writes every cluster of the disk (1 MiB writes, 16 in flight, from every reactor
/// at once, each its own interleaved part), then flushes.
fn prefill(bdev: &Arc<Bdev>, handles: &[poller::ReactorHandle], size: u64) -> Result<(), String> {
    const CHUNK: u64 = 1 << 20;
    let n = handles.len() as u64;
    let (tx, rx) = mpsc::channel();
    for (i, h) in handles.iter().enumerate() {
        let (bdev, tx) = (bdev.clone(), tx.clone());
        h.spawn(move || async move {
            let r = async {
                let ch = Rc::new(bdev.channel().map_err(|e| format!("channel: {e:?}"))?);
                let failed = Rc::new(Cell::new(false));
                let pool = TaskPool::new(16);
                let mut off = i as u64 * CHUNK;
                while off < size {
                    while pool.is_full() {
                        pool.finished().await;
                    }
                    let (ch, failed, len) = (ch.clone(), failed.clone(), CHUNK.min(size - off));
                    let _ = pool.spawn(async move {
                        let Ok(mut buf) = dma::alloc_wait(len as usize).await else {
                            return failed.set(true);
                        };
                        buf.as_mut_slice().fill(0x5a);
                        if ch.write(off, &[IoSeg::from_dma(&mut buf)], false).await.is_err() {
                            failed.set(true);
                        }
                    });
                    off += n * CHUNK;
                }
                pool.drain().await;
                if failed.get() {
                    return Err("a prefill write failed".to_string());
                }
                ch.flush().await.map_err(|e| format!("prefill flush: {e:?}"))
            }
            .await;
            let _ = tx.send(r);
        });
    }
    drop(tx);
    rx.iter().collect::<Result<Vec<()>, String>>().map(|_| ())
}

fn run_on(o: &Options, reactors: &Reactors) -> Result<Report, String> {
    let handles = reactors.handles();
    let bdev = if o.target == Target::Qcow2Mem {
        open_qcow2_mem(o, handles)?
    } else {
        let disk = disk_config(o)?;
        Bdev::open(&disk, handles).map_err(|e| format!("opening {}: {e}", o.target))?
    };
    if o.prefill {
        prefill(&bdev, handles, bdev.info().size)?;
    }
    let n = handles.len();
    let cfg = Arc::new(JobCfg {
        workload: o.workload,
        rwmixread: o.rwmixread,
        bs: o.bs as u64,
        qd: o.qd,
        duration: o.duration,
        warmup: o.warmup,
        tickets: o.ios.map(|t| t.div_ceil(n as u64)),
        reactors: n,
    });
    let lives: Vec<Arc<AtomicU64>> = (0..n).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let (tx, rx) = mpsc::channel();
    let proc0 = process_cpu_time();
    for (i, h) in handles.iter().enumerate() {
        let (bdev, cfg, live, tx) = (bdev.clone(), cfg.clone(), lives[i].clone(), tx.clone());
        h.spawn(move || async move {
            let r = reactor_job(bdev, cfg, i, live).await;
            let _ = tx.send(r);
        });
    }
    drop(tx);
    let mut results: Vec<ReactorResult> = Vec::new();
    let mut first_err = None;
    let start = Instant::now();
    let mut last = (start, 0u64);
    let mut tick = 1u64;
    while results.len() + usize::from(first_err.is_some()) < n {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(Ok(r)) => results.push(r),
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if o.progress && start.elapsed() >= Duration::from_secs(tick) {
            let now = Instant::now();
            let done: u64 = lives.iter().map(|l| l.load(Ordering::Relaxed)).sum();
            let rate = (done - last.1) as f64 / now.duration_since(last.0).as_secs_f64();
            let mut e = std::io::stderr().lock();
            let _ = write!(
                e,
                "\r[{:>4}s] {:>10.0} IOPS {:>9.1} MiB/s   ",
                tick,
                rate,
                rate * o.bs as f64 / (1 << 20) as f64
            );
            let _ = e.flush();
            last = (now, done);
            tick += 1;
        }
    }
    if o.progress {
        eprintln!();
    }
    let process_cpu = process_cpu_time().saturating_sub(proc0);
    let close =
        if matches!(o.target, Target::Qcow2(_) | Target::Qcow2Mem) { bdev.close() } else { Ok(()) };
    if let Some(e) = first_err {
        return Err(e);
    }
    if let Err(e) = close {
        return Err(format!("closing {}: {e:?}", o.target));
    }
    results.sort_by_key(|r| r.index);
    let mut hist = new_hist();
    for r in &results {
        hist.add(&r.hist).map_err(|e| format!("merging histograms: {e:?}"))?;
    }
    let ios: u64 = results.iter().map(|r| r.ios).sum();
    let iops: f64 = results.iter().map(|r| r.ios as f64 / r.elapsed.as_secs_f64().max(1e-9)).sum();
    let elapsed = results.iter().map(|r| r.elapsed).max().unwrap_or_default();
    let reactor_cpu: Duration = results.iter().map(|r| r.cpu).sum();
    let per_io = |d: Duration| if ios == 0 { 0.0 } else { d.as_nanos() as f64 / ios as f64 };
    Ok(Report {
        tool: "loadgen",
        target: o.target.to_string(),
        engine: o.engine,
        workload: o.workload,
        rwmixread: (o.workload == Workload::Randrw).then_some(o.rwmixread),
        bs: o.bs,
        qd_per_reactor: o.qd,
        reactors: n,
        cores: o.cores.clone(),
        idle: idle_name(o.idle),
        device_size: bdev.info().size,
        elapsed_s: elapsed.as_secs_f64(),
        ios,
        reads: results.iter().map(|r| r.reads).sum(),
        writes: results.iter().map(|r| r.writes).sum(),
        errors: results.iter().map(|r| r.errors).sum(),
        first_error: results.iter().find_map(|r| r.first_error.clone()),
        iops,
        mib_s: iops * o.bs as f64 / (1 << 20) as f64,
        latency: Latency::of(&hist),
        reactor_cpu_s: reactor_cpu.as_secs_f64(),
        reactor_cpu_ns_per_io: per_io(reactor_cpu),
        process_cpu_s: process_cpu.as_secs_f64(),
        process_cpu_ns_per_io: per_io(process_cpu),
        per_reactor: results
            .iter()
            .map(|r| ReactorReport {
                index: r.index,
                core: o.cores[r.index],
                ios: r.ios,
                elapsed_s: r.elapsed.as_secs_f64(),
                iops: r.ios as f64 / r.elapsed.as_secs_f64().max(1e-9),
                cpu_s: r.cpu.as_secs_f64(),
                cpu_ns_per_io: if r.ios == 0 {
                    0.0
                } else {
                    r.cpu.as_nanos() as f64 / r.ios as f64
                },
            })
            .collect(),
    })
}

impl Report {
    /// The human-readable summary.
    pub fn text(&self) -> String {
        let mix = self.rwmixread.map(|m| format!(" ({m}% reads)")).unwrap_or_default();
        let l = &self.latency;
        let mut s = format!(
            "loadgen: {}{mix} bs={} qd={} x {} reactor(s) on cores {:?} ({}), target {} ({:?}), {:.2} s\n",
            self.workload.name(),
            crate::fmt_size(self.bs as u64),
            self.qd_per_reactor,
            self.reactors,
            self.cores,
            self.idle,
            self.target,
            self.engine,
            self.elapsed_s,
        );
        s += &format!("  IOPS        {:.0}\n", self.iops);
        s += &format!("  MiB/s       {:.1}\n", self.mib_s);
        s += &format!(
            "  latency us  mean {:.1}  p50 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}\n",
            l.mean_us, l.p50_us, l.p99_us, l.p999_us, l.max_us
        );
        s += &format!(
            "  CPU/IO      reactors {:.0} ns, process {:.0} ns  (reactor CPU {:.2} s, process {:.2} s)\n",
            self.reactor_cpu_ns_per_io,
            self.process_cpu_ns_per_io,
            self.reactor_cpu_s,
            self.process_cpu_s
        );
        s += &format!(
            "  I/Os        {} ({} reads, {} writes), {} errors",
            self.ios, self.reads, self.writes, self.errors
        );
        if let Some(e) = &self.first_error {
            s += &format!(" (first: {e})");
        }
        s.push('\n');
        s
    }
}
