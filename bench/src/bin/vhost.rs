//! vhost: the same guest workloads against the appliance's and qemu-storage-daemon's
//! vhost-user-blk exports of the same image, in alternating (ABBA) rounds.
//!
//! A QEMU guest (the test guest of `tests/guest`: TCG, one vCPU, one virtqueue) boots
//! against each server in turn and runs `xio bench` in it: sequential 1 MiB reads and
//! writes with one request in flight, 4 KiB random reads and writes with eight. The
//! server is pinned to one core and QEMU to the other. The guest is emulated (no KVM
//! here), so absolute figures are the emulator's; the ratio between servers on the
//! same guest, machine and image is what this measures. Nothing is asserted.
//!
//! `cargo run -p bench --release --bin vhost -- --rounds 3 --secs 8`

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use appliance_tests::guest::{self, BootOptions};
use bench::stats::Spread;
use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "vhost",
    about = "vhost-user-blk: appliance vs qemu-storage-daemon, same guest workloads"
)]
struct Args {
    /// Rounds (ABBA order).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds per workload.
    #[arg(long, default_value_t = 8)]
    secs: u64,
    /// Image formats (raw, qcow2).
    #[arg(long, value_delimiter = ',', default_value = "raw,qcow2")]
    formats: Vec<String>,
    /// Size of the (fully allocated) image in MiB.
    #[arg(long, default_value_t = 1024)]
    image_mib: u64,
    /// Where the images go (must support O_DIRECT).
    #[arg(long, default_value = "/var/tmp")]
    work_dir: PathBuf,
    /// CPU the servers are pinned to.
    #[arg(long, default_value_t = 0)]
    server_core: usize,
    /// CPU QEMU is pinned to.
    #[arg(long, default_value_t = 1)]
    guest_core: usize,
    /// The appliance binary (default: target/release/appliance, built by cargo).
    #[arg(long)]
    appliance: Option<PathBuf>,
}

const WORKLOADS: [(&str, &str, u32); 4] =
    [("read", "1m", 1), ("write", "1m", 1), ("randread", "4k", 8), ("randwrite", "4k", 8)];

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(())
}

