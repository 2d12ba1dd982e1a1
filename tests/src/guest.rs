//! A small Linux guest under QEMU (TCG) whose only disk, `/dev/vda`, is a vhost-user-blk
//! socket: boot it with a shell script, read the script's output from the serial console.
//!
//! The image comes from `tests/guest/build.sh` (Debian cloud kernel + busybox-static +
//! `xio`, see `tests/guest/xio.c`), cached under `<workspace>/target/guest` (override with
//! `APPLIANCE_GUEST_DIR`). The guest's `/init` loads the virtio modules, waits for
//! `/dev/vda`, prints `GUEST-READY`, runs the test script with `sh` (from `/tmp`, stdout
//! and stderr to the console), prints `GUEST-EXIT <status>` and powers off.
//!
//! In the script: busybox (`dd ... iflag=direct|oflag=direct`, `md5sum`, `sha256sum`,
//! `blockdev --getsize64`, `blkdiscard`, `taskset`, ...) and `xio` (`fill`, `prand`,
//! `check`, `check-prand`, `discard`, `zeroout`, `flush`). Print results as `key=value`
//! lines and read them with [`GuestRun::value`].
//!
//! ```no_run
//! # use appliance_tests::guest;
//! # use std::time::Duration;
//! let image = guest::ensure_built();
//! let run = guest::boot(&image, "/tmp/vu.sock".as_ref(), 2, "echo size=$(blockdev --getsize64 /dev/vda)", Duration::from_secs(120));
//! run.assert_success();
//! assert_eq!(run.value("size"), Some("67108864"));
//! ```

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::workspace;

/// The kernel and base initramfs made by `tests/guest/build.sh`.
#[derive(Clone, Debug)]
pub struct GuestImage {
    pub vmlinuz: PathBuf,
    /// The base initramfs; [`boot`] appends the test script to it.
    pub initrd: PathBuf,
}

/// Where build.sh caches the guest (`APPLIANCE_GUEST_DIR`, else `<workspace>/target/guest`).
pub fn guest_dir() -> PathBuf {
    std::env::var_os("APPLIANCE_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/guest"))
}

fn scripts() -> PathBuf {
    workspace().join("tests/guest")
}

/// Builds the guest image if needed (once per process; the script itself is idempotent
/// and cheap when up to date) and returns it. Panics with build.sh's output on failure.
/// The first run may install packages (qemu-system-x86, busybox-static, cpio) with apt and
/// download the kernel, so it needs root and the network.
pub fn ensure_built() -> GuestImage {
    static BUILT: OnceLock<Result<GuestImage, String>> = OnceLock::new();
    BUILT.get_or_init(build).clone().unwrap_or_else(|e| panic!("{e}"))
}

fn build() -> Result<GuestImage, String> {
    let out = guest_dir();
    let script = scripts().join("build.sh");
    let log = tempfile::NamedTempFile::new().map_err(|e| format!("guest build: tempfile: {e}"))?;
    let log_of =
        |f: &tempfile::NamedTempFile| std::fs::read_to_string(f.path()).unwrap_or_default();
    let mut child = Command::new("bash")
        .arg(&script)
        .env("OUT", &out)
        .stdin(Stdio::null())
        .stdout(log.reopen().map_err(|e| e.to_string())?)
        .stderr(log.reopen().map_err(|e| e.to_string())?)
        .spawn()
        .map_err(|e| format!("guest build: cannot run {}: {e}", script.display()))?;
    let timeout = Duration::from_secs(1800);
    let status = match wait_timeout(&mut child, timeout) {
        Some(s) => s,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "guest build: {} did not finish within {timeout:?}:\n{}",
                script.display(),
                log_of(&log)
            ));
        }
    };
    if !status.success() {
        return Err(format!(
            "guest build: {} failed ({status}); it installs qemu-system-x86, busybox-static and \
             cpio with apt when missing (needs root) and downloads a Debian kernel:\n{}",
            script.display(),
            log_of(&log)
        ));
    }
    let image = GuestImage { vmlinuz: out.join("vmlinuz"), initrd: out.join("base.cpio.gz") };
    for p in [&image.vmlinuz, &image.initrd] {
        if !p.is_file() {
            return Err(format!(
                "guest build: {} succeeded but {} is missing",
                script.display(),
                p.display()
            ));
        }
    }
    Ok(image)
}

fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait().expect("wait for child") {
            return Some(s);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How to start QEMU. `BootOptions::default()` is the plain recipe: 512 MiB, 2 vCPUs,
/// 2 queues, 120 s timeout.
#[derive(Clone, Debug)]
pub struct BootOptions {
    /// Guest RAM in MiB; it is a shared memfd (`share=on`), which vhost-user requires.
    pub memory_mib: u32,
    pub smp: u32,
    /// `num-queues` of the vhost-user-blk-pci device. The guest's virtio_blk uses at most
    /// one queue per vCPU, so more queues than `smp` show up as `smp` in the guest.
    pub queues: u32,
    /// Appended to `-chardev socket,id=vu,path=SOCK`, comma-separated, e.g. `reconnect=1`.
    pub chardev_options: String,
    /// Appended to `-device vhost-user-blk-pci,chardev=vu,num-queues=N`, e.g.
    /// `queue-size=256` or `config-wce=off`.
    pub device_options: String,
    /// Appended to the kernel command line (`console=ttyS0 quiet panic=-1`).
    pub kernel_args: String,
    /// Further QEMU arguments.
    pub extra_args: Vec<String>,
    /// The machine type (`pc`; `q35` for an emulated NVMe controller behind an IOMMU).
    pub machine: String,
    /// Whether the guest has the vhost-user-blk disk (`/dev/vda`) on `vhost_socket`.
    pub vhost: bool,
    /// Files added to the initramfs: (host file, absolute path in the guest).
    pub files: Vec<(PathBuf, String)>,
    /// The whole run, from starting QEMU; then QEMU is killed.
    pub timeout: Duration,
}

impl Default for BootOptions {
    fn default() -> Self {
        BootOptions {
            memory_mib: 512,
            smp: 2,
            queues: 2,
            chardev_options: String::new(),
            device_options: String::new(),
            kernel_args: String::new(),
            extra_args: Vec::new(),
            machine: "pc".into(),
            vhost: true,
            files: Vec::new(),
            timeout: Duration::from_secs(120),
        }
    }
}

/// The outcome of a guest run.
#[derive(Debug)]
pub struct GuestRun {
    /// The serial console (kernel messages at `quiet` level, the script's stdout and
    /// stderr), with `\r` removed.
    pub output: String,
    /// From `GUEST-EXIT <status>`: the test script's exit status; `None` if the guest never
    /// got there (crash, hang, QEMU error).
    pub exit_status: Option<i32>,
    /// `GUEST-READY` was printed (modules loaded, before the script ran).
    pub ready: bool,
    /// The timeout fired and QEMU was killed.
    pub timed_out: bool,
    /// QEMU's own exit status (`None` if it was killed on timeout).
    pub qemu_status: Option<ExitStatus>,
    /// QEMU's stderr (e.g. "Failed to connect to '...': Connection refused").
    pub qemu_stderr: String,
    /// From starting QEMU to its exit.
    pub elapsed: Duration,
}

impl GuestRun {
    /// The value of the last `key=value` line the script printed.
    pub fn value(&self, key: &str) -> Option<&str> {
        let prefix = format!("{key}=");
        self.output.lines().rev().find_map(|l| l.trim().strip_prefix(prefix.as_str()))
    }

    /// [`value`](Self::value), panicking with the run if it is missing.
    pub fn expect_value(&self, key: &str) -> &str {
        self.value(key).unwrap_or_else(|| panic!("guest printed no `{key}=`:\n{self}"))
    }

    /// Panics with the whole run unless the script exited 0.
    pub fn assert_success(&self) {
        assert_eq!(self.exit_status, Some(0), "guest test script failed:\n{self}");
    }
}

impl std::fmt::Display for GuestRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit_status: {:?}, ready: {}, timed_out: {}, qemu: {:?}, elapsed: {:?}\n\
             --- serial console ---\n{}\n--- qemu stderr ---\n{}",
            self.exit_status,
            self.ready,
            self.timed_out,
            self.qemu_status,
            self.elapsed,
            self.output,
            self.qemu_stderr
        )
    }
}

