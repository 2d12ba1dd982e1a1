//! The client's connections on their owner reactor: requests sent with simple-reply
//! headers, replies matched to them by cookie, read payloads received straight into
//! the caller's buffers.
//!
//! Each connection has a fixed table of request slots (the cookie is the slot index
//! and a generation, so a stray reply is recognised), a send lock (a request's header
//! and payload go out together) and a reader task that owns the receive side. A
//! connection that fails (end of stream, an error, a reply that makes no sense) fails
//! every request waiting on it and is replaced by a reconnection made on a helper
//! thread (the handshake blocks), tried once a second until it succeeds or the client
//! closes; a request that finds no connection waits up to [`RECONNECT_WAIT`] for one,
//! then fails with `ENOTCONN` (which a mirror's error policy decides about).

use std::cell::{Cell, RefCell};
use std::io::IoSlice;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Poll, Waker};
use std::time::Duration;

use poller::{ReactorHandle, WaitList};

use super::handshake::{Connected, Export};
use super::uri::NbdUri;
use super::wire::*;
use crate::error::IoError;
use crate::io::tls::Stream as Socket;
use crate::seg::IoSeg;

/// Requests in flight per connection.
const SLOTS: usize = 64;
/// How often a failed server is dialled again.
const RECONNECT_EVERY: Duration = Duration::from_secs(1);
/// How long a request waits for a lost connection to come back.
const RECONNECT_WAIT: Duration = Duration::from_secs(3);

/// What a forwarded request asks of the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Read,
    Write { fua: bool },
    Flush,
    Zero { len: u64, unmap: bool },
    Trim { len: u64 },
}

#[derive(Clone, Copy)]
enum SlotState {
    Free,
    /// Sent; for a read, where its payload goes.
    Waiting {
        read: Option<(*const IoSeg<'static>, usize)>,
    },
    Done(u32),
}

struct Slot {
    state: SlotState,
    generation: u32,
    waker: Option<Waker>,
}

/// One connection to the server.
struct Conn {
    sock: Socket,
    sending: Cell<bool>,
    send_wait: WaitList,
    slots: RefCell<Vec<Slot>>,
    free: RefCell<Vec<usize>>,
    slot_wait: WaitList,
    dead: Cell<bool>,
}

/// A remote export's connections, on the owner reactor.
pub(crate) struct Client {
    pub uri: NbdUri,
    pub export: Export,
    conns: RefCell<Vec<Rc<Conn>>>,
    next: Cell<usize>,
    owner: ReactorHandle,
    id: u64,
    /// A helper thread is dialling.
    dialing: Arc<AtomicBool>,
    /// Tells the dialling thread to give up.
    closed: Arc<AtomicBool>,
    /// Woken when a connection is added.
    connected: WaitList,
}

fn errno(e: u32) -> IoError {
    match e {
        EPERM => IoError::ReadOnly,
        ENOSPC => IoError::NoSpace,
        EINVAL => IoError::Invalid,
        ENOTSUP => IoError::NotSupported,
        e => IoError::Os(e as i32),
    }
}

fn lost() -> IoError {
    IoError::Os(libc::ENOTCONN)
}

impl Conn {
    fn new(sock: Socket) -> Rc<Conn> {
        Rc::new(Conn {
            sock,
            sending: Cell::new(false),
            send_wait: WaitList::new(),
            slots: RefCell::new(
                (0..SLOTS)
                    .map(|_| Slot { state: SlotState::Free, generation: 0, waker: None })
                    .collect(),
            ),
            free: RefCell::new((0..SLOTS).rev().collect()),
            slot_wait: WaitList::new(),
            dead: Cell::new(false),
        })
    }

    async fn take_slot(&self) -> Result<usize, IoError> {
        loop {
            if self.dead.get() {
                return Err(lost());
            }
            if let Some(i) = self.free.borrow_mut().pop() {
                return Ok(i);
            }
            self.slot_wait.wait().await;
        }
    }

    fn release(&self, i: usize) {
        let mut slots = self.slots.borrow_mut();
        slots[i].state = SlotState::Free;
        slots[i].generation = slots[i].generation.wrapping_add(1);
        slots[i].waker = None;
        drop(slots);
        self.free.borrow_mut().push(i);
        self.slot_wait.wake_one();
    }

