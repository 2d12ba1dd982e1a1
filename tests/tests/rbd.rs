//! Ceph RBD disks (`driver = "rbd"`) against a real single-node cluster
//! (tests/ceph/cluster.sh): fio, qemu-io and nbdinfo over NBD, `rbd export` as the
//! oracle, `rbd du` for discards, qemu-img and qemu-storage-daemon (their `rbd` driver) as
//! peers, the image tools, online growth, and the faults a cluster brings: an OSD stopped
//! under load, a missing pool or image, a wrong key, a cluster that is down.

use std::process::Command;
use std::time::{Duration, Instant};

use appliance_tests::ceph::Cluster;
use appliance_tests::ops::{control_extra, rpc_ok};
use appliance_tests::qemu_nbd::Qsd;
use appliance_tests::{
    Appliance, Setup, bin, fio_verify, pattern, require_tool, run, run_unchecked, stdout,
};

const MIB: usize = 1 << 20;

/// qemu-io on `target` (an NBD URI or QEMU's rbd: name); the output must report no
/// failure and no pattern mismatch.
fn qemu_io(target: &str, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let text = stdout(&run(c.arg(target)));
    assert!(!text.contains("failed") && !text.contains("Pattern verification"), "{text}");
    text
}

fn require_peers() {
    for (t, p) in [("fio", "fio"), ("qemu-io", "qemu-utils"), ("nbdinfo", "libnbd-bin")] {
        require_tool(t, p);
    }
}

#[test]
fn fio_and_qemu_io_over_nbd_match_rbd_export_and_discards_free_space() {
    require_peers();
    let cluster = Cluster::start();
    // The image tools make and describe the image.
    let spec = format!("rbd:rbd/vm7:conf={}", cluster.conf().display());
    run(Command::new(bin()).args(["create", "-f", "raw", &spec, "256M"]));
    let info = stdout(&run(Command::new(bin()).args(["info", &spec])));
    assert!(info.contains(&format!("virtual size: {} bytes", 256 * MIB)), "{info}");
    assert!(info.contains("fast-diff"), "{info}");

    let mut a = Appliance::start(
        Setup {
            cores: "[0, 1]",
            disks: cluster.disk_toml("vm7", "vm7", 30, ""),
            ..Setup::default()
        },
        |_| {},
    );
    let uri = a.uri("vm7");
    fio_verify(&uri, "64M", "4k-64k", 16);
    // A known pattern at 64..96 MiB, and 128..192 MiB filled, then discarded.
    let data = pattern(7, 32 * MIB);
    let src = a.path("pattern.bin");
    std::fs::write(&src, &data).unwrap();
    qemu_io(
        &uri,
        &[&format!("write -s {} 64M 32M", src.display()), "write -P 0xee 128M 64M", "flush"],
    );
    let used_full = cluster.used("vm7");
    qemu_io(&uri, &["discard 128M 64M", "write -z 100M 1M", "flush"]);
    let used_after = cluster.used("vm7");
    assert!(
        used_after + 60 * MIB as u64 <= used_full,
        "discarding 64 MiB of whole objects frees them: {used_full} -> {used_after} bytes"
    );
    // Block status (fast-diff) shows the discarded objects as holes.
    let map = stdout(&run(Command::new("nbdinfo").args(["--map", &uri])));
    assert!(
        map.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() >= 4
                && f[0].parse::<u64>().is_ok_and(|o| o <= 128 * MIB as u64)
                && f[0].parse::<u64>().unwrap() + f[1].parse::<u64>().unwrap() >= 192 * MIB as u64
                && l.contains("hole")
        }),
        "128..192 MiB is a hole after the discard:\n{map}"
    );
    assert!(a.stop().success(), "{}", a.logs());

    let bytes = cluster.export("vm7", &a.path("export.raw"));
    assert_eq!(bytes.len(), 256 * MIB);
    assert!(bytes[64 * MIB..96 * MIB] == data[..], "rbd export holds what was written");
    assert!(bytes[100 * MIB..101 * MIB].iter().all(|&b| b == 0), "write-zeroes reads zeros");
}

