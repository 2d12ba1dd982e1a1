//! Metrics: what every disk, export and reactor is doing, for Prometheus.
//!
//! Counting stays on the reactor that serves the request, in plain `Cell`s: no shared
//! atomic is touched per I/O. Each reactor publishes its counters twice a second into
//! per-reactor atomics (single writer, relaxed stores), and an exporter thread sums the
//! reactors' values into the `metrics` facade, which `metrics-exporter-prometheus`
//! serves over HTTP. Metrics cost nothing when `[metrics]` is absent: exports then get
//! no stats handle at all.
//!
//! Exported (labels `disk`, `export`, `op`, `reactor`, `state`):
//! - `appliance_disks{state="serving"|"failed"}` and `appliance_disk_up` (1 serving, 0
//!   failed to open) per disk;
//! - `appliance_ops_total`, `appliance_bytes_total`, `appliance_errors_total` by op;
//! - `appliance_in_flight` (gauge);
//! - `appliance_zero_copy_sends_total` (NBD reply sends without copying, per export)
//!   and `appliance_zero_copy_copied_total` (those the kernel copied anyway);
//! - `appliance_multishot_receives_total` (NBD receives that arrived through a
//!   connection's multishot receive, per export);
//! - `appliance_latency_seconds_bucket{le}` / `_sum` / `_count`, cumulative, per op;
//! - `appliance_reactor_busy_nanoseconds_total` (time in ticks that did work: the
//!   reactor's load, which its CPU time does not show while it polls),
//!   `appliance_reactor_busy_ticks_total`, `_idle_ticks_total`, `_sleeps_total`,
//!   `_tasks_polled_total`, `_messages_total` (control messages and cross-reactor
//!   wakes), and ring occupancy gauges `appliance_reactor_control_ring_entries`,
//!   `appliance_reactor_wake_ring_entries`;
//! - `appliance_job_offset_bytes`, `appliance_job_len_bytes` (progress) and
//!   `appliance_job_state{state}` (1 for the job's state, 0 for the others) per block
//!   job (labels `job`, `type`, `disk`);
//! - `appliance_qcow2_l2_cache_hits_total` / `_misses_total`, `..._refcount_cache_...`,
//!   `appliance_qcow2_clusters_allocated_total`.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use poller::ReactorHandle;

/// Request kinds counted separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read = 0,
    Write = 1,
    Flush = 2,
    Discard = 3,
    WriteZeroes = 4,
    Other = 5,
}

const OPS: usize = 6;
const OP_NAMES: [&str; OPS] = ["read", "write", "flush", "discard", "write_zeroes", "other"];
/// Latency bucket upper bounds: 2^k microseconds, k = 0..=22 (1 µs .. about 4 s), +Inf.
const BUCKETS: usize = 24;

fn bucket_of(d: Duration) -> usize {
    let us = d.as_micros() as u64;
    if us <= 1 { 0 } else { ((64 - (us - 1).leading_zeros()) as usize).min(BUCKETS - 1) }
}

fn bucket_bound_seconds(i: usize) -> Option<f64> {
    (i < BUCKETS - 1).then(|| (1u64 << i) as f64 / 1e6)
}

/// The values one reactor counts for one (disk, export).
#[derive(Default)]
struct Counters<T> {
    ops: [T; OPS],
    bytes: [T; OPS],
    errors: [T; OPS],
    lat_sum_ns: [T; OPS],
    lat: [[T; BUCKETS]; OPS],
    in_flight: T,
    /// NBD replies sent without copying, and those the kernel reported it copied anyway.
    zc_sends: T,
    zc_copied: T,
    /// NBD receives that came through a multishot receive.
    ms_receives: T,
}

/// Reactor-local counters of one (disk, export).
pub struct LocalStats {
    c: Counters<Cell<u64>>,
    shared: Arc<Counters<AtomicU64>>,
}

impl LocalStats {
    /// A request starts: returns its start time.
    pub fn start(&self) -> Instant {
        self.c.in_flight.set(self.c.in_flight.get() + 1);
        Instant::now()
    }

