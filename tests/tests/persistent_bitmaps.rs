//! Persistent dirty bitmaps in qcow2 images, judged by QEMU's own tools both ways.
//!
//! - A bitmap `qemu-img bitmap --add` made is loaded, flagged in use while served
//!   (`qemu-img info -U`), maintained through writes, zero writes and discards from two
//!   reactors, and stored at shutdown: QEMU then merges it into a fresh bitmap, and
//!   qemu-nbd `-B` serves exactly the ranges the appliance reported; a disabled one
//!   stays clean; `qemu-img check` is clean.
//! - A bitmap the appliance adds with `persistent = true` is listed by `qemu-img info`
//!   and honoured by qemu-nbd, survives a restart with its bits, keeps recording, and
//!   once removed leaves an image with no bitmap and no leaked cluster; a non-persistent
//!   one is gone after a restart; `persistent` on a raw disk is refused naming the field.
//! - A crash (SIGKILL) while a bitmap is in use: on restart it is reported inconsistent,
//!   not offered over NBD, refused for merging and enabling, until cleared; cleared, it
//!   records again and is stored cleanly.

use std::path::Path;
use std::process::Command;

use appliance_tests::nbd_map::{self, dirty_ranges};
use appliance_tests::ops::{control_extra, rpc_error, rpc_ok};
use appliance_tests::{Appliance, Setup, qemu_nbd, require_tool, run, run_unchecked, stdout};
use serde_json::{Value, json};

const MIB: u64 = 1 << 20;
const K64: u64 = 64 << 10;

fn tools() {
    require_tool("qemu-img", "qemu-utils");
    require_tool("qemu-nbd", "qemu-utils");
    require_tool("nbdinfo", "libnbd-bin");
}

fn qemu_img(dir: &Path, args: &[&str]) -> String {
    stdout(&run(Command::new("qemu-img").current_dir(dir).args(args)))
}

/// A 64 MiB qcow2 disk `d` on two reactors, prepared by `prepare`.
fn start(prepare: impl FnOnce(&Path)) -> Appliance {
    tools();
    let setup = Setup {
        cores: "[0, 1]",
        disks: "[[disk]]\nname = \"d\"\npath = \"{dir}/d.qcow2\"\nformat = \"qcow2\"\n\
                [[disk]]\nname = \"r\"\npath = \"{dir}/r.raw\"\nformat = \"raw\"\n"
            .into(),
        extra: control_extra(None),
        ..Setup::default()
    };
    Appliance::start(setup, |dir| {
        qemu_img(dir, &["create", "-q", "-f", "qcow2", "d.qcow2", "64M"]);
        std::fs::File::create(dir.join("r.raw")).unwrap().set_len(MIB).unwrap();
        prepare(dir);
    })
}

fn io(a: &Appliance, cmds: &[&str]) {
    nbd_map::io(a, "d", cmds)
}

fn dirty(a: &Appliance, bitmap: &str) -> Vec<(u64, u64)> {
    dirty_ranges(&a.uri("d"), &format!("qemu:dirty-bitmap:{bitmap}"))
}

/// What qemu-nbd serving the stopped image with `-B bitmap` reports for it.
fn dirty_by_qemu(a: &Appliance, bitmap: &str) -> Vec<(u64, u64)> {
    let sock = a.path("qemu-nbd.sock");
    let q = qemu_nbd::start(
        &["-r", "-t", "-f", "qcow2", "-B", bitmap],
        &a.path("d.qcow2"),
        qemu_nbd::Listen::Unix(&sock),
    );
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let r = dirty_ranges(&uri, &format!("qemu:dirty-bitmap:{bitmap}"));
    qemu_nbd::stop(q);
    r
}

/// `bitmap_list`'s entry for `name`.
fn listed(a: &Appliance, name: &str) -> Value {
    let l = rpc_ok(a, "bitmap_list", json!({"disk": "d"}));
    l["bitmaps"].as_array().unwrap().iter().find(|b| b["name"] == name).cloned().unwrap_or_default()
}