#[test]
fn qemu_img_and_qemu_storage_daemon_read_what_the_appliance_wrote_and_back() {
    require_peers();
    require_tool("qemu-storage-daemon", "qemu-system-x86 qemu-block-extra");
    let cluster = Cluster::start();
    cluster.rbd(&["create", "--size", "64M", "rbd/shared"]);
    let qname = cluster.qemu_name("shared");
    // QEMU writes first, through librbd itself.
    qemu_io(&qname, &["write -P 0x5a 0 4M", "write -P 0x6b 10M 1M"]);

    let mut a = Appliance::start(
        Setup { disks: cluster.disk_toml("d", "shared", 30, ""), ..Setup::default() },
        |_| {},
    );
    let uri = a.uri("d");
    qemu_io(&uri, &["read -P 0x5a 0 4M", "read -P 0x6b 10M 1M", "write -P 0x7c 20M 2M", "flush"]);
    assert!(a.stop().success(), "{}", a.logs());

    qemu_io(&qname, &["read -P 0x7c 20M 2M", "read -P 0x5a 0 4M"]);
    // qemu-storage-daemon serves the same image over NBD: it reads the appliance's data.
    let blockdev =
        format!("driver=rbd,node-name=r,pool=rbd,image=shared,conf={}", cluster.conf().display());
    let qsd = Qsd::start_nbd(a.dir.path(), &blockdev);
    qemu_io(&qsd.uri(), &["read -P 0x7c 20M 2M", "read -P 0x6b 10M 1M", "write -P 0x8d 30M 1M"]);
    drop(qsd);
    qemu_io(&qname, &["read -P 0x8d 30M 1M"]);

    // qcow2 on RBD: qemu-img makes it, the appliance writes through it (the image grows
    // as clusters are appended), qemu-img checks it and reads the data.
    let q2 = cluster.qemu_name("q2");
    run(Command::new("qemu-img").args(["create", "-f", "qcow2", &q2, "1G"]));
    let mut a = Appliance::start(
        Setup { disks: cluster.disk_toml("q", "q2", 30, "format = \"qcow2\""), ..Setup::default() },
        |_| {},
    );
    let uri = a.uri("q");
    qemu_io(&uri, &["write -P 0x33 0 8M", "write -P 0x44 700M 3M", "flush"]);
    assert!(a.stop().success(), "{}", a.logs());
    run(Command::new("qemu-img").args(["check", "-f", "qcow2", &q2]));
    let mut c = Command::new("qemu-io");
    c.args(["-f", "qcow2", "-c", "read -P 0x33 0 8M", "-c", "read -P 0x44 700M 3M", &q2]);
    let text = stdout(&run(&mut c));
    assert!(!text.contains("Pattern verification"), "{text}");
}

#[test]
fn an_osd_stopped_under_load_delays_then_fails_requests_and_nothing_flushed_is_lost() {
    require_peers();
    let cluster = Cluster::start();
    cluster.rbd(&["create", "--size", "64M", "rbd/f"]);
    let disks = format!(
        "{}\n[[disk]]\nname = \"ram\"\ndriver = \"mem\"\nsize = \"16MiB\"\n",
        cluster.disk_toml("f", "f", 5, "")
    );
    let metrics = appliance_tests::free_port();
    let extra = control_extra(Some(metrics));
    let mut a = Appliance::start(Setup { disks, extra, ..Setup::default() }, |_| {});
    let uri = a.uri("f");
    qemu_io(&uri, &["write -P 0x11 0 8M", "flush"]);

    // 1. The OSD comes back within the timeout: the waiting write completes.
    let u = uri.clone();
    let writer = std::thread::spawn(move || {
        let t = Instant::now();
        let out = run_unchecked(
            Command::new("qemu-io").args([
                "-f",
                "raw",
                "-c",
                "sleep 1500",
                "-c",
                "write -P 0x22 8M 1M",
                "-c",
                "flush",
                &u,
            ]),
            Duration::from_secs(120),
        );
        (stdout(&out), t.elapsed())
    });
    cluster.osd_stop();
    // Meanwhile the same reactor serves the other disk at once.
    let t = Instant::now();
    qemu_io(&a.uri("ram"), &["write -P 0x99 0 1M", "read -P 0x99 0 1M"]);
    assert!(t.elapsed() < Duration::from_secs(3), "the memory disk was held up: {:?}", t.elapsed());
    std::thread::sleep(Duration::from_secs(2));
    cluster.osd_start();
    let (text, took) = writer.join().unwrap();
    assert!(!text.contains("failed"), "the write waited for the OSD and completed:\n{text}");
    assert!(took >= Duration::from_secs(2), "the write waited: {took:?}");

    // 2. The OSD stays down past the timeout: requests fail with EIO, in bounded time.
    cluster.osd_stop();
    let t = Instant::now();
    let out = run_unchecked(
        Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x33 16M 1M", &uri]),
        Duration::from_secs(60),
    );
    let took = t.elapsed();
    let text = stdout(&out);
    assert!(
        text.contains("Input/output error"),
        "a write past the timeout fails with EIO:\n{text}"
    );
    assert!(
        took >= Duration::from_secs(4) && took < Duration::from_secs(30),
        "bounded by the 5 s timeout: {took:?}"
    );
    assert!(a.logs().contains("timed out"), "{}", a.logs());
    // The metrics count it (refreshed every second).
    appliance_tests::ops::scrape_until(metrics, "the timeout counted", |text| {
        let name = "appliance_rbd_requests_timed_out_total";
        appliance_tests::ops::sample(text, name, &[("disk", "f")]) >= 1.0
    });
    cluster.osd_start();

    // 3. Back: I/O resumes, and everything acknowledged as flushed is there.
    qemu_io(
        &uri,
        &[
            "write -P 0x44 24M 1M",
            "flush",
            "read -P 0x11 0 8M",
            "read -P 0x22 8M 1M",
            "read -P 0x44 24M 1M",
        ],
    );
    assert!(a.stop().success(), "{}", a.logs());
    let bytes = cluster.export("f", &a.path("export.raw"));
    assert!(bytes[..8 * MIB].iter().all(|&b| b == 0x11));
    assert!(bytes[8 * MIB..9 * MIB].iter().all(|&b| b == 0x22));
    assert!(bytes[24 * MIB..25 * MIB].iter().all(|&b| b == 0x44));
}

