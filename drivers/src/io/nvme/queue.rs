//! An I/O queue pair owned by one reactor: the SPDK model of an NVMe channel.
//!
//! The submission and completion queues and one PRP-list page per command ID live in the
//! reactor's DMA region, mapped for the device. A command takes a free command ID (the
//! queue's slot table: no allocation per I/O; out of IDs parks the task on a wait
//! list), is written at the submission tail, and the tail doorbell is written once per
//! tick by the queue's `Late` poller. Its `Early` poller reaps completions by phase bit
//! straight from the completion queue, wakes their tasks, and writes the head doorbell
//! once per batch. No interrupt is ever enabled; the reactor does not sleep while a
//! command is in flight. A future dropped mid-flight polls until its command
//! completes, so the device never writes a buffer after its borrow ended.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use poller::{DmaBuf, PollerId, WaitList};

use super::ctrl::{Controller, Sqe, cqe_status, prps};

/// Entries per I/O queue (capped by CAP.MQES): command IDs are one fewer, so the
/// submission queue can never overflow.
pub(crate) const QUEUE_ENTRIES: u16 = 256;

/// How long commands may be in flight with none completing before the controller is
/// checked: a fatal status, or this long again, and it is reset.
const WATCHDOG: Duration = Duration::from_secs(30);
/// Polls between watchdog checks while commands are in flight.
const WATCHDOG_POLLS: u32 = 4096;

struct Slot {
    status: Cell<Option<i64>>,
    waker: RefCell<Option<Waker>>,
    /// The command as submitted, for resubmission after a controller reset.
    sqe: Cell<Sqe>,
    busy: Cell<bool>,
}

pub(crate) struct QueuePair {
    ctrl: Arc<Controller>,
    pub qid: u16,
    entries: u16,
    sq: DmaBuf,
    cq: DmaBuf,
    /// One page of PRP entries per command ID.
    prp: DmaBuf,
    /// IOVA of the reactor's DMA region and its start: buffers in it translate.
    region: (usize, usize, u64),
    tail: Cell<u16>,
    head: Cell<u16>,
    phase: Cell<bool>,
    dirty: Cell<bool>,
    slots: Box<[Slot]>,
    free: RefCell<Vec<u16>>,
    waiters: WaitList,
    pollers: RefCell<Vec<PollerId>>,
    /// The controller's reset epoch this queue's queues were created in.
    epoch: Cell<u32>,
    last_progress: Cell<Instant>,
    polls: Cell<u32>,
    /// Fault injection (tests): reset the controller after every this many commands
    /// (`APPLIANCE_NVME_RESET_EVERY`; 0: never).
    reset_every: u64,
    submitted: Cell<u64>,
}

impl QueuePair {
    /// Creates a queue pair for the current reactor.
    pub(crate) fn create(ctrl: &Arc<Controller>) -> std::io::Result<Rc<QueuePair>> {
        let (start, len) = poller::dma::region();
        let iova = ctrl.map_region(start, len)?;
        let entries = QUEUE_ENTRIES.min(ctrl.max_entries);
        let alloc = |n: usize| {
            poller::dma::alloc(n).ok_or_else(|| std::io::Error::other("DMA pool exhausted"))
        };
        let (mut sq, mut cq) =
            (alloc(64 * usize::from(entries))?, alloc(16 * usize::from(entries))?);
        sq.as_mut_slice().fill(0);
        cq.as_mut_slice().fill(0);
        let prp = alloc(4096 * usize::from(entries))?;
        let region = (start, len, iova);
        let at = |b: &DmaBuf| iova + (b.as_ptr() as usize - start) as u64;
        let epoch = ctrl.epoch();
        let qid = ctrl
            .create_queue(entries, at(&sq), at(&cq))?
            .ok_or_else(|| std::io::Error::other("the controller has no I/O queue left"))?;
        let q = Rc::new(QueuePair {
            ctrl: ctrl.clone(),
            qid,
            entries,
            sq,
            cq,
            prp,
            region,
            tail: Cell::new(0),
            head: Cell::new(0),
            phase: Cell::new(true),
            dirty: Cell::new(false),
            slots: (0..entries - 1)
                .map(|_| Slot {
                    status: Cell::new(None),
                    waker: RefCell::new(None),
                    sqe: Cell::new([0; 16]),
                    busy: Cell::new(false),
                })
                .collect(),
            free: RefCell::new((0..entries - 1).rev().collect()),
            waiters: WaitList::new(),
            pollers: RefCell::new(Vec::new()),
            epoch: Cell::new(epoch),
            last_progress: Cell::new(Instant::now()),
            polls: Cell::new(0),
            reset_every: std::env::var("APPLIANCE_NVME_RESET_EVERY")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            submitted: Cell::new(0),
        });
        let (reap, pending, ring) = (Rc::downgrade(&q), Rc::downgrade(&q), Rc::downgrade(&q));
        let early = poller::register_poller_with_pending(
            poller::Phase::Early,
            move || reap.upgrade().is_some_and(|q| q.reap() > 0),
            move || pending.upgrade().is_some_and(|q| q.in_flight() > 0),
        );
        let late = poller::register_poller(poller::Phase::Late, move || {
            ring.upgrade().is_some_and(|q| q.ring_doorbell())
        });
        q.pollers.borrow_mut().extend([early, late]);
        Ok(q)
    }