/// `qemu-img info --output=json`'s bitmaps: (name, granularity, flags).
fn qemu_bitmaps(a: &Appliance, force_share: bool) -> Vec<(String, u64, Vec<String>)> {
    let mut c = Command::new("qemu-img");
    c.args(["info", "--output=json"]);
    if force_share {
        c.arg("-U");
    }
    let v: Value = serde_json::from_slice(&run(c.arg(a.path("d.qcow2"))).stdout).unwrap();
    let none = vec![];
    let list = v["format-specific"]["data"]["bitmaps"].as_array().unwrap_or(&none);
    list.iter()
        .map(|b| {
            let flags = b["flags"].as_array().unwrap().iter();
            (
                b["name"].as_str().unwrap().to_string(),
                b["granularity"].as_u64().unwrap(),
                flags.map(|f| f.as_str().unwrap().to_string()).collect(),
            )
        })
        .collect()
}

/// `qemu-img check` finds nothing: no corruption and no leak.
fn check_clean(a: &Appliance) {
    let out = run_unchecked(
        Command::new("qemu-img").args(["check"]).arg(a.path("d.qcow2")),
        std::time::Duration::from_secs(60),
    );
    assert!(out.status.success(), "qemu-img check: {}{}", stdout(&out), a.logs());
    assert!(stdout(&out).contains("No errors were found"), "{}", stdout(&out));
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn a_bitmap_qemu_added_is_maintained_and_qemu_reads_it_back() {
    let mut a = start(|dir| {
        run(Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "write -P 1 0 8M"])
            .arg(dir.join("d.qcow2")));
        qemu_img(dir, &["bitmap", "--add", "d.qcow2", "b0"]);
        qemu_img(dir, &["bitmap", "--add", "-g", "1M", "--disable", "d.qcow2", "off"]);
    });
    let b0 = listed(&a, "b0");
    assert_eq!(
        (&b0["persistent"], &b0["recording"], &b0["inconsistent"]),
        (&json!(true), &json!(true), &json!(false))
    );
    assert_eq!(listed(&a, "off")["recording"], json!(false));
    let flags: Vec<_> = qemu_bitmaps(&a, true).into_iter().map(|(n, _, f)| (n, f)).collect();
    assert_eq!(
        flags,
        vec![
            ("b0".to_string(), strings(&["in-use", "auto"])),
            ("off".to_string(), strings(&["in-use"]))
        ]
    );
    // Two connections (the reactors take turns): writes, a zero write, a discard.
    io(&a, &["write -P 2 1M 4k", "write -P 3 3145738 100"]);
    io(&a, &["write -z 8M 256k", "discard 4M 64k", "write -P 4 24M 65537"]);
    let want =
        vec![(MIB, K64), (3 * MIB, K64), (4 * MIB, K64), (8 * MIB, 256 << 10), (24 * MIB, 2 * K64)];
    assert_eq!(dirty(&a, "b0"), want);
    assert!(a.stop().success(), "{}", a.logs());
    assert_eq!(
        qemu_bitmaps(&a, false),
        vec![("b0".to_string(), K64, strings(&["auto"])), ("off".to_string(), MIB, vec![])]
    );
    check_clean(&a);
    // QEMU merges it into a bitmap of its own, and serves that.
    let dir = a.path("");
    qemu_img(&dir, &["bitmap", "--add", "--disable", "d.qcow2", "fresh"]);
    qemu_img(&dir, &["bitmap", "--merge", "b0", "d.qcow2", "fresh"]);
    assert_eq!(dirty_by_qemu(&a, "fresh"), want);
    assert_eq!(dirty_by_qemu(&a, "off"), vec![]);
    check_clean(&a);
}

