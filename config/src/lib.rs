//! The appliance's configuration: one TOML file, parsed into raw serde structs that
//! reject unknown keys, then validated into an immutable [`Config`].
//!
//! Design:
//! - Parsing and validation are separate steps. Parsing (serde + `toml`) catches syntax
//!   errors, wrong types and unknown keys; `toml` reports those with the key's name,
//!   line and column. Validation catches what a schema cannot express (duplicate disk
//!   names, missing image files, cores this process may not run on, two listeners on one
//!   socket) and reports the key, line and column itself, from spans kept during parsing.
//! - Relative paths are resolved against the directory of the config file, so a config
//!   file and its images can move together.
//! - The validated [`Config`] is plain data; nothing downstream re-parses or re-checks it.

mod raw;
mod rbd;
mod render;
mod security;
mod size;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use rbd::{DEFAULT_CEPH_CONF, DEFAULT_RBD_TIMEOUT, RbdCluster, RbdImage};

pub use security::{DEFAULT_SOCKET_MODE, SocketPerms, TlsFiles};
pub use size::{ByteSize, parse_byte_size};

/// Where the configuration came from, for error messages.
const BUILT_IN: &str = "<built-in quick-start config>";

/// The longest export name the NBD protocol allows (NetworkBlockDevice proto.md).
pub const NBD_MAX_NAME_BYTES: usize = 4096;

/// The default size of each reactor's DMA buffer pool.
pub const DEFAULT_BUFFER_POOL_BYTES: u64 = 128 << 20;

/// A validated, immutable configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file this came from, or `None` for the built-in quick-start.
    pub source: Option<PathBuf>,
    pub appliance: Appliance,
    pub nbd: Option<Nbd>,
    /// `[metrics]`: the Prometheus endpoint.
    pub metrics: Option<SocketAddr>,
    /// `[control]`: the control socket.
    pub control: Option<Control>,
    pub disks: Vec<Disk>,
}

/// `[disk.qos]`: limits across all exports and connections of a disk. Zero means
/// unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Qos {
    pub iops: u64,
    /// Bytes per second.
    pub bandwidth: u64,
    /// Seconds of unused budget a disk may save up (bucket depth).
    pub burst: f64,
}

/// The default QoS burst: a tenth of a second.
pub const DEFAULT_QOS_BURST: f64 = 0.1;

/// Parses a bandwidth such as `"200MiB/s"` (the `/s` is optional) into bytes/second.
pub fn parse_bandwidth(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t.strip_suffix("/s").or_else(|| t.strip_suffix("ps")).unwrap_or(t);
    parse_byte_size(t).map_err(|e| format!("bandwidth {e}"))
}

/// `[appliance]`: process-wide settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Appliance {
    /// CPU ids, one reactor pinned to each, in order.
    pub cores: Vec<usize>,
    pub idle: IdlePolicy,
    pub hugepages: Hugepages,
    /// Bytes of DMA buffer memory per reactor.
    pub buffer_pool_bytes: u64,
    /// Where the appliance keeps state across restarts (the journal of running block
    /// jobs); `None`: nowhere.
    pub state_dir: Option<PathBuf>,
}

/// What a reactor does when it finds no work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdlePolicy {
    /// Spin: lowest latency, one full core per reactor.
    Busy,
    /// Spin for a short while, then sleep until work arrives.
    Adaptive,
}

/// Whether DMA buffers are backed by hugepages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hugepages {
    /// Use reserved hugepages when there are enough, ordinary memory otherwise.
    Auto,
    /// Require hugepages; start-up fails without them.
    On,
    Off,
}

/// `[control]`: the control socket and what may be named through it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Control {
    pub socket: PathBuf,
    pub perms: SocketPerms,
    /// Directories that file targets named over the socket (mirror) must lie in;
    /// empty: the source disk's own directory.
    pub allowed_target_dirs: Vec<PathBuf>,
}

/// `[nbd]`: the NBD export.
#[derive(Debug, Clone, PartialEq)]
pub struct Nbd {
    pub listen: Vec<ListenAddr>,
    /// Connections each listener accepts at once; more are refused politely.
    pub max_connections: u32,
    /// A connection with no request for this long is closed (`None`: never).
    pub idle_timeout: Option<Duration>,
    /// A connection that makes no progress for this long while the server waits on
    /// the client (a partial request, replies it does not read) is closed; one that
    /// holds buffers another request on its reactor waits for, after at most 2 s.
    pub stall_timeout: Duration,
    /// How connections move bytes once their handshake is done.
    pub socket_io: SocketIo,
    /// Whether large replies on TCP connections are sent without copying.
    pub zero_copy_send: ZeroCopySend,
    /// Whether connections on the ring receive with one multishot receive into
    /// buffers of their own (`"on"`, where the kernel has it) or one receive per read
    /// (`"off"`, the default: faster on this project's measurements).
    pub multishot_receive: bool,
    /// Owner and mode of the unix listeners.
    pub socket_perms: SocketPerms,
    /// `[nbd.tls]`: every listener requires TLS (with client certificates when `ca`
    /// is set).
    pub tls: Option<TlsFiles>,
    /// `[nbd.client_tls]`: credentials of the appliance's own NBD client for
    /// `nbds://` and `nbds+unix://` targets.
    pub client_tls: Option<TlsFiles>,
}

