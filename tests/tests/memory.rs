//! What a disk costs in memory follows its configured budgets, never its header: a
//! petabyte of virtual size, a huge sparse file or the largest tables a header may
//! declare cost a few MiB, and headers past the documented limits are refused with an
//! error naming the field. (`cargo run -p bench --bin memory` reports RSS by size.)

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use appliance_tests::{Appliance, Setup, bin, require_tool, run, run_unchecked, stdout};

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<f64>().unwrap() / 1024.0
}

fn qcow2(path: &Path, opts: &str, size: &str) {
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o", opts])
        .arg(path)
        .arg(size));
}

fn disk(name: &str, extra: &str) -> String {
    format!(
        "[[disk]]\nname = \"{name}\"\npath = \"{{dir}}/{name}.qcow2\"\nformat = \"qcow2\"\n{extra}\n"
    )
}

/// Writes (and reads back) 4 KiB at `n` offsets spread over `size` bytes.
fn spread_io(a: &Appliance, export: &str, size: u64, n: u64) {
    let step = (size / n) & !4095;
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for i in 0..n {
        c.args(["-c", &format!("write -P 0x6b {} 4k", i * step)]);
    }
    for i in (0..n).step_by(7) {
        c.args(["-c", &format!("read -P 0x6b {} 4k", i * step)]);
    }
    let out = run(c.arg(a.uri(export)));
    assert!(!stdout(&out).contains("fail"), "{}", stdout(&out));
}

#[test]
fn petabyte_images_cost_what_their_budgets_allow() {
    require_tool("qemu-img", "qemu-utils");
    let disks = disk("p2m", "l2_cache = \"1MiB\"\nrefcount_cache = \"256KiB\"") + &disk("p64k", "");
    let mut a = Appliance::start(Setup { disks, ..Setup::default() }, |dir| {
        qcow2(&dir.join("p2m.qcow2"), "cluster_size=2M", "1P");
        qcow2(&dir.join("p64k.qcow2"), "cluster_size=64k", "1P");
    });
    // Two petabyte images open in a few MiB (the 2 MiB-cluster one used to take 537 MB:
    // its refcount cache had a direct index over the whole refcount table).
    let open = rss_mib(a.pid());
    assert!(open < 32.0, "opening two 1 PiB images took {open:.1} MiB");
    // I/O all over them: 1024 writes each into different L2 tables; the caches stay
    // within their budgets (1 MiB + 256 KiB, and the 32 MiB default).
    spread_io(&a, "p2m", 1 << 50, 1024);
    spread_io(&a, "p64k", 1 << 50, 1024);
    let used = rss_mib(a.pid());
    eprintln!("two 1 PiB images: {open:.1} MiB after open, {used:.1} MiB after I/O");
    assert!(
        used < open + 64.0,
        "I/O over two 1 PiB images grew RSS from {open:.1} to {used:.1} MiB"
    );
    assert!(a.stop().success(), "{}", a.logs());
    for name in ["p2m", "p64k"] {
        run(Command::new("qemu-img").arg("check").arg(a.path(&format!("{name}.qcow2"))));
    }
}

fn put(path: &Path, off: u64, bytes: &[u8]) {
    std::fs::OpenOptions::new().write(true).open(path).unwrap().write_all_at(bytes, off).unwrap();
}

/// `serve --strict` refuses the image; its error output.
fn refused(dir: &Path, file: &str) -> String {
    let cfg = dir.join("strict.toml");
    let text = format!(
        "[appliance]\ncores = [0]\n[nbd]\nlisten = [\"unix:{}/s.sock\"]\n[[disk]]\nname = \"x\"\npath = \"{}/{file}\"\nformat = \"qcow2\"\n",
        dir.display(),
        dir.display()
    );
    std::fs::write(&cfg, text).unwrap();
    let out = run_unchecked(
        Command::new(bin()).args(["serve", "--strict", "--config"]).arg(&cfg),
        Duration::from_secs(60),
    );
    assert!(!out.status.success(), "served {file}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn headers_past_the_limits_are_refused_naming_the_field() {
    require_tool("qemu-img", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    // An L1 table larger than 32 MiB (QEMU's limit too).
    let p = dir.path().join("l1.qcow2");
    qcow2(&p, "cluster_size=64k", "1G");
    put(&p, 36, &(5u32 << 20).to_be_bytes());
    let e = refused(dir.path(), "l1.qcow2");
    assert!(e.contains("l1.qcow2") && e.contains("l1_size") && e.contains("32 MiB"), "{e}");
    // A refcount table larger than 8 MiB.
    let p = dir.path().join("rt.qcow2");
    qcow2(&p, "cluster_size=64k", "1G");
    put(&p, 56, &1000u32.to_be_bytes());
    let e = refused(dir.path(), "rt.qcow2");
    assert!(e.contains("refcount_table_clusters") && e.contains("8 MiB"), "{e}");
    // A dirty lazy-refcounts image in an 8 TiB sparse file of 512-byte clusters: its
    // repair at open would count 2^34 clusters; it is refused instead.
    let p = dir.path().join("sparse.qcow2");
    qcow2(&p, "cluster_size=512,lazy_refcounts=on", "64M");
    let mut v = [0u8; 8];
    std::fs::File::open(&p).unwrap().read_exact_at(&mut v, 72).unwrap();
    put(&p, 72, &(u64::from_be_bytes(v) | 1).to_be_bytes());
    std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(8 << 40).unwrap();
    let e = refused(dir.path(), "sparse.qcow2");
    assert!(e.contains("sparse.qcow2") && e.contains("clusters") && e.contains("limited"), "{e}");
}
