//! Start-up and shutdown order of `appliance serve`.
//!
//! Start-up: load and validate the config (or build the quick-start one), open every
//! disk (probing alignment, reading image metadata) on the control thread, start the
//! reactors, then the exports; report readiness once every listener is bound.
//! Shutdown (SIGTERM or SIGINT): stop accepting, let connections finish what is in
//! flight, flush every disk, stop the reactors, exit 0.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use config::{Config, Hugepages, IdlePolicy, ListenAddr};
use drivers::Bdev;
use poller::{HugepageMode, ReactorOptions, Reactors};

use crate::nbd::{Exports, NbdServer};
use crate::vhost::VhostServer;

/// A start-up failure, with the file, disk or address concerned in its message.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("disk `{disk}`: {source}")]
    Disk { disk: String, source: drivers::OpenError },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// The size of the quick-start demo image.
pub const QUICK_START_IMAGE_BYTES: u64 = 1 << 30;

/// A running appliance.
pub struct Appliance {
    pub config: Config,
    reactors: Option<Reactors>,
    nbd: Option<NbdServer>,
    vhost: Vec<VhostServer>,
    bdevs: Vec<Arc<Bdev>>,
}

impl Appliance {
    /// Opens the disks and starts reactors and exports.
    pub fn start(config: Config) -> Result<Appliance, ServeError> {
        let a = &config.appliance;
        let reactors = Reactors::start(ReactorOptions {
            cores: a.cores.clone(),
            idle: match a.idle {
                IdlePolicy::Busy => poller::IdlePolicy::Busy,
                IdlePolicy::Adaptive => poller::IdlePolicy::adaptive(),
            },
            hugepages: match a.hugepages {
                Hugepages::Auto => HugepageMode::Auto,
                Hugepages::On => HugepageMode::On,
                Hugepages::Off => HugepageMode::Off,
            },
            dma_pool_bytes: a.buffer_pool_bytes as usize,
            pin: true,
        })?;
        // Images are spread over the reactors: each qcow2 image's metadata is served by
        // one of them (its shard's owner).
        let mut bdevs = Vec::new();
        for (i, d) in config.disks.iter().enumerate() {
            let owner = &reactors.handles()[i % reactors.len()];
            match Bdev::open(d, owner) {
                Ok(b) => bdevs.push(b),
                Err(source) => {
                    for b in &bdevs {
                        let _ = b.close();
                    }
                    reactors.stop();
                    return Err(ServeError::Disk { disk: d.name.clone(), source });
                }
            }
        }
        let nbd = match &config.nbd {
            Some(n) => {
                let exports = Exports::new(bdevs.clone());
                match NbdServer::start(&n.listen, exports, reactors.handles().to_vec()) {
                    Ok(s) => Some(s),
                    Err(e) => {
                        for b in &bdevs {
                            let _ = b.close();
                        }
                        reactors.stop();
                        return Err(e.into());
                    }
                }
            }
            None => None,
        };
        let mut vhost = Vec::new();
        for (d, b) in config.disks.iter().zip(&bdevs) {
            let Some(v) = &d.vhost_user_blk else { continue };
            match VhostServer::start(&v.socket, b.clone(), v.queues, reactors.handles().to_vec()) {
                Ok(s) => vhost.push(s),
                Err(e) => {
                    let app = Appliance {
                        config: config.clone(),
                        reactors: Some(reactors),
                        nbd,
                        vhost,
                        bdevs,
                    };
                    app.shutdown();
                    return Err(ServeError::Disk {
                        disk: d.name.clone(),
                        source: drivers::OpenError::Io { path: v.socket.clone(), source: e },
                    });
                }
            }
        }
        Ok(Appliance { config, reactors: Some(reactors), nbd, vhost, bdevs })
    }

    /// The reactors, for control-plane calls.
    pub fn reactor_handles(&self) -> &[poller::ReactorHandle] {
        self.reactors.as_ref().map_or(&[], |r| r.handles())
    }

    pub fn nbd(&self) -> Option<&NbdServer> {
        self.nbd.as_ref()
    }