#[test]
fn a_missing_pool_or_image_a_wrong_key_and_a_down_cluster_fail_only_their_disk() {
    require_peers();
    let cluster = Cluster::start();
    cluster.rbd(&["create", "--size", "16M", "rbd/ok"]);
    let dir = tempfile::tempdir().unwrap();
    let bad_keyring = dir.path().join("bad.keyring");
    // A well-formed key that is not client.appliance's.
    std::fs::write(
        &bad_keyring,
        "[client.appliance]\n\tkey = AQBcQhRr6gOhDBAAf5uuAgGNVLa1YvpOj1orqQ==\n",
    )
    .unwrap();
    // A configuration whose monitor address nobody listens on.
    let down_conf = dir.path().join("down.conf");
    let port = appliance_tests::free_port();
    std::fs::write(&down_conf, format!("[global]\nmon_host = 127.0.0.1:{port}\n")).unwrap();
    let conf = cluster.conf().display().to_string();
    let keyring = cluster.keyring().display().to_string();
    let rbd = |name: &str, path: &str, conf: &str, keyring: &str| {
        format!(
            "[[disk]]\nname = \"{name}\"\ndriver = \"rbd\"\npath = \"{path}\"\n[disk.rbd]\n\
             conf = \"{conf}\"\nid = \"appliance\"\nkeyring = \"{keyring}\"\ntimeout = 3\n"
        )
    };
    let disks = [
        rbd("nopool", "rbd:nosuchpool/ok", &conf, &keyring),
        rbd("noimage", "rbd:rbd/nosuch", &conf, &keyring),
        rbd("badkey", "rbd:rbd/ok", &conf, &bad_keyring.display().to_string()),
        rbd("down", "rbd:rbd/ok", &down_conf.display().to_string(), &keyring),
        // A second disk of the cluster that is down fails at once, without waiting the
        // timeout again.
        rbd("down2", "rbd:rbd/other", &down_conf.display().to_string(), &keyring),
        rbd("good", "rbd:rbd/ok", &conf, &keyring),
    ]
    .join("\n");
    let mut a = Appliance::start(Setup { disks, ..Setup::default() }, |_| {});
    let logs = a.logs();
    for (disk, why) in [
        ("nopool", "pool `nosuchpool` does not exist"),
        ("noimage", "image `nosuch` does not exist in pool `rbd`"),
        ("badkey", "Permission denied"),
        ("down", "is the cluster up?"),
        ("down2", "not retried within the timeout"),
    ] {
        assert!(
            logs.lines().any(|l| l.contains(&format!("disk `{disk}`")) && l.contains(why)),
            "disk {disk}: expected an error saying {why:?}:\n{logs}"
        );
    }
    let list = stdout(&run(Command::new("nbdinfo").args(["--list", &a.uri("")])));
    assert!(list.contains("export=\"good\""), "{list}");
    assert!(!list.contains("export=\"badkey\""), "{list}");
    qemu_io(&a.uri("good"), &["write -P 0x1 0 1M", "read -P 0x1 0 1M"]);
    assert!(a.stop().success(), "{}", a.logs());
}

