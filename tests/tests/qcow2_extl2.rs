//! qcow2 images with extended L2 entries (`extended_l2=on`: 32 subclusters per
//! cluster) against the oracle: images qemu-img made (16k, 64k and 2M clusters over a
//! backing file, one without, one whose clusters a snapshot shares, each with
//! subclusters allocated, zeroed and compressed clusters) are served over NBD on two
//! shards; the same writes, zero writes and discards done through the appliance and by
//! qemu-io on a copy leave the same content (`qemu-img compare`) and `qemu-img check`
//! is clean. A first small write into a cluster over a backing file allocates one
//! subcluster's worth of the file, not the cluster. Images `appliance create -o
//! extended_l2=on` makes work with qemu-img and qemu-io, and with internal snapshots
//! `appliance snapshot` takes and applies. Subclusters in a LUKS-encrypted image and in
//! an image with an external data file: the same writes compare equal with QEMU's. A bitmap with a subcluster both
//! allocated and zero gets a clear error (and the disk beside it is fine), and repair
//! clears it.

use std::path::Path;
use std::process::Command;

use appliance_tests::nbd_map::{io, io_fails, io_ro};
use appliance_tests::ops::{control_extra, rpc_ok};
use appliance_tests::{Appliance, Setup, bin, qemu_img_create_luks, require_tool, run, stdout};
use serde_json::json;

fn qemu_io(img: &Path, cmds: &[String]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "qcow2"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let text = stdout(&run(c.arg(img)));
    assert!(!text.contains("fail") && !text.contains("error"), "qemu-io {img:?}: {text}");
}

/// `qemu-img check --output=json`: (corruptions, leaks, check-errors).
fn check(img: &Path) -> (u64, u64, u64) {
    let out = Command::new("qemu-img").args(["check", "--output=json"]).arg(img).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("qemu-img check: {}", String::from_utf8_lossy(&out.stderr)));
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    (n("corruptions"), n("leaks"), n("check-errors"))
}

fn compare(a: &Path, b: &Path) {
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "qcow2"])
        .arg(a)
        .arg(b)
        .output()
        .unwrap();
    assert!(out.status.success(), "{a:?} vs {b:?}: {}", String::from_utf8_lossy(&out.stdout));
}

struct Case {
    name: &'static str,
    cluster: u64,
    backing: bool,
    snapshot: bool,
}

/// Room for the script's 48 clusters.
fn size(cs: u64) -> u64 {
    (64u64 << 20).max(64 * cs)
}

/// Makes the image with qemu-img (over a backing file full of 0x5b) and fills it with
/// qemu-io: whole and partial clusters, single subclusters, zeroed subclusters of an
/// unallocated cluster, a compressed cluster.
fn make(dir: &Path, c: &Case) -> std::path::PathBuf {
    let img = dir.join(format!("{}.qcow2", c.name));
    let (cs, ss) = (c.cluster, c.cluster / 32);
    let mut cmd = Command::new("qemu-img");
    let opts = format!("cluster_size={cs},extended_l2=on");
    cmd.current_dir(dir).args(["create", "-q", "-f", "qcow2", "-o", &opts]);
    if c.backing {
        let b = dir.join("base.qcow2");
        if !b.exists() {
            run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&b).arg("128M"));
            qemu_io(&b, &["write -P 0x5b 0 128M".into()]);
        }
        cmd.args(["-F", "qcow2", "-b", "base.qcow2"]);
    }
    run(cmd.arg(&img).arg(size(cs).to_string()));
    let fill = [
        format!("write -P 0x61 0 {}", 3 * cs + 100),
        format!("write -P 0x62 {} {}", 10 * cs + ss, 3 * ss),
        format!("write -P 0x63 32M {}", 2 * cs),
        format!("write -z {} {}", 12 * cs + 2 * ss, 4 * ss),
        format!("write -c -P 0x64 {} {cs}", 20 * cs),
    ];
    qemu_io(&img, &fill);
    if c.snapshot {
        run(Command::new("qemu-img").args(["snapshot", "-c", "s1"]).arg(&img));
    }
    img
}

