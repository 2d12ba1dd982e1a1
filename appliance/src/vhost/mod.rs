//! The vhost-user-blk export: how hypervisors (QEMU, Cloud Hypervisor) use the
//! appliance. The guest's virtio-blk queues are served straight out of its shared RAM.
//!
//! - Control plane: one thread per disk socket accepts a front-end and runs the
//!   vhost-user protocol ([`backend`]); one front-end at a time (a second one waits in
//!   the listen backlog until the first leaves). When a front-end leaves, its queues
//!   are drained and stopped and the disk is flushed; a new connection starts clean
//!   and, through the inflight region, resumes what the old one had in flight.
//! - Data plane: each virtqueue runs on one reactor (queue `i` on reactor
//!   `i mod n`), polled in guest memory ([`queue`]).

pub(crate) mod backend;
pub mod blk;
mod inflight;
pub(crate) mod queue;

use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;

use drivers::Bdev;
use poller::ReactorHandle;
use vhost::vhost_user::{BackendListener, Listener};

use backend::VuBlk;

static NEXT_DEVICE: AtomicU64 = AtomicU64::new(1);

/// Handles a front-end's messages until it leaves or breaks the protocol. A refused
/// request (bad index, size, features...) was answered with a NACK when the front-end
/// asked for one, and the session goes on; anything else drops the front-end.
pub(crate) fn serve_session(
    conn: &mut vhost::vhost_user::BackendReqHandler<std::sync::Mutex<VuBlk>>,
    name: &str,
) {
    loop {
        let Err(e) = conn.handle_request() else { continue };
        if matches!(
            e,
            vhost::vhost_user::Error::InvalidParam
                | vhost::vhost_user::Error::InvalidOperation(_)
                | vhost::vhost_user::Error::BackendInternalError
                | vhost::vhost_user::Error::MemFdCreateError
        ) {
            tracing::warn!(disk = name, "vhost-user request refused: {e}");
            continue;
        }
        match e {
            vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage => {
                tracing::info!(disk = name, "vhost-user front-end disconnected")
            }
            e => tracing::warn!(disk = name, "vhost-user front-end dropped: {e}"),
        }
        return;
    }
}

/// Every vhost-user-blk device, by disk name (to find a disk's front-ends without
/// taking another disk's device lock).
static DEVICES: Mutex<Vec<(String, Weak<Mutex<VuBlk>>)>> = Mutex::new(Vec::new());

/// Tells the front-ends of `disk` that its configuration changed (`disk_resize`): each
/// re-reads the configuration space, which reports the disk's size as it is now, and a
/// guest sees the new capacity at once. Front-ends that gave no back-end channel
/// (`VHOST_USER_PROTOCOL_F_BACKEND_REQ`) read it when they next ask.
pub fn capacity_changed(disk: &Arc<Bdev>) {
    let devices: Vec<_> = DEVICES
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter(|(n, _)| n == disk.name())
        .filter_map(|(_, d)| d.upgrade())
        .collect();
    for d in devices {
        // Taken out of the lock: the front-end answers the message by reading the
        // configuration, which the device's thread serves under that lock.
        let channel = {
            let d = d.lock().unwrap_or_else(|p| p.into_inner());
            if !Arc::ptr_eq(d.disk(), disk) {
                continue;
            }
            d.backend_channel()
        };
        let Some(channel) = channel else {
            tracing::info!(
                disk = disk.name(),
                "the vhost-user front-end has no back-end channel; it sees the new size when it reads the configuration"
            );
            continue;
        };
        // On its own thread: with REPLY_ACK the send waits for the front-end's answer,
        // and a front-end that never answers must not hold the control call.
        let name = disk.name().to_string();
        let sent =
            std::thread::Builder::new().name(format!("vhost-config {name}")).spawn(move || {
                use vhost::vhost_user::VhostUserFrontendReqHandler;
                if let Err(e) = channel.handle_config_change() {
                    tracing::warn!(
                        disk = name,
                        "telling the vhost-user front-end of the new size failed: {e}"
                    );
                }
            });
        if let Err(e) = sent {
            tracing::warn!(disk = disk.name(), "cannot start the configuration-change sender: {e}");
        }
    }
}