/// `nbd.socket_io`: the system calls behind a connection's receives and sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketIo {
    /// io_uring where the kernel supports socket operations on it, else epoll.
    Auto,
    /// Receives and sends on the reactor's io_uring ring, batched with its disk I/O.
    IoUring,
    /// Readiness from epoll, then one `read` or `sendmsg` per operation.
    Epoll,
}

/// `nbd.zero_copy_send`: read replies sent from their buffers, without copying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroCopySend {
    /// On TCP connections on the ring, for sends of 32 KiB of payload or more, until
    /// the kernel reports that it copied anyway (a loopback peer).
    Auto,
    /// As `auto`, but kept even where the kernel copies (for tests of the path).
    Always,
    /// Every reply copied into the socket.
    Off,
}

impl ZeroCopySend {
    pub fn name(self) -> &'static str {
        match self {
            ZeroCopySend::Auto => "auto",
            ZeroCopySend::Always => "always",
            ZeroCopySend::Off => "off",
        }
    }
}

impl SocketIo {
    pub fn name(self) -> &'static str {
        match self {
            SocketIo::Auto => "auto",
            SocketIo::IoUring => "io_uring",
            SocketIo::Epoll => "epoll",
        }
    }
}

/// Default of `nbd.max_connections`.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 1024;
/// Default of `nbd.stall_timeout`.
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// A socket the appliance listens on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ListenAddr {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            ListenAddr::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

impl ListenAddr {
    /// Parses `unix:/path` or `tcp:host:port`.
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("`unix:` needs a socket path".into());
            }
            Ok(ListenAddr::Unix(PathBuf::from(path)))
        } else if let Some(addr) = s.strip_prefix("tcp:") {
            addr.parse::<SocketAddr>().map(ListenAddr::Tcp).map_err(|e| {
                format!("`{addr}` is not an IP address and port (such as 127.0.0.1:10809): {e}")
            })
        } else {
            Err(format!("`{s}` must start with `unix:` or `tcp:`"))
        }
    }
}

/// The image format of a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Raw,
    Qcow2,
}

/// The I/O driver under a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    IoUring,
    Aio,
    /// Completes every request at once without touching memory (a stack ceiling).
    Null,
    /// A RAM disk.
    Mem,
    /// An export of an NBD server (`path` is its URI): raw format.
    Nbd,
    /// An NVMe namespace's generic character device (`/dev/ngXnY`), driven with NVMe
    /// commands through io_uring passthrough.
    NvmeUring,
    /// A namespace of an NVMe controller driven from userspace over VFIO (`path` is
    /// `pci:ADDRESS[/ns=N]`).
    Nvme,
    /// An image in a Ceph cluster, through librbd (`path` is `rbd:POOL[/NS]/IMAGE`).
    Rbd,
}

impl Driver {
    /// Whether this driver stores data in a file named by `path`.
    pub fn uses_file(self) -> bool {
        matches!(self, Driver::IoUring | Driver::Aio | Driver::NvmeUring)
    }

    pub fn name(self) -> &'static str {
        match self {
            Driver::IoUring => "io_uring",
            Driver::Aio => "aio",
            Driver::Null => "null",
            Driver::Mem => "mem",
            Driver::Nbd => "nbd",
            Driver::NvmeUring => "nvme_uring",
            Driver::Nvme => "nvme",
            Driver::Rbd => "rbd",
        }
    }
}

/// `[[disk]]`: one image and how it is served.
#[derive(Debug, Clone, PartialEq)]
pub struct Disk {
    /// Unique name; also the NBD export name.
    pub name: String,
    /// The image file (absolute after validation); `None` for `null` and `mem`.
    pub path: Option<PathBuf>,
    pub format: Format,
    pub driver: Driver,
    /// Open with O_DIRECT and probed alignment.
    pub direct: bool,
    pub read_only: bool,
    /// Size of a `null` or `mem` disk.
    pub size: Option<u64>,
    /// Directories a qcow2 image may name backing files in. Defaults to the image's own.
    pub allowed_backing_dirs: Vec<PathBuf>,
    /// Bytes of qcow2 L2 cache; `None` picks a size that covers the image within a budget.
    pub l2_cache_bytes: Option<u64>,
    /// Bytes of qcow2 refcount-block cache; `None` picks a default.
    pub refcount_cache_bytes: Option<u64>,
    /// Shards a qcow2 image is split over (one per reactor, from the first); `None`:
    /// every reactor.
    pub shards: Option<usize>,
    /// The vhost-user-blk export of this disk, if any.
    pub vhost_user_blk: Option<VhostUserBlk>,
    /// Limits; `None` means unlimited.
    pub qos: Option<Qos>,
    /// `[disk.nbd] allow`: the client certificate common names that may open this
    /// export over NBD; `None`: every client the listener admits.
    pub nbd_allow: Option<Vec<String>>,
    /// `[disk.encryption] key_file`: the file holding the key of a LUKS-encrypted
    /// qcow2 image (its whole content, as QEMU's `secret` object with `file=`).
    pub encryption_key_file: Option<PathBuf>,
    /// `[disk.rbd]`: how an RBD disk reaches its cluster (`Some` for driver rbd only).
    pub rbd: Option<RbdCluster>,
}

