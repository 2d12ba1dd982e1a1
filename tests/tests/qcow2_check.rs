//! `appliance check` against `qemu-img check`: the same verdicts (clean, leaks,
//! corruption) on the same images, the same exit codes, and repairs that qemu-img then
//! finds clean; plus `info` and `map` against their qemu-img counterparts, and the
//! repair of a dirty lazy-refcounts image when it is served.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use appliance_tests::{Appliance, Setup, bin, require_tool, run, run_unchecked, stdout};

fn be_u64(path: &Path, off: u64) -> u64 {
    let mut b = [0u8; 8];
    std::fs::File::open(path).unwrap().read_exact_at(&mut b, off).unwrap();
    u64::from_be_bytes(b)
}

fn put(path: &Path, off: u64, bytes: &[u8]) {
    std::fs::OpenOptions::new().write(true).open(path).unwrap().write_all_at(bytes, off).unwrap();
}

fn qemu_check(path: &Path) -> (u64, u64, i32) {
    let out = Command::new("qemu-img").args(["check", "--output=json"]).arg(path).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    (
        v["corruptions"].as_u64().unwrap_or(0),
        v["leaks"].as_u64().unwrap_or(0),
        out.status.code().unwrap(),
    )
}

fn our_check(path: &Path, repair: Option<&str>) -> (u64, u64, i32) {
    let mut c = Command::new(bin());
    c.args(["check", "--json"]);
    if let Some(r) = repair {
        c.args(["--repair", r]);
    }
    let out = run_unchecked(c.arg(path), Duration::from_secs(120));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!("check output: {}{}", stdout(&out), String::from_utf8_lossy(&out.stderr))
    });
    (v["corruptions"].as_u64().unwrap(), v["leaks"].as_u64().unwrap(), out.status.code().unwrap())
}

fn image(dir: &Path, name: &str, opts: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    run(Command::new("qemu-img").args(["create", "-f", "qcow2", "-o", opts]).arg(&p).arg("64M"));
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x5a 0 1M", "-c", "write -P 0x33 40M 64k"])
        .arg(&p));
    p
}

/// Sets the 16-bit refcount of host cluster `cluster` (64 KiB clusters, first block).
fn set_refcount16(p: &Path, cluster: u64, v: u16) {
    let table = be_u64(p, 48);
    let block = be_u64(p, table);
    put(p, block + cluster * 2, &v.to_be_bytes());
}

#[test]
fn verdicts_and_exit_codes_agree_with_qemu_img() {
    require_tool("qemu-img", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    // Clean images of several shapes, including shared clusters and bitmaps.
    let clean = image(dir.path(), "clean.qcow2", "cluster_size=65536");
    assert_eq!(our_check(&clean, None), (0, 0, 0));
    assert_eq!(qemu_check(&clean), (0, 0, 0));
    let snap = image(dir.path(), "snap.qcow2", "cluster_size=65536");
    run(Command::new("qemu-img").args(["snapshot", "-c", "s1"]).arg(&snap));
    run(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 0x44 64k 64k"]).arg(&snap));
    assert_eq!(our_check(&snap, None), (0, 0, 0), "snapshots share clusters without leaks");
    let bm = image(dir.path(), "bm.qcow2", "cluster_size=65536");
    run(Command::new("qemu-img").args(["bitmap", "--add", "-g", "64k"]).arg(&bm).arg("b0"));
    run(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 0x45 2M 64k"]).arg(&bm));
    assert_eq!(qemu_check(&bm).0, 0);
    assert_eq!(our_check(&bm, None), (0, 0, 0), "bitmap clusters are counted");
    let src = dir.path().join("src.raw");
    std::fs::write(&src, (0..8u32 << 20).map(|i| (i / 1000) as u8).collect::<Vec<u8>>()).unwrap();
    let comp = dir.path().join("comp.qcow2");
    run(Command::new("qemu-img").args(["convert", "-c", "-O", "qcow2"]).arg(&src).arg(&comp));
    assert_eq!(our_check(&comp, None), (0, 0, 0), "compressed clusters are counted");

    // A leak: an appended cluster with refcount 1 that nothing uses.
    let leak = image(dir.path(), "leak.qcow2", "cluster_size=65536");
    let len = std::fs::metadata(&leak).unwrap().len();
    let n = len.div_ceil(65536);
    std::fs::OpenOptions::new().write(true).open(&leak).unwrap().set_len((n + 1) * 65536).unwrap();
    set_refcount16(&leak, n, 1);
    assert_eq!(qemu_check(&leak), (0, 1, 3));
    assert_eq!(our_check(&leak, None), (0, 1, 3));
    let (c, l, code) = our_check(&leak, Some("leaks"));
    assert_eq!((c, l, code), (0, 0, 0), "leaks repaired");
    assert_eq!(qemu_check(&leak), (0, 0, 0), "qemu-img agrees after the repair");

    // Corruption: a used data cluster with refcount 0.
    let bad = image(dir.path(), "bad.qcow2", "cluster_size=65536");
    let l1 = be_u64(&bad, 40);
    let l2 = be_u64(&bad, l1) & 0x00ff_ffff_ffff_fe00;
    let data = be_u64(&bad, l2) & 0x00ff_ffff_ffff_fe00;
    set_refcount16(&bad, data / 65536, 0);
    let (qc, _, qcode) = qemu_check(&bad);
    assert!(qc > 0 && qcode == 2, "qemu-img sees the corruption");
    let (oc, _, ocode) = our_check(&bad, None);
    assert!(oc > 0 && ocode == 2, "we see the corruption");
    let (c, l, code) = our_check(&bad, Some("all"));
    assert_eq!((c, l, code), (0, 0, 0), "everything repaired");
    assert_eq!(qemu_check(&bad), (0, 0, 0), "qemu-img agrees after the repair");
    let out = run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "read -P 0x5a 0 1M", "-c", "read -P 0x33 40M 64k"])
        .arg(&bad));
    assert!(!stdout(&out).contains("fail"), "data intact after repair");
}