/// Boots the guest on `vhost_socket` with `queues` queues, runs `test_script` (sh) and
/// waits for it at most `timeout`.
pub fn boot(
    image: &GuestImage,
    vhost_socket: &Path,
    queues: u32,
    test_script: &str,
    timeout: Duration,
) -> GuestRun {
    boot_with(
        image,
        vhost_socket,
        test_script,
        &BootOptions { queues, timeout, ..BootOptions::default() },
    )
}

/// Boots the guest with explicit options and waits for it to power off.
pub fn boot_with(
    image: &GuestImage,
    vhost_socket: &Path,
    test_script: &str,
    options: &BootOptions,
) -> GuestRun {
    Guest::spawn(image, vhost_socket, test_script, options).wait()
}

/// A running guest, for tests that act on the backend while the guest runs (restart it,
/// stall it, ...): watch the console with [`wait_for`](Self::wait_for), then
/// [`wait`](Self::wait). Dropping it kills QEMU.
pub struct Guest {
    child: Option<Child>,
    _dir: tempfile::TempDir,
    console: Arc<Mutex<Vec<u8>>>,
    readers: Vec<JoinHandle<()>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    started: Instant,
    deadline: Instant,
}

impl Guest {
    /// Writes the per-test initrd into a temporary directory and starts QEMU. Panics if
    /// QEMU cannot be started at all; QEMU errors (e.g. the socket refusing) show up in
    /// the [`GuestRun`].
    pub fn spawn(
        image: &GuestImage,
        vhost_socket: &Path,
        test_script: &str,
        options: &BootOptions,
    ) -> Guest {
        let dir = tempfile::tempdir().expect("tempdir");
        let script = dir.path().join("test.sh");
        std::fs::write(&script, test_script).expect("write test.sh");
        let initrd = dir.path().join("initrd.gz");
        let mut mk = Command::new("bash");
        mk.arg(scripts().join("mkinitrd.sh")).arg(&image.initrd).arg(&script).arg(&initrd);
        for (src, dest) in &options.files {
            mk.arg(format!("{}={dest}", src.display()));
        }
        let out = crate::run_unchecked(&mut mk, Duration::from_secs(120));
        assert!(
            out.status.success(),
            "mkinitrd.sh failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );

        let mut chardev =
            format!("socket,id=vu,path={}", qemu_opt_escape(&vhost_socket.to_string_lossy()));
        push_opts(&mut chardev, &options.chardev_options);
        let mut device = format!("vhost-user-blk-pci,chardev=vu,num-queues={}", options.queues);
        push_opts(&mut device, &options.device_options);
        let mut append = String::from("console=ttyS0 quiet panic=-1");
        if !options.kernel_args.is_empty() {
            append.push(' ');
            append.push_str(&options.kernel_args);
        }
        let mem = options.memory_mib;
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-no-user-config", "-accel", "tcg", "-machine", &options.machine])
            .args(["-m", &format!("{mem}M"), "-smp", &options.smp.to_string()])
            .args(["-display", "none", "-vga", "none", "-nic", "none", "-monitor", "none"])
            .args(["-serial", "stdio", "-no-reboot"])
            .arg("-kernel")
            .arg(&image.vmlinuz)
            .arg("-initrd")
            .arg(&initrd)
            .args(["-append", &append])
            .args(["-object", &format!("memory-backend-memfd,id=mem,size={mem}M,share=on")])
            .args(["-numa", "node,memdev=mem"]);
        if options.vhost {
            cmd.args(["-chardev", &chardev, "-device", &device]);
        }
        cmd.args(&options.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = cmd.spawn().unwrap_or_else(|e| {
            panic!("cannot start qemu-system-x86_64 ({e}); run tests/guest/build.sh: {cmd:?}")
        });
        let console = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let readers = vec![
            pump(child.stdout.take().unwrap(), console.clone()),
            pump(child.stderr.take().unwrap(), stderr.clone()),
        ];
        Guest {
            child: Some(child),
            _dir: dir,
            console,
            readers,
            stderr,
            started,
            deadline: started + options.timeout,
        }
    }

    /// QEMU's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// The console so far.
    pub fn output(&self) -> String {
        clean(&self.console.lock().unwrap())
    }

    /// Waits until the console contains `needle`; false on timeout or if QEMU exited first.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.output().contains(needle) {
                return true;
            }
            let exited = self.child.as_mut().unwrap().try_wait().unwrap().is_some();
            if exited {
                // The readers may still be draining the pipe.
                std::thread::sleep(Duration::from_millis(50));
                return self.output().contains(needle);
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for QEMU to exit (the guest powers off after the script), killing it at the
    /// deadline of [`BootOptions::timeout`].
    pub fn wait(mut self) -> GuestRun {
        let mut child = self.child.take().unwrap();
        let remaining = self.deadline.saturating_duration_since(Instant::now());
        match wait_timeout(&mut child, remaining) {
            Some(status) => self.finish(Some(status), false),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                self.finish(None, true)
            }
        }
    }

    /// Kills QEMU now (`qemu_status` is then the SIGKILL status).
    pub fn kill(mut self) -> GuestRun {
        let mut child = self.child.take().unwrap();
        let _ = child.kill();
        let status = child.wait().ok();
        self.finish(status, false)
    }

    fn finish(&mut self, qemu_status: Option<ExitStatus>, timed_out: bool) -> GuestRun {
        let elapsed = self.started.elapsed();
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        let output = self.output();
        let exit_status = output.lines().rev().find_map(|l| {
            let rest = &l[l.find("GUEST-EXIT ")? + "GUEST-EXIT ".len()..];
            rest.split_whitespace().next()?.parse().ok()
        });
        GuestRun {
            ready: output.contains("GUEST-READY"),
            exit_status,
            timed_out,
            qemu_status,
            qemu_stderr: clean(&self.stderr.lock().unwrap()),
            output,
            elapsed,
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn pump(mut from: impl Read + Send + 'static, to: Arc<Mutex<Vec<u8>>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 {
                break;
            }
            to.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    })
}

fn clean(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).replace('\r', "")
}