/// `[disk.vhost_user_blk]`: a vhost-user-blk socket for a hypervisor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhostUserBlk {
    pub socket: PathBuf,
    pub perms: SocketPerms,
    /// Virtqueues offered (spread over the reactors).
    pub queues: u16,
}

/// The most shards a qcow2 image is split over.
pub const MAX_SHARDS: usize = 64;

/// The most virtqueues a vhost-user-blk export offers.
pub const MAX_VHOST_QUEUES: u16 = 64;

/// A configuration error. Every variant names the file, and, where it applies, the key,
/// line and column.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read the config file: {source}")]
    Read { file: String, source: std::io::Error },
    #[error("{file}: {message}")]
    Parse { file: String, message: String },
    #[error("{file}:{line}:{column}: `{key}`: {message}")]
    Invalid { file: String, line: usize, column: usize, key: String, message: String },
}

impl ConfigError {
    /// The key the error is about, when it is about one key.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { key, .. } => Some(key),
            _ => None,
        }
    }
}

/// The quick-start configuration used by `appliance serve` without `--config`.
/// Paths are relative to the working directory.
pub const QUICK_START: &str = r#"
[appliance]
idle = "adaptive"
state_dir = "appliance-data"

[nbd]
listen = ["unix:appliance-data/nbd.sock", "tcp:127.0.0.1:10809"]

[control]
socket = "appliance-data/control.sock"

[[disk]]
name = "demo"
path = "appliance-data/demo.qcow2"
format = "qcow2"
"#;

impl Config {
    /// Loads and validates a config file, including that every image file and
    /// allowed backing directory exists (`check-config`).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::load_with(path, true)
    }

    /// Loads and validates a config file for `serve`: whether image files exist is
    /// left to opening each disk, so a missing image fails only its own disk (which is
    /// then reported and listed as failed) instead of the whole appliance.
    pub fn load_for_serving(path: &Path) -> Result<Config, ConfigError> {
        Self::load_with(path, false)
    }

    fn load_with(path: &Path, require_files: bool) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { file: file.clone(), source })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let base = if base.as_os_str().is_empty() { PathBuf::from(".") } else { base };
        let ctx = Validator { file, text, base, require_files };
        let mut config = ctx.run()?;
        config.source = Some(path.to_path_buf());
        Ok(config)
    }

    /// Parses the built-in quick-start config, with paths relative to `base`.
    /// The demo image need not exist yet: the caller creates it.
    pub fn quick_start(base: &Path) -> Result<Config, ConfigError> {
        let ctx = Validator {
            file: BUILT_IN.to_string(),
            text: QUICK_START.to_string(),
            base: base.to_path_buf(),
            require_files: false,
        };
        ctx.run()
    }

    /// Parses and validates config text. `file` names it in errors; relative paths are
    /// resolved against `base`.
    pub fn parse(text: &str, file: &str, base: &Path) -> Result<Config, ConfigError> {
        let ctx = Validator {
            file: file.to_string(),
            text: text.to_string(),
            base: base.to_path_buf(),
            require_files: true,
        };
        ctx.run()
    }

    /// Parses and validates config text like [`Config::parse`], leaving whether image
    /// files exist to the caller (as `serve` does; the fuzz target uses it so input
    /// text never makes it probe the file system).
    pub fn parse_lenient(text: &str, file: &str, base: &Path) -> Result<Config, ConfigError> {
        let ctx = Validator {
            file: file.to_string(),
            text: text.to_string(),
            base: base.to_path_buf(),
            require_files: false,
        };
        ctx.run()
    }

    /// Looks a disk up by name.
    pub fn disk(&self, name: &str) -> Option<&Disk> {
        self.disks.iter().find(|d| d.name == name)
    }
}

/// Turns raw, parsed structs into a [`Config`], checking what serde cannot.
struct Validator {
    file: String,
    text: String,
    base: PathBuf,
    require_files: bool,
}

