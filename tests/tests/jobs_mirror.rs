//! The mirror job through the control socket, judged by real clients and qemu-img.
//!
//! A writer (our NBD client, one 4 KiB write at a time, each block's last value
//! remembered) and fio (random writes, `verify=crc32c` with a verify backlog) keep
//! writing while the job copies, becomes ready, and pivots: every write acknowledged
//! before, during and after the switch reads back, the target checks clean with
//! qemu-img, zero and unwritten regions stay sparse on it. Cancelling a ready mirror
//! leaves a point-in-time copy equal to the source (`qemu-img compare`); a background
//! mirror slower than its writers never becomes ready while an adaptive one does, by
//! turning write-blocking; bad requests are refused naming the field.

use std::process::Command;
use std::time::{Duration, Instant};

use appliance_tests::jobs::*;
use appliance_tests::ops::{rpc, rpc_error};
use appliance_tests::{require_tool, run_unchecked, stdout};
use serde_json::{Value, json};

#[test]
fn mirror_under_writes_pivots_to_a_new_qcow2() {
    require_tool("fio", "fio");
    let mut a = start_vm();
    let writer = Writer::start(&a.sock);
    let fio = fio_background(&a.uri("vm"), 14);
    std::thread::sleep(Duration::from_millis(500));
    let target = a.path("target.qcow2");
    let job = start_mirror(&a, json!({"disk": "vm", "target": target, "create": true}));
    let j = wait_state(&a, &job, &["ready"], Duration::from_secs(60));
    assert_eq!(j["type"], "mirror");
    assert!(j["offset"].as_u64().unwrap() >= 12 * MIB, "the first pass copied the data: {j}");
    assert!(rpc(&a, "job_complete", json!({"job": job}))["result"].is_object());
    wait_state(&a, &job, &["concluded"], Duration::from_secs(60));
    let list = rpc(&a, "disk_list", json!({}));
    assert_eq!(list["result"][0]["path"], target.display().to_string(), "{list}");
    // The load goes on, on the target.
    std::thread::sleep(Duration::from_secs(1));
    let last = writer.finish();
    assert!(last.iter().filter(|&&s| s > 0).count() > 100, "the writer wrote");
    fio_ok(fio);
    check_writer(&a.sock, &last);
    vm_contents_ok(&a);
    assert!(a.stop().success(), "{}", a.logs());
    qemu_img_clean(&target);
    qemu_img_clean(&a.path("vm.qcow2"));
    assert!(sparse(&target, "qcow2", 16 * MIB, 8 * MIB), "zero clusters stay sparse");
    assert!(sparse(&target, "qcow2", 40 * MIB, 24 * MIB), "unwritten space stays sparse");
}

#[test]
fn cancel_after_ready_leaves_a_point_in_time_copy() {
    let mut a = start_vm();
    let writer = Writer::start(&a.sock);
    let target = a.path("copy.raw");
    let job =
        start_mirror(&a, json!({"disk": "vm", "target": target, "create": true, "format": "raw"}));
    wait_state(&a, &job, &["ready"], Duration::from_secs(60));
    let last = writer.finish();
    assert!(rpc(&a, "job_cancel", json!({"job": job}))["result"].is_object());
    let j = wait_state(&a, &job, &["concluded"], Duration::from_secs(60));
    assert!(j["error"].is_null(), "{j}");
    // The disk is still the source.
    let list = rpc(&a, "disk_list", json!({}));
    assert_eq!(list["result"][0]["path"], a.path("vm.qcow2").display().to_string());
    check_writer(&a.sock, &last);
    assert!(a.stop().success(), "{}", a.logs());
    let out = run_unchecked(
        Command::new("qemu-img")
            .args(["compare", "-f", "qcow2", "-F", "raw"])
            .arg(a.path("vm.qcow2"))
            .arg(&target),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "source and copy differ: {}", stdout(&out));
    qemu_img_clean(&a.path("vm.qcow2"));
    assert!(sparse(&target, "raw", 40 * MIB, 24 * MIB), "unwritten space stays sparse");
}