    fn in_flight(&self) -> usize {
        self.slots.len() - self.free.borrow().len()
    }

    /// The device address of `len` bytes at `ptr`, if they lie in the reactor's region.
    pub(crate) fn iova(&self, ptr: *const u8, len: usize) -> Option<u64> {
        let (start, size, iova) = self.region;
        let off = (ptr as usize).checked_sub(start)?;
        (off + len <= size).then_some(iova + off as u64)
    }

    /// The PRP-list page of command ID `cid`: its memory and device address.
    pub(crate) fn prp_list(&self, cid: u16) -> (*mut u64, u64) {
        let off = usize::from(cid) * 4096;
        let p = self.prp.as_ptr().wrapping_add(off).cast_mut().cast::<u64>();
        (p, self.iova(self.prp.as_ptr(), 1).expect("the PRP lists are in the region") + off as u64)
    }

    fn at(&self, b: &DmaBuf) -> u64 {
        self.iova(b.as_ptr(), 1).expect("queue memory is in the region")
    }

    /// After a controller reset (a new epoch): re-creates this queue pair on the same
    /// memory and resubmits every command it had in flight, in command-ID order. The
    /// aborted commands (and any whose completion the reset lost) run again: reads,
    /// writes, zeroes, deallocations and flushes all give the same result twice.
    fn recover(&self) {
        let epoch = self.ctrl.epoch();
        if epoch == self.epoch.get() {
            return;
        }
        self.epoch.set(epoch);
        self.head.set(0);
        self.tail.set(0);
        self.phase.set(true);
        // SAFETY: this queue's completion memory; the device does not write it until
        // the queue is created again below.
        unsafe { std::ptr::write_bytes(self.cq.as_ptr().cast_mut(), 0, self.cq.len()) };
        let made =
            self.ctrl.make_queue(self.qid, self.entries, self.at(&self.sq), self.at(&self.cq));
        let mut resubmitted = 0;
        for slot in self.slots.iter().filter(|s| s.busy.get() && s.status.get().is_none()) {
            if made.is_err() {
                slot.status.set(Some(-i64::from(libc::EIO)));
                if let Some(w) = slot.waker.borrow_mut().take() {
                    w.wake();
                }
                continue;
            }
            self.write_entry(slot.sqe.get());
            resubmitted += 1;
        }
        self.last_progress.set(Instant::now());
        match made {
            Ok(()) => {
                tracing::info!(qid = self.qid, resubmitted, "NVMe queue recovered after a reset")
            }
            Err(e) => tracing::error!(qid = self.qid, "NVMe queue lost in a reset: {e}"),
        }
    }

    /// Writes `e` at the submission tail (at most entries - 1 commands are in flight,
    /// so it is free).
    fn write_entry(&self, e: Sqe) {
        let at = self.sq.as_ptr().cast_mut().wrapping_add(usize::from(self.tail.get()) * 64);
        // SAFETY: the tail entry of this queue's submission queue, which the device reads
        // only after the doorbell.
        unsafe { std::ptr::write_volatile(at.cast::<Sqe>(), e) };
        self.tail.set((self.tail.get() + 1) % self.entries);
        self.dirty.set(true);
    }

    /// While commands are in flight: every [`WATCHDOG_POLLS`] polls without progress for
    /// [`WATCHDOG`], or with the controller in fatal status, a reset.
    fn watchdog(&self) {
        let polls = self.polls.get().wrapping_add(1);
        self.polls.set(polls);
        if !polls.is_multiple_of(WATCHDOG_POLLS) {
            return;
        }
        let stuck = self.last_progress.get().elapsed() > WATCHDOG;
        if stuck || self.ctrl.fatal() {
            tracing::warn!(qid = self.qid, stuck, "NVMe commands not completing");
            if let Err(e) = self.ctrl.reset(self.epoch.get()) {
                tracing::error!("NVMe controller reset failed: {e}");
            }
            self.last_progress.set(Instant::now());
        }
    }

    /// Writes the submission tail doorbell if entries were queued this tick.
    fn ring_doorbell(&self) -> bool {
        self.recover();
        if !self.dirty.replace(false) {
            return false;
        }
        // SAFETY: this queue's doorbell in BAR0, written only by this reactor.
        unsafe {
            std::ptr::write_volatile(
                self.ctrl.doorbell(self.qid, false),
                u32::from(self.tail.get()),
            )
        };
        true
    }

