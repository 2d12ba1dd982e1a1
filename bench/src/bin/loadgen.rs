//! `loadgen`: bdevperf-style block I/O load on the appliance's reactors, in process.
//!
//! ```sh
//! loadgen --target null --workload randread --bs 4k --qd 32 --time 5
//! loadgen --target qcow2:/var/tmp/img.qcow2 --workload randwrite --cores 0,1 --json
//! ```

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use bench::loadgen::{self, EngineArg, Options, Target, Workload};
use clap::Parser;

/// Block I/O load generator on the appliance's own reactors (no protocol in between).
/// The null target gives the per-core ceiling of the stack; comparing null, mem, raw
/// and qcow2 separates software overhead from device time.
#[derive(Parser, Debug)]
#[command(name = "loadgen", version, about)]
struct Args {
    /// null, mem, qcow2-mem (a qcow2 image on in-memory storage), raw:PATH or qcow2:PATH.
    #[arg(short, long, default_value = "null")]
    target: Target,
    /// I/O engine for raw and qcow2 files.
    #[arg(long, value_enum, default_value_t = EngineArg::IoUring)]
    driver: EngineArg,
    #[arg(short, long, value_enum, default_value_t = Workload::Randread)]
    workload: Workload,
    /// Percent of reads for randrw.
    #[arg(long, default_value_t = 70)]
    rwmixread: u32,
    /// Block size (4k, 64k, 1M, ...).
    #[arg(long, default_value = "4k", value_parser = bench::parse_size)]
    bs: u64,
    /// I/Os in flight per reactor.
    #[arg(short, long, default_value_t = 32)]
    qd: u32,
    /// Cores to run reactors on, one reactor each (e.g. 0,1).
    #[arg(long, value_delimiter = ',', conflicts_with = "reactors")]
    cores: Vec<usize>,
    /// Number of reactors, on cores 0..N.
    #[arg(long)]
    reactors: Option<usize>,
    /// Seconds to run (fractions allowed).
    #[arg(long, default_value_t = 5.0)]
    time: f64,
    /// Stop after this many I/Os in total instead of after --time.
    #[arg(long)]
    ios: Option<u64>,
    /// Unmeasured seconds before the measured run.
    #[arg(long, default_value_t = 0.0)]
    warmup: f64,
    /// Size of null, mem and qcow2-mem devices.
    #[arg(long, default_value = "1G", value_parser = bench::parse_size)]
    size: u64,
    /// Write every cluster first (qcow2: measure allocated clusters, not holes).
    #[arg(long)]
    prefill: bool,
    /// qcow2: send every request to the shard owning it (no zero-hop path), to measure
    /// what the hop costs.
    #[arg(long)]
    hop: bool,
    /// Open files through the page cache instead of O_DIRECT.
    #[arg(long)]
    buffered: bool,
    /// Reactor idle policy: busy (spin) or adaptive (spin 200 us, then sleep).
    #[arg(long, default_value = "busy", value_parser = ["busy", "adaptive"])]
    idle: String,
    /// Do not pin reactors to their cores.
    #[arg(long)]
    no_pin: bool,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Never print progress (it is printed each second when stderr is a terminal).
    #[arg(long)]
    quiet: bool,
}

fn main() -> ExitCode {
    let a = Args::parse();
    let cores = match (a.reactors, a.cores.is_empty()) {
        (Some(n), _) => (0..n.max(1)).collect(),
        (None, true) => vec![0],
        (None, false) => a.cores.clone(),
    };
    if !(a.time > 0.0 && a.time.is_finite() && a.warmup >= 0.0 && a.warmup.is_finite()) {
        eprintln!("loadgen: --time must be positive and --warmup not negative");
        return ExitCode::FAILURE;
    }
    let opts = Options {
        target: a.target,
        engine: a.driver,
        workload: a.workload,
        rwmixread: a.rwmixread,
        bs: a.bs as usize,
        qd: a.qd,
        cores,
        duration: Duration::from_secs_f64(a.time),
        ios: a.ios,
        warmup: Duration::from_secs_f64(a.warmup),
        size: a.size,
        direct: !a.buffered,
        idle: if a.idle == "busy" {
            poller::IdlePolicy::Busy
        } else {
            poller::IdlePolicy::adaptive()
        },
        pin: !a.no_pin,
        progress: !a.quiet && std::io::stderr().is_terminal(),
        prefill: a.prefill,
        hop: a.hop,
    };
    match loadgen::run(&opts) {
        Ok(r) => {
            if a.json {
                println!("{}", serde_json::to_string_pretty(&r).expect("report serialises"));
            } else {
                print!("{}", r.text());
            }
            if r.errors > 0 || r.ios == 0 {
                eprintln!("loadgen: {} I/O errors, {} I/Os completed", r.errors, r.ios);
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("loadgen: {e}");
            ExitCode::FAILURE
        }
    }
}
