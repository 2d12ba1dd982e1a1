//! The NBD client as storage: a remote export (another appliance, qemu-nbd,
//! qemu-storage-daemon) read and written like a file — a mirror's target, or a disk
//! served from another host once a mirror has pivoted to it. Raw format on top.
//!
//! The connections live on one *owner* reactor (the one the storage was opened for):
//! one connection, or [`MULTI_CONNECTIONS`] when the server allows several
//! (`CAN_MULTI_CONN`, which also makes a flush on one cover the others; qemu-nbd's
//! default allows only one client). A channel on the owner hands requests to the
//! client through an inbox; a channel on any other reactor forwards them through the
//! owner's mailbox (`crate::route`: a pointer crosses, the data is not copied). The
//! handshake (`handshake`) is done with a blocking socket on the control plane before
//! the socket is handed to the owner; a lost connection is dialled again the same way
//! on a helper thread.
//!
//! Block status reports everything as data (this client does not negotiate
//! `base:allocation`); discards are trims when the server takes them; zero writes
//! are `NBD_CMD_WRITE_ZEROES` (`NO_HOLE` unless unmapping is allowed), or
//! `NotSupported` so the alignment layer writes zero bytes.

mod client;
mod handshake;
pub mod uri;
pub mod wire;

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use config::SocketIo;

use crate::io::tls::Stream;
use poller::{MailSender, Mailbox, ReactorHandle};

use self::client::{Client, Op};
use self::uri::NbdUri;
use super::probe::Alignment;
use super::{Allocation, Backend, BackendChannel, Extent, Storage, StoreFuture};
use crate::error::{IoError, OpenError};
use crate::route::{self, CallPtr, Forward, Inbox, Route};
use crate::seg::IoSeg;

/// Connections to a server that allows several.
pub const MULTI_CONNECTIONS: usize = 4;
/// Requests the owner runs at once.
const IN_FLIGHT: u32 = 256;
/// Capacity of the owner's mailbox.
const RING: usize = 1024;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// `[nbd.client_tls]`, loaded: the credentials `nbds://` connections use.
static CLIENT_TLS: RwLock<Option<Arc<rustls::ClientConfig>>> = RwLock::new(None);

/// Sets the client credentials for `nbds://` and `nbds+unix://` (start-up, reload);
/// connections already open keep theirs.
pub fn set_client_tls(cfg: Option<Arc<rustls::ClientConfig>>) {
    *CLIENT_TLS.write().unwrap_or_else(|p| p.into_inner()) = cfg;
}

