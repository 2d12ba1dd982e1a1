//! Failure isolation: one disk's trouble never touches another disk. A disk that cannot
//! be opened at start-up (missing, marked corrupt, locked by another process) is
//! reported, listed as `failed` with its error and counted in the metrics while every
//! other disk is served; `disk_add` and reloads retry it. At runtime, a disk whose file
//! system is full fails its own requests only.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use appliance_tests::ops::{control_extra, rpc, sample, scrape_until};
use appliance_tests::{Appliance, Setup, free_port, require_tool, run, run_unchecked, stdout};
use serde_json::{Value, json};

const MIB: u64 = 1 << 20;

fn disk(name: &str, file: &str, format: &str) -> String {
    format!("[[disk]]\nname = \"{name}\"\npath = \"{{dir}}/{file}\"\nformat = \"{format}\"\n")
}

fn qcow2(path: &Path, size: &str) {
    run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(path).arg(size));
}

/// The state and error of every disk, by name.
fn states(a: &Appliance) -> Vec<(String, String, String)> {
    let r = rpc(a, "disk_list", json!({}));
    let list = r["result"].as_array().unwrap_or_else(|| panic!("disk_list: {r}"));
    list.iter()
        .map(|d| {
            let s = |k: &str| d[k].as_str().unwrap_or_default().to_string();
            (s("name"), s("state"), s("error"))
        })
        .collect()
}

fn state_of(a: &Appliance, name: &str) -> (String, String) {
    let (_, st, err) = states(a).into_iter().find(|(n, _, _)| n == name).expect("listed");
    (st, err)
}

fn nbd_write_read(a: &Appliance, export: &str, byte: u8) {
    let out = run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        &format!("write -P {byte} 0 64k"),
        "-c",
        &format!("read -P {byte} 0 64k"),
        &a.uri(export),
    ]));
    assert!(!stdout(&out).contains("fail"), "{export}: {}", stdout(&out));
}