#[test]
fn a_bitmap_the_appliance_adds_persists_and_qemu_honours_it() {
    let mut a = start(|_| {});
    rpc_ok(&a, "bitmap_add", json!({"disk": "d", "name": "nightly", "persistent": true}));
    rpc_ok(&a, "bitmap_add", json!({"disk": "d", "name": "mem"}));
    let (_, m) = rpc_error(&a, "bitmap_add", json!({"disk": "r", "name": "x", "persistent": true}));
    assert!(m.contains("persistent") && m.contains("qcow2"), "{m}");
    io(&a, &["write -P 1 2M 4k", "write -z 10M 128k"]);
    let first = vec![(2 * MIB, K64), (10 * MIB, 128 << 10)];
    assert_eq!(dirty(&a, "nightly"), first);
    assert!(a.stop().success(), "{}", a.logs());
    assert_eq!(qemu_bitmaps(&a, false), vec![("nightly".to_string(), K64, strings(&["auto"]))]);
    check_clean(&a);
    assert_eq!(dirty_by_qemu(&a, "nightly"), first);
    // Back with its bits, recording; the in-memory one is gone.
    a.restart();
    let n = listed(&a, "nightly");
    assert_eq!((&n["persistent"], &n["recording"]), (&json!(true), &json!(true)), "{n}");
    assert_eq!(listed(&a, "mem"), Value::Null);
    assert_eq!(dirty(&a, "nightly"), first);
    io(&a, &["write -P 2 40M 4k"]);
    assert_eq!(dirty(&a, "nightly"), [first.clone(), vec![(40 * MIB, K64)]].concat());
    // Removed: stored as gone, nothing leaked.
    rpc_ok(&a, "bitmap_remove", json!({"disk": "d", "name": "nightly"}));
    assert!(a.stop().success(), "{}", a.logs());
    assert_eq!(qemu_bitmaps(&a, false), vec![]);
    check_clean(&a);
}

#[test]
fn a_crash_leaves_the_bitmap_inconsistent_until_cleared() {
    let mut a = start(|dir| {
        qemu_img(dir, &["bitmap", "--add", "d.qcow2", "b0"]);
    });
    io(&a, &["write -P 1 1M 4k"]);
    a.kill();
    assert_eq!(
        qemu_bitmaps(&a, false),
        vec![("b0".to_string(), K64, strings(&["in-use", "auto"]))]
    );
    a.restart();
    let b = listed(&a, "b0");
    assert_eq!((&b["inconsistent"], &b["recording"]), (&json!(true), &json!(false)), "{b}");
    assert!(a.logs().contains("inconsistent"), "{}", a.logs());
    // Not offered over NBD, not merged, not enabled.
    let out = run_unchecked(
        Command::new("nbdinfo").arg("--map=qemu:dirty-bitmap:b0").arg(a.uri("d")),
        std::time::Duration::from_secs(30),
    );
    assert!(!out.status.success(), "an inconsistent bitmap was served: {}", stdout(&out));
    rpc_ok(&a, "bitmap_add", json!({"disk": "d", "name": "t", "disabled": true}));
    for (method, params) in [
        ("bitmap_merge", json!({"disk": "d", "target": "t", "sources": ["b0"]})),
        ("bitmap_enable", json!({"disk": "d", "name": "b0"})),
    ] {
        let (_, m) = rpc_error(&a, method, params);
        assert!(m.contains("b0") && m.contains("inconsistent"), "{method}: {m}");
    }
    // Cleared, it is a fresh start.
    rpc_ok(&a, "bitmap_clear", json!({"disk": "d", "name": "b0"}));
    rpc_ok(&a, "bitmap_enable", json!({"disk": "d", "name": "b0"}));
    assert_eq!(listed(&a, "b0")["inconsistent"], json!(false));
    io(&a, &["write -P 2 5M 4k"]);
    assert_eq!(dirty(&a, "b0"), vec![(5 * MIB, K64)]);
    assert!(a.stop().success(), "{}", a.logs());
    assert_eq!(qemu_bitmaps(&a, false), vec![("b0".to_string(), K64, strings(&["auto"]))]);
    assert_eq!(dirty_by_qemu(&a, "b0"), vec![(5 * MIB, K64)]);
    check_clean(&a);
}
