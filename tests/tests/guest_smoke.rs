//! The test guest itself (tests/guest, appliance_tests::guest), checked against
//! qemu-storage-daemon's vhost-user-blk export as the peer: the guest sees the disk's size,
//! queue count and contents, and what it writes, discards and zeroes with O_DIRECT ends up
//! in the image as read on the host with qemu-io / qemu-img.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use appliance_tests::guest::{self, BootOptions, Guest};
use appliance_tests::{pattern, require_tool, run, stdout};

const MIB: usize = 1 << 20;
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

/// qemu-storage-daemon exporting one image over vhost-user-blk.
struct Qsd {
    child: Option<Child>,
    sock: PathBuf,
    log: PathBuf,
}

impl Qsd {
    fn start(dir: &Path, image: &Path, format: &str, queues: u32) -> Qsd {
        let sock = dir.join("vhost.sock");
        let pidfile = dir.join("qsd.pid");
        let log = dir.join("qsd.log");
        // A restart reuses the paths: readiness must not see the old instance's files.
        let _ = std::fs::remove_file(&sock);
        let _ = std::fs::remove_file(&pidfile);
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!("driver=file,node-name=file,filename={},discard=unmap", image.display()))
            .arg("--blockdev")
            .arg(format!("driver={format},node-name=fmt,file=file,discard=unmap"))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e,node-name=fmt,addr.type=unix,addr.path={},writable=on,num-queues={queues}",
                sock.display()
            ))
            .arg("--pidfile")
            .arg(&pidfile)
            .stdin(Stdio::null())
            .stdout(std::fs::File::options().create(true).append(true).open(&log).unwrap())
            .stderr(std::fs::File::options().append(true).open(&log).unwrap())
            .spawn()
            .expect("start qemu-storage-daemon");
        let mut qsd = Qsd { child: Some(child), sock, log };
        // The pidfile is written once the exports are set up.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !(pidfile.exists() && qsd.sock.exists()) {
            if let Some(s) = qsd.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("qemu-storage-daemon exited ({s}):\n{}", qsd.logs());
            }
            assert!(Instant::now() < deadline, "qemu-storage-daemon not ready:\n{}", qsd.logs());
            std::thread::sleep(Duration::from_millis(20));
        }
        qsd
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM and wait, so qcow2 metadata is flushed before the host reads the image.
    fn stop(&mut self) {
        let mut child = self.child.take().expect("already stopped");
        // SAFETY: kill(2) with a pid we own.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("qemu-storage-daemon ignored SIGTERM:\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn require_tools() {
    for tool in ["qemu-storage-daemon", "qemu-img", "qemu-io", "md5sum"] {
        require_tool(tool, "qemu-utils coreutils");
    }
}

fn md5(data: &[u8], dir: &Path) -> String {
    let f = dir.join("md5.in");
    std::fs::write(&f, data).unwrap();
    stdout(&run(Command::new("md5sum").arg(&f))).split_whitespace().next().unwrap().to_string()
}

