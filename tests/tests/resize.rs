//! Growing served disks (`disk_resize`), judged by real clients: while writers run on
//! the qcow2 disk (their data verified), it grows past what its L1 table covered; a new
//! NBD connection (nbdinfo) sees the new size, qemu-io writes past the old end and reads
//! everything back; it shrinks once its tail holds no data (refused, naming the offset,
//! while it does); a raw disk grows, and shrinks over a hole only; refusals (a size that
//! is not a multiple of 512, a disk with a bitmap) name what is wrong and change nothing; after
//! the appliance stops, `qemu-img check` is clean and qemu-img and qemu-io see the new
//! size and the data. (A guest seeing the new size at once: tests/tests/vhost_guest.rs.)

use std::process::Command;

use appliance_tests::jobs::{start_vm, stop_writers, writers};
use appliance_tests::nbd_map::io;
use appliance_tests::ops::{rpc_error, rpc_ok};
use appliance_tests::{Appliance, require_tool, run, stdout};
use serde_json::{Value, json};

/// The export's size as a new NBD connection sees it.
fn nbd_size(a: &Appliance, export: &str) -> u64 {
    let out = run(Command::new("nbdinfo").arg("--size").arg(a.uri(export)));
    stdout(&out).trim().parse().unwrap_or_else(|e| panic!("nbdinfo: {e}: {}", stdout(&out)))
}

#[test]
fn disks_grow_and_shrink_while_served_and_qemu_sees_the_new_size_and_data() {
    require_tool("nbdinfo", "libnbd-bin");
    let mut a = start_vm();
    let img = a.path("vm.qcow2");
    assert_eq!(nbd_size(&a, "vm"), 128 << 20);
    let w = writers(&a);
    // 64 KiB clusters: one L2 table covers 512 MiB, so 1 GiB needs a larger L1 table.
    let r = rpc_ok(&a, "disk_resize", json!({"disk": "vm", "size": "1GiB"}));
    assert_eq!((r["old_size"].as_u64(), r["size"].as_u64()), (Some(128 << 20), Some(1 << 30)));
    assert_eq!(nbd_size(&a, "vm"), 1 << 30);
    io(&a, "vm", &["write -P 0x66 900M 1M", "read -P 0x66 900M 1M", "read -P 0 600M 1M"]);
    io(&a, "vm", &["read -P 0x11 0 8M", "read -P 0x22 32M 4M"]);
    stop_writers(w);
    // Refusals name the problem and leave the size alone.
    let (code, m) = rpc_error(&a, "disk_resize", json!({"disk": "vm", "size": "512MiB"}));
    assert!(code == -32000 && m.contains("disk vm") && m.contains("would lose data"), "{m}");
    assert!(m.contains("guest offset 0x38400000 is allocated"), "{code} {m}");
    io(&a, "vm", &["read -P 0x66 900M 1M"]);
    let (code, m) = rpc_error(&a, "disk_resize", json!({"disk": "vm", "size": 1000}));
    assert!(code == -32602 && m.contains("`size`"), "{code} {m}");
    rpc_ok(&a, "bitmap_add", json!({"disk": "vm", "name": "b"}));
    let (code, m) = rpc_error(&a, "disk_resize", json!({"disk": "vm", "size": "2GiB"}));
    assert!(code == -32000 && m.contains("bitmaps (b)"), "{code} {m}");
    rpc_ok(&a, "bitmap_remove", json!({"disk": "vm", "name": "b"}));
    assert_eq!(nbd_size(&a, "vm"), 1 << 30);
    // The same size again is no change.
    rpc_ok(&a, "disk_resize", json!({"disk": "vm", "size": 1u64 << 30}));
    // With the tail's data gone (zeroed with unmap), the disk shrinks, and grows again.
    io(&a, "vm", &["write -z -u 900M 1M"]);
    let r = rpc_ok(&a, "disk_resize", json!({"disk": "vm", "size": "768MiB"}));
    assert_eq!(r["size"].as_u64(), Some(768 << 20), "{r}");
    assert_eq!(nbd_size(&a, "vm"), 768 << 20);
    io(&a, "vm", &["write -P 0x67 767M 1M", "read -P 0x67 767M 1M", "read -P 0x11 0 8M"]);
    // A raw file grows sparsely.
    std::fs::File::create(a.path("r.raw")).unwrap().set_len(1 << 20).unwrap();
    rpc_ok(&a, "disk_add", json!({"name": "r", "path": a.path("r.raw"), "format": "raw"}));
    io(&a, "r", &["write -P 0x77 0 1M"]);
    let r = rpc_ok(&a, "disk_resize", json!({"disk": "r", "size": "64MiB"}));
    assert_eq!(r["size"].as_u64(), Some(64 << 20), "{r}");
    assert_eq!(nbd_size(&a, "r"), 64 << 20);
    io(&a, "r", &["read -P 0x77 0 1M", "read -P 0 1M 63M", "write -P 0x78 63M 1M"]);
    // Shrinking a raw file: refused over data, done over a hole.
    let (code, m) = rpc_error(&a, "disk_resize", json!({"disk": "r", "size": "32MiB"}));
    assert!(code == -32000 && m.contains("disk r") && m.contains("would lose data"), "{m}");
    io(&a, "r", &["read -P 0x78 63M 1M", "write -z -u 63M 1M"]);
    rpc_ok(&a, "disk_resize", json!({"disk": "r", "size": "32MiB"}));
    assert_eq!(nbd_size(&a, "r"), 32 << 20);
    io(&a, "r", &["read -P 0x77 0 1M", "read -P 0 1M 31M"]);
    assert!(a.stop().success(), "{}", a.logs());
    assert_eq!(std::fs::metadata(a.path("r.raw")).unwrap().len(), 32 << 20);
    let out = stdout(&run(Command::new("qemu-img").arg("check").arg(&img)));
    assert!(out.contains("No errors were found"), "{out}");
    let info = stdout(&run(Command::new("qemu-img").args(["info", "--output=json"]).arg(&img)));
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["virtual-size"].as_u64(), Some(768 << 20), "{info}");
    let out = run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-r", "-c", "read -P 0x67 767M 1M", "-c", "read -P 0x11 0 8M"])
        .arg(&img));
    assert!(!stdout(&out).contains("fail"), "{}", stdout(&out));
}