#[test]
fn info_and_map_agree_with_qemu_img() {
    require_tool("qemu-img", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let base = image(dir.path(), "base.qcow2", "cluster_size=65536,lazy_refcounts=on");
    let top = dir.path().join("top.qcow2");
    run(Command::new("qemu-img").current_dir(dir.path()).args([
        "create",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
    ]));
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x11 512k 128k", "-c", "write -z 4M 1M"])
        .arg(&top));
    let ours: serde_json::Value = serde_json::from_str(&stdout(&run(Command::new(bin())
        .args(["info", "--json"])
        .arg(&base))))
    .unwrap();
    let theirs: serde_json::Value = serde_json::from_str(&stdout(&run(Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&base))))
    .unwrap();
    for k in ["virtual-size", "cluster-size", "format"] {
        assert_eq!(ours[k], theirs[k], "info {k}");
    }
    assert_eq!(ours["format-specific"]["data"]["lazy-refcounts"], true);
    assert_eq!(ours["format-specific"]["data"]["compat"], "1.1");
    // map: the data ranges and their depths match qemu-img's.
    let ours: serde_json::Value =
        serde_json::from_str(&stdout(&run(Command::new(bin()).args(["map", "--json"]).arg(&top))))
            .unwrap();
    let theirs: serde_json::Value = serde_json::from_str(&stdout(&run(Command::new("qemu-img")
        .args(["map", "--output=json"])
        .arg(&top))))
    .unwrap();
    let data = |v: &serde_json::Value| -> Vec<(u64, u64, u64)> {
        v.as_array()
            .unwrap()
            .iter()
            .filter(|e| e["data"] == true)
            .map(|e| {
                (
                    e["start"].as_u64().unwrap(),
                    e["length"].as_u64().unwrap(),
                    e["depth"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    assert_eq!(data(&ours), data(&theirs), "map data ranges and depths");
}

#[test]
fn a_dirty_lazy_refcounts_image_is_repaired_when_served() {
    require_tool("qemu-img", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let p = image(dir.path(), "lazy.qcow2", "cluster_size=65536,lazy_refcounts=on");
    // Simulate a crash with lazy refcounts: the dirty bit set, refcounts stale.
    let l1 = be_u64(&p, 40);
    let l2 = be_u64(&p, l1) & 0x00ff_ffff_ffff_fe00;
    let data = be_u64(&p, l2) & 0x00ff_ffff_ffff_fe00;
    set_refcount16(&p, data / 65536, 0);
    let inc = be_u64(&p, 72) | 1;
    put(&p, 72, &inc.to_be_bytes());
    let mut a = Appliance::start_in(
        dir,
        Setup {
            disks: "[[disk]]\nname = \"l\"\npath = \"{dir}/lazy.qcow2\"\nformat = \"qcow2\"\n"
                .into(),
            ..Setup::default()
        },
    );
    let out = run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "read -P 0x5a 0 1M",
        "-c",
        "write -P 0x66 8M 1M",
        &a.uri("l"),
    ]));
    assert!(!stdout(&out).contains("fail"));
    assert!(a.logs().contains("dirty bit"), "the repair is logged: {}", a.logs());
    assert!(a.stop().success());
    let p = a.path("lazy.qcow2");
    assert_eq!(be_u64(&p, 72) & 1, 0, "dirty bit cleared at clean shutdown");
    assert_eq!(qemu_check(&p), (0, 0, 0));
}

/// `appliance resize` against `qemu-img resize`: the same growth of images made by
/// qemu-img (the L1 table grows for small clusters; only the size for large ones), the
/// same content afterwards (old data, zeros in the new area, a write at the new end),
/// clean checks, and the grown image served over NBD; bad requests are refused.
#[test]
fn resize_grows_images_like_qemu_img() {
    require_tool("qemu-img", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("c512.qcow2", "cluster_size=512"),
        ("v2.qcow2", "compat=0.10,cluster_size=1024"),
        ("r1.qcow2", "cluster_size=4096,refcount_bits=1"),
        ("c64k.qcow2", "cluster_size=65536,lazy_refcounts=on"),
    ];
    for (name, opts) in cases {
        let ours = image(dir.path(), name, opts);
        let theirs = dir.path().join(format!("qemu-{name}"));
        std::fs::copy(&ours, &theirs).unwrap();
        let l1_before = be_u64(&ours, 40);
        let out = run(Command::new(bin()).arg("resize").arg(&ours).arg("+448M"));
        assert!(stdout(&out).contains("Image resized."), "{name}");
        run(Command::new("qemu-img")
            .args(["resize", "-q", "-f", "qcow2"])
            .arg(&theirs)
            .arg("512M"));
        if opts.contains("cluster_size=512") {
            assert_ne!(be_u64(&ours, 40), l1_before, "{name}: the L1 table had to grow");
        }
        for p in [&ours, &theirs] {
            run(Command::new("qemu-io")
                .args(["-f", "qcow2", "-c", "write -P 0x77 511M 1M"])
                .arg(p));
        }
        let out = run(Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "read -P 0x5a 0 1M", "-c", "read -P 0x33 40M 64k"])
            .args([
                "-c",
                "read -P 0 64M 8M",
                "-c",
                "read -P 0 500M 11M",
                "-c",
                "read -P 0x77 511M 1M",
            ])
            .arg(&ours));
        assert!(!stdout(&out).contains("fail"), "{name}: {}", stdout(&out));
        run(Command::new("qemu-img")
            .args(["compare", "-f", "qcow2", "-F", "qcow2"])
            .arg(&ours)
            .arg(&theirs));
        assert_eq!(qemu_check(&ours), (0, 0, 0), "{name}");
        assert_eq!(our_check(&ours, None), (0, 0, 0), "{name}");
        shrinks_over_an_unallocated_tail(dir.path(), name, &ours);
    }

    // Refused, with the reason: shrinking over data, unaligned sizes, a backing file.
    let p = dir.path().join("c512.qcow2");
    for (size, why) in [("1M", "would lose data"), ("536871000", "multiple of 512")] {
        let out = run_unchecked(
            Command::new(bin()).arg("resize").arg(&p).arg(size),
            Duration::from_secs(60),
        );
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains(why), "{size}: {out:?}");
    }
    let overlay = dir.path().join("overlay.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-f", "qcow2", "-F", "qcow2", "-b", "c512.qcow2"])
        .arg(&overlay));
    let out = run_unchecked(
        Command::new(bin()).arg("resize").arg(&overlay).arg("1G"),
        Duration::from_secs(60),
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("backing file"), "{out:?}");

    // The grown image serves its new size over NBD.
    let mut a = Appliance::start_in(
        dir,
        Setup {
            disks: "[[disk]]\nname = \"g\"\npath = \"{dir}/c512.qcow2\"\nformat = \"qcow2\"\n"
                .into(),
            ..Setup::default()
        },
    );
    let info =
        run(Command::new("qemu-img").args(["info", "--output=json", "-f", "raw"]).arg(a.uri("g")));
    let v: serde_json::Value = serde_json::from_str(&stdout(&info)).unwrap();
    assert_eq!(v["virtual-size"].as_u64(), Some(512 << 20));
    let out = run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "read -P 0x77 511M 1M",
        "-c",
        "write -P 0x12 300M 4M",
        "-c",
        "read -P 0x12 300M 4M",
        &a.uri("g"),
    ]));
    assert!(!stdout(&out).contains("fail"), "{}", stdout(&out));
    assert!(a.stop().success());
    assert_eq!(qemu_check(&a.path("c512.qcow2")), (0, 0, 0));
}

