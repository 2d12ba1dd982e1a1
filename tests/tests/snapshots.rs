//! Internal snapshots, offline, judged by qemu-img both ways: a snapshot
//! `appliance snapshot -c` made is listed by `qemu-img snapshot -l`; the appliance then
//! serves the image and its writes copy the shared clusters (the snapshot keeps the
//! old data); a snapshot QEMU made is listed, applied and deleted by the appliance and
//! the other way round; `qemu-img check` is clean after every step; a served image is
//! refused.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use appliance_tests::{Appliance, Setup, bin, require_tool, run, run_unchecked, stdout};

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
