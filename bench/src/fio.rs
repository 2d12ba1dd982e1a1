//! The fio jobs of the harness and the parsing of fio's JSON output.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

/// One fio job, run identically against every server.
#[derive(Debug, Clone, Serialize)]
pub struct Job {
    /// Short identifier, e.g. `randread-4k-qd32`.
    pub name: &'static str,
    /// fio's `rw`.
    pub rw: &'static str,
    pub bs: u64,
    pub iodepth: u32,
    pub rwmixread: Option<u32>,
    /// Runs on a freshly created, empty image (writes allocate).
    pub empty: bool,
}

impl Job {
    /// Whether the job writes (so its image must be writable and gets modified).
    pub fn writes(&self) -> bool {
        self.rw.contains("write") || self.rw.contains("rw")
    }

    /// The job in words, for tables.
    pub fn describe(&self) -> String {
        let what = match self.rw {
            "randread" => "random read".to_string(),
            "randwrite" => "random write".to_string(),
            "read" => "sequential read".to_string(),
            "write" => "sequential write".to_string(),
            "randrw" => format!(
                "random {}/{} r/w",
                self.rwmixread.unwrap_or(50),
                100 - self.rwmixread.unwrap_or(50)
            ),
            other => other.to_string(),
        };
        let empty = if self.empty { ", empty image" } else { "" };
        format!("{} {what} QD{}{empty}", crate::fmt_size(self.bs), self.iodepth)
    }
}

/// The harness's jobs.
pub fn jobs() -> Vec<Job> {
    let j =
        |name, rw, bs, iodepth, rwmixread, empty| Job { name, rw, bs, iodepth, rwmixread, empty };
    vec![
        j("randread-4k-qd1", "randread", 4096, 1, None, false),
        j("randread-4k-qd32", "randread", 4096, 32, None, false),
        j("randwrite-4k-qd32", "randwrite", 4096, 32, None, false),
        j("randwrite-4k-qd32-empty", "randwrite", 4096, 32, None, true),
        j("read-64k-qd8", "read", 65536, 8, None, false),
        j("write-64k-qd8", "write", 65536, 8, None, false),
        j("randrw70-4k-qd32", "randrw", 4096, 32, Some(70), false),
    ]
}

/// Where fio sends its I/O.
#[derive(Debug, Clone)]
pub enum Target {
    /// An NBD export (fio's `nbd` engine, one connection).
    Nbd(String),
    /// A file, through io_uring with O_DIRECT: the device limit.
    File(PathBuf),
}

/// How long and where fio runs.
#[derive(Debug, Clone)]
pub struct RunOpts {
    pub runtime: Duration,
    pub ramp: Duration,
    /// Pin fio to this CPU.
    pub cpu: Option<usize>,
    /// Cap on the bytes a job moves (for jobs on empty images: bounds the disk space the
    /// allocations take); `None` runs for `runtime`, looping over the image.
    pub io_size: Option<u64>,
    /// Kill fio if it runs this much longer than asked.
    pub slack: Duration,
}

/// What one fio run measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Measure {
    pub iops: f64,
    pub read_iops: f64,
    pub write_iops: f64,
    pub mib_s: f64,
    pub ios: u64,
    /// Completion latency (of reads, or writes for write-only jobs), microseconds.
    pub lat_mean_us: f64,
    pub lat_p50_us: f64,
    pub lat_p99_us: f64,
    pub lat_p999_us: f64,
    pub runtime_s: f64,
}

fn ms(d: Duration) -> String {
    format!("{}ms", d.as_millis().max(1))
}

/// The fio command line for `job` on `target`.
pub fn command(job: &Job, target: &Target, o: &RunOpts) -> Command {
    let mut c = match o.cpu {
        Some(cpu) => {
            let mut c = Command::new("taskset");
            c.args(["-c", &cpu.to_string(), "fio"]);
            c
        }
        None => Command::new("fio"),
    };
    c.arg(format!("--name={}", job.name));
    match target {
        Target::Nbd(uri) => {
            c.arg("--ioengine=nbd").arg(format!("--uri={uri}"));
        }
        Target::File(p) => {
            c.args(["--ioengine=io_uring", "--direct=1"])
                .arg(format!("--filename={}", p.display()));
        }
    }
    c.arg(format!("--rw={}", job.rw))
        .arg(format!("--bs={}", job.bs))
        .arg(format!("--iodepth={}", job.iodepth))
        .arg(format!("--runtime={}", ms(o.runtime)))
        // --thread: one process, so the parent-death signal the harness sets reaches
        // every job (forked job processes would outlive a killed harness).
        .args(["--thread", "--numjobs=1", "--output-format=json", "--percentile_list=50:99:99.9"]);
    if let Some(m) = job.rwmixread {
        c.arg(format!("--rwmixread={m}"));
    }
    if !o.ramp.is_zero() {
        c.arg(format!("--ramp_time={}", ms(o.ramp)));
    }
    match o.io_size {
        Some(n) => {
            // Each block at most once (fio's random map): every write of a 4k job on an
            // empty image lands on a block never written before.
            c.arg(format!("--io_size={n}"));
        }
        None => {
            c.arg("--time_based");
        }
    }
    c
}