    /// A request ends.
    pub fn done(&self, op: Op, bytes: u64, ok: bool, started: Instant) {
        let i = op as usize;
        let d = started.elapsed();
        let add = |c: &Cell<u64>, v: u64| c.set(c.get().wrapping_add(v));
        add(&self.c.ops[i], 1);
        add(&self.c.bytes[i], bytes);
        if !ok {
            add(&self.c.errors[i], 1);
        }
        add(&self.c.lat_sum_ns[i], d.as_nanos() as u64);
        add(&self.c.lat[i][bucket_of(d)], 1);
        self.c.in_flight.set(self.c.in_flight.get().saturating_sub(1));
    }

    /// A zero-copy send went out.
    pub fn zero_copy_send(&self) {
        self.c.zc_sends.set(self.c.zc_sends.get().wrapping_add(1));
    }

    /// A zero-copy send's notification said the kernel copied it after all.
    pub fn zero_copy_copied(&self) {
        self.c.zc_copied.set(self.c.zc_copied.get().wrapping_add(1));
    }

    /// A receive arrived through a multishot receive.
    pub fn multishot_receive(&self) {
        self.c.ms_receives.set(self.c.ms_receives.get().wrapping_add(1));
    }

    fn publish(&self) {
        let copy = |a: &AtomicU64, c: &Cell<u64>| a.store(c.get(), Ordering::Relaxed);
        for i in 0..OPS {
            copy(&self.shared.ops[i], &self.c.ops[i]);
            copy(&self.shared.bytes[i], &self.c.bytes[i]);
            copy(&self.shared.errors[i], &self.c.errors[i]);
            copy(&self.shared.lat_sum_ns[i], &self.c.lat_sum_ns[i]);
            for b in 0..BUCKETS {
                copy(&self.shared.lat[i][b], &self.c.lat[i][b]);
            }
        }
        copy(&self.shared.in_flight, &self.c.in_flight);
        copy(&self.shared.zc_sends, &self.c.zc_sends);
        copy(&self.shared.zc_copied, &self.c.zc_copied);
        copy(&self.shared.ms_receives, &self.c.ms_receives);
    }
}

struct Published {
    disk: String,
    export: &'static str,
    values: Arc<Counters<AtomicU64>>,
}

static ENABLED: AtomicBool = AtomicBool::new(false);
static REGISTRY: Mutex<Vec<Published>> = Mutex::new(Vec::new());
/// How often reactors publish their counters.
const PUBLISH_EVERY: Duration = Duration::from_millis(500);

thread_local! {
    static LOCAL: RefCell<HashMap<(String, &'static str), Rc<LocalStats>>> = RefCell::new(HashMap::new());
    static PUBLISHER: Cell<bool> = const { Cell::new(false) };
}

/// Turns counting on (Prometheus or the control socket's `stats`). At start-up,
/// before any export starts.
pub fn enable() {
    ENABLED.store(true, Ordering::SeqCst);
}

/// Whether metrics are on (set once at start-up).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The current reactor's counters for (disk, export), or `None` when metrics are off.
/// Called when a connection or queue starts, never per request.
pub fn local_stats(disk: &str, export: &'static str) -> Option<Rc<LocalStats>> {
    if !enabled() {
        return None;
    }
    let key = (disk.to_string(), export);
    if let Some(s) = LOCAL.with(|l| l.borrow().get(&key).cloned()) {
        return Some(s);
    }
    let shared: Arc<Counters<AtomicU64>> = Arc::new(Counters::default());
    REGISTRY.lock().unwrap_or_else(|p| p.into_inner()).push(Published {
        disk: disk.to_string(),
        export,
        values: shared.clone(),
    });
    let s = Rc::new(LocalStats { c: Counters::default(), shared });
    LOCAL.with(|l| l.borrow_mut().insert(key, s.clone()));
    if !PUBLISHER.with(|p| p.replace(true)) {
        poller::spawn(async {
            loop {
                poller::sleep(PUBLISH_EVERY).await;
                let all: Vec<Rc<LocalStats>> =
                    LOCAL.with(|l| l.borrow().values().cloned().collect());
                for s in all {
                    s.publish();
                }
            }
        });
    }
    Some(s)
}

/// Sums of every reactor's published values for one (disk, export).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Totals {
    pub ops: [u64; OPS],
    pub bytes: [u64; OPS],
    pub errors: [u64; OPS],
    pub lat_sum_ns: [u64; OPS],
    pub lat: [[u64; BUCKETS]; OPS],
    pub in_flight: u64,
    pub zc_sends: u64,
    pub zc_copied: u64,
    pub ms_receives: u64,
}