/// `appliance resize` to a smaller size: refused while the tail holds data (naming the
/// guest offset), done once qemu-io has zeroed it with unmap; the result checks clean
/// by qemu-img and keeps the data below the new end.
fn shrinks_over_an_unallocated_tail(dir: &std::path::Path, name: &str, grown: &std::path::Path) {
    let small = dir.join(format!("small-{name}"));
    std::fs::copy(grown, &small).unwrap();
    let out = run_unchecked(
        Command::new(bin()).arg("resize").arg(&small).arg("100M"),
        Duration::from_secs(60),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("guest offset 0x1ff00000"), "{name}: {err}");
    run(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -z -u 511M 1M"]).arg(&small));
    let out = run(Command::new(bin()).arg("resize").arg(&small).arg("100M"));
    assert!(stdout(&out).contains("Image resized."), "{name}");
    assert_eq!(qemu_check(&small), (0, 0, 0), "{name}");
    let info = run(Command::new("qemu-img").args(["info", "--output=json"]).arg(&small));
    let v: serde_json::Value = serde_json::from_str(&stdout(&info)).unwrap();
    assert_eq!(v["virtual-size"].as_u64(), Some(100 << 20), "{name}");
    let out = run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "read -P 0x5a 0 1M", "-c", "read -P 0x33 40M 64k"])
        .args(["-c", "write -P 0x44 99M 1M", "-c", "read -P 0x44 99M 1M"])
        .arg(&small));
    assert!(!stdout(&out).contains("fail"), "{name}: {}", stdout(&out));
    assert_eq!(qemu_check(&small), (0, 0, 0), "{name}");
}

