//! A vhost-user-blk load generator with no guest: libblkio's `virtio-blk-vhost-user`
//! driver (the `blkio` crate, the front-end QEMU's own blkio block driver uses) drives
//! 1..n virtqueues of a vhost-user-blk back end at a chosen queue depth, one thread per
//! queue, so the back end is measured at its own ceiling rather than at a TCG guest's.
//!
//! Each queue keeps `qd` requests in flight from its own shared-memory region (the
//! back end maps it, as it maps a guest's RAM); a completion is checked and its slot
//! resubmitted at once. By default the threads poll their completion rings (the
//! front-end costs as little as possible); `--wait` blocks on the completion eventfd
//! instead, as a guest's interrupt-driven driver would.
//!
//! ```sh
//! blkio-load --socket /run/vm1.sock --workload randread --bs 4k --qd 32 --time 5
//! ```

use std::mem::MaybeUninit;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, ReqFlags};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(about = "vhost-user-blk load through libblkio, no guest")]
struct Args {
    /// The back end's vhost-user socket.
    #[arg(long)]
    socket: String,
    /// randread, randwrite, read or write.
    #[arg(long, default_value = "randread")]
    workload: String,
    /// Request size (bytes, or with a k/m suffix).
    #[arg(long, default_value = "4k", value_parser = parse_size)]
    bs: u64,
    /// Requests in flight per queue.
    #[arg(long, default_value_t = 32)]
    qd: usize,
    /// Virtqueues, one thread each.
    #[arg(long, default_value_t = 1)]
    queues: usize,
    /// Measured seconds (after the ramp).
    #[arg(long, default_value_t = 5.0)]
    time: f64,
    /// Unmeasured seconds first.
    #[arg(long, default_value_t = 1.0)]
    ramp: f64,
    /// CPUs to pin the queue threads to, in turn (e.g. 1 or 1,0).
    #[arg(long, value_delimiter = ',')]
    cpus: Vec<usize>,
    /// Block on the completion eventfd instead of polling.
    #[arg(long)]
    wait: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let (num, mul) = match s.to_ascii_lowercase().chars().last() {
        Some('k') => (&s[..s.len() - 1], 1 << 10),
        Some('m') => (&s[..s.len() - 1], 1 << 20),
        _ => (s, 1),
    };
    num.parse::<u64>().map(|n| n * mul).map_err(|e| format!("{s:?}: {e}"))
}

#[derive(Clone, Copy)]
struct Job {
    write: bool,
    random: bool,
    bs: u64,
    qd: usize,
    capacity: u64,
    wait: bool,
}

/// What one queue did in the measured window.
#[derive(Default)]
struct Tally {
    ios: u64,
    errors: u64,
    first_error: Option<String>,
}

