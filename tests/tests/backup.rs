//! The push backup job, judged by qemu-img: a chain of a full and two incremental
//! backups, each taken while a writer and fio (with verification) keep writing, each
//! equal to the disk at its instant (`qemu-img compare` against a copy read over NBD at
//! that instant), the incrementals as qcow2 overlays over the previous backup. A
//! cancelled incremental gives its bitmap its bits back; bad requests name the key.

use std::process::Command;
use std::time::Duration;

use appliance_tests::jobs::*;
use appliance_tests::ops::{rpc, rpc_error};
use appliance_tests::{Appliance, require_tool, run, run_unchecked, stdout};
use serde_json::{Value, json};

/// `qemu-img compare` of the copy `reference` (raw) and `backup` (qcow2).
fn same(a: &Appliance, reference: &str, backup: &str) {
    let out = run_unchecked(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "qcow2"])
            .arg(a.path(reference))
            .arg(a.path(backup)),
        Duration::from_secs(120),
    );
    assert!(out.status.success(), "{backup} differs from {reference}: {}", stdout(&out));
}

fn backup(a: &Appliance, params: Value) -> String {
    let r = rpc(a, "backup_start", params);
    r["result"]["job"].as_str().unwrap_or_else(|| panic!("backup_start: {r}\n{}", a.logs())).into()
}

fn tools() {
    require_tool("qemu-img", "qemu-utils");
    require_tool("fio", "fio");
}

#[test]
fn full_and_incremental_backups_under_writes_restore_each_instant() {
    tools();
    let a = start_vm();
    // T0: the full backup and the bitmap start at one instant (nothing writes between).
    dump(&a, "vm", "ref0.raw");
    let r = rpc(&a, "bitmap_add", json!({"disk": "vm", "name": "inc"}));
    assert!(r["result"].is_object(), "{r}");
    let job = backup(
        &a,
        json!({"disk": "vm", "target": a.path("full.qcow2").to_str().unwrap(), "create": true,
               "format": "qcow2", "speed": 32 << 20}),
    );
    let w = writers(&a);
    let j = wait_state(&a, &job, &["concluded"], Duration::from_secs(120));
    assert_eq!(j["type"], "backup", "{j}");
    assert!(
        j["copied_before_write"].as_u64().unwrap_or(0) > 0,
        "the writers never had to save a chunk: {j}"
    );
    std::thread::sleep(Duration::from_millis(500));
    stop_writers(w);
    same(&a, "ref0.raw", "full.qcow2");
    qemu_img_clean(&a.path("full.qcow2"));
    // Two incrementals, each an overlay over the previous backup.
    let mut prev = "full.qcow2".to_string();
    for k in 1..=2 {
        let (reference, target) = (format!("ref{k}.raw"), format!("inc{k}.qcow2"));
        dump(&a, "vm", &reference);
        run(Command::new("qemu-img")
            .current_dir(a.path(""))
            .args(["create", "-q", "-f", "qcow2", "-b", &prev, "-F", "qcow2", &target]));
        let job = backup(
            &a,
            json!({"disk": "vm", "target": a.path(&target).to_str().unwrap(),
                   "sync": "incremental", "bitmap": "inc", "speed": 16 << 20}),
        );
        let w = writers(&a);
        let j = wait_state(&a, &job, &["concluded"], Duration::from_secs(120));
        std::thread::sleep(Duration::from_millis(500));
        stop_writers(w);
        same(&a, &reference, &target);
        qemu_img_clean(&a.path(&target));
        // Only what changed was copied: the writers' two regions at most.
        let copied = j["total"].as_u64().unwrap();
        assert!(copied > 0 && copied <= 64 * MIB, "incremental {k} copied {copied}: {j}");
        prev = target;
    }
    // The chain restores the last instant as one image.
    run(Command::new("qemu-img").current_dir(a.path("")).args([
        "convert",
        "-O",
        "qcow2",
        "inc2.qcow2",
        "restored.qcow2",
    ]));
    same(&a, "ref2.raw", "restored.qcow2");
}

