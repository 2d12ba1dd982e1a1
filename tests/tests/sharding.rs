//! One qcow2 image split over two shards (two reactors), through real clients.
//!
//! Images have 4 KiB clusters: an L2 table then maps 2 MiB of guest space, so the two
//! shards own alternate 2 MiB ranges and refcount blocks cover 64 MiB of host space
//! each (alternate allocation groups). Requests are placed to cross those boundaries.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use appliance_tests::nbd_client::Client;
use appliance_tests::{Appliance, Setup, pattern, require_tool, run, stdout};

const MIB: u64 = 1 << 20;
/// Guest bytes one L2 table maps with 4 KiB clusters: the unit of shard ownership.
const TABLE: u64 = 2 * MIB;

fn disk_toml() -> String {
    "[[disk]]\nname = \"q\"\npath = \"{dir}/img.qcow2\"\nformat = \"qcow2\"\n".to_string()
}

fn create(path: &Path, size: &str) {
    run(Command::new("qemu-img")
        .args(["create", "-f", "qcow2", "-o", "cluster_size=4096"])
        .arg(path)
        .arg(size));
}

/// `qemu-img check --output=json`: (corruptions, leaks). After a SIGKILL the kernel
/// closes the image (and drops its lock) only once the dead process's io_uring is torn
/// down, which runs asynchronously: a lock conflict is retried for a few seconds.
fn check(path: &Path) -> (u64, u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let out = loop {
        let out =
            Command::new("qemu-img").args(["check", "--output=json"]).arg(path).output().unwrap();
        let locked = String::from_utf8_lossy(&out.stderr).contains("Failed to get shared");
        if !locked || Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "qemu-img check of {}: {}{}",
            path.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (v["corruptions"].as_u64().unwrap_or(0), v["leaks"].as_u64().unwrap_or(0))
}

fn to_raw(img: &Path, fmt: &str, out: &Path) -> Vec<u8> {
    // `-U`: no lock wanted (the image is not served meanwhile; see `check`).
    run(Command::new("qemu-img").args(["convert", "-U", "-f", fmt, "-O", "raw"]).arg(img).arg(out));
    std::fs::read(out).unwrap()
}

/// qemu-io commands for writer `w` in its region: unaligned writes straddling every
/// shard boundary of the region (and some inside one shard), write-zeroes and
/// discards across boundaries, and rewrites of what was written.
fn script(w: u64, region: u64, len: u64) -> Vec<String> {
    let base = w * region;
    let mut cmds = Vec::new();
    let mut x = w * 7919 + 13;
    let mut next = |m: u64| {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (x >> 33) % m
    };
    for b in (base + TABLE..base + len).step_by(TABLE as usize) {
        let before = 1 + next(70_000);
        let n = before + 1 + next(70_000);
        cmds.push(format!("write -P {} {} {n}", 1 + next(250), b - before));
    }
    for _ in 0..40 {
        let off = base + next(len - 200_000);
        let n = 1 + next(150_000);
        cmds.push(match next(10) {
            0 => format!("write -z {off} {n}"),
            1 => format!("discard {} {}", off / 4096 * 4096, (n / 4096 + 1) * 4096),
            _ => format!("write -P {} {off} {n}", 1 + next(250)),
        });
    }
    cmds
}

fn qemu_io(fmt: &str, target: &str, cmds: &[String]) -> std::process::Child {
    let mut c = Command::new("qemu-io");
    c.args(["-f", fmt]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.arg(target).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    c.spawn().expect("qemu-io")
}

fn wait_ok(c: std::process::Child, what: &str) {
    let out = c.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !text.contains("failed"), "{what}: {text}");
}

#[test]
fn many_connections_write_one_image_across_shards() {
    require_tool("fio", "fio");
    require_tool("qemu-io", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img.qcow2");
    create(&img, "128M");
    let copy = dir.path().join("copy.qcow2");
    run(Command::new("cp").arg(&img).arg(&copy));
    let mut a =
        Appliance::start_in(dir, Setup { cores: "[0, 1]", disks: disk_toml(), ..Setup::default() });
    let uri = a.uri("q");
    // Six qemu-io writers in 16 MiB regions and two fio verifiers in the last 32 MiB,
    // all at once.
    let (writers, region) = (6u64, 16 * MIB);
    let scripts: Vec<Vec<String>> = (0..writers).map(|w| script(w, region, region)).collect();
    let ios: Vec<_> = scripts.iter().map(|s| qemu_io("raw", &uri, s)).collect();
    let fio = Command::new("fio")
        .args([
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bsrange=512-64k",
            "--iodepth=32",
            "--numjobs=2",
            "--offset=96M",
            "--size=16M",
            "--offset_increment=16M",
            "--verify=crc32c",
            "--verify_state_save=0",
            "--do_verify=1",
            "--verify_fatal=1",
            "--group_reporting",
            "--output-format=json",
        ])
        .output()
        .unwrap();
    for (w, c) in ios.into_iter().enumerate() {
        wait_ok(c, &format!("qemu-io writer {w}"));
    }
    let text = stdout(&fio);
    assert!(fio.status.success(), "fio: {text}");
    let json: serde_json::Value = serde_json::from_str(&text[text.find('{').unwrap()..]).unwrap();
    assert_eq!(json["jobs"][0]["error"], 0, "fio verify");
    let served = to_raw(Path::new(&uri), "raw", &a.path("served.raw"));
    assert!(a.stop().success(), "{}", a.logs());

    assert_eq!(check(&a.path("img.qcow2")), (0, 0), "qemu-img check:\n{}", a.logs());
    // The same writes by qemu-io on the copy (each region's own order is the same).
    for (w, s) in scripts.iter().enumerate() {
        wait_ok(qemu_io("qcow2", copy.to_str().unwrap(), s), &format!("oracle writer {w}"));
    }
    let ours = to_raw(&a.path("img.qcow2"), "qcow2", &a.path("ours.raw"));
    let theirs = to_raw(&copy, "qcow2", &a.path("theirs.raw"));
    let end = (writers * region) as usize;
    for w in 0..writers as usize {
        let r = w * region as usize..(w + 1) * region as usize;
        assert!(ours[r.clone()] == theirs[r.clone()], "region {w} differs from qemu-io's");
        assert!(served[r.clone()] == ours[r], "region {w}: the NBD view differs from the file");
    }
    assert!(served[end..] == ours[end..], "fio's area: the NBD view differs from the file");
}

/// Writer `w`'s extents: its region cut into pieces of 1 byte to 96 KiB at odd
/// offsets, shuffled, so writes allocate clusters, L2 tables and refcount blocks in
/// both shards and many straddle a shard boundary.
fn extents(w: u64, region: u64) -> Vec<(u64, usize)> {
    let mut x = w + 99;
    let mut next = |m: u64| {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (x >> 33) % m
    };
    let mut v = Vec::new();
    let mut off = w * region + next(4096);
    while off < (w + 1) * region - 100_000 {
        let n = 1 + next(96 * 1024);
        v.push((off, n as usize));
        off += n + next(8192);
    }
    for i in (1..v.len()).rev() {
        v.swap(i, next(i as u64 + 1) as usize);
    }
    v
}

/// One connection's run until the appliance dies: writes (some FUA), a flush every
/// few; returns the extents known durable (flushed, or written with FUA).
fn crash_writer(sock: &Path, w: u64, region: u64) -> Vec<(u64, usize)> {
    let mut c = Client::connect(sock, "q", false, false).expect("connect");
    let mut durable = Vec::new();
    let mut since_flush = Vec::new();
    for (i, (off, n)) in extents(w, region).into_iter().enumerate() {
        let fua = i % 7 == 3;
        let data = pattern(off, n);
        if c.request(1, u16::from(fua), i as u64, off, n as u64, &data).is_err() {
            return durable;
        }
        match c.reply(0) {
            Ok(r) if r.error == 0 => {}
            _ => return durable,
        }
        if fua {
            durable.push((off, n));
        } else {
            since_flush.push((off, n));
        }
        if i % 5 == 4 {
            if c.request(3, 0, 1 << 40, 0, 0, &[]).is_err() {
                return durable;
            }
            match c.reply(0) {
                Ok(r) if r.error == 0 => durable.append(&mut since_flush),
                _ => return durable,
            }
        }
    }
    durable
}

#[test]
fn sigkill_under_allocating_writes_on_two_shards_keeps_flushed_writes() {
    require_tool("qemu-img", "qemu-utils");
    for round in 0..3u64 {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("img.qcow2");
        create(&img, "96M");
        let mut a = Appliance::start_in(
            dir,
            Setup { cores: "[0, 1]", disks: disk_toml(), ..Setup::default() },
        );
        let sock = a.sock.clone();
        let (writers, region) = (4u64, 24 * MIB);
        let threads: Vec<_> = (0..writers)
            .map(|w| {
                let sock = sock.clone();
                std::thread::spawn(move || crash_writer(&sock, w, region))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(400 + round * 300));
        let killed_at = Instant::now();
        a.kill();
        let durable: Vec<Vec<(u64, usize)>> =
            threads.into_iter().map(|t| t.join().unwrap()).collect();
        let img = a.path("img.qcow2");
        let (corrupt, _leaks) = check(&img);
        assert_eq!(corrupt, 0, "round {round}: corruption after SIGKILL:\n{}", a.logs());
        let bytes = to_raw(&img, "qcow2", &a.path("after.raw"));
        let mut n = 0;
        for (w, list) in durable.iter().enumerate() {
            for &(off, len) in list {
                let got = &bytes[off as usize..off as usize + len];
                assert!(
                    got == &pattern(off, len)[..],
                    "round {round}: writer {w}'s flushed write at {off} (+{len}) is lost"
                );
                n += 1;
            }
        }
        assert!(n > 20, "round {round}: only {n} flushed writes before the kill");
        // The appliance serves the image again, and it checks clean after a clean stop.
        a.restart();
        assert!(a.stop().success(), "round {round}: restart:\n{}", a.logs());
        assert_eq!(check(&img).0, 0, "round {round}: after the restart");
        eprintln!(
            "round {round}: {n} flushed writes intact ({:?} after the kill)",
            killed_at.elapsed()
        );
    }
}
