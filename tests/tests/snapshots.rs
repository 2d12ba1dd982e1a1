//! Internal snapshots, offline, judged by qemu-img both ways: a snapshot
//! `appliance snapshot -c` made is listed by `qemu-img snapshot -l`; the appliance then
//! serves the image and its writes copy the shared clusters (the snapshot keeps the
//! old data); a snapshot QEMU made is listed, applied and deleted by the appliance and
//! the other way round; `qemu-img check` is clean after every step; a served image is
//! refused by the tool.
//!
//! Online, on the control socket: snapshots are created and deleted while writers run
//! (their data verified), a snapshot QEMU made is deleted, the image stays locked, a
//! persistent bitmap keeps recording across the change, and qemu-img finds each
//! snapshot holding the disk as it was at its instant.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use appliance_tests::jobs::{start_vm, stop_writers, writers};
use appliance_tests::nbd_map::io;
use appliance_tests::ops::{rpc_error, rpc_ok};
use appliance_tests::{Appliance, Setup, bin, require_tool, run, run_unchecked, stdout};
use serde_json::{Value, json};

fn snapshot(args: &[&str], img: &Path) -> String {
    stdout(&run(Command::new(bin()).arg("snapshot").args(args).arg(img)))
}

fn qemu_img(args: &[&str], img: &Path) -> String {
    stdout(&run(Command::new("qemu-img").args(args).arg(img)))
}

fn clean(img: &Path) {
    let out = qemu_img(&["check"], img);
    assert!(out.contains("No errors were found"), "{out}");
}

/// Whether `qemu-io` reads `pattern` at `range` ("OFF LEN") of the image.
fn reads(img: &Path, pattern: u8, range: &str) -> bool {
    let out = run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-r", "-c", &format!("read -P {pattern} {range}")])
        .arg(img));
    !stdout(&out).contains("fail") && !stdout(&out).contains("mismatch")
}

#[test]
fn snapshots_made_either_side_are_listed_applied_and_deleted_by_the_other() {
    require_tool("qemu-img", "qemu-utils");
    let setup = Setup {
        disks: "[[disk]]\nname = \"vm\"\npath = \"{dir}/vm.qcow2\"\nformat = \"qcow2\"\n".into(),
        ..Setup::default()
    };
    let mut a = Appliance::start(setup, |dir| {
        let img = dir.join("vm.qcow2");
        run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&img).arg("64M"));
        run(Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "write -P 1 0 4M", "-c", "write -P 7 20M 1M"])
            .arg(&img));
        snapshot(&["-c", "s1"], &img);
    });
    let img = a.path("vm.qcow2");
    // Served: the appliance holds the image, so the tool refuses it.
    let out = run_unchecked(
        Command::new(bin()).args(["snapshot", "-c", "x"]).arg(&img),
        Duration::from_secs(30),
    );
    assert!(!out.status.success(), "a served image was changed");
    // Writes over the snapshot's clusters copy them.
    let w = run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 2 0 2M", &a.uri("vm")]));
    assert!(!stdout(&w).contains("fail"), "{}", stdout(&w));
    assert!(a.stop().success(), "{}", a.logs());
    clean(&img);
    assert!(reads(&img, 2, "0 2M") && reads(&img, 1, "2M 2M"));
    let list = qemu_img(&["snapshot", "-l"], &img);
    assert!(list.contains("s1"), "{list}");
    // QEMU's snapshot, listed and applied here; ours applied there.
    qemu_img(&["snapshot", "-c", "q2"], &img);
    let list = snapshot(&["-l"], &img);
    assert!(list.contains("s1") && list.contains("q2"), "{list}");
    snapshot(&["-a", "s1"], &img);
    clean(&img);
    assert!(reads(&img, 1, "0 4M") && reads(&img, 7, "20M 1M"));
    qemu_img(&["snapshot", "-a", "q2"], &img);
    assert!(reads(&img, 2, "0 2M"));
    // Deleted here, then there.
    snapshot(&["-d", "q2"], &img);
    clean(&img);
    let list = qemu_img(&["snapshot", "-l"], &img);
    assert!(list.contains("s1") && !list.contains("q2"), "{list}");
    qemu_img(&["snapshot", "-d", "s1"], &img);
    clean(&img);
    assert!(!snapshot(&["-l"], &img).contains("s1"));
    assert!(reads(&img, 2, "0 2M") && reads(&img, 1, "2M 2M"));
    // Unknown names are refused, naming them.
    let out = run_unchecked(
        Command::new(bin()).args(["snapshot", "-d", "nope"]).arg(&img),
        Duration::from_secs(30),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope"));
}