#[test]
fn only_an_adaptive_mirror_outpaced_by_writes_becomes_ready() {
    let mut a = start_vm();
    let writer = Writer::start(&a.sock);
    // At 16 MiB/s and 1 MiB chunks the job cleans 16 chunks a second; the writer
    // dirties its region's 32 chunks many times a second. The initial copy (44 MiB of
    // data: zeroes are not charged) takes about 3 s.
    let common = json!({"disk": "vm", "create": true, "speed": 16 * MIB, "granularity": MIB});
    let mut p = common.clone();
    p["target"] = json!(a.path("bg.qcow2"));
    p["copy_mode"] = json!("background");
    let bg = start_mirror(&a, p);
    std::thread::sleep(Duration::from_secs(8));
    let j = job_of(&a, &bg);
    assert_eq!(j["state"], "running", "a background mirror behind its writers: {j}");
    assert_eq!(j["write_blocking"], false);
    assert!(rpc(&a, "job_cancel", json!({"job": bg, "force": true}))["result"].is_object());
    let j = wait_state(&a, &bg, &["aborted"], Duration::from_secs(30));
    assert_eq!(j["error"], "cancelled");

    let mut p = common;
    p["target"] = json!(a.path("ad.qcow2"));
    let ad = start_mirror(&a, p);
    let j = wait_state(&a, &ad, &["ready"], Duration::from_secs(60));
    assert_eq!(j["copy_mode"], "adaptive");
    assert_eq!(j["write_blocking"], true, "the switch shows in job_list: {j}");
    assert!(rpc(&a, "job_complete", json!({"job": ad}))["result"].is_object());
    wait_state(&a, &ad, &["concluded"], Duration::from_secs(60));
    let last = writer.finish();
    check_writer(&a.sock, &last);
    assert!(a.stop().success(), "{}", a.logs());
    qemu_img_clean(&a.path("ad.qcow2"));
}

#[test]
fn bad_mirror_requests_are_refused_naming_the_field() {
    let mut a = start_vm();
    let key = |method: &str, p: Value| {
        let r = rpc(&a, method, p.clone());
        assert!(r["error"].is_object(), "{method} {p} should fail: {r}");
        (
            r["error"]["data"]["key"].as_str().unwrap_or("").to_string(),
            r["error"]["message"].as_str().unwrap().to_string(),
        )
    };
    let t = a.path("t.qcow2");
    assert_eq!(key("mirror_start", json!({"target": t})).0, "disk");
    let (k, m) = key("mirror_start", json!({"disk": "nope", "target": t}));
    assert!(k == "disk" && m.contains("nope"), "{m}");
    assert_eq!(key("mirror_start", json!({"disk": "vm"})).0, "target");
    let (k, m) = key("mirror_start", json!({"disk": "vm", "target": a.path("vm.qcow2")}));
    assert!(k == "target" && m.contains("serves"), "{m}");
    let (k, m) = key("mirror_start", json!({"disk": "vm", "target": a.path("missing.qcow2")}));
    assert!(k == "target" && m.contains("create"), "{m}");
    for (field, v) in [
        ("granularity", json!(3000)),
        ("granularity", json!(1u64 << 30)),
        ("copy_mode", json!("turbo")),
        ("sync", json!("some")),
        ("on_target_error", json!("panic")),
        ("speed", json!(-1)),
        ("colour", json!("red")),
    ] {
        let mut p = json!({"disk": "vm", "target": t, "create": true});
        p[field] = v;
        let (k, m) = key("mirror_start", p);
        assert_eq!(k, field, "{m}");
        assert!(!t.exists(), "a refused request created its target");
    }
    // One job per disk; a disk with a job is not removed; only a ready job completes.
    let job =
        start_mirror(&a, json!({"disk": "vm", "target": t, "create": true, "speed": 1 << 16}));
    let (code, m) = rpc_error(
        &a,
        "mirror_start",
        json!({"disk": "vm", "target": a.path("u.qcow2"), "create": true}),
    );
    assert!(code == -32000 && m.contains(&job), "{m}");
    let (_, m) = rpc_error(&a, "disk_remove", json!({"name": "vm"}));
    assert!(m.contains("job"), "{m}");
    let (_, m) = rpc_error(&a, "job_complete", json!({"job": job}));
    assert!(m.contains("ready"), "{m}");
    let (_, m) = rpc_error(&a, "job_pause", json!({"job": "job-99"}));
    assert!(m.contains("job-99"), "{m}");
    assert!(rpc(&a, "job_cancel", json!({"job": job, "force": true}))["result"].is_object());
    wait_state(&a, &job, &["aborted"], Duration::from_secs(30));
    let (_, m) = rpc_error(&a, "job_resume", json!({"job": job}));
    assert!(m.contains("aborted"), "{m}");
    assert!(a.stop().success(), "{}", a.logs());
    qemu_img_clean(&t);
}