/// Runs fio and parses what it measured.
pub fn run(job: &Job, target: &Target, o: &RunOpts, log: &Path) -> Result<Measure, String> {
    let mut cmd = command(job, target, o);
    let out_path = log.with_extension("json");
    let err_path = log.with_extension("stderr");
    let stdout =
        std::fs::File::create(&out_path).map_err(|e| format!("{}: {e}", out_path.display()))?;
    let stderr =
        std::fs::File::create(&err_path).map_err(|e| format!("{}: {e}", err_path.display()))?;
    cmd.stdin(Stdio::null()).stdout(stdout).stderr(stderr);
    crate::servers::die_with_parent(&mut cmd);
    let mut child = cmd.spawn().map_err(|e| format!("cannot run fio: {e}"))?;
    let limit = o.runtime + o.ramp + o.slack;
    let status = crate::servers::wait_timeout(&mut child, limit)
        .map_err(|e| format!("waiting for fio: {e}"))?;
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(format!("fio ran over {limit:?}; killed (see {})", err_path.display()));
    };
    let text = std::fs::read_to_string(&out_path).unwrap_or_default();
    if !status.success() {
        let err = std::fs::read_to_string(&err_path).unwrap_or_default();
        return Err(format!("fio failed ({status}): {}", tail(&err, &text)));
    }
    parse(&text).map_err(|e| format!("{e} (fio output in {})", out_path.display()))
}

fn tail(err: &str, out: &str) -> String {
    let s = if err.trim().is_empty() { out } else { err };
    let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(3)..].join(" | ")
}

/// Parses fio's `--output-format=json` (the first job).
pub fn parse(text: &str) -> Result<Measure, String> {
    // fio may print notes before the JSON object.
    let start = text.find('{').ok_or("no JSON in fio's output")?;
    let v: Value = serde_json::from_str(&text[start..]).map_err(|e| format!("fio JSON: {e}"))?;
    let job = v.get("jobs").and_then(|j| j.get(0)).ok_or("fio JSON without jobs")?;
    if let Some(e) = job.get("error").and_then(Value::as_i64)
        && e != 0
    {
        return Err(format!("fio job error {e}"));
    }
    let f = |d: &Value, k: &str| d.get(k).and_then(Value::as_f64).unwrap_or(0.0);
    let read = job.get("read").ok_or("no read section")?;
    let write = job.get("write").ok_or("no write section")?;
    let (ri, wi) = (f(read, "iops"), f(write, "iops"));
    let bw = f(read, "bw_bytes") + f(write, "bw_bytes");
    let ios = f(read, "total_ios") + f(write, "total_ios");
    let lat_side = if ri > 0.0 || wi == 0.0 { read } else { write };
    let clat = lat_side.get("clat_ns");
    let pct = |p: &str| {
        clat.and_then(|c| c.get("percentile"))
            .and_then(|c| c.get(p))
            .and_then(Value::as_f64)
            .unwrap_or(0.0)
            / 1000.0
    };
    let runtime_ms = f(read, "runtime").max(f(write, "runtime"));
    Ok(Measure {
        iops: ri + wi,
        read_iops: ri,
        write_iops: wi,
        mib_s: bw / (1u64 << 20) as f64,
        ios: ios as u64,
        lat_mean_us: clat.map_or(0.0, |c| f(c, "mean")) / 1000.0,
        lat_p50_us: pct("50.000000"),
        lat_p99_us: pct("99.000000"),
        lat_p999_us: pct("99.900000"),
        runtime_s: runtime_ms / 1000.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fio_json() {
        let text = r#"note: both iodepth >= 1 and synchronous I/O engine
{"fio version":"fio-3.33","jobs":[{"jobname":"x","error":0,
 "read":{"iops":1000.5,"bw_bytes":4098048,"total_ios":5002,"runtime":5000,
   "clat_ns":{"mean":25000.0,"percentile":{"50.000000":24000,"99.000000":40000,"99.900000":60000}}},
 "write":{"iops":0.0,"bw_bytes":0,"total_ios":0,"runtime":0,"clat_ns":{"mean":0.0}}}]}"#;
        let m = parse(text).unwrap();
        assert_eq!(m.iops, 1000.5);
        assert_eq!(m.ios, 5002);
        assert_eq!(m.lat_p50_us, 24.0);
        assert_eq!(m.lat_p999_us, 60.0);
        assert_eq!(m.runtime_s, 5.0);
    }

    #[test]
    fn every_job_has_a_unique_name() {
        let js = jobs();
        let mut names: Vec<_> = js.iter().map(|j| j.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), js.len());
    }
}