#[test]
fn a_compressed_backup_under_writes_restores_the_instant_and_qemu_reads_it() {
    tools();
    let a = start_vm();
    dump(&a, "vm", "ref.raw");
    let job = backup(
        &a,
        json!({"disk": "vm", "target": a.path("c.qcow2").to_str().unwrap(), "create": true,
               "format": "qcow2", "compress": true, "speed": 32 << 20}),
    );
    // The writers' random data does not shrink (written plainly); copy-before-write
    // compresses what does.
    let w = writers(&a);
    let j = wait_state(&a, &job, &["concluded"], Duration::from_secs(120));
    assert!(j["copied_before_write"].as_u64().unwrap_or(0) > 0, "{j}");
    std::thread::sleep(Duration::from_millis(500));
    stop_writers(w);
    assert!(!a.path("r.raw").exists(), "a refused target is not left behind");
    same(&a, "ref.raw", "c.qcow2");
    qemu_img_clean(&a.path("c.qcow2"));
    let out = run(Command::new("qemu-img").args(["check", "--output=json"]).arg(a.path("c.qcow2")));
    let check: Value = serde_json::from_slice(&out.stdout).unwrap();
    // 12 MiB of the disk's own data is patterns: 192 clusters of 64 KiB, compressed.
    let compressed = check["compressed-clusters"].as_u64().unwrap_or(0);
    assert!(compressed >= 192, "{check}");
    // QEMU decompresses them: a restored copy equals the instant too.
    run(Command::new("qemu-img").current_dir(a.path("")).args([
        "convert",
        "-O",
        "raw",
        "c.qcow2",
        "restored.raw",
    ]));
    let out = run(Command::new("cmp").arg(a.path("ref.raw")).arg(a.path("restored.raw")));
    assert!(out.status.success());
    // The shared clusters' refcounts are right: QEMU overwriting compressed clusters
    // (freeing their bytes) leaves the image clean.
    qemu_io(&a.path("c.qcow2"), &["write -P 0x77 0 2M", "write -P 0x78 33M 1M"]);
    qemu_img_clean(&a.path("c.qcow2"));
}

#[test]
fn a_cancelled_incremental_keeps_its_bitmap_and_bad_requests_are_refused() {
    tools();
    let a = start_vm();
    let r = rpc(&a, "bitmap_add", json!({"disk": "vm", "name": "inc"}));
    assert!(r["result"].is_object(), "{r}");
    read_pattern_ok(&a, "write -P 0x33 40M 4M");
    let target = a.path("inc.qcow2");
    run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&target).arg("128M"));
    let job = backup(
        &a,
        json!({"disk": "vm", "target": target.to_str().unwrap(), "sync": "incremental",
               "bitmap": "inc", "speed": 1 << 20}),
    );
    std::thread::sleep(Duration::from_millis(300));
    let r = rpc(&a, "job_cancel", json!({"job": job}));
    assert!(r["result"].is_object(), "{r}");
    let j = wait_state(&a, &job, &["aborted"], Duration::from_secs(30));
    assert!(j["error"].as_str().unwrap_or("").contains("cancel"), "{j}");
    let list = rpc(&a, "bitmap_list", json!({"disk": "vm"}));
    let count = list["result"]["bitmaps"][0]["count"].as_u64().unwrap();
    assert_eq!(count, 4 * MIB, "the bitmap got its bits back: {list}");
    let t = target.to_str().unwrap();
    for (params, key) in [
        (json!({"disk": "vm", "target": t, "sync": "incremental"}), "bitmap"),
        (json!({"disk": "vm", "target": t, "sync": "sometimes"}), "sync"),
        (json!({"disk": "vm", "target": t, "sync": "full", "bitmap": "inc"}), "bitmap"),
        (
            json!({"disk": "vm", "target": a.path("r.raw").to_str().unwrap(), "create": true,
                   "format": "raw", "compress": true}),
            "compress",
        ),
        (json!({"disk": "vm", "target": "/etc/passwd"}), "target"),
        (json!({"disk": "vm", "target": a.path("vm.qcow2").to_str().unwrap()}), "target"),
    ] {
        let (_, m) = rpc_error(&a, "backup_start", params.clone());
        assert!(m.contains(key), "{params}: {m}");
    }
    let (_, m) = rpc_error(
        &a,
        "backup_start",
        json!({"disk": "vm", "target": t, "sync": "bitmap", "bitmap": "nope"}),
    );
    assert!(m.contains("nope"), "{m}");
    // The disk is unharmed.
    read_pattern_ok(&a, "read -P 0x33 40M 4M");
}
