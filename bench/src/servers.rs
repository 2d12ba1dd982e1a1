//! The NBD servers under test: start one pinned to a core, wait until it listens, read
//! its CPU time, stop it. A [`Server`] kills its process when dropped, and every child
//! gets `PR_SET_PDEATHSIG` so nothing outlives the harness, even when it is killed.

use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

/// Which server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Kind {
    #[serde(rename = "appliance")]
    Appliance,
    #[serde(rename = "qsd")]
    Qsd,
    #[serde(rename = "qemu-nbd")]
    QemuNbd,
    /// No server: fio straight on the raw file (the device limit).
    #[serde(rename = "device")]
    Device,
    /// The same, with fio on the client's core instead of the server's. Where a disk's
    /// completion interrupt lands decides much of what it does for one core (here fio
    /// alone on the core that takes the interrupt ran 4k random reads 1.2-1.3x faster
    /// than on the other), so the device's figure is the better of the two.
    #[serde(rename = "device-client-core")]
    DeviceClientCore,
    /// The appliance serving a `null` disk (no storage behind it): what the NBD client
    /// reaches on this machine, the transport's ceiling.
    #[serde(rename = "null")]
    Null,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Appliance,
        Kind::Qsd,
        Kind::QemuNbd,
        Kind::Device,
        Kind::DeviceClientCore,
        Kind::Null,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Appliance => "appliance",
            Kind::Qsd => "qsd",
            Kind::QemuNbd => "qemu-nbd",
            Kind::Device => "device",
            Kind::DeviceClientCore => "device-client-core",
            Kind::Null => "null",
        }
    }

    /// Whether the target serves the job's image, so runs once per format; the device
    /// and the `null` disk are the same for every format.
    pub fn per_format(self) -> bool {
        !matches!(self, Kind::Device | Kind::DeviceClientCore | Kind::Null)
    }

    /// Whether the target is fio straight on the raw file, with no server.
    pub fn is_device(self) -> bool {
        matches!(self, Kind::Device | Kind::DeviceClientCore)
    }

    /// Whether the target is the appliance's binary.
    fn is_appliance(self) -> bool {
        matches!(self, Kind::Appliance | Kind::Null)
    }

    pub fn parse(s: &str) -> Result<Kind, String> {
        Kind::ALL.into_iter().find(|k| k.name() == s).ok_or_else(|| {
            format!(
                "unknown server {s:?} (appliance, qsd, qemu-nbd, device, device-client-core, null)"
            )
        })
    }
}

/// An image format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Raw,
    Qcow2,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }

    pub fn parse(s: &str) -> Result<Format, String> {
        match s {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            _ => Err(format!("unknown format {s:?} (raw, qcow2)")),
        }
    }
}

/// How to start a server.
#[derive(Debug, Clone)]
pub struct Spec {
    pub kind: Kind,
    pub format: Format,
    pub image: PathBuf,
    /// Directory for the socket, config and log.
    pub dir: PathBuf,
    pub core: usize,
    /// The appliance's reactors (empty: one, on `core`).
    pub appliance_cores: Vec<usize>,
    pub appliance_bin: PathBuf,
    /// `busy` or `adaptive`.
    pub appliance_idle: String,
    /// `APPLIANCE_DEBUG_DELAY_US` for the appliance (0: none).
    pub appliance_delay_us: u64,
    /// Size of the `null` disk ([`Kind::Null`]; the image is not used).
    pub null_size: u64,
}

/// A running server.
pub struct Server {
    child: Option<Child>,
    pub kind: Kind,
    pub sock: PathBuf,
    pub log: PathBuf,
}

/// Makes the child die (SIGKILL) when the thread that spawned it exits, so a killed
/// harness leaves nothing behind.
pub fn die_with_parent(cmd: &mut Command) {
    // SAFETY: the closure runs in the child between fork and exec and only calls
    // prctl and getppid, which are async-signal-safe; it touches no shared state.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl.
            if libc::getppid() == 1 {
                return Err(std::io::Error::other("parent exited"));
            }
            Ok(())
        });
    }
}

