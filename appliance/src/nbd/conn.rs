//! The transmission phase of one NBD connection, on its reactor.
//!
//! Three kinds of task cooperate through the [`Conn`]:
//! - the reader (the connection's own task) parses request headers out of a 64 KiB
//!   receive buffer, receives write payloads straight into DMA buffers, and spawns one
//!   request task per request into a fixed [`TaskPool`] (no allocation per request);
//!   when the pool is full it stops reading, which is the backpressure the client sees;
//! - request tasks run the operation on the reactor's device channel and queue their
//!   reply; they finish in any order, so replies go out of order;
//! - the writer drains the reply queue with one `sendmsg` of up to 64 iovecs per
//!   attempt, so replies completed in the same tick share a syscall.
//!
//! Bad requests get the protocol's error reply (`EINVAL`, `EPERM`, `ENOSPC`, ...). A
//! request that desynchronises the stream (bad magic, a payload too large to skip) ends
//! the connection; other connections are unaffected.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::task::{Poll, Waker};

use drivers::{Admit, BdevChannel, IoError, IoSeg, ReqKind, ZeroFlags};
use poller::{Async, DmaBuf, TaskPool, dma};

use super::handshake::Negotiated;
use super::proto::{self, ReplyMode, Request};

/// Requests in flight per connection.
pub const MAX_IN_FLIGHT: u32 = 128;
/// The receive buffer for request headers (and small payload fragments).
const RX_BUF: usize = 64 << 10;
/// Payloads of refused writes up to this size are read and dropped so the connection
/// stays usable; larger ones end the connection.
const MAX_DRAIN: u64 = 1 << 30;
/// Extents per block-status reply.
const MAX_EXTENTS: usize = 128;
/// Room for the largest reply header: an extended chunk header, an error payload and
/// its message.
const HDR_CAP: usize = 128;
/// iovecs per sendmsg.
const IOV_BATCH: usize = 64;

/// One queued reply: header bytes and an optional data buffer.
pub struct Reply {
    hdr: [u8; HDR_CAP],
    hdr_len: u16,
    data: Option<DmaBuf>,
    failed: bool,
}

impl Reply {
    fn len(&self) -> usize {
        self.hdr_len as usize + self.data.as_ref().map_or(0, DmaBuf::len)
    }
}

/// A connection in the transmission phase.
pub struct Conn {
    sock: Async<OwnedFd>,
    ch: Rc<BdevChannel>,
    mode: ReplyMode,
    base_allocation: bool,
    max_block: u32,
    out: RefCell<VecDeque<Reply>>,
    /// Bytes of the front reply already sent.
    out_sent: Cell<usize>,
    writer_waker: RefCell<Option<Waker>>,
    owner_waker: RefCell<Option<Waker>>,
    /// The socket failed: drop replies, stop.
    dead: Cell<bool>,
    /// Still accepting requests.
    reading: Cell<bool>,
    /// No more replies will be queued; the writer exits when the queue is empty.
    closing: Cell<bool>,
    writer_done: Cell<bool>,
    stats: Option<Rc<crate::metrics::LocalStats>>,
}

impl Conn {
    pub fn new(sock: Async<OwnedFd>, ch: Rc<BdevChannel>, n: &Negotiated) -> Self {
        Conn {
            sock,
            ch,
            mode: n.mode,
            base_allocation: n.base_allocation,
            max_block: n.max_block,
            out: RefCell::new(VecDeque::with_capacity(2 * MAX_IN_FLIGHT as usize)),
            out_sent: Cell::new(0),
            writer_waker: RefCell::new(None),
            owner_waker: RefCell::new(None),
            dead: Cell::new(false),
            reading: Cell::new(true),
            closing: Cell::new(false),
            writer_done: Cell::new(false),
            stats: crate::metrics::local_stats(n.bdev.name(), "nbd"),
        }
    }

    /// The export this connection serves.
    pub fn export(&self) -> &str {
        self.ch.bdev().name()
    }

    /// Stops accepting requests; those in flight still complete and are answered.
    pub fn stop_reading(&self) {
        if self.reading.replace(false) {
            // SAFETY: shutdown on our own socket; it makes the reader's recv return 0.
            unsafe { libc::shutdown(self.sock.get_ref().as_raw_fd(), libc::SHUT_RD) };
        }
    }

    fn push(&self, r: Reply) {
        if self.dead.get() {
            return;
        }
        self.out.borrow_mut().push_back(r);
        if let Some(w) = self.writer_waker.borrow_mut().take() {
            w.wake();
        }
    }

