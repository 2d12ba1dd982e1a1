//! Dirty bitmaps and the `qemu:` metadata contexts, judged by real clients.
//!
//! - `qemu:allocation-depth` and `base:allocation` of a three-deep qcow2 chain, read
//!   with `nbdinfo --map`, equal what qemu-nbd (`-A`) serves for the same image.
//! - A bitmap added over the control socket records exactly the ranges written, zeroed
//!   and discarded (from two reactors, through qemu-io over NBD), rounded to its
//!   granularity, as `nbdinfo --map=qemu:dirty-bitmap:NAME` reads it; a disabled one
//!   records nothing until enabled; merge, clear and remove do what they say; bad
//!   requests are refused naming the field.
//! - An incremental pull backup: a full copy (`qemu-img convert`) as the bitmap starts,
//!   writes, then only the extents the bitmap marks read over NBD (libnbd) into the
//!   copy reproduce the disk (`qemu-img compare` against the export).

use std::path::Path;
use std::process::Command;

use appliance_tests::jobs::qemu_io;
use appliance_tests::nbd_map::{self, dirty_ranges, map, ranges_of};
use appliance_tests::ops::{control_extra, rpc_error, rpc_ok};
use appliance_tests::{Appliance, Setup, qemu_nbd, require_tool, run, stdout};
use serde_json::json;

const MIB: u64 = 1 << 20;

fn qemu_img(args: &[&str], dir: &Path) {
    run(Command::new("qemu-img").current_dir(dir).args(args));
}

fn tools() {
    require_tool("qemu-img", "qemu-utils");
    require_tool("nbdinfo", "libnbd-bin");
}

#[test]
fn allocation_depth_and_allocation_agree_with_qemu_nbd() {
    tools();
    let setup = Setup {
        disks: "[[disk]]\nname = \"vm\"\npath = \"{dir}/top.qcow2\"\nformat = \"qcow2\"\n".into(),
        ..Setup::default()
    };
    let mut a = Appliance::start(setup, |dir| {
        qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "64M"], dir);
        qemu_io(&dir.join("base.qcow2"), &["write -P 1 0 12M", "write -P 1 40M 1M"]);
        qemu_img(
            &["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "mid.qcow2"],
            dir,
        );
        qemu_io(&dir.join("mid.qcow2"), &["write -P 2 4M 4M", "write -z 8M 1M"]);
        qemu_img(
            &["create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2"],
            dir,
        );
        qemu_io(&dir.join("top.qcow2"), &["write -P 3 6M 1M", "write -z 20M 2M"]);
    });
    let ours = map(&a.uri("vm"), "qemu:allocation-depth");
    let ours_alloc = map(&a.uri("vm"), "base:allocation");
    assert!(a.stop().success(), "{}", a.logs());
    // qemu-nbd on the same chain, once the appliance let go of it.
    let sock = a.path("qemu-nbd.sock");
    let q = qemu_nbd::start(
        &["-r", "-t", "-A", "-f", "qcow2"],
        &a.path("top.qcow2"),
        qemu_nbd::Listen::Unix(&sock),
    );
    let quri = format!("nbd+unix:///?socket={}", sock.display());
    let theirs = map(&quri, "qemu:allocation-depth");
    let theirs_alloc = map(&quri, "base:allocation");
    qemu_nbd::stop(q);
    assert_eq!(ours, theirs, "qemu:allocation-depth");
    // What the chain says: top at 6M and 20M, mid at 4..6M, 7..9M, base elsewhere
    // below 12M and at 40M, nothing elsewhere.
    let depth = |d| ranges_of(&ours, d);
    assert_eq!(depth(1), vec![(6 * MIB, MIB), (20 * MIB, 2 * MIB)]);
    assert_eq!(depth(2), vec![(4 * MIB, 2 * MIB), (7 * MIB, 2 * MIB)]);
    assert_eq!(depth(3), vec![(0, 4 * MIB), (9 * MIB, 3 * MIB), (40 * MIB, MIB)]);
    assert_eq!(ours_alloc, theirs_alloc, "base:allocation");
}