#[test]
fn a_killed_appliance_leaves_the_source_intact_and_reports_the_job_it_ended() {
    let mut a = start_vm();
    let target = a.path("partial.qcow2");
    let job =
        start_mirror(&a, json!({"disk": "vm", "target": target, "create": true, "speed": 2 * MIB}));
    wait_state(&a, &job, &["running"], Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(1500));
    a.kill();
    qemu_img_clean_after_crash(&a.path("vm.qcow2"));
    qemu_img_clean_after_crash(&target);
    a.restart();
    let j = job_of(&a, &job);
    assert_eq!(j["state"], "aborted", "{j}");
    let e = j["error"].as_str().unwrap();
    assert!(e.contains("ended when the appliance stopped") && e.contains("partial.qcow2"), "{e}");
    // The source is served as it was.
    read_pattern_ok(&a, "read -P 0x11 0 8M");
    read_pattern_ok(&a, "read -P 0x22 32M 4M");
    // A clean stop ends a running job too, and the next start says so.
    let job = start_mirror(
        &a,
        json!({"disk": "vm", "target": a.path("p2.qcow2"), "create": true, "speed": 2 * MIB}),
    );
    wait_state(&a, &job, &["running"], Duration::from_secs(30));
    assert!(a.stop().success(), "{}", a.logs());
    a.restart();
    assert_eq!(job_of(&a, &job)["state"], "aborted");
    assert!(a.stop().success(), "{}", a.logs());
    qemu_img_clean(&a.path("vm.qcow2"));
}

#[test]
fn job_progress_and_state_are_in_the_metrics() {
    let port = appliance_tests::free_port();
    let setup = appliance_tests::Setup {
        disks: "[[disk]]\nname = \"vm\"\ndriver = \"mem\"\nsize = \"64MiB\"\n".into(),
        // A disk in memory has no directory of its own for targets.
        extra: appliance_tests::ops::control_extra(Some(port))
            .replace("[control]\n", "[control]\nallowed_target_dirs = [\"{dir}\"]\n"),
        ..appliance_tests::Setup::default()
    };
    let mut a = appliance_tests::Appliance::start(setup, |_| {});
    let job = start_mirror(
        &a,
        json!({"disk": "vm", "target": a.path("m.raw"), "create": true, "format": "raw"}),
    );
    wait_state(&a, &job, &["ready"], Duration::from_secs(30));
    let labels = [("job", job.as_str()), ("type", "mirror"), ("disk", "vm")];
    let with = |text: &str, state| {
        let mut l = labels.to_vec();
        l.push(("state", state));
        appliance_tests::ops::sample(text, "appliance_job_state", &l)
    };
    // The exporter refreshes its gauges every 250 ms.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut text = appliance_tests::ops::scrape(port);
    while with(&text, "ready") != 1.0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        text = appliance_tests::ops::scrape(port);
    }
    assert_eq!(with(&text, "ready"), 1.0, "{text}");
    assert_eq!(with(&text, "running"), 0.0, "{text}");
    let len = appliance_tests::ops::sample(&text, "appliance_job_len_bytes", &labels);
    let off = appliance_tests::ops::sample(&text, "appliance_job_offset_bytes", &labels);
    assert!(off >= 64.0 * MIB as f64 && off == len, "progress {off}/{len}");
    assert!(rpc(&a, "job_cancel", json!({"job": job}))["result"].is_object());
    wait_state(&a, &job, &["concluded"], Duration::from_secs(30));
    assert!(a.stop().success(), "{}", a.logs());
}