impl Validator {
    fn run(self) -> Result<Config, ConfigError> {
        let raw: raw::RawConfig = toml::from_str(&self.text)
            .map_err(|e| ConfigError::Parse { file: self.file.clone(), message: e.to_string() })?;
        let appliance = self.appliance(raw.appliance)?;
        let nbd = raw.nbd.map(|n| self.nbd(n)).transpose()?;
        let metrics = match raw.metrics {
            None => None,
            Some(m) => {
                let span = m.listen.span();
                let v = m.listen.into_inner();
                Some(v.parse::<SocketAddr>().map_err(|e| {
                    self.err(
                        span,
                        "metrics.listen",
                        format!(
                            "`{v}` is not an IP address and port (such as 127.0.0.1:9100): {e}"
                        ),
                    )
                })?)
            }
        };
        let control = match raw.control {
            None => None,
            Some(mut c) => {
                let span = c.socket.span();
                let p = self.resolve(c.socket.get_ref());
                if nbd.as_ref().is_some_and(|n| n.listen.contains(&ListenAddr::Unix(p.clone()))) {
                    return Err(self.err(
                        span,
                        "control.socket",
                        format!("{} is also an NBD listener", p.display()),
                    ));
                }
                let perms = self.socket_perms(c.perms(), "control.")?;
                let allowed_target_dirs = self.target_dirs(c.allowed_target_dirs.take())?;
                Some(Control { socket: p, perms, allowed_target_dirs })
            }
        };
        let mut disks: Vec<Disk> = Vec::with_capacity(raw.disk.len());
        for (index, d) in raw.disk.into_iter().enumerate() {
            let disk = self.disk(index, d, &disks, nbd.as_ref())?;
            if let (Some(v), Some(n)) = (&disk.vhost_user_blk, &nbd)
                && n.listen.contains(&ListenAddr::Unix(v.socket.clone()))
            {
                return Err(self.err(
                    0..0,
                    &format!("disk[{index}].vhost_user_blk.socket"),
                    format!("{} is also an NBD listener", v.socket.display()),
                ));
            }
            disks.push(disk);
        }
        if let Some(c) = &control
            && disks.iter().any(|d| d.vhost_user_blk.as_ref().is_some_and(|v| v.socket == c.socket))
        {
            return Err(self.err(
                0..0,
                "control.socket",
                format!("{} is also a vhost-user socket", c.socket.display()),
            ));
        }
        Ok(Config { source: None, appliance, nbd, metrics, control, disks })
    }

    fn err(&self, span: std::ops::Range<usize>, key: &str, message: String) -> ConfigError {
        let (line, column) = line_column(&self.text, span.start);
        ConfigError::Invalid { file: self.file.clone(), line, column, key: key.into(), message }
    }

    /// The value named by a string key that takes one of `choices` (the first when
    /// the key is absent), or an error that lists them.
    fn choice<T: Copy>(
        &self,
        v: Option<&toml::Spanned<String>>,
        key: &str,
        choices: &[(&str, T)],
    ) -> Result<T, ConfigError> {
        let Some(v) = v else { return Ok(choices[0].1) };
        if let Some(&(_, c)) = choices.iter().find(|(name, _)| *name == v.get_ref().as_str()) {
            return Ok(c);
        }
        let names: Vec<String> = choices.iter().map(|(n, _)| format!("\"{n}\"")).collect();
        let m = format!("`{}`: use {}", v.get_ref(), names.join(", "));
        Err(self.err(v.span(), key, m))
    }

    fn resolve(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() { p.to_path_buf() } else { self.base.join(p) }
    }