/// Prints the disk's geometry and first MiB's md5, then writes, reads back, discards and
/// zeroes ranges with O_DIRECT (checked in the guest too).
const SCRIPT: &str = r#"
set -e
dev=/dev/vda
echo size=$(blockdev --getsize64 $dev)
echo sectors=$(cat /sys/block/vda/size)
echo queues=$(ls /sys/block/vda/mq | wc -l)
echo md5_first_mib=$(dd if=$dev bs=1M count=1 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
xio fill $dev 1M 1M 0xab
xio check $dev 1M 1M 0xab
dd if=/dev/zero bs=64k count=16 2>/dev/null | tr '\000' '\125' | dd of=$dev bs=64k seek=32 oflag=direct iflag=fullblock 2>/dev/null
xio check $dev 2M 1M 0x55
echo md5_dd_write=$(dd if=$dev bs=64k skip=32 count=16 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
xio prand $dev 4M 1M 7
xio check-prand $dev 4M 1M 7
xio fill $dev 8M 2M 0xcd
xio discard $dev 8M 1M
blkdiscard -o 9437184 -l 1048576 $dev
xio check $dev 8M 2M 0
xio fill $dev 12M 1M 0xee
xio zeroout $dev 12M 512k
xio check $dev 12M 512k 0
xio check $dev 12800k 512k 0xee
xio flush $dev
echo discard_max=$(cat /sys/block/vda/queue/discard_max_bytes)
echo write_zeroes_max=$(cat /sys/block/vda/queue/write_zeroes_max_bytes)
echo done=1
"#;

fn smoke(format: &str, queues: u32) {
    require_tools();
    let image = guest::ensure_built();
    let dir = tempfile::tempdir().unwrap();
    let size = 64 * MIB;

    // The first MiB holds a known pattern; the rest is a hole.
    let raw = dir.path().join("src.raw");
    let head = pattern(3, MIB);
    std::fs::write(&raw, &head).unwrap();
    std::fs::File::options().write(true).open(&raw).unwrap().set_len(size as u64).unwrap();
    let img = if format == "raw" {
        raw.clone()
    } else {
        let img = dir.path().join(format!("disk.{format}"));
        run(Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", format])
            .arg(&raw)
            .arg(&img));
        img
    };

    let mut qsd = Qsd::start(dir.path(), &img, format, queues);
    let opts = BootOptions { queues, timeout: BOOT_TIMEOUT, ..BootOptions::default() };
    let r = guest::boot_with(&image, &qsd.sock, SCRIPT, &opts);
    eprintln!("{format}: guest run took {:?}", r.elapsed);
    r.assert_success();
    assert!(r.ready && !r.timed_out);
    qsd.stop();

    assert_eq!(r.expect_value("size"), size.to_string(), "{r}");
    assert_eq!(r.expect_value("sectors"), (size / 512).to_string(), "{r}");
    assert_eq!(r.expect_value("queues"), queues.to_string(), "{r}");
    assert_eq!(r.expect_value("md5_first_mib"), md5(&head, dir.path()), "{r}");
    assert_eq!(r.expect_value("md5_dd_write"), md5(&[0x55; MIB], dir.path()), "{r}");
    assert_ne!(r.expect_value("discard_max"), "0", "discard not negotiated:\n{r}");
    assert_ne!(r.expect_value("write_zeroes_max"), "0", "write-zeroes not negotiated:\n{r}");

    // The host sees what the guest wrote.
    let out = run(Command::new("qemu-io")
        .args(["-r", "-f", format])
        .args([
            "-c",
            "read -P 0xab 1M 1M",
            "-c",
            "read -P 0x55 2M 1M",
            "-c",
            "read -P 0 8M 2M",
            "-c",
            "read -P 0 12M 512k",
            "-c",
            "read -P 0xee 12800k 512k",
            "-c",
            "read -P 0 16M 48M",
        ])
        .arg(&img));
    let text = stdout(&out);
    assert!(!text.contains("verification failed"), "host pattern check failed:\n{text}");
    let flat = dir.path().join("flat.raw");
    run(Command::new("qemu-img").args(["convert", "-f", format, "-O", "raw"]).arg(&img).arg(&flat));
    let bytes = std::fs::read(&flat).unwrap();
    assert_eq!(bytes.len(), size);
    assert!(bytes[..MIB] == head[..], "first MiB changed");
    assert!(
        bytes[4 * MIB..5 * MIB] == pattern(7, MIB)[..],
        "xio prand differs from appliance_tests::pattern"
    );
    if format == "qcow2" {
        run(Command::new("qemu-img").args(["check", "-f", "qcow2"]).arg(&img));
    }
}

#[test]
fn raw_image_two_queues() {
    smoke("raw", 2);
}

#[test]
fn qcow2_image_one_queue() {
    smoke("qcow2", 1);
}

/// The script's exit status comes back; output after it is still captured.
#[test]
fn script_exit_status() {
    require_tools();
    let image = guest::ensure_built();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.raw");
    std::fs::File::create(&img).unwrap().set_len(16 * MIB as u64).unwrap();
    let qsd = Qsd::start(dir.path(), &img, "raw", 2);
    let r = guest::boot(&image, &qsd.sock, 2, "echo a=1\necho oops >&2\nexit 7\n", BOOT_TIMEOUT);
    assert_eq!(r.exit_status, Some(7), "{r}");
    assert_eq!(r.value("a"), Some("1"), "{r}");
    assert!(r.output.contains("oops"), "stderr goes to the console:\n{r}");
    assert!(r.ready && !r.timed_out && r.qemu_status.is_some_and(|s| s.success()), "{r}");
}

/// A running guest survives a backend restart with `reconnect=1`: written data stays and
/// I/O after the restart works. Also a template for backend-restart tests.
#[test]
fn backend_restart_with_reconnect() {
    require_tools();
    let image = guest::ensure_built();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.raw");
    std::fs::File::create(&img).unwrap().set_len(16 * MIB as u64).unwrap();
    let mut qsd = Qsd::start(dir.path(), &img, "raw", 2);
    let script = "set -e\nxio fill /dev/vda 0 1M 0x22\necho phase=1\nsleep 5\n\
                  xio fill /dev/vda 1M 1M 0x33\nxio check /dev/vda 0 1M 0x22\n\
                  xio check /dev/vda 1M 1M 0x33\necho phase=2\n";
    let opts = BootOptions {
        chardev_options: "reconnect=1".into(),
        timeout: BOOT_TIMEOUT,
        ..BootOptions::default()
    };
    let mut g = Guest::spawn(&image, &qsd.sock, script, &opts);
    assert!(g.wait_for("phase=1", BOOT_TIMEOUT), "no phase=1:\n{}", g.output());
    qsd.stop();
    let mut qsd = Qsd::start(dir.path(), &img, "raw", 2);
    let r = g.wait();
    r.assert_success();
    assert_eq!(r.value("phase"), Some("2"), "{r}");
    qsd.stop();
    let text = stdout(&run(Command::new("qemu-io")
        .args(["-r", "-f", "raw"])
        .args(["-c", "read -P 0x22 0 1M", "-c", "read -P 0x33 1M 1M"])
        .arg(&img)));
    assert!(!text.contains("verification failed"), "{text}");
}

/// The timeout kills QEMU: with `reconnect=1` and no backend, QEMU waits for the socket
/// forever.
#[test]
fn timeout_kills_qemu() {
    let image = guest::ensure_built();
    let dir = tempfile::tempdir().unwrap();
    let opts = BootOptions {
        chardev_options: "reconnect=1".into(),
        timeout: Duration::from_secs(3),
        ..BootOptions::default()
    };
    let r = guest::boot_with(&image, &dir.path().join("nobody.sock"), "exit 0", &opts);
    assert!(r.timed_out && r.exit_status.is_none() && r.qemu_status.is_none(), "{r}");
    assert!(r.elapsed < Duration::from_secs(30), "{r}");
}

/// Without a backend, QEMU fails at once and says why; no exit status is made up.
#[test]
fn missing_socket_is_reported() {
    let image = guest::ensure_built();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nobody.sock");
    let r = guest::boot(&image, &sock, 2, "exit 0", Duration::from_secs(60));
    assert_eq!(r.exit_status, None, "{r}");
    assert!(!r.ready && !r.timed_out, "{r}");
    assert!(r.qemu_stderr.contains("nobody.sock"), "{r}");
}