/// A 64 MiB raw disk `d` on two reactors with a control socket (and a sparse 1 TiB
/// disk `big`).
fn start_raw() -> Appliance {
    tools();
    let setup = Setup {
        cores: "[0, 1]",
        disks: "[[disk]]\nname = \"d\"\npath = \"{dir}/d.raw\"\nformat = \"raw\"\n\
                [[disk]]\nname = \"big\"\npath = \"{dir}/big.raw\"\nformat = \"raw\"\n"
            .into(),
        extra: control_extra(None),
        ..Setup::default()
    };
    Appliance::start(setup, |dir| {
        std::fs::File::create(dir.join("d.raw")).unwrap().set_len(64 * MIB).unwrap();
        std::fs::File::create(dir.join("big.raw")).unwrap().set_len(1 << 40).unwrap();
    })
}

fn dirty(a: &Appliance, bitmap: &str) -> Vec<(u64, u64)> {
    dirty_ranges(&a.uri("d"), &format!("qemu:dirty-bitmap:{bitmap}"))
}

fn io(a: &Appliance, cmds: &[&str]) {
    nbd_map::io(a, "d", cmds)
}

#[test]
fn a_bitmap_records_exactly_the_changes() {
    let mut a = start_raw();
    io(&a, &["write -P 9 0 1M"]);
    rpc_ok(&a, "bitmap_add", json!({"disk": "d", "name": "b0", "granularity": 65536}));
    rpc_ok(&a, "bitmap_add", json!({"disk": "d", "name": "off", "disabled": true}));
    assert_eq!(dirty(&a, "b0"), vec![], "a new bitmap is clean");
    // Two connections (the reactors take turns), writes, a zero write, a discard,
    // unaligned and spanning chunks.
    io(&a, &["write -P 1 1M 4k", "write -P 2 3145738 100"]);
    io(&a, &["write -z 8M 256k", "discard 16M 64k", "write -P 3 24M 65537"]);
    let k = 64 << 10;
    let want = vec![(MIB, k), (3 * MIB, k), (8 * MIB, 256 << 10), (16 * MIB, k), (24 * MIB, 2 * k)];
    assert_eq!(dirty(&a, "b0"), want);
    assert_eq!(dirty(&a, "off"), vec![], "a disabled bitmap records nothing");
    // The export lists its contexts.
    let info = run(Command::new("nbdinfo").args(["--json"]).arg(a.uri("d")));
    let s = stdout(&info);
    for c in [
        "base:allocation",
        "qemu:allocation-depth",
        "qemu:dirty-bitmap:b0",
        "qemu:dirty-bitmap:off",
    ] {
        assert!(s.contains(c), "{c} not listed: {s}");
    }
    // Enabled, it records what follows only.
    rpc_ok(&a, "bitmap_enable", json!({"disk": "d", "name": "off"}));
    io(&a, &["write -P 4 32M 4k"]);
    assert_eq!(dirty(&a, "off"), vec![(32 * MIB, k)]);
    rpc_ok(&a, "bitmap_disable", json!({"disk": "d", "name": "off"}));
    io(&a, &["write -P 5 40M 4k"]);
    assert_eq!(dirty(&a, "off"), vec![(32 * MIB, k)]);
    // Merge into a coarser bitmap, then clear and remove.
    rpc_ok(
        &a,
        "bitmap_add",
        json!({"disk": "d", "name": "m", "granularity": 1 << 20, "disabled": true}),
    );
    rpc_ok(&a, "bitmap_merge", json!({"disk": "d", "target": "m", "sources": ["b0", "off"]}));
    let mb = |o: u64| (o * MIB, MIB);
    // b0 saw the write at 40M too.
    assert_eq!(dirty(&a, "m"), vec![mb(1), mb(3), mb(8), mb(16), mb(24), mb(32), mb(40)]);
    let list = rpc_ok(&a, "bitmap_list", json!({"disk": "d"}));
    let b0 = list["bitmaps"].as_array().unwrap().iter().find(|b| b["name"] == "b0").unwrap();
    assert_eq!(b0["count"], json!(want.iter().map(|r| r.1).sum::<u64>() + 2 * k), "{list}");
    assert_eq!(b0["recording"], true);
    rpc_ok(&a, "bitmap_clear", json!({"disk": "d", "name": "b0"}));
    assert_eq!(dirty(&a, "b0"), vec![]);
    rpc_ok(&a, "bitmap_remove", json!({"disk": "d", "name": "b0"}));
    let gone =
        Command::new("nbdinfo").arg("--map=qemu:dirty-bitmap:b0").arg(a.uri("d")).output().unwrap();
    assert!(!gone.status.success(), "a removed bitmap is no context any more");
    assert!(a.stop().success(), "{}", a.logs());
}

