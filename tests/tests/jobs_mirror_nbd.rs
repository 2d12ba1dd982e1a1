//! Mirrors to a remote NBD server: a second appliance (and qemu-nbd, which takes one
//! client at a time), reached by the appliance's own NBD client on its reactors.
//!
//! Under a writer's load the mirror to another appliance becomes ready and pivots; the
//! disk is then served from the remote export (every write reads back through it, and
//! the remote image checks clean). The same to qemu-nbd under fio (verify=crc32c) and
//! the writer, both running through the pivot. A ready mirror to qemu-nbd cancelled
//! leaves a copy equal to the source. A target server killed mid-mirror ends the job with the error
//! (`report`) or stops it until `job_resume` once the server is back (`stop`), while the
//! disk keeps serving; bad URIs and a mirror into the disk's own export are refused.

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use appliance_tests::jobs::*;
use appliance_tests::ops::rpc;
use appliance_tests::{Appliance, Setup, require_tool, run, run_unchecked, stdout};
use serde_json::json;

/// A second appliance serving an empty 128 MiB qcow2 image as export `tgt`.
fn remote() -> Appliance {
    let setup = Setup {
        disks: "[[disk]]\nname = \"tgt\"\npath = \"{dir}/tgt.qcow2\"\nformat = \"qcow2\"\n".into(),
        ..Setup::default()
    };
    Appliance::start(setup, |dir| {
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(dir.join("tgt.qcow2"))
            .arg("128M"));
    })
}

fn uri(sock: &Path, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", sock.display())
}

/// qemu-nbd serving `file` (raw) on `sock`, persistently, one client at a time.
fn qemu_nbd(file: &Path, sock: &Path) -> Child {
    qemu_nbd_as(file, "raw", sock)
}

fn qemu_nbd_as(file: &Path, format: &str, sock: &Path) -> Child {
    let args = ["-f", format, "-t", "-x", "t", "--cache=none"];
    appliance_tests::qemu_nbd::start(&args, file, appliance_tests::qemu_nbd::Listen::Unix(sock))
}

#[test]
fn mirror_to_another_appliance_pivots_and_serves_from_it() {
    let b = remote();
    let a = start_vm();
    let writer = Writer::start(&a.sock);
    let job = start_mirror(&a, json!({"disk": "vm", "target": uri(&b.sock, "tgt")}));
    let j = wait_state(&a, &job, &["ready"], Duration::from_secs(90));
    assert!(j["target"].as_str().unwrap().starts_with("nbd+unix://"), "{j}");
    assert!(rpc(&a, "job_complete", json!({"job": job}))["result"].is_object());
    wait_state(&a, &job, &["concluded"], Duration::from_secs(60));
    let list = rpc(&a, "disk_list", json!({}));
    assert_eq!(list["result"][0]["path"], uri(&b.sock, "tgt"), "{list}");
    std::thread::sleep(Duration::from_millis(500));
    let last = writer.finish();
    // Read back through the first appliance (now a client of the second)...
    check_writer(&a.sock, &last);
    read_pattern_ok(&a, "read -P 0x11 0 8M");
    read_pattern_ok(&a, "read -P 0x22 32M 4M");
    let mut a = a;
    assert!(a.stop().success(), "{}", a.logs());
    // ...and straight from the second.
    let out =
        run(Command::new("qemu-io").args(["-f", "raw", "-c", "read -P 0x11 0 8M", &b.uri("tgt")]));
    assert!(!stdout(&out).contains("fail"), "{}", stdout(&out));
    let mut b = b;
    assert!(b.stop().success(), "{}", b.logs());
    qemu_img_clean(&b.path("tgt.qcow2"));
    assert!(sparse(&b.path("tgt.qcow2"), "qcow2", 16 * MIB, 8 * MIB), "zeroes stay sparse");
}

#[test]
fn mirror_to_qemu_nbd_under_fio_pivots_onto_it() {
    require_tool("qemu-nbd", "qemu-utils");
    require_tool("fio", "fio");
    let mut a = start_vm();
    let target = a.path("remote.qcow2");
    run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&target).arg("128M"));
    let sock = a.path("qnbd.sock");
    let mut server = qemu_nbd_as(&target, "qcow2", &sock);
    let writer = Writer::start(&a.sock);
    let fio = fio_background(&a.uri("vm"), 14);
    let job = start_mirror(&a, json!({"disk": "vm", "target": uri(&sock, "t")}));
    wait_state(&a, &job, &["ready"], Duration::from_secs(90));
    assert!(rpc(&a, "job_complete", json!({"job": job}))["result"].is_object());
    wait_state(&a, &job, &["concluded"], Duration::from_secs(60));
    let list = rpc(&a, "disk_list", json!({}));
    assert_eq!(list["result"][0]["path"], uri(&sock, "t"), "{list}");
    // fio and the writer go on, now through qemu-nbd, and verify.
    std::thread::sleep(Duration::from_secs(1));
    let last = writer.finish();
    fio_ok(fio);
    check_writer(&a.sock, &last);
    vm_contents_ok(&a);
    assert!(a.stop().success(), "{}", a.logs());
    let _ = server.kill();
    let _ = server.wait();
    qemu_img_clean(&target);
    assert!(sparse(&target, "qcow2", 16 * MIB, 8 * MIB), "zeroes stay sparse");
    assert!(sparse(&target, "qcow2", 40 * MIB, 24 * MIB), "unwritten space stays sparse");
}