    fn appliance(&self, raw: Option<raw::RawAppliance>) -> Result<Appliance, ConfigError> {
        let raw = raw.unwrap_or_default();
        let allowed = allowed_cpus();
        let cores = match raw.cores {
            None => allowed.clone(),
            Some(spanned) => {
                let span = spanned.span();
                let cores = spanned.into_inner();
                if cores.is_empty() {
                    return Err(self.err(
                        span,
                        "appliance.cores",
                        "needs at least one core".into(),
                    ));
                }
                for (i, c) in cores.iter().enumerate() {
                    if cores[..i].contains(c) {
                        return Err(self.err(
                            span,
                            "appliance.cores",
                            format!("core {c} is listed twice"),
                        ));
                    }
                    if !allowed.contains(c) {
                        return Err(self.err(
                            span,
                            "appliance.cores",
                            format!(
                                "core {c} is not online or not allowed for this process \
                                 (allowed: {allowed:?})"
                            ),
                        ));
                    }
                }
                cores
            }
        };
        let idle = match raw.idle.as_ref().map(|s| s.get_ref().as_str()) {
            None | Some("adaptive") => IdlePolicy::Adaptive,
            Some("busy") => IdlePolicy::Busy,
            Some(other) => {
                let span = raw.idle.as_ref().map_or(0..0, |s| s.span());
                return Err(self.err(
                    span,
                    "appliance.idle",
                    format!("`{other}` is not an idle policy; use \"busy\" or \"adaptive\""),
                ));
            }
        };
        let hugepages_span = raw.hugepages.as_ref().map_or(0..0, |s| s.span());
        let hugepages = match raw.hugepages.map(|s| s.into_inner()) {
            None => Hugepages::Auto,
            Some(raw::RawHugepages::Bool(true)) => Hugepages::On,
            Some(raw::RawHugepages::Bool(false)) => Hugepages::Off,
            Some(raw::RawHugepages::Text(t)) if t == "auto" => Hugepages::Auto,
            Some(raw::RawHugepages::Text(t)) => {
                return Err(self.err(
                    hugepages_span,
                    "appliance.hugepages",
                    format!("`{t}` is not allowed; use \"auto\", true or false"),
                ));
            }
        };
        let buffer_pool_bytes = match raw.buffer_pool {
            None => DEFAULT_BUFFER_POOL_BYTES,
            Some(s) => {
                let span = s.span();
                let v = s.into_inner().bytes();
                if !(4 << 20..=64 << 30).contains(&v) || !v.is_power_of_two() {
                    return Err(self.err(
                        span,
                        "appliance.buffer_pool",
                        format!("{v} bytes: must be a power of two from 4MiB to 64GiB"),
                    ));
                }
                v
            }
        };
        let state_dir = raw.state_dir.map(|s| self.resolve(s.get_ref()));
        Ok(Appliance { cores, idle, hugepages, buffer_pool_bytes, state_dir })
    }

    fn nbd(&self, mut raw: raw::RawNbd) -> Result<Nbd, ConfigError> {
        let socket_perms = self.socket_perms(raw.perms(), "nbd.socket_")?;
        let mut listen: Vec<ListenAddr> = Vec::new();
        for item in raw.listen {
            let span = item.span();
            let addr = ListenAddr::parse(item.get_ref())
                .map_err(|m| self.err(span.clone(), "nbd.listen", m))?;
            let addr = match addr {
                ListenAddr::Unix(p) => ListenAddr::Unix(self.resolve(&p.to_string_lossy())),
                tcp => tcp,
            };
            if listen.contains(&addr) {
                return Err(self.err(span, "nbd.listen", format!("{addr} is listed twice")));
            }
            listen.push(addr);
        }
        if listen.is_empty() {
            return Err(self.err(0..0, "nbd.listen", "needs at least one address".into()));
        }
        let max_connections = match raw.max_connections {
            None => DEFAULT_MAX_CONNECTIONS,
            Some(v) => {
                let span = v.span();
                match u32::try_from(v.into_inner()) {
                    Ok(n) if (1..=65536).contains(&n) => n,
                    _ => {
                        let m = "must be 1 to 65536".to_string();
                        return Err(self.err(span, "nbd.max_connections", m));
                    }
                }
            }
        };
        let seconds = |v: Option<toml::Spanned<f64>>,
                       key: &str,
                       min: f64|
         -> Result<Option<Duration>, ConfigError> {
            let Some(v) = v else { return Ok(None) };
            let span = v.span();
            let s = v.into_inner();
            if !(min..=86400.0).contains(&s) {
                return Err(self.err(span, key, format!("{s}: must be {min} to 86400 seconds")));
            }
            Ok((s > 0.0).then(|| Duration::from_secs_f64(s)))
        };
        let idle_timeout = seconds(raw.idle_timeout, "nbd.idle_timeout", 0.0)?;
        let stall_timeout =
            seconds(raw.stall_timeout, "nbd.stall_timeout", 0.1)?.unwrap_or(DEFAULT_STALL_TIMEOUT);
        use {SocketIo as S, ZeroCopySend as Z};
        let io_choices = [("auto", S::Auto), ("io_uring", S::IoUring), ("epoll", S::Epoll)];
        let socket_io = self.choice(raw.socket_io.as_ref(), "nbd.socket_io", &io_choices)?;
        let zc_choices = [("auto", Z::Auto), ("always", Z::Always), ("off", Z::Off)];
        let zero_copy_send =
            self.choice(raw.zero_copy_send.as_ref(), "nbd.zero_copy_send", &zc_choices)?;
        let ms_choices = [("off", false), ("on", true)];
        let multishot_receive =
            self.choice(raw.multishot_receive.as_ref(), "nbd.multishot_receive", &ms_choices)?;
        let tls = raw.tls.map(|t| self.tls_files(t, "nbd.tls", false)).transpose()?;
        let client_tls =
            raw.client_tls.map(|t| self.tls_files(t, "nbd.client_tls", true)).transpose()?;
        Ok(Nbd {
            listen,
            max_connections,
            idle_timeout,
            stall_timeout,
            socket_io,
            zero_copy_send,
            multishot_receive,
            socket_perms,
            tls,
            client_tls,
        })
    }

