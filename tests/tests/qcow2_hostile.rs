//! Hostile and damaged images: each is a clear error naming the file and the problem,
//! never wrong data, a panic, or an open of a file outside the allowed directories.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use appliance_tests::{Appliance, Setup, bin, require_tool, run, run_unchecked, stdout};

fn qemu_img(args: &[&str]) {
    run(Command::new("qemu-img").args(args));
}

fn be_u64(path: &Path, off: u64) -> u64 {
    let mut b = [0u8; 8];
    std::fs::File::open(path).unwrap().read_exact_at(&mut b, off).unwrap();
    u64::from_be_bytes(b)
}

fn put(path: &Path, off: u64, bytes: &[u8]) {
    std::fs::OpenOptions::new().write(true).open(path).unwrap().write_all_at(bytes, off).unwrap();
}

/// An image with data in its first clusters.
fn image(dir: &Path, name: &str, opts: &str) -> PathBuf {
    let p = dir.join(name);
    qemu_img(&["create", "-f", "qcow2", "-o", opts, p.to_str().unwrap(), "64M"]);
    run(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 0x5a 0 256k"]).arg(&p));
    p
}

fn config(dir: &Path, disks: &str) -> PathBuf {
    let cfg = dir.join("a.toml");
    let text = format!(
        "[appliance]\ncores = [0]\nbuffer_pool = \"16MiB\"\n[nbd]\nlisten = [\"unix:{}/s.sock\"]\n{}",
        dir.display(),
        disks.replace("{dir}", &dir.display().to_string())
    );
    std::fs::write(&cfg, text).unwrap();
    cfg
}

/// `appliance serve --strict` must refuse to start (without `--strict` the image would
/// be listed as failed and the other disks served: tests/tests/isolation.rs); returns
/// its error output.
fn refused(dir: &Path, disks: &str) -> String {
    let cfg = config(dir, disks);
    let out = run_unchecked(
        Command::new(bin()).args(["serve", "--strict", "--config"]).arg(&cfg),
        Duration::from_secs(60),
    );
    assert!(!out.status.success(), "the appliance served a hostile image");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("panicked"), "panic: {err}");
    err
}

fn qcow2_disk(name: &str, file: &str, extra: &str) -> String {
    format!("[[disk]]\nname = \"{name}\"\npath = \"{{dir}}/{file}\"\nformat = \"qcow2\"\n{extra}\n")
}

#[test]
fn header_and_table_damage_is_refused_at_open() {
    require_tool("qemu-img", "qemu-utils");
    type Damage = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, Damage, &str)> = vec![
        (
            "bad version",
            Box::new(|p| put(p, 4, &4u32.to_be_bytes())),
            "unsupported qcow2 version 4",
        ),
        ("huge clusters", Box::new(|p| put(p, 20, &30u32.to_be_bytes())), "cluster_bits 30"),
        ("not qcow2", Box::new(|p| put(p, 0, b"XXXX")), "not a qcow2 image"),
        (
            "refcount table over the header",
            Box::new(|p| put(p, 48, &0u64.to_be_bytes())),
            "refcount table overlaps the header",
        ),
        ("L1 too small", Box::new(|p| put(p, 36, &0u32.to_be_bytes())), "L1 table too small"),
        (
            "unaligned L2 offset",
            Box::new(|p| {
                let l1 = be_u64(p, 40);
                let e = be_u64(p, l1);
                put(p, l1, &(e | 0x200).to_be_bytes());
            }),
            "L1 table entry 0",
        ),
        (
            "L1 entry beyond the file",
            Box::new(|p| {
                let l1 = be_u64(p, 40);
                put(p, l1, &((1u64 << 40) | (1 << 63)).to_be_bytes());
            }),
            "beyond the end of the file",
        ),
        (
            "unknown incompatible feature",
            Box::new(|p| put(p, 72, &(1u64 << 5).to_be_bytes())),
            "unsupported incompatible features: unknown feature bit 5",
        ),
        (
            "truncated tables",
            Box::new(|p| {
                let l1 = be_u64(p, 40);
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(p)
                    .unwrap()
                    .set_len(l1 - 65536)
                    .unwrap();
            }),
            "truncated",
        ),
        (
            "encrypted",
            Box::new(|p| put(p, 32, &1u32.to_be_bytes())),
            "encrypted images (crypt_method 1) are not supported",
        ),
    ];
    for (what, damage, expect) in cases {
        let dir = tempfile::tempdir().unwrap();
        let p = image(dir.path(), "bad.qcow2", "cluster_size=65536");
        damage(&p);
        let err = refused(dir.path(), &qcow2_disk("bad", "bad.qcow2", ""));
        assert!(err.contains("bad.qcow2"), "{what}: the error names the file: {err}");
        assert!(err.contains(expect), "{what}: expected `{expect}` in: {err}");
    }
}

