//! qcow2 against the oracle: images made by qemu-img in every shape users meet are
//! served over NBD; every byte read must equal `qemu-img convert -O raw`; the same
//! writes done through the appliance and by qemu-io on a copy must leave the same
//! content; `qemu-img check` must find no corruption and no leak; backing files must be
//! untouched. Images made by `appliance create` must pass `qemu-img check` and work
//! with qemu-io.

use std::path::Path;
use std::process::Command;

use appliance_tests::{Appliance, Setup, bin, pattern, require_tool, run, stdout};

const MIB: u64 = 1 << 20;

fn qemu_img(args: &[&str]) -> String {
    stdout(&run(Command::new("qemu-img").args(args)))
}

fn qemu_io(fmt: &str, file: &str, cmds: &[String]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", fmt]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.arg(file);
    let out = run(&mut c);
    let text = stdout(&out);
    assert!(!text.contains("failed") && !text.contains("error"), "qemu-io {file}: {text}");
}

fn sha(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

/// `qemu-img check --output=json` of an image: (corruptions, leaks).
fn check(path: &Path) -> (u64, u64) {
    let out = Command::new("qemu-img").args(["check", "--output=json"]).arg(path).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!("qemu-img check output: {}", String::from_utf8_lossy(&out.stdout))
    });
    (v["corruptions"].as_u64().unwrap_or(0), v["leaks"].as_u64().unwrap_or(0))
}

/// One image shape: how to make it and what to fill it with.
struct Variant {
    name: &'static str,
    size: u64,
    cluster: u64,
    create: Vec<String>,
    /// qemu-io commands that put data into the image before serving.
    fill: Vec<String>,
    compressed: Option<&'static str>,
    chain: bool,
    snapshot: bool,
}

fn variant(name: &'static str, size: u64, cluster: u64, opts: &str) -> Variant {
    let cs = cluster;
    Variant {
        name,
        size,
        cluster,
        create: vec![format!(
            "cluster_size={cluster}{}{opts}",
            if opts.is_empty() { "" } else { "," }
        )],
        fill: vec![
            format!("write -P 0x61 0 {}", 3 * cs + 100),
            format!("write -P 0x62 {} {}", 10 * cs, 5 * cs),
            format!("write -P 0x63 {} {}", size / 2, cs * 2),
            format!("write -z {} {}", 12 * cs, cs),
        ],
        compressed: None,
        chain: false,
        snapshot: false,
    }
}

/// The writes applied through the appliance and, for the oracle, by qemu-io.
fn write_script(v: &Variant) -> Vec<String> {
    let cs = v.cluster;
    let size = v.size;
    let l2_cover = cs * (cs / 8);
    let mut s = vec![
        format!("write -P 0x11 {} {}", cs / 2, cs),
        "write -P 0x12 7 1".to_string(),
        format!("write -P 0x13 {} {}", 5 * cs + 3, 6 * cs),
        format!("write -z {} {}", 2 * cs, 2 * cs),
        format!("write -z -u {} {}", 8 * cs, 3 * cs + 100),
        format!("write -P 0x14 {} 512", size - 512),
        format!("write -P 0x15 {} {}", size / 2 + cs / 3, cs),
        format!("write -z -u {} {}", 10 * cs, 2 * cs),
        format!("write -P 0x16 {} {}", 10 * cs + 100, 300),
    ];
    if l2_cover * 2 < size {
        s.push(format!("write -P 0x17 {} 3000", l2_cover - 1000));
        s.push(format!("write -P 0x18 {} {}", 2 * l2_cover - cs, 2 * cs));
    }
    if !(v.chain && v.create.iter().any(|c| c.contains("compat=0.10"))) {
        s.push(format!("discard {} {}", 16 * cs, 4 * cs));
    }
    s.push("flush".to_string());
    s
}

