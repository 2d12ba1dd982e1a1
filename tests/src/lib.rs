//! Helpers for the appliance's integration tests: build and start the real binary with
//! a config in a temporary directory, wait until it listens, run real client tools
//! (qemu-img, qemu-io, fio, nbdcopy, nbdinfo) with timeouts, and stop it with SIGTERM.

use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

pub mod ceph;
pub mod fuzz_seeds;
pub mod guest;
pub mod jobs;
pub mod nbd_client;
pub mod nbd_map;
pub mod ops;
pub mod qemu_nbd;
pub mod tls;

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// Path of the `appliance` binary of the same profile as this test, built (once per test
/// process) so it is never stale.
pub fn bin() -> PathBuf {
    static BUILD: Once = Once::new();
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> -> target/<profile>
    let profile_dir = exe.parent().and_then(Path::parent).expect("target dir").to_path_buf();
    let release = profile_dir.file_name().is_some_and(|n| n == "release");
    BUILD.call_once(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(workspace()).args(["build", "--quiet", "--bin", "appliance"]);
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build");
        assert!(status.success(), "building the appliance binary failed");
    });
    profile_dir.join("appliance")
}

/// Fails the test with an install hint when a client tool is missing.
pub fn require_tool(name: &str, package: &str) {
    let ok = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "`{name}` is required by this test: apt-get install -y {package}");
}

/// A free TCP port on 127.0.0.1 (racy by nature, but the window is tiny).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// fio's nbd engine writing `size` at random through `uri` (`bsrange`, `iodepth`), then
/// reading it back with `verify=crc32c`; fails the test on any error or mismatch and
/// returns fio's job report.
pub fn fio_verify(uri: &str, size: &str, bsrange: &str, depth: u32) -> serde_json::Value {
    let out = run(Command::new("fio").args([
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=randwrite",
        &format!("--bsrange={bsrange}"),
        "--bs_unaligned=0",
        &format!("--iodepth={depth}"),
        &format!("--size={size}"),
        "--verify=crc32c",
        "--verify_state_save=0",
        "--do_verify=1",
        "--verify_fatal=1",
        "--output-format=json",
    ]));
    // fio prints "fio: connected to NBD server" before its JSON.
    let text = stdout(&out);
    let json: serde_json::Value =
        serde_json::from_str(&text[text.find('{').expect("fio json")..]).expect("fio json");
    let job = json["jobs"][0].clone();
    assert_eq!(job["error"], 0, "fio reported an error:\n{text}");
    assert!(job["read"]["io_bytes"].as_u64().unwrap_or(0) > 0, "fio verified nothing:\n{text}");
    job
}

