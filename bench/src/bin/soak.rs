//! soak: hundreds of NBD clients with verified mixed I/O for a long time, plus clients
//! that misbehave, against one appliance on two reactors; nothing may fail, no write
//! may be lost, and resident memory must stay flat.
//!
//! - `--clients` (default 256) well-behaved clients, half on a raw disk and half on a
//!   qcow2 disk (both 1 GiB files), each owning a disjoint region it writes, reads,
//!   zeroes, trims and flushes at random, in every reply mode, reconnecting now and
//!   then; every read is checked against the client's own record of what it wrote, and
//!   at the end each client reads its whole region back.
//! - `--slow` (default 8) slow clients: some pipeline reads and take their replies
//!   late, some drip a write's payload a few bytes at a time, some send half a request
//!   and stall until the server hangs up on them (`stall_timeout = 5`), then start
//!   over.
//! - The appliance's RSS is sampled every 10 s. It rises while buffer pools, caches and
//!   allocator arenas warm up to the working set's peak; from half time to the end it
//!   must not grow by more than 5 % (a leak grows with the work done). At the end the
//!   qcow2 image must pass `qemu-img check`.
//!
//! `cargo run -p bench --release --bin soak -- --minutes 20` (RSS rises for the first
//! ~8 minutes while buffer pools and caches are first touched; judge flatness on 20)

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use appliance_tests::nbd_client::{
    CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES, Client, REQUEST_MAGIC,
};
use bench::servers::die_with_parent;
use clap::Parser;

#[derive(Parser, Debug)]
#[command(name = "soak", about = "Hundreds of verified NBD clients and slow ones, for minutes")]
struct Args {
    #[arg(long, default_value_t = 10.0)]
    minutes: f64,
    #[arg(long, default_value_t = 256)]
    clients: usize,
    #[arg(long, default_value_t = 8)]
    slow: usize,
    /// Where the images go.
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
}

const DISK_BYTES: u64 = 1 << 30;
const BLOCK: u64 = 4096;

#[derive(Default)]
struct Totals {
    ops: AtomicU64,
    bytes_verified: AtomicU64,
    reconnects: AtomicU64,
    slow_cycles: AtomicU64,
    errors: Mutex<Vec<String>>,
}

impl Totals {
    fn fail(&self, m: String) {
        eprintln!("soak error: {m}");
        let mut e = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        if e.len() < 20 {
            e.push(m);
        }
    }
}

/// The byte `i` of block `b` written in version `v` by client `c` (0 for v == 0).
fn pattern(c: u64, b: u64, v: u64, out: &mut [u8]) {
    if v == 0 {
        out.fill(0);
        return;
    }
    let mut x = (c << 40 ^ b << 16 ^ v).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for chunk in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let n = chunk.len();
        chunk.copy_from_slice(&x.to_le_bytes()[..n]);
    }
}

struct Worker {
    id: u64,
    sock: PathBuf,
    export: &'static str,
    base: u64,
    blocks: u64,
    /// Version of each block (0: zeros).
    versions: Vec<u64>,
    rng: u64,
}

