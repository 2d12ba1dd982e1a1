//! Quiescing a disk: no new request starts on any reactor, and those in flight finish.
//!
//! Block jobs change what sits under a disk's consumers — a write filter put in or
//! taken out, the driver itself swapped for a mirror's target (the pivot) — and a
//! change like that must fall between requests, never across one. Each reactor keeps a
//! [`Gate`] per disk: a paused flag and a count of the requests its channels have in
//! flight. Both live on the reactor's thread and are touched only there, so a request
//! pays two plain memory operations and no atomic: pausing is done *on* each reactor
//! (a control message), which serialises it with that reactor's requests. A paused
//! gate parks new requests on its wait list; [`Bdev::quiesce`] pauses every reactor's
//! gate, then asks each for its count until all are zero. The returned [`Quiesced`]
//! resumes them, waking the parked requests, when it is dropped.
//!
//! Channels made for a job ([`Bdev::internal_channel`]) pass a paused gate and are not
//! counted: the job that quiesced a disk still reads it to finish its copy.
//!
//! A gate also knows its reactor's channels to the disk: when a quiesce ends, each
//! reactor reopens them on what the disk is now (a changed driver or filter) before
//! the parked requests go on, so a channel that is idle meanwhile does not keep the
//! old driver — or a finished mirror's target connection — alive.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use poller::{ReactorHandle, WaitList};

use super::Bdev;
use super::channel::Current;
use crate::error::IoError;

/// A channel's view of its disk, shared with its gate.
pub(crate) type CurrentCell = RefCell<Rc<Current>>;

/// A disk's gate on one reactor.
pub(crate) struct Gate {
    paused: Cell<bool>,
    in_flight: Cell<u64>,
    resumed: WaitList,
    channels: RefCell<Vec<std::rc::Weak<CurrentCell>>>,
}

thread_local! {
    static GATES: RefCell<HashMap<u64, Rc<Gate>>> = RefCell::new(HashMap::new());
}

/// The current reactor's gate for disk `id`. Gates that nothing but the table holds
/// any more (their disk's channels are gone and it is not paused) are dropped as new
/// ones are made, so the table follows the disks that exist.
pub(crate) fn gate(id: u64) -> Rc<Gate> {
    GATES.with(|g| {
        let mut g = g.borrow_mut();
        if let Some(x) = g.get(&id) {
            return x.clone();
        }
        g.retain(|_, x| Rc::strong_count(x) > 1 || x.paused.get());
        let x = Rc::new(Gate {
            paused: Cell::new(false),
            in_flight: Cell::new(0),
            resumed: WaitList::new(),
            channels: RefCell::new(Vec::new()),
        });
        g.insert(id, x.clone());
        x
    })
}

/// A request counted in flight on its reactor until dropped.
pub(crate) struct InFlight<'a>(&'a Gate);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let n = self.0.in_flight.get();
        debug_assert!(n > 0, "a disk's in-flight count went below zero");
        self.0.in_flight.set(n - 1);
    }
}

impl Gate {
    /// Remembers a channel, to reopen it when a quiesce ends.
    pub(crate) fn register(&self, cur: &Rc<CurrentCell>) {
        let mut l = self.channels.borrow_mut();
        l.retain(|w| w.strong_count() > 0);
        l.push(Rc::downgrade(cur));
    }

    /// Reopens every channel whose view is older than the disk's generation.
    fn refresh(&self, bdev: &Bdev) {
        let g = bdev.generation.load(Ordering::Acquire);
        for cur in self.channels.borrow().iter().filter_map(std::rc::Weak::upgrade) {
            if cur.borrow().generation != g {
                match super::channel::current_of(bdev) {
                    Ok(c) => *cur.borrow_mut() = Rc::new(c),
                    Err(e) => tracing::warn!(disk = bdev.name(), "reopening a channel: {e}"),
                }
            }
        }
    }

    /// Waits while the disk is paused, then counts a request in.
    pub(crate) async fn enter(&self) -> InFlight<'_> {
        while self.paused.get() {
            self.resumed.wait().await;
        }
        self.in_flight.set(self.in_flight.get() + 1);
        InFlight(self)
    }
}

/// A disk quiesced on every reactor; resumes it when dropped.
pub struct Quiesced {
    bdev: Arc<Bdev>,
    reactors: Vec<ReactorHandle>,
}

impl Drop for Quiesced {
    fn drop(&mut self) {
        for r in &self.reactors {
            let bdev = self.bdev.clone();
            r.run(move || {
                let g = gate(bdev.id);
                g.refresh(&bdev);
                g.paused.set(false);
                g.resumed.wake_all();
            });
        }
    }
}

impl Quiesced {
    pub(crate) fn id(&self) -> u64 {
        self.bdev.id
    }
}

/// Runs `f` on every reactor and sums its answers. On a reactor or off one: the
/// answers are collected through atomics and waited for with timer sleeps.
async fn sum_over(reactors: &[ReactorHandle], f: fn(&Gate) -> u64, id: u64) -> u64 {
    let total = Arc::new(AtomicU64::new(0));
    let left = Arc::new(AtomicUsize::new(reactors.len()));
    for r in reactors {
        let (total, left) = (total.clone(), left.clone());
        r.run(move || {
            total.fetch_add(f(&gate(id)), Ordering::SeqCst);
            left.fetch_sub(1, Ordering::SeqCst);
        });
    }
    while left.load(Ordering::SeqCst) > 0 {
        poller::sleep(Duration::from_micros(100)).await;
    }
    total.load(Ordering::SeqCst)
}

impl Bdev {
    /// Pauses new requests to this disk on every one of `reactors` (all that may serve
    /// it) and waits until none is in flight, for at most `timeout` (then it resumes
    /// and fails with `Shutdown`: something is stuck, and a caller that waited longer
    /// would stall every consumer of the disk). Runs on a reactor.
    pub async fn quiesce(
        self: &Arc<Self>,
        reactors: &[ReactorHandle],
        timeout: Duration,
    ) -> Result<Quiesced, IoError> {
        let q = Quiesced { bdev: self.clone(), reactors: reactors.to_vec() };
        sum_over(reactors, |g| u64::from(g.paused.replace(true)), self.id).await;
        let deadline = Instant::now() + timeout;
        loop {
            if sum_over(reactors, |g| g.in_flight.get(), self.id).await == 0 {
                return Ok(q);
            }
            if Instant::now() >= deadline {
                tracing::warn!(
                    disk = self.name(),
                    "requests still in flight after {timeout:?}; not quiesced"
                );
                return Err(IoError::Shutdown);
            }
            poller::sleep(Duration::from_micros(500)).await;
        }
    }
}
