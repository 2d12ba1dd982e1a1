//! The transmission phase of one NBD connection, on its reactor.
//!
//! Four tasks cooperate through the [`Conn`]:
//! - the reader (the connection's own task, `reader`) parses request headers out of a
//!   64 KiB receive buffer, admits each request against the connection's and the
//!   reactor's budgets (`budget`), receives write payloads straight into DMA buffers,
//!   and spawns one request task per request into a fixed [`TaskPool`] (no allocation
//!   per request); a request that does not fit its budget stops the reader, which is
//!   the backpressure the client sees;
//! - request tasks run the operation on the reactor's device channel and queue their
//!   reply with its admission ticket; they finish in any order, so replies go out of
//!   order;
//! - the writer drains the reply queue with one `sendmsg` of up to 64 iovecs per
//!   attempt, so replies completed in the same tick share a syscall; a reply's ticket
//!   is released once it is sent (on TCP, large replies go without copying and are
//!   released when the kernel is done with their buffers: `zc`);
//! - the watchdog closes a connection that makes no progress for `stall_timeout`
//!   while the server waits on the client (a partial request, replies it does not
//!   read), and one idle for `idle_timeout` when that is configured.
//!
//! Bad requests get the protocol's error reply (`EINVAL`, `EPERM`, `ENOSPC`, ...). A
//! request that desynchronises the stream (bad magic, a payload too large to skip) ends
//! the connection; other connections are unaffected.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::{Rc, Weak};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use drivers::{Admit, BdevChannel, IoSeg, ReqKind, ZeroFlags};
use poller::{DmaBuf, TaskPool, dma};

use super::budget::{Budget, MAX_IN_FLIGHT, Ticket};
use super::handshake::Negotiated;
use super::meta;
use super::proto::{self, ReplyMode, Request};
use super::reader;
use super::reply::Reply;
use super::sock::Gather;
use super::zc::ZeroCopy;
use drivers::io::tls::Stream as Sock;

/// How long the server waits on a client before giving up on the connection.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timeouts {
    /// No progress while the client owes us bytes or we owe it replies.
    pub stall: Duration,
    /// No request at all (`None`: never).
    pub idle: Option<Duration>,
}

/// A connection in the transmission phase.
pub struct Conn {
    pub(super) sock: Sock,
    ch: Rc<BdevChannel>,
    pub(super) mode: ReplyMode,
    /// The metadata contexts selected, in id order (none: block status is refused).
    contexts: Vec<meta::Context>,
    /// The buffer a block-status reply takes (all the contexts' chunks).
    pub(super) status_bytes: usize,
    pub(super) max_block: u32,
    pub(super) budget: Rc<Budget>,
    out: RefCell<VecDeque<Reply>>,
    /// Bytes of the front reply already sent.
    out_sent: Cell<usize>,
    /// Bytes queued and not yet sent.
    unsent: Cell<usize>,
    /// Bumped by every successful receive and send (read by the watchdog).
    pub(super) progress: Cell<u64>,
    /// The reader waits for the rest of a request the client has started.
    pub(super) mid_request: Cell<bool>,
    writer_waker: RefCell<Option<Waker>>,
    owner_waker: RefCell<Option<Waker>>,
    /// The socket failed or the connection was killed: drop replies, stop.
    pub(super) dead: Cell<bool>,
    /// Still accepting requests.
    pub(super) reading: Cell<bool>,
    /// No more replies will be queued; the writer exits when the queue is empty.
    closing: Cell<bool>,
    writer_done: Cell<bool>,
    /// The writer has a send in flight (which references the front replies).
    sending: Cell<bool>,
    /// The front reply's first bytes went in a zero-copy send: the kernel may still
    /// read its buffer, so it is finished without copying and never dropped before
    /// the writer's stages are notified (`zc`).
    zc_front: Cell<bool>,
    /// Zero-copy sends whose notifications have not come: the kernel waits for the
    /// client to acknowledge them, and their replies keep their tickets meanwhile.
    zc_in_flight: Cell<usize>,
    zero_copy: config::ZeroCopySend,
    /// `nbd.multishot_receive`: the reader receives through a multishot receive.
    pub(super) multishot: bool,
    stats: Option<Rc<crate::metrics::LocalStats>>,
}