impl Worker {
    fn next(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn connect(&self) -> std::io::Result<Client> {
        let mode = self.id % 3;
        Client::connect(&self.sock, self.export, mode > 0, mode == 2)
    }

    fn check(&self, c: &mut Client, first: u64, n: u64, t: &Totals) -> std::io::Result<()> {
        let r = c.read(1, self.base + first * BLOCK, (n * BLOCK) as usize)?;
        if r.error != 0 {
            t.fail(format!("client {}: read error {}", self.id, r.error));
            return Ok(());
        }
        let mut want = vec![0u8; BLOCK as usize];
        for k in 0..n {
            let b = first + k;
            pattern(self.id, b, self.versions[b as usize], &mut want);
            let got = &r.data[(k * BLOCK) as usize..((k + 1) * BLOCK) as usize];
            if got != want.as_slice() {
                t.fail(format!(
                    "client {} on {}: block {b} (version {}) reads back wrong",
                    self.id, self.export, self.versions[b as usize]
                ));
                return Ok(());
            }
        }
        t.bytes_verified.fetch_add(n * BLOCK, Ordering::Relaxed);
        Ok(())
    }

    fn op(&mut self, c: &mut Client, t: &Totals) -> std::io::Result<()> {
        let n = 1 + self.next() % 16;
        let first = self.next() % (self.blocks - n);
        let off = self.base + first * BLOCK;
        let len = n * BLOCK;
        match self.next() % 20 {
            0..=7 => {
                let mut data = vec![0u8; len as usize];
                for k in 0..n {
                    let b = (first + k) as usize;
                    self.versions[b] += 1;
                    let v = self.versions[b];
                    pattern(
                        self.id,
                        first + k,
                        v,
                        &mut data[(k * BLOCK) as usize..][..BLOCK as usize],
                    );
                }
                let fua = if self.next().is_multiple_of(8) { 1 } else { 0 };
                c.request(CMD_WRITE, fua, 2, off, len, &data)?;
                self.expect_ok(c, t, "write")?;
            }
            8..=14 => self.check(c, first, n, t)?,
            15 | 16 => {
                let kind = if self.next().is_multiple_of(2) { CMD_WRITE_ZEROES } else { CMD_TRIM };
                c.request(kind, 0, 3, off, len, &[])?;
                self.expect_ok(c, t, "zero/trim")?;
                // Trim leaves contents unspecified; follow it with zeroes to keep the
                // record exact (write-zeroes must read back as zeros).
                if kind == CMD_TRIM {
                    c.request(CMD_WRITE_ZEROES, 0, 4, off, len, &[])?;
                    self.expect_ok(c, t, "zero after trim")?;
                }
                for k in 0..n {
                    self.versions[(first + k) as usize] = 0;
                }
            }
            _ => {
                c.request(CMD_FLUSH, 0, 5, 0, 0, &[])?;
                self.expect_ok(c, t, "flush")?;
            }
        }
        t.ops.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn expect_ok(&self, c: &mut Client, t: &Totals, what: &str) -> std::io::Result<()> {
        let r = c.reply(0)?;
        if r.error != 0 {
            t.fail(format!(
                "client {} on {}: {what} failed with {}",
                self.id, self.export, r.error
            ));
        }
        Ok(())
    }

    fn run(mut self, stop: &AtomicBool, t: &Totals) {
        let mut c = match self.connect() {
            Ok(c) => c,
            Err(e) => return t.fail(format!("client {}: connect: {e}", self.id)),
        };
        let mut since_reconnect = 0;
        while !stop.load(Ordering::Relaxed) {
            if let Err(e) = self.op(&mut c, t) {
                return t.fail(format!("client {}: connection lost: {e}", self.id));
            }
            since_reconnect += 1;
            if since_reconnect > 500 + self.next() % 2000 {
                c.disconnect();
                t.reconnects.fetch_add(1, Ordering::Relaxed);
                c = match self.connect() {
                    Ok(c) => c,
                    Err(e) => return t.fail(format!("client {}: reconnect: {e}", self.id)),
                };
                since_reconnect = 0;
            }
        }
        // The whole region, once more.
        let mut b = 0;
        while b < self.blocks {
            let n = (self.blocks - b).min(64);
            if let Err(e) = self.check(&mut c, b, n, t) {
                return t.fail(format!("client {}: final check: {e}", self.id));
            }
            b += n;
        }
        c.disconnect();
    }
}

/// A client that misbehaves in one of three ways, over and over.
fn slow_client(id: u64, sock: &Path, stop: &AtomicBool, t: &Totals) {
    let mut cycle = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut c) = Client::connect(
            sock,
            if id.is_multiple_of(2) { "raw" } else { "qcow2" },
            id.is_multiple_of(2),
            false,
        ) else {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        let base = DISK_BYTES - (id + 1) * (1 << 20);
        let r = match (id + cycle) % 3 {
            // Pipeline 32 reads of 256 KiB, take the replies slowly.
            0 => (|| -> std::io::Result<()> {
                for i in 0..32 {
                    c.request(CMD_READ, 0, i, base, 256 << 10, &[])?;
                }
                for _ in 0..32 {
                    std::thread::sleep(Duration::from_millis(100));
                    c.reply(256 << 10)?;
                }
                Ok(())
            })(),
            // Drip a 64 KiB write's payload, 4 KiB every 200 ms.
            1 => (|| -> std::io::Result<()> {
                c.request(CMD_WRITE, 0, 1, base, 64 << 10, &[])?;
                for _ in 0..16 {
                    std::thread::sleep(Duration::from_millis(200));
                    std::io::Write::write_all(&mut c.s, &[0x77; 4096])?;
                }
                c.reply(0).map(|_| ())
            })(),
            // Half a request, then silence until the server hangs up.
            _ => (|| -> std::io::Result<()> {
                std::io::Write::write_all(&mut c.s, &REQUEST_MAGIC.to_be_bytes())?;
                c.s.set_read_timeout(Some(Duration::from_secs(30)))?;
                let mut b = [0u8; 1];
                let n = std::io::Read::read(&mut c.s, &mut b)?;
                if n != 0 {
                    return Err(std::io::Error::other("the server answered half a request"));
                }
                Ok(())
            })(),
        };
        if let Err(e) = r
            && (id + cycle) % 3 != 2
        {
            t.fail(format!("slow client {id}: {e}"));
        }
        t.slow_cycles.fetch_add(1, Ordering::Relaxed);
        cycle += 1;
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            let l = s.lines().find(|l| l.starts_with("VmRSS:"))?.to_string();
            l.split_whitespace().nth(1)?.parse().ok()
        })
        .unwrap_or(0)
}