#[test]
fn an_rbd_disk_grows_online_and_with_the_resize_tool() {
    require_peers();
    let cluster = Cluster::start();
    cluster.rbd(&["create", "--size", "32M", "rbd/g"]);
    let mut a = Appliance::start(
        Setup {
            disks: cluster.disk_toml("g", "g", 30, ""),
            extra: control_extra(None),
            ..Setup::default()
        },
        |_| {},
    );
    qemu_io(&a.uri("g"), &["write -P 0x5 0 1M", "flush"]);
    rpc_ok(&a, "disk_resize", serde_json::json!({"disk": "g", "size": 96 * MIB}));
    let size = stdout(&run(Command::new("nbdinfo").args(["--size", &a.uri("g")])));
    assert_eq!(size.trim(), (96 * MIB).to_string());
    qemu_io(&a.uri("g"), &["write -P 0x6 90M 1M", "read -P 0x5 0 1M", "flush"]);
    // Killed without a chance to flush librbd's cache: what was flushed is in the
    // cluster.
    a.kill();
    let info = cluster.rbd(&["info", "--format", "json", "rbd/g"]);
    assert!(info.contains(&format!("\"size\":{}", 96 * MIB)), "{info}");
    let spec = format!("rbd:rbd/g:conf={}", cluster.conf().display());
    run(Command::new(bin()).args(["resize", &spec, "+32M"]));
    let info = stdout(&run(Command::new(bin()).args(["info", &spec])));
    assert!(info.contains(&format!("virtual size: {} bytes", 128 * MIB)), "{info}");
    let bytes = cluster.export("g", &a.path("export.raw"));
    assert!(bytes[90 * MIB..91 * MIB].iter().all(|&b| b == 0x6));
}

/// What the guest does on its RBD disk: concurrent O_DIRECT writers that check what they
/// wrote, discard and write-zeroes, a flush.
const GUEST_SCRIPT: &str = r#"
set -e
dev=/dev/vda
echo size=$(blockdev --getsize64 $dev)
for i in 1 2 3 4; do
  ( xio prand $dev $((i * 4))M 3M $i && xio check-prand $dev $((i * 4))M 3M $i && echo writer$i=ok ) &
done
wait
xio fill $dev 32M 8M 0xcd
xio discard $dev 32M 4M
xio fill $dev 40M 1M 0xee
xio zeroout $dev 40M 512k
xio check $dev 40M 512k 0
xio flush $dev
echo done=1
"#;

#[test]
fn a_guest_over_vhost_user_blk_on_an_rbd_disk() {
    require_tool("qemu-system-x86_64", "qemu-system-x86");
    let image = appliance_tests::guest::ensure_built();
    let cluster = Cluster::start();
    cluster.rbd(&["create", "--size", "64M", "rbd/guest"]);
    let vhost = "[disk.vhost_user_blk]\nsocket = \"{dir}/vm.vhost\"\nqueues = 2\n";
    let disks = format!("{}{vhost}", cluster.disk_toml("vm", "guest", 30, ""));
    let mut a = Appliance::start(Setup { cores: "[0, 1]", disks, ..Setup::default() }, |_| {});
    let opts = appliance_tests::guest::BootOptions {
        queues: 2,
        timeout: Duration::from_secs(240),
        ..Default::default()
    };
    let r = appliance_tests::guest::boot_with(&image, &a.path("vm.vhost"), GUEST_SCRIPT, &opts);
    r.assert_success();
    assert_eq!(r.expect_value("size"), (64 * MIB).to_string(), "{r}");
    for i in 1..=4 {
        assert_eq!(r.expect_value(&format!("writer{i}")), "ok", "{r}");
    }
    assert!(a.stop().success(), "{}", a.logs());
    let bytes = cluster.export("guest", &a.path("export.raw"));
    for i in 1..=4usize {
        assert!(
            bytes[i * 4 * MIB..(i * 4 + 3) * MIB] == pattern(i as u64, 3 * MIB)[..],
            "writer {i}'s data is in the RBD image"
        );
    }
    assert!(bytes[36 * MIB..40 * MIB].iter().all(|&b| b == 0xcd), "the fill outside the discard");
    assert!(bytes[40 * MIB..40 * MIB + 512 * 1024].iter().all(|&b| b == 0), "zeroed");
    assert!(bytes[40 * MIB + 512 * 1024..41 * MIB].iter().all(|&b| b == 0xee));
}

