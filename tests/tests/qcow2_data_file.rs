//! qcow2 images with an external data file (`data_file`, `data_file_raw`) against the
//! oracle: images qemu-img made (raw and not, over a backing file, several cluster
//! sizes) are served over NBD on two shards; the same writes, zero writes and discards
//! done through the appliance and by qemu-io on a copy leave the same content
//! (`qemu-img compare`), `qemu-img check` is clean, a raw data file stays equal to the
//! image read through its metadata, and nothing of the guest's data lands in the qcow2
//! file; a served image grows with its data file. Images `appliance create -o
//! data_file=...` makes work with qemu-img and
//! qemu-io. Hostile data file names (escaping the allowed directories, naming the image
//! itself, missing) and entries off their guest offset get clear errors.

use std::path::Path;
use std::process::Command;

use appliance_tests::nbd_map::{io, io_fails, io_ro};
use appliance_tests::ops::{control_extra, rpc_error, rpc_ok};
use appliance_tests::{Appliance, Setup, bin, require_tool, run, stdout};
use serde_json::json;

/// The image as QEMU's `--image-opts` names it, with its data file beside it (`.data`):
/// QEMU opens a relative data file name from its working directory, the appliance
/// from the image's.
fn spec(img: &Path) -> String {
    format!(
        "driver=qcow2,file.filename={},data-file.driver=file,data-file.filename={}",
        img.display(),
        img.with_extension("data").display()
    )
}

fn qemu_io(img: &Path, cmds: &[String]) {
    let mut c = Command::new("qemu-io");
    c.arg("--image-opts");
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let text = stdout(&run(c.arg(spec(img))));
    assert!(!text.contains("fail") && !text.contains("error"), "qemu-io {img:?}: {text}");
}

/// `qemu-img check --output=json`: (corruptions, leaks, check-errors).
fn check(img: &Path) -> (u64, u64, u64) {
    let out = Command::new("qemu-img")
        .args(["check", "--output=json", "--image-opts", &spec(img)])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("qemu-img check: {}", String::from_utf8_lossy(&out.stderr)));
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    (n("corruptions"), n("leaks"), n("check-errors"))
}

fn compare(a: &Path, b: &Path) {
    let out = Command::new("qemu-img")
        .args(["compare", "--image-opts", &spec(a), &spec(b)])
        .output()
        .unwrap();
    assert!(out.status.success(), "{a:?} vs {b:?}: {}", String::from_utf8_lossy(&out.stdout));
}

fn info(img: &Path) -> String {
    stdout(&run(Command::new("qemu-img").args([
        "info",
        "--output=json",
        "--image-opts",
        &spec(img),
    ])))
}

/// The writes done through the appliance and, on the copy, by qemu-io: partial and
/// whole clusters, across clusters, zero writes with and without unmap, a discard.
fn script(cs: u64) -> Vec<String> {
    vec![
        format!("write -P 0x71 {} 4096", cs + 512),
        format!("write -P 0x72 {} {}", 20 * cs - 4096, 2 * cs + 8192),
        format!("write -P 0x73 {} {}", 40 * cs, 4 * cs),
        format!("write -z {} {}", 41 * cs, cs),
        format!("write -z -u {} {}", 42 * cs, cs),
        format!("discard {} {}", 3 * cs, cs),
        "write -P 0x74 0 512".into(),
    ]
}

/// Room for the script's 48 clusters.
fn size(cs: u64) -> u64 {
    (64u64 << 20).max(64 * cs)
}

struct Case {
    name: &'static str,
    cluster: u64,
    raw: bool,
    backing: bool,
}

/// Makes the image (and its data file, and a backing file) with qemu-img and fills it
/// with qemu-io; returns the image's path.
fn make(dir: &Path, c: &Case) -> std::path::PathBuf {
    let img = dir.join(format!("{}.qcow2", c.name));
    let mut opts = format!("cluster_size={},data_file={}.data", c.cluster, c.name);
    if c.raw {
        opts.push_str(",data_file_raw=on");
    }
    // qemu-img creates the data file relative to its working directory, and QEMU
    // opens it relative to the image's.
    let mut cmd = Command::new("qemu-img");
    cmd.current_dir(dir).args(["create", "-q", "-f", "qcow2", "-o", &opts]);
    if c.backing {
        let b = dir.join("base.qcow2");
        if !b.exists() {
            run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&b).arg("64M"));
            let w = Command::new("qemu-io")
                .args(["-f", "qcow2", "-c", "write -P 0x5b 0 64M"])
                .arg(&b)
                .output();
            assert!(w.unwrap().status.success());
        }
        cmd.args(["-F", "qcow2", "-b", "base.qcow2"]);
    }
    run(cmd.arg(&img).arg(size(c.cluster).to_string()));
    let cs = c.cluster;
    let fill = [
        format!("write -P 0x61 0 {}", 3 * cs + 100),
        format!("write -P 0x62 {} {}", 10 * cs, 5 * cs),
        format!("write -P 0x63 32M {}", 2 * cs),
        format!("write -z {} {}", 12 * cs, cs),
    ];
    qemu_io(&img, &fill);
    img
}