fn main() -> ExitCode {
    let a = Args::parse();
    match run(&a) {
        Ok(t) => {
            let secs = a.time;
            let iops = t.ios as f64 / secs;
            let mib = iops * a.bs as f64 / (1 << 20) as f64;
            if a.json {
                println!(
                    "{{\"workload\":\"{}\",\"bs\":{},\"qd\":{},\"queues\":{},\"iops\":{iops:.0},\"mib_s\":{mib:.1},\"errors\":{}}}",
                    a.workload, a.bs, a.qd, a.queues, t.errors
                );
            } else {
                println!(
                    "{} bs={} qd={} queues={}: {iops:.0} IOPS, {mib:.1} MiB/s, {} errors",
                    a.workload, a.bs, a.qd, a.queues, t.errors
                );
            }
            if let Some(e) = t.first_error {
                eprintln!("blkio-load: first error: {e}");
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("blkio-load: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(a: &Args) -> Result<Tally, String> {
    let (write, random) = match a.workload.as_str() {
        "randread" => (false, true),
        "randwrite" => (true, true),
        "read" => (false, false),
        "write" => (true, false),
        w => return Err(format!("unknown workload {w:?}")),
    };
    if a.qd == 0 || a.queues == 0 || a.bs == 0 || !a.bs.is_multiple_of(512) {
        return Err("qd and queues must be at least 1, bs a multiple of 512".into());
    }
    let err = |what: &str, e: blkio::Error| format!("{what}: {e}");
    let mut b = Blkio::new("virtio-blk-vhost-user").map_err(|e| err("blkio", e))?;
    b.set_str("path", &a.socket).map_err(|e| err("path", e))?;
    b.connect().map_err(|e| err(&format!("connect to {}", a.socket), e))?;
    b.set_i32("num-queues", a.queues as i32).map_err(|e| err("num-queues", e))?;
    let started = b.start().map_err(|e| err("start", e))?;
    let capacity = b.get_u64("capacity").map_err(|e| err("capacity", e))?;
    if capacity < a.bs {
        return Err(format!("the disk ({capacity} bytes) is smaller than one request"));
    }
    let job = Job { write, random, bs: a.bs, qd: a.qd, capacity, wait: a.wait };
    let len = (a.bs as usize * a.qd).next_multiple_of(1 << 21);
    let mut regions = Vec::new();
    for _ in 0..a.queues {
        let r = b.alloc_mem_region(len).map_err(|e| err("alloc_mem_region", e))?;
        b.map_mem_region(&r).map_err(|e| err("map_mem_region", e))?;
        // SAFETY: the region is `len` bytes of fresh, writable memory we own.
        unsafe { std::ptr::write_bytes(r.addr as *mut u8, 0x5a, len) };
        regions.push(r.addr);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let gate = Arc::new(Barrier::new(a.queues + 1));
    let mut threads = Vec::new();
    for (i, (q, base)) in started.queues.into_iter().zip(regions).enumerate() {
        let (stop, measuring, gate) = (stop.clone(), measuring.clone(), gate.clone());
        let cpu = (!a.cpus.is_empty()).then(|| a.cpus[i % a.cpus.len()]);
        threads.push(std::thread::spawn(move || {
            if let Some(c) = cpu {
                core_affinity::set_for_current(core_affinity::CoreId { id: c });
            }
            gate.wait();
            drive(q, base, job, i as u64, &stop, &measuring)
        }));
    }
    gate.wait();
    std::thread::sleep(Duration::from_secs_f64(a.ramp));
    measuring.store(true, Ordering::SeqCst);
    std::thread::sleep(Duration::from_secs_f64(a.time));
    measuring.store(false, Ordering::SeqCst);
    stop.store(true, Ordering::SeqCst);
    let mut total = Tally::default();
    for t in threads {
        let r = t.join().map_err(|_| "a queue thread panicked".to_string())?;
        total.ios += r.ios;
        total.errors += r.errors;
        total.first_error = total.first_error.or(r.first_error);
    }
    Ok(total)
}

/// Keeps `qd` requests in flight on one queue until `stop`; counts those that complete
/// while `measuring`.
fn drive(
    mut q: Blkioq,
    base: usize,
    job: Job,
    seed: u64,
    stop: &AtomicBool,
    measuring: &AtomicBool,
) -> Tally {
    let blocks = job.capacity / job.bs;
    let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ (seed + 1).wrapping_mul(0x2545_f491_4f6c_dd1d);
    let mut next_seq = seed * (blocks / 8).max(1);
    let mut next = move || {
        let block = if job.random {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % blocks
        } else {
            next_seq = (next_seq + 1) % blocks;
            next_seq
        };
        block * job.bs
    };
    let submit = |q: &mut Blkioq, slot: usize, off: u64| {
        let buf = (base + slot * job.bs as usize) as *mut u8;
        if job.write {
            q.write(off, buf, job.bs as usize, slot, ReqFlags::empty());
        } else {
            q.read(off, buf, job.bs as usize, slot, ReqFlags::empty());
        }
    };
    for slot in 0..job.qd {
        submit(&mut q, slot, next());
    }
    let mut done: Vec<MaybeUninit<Completion>> =
        (0..job.qd).map(|_| MaybeUninit::uninit()).collect();
    let mut tally = Tally::default();
    let mut inflight = job.qd;
    let min = usize::from(job.wait);
    let mut last_progress = Instant::now();
    while inflight > 0 {
        let stopping = stop.load(Ordering::Relaxed);
        let n = match q.do_io(&mut done, if stopping { 0 } else { min }, None, None) {
            Ok(n) => n,
            Err(e) => {
                tally.first_error.get_or_insert(format!("do_io: {e}"));
                break;
            }
        };
        if n > 0 {
            last_progress = Instant::now();
        } else if last_progress.elapsed() > Duration::from_secs(10) {
            tally.first_error.get_or_insert(format!("{inflight} requests stuck for 10 s"));
            break;
        }
        let counting = measuring.load(Ordering::Relaxed);
        for c in &done[..n] {
            // SAFETY: do_io initialised the first `n` completions.
            let c = unsafe { c.assume_init_ref() };
            if c.ret != 0 {
                tally.errors += 1;
                tally.first_error.get_or_insert(format!("request failed: {}", c.ret));
            } else if counting {
                tally.ios += 1;
            }
            if stopping {
                inflight -= 1;
            } else {
                submit(&mut q, c.user_data, next());
            }
        }
    }
    tally
}