    /// The URI of a disk served from an NBD export (`driver = "nbd"`):
    /// `nbd://HOST[:PORT]/NAME` or `nbd+unix:///NAME?socket=PATH` (or their TLS forms
    /// `nbds://`, `nbds+unix://`), kept as written.
    fn nbd_uri(
        &self,
        name_span: std::ops::Range<usize>,
        path: Option<toml::Spanned<String>>,
        key: &dyn Fn(&str) -> String,
    ) -> Result<PathBuf, ConfigError> {
        let Some(p) = path else {
            let m = "driver nbd needs `path`: the export's URI (nbd://HOST/NAME or nbd+unix:///NAME?socket=PATH)";
            return Err(self.err(name_span, &key("path"), m.into()));
        };
        let uri = p.get_ref();
        let schemes = ["nbd://", "nbd+unix://", "nbds://", "nbds+unix://"];
        if !schemes.iter().any(|s| uri.starts_with(s)) {
            let m = format!("`{uri}` is not an nbd://, nbd+unix://, nbds:// or nbds+unix:// URI");
            return Err(self.err(p.span(), &key("path"), m));
        }
        Ok(PathBuf::from(uri))
    }

    /// The PCI address of an NVMe controller (`driver = "nvme"`):
    /// `pci:DOMAIN:BUS:DEVICE.FUNCTION[/ns=N]`, kept as written.
    fn pci_path(
        &self,
        name_span: std::ops::Range<usize>,
        path: Option<toml::Spanned<String>>,
        key: &dyn Fn(&str) -> String,
    ) -> Result<PathBuf, ConfigError> {
        let Some(p) = path else {
            let m = "driver nvme needs `path`: the controller's PCI address, such as \"pci:0000:00:04.0\" (or \"pci:0000:00:04.0/ns=2\")";
            return Err(self.err(name_span, &key("path"), m.into()));
        };
        let v = p.get_ref();
        let addr = v.strip_prefix("pci:").map(|r| r.split_once("/ns=").map_or(r, |(a, _)| a));
        let ns_ok = v.split_once("/ns=").is_none_or(|(_, n)| n.parse::<u32>().is_ok_and(|n| n > 0));
        let addr_ok = addr.is_some_and(|a| {
            a.len() == 12 && a.chars().all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.')
        });
        if !(addr_ok && ns_ok) {
            let m = format!(
                "`{v}` is not pci:DOMAIN:BUS:DEVICE.FUNCTION[/ns=N] (such as pci:0000:00:04.0)"
            );
            return Err(self.err(p.span(), &key("path"), m));
        }
        Ok(PathBuf::from(v))
    }

