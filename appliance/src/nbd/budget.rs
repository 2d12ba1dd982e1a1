//! What one NBD connection may hold, so a client that never reads its replies, or
//! sends a header and stalls, costs bounded memory and cannot starve the connections
//! that share its reactor.
//!
//! Every request is admitted against two budgets before the reader takes its payload
//! or the request task allocates its reply buffer, and holds a [`Ticket`] until its
//! reply has been fully sent (or the connection dies):
//! - the connection's: at most [`MAX_IN_FLIGHT`] requests outstanding (in flight or
//!   with a reply queued), and at most `conn_cap` bytes of buffers, except that a
//!   connection holding nothing may always take one request of up to the maximum block
//!   size (so it always makes progress);
//! - the reactor's: every NBD connection on the reactor together holds at most half of
//!   its DMA pool, leaving the other half to vhost-user-blk queues, qcow2 metadata and
//!   bounce buffers.
//!
//! A connection over its budget simply stops reading its socket: the backpressure a
//! client sees. A stalled client therefore holds at most `conn_cap` (one maximum-size
//! request if that is larger) until the watchdog (`conn::watchdog`) closes it after
//! `stall_timeout` without progress. The reply queue is bounded by the outstanding
//! count, so a client that pipelines payload-less requests (flushes, trims) and never
//! reads is bounded too.
//!
//! A few stalled clients can still fill the reactor's half of the pool (two 32 MiB
//! write headers with no payload do, with the default pool). The reactor therefore
//! counts the requests blocked on its budget ([`Budget::squeezed`]); while any is, the
//! watchdog gives a connection that holds buffers and owes the server bytes only a
//! short grace instead of `stall_timeout`, so clients of other disks on the reactor
//! wait a few seconds (the 2 s grace and a check), not half a minute.
//!
//! Bookkeeping is reactor-local `Cell`s; admission is a comparison, release a
//! subtraction and a wake-up: no allocation, no lock.

use std::cell::Cell;
use std::rc::Rc;

use poller::WaitList;

/// Requests outstanding (in flight, or answered but not yet sent) per connection.
pub const MAX_IN_FLIGHT: u32 = 128;

/// The NBD buffer budget of one reactor.
pub struct ReactorBudget {
    held: Cell<usize>,
    cap: usize,
    waiters: WaitList,
    /// Requests waiting for room in `held` (see [`Blocked`]).
    blocked: Cell<u32>,
}

thread_local! {
    static REACTOR: Rc<ReactorBudget> = Rc::new(ReactorBudget {
        held: Cell::new(0),
        cap: poller::dma::max_len() * 2,
        waiters: WaitList::new(),
        blocked: Cell::new(0),
    });
}

/// Counts one request blocked on the reactor's budget for as long as it lives (also
/// when its connection's reader is dropped while it waits).
struct Blocked(Rc<ReactorBudget>);

impl Blocked {
    fn new(r: &Rc<ReactorBudget>) -> Blocked {
        r.blocked.set(r.blocked.get() + 1);
        Blocked(r.clone())
    }
}

impl Drop for Blocked {
    fn drop(&mut self) {
        let b = &self.0.blocked;
        debug_assert!(b.get() > 0);
        b.set(b.get() - 1);
    }
}

/// A connection's budget.
pub struct Budget {
    outstanding: Cell<u32>,
    held: Cell<usize>,
    cap: usize,
    waiters: WaitList,
    reactor: Rc<ReactorBudget>,
}

/// The byte budget of one connection, from the reactor's pool: a 32nd of it, within
/// 1..8 MiB (4 MiB for the default 128 MiB pool), which keeps a fast connection's
/// pipeline full while bounding what a stalled one pins.
fn conn_cap() -> usize {
    (poller::dma::max_len() * 4 / 32).clamp(1 << 20, 8 << 20)
}

impl Budget {
    /// A budget on the current reactor.
    pub fn new() -> Rc<Budget> {
        Rc::new(Budget {
            outstanding: Cell::new(0),
            held: Cell::new(0),
            cap: conn_cap(),
            waiters: WaitList::new(),
            reactor: REACTOR.with(Rc::clone),
        })
    }

    fn fits_connection(&self, bytes: usize) -> bool {
        self.outstanding.get() < MAX_IN_FLIGHT
            && (self.held.get() == 0 || self.held.get() + bytes <= self.cap)
    }