/// Runs a command with a timeout; panics with its output if it fails or hangs.
pub fn run(cmd: &mut Command) -> Output {
    let out = run_unchecked(cmd, Duration::from_secs(300));
    assert!(
        out.status.success(),
        "command failed: {cmd:?}\nstatus: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs a command with a timeout and returns its output whatever the status.
pub fn run_unchecked(cmd: &mut Command, timeout: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stdout.read_to_end(&mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stderr.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("command timed out after {timeout:?}: {cmd:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output { status, stdout: out_t.join().unwrap(), stderr: err_t.join().unwrap() }
}

/// Runs `make()`'s `qemu-img create` of a LUKS-encrypted image, again (at most 50
/// times, a little later each time) while QEMU cannot time its PBKDF2: it refuses when
/// its first timing run measures no thread CPU time at all ("Unable to get accurate CPU
/// usage"), which a loaded machine's tick-based accounting often gives.
pub fn qemu_img_create_luks(make: impl Fn() -> Command) {
    for attempt in 1.. {
        let out = make().output().expect("qemu-img");
        let err = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            return;
        }
        assert!(attempt < 50 && err.contains("accurate CPU usage"), "qemu-img create: {err}");
        std::thread::sleep(Duration::from_millis(20 * attempt));
    }
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A running appliance process.
pub struct Appliance {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub sock: PathBuf,
    pub tcp: SocketAddr,
    log: PathBuf,
    env: Vec<(&'static str, String)>,
}

/// What to serve: disks as TOML `[[disk]]` tables, with `{dir}` replaced by the
/// appliance's temporary directory.
pub struct Setup {
    pub cores: &'static str,
    pub idle: &'static str,
    pub disks: String,
    pub extra: String,
    /// Lines added to the `[nbd]` table (`max_connections = 4`, say).
    pub nbd: String,
    /// Environment variables of the appliance process.
    pub env: Vec<(&'static str, String)>,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            cores: "[0]",
            idle: "adaptive",
            disks: String::new(),
            extra: String::new(),
            nbd: String::new(),
            env: Vec::new(),
        }
    }
}

impl Appliance {
    /// Starts an appliance in a new temporary directory. `prepare` runs first, with the
    /// directory, to create images.
    pub fn start(setup: Setup, prepare: impl FnOnce(&Path)) -> Appliance {
        let dir = tempfile::tempdir().expect("tempdir");
        prepare(dir.path());
        Self::start_in(dir, setup)
    }

    pub fn start_in(dir: tempfile::TempDir, setup: Setup) -> Appliance {
        let sock = dir.path().join("nbd.sock");
        let port = free_port();
        let tcp: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let disks = setup.disks.replace("{dir}", &dir.path().display().to_string());
        let extra = setup.extra.replace("{dir}", &dir.path().display().to_string());
        let config = format!(
            "[appliance]\ncores = {}\nidle = \"{}\"\nbuffer_pool = \"64MiB\"\n{extra}\n[nbd]\nlisten = [\"unix:{}\", \"tcp:{tcp}\"]\n{}\n\n{disks}",
            setup.cores,
            setup.idle,
            sock.display(),
            setup.nbd
        );
        let cfg = dir.path().join("appliance.toml");
        std::fs::write(&cfg, config).unwrap();
        let log = dir.path().join("appliance.log");
        let logf = std::fs::File::create(&log).unwrap();
        let child = Command::new(bin())
            .args(["serve", "--config"])
            .arg(&cfg)
            .env("APPLIANCE_LOG", "info")
            .envs(setup.env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .expect("start appliance");
        let mut a = Appliance { child: Some(child), dir, sock, tcp, log, env: setup.env };
        a.wait_listening();
        a
    }

    fn wait_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if std::os::unix::net::UnixStream::connect(&self.sock).is_ok() {
                return;
            }
            if let Some(s) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("appliance exited early ({s}):\n{}", self.logs());
            }
            assert!(
                Instant::now() < deadline,
                "appliance did not listen in time:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The NBD URI of an export over the unix socket.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.sock.display())
    }

    /// The NBD URI of an export over TCP.
    pub fn tcp_uri(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.tcp)
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// Changes the environment the next [`Appliance::restart`] starts with (`None`
    /// removes the variable).
    pub fn set_env(&mut self, key: &'static str, value: Option<String>) {
        self.env.retain(|(k, _)| *k != key);
        if let Some(v) = value {
            self.env.push((key, v));
        }
    }

    /// Waits up to `timeout` for the process to exit on its own; its status, if it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let child = self.child.as_mut().expect("appliance not running");
            if let Some(s) = child.try_wait().unwrap() {
                self.child = None;
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Kills the process with SIGKILL (a crash) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the appliance again with the same configuration (after `kill` or
    /// `stop`), appending to the same log.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart of a running appliance");
        let cfg = self.dir.path().join("appliance.toml");
        let logf = std::fs::OpenOptions::new().append(true).open(&self.log).unwrap();
        let child = Command::new(bin())
            .args(["serve", "--config"])
            .arg(&cfg)
            .env("APPLIANCE_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .expect("restart appliance");
        self.child = Some(child);
        self.wait_listening();
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("appliance already stopped");
        // SAFETY: kill(2) with a pid we own.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("appliance did not stop within 60 s of SIGTERM:\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Appliance {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A deterministic pseudo-random byte pattern.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Creates a sparse raw file of `size` bytes.
pub fn sparse_file(path: &Path, size: u64) {
    std::fs::File::create(path).unwrap().set_len(size).unwrap();
}