impl Conn {
    pub fn new(sock: Sock, ch: Rc<BdevChannel>, n: &Negotiated, session: &super::Session) -> Self {
        Conn {
            sock,
            ch,
            mode: n.mode,
            contexts: n.contexts.clone(),
            status_bytes: meta::reply_bytes(n.contexts.len()),
            max_block: n.max_block,
            budget: Budget::new(),
            out: RefCell::new(VecDeque::with_capacity(MAX_IN_FLIGHT as usize)),
            out_sent: Cell::new(0),
            unsent: Cell::new(0),
            progress: Cell::new(0),
            mid_request: Cell::new(false),
            writer_waker: RefCell::new(None),
            owner_waker: RefCell::new(None),
            dead: Cell::new(false),
            reading: Cell::new(true),
            closing: Cell::new(false),
            writer_done: Cell::new(false),
            sending: Cell::new(false),
            zc_front: Cell::new(false),
            zc_in_flight: Cell::new(0),
            zero_copy: session.zero_copy,
            multishot: session.multishot,
            stats: crate::metrics::local_stats(n.bdev.name(), "nbd"),
        }
    }

    /// Counts a receive that came through the reader's multishot receive.
    pub(super) fn multishot_received(&self) {
        if let Some(s) = &self.stats {
            s.multishot_receive();
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
            unsafe { libc::shutdown(self.sock.fd(), libc::SHUT_RD) };
        }
    }

    /// Ends the connection now: replies are dropped, both directions shut down.
    fn kill(&self) {
        self.dead.set(true);
        self.reading.set(false);
        // SAFETY: shutdown on our own socket wakes its reader and writer.
        unsafe { libc::shutdown(self.sock.fd(), libc::SHUT_RDWR) };
        // A send in flight references its replies' buffers: the writer drops them
        // once the shutdown has ended it.
        if !self.sending.get() {
            self.drop_replies();
        }
        self.wake_writer();
    }

    /// Drops the queued replies, except a front reply the kernel may still read from
    /// (`zc_front`), which the writer drops once its stages are notified.
    fn drop_replies(&self) {
        // Tickets are released here: the budgets' waiters wake.
        let mut out = self.out.borrow_mut();
        let keep = if self.zc_front.get() { out.pop_front() } else { None };
        let dropped: VecDeque<Reply> = std::mem::take(&mut *out);
        out.extend(keep);
        drop(out);
        drop(dropped);
        self.unsent.set(0);
        if !self.zc_front.get() {
            self.out_sent.set(0);
        }
    }

    fn push(&self, r: Reply) {
        if self.dead.get() {
            return;
        }
        self.unsent.set(self.unsent.get() + r.len());
        let mut out = self.out.borrow_mut();
        debug_assert!(out.len() < MAX_IN_FLIGHT as usize, "the budget bounds the reply queue");
        out.push_back(r);
        drop(out);
        self.wake_writer();
    }

    /// The socket failed while replying: the connection ends.
    fn lost(&self, e: std::io::Error) {
        tracing::debug!("NBD connection lost while replying: {e}");
        self.dead.set(true);
        self.stop_reading();
        self.drop_replies();
    }

    fn wake_writer(&self) {
        if let Some(w) = self.writer_waker.borrow_mut().take() {
            w.wake();
        }
    }

    /// The server waits on the client: for the rest of a request, or for it to read
    /// (replies not yet sent, or sent without copying and not yet acknowledged).
    fn waiting_on_client(&self) -> bool {
        self.mid_request.get() || self.unsent.get() > 0 || self.zc_in_flight.get() > 0
    }

    /// Notes the writer's zero-copy sends in flight; one fewer is the client's
    /// progress (it acknowledged a send's data).
    fn zc_count(&self, z: &ZeroCopy) {
        let n = z.in_flight();
        if n < self.zc_in_flight.replace(n) {
            self.progress.set(self.progress.get() + 1);
        }
    }

    // --- request execution ----------------------------------------------------------

