//! End to end: a real QEMU guest whose virtio-blk disk is the appliance's
//! vhost-user-blk socket (TCG, a small Linux with busybox, see tests/guest).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use appliance_tests::guest::{self, BootOptions};
use appliance_tests::{Appliance, Setup, pattern, require_tool, run, stdout};

const MIB: usize = 1 << 20;
const BOOT_TIMEOUT: Duration = Duration::from_secs(240);

fn vhost_disk(name: &str, file: &str, format: &str, queues: u32, extra: &str) -> String {
    format!(
        "[[disk]]\nname = \"{name}\"\npath = \"{{dir}}/{file}\"\nformat = \"{format}\"\n{extra}\n\
         [disk.vhost_user_blk]\nsocket = \"{{dir}}/{name}.vhost\"\nqueues = {queues}\n"
    )
}

fn md5(data: &[u8], dir: &Path) -> String {
    let f = dir.join("md5.in");
    std::fs::write(&f, data).unwrap();
    stdout(&run(Command::new("md5sum").arg(&f))).split_whitespace().next().unwrap().to_string()
}

/// What the guest does: geometry, the backing data, concurrent O_DIRECT writers,
/// discard and write-zeroes, then a flush.
const SCRIPT: &str = r#"
set -e
dev=/dev/vda
echo size=$(blockdev --getsize64 $dev)
echo queues=$(ls /sys/block/vda/mq | wc -l)
echo ro=$(cat /sys/block/vda/ro)
echo md5_first_mib=$(dd if=$dev bs=1M count=1 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
for i in 1 2 3 4; do
  ( xio prand $dev $((i * 4))M 3M $i && xio check-prand $dev $((i * 4))M 3M $i && echo writer$i=ok ) &
done
wait
xio fill $dev 32M 2M 0xcd
xio discard $dev 32M 1M
xio check $dev 32M 1M 0
xio fill $dev 40M 1M 0xee
xio zeroout $dev 40M 512k
xio check $dev 40M 512k 0
xio check $dev 41472k 512k 0xee
xio flush $dev
echo discard_max=$(cat /sys/block/vda/queue/discard_max_bytes)
echo done=1
"#;

#[test]
fn guest_on_a_qcow2_disk_with_a_backing_file_and_two_queues() {
    for tool in ["qemu-img", "qemu-io", "md5sum", "qemu-system-x86_64"] {
        require_tool(tool, "qemu-utils qemu-system-x86 coreutils");
    }
    let image = guest::ensure_built();
    let dir = tempfile::tempdir().unwrap();
    let size = 64 * MIB;
    // base.raw holds a pattern in its first MiB; the overlay is qcow2.
    let base = dir.path().join("base.raw");
    let head = pattern(3, MIB);
    std::fs::write(&base, &head).unwrap();
    std::fs::File::options().write(true).open(&base).unwrap().set_len(size as u64).unwrap();
    run(Command::new("qemu-img").current_dir(dir.path()).args([
        "create",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        // 4 KiB clusters: an L2 table maps 2 MiB, so the image's two shards (one per
        // reactor) own alternate 2 MiB ranges, and every writer's 3 MiB crosses them.
        "-o",
        "cluster_size=4096",
        "disk.qcow2",
    ]));
    let base_before = std::fs::read(&base).unwrap();

    let mut a = Appliance::start_in(
        dir,
        Setup {
            cores: "[0, 1]",
            disks: vhost_disk("vm", "disk.qcow2", "qcow2", 2, ""),
            ..Setup::default()
        },
    );
    let sock = a.path("vm.vhost");
    let opts = BootOptions { queues: 2, timeout: BOOT_TIMEOUT, ..BootOptions::default() };
    let r = guest::boot_with(&image, &sock, SCRIPT, &opts);
    r.assert_success();
    assert_eq!(r.expect_value("size"), size.to_string(), "{r}");
    assert_eq!(r.expect_value("queues"), "2", "{r}");
    assert_eq!(r.expect_value("ro"), "0", "{r}");
    assert_eq!(
        r.expect_value("md5_first_mib"),
        md5(&head, a.dir.path()),
        "the guest reads the backing data:\n{r}"
    );
    for i in 1..=4 {
        assert_eq!(r.expect_value(&format!("writer{i}")), "ok", "{r}");
    }
    assert_ne!(r.expect_value("discard_max"), "0", "{r}");
    assert!(a.stop().success(), "{}", a.logs());

    let img = a.path("disk.qcow2");
    run(Command::new("qemu-img").args(["check"]).arg(&img));
    let flat = a.path("flat.raw");
    run(Command::new("qemu-img").args(["convert", "-O", "raw"]).arg(&img).arg(&flat));
    let bytes = std::fs::read(&flat).unwrap();
    assert!(bytes[..MIB] == head[..], "backing data seen through the overlay");
    for i in 1..=4usize {
        assert!(
            bytes[i * 4 * MIB..(i * 4 + 3) * MIB] == pattern(i as u64, 3 * MIB)[..],
            "writer {i}'s data is in the image"
        );
    }
    assert!(bytes[32 * MIB..33 * MIB].iter().all(|&b| b == 0));
    assert!(bytes[33 * MIB..34 * MIB].iter().all(|&b| b == 0xcd));
    assert!(bytes[40 * MIB..40 * MIB + 512 * 1024].iter().all(|&b| b == 0));
    assert!(bytes[40 * MIB + 512 * 1024..41 * MIB].iter().all(|&b| b == 0xee));
    assert!(std::fs::read(a.path("base.raw")).unwrap() == base_before, "backing file untouched");
}

#[test]
fn read_only_disk_refuses_guest_writes() {
    for tool in ["qemu-img", "qemu-system-x86_64"] {
        require_tool(tool, "qemu-utils qemu-system-x86");
    }
    let image = guest::ensure_built();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ro.raw"), pattern(5, 8 * MIB)).unwrap();
    let mut a = Appliance::start_in(
        dir,
        Setup {
            disks: vhost_disk("ro", "ro.raw", "raw", 1, "read_only = true"),
            ..Setup::default()
        },
    );
    let script = "dev=/dev/vda\necho ro=$(cat /sys/block/vda/ro)\n\
                  if xio fill $dev 0 4k 0x11 2>/dev/null; then echo write=ok; else echo write=refused; fi\n\
                  echo done=1\n";
    let opts = BootOptions { queues: 1, timeout: BOOT_TIMEOUT, ..BootOptions::default() };
    let r = guest::boot_with(&image, &a.path("ro.vhost"), script, &opts);
    assert_eq!(r.expect_value("ro"), "1", "{r}");
    assert_eq!(r.expect_value("write"), "refused", "{r}");
    assert!(a.stop().success());
    assert!(std::fs::read(a.path("ro.raw")).unwrap() == pattern(5, 8 * MIB));
}

/// The appliance crashes (SIGKILL) while the guest writes, and is restarted under the
/// running guest: QEMU reconnects (chardev `reconnect=1`), the inflight region lets the
/// new appliance resubmit what was in flight, the guest's I/O resumes, and what the guest
/// finally reads equals the image.
#[test]
fn appliance_restart_under_a_running_guest() {
    for tool in ["qemu-img", "qemu-system-x86_64", "md5sum"] {
        require_tool(tool, "qemu-utils qemu-system-x86 coreutils");
    }
    let image = guest::ensure_built();
    let dir = tempfile::tempdir().unwrap();
    run(Command::new("qemu-img")
        .args(["create", "-f", "qcow2"])
        .arg(dir.path().join("disk.qcow2"))
        .arg("64M"));
    // Each request takes 500 ms more, so the crash surely catches some in flight.
    let mut a = Appliance::start_in(
        dir,
        Setup {
            cores: "[0, 1]",
            disks: vhost_disk("vm", "disk.qcow2", "qcow2", 2, ""),
            env: vec![
                ("APPLIANCE_DEBUG_DELAY_US", "500000".into()),
                ("APPLIANCE_LOG", "appliance=debug".into()),
            ],
            ..Setup::default()
        },
    );
    // Rounds of concurrent writers; each round rewrites 8 MiB with its own pattern.
    let script = r#"
set -e
dev=/dev/vda
for r in 1 2 3 4 5 6; do
  echo start=$r
  for w in 0 1 2 3; do
    xio prand $dev $((w * 2 + 8))M 2M $((r * 10 + w)) &
  done
  wait
  echo round=$r
done
for w in 0 1 2 3; do xio check-prand $dev $((w * 2 + 8))M 2M $((60 + w)); done
xio flush $dev
echo md5=$(dd if=$dev bs=1M skip=8 count=8 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
echo done=1
"#;
    let opts = BootOptions {
        queues: 2,
        chardev_options: "reconnect=1".into(),
        timeout: BOOT_TIMEOUT,
        ..BootOptions::default()
    };
    let mut g = guest::Guest::spawn(&image, &a.path("vm.vhost"), script, &opts);
    assert!(
        g.wait_for("start=3", Duration::from_secs(180)),
        "guest did not get going:\n{}",
        g.output()
    );
    // Round 3's requests are now being served (each takes half a second): crash.
    std::thread::sleep(Duration::from_millis(250));
    a.kill();
    std::thread::sleep(Duration::from_millis(700));
    a.restart();
    let r = g.wait();
    r.assert_success();
    assert_eq!(r.expect_value("done"), "1", "{r}");
    assert!(a.stop().success(), "{}", a.logs());
    let resubmitted: usize = a
        .logs()
        .lines()
        .filter(|l| l.contains("inflight tracking"))
        .filter_map(|l| {
            l.split("resubmitted=")
                .nth(1)?
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse::<usize>()
                .ok()
        })
        .sum();
    assert!(
        resubmitted > 0,
        "the crash caught requests in flight, and they were resubmitted:\n{}",
        a.logs()
    );
    let img = a.path("disk.qcow2");
    let check =
        Command::new("qemu-img").args(["check", "--output=json"]).arg(&img).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&check.stdout).unwrap();
    assert_eq!(
        v["corruptions"].as_u64().unwrap_or(0),
        0,
        "no corruption after the crash (leaks are allowed): {v}"
    );
    let flat = a.path("flat.raw");
    run(Command::new("qemu-img").args(["convert", "-O", "raw"]).arg(&img).arg(&flat));
    let bytes = std::fs::read(&flat).unwrap();
    assert_eq!(
        r.expect_value("md5"),
        md5(&bytes[8 * MIB..16 * MIB], a.dir.path()),
        "guest view equals the image"
    );
    for w in 0..4usize {
        let off = (w * 2 + 8) * MIB;
        assert!(
            bytes[off..off + 2 * MIB] == pattern(60 + w as u64, 2 * MIB)[..],
            "writer {w}'s last round"
        );
    }
}

/// A panic anywhere is a bug, and ends the whole process at once (never a half-dead
/// appliance whose other reactors keep serving): a debug hook panics the reactor that
/// takes a guest write; the process exits with SIGABRT and the panic message; restarted
/// (as systemd would), it takes the guest back through the inflight region: the write
/// that caused the panic is resubmitted and completes, and the guest sees no error.
#[test]
fn a_panic_ends_the_process_and_the_guest_recovers_after_a_restart() {
    use std::os::unix::process::ExitStatusExt;
    for tool in ["qemu-img", "qemu-system-x86_64", "md5sum"] {
        require_tool(tool, "qemu-utils qemu-system-x86 coreutils");
    }
    let image = guest::ensure_built();
    let dir = tempfile::tempdir().unwrap();
    run(Command::new("qemu-img")
        .args(["create", "-f", "qcow2"])
        .arg(dir.path().join("disk.qcow2"))
        .arg("64M"));
    const TRIGGER: usize = 24 * MIB;
    let mut a = Appliance::start_in(
        dir,
        Setup {
            cores: "[0, 1]",
            disks: vhost_disk("vm", "disk.qcow2", "qcow2", 2, ""),
            env: vec![("APPLIANCE_DEBUG_PANIC_OFFSET", TRIGGER.to_string())],
            ..Setup::default()
        },
    );
    let script = r#"
set -e
dev=/dev/vda
xio prand $dev 8M 4M 7
xio flush $dev
echo before=1
xio fill $dev 24M 64k 0x5e
echo after=1
xio check-prand $dev 8M 4M 7
xio check $dev 24M 64k 0x5e
xio prand $dev 12M 1M 8
xio flush $dev
echo done=1
"#;
    let opts = BootOptions {
        queues: 2,
        chardev_options: "reconnect=1".into(),
        timeout: BOOT_TIMEOUT,
        ..BootOptions::default()
    };
    let mut g = guest::Guest::spawn(&image, &a.path("vm.vhost"), script, &opts);
    assert!(g.wait_for("before=1", Duration::from_secs(180)), "guest:\n{}", g.output());
    let status = a.wait_exit(Duration::from_secs(60)).unwrap_or_else(|| {
        panic!("the panic did not end the process:\n{}", a.logs());
    });
    assert_eq!(status.signal(), Some(libc::SIGABRT), "aborted: {status:?}\n{}", a.logs());
    let logs = a.logs();
    assert!(logs.contains("panicked at"), "the panic message is printed:\n{logs}");
    assert!(logs.contains("deliberate panic on a request at byte"), "{logs}");
    assert!(!g.output().contains("after=1"), "the guest's write did not complete before the panic");
    // Restarted without the hook, the appliance takes the guest back.
    a.set_env("APPLIANCE_DEBUG_PANIC_OFFSET", None);
    a.restart();
    let r = g.wait();
    r.assert_success();
    assert_eq!(r.expect_value("after"), "1", "{r}");
    assert_eq!(r.expect_value("done"), "1", "{r}");
    assert!(a.stop().success(), "{}", a.logs());
    let img = a.path("disk.qcow2");
    run(Command::new("qemu-img").args(["check"]).arg(&img));
    let flat = a.path("flat.raw");
    run(Command::new("qemu-img").args(["convert", "-O", "raw"]).arg(&img).arg(&flat));
    let bytes = std::fs::read(&flat).unwrap();
    assert!(bytes[8 * MIB..12 * MIB] == pattern(7, 4 * MIB)[..]);
    assert!(bytes[12 * MIB..13 * MIB] == pattern(8, MIB)[..]);
    assert!(bytes[TRIGGER..TRIGGER + 65536].iter().all(|&b| b == 0x5e), "the resubmitted write");
}

/// A guest keeps writing to its vhost-user-blk disk while the disk is mirrored to a new
/// qcow2 image and switched onto it: the guest sees no error, its last writes read back
/// inside the guest, and the target image, checked clean, holds what the guest wrote.
#[test]
fn a_guest_keeps_writing_through_a_mirror_and_its_pivot() {
    for tool in ["qemu-img", "qemu-system-x86_64", "md5sum"] {
        require_tool(tool, "qemu-utils qemu-system-x86 coreutils");
    }
    let image = guest::ensure_built();
    let dir = tempfile::tempdir().unwrap();
    run(Command::new("qemu-img")
        .args(["create", "-f", "qcow2"])
        .arg(dir.path().join("disk.qcow2"))
        .arg("64M"));
    let mut a = Appliance::start_in(
        dir,
        Setup {
            cores: "[0, 1]",
            disks: vhost_disk("vm", "disk.qcow2", "qcow2", 1, ""),
            extra: appliance_tests::ops::control_extra(None),
            ..Setup::default()
        },
    );
    let script = r#"
set -e
dev=/dev/vda
r=1
while [ $r -le 40 ]; do
  for w in 0 1 2 3; do
    xio prand $dev $((w * 2 + 8))M 2M $((r * 10 + w)) &
  done
  wait
  echo round=$r
  r=$((r + 1))
done
for w in 0 1 2 3; do xio check-prand $dev $((w * 2 + 8))M 2M $((400 + w)); done
xio flush $dev
echo md5=$(dd if=$dev bs=1M skip=8 count=8 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
echo done=1
"#;
    let opts = BootOptions { queues: 1, timeout: BOOT_TIMEOUT, ..BootOptions::default() };
    let mut g = guest::Guest::spawn(&image, &a.path("vm.vhost"), script, &opts);
    assert!(g.wait_for("round=2", Duration::from_secs(180)), "guest:\n{}", g.output());
    let target = a.path("target.qcow2");
    let r = appliance_tests::ops::rpc(
        &a,
        "mirror_start",
        serde_json::json!({"disk": "vm", "target": target, "create": true}),
    );
    let job = r["result"]["job"].as_str().unwrap_or_else(|| panic!("{r}")).to_string();
    appliance_tests::jobs::wait_state(&a, &job, &["ready"], Duration::from_secs(120));
    let r = appliance_tests::ops::rpc(&a, "job_complete", serde_json::json!({"job": job}));
    assert!(r["result"].is_object(), "{r}");
    appliance_tests::jobs::wait_state(&a, &job, &["concluded"], Duration::from_secs(120));
    assert!(!g.output().contains("round=40"), "the guest was still writing after the pivot");
    let r = g.wait();
    r.assert_success();
    assert_eq!(r.expect_value("done"), "1", "{r}");
    assert!(a.stop().success(), "{}", a.logs());
    appliance_tests::jobs::qemu_img_clean(&target);
    let flat = a.path("flat.raw");
    run(Command::new("qemu-img").args(["convert", "-O", "raw"]).arg(&target).arg(&flat));
    let bytes = std::fs::read(&flat).unwrap();
    assert_eq!(
        r.expect_value("md5"),
        md5(&bytes[8 * MIB..16 * MIB], a.dir.path()),
        "guest view equals the target"
    );
    for w in 0..4usize {
        let off = (w * 2 + 8) * MIB;
        assert!(
            bytes[off..off + 2 * MIB] == pattern(400 + w as u64, 2 * MIB)[..],
            "writer {w}'s last round"
        );
    }
}

/// `disk_resize` under a running guest: the guest sees the new capacity at once (the
/// appliance sends a configuration-change message; QEMU re-reads the configuration and
/// interrupts the guest), without a reboot; its writes past the old end land and read
/// back, in the guest and in the image, and the image checks clean.
#[test]
fn a_running_guest_sees_its_disk_grow() {
    for tool in ["qemu-img", "qemu-io", "qemu-system-x86_64"] {
        require_tool(tool, "qemu-utils qemu-system-x86");
    }
    let image = guest::ensure_built();
    let dir = tempfile::tempdir().unwrap();
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(dir.path().join("disk.qcow2"))
        .arg("64M"));
    let a = Appliance::start_in(
        dir,
        Setup {
            disks: vhost_disk("vm", "disk.qcow2", "qcow2", 1, ""),
            extra: appliance_tests::ops::control_extra(None),
            ..Setup::default()
        },
    );
    let script = r#"
set -e
dev=/dev/vda
echo before=$(cat /sys/block/vda/size)
xio fill $dev 63M 1M 0x5a
echo ready=1
i=0
while [ "$(cat /sys/block/vda/size)" = 131072 ] && [ $i -lt 600 ]; do usleep 100000; i=$((i + 1)); done
echo after=$(cat /sys/block/vda/size)
echo dev_size=$(blockdev --getsize64 $dev)
xio fill $dev 200M 1M 0xa5
xio flush $dev
xio check $dev 200M 1M 0xa5
xio check $dev 63M 1M 0x5a
xio check $dev 64M 1M 0
echo done=1
"#;
    let opts = BootOptions { queues: 1, timeout: BOOT_TIMEOUT, ..BootOptions::default() };
    let mut g = guest::Guest::spawn(&image, &a.path("vm.vhost"), script, &opts);
    assert!(
        g.wait_for("ready=1", Duration::from_secs(180)),
        "guest:\n{}\nappliance:\n{}",
        g.output(),
        a.logs()
    );
    let r = appliance_tests::ops::rpc_ok(
        &a,
        "disk_resize",
        serde_json::json!({"disk": "vm", "size": "256MiB"}),
    );
    assert_eq!(r["size"].as_u64(), Some(256 << 20), "{r}");
    let r = g.wait();
    r.assert_success();
    assert_eq!(r.expect_value("before"), "131072", "{r}");
    assert_eq!(r.expect_value("after"), "524288", "the guest saw the new size: {r}");
    assert_eq!(r.expect_value("dev_size"), (256u64 << 20).to_string(), "{r}");
    assert_eq!(r.expect_value("done"), "1", "{r}");
    let mut a = a;
    assert!(a.stop().success(), "{}", a.logs());
    let img = a.path("disk.qcow2");
    let out = stdout(&run(Command::new("qemu-img").arg("check").arg(&img)));
    assert!(out.contains("No errors were found"), "{out}");
    let out = run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-r", "-c", "read -P 0xa5 200M 1M", "-c", "read -P 0x5a 63M 1M"])
        .arg(&img));
    assert!(!stdout(&out).contains("fail"), "{}", stdout(&out));
}