fn client_tls() -> Option<Arc<rustls::ClientConfig>> {
    CLIENT_TLS.read().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Connects and negotiates with the current client credentials.
pub(crate) fn connect(u: &NbdUri) -> Result<handshake::Connected, String> {
    handshake::connect(u, client_tls().as_ref())
}

/// What the owner reactor keeps per client.
struct Owned {
    client: Rc<Client>,
    inbox: Rc<Inbox<Op>>,
    _mailbox: Mailbox,
}

thread_local! {
    static CLIENTS: RefCell<HashMap<u64, Owned>> = RefCell::new(HashMap::new());
}

/// Opens the export `uri` names, with its connections on `owner`. Control plane.
pub fn open(uri: &str, owner: &ReactorHandle) -> Result<Arc<Storage>, OpenError> {
    let path = PathBuf::from(uri);
    let u = NbdUri::parse(uri).map_err(|e| OpenError::invalid(&path, e))?;
    let first = connect(&u).map_err(|e| OpenError::invalid(&path, e))?;
    let export = first.export;
    let mut fds = vec![first];
    if export.has(wire::FLAG_CAN_MULTI_CONN) {
        for _ in 1..MULTI_CONNECTIONS {
            match connect(&u) {
                Ok(c) if c.export.size == export.size => fds.push(c),
                _ => break,
            }
        }
    }
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let (u2, count) = (u.clone(), fds.len());
    let tx =
        owner.call(move || start(id, u2, export, fds)).map_err(|e| OpenError::invalid(&path, e))?;
    tracing::info!(%u, size = export.size, connections = count, "NBD export opened");
    let backend = NbdBackend { id, uri: u, owner: owner.clone(), tx };
    let align = Alignment { mem: 1, request: export.min_block as usize };
    let read_only = export.has(wire::FLAG_READ_ONLY);
    Ok(Storage::new(Box::new(backend), Some(path), align, export.size, read_only, false))
}

/// On the owner: the client, its inbox and dispatcher, and the mailbox other
/// reactors reach it by.
fn start(
    id: u64,
    uri: NbdUri,
    export: handshake::Export,
    fds: Vec<handshake::Connected>,
) -> Result<MailSender<CallPtr<Op>>, String> {
    let mut socks = Vec::with_capacity(fds.len());
    for fd in fds {
        socks.push(socket(fd).map_err(|e| format!("{uri}: {e}"))?);
    }
    let client = Client::start(id, uri, export, socks);
    let inbox = Inbox::new();
    let c2 = client.clone();
    poller::spawn(route::dispatch(inbox.clone(), IN_FLIGHT, move |p| execute(c2.clone(), p)));
    let i2 = inbox.clone();
    let (mailbox, tx) = poller::mailbox(RING, move |p: CallPtr<Op>| i2.push(p));
    CLIENTS.with(|c| c.borrow_mut().insert(id, Owned { client, inbox, _mailbox: mailbox }));
    Ok(tx)
}

/// The connection's stream on this reactor, under TLS when it was negotiated so.
fn socket(c: handshake::Connected) -> std::io::Result<Stream> {
    let sock = crate::io::net::Socket::new(poller::Async::new(c.fd)?, SocketIo::Auto)?;
    Ok(match c.tls {
        None => Stream::plain(sock),
        Some(conn) => Stream::with_tls(sock, rustls::Connection::Client(conn)),
    })
}

/// On the owner: a reconnected socket for client `id`.
fn reconnected(id: u64, fd: handshake::Connected) {
    let Some(client) = CLIENTS.with(|c| c.borrow().get(&id).map(|o| o.client.clone())) else {
        return;
    };
    match socket(fd) {
        Ok(s) => client.reconnected(s),
        Err(e) => tracing::warn!("{}: {e}", client.uri),
    }
}

async fn execute(client: Rc<Client>, p: CallPtr<Op>) {
    // SAFETY: valid until we complete it (see `crate::route`).
    let call = unsafe { &*p.0 };
    // SAFETY: as above.
    let segs = unsafe { call.segs() };
    let r = client.request(call.op, call.off, segs).await;
    call.complete(r, 0);
}

struct NbdBackend {
    id: u64,
    uri: NbdUri,
    owner: ReactorHandle,
    tx: MailSender<CallPtr<Op>>,
}

impl Drop for NbdBackend {
    fn drop(&mut self) {
        let id = self.id;
        self.owner.run(move || {
            if let Some(o) = CLIENTS.with(|c| c.borrow_mut().remove(&id)) {
                o.inbox.close();
                o.client.close();
            }
        });
    }
}

impl Backend for NbdBackend {
    fn kind(&self) -> &'static str {
        "<nbd>"
    }

    fn open_channel(&self) -> Result<Box<dyn BackendChannel>, IoError> {
        let route = if poller::on_reactor() && poller::current_index() == self.owner.index() {
            let inbox = CLIENTS.with(|c| c.borrow().get(&self.id).map(|o| o.inbox.clone()));
            Route::Local(inbox.ok_or(IoError::Shutdown)?)
        } else {
            Route::Remote(self.tx.clone())
        };
        Ok(Box::new(NbdChannel { route }))
    }

    fn read_sync(&self, _buf: &mut [u8], _off: u64) -> std::io::Result<usize> {
        Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            format!("{}: an NBD export is read through a reactor", self.uri),
        ))
    }

    /// Flushes through the owner (control plane).
    fn sync(&self) -> std::io::Result<()> {
        let id = self.id;
        let r = self.owner.block_on(move || async move {
            let client = CLIENTS.with(|c| c.borrow().get(&id).map(|o| o.client.clone()));
            match client {
                Some(c) => c.request(Op::Flush, 0, &[]).await,
                None => Ok(()),
            }
        });
        r.map_err(|e| std::io::Error::other(format!("{}: flush: {e}", self.uri)))
    }
}

/// A channel to the client: every request is a call to the owner.
struct NbdChannel {
    route: Route<Op, Inbox<Op>>,
}

impl NbdChannel {
    async fn call(&self, op: Op, off: u64, segs: &[IoSeg<'_>]) -> Result<(), IoError> {
        Forward::new(&self.route, op, off, segs).await.0
    }
}

impl BackendChannel for NbdChannel {
    fn read<'a>(&'a self, off: u64, segs: &'a [IoSeg<'a>]) -> StoreFuture<'a> {
        StoreFuture::new(self.call(Op::Read, off, segs))
    }
    fn write<'a>(&'a self, off: u64, segs: &'a [IoSeg<'a>], fua: bool) -> StoreFuture<'a> {
        StoreFuture::new(self.call(Op::Write { fua }, off, segs))
    }
    fn flush(&self) -> StoreFuture<'_> {
        StoreFuture::new(self.call(Op::Flush, 0, &[]))
    }
    fn zero_range(&self, off: u64, len: u64, unmap: bool, _grows: bool) -> StoreFuture<'_> {
        StoreFuture::new(self.call(Op::Zero { len, unmap }, off, &[]))
    }
    fn discard(&self, off: u64, len: u64) -> StoreFuture<'_, bool> {
        StoreFuture::new(async move { self.call(Op::Trim { len }, off, &[]).await.map(|()| false) })
    }
    fn block_status(&self, _off: u64, len: u64) -> StoreFuture<'_, Extent> {
        StoreFuture::ready(Ok(Extent { len, allocation: Allocation::Data }))
    }
}