    fn error(&self, req: &Request, code: u32, msg: &str) -> Reply {
        Reply::error(self.mode, req, code, msg)
    }

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
            Ok(()) => Reply::ok(self.mode, &req),
            Err(e) => Reply::io_error(self.mode, &req, e),
        }
    }

    async fn read(&self, req: Request) -> Reply {
        if req.length > u64::from(self.max_block) {
            return self.error(&req, proto::EINVAL, "read larger than the maximum block size");
        }
        match self.ch.info().admit(ReqKind::Read, req.offset, req.length) {
            Ok(Admit::Go) => {}
            Ok(Admit::Nothing) => return Reply::ok(self.mode, &req),
            Err(e) => return Reply::io_error(self.mode, &req, e),
        }
        let mut buf = match dma::alloc_wait(req.length as usize).await {
            Ok(b) => b,
            Err(_) => return self.error(&req, proto::ENOMEM, "no buffer for this read"),
        };
        match self.ch.read(req.offset, &[IoSeg::from_dma(&mut buf)]).await {
            Ok(()) => Reply::read_data(self.mode, &req, buf),
            Err(e) => Reply::io_error(self.mode, &req, e),
        }
    }

    async fn block_status(&self, req: Request) -> Reply {
        if self.contexts.is_empty() {
            return self.error(&req, proto::EINVAL, "no metadata context was negotiated");
        }
        if let Err(e) = self.ch.info().admit(ReqKind::BlockStatus, req.offset, req.length) {
            return Reply::io_error(self.mode, &req, e);
        }
        let mut buf = match dma::alloc_wait(self.status_bytes).await {
            Ok(b) => b,
            Err(_) => return self.error(&req, proto::ENOMEM, "no buffer for block status"),
        };
        let one = req.flags & proto::CMD_FLAG_REQ_ONE != 0;
        let range = (req.offset, req.length, one);
        match meta::block_status(&self.ch, &self.contexts, self.mode, req.cookie, range, &mut buf)
            .await
        {
            Ok(()) => Reply::chunks(buf),
            Err(e) => Reply::io_error(self.mode, &req, e),
        }
    }

    // --- sending --------------------------------------------------------------------

    /// Accounts for `n` bytes sent: the replies they complete leave the queue (their
    /// tickets with them, so the budgets have room again).
    /// Replies sent without copying whose data the kernel may still read are moved
    /// into `keep` instead of dropped (their headers were staged, not referenced; one
    /// data buffer per iovec, so `keep` never holds more than a send's iovecs).
    fn sent(&self, n: usize, mut keep: Option<&mut Vec<Reply>>) {
        self.progress.set(self.progress.get() + 1);
        debug_assert!(n <= self.unsent.get(), "sent more than was queued");
        self.unsent.set(self.unsent.get().saturating_sub(n));
        let mut q = self.out.borrow_mut();
        let mut left = n + self.out_sent.get();
        while let Some(front) = q.front() {
            let len = front.len();
            if left < len {
                break;
            }
            left -= len;
            let done = q.pop_front();
            if let (Some(k), Some(r)) = (keep.as_deref_mut(), done)
                && r.data.is_some()
            {
                debug_assert!(k.len() < k.capacity(), "one held reply per data iovec");
                k.push(r);
            }
        }
        self.out_sent.set(left);
    }
}