/// The names `snapshot_list` (or a change's reply) gives.
fn names(r: &Value) -> Vec<String> {
    let list = r["snapshots"].as_array().unwrap_or_else(|| panic!("no snapshots in {r}"));
    list.iter().map(|s| s["name"].as_str().unwrap().to_string()).collect()
}

#[test]
fn snapshots_are_created_and_deleted_while_the_disk_is_served() {
    let mut a = start_vm();
    let img = a.path("vm.qcow2");
    a.stop();
    qemu_img(&["snapshot", "-c", "q0"], &img);
    a.restart();
    let vm = json!({"disk": "vm"});
    assert_eq!(names(&rpc_ok(&a, "snapshot_list", vm.clone())), ["q0"]);
    rpc_ok(&a, "bitmap_add", json!({"disk": "vm", "name": "b", "persistent": true}));
    let w = writers(&a);
    io(&a, "vm", &["write -P 0x33 40M 1M"]);
    let r = rpc_ok(&a, "snapshot_create", json!({"disk": "vm", "name": "s1"}));
    assert_eq!(names(&r), ["q0", "s1"]);
    io(&a, "vm", &["write -P 0x44 40M 512k"]);
    let r = rpc_ok(&a, "snapshot_create", json!({"disk": "vm", "name": "s2"}));
    assert_eq!(names(&r), ["q0", "s1", "s2"]);
    io(&a, "vm", &["write -P 0x55 40M 256k", "read -P 0x44 40.25M 256k"]);
    let r = rpc_ok(&a, "snapshot_delete", json!({"disk": "vm", "name": "s1"}));
    assert_eq!(names(&r), ["q0", "s2"]);
    let r = rpc_ok(&a, "snapshot_delete", json!({"disk": "vm", "name": "q0"}));
    assert_eq!(names(&r), ["s2"]);
    io(&a, "vm", &["read -P 0x55 40M 256k", "read -P 0x44 40.25M 256k", "read -P 0x33 40.5M 512k"]);
    // The reopened image holds the locks: QEMU cannot open it for writing.
    let out = run_unchecked(
        Command::new("qemu-io").args(["-f", "qcow2", "-c", "write 0 512"]).arg(&img),
        Duration::from_secs(30),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("lock"), "{err}{}\n{}", stdout(&out), a.logs());
    // Refusals name the key.
    for (method, name) in
        [("snapshot_create", "s2"), ("snapshot_delete", "s1"), ("snapshot_create", "")]
    {
        let (code, m) = rpc_error(&a, method, json!({"disk": "vm", "name": name}));
        assert!(code == -32602 && m.contains("`name`"), "{method} {name}: {code} {m}");
    }
    stop_writers(w);
    // A raw disk has no snapshot table: refused, naming the disk.
    std::fs::File::create(a.path("r.raw")).unwrap().set_len(1 << 20).unwrap();
    rpc_ok(&a, "disk_add", json!({"name": "r", "path": a.path("r.raw"), "format": "raw"}));
    let (code, m) = rpc_error(&a, "snapshot_create", json!({"disk": "r", "name": "x"}));
    assert!(code == -32000 && m.contains("disk r") && m.contains("qcow2"), "{code} {m}");
    let b = &rpc_ok(&a, "bitmap_list", vm.clone())["bitmaps"][0];
    assert!(b["recording"] == true && b["count"].as_u64().unwrap() >= 1 << 20, "{b}");
    assert!(a.stop().success(), "{}", a.logs());
    clean(&img);
    let info: Value = serde_json::from_str(&qemu_img(&["info", "--output=json"], &img)).unwrap();
    let bitmaps = &info["format-specific"]["data"]["bitmaps"];
    assert_eq!(bitmaps[0]["name"], "b", "{info}");
    assert_eq!(bitmaps[0]["flags"], json!(["auto"]), "{info}");
    let list = qemu_img(&["snapshot", "-l"], &img);
    assert!(list.contains("s2") && !list.contains("s1") && !list.contains("q0"), "{list}");
    // s2 holds the disk at its instant (QEMU applies none while bitmaps are active).
    run(Command::new("qemu-img").args(["bitmap", "--remove"]).arg(&img).arg("b"));
    qemu_img(&["snapshot", "-a", "s2"], &img);
    clean(&img);
    assert!(reads(&img, 0x44, "40M 512k") && reads(&img, 0x33, "40.5M 512k"));
    assert!(reads(&img, 0x11, "0 8M") && reads(&img, 0x22, "32M 4M"));
}