fn make(v: &Variant, dir: &Path) -> Vec<std::path::PathBuf> {
    let img = dir.join("img.qcow2");
    let img_s = img.to_str().unwrap();
    let size = v.size.to_string();
    let mut backing_files = Vec::new();
    if let Some(kind) = v.compressed {
        let src = dir.join("src.raw");
        let mut data = pattern(5, v.size as usize);
        // Some zero runs so the compressor sees both kinds of cluster.
        for chunk in data.chunks_mut((v.cluster * 4) as usize).step_by(3) {
            chunk.fill(0);
        }
        std::fs::write(&src, &data).unwrap();
        qemu_img(&[
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            &format!("cluster_size={},compression_type={kind}", v.cluster),
            src.to_str().unwrap(),
            img_s,
        ]);
        std::fs::remove_file(&src).unwrap();
        return backing_files;
    }
    if v.chain {
        // base.raw (shorter than the top) <- mid.qcow2 <- img.qcow2, relative names.
        let base = dir.join("base.raw");
        let mut data = pattern(9, (v.size / 2) as usize);
        data[..(v.cluster as usize)].fill(0x42);
        std::fs::write(&base, &data).unwrap();
        let mid = dir.join("mid.qcow2");
        let cs = format!("cluster_size={}", v.cluster);
        run(Command::new("qemu-img").current_dir(dir).args([
            "create",
            "-f",
            "qcow2",
            "-o",
            &cs,
            "-b",
            "base.raw",
            "-F",
            "raw",
            "mid.qcow2",
            &size,
        ]));
        qemu_io(
            "qcow2",
            mid.to_str().unwrap(),
            &[
                format!("write -P 0x71 {} {}", 3 * v.cluster, 4 * v.cluster),
                format!("write -z {} {}", 20 * v.cluster, v.cluster),
            ],
        );
        run(Command::new("qemu-img").current_dir(dir).args([
            "create",
            "-f",
            "qcow2",
            "-o",
            &v.create[0],
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            "img.qcow2",
            &size,
        ]));
        backing_files.push(base);
        backing_files.push(mid);
    } else {
        qemu_img(&["create", "-f", "qcow2", "-o", &v.create[0], img_s, &size]);
    }
    qemu_io("qcow2", img_s, &v.fill);
    if v.snapshot {
        qemu_img(&["snapshot", "-c", "snap1", img_s]);
        qemu_io("qcow2", img_s, &[format!("write -P 0x64 {} {}", v.cluster, v.cluster)]);
    }
    backing_files
}

fn disk_toml() -> String {
    "[[disk]]\nname = \"q\"\npath = \"{dir}/img.qcow2\"\nformat = \"qcow2\"\n".to_string()
}

fn exercise(v: Variant, cores: &'static str) {
    let dir = tempfile::tempdir().unwrap();
    let backing = make(&v, dir.path());
    let img = dir.path().join("img.qcow2");
    let before: Vec<Vec<u8>> = backing.iter().map(|b| sha(b)).collect();
    // The oracle's view of the guest disk before any write.
    let reference = dir.path().join("reference.raw");
    qemu_img(&["convert", "-O", "raw", img.to_str().unwrap(), reference.to_str().unwrap()]);
    // A copy for qemu-io to write (same directory: same relative backing names).
    let expected = dir.path().join("expected.qcow2");
    run(Command::new("cp").args(["--sparse=always"]).arg(&img).arg(&expected));

    let mut a = Appliance::start_in(dir, Setup { cores, disks: disk_toml(), ..Setup::default() });
    let uri = a.uri("q");
    // Every byte over NBD equals the oracle's conversion.
    let served = a.path("served.raw");
    run(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "raw", &uri]).arg(&served));
    assert!(
        std::fs::read(&served).unwrap() == std::fs::read(&reference).unwrap(),
        "{}: NBD content differs from qemu-img convert",
        v.name
    );
    // The same writes through the appliance and directly.
    let script = write_script(&v);
    qemu_io("raw", &uri, &script);
    let after_nbd = a.path("after.raw");
    run(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "raw", &uri]).arg(&after_nbd));
    assert!(a.stop().success(), "{}: shutdown:\n{}", v.name, a.logs());
    qemu_io("qcow2", expected.to_str().unwrap(), &script);
    let (corrupt, leaks) = check(&a.path("img.qcow2"));
    assert_eq!(
        (corrupt, leaks),
        (0, 0),
        "{}: qemu-img check after the appliance's writes:\n{}",
        v.name,
        a.logs()
    );
    let cmp = Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "qcow2"])
        .arg(a.path("img.qcow2"))
        .arg(&expected)
        .output()
        .unwrap();
    assert!(
        cmp.status.success(),
        "{}: image differs from qemu-io's: {}",
        v.name,
        String::from_utf8_lossy(&cmp.stdout)
    );
    let exp_raw = a.path("expected.raw");
    qemu_img(&["convert", "-O", "raw", expected.to_str().unwrap(), exp_raw.to_str().unwrap()]);
    assert!(
        std::fs::read(&after_nbd).unwrap() == std::fs::read(&exp_raw).unwrap(),
        "{}: NBD view after writes differs",
        v.name
    );
    for (b, h) in backing.iter().zip(before) {
        assert!(sha(b) == h, "{}: backing file {} was modified", v.name, b.display());
    }
}

#[test]
fn cluster_sizes() {
    require_tool("qemu-img", "qemu-utils");
    exercise(variant("512-byte clusters", 8 * MIB, 512, ""), "[0]");
    exercise(variant("4k clusters", 16 * MIB, 4096, ""), "[0]");
    exercise(variant("64k clusters", 1536 * MIB, 65536, ""), "[0, 1]");
    exercise(variant("2M clusters", 96 * MIB, 2 * MIB, ""), "[0]");
}

#[test]
fn refcount_widths_and_compat() {
    require_tool("qemu-img", "qemu-utils");
    exercise(variant("refcount_bits=1", 16 * MIB, 4096, "refcount_bits=1"), "[0]");
    exercise(variant("refcount_bits=64", 16 * MIB, 65536, "refcount_bits=64"), "[0]");
    exercise(variant("compat=0.10", 16 * MIB, 65536, "compat=0.10"), "[0]");
    exercise(variant("compat=1.1 lazy refcounts", 16 * MIB, 65536, "lazy_refcounts=on"), "[0, 1]");
    exercise(variant("preallocation=metadata", 32 * MIB, 65536, "preallocation=metadata"), "[0]");
}

