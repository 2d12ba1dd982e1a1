//! Read replies sent without copying (`nbd.zero_copy_send`), on TCP connections whose
//! socket is on the reactor's ring.
//!
//! A zero-copy send leaves its pages with the kernel until TCP has them acknowledged
//! (`drivers::io::engine::zc`): the reply buffers it points at and the staged headers
//! must not be freed, reused or written until its notification. So the writer sends
//! from [`Stage`]s, four per connection, in turn: a stage keeps the replies its send
//! completed (their DMA buffers and admission tickets) and its header stage until the
//! notification, and is waited for before it is filled again. Stages are reused in
//! order, so a reply whose first bytes went in one stage and the rest in the next is
//! held by the later one, whose notification comes no earlier. A reply partly sent
//! without copying (`Conn::zc_front`) is finished the same way, and is never dropped
//! before the connection's stages have all been notified.
//!
//! A send is made zero-copy when it gathers [`ZC_MIN`] bytes of payload or more: below
//! that the notification costs more than the copy saves. In `auto` mode the first
//! notification saying the kernel copied after all (a loopback peer, a device without
//! scatter-gather) turns zero-copy off for the connection.
//!
//! On the way out, the writer waits for its stages' notifications: for a live peer,
//! up to [`LINGER`], after which the connection is aborted (its unsent and
//! unacknowledged data dropped by the kernel, which then sends the notifications); a
//! connection already dead is aborted at once. Only then are the held buffers freed.

use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use config::ZeroCopySend;
use drivers::io::net::{ZcNotice, abort_tcp};
use drivers::io::tls::Stream;

use crate::metrics::LocalStats;

use super::reply::Reply;
use super::sock::{Gather, IOV_BATCH};

/// The least payload a send gathers to go without copying.
pub const ZC_MIN: usize = 32 * 1024;
/// Sends without copying in flight per connection.
const STAGES: usize = 4;
/// How long a closing connection waits for its peer to acknowledge the last replies
/// before dropping them.
const LINGER: Duration = Duration::from_secs(5);

/// One send's iovecs, the replies it completed, and its notice.
pub struct Stage {
    pub gather: Gather,
    pub held: Vec<Reply>,
    pub notice: ZcNotice,
    /// A send went from this stage and its notification has not been collected.
    in_flight: bool,
}

/// A connection's zero-copy state.
pub struct ZeroCopy {
    stages: Vec<Stage>,
    next: usize,
    /// Still choosing zero-copy for large sends.
    on: bool,
    /// `always`: kept on where the kernel copies.
    keep: bool,
    stats: Option<Rc<LocalStats>>,
}

impl ZeroCopy {
    /// The connection's stages, when `mode` allows zero-copy and the socket can do it
    /// (TCP on the ring, no TLS), and the ring has notices for them.
    pub fn new(
        sock: &Stream,
        mode: ZeroCopySend,
        stats: Option<Rc<LocalStats>>,
    ) -> Option<ZeroCopy> {
        if mode == ZeroCopySend::Off {
            return None;
        }
        let s = sock.zero_copy_socket()?;
        let mut stages = Vec::with_capacity(STAGES);
        for _ in 0..STAGES {
            let notice = s.notice()?;
            let held = Vec::with_capacity(IOV_BATCH);
            stages.push(Stage { gather: Gather::new(), held, notice, in_flight: false });
        }
        Some(ZeroCopy { stages, next: 0, on: true, keep: mode == ZeroCopySend::Always, stats })
    }

    /// Whether the next send, gathering `payload` bytes of data, goes without copying.
    /// A reply partly sent without copying (`front_zc`) is finished without copying.
    pub fn wants(&self, payload: usize, front_zc: bool) -> bool {
        front_zc || (self.on && payload >= ZC_MIN)
    }

    /// Collects stage `i`'s notification if it has arrived: frees the replies the
    /// stage held (their tickets with them, so the connection's budget has room) and
    /// notes whether the kernel copied. Ready when the stage holds nothing.
    fn collect(&mut self, i: usize, cx: &mut Context<'_>) -> Poll<()> {
        let stage = &mut self.stages[i];
        if !stage.in_flight {
            return Poll::Ready(());
        }
        let Poll::Ready(copied) = stage.notice.poll_wait(cx) else { return Poll::Pending };
        stage.in_flight = false;
        stage.held.clear();
        if copied {
            if let Some(s) = &self.stats {
                s.zero_copy_copied();
            }
            if !self.keep && self.on {
                tracing::debug!(
                    "the kernel copied a zero-copy send; this connection copies from now"
                );
                self.on = false;
            }
        }
        Poll::Ready(())
    }

    /// Frees what every notified stage held; registers `cx` with the others. The
    /// writer calls it while it waits for replies, so buffers come back as soon as the
    /// kernel lets go of them, not when the stage is next used.
    pub fn collect_all(&mut self, cx: &mut Context<'_>) {
        for i in 0..STAGES {
            let _ = self.collect(i, cx);
        }
    }

    /// Waits until the next stage's last send has been notified (or `dead` says the
    /// connection is gone, in which case `None`), and returns it, empty. Registers the
    /// writer's waker through `park` so a kill wakes it.
    pub async fn ready(
        &mut self,
        dead: impl Fn() -> bool,
        park: impl Fn(&std::task::Waker),
    ) -> Option<&mut Stage> {
        let i = self.next;
        std::future::poll_fn(|cx| {
            if dead() {
                return Poll::Ready(None);
            }
            let r = self.collect(i, cx).map(Some);
            if r.is_pending() {
                park(cx.waker());
            }
            r
        })
        .await?;
        Some(&mut self.stages[i])
    }

    /// Sends whose notifications have not been collected.
    pub fn in_flight(&self) -> usize {
        self.stages.iter().filter(|s| s.in_flight).count()
    }

    /// The current stage's send went out: it waits for its notification, and the next
    /// send takes the stage after it. Counted as a zero-copy send.
    pub fn sent(&mut self) {
        self.stages[self.next].in_flight = true;
        self.next = (self.next + 1) % STAGES;
        if let Some(s) = &self.stats {
            s.zero_copy_send();
        }
    }

    /// Waits for every stage's notification (see the module doc), then frees the held
    /// replies. `fd` is the connection's socket, `dead` whether it is already gone.
    pub async fn finish(&mut self, fd: std::os::fd::RawFd, dead: bool) {
        if !self.stages.iter().any(|s| s.in_flight) {
            return;
        }
        let notified = !dead && {
            let stages = &self.stages;
            let all = async move {
                for s in stages {
                    s.notice.wait().await;
                }
            };
            poller::timeout(LINGER, all).await.is_ok()
        };
        if !notified {
            if let Err(e) = abort_tcp(fd) {
                tracing::warn!("cannot abort an NBD connection with replies in flight: {e}");
            }
            for s in &self.stages {
                s.notice.wait().await;
            }
        }
        self.release();
    }

    fn release(&mut self) {
        for s in &mut self.stages {
            debug_assert!(!s.notice.armed(), "held replies freed before their notification");
            s.in_flight = false;
            s.held.clear();
        }
    }
}