#[test]
fn images_with_a_data_file_are_served_like_qemu_serves_them() {
    require_tool("qemu-img", "qemu-utils");
    let cases = [
        Case { name: "raw64k", cluster: 65536, raw: true, backing: false },
        Case { name: "ext4k", cluster: 4096, raw: false, backing: false },
        Case { name: "ext2m", cluster: 2 << 20, raw: false, backing: false },
        Case { name: "backed", cluster: 65536, raw: false, backing: true },
    ];
    let dir = tempfile::tempdir().unwrap();
    let theirs = tempfile::tempdir().unwrap();
    let mut disks = String::new();
    for c in &cases {
        let img = make(dir.path(), c);
        for f in [format!("{}.qcow2", c.name), format!("{}.data", c.name)] {
            std::fs::copy(dir.path().join(&f), theirs.path().join(&f)).unwrap();
        }
        disks += &format!(
            "[[disk]]\nname = \"{}\"\npath = \"{}\"\nformat = \"qcow2\"\n",
            c.name,
            img.display()
        );
    }
    if dir.path().join("base.qcow2").exists() {
        std::fs::copy(dir.path().join("base.qcow2"), theirs.path().join("base.qcow2")).unwrap();
    }
    let setup = Setup { cores: "[0, 1]", disks, extra: control_extra(None), ..Setup::default() };
    let a = Appliance::start_in(dir, setup);
    for c in &cases {
        let cs = c.cluster;
        // What qemu-io wrote reads back through the appliance.
        let reads = [
            format!("read -P 0x61 0 {}", 3 * cs + 100),
            format!("read -P 0x62 {} {}", 10 * cs, 2 * cs),
            format!("read -P 0 {} {}", 12 * cs, cs),
            format!("read -P 0x63 32M {}", 2 * cs),
        ];
        io(&a, c.name, &reads.iter().map(String::as_str).collect::<Vec<_>>());
        let s = script(cs);
        io(&a, c.name, &s.iter().map(String::as_str).collect::<Vec<_>>());
        qemu_io(&theirs.path().join(format!("{}.qcow2", c.name)), &s);
    }
    // Growing a served image grows its data file; shrinking one is refused.
    rpc_ok(&a, "disk_resize", json!({"disk": "raw64k", "size": "96MiB"}));
    io(&a, "raw64k", &["write -P 0x76 95M 1M", "read -P 0x76 95M 1M", "read -P 0 64M 31M"]);
    let q = theirs.path().join("raw64k.qcow2");
    run(Command::new("qemu-img").args(["resize", "-q", "--image-opts", &spec(&q), "96M"]));
    qemu_io(&q, &["write -P 0x76 95M 1M".into()]);
    let (_, m) = rpc_error(&a, "disk_resize", json!({"disk": "ext4k", "size": "32MiB"}));
    assert!(m.contains("not shrunk"), "{m}");
    let mut a = a;
    assert!(a.stop().success(), "{}", a.logs());
    assert_eq!(std::fs::metadata(a.path("raw64k.data")).unwrap().len(), 96 << 20);
    for c in &cases {
        let ours = a.path(&format!("{}.qcow2", c.name));
        let qemu = theirs.path().join(format!("{}.qcow2", c.name));
        compare(&ours, &qemu);
        assert_eq!(check(&ours), (0, 0, 0), "{}", c.name);
        let info =
            stdout(&run(Command::new("qemu-img").args(["info", "--output=json"]).arg(&ours)));
        assert!(info.contains(&format!("\"data-file\": \"{}.data\"", c.name)), "{info}");
        // The guest's bytes are in the data file, never in the image file.
        let meta = std::fs::read(&ours).unwrap();
        assert!(
            !meta.windows(4096).any(|w| w.iter().all(|b| *b == 0x73)),
            "{}: guest data in the qcow2 file",
            c.name
        );
        if c.raw {
            // A raw data file reads as the image does.
            let raw = format!("driver=raw,file.filename={}", ours.with_extension("data").display());
            let out = Command::new("qemu-img")
                .args(["compare", "--image-opts", &raw, &spec(&ours)])
                .output()
                .unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
        }
    }
}

