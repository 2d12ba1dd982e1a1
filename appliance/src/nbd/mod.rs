//! The NBD export.
//!
//! Listeners (unix and TCP) run on control-plane threads in blocking `accept`; each new
//! connection is handed to a reactor, round-robin, as a control message. From then on
//! the connection lives on that reactor only: the handshake (`handshake`) and the
//! transmission phase (`conn`) are async tasks there, sharing the reactor's per-device
//! channel with every other connection to the same disk on that reactor.
//!
//! Flushes are visible across connections (`NBD_FLAG_CAN_MULTI_CONN`) because every
//! channel of a device flushes the same underlying storage, and a flush covers every
//! write completed before it on any channel.
//!
//! Each listener accepts at most `max_connections` at once; a client past that gets the
//! greeting and `NBD_REP_ERR_POLICY` ("too many connections") for its options, then the
//! connection closes, so it sees a reason rather than a reset.
//!
//! With `[nbd.tls]` every listener requires TLS (`handshake`): a client must upgrade
//! with `NBD_OPT_STARTTLS` before anything else, and with `ca` set it must present a
//! certificate that CA signed. Per-export allow lists (`[disk.nbd] allow`) name the
//! client certificate common names that may open an export; the others are refused and
//! do not see it listed. The TLS credentials are swapped on reload
//! ([`NbdServer::set_tls`]); connections keep the ones they started with.
//!
//! Unix listeners get the owner, group and mode `[nbd]` configures (0600 by default).
//!
//! Shutdown stops the listeners, then asks every reactor to close its connections
//! gracefully: reading stops, requests in flight complete and their replies are sent,
//! then the socket closes.

mod budget;
pub(crate) mod conn;
mod handshake;
mod meta;
pub mod proto;
mod reader;
mod reply;
mod rx;
mod sock;
mod zc;

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use config::ListenAddr;
use drivers::io::tls::Stream;
use drivers::{Bdev, BdevChannel, IoError};
use poller::ReactorHandle;

/// The disks served, by export name, in configuration order (the first is the default
/// export for clients that ask for the empty name), each with its allow list.
#[derive(Default)]
pub struct Exports {
    list: RwLock<Vec<Export>>,
}

struct Export {
    bdev: Arc<Bdev>,
    /// Client certificate common names that may open it; `None`: anyone admitted.
    allow: Option<Vec<String>>,
}

/// Who a client is, as far as allow lists go: its certificate's common name.
#[derive(Debug, Clone, Copy)]
pub struct Identity<'a>(pub Option<&'a str>);