/// Image locks interoperate with QEMU's: while the appliance serves an image, qemu-io
/// cannot open it for writing, qemu-img needs `-U` to read it, and the appliance's own
/// repair and resize refuse it; while qemu-storage-daemon writes an image, the
/// appliance refuses to serve it, naming the file.
#[test]
fn images_in_use_are_locked_like_qemu() {
    require_tool("qemu-img", "qemu-utils");
    require_tool("qemu-storage-daemon", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let p = image(dir.path(), "busy.qcow2", "cluster_size=65536");
    std::fs::File::create(dir.path().join("busy.raw")).unwrap().set_len(1 << 20).unwrap();
    let mut a = Appliance::start_in(
        dir,
        Setup {
            disks: "[[disk]]\nname = \"b\"\npath = \"{dir}/busy.qcow2\"\nformat = \"qcow2\"\n\
                    [[disk]]\nname = \"r\"\npath = \"{dir}/busy.raw\"\n"
                .into(),
            ..Setup::default()
        },
    );
    let p = a.path(p.file_name().unwrap().to_str().unwrap());
    let io = run_unchecked(
        Command::new("qemu-io").args(["-f", "qcow2", "-c", "write 0 4k"]).arg(&p),
        Duration::from_secs(60),
    );
    assert!(!io.status.success());
    assert!(String::from_utf8_lossy(&io.stderr).contains("\"write\" lock"), "{io:?}");
    let info = run_unchecked(Command::new("qemu-img").arg("info").arg(&p), Duration::from_secs(60));
    assert!(!info.status.success(), "qemu-img info without -U must see the lock");
    run(Command::new("qemu-img").args(["info", "-U"]).arg(&p));
    for args in [vec!["resize", "+1M"], vec!["check", "-r", "leaks"]] {
        let out = run_unchecked(
            Command::new(bin()).arg(args[0]).arg(&p).args(&args[1..]),
            Duration::from_secs(60),
        );
        assert!(!out.status.success(), "{args:?} on a served image");
        assert!(String::from_utf8_lossy(&out.stderr).contains("in use"), "{args:?}: {out:?}");
    }
    // A served raw image is locked too.
    let raw = a.path("busy.raw");
    let out = run_unchecked(
        Command::new(bin()).arg("resize").arg(&raw).arg("2M"),
        Duration::from_secs(60),
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use"), "{out:?}");
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), 1 << 20);
    // The export itself writes as usual.
    let out = run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x42 0 64k"])
        .arg(a.uri("b")));
    assert!(stdout(&out).contains("wrote"));
    assert!(a.stop().success());
    // Released at shutdown.
    run(Command::new("qemu-io").args(["-f", "qcow2", "-c", "read -P 0x42 0 64k"]).arg(&p));

    // The other way round: qemu-storage-daemon writes the image.
    let sock = p.with_file_name("qsd.sock");
    let mut qsd = Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!("driver=file,node-name=f,filename={}", p.display()))
        .args(["--blockdev", "driver=qcow2,node-name=q,file=f"])
        .arg("--nbd-server")
        .arg(format!("addr.type=unix,addr.path={}", sock.display()))
        .args(["--export", "type=nbd,id=e,node-name=q,writable=on"])
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !sock.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let cfg = p.with_file_name("busy.toml");
    std::fs::write(
        &cfg,
        format!(
            "[nbd]\nlisten = [\"unix:{}\"]\n[[disk]]\nname = \"b\"\npath = \"{}\"\nformat = \"qcow2\"\n",
            p.with_file_name("nbd2.sock").display(),
            p.display()
        ),
    )
    .unwrap();
    let out = run_unchecked(
        Command::new(bin()).args(["serve", "--strict", "--config"]).arg(&cfg),
        Duration::from_secs(30),
    );
    let _ = qsd.kill();
    let _ = qsd.wait();
    assert!(!out.status.success(), "served an image qemu-storage-daemon writes");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("busy.qcow2") && err.contains("in use"), "{err}");
}