/// The writes done through the appliance and, on the copy, by qemu-io: into allocated
/// clusters, unallocated ones, unallocated and zero subclusters of allocated ones, a
/// compressed one; zero writes of subclusters (with and without unmap) and clusters;
/// partial subclusters; a cluster-aligned discard.
fn script(cs: u64) -> Vec<String> {
    let ss = cs / 32;
    vec![
        format!("write -P 0x71 {} 4096", cs + 512),
        format!("write -P 0x72 {} 4096", 5 * cs + 1000),
        format!("write -P 0x73 {} {ss}", 10 * cs + 7 * ss + 100),
        format!("write -P 0x74 {} 512", 12 * cs + 3 * ss),
        format!("write -P 0x75 {} 4096", 20 * cs + 100),
        format!("write -P 0x76 {} {}", 30 * cs - 4096, 2 * cs + 8192),
        format!("write -z {} {}", 10 * cs + 16 * ss, 4 * ss),
        format!("write -z -u {} {}", cs + 8 * ss, 8 * ss),
        format!("write -z {} {cs}", 41 * cs),
        format!("write -z -u {} {cs}", 42 * cs),
        format!("discard {} {cs}", 3 * cs),
        format!("write -P 0x77 {} {}", 45 * cs + 5 * ss + 512, ss / 2),
        format!("write -z {} {ss}", 46 * cs + 512),
        format!("write -P 0x78 {} {}", 47 * cs, 5 * ss),
    ]
}

#[test]
fn images_with_subclusters_are_served_like_qemu_serves_them() {
    require_tool("qemu-img", "qemu-utils");
    let cases = [
        Case { name: "b16k", cluster: 16 << 10, backing: true, snapshot: false },
        Case { name: "b64k", cluster: 64 << 10, backing: true, snapshot: false },
        Case { name: "b2m", cluster: 2 << 20, backing: true, snapshot: false },
        Case { name: "plain", cluster: 64 << 10, backing: false, snapshot: false },
        Case { name: "snap", cluster: 32 << 10, backing: true, snapshot: true },
    ];
    let dir = tempfile::tempdir().unwrap();
    let theirs = tempfile::tempdir().unwrap();
    let mut disks = String::new();
    for c in &cases {
        let img = make(dir.path(), c);
        std::fs::copy(&img, theirs.path().join(format!("{}.qcow2", c.name))).unwrap();
        disks += &format!(
            "[[disk]]\nname = \"{}\"\npath = \"{}\"\nformat = \"qcow2\"\n",
            c.name,
            img.display()
        );
    }
    std::fs::copy(dir.path().join("base.qcow2"), theirs.path().join("base.qcow2")).unwrap();
    let setup = Setup { cores: "[0, 1]", disks, extra: control_extra(None), ..Setup::default() };
    let a = Appliance::start_in(dir, setup);
    for c in &cases {
        let (cs, ss) = (c.cluster, c.cluster / 32);
        let below = if c.backing { "0x5b" } else { "0" };
        // What qemu-io wrote reads back through the appliance, subcluster by subcluster.
        let reads = [
            format!("read -P 0x61 0 {}", 3 * cs + 100),
            format!("read -P {below} {} {ss}", 10 * cs),
            format!("read -P 0x62 {} {}", 10 * cs + ss, 3 * ss),
            format!("read -P {below} {} {}", 10 * cs + 4 * ss, 28 * ss),
            format!("read -P {below} {} {}", 12 * cs, 2 * ss),
            format!("read -P 0 {} {}", 12 * cs + 2 * ss, 4 * ss),
            format!("read -P {below} {} {}", 12 * cs + 6 * ss, 26 * ss),
            format!("read -P 0x63 32M {}", 2 * cs),
            format!("read -P 0x64 {} {cs}", 20 * cs),
        ];
        io(&a, c.name, &reads.iter().map(String::as_str).collect::<Vec<_>>());
        let s = script(cs);
        io(&a, c.name, &s.iter().map(String::as_str).collect::<Vec<_>>());
        qemu_io(&theirs.path().join(format!("{}.qcow2", c.name)), &s);
        // A discard of whole subclusters reads as zeros here; QEMU ignores discards
        // smaller than a cluster, so its copy gets the zeros written.
        let (at, n) = (50 * cs + 3 * ss, 5 * ss);
        io(&a, c.name, &[&format!("discard {at} {n}"), &format!("read -P 0 {at} {n}")]);
        qemu_io(&theirs.path().join(format!("{}.qcow2", c.name)), &[format!("write -z {at} {n}")]);
    }
    let mut a = a;
    assert!(a.stop().success(), "{}", a.logs());
    for c in &cases {
        let ours = a.path(&format!("{}.qcow2", c.name));
        compare(&ours, &theirs.path().join(format!("{}.qcow2", c.name)));
        assert_eq!(check(&ours), (0, 0, 0), "{}", c.name);
        let text = stdout(&run(Command::new(bin()).arg("check").arg(&ours)));
        assert!(text.contains("No errors were found"), "{}: {text}", c.name);
        if c.snapshot {
            // The snapshot still reads as the image did when it was taken.
            let snap = format!("driver=qcow2,file.filename={},snapshot.name=s1", ours.display());
            let out = Command::new("qemu-io")
                .args(["-r", "--image-opts", &snap, "-c"])
                .arg(format!(
                    "read -P 0x62 {} {}",
                    10 * c.cluster + c.cluster / 32,
                    3 * c.cluster / 32
                ))
                .output()
                .unwrap();
            assert!(!String::from_utf8_lossy(&out.stdout).contains("fail"), "{out:?}");
        }
    }
}