    /// Sends `bufs` whole, holding the send side so requests do not interleave.
    async fn send_all(&self, bufs: &mut [IoSlice<'_>]) -> Result<(), IoError> {
        while self.sending.get() {
            self.send_wait.wait().await;
        }
        self.sending.set(true);
        let mut bufs = bufs;
        let mut r = Ok(());
        while !bufs.is_empty() && !self.dead.get() {
            match self.sock.send(bufs).await {
                Ok(0) | Err(_) => {
                    r = Err(lost());
                    break;
                }
                Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            }
        }
        if self.dead.get() {
            r = Err(lost());
        }
        self.sending.set(false);
        self.send_wait.wake_one();
        if r.is_err() {
            self.fail();
        }
        r
    }

    /// Ends the connection: every waiting request fails.
    fn fail(&self) {
        if self.dead.replace(true) {
            return;
        }
        // SAFETY: shutdown on our own socket wakes its reader.
        unsafe { libc::shutdown(self.sock.fd(), libc::SHUT_RDWR) };
        for s in self.slots.borrow_mut().iter_mut() {
            if let SlotState::Waiting { .. } = s.state {
                s.state = SlotState::Done(libc::ENOTCONN as u32);
                if let Some(w) = s.waker.take() {
                    w.wake();
                }
            }
        }
        self.slot_wait.wake_all();
        self.send_wait.wake_all();
    }

    /// Waits for slot `i`'s reply; its error code.
    async fn reply(&self, i: usize) -> u32 {
        std::future::poll_fn(|cx| {
            let mut slots = self.slots.borrow_mut();
            match slots[i].state {
                SlotState::Done(e) => Poll::Ready(e),
                _ => {
                    slots[i].waker = Some(cx.waker().clone());
                    Poll::Pending
                }
            }
        })
        .await
    }

    /// Receives replies until the connection ends.
    async fn read_replies(self: Rc<Self>) {
        let r = self.read_loop().await;
        if let Err(e) = r {
            tracing::warn!("NBD client connection lost: {e}");
        }
        self.fail();
    }

    async fn read_loop(&self) -> Result<(), String> {
        let mut h = [0u8; 16];
        loop {
            self.sock.read_exact(&mut h).await.map_err(|e| format!("reading a reply: {e}"))?;
            if u32::from_be_bytes(h[..4].try_into().unwrap_or_default()) != SIMPLE_REPLY_MAGIC {
                return Err("a reply with a bad magic".into());
            }
            let error = u32::from_be_bytes(h[4..8].try_into().unwrap_or_default());
            let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap_or_default());
            let (i, generation) = ((cookie & 0xffff_ffff) as usize, (cookie >> 32) as u32);
            let state = {
                let slots = self.slots.borrow();
                match slots.get(i) {
                    Some(s) if s.generation == generation => s.state,
                    _ => return Err(format!("a reply to cookie {cookie:#x}, which was not sent")),
                }
            };
            let SlotState::Waiting { read } = state else {
                return Err(format!("a second reply to cookie {cookie:#x}"));
            };
            if let (Some((segs, n)), 0) = (read, error) {
                // SAFETY: the request that owns the slot borrows these segments until
                // its reply is in (it waits in `reply`, and the slot is not released
                // before); nothing else touches them meanwhile.
                let segs = unsafe { std::slice::from_raw_parts(segs, n) };
                for s in segs {
                    // SAFETY: as above: the segment is valid, writable memory.
                    let buf = unsafe { std::slice::from_raw_parts_mut(s.as_ptr(), s.len()) };
                    self.sock
                        .read_exact(buf)
                        .await
                        .map_err(|e| format!("reading read data: {e}"))?;
                }
            }
            let mut slots = self.slots.borrow_mut();
            slots[i].state = SlotState::Done(error);
            if let Some(w) = slots[i].waker.take() {
                w.wake();
            }
        }
    }
}

impl Client {
    /// The client of export `export` over `socks` (connected, negotiated), on the
    /// current reactor; reader tasks start at once.
    pub(crate) fn start(id: u64, uri: NbdUri, export: Export, socks: Vec<Socket>) -> Rc<Client> {
        let c = Rc::new(Client {
            uri,
            export,
            conns: RefCell::new(Vec::new()),
            next: Cell::new(0),
            owner: poller::current(),
            id,
            dialing: Arc::new(AtomicBool::new(false)),
            closed: Arc::new(AtomicBool::new(false)),
            connected: WaitList::new(),
        });
        for s in socks {
            c.add(s);
        }
        c
    }