async fn writer(c: Rc<Conn>) {
    let mut g = Gather::new();
    let mut zc = ZeroCopy::new(&c.sock, c.zero_copy, c.stats.clone());
    loop {
        std::future::poll_fn(|cx| {
            if let Some(z) = zc.as_mut() {
                z.collect_all(cx);
                c.zc_count(z);
            }
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
        g.fill(c.out.borrow().iter(), c.out_sent.get());
        debug_assert!(!g.is_empty(), "a queued reply has bytes to send");
        if let Some(z) = zc.as_mut().filter(|z| z.wants(g.payload(), c.zc_front.get())) {
            send_zero_copy(&c, z).await;
            continue;
        }
        c.sending.set(true);
        let sent = c.sock.send(g.slices()).await;
        c.sending.set(false);
        match sent {
            _ if c.dead.get() => c.drop_replies(),
            Ok(n) => c.sent(n, None),
            Err(e) => c.lost(e),
        }
    }
    if !c.dead.get() {
        // Under TLS, a close_notify tells the client the replies ended on purpose.
        c.sock.close().await;
    }
    if let Some(z) = zc.as_mut() {
        z.finish(c.sock.fd(), c.dead.get()).await;
        c.zc_count(z);
        c.zc_front.set(false);
        c.drop_replies();
    }
    c.writer_done.set(true);
    if let Some(w) = c.owner_waker.borrow_mut().take() {
        w.wake();
    }
}

/// One send without copying, from the writer's next stage (`zc`).
async fn send_zero_copy(c: &Conn, z: &mut ZeroCopy) {
    let park = |w: &Waker| *c.writer_waker.borrow_mut() = Some(w.clone());
    let Some(stage) = z.ready(|| c.dead.get(), park).await else { return };
    let Some(sock) = c.sock.uring_socket() else {
        unreachable!("stages exist only for a zero-copy socket")
    };
    // Gathered again: replies may have been queued while the stage was waited for.
    stage.gather.fill(c.out.borrow().iter(), c.out_sent.get());
    c.sending.set(true);
    let sent = sock.send_zc(stage.gather.slices(), &stage.notice).await;
    c.sending.set(false);
    match sent {
        Ok(n) => {
            // The replies the kernel took stay with the stage until its notification.
            c.sent(n, Some(&mut stage.held));
            c.zc_front.set(c.out_sent.get() > 0);
            if c.dead.get() {
                c.drop_replies();
            }
        }
        Err(_) if c.dead.get() => c.drop_replies(),
        Err(e) => c.lost(e),
    }
    if stage.notice.armed() || !stage.held.is_empty() {
        z.sent();
    }
    c.zc_count(z);
}

/// What the reader hands a request task.
pub(super) struct Admitted {
    pub req: Request,
    pub payload: Option<DmaBuf>,
    pub refused: Option<(u32, &'static str)>,
    pub ticket: Ticket,
}

pub(super) async fn handle(c: Rc<Conn>, a: Admitted) {
    let Admitted { req, payload, refused, ticket } = a;
    crate::debug::before_request(req.offset, req.length).await;
    let started = c.stats.as_ref().map(|s| s.start());
    let mut reply = match refused {
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
    reply.ticket = Some(ticket);
    c.push(reply);
}

/// How long a connection that holds buffers may owe the server bytes while other
/// requests on its reactor wait for buffers (`stall_timeout` if that is shorter): long
/// enough for a TCP retransmission or two, short against `stall_timeout`'s default.
const PRESSURE_GRACE: Duration = Duration::from_secs(2);

/// What the watchdog concludes at one of its checks.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Fine,
    /// No progress for `stall_timeout` while the server waited on the client.
    Stalled,
    /// No progress for the pressure grace while holding buffers others wait for.
    Pinning,
    Idle,
}

/// What the watchdog sees of the connection at a check.
#[derive(Debug, Clone, Copy)]
struct Seen {
    /// The progress counter (receives and sends).
    progress: u64,
    /// The server waits on the client: a header's tail, a payload, unread replies.
    waiting: bool,
    /// Requests admitted whose replies are not yet sent.
    busy: bool,
    /// The connection holds buffers while another request on the reactor waits for some.
    pinning: bool,
}

/// The watchdog's two clocks: since the last progress (for `idle`), and since the
/// server started waiting on the client without progress (for `stall`). Time a
/// request spends waiting for the server's own budget or buffers is not the client's
/// stall: a healthy client queued behind stalled ones is not counted as stalled the
/// moment it is admitted.
struct Clock {
    t: Timeouts,
    seen: u64,
    quiet_since: Instant,
    owed_since: Option<Instant>,
}

impl Clock {
    fn new(t: Timeouts, now: Instant) -> Clock {
        Clock { t, seen: u64::MAX, quiet_since: now, owed_since: None }
    }

    fn grace(&self) -> Duration {
        self.t.stall.min(PRESSURE_GRACE)
    }

    fn check(&mut self, now: Instant, s: Seen) -> Verdict {
        if s.progress != self.seen {
            self.seen = s.progress;
            self.quiet_since = now;
            self.owed_since = s.waiting.then_some(now);
            return Verdict::Fine;
        }
        self.owed_since = if s.waiting { Some(self.owed_since.unwrap_or(now)) } else { None };
        let owed = self.owed_since.map_or(Duration::ZERO, |since| now - since);
        if owed >= self.t.stall {
            Verdict::Stalled
        } else if s.pinning && owed >= self.grace() {
            Verdict::Pinning
        } else if self.t.idle.is_some_and(|i| now - self.quiet_since >= i) && !s.waiting && !s.busy
        {
            Verdict::Idle
        } else {
            Verdict::Fine
        }
    }
}

/// Closes the connection when it stalls (no progress for `stall` while the server
/// waits on the client, or for the pressure grace while it holds buffers other
/// requests wait for) or idles (no request for `idle`). Checks at least every second,
/// and four times a grace while the connection holds buffers and owes the server
/// bytes. Holds only a weak reference, so a finished connection is released at once,
/// not at the watchdog's next check.
async fn watchdog(c: Weak<Conn>, t: Timeouts) {
    let floor = Duration::from_millis(50);
    let shortest = t.idle.map_or(t.stall, |i| i.min(t.stall));
    let period = (shortest / 4).clamp(floor, Duration::from_secs(1));
    let mut clock = Clock::new(t, Instant::now());
    let fast = (clock.grace() / 4).max(floor);
    let mut next = period;
    loop {
        poller::sleep(next).await;
        let Some(c) = c.upgrade() else { return };
        if c.dead.get() || c.writer_done.get() {
            return;
        }
        let waiting = c.waiting_on_client();
        let holds = c.budget.held() > 0;
        next = if waiting && holds { fast } else { period };
        let seen = Seen {
            progress: c.progress.get(),
            waiting,
            busy: c.budget.outstanding() > 0,
            pinning: holds && c.budget.squeezed(),
        };
        match clock.check(Instant::now(), seen) {
            Verdict::Fine => continue,
            Verdict::Stalled => tracing::info!(
                export = c.export(),
                "NBD client made no progress for {:?} (a partial request or unread replies); disconnecting",
                t.stall
            ),
            Verdict::Pinning => tracing::info!(
                export = c.export(),
                held = c.budget.held(),
                "NBD client made no progress for {:?} while holding buffers other requests wait for; disconnecting",
                clock.grace()
            ),
            Verdict::Idle => {
                tracing::info!(
                    export = c.export(),
                    "NBD client idle for {:?}; disconnecting",
                    t.idle.unwrap_or_default()
                );
                c.stop_reading();
                return;
            }
        }
        c.kill();
        return;
    }
}

/// Serves the connection until the client disconnects, the socket fails, or
/// [`Conn::stop_reading`] is called; then answers what is in flight and returns.
pub async fn run(c: Rc<Conn>, timeouts: Timeouts) {
    poller::spawn(writer(c.clone()));
    poller::spawn(watchdog(Rc::downgrade(&c), timeouts));
    let pool = TaskPool::new(MAX_IN_FLIGHT);
    reader::read_requests(&c, &pool, handle).await;
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

#[cfg(test)]
mod tests {
    use super::*;

    const P: Duration = Duration::from_millis(500);

    struct Sim {
        clock: Clock,
        now: Instant,
    }

    impl Sim {
        fn new(idle: Option<u32>) -> Sim {
            let now = Instant::now();
            Sim {
                clock: Clock::new(Timeouts { stall: 4 * P, idle: idle.map(|n| n * P) }, now),
                now,
            }
        }

        /// A check one period after the last.
        fn at(&mut self, progress: u64, waiting: bool, busy: bool, pinning: bool) -> Verdict {
            self.now += P;
            self.clock.check(self.now, Seen { progress, waiting, busy, pinning })
        }
    }

    #[test]
    fn a_client_is_stalled_only_after_the_server_waited_on_it_for_the_whole_timeout() {
        let mut s = Sim::new(None);
        assert_eq!(s.at(1, false, true, false), Verdict::Fine);
        // Queued behind the server's own budget for longer than the timeout...
        for _ in 0..10 {
            assert_eq!(s.at(1, false, true, false), Verdict::Fine);
        }
        // ...then admitted and owing its payload: the timeout starts only now.
        for _ in 0..4 {
            assert_eq!(s.at(1, true, true, false), Verdict::Fine);
        }
        assert_eq!(s.at(1, true, true, false), Verdict::Stalled);
    }

    #[test]
    fn progress_restarts_both_clocks() {
        let mut s = Sim::new(Some(6));
        for _ in 0..4 {
            assert_eq!(s.at(7, true, true, false), Verdict::Fine);
        }
        assert_eq!(s.at(8, true, true, false), Verdict::Fine, "a receive");
        for _ in 0..3 {
            assert_eq!(s.at(8, true, true, false), Verdict::Fine);
        }
        assert_eq!(s.at(8, true, true, false), Verdict::Stalled);
    }

    #[test]
    fn holding_buffers_others_wait_for_shortens_the_timeout_to_the_grace() {
        let mut s = Sim::new(None);
        s.clock.t.stall = 20 * P;
        assert_eq!(s.clock.grace(), PRESSURE_GRACE);
        assert_eq!(s.at(1, true, true, false), Verdict::Fine);
        for _ in 0..3 {
            assert_eq!(s.at(1, true, true, true), Verdict::Fine);
        }
        assert_eq!(s.at(1, true, true, true), Verdict::Pinning);
        // Not while it owes nothing (its buffers are the disk's, or it is making progress).
        let mut s = Sim::new(None);
        for i in 0..6 {
            assert_eq!(s.at(1, false, true, true), Verdict::Fine);
            assert_eq!(s.at(2 + i, true, true, true), Verdict::Fine);
        }
    }

    #[test]
    fn idle_counts_quiet_time_without_requests_outstanding() {
        let mut s = Sim::new(Some(3));
        assert_eq!(s.at(1, false, false, false), Verdict::Fine);
        assert_eq!(s.at(1, false, true, false), Verdict::Fine);
        assert_eq!(s.at(1, false, true, false), Verdict::Fine);
        assert_eq!(s.at(1, false, true, false), Verdict::Fine, "requests outstanding");
        assert_eq!(s.at(1, false, false, false), Verdict::Idle);
    }
}