/// Allocated bytes of a file.
fn allocated(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).unwrap().blocks() * 512
}

#[test]
fn a_first_small_write_over_a_backing_file_copies_a_subcluster_not_the_cluster() {
    require_tool("qemu-img", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&base).arg("64M"));
    qemu_io(&base, &["write -P 0x5b 0 64M".into()]);
    for (name, extl2) in [("sub", "on"), ("whole", "off")] {
        let o = format!("cluster_size=2M,extended_l2={extl2}");
        run(Command::new("qemu-img")
            .current_dir(dir.path())
            .args(["create", "-q", "-f", "qcow2", "-o", &o, "-F", "qcow2", "-b", "base.qcow2"])
            .arg(dir.path().join(format!("{name}.qcow2")))
            .arg("64M"));
    }
    let disks = ["sub", "whole"]
        .iter()
        .map(|n| {
            let p = dir.path().join(format!("{n}.qcow2"));
            format!("[[disk]]\nname = \"{n}\"\npath = \"{}\"\nformat = \"qcow2\"\n", p.display())
        })
        .collect::<String>();
    let setup = Setup { cores: "[0, 1]", disks, extra: control_extra(None), ..Setup::default() };
    let a = Appliance::start_in(dir, setup);
    let writes: Vec<String> =
        (0..16u64).map(|k| format!("write -P 0x42 {} 4096", k * (2 << 20) + 8192)).collect();
    let before = [allocated(&a.path("sub.qcow2")), allocated(&a.path("whole.qcow2"))];
    let len = |p: &str| std::fs::metadata(a.path(p)).unwrap().len();
    // Its last cluster may be partly written: count from the cluster's end.
    let whole_len_before = len("whole.qcow2").next_multiple_of(2 << 20);
    for n in ["sub", "whole"] {
        io(&a, n, &writes.iter().map(String::as_str).collect::<Vec<_>>());
        io(&a, n, &["flush"]);
        io(&a, n, &["read -P 0x5b 0 8192", "read -P 0x42 8192 4096", "read -P 0x5b 12288 2084864"]);
    }
    let grew = |p: &str, i: usize| allocated(&a.path(p)) - before[i];
    let (sub, whole) = (grew("sub.qcow2", 0), grew("whole.qcow2", 1));
    // 16 subclusters of 64 KiB (plus an L2 table and a refcount block, a cluster
    // each) against 16 clusters of 2 MiB.
    assert!(whole >= 16 * (2 << 20), "without subclusters the file grew {whole} bytes");
    assert!(
        sub <= 16 * (64 << 10) + 2 * (2 << 20) && sub * 8 < whole,
        "with subclusters the file grew {sub} bytes, without {whole}"
    );
    // The file grows ahead of its clusters; without subclusters all it grew by is
    // reserved (writes into it overwrite reserved blocks instead of filling holes),
    // with them it stays sparse.
    let (sub_len, whole_len) = (len("sub.qcow2"), len("whole.qcow2"));
    assert!(whole_len >= whole_len_before + 16 * (2 << 20) + (16 << 20), "{whole_len} bytes");
    assert!(whole >= whole_len - whole_len_before, "{whole} of {whole_len} bytes reserved");
    let sparse = allocated(&a.path("sub.qcow2"));
    assert!(sparse * 4 < sub_len, "with subclusters {sparse} of {sub_len} bytes allocated");
    let mut a = a;
    assert!(a.stop().success(), "{}", a.logs());
    assert_eq!(check(&a.path("sub.qcow2")), (0, 0, 0));
}