    /// Stops accepting, drains connections, flushes every disk, stops the reactors.
    pub fn shutdown(mut self) {
        for v in self.vhost.drain(..) {
            v.shutdown();
        }
        if let Some(n) = self.nbd.take() {
            n.shutdown();
        }
        if let Some(r) = self.reactors.take() {
            let first = r.handles()[0].clone();
            for b in &self.bdevs {
                let b2 = b.clone();
                let res = first.block_on(move || async move {
                    match b2.channel() {
                        Ok(ch) => ch.flush().await,
                        Err(e) => Err(e),
                    }
                });
                if let Err(e) = res {
                    tracing::error!(disk = b.name(), "flush at shutdown failed: {e}");
                }
                if let Err(e) = b.close() {
                    tracing::error!(disk = b.name(), "closing the image failed: {e}");
                }
            }
            r.stop();
        }
    }
}

/// Blocks SIGTERM, SIGINT and SIGHUP in the calling thread (and every thread it starts
/// afterwards), so they can be taken synchronously with `sigwait`.
fn block_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; the calls only read/write the set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn wait_for_signal(set: &libc::sigset_t) -> i32 {
    loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: `set` is an initialised signal set and `sig` a valid out-pointer.
        let rc = unsafe { libc::sigwait(set, &mut sig) };
        if rc == 0 && sig != libc::SIGHUP {
            return sig;
        }
        if rc == 0 {
            tracing::info!("SIGHUP received; configuration reload is not supported yet, ignoring");
        }
    }
}

/// Prepares the quick-start: the data folder and a sparse demo image.
fn quick_start(cwd: &Path) -> Result<Config, ServeError> {
    let config = Config::quick_start(cwd)?;
    let data = cwd.join("appliance-data");
    std::fs::create_dir_all(&data)?;
    for d in &config.disks {
        let path = d.path.clone().unwrap_or_default();
        if !path.exists() {
            let opts = drivers::qcow2::create::CreateOptions {
                size: QUICK_START_IMAGE_BYTES,
                ..Default::default()
            };
            drivers::qcow2::create::create(&path, &opts)
                .map_err(|e| std::io::Error::other(format!("creating the demo image: {e}")))?;
            tracing::info!("created the demo image {} (qcow2, 1 GiB virtual)", path.display());
        }
    }
    Ok(config)
}

fn print_connect_help(config: &Config) {
    let Some(nbd) = &config.nbd else { return };
    for d in &config.disks {
        for l in &nbd.listen {
            let uri = match l {
                ListenAddr::Unix(p) => format!("nbd+unix:///{}?socket={}", d.name, p.display()),
                ListenAddr::Tcp(a) => format!("nbd://{a}/{}", d.name),
            };
            println!("disk {:?} is served at {uri}", d.name);
        }
    }
    if let (Some(d), Some(l)) = (config.disks.first(), nbd.listen.first()) {
        let uri = match l {
            ListenAddr::Unix(p) => format!("nbd+unix:///{}?socket={}", d.name, p.display()),
            ListenAddr::Tcp(a) => format!("nbd://{a}/{}", d.name),
        };
        println!("try:  qemu-img info '{uri}'");
        println!("      qemu-io -f raw -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M' '{uri}'");
        println!("      (the export is the disk's guest view: use -f raw even for qcow2 images)");
        println!(
            "      fio --name=t --ioengine=nbd --uri='{uri}' --rw=randread --bs=4k --iodepth=32 --runtime=10 --time_based"
        );
    }
}

/// `appliance serve`.
pub fn run(config_path: Option<&Path>) -> Result<(), ServeError> {
    let signals = block_signals();
    let config = match config_path {
        Some(p) => Config::load(p)?,
        None => {
            let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
            quick_start(&cwd)?
        }
    };
    let app = Appliance::start(config)?;
    let listen: Vec<String> =
        app.config.nbd.iter().flat_map(|n| n.listen.iter().map(|l| l.to_string())).collect();
    tracing::info!(
        reactors = app.config.appliance.cores.len(),
        disks = app.config.disks.len(),
        "appliance ready; NBD listening on {}",
        listen.join(", ")
    );
    print_connect_help(&app.config);
    notify_ready();
    let sig = wait_for_signal(&signals);
    tracing::info!("signal {sig} received; draining connections and flushing disks");
    app.shutdown();
    tracing::info!("appliance stopped");
    Ok(())
}

/// Tells systemd (Type=notify) that start-up is complete, when run under it.
fn notify_ready() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(_) => return,
    };
    let path = path.to_string_lossy().into_owned();
    let res = if let Some(abs) = path.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abs.as_bytes())
            .and_then(|a| sock.send_to_addr(b"READY=1", &a))
    } else {
        sock.send_to(b"READY=1", &path)
    };
    if let Err(e) = res {
        tracing::warn!("sd_notify failed: {e}");
    }
}