    fn wake_writer(&self) {
        if let Some(w) = self.writer_waker.borrow_mut().take() {
            w.wake();
        }
    }

    // --- reply encoding -------------------------------------------------------------

    fn blank() -> Reply {
        Reply { hdr: [0u8; HDR_CAP], hdr_len: 0, data: None, failed: false }
    }

    /// Success without data. With structured replies a read must be answered with
    /// chunks (doc/proto.md), so an empty read gets a lone `NONE` chunk; other commands
    /// get simple replies unless extended headers were negotiated.
    fn ok(&self, req: &Request) -> Reply {
        let mut r = Self::blank();
        let chunk = match self.mode {
            ReplyMode::Extended => true,
            ReplyMode::Structured => req.kind == proto::CMD_READ,
            ReplyMode::Simple => false,
        };
        r.hdr_len = match chunk {
            true => proto::encode_chunk(
                &mut r.hdr,
                self.mode,
                proto::REPLY_FLAG_DONE,
                proto::REPLY_TYPE_NONE,
                req.cookie,
                req.offset,
                0,
            ),
            false => proto::encode_simple(&mut r.hdr, 0, req.cookie),
        } as u16;
        r
    }

    fn error(&self, req: &Request, nbd_errno: u32, msg: &str) -> Reply {
        let mut r = Self::blank();
        r.failed = true;
        if self.mode == ReplyMode::Simple {
            r.hdr_len = proto::encode_simple(&mut r.hdr, nbd_errno, req.cookie) as u16;
            return r;
        }
        let msg = &msg.as_bytes()[..msg.len().min(HDR_CAP - 32 - 6)];
        let n = proto::encode_chunk(
            &mut r.hdr,
            self.mode,
            proto::REPLY_FLAG_DONE,
            proto::REPLY_TYPE_ERROR,
            req.cookie,
            req.offset,
            6 + msg.len() as u64,
        );
        r.hdr[n..n + 4].copy_from_slice(&nbd_errno.to_be_bytes());
        r.hdr[n + 4..n + 6].copy_from_slice(&(msg.len() as u16).to_be_bytes());
        r.hdr[n + 6..n + 6 + msg.len()].copy_from_slice(msg);
        r.hdr_len = (n + 6 + msg.len()) as u16;
        r
    }

    /// The one place a device error becomes an NBD error (doc/proto.md, "Error
    /// values"): past the end is ENOSPC for writes and EINVAL otherwise.
    fn io_error(&self, req: &Request, e: IoError) -> Reply {
        let writes = matches!(req.kind, proto::CMD_WRITE | proto::CMD_WRITE_ZEROES);
        let (code, msg) = match e {
            IoError::OutOfRange if writes => {
                (proto::ENOSPC, "request beyond the end of the export")
            }
            IoError::OutOfRange => (proto::EINVAL, "request beyond the end of the export"),
            IoError::Invalid => (proto::EINVAL, "malformed request"),
            IoError::TooLarge => (proto::EINVAL, "request larger than the maximum block size"),
            IoError::ReadOnly => (proto::EPERM, "export is read-only"),
            IoError::NoSpace => (proto::ENOSPC, "no space left for the image"),
            IoError::NotSupported => (proto::ENOTSUP, "operation not supported by this export"),
            IoError::Corrupt => (proto::EIO, "image is corrupt; see the server log"),
            IoError::Shutdown => (proto::ESHUTDOWN, "server is shutting down"),
            IoError::Os(errno) => (proto::errno_to_nbd(errno), "I/O error on the server"),
        };
        self.error(req, code, msg)
    }

    fn read_data(&self, req: &Request, buf: DmaBuf) -> Reply {
        let mut r = Self::blank();
        r.hdr_len = match self.mode {
            ReplyMode::Simple => proto::encode_simple(&mut r.hdr, 0, req.cookie),
            mode => {
                let n = proto::encode_chunk(
                    &mut r.hdr,
                    mode,
                    proto::REPLY_FLAG_DONE,
                    proto::REPLY_TYPE_OFFSET_DATA,
                    req.cookie,
                    req.offset,
                    8 + buf.len() as u64,
                );
                r.hdr[n..n + 8].copy_from_slice(&req.offset.to_be_bytes());
                n + 8
            }
        } as u16;
        r.data = Some(buf);
        r
    }

    // --- request execution ----------------------------------------------------------

