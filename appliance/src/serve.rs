//! Start-up and shutdown order of `appliance serve`.
//!
//! Start-up: load and validate the config (or build the quick-start one), start the
//! reactors, open every disk (probing alignment, reading image metadata) on the control
//! thread, then the exports; report readiness once every listener is bound.
//!
//! One disk's failure never takes the others down: a disk that cannot be opened at
//! start-up or on reload (missing, corrupt, locked by another process) is logged with
//! the file and the reason, listed by `disk_list` in state `failed` with its error,
//! counted in the metrics, and every other disk is served; `disk_add` with its name
//! (or a reload) retries it. `serve --strict` refuses to start instead.
//! Shutdown (SIGTERM or SIGINT): stop accepting, let connections finish what is in
//! flight, flush every disk, stop the reactors, exit 0.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use config::{Config, Hugepages, IdlePolicy, ListenAddr};
use drivers::Bdev;
use poller::{HugepageMode, ReactorHandle, ReactorOptions, Reactors};

use crate::control::ControlServer;
use crate::metrics::MetricsServer;
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
    #[error("disk `{0}` does not exist")]
    NotFound(String),
    #[error("a disk named `{0}` is already served")]
    Exists(String),
    #[error("disk `{0}`: its vhost-user socket is already in use")]
    Clash(String),
    #[error("disk `{disk}`: {} is already served by another disk", path.display())]
    InUse { disk: String, path: PathBuf },
    #[error("the appliance is shutting down")]
    ShuttingDown,
    #[error("disk `{0}`: flush failed: {1}")]
    Flush(String, drivers::IoError),
    #[error("disk `{0}` failed to open and is not served (see `disk_list`)")]
    Failed(String),
    #[error("disk `{0}` has a block job running (`{1}`); cancel it first")]
    JobRunning(String, String),
}

/// The size of the quick-start demo image.
pub const QUICK_START_IMAGE_BYTES: u64 = 1 << 30;

/// A configured disk: served, or failed to open.
struct DiskEntry {
    config: config::Disk,
    state: DiskState,
}

enum DiskState {
    Serving {
        bdev: Arc<Bdev>,
        vhost: Option<VhostServer>,
    },
    /// The disk could not be opened; the error names the file and the reason.
    Failed {
        error: String,
    },
}

impl DiskEntry {
    fn bdev(&self) -> Option<&Arc<Bdev>> {
        match &self.state {
            DiskState::Serving { bdev, .. } => Some(bdev),
            DiskState::Failed { .. } => None,
        }
    }
}

/// What the metrics exporter reads of the disk set (and of the block jobs on it).
pub struct DiskView {
    pub serving: Vec<Arc<Bdev>>,
    pub failed: Vec<String>,
    pub jobs: Vec<Arc<jobs::Job>>,
}