#[test]
fn compressed_images() {
    require_tool("qemu-img", "qemu-utils");
    for (kind, cs) in [("zlib", 65536u64), ("zstd", 65536), ("zlib", 4096)] {
        let mut v = variant("compressed", 16 * MIB, cs, "");
        v.compressed = Some(kind);
        v.name = if kind == "zstd" { "zstd compressed" } else { "zlib compressed" };
        exercise(v, "[0]");
    }
}

#[test]
fn backing_chain_three_deep_with_short_raw_base() {
    require_tool("qemu-img", "qemu-utils");
    let mut v = variant("backing chain", 32 * MIB, 65536, "");
    v.chain = true;
    exercise(v, "[0, 1]");
    let mut v = variant("backing chain, 4k clusters", 8 * MIB, 4096, "");
    v.chain = true;
    exercise(v, "[0]");
}

#[test]
fn internal_snapshots_share_clusters() {
    require_tool("qemu-img", "qemu-utils");
    let mut v = variant("snapshot", 16 * MIB, 65536, "");
    v.snapshot = true;
    exercise(v, "[0]");
    let mut v = variant("snapshot, 512-byte clusters", 4 * MIB, 512, "");
    v.snapshot = true;
    exercise(v, "[0]");
}

#[test]
fn images_made_by_appliance_create_pass_qemu_img_check() {
    require_tool("qemu-img", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, &str); 7] = [
        ("default.qcow2", ""),
        ("c512.qcow2", "cluster_size=512"),
        ("c2m.qcow2", "cluster_size=2M,refcount_bits=64"),
        ("rb1.qcow2", "refcount_bits=1,cluster_size=4k"),
        ("v2.qcow2", "compat=0.10"),
        ("lazy.qcow2", "lazy_refcounts=on,compression_type=zstd"),
        ("prealloc.qcow2", "preallocation=metadata"),
    ];
    for (file, opts) in cases {
        let p = dir.path().join(file);
        let mut c = Command::new(bin());
        c.arg("create");
        if !opts.is_empty() {
            c.args(["-o", opts]);
        }
        run(c.arg(&p).arg("40M"));
        assert_eq!(check(&p), (0, 0), "{file} ({opts}) right after create");
        let info: serde_json::Value =
            serde_json::from_str(&qemu_img(&["info", "--output=json", p.to_str().unwrap()]))
                .unwrap();
        assert_eq!(info["virtual-size"], 40 * MIB, "{file}");
        qemu_io(
            "qcow2",
            p.to_str().unwrap(),
            &["write -P 0x5c 1000 300000".into(), "read -P 0x5c 1000 300000".into()],
        );
        assert_eq!(check(&p), (0, 0), "{file} after qemu-io writes");
    }
    // A backing file named relative to the overlay.
    let base = dir.path().join("default.qcow2");
    let overlay = dir.path().join("overlay.qcow2");
    run(Command::new(bin()).args(["create", "-b", "default.qcow2"]).arg(&overlay));
    let info: serde_json::Value =
        serde_json::from_str(&qemu_img(&["info", "--output=json", overlay.to_str().unwrap()]))
            .unwrap();
    assert_eq!(info["backing-filename"], "default.qcow2");
    assert_eq!(info["virtual-size"], 40 * MIB);
    let out = run(Command::new("qemu-img").args(["compare"]).arg(&base).arg(&overlay));
    assert!(out.status.success());
}

#[test]
fn concurrent_allocating_writes_from_several_connections() {
    require_tool("fio", "fio");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img.qcow2");
    // 4k clusters: many allocations, many L2 tables, refcount blocks filling up.
    qemu_img(&["create", "-f", "qcow2", "-o", "cluster_size=4096", img.to_str().unwrap(), "256M"]);
    let mut a =
        Appliance::start_in(dir, Setup { cores: "[0, 1]", disks: disk_toml(), ..Setup::default() });
    let out = run(Command::new("fio").args([
        "--name=alloc",
        "--ioengine=nbd",
        &format!("--uri={}", a.uri("q")),
        "--rw=randwrite",
        "--bsrange=512-32k",
        "--iodepth=64",
        "--numjobs=4",
        "--size=48M",
        "--offset_increment=64M",
        "--verify=crc32c",
        "--verify_state_save=0",
        "--do_verify=1",
        "--verify_fatal=1",
        "--group_reporting",
        "--output-format=json",
    ]));
    let text = stdout(&out);
    let json: serde_json::Value = serde_json::from_str(&text[text.find('{').unwrap()..]).unwrap();
    assert_eq!(json["jobs"][0]["error"], 0);
    assert!(a.stop().success(), "{}", a.logs());
    assert_eq!(check(&a.path("img.qcow2")), (0, 0), "qemu-img check after concurrent allocation");
}