/// Current totals, by (disk, export).
pub fn totals() -> HashMap<(String, &'static str), Totals> {
    let mut out: HashMap<(String, &'static str), Totals> = HashMap::new();
    let reg = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
    for p in reg.iter() {
        let t = out.entry((p.disk.clone(), p.export)).or_default();
        let v = &p.values;
        for i in 0..OPS {
            t.ops[i] += v.ops[i].load(Ordering::Relaxed);
            t.bytes[i] += v.bytes[i].load(Ordering::Relaxed);
            t.errors[i] += v.errors[i].load(Ordering::Relaxed);
            t.lat_sum_ns[i] += v.lat_sum_ns[i].load(Ordering::Relaxed);
            for b in 0..BUCKETS {
                t.lat[i][b] += v.lat[i][b].load(Ordering::Relaxed);
            }
        }
        t.in_flight += v.in_flight.load(Ordering::Relaxed);
        t.zc_sends += v.zc_sends.load(Ordering::Relaxed);
        t.zc_copied += v.zc_copied.load(Ordering::Relaxed);
        t.ms_receives += v.ms_receives.load(Ordering::Relaxed);
    }
    out
}

/// A JSON view of the totals (for the control socket's `stats`).
pub fn totals_json(disk: Option<&str>) -> serde_json::Value {
    let mut v = serde_json::Map::new();
    for ((d, e), t) in totals() {
        if disk.is_some_and(|x| x != d) {
            continue;
        }
        let mut ops = serde_json::Map::new();
        for (i, name) in OP_NAMES.iter().enumerate() {
            if t.ops[i] == 0 {
                continue;
            }
            ops.insert(
                name.to_string(),
                serde_json::json!({
                    "ops": t.ops[i], "bytes": t.bytes[i], "errors": t.errors[i],
                    "latency_avg_us": t.lat_sum_ns[i] as f64 / t.ops[i] as f64 / 1000.0,
                }),
            );
        }
        let entry = v.entry(d).or_insert_with(|| serde_json::json!({}));
        entry[e] = serde_json::json!({
            "in_flight": t.in_flight, "ops": ops,
            "zero_copy_sends": t.zc_sends, "zero_copy_copied": t.zc_copied,
            "multishot_receives": t.ms_receives,
        });
    }
    serde_json::Value::Object(v)
}

/// The exporter: serves `/metrics` and refreshes the values every second.
pub struct MetricsServer {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What the exporter thread reads besides the registry.
pub type DiskSource = Arc<dyn Fn() -> crate::serve::DiskView + Send + Sync>;

impl MetricsServer {
    /// Turns counting on and starts serving on `addr`. Must run before exports start.
    pub fn start(
        addr: SocketAddr,
        reactors: Vec<ReactorHandle>,
        disks: DiskSource,
    ) -> Result<Self, String> {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .map_err(|e| format!("metrics listener on {addr}: {e}"))?;
        enable();
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                while !s2.load(Ordering::SeqCst) {
                    refresh(&reactors, &disks());
                    std::thread::sleep(Duration::from_millis(250));
                }
            })
            .map_err(|e| e.to_string())?;
        Ok(MetricsServer { stop, thread: Some(thread) })
    }

    pub fn shutdown(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn refresh(reactors: &[ReactorHandle], view: &crate::serve::DiskView) {
    let disks = &view.serving;
    for b in disks {
        metrics::gauge!("appliance_disk_up", &[("disk", b.name().to_string())]).set(1.0);
    }
    for name in &view.failed {
        metrics::gauge!("appliance_disk_up", &[("disk", name.clone())]).set(0.0);
    }
    metrics::gauge!("appliance_disks", &[("state", "serving")]).set(disks.len() as f64);
    metrics::gauge!("appliance_disks", &[("state", "failed")]).set(view.failed.len() as f64);
    for j in &view.jobs {
        let (offset, len) = j.progress();
        let labels =
            [("job", j.id.clone()), ("type", j.kind.name().to_string()), ("disk", j.disk.clone())];
        metrics::gauge!("appliance_job_offset_bytes", &labels).set(offset as f64);
        metrics::gauge!("appliance_job_len_bytes", &labels).set(len as f64);
        let now = j.state();
        for st in jobs::JobState::ALL {
            let mut l = labels.to_vec();
            l.push(("state", st.name().to_string()));
            metrics::gauge!("appliance_job_state", &l).set(if st == now { 1.0 } else { 0.0 });
        }
    }
    for ((disk, export), t) in totals() {
        for (i, op) in OP_NAMES.iter().enumerate() {
            let labels =
                [("disk", disk.clone()), ("export", export.to_string()), ("op", op.to_string())];
            metrics::counter!("appliance_ops_total", &labels).absolute(t.ops[i]);
            metrics::counter!("appliance_bytes_total", &labels).absolute(t.bytes[i]);
            metrics::counter!("appliance_errors_total", &labels).absolute(t.errors[i]);
            metrics::gauge!("appliance_latency_seconds_sum", &labels)
                .set(t.lat_sum_ns[i] as f64 / 1e9);
            metrics::counter!("appliance_latency_seconds_count", &labels).absolute(t.ops[i]);
            let mut cumulative = 0;
            for b in 0..BUCKETS {
                cumulative += t.lat[i][b];
                let le =
                    bucket_bound_seconds(b).map_or_else(|| "+Inf".to_string(), |v| format!("{v}"));
                let l = [
                    ("disk", disk.clone()),
                    ("export", export.to_string()),
                    ("op", op.to_string()),
                    ("le", le),
                ];
                metrics::counter!("appliance_latency_seconds_bucket", &l).absolute(cumulative);
            }
        }
        let labels = [("disk", disk.clone()), ("export", export.to_string())];
        metrics::gauge!("appliance_in_flight", &labels).set(t.in_flight as f64);
        metrics::counter!("appliance_zero_copy_sends_total", &labels).absolute(t.zc_sends);
        metrics::counter!("appliance_zero_copy_copied_total", &labels).absolute(t.zc_copied);
        metrics::counter!("appliance_multishot_receives_total", &labels).absolute(t.ms_receives);
    }
    for r in reactors {
        let s = r.stats();
        let labels = [("reactor", r.index().to_string())];
        metrics::counter!("appliance_reactor_busy_nanoseconds_total", &labels).absolute(s.busy_ns);
        metrics::counter!("appliance_reactor_busy_ticks_total", &labels).absolute(s.busy_ticks);
        metrics::counter!("appliance_reactor_idle_ticks_total", &labels).absolute(s.idle_ticks);
        metrics::counter!("appliance_reactor_sleeps_total", &labels).absolute(s.sleeps);
        metrics::counter!("appliance_reactor_tasks_polled_total", &labels).absolute(s.tasks_polled);
        metrics::counter!("appliance_reactor_messages_total", &labels).absolute(s.messages);
        metrics::gauge!("appliance_reactor_control_ring_entries", &labels)
            .set(s.control_ring as f64);
        metrics::gauge!("appliance_reactor_wake_ring_entries", &labels).set(s.wake_ring as f64);
    }
    for b in disks {
        let labels = [("disk", b.name().to_string())];
        for (name, v) in b.driver_stats() {
            metrics::counter!(format!("appliance_{name}_total"), &labels).absolute(v);
        }
    }
}