    fn fits_reactor(&self, bytes: usize) -> bool {
        let r = &self.reactor;
        r.held.get() == 0 || r.held.get() + bytes <= r.cap
    }

    #[cfg(test)]
    fn fits(&self, bytes: usize) -> bool {
        self.fits_connection(bytes) && self.fits_reactor(bytes)
    }

    /// Waits until a request holding `bytes` of buffers fits, then reserves it.
    pub async fn admit(self: &Rc<Self>, bytes: usize) -> Ticket {
        let mut blocked = None;
        loop {
            if !self.fits_connection(bytes) {
                // Only this connection's own replies going out can make room.
                blocked = None;
                self.waiters.wait().await;
            } else if !self.fits_reactor(bytes) {
                blocked.get_or_insert_with(|| Blocked::new(&self.reactor));
                self.reactor.waiters.wait().await;
            } else {
                break;
            }
        }
        drop(blocked);
        self.outstanding.set(self.outstanding.get() + 1);
        self.held.set(self.held.get() + bytes);
        self.reactor.held.set(self.reactor.held.get() + bytes);
        Ticket { budget: self.clone(), bytes }
    }

    /// Requests admitted whose replies are not yet sent.
    pub fn outstanding(&self) -> u32 {
        self.outstanding.get()
    }

    /// Bytes of buffers this connection holds.
    pub fn held(&self) -> usize {
        self.held.get()
    }

    /// Whether some request on this reactor is waiting for room in its budget.
    pub fn squeezed(&self) -> bool {
        self.reactor.blocked.get() > 0
    }
}

/// One admitted request's reservation; released when dropped (its reply sent).
pub struct Ticket {
    budget: Rc<Budget>,
    bytes: usize,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let b = &self.budget;
        debug_assert!(b.outstanding.get() > 0 && b.held.get() >= self.bytes);
        b.outstanding.set(b.outstanding.get() - 1);
        b.held.set(b.held.get() - self.bytes);
        let r = &b.reactor;
        debug_assert!(r.held.get() >= self.bytes);
        r.held.set(r.held.get() - self.bytes);
        b.waiters.wake_all();
        if self.bytes > 0 {
            r.waiters.wake_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on_reactor<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> R {
        let r = poller::Reactors::start(poller::ReactorOptions {
            dma_pool_bytes: 64 << 20,
            ..Default::default()
        })
        .unwrap();
        let out = r.handles()[0].call(f);
        r.stop();
        out
    }

    #[test]
    fn the_reactor_is_squeezed_while_a_request_waits_for_its_budget() {
        let r = poller::Reactors::start(poller::ReactorOptions {
            dma_pool_bytes: 64 << 20,
            ..Default::default()
        })
        .unwrap();
        r.handles()[0].block_on(|| async {
            let (hog, healthy) = (Budget::new(), Budget::new());
            let cap = hog.reactor.cap;
            let pinned = hog.admit(cap).await;
            assert!(!healthy.squeezed(), "nobody waits yet");
            let waiting = Rc::new(Cell::new(false));
            let w = waiting.clone();
            let h = healthy.clone();
            poller::spawn(async move {
                let t = h.admit(4096).await;
                w.set(true);
                drop(t);
            });
            poller::yield_now().await;
            assert!(healthy.squeezed() && hog.squeezed(), "a request waits for the reactor");
            assert!(!waiting.get());
            drop(pinned);
            for _ in 0..4 {
                poller::yield_now().await;
            }
            assert!(waiting.get(), "admitted once the hog let go");
            assert!(!healthy.squeezed(), "the count falls when the waiter is admitted");
        });
        r.stop();
    }

    #[test]
    fn caps_bytes_and_count_but_always_lets_one_request_through() {
        on_reactor(|| {
            let b = Budget::new();
            let cap = b.cap;
            assert_eq!(cap, 2 << 20, "a 32nd of a 64 MiB pool");
            assert!(b.fits(16 << 20), "an idle connection takes one big request");
            b.held.set(cap);
            assert!(!b.fits(1), "over its byte budget");
            b.held.set(0);
            b.outstanding.set(MAX_IN_FLIGHT);
            assert!(!b.fits(0), "over its request count");
            b.outstanding.set(0);
            let r = &b.reactor;
            r.held.set(r.cap);
            assert!(!b.fits(4096), "the reactor's NBD half of the pool is taken");
            r.held.set(0);
            assert!(b.fits(4096));
        });
    }
}