/// A map's extents as (start, length, data, zero), adjacent ones of one kind merged.
fn extents(json: &str) -> Vec<(u64, u64, bool, bool)> {
    let v: serde_json::Value = serde_json::from_str(json).expect("map JSON");
    let mut out: Vec<(u64, u64, bool, bool)> = Vec::new();
    for e in v.as_array().expect("extents") {
        let (s, l) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        let (d, z) = (e["data"].as_bool().unwrap(), e["zero"].as_bool().unwrap());
        match out.last_mut() {
            Some(p) if p.0 + p.1 == s && (p.2, p.3) == (d, z) => p.1 += l,
            _ => out.push((s, l, d, z)),
        }
    }
    out
}

#[test]
fn appliance_create_makes_extended_l2_images_qemu_uses() {
    require_tool("qemu-img", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    for (name, opts) in [
        ("c1", "extended_l2=on"),
        ("c2", "extended_l2=on,cluster_size=16k,preallocation=metadata"),
        ("c3", "extended_l2=on,cluster_size=2M"),
    ] {
        let img = dir.path().join(format!("{name}.qcow2"));
        run(Command::new(bin()).args(["create", "-o", opts]).arg(&img).arg("32M"));
        assert_eq!(check(&img), (0, 0, 0), "{name}");
        let i = stdout(&run(Command::new("qemu-img").args(["info", "--output=json"]).arg(&img)));
        assert!(i.contains("\"extended-l2\": true"), "{i}");
        qemu_io(
            &img,
            &[
                "write -P 0x41 1M 3M".into(),
                "write -P 0x42 5000 1000".into(),
                "read -P 0x41 1M 3M".into(),
                "read -P 0x42 5000 1000".into(),
                "read -P 0 0 4096".into(),
            ],
        );
        assert_eq!(check(&img), (0, 0, 0), "{name}");
        let ours = stdout(&run(Command::new(bin()).arg("check").arg(&img)));
        assert!(ours.contains("No errors were found"), "{ours}");
        // `appliance map` tells subclusters apart as `qemu-img map` does (which also
        // probes the file for holes: not on preallocated images).
        qemu_io(&img, &["write -z 12k 4k".into()]);
        if !opts.contains("preallocation") {
            let theirs =
                stdout(&run(Command::new("qemu-img").args(["map", "--output=json"]).arg(&img)));
            let ours = stdout(&run(Command::new(bin()).args(["map", "--json"]).arg(&img)));
            assert_eq!(extents(&ours), extents(&theirs), "{name}: map");
        }
        // Our internal snapshot of it: QEMU's writes copy the shared subclusters, the
        // snapshot keeps them, applying it (ours) brings them back.
        run(Command::new(bin()).args(["snapshot", "-c", "s1"]).arg(&img));
        qemu_io(&img, &["write -P 0x43 5000 1000".into(), "write -z 1M 64k".into()]);
        assert_eq!(check(&img), (0, 0, 0), "{name} after the snapshot");
        run(Command::new(bin()).args(["snapshot", "-a", "s1"]).arg(&img));
        qemu_io(&img, &["read -P 0x42 5000 1000".into(), "read -P 0x41 1M 3M".into()]);
        assert_eq!(check(&img), (0, 0, 0), "{name} after applying the snapshot");
    }
    // Preallocated over a backing file: the backing file still shows through (without
    // subclusters the combination is refused, as by qemu-img).
    let base = dir.path().join("base.qcow2");
    run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&base).arg("4M"));
    qemu_io(&base, &["write -P 0x37 0 4M".into()]);
    for (name, extl2) in [("pb", "on"), ("pw", "off")] {
        let o = format!("extended_l2={extl2},preallocation=metadata");
        let out = Command::new(bin())
            .args(["create", "-o", &o, "-b", "base.qcow2", "-F", "qcow2"])
            .arg(dir.path().join(format!("{name}.qcow2")))
            .arg("4M")
            .output()
            .unwrap();
        if extl2 == "off" {
            let e = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success() && e.contains("extended_l2=on"), "{e}");
            continue;
        }
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let img = dir.path().join(format!("{name}.qcow2"));
        assert_eq!(check(&img), (0, 0, 0));
        qemu_io(&img, &["read -P 0x37 0 4M".into(), "write -P 0x38 64k 4k".into()]);
        qemu_io(&img, &["read -P 0x37 0 64k".into(), "read -P 0x38 64k 4k".into()]);
        assert_eq!(check(&img), (0, 0, 0));
    }
    let small = dir.path().join("small.qcow2");
    let out = Command::new(bin())
        .args(["create", "-o", "extended_l2=on,cluster_size=4k"])
        .arg(&small)
        .arg("32M")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("extended_l2"), "{err}");
}

