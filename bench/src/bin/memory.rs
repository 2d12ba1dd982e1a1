//! memory: what serving one qcow2 image costs in resident memory, by virtual size and
//! cluster size, for the appliance and for qemu-storage-daemon on the same image.
//!
//! For each image (made by qemu-img; sizes it refuses are reported as such) each server
//! is started on one core with its default cache settings; the table shows its RSS
//! once it listens (the cost of opening the image), then after a fixed workload that
//! touches the whole virtual size: `--writes` 4 KiB writes spread evenly over it (each
//! in a different L2 table region, so tables and refcount blocks are allocated and
//! cached) and a read of each. The high-water mark (VmHWM) is reported too. Nothing is
//! asserted here (tests/tests/memory.rs holds the bounds); this is the report.
//!
//! `cargo run -p bench --release --bin memory -- --out docs/perf/memory.md`

use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::Duration;

use bench::servers::{Format, Kind, Server, Spec};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(name = "memory", about = "Resident memory of serving qcow2 images, by size")]
struct Args {
    /// Virtual sizes (qemu-img syntax).
    #[arg(long, value_delimiter = ',', default_value = "1G,1T,1P")]
    sizes: Vec<String>,
    /// Cluster sizes (qemu-img syntax).
    #[arg(long, value_delimiter = ',', default_value = "512,4k,64k,2M")]
    clusters: Vec<String>,
    /// 4 KiB writes spread over the virtual size (then read back).
    #[arg(long, default_value_t = 64)]
    writes: u64,
    /// Servers (appliance, qsd).
    #[arg(long, value_delimiter = ',', default_value = "appliance,qsd")]
    servers: Vec<String>,
    /// Where the images go.
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// Also write the table here (markdown).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// (VmRSS, VmHWM) of a process, in KiB.
fn rss_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        line.split_whitespace().nth(1)?.parse().ok()
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Bytes of a qemu-img size such as `64k`, `1G` or `1P`.
fn parse_size(s: &str) -> Result<u64, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        "p" => 50,
        _ => return Err(format!("size {s:?}: unknown unit")),
    };
    num.parse::<u64>().map(|n| n << shift).map_err(|_| format!("size {s:?} is not a number"))
}

/// qemu-io commands for the workload: writes spread evenly over `size`, then reads.
fn workload(size: u64, writes: u64) -> Vec<String> {
    let step = (size / writes.max(1)) & !4095;
    let offs: Vec<u64> = (0..writes).map(|i| i * step).collect();
    let mut cmds: Vec<String> = offs.iter().map(|o| format!("write -P 0x5a {o} 4k")).collect();
    cmds.extend(offs.iter().map(|o| format!("read -P 0x5a {o} 4k")));
    cmds
}

struct Row {
    size: String,
    cluster: String,
    cells: Vec<String>,
}

fn measure(spec: &Spec, size: u64, writes: u64) -> Result<String, String> {
    let server = Server::start(spec)?;
    let pid = server.pid().ok_or("no pid")?;
    std::thread::sleep(Duration::from_millis(300));
    let (open, _) = rss_kib(pid).ok_or("no /proc status")?;
    let mut io = Command::new("qemu-io");
    io.args(["-f", "raw"]);
    for c in workload(size, writes) {
        io.args(["-c", &c]);
    }
    let out = io.arg(server.uri()).output().map_err(|e| format!("qemu-io: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() || text.contains("fail") {
        return Err(format!(
            "workload failed: {}",
            text.lines().find(|l| l.contains("fail")).unwrap_or("")
        ));
    }
    let (after, hwm) = rss_kib(pid).ok_or("no /proc status")?;
    server.stop(Duration::from_secs(30))?;
    let mib = |k: u64| format!("{:.1}", k as f64 / 1024.0);
    Ok(format!("{} / {} / {}", mib(open), mib(after), mib(hwm)))
}

fn run(args: &Args) -> Result<Vec<Row>, String> {
    let bin = bench::harness::locate_appliance(None)?;
    let work = tempfile_in(&args.dir)?;
    let mut rows = Vec::new();
    for size in &args.sizes {
        for cluster in &args.clusters {
            let img = work.join(format!("mem-{size}-{cluster}.qcow2"));
            let _ = std::fs::remove_file(&img);
            let made = Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-o", &format!("cluster_size={cluster}")])
                .arg(&img)
                .arg(size)
                .output()
                .map_err(|e| format!("qemu-img: {e}"))?;
            let mut cells = Vec::new();
            for name in &args.servers {
                let kind = Kind::parse(name)?;
                if !made.status.success() {
                    cells.push("qemu-img refuses".to_string());
                    continue;
                }
                let spec = Spec {
                    kind,
                    format: Format::Qcow2,
                    image: img.clone(),
                    dir: work.join(format!("{size}-{cluster}-{name}")),
                    core: 0,
                    appliance_cores: vec![],
                    appliance_bin: bin.clone(),
                    appliance_idle: "adaptive".into(),
                    appliance_delay_us: 0,
                    null_size: 0,
                };
                let cell = measure(&spec, parse_size(size)?, args.writes)
                    .unwrap_or_else(|e| format!("error: {e}"));
                eprintln!("{size} {cluster} {name}: {cell}");
                cells.push(cell);
            }
            let _ = std::fs::remove_file(&img);
            rows.push(Row { size: size.clone(), cluster: cluster.clone(), cells });
        }
    }
    let _ = std::fs::remove_dir_all(&work);
    Ok(rows)
}

fn tempfile_in(dir: &std::path::Path) -> Result<PathBuf, String> {
    let d = dir.join(format!("appliance-memory-{}", std::process::id()));
    std::fs::create_dir_all(&d).map_err(|e| format!("{}: {e}", d.display()))?;
    Ok(d)
}

fn table(args: &Args, rows: &[Row]) -> String {
    let mut t = String::new();
    t.push_str(&format!(
        "RSS in MiB: after open / after {} spread 4 KiB writes and reads / high-water mark\n\n",
        args.writes
    ));
    t.push_str("| virtual size | cluster |");
    for s in &args.servers {
        t.push_str(&format!(" {s} |"));
    }
    t.push_str("\n|---|---|");
    for _ in &args.servers {
        t.push_str("---:|");
    }
    t.push('\n');
    for r in rows {
        t.push_str(&format!("| {} | {} |", r.size, r.cluster));
        for c in &r.cells {
            t.push_str(&format!(" {c} |"));
        }
        t.push('\n');
    }
    t
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(rows) => {
            let t = table(&args, &rows);
            print!("{t}");
            if let Some(p) = &args.out
                && let Err(e) = std::fs::write(p, &t)
            {
                eprintln!("memory: {}: {e}", p.display());
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("memory: {e}");
            ExitCode::FAILURE
        }
    }
}