/// Waits for `child` at most `limit`; `None` if it is still running.
pub fn wait_timeout(child: &mut Child, limit: Duration) -> std::io::Result<Option<ExitStatus>> {
    let end = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait()? {
            return Ok(Some(s));
        }
        if Instant::now() >= end {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The appliance's reactor cores: `appliance_cores`, else `core`.
fn appliance_cores(s: &Spec) -> Vec<usize> {
    if s.appliance_cores.is_empty() { vec![s.core] } else { s.appliance_cores.clone() }
}

fn appliance_config(s: &Spec, sock: &Path) -> String {
    let cores: Vec<String> = appliance_cores(s).iter().map(usize::to_string).collect();
    let disk = if s.kind == Kind::Null {
        format!("driver = \"null\"\nsize = {}\n", s.null_size)
    } else {
        format!(
            "path = {}\nformat = \"{}\"\ndriver = \"io_uring\"\n",
            crate::toml_str(&s.image.to_string_lossy()),
            s.format.name()
        )
    };
    format!(
        "[appliance]\ncores = [{}]\nidle = {}\n\n[nbd]\nlisten = [{}]\n\n[[disk]]\nname = \"d\"\n{disk}",
        cores.join(", "),
        crate::toml_str(&s.appliance_idle),
        crate::toml_str(&format!("unix:{}", sock.display())),
    )
}

/// The command that starts the server of `s` listening on `sock`.
pub fn command(s: &Spec, sock: &Path) -> Result<Command, String> {
    let mut c = Command::new("taskset");
    let cpus = if s.kind.is_appliance() {
        appliance_cores(s).iter().map(usize::to_string).collect::<Vec<_>>().join(",")
    } else {
        s.core.to_string()
    };
    c.args(["-c", &cpus]);
    let img = s.image.to_string_lossy().to_string();
    if img.contains(',') {
        return Err(format!("image path {img:?} contains a comma (QEMU option syntax)"));
    }
    match s.kind {
        Kind::Appliance | Kind::Null => {
            let cfg = s.dir.join("appliance.toml");
            std::fs::write(&cfg, appliance_config(s, sock))
                .map_err(|e| format!("{}: {e}", cfg.display()))?;
            c.arg(&s.appliance_bin).args(["serve", "--config"]).arg(&cfg);
            c.env("APPLIANCE_LOG", "warn");
            if s.appliance_delay_us > 0 {
                c.env("APPLIANCE_DEBUG_DELAY_US", s.appliance_delay_us.to_string());
            } else {
                c.env_remove("APPLIANCE_DEBUG_DELAY_US");
            }
        }
        Kind::Qsd => {
            c.arg("qemu-storage-daemon").arg("--blockdev").arg(format!(
                "driver=file,node-name=f,filename={img},cache.direct=on,aio=io_uring"
            ));
            let node = match s.format {
                Format::Raw => "f",
                Format::Qcow2 => {
                    c.arg("--blockdev").arg("driver=qcow2,node-name=q,file=f");
                    "q"
                }
            };
            c.arg("--nbd-server")
                .arg(format!("addr.type=unix,addr.path={}", sock.display()))
                .arg("--export")
                .arg(format!("type=nbd,id=e,node-name={node},name=d,writable=on"));
        }
        Kind::QemuNbd => {
            c.arg("qemu-nbd")
                .args(["--cache=none", "--aio=io_uring", "-f", s.format.name(), "-k"])
                .arg(sock)
                .args(["-x", "d", "--persistent", "--shared=8"])
                .arg(&s.image);
        }
        Kind::Device | Kind::DeviceClientCore => {
            return Err("the device is not a server".into());
        }
    }
    Ok(c)
}

impl Server {
    /// Starts the server and waits until its socket accepts connections.
    pub fn start(s: &Spec) -> Result<Server, String> {
        std::fs::create_dir_all(&s.dir).map_err(|e| format!("{}: {e}", s.dir.display()))?;
        let sock = s.dir.join("nbd.sock");
        let _ = std::fs::remove_file(&sock);
        let log = s.dir.join(format!("{}.log", s.kind.name()));
        let logf = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let logf2 = logf.try_clone().map_err(|e| e.to_string())?;
        let mut cmd = command(s, &sock)?;
        cmd.stdin(Stdio::null()).stdout(logf).stderr(logf2);
        die_with_parent(&mut cmd);
        let child = cmd.spawn().map_err(|e| format!("cannot start {}: {e}", s.kind.name()))?;
        let mut server = Server { child: Some(child), kind: s.kind, sock, log };
        server.wait_listening(Duration::from_secs(20))?;
        Ok(server)
    }

    fn wait_listening(&mut self, limit: Duration) -> Result<(), String> {
        let end = Instant::now() + limit;
        loop {
            if let Some(st) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                return Err(format!(
                    "{} exited ({st}) before listening: {}",
                    self.kind.name(),
                    log_tail(&self.log)
                ));
            }
            if self.sock.exists() && UnixStream::connect(&self.sock).is_ok() {
                return Ok(());
            }
            if Instant::now() >= end {
                return Err(format!("{} did not listen within {limit:?}", self.kind.name()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The export's NBD URI.
    pub fn uri(&self) -> String {
        format!("nbd+unix:///d?socket={}", self.sock.display())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// CPU time (user + system, every thread) the server has used so far.
    pub fn cpu_time(&self) -> Option<Duration> {
        let pid = self.pid()?;
        proc_cpu_time(pid)
    }

    /// Stops the server with SIGTERM (SIGKILL after `grace`); errors if it had died or
    /// exits with a failure.
    pub fn stop(mut self, grace: Duration) -> Result<(), String> {
        let Some(mut child) = self.child.take() else {
            return Err(format!("{} was not running", self.kind.name()));
        };
        if let Some(st) = child.try_wait().map_err(|e| e.to_string())? {
            return Err(format!(
                "{} died during the run ({st}): {}",
                self.kind.name(),
                log_tail(&self.log)
            ));
        }
        // SAFETY: kill(2) on the pid of our own, not yet reaped child.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        match wait_timeout(&mut child, grace).map_err(|e| e.to_string())? {
            Some(st) if st.success() || st.code().is_none() => Ok(()),
            Some(st) => {
                Err(format!("{} exited with {st}: {}", self.kind.name(), log_tail(&self.log)))
            }
            None => {
                let _ = child.kill();
                let _ = child.wait();
                Err(format!("{} ignored SIGTERM for {grace:?}; killed", self.kind.name()))
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// utime + stime of a process (all its threads) from `/proc/PID/stat`.
pub fn proc_cpu_time(pid: u32) -> Option<Duration> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces: fields start after the last ')'.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state is field 3; utime 14 and stime 15 are at 11 and 12 here.
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(Duration::from_nanos(ticks * 1_000_000_000 / hz))
}

fn log_tail(p: &Path) -> String {
    let s = std::fs::read_to_string(p).unwrap_or_default();
    let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
    let t = lines[lines.len().saturating_sub(4)..].join(" | ");
    if t.is_empty() { format!("(empty log {})", p.display()) } else { t }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_cpu_time_is_readable() {
        let t = proc_cpu_time(std::process::id());
        assert!(t.is_some());
    }

    fn spec(kind: Kind, format: Format, image: &str) -> Spec {
        Spec {
            kind,
            format,
            image: image.into(),
            dir: "/d".into(),
            core: 0,
            appliance_cores: vec![],
            appliance_bin: "/bin/false".into(),
            appliance_idle: "busy".into(),
            appliance_delay_us: 0,
            null_size: 2 << 30,
        }
    }

    #[test]
    fn qsd_command_line() {
        let s = spec(Kind::Qsd, Format::Qcow2, "/i/img.qcow2");
        let c = command(&s, Path::new("/d/nbd.sock")).unwrap();
        let args: Vec<String> = c.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        assert!(args.contains(&"driver=qcow2,node-name=q,file=f".to_string()), "{args:?}");
        assert!(args.contains(&"type=nbd,id=e,node-name=q,name=d,writable=on".to_string()));
    }

    #[test]
    fn null_ceiling_is_a_valid_appliance_config() {
        let s = spec(Kind::Null, Format::Raw, "/unused");
        let text = appliance_config(&s, Path::new("/d/nbd.sock"));
        let c = config::Config::parse(&text, "null.toml", Path::new("/")).expect(&text);
        assert_eq!(c.disks.len(), 1);
        assert_eq!(c.disks[0].size, Some(2 << 30), "{text}");
        assert!(!text.contains("/unused"), "a null disk opens no image: {text}");
        assert!(!Kind::Null.per_format() && !Kind::Device.per_format());
        assert!(Kind::Appliance.per_format() && Kind::Qsd.per_format());
    }
}