#[test]
fn cancelled_mirror_to_qemu_nbd_is_a_point_in_time_copy() {
    require_tool("qemu-nbd", "qemu-utils");
    let mut a = start_vm();
    let file = a.path("copy.raw");
    std::fs::File::create(&file).unwrap().set_len(128 * MIB).unwrap();
    let sock = a.path("qnbd.sock");
    let mut server = qemu_nbd(&file, &sock);
    let writer = Writer::start(&a.sock);
    let job = start_mirror(&a, json!({"disk": "vm", "target": uri(&sock, "t")}));
    wait_state(&a, &job, &["ready"], Duration::from_secs(90));
    let last = writer.finish();
    assert!(rpc(&a, "job_cancel", json!({"job": job}))["result"].is_object());
    wait_state(&a, &job, &["concluded"], Duration::from_secs(60));
    check_writer(&a.sock, &last);
    assert!(a.stop().success(), "{}", a.logs());
    let _ = server.kill();
    let _ = server.wait();
    let out = run_unchecked(
        Command::new("qemu-img")
            .args(["compare", "-f", "qcow2", "-F", "raw"])
            .arg(a.path("vm.qcow2"))
            .arg(&file),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "source and copy differ: {}", stdout(&out));
}

#[test]
fn a_target_server_that_dies_fails_or_stops_the_job_and_the_disk_keeps_serving() {
    require_tool("qemu-nbd", "qemu-utils");
    let mut a = start_vm();
    let file = a.path("copy.raw");
    std::fs::File::create(&file).unwrap().set_len(128 * MIB).unwrap();
    let sock = a.path("qnbd.sock");

    // report: the job ends with the error.
    let mut server = qemu_nbd(&file, &sock);
    let job = start_mirror(&a, json!({"disk": "vm", "target": uri(&sock, "t"), "speed": 8 * MIB}));
    wait_state(&a, &job, &["running"], Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(500));
    let _ = server.kill();
    let _ = server.wait();
    let j = wait_state_or_aborted(&a, &job, Duration::from_secs(30));
    assert_eq!(j["state"], "aborted", "{j}");
    assert!(j["error"].as_str().unwrap().contains("target"), "{j}");
    read_pattern_ok(&a, "read -P 0x11 0 8M");

    // stop: paused with the error; resumed once the server is back, it finishes.
    let mut server = qemu_nbd(&file, &sock);
    let writer = Writer::start(&a.sock);
    let p = json!({"disk": "vm", "target": uri(&sock, "t"), "speed": 8 * MIB, "on_target_error": "stop"});
    let job = start_mirror(&a, p);
    wait_state(&a, &job, &["running"], Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(500));
    let _ = server.kill();
    let _ = server.wait();
    let j = wait_state(&a, &job, &["paused"], Duration::from_secs(30));
    assert!(j["error"].as_str().unwrap().starts_with("stopped"), "{j}");
    let mut server = qemu_nbd(&file, &sock);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(rpc(&a, "job_resume", json!({"job": job}))["result"].is_object());
    rpc(&a, "job_set_speed", json!({"job": job, "speed": 0}));
    wait_state(&a, &job, &["ready"], Duration::from_secs(90));
    let last = writer.finish();
    assert!(rpc(&a, "job_cancel", json!({"job": job}))["result"].is_object());
    wait_state(&a, &job, &["concluded"], Duration::from_secs(60));
    check_writer(&a.sock, &last);
    assert!(a.stop().success(), "{}", a.logs());
    let _ = server.kill();
    let _ = server.wait();
    let out = run_unchecked(
        Command::new("qemu-img")
            .args(["compare", "-f", "qcow2", "-F", "raw"])
            .arg(a.path("vm.qcow2"))
            .arg(&file),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "source and copy differ: {}", stdout(&out));
}

/// Like `wait_state`, but an aborted job is an answer too.
fn wait_state_or_aborted(a: &Appliance, job: &str, within: Duration) -> serde_json::Value {
    let deadline = Instant::now() + within;
    loop {
        let j = job_of(a, job);
        if matches!(j["state"].as_str(), Some("aborted" | "concluded")) {
            return j;
        }
        assert!(Instant::now() < deadline, "job still {j}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn bad_nbd_targets_are_refused_naming_the_field() {
    let mut a = start_vm();
    for (target, extra, key, says) in [
        ("nbd://", json!({}), "target", "host"),
        ("nbds+unix:///x?socket=/s", json!({}), "target", "TLS"),
        ("nbd+unix:///x", json!({}), "target", "socket"),
        (&*uri(&a.path("absent.sock"), "x"), json!({}), "target", "connect"),
        (&*uri(&a.sock, "vm"), json!({}), "target", "own export"),
        (&*uri(&a.sock, "nope"), json!({}), "target", "nope"),
        (&*uri(&a.sock, "vm2"), json!({"create": true}), "create", "file"),
        (&*uri(&a.sock, "vm2"), json!({"format": "qcow2"}), "format", "raw"),
    ] {
        let mut p = extra.clone();
        p["disk"] = json!("vm");
        p["target"] = json!(target);
        let r = rpc(&a, "mirror_start", p);
        let e = &r["error"];
        assert_eq!(e["data"]["key"], key, "{target}: {r}");
        assert!(e["message"].as_str().unwrap().contains(says), "{target}: {r}");
    }
    assert!(a.stop().success(), "{}", a.logs());
}
