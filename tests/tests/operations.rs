//! Operations: the Prometheus endpoint scraped while fio runs, the control socket and
//! `appliance ctl` (add, serve, remove idle and busy, flush, QoS, config), QoS limits
//! measured by fio, SIGHUP reloads, readiness notification, and hostile control input.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use appliance_tests::nbd_client::{CMD_WRITE, Client};
use appliance_tests::ops::{
    control_extra, ctl, ctl_ok, rpc, rpc_error, rpc_raw, sample, scrape, scrape_until,
};
use appliance_tests::{
    Appliance, Setup, bin, free_port, require_tool, run, run_unchecked, sparse_file, stdout,
};
use serde_json::{Value, json};

const MIB: u64 = 1 << 20;

fn raw_disk(name: &str, extra: &str) -> String {
    format!("[[disk]]\nname = \"{name}\"\npath = \"{{dir}}/{name}.img\"\n{extra}\n")
}

fn fio_json(out: &Output) -> Value {
    let text = stdout(out);
    let start = text.find("{\n").or_else(|| text.find('{')).expect("fio json");
    serde_json::from_str(&text[start..]).expect("fio json")
}

/// Runs fio against an NBD URI; returns its JSON report.
fn fio(uri: &str, args: &[&str]) -> Value {
    let out = run(Command::new("fio")
        .args(["--name=t", "--ioengine=nbd", &format!("--uri={uri}"), "--output-format=json"])
        .args(args));
    let j = fio_json(&out);
    assert_eq!(j["jobs"][0]["error"], 0, "fio reported an error: {}", stdout(&out));
    j
}

fn qemu_img_check(path: &Path) {
    let out = run_unchecked(
        Command::new("qemu-img").args(["check", "--output=json", "-f", "qcow2"]).arg(path),
        Duration::from_secs(120),
    );
    let j: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!("qemu-img check: {}{}", stdout(&out), String::from_utf8_lossy(&out.stderr))
    });
    assert_eq!(j["corruptions"].as_u64().unwrap_or(0), 0, "{j}");
    assert_eq!(j["leaks"].as_u64().unwrap_or(0), 0, "{j}");
    assert!(out.status.success(), "{j}");
}

fn qemu_img_create(path: &Path, size: &str) {
    run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(path).arg(size));
}