    async fn execute(&self, req: Request, payload: Option<DmaBuf>) -> Reply {
        let info = self.ch.info();
        let structured = self.mode != ReplyMode::Simple;
        let valid_flags = proto::CMD_FLAG_FUA
            | match req.kind {
                proto::CMD_READ if structured => proto::CMD_FLAG_DF,
                proto::CMD_WRITE_ZEROES => proto::CMD_FLAG_NO_HOLE | proto::CMD_FLAG_FAST_ZERO,
                proto::CMD_BLOCK_STATUS => proto::CMD_FLAG_REQ_ONE,
                _ => 0,
            };
        if req.flags & !valid_flags != 0 {
            return self.error(&req, proto::EINVAL, "unsupported command flags");
        }
        let fua = req.flags & proto::CMD_FLAG_FUA != 0;
        let result = match req.kind {
            proto::CMD_READ => return self.read(req).await,
            proto::CMD_WRITE => match payload {
                Some(mut buf) => self.ch.write(req.offset, &[IoSeg::from_dma(&mut buf)], fua).await,
                // A zero-length write has no payload; the device answers it.
                None => self.ch.write(req.offset, &[], fua).await,
            },
            proto::CMD_FLUSH => self.ch.flush().await,
            proto::CMD_TRIM => match self.ch.discard(req.offset, req.length).await {
                Ok(()) if fua => self.ch.flush().await,
                other => other,
            },
            proto::CMD_WRITE_ZEROES => {
                let flags = ZeroFlags {
                    may_unmap: req.flags & proto::CMD_FLAG_NO_HOLE == 0,
                    fast_only: req.flags & proto::CMD_FLAG_FAST_ZERO != 0,
                    fua,
                };
                if flags.fast_only && !info.can_fast_zero {
                    return self.error(&req, proto::ENOTSUP, "fast zeroing not supported");
                }
                self.ch.write_zeroes(req.offset, req.length, flags).await
            }
            proto::CMD_CACHE => self.ch.cache(req.offset, req.length).await,
            proto::CMD_BLOCK_STATUS => return self.block_status(req).await,
            _ => return self.error(&req, proto::EINVAL, "unknown command"),
        };
        match result {
            Ok(()) => self.ok(&req),
            Err(e) => self.io_error(&req, e),
        }
    }

    async fn read(&self, req: Request) -> Reply {
        if req.length > u64::from(self.max_block) {
            return self.error(&req, proto::EINVAL, "read larger than the maximum block size");
        }
        match self.ch.info().admit(ReqKind::Read, req.offset, req.length) {
            Ok(Admit::Go) => {}
            Ok(Admit::Nothing) => return self.ok(&req),
            Err(e) => return self.io_error(&req, e),
        }
        let mut buf = match dma::alloc_wait(req.length as usize).await {
            Ok(b) => b,
            Err(_) => return self.error(&req, proto::ENOMEM, "no buffer for this read"),
        };
        match self.ch.read(req.offset, &[IoSeg::from_dma(&mut buf)]).await {
            Ok(()) => self.read_data(&req, buf),
            Err(e) => self.io_error(&req, e),
        }
    }

    async fn block_status(&self, req: Request) -> Reply {
        if !self.base_allocation {
            return self.error(&req, proto::EINVAL, "no metadata context was negotiated");
        }
        if let Err(e) = self.ch.info().admit(ReqKind::BlockStatus, req.offset, req.length) {
            return self.io_error(&req, e);
        }
        let ext = self.mode == ReplyMode::Extended;
        let desc = if ext { 16 } else { 8 };
        let limit = if req.flags & proto::CMD_FLAG_REQ_ONE != 0 { 1 } else { MAX_EXTENTS };
        let mut buf = match dma::alloc_wait(8 + MAX_EXTENTS * 16).await {
            Ok(b) => b,
            Err(_) => return self.error(&req, proto::ENOMEM, "no buffer for block status"),
        };
        let head = if ext { 8 } else { 4 };
        let end = req.offset + req.length;
        let mut off = req.offset;
        let mut count = 0usize;
        let mut last: Option<(u64, u32)> = None;
        let emit = |buf: &mut DmaBuf, count: &mut usize, len: u64, flags: u32| {
            let p = head + *count * desc;
            let b = buf.as_mut_slice();
            if ext {
                b[p..p + 8].copy_from_slice(&len.to_be_bytes());
                b[p + 8..p + 16].copy_from_slice(&u64::from(flags).to_be_bytes());
            } else {
                b[p..p + 4].copy_from_slice(&(len as u32).to_be_bytes());
                b[p + 4..p + 8].copy_from_slice(&flags.to_be_bytes());
            }
            *count += 1;
        };
        buf.set_len(buf.capacity());
        while off < end {
            let st = match self.ch.block_status(off, end - off).await {
                Ok(s) => s,
                Err(e) => return self.io_error(&req, e),
            };
            let flags = if st.hole { proto::STATE_HOLE } else { 0 }
                | if st.zero { proto::STATE_ZERO } else { 0 };
            let len = st.len.clamp(1, end - off);
            last = match last {
                Some((l, f)) if f == flags => Some((l + len, f)),
                Some((l, f)) => {
                    emit(&mut buf, &mut count, l, f);
                    if count == limit { None } else { Some((len, flags)) }
                }
                None => Some((len, flags)),
            };
            off += len;
            if count == limit {
                break;
            }
        }
        if let Some((l, f)) = last
            && count < limit
        {
            emit(&mut buf, &mut count, l, f);
        }
        let b = buf.as_mut_slice();
        b[0..4].copy_from_slice(&proto::BASE_ALLOCATION_ID.to_be_bytes());
        if ext {
            b[4..8].copy_from_slice(&(count as u32).to_be_bytes());
        }
        let payload = head + count * desc;
        buf.set_len(payload);
        let mut r = Self::blank();
        r.hdr_len = proto::encode_chunk(
            &mut r.hdr,
            self.mode,
            proto::REPLY_FLAG_DONE,
            if ext { proto::REPLY_TYPE_BLOCK_STATUS_EXT } else { proto::REPLY_TYPE_BLOCK_STATUS },
            req.cookie,
            req.offset,
            payload as u64,
        ) as u16;
        r.data = Some(buf);
        r
    }