/// Holds an image's QEMU write lock for a minute (qemu-io sleeping with it open). The
/// caller kills and waits for the returned child.
///
/// The probe (`qemu-img info`) takes a shared lock for a moment, so a qemu-io starting
/// at that moment fails to get its write lock and exits: it is then started again.
#[allow(clippy::zombie_processes)]
fn hold_lock(path: &Path) -> Child {
    let spawn = || {
        Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "sleep 60000"])
            .arg(path)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut child = spawn();
    // Generous: on a loaded CI machine qemu-io can take seconds to start.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            let mut err = String::new();
            let _ = std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err);
            assert!(err.contains("lock"), "qemu-io exited ({st}) before taking the lock: {err}");
            child = spawn();
        } else {
            let probe = Command::new("qemu-img").arg("info").arg(path).output().unwrap();
            if !probe.status.success() && child.try_wait().unwrap().is_none() {
                return child;
            }
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("qemu-io never took the lock");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn disks_that_fail_to_open_are_reported_and_the_others_served() {
    require_tool("qemu-io", "qemu-utils");
    let port = free_port();
    let mut locker = None;
    let disks = disk("good", "good.img", "raw")
        + &disk("missing", "missing.img", "raw")
        + &disk("marked", "marked.qcow2", "qcow2")
        + &disk("locked", "locked.qcow2", "qcow2");
    let mut a = Appliance::start(
        Setup { extra: control_extra(Some(port)), disks, ..Setup::default() },
        |dir| {
            appliance_tests::sparse_file(&dir.join("good.img"), 16 * MIB);
            let marked = dir.join("marked.qcow2");
            qcow2(&marked, "16M");
            let f = std::fs::OpenOptions::new().read(true).write(true).open(&marked).unwrap();
            let mut v = [0u8; 8];
            f.read_exact_at(&mut v, 72).unwrap();
            f.write_all_at(&(u64::from_be_bytes(v) | 2).to_be_bytes(), 72).unwrap();
            qcow2(&dir.join("locked.qcow2"), "16M");
            locker = Some(hold_lock(&dir.join("locked.qcow2")));
        },
    );
    let mut locker = locker.unwrap();
    // The healthy disk is served.
    nbd_write_read(&a, "good", 0x11);
    // The others are listed as failed, each with an error naming its file and reason.
    assert_eq!(state_of(&a, "good").0, "serving");
    for (name, file, reason) in [
        ("missing", "missing.img", "No such file"),
        ("marked", "marked.qcow2", "marked corrupt"),
        ("locked", "locked.qcow2", "in use"),
    ] {
        let (st, err) = state_of(&a, name);
        assert_eq!(st, "failed", "{name}: {err}");
        assert!(err.contains(file) && err.contains(reason), "{name}: {err}");
        assert!(a.logs().contains(&format!("disk `{name}`")), "{name} is logged:\n{}", a.logs());
    }
    let text = scrape_until(port, "the failed disks", |t| {
        sample(t, "appliance_disks", &[("state", "failed")]) == 3.0
    });
    assert_eq!(sample(&text, "appliance_disks", &[("state", "serving")]), 1.0);
    assert_eq!(sample(&text, "appliance_disk_up", &[("disk", "missing")]), 0.0);
    assert_eq!(sample(&text, "appliance_disk_up", &[("disk", "good")]), 1.0);
    // A failed disk cannot be flushed, and says why.
    let r = rpc(&a, "disk_flush", json!({"name": "missing"}));
    assert!(r["error"]["message"].as_str().unwrap_or_default().contains("failed"), "{r}");

    // disk_add retries a failed disk: still missing, it stays failed with the error.
    let missing = json!({"name": "missing", "path": a.path("missing.img")});
    let r = rpc(&a, "disk_add", missing.clone());
    assert!(r["error"].is_object(), "{r}");
    assert_eq!(state_of(&a, "missing").0, "failed");
    appliance_tests::sparse_file(&a.path("missing.img"), 8 * MIB);
    let r = rpc(&a, "disk_add", missing);
    assert!(r["error"].is_null(), "{r}");
    assert_eq!(state_of(&a, "missing").0, "serving");
    nbd_write_read(&a, "missing", 0x22);

    // A reload retries failed disks whose configuration did not change.
    let _ = locker.kill();
    let _ = locker.wait();
    let r = rpc(&a, "reload", json!({}));
    let report = r["result"].to_string();
    assert!(report.contains("locked opened on retry"), "{r}");
    assert!(report.contains("marked still failed"), "{r}");
    assert_eq!(state_of(&a, "locked").0, "serving");
    nbd_write_read(&a, "locked", 0x33);
    // Repaired, the marked image is served too.
    let out = run_unchecked(
        Command::new(appliance_tests::bin())
            .args(["check", "-r", "all"])
            .arg(a.path("marked.qcow2")),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "{out:?}");
    let r = rpc(
        &a,
        "disk_add",
        json!({"name": "marked", "path": a.path("marked.qcow2"), "format": "qcow2"}),
    );
    assert!(r["error"].is_null(), "{r}");
    nbd_write_read(&a, "marked", 0x44);
    // The disk served from the start never noticed.
    nbd_write_read(&a, "good", 0x55);
    assert!(a.stop().success(), "{}", a.logs());
}

/// A disk on a full file system fails its own writes with ENOSPC; a disk on another
/// file system, served by the same reactor at the same time, completes fio's verified
/// writes without an error.
#[test]
fn a_full_file_system_fails_only_its_own_disk() {
    require_tool("fio", "fio");
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("small");
    std::fs::create_dir(&small).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(&small)
        .status()
        .is_ok_and(|s| s.success());
    assert!(mounted, "this test mounts a 4 MiB tmpfs (it needs root)");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(small.clone());
    qcow2(&small.join("full.qcow2"), "64M");
    qcow2(&dir.path().join("good.qcow2"), "64M");
    let disks = "[[disk]]\nname = \"full\"\npath = \"{dir}/small/full.qcow2\"\nformat = \"qcow2\"\ndirect = false\n"
        .to_string()
        + &disk("good", "good.qcow2", "qcow2");
    let mut a = Appliance::start_in(dir, Setup { disks, ..Setup::default() });
    let good = Command::new("fio")
        .args(["--name=good", "--ioengine=nbd", &format!("--uri={}", a.uri("good"))])
        .args(["--rw=randwrite", "--bs=16k", "--iodepth=8", "--size=32M", "--verify=crc32c"])
        .args(["--output-format=json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let full = run_unchecked(
        Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x66 0 16M", &a.uri("full")]),
        Duration::from_secs(120),
    );
    let out = good.wait_with_output().unwrap();
    let j: Value =
        serde_json::from_slice(&out.stdout[out.stdout.iter().position(|&b| b == b'{').unwrap()..])
            .unwrap_or_else(|e| panic!("fio json: {e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(j["jobs"][0]["error"], 0, "the good disk saw an error: {}", stdout(&out));
    assert!(
        out.status.success(),
        "fio verify on the good disk: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let full_out =
        String::from_utf8_lossy(&full.stdout).to_string() + &String::from_utf8_lossy(&full.stderr);
    assert!(full_out.contains("No space left"), "the full disk reports ENOSPC: {full_out}");
    // The full disk still answers reads, and the appliance serves both.
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "read 0 64k", &a.uri("full")]));
    assert!(a.alive());
    assert!(a.stop().success(), "{}", a.logs());
    let check = run(Command::new("qemu-img").args(["check"]).arg(a.path("good.qcow2")));
    assert!(check.status.success());
}
