//! Smoke tests of the load generator and the harness: every target and case runs for
//! about a second and produces well-formed output. Nothing here asserts a timing; the
//! one bound checked (a 2 ms per-request delay caps QD1 at 500 IOPS) cannot be broken
//! by a slow machine, only by a harness that does not measure the appliance.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

fn scratch() -> tempfile::TempDir {
    // Images need O_DIRECT: prefer /var/tmp, which is never a tmpfs on Debian.
    let base = Path::new("/var/tmp");
    if base.is_dir() {
        tempfile::Builder::new().prefix("bench-smoke-").tempdir_in(base).expect("tempdir")
    } else {
        tempfile::tempdir().expect("tempdir")
    }
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({})\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn loadgen(args: &[&str]) -> Value {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_loadgen"));
    cmd.args(["--json", "--no-pin"]).args(args);
    let out = run(&mut cmd);
    let v: Value = serde_json::from_slice(&out.stdout).expect("loadgen prints JSON");
    assert!(v["ios"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["errors"].as_u64(), Some(0), "{v}");
    for k in ["iops", "mib_s", "reactor_cpu_ns_per_io", "process_cpu_ns_per_io"] {
        assert!(v[k].as_f64().is_some_and(|x| x > 0.0), "{k} in {v}");
    }
    for k in ["p50_us", "p99_us", "p999_us"] {
        assert!(v["latency"][k].as_f64().is_some(), "{k} in {v}");
    }
    v
}

#[test]
fn loadgen_every_target() {
    let dir = scratch();
    let raw = dir.path().join("img.raw");
    std::fs::File::create(&raw).and_then(|f| f.set_len(64 << 20)).unwrap();
    let qcow2 = dir.path().join("img.qcow2");
    drivers::qcow2::create::create(
        &qcow2,
        &drivers::qcow2::create::CreateOptions { size: 64 << 20, ..Default::default() },
    )
    .unwrap();
    let raw_t = format!("raw:{}", raw.display());
    let qcow2_t = format!("qcow2:{}", qcow2.display());

    let v = loadgen(&["--target", "null", "--time", "1", "--reactors", "2"]);
    assert_eq!(v["reactors"].as_u64(), Some(2));
    assert_eq!(v["per_reactor"].as_array().map(Vec::len), Some(2));
    loadgen(&["--target", "mem", "--size", "64M", "--workload", "randrw", "--time", "1"]);
    let v = loadgen(&["--target", "null", "--ios", "10000", "--qd", "4", "--bs", "64k"]);
    assert_eq!(v["ios"].as_u64(), Some(10000));
    loadgen(&["--target", &raw_t, "--workload", "randwrite", "--time", "1"]);
    loadgen(&["--target", &raw_t, "--workload", "read", "--driver", "aio", "--time", "1"]);
    // Writes allocate clusters in the empty image, then reads find them.
    loadgen(&["--target", &qcow2_t, "--workload", "write", "--bs", "64k", "--time", "1"]);
    loadgen(&["--target", &qcow2_t, "--workload", "randrw", "--rwmixread", "50", "--time", "1"]);
    loadgen(&["--target", &qcow2_t, "--workload", "randread", "--idle", "adaptive", "--time", "1"]);
    let out = run(Command::new("qemu-img").args(["check", "-q"]).arg(&qcow2));
    assert!(out.status.success());

    let bad = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["--target", "raw:/nonexistent/file", "--time", "1"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
}

/// Processes whose command line mentions `needle` (servers left behind).
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else { continue };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(needle) {
            v.push(format!("{}: {cmd}", e.file_name().to_string_lossy()));
        }
    }
    v
}

fn harness(out: &Path, work: &Path, extra: &[&str]) -> PathBuf {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_harness"));
    cmd.arg("--smoke").arg("--out").arg(out).arg("--work-dir").arg(work).args(extra);
    run(&mut cmd);
    let left = processes_mentioning(&work.to_string_lossy());
    assert!(left.is_empty(), "the harness left processes behind: {left:?}");
    let latest = out.join("latest");
    assert!(latest.exists(), "{} missing", latest.display());
    latest
}

fn check_svg(p: &Path) {
    let s = std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"), "{}", p.display());
    assert_eq!(s.matches("<svg").count(), 1);
    // The stamp: kernel and tool versions.
    assert!(s.contains("fio-"), "{} lacks the tool stamp", p.display());
}

#[test]
fn harness_smoke() {
    let dir = scratch();
    let out = dir.path().join("results");
    let work = dir.path().join("work");
    let latest = harness(&out, &work, &[]);

    let md = std::fs::read_to_string(latest.join("results.md")).unwrap();
    assert!(md.contains("| job | format |") && md.contains("appliance/qsd"), "{md}");
    check_svg(&latest.join("iops.svg"));
    check_svg(&latest.join("ratios.svg"));

    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(latest.join("results.json")).unwrap())
            .expect("results.json parses");
    let jobs = bench::fio::jobs();
    let cases = v["cases"].as_array().expect("cases");
    assert_eq!(cases.len(), jobs.len() * 2, "one case per job and format");
    for job in &jobs {
        for format in ["raw", "qcow2"] {
            let c = cases
                .iter()
                .find(|c| c["job"] == job.name && c["format"] == format)
                .unwrap_or_else(|| panic!("no case {} {format}", job.name));
            for server in ["appliance", "qsd", "qemu-nbd", "device", "device-client-core", "null"] {
                let s = &c["servers"][server];
                assert_eq!(s["failures"].as_u64(), Some(0), "{} {format} {server}", job.name);
                assert!(
                    s["iops"]["median"].as_f64().is_some_and(|x| x > 0.0),
                    "{} {format} {server}",
                    job.name
                );
            }
            for ratio in [
                "appliance/qsd",
                "appliance/qemu-nbd",
                "appliance/device",
                "appliance/device-client-core",
                "appliance/null",
                "appliance/limit",
            ] {
                assert!(
                    c["ratios"][ratio]["spread"]["median"].as_f64().is_some(),
                    "{} {ratio}",
                    job.name
                );
            }
        }
    }
    let runs = v["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), jobs.len() * 9);
    assert!(runs.iter().all(|r| r["error"].is_null()));
    // The limit of a round is the lower of the device (the better of its two cores)
    // and the null disk.
    for c in cases {
        let per = |k: &str| c["servers"][k]["per_round_iops"][0].as_f64().unwrap();
        let limit = per("device").max(per("device-client-core")).min(per("null"));
        let ratio = c["ratios"]["appliance/limit"]["per_round"][0].as_f64().unwrap();
        assert!((ratio - per("appliance") / limit).abs() < 1e-9, "{c}");
        // QD1 jobs, and only they, also get the serial limit: the device's time and the
        // transport's added.
        let qd1 = jobs.iter().any(|j| j.name == c["job"] && j.iodepth == 1);
        let serial = &c["ratios"]["appliance/serial-limit"];
        assert_eq!(serial.is_null(), !qd1, "{c}");
        if qd1 {
            let dev = per("device").max(per("device-client-core"));
            let limit = 1.0 / (1.0 / dev + 1.0 / per("null"));
            let ratio = serial["per_round"][0].as_f64().unwrap();
            assert!((ratio - per("appliance") / limit).abs() < 1e-9, "{c}");
        }
    }
    assert!(md.contains("appliance/serial-limit"), "{md}");
    // Every run on a file knows how busy its disk was (the work directory is on a
    // block device here); the null disk's runs leave it idle.
    for r in runs.iter().filter(|r| r["server"] == "device" || r["server"] == "device-client-core")
    {
        assert!(r["disk_queue"].as_f64().is_some_and(|q| q > 0.0), "{r}");
        assert!(r["disk_us_per_request"].as_f64().is_some_and(|t| t > 0.0), "{r}");
    }
    for key in ["nproc", "cpu_model", "kernel", "memory", "fio", "qemu", "appliance_commit", "date"]
    {
        assert!(v["stamp"][key].is_string() || v["stamp"][key].is_number(), "stamp.{key}");
    }
    let left: Vec<_> = std::fs::read_dir(&work).unwrap().flatten().map(|e| e.path()).collect();
    assert!(left.is_empty(), "the harness left its work files behind: {left:?}");
}

#[test]
fn slowed_appliance_shows() {
    let dir = scratch();
    let out = dir.path().join("results");
    let work = dir.path().join("work");
    let latest = harness(
        &out,
        &work,
        &[
            "--jobs",
            "randread-4k-qd1",
            "--formats",
            "raw",
            "--servers",
            "appliance,qsd",
            "--slow-appliance",
            "2000",
        ],
    );
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(latest.join("results.json")).unwrap())
            .unwrap();
    assert_eq!(v["options"]["slow_appliance_us"].as_u64(), Some(2000));
    let c = &v["cases"][0];
    // Every request waits at least 2 ms and fio keeps one in flight: at most 500 IOPS,
    // however fast or slow the machine.
    let iops = c["servers"]["appliance"]["iops"]["median"].as_f64().unwrap();
    assert!(iops > 0.0 && iops < 600.0, "a 2 ms delay at QD1 allows 500 IOPS, measured {iops}");
    let md = std::fs::read_to_string(latest.join("results.md")).unwrap();
    assert!(md.contains("APPLIANCE_DEBUG_DELAY_US=2000"));
}

