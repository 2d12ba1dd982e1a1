//! The io_uring engine: one ring per reactor, created on first use.
//!
//! Submission entries are pushed as tasks issue I/O and submitted once per tick by a
//! `Late` poller; the completion queue is reaped by an `Early` poller straight from
//! shared memory. The ring has `ENGINE_DEPTH` submission entries and twice as many
//! completion entries (the kernel default), and at most `ENGINE_DEPTH` operations are in
//! flight (the slot table), so the completion queue cannot overflow.

use std::cell::{Cell, OnceCell, RefCell};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::rc::Rc;

use io_uring::{IoUring, opcode, squeue, types};

use super::{ENGINE_DEPTH, EngineBackend, IoOp, Slots};

/// `IORING_ENTER_GETEVENTS` (the io-uring crate keeps its constants private).
const IORING_ENTER_GETEVENTS: u32 = 1;

pub(crate) struct Uring {
    ring: RefCell<IoUring>,
    /// Set up with `COOP_TASKRUN` and `TASKRUN_FLAG`: completions become visible once the
    /// reactor enters the kernel, which it does when the ring's `TASKRUN` flag says
    /// completions wait.
    coop: bool,
    slots: Slots,
    queued: Cell<u32>,
    eventfd: OwnedFd,
}

thread_local! {
    static URING: OnceCell<Rc<Uring>> = const { OnceCell::new() };
}

/// The current reactor's ring, created (and its pollers registered) on first use.
pub(crate) fn current() -> io::Result<Rc<Uring>> {
    if let Some(u) = URING.with(|c| c.get().cloned()) {
        return Ok(u);
    }
    let u = Rc::new(Uring::new()?);
    let reap = u.clone();
    let submit = u.clone();
    let pending = u.clone();
    poller::register_poller_with_pending(
        poller::Phase::Early,
        move || reap.reap() > 0,
        move || pending.has_pending(),
    );
    poller::register_poller(poller::Phase::Late, move || submit.submit_queued());
    poller::register_wakeup_fd(u.eventfd.as_raw_fd())?;
    URING.with(|c| {
        let _ = c.set(u.clone());
    });
    Ok(u)
}

/// Moves the ring's kernel workers off this reactor's core.
///
/// Requests the kernel cannot complete without blocking (an O_DIRECT write that
/// allocates file blocks or extends the file, for example) go to io_uring's worker
/// threads, which by default run where the submitting thread may run: on a pinned
/// reactor's core, where they wait behind the polling loop. They are allowed the
/// process's other CPUs instead (all of them if the reactor has the only one).
fn steer_workers(ring: &IoUring) {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity/CPU_* only touch the sets we
    // own, and the pid is this process (its main thread's mask: reactors narrow their
    // own masks when they pin).
    unsafe {
        let mut process: libc::cpu_set_t = std::mem::zeroed();
        let mut mine: libc::cpu_set_t = std::mem::zeroed();
        let size = std::mem::size_of::<libc::cpu_set_t>();
        if libc::sched_getaffinity(libc::getpid(), size, &mut process) != 0
            || libc::sched_getaffinity(0, size, &mut mine) != 0
        {
            return;
        }
        let mut others: libc::cpu_set_t = std::mem::zeroed();
        let mut any = false;
        for cpu in 0..libc::CPU_SETSIZE as usize {
            if libc::CPU_ISSET(cpu, &process) && !libc::CPU_ISSET(cpu, &mine) {
                libc::CPU_SET(cpu, &mut others);
                any = true;
            }
        }
        if any {
            // Best effort: older kernels lack IORING_REGISTER_IOWQ_AFF.
            let _ = ring.submitter().register_iowq_aff(&others);
        }
    }
}