    // --- sending --------------------------------------------------------------------

    /// One sendmsg of as many queued replies as fit in the iovec batch.
    fn send_some(&self, fd: RawFd) -> io::Result<()> {
        let mut q = self.out.borrow_mut();
        let n = {
            let mut iov: [IoSlice<'_>; IOV_BATCH] = [IoSlice::new(&[]); IOV_BATCH];
            let mut k = 0;
            let mut skip = self.out_sent.get();
            for r in q.iter() {
                if k + 2 > IOV_BATCH {
                    break;
                }
                let hdr = &r.hdr[..r.hdr_len as usize];
                if skip < hdr.len() {
                    iov[k] = IoSlice::new(&hdr[skip..]);
                    k += 1;
                    skip = 0;
                } else {
                    skip -= hdr.len();
                }
                if let Some(d) = &r.data {
                    let d = d.as_slice();
                    if skip < d.len() {
                        iov[k] = IoSlice::new(&d[skip..]);
                        k += 1;
                    }
                    skip = 0;
                }
            }
            poller::fd::writev_fd(fd, &iov[..k])?
        };
        let mut left = n + self.out_sent.get();
        while let Some(front) = q.front() {
            let len = front.len();
            if left < len {
                break;
            }
            left -= len;
            q.pop_front();
        }
        self.out_sent.set(left);
        Ok(())
    }
}

async fn writer(c: Rc<Conn>) {
    loop {
        std::future::poll_fn(|cx| {
            if !c.out.borrow().is_empty() || c.closing.get() || c.dead.get() {
                Poll::Ready(())
            } else {
                *c.writer_waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await;
        if c.dead.get() || (c.out.borrow().is_empty() && c.closing.get()) {
            break;
        }
        let sent = std::future::poll_fn(|cx| c.sock.poll_io(cx, true, |fd| c.send_some(fd))).await;
        if let Err(e) = sent {
            tracing::debug!("NBD connection lost while replying: {e}");
            c.dead.set(true);
            c.stop_reading();
            c.out.borrow_mut().clear();
        }
    }
    c.writer_done.set(true);
    if let Some(w) = c.owner_waker.borrow_mut().take() {
        w.wake();
    }
}

async fn handle(
    c: Rc<Conn>,
    req: Request,
    payload: Option<DmaBuf>,
    refused: Option<(u32, &'static str)>,
) {
    crate::debug::before_request(req.offset, req.length).await;
    let started = c.stats.as_ref().map(|s| s.start());
    let reply = match refused {
        Some((code, msg)) => c.error(&req, code, msg),
        None => c.execute(req, payload).await,
    };
    if let (Some(s), Some(t)) = (&c.stats, started) {
        use crate::metrics::Op;
        let (op, bytes) = match req.kind {
            proto::CMD_READ => (Op::Read, req.length),
            proto::CMD_WRITE => (Op::Write, req.length),
            proto::CMD_FLUSH => (Op::Flush, 0),
            proto::CMD_TRIM => (Op::Discard, req.length),
            proto::CMD_WRITE_ZEROES => (Op::WriteZeroes, req.length),
            _ => (Op::Other, 0),
        };
        s.done(op, bytes, !reply.failed, t);
    }
    c.push(reply);
}

/// Serves the connection until the client disconnects, the socket fails, or
/// [`Conn::stop_reading`] is called; then answers what is in flight and returns.
pub async fn run(c: Rc<Conn>) {
    poller::spawn(writer(c.clone()));
    let pool = TaskPool::new(MAX_IN_FLIGHT);
    read_requests(&c, &pool, handle).await;
    pool.drain().await;
    c.closing.set(true);
    c.wake_writer();
    std::future::poll_fn(|cx| {
        if c.writer_done.get() {
            Poll::Ready(())
        } else {
            *c.owner_waker.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        }
    })
    .await;
}

/// The receive side: a buffer of bytes read but not yet parsed.
struct Rx {
    buf: Box<[u8]>,
    lo: usize,
    hi: usize,
}

impl Rx {
    fn available(&self) -> usize {
        self.hi - self.lo
    }

    /// Reads more bytes; false at end of stream or on error.
    async fn fill(&mut self, sock: &Async<OwnedFd>) -> bool {
        if self.lo == self.hi {
            self.lo = 0;
            self.hi = 0;
        } else if self.buf.len() - self.hi < proto::EXTENDED_REQUEST_LEN {
            self.buf.copy_within(self.lo..self.hi, 0);
            self.hi -= self.lo;
            self.lo = 0;
        }
        match sock.read(&mut self.buf[self.hi..]).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.hi += n;
                true
            }
        }
    }

    /// Moves up to `dst.len()` buffered bytes into `dst`; returns how many.
    fn take(&mut self, dst: &mut [u8]) -> usize {
        let n = dst.len().min(self.available());
        dst[..n].copy_from_slice(&self.buf[self.lo..self.lo + n]);
        self.lo += n;
        n
    }

    /// Discards `len` payload bytes; false if the stream ends first.
    async fn skip(&mut self, sock: &Async<OwnedFd>, mut len: u64) -> bool {
        loop {
            let n = (len.min(self.available() as u64)) as usize;
            self.lo += n;
            len -= n as u64;
            if len == 0 {
                return true;
            }
            if !self.fill(sock).await {
                return false;
            }
        }
    }
}

async fn read_requests<F, Fut>(c: &Rc<Conn>, pool: &TaskPool<Fut>, handler: F)
where
    F: Fn(Rc<Conn>, Request, Option<DmaBuf>, Option<(u32, &'static str)>) -> Fut,
    Fut: std::future::Future<Output = ()> + 'static,
{
    let extended = c.mode == ReplyMode::Extended;
    let hlen = proto::request_len(extended);
    let mut rx = Rx { buf: vec![0u8; RX_BUF].into_boxed_slice(), lo: 0, hi: 0 };
    while c.reading.get() && !c.dead.get() {
        while rx.available() < hlen {
            if !rx.fill(&c.sock).await {
                return;
            }
        }
        let req = match proto::parse_request(&rx.buf[rx.lo..rx.lo + hlen], extended) {
            Ok(r) => r,
            Err(proto::BadMagic(m)) => {
                tracing::info!("NBD request with bad magic {m:#x}; disconnecting the client");
                return;
            }
        };
        rx.lo += hlen;
        let payload_len = if req.kind == proto::CMD_WRITE
            || (extended && req.flags & proto::CMD_FLAG_PAYLOAD_LEN != 0)
        {
            req.length
        } else {
            0
        };
        let mut payload = None;
        let mut refused = None;
        if payload_len > 0 {
            if req.kind == proto::CMD_WRITE && payload_len <= u64::from(c.max_block) {
                let Ok(mut buf) = dma::alloc_wait(payload_len as usize).await else {
                    return;
                };
                let have = rx.take(buf.as_mut_slice());
                if c.sock.read_exact(&mut buf.as_mut_slice()[have..]).await.is_err() {
                    return;
                }
                payload = Some(buf);
            } else if payload_len <= MAX_DRAIN {
                if !rx.skip(&c.sock, payload_len).await {
                    return;
                }
                refused = Some(if req.kind == proto::CMD_WRITE {
                    (proto::EINVAL, "write larger than the maximum block size")
                } else {
                    (proto::EINVAL, "this command takes no payload")
                });
            } else {
                tracing::info!(
                    "NBD request with a {payload_len}-byte payload; disconnecting the client"
                );
                return;
            }
        }
        if req.kind == proto::CMD_DISC {
            c.reading.set(false);
            return;
        }
        while pool.is_full() {
            pool.finished().await;
        }
        if pool.spawn(handler(c.clone(), req, payload, refused)).is_err() {
            unreachable!("the pool had a free slot");
        }
    }
}