impl Exports {
    pub fn new(bdevs: Vec<Arc<Bdev>>) -> Arc<Self> {
        let list = bdevs.into_iter().map(|bdev| Export { bdev, allow: None }).collect();
        Arc::new(Exports { list: RwLock::new(list) })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Export>> {
        self.list.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Looks an export up; the empty name selects the default (first) export.
    pub fn find(&self, name: &str) -> Option<Arc<Bdev>> {
        let list = self.read();
        if name.is_empty() {
            return list.first().map(|e| e.bdev.clone());
        }
        list.iter().find(|e| e.bdev.name() == name).map(|e| e.bdev.clone())
    }

    /// Whether `who` may open export `name` (which exists).
    pub fn permits(&self, name: &str, who: Identity<'_>) -> bool {
        let list = self.read();
        let e = if name.is_empty() {
            list.first()
        } else {
            list.iter().find(|e| e.bdev.name() == name)
        };
        e.is_none_or(|e| permitted(e, who))
    }

    /// The names of the exports `who` may open.
    pub fn names(&self, who: Identity<'_>) -> Vec<String> {
        let list = self.read();
        list.iter().filter(|e| permitted(e, who)).map(|e| e.bdev.name().to_string()).collect()
    }

    pub fn add(&self, bdev: Arc<Bdev>, allow: Option<Vec<String>>) {
        self.list.write().unwrap_or_else(|p| p.into_inner()).push(Export { bdev, allow });
    }

    /// Replaces an export's allow list (reload); connections already open stay.
    pub fn set_allow(&self, name: &str, allow: Option<Vec<String>>) {
        let mut list = self.list.write().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = list.iter_mut().find(|e| e.bdev.name() == name) {
            e.allow = allow;
        }
    }

    pub fn remove(&self, name: &str) -> Option<Arc<Bdev>> {
        let mut list = self.list.write().unwrap_or_else(|p| p.into_inner());
        let i = list.iter().position(|e| e.bdev.name() == name)?;
        Some(list.remove(i).bdev)
    }
}

fn permitted(e: &Export, who: Identity<'_>) -> bool {
    match (&e.allow, who.0) {
        (None, _) => true,
        (Some(list), Some(cn)) => list.iter().any(|a| a == cn),
        (Some(_), None) => false,
    }
}

struct ServerShared {
    exports: Arc<Exports>,
    reactors: Vec<ReactorHandle>,
    next: AtomicUsize,
    stopping: AtomicBool,
    connections: AtomicUsize,
    /// Refusals being answered (bounded: past it, extra clients are just closed).
    refusing: AtomicUsize,
    max_connections: usize,
    timeouts: conn::Timeouts,
    socket_io: config::SocketIo,
    zero_copy: config::ZeroCopySend,
    multishot: bool,
    /// `[nbd.tls]`, loaded; `None`: plaintext listeners.
    tls: RwLock<Option<Arc<rustls::ServerConfig>>>,
}

/// Refused clients answered at once; more are closed without a word.
const MAX_REFUSING: usize = 64;

/// A running NBD export.
pub struct NbdServer {
    shared: Arc<ServerShared>,
    listeners: Vec<Listener>,
}

struct Listener {
    addr: ListenAddr,
    fd: Arc<OwnedFd>,
    /// Connections of this listener currently open.
    live: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl NbdServer {
    /// Binds every address and starts accepting. Fails (naming the address) if any
    /// address cannot be bound.
    pub fn start(
        config: &config::Nbd,
        exports: Arc<Exports>,
        reactors: Vec<ReactorHandle>,
    ) -> io::Result<NbdServer> {
        let shared = Arc::new(ServerShared {
            exports,
            reactors,
            next: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
            connections: AtomicUsize::new(0),
            refusing: AtomicUsize::new(0),
            max_connections: config.max_connections as usize,
            timeouts: conn::Timeouts { stall: config.stall_timeout, idle: config.idle_timeout },
            socket_io: config.socket_io,
            zero_copy: config.zero_copy_send,
            multishot: config.multishot_receive,
            tls: RwLock::new(load_tls(config.tls.as_ref())?),
        });
        let mut listeners = Vec::new();
        for addr in &config.listen {
            let l = bind(addr, &config.socket_perms)
                .map_err(|e| io::Error::new(e.kind(), format!("{addr}: {e}")))?;
            if let ListenAddr::Tcp(a) = addr
                && !a.ip().is_loopback()
                && config.tls.is_none()
            {
                tracing::warn!(
                    "NBD listener {addr} is reachable from other hosts without TLS: anyone who \
                     can reach it can read and write every export (configure [nbd.tls])"
                );
            }
            listeners.push(l);
        }
        for l in &mut listeners {
            let fd = l.fd.clone();
            let live = l.live.clone();
            let shared = shared.clone();
            let tcp = matches!(l.addr, ListenAddr::Tcp(_));
            l.thread = Some(
                std::thread::Builder::new()
                    .name(format!("nbd-accept {}", l.addr))
                    .spawn(move || accept_loop(&fd, tcp, &live, &shared))?,
            );
        }
        Ok(NbdServer { shared, listeners })
    }

    pub fn exports(&self) -> &Arc<Exports> {
        &self.shared.exports
    }

    /// Re-reads the TLS credentials (reload). On error the ones in use stay and the
    /// error names the file. Turning TLS on or off needs a restart.
    pub fn set_tls(&self, files: Option<&config::TlsFiles>) -> io::Result<()> {
        let mut cur = self.shared.tls.write().unwrap_or_else(|p| p.into_inner());
        if cur.is_some() != files.is_some() {
            return Err(io::Error::other("turning [nbd.tls] on or off needs a restart"));
        }
        *cur = load_tls(files)?;
        Ok(())
    }

    /// Connections currently open.
    pub fn connection_count(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Closes every connection to one export gracefully (requests in flight are
    /// answered) and drops the reactors' channels to it. The caller has removed the
    /// export from [`Exports`] and retired its device first, so no new connection can
    /// reach it. Returns once the connections are gone.
    pub fn close_export(&self, name: &str) {
        for r in &self.shared.reactors {
            let name = name.to_string();
            r.block_on(move || async move { close_local(Some(&name)).await });
        }
    }

    /// Stops accepting, then closes every connection after its requests in flight are
    /// answered. Returns once all connections are closed.
    pub fn shutdown(mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        for l in &mut self.listeners {
            // SAFETY: shutdown on a listening socket we own wakes its blocked accept().
            unsafe { libc::shutdown(l.fd.as_raw_fd(), libc::SHUT_RDWR) };
            if let Some(t) = l.thread.take() {
                let _ = t.join();
            }
            if let ListenAddr::Unix(p) = &l.addr {
                let _ = std::fs::remove_file(p);
            }
        }
        for r in &self.shared.reactors {
            r.block_on(|| async { close_local(None).await });
        }
    }
}

fn load_tls(files: Option<&config::TlsFiles>) -> io::Result<Option<Arc<rustls::ServerConfig>>> {
    let Some(files) = files else { return Ok(None) };
    let cfg = drivers::io::tls::creds::server_config(files)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("[nbd.tls]: {e}")))?;
    Ok(Some(cfg))
}

fn bind(addr: &ListenAddr, perms: &config::SocketPerms) -> io::Result<Listener> {
    let fd: OwnedFd = match addr {
        ListenAddr::Tcp(a) => TcpListener::bind(a)?.into(),
        ListenAddr::Unix(p) => {
            remove_stale_socket(p)?;
            let l = UnixListener::bind(p)?;
            crate::perms::apply(p, perms)?;
            l.into()
        }
    };
    Ok(Listener {
        addr: addr.clone(),
        fd: Arc::new(fd),
        live: Arc::new(AtomicUsize::new(0)),
        thread: None,
    })
}

/// A socket file left by an earlier run is replaced; any other file is an error.
fn remove_stale_socket(p: &PathBuf) -> io::Result<()> {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(p),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "exists and is not a socket; refusing to replace it",
        )),
        Err(_) => Ok(()),
    }
}