#[test]
fn metrics_move_by_what_fio_reports() {
    require_tool("fio", "fio");
    require_tool("qemu-img", "qemu-utils");
    let port = free_port();
    let a = Appliance::start(
        Setup {
            cores: "[0, 1]",
            extra: control_extra(Some(port)),
            disks: raw_disk("d", "")
                + "[[disk]]\nname = \"q\"\npath = \"{dir}/q.qcow2\"\nformat = \"qcow2\"\n",
            ..Setup::default()
        },
        |dir| {
            sparse_file(&dir.join("d.img"), 64 * MIB);
            qemu_img_create(&dir.join("q.qcow2"), "64M");
        },
    );
    let w = [("disk", "d"), ("export", "nbd"), ("op", "write")];
    let r = [("disk", "d"), ("export", "nbd"), ("op", "read")];

    // Writes: an exact count, compared with fio's own.
    let j = fio(&a.uri("d"), &["--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=16M"]);
    let ios = j["jobs"][0]["write"]["total_ios"].as_u64().unwrap();
    let bytes = j["jobs"][0]["write"]["io_bytes"].as_u64().unwrap();
    assert_eq!(bytes, 16 * MIB);
    let text =
        scrape_until(port, "fio's writes", |t| sample(t, "appliance_ops_total", &w) == ios as f64);
    assert_eq!(sample(&text, "appliance_bytes_total", &w), bytes as f64);
    assert_eq!(sample(&text, "appliance_errors_total", &w), 0.0);
    assert_eq!(sample(&text, "appliance_latency_seconds_count", &w), ios as f64);
    let inf = [("disk", "d"), ("export", "nbd"), ("op", "write"), ("le", "+Inf")];
    assert_eq!(
        sample(&text, "appliance_latency_seconds_bucket", &inf),
        ios as f64,
        "histogram +Inf bucket"
    );
    assert!(sample(&text, "appliance_latency_seconds_sum", &w) > 0.0);
    assert!(sample(&text, "appliance_reactor_busy_ticks_total", &[]) > 0.0);
    assert!(sample(&text, "appliance_reactor_messages_total", &[]) > 0.0);

    // Reads, scraped while fio runs: counters only grow and the final value is fio's.
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let scraper = {
        let (stop, seen) = (stop.clone(), seen.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let t = scrape(port);
                seen.lock().unwrap().push((
                    sample(&t, "appliance_ops_total", &r),
                    sample(&t, "appliance_in_flight", &[("disk", "d"), ("export", "nbd")]),
                ));
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    let j = fio(
        &a.uri("d"),
        &["--rw=randread", "--bs=4k", "--iodepth=32", "--size=64M", "--runtime=3", "--time_based"],
    );
    stop.store(true, Ordering::SeqCst);
    scraper.join().unwrap();
    let ios = j["jobs"][0]["read"]["total_ios"].as_u64().unwrap();
    let text =
        scrape_until(port, "fio's reads", |t| sample(t, "appliance_ops_total", &r) == ios as f64);
    assert_eq!(sample(&text, "appliance_bytes_total", &r), (ios * 4096) as f64);
    let seen = seen.lock().unwrap();
    assert!(seen.windows(2).all(|w| w[0].0 <= w[1].0), "a counter went backwards: {seen:?}");
    assert!(
        seen.iter().any(|&(v, _)| v > 0.0 && v < ios as f64),
        "no scrape during the run saw the reads in progress: {seen:?}"
    );
    assert!(seen.iter().any(|&(_, f)| f > 0.0), "in-flight depth never seen above 0: {seen:?}");

    // qcow2: allocations and cache activity are counted per image.
    // The writes allocate; whether one of them finds its L2 table already cached depends
    // on how they batch, but reading the clusters back looks each up in the table the
    // writes left cached.
    fio(&a.uri("q"), &["--rw=write", "--bs=64k", "--iodepth=4", "--size=8M"]);
    fio(&a.uri("q"), &["--rw=read", "--bs=64k", "--iodepth=4", "--size=8M"]);
    let q = [("disk", "q")];
    scrape_until(port, "qcow2 allocations and L2 cache hits", |t| {
        sample(t, "appliance_qcow2_clusters_allocated_total", &q) >= 128.0
            && sample(t, "appliance_qcow2_l2_cache_hits_total", &q) > 0.0
    });

    // The control socket's stats agree.
    let s = rpc(&a, "stats", json!({"name": "d"}));
    assert_eq!(s["result"]["disks"]["d"]["nbd"]["ops"]["read"]["ops"], ios, "{s}");
}

#[test]
fn disks_are_added_served_and_removed_through_ctl() {
    require_tool("fio", "fio");
    require_tool("qemu-img", "qemu-utils");
    let a = Appliance::start(
        Setup {
            cores: "[0, 1]",
            extra: control_extra(None),
            disks: raw_disk("base", ""),
            // Keeps requests in flight when the removal comes.
            env: vec![("APPLIANCE_DEBUG_DELAY_US", "1000".into())],
            ..Setup::default()
        },
        |dir| {
            sparse_file(&dir.join("base.img"), 16 * MIB);
            qemu_img_create(&dir.join("vm.qcow2"), "256M");
        },
    );
    let mode = std::fs::metadata(a.path("control.sock")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "control socket is owner-only");

    let img = a.path("vm.qcow2");
    ctl_ok(&a, &["add", "name=vm", &format!("path={}", img.display()), "format=qcow2"]);
    let list = ctl_ok(&a, &["list"]);
    assert!(
        list.lines().any(|l| l.starts_with("vm ") && l.contains("qcow2") && l.contains("nbd")),
        "{list}"
    );
    let j: Value = serde_json::from_str(&ctl_ok(&a, &["list", "--json"])).unwrap();
    assert_eq!(j.as_array().unwrap().len(), 2);
    assert_eq!(j[1]["size"], 256 * MIB);

    // Served: fio writes and verifies through it.
    fio(
        &a.uri("vm"),
        &[
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--size=32M",
            "--verify=crc32c",
            "--verify_state_save=0",
            "--do_verify=1",
            "--verify_fatal=1",
        ],
    );
    let cfg = ctl_ok(&a, &["config"]);
    assert!(cfg.contains("name = \"vm\""), "{cfg}");
    ctl_ok(&a, &["flush", "vm"]);

    // Removed while idle: gone from the export list, image closed clean.
    ctl_ok(&a, &["remove", "vm"]);
    let out = run_unchecked(
        Command::new("qemu-io").args(["-f", "raw", "-c", "read 0 4k", &a.uri("vm")]),
        Duration::from_secs(60),
    );
    assert!(!out.status.success(), "a removed export still serves");
    qemu_img_check(&img);
    let info = stdout(&run(Command::new("qemu-img").args(["info", "--output=json"]).arg(&img)));
    assert!(!info.contains("\"dirty-flag\": true"), "dirty bit left set: {info}");

    // Removed while busy: a pipelined writer keeps 16 writes in flight; removal waits
    // for those the appliance accepted and answers them; every acknowledged write is
    // in the image afterwards.
    ctl_ok(&a, &["add", "name=vm", &format!("path={}", img.display()), "format=qcow2"]);
    let sock = a.sock.clone();
    let writer = std::thread::spawn(move || pipelined_writer(&sock, "vm", 16));
    std::thread::sleep(Duration::from_millis(1500));
    let t0 = Instant::now();
    ctl_ok(&a, &["remove", "vm"]);
    let removal = t0.elapsed();
    let acked = writer.join().unwrap();
    assert!(acked.len() > 100, "the writer made progress before removal: {}", acked.len());
    qemu_img_check(&img);
    let raw = a.path("vm.raw");
    run(Command::new("qemu-img").args(["convert", "-f", "qcow2", "-O", "raw"]).arg(&img).arg(&raw));
    let data = std::fs::read(&raw).unwrap();
    for &(block, byte) in &acked {
        let off = block as usize * 4096;
        assert!(
            data[off..off + 4096].iter().all(|&b| b == byte),
            "acknowledged write to block {block} lost (removal took {removal:?})"
        );
    }
    assert!(a.logs().contains("disk removed"), "{}", a.logs());
}

/// Writes 4 KiB blocks (block i filled with a byte derived from i) with `depth` in
/// flight until the connection closes; returns the acknowledged (block, byte) pairs.
fn pipelined_writer(sock: &Path, export: &str, depth: u64) -> Vec<(u64, u8)> {
    use std::sync::atomic::AtomicU64;
    let mut c = Client::connect(sock, export, false, false).expect("connect");
    let mut rx = Client {
        s: c.s.try_clone().unwrap(),
        structured: false,
        extended: false,
        size: c.size,
        flags: 0,
    };
    let answered = Arc::new(AtomicU64::new(0));
    let closed = Arc::new(AtomicBool::new(false));
    let reader = {
        let (answered, closed) = (answered.clone(), closed.clone());
        std::thread::spawn(move || {
            let mut acked = Vec::new();
            while let Ok(r) = rx.reply(0) {
                assert_eq!(r.error, 0, "a write failed during removal");
                acked.push((r.cookie, (r.cookie % 251) as u8 + 1));
                answered.fetch_add(1, Ordering::SeqCst);
            }
            closed.store(true, Ordering::SeqCst);
            acked
        })
    };
    let blocks = c.size / 4096;
    let mut next = 0u64;
    let start = Instant::now();
    while next < blocks
        && !closed.load(Ordering::SeqCst)
        && start.elapsed() < Duration::from_secs(60)
    {
        if next - answered.load(Ordering::SeqCst) >= depth {
            std::thread::sleep(Duration::from_micros(100));
            continue;
        }
        let byte = (next % 251) as u8 + 1;
        if c.request(CMD_WRITE, 0, next, next * 4096, 4096, &[byte; 4096]).is_err() {
            break;
        }
        next += 1;
    }
    reader.join().unwrap()
}

#[test]
fn qos_limits_hold_within_ten_percent_and_lift_live() {
    require_tool("fio", "fio");
    let a = Appliance::start(
        Setup {
            cores: "[0, 1]",
            extra: control_extra(None),
            disks: "[[disk]]\nname = \"n\"\ndriver = \"null\"\nsize = \"1GiB\"\n[disk.qos]\niops = 2000\n".into(),
            ..Setup::default()
        },
        |_| {},
    );
    let iops = |j: &Value| {
        j["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["read"]["iops"].as_f64().unwrap())
            .sum::<f64>()
    };
    // Two connections share the disk's budget.
    let args = [
        "--rw=randread",
        "--bs=4k",
        "--iodepth=16",
        "--numjobs=2",
        "--ramp_time=1",
        "--runtime=4",
        "--time_based",
    ];
    let limited = iops(&fio(&a.uri("n"), &args));
    assert!(
        (1800.0..=2200.0).contains(&limited),
        "IOPS {limited} not within 10% of the 2000 limit"
    );

    // Changed live: a new limit holds for the connection already running.
    let sock = a.sock.clone();
    let uri = a.uri("n");
    let run_long = std::thread::spawn(move || {
        let _ = sock;
        fio(&uri, &["--rw=randread", "--bs=4k", "--iodepth=16", "--runtime=6", "--time_based"])
    });
    std::thread::sleep(Duration::from_secs(2));
    ctl_ok(&a, &["qos", "n", "--iops", "0"]);
    let j = run_long.join().unwrap();
    let lifted = iops(&j);
    assert!(lifted > 3.0 * 2000.0, "IOPS {lifted} did not rise when the limit was lifted");

    // Bandwidth limit.
    ctl_ok(&a, &["qos", "n", "--bandwidth", "20MiB/s"]);
    let j = fio(
        &a.uri("n"),
        &[
            "--rw=randread",
            "--bs=64k",
            "--iodepth=8",
            "--ramp_time=1",
            "--runtime=4",
            "--time_based",
        ],
    );
    let bw = j["jobs"][0]["read"]["bw_bytes"].as_f64().unwrap();
    let limit = 20.0 * MIB as f64;
    assert!((bw - limit).abs() <= 0.1 * limit, "bandwidth {bw} not within 10% of {limit}");
    let list: Value = serde_json::from_str(&ctl_ok(&a, &["list", "--json"])).unwrap();
    assert_eq!(list[0]["qos"]["bandwidth"], 20 * MIB, "{list}");
    // Throttled requests wait; none fail (fio reports no errors above).
}

#[test]
fn sighup_applies_the_config_file() {
    require_tool("qemu-io", "qemu-utils");
    let mut a = Appliance::start(
        Setup {
            extra: control_extra(None),
            disks: raw_disk("a", "") + &raw_disk("b", ""),
            ..Setup::default()
        },
        |dir| {
            for n in ["a", "b", "c"] {
                sparse_file(&dir.join(format!("{n}.img")), 8 * MIB);
            }
        },
    );
    let cfg = a.path("appliance.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let b = raw_disk("b", "").replace("{dir}", &a.dir.path().display().to_string());
    let c = raw_disk("c", "[disk.qos]\niops = 100")
        .replace("{dir}", &a.dir.path().display().to_string());
    assert!(text.contains(&b));
    std::fs::write(&cfg, text.replace(&b, &c)).unwrap();
    // SAFETY: kill(2) on the child we started.
    unsafe { libc::kill(a.pid() as i32, libc::SIGHUP) };
    let deadline = Instant::now() + Duration::from_secs(20);
    let names = |a: &Appliance| -> Vec<String> {
        let v: Value = serde_json::from_str(&ctl_ok(a, &["list", "--json"])).unwrap();
        v.as_array().unwrap().iter().map(|d| d["name"].as_str().unwrap().to_string()).collect()
    };
    while names(&a) != ["a", "c"] {
        assert!(Instant::now() < deadline, "reload did not apply: {:?}\n{}", names(&a), a.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x5c 0 64k", &a.uri("c")]));
    let out = run_unchecked(
        Command::new("qemu-io").args(["-f", "raw", "-c", "read 0 4k", &a.uri("b")]),
        Duration::from_secs(60),
    );
    assert!(!out.status.success(), "b was removed from the file but still serves");
    let logs = a.logs();
    assert!(logs.contains("reload: added c") && logs.contains("reload: removed b"), "{logs}");

    // A broken file is reported and the running configuration stays.
    std::fs::write(&cfg, "[[disk]]\nname = 3\n").unwrap();
    // SAFETY: as above.
    unsafe { libc::kill(a.pid() as i32, libc::SIGHUP) };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !a.logs().contains("keeping the running configuration") {
        assert!(Instant::now() < deadline, "{}", a.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(names(&a), ["a", "c"]);
    let (code, msg) = rpc_error(&a, "reload", json!({}));
    assert_eq!(code, -32000);
    assert!(msg.contains("appliance.toml"), "{msg}");
    assert!(a.stop().success());
    let c = std::fs::read(a.path("c.img")).unwrap();
    assert!(c[..65536].iter().all(|&x| x == 0x5c), "c's write flushed at SIGTERM");
}

#[test]
fn hostile_control_requests_get_clear_errors() {
    require_tool("qemu-io", "qemu-utils");
    let a = Appliance::start(
        Setup { extra: control_extra(None), disks: raw_disk("a", ""), ..Setup::default() },
        |dir| sparse_file(&dir.join("a.img"), 8 * MIB),
    );
    let code = |r: &Value| r["error"]["code"].as_i64().unwrap_or(0);
    let msg = |r: &Value| r["error"]["message"].as_str().unwrap_or("").to_string();

    let r = rpc_raw(&a, "{\"jsonrpc\": \"2.0\", \"id\": 1, \"method\": ");
    assert_eq!(code(&r), -32700, "{r}");
    let r = rpc_raw(&a, "[1, 2]");
    assert_eq!(code(&r), -32600, "{r}");
    assert!(msg(&r).contains("batch"), "{r}");
    let r = rpc_raw(&a, "{\"jsonrpc\": \"1.0\", \"id\": 1, \"method\": \"disk_list\"}");
    assert_eq!(code(&r), -32600, "{r}");
    let r = rpc_raw(&a, "{\"jsonrpc\": \"2.0\", \"id\": {}, \"method\": \"disk_list\"}");
    assert_eq!(code(&r), -32600, "{r}");
    let r = rpc_raw(
        &a,
        "{\"jsonrpc\": \"2.0\", \"id\": 3, \"method\": \"disk_list\", \"params\": [1]}",
    );
    assert_eq!(code(&r), -32602, "{r}");

    let (c, m) = rpc_error(&a, "disk_explode", json!({}));
    assert_eq!(c, -32601);
    assert!(m.contains("disk_explode"), "{m}");
    let (c, m) = rpc_error(&a, "disk_remove", json!({"name": 5}));
    assert_eq!(c, -32602);
    assert!(m.contains("name"), "{m}");
    let (c, m) = rpc_error(&a, "disk_remove", json!({}));
    assert_eq!(c, -32602);
    assert!(m.contains("name"), "{m}");
    let (c, m) = rpc_error(&a, "disk_remove", json!({"name": "ghost"}));
    assert_eq!(c, -32000);
    assert!(m.contains("ghost"), "{m}");
    let (c, m) = rpc_error(&a, "disk_flush", json!({"name": "ghost", "force": true}));
    assert_eq!(c, -32602);
    assert!(m.contains("force"), "{m}");
    let (c, m) = rpc_error(&a, "qos_set", json!({"name": "a", "iops": "fast"}));
    assert_eq!(c, -32602);
    assert!(m.contains("iops"), "{m}");
    let (c, m) = rpc_error(&a, "qos_set", json!({"name": "a", "bandwidth": "lots"}));
    assert_eq!(c, -32602);
    assert!(m.contains("bandwidth"), "{m}");

    let missing = a.path("missing.img");
    let (c, m) = rpc_error(&a, "disk_add", json!({"name": "m", "path": missing}));
    assert_eq!(c, -32602);
    assert!(m.contains("path") && m.contains("missing.img"), "{m}");
    let (c, m) = rpc_error(&a, "disk_add", json!({"name": "a2", "path": a.path("a.img")}));
    assert_eq!(c, -32000);
    assert!(m.contains("a.img") && m.contains("already served"), "{m}");
    let (c, m) = rpc_error(&a, "disk_add", json!({"name": "a", "driver": "null", "size": 4096}));
    assert_eq!(c, -32000);
    assert!(m.contains("`a`") && m.contains("already"), "{m}");
    let (c, m) = rpc_error(
        &a,
        "disk_add",
        json!({"name": "x", "driver": "null", "size": 4096, "turbo": true}),
    );
    assert_eq!(c, -32602);
    assert!(m.contains("turbo"), "{m}");
    let (c, m) = rpc_error(&a, "disk_add", json!({"name": "x", "driver": "null", "size": null}));
    assert_eq!(c, -32602);
    assert!(m.contains("size"), "{m}");
    let (c, m) = rpc_error(&a, "disk_add", json!({"name": "x", "driver": "warp", "size": 4096}));
    assert_eq!(c, -32602);
    assert!(m.contains("driver") && m.contains("warp"), "{m}");
    let (c, m) = rpc_error(
        &a,
        "disk_add",
        json!({"name": "x", "driver": "null", "size": 4096, "vhost_user_blk": {"socket": a.path("control.sock")}}),
    );
    assert_eq!(c, -32000);
    assert!(m.contains("socket"), "{m}");

    // A notification gets no reply; the next request on the connection does.
    let mut s = UnixStream::connect(a.path("control.sock")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    writeln!(s, "{}", json!({"jsonrpc": "2.0", "method": "disk_list"})).unwrap();
    writeln!(s, "{}", json!({"jsonrpc": "2.0", "id": "x", "method": "disk_list"})).unwrap();
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).unwrap();
    let r: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(r["id"], "x", "{r}");
    // An oversized line is refused and the connection closed.
    let mut s = UnixStream::connect(a.path("control.sock")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let _ = s.write_all(&vec![b'x'; 2 << 20]);
    let mut line = String::new();
    let _ = BufReader::new(&s).read_line(&mut line);
    assert!(line.contains("-32600"), "{line}");

    // ctl reports the server's message and fails.
    let out = ctl(&a, &["remove", "ghost"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("ghost"));

    // Unaffected: the disk still serves and the list is unchanged.
    run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x11 0 4k",
        "-c",
        "read -P 0x11 0 4k",
        &a.uri("a"),
    ]));
    let v = rpc(&a, "disk_list", json!({}));
    assert_eq!(v["result"].as_array().unwrap().len(), 1, "{v}");
}

#[test]
fn readiness_is_signalled_to_systemd() {
    let dir = tempfile::tempdir().unwrap();
    let notify = dir.path().join("notify.sock");
    let listener = UnixDatagram::bind(&notify).unwrap();
    listener.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    sparse_file(&dir.path().join("a.img"), MIB);
    let cfg = dir.path().join("a.toml");
    let nbd: PathBuf = dir.path().join("nbd.sock");
    std::fs::write(
        &cfg,
        format!(
            "[appliance]\ncores = [0]\nbuffer_pool = \"16MiB\"\n[nbd]\nlisten = [\"unix:{}\"]\n{}",
            nbd.display(),
            raw_disk("a", "").replace("{dir}", &dir.path().display().to_string())
        ),
    )
    .unwrap();
    let mut child = Command::new(bin())
        .args(["serve", "--config"])
        .arg(&cfg)
        .env("NOTIFY_SOCKET", &notify)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 64];
    let n = listener.recv(&mut buf).expect("READY=1 within 30 s");
    assert_eq!(&buf[..n], b"READY=1");
    // Ready means listening.
    assert!(UnixStream::connect(&nbd).is_ok());
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
}