/// A running appliance. Shared with the control socket and the metrics thread; disks
/// can be added and removed while it runs.
pub struct Appliance {
    config: Mutex<Config>,
    handles: Vec<ReactorHandle>,
    reactors: Mutex<Option<Reactors>>,
    nbd: Mutex<Option<NbdServer>>,
    exports: Arc<Exports>,
    disks: Mutex<Vec<DiskEntry>>,
    metrics: Mutex<Option<MetricsServer>>,
    control: Mutex<Option<ControlServer>>,
    next_owner: AtomicUsize,
    /// Serialises disk-set changes (control socket, SIGHUP); `true` once shut down.
    changes: Mutex<bool>,
    jobs: Arc<jobs::Jobs>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Appliance {
    /// Starts the reactors, opens the disks, then the exports, metrics and control. A
    /// disk that fails to open is recorded as failed and the others are served, unless
    /// `strict`, which makes it a start-up error.
    pub fn start(config: Config, strict: bool) -> Result<Arc<Appliance>, ServeError> {
        // Client credentials first: `driver = "nbd"` disks may need them to open.
        set_client_tls(config.nbd.as_ref().and_then(|n| n.client_tls.as_ref()))?;
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
        let handles = reactors.handles().to_vec();
        let disks_cfg = config.disks.clone();

        let app = Arc::new(Appliance {
            config: Mutex::new(Config { disks: Vec::new(), ..config.clone() }),
            handles,
            reactors: Mutex::new(Some(reactors)),
            nbd: Mutex::new(None),
            exports: Exports::new(Vec::new()),
            disks: Mutex::new(Vec::new()),
            metrics: Mutex::new(None),
            control: Mutex::new(None),
            next_owner: AtomicUsize::new(0),
            changes: Mutex::new(false),
            jobs: match &config.appliance.state_dir {
                Some(d) => {
                    if let Err(e) = std::fs::create_dir_all(d) {
                        tracing::warn!("state_dir {}: {e}", d.display());
                    }
                    jobs::Jobs::with_journal(d)
                }
                None => jobs::Jobs::new(),
            },
        });
        // Metrics first: exports pick up stats handles when they start.
        if config.control.is_some() {
            crate::metrics::enable();
        }
        if let Some(addr) = config.metrics {
            let a2 = Arc::downgrade(&app);
            let source: crate::metrics::DiskSource = Arc::new(move || {
                a2.upgrade().map(|a| a.disk_view()).unwrap_or(DiskView {
                    serving: Vec::new(),
                    failed: Vec::new(),
                    jobs: Vec::new(),
                })
            });
            match MetricsServer::start(addr, app.handles.clone(), source) {
                Ok(m) => *lock(&app.metrics) = Some(m),
                Err(e) => {
                    app.shutdown();
                    return Err(ServeError::Io(std::io::Error::other(e)));
                }
            }
        }
        for d in disks_cfg {
            match app.add_disk_inner(d.clone()) {
                Ok(()) => {}
                Err(e) if strict => {
                    app.shutdown();
                    return Err(e);
                }
                Err(e) => app.record_failed(d, &e),
            }
        }
        if let Some(n) = &config.nbd {
            match NbdServer::start(n, app.exports.clone(), app.handles.clone()) {
                Ok(s) => *lock(&app.nbd) = Some(s),
                Err(e) => {
                    app.shutdown();
                    return Err(e.into());
                }
            }
        }
        if let Some(control) = &config.control {
            let path = &control.socket;
            match ControlServer::start(control, Arc::downgrade(&app)) {
                Ok(c) => *lock(&app.control) = Some(c),
                Err(e) => {
                    app.shutdown();
                    return Err(ServeError::Io(std::io::Error::other(format!(
                        "{}: {e}",
                        path.display()
                    ))));
                }
            }
        }
        Ok(app)
    }

    /// The reactors, for control-plane calls.
    pub fn reactor_handles(&self) -> &[ReactorHandle] {
        &self.handles
    }

    /// The running configuration (the file's, plus changes made since), failed disks
    /// included.
    pub fn config(&self) -> Config {
        let mut c = lock(&self.config).clone();
        c.disks = lock(&self.disks).iter().map(|d| d.config.clone()).collect();
        c
    }

    /// The open disks.
    pub fn bdevs(&self) -> Vec<Arc<Bdev>> {
        lock(&self.disks).iter().filter_map(|d| d.bdev().cloned()).collect()
    }

    fn disk_view(&self) -> DiskView {
        let disks = lock(&self.disks);
        DiskView {
            serving: disks.iter().filter_map(|d| d.bdev().cloned()).collect(),
            failed: disks
                .iter()
                .filter(|d| d.bdev().is_none())
                .map(|d| d.config.name.clone())
                .collect(),
            jobs: self.jobs.all(),
        }
    }

    /// Keeps a disk that failed to open in the disk set, with its error, so it is
    /// listed, counted and can be retried.
    fn record_failed(&self, d: config::Disk, e: &ServeError) {
        tracing::error!(
            disk = d.name,
            "disk not served: {e}; the other disks are (retry with `appliance ctl add` or a reload)"
        );
        let entry = DiskEntry { config: d, state: DiskState::Failed { error: e.to_string() } };
        lock(&self.disks).push(entry);
    }

    fn add_disk_inner(&self, d: config::Disk) -> Result<(), ServeError> {
        if lock(&self.disks).iter().any(|e| e.config.name == d.name) {
            return Err(ServeError::Exists(d.name));
        }
        // Disks lead on the reactors in turn, so single-shard images spread out.
        let mut reactors = self.handles.clone();
        let lead = self.next_owner.fetch_add(1, Ordering::Relaxed) % reactors.len();
        reactors.rotate_left(lead);
        let bdev = Bdev::open(&d, &reactors)
            .map_err(|source| ServeError::Disk { disk: d.name.clone(), source })?;
        let vhost = match &d.vhost_user_blk {
            None => None,
            Some(v) => {
                let handles = self.handles.clone();
                match VhostServer::start(&v.socket, &v.perms, bdev.clone(), v.queues, handles) {
                    Ok(s) => Some(s),
                    Err(e) => {
                        let _ = bdev.close();
                        return Err(ServeError::Disk {
                            disk: d.name.clone(),
                            source: drivers::OpenError::Io { path: v.socket.clone(), source: e },
                        });
                    }
                }
            }
        };
        if lock(&self.config).nbd.is_some() {
            self.exports.add(bdev.clone(), d.nbd_allow.clone());
        }
        tracing::info!(disk = d.name, "disk added");
        lock(&self.disks).push(DiskEntry { config: d, state: DiskState::Serving { bdev, vhost } });
        Ok(())
    }

    /// Opens and exports a disk (control socket, reload). A disk of the same name that
    /// failed to open is retried with this configuration; if it fails again it stays
    /// listed as failed, with the new error.
    pub fn add_disk(&self, d: config::Disk) -> Result<(), ServeError> {
        let g = lock(&self.changes);
        if *g {
            return Err(ServeError::ShuttingDown);
        }
        let retry = {
            let mut disks = lock(&self.disks);
            let failed = disks.iter().position(|e| e.config.name == d.name && e.bdev().is_none());
            failed.map(|i| disks.remove(i))
        };
        let r = self.add_disk_checked(d.clone());
        if let (Some(_), Err(e)) = (&retry, &r) {
            self.record_failed(d, e);
        }
        r
    }

    /// [`Appliance::add_disk`] for a reload: a disk that fails to open stays listed as
    /// failed, as at start-up.
    fn add_or_record(&self, d: config::Disk) -> Result<(), ServeError> {
        match self.add_disk(d.clone()) {
            Err(e @ (ServeError::Exists(_) | ServeError::ShuttingDown)) => Err(e),
            Err(e) => {
                if !self.disk_view().failed.contains(&d.name) {
                    self.record_failed(d, &e);
                }
                Err(e)
            }
            Ok(()) => Ok(()),
        }
    }

    fn add_disk_checked(&self, d: config::Disk) -> Result<(), ServeError> {
        let clash = {
            let cfg = lock(&self.config);
            let disks = lock(&self.disks);
            d.vhost_user_blk.as_ref().is_some_and(|v| {
                disks
                    .iter()
                    .any(|e| e.config.vhost_user_blk.as_ref().is_some_and(|o| o.socket == v.socket))
                    || cfg
                        .nbd
                        .as_ref()
                        .is_some_and(|n| n.listen.contains(&ListenAddr::Unix(v.socket.clone())))
                    || cfg.control.as_ref().is_some_and(|c| c.socket == v.socket)
            })
        };
        if clash {
            return Err(ServeError::Clash(d.name));
        }
        let path_in_use = d.path.as_ref().is_some_and(|p| {
            lock(&self.disks).iter().any(|e| {
                e.bdev().is_some() && e.config.path.as_ref().is_some_and(|o| same_file(o, p))
            })
        });
        if path_in_use {
            return Err(ServeError::InUse {
                path: d.path.clone().unwrap_or_default(),
                disk: d.name,
            });
        }
        self.add_disk_inner(d)
    }

    /// Stops exporting a disk: new connections are refused, existing ones drain, the
    /// disk is flushed and closed.
    pub fn remove_disk(&self, name: &str) -> Result<(), ServeError> {
        let g = lock(&self.changes);
        if *g {
            return Err(ServeError::ShuttingDown);
        }
        let entry = {
            let mut disks = lock(&self.disks);
            let i = disks
                .iter()
                .position(|e| e.config.name == name)
                .ok_or_else(|| ServeError::NotFound(name.to_string()))?;
            disks.remove(i)
        };
        let DiskState::Serving { bdev, vhost } = entry.state else {
            tracing::info!(disk = name, "failed disk removed");
            return Ok(());
        };
        if let Some(j) = self.jobs.live_on(name) {
            lock(&self.disks).push(DiskEntry {
                config: entry.config,
                state: DiskState::Serving { bdev, vhost },
            });
            return Err(ServeError::JobRunning(name.to_string(), j.id.clone()));
        }
        // No new NBD client finds it, no new channel opens; then the clients it has are
        // drained and disconnected, and close() makes everything durable.
        self.exports.remove(name);
        bdev.retire();
        if let Some(n) = lock(&self.nbd).as_ref() {
            n.close_export(name);
        }
        if let Some(v) = vhost {
            v.shutdown();
        }
        bdev.close().map_err(|e| ServeError::Flush(name.to_string(), e))?;
        tracing::info!(disk = name, "disk removed");
        Ok(())
    }

    fn flush_bdev(&self, b: &Arc<Bdev>) -> Result<(), drivers::IoError> {
        let b2 = b.clone();
        self.handles[0].block_on(move || async move {
            match b2.channel() {
                Ok(ch) => ch.flush().await,
                Err(e) => Err(e),
            }
        })
    }

    /// Flushes a disk.
    pub fn flush_disk(&self, name: &str) -> Result<(), ServeError> {
        let b = self.find(name)?;
        self.flush_bdev(&b).map_err(|e| ServeError::Flush(name.to_string(), e))
    }

    fn find(&self, name: &str) -> Result<Arc<Bdev>, ServeError> {
        let disks = lock(&self.disks);
        let e = disks
            .iter()
            .find(|e| e.config.name == name)
            .ok_or_else(|| ServeError::NotFound(name.to_string()))?;
        e.bdev().cloned().ok_or_else(|| ServeError::Failed(name.to_string()))
    }

    /// Changes a disk's QoS limits live.
    pub fn set_qos(&self, name: &str, q: config::Qos) -> Result<(), ServeError> {
        let mut disks = lock(&self.disks);
        let e = disks
            .iter_mut()
            .find(|e| e.config.name == name)
            .ok_or_else(|| ServeError::NotFound(name.to_string()))?;
        if let Some(b) = e.bdev() {
            b.set_qos(drivers::api::qos::QosLimits {
                iops: q.iops,
                bandwidth: q.bandwidth,
                burst: q.burst,
            });
        }
        e.config.qos = (q.iops > 0 || q.bandwidth > 0).then_some(q);
        tracing::info!(disk = name, iops = q.iops, bandwidth = q.bandwidth, "QoS limits set");
        Ok(())
    }

    /// The disks and their state, for `disk_list`.
    pub fn list(&self) -> serde_json::Value {
        let disks = lock(&self.disks);
        let nbd = lock(&self.config).nbd.is_some();
        serde_json::Value::Array(disks.iter().map(|e| disk_json(e, nbd)).collect())
    }

    /// Applies a new configuration's disk set (SIGHUP): removed disks go, new ones
    /// come, changed ones are re-added (QoS-only changes apply live). Changes outside
    /// `[[disk]]` need a restart and are reported.
    pub fn reload(&self, new: Config) -> Vec<String> {
        let mut report = Vec::new();
        let old = self.config();
        let failed: Vec<String> = self.disk_view().failed;
        self.reload_security(&new, &mut report);
        {
            let cur = lock(&self.config);
            let same_nbd = match (&cur.nbd, &new.nbd) {
                (Some(a), Some(b)) => {
                    config::Nbd {
                        tls: a.tls.clone(),
                        client_tls: a.client_tls.clone(),
                        ..b.clone()
                    } == *a
                }
                (a, b) => a == b,
            };
            if cur.appliance != new.appliance
                || !same_nbd
                || cur.metrics != new.metrics
                || cur.control != new.control
            {
                report.push("changes outside [[disk]] take effect at the next restart".to_string());
            }
        }
        for d in &old.disks {
            match new.disk(&d.name) {
                None => match self.remove_disk(&d.name) {
                    Ok(()) => report.push(format!("removed {}", d.name)),
                    Err(e) => report.push(format!("removing {}: {e}", d.name)),
                },
                Some(n) if n == d && failed.contains(&n.name) => {
                    match self.add_or_record(n.clone()) {
                        Ok(()) => report.push(format!("{} opened on retry", n.name)),
                        Err(e) => report.push(format!("{} still failed: {e}", n.name)),
                    }
                }
                Some(n) if n == d => {}
                Some(n)
                    if config::Disk { qos: d.qos, nbd_allow: d.nbd_allow.clone(), ..n.clone() }
                        == *d
                        && !failed.contains(&n.name) =>
                {
                    if n.qos != d.qos {
                        let q = n.qos.unwrap_or_default();
                        match self.set_qos(&n.name, q) {
                            Ok(()) => report.push(format!("QoS of {} changed", n.name)),
                            Err(e) => report.push(format!("QoS of {}: {e}", n.name)),
                        }
                    }
                    if n.nbd_allow != d.nbd_allow {
                        self.set_allow(&n.name, n.nbd_allow.clone());
                        report.push(format!("NBD allow list of {} changed", n.name));
                    }
                }
                Some(n) => {
                    let r = self.remove_disk(&d.name).and_then(|()| self.add_or_record(n.clone()));
                    match r {
                        Ok(()) => report.push(format!("re-added {} with its new settings", n.name)),
                        Err(e) => report.push(format!("changing {}: {e}", n.name)),
                    }
                }
            }
        }
        for n in &new.disks {
            if old.disk(&n.name).is_none() {
                match self.add_or_record(n.clone()) {
                    Ok(()) => report.push(format!("added {}", n.name)),
                    Err(e) => report.push(format!("adding {}: {e}", n.name)),
                }
            }
        }
        report
    }

    /// Re-reads the TLS credentials of the NBD server and client (reload). A failure
    /// keeps the ones in use and is reported, naming the file.
    fn reload_security(&self, new: &Config, report: &mut Vec<String>) {
        let nbd = new.nbd.as_ref();
        if let Some(server) = lock(&self.nbd).as_ref() {
            match server.set_tls(nbd.and_then(|n| n.tls.as_ref())) {
                Ok(()) if nbd.is_some_and(|n| n.tls.is_some()) => {
                    report.push("NBD TLS credentials re-read".to_string());
                    let mut cfg = lock(&self.config);
                    if let (Some(c), Some(n)) = (cfg.nbd.as_mut(), nbd) {
                        c.tls = n.tls.clone();
                    }
                }
                Ok(()) => {}
                Err(e) => {
                    tracing::error!("reload: NBD TLS credentials kept: {e}");
                    report.push(format!("NBD TLS credentials kept: {e}"));
                }
            }
        }
        match set_client_tls(nbd.and_then(|n| n.client_tls.as_ref())) {
            Ok(()) => {
                let mut cfg = lock(&self.config);
                if let (Some(c), Some(n)) = (cfg.nbd.as_mut(), nbd) {
                    c.client_tls = n.client_tls.clone();
                }
            }
            Err(e) => {
                tracing::error!("reload: NBD client TLS credentials kept: {e}");
                report.push(format!("NBD client TLS credentials kept: {e}"));
            }
        }
    }

    /// Changes who may open a disk's NBD export; open connections stay.
    fn set_allow(&self, name: &str, allow: Option<Vec<String>>) {
        self.exports.set_allow(name, allow.clone());
        let mut disks = lock(&self.disks);
        if let Some(e) = disks.iter_mut().find(|e| e.config.name == name) {
            e.config.nbd_allow = allow;
        }
        tracing::info!(disk = name, "NBD allow list changed");
    }

    /// Stops accepting, drains connections, flushes and closes every disk, stops the
    /// reactors. Safe to call more than once.
    pub fn shutdown(&self) {
        if let Some(c) = lock(&self.control).take() {
            c.shutdown();
        }
        self.end_jobs();
        // Waits for a change in progress; none starts after this.
        *lock(&self.changes) = true;
        let disks: Vec<DiskEntry> = lock(&self.disks).drain(..).collect();
        let mut bdevs = Vec::new();
        for e in disks {
            if let DiskState::Serving { bdev, vhost } = e.state {
                if let Some(v) = vhost {
                    v.shutdown();
                }
                bdevs.push(bdev);
            }
        }
        if let Some(n) = lock(&self.nbd).take() {
            n.shutdown();
        }
        if let Some(m) = lock(&self.metrics).take() {
            m.shutdown();
        }
        if let Some(r) = lock(&self.reactors).take() {
            for b in &bdevs {
                if let Err(e) = self.flush_bdev(b) {
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

/// Block jobs (see `block_jobs`).
impl Appliance {
    /// Exports `bdev` over NBD (a point-in-time view) with the allow list `allow`;
    /// false when no NBD server is configured or the name is taken.
    pub(crate) fn export_view(&self, bdev: Arc<Bdev>, allow: Option<Vec<String>>) -> bool {
        if lock(&self.config).nbd.is_none() || self.exports.find(bdev.name()).is_some() {
            return false;
        }
        self.exports.add(bdev, allow);
        true
    }

    /// Stops exporting a view: new clients are refused, connected ones drained.
    pub(crate) fn unexport_view(&self, name: &str) -> Option<Arc<Bdev>> {
        let b = self.exports.remove(name)?;
        b.retire();
        if let Some(n) = lock(&self.nbd).as_ref() {
            n.close_export(name);
        }
        Some(b)
    }

    /// Whether `name` is an NBD export now.
    pub(crate) fn exports_name(&self, name: &str) -> bool {
        !name.is_empty() && self.exports.find(name).is_some()
    }

    pub(crate) fn jobs(&self) -> &Arc<jobs::Jobs> {
        &self.jobs
    }

    /// A served disk and its configuration.
    pub(crate) fn served_disk(&self, name: &str) -> Result<(Arc<Bdev>, config::Disk), ServeError> {
        let disks = lock(&self.disks);
        let e = disks
            .iter()
            .find(|e| e.config.name == name)
            .ok_or_else(|| ServeError::NotFound(name.to_string()))?;
        let b = e.bdev().cloned().ok_or_else(|| ServeError::Failed(name.to_string()))?;
        Ok((b, e.config.clone()))
    }

    /// `p` made absolute against the config file's directory (or the working one).
    pub(crate) fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            return p.to_path_buf();
        }
        let base = lock(&self.config)
            .source
            .as_deref()
            .and_then(Path::parent)
            .filter(|d| !d.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/")));
        base.join(p)
    }

    /// Whether `p` is the file of a served disk.
    pub(crate) fn serves_file(&self, p: &Path) -> bool {
        lock(&self.disks).iter().any(|e| {
            e.bdev().is_some() && e.config.path.as_ref().is_some_and(|o| same_file(o, p) || o == p)
        })
    }

    /// The reactors a job may quiesce, the first running it (in turn across jobs).
    pub(crate) fn job_reactors(&self) -> Vec<ReactorHandle> {
        let mut r = self.handles.clone();
        let lead = self.next_owner.fetch_add(1, Ordering::Relaxed) % r.len();
        r.rotate_left(lead);
        r
    }

    /// A mirror pivoted: the disk is served from its target now (`moved` says where
    /// and how; its exports and limits stay the disk's own).
    pub(crate) fn disk_moved(&self, name: &str, moved: config::Disk) {
        let mut disks = lock(&self.disks);
        if let Some(e) = disks.iter_mut().find(|e| e.config.name == name) {
            let path = moved.path.clone().unwrap_or_default();
            tracing::info!(disk = name, path = %path.display(), "disk now served from its mirror target");
            e.config = config::Disk {
                path: moved.path,
                format: moved.format,
                driver: moved.driver,
                direct: moved.direct,
                allowed_backing_dirs: moved.allowed_backing_dirs,
                rbd: moved.rbd,
                l2_cache_bytes: None,
                refcount_cache_bytes: None,
                shards: None,
                ..e.config.clone()
            };
        }
    }

    /// Whether this appliance's NBD server listens at `addr` (a mirror must not target
    /// a disk's own export).
    pub(crate) fn listens_at(&self, addr: &drivers::io::nbd::uri::Address) -> bool {
        use drivers::io::nbd::uri::Address;
        let cfg = lock(&self.config);
        let Some(n) = &cfg.nbd else { return false };
        n.listen.iter().any(|l| match (l, addr) {
            (ListenAddr::Unix(p), Address::Unix(q)) => same_file(p, q) || p == q,
            (ListenAddr::Tcp(s), Address::Tcp { host, port }) => {
                s.port() == *port
                    && (s.ip().is_unspecified()
                        || host
                            .parse::<std::net::IpAddr>()
                            .is_ok_and(|ip| ip == s.ip() || ip.is_loopback())
                        || host == "localhost")
            }
            _ => false,
        })
    }

    /// At shutdown: cancels every live job (at once) and waits for it to end; the job
    /// journal keeps them, for the next start to report.
    fn end_jobs(&self) {
        self.jobs.stopping();
        for j in self.jobs.all() {
            if !j.state().ended() && j.cancel(true).is_ok() {
                tracing::warn!(
                    job = j.id,
                    disk = j.disk,
                    "cancelling the job: the appliance is stopping"
                );
            }
        }
        self.jobs.wait_finished(std::time::Duration::from_secs(60));
    }
}

fn disk_json(e: &DiskEntry, nbd: bool) -> serde_json::Value {
    let c = &e.config;
    let mut v = serde_json::json!({
        "name": c.name,
        "path": c.path,
        "format": if c.format == config::Format::Qcow2 { "qcow2" } else { "raw" },
        "driver": c.driver.name(),
    });
    match &e.state {
        DiskState::Failed { error } => {
            v["state"] = "failed".into();
            v["error"] = error.clone().into();
            v["read_only"] = c.read_only.into();
        }
        DiskState::Serving { bdev, .. } => {
            let info = bdev.info();
            let mut exports = Vec::new();
            if nbd {
                exports.push(serde_json::json!({"type": "nbd", "name": c.name}));
            }
            if let Some(v) = &c.vhost_user_blk {
                exports.push(serde_json::json!({"type": "vhost-user-blk", "socket": v.socket, "queues": v.queues}));
            }
            let q = bdev.qos().limits();
            v["state"] = "serving".into();
            v["read_only"] = info.read_only.into();
            v["size"] = info.size.into();
            v["exports"] = exports.into();
            v["qos"] =
                serde_json::json!({"iops": q.iops, "bandwidth": q.bandwidth, "burst": q.burst});
        }
    }
    v
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
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

/// Waits for SIGTERM or SIGINT; SIGHUP reloads the config file in between.
fn wait_for_signal(set: &libc::sigset_t, app: &Appliance, config_path: Option<&Path>) -> i32 {
    loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: `set` is an initialised signal set and `sig` a valid out-pointer.
        let rc = unsafe { libc::sigwait(set, &mut sig) };
        if rc != 0 {
            continue;
        }
        if sig != libc::SIGHUP {
            return sig;
        }
        match config_path {
            None => tracing::info!("SIGHUP: the quick-start has no config file to reload"),
            Some(p) => {
                reload_from(app, p);
            }
        }
    }
}

/// Re-reads the config file and applies its disk set.
pub fn reload_from(app: &Appliance, path: &Path) -> Vec<String> {
    match Config::load_for_serving(path) {
        Err(e) => {
            tracing::error!("reload: {e}; keeping the running configuration");
            vec![format!("error: {e}")]
        }
        Ok(c) => {
            let report = app.reload(c);
            if report.is_empty() {
                tracing::info!("reload: nothing changed");
            }
            for r in &report {
                tracing::info!("reload: {r}");
            }
            report
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

fn print_connect_help(config: &Config, served: &dyn Fn(&str) -> bool) {
    let Some(nbd) = &config.nbd else { return };
    for d in &config.disks {
        if !served(&d.name) {
            println!("disk {:?} is not served: it failed to open (see the error above)", d.name);
            continue;
        }
        for l in &nbd.listen {
            let uri = match l {
                ListenAddr::Unix(p) => format!("nbd+unix:///{}?socket={}", d.name, p.display()),
                ListenAddr::Tcp(a) => format!("nbd://{a}/{}", d.name),
            };
            println!("disk {:?} is served at {uri}", d.name);
        }
    }
    let first = config.disks.iter().find(|d| served(&d.name));
    if let (Some(d), Some(l)) = (first, nbd.listen.first()) {
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

/// `appliance serve`; with `strict`, a disk that fails to open stops the start-up.
pub fn run(config_path: Option<&Path>, strict: bool) -> Result<(), ServeError> {
    let signals = block_signals();
    let config = match config_path {
        Some(p) => Config::load_for_serving(p)?,
        None => {
            let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
            quick_start(&cwd)?
        }
    };
    let app = Appliance::start(config, strict)?;
    let config = app.config();
    let listen: Vec<String> =
        config.nbd.iter().flat_map(|n| n.listen.iter().map(|l| l.to_string())).collect();
    let vhost: Vec<String> = config
        .disks
        .iter()
        .filter_map(|d| {
            d.vhost_user_blk.as_ref().map(|v| format!("{} ({})", v.socket.display(), d.name))
        })
        .collect();
    tracing::info!(
        reactors = config.appliance.cores.len(),
        disks = config.disks.len(),
        "appliance ready; NBD listening on [{}]; vhost-user-blk on [{}]",
        listen.join(", "),
        vhost.join(", ")
    );
    print_connect_help(&config, &|name| app.served_disk(name).is_ok());
    notify_ready();
    let sig = wait_for_signal(&signals, &app, config_path);
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

/// Loads `[nbd.client_tls]` for the appliance's NBD client (mirror targets and
/// `driver = "nbd"` disks with `nbds://` URIs); the error names the file.
fn set_client_tls(files: Option<&config::TlsFiles>) -> std::io::Result<()> {
    let cfg = match files {
        None => None,
        Some(f) => Some(drivers::io::tls::creds::client_config(f).map_err(|e| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, format!("[nbd.client_tls]: {e}"))
        })?),
    };
    drivers::io::nbd::set_client_tls(cfg);
    Ok(())
}