#[test]
fn a_subcluster_both_allocated_and_zero_is_a_clear_error() {
    require_tool("qemu-img", "qemu-utils");
    let mut a = Appliance::start(Setup { extra: control_extra(None), ..Setup::default() }, |_| {});
    let img = a.path("both.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o", "extended_l2=on"])
        .arg(&img)
        .arg("8M"));
    qemu_io(&img, &["write -P 0x55 0 64k".into(), "write -P 0x56 64k 64k".into()]);
    let mut b = std::fs::read(&img).unwrap();
    let l2 = {
        let l1 = u64::from_be_bytes(b[40..48].try_into().unwrap()) as usize;
        (u64::from_be_bytes(b[l1..l1 + 8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00) as usize
    };
    // Guest cluster 0: every subcluster allocated, and subcluster 3 also zero.
    b[l2 + 8..l2 + 16].copy_from_slice(&(0x0000_0008_ffff_ffffu64).to_be_bytes());
    std::fs::write(&img, b).unwrap();
    let ours = Command::new(bin()).arg("check").arg(&img).output().unwrap();
    let text = String::from_utf8_lossy(&ours.stdout).to_string();
    assert!(text.contains("SubclusterBoth") && text.contains("subcluster bitmap"), "{text}");
    rpc_ok(
        &a,
        "disk_add",
        json!({"name": "both", "path": img, "format": "qcow2", "read_only": true}),
    );
    io_fails(&a, "both", "read 0 4k");
    io_ro(&a, "both", &["read -P 0x56 64k 64k"]);
    assert!(a.stop().success(), "{}", a.logs());
    assert!(a.logs().contains("SubclusterBoth"), "{}", a.logs());
    // Repair clears the entry: the cluster reads as unallocated (zeros), its host
    // cluster leaks and is reclaimed, the rest is untouched, and qemu-img agrees.
    run(Command::new(bin()).args(["check", "-r", "all"]).arg(&img));
    assert_eq!(check(&img), (0, 0, 0));
    qemu_io(&img, &["read -P 0 0 64k".into(), "read -P 0x56 64k 64k".into()]);
}

const SECRET: &str = "correct horse";

/// qemu-io with the secret `s0` on an image named by `--image-opts` `spec`.
fn qemu_io_opts(spec: &str, cmds: &[String]) {
    let mut c = Command::new("qemu-io");
    c.args(["--object", &format!("secret,id=s0,data={SECRET}"), "--image-opts"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let text = stdout(&run(c.arg(spec)));
    assert!(!text.contains("fail") && !text.contains("error"), "qemu-io {spec}: {text}");
}

/// `qemu-img compare` and `check` with the secret `s0`, on `--image-opts` specs.
fn compare_and_check(ours: &str, theirs: &str) {
    let secret = format!("secret,id=s0,data={SECRET}");
    let out = Command::new("qemu-img")
        .args(["compare", "--object", &secret, "--image-opts", ours, theirs])
        .output()
        .unwrap();
    assert!(out.status.success(), "{ours}: {}", String::from_utf8_lossy(&out.stdout));
    let out = Command::new("qemu-img")
        .args(["check", "--object", &secret, "--image-opts", ours])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("No errors"), "{ours}: {out:?}");
}

#[test]
fn subclusters_in_encrypted_images_and_with_a_data_file() {
    require_tool("qemu-img", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let theirs = tempfile::tempdir().unwrap();
    let secret = format!("secret,id=s0,data={SECRET}");
    let enc = |d: &Path| {
        format!("driver=qcow2,file.filename={}/enc.qcow2,encrypt.key-secret=s0", d.display())
    };
    let data = |d: &Path| {
        format!(
            "driver=qcow2,file.filename={0}/df.qcow2,data-file.driver=file,data-file.filename={0}/df.data",
            d.display()
        )
    };
    qemu_img_create_luks(|| {
        let mut c = Command::new("qemu-img");
        c.args(["create", "-q", "-f", "qcow2", "--object", &secret, "-o"])
            .arg("encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10,extended_l2=on")
            .arg(dir.path().join("enc.qcow2"))
            .arg("64M");
        c
    });
    run(Command::new("qemu-img")
        .current_dir(dir.path())
        .args(["create", "-q", "-f", "qcow2", "-o", "extended_l2=on,data_file=df.data"])
        .arg(dir.path().join("df.qcow2"))
        .arg("64M"));
    let fill = ["write -P 0x61 1000 5000".to_string(), "write -z 128k 8k".into()];
    for spec in [enc(dir.path()), data(dir.path())] {
        qemu_io_opts(&spec, &fill);
    }
    for f in ["enc.qcow2", "df.qcow2", "df.data"] {
        std::fs::copy(dir.path().join(f), theirs.path().join(f)).unwrap();
    }
    std::fs::write(dir.path().join("key"), SECRET).unwrap();
    let disks = "[[disk]]\nname = \"enc\"\npath = \"{dir}/enc.qcow2\"\nformat = \"qcow2\"\n\
                 [disk.encryption]\nkey_file = \"{dir}/key\"\n\
                 [[disk]]\nname = \"df\"\npath = \"{dir}/df.qcow2\"\nformat = \"qcow2\"\n";
    let setup = Setup {
        cores: "[0, 1]",
        disks: disks.into(),
        extra: control_extra(None),
        ..Setup::default()
    };
    let mut a = Appliance::start_in(dir, setup);
    let s = script(64 << 10);
    for name in ["enc", "df"] {
        io(&a, name, &["read -P 0x61 1000 5000", "read -P 0 128k 8k", "read -P 0 6000 2000"]);
        io(&a, name, &s.iter().map(String::as_str).collect::<Vec<_>>());
    }
    for spec in [enc(theirs.path()), data(theirs.path())] {
        qemu_io_opts(&spec, &s);
    }
    assert!(a.stop().success(), "{}", a.logs());
    let ours = a.path("");
    compare_and_check(&enc(&ours), &enc(theirs.path()));
    compare_and_check(&data(&ours), &data(theirs.path()));
    // The encrypted image holds no plaintext; the data-file image no guest data.
    for f in ["enc.qcow2", "df.qcow2"] {
        let bytes = std::fs::read(a.path(f)).unwrap();
        assert!(!bytes.windows(512).any(|w| w.iter().all(|x| *x == 0x76)), "{f}: guest data");
    }
}