    /// Reaps completed entries; returns how many.
    fn reap(&self) -> usize {
        self.recover();
        let mut n = 0;
        loop {
            let at = self.cq.as_ptr().wrapping_add(usize::from(self.head.get()) * 16);
            // SAFETY: an entry of this queue's completion queue, which the device
            // writes; read whole, volatile.
            let e = unsafe { std::ptr::read_volatile(at.cast::<[u32; 4]>()) };
            if (e[3] >> 16) & 1 != u32::from(self.phase.get()) {
                break;
            }
            let cid = (e[3] & 0xffff) as usize;
            if let Some(slot) = self.slots.get(cid) {
                slot.status.set(Some(cqe_status(e[3])));
                if let Some(w) = slot.waker.borrow_mut().take() {
                    w.wake();
                }
            } else {
                debug_assert!(false, "completion for unknown command {cid}");
            }
            let head = (self.head.get() + 1) % self.entries;
            self.head.set(head);
            if head == 0 {
                self.phase.set(!self.phase.get());
            }
            n += 1;
        }
        if n == 0 && self.in_flight() > 0 {
            self.watchdog();
        }
        if n > 0 {
            self.last_progress.set(Instant::now());
            // SAFETY: this queue's completion doorbell, written only by this reactor.
            unsafe {
                std::ptr::write_volatile(
                    self.ctrl.doorbell(self.qid, true),
                    u32::from(self.head.get()),
                )
            };
        }
        n
    }

    /// Fault injection: with `APPLIANCE_NVME_RESET_EVERY=N`, every N-th command resets
    /// the controller right after it is submitted, with it (and others) in flight.
    fn inject_reset(&self) {
        let n = self.submitted.get() + 1;
        self.submitted.set(n);
        if self.reset_every > 0 && n.is_multiple_of(self.reset_every) {
            self.ring_doorbell();
            if let Err(e) = self.ctrl.reset(self.epoch.get()) {
                tracing::error!("NVMe controller reset failed: {e}");
            }
        }
    }

    /// Runs `cmd`; resolves to the completion's status.
    pub(crate) fn submit(&self, cmd: Command) -> Submit<'_> {
        Submit { q: self, cmd, cid: None }
    }

    /// The submission entry of `cmd` as command `cid`, its PRPs in `cid`'s list page.
    fn entry(&self, cmd: &Command, cid: u16) -> Sqe {
        let mut e = [0u32; 16];
        e[0] = u32::from(cmd.opcode) | (u32::from(cid) << 16);
        e[1] = cmd.nsid;
        if let Some((iova, len)) = cmd.data {
            let (p1, p2) = prps(iova, len as usize, self.prp_list(cid));
            (e[6], e[7], e[8], e[9]) = (p1 as u32, (p1 >> 32) as u32, p2 as u32, (p2 >> 32) as u32);
        }
        (e[10], e[11], e[12]) = (cmd.cdw10, cmd.cdw11, cmd.cdw12);
        e
    }
}

/// An I/O command: what its submission entry needs besides the command ID and PRPs.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Command {
    pub opcode: u8,
    pub nsid: u32,
    pub cdw10: u32,
    pub cdw11: u32,
    pub cdw12: u32,
    /// A contiguous transfer: device address and length.
    pub data: Option<(u64, u32)>,
}

impl Drop for QueuePair {
    fn drop(&mut self) {
        for id in self.pollers.borrow_mut().drain(..) {
            poller::unregister_poller(id);
        }
        self.ctrl.delete_queue(self.qid);
    }
}

/// A command in flight on a [`QueuePair`].
pub(crate) struct Submit<'q> {
    q: &'q QueuePair,
    cmd: Command,
    cid: Option<u16>,
}

impl Future for Submit<'_> {
    type Output = i64;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<i64> {
        let this = &mut *self;
        let q = this.q;
        let Some(cid) = this.cid else {
            let Some(cid) = q.free.borrow_mut().pop() else {
                q.waiters.register(cx.waker());
                return Poll::Pending;
            };
            q.recover();
            let e = q.entry(&this.cmd, cid);
            let slot = &q.slots[usize::from(cid)];
            slot.sqe.set(e);
            slot.busy.set(true);
            if q.in_flight() == 1 {
                q.last_progress.set(Instant::now());
            }
            q.write_entry(e);
            *slot.waker.borrow_mut() = Some(cx.waker().clone());
            this.cid = Some(cid);
            q.inject_reset();
            return Poll::Pending;
        };
        let slot = &q.slots[usize::from(cid)];
        match slot.status.take() {
            Some(status) => {
                this.cid = None;
                slot.busy.set(false);
                q.free.borrow_mut().push(cid);
                q.waiters.wake_one();
                Poll::Ready(status)
            }
            None => {
                *slot.waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl Drop for Submit<'_> {
    fn drop(&mut self) {
        let Some(cid) = self.cid else { return };
        let q = self.q;
        q.ring_doorbell();
        while q.slots[usize::from(cid)].status.get().is_none() {
            q.reap();
            std::hint::spin_loop();
        }
        q.slots[usize::from(cid)].status.set(None);
        q.slots[usize::from(cid)].busy.set(false);
        q.slots[usize::from(cid)].waker.borrow_mut().take();
        q.free.borrow_mut().push(cid);
        q.waiters.wake_one();
    }
}