fn accept_loop(fd: &OwnedFd, tcp: bool, live: &Arc<AtomicUsize>, shared: &Arc<ServerShared>) {
    loop {
        // SAFETY: accept4 on our listening socket; we pass no address buffer.
        let c = unsafe {
            libc::accept4(
                fd.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if shared.stopping.load(Ordering::SeqCst) {
            if c >= 0 {
                // SAFETY: closing the descriptor accept4 just returned.
                unsafe { libc::close(c) };
            }
            return;
        }
        if c < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR | libc::ECONNABORTED | libc::EPROTO) => continue,
                Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
                    tracing::warn!("accept failed: {e}; retrying shortly");
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
                _ => {
                    tracing::error!("accept failed: {e}; listener stops");
                    return;
                }
            }
        }
        // SAFETY: `c` is a fresh descriptor that nothing else owns.
        let stream = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(c) };
        if tcp {
            let one: libc::c_int = 1;
            // SAFETY: setsockopt with a valid int option value.
            unsafe {
                libc::setsockopt(
                    stream.as_raw_fd(),
                    libc::IPPROTO_TCP,
                    libc::TCP_NODELAY,
                    (&one as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as u32,
                )
            };
        }
        let i = shared.next.fetch_add(1, Ordering::Relaxed) % shared.reactors.len();
        if live.load(Ordering::SeqCst) >= shared.max_connections {
            refuse(stream, &shared.reactors[i], shared);
            continue;
        }
        let shared2 = shared.clone();
        let live = live.clone();
        live.fetch_add(1, Ordering::SeqCst);
        shared.connections.fetch_add(1, Ordering::SeqCst);
        let session = Session {
            exports: shared.exports.clone(),
            tls: shared.tls.read().unwrap_or_else(|p| p.into_inner()).clone(),
            peer: peer_name(&stream),
            zero_copy: shared.zero_copy,
            multishot: shared.multishot,
        };
        shared.reactors[i].spawn(move || async move {
            serve(stream, session, shared2.timeouts, shared2.socket_io).await;
            shared2.connections.fetch_sub(1, Ordering::SeqCst);
            live.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

/// A client past `max_connections`: told why on a reactor (bounded), or just closed.
fn refuse(stream: OwnedFd, reactor: &ReactorHandle, shared: &Arc<ServerShared>) {
    let max = shared.max_connections;
    if shared.refusing.fetch_add(1, Ordering::SeqCst) >= MAX_REFUSING {
        shared.refusing.fetch_sub(1, Ordering::SeqCst);
        tracing::warn!("NBD listener at max_connections ({max}); closing a new connection");
        return;
    }
    tracing::warn!("NBD listener at max_connections ({max}); refusing a new client");
    let shared = shared.clone();
    reactor.spawn(move || async move {
        if let Ok(sock) = poller::Async::new(stream) {
            let sock = Stream::plain(drivers::io::net::Socket::Epoll(sock));
            let why = format!("too many connections (this server's max_connections is {max})");
            let _ =
                poller::timeout(handshake::REFUSE_TIMEOUT, handshake::refuse(&sock, &why)).await;
        }
        shared.refusing.fetch_sub(1, Ordering::SeqCst);
    });
}

/// The NBD state of one reactor: device channels shared by its connections, and its
/// live connections (for shutdown).
#[derive(Default)]
struct Local {
    channels: HashMap<String, Rc<BdevChannel>>,
    conns: Vec<Weak<conn::Conn>>,
}

thread_local! {
    static LOCAL: RefCell<Local> = RefCell::new(Local::default());
}

/// The current reactor's channel to `bdev`, opened on first use (shared by every
/// export on this reactor).
pub(crate) fn channel_for(bdev: &Arc<Bdev>) -> Result<Rc<BdevChannel>, IoError> {
    LOCAL.with(|l| {
        let mut l = l.borrow_mut();
        if let Some(ch) = l.channels.get(bdev.name())
            && Arc::ptr_eq(ch.bdev(), bdev)
            && !bdev.is_retired()
        {
            return Ok(ch.clone());
        }
        let ch = Rc::new(bdev.channel()?);
        l.channels.insert(bdev.name().to_string(), ch.clone());
        Ok(ch)
    })
}

/// What a new connection's handshake needs to know.
pub(crate) struct Session {
    pub exports: Arc<Exports>,
    /// TLS is required (and these are the credentials) when set.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// The client's address, for log lines.
    pub peer: String,
    /// `nbd.zero_copy_send`.
    pub zero_copy: config::ZeroCopySend,
    /// `nbd.multishot_receive`.
    pub multishot: bool,
}

/// The client's address (`ip:port`) or, on a unix socket, its process and user.
fn peer_name(fd: &OwnedFd) -> String {
    use nix::sys::socket::{SockaddrStorage, getpeername, getsockopt, sockopt::PeerCredentials};
    if let Ok(a) = getpeername::<SockaddrStorage>(fd.as_raw_fd()) {
        if let Some(v4) = a.as_sockaddr_in() {
            return std::net::SocketAddrV4::from(*v4).to_string();
        }
        if let Some(v6) = a.as_sockaddr_in6() {
            return std::net::SocketAddrV6::from(*v6).to_string();
        }
    }
    match getsockopt(fd, PeerCredentials) {
        Ok(c) => format!("unix client (pid {}, uid {})", c.pid(), c.uid()),
        Err(_) => "unix client".to_string(),
    }
}

pub(crate) async fn serve(
    stream: OwnedFd,
    session: Session,
    timeouts: conn::Timeouts,
    socket_io: config::SocketIo,
) {
    let sock = match poller::Async::new(stream)
        .and_then(|s| drivers::io::net::Socket::new(s, socket_io))
    {
        Ok(s) => Stream::plain(s),
        Err(e) => {
            tracing::warn!("cannot register an NBD connection: {e}");
            return;
        }
    };
    let mut sock = sock;
    let negotiate = handshake::negotiate(&mut sock, &session);
    let negotiated = match poller::timeout(handshake::HANDSHAKE_TIMEOUT, negotiate).await {
        Ok(Ok(Some(n))) => n,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            tracing::debug!(client = session.peer, "NBD handshake ended: {e}");
            return;
        }
        Err(_) => {
            tracing::info!(
                client = session.peer,
                "NBD client did not finish its handshake in time; disconnecting"
            );
            return;
        }
    };
    let ch = match channel_for(&negotiated.bdev) {
        Ok(ch) => ch,
        Err(e) => {
            tracing::error!(export = negotiated.bdev.name(), "cannot open device channel: {e}");
            return;
        }
    };
    let c = Rc::new(conn::Conn::new(sock, ch, &negotiated, &session));
    LOCAL.with(|l| {
        let mut l = l.borrow_mut();
        l.conns.retain(|w| w.strong_count() > 0);
        l.conns.push(Rc::downgrade(&c));
    });
    conn::run(c, timeouts).await;
}

/// Closes this reactor's connections gracefully (those to export `only`, or all) and
/// waits for them to go; then drops the matching cached channels.
async fn close_local(only: Option<&str>) {
    let matches = |c: &conn::Conn| only.is_none_or(|n| c.export() == n);
    loop {
        let live: Vec<Rc<conn::Conn>> = LOCAL.with(|l| {
            l.borrow().conns.iter().filter_map(|w| w.upgrade()).filter(|c| matches(c)).collect()
        });
        if live.is_empty() {
            break;
        }
        for c in &live {
            c.stop_reading();
        }
        drop(live);
        poller::sleep(Duration::from_millis(2)).await;
    }
    LOCAL.with(|l| {
        let mut l = l.borrow_mut();
        l.conns.retain(|w| w.strong_count() > 0);
        match only {
            Some(n) => {
                l.channels.remove(n);
            }
            None => l.channels.clear(),
        }
    });
}