fn run(a: &Args) -> Result<(), String> {
    let dir = a.dir.join(format!("appliance-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let raw = dir.join("raw.img");
    std::fs::File::create(&raw).and_then(|f| f.set_len(DISK_BYTES)).map_err(|e| e.to_string())?;
    let qcow2 = dir.join("qcow2.qcow2");
    let ok = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&qcow2)
        .arg(DISK_BYTES.to_string())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        return Err("qemu-img create failed (install qemu-utils)".into());
    }
    let sock = dir.join("nbd.sock");
    let cfg = dir.join("soak.toml");
    let text = format!(
        "[appliance]\ncores = [0, 1]\n[nbd]\nlisten = [\"unix:{}\"]\nmax_connections = {}\nstall_timeout = 5\n\
         [[disk]]\nname = \"raw\"\npath = \"{}\"\n[[disk]]\nname = \"qcow2\"\npath = \"{}\"\nformat = \"qcow2\"\n",
        sock.display(),
        a.clients + a.slow + 64,
        raw.display(),
        qcow2.display()
    );
    std::fs::write(&cfg, text).map_err(|e| e.to_string())?;
    let bin = bench::harness::locate_appliance(None)?;
    let log = std::fs::File::create(dir.join("appliance.log")).map_err(|e| e.to_string())?;
    let mut cmd = Command::new(&bin);
    cmd.args(["serve", "--config"]).arg(&cfg).env("APPLIANCE_LOG", "warn");
    cmd.stdout(std::process::Stdio::null()).stderr(log);
    die_with_parent(&mut cmd);
    let mut child = cmd.spawn().map_err(|e| format!("{}: {e}", bin.display()))?;
    let t0 = Instant::now();
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        if t0.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            return Err("the appliance did not listen".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = child.id();
    let stop = Arc::new(AtomicBool::new(false));
    let totals = Arc::new(Totals::default());
    let region = DISK_BYTES / (a.clients as u64).div_ceil(2) / BLOCK * BLOCK;
    let region = region.min((DISK_BYTES - 64 * (1 << 20)) / (a.clients as u64).div_ceil(2));
    let mut threads = Vec::new();
    for i in 0..a.clients as u64 {
        let w = Worker {
            id: i,
            sock: sock.clone(),
            export: if i % 2 == 0 { "raw" } else { "qcow2" },
            base: (i / 2) * region / BLOCK * BLOCK,
            blocks: region / BLOCK,
            versions: vec![0; (region / BLOCK) as usize],
            rng: i.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1,
        };
        let (stop, t) = (stop.clone(), totals.clone());
        threads.push(std::thread::spawn(move || w.run(&stop, &t)));
    }
    for i in 0..a.slow as u64 {
        let (stop, t, sock) = (stop.clone(), totals.clone(), sock.clone());
        threads.push(std::thread::spawn(move || slow_client(i, &sock, &stop, &t)));
    }
    let run_for = Duration::from_secs_f64(a.minutes * 60.0);
    let mut samples = Vec::new();
    while t0.elapsed() < run_for {
        std::thread::sleep(Duration::from_secs(10).min(run_for.saturating_sub(t0.elapsed())));
        let rss = rss_kib(pid);
        let ops = totals.ops.load(Ordering::Relaxed);
        samples.push((t0.elapsed().as_secs(), rss));
        eprintln!(
            "{:>5} s  RSS {:>7.1} MiB  ops {ops}  errors {}",
            t0.elapsed().as_secs(),
            rss as f64 / 1024.0,
            totals.errors.lock().map(|e| e.len()).unwrap_or(0)
        );
    }
    stop.store(true, Ordering::SeqCst);
    for th in threads {
        let _ = th.join();
    }
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let status = child.wait().map_err(|e| e.to_string())?;
    let check =
        Command::new("qemu-img").arg("check").arg(&qcow2).output().map_err(|e| e.to_string())?;
    let errors = totals.errors.lock().map(|e| e.clone()).unwrap_or_default();
    let warm = samples.iter().find(|(s, _)| *s >= 60).or(samples.first()).map_or(0, |s| s.1);
    let half = samples.get(samples.len() / 2).map_or(0, |s| s.1);
    let last = samples.last().map_or(0, |s| s.1);
    let max = samples.iter().map(|s| s.1).max().unwrap_or(0);
    println!(
        "soak: {:.1} min, {} clients + {} slow on 2 reactors (raw + qcow2)\n\
         ops {} ({:.0}/s), verified {:.1} GiB, reconnects {}, slow-client cycles {}\n\
         RSS after 1 min {:.1} MiB, at half time {:.1} MiB, at the end {:.1} MiB, max {:.1} MiB\n\
         appliance exit: {status}; qemu-img check: {}\nerrors: {}",
        t0.elapsed().as_secs_f64() / 60.0,
        a.clients,
        a.slow,
        totals.ops.load(Ordering::Relaxed),
        totals.ops.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64(),
        totals.bytes_verified.load(Ordering::Relaxed) as f64 / (1u64 << 30) as f64,
        totals.reconnects.load(Ordering::Relaxed),
        totals.slow_cycles.load(Ordering::Relaxed),
        warm as f64 / 1024.0,
        half as f64 / 1024.0,
        last as f64 / 1024.0,
        max as f64 / 1024.0,
        if check.status.success() { "clean" } else { "FAILED" },
        if errors.is_empty() { "none".to_string() } else { errors.join("; ") },
    );
    let flat = last as f64 <= half as f64 * 1.05;
    let _ = std::fs::remove_dir_all(&dir);
    if !errors.is_empty() || !status.success() || !check.status.success() || !flat {
        return Err(format!("soak failed (RSS flat: {flat})"));
    }
    Ok(())
}

fn main() -> ExitCode {
    let a = Args::parse();
    match run(&a) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("soak: {e}");
            ExitCode::FAILURE
        }
    }
}
