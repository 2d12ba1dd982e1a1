//! The command line as users meet it: config errors that name the file and key,
//! start-up failures that name the disk or address, the quick-start, and a clean
//! drain-and-flush on SIGTERM.

use std::process::Command;
use std::time::Duration;

use appliance_tests::{Appliance, Setup, bin, require_tool, run, run_unchecked, sparse_file};

fn check_config_fails(config: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, config.replace("{dir}", &dir.path().display().to_string())).unwrap();
    let out =
        run_unchecked(Command::new(bin()).arg("check-config").arg(&path), Duration::from_secs(30));
    assert!(!out.status.success(), "check-config accepted a bad config:\n{config}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn serve_fails(config: &str) -> String {
    serve_fails_with(config, &[])
}

fn serve_fails_with(config: &str, args: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, config.replace("{dir}", &dir.path().display().to_string())).unwrap();
    std::fs::write(dir.path().join("ok.img"), [0u8; 4096]).unwrap();
    let out = run_unchecked(
        Command::new(bin()).args(["serve"]).args(args).arg("--config").arg(&path),
        Duration::from_secs(30),
    );
    assert!(!out.status.success(), "serve accepted a bad config:\n{config}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn config_errors_name_the_key_and_position() {
    let e = serve_fails("[appliance]\nidle = \"busy\"\nturbo = true\n");
    assert!(e.contains("bad.toml") && e.contains("turbo") && e.contains("line 3"), "{e}");
    // A missing image is a config error for check-config; `serve` opens the other disks
    // (tests/tests/isolation.rs) unless --strict.
    let e = check_config_fails("[[disk]]\nname = \"a\"\npath = \"{dir}/missing.img\"\n");
    assert!(
        e.contains("bad.toml:3:") && e.contains("disk[0].path") && e.contains("missing.img"),
        "{e}"
    );
    let e =
        serve_fails_with("[[disk]]\nname = \"a\"\npath = \"{dir}/missing.img\"\n", &["--strict"]);
    assert!(e.contains("disk `a`") && e.contains("missing.img"), "{e}");
    let e = serve_fails(
        "[[disk]]\nname = \"a\"\npath = \"{dir}/ok.img\"\n[[disk]]\nname = \"a\"\npath = \"{dir}/ok.img\"\n",
    );
    assert!(e.contains("disk[1].name") && e.contains("already defined"), "{e}");
    let e = serve_fails("[appliance]\ncores = [4096]\n");
    assert!(e.contains("appliance.cores") && e.contains("4096"), "{e}");
    let e = serve_fails("[nbd]\nlisten = [\"unix:{dir}/s\", \"unix:{dir}/s\"]\n");
    assert!(e.contains("nbd.listen") && e.contains("twice"), "{e}");
    let e = serve_fails("[[disk]]\nname = \"a\"\npath = \"{dir}/ok.img\"\ndriver = \"spdk\"\n");
    assert!(e.contains("disk[0].driver") && e.contains("spdk"), "{e}");
    let e = serve_fails("[[disk]]\nname = \"a\"\npath = \"{dir}/ok.img\"\ndirect = \"yes\"\n");
    assert!(e.contains("direct") && e.contains("line 4"), "{e}");
    let missing = run_unchecked(
        Command::new(bin()).args(["serve", "--config", "/nonexistent/appliance.toml"]),
        Duration::from_secs(30),
    );
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/appliance.toml"));
}

#[test]
fn start_up_failures_name_the_address_or_disk() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let e = serve_fails(&format!(
        "[nbd]\nlisten = [\"tcp:127.0.0.1:{port}\"]\n[[disk]]\nname = \"a\"\npath = \"{{dir}}/ok.img\"\n"
    ));
    assert!(e.contains(&format!("127.0.0.1:{port}")), "{e}");
    // A disk that exists but cannot be opened read-write, with --strict (without it,
    // the disk is reported and the others are served: tests/tests/isolation.rs).
    let e = serve_fails_with("[[disk]]\nname = \"a\"\npath = \"/proc/version\"\n", &["--strict"]);
    assert!(e.contains("disk `a`") || e.contains("disk[0].path"), "{e}");
    // A unix socket path where a regular file already lives.
    let e = serve_fails(
        "[nbd]\nlisten = [\"unix:{dir}/ok.img\"]\n[[disk]]\nname = \"a\"\npath = \"{dir}/ok.img\"\n",
    );
    assert!(e.contains("not a socket"), "{e}");
}