impl Uring {
    fn new() -> io::Result<Self> {
        // Cooperative task running: a completion interrupt raised on another core no
        // longer sends an inter-processor interrupt to kick the polling reactor (a VM
        // exit on both sides under a hypervisor); the kernel raises the ring's TASKRUN
        // flag instead, and `reap` enters the kernel once for every completion waiting.
        // A sleeping reactor is still woken (the wakeup does not need the kick). Kernels
        // before 5.19 refuse the flags; the ring is then set up without them.
        let coop = IoUring::builder().setup_coop_taskrun().setup_taskrun_flag().build(ENGINE_DEPTH);
        let (ring, coop) = match coop {
            Ok(ring) => (Ok(ring), true),
            Err(_) => (IoUring::builder().build(ENGINE_DEPTH), false),
        };
        let ring = ring.map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot set up an io_uring of {ENGINE_DEPTH} entries: {e}"),
            )
        })?;
        // SAFETY: eventfd has no memory-safety preconditions.
        let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `efd` is a fresh descriptor that nothing else owns.
        let eventfd = unsafe { OwnedFd::from_raw_fd(efd) };
        ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        steer_workers(&ring);
        Ok(Uring {
            ring: RefCell::new(ring),
            coop,
            slots: Slots::new(ENGINE_DEPTH),
            queued: Cell::new(0),
            eventfd,
        })
    }

    fn entry(op: &IoOp, slot: u32) -> squeue::Entry {
        let e = match *op {
            IoOp::Read { fd, off, ptr, len } => {
                opcode::Read::new(types::Fd(fd), ptr, len).offset(off).build()
            }
            IoOp::Write { fd, off, ptr, len, fua } => opcode::Write::new(types::Fd(fd), ptr, len)
                .offset(off)
                .rw_flags(if fua { libc::RWF_DSYNC } else { 0 })
                .build(),
            IoOp::Readv { fd, off, iov, cnt } => {
                opcode::Readv::new(types::Fd(fd), iov, cnt).offset(off).build()
            }
            IoOp::Writev { fd, off, iov, cnt, fua } => opcode::Writev::new(types::Fd(fd), iov, cnt)
                .offset(off)
                .rw_flags(if fua { libc::RWF_DSYNC } else { 0 })
                .build(),
            IoOp::Fsync { fd } => {
                opcode::Fsync::new(types::Fd(fd)).flags(types::FsyncFlags::DATASYNC).build()
            }
            IoOp::Fallocate { fd, off, len, mode } => {
                opcode::Fallocate::new(types::Fd(fd), len).offset(off).mode(mode).build()
            }
        };
        e.user_data(u64::from(slot))
    }

    /// Reaps every available completion; returns how many.
    fn reap(&self) -> usize {
        let mut ring = self.ring.borrow_mut();
        if self.coop && ring.submission().taskrun() {
            // SAFETY: no submission entries and no argument are passed; GETEVENTS with
            // min_complete 0 only runs the pending completion work and returns.
            let _ = unsafe {
                ring.submitter().enter::<libc::sigset_t>(0, 0, IORING_ENTER_GETEVENTS, None)
            };
        }
        let mut cq = ring.completion();
        cq.sync();
        let mut n = 0;
        for cqe in &mut cq {
            self.slots.complete(cqe.user_data() as u32, i64::from(cqe.result()));
            n += 1;
        }
        n
    }

    /// Submits what this tick queued; returns whether anything was submitted.
    fn submit_queued(&self) -> bool {
        if self.queued.get() == 0 {
            return false;
        }
        match self.ring.borrow().submit() {
            Ok(_) => {
                self.queued.set(0);
                true
            }
            // The kernel is short of resources or the CQ is backed up: the entries stay
            // in the SQ and go with the next tick's submit.
            Err(e)
                if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EBUSY | libc::EINTR)) =>
            {
                true
            }
            Err(e) => panic!("io_uring_enter failed: {e}"),
        }
    }

    /// Work the reactor must not sleep through: queued submissions and any operation in
    /// flight (see the engines' module doc). Completions waiting in the ring, or for the
    /// kernel's task work, belong to operations still in flight until reaped.
    fn has_pending(&self) -> bool {
        self.queued.get() > 0 || self.slots.in_flight() > 0
    }
}

impl EngineBackend for Uring {
    fn slots(&self) -> &Slots {
        &self.slots
    }

    fn queue(&self, op: &IoOp, slot: u32) -> bool {
        let entry = Self::entry(op, slot);
        let mut ring = self.ring.borrow_mut();
        // SAFETY: the entry's pointers stay valid until its completion is reaped: the
        // OpFuture that owns `slot` borrows them and waits for the completion on drop.
        let pushed = unsafe { ring.submission().push(&entry).is_ok() };
        if !pushed {
            if ring.submit().is_ok() {
                self.queued.set(0);
            }
            // SAFETY: as above.
            if unsafe { ring.submission().push(&entry).is_err() } {
                return false;
            }
        }
        self.queued.set(self.queued.get() + 1);
        true
    }

    fn wait_for(&self, slot: u32) {
        loop {
            if self.slots.entries[slot as usize].result.get().is_some() {
                return;
            }
            let _ = self.ring.borrow().submit_and_wait(1);
            self.queued.set(0);
            self.reap();
        }
    }
}