#[test]
fn unsupported_features_are_named() {
    require_tool("qemu-img", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    // Extended L2 entries with clusters too small for 512-byte subclusters.
    let p = image(dir.path(), "ext.qcow2", "cluster_size=4096");
    let v = be_u64(&p, 72) | 1 << 4;
    put(&p, 72, &v.to_be_bytes());
    let err = refused(dir.path(), &qcow2_disk("x", "ext.qcow2", ""));
    assert!(err.contains("extended L2 entries need clusters of at least 16384"), "{err}");
    // The legacy AES encryption.
    let p = image(dir.path(), "aes.qcow2", "cluster_size=65536");
    put(&p, 32, &1u32.to_be_bytes());
    let err = refused(dir.path(), &qcow2_disk("a", "aes.qcow2", ""));
    assert!(err.contains("crypt_method 1") && err.contains("not supported"), "{err}");
    // The corrupt bit: read-write refused with advice, read-only served.
    let p = image(dir.path(), "c.qcow2", "cluster_size=65536");
    let v = be_u64(&p, 72) | 2;
    put(&p, 72, &v.to_be_bytes());
    let err = refused(dir.path(), &qcow2_disk("c", "c.qcow2", ""));
    assert!(err.contains("marked corrupt") && err.contains("read_only"), "{err}");
    let cfg = config(dir.path(), &qcow2_disk("c", "c.qcow2", "read_only = true"));
    let dir2 = tempfile::tempdir().unwrap();
    let _ = cfg;
    std::fs::copy(&p, dir2.path().join("c.qcow2")).unwrap();
    let mut a = Appliance::start_in(
        dir2,
        Setup { disks: qcow2_disk("c", "c.qcow2", "read_only = true"), ..Setup::default() },
    );
    let out = run(Command::new("qemu-io").args([
        "-r",
        "-f",
        "raw",
        "-c",
        "read -P 0x5a 0 256k",
        &a.uri("c"),
    ]));
    assert!(!stdout(&out).contains("fail"), "a corrupt-flagged image is readable read-only");
    assert!(a.stop().success());
}

#[test]
fn backing_files_are_confined_and_loops_refused() {
    require_tool("qemu-img", "qemu-utils");
    let root = tempfile::tempdir().unwrap();
    let images = root.path().join("images");
    let other = root.path().join("other");
    std::fs::create_dir_all(&images).unwrap();
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("secret.raw"), vec![0x77u8; 1 << 20]).unwrap();
    run(Command::new("qemu-img").current_dir(&images).args([
        "create",
        "-f",
        "qcow2",
        "-b",
        "../other/secret.raw",
        "-F",
        "raw",
        "top.qcow2",
        "1M",
    ]));
    // Default: only the image's own directory.
    let err = refused(&images, &qcow2_disk("t", "top.qcow2", ""));
    assert!(err.contains("outside the allowed backing directories"), "{err}");
    assert!(err.contains("secret.raw"), "{err}");
    // Allowed explicitly: it serves the backing file's data.
    let extra =
        format!("allowed_backing_dirs = [\"{}\", \"{}\"]", images.display(), other.display());
    let cfg = config(&images, &qcow2_disk("t", "top.qcow2", &extra));
    let mut child = Command::new(bin())
        .args(["serve", "--config"])
        .arg(&cfg)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let sock = images.join("s.sock");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    let uri = format!("nbd+unix:///t?socket={}", sock.display());
    let out =
        run(Command::new("qemu-io").args(["-r", "-f", "raw", "-c", "read -P 0x77 0 1M", &uri]));
    assert!(!stdout(&out).contains("fail"));
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    // A loop: a -> b -> a.
    run(Command::new("qemu-img")
        .current_dir(&images)
        .args(["create", "-f", "qcow2", "a.qcow2", "1M"]));
    run(Command::new("qemu-img")
        .current_dir(&images)
        .args(["create", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", "b.qcow2", "1M"]));
    run(Command::new("qemu-img")
        .current_dir(&images)
        .args(["rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", "a.qcow2"]));
    let err = refused(&images, &qcow2_disk("b", "b.qcow2", ""));
    assert!(err.contains("loop"), "{err}");
    // A protocol name instead of a file.
    run(Command::new("qemu-img").current_dir(&images).args([
        "rebase",
        "-u",
        "-b",
        "nbd://127.0.0.1/x",
        "-F",
        "raw",
        "a.qcow2",
    ]));
    let err = refused(&images, &qcow2_disk("a", "a.qcow2", ""));
    assert!(err.contains("not a plain file path"), "{err}");
}

#[test]
fn corrupt_tables_found_during_io_give_errors_not_wrong_data() {
    require_tool("qemu-io", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let bad = image(dir.path(), "bad.qcow2", "cluster_size=65536");
    image(dir.path(), "good.qcow2", "cluster_size=65536");
    // Point guest cluster 1 at a host offset that is not cluster-aligned.
    let l1 = be_u64(&bad, 40);
    let l2 = be_u64(&bad, l1) & 0x00ff_ffff_ffff_fe00;
    let e = be_u64(&bad, l2 + 8);
    put(&bad, l2 + 8, &((e & !(1 << 63)) | 512 | (1 << 63)).to_be_bytes());
    let disks = qcow2_disk("bad", "bad.qcow2", "") + &qcow2_disk("good", "good.qcow2", "");
    let mut a = Appliance::start_in(dir, Setup { cores: "[0, 1]", disks, ..Setup::default() });
    // Cluster 0 is fine; cluster 1 is an error, not data.
    let ok =
        run(Command::new("qemu-io").args(["-f", "raw", "-c", "read -P 0x5a 0 64k", &a.uri("bad")]));
    assert!(!stdout(&ok).contains("fail"));
    let out = run_unchecked(
        Command::new("qemu-io").args(["-f", "raw", "-c", "read -P 0x5a 64k 64k", &a.uri("bad")]),
        Duration::from_secs(60),
    );
    let text = stdout(&out) + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("Input/output error") || text.contains("failed"),
        "read of a corrupt mapping must fail: {text}"
    );
    // Writes to the image are refused from now on; the other disk is unaffected.
    let out = run_unchecked(
        Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 1 1M 4k", &a.uri("bad")]),
        Duration::from_secs(60),
    );
    let text = stdout(&out) + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("error") || text.contains("failed"), "{text}");
    let good = run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "read -P 0x5a 0 256k",
        &a.uri("good"),
    ]));
    assert!(!stdout(&good).contains("fail"));
    assert!(a.alive());
    assert!(a.logs().contains("corrupt"), "the log explains: {}", a.logs());
    assert!(a.stop().success());
}