/// QEMU option values escape a comma by doubling it.
fn qemu_opt_escape(s: &str) -> String {
    s.replace(',', ",,")
}

fn push_opts(to: &mut String, opts: &str) {
    let opts = opts.trim().trim_matches(',');
    if !opts.is_empty() {
        to.push(',');
        to.push_str(opts);
    }
}

/// The appliance binary (debug info stripped, into `dir`) and the shared libraries it
/// loads, as [`BootOptions::files`]: for tests that run the appliance inside the guest.
pub fn appliance_files(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut files = Vec::new();
    add_binary(&mut files, &crate::bin(), "/bin/appliance", dir);
    files
}

/// Adds the executable `bin` (debug info stripped, into `dir`) as `dest`, and the shared
/// libraries it loads that `files` lacks, to `files`.
pub fn add_binary(files: &mut Vec<(PathBuf, String)>, bin: &Path, dest: &str, dir: &Path) {
    let stripped = dir.join(Path::new(dest).file_name().expect("a file name"));
    crate::run(Command::new("objcopy").arg("--strip-debug").arg(bin).arg(&stripped));
    files.push((stripped, dest.to_string()));
    let ldd = crate::run(Command::new("ldd").arg(bin));
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux... (0x...)"
        let lib = line.split("=>").last().and_then(|r| r.split_whitespace().next());
        if let Some(lib) = lib.filter(|l| l.starts_with('/'))
            && !files.iter().any(|(_, d)| d == lib)
        {
            files.push((PathBuf::from(lib), lib.to_string()));
        }
    }
}

/// The guest kernel's network modules (virtio-net and what it needs), as
/// [`BootOptions::files`] under `/lib/modules/`, in load order: [`NET_SETUP`] loads them.
pub fn net_module_files() -> Vec<(PathBuf, String)> {
    module_files(&[
        "net/core/failover.ko",
        "drivers/net/net_failover.ko",
        "drivers/net/virtio_net.ko",
    ])
}