    fn add(self: &Rc<Self>, sock: Socket) {
        let conn = Conn::new(sock);
        let (c2, me) = (conn.clone(), Rc::downgrade(self));
        poller::spawn(async move {
            c2.read_replies().await;
            // Lost: dial again at once rather than at the next request.
            if let Some(me) = Weak::upgrade(&me) {
                me.redial();
            }
        });
        let mut conns = self.conns.borrow_mut();
        match conns.iter().position(|c| c.dead.get()) {
            Some(i) => conns[i] = conn,
            None => conns.push(conn),
        }
        drop(conns);
        self.connected.wake_all();
    }

    /// A live connection, in turn.
    fn live(&self) -> Option<Rc<Conn>> {
        let conns = self.conns.borrow();
        let n = conns.len();
        let i = (0..n).map(|k| (self.next.get() + k) % n).find(|&i| !conns[i].dead.get())?;
        self.next.set(i + 1);
        Some(conns[i].clone())
    }

    /// A live connection; with none, waits a little for a reconnection.
    async fn pick(&self) -> Result<Rc<Conn>, IoError> {
        if let Some(c) = self.live() {
            return Ok(c);
        }
        self.redial();
        let _ = poller::timeout(RECONNECT_WAIT, async {
            while self.live().is_none() && !self.closed.load(Ordering::Relaxed) {
                self.connected.wait().await;
            }
        })
        .await;
        self.live().ok_or_else(lost)
    }

    /// Dials the server again on a helper thread, once a second until it answers or
    /// the client closes, and puts the new connection in place of a dead one on the
    /// owner reactor. One such thread at a time.
    fn redial(&self) {
        if self.closed.load(Ordering::Relaxed) || self.dialing.swap(true, Ordering::SeqCst) {
            return;
        }
        let (uri, owner, id, want) = (self.uri.clone(), self.owner.clone(), self.id, self.export);
        let (dialing, closed) = (self.dialing.clone(), self.closed.clone());
        let spawned = std::thread::Builder::new().name("nbd-redial".into()).spawn(move || {
            while !closed.load(Ordering::Relaxed) {
                match super::connect(&uri) {
                    Ok(c) if c.export.size == want.size => {
                        owner.run(move || super::reconnected(id, c));
                        break;
                    }
                    Ok(Connected { export: e, .. }) => {
                        tracing::warn!(
                            "{uri}: the export is {} bytes now, not {}",
                            e.size,
                            want.size
                        )
                    }
                    Err(e) => tracing::debug!("reconnecting: {e}"),
                }
                std::thread::sleep(RECONNECT_EVERY);
            }
            dialing.store(false, Ordering::SeqCst);
        });
        if let Err(e) = spawned {
            self.dialing.store(false, Ordering::SeqCst);
            tracing::warn!("cannot start a thread to reconnect to {}: {e}", self.uri);
        }
    }

    /// Takes a reconnected socket (on the owner reactor).
    pub(crate) fn reconnected(self: &Rc<Self>, sock: Socket) {
        if !self.closed.load(Ordering::Relaxed) {
            tracing::info!("reconnected to {}", self.uri);
            self.add(sock);
        }
    }

