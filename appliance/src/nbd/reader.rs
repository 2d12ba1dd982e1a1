//! The receive side of a connection: request headers parsed out of a 64 KiB buffer,
//! each request admitted against its budgets before its payload is taken, payloads
//! received straight into DMA buffers.
//!
//! Every receive bumps the connection's progress counter, and `mid_request` tells the
//! watchdog when the reader is waiting for the rest of something the client started
//! (a header's tail, a payload), so a client that stalls there is disconnected after
//! `stall_timeout` instead of pinning its buffer forever.

use std::rc::Rc;

use poller::{DmaBuf, TaskPool, dma};

use super::conn::{Admitted, Conn};
use super::proto::{self, ReplyMode, Request};

/// The receive buffer for request headers (and small payload fragments).
const RX_BUF: usize = 64 << 10;
/// Payloads of refused writes up to this size are read and dropped so the connection
/// stays usable; larger ones end the connection.
const MAX_DRAIN: u64 = 1 << 30;

/// A write payload at least this large is received straight into its DMA buffer: after
/// one, the next receive into the buffer takes only a request header, so the payload
/// that follows it is not copied in here first and then again (into a buffer the disk
/// has just read, cold in the cache: for 64 KiB writes over NBD that second copy was
/// the reactor's largest cost).
const DIRECT_PAYLOAD: u64 = 16 << 10;

/// Bytes read but not yet parsed.
struct Rx {
    buf: Box<[u8]>,
    lo: usize,
    hi: usize,
    /// The most the next receive takes (a request header after a large payload, the
    /// whole free space otherwise).
    limit: usize,
}

impl Rx {
    fn available(&self) -> usize {
        self.hi - self.lo
    }

    /// Reads more bytes; false at end of stream or on error.
    async fn fill(&mut self, c: &Conn) -> bool {
        if self.lo == self.hi {
            self.lo = 0;
            self.hi = 0;
        } else if self.buf.len() - self.hi < proto::EXTENDED_REQUEST_LEN {
            self.buf.copy_within(self.lo..self.hi, 0);
            self.hi -= self.lo;
            self.lo = 0;
        }
        let end = self.buf.len().min(self.hi + self.limit);
        match c.sock.read(&mut self.buf[self.hi..end]).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.hi += n;
                c.progress.set(c.progress.get() + 1);
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
    async fn skip(&mut self, c: &Conn, mut len: u64) -> bool {
        self.limit = self.buf.len();
        loop {
            let n = (len.min(self.available() as u64)) as usize;
            self.lo += n;
            len -= n as u64;
            if len == 0 {
                return true;
            }
            if !self.fill(c).await {
                return false;
            }
        }
    }
}

/// Receives the rest of `buf` from the socket after what `rx` already holds.
async fn receive(c: &Conn, rx: &mut Rx, buf: &mut [u8]) -> bool {
    let mut have = rx.take(buf);
    while have < buf.len() {
        match c.sock.read(&mut buf[have..]).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => {
                have += n;
                c.progress.set(c.progress.get() + 1);
            }
        }
    }
    true
}

/// The bytes of DMA buffers a request will hold until its reply is sent.
fn buffer_bytes(c: &Conn, req: &Request, payload_len: u64) -> usize {
    let fits = |len: u64| if len <= u64::from(c.max_block) { len as usize } else { 0 };
    match req.kind {
        proto::CMD_WRITE => fits(payload_len),
        proto::CMD_READ => fits(req.length),
        proto::CMD_BLOCK_STATUS => c.status_bytes,
        _ => 0,
    }
}

pub(super) async fn read_requests<F, Fut>(c: &Rc<Conn>, pool: &TaskPool<Fut>, handler: F)
where
    F: Fn(Rc<Conn>, Admitted) -> Fut,
    Fut: std::future::Future<Output = ()> + 'static,
{
    let extended = c.mode == ReplyMode::Extended;
    let hlen = proto::request_len(extended);
    let mut rx = Rx { buf: vec![0u8; RX_BUF].into_boxed_slice(), lo: 0, hi: 0, limit: RX_BUF };
    while c.reading.get() && !c.dead.get() {
        while rx.available() < hlen {
            c.mid_request.set(rx.available() > 0);
            if !rx.fill(c).await {
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
        if req.kind == proto::CMD_DISC {
            c.reading.set(false);
            return;
        }
        let payload_len = if req.kind == proto::CMD_WRITE
            || (extended && req.flags & proto::CMD_FLAG_PAYLOAD_LEN != 0)
        {
            req.length
        } else {
            0
        };
        c.mid_request.set(false);
        let ticket = c.budget.admit(buffer_bytes(c, &req, payload_len)).await;
        let Some((payload, refused)) = take_payload(c, &mut rx, &req, payload_len).await else {
            return;
        };
        c.mid_request.set(false);
        rx.limit = if payload_len >= DIRECT_PAYLOAD { hlen } else { RX_BUF };
        while pool.is_full() {
            pool.finished().await;
        }
        let a = Admitted { req, payload, refused, ticket };
        if !pool.spawn_with(|| handler(c.clone(), a)) {
            unreachable!("the pool had a free slot");
        }
    }
}

type Payload = (Option<DmaBuf>, Option<(u32, &'static str)>);

/// Takes a request's payload: into a DMA buffer for a write the server accepts,
/// drained for one it refuses (so the stream stays in sync). `None` ends the
/// connection (end of stream, or a payload too large to be honest).
async fn take_payload(c: &Conn, rx: &mut Rx, req: &Request, len: u64) -> Option<Payload> {
    if len == 0 {
        return Some((None, None));
    }
    if req.kind == proto::CMD_WRITE && len <= u64::from(c.max_block) {
        let mut buf = dma::alloc_wait(len as usize).await.ok()?;
        // Only now does the server wait on the client (not while it waited for its
        // own budget or buffers).
        c.mid_request.set(true);
        if !receive(c, rx, buf.as_mut_slice()).await {
            return None;
        }
        return Some((Some(buf), None));
    }
    if len > MAX_DRAIN {
        tracing::info!("NBD request with a {len}-byte payload; disconnecting the client");
        return None;
    }
    c.mid_request.set(true);
    if !rx.skip(c, len).await {
        return None;
    }
    let why = if req.kind == proto::CMD_WRITE {
        (proto::EINVAL, "write larger than the maximum block size")
    } else {
        (proto::EINVAL, "this command takes no payload")
    };
    Some((None, Some(why)))
}