/// The guest kernel's VFIO modules, as [`BootOptions::files`]: [`VFIO_SETUP`] loads them.
pub fn vfio_module_files() -> Vec<(PathBuf, String)> {
    module_files(&[
        "virt/lib/irqbypass.ko",
        "drivers/vfio/vfio.ko",
        "drivers/vfio/vfio_iommu_type1.ko",
        "drivers/vfio/vfio_virqfd.ko",
        "drivers/vfio/pci/vfio-pci-core.ko",
        "drivers/vfio/pci/vfio-pci.ko",
    ])
}

/// Guest script lines that load the VFIO modules of [`vfio_module_files`]; then
/// `vfio_bind ADDR` hands a PCI device to vfio-pci. The guest needs
/// `-machine q35,kernel-irqchip=split -device intel-iommu,intremap=on` and the kernel
/// argument `intel_iommu=on`.
pub const VFIO_SETUP: &str = "for m in irqbypass vfio vfio_iommu_type1 vfio_virqfd vfio-pci-core vfio-pci; do \
     insmod /lib/modules/$m.ko || echo \"GUEST-WARN insmod $m failed\"; done\n\
     vfio_bind() { echo $1 > /sys/bus/pci/devices/$1/driver/unbind; \
     echo vfio-pci > /sys/bus/pci/devices/$1/driver_override; echo $1 > /sys/bus/pci/drivers_probe; }\n";

/// Kernel modules of the guest kernel (paths under its `kernel/` directory), as
/// [`BootOptions::files`] under `/lib/modules/`.
fn module_files(paths: &[&str]) -> Vec<(PathBuf, String)> {
    let pkg = std::fs::read_to_string(guest_dir().join("kernel.pkg")).expect("guest kernel.pkg");
    let modules = guest_dir().join("kernel").join(pkg.trim()).join("lib/modules");
    let kver = std::fs::read_dir(&modules)
        .expect("guest kernel modules")
        .next()
        .expect("one kernel version")
        .expect("read modules dir")
        .path();
    paths
        .iter()
        .map(|m| {
            let name = Path::new(m).file_name().unwrap().to_string_lossy().to_string();
            (kver.join("kernel").join(m), format!("/lib/modules/{name}"))
        })
        .collect()
}

/// Guest script lines that bring up the user-mode network of [`user_net_args`]: the guest
/// is 10.0.2.15, the host's forwarded ports reach it.
pub const NET_SETUP: &str = "for m in failover net_failover virtio_net; do \
     insmod /lib/modules/$m.ko || echo \"GUEST-WARN insmod $m failed\"; done\n\
     ip link set lo up\nip link set eth0 up\nip addr add 10.0.2.15/24 dev eth0\n";

/// QEMU arguments for a user-mode network whose host ports `forwards` (host port, guest
/// port) on 127.0.0.1 reach the guest.
pub fn user_net_args(forwards: &[(u16, u16)]) -> Vec<String> {
    let mut netdev = String::from("user,id=n0");
    for (host, guest) in forwards {
        netdev.push_str(&format!(",hostfwd=tcp:127.0.0.1:{host}-:{guest}"));
    }
    vec!["-netdev".into(), netdev, "-device".into(), "virtio-net-pci,netdev=n0".into()]
}

/// A test binary of this workspace (`cargo test --no-run` of `--test name` in
/// `package`, same profile as this test), for running a suite inside the guest.
pub fn test_binary(package: &str, name: &str) -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace())
        .args(["test", "--quiet", "--no-run", "--message-format=json", "-p", package])
        .args(["--test", name]);
    if crate::bin().parent().and_then(Path::file_name).is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let out = crate::run_unchecked(&mut cmd, Duration::from_secs(1200));
    assert!(out.status.success(), "building test {name}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"]["name"] == name && v["target"]["kind"][0] == "test")
        .find_map(|v| v["executable"].as_str().map(PathBuf::from))
        .unwrap_or_else(|| panic!("cargo built no executable for test {name} of {package}"))
}