    fn disk(
        &self,
        index: usize,
        mut raw: raw::RawDisk,
        earlier: &[Disk],
        nbd: Option<&Nbd>,
    ) -> Result<Disk, ConfigError> {
        let key = |k: &str| format!("disk[{index}].{k}");
        let name_span = raw.name.span();
        let name = raw.name.into_inner();
        if name.is_empty() || name.len() > NBD_MAX_NAME_BYTES {
            return Err(self.err(
                name_span,
                &key("name"),
                format!("must be 1 to {NBD_MAX_NAME_BYTES} bytes long"),
            ));
        }
        if name.chars().any(|c| c.is_control()) {
            return Err(self.err(
                name_span,
                &key("name"),
                "must not hold control characters".into(),
            ));
        }
        if earlier.iter().any(|d| d.name == name) {
            return Err(self.err(
                name_span,
                &key("name"),
                format!("a disk named `{name}` is already defined"),
            ));
        }
        let format = match raw.format.as_ref().map(|s| s.get_ref().as_str()) {
            None | Some("raw") => Format::Raw,
            Some("qcow2") => Format::Qcow2,
            Some(other) => {
                return Err(self.err(
                    raw.format.as_ref().map(|s| s.span()).unwrap_or(name_span),
                    &key("format"),
                    format!("`{other}` is not a format; use \"raw\" or \"qcow2\""),
                ));
            }
        };
        let driver = match raw.driver.as_ref().map(|s| s.get_ref().as_str()) {
            None | Some("io_uring") => Driver::IoUring,
            Some("aio") => Driver::Aio,
            Some("null") => Driver::Null,
            Some("mem") => Driver::Mem,
            Some("nbd") => Driver::Nbd,
            Some("nvme_uring") => Driver::NvmeUring,
            Some("nvme") => Driver::Nvme,
            Some("rbd") => Driver::Rbd,
            Some(other) => {
                return Err(self.err(
                    raw.driver.as_ref().map(|s| s.span()).unwrap_or(name_span),
                    &key("driver"),
                    format!(
                        "`{other}` is not a driver; use \"io_uring\", \"aio\", \"null\", \"mem\", \"nbd\", \"nvme_uring\", \"nvme\" or \"rbd\""
                    ),
                ));
            }
        };
        let size = raw.size.map(|s| (s.span(), s.into_inner().bytes()));
        let path = match (driver.uses_file(), raw.path) {
            (_, p) if driver == Driver::Nbd => Some(self.nbd_uri(name_span.clone(), p, &key)?),
            (_, p) if driver == Driver::Nvme => Some(self.pci_path(name_span.clone(), p, &key)?),
            (_, p) if driver == Driver::Rbd => Some(self.rbd_path(name_span.clone(), p, &key)?),
            (true, None) => {
                return Err(self.err(
                    name_span,
                    &key("path"),
                    format!("disk `{name}` needs a `path` (driver {})", driver.name()),
                ));
            }
            (false, Some(p)) => {
                return Err(self.err(
                    p.span(),
                    &key("path"),
                    format!("driver {} keeps no file; remove `path` and set `size`", driver.name()),
                ));
            }
            (false, None) => None,
            (true, Some(p)) => {
                let span = p.span();
                let resolved = self.resolve(p.get_ref());
                if self.require_files {
                    self.check_image_file(&resolved, driver, span, &key("path"))?;
                }
                Some(resolved)
            }
        };
        let size = match (
            driver.uses_file() || matches!(driver, Driver::Nbd | Driver::Nvme | Driver::Rbd),
            size,
        ) {
            (false, None) => {
                return Err(self.err(
                    name_span,
                    &key("size"),
                    format!("driver {} needs a `size`, such as \"1GiB\"", driver.name()),
                ));
            }
            (false, Some((span, v))) => {
                if v == 0 || v % 512 != 0 {
                    return Err(self.err(
                        span,
                        &key("size"),
                        format!("{v} bytes: must be a non-zero multiple of 512"),
                    ));
                }
                Some(v)
            }
            (true, Some((span, _))) => {
                return Err(self.err(
                    span,
                    &key("size"),
                    "the size of this disk is that of its image (or NBD export)".into(),
                ));
            }
            (true, None) => None,
        };
        if format == Format::Qcow2
            && !driver.uses_file()
            && !matches!(driver, Driver::Nvme | Driver::Rbd)
        {
            return Err(self.err(
                name_span,
                &key("format"),
                format!("qcow2 needs a file; driver {} keeps none", driver.name()),
            ));
        }
        let mut allowed_backing_dirs = Vec::new();
        for d in raw.allowed_backing_dirs.unwrap_or_default() {
            let span = d.span();
            let p = self.resolve(d.get_ref());
            if self.require_files && !p.is_dir() {
                return Err(self.err(
                    span,
                    &key("allowed_backing_dirs"),
                    format!("{} is not a directory", p.display()),
                ));
            }
            allowed_backing_dirs.push(p);
        }
        if allowed_backing_dirs.is_empty()
            && !matches!(driver, Driver::Nbd | Driver::Nvme | Driver::Rbd)
            && let Some(dir) = path.as_ref().and_then(|p| p.parent())
        {
            allowed_backing_dirs.push(dir.to_path_buf());
        }
        let l2_cache_bytes = raw.l2_cache.map(|s| s.into_inner().bytes());
        let refcount_cache_bytes = raw.refcount_cache.map(|s| s.into_inner().bytes());
        let shards = match raw.shards {
            None => None,
            Some(v) => {
                let span = v.span();
                let v = v.into_inner();
                if !(1..=MAX_SHARDS as i64).contains(&v) {
                    return Err(self.err(
                        span,
                        &key("shards"),
                        format!("{v}: must be 1 to {MAX_SHARDS} (more than the reactors means all of them)"),
                    ));
                }
                if format != Format::Qcow2 {
                    return Err(self.err(
                        span,
                        &key("shards"),
                        "only a qcow2 image is split into shards (a raw disk is served from every reactor as it is)".into(),
                    ));
                }
                Some(v as usize)
            }
        };
        let vhost_user_blk = match raw.vhost_user_blk {
            None => None,
            Some(v) => {
                let span = v.span();
                let mut v = v.into_inner();
                let perms = self.socket_perms(v.perms(), &key("vhost_user_blk."))?;
                let queues = match v.queues {
                    None => 1,
                    Some(q) => {
                        let qspan = q.span();
                        let q = q.into_inner();
                        if q == 0 || q > MAX_VHOST_QUEUES {
                            return Err(self.err(
                                qspan,
                                &key("vhost_user_blk.queues"),
                                format!("{q}: must be 1 to {MAX_VHOST_QUEUES}"),
                            ));
                        }
                        q
                    }
                };
                let socket = self.resolve(v.socket.get_ref());
                let clash = earlier
                    .iter()
                    .any(|d| d.vhost_user_blk.as_ref().is_some_and(|o| o.socket == socket));
                if clash {
                    return Err(self.err(
                        v.socket.span(),
                        &key("vhost_user_blk.socket"),
                        format!("{} is already another disk's vhost-user socket", socket.display()),
                    ));
                }
                let _ = span;
                Some(VhostUserBlk { socket, perms, queues })
            }
        };
        let nbd_allow = self.disk_allow(raw.nbd.take(), nbd, &key)?;
        let encryption_key_file = raw.encryption.take().map(|e| self.resolve(e.key_file.get_ref()));
        let rbd = self.disk_rbd(raw.rbd.take(), driver == Driver::Rbd, &key)?;
        let qos = match raw.qos {
            None => None,
            Some(q) => {
                let q = q.into_inner();
                let iops = q.iops.map_or(0, |v| v.into_inner());
                let bandwidth = match q.bandwidth {
                    None => 0,
                    Some(b) => {
                        let span = b.span();
                        parse_bandwidth(b.get_ref())
                            .map_err(|m| self.err(span, &key("qos.bandwidth"), m))?
                    }
                };
                let burst = match q.burst {
                    None => DEFAULT_QOS_BURST,
                    Some(b) => {
                        let span = b.span();
                        let v = b.into_inner();
                        if !(0.001..=60.0).contains(&v) {
                            return Err(self.err(
                                span,
                                &key("qos.burst"),
                                format!("{v}: must be 0.001 to 60 seconds"),
                            ));
                        }
                        v
                    }
                };
                Some(Qos { iops, bandwidth, burst })
            }
        };
        let direct = match raw.direct {
            // Meaningless without a file, and not rendered back: refused, as `size`
            // on a file disk is, so what the file says is what runs.
            Some(d) if !driver.uses_file() => {
                return Err(self.err(
                    d.span(),
                    &key("direct"),
                    format!(
                        "driver {} opens no file; `direct` (O_DIRECT) is for io_uring, aio \
                         and nvme_uring disks",
                        driver.name()
                    ),
                ));
            }
            Some(d) => d.into_inner(),
            None => driver.uses_file(),
        };
        Ok(Disk {
            name,
            path,
            format,
            driver,
            direct,
            read_only: raw.read_only.unwrap_or(false),
            size,
            allowed_backing_dirs,
            l2_cache_bytes,
            refcount_cache_bytes,
            shards,
            vhost_user_blk,
            qos,
            nbd_allow,
            encryption_key_file,
            rbd,
        })
    }