#[test]
fn quick_start_creates_and_serves_a_demo_disk() {
    require_tool("qemu-io", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(bin())
        .arg("serve")
        .current_dir(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let sock = dir.path().join("appliance-data/nbd.sock");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(std::time::Instant::now() < deadline, "quick-start did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    let img = dir.path().join("appliance-data/demo.qcow2");
    assert!(std::fs::metadata(&img).is_ok(), "demo image created");
    let uri = format!("nbd+unix:///demo?socket={}", sock.display());
    let out = run(Command::new("qemu-img").args(["info", "--output=json", &uri]));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["virtual-size"], 1u64 << 30);
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x42 0 64k", &uri]));
    // SAFETY: kill(2) with the pid of our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    assert!(status.success(), "SIGINT exits 0");
    let mut out = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut out).unwrap();
    assert!(out.contains("nbd+unix:///demo?socket="), "prints how to connect: {out}");
    let out =
        run(Command::new("qemu-io").args(["-f", "qcow2", "-c", "read -P 0x42 0 64k"]).arg(&img));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("failed"), "data is in the qcow2 image");
    let check = run(Command::new("qemu-img").args(["check"]).arg(&img));
    assert!(check.status.success(), "the demo image is clean after shutdown");
}

#[test]
fn sigterm_drains_flushes_and_exits_zero() {
    require_tool("fio", "fio");
    let disks = "[[disk]]\nname = \"d\"\npath = \"{dir}/d.img\"\n".to_string();
    let mut a = Appliance::start(Setup { cores: "[0, 1]", disks, ..Setup::default() }, |dir| {
        sparse_file(&dir.join("d.img"), 64 << 20)
    });
    // A write that was acknowledged must be in the file after shutdown.
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x77 1M 1M", &a.uri("d")]));
    // Load in flight while SIGTERM arrives.
    let mut fio = Command::new("fio")
        .args([
            "--name=load",
            "--ioengine=nbd",
            &format!("--uri={}", a.uri("d")),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            "--size=16M",
            "--offset=16M",
            "--time_based",
            "--runtime=30",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let t0 = std::time::Instant::now();
    let status = a.stop();
    assert!(status.success(), "exit status {status}:\n{}", a.logs());
    assert!(t0.elapsed() < Duration::from_secs(20), "shutdown took {:?}", t0.elapsed());
    let _ = fio.kill();
    let _ = fio.wait();
    let logs = a.logs();
    assert!(logs.contains("draining") && logs.contains("stopped"), "{logs}");
    let data = std::fs::read(a.path("d.img")).unwrap();
    assert!(data[1 << 20..2 << 20].iter().all(|&b| b == 0x77), "acknowledged write survived");
}

/// A panic on one reactor ends the whole process at once, with the message and
/// SIGABRT: the other reactor's clients see their connections close instead of a
/// half-dead appliance that hangs some disks.
#[test]
fn a_panic_on_one_reactor_ends_the_whole_process() {
    use std::os::unix::process::ExitStatusExt;
    let disks = "[[disk]]\nname = \"d\"\npath = \"{dir}/d.img\"\n".to_string();
    let mut a = Appliance::start(
        Setup {
            cores: "[0, 1]",
            disks,
            env: vec![("APPLIANCE_DEBUG_PANIC_OFFSET", (8 << 20).to_string())],
            ..Setup::default()
        },
        |dir| sparse_file(&dir.join("d.img"), 64 << 20),
    );
    // Two connections land on the two reactors (round robin); the first stays idle.
    let mut idle =
        appliance_tests::nbd_client::Client::connect(&a.sock, "d", false, false).unwrap();
    let out = run_unchecked(
        Command::new("qemu-io").args(["-f", "raw", "-c", "write 8M 4k", &a.uri("d")]),
        Duration::from_secs(30),
    );
    assert!(!out.status.success() || !String::from_utf8_lossy(&out.stdout).contains("wrote"));
    let status = a.wait_exit(Duration::from_secs(20)).expect("the process ended");
    assert_eq!(status.signal(), Some(libc::SIGABRT), "{status:?}");
    assert!(a.logs().contains("deliberate panic"), "{}", a.logs());
    idle.s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 1];
    let r = std::io::Read::read(&mut idle.s, &mut b);
    let timed_out = r.as_ref().is_err_and(|e| {
        matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
    });
    assert!(matches!(r, Ok(0) | Err(_)) && !timed_out, "the other connection is closed: {r:?}");
}