fn wait_socket(p: &Path, child: &mut Child) -> Result<(), String> {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(30) {
        if std::os::unix::net::UnixStream::connect(p).is_ok() {
            return Ok(());
        }
        if let Ok(Some(s)) = child.try_wait() {
            return Err(format!("server exited early: {s}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(format!("{} never listened", p.display()))
}

fn start_server(
    a: &Args,
    server: &str,
    image: &Path,
    format: &str,
    sock: &Path,
) -> Result<Child, String> {
    let _ = std::fs::remove_file(sock);
    let mut c = Command::new("taskset");
    c.args(["-c", &a.server_core.to_string()]);
    match server {
        "appliance" => {
            let cfg = sock.with_extension("toml");
            std::fs::write(
                &cfg,
                format!(
                    "[appliance]\ncores = [{}]\nidle = \"busy\"\n\n[[disk]]\nname = \"d\"\npath = \"{}\"\nformat = \"{format}\"\n[disk.vhost_user_blk]\nsocket = \"{}\"\nqueues = 1\n",
                    a.server_core,
                    image.display(),
                    sock.display()
                ),
            )
            .map_err(|e| e.to_string())?;
            let bin = a
                .appliance
                .clone()
                .unwrap_or_else(|| appliance_tests::workspace().join("target/release/appliance"));
            c.arg(bin).args(["serve", "--config"]).arg(cfg);
        }
        _ => {
            c.arg("qemu-storage-daemon").arg("--blockdev").arg(format!(
                "driver=file,node-name=file,filename={},cache.direct=on,aio=io_uring",
                image.display()
            ));
            let node = if format == "qcow2" {
                c.args(["--blockdev", "driver=qcow2,node-name=fmt,file=file"]);
                "fmt"
            } else {
                "file"
            };
            c.arg("--export").arg(format!(
                "type=vhost-user-blk,id=e,node-name={node},addr.type=unix,addr.path={},writable=on,num-queues=1",
                sock.display()
            ));
        }
    }
    let mut child = c
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    if let Err(e) = wait_socket(sock, &mut child) {
        let _ = child.kill();
        return Err(format!("{server}: {e}"));
    }
    Ok(child)
}

/// One guest boot running every workload; MiB/s (sequential) or IOPS (random) each.
fn measure(a: &Args, image: &guest::GuestImage, sock: &Path) -> Result<Vec<f64>, String> {
    let mut script = String::from("set -e\n");
    for (mode, bs, jobs) in WORKLOADS {
        script.push_str(&format!(
            "xio bench /dev/vda {mode} {bs} {} {jobs} | sed 's/^/{mode}_/'\n",
            a.secs
        ));
    }
    let opts = BootOptions {
        smp: 1,
        queues: 1,
        timeout: Duration::from_secs(120 + 4 * a.secs * 3),
        ..BootOptions::default()
    };
    let mut g = guest::Guest::spawn(image, sock, &script, &opts);
    // The emulator on its own core, away from the server.
    let _ = Command::new("taskset")
        .args(["-a", "-c", "-p", &a.guest_core.to_string(), &g.pid().to_string()])
        .stdout(Stdio::null())
        .status();
    let _ = g.wait_for("GUEST-READY", Duration::from_secs(60));
    let r = g.wait();
    if r.exit_status != Some(0) {
        return Err(format!("guest run failed:\n{r}"));
    }
    WORKLOADS
        .iter()
        .map(|(mode, _, _)| {
            let key = if mode.starts_with("rand") { "bench_iops" } else { "bench_mibps" };
            r.value(&format!("{mode}_{key}"))
                .and_then(|v| v.parse::<f64>().ok())
                .ok_or_else(|| format!("no {mode}_{key} in:\n{r}"))
        })
        .collect()
}

fn make_image(a: &Args, format: &str) -> Result<PathBuf, String> {
    let dir = a.work_dir.join(format!("appliance-vhost-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let raw = dir.join("data.raw");
    if !raw.exists() {
        run(Command::new("dd")
            .args(["if=/dev/urandom", "bs=1M", "status=none", "oflag=direct"])
            .arg(format!("of={}", raw.display()))
            .arg(format!("count={}", a.image_mib)))?;
    }
    if format == "raw" {
        return Ok(raw);
    }
    let q = dir.join("data.qcow2");
    if !q.exists() {
        run(Command::new("qemu-img").args(["convert", "-q", "-O", "qcow2"]).arg(&raw).arg(&q))?;
    }
    Ok(q)
}

fn main() -> ExitCode {
    let a = Args::parse();
    if a.appliance.is_none() {
        let st = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(appliance_tests::workspace())
            .args(["build", "--quiet", "--release", "--bin", "appliance"])
            .status();
        if !st.is_ok_and(|s| s.success()) {
            eprintln!("vhost: building the appliance failed");
            return ExitCode::FAILURE;
        }
    }
    let image = guest::ensure_built();
    let sock = a.work_dir.join(format!("appliance-vhost-bench-{}.sock", std::process::id()));
    println!(
        "vhost-user-blk, guest: TCG, 1 vCPU, 1 queue; server on CPU {}, QEMU on CPU {}; {} rounds x {} s per workload\n",
        a.server_core, a.guest_core, a.rounds, a.secs
    );
    println!("| format | workload | unit | appliance | qsd | appliance/qsd |");
    println!("|---|---|---|---:|---:|---:|");
    let mut failed = false;
    for format in &a.formats {
        let img = match make_image(&a, format) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("vhost: {e}");
                return ExitCode::FAILURE;
            }
        };
        // results[server][workload] = per-round values
        let mut values = vec![vec![Vec::new(); WORKLOADS.len()]; 2];
        let mut ratios = vec![Vec::new(); WORKLOADS.len()];
        for round in 0..a.rounds {
            let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
            let mut this = [Vec::new(), Vec::new()];
            for s in order {
                let name = ["appliance", "qsd"][s];
                let r = start_server(&a, name, &img, format, &sock).and_then(|mut child| {
                    let r = measure(&a, &image, &sock);
                    // SAFETY: kill(2) on our own child; SIGTERM lets it flush and exit.
                    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
                    let _ = child.wait();
                    r
                });
                match r {
                    Ok(v) => this[s] = v,
                    Err(e) => {
                        eprintln!("vhost: {format} round {round} {name}: {e}");
                        failed = true;
                    }
                }
            }
            if this[0].len() == WORKLOADS.len() && this[1].len() == WORKLOADS.len() {
                for w in 0..WORKLOADS.len() {
                    values[0][w].push(this[0][w]);
                    values[1][w].push(this[1][w]);
                    ratios[w].push(this[0][w] / this[1][w]);
                }
            }
            eprintln!("vhost: {format} round {} of {} done", round + 1, a.rounds);
        }
        for (w, (mode, bs, jobs)) in WORKLOADS.iter().enumerate() {
            let unit = if mode.starts_with("rand") { "IOPS" } else { "MiB/s" };
            let med =
                |v: &[f64]| Spread::of(v).map_or("-".to_string(), |s| format!("{:.0}", s.median));
            let ratio = Spread::of(&ratios[w]).map_or("-".to_string(), |s| s.ratio_text());
            println!(
                "| {format} | {mode} {bs} x{jobs} | {unit} | {} | {} | {ratio} |",
                med(&values[0][w]),
                med(&values[1][w])
            );
        }
    }
    let _ = std::fs::remove_dir_all(
        a.work_dir.join(format!("appliance-vhost-bench-{}", std::process::id())),
    );
    let _ = std::fs::remove_file(&sock);
    if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}