fn corrupt_bit(path: &Path) -> bool {
    be_u64(path, 72) & 2 != 0
}

/// An image QEMU marked corrupt (its overlap check caught a write aimed at the
/// refcount table): `check -r leaks` repairs the leak but keeps the corrupt bit; `check
/// -r all` repairs the rest and only then clears it, so the image can be served
/// read-write again, as the refusal message promises.
#[test]
fn full_repair_clears_the_corrupt_bit_leaks_repair_does_not() {
    require_tool("qemu-img", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "marked.qcow2", "cluster_size=65536");
    // Point the first L2 entry at the refcount table; QEMU refuses the next write there
    // and sets the corrupt bit.
    let l2 = be_u64(&img, be_u64(&img, 40)) & 0x00ff_ffff_ffff_fe00;
    put(&img, l2, &(be_u64(&img, 48) | 1 << 63).to_be_bytes());
    let out = run_unchecked(
        Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 0x11 0 4k"]).arg(&img),
        Duration::from_secs(60),
    );
    assert!(stdout(&out).contains("write failed"), "QEMU refuses the write: {}", stdout(&out));
    assert!(corrupt_bit(&img), "QEMU marked the image corrupt");
    assert_eq!(qemu_check(&img).2, 2);

    let (c, _, code) = our_check(&img, Some("leaks"));
    assert!(c > 0 && code == 2, "the corruption is still there after -r leaks");
    assert!(corrupt_bit(&img), "a leaks-only repair keeps the corrupt bit");

    assert_eq!(our_check(&img, Some("all")), (0, 0, 0), "a full repair leaves nothing");
    assert!(!corrupt_bit(&img), "a clean full repair clears the corrupt bit");
    assert_eq!(qemu_check(&img), (0, 0, 0), "qemu-img agrees");
    // Read-write use works again, and the data outside the damaged cluster is intact.
    let out = run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "read -P 0x5a 64k 960k", "-c", "write -P 0x22 2M 64k"])
        .arg(&img));
    assert!(!stdout(&out).contains("fail"), "{}", stdout(&out));

    // A clean image with the bit set (marked by a bug, say): a full check clears it.
    let clean = image(dir.path(), "flagged.qcow2", "cluster_size=65536");
    let v = be_u64(&clean, 72) | 2;
    put(&clean, 72, &v.to_be_bytes());
    assert_eq!(our_check(&clean, Some("leaks")), (0, 0, 0));
    assert!(corrupt_bit(&clean), "-r leaks never clears the bit");
    assert_eq!(our_check(&clean, Some("all")), (0, 0, 0));
    assert!(!corrupt_bit(&clean));
}