    /// `[disk.nbd] allow`, which needs client certificates to name anyone.
    fn disk_allow(
        &self,
        raw: Option<security::RawDiskNbd>,
        nbd: Option<&Nbd>,
        key: &dyn Fn(&str) -> String,
    ) -> Result<Option<Vec<String>>, ConfigError> {
        let Some(list) = raw.and_then(|n| n.allow) else { return Ok(None) };
        let span = list.first().map_or(0..0, |e| e.span());
        let names = self.allow_list(list, &key("nbd.allow"))?;
        if nbd.and_then(|n| n.tls.as_ref()).and_then(|t| t.ca.as_ref()).is_none() {
            let m = "needs [nbd.tls] with `ca`: only client certificates name a client";
            return Err(self.err(span, &key("nbd.allow"), m.into()));
        }
        Ok(Some(names))
    }

    fn check_image_file(
        &self,
        path: &Path,
        driver: Driver,
        span: std::ops::Range<usize>,
        key: &str,
    ) -> Result<(), ConfigError> {
        use std::os::unix::fs::FileTypeExt;
        match std::fs::metadata(path) {
            Err(e) => Err(self.err(span, key, format!("{}: {e}", path.display()))),
            Ok(m) if driver == Driver::NvmeUring => {
                if m.file_type().is_char_device() {
                    Ok(())
                } else {
                    Err(self.err(
                        span,
                        key,
                        format!(
                            "{} is not an NVMe generic character device (/dev/ngXnY); a file \
                             or block device is served by driver \"io_uring\"",
                            path.display()
                        ),
                    ))
                }
            }
            Ok(m) if m.is_file() || m.file_type().is_block_device() => Ok(()),
            Ok(_) => Err(self.err(
                span,
                key,
                format!("{} is neither a regular file nor a block device", path.display()),
            )),
        }
    }
}

/// Converts a byte offset into 1-based line and column.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rfind('\n').map_or(offset, |nl| offset - nl - 1) + 1;
    (line, column)
}

/// The CPUs this process may run on (its affinity mask), in ascending order.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; zeroed is a valid empty set, and
    // sched_getaffinity writes at most size_of::<cpu_set_t>() bytes into it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable cpu_set_t of the size passed.
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return vec![0];
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `set` is initialised and `i` is below CPU_SETSIZE.
        .filter(|&i| unsafe { libc::CPU_ISSET(i, &set) })
        .collect()
}

#[cfg(test)]
mod tests;
