//! `harness`: the side-by-side benchmark of the appliance against qemu-storage-daemon,
//! qemu-nbd and the raw device, with the same fio jobs.
//!
//! ```sh
//! cargo run -p bench --release --bin harness -- --rounds 3 --runtime 5
//! cargo run -p bench --release --bin harness -- --smoke --out /tmp/r
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use bench::harness::{self, Options};
use bench::servers::{Format, Kind};
use clap::Parser;

/// Runs the same fio jobs (NBD engine) against the appliance, qemu-storage-daemon and
/// qemu-nbd (each pinned to one core, fio on another) and fio with io_uring on the raw
/// file, in ABBA rounds; writes results.md, results.json and SVG plots into
/// OUT/<UTC date-time>/ and points OUT/latest there.
#[derive(Parser, Debug)]
#[command(name = "harness", version, about)]
struct Args {
    /// About one second per case, one round, small images: checks that everything works.
    #[arg(long)]
    smoke: bool,
    /// Rounds (ABBA order across servers).
    #[arg(long)]
    rounds: Option<usize>,
    /// Seconds each case runs (after the ramp).
    #[arg(long)]
    runtime: Option<f64>,
    /// Seconds of unmeasured ramp-up before each case.
    #[arg(long)]
    ramp: Option<f64>,
    /// Results directory (default: bench/results in the workspace).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Where images are made (must support O_DIRECT, so not a tmpfs).
    #[arg(long, default_value = "/var/tmp")]
    work_dir: PathBuf,
    /// Keep the images and server logs after the run.
    #[arg(long)]
    keep_work: bool,
    /// Size of the data image (e.g. 2G).
    #[arg(long, value_parser = bench::parse_size)]
    image_size: Option<u64>,
    /// Virtual size of the empty images of the write-to-empty job.
    #[arg(long, value_parser = bench::parse_size)]
    empty_size: Option<u64>,
    /// Image formats to serve.
    #[arg(long, value_delimiter = ',', default_value = "raw,qcow2")]
    formats: Vec<String>,
    /// Targets: appliance, qsd, qemu-nbd, device (fio on the raw file, on the device
    /// CPU), device-client-core (the same on the fio CPU), null (the appliance serving
    /// a `null` disk: the transport's ceiling).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "appliance,qsd,qemu-nbd,device,device-client-core,null"
    )]
    servers: Vec<String>,
    /// Only these jobs (see bench::fio::jobs; default: all).
    #[arg(long, value_delimiter = ',')]
    jobs: Vec<String>,
    /// Delay every NBD request of the appliance by US microseconds
    /// (APPLIANCE_DEBUG_DELAY_US): proves the harness sees a slower appliance.
    #[arg(long, value_name = "US", default_value_t = 0)]
    slow_appliance: u64,
    /// The appliance binary (default: built with cargo, same profile as this harness).
    #[arg(long)]
    appliance: Option<PathBuf>,
    /// The appliance's reactor idle policy.
    #[arg(long, default_value = "busy", value_parser = ["busy", "adaptive"])]
    appliance_idle: String,
    /// CPU the servers are pinned to.
    #[arg(long, default_value_t = 0)]
    server_core: usize,
    /// The appliance's reactor CPUs (default: one reactor on the server CPU), e.g. 0,1
    /// for one image on two shards; the other servers stay on the server CPU.
    #[arg(long, value_delimiter = ',')]
    appliance_cores: Vec<usize>,
    /// CPU fio is pinned to.
    #[arg(long, default_value_t = 1)]
    fio_core: usize,
    /// CPU fio runs on for the device baseline (default: the server core).
    #[arg(long)]
    device_core: Option<usize>,
}

fn main() -> ExitCode {
    let a = Args::parse();
    let out = a.out.clone().unwrap_or_else(|| harness::workspace().join("bench").join("results"));
    let mut o = Options::full(out);
    if a.smoke {
        o.make_smoke();
    }
    let parsed = (|| -> Result<(), String> {
        o.formats = a.formats.iter().map(|s| Format::parse(s)).collect::<Result<_, _>>()?;
        o.servers = a.servers.iter().map(|s| Kind::parse(s)).collect::<Result<_, _>>()?;
        Ok(())
    })();
    if let Err(e) = parsed {
        eprintln!("harness: {e}");
        return ExitCode::FAILURE;
    }
    o.rounds = a.rounds.unwrap_or(o.rounds);
    o.runtime_s = a.runtime.unwrap_or(o.runtime_s);
    o.ramp_s = a.ramp.unwrap_or(o.ramp_s);
    o.image_size = a.image_size.unwrap_or(o.image_size);
    o.empty_size = a.empty_size.unwrap_or(o.empty_size);
    o.work_root = a.work_dir;
    o.keep_work = a.keep_work;
    o.jobs = a.jobs;
    o.slow_appliance_us = a.slow_appliance;
    o.appliance_bin = a.appliance;
    o.appliance_idle = a.appliance_idle;
    o.server_core = a.server_core;
    o.appliance_cores = a.appliance_cores.clone();
    o.fio_core = a.fio_core;
    o.device_core = a.device_core.unwrap_or(a.server_core);
    match harness::run(&o) {
        Ok(out) => {
            let md = std::fs::read_to_string(out.dir.join("results.md")).unwrap_or_default();
            println!("{md}");
            eprintln!("harness: results in {}", out.dir.display());
            if out.failures > 0 {
                eprintln!("harness: {} run(s) failed", out.failures);
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("harness: {e}");
            ExitCode::FAILURE
        }
    }
}