#[test]
fn a_live_disk_mirrors_into_the_cluster_and_back_out() {
    use appliance_tests::jobs::*;
    use appliance_tests::ops::rpc;
    require_peers();
    let cluster = Cluster::start();
    // Once on RBD the disk has no directory of its own: its file targets must be allowed.
    let mut a = start_vm_with("allowed_target_dirs = [\"{dir}\"]");
    // Evacuate the local qcow2 disk into a new RBD image while it is written.
    let writer = Writer::start(&a.sock);
    let fio = fio_background(&a.uri("vm"), 8);
    std::thread::sleep(Duration::from_millis(300));
    let target = cluster.qemu_name("evac");
    let job = start_mirror(&a, serde_json::json!({"disk": "vm", "target": target, "create": true}));
    wait_state(&a, &job, &["ready"], Duration::from_secs(120));
    assert!(rpc(&a, "job_complete", serde_json::json!({"job": job}))["result"].is_object());
    wait_state(&a, &job, &["concluded"], Duration::from_secs(60));
    let list = rpc(&a, "disk_list", serde_json::json!({}));
    assert_eq!(list["result"][0]["path"], "rbd:rbd/evac", "{list}");
    // Bad RBD targets are refused, naming the field.
    for (target, why) in [
        ("rbd:rbd", "is not rbd:POOL/IMAGE"),
        ("rbd:rbd/evac", "is this disk's own RBD image"),
        ("rbd:rbd/x:bogus=1", "RBD options are conf="),
    ] {
        let (code, msg) = appliance_tests::ops::rpc_error(
            &a,
            "mirror_start",
            serde_json::json!({"disk": "vm", "target": target, "create": true}),
        );
        assert!(code < 0 && msg.contains("`target`") && msg.contains(why), "{target}: {msg}");
    }
    // The same image named with its cluster options is the disk's own too.
    let (_, msg) = appliance_tests::ops::rpc_error(
        &a,
        "mirror_start",
        serde_json::json!({"disk": "vm", "target": cluster.qemu_name("evac"), "create": true}),
    );
    assert!(msg.contains("is this disk's own RBD image"), "{msg}");
    std::thread::sleep(Duration::from_millis(500));
    let last = writer.finish();
    fio_ok(fio);
    check_writer(&a.sock, &last);
    vm_contents_ok(&a);
    // Zero and unwritten ranges were not copied: the image stays thin.
    let used = cluster.used("evac");
    assert!(used < 100 * MIB, "the RBD image holds only data: {used} bytes used");

    // A full backup of the RBD disk into another RBD image.
    let r = rpc(
        &a,
        "backup_start",
        serde_json::json!({"disk": "vm", "target": "rbd:rbd/bk", "create": true, "sync": "full"}),
    );
    let bjob =
        r["result"]["job"].as_str().unwrap_or_else(|| panic!("backup_start: {r}")).to_string();
    let j = wait_state(&a, &bjob, &["concluded"], Duration::from_secs(120));
    assert!(j["error"].is_null(), "{j}");

    // And out again: a point-in-time copy of the RBD disk into a local raw file.
    let back = a.path("back.raw");
    let (code, msg) = appliance_tests::ops::rpc_error(
        &a,
        "mirror_start",
        serde_json::json!({"disk": "vm", "target": "/etc/back.raw", "create": true}),
    );
    assert!(code < 0 && msg.contains("outside the allowed target directories"), "{msg}");
    let job = start_mirror(
        &a,
        serde_json::json!({"disk": "vm", "target": back, "create": true, "format": "raw"}),
    );
    wait_state(&a, &job, &["ready"], Duration::from_secs(120));
    assert!(rpc(&a, "job_cancel", serde_json::json!({"job": job}))["result"].is_object());
    wait_state(&a, &job, &["concluded"], Duration::from_secs(60));
    assert!(a.stop().success(), "{}", a.logs());
    let exported = cluster.export("evac", &a.path("evac.raw"));
    assert!(std::fs::read(&back).unwrap() == exported, "the copy out equals the RBD image");
    // Block status from the object map: objects never written are not copied.
    assert!(sparse(&back, "raw", 40 * MIB, 24 * MIB), "the copy out stays sparse");
    assert!(exported[..8 * MIB as usize].iter().all(|&b| b == 0x11));
    assert!(cluster.export("bk", &a.path("bk.raw")) == exported, "the RBD backup equals the disk");
}