#[test]
fn bad_bitmap_requests_are_refused_naming_the_field() {
    let mut a = start_raw();
    rpc_ok(&a, "bitmap_add", json!({"disk": "d", "name": "b"}));
    let cases = [
        ("bitmap_add", json!({"disk": "d", "name": "b"}), "exists"),
        ("bitmap_add", json!({"disk": "d", "name": "c", "granularity": 1000}), "granularity"),
        ("bitmap_add", json!({"disk": "d", "name": "c", "granularity": 256}), "granularity"),
        ("bitmap_add", json!({"disk": "d", "name": "c", "granularity": 1u64 << 32}), "granularity"),
        // A bit per 512 B of 1 TiB would take 256 MiB: refused, naming what fits.
        ("bitmap_add", json!({"disk": "big", "name": "c", "granularity": 512}), "use 8192"),
        ("bitmap_add", json!({"disk": "d", "name": ""}), "name"),
        ("bitmap_add", json!({"disk": "d", "name": "c", "persistent": true}), "persistent"),
        ("bitmap_add", json!({"disk": "nope", "name": "c"}), "nope"),
        ("bitmap_add", json!({"disk": "d", "name": "c", "colour": 1}), "colour"),
        ("bitmap_remove", json!({"disk": "d", "name": "zz"}), "zz"),
        ("bitmap_merge", json!({"disk": "d", "target": "b", "sources": []}), "sources"),
        ("bitmap_merge", json!({"disk": "d", "target": "b", "sources": ["zz"]}), "zz"),
        ("bitmap_enable", json!({"disk": "d"}), "name"),
    ];
    for (m, p, word) in cases {
        let (_, msg) = rpc_error(&a, m, p.clone());
        assert!(msg.contains(word), "{m} {p}: {msg}");
    }
    for i in 1..64 {
        rpc_ok(&a, "bitmap_add", json!({"disk": "d", "name": format!("n{i}")}));
    }
    let (_, msg) = rpc_error(&a, "bitmap_add", json!({"disk": "d", "name": "one-too-many"}));
    assert!(msg.contains("64 bitmaps"), "{msg}");
    // Every context selected at once still answers one block-status request.
    let all = run(Command::new("nbdinfo").arg("--map=qemu:dirty-bitmap:n63").arg(a.uri("d")));
    assert!(all.status.success());
    assert!(a.stop().success(), "{}", a.logs());
}

#[test]
fn an_incremental_pull_backup_reproduces_the_disk() {
    let mut a = start_raw();
    io(&a, &["write -P 1 0 8M", "write -P 2 20M 3M"]);
    // Full backup, with the bitmap added at the same instant (no writes between).
    rpc_ok(&a, "bitmap_add", json!({"disk": "d", "name": "inc"}));
    let backup = a.path("backup.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &a.uri("d")])
        .arg(&backup));
    // Writes, then an incremental: only the dirty extents, read over NBD.
    io(&a, &["write -P 3 1M 100k", "write -z 21M 64k", "discard 40M 1M", "write -P 4 63M 1M"]);
    let extents = dirty(&a, "inc");
    assert!(!extents.is_empty());
    let copied: u64 = extents.iter().map(|e| e.1).sum();
    assert!(copied <= 4 * MIB, "only the changes are copied: {copied}");
    // The client: libnbd reads each dirty extent and patches the full copy with it.
    let list: Vec<[u64; 2]> = extents.iter().map(|e| [e.0, e.1]).collect();
    let script = "import nbd, sys, json\n\
        h = nbd.NBD()\n\
        h.connect_uri(sys.argv[1])\n\
        f = open(sys.argv[2], 'r+b')\n\
        for o, l in json.loads(sys.argv[3]):\n    f.seek(o)\n    f.write(h.pread(l, o))\n";
    require_tool("/usr/bin/python3", "python3-libnbd");
    run(Command::new("/usr/bin/python3")
        .args(["-c", script, &a.uri("d")])
        .arg(&backup)
        .arg(serde_json::to_string(&list).unwrap()));
    let cmp = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&backup)
        .arg(a.uri("d"))
        .output()
        .unwrap();
    assert!(cmp.status.success(), "full + incremental = the disk: {}", stdout(&cmp));
    assert!(a.stop().success(), "{}", a.logs());
}
