//! The receive side of a connection: request headers parsed out of a 64 KiB buffer,
//! each request admitted against its budgets before its payload is taken, payloads
//! received straight into DMA buffers (the buffer and the socket's two ways of
//! receiving: `rx.rs`).
//!
//! Every receive bumps the connection's progress counter, and `mid_request` tells the
//! watchdog when the reader is waiting for the rest of something the client started
//! (a header's tail, a payload), so a client that stalls there is disconnected after
//! `stall_timeout` instead of pinning its buffer forever.

use std::rc::Rc;

use poller::{DmaBuf, TaskPool, dma};

use super::conn::{Admitted, Conn};
use super::proto::{self, ReplyMode, Request};
use super::rx::Rx;

/// Payloads of refused writes up to this size are read and dropped so the connection
/// stays usable; larger ones end the connection.
const MAX_DRAIN: u64 = 1 << 30;

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
    let stream = c.sock.uring_socket().filter(|_| c.multishot).and_then(|s| s.recv_stream());
    let mut rx = Rx::new(stream);
    while c.reading.get() && !c.dead.get() {
        while rx.available() < hlen {
            c.mid_request.set(rx.available() > 0);
            if !rx.fill(c, hlen - rx.available()).await {
                return;
            }
        }
        let req = match proto::parse_request(&rx.parsed()[..hlen], extended) {
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
        rx.payload_ahead(payload_len, hlen);
        let Some((payload, refused)) = take_payload(c, &mut rx, &req, payload_len).await else {
            return;
        };
        c.mid_request.set(false);
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
        if !rx.receive(c, buf.as_mut_slice()).await {
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