    /// Runs one request: `segs` receive a read's data or hold a write's. A FUA write
    /// to a server without FUA is a write and a flush.
    pub(crate) async fn request(
        &self,
        op: Op,
        off: u64,
        segs: &[IoSeg<'_>],
    ) -> Result<(), IoError> {
        if op == (Op::Write { fua: true }) && !self.export.has(FLAG_SEND_FUA) {
            self.send_one(Op::Write { fua: false }, off, segs).await?;
            return self.send_one(Op::Flush, 0, &[]).await;
        }
        self.send_one(op, off, segs).await
    }

    async fn send_one(&self, op: Op, off: u64, segs: &[IoSeg<'_>]) -> Result<(), IoError> {
        let e = &self.export;
        let (kind, flags, len) = match op {
            Op::Read => (CMD_READ, 0, crate::seg::total_len(segs) as u64),
            Op::Write { fua } => {
                (CMD_WRITE, if fua { CMD_FLAG_FUA } else { 0 }, crate::seg::total_len(segs) as u64)
            }
            Op::Flush if !e.has(FLAG_SEND_FLUSH) => return Ok(()),
            Op::Flush => (CMD_FLUSH, 0, 0),
            Op::Zero { .. } if !e.has(FLAG_SEND_WRITE_ZEROES) => return Err(IoError::NotSupported),
            Op::Zero { len, unmap } => {
                (CMD_WRITE_ZEROES, if unmap { 0 } else { CMD_FLAG_NO_HOLE }, len)
            }
            // Trimming is advisory: a server that cannot simply keeps the data.
            Op::Trim { .. } if !e.has(FLAG_SEND_TRIM) => return Ok(()),
            Op::Trim { len } => (CMD_TRIM, 0, len),
        };
        if len > u64::from(e.max_block) && matches!(op, Op::Read | Op::Write { .. }) {
            return Err(IoError::TooLarge);
        }
        let length = u32::try_from(len).map_err(|_| IoError::TooLarge)?;
        if e.has(FLAG_READ_ONLY) && !matches!(op, Op::Read | Op::Flush) {
            return Err(IoError::ReadOnly);
        }
        let conn = self.pick().await?;
        let i = conn.take_slot().await?;
        let generation = {
            let mut slots = conn.slots.borrow_mut();
            let read =
                (op == Op::Read).then(|| (segs.as_ptr().cast::<IoSeg<'static>>(), segs.len()));
            slots[i].state = SlotState::Waiting { read };
            slots[i].generation
        };
        let cookie = u64::from(generation) << 32 | i as u64;
        let mut h = [0u8; REQUEST_LEN];
        h[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        h[4..6].copy_from_slice(&flags.to_be_bytes());
        h[6..8].copy_from_slice(&kind.to_be_bytes());
        h[8..16].copy_from_slice(&cookie.to_be_bytes());
        h[16..24].copy_from_slice(&off.to_be_bytes());
        h[24..28].copy_from_slice(&length.to_be_bytes());
        let r = self.exchange(&conn, i, &h, if kind == CMD_WRITE { segs } else { &[] }).await;
        conn.release(i);
        r
    }

    /// Sends a request (header, then payload) and waits for its reply.
    async fn exchange(
        &self,
        conn: &Conn,
        i: usize,
        h: &[u8],
        payload: &[IoSeg<'_>],
    ) -> Result<(), IoError> {
        const MAX_IOV: usize = 64;
        let mut iov: [IoSlice<'_>; MAX_IOV] = [IoSlice::new(&[]); MAX_IOV];
        iov[0] = IoSlice::new(h);
        if payload.len() + 1 > MAX_IOV {
            conn.slots.borrow_mut()[i].state = SlotState::Free;
            return Err(IoError::TooLarge);
        }
        for (k, s) in payload.iter().enumerate() {
            // SAFETY: the caller's segment is valid for reads for this request's life.
            iov[k + 1] = IoSlice::new(unsafe { std::slice::from_raw_parts(s.as_ptr(), s.len()) });
        }
        conn.send_all(&mut iov[..payload.len() + 1]).await?;
        match conn.reply(i).await {
            0 => Ok(()),
            e => Err(errno(e)),
        }
    }

    /// Stops: no more requests or reconnections; the connections are told to
    /// disconnect and closed.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        self.connected.wake_all();
        for c in self.conns.borrow().iter() {
            if !c.dead.get() && !c.sending.get() {
                let mut h = [0u8; REQUEST_LEN];
                h[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
                h[6..8].copy_from_slice(&CMD_DISC.to_be_bytes());
                c.sock.send_now(&h);
            }
            c.fail();
        }
    }
}