#[test]
fn dmaprobe_times_all_four_copies() {
    let dir = scratch();
    let file = dir.path().join("probe.img");
    let out = run(Command::new(env!("CARGO_BIN_EXE_dmaprobe")).args([
        "--file",
        file.to_str().unwrap(),
        "--iterations",
        "20",
        "--size",
        "16384",
    ]));
    let text = String::from_utf8_lossy(&out.stdout);
    let times: Vec<f64> = text
        .split_whitespace()
        .filter_map(|w| w.trim_end_matches([';', ')']).parse::<f64>().ok())
        .collect();
    // "copy of 16 KiB, 2 buffers: ... 4 times in us".
    assert_eq!(times.len(), 6, "size, buffers and four times in {text:?}");
    assert!(times[2..].iter().all(|&t| t > 0.0), "{text}");
    assert!(!file.exists(), "the scratch file is removed");
    let bad = Command::new(env!("CARGO_BIN_EXE_dmaprobe"))
        .args(["--file", file.to_str().unwrap(), "--size", "1000"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("multiple of 4096"), "{bad:?}");
    for args in [["--size", "134217728"], ["--buffers", "0"], ["--buffers", "1000000000000"]] {
        let bad = Command::new(env!("CARGO_BIN_EXE_dmaprobe"))
            .args(["--file", file.to_str().unwrap()])
            .args(args)
            .output()
            .unwrap();
        assert_eq!(bad.status.code(), Some(1), "an error, not a panic: {args:?} {bad:?}");
        assert!(!file.exists(), "{args:?}");
    }
    // An existing file is never overwritten.
    std::fs::write(&file, b"keep").unwrap();
    let exists = Command::new(env!("CARGO_BIN_EXE_dmaprobe"))
        .args(["--file", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!exists.status.success(), "{exists:?}");
    assert_eq!(std::fs::read(&file).unwrap(), b"keep");
}