/// One disk's vhost-user-blk socket.
pub struct VhostServer {
    socket: PathBuf,
    stopping: Arc<AtomicBool>,
    listen_fd: RawFd,
    active: Arc<Mutex<Option<RawFd>>>,
    thread: Option<JoinHandle<()>>,
}

impl VhostServer {
    /// Binds the socket and starts serving front-ends.
    pub fn start(
        socket: &Path,
        perms: &config::SocketPerms,
        disk: Arc<Bdev>,
        queues: u16,
        reactors: Vec<ReactorHandle>,
    ) -> std::io::Result<Self> {
        if let Ok(m) = std::fs::symlink_metadata(socket) {
            use std::os::unix::fs::FileTypeExt;
            if !m.file_type().is_socket() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    format!(
                        "{}: exists and is not a socket; refusing to replace it",
                        socket.display()
                    ),
                ));
            }
        }
        let mut listener = Listener::new(socket, true).map_err(|e| {
            std::io::Error::other(format!("{}: cannot listen: {e}", socket.display()))
        })?;
        crate::perms::apply(socket, perms)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", socket.display())))?;
        let listen_fd = listener.as_raw_fd();
        let id = NEXT_DEVICE.fetch_add(1, Ordering::Relaxed);
        let name = disk.name().to_string();
        let device = Arc::new(Mutex::new(VuBlk::new(id, disk, queues, reactors)));
        DEVICES.lock().unwrap_or_else(|p| p.into_inner()).retain(|(_, d)| d.strong_count() > 0);
        DEVICES
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((name.clone(), Arc::downgrade(&device)));
        let stopping = Arc::new(AtomicBool::new(false));
        let active: Arc<Mutex<Option<RawFd>>> = Arc::new(Mutex::new(None));
        let (stop2, active2, sock) = (stopping.clone(), active.clone(), socket.to_path_buf());
        let thread = std::thread::Builder::new().name(format!("vhost-user {name}")).spawn(move || {
            while !stop2.load(Ordering::SeqCst) {
                // `BackendListener` hands its backend to one connection only: make one
                // per accepted front-end.
                let mut server = match BackendListener::new(&mut listener, device.clone()) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(socket = %sock.display(), "vhost-user listener failed: {e}");
                        return;
                    }
                };
                let conn = match server.accept() {
                    Ok(Some(c)) => c,
                    Ok(None) => continue,
                    Err(e) => {
                        if !stop2.load(Ordering::SeqCst) {
                            tracing::warn!(socket = %sock.display(), "vhost-user accept failed: {e}");
                            std::thread::sleep(std::time::Duration::from_millis(50));
                        }
                        continue;
                    }
                };
                let mut conn = conn;
                *active2.lock().unwrap_or_else(|p| p.into_inner()) = Some(conn.as_raw_fd());
                tracing::info!(disk = name, "vhost-user front-end connected");
                serve_session(&mut conn, &name);
                *active2.lock().unwrap_or_else(|p| p.into_inner()) = None;
                drop(conn);
                device.lock().unwrap_or_else(|p| p.into_inner()).reset();
            }
            // Final drain and flush.
            device.lock().unwrap_or_else(|p| p.into_inner()).stop_all();
        })?;
        Ok(VhostServer {
            socket: socket.to_path_buf(),
            stopping,
            listen_fd,
            active,
            thread: Some(thread),
        })
    }

    /// Stops accepting, disconnects the front-end (draining its queues and flushing the
    /// disk), and removes the socket.
    pub fn shutdown(mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // SAFETY: shutdown(2) on descriptors owned by the server thread, to wake it.
        unsafe { libc::shutdown(self.listen_fd, libc::SHUT_RDWR) };
        if let Some(fd) = *self.active.lock().unwrap_or_else(|p| p.into_inner()) {
            // SAFETY: as above.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}