#[test]
fn appliance_create_makes_data_file_images_qemu_uses() {
    require_tool("qemu-img", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    for (name, raw) in [("c1", false), ("c2", true)] {
        let img = dir.path().join(format!("{name}.qcow2"));
        let opts =
            format!("data_file={name}.data,data_file_raw={}", if raw { "on" } else { "off" });
        run(Command::new(bin()).args(["create", "-o", &opts]).arg(&img).arg("32M"));
        assert_eq!(check(&img), (0, 0, 0), "{name}");
        let i = info(&img);
        assert!(i.contains(&format!("\"data-file\": \"{name}.data\"")), "{i}");
        assert!(i.contains(&format!("\"data-file-raw\": {raw}")), "{i}");
        qemu_io(
            &img,
            &["write -P 0x41 1M 3M".into(), "read -P 0x41 1M 3M".into(), "read -P 0 0 1M".into()],
        );
        assert_eq!(check(&img), (0, 0, 0), "{name}");
        if raw {
            let data = img.with_extension("data");
            let out = run(Command::new("qemu-io")
                .args(["-f", "raw", "-c", "read -P 0x41 1M 3M"])
                .arg(data));
            assert!(!stdout(&out).contains("fail"), "{}", stdout(&out));
        }
        let ours = stdout(&run(Command::new(bin()).arg("check").arg(&img)));
        assert!(ours.contains("No errors were found"), "{ours}");
    }
}

/// A qcow2 image header's bytes, with the data file extension's name replaced.
fn rename_data_file(img: &Path, from: &str, to: &str) {
    let mut b = std::fs::read(img).unwrap();
    let at = b.windows(from.len()).position(|w| w == from.as_bytes()).expect("name in header");
    assert_eq!(from.len(), to.len(), "same length keeps the extension's layout");
    b[at..at + to.len()].copy_from_slice(to.as_bytes());
    std::fs::write(img, b).unwrap();
}

#[test]
fn hostile_data_files_get_clear_errors() {
    require_tool("qemu-img", "qemu-utils");
    let mut a = Appliance::start(Setup { extra: control_extra(None), ..Setup::default() }, |_| {});
    let dir = a.path("");
    let make = |name: &str, data: &str| {
        let img = dir.join(name);
        let o = format!("data_file={data}");
        run(Command::new("qemu-img")
            .current_dir(&dir)
            .args(["create", "-q", "-f", "qcow2", "-o", &o])
            .arg(&img)
            .arg("8M"));
        img
    };
    let add = |a: &Appliance, name: &str, img: &Path| {
        rpc_error(a, "disk_add", json!({"name": name, "path": img, "format": "qcow2"}))
    };
    // Escaping the image's directory.
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("x.data"), vec![0u8; 8 << 20]).unwrap();
    let img = make("esc.qcow2", "e.data");
    let target = outside.path().join("x.data");
    let rel = format!("{}", target.display());
    let long = make("esc2.qcow2", &"y".repeat(rel.len()));
    rename_data_file(&long, &"y".repeat(rel.len()), &rel);
    let (_, m) = add(&a, "esc", &long);
    assert!(m.contains("data file") && m.contains("outside the allowed"), "{m}");
    // Naming the image itself.
    rename_data_file(&img, "e.data", "esc.qc");
    std::fs::rename(&img, dir.join("esc.qc")).unwrap();
    let (_, m) = add(&a, "self", &dir.join("esc.qc"));
    assert!(m.contains("is the image itself"), "{m}");
    // Missing.
    let img = make("gone.qcow2", "gone.data");
    std::fs::remove_file(dir.join("gone.data")).unwrap_or_else(|e| {
        let names: Vec<_> =
            std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        panic!("{e}: {names:?}")
    });
    let (_, m) = add(&a, "gone", &img);
    assert!(m.contains("data file \"gone.data\""), "{m}");
    // An entry off its guest offset: reads fail (and the disk next to it is fine), and
    // check names the entry.
    let img = make("off.qcow2", "off.data");
    qemu_io(&img, &["write -P 0x55 0 64k".into(), "write -P 0x56 64k 64k".into()]);
    let mut b = std::fs::read(&img).unwrap();
    let l2 = {
        let l1 = u64::from_be_bytes(b[40..48].try_into().unwrap()) as usize;
        (u64::from_be_bytes(b[l1..l1 + 8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00) as usize
    };
    // Guest cluster 0 now claims guest cluster 1's place.
    b[l2..l2 + 8].copy_from_slice(&(0x8000_0000_0001_0000u64).to_be_bytes());
    std::fs::write(&img, b).unwrap();
    let ours = Command::new(bin()).arg("check").arg(&img).output().unwrap();
    let text = String::from_utf8_lossy(&ours.stdout).to_string();
    assert!(text.contains("elsewhere in the data file"), "{text}");
    rpc_ok(
        &a,
        "disk_add",
        json!({"name": "off", "path": img, "format": "qcow2", "read_only": true}),
    );
    io_fails(&a, "off", "read 0 4k");
    io_ro(&a, "off", &["read -P 0x56 64k 64k"]);
    assert!(a.stop().success(), "{}", a.logs());
    assert!(a.logs().contains("not at its guest offset in the data file"), "{}", a.logs());
}
