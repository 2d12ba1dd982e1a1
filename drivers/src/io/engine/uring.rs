//! The io_uring engine: one ring per reactor, created on first use, and a second one
//! with 128-byte submission and 32-byte completion entries for NVMe passthrough
//! commands (`IORING_OP_URING_CMD`), created on first use by an `nvme_uring` disk: the
//! entry sizes are fixed when a ring is set up, and doubling every file and socket
//! operation's entry for the few disks that need it would cost them cache lines.
//!
//! Submission entries are pushed as tasks issue I/O and submitted by a `Late` poller at
//! the end of the tick, or at once when [`SUBMIT_BATCH`] device entries are queued
//! (socket entries always wait for the end of the tick); the completion
//! queue is reaped by an `Early` poller straight from shared memory. The ring has
//! `ENGINE_DEPTH` submission entries and twice as many completion entries (the kernel
//! default), and at most `ENGINE_DEPTH` operations are in flight (the slot table), so the
//! completion queue cannot overflow. Both rings take the reactor's DMA region as fixed
//! buffers, registered a chunk at a time ([`Fixed`]).
//!
//! Device entries go to the kernel before socket entries, in a submission of their own.
//! The kernel holds a submission's block requests in a plug and rings the device's
//! doorbell when the whole submission has been issued; a `sendmsg` in the same batch
//! copies a reply and wakes the client first, and a receive copies requests, so the
//! disk waited for both. With the device first, 4k random reads over NBD ran a median
//! 1.12x faster (docs/perf/profile.md, 2026-12-06), for one more `io_uring_enter` in the
//! ticks that have both kinds. Socket entries keep their order among themselves.

use std::cell::{Cell, OnceCell, RefCell};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;

use io_uring::{IoUring, cqueue, opcode, squeue, types};

use super::fixed::Fixed;
use super::multishot::Streams;
use super::zc::{NOTICES, Notices};
use super::{ENGINE_DEPTH, EngineBackend, IoOp, PEER_DEPTH, SUBMIT_BATCH, Slots};

/// `IORING_ENTER_GETEVENTS` (the io-uring crate keeps its constants private).
const IORING_ENTER_GETEVENTS: u32 = 1;
/// The tag of cancellation requests, whose completions are ignored.
const CANCEL_TAG: u64 = u64::MAX;
/// Tag bit of operations whose slot is in the socket table.
const PEER_TAG: u64 = 1 << 32;
/// Tag bit of zero-copy sends, whose notice index sits above it ([`NOTICE_SHIFT`]).
const ZC_TAG: u64 = 1 << 33;
const NOTICE_SHIFT: u32 = 34;
/// Tag bit of multishot receives, whose stream index is the tag's low 32 bits.
const STREAM_TAG: u64 = 1 << 62;
/// `IORING_SEND_ZC_REPORT_USAGE` (Linux 6.2): the notification says whether the
/// kernel copied after all.
const SEND_ZC_REPORT_USAGE: u16 = 8;
/// `IORING_NOTIF_USAGE_ZC_COPIED`, in a notification's result.
const NOTIF_USAGE_ZC_COPIED: i32 = i32::MIN;
/// Socket entries held back in one tick at most: one per socket slot, and an arm and a
/// cancellation per multishot stream.
const HELD_MAX: usize = (PEER_DEPTH + 2 * super::super::net::MAX_SOCKETS) as usize;
/// Completion queue entries: one for every operation that can be in flight, so the
/// kernel never has to hold completions back in its overflow list. (Multishot receives
/// post up to `STREAM_BUFS` completions each between two reaps; should many streams do
/// so at once, the kernel keeps the excess in that list, which costs time, not data.)
const CQ_DEPTH: u32 = ENGINE_DEPTH + PEER_DEPTH;
const _: () = assert!(CQ_DEPTH.is_power_of_two() && CQ_DEPTH >= ENGINE_DEPTH);

/// A ring and its slot tables; `S`/`C` are its submission and completion entry types.
pub(crate) struct Ring<S: Encode, C: cqueue::EntryMarker> {
    ring: RefCell<IoUring<S, C>>,
    /// Set up with `COOP_TASKRUN` and `TASKRUN_FLAG`: completions become visible once the
    /// reactor enters the kernel, which it does when the ring's `TASKRUN` flag says
    /// completions wait.
    coop: bool,
    /// Device operations.
    slots: Slots,
    /// Socket operations ([`IoOp::waits_on_peer`]); they do not keep the reactor awake.
    peer_slots: Slots,
    queued: Cell<u32>,
    /// Runs of device entries in the submission queue (an entry continuing the one
    /// before it is merged into its request, so it starts no run), and where the last
    /// one ends.
    runs: Cell<u32>,
    run_end: Cell<Option<(RawFd, bool, u64)>>,
    eventfd: OwnedFd,
    /// The kernel signals `eventfd` on completions: only while the reactor prepares to
    /// sleep (see [`Ring::wants_reactor`]).
    eventfd_on: Cell<bool>,
    /// The kernel supports socket receive and sendmsg on the ring.
    sockets: bool,
    /// The kernel supports zero-copy `sendmsg` on the ring (Linux 6.1).
    zero_copy: bool,
    /// Notifications of zero-copy sends.
    pub(crate) notices: Notices,
    /// Multishot receive streams (`multishot.rs`).
    pub(crate) streams: Streams,
    /// The reactor's DMA region as fixed buffers, once set up (see [`Fixed`]).
    fixed: OnceCell<Fixed>,
    /// Socket entries of this tick, held back until the device entries are submitted
    /// (see the module doc). At most [`PEER_DEPTH`]: each holds a socket slot, so the
    /// array never grows past its first reservation.
    held: RefCell<Vec<S>>,
}

/// The reactor's ring for files and sockets.
pub(crate) type Uring = Ring<squeue::Entry, cqueue::Entry>;
/// The reactor's ring for NVMe passthrough commands.
pub(crate) type NvmeRing = Ring<squeue::Entry128, cqueue::Entry32>;

thread_local! {
    static URING: OnceCell<Rc<Uring>> = const { OnceCell::new() };
    static NVME_RING: OnceCell<Rc<NvmeRing>> = const { OnceCell::new() };
}

/// The current reactor's ring, created (and its pollers registered) on first use, with
/// the reactor's DMA region as its fixed buffers: a read or write whose buffer lies in
/// the region skips the kernel's per-I/O page pinning ([`Fixed`]).
pub(crate) fn current() -> io::Result<Rc<Uring>> {
    if let Some(u) = URING.with(|c| c.get().cloned()) {
        return Ok(u);
    }
    let u = start::<squeue::Entry, cqueue::Entry>()?;
    u.enable_fixed();
    URING.with(|c| {
        let _ = c.set(u.clone());
    });
    Ok(u)
}

/// The current reactor's NVMe passthrough ring, created on first use, with the
/// reactor's DMA region as its fixed buffers ([`Fixed`]): a command whose buffer lies
/// in the region skips the kernel's per-I/O page pinning.
pub(crate) fn current_nvme() -> io::Result<Rc<NvmeRing>> {
    if let Some(u) = NVME_RING.with(|c| c.get().cloned()) {
        return Ok(u);
    }
    let u = start::<squeue::Entry128, cqueue::Entry32>()?;
    u.enable_fixed();
    NVME_RING.with(|c| {
        let _ = c.set(u.clone());
    });
    Ok(u)
}

/// Sets up a ring and registers its pollers and wake-up descriptor on this reactor.
fn start<S: Encode + 'static, C: cqueue::EntryMarker + 'static>() -> io::Result<Rc<Ring<S, C>>> {
    let u = Rc::new(Ring::<S, C>::new()?);
    let reap = u.clone();
    let submit = u.clone();
    let pending = u.clone();
    poller::register_poller_with_pending(
        poller::Phase::Early,
        move || reap.reap() > 0,
        move || pending.wants_reactor(),
    );
    poller::register_poller(poller::Phase::Late, move || submit.submit_queued());
    poller::register_wakeup_fd(u.eventfd.as_raw_fd())?;
    Ok(u)
}

/// Moves the ring's kernel workers off this reactor's core.
///
/// Requests the kernel cannot complete without blocking (an O_DIRECT write that
/// allocates file blocks or extends the file, for example) go to io_uring's worker
/// threads, which by default run where the submitting thread may run: on a pinned
/// reactor's core, where they wait behind the polling loop. They are allowed the
/// process's other CPUs instead (all of them if the reactor has the only one).
fn steer_workers<S: squeue::EntryMarker, C: cqueue::EntryMarker>(ring: &IoUring<S, C>) {
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

/// Submission entries an [`IoOp`] can be written into; `fixed` is the index of the
/// registered buffer a read's or write's buffer lies in ([`Fixed`]).
pub(crate) trait Encode: squeue::EntryMarker {
    fn encode(op: &IoOp, fixed: Option<u16>) -> Self;
}

impl Encode for squeue::Entry {
    fn encode(op: &IoOp, fixed: Option<u16>) -> Self {
        match (*op, fixed) {
            (IoOp::Read { fd, off, ptr, len }, Some(i)) => {
                opcode::ReadFixed::new(types::Fd(fd), ptr, len, i).offset(off).build()
            }
            (IoOp::Write { fd, off, ptr, len, fua }, Some(i)) => {
                opcode::WriteFixed::new(types::Fd(fd), ptr, len, i)
                    .offset(off)
                    .rw_flags(dsync(fua))
                    .build()
            }
            (op, _) => encode_plain(op),
        }
    }
}

/// An operation without a fixed buffer.
fn encode_plain(op: IoOp) -> squeue::Entry {
    match op {
        IoOp::Read { fd, off, ptr, len } => {
            opcode::Read::new(types::Fd(fd), ptr, len).offset(off).build()
        }
        IoOp::Write { fd, off, ptr, len, fua } => {
            opcode::Write::new(types::Fd(fd), ptr, len).offset(off).rw_flags(dsync(fua)).build()
        }
        IoOp::Readv { fd, off, iov, cnt } => {
            opcode::Readv::new(types::Fd(fd), iov, cnt).offset(off).build()
        }
        IoOp::Writev { fd, off, iov, cnt, fua } => {
            opcode::Writev::new(types::Fd(fd), iov, cnt).offset(off).rw_flags(dsync(fua)).build()
        }
        IoOp::Fsync { fd } => {
            opcode::Fsync::new(types::Fd(fd)).flags(types::FsyncFlags::DATASYNC).build()
        }
        IoOp::Fallocate { fd, off, len, mode } => {
            opcode::Fallocate::new(types::Fd(fd), len).offset(off).mode(mode).build()
        }
        IoOp::Recv { fd, ptr, len } => opcode::Recv::new(types::Fd(fd), ptr, len).build(),
        IoOp::SendMsg { fd, msg } => {
            opcode::SendMsg::new(types::Fd(fd), msg).flags(libc::MSG_NOSIGNAL as u32).build()
        }
        IoOp::SendMsgZc { fd, msg, .. } => opcode::SendMsgZc::new(types::Fd(fd), msg)
            .flags(libc::MSG_NOSIGNAL as u32)
            .ioprio(SEND_ZC_REPORT_USAGE)
            .build(),
        IoOp::UringCmd { .. } => {
            // Only the 128-byte ring carries commands (`EngineRef::Nvme`); should one
            // reach this ring, it fails (EBADF) instead of completing as a no-op.
            debug_assert!(false, "a passthrough command on the 64-byte ring");
            opcode::Read::new(types::Fd(-1), std::ptr::null_mut(), 0).build()
        }
    }
}

/// The flags of a write: `RWF_DSYNC` when it is FUA.
fn dsync(fua: bool) -> i32 {
    if fua { libc::RWF_DSYNC } else { 0 }
}

impl Encode for squeue::Entry128 {
    fn encode(op: &IoOp, _fixed: Option<u16>) -> Self {
        match *op {
            IoOp::UringCmd { fd, cmd_op, cmd, fixed } => {
                // SAFETY: `cmd` points at the command in the operation's future, alive
                // while it is queued (the bytes are copied into the entry here).
                let cmd = unsafe { *cmd };
                opcode::UringCmd80::new(types::Fd(fd), cmd_op).cmd(cmd).buf_index(fixed).build()
            }
            _ => encode_plain(*op).into(),
        }
    }
}

impl<S: Encode, C: cqueue::EntryMarker> Ring<S, C> {
    fn new() -> io::Result<Self> {
        // Cooperative task running: a completion interrupt raised on another core no
        // longer sends an inter-processor interrupt to kick the polling reactor (a VM
        // exit on both sides under a hypervisor); the kernel raises the ring's TASKRUN
        // flag instead, and `reap` enters the kernel once for every completion waiting.
        // A sleeping reactor is still woken (the wakeup does not need the kick). Kernels
        // before 5.19 refuse the flags; the ring is then set up without them.
        let coop = IoUring::<S, C>::builder()
            .setup_cqsize(CQ_DEPTH)
            .setup_coop_taskrun()
            .setup_taskrun_flag()
            .build(ENGINE_DEPTH);
        let (ring, coop) = match coop {
            Ok(ring) => (Ok(ring), true),
            Err(_) => {
                (IoUring::<S, C>::builder().setup_cqsize(CQ_DEPTH).build(ENGINE_DEPTH), false)
            }
        };
        let mut ring = ring.map_err(|e| {
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
        // Signalled only while the reactor goes to sleep (`wants_reactor`).
        ring.completion().disable_eventfd();
        steer_workers(&ring);
        let sockets = probe_sockets(&ring);
        let zero_copy = sockets && probe_zero_copy(&ring);
        Ok(Ring {
            ring: RefCell::new(ring),
            coop,
            slots: Slots::new(ENGINE_DEPTH),
            peer_slots: Slots::new(PEER_DEPTH),
            queued: Cell::new(0),
            runs: Cell::new(0),
            run_end: Cell::new(None),
            eventfd,
            eventfd_on: Cell::new(false),
            sockets,
            zero_copy,
            notices: Notices::new(if zero_copy { NOTICES } else { 0 }),
            streams: Streams::new(if sockets { super::super::net::MAX_SOCKETS } else { 0 }),
            fixed: OnceCell::new(),
            // Reserved whole on the first socket operation (the NVMe ring never has one).
            held: RefCell::new(Vec::new()),
        })
    }

    /// Stops using fixed buffers (a kernel that registers them but refuses them for
    /// NVMe passthrough commands with EINVAL, as the test guest's Debian 6.1 kernel
    /// does), releasing the pinned region.
    pub(crate) fn disable_fixed(&self) {
        if let Some(f) = self.fixed.get() {
            tracing::info!("NVMe passthrough without fixed buffers: the kernel refuses them");
            f.disable(&self.ring.borrow());
        }
    }

    /// Sets up the fixed-buffer table (once, on the reactor that owns the ring).
    fn enable_fixed(&self) {
        if let Some(f) = Fixed::new(&self.ring.borrow()) {
            let _ = self.fixed.set(f);
        }
    }

    /// The index of the fixed buffer holding `len` bytes at `addr`, if they lie in one.
    pub(crate) fn fixed_index(&self, addr: usize, len: usize) -> Option<u16> {
        self.fixed.get()?.index(&self.ring.borrow(), addr, len)
    }

    /// The kernel's tag for `op` in `slot`: the slot, and which table it is in.
    fn tag(op: &IoOp, slot: u32) -> u64 {
        match *op {
            IoOp::SendMsgZc { notice, .. } => {
                PEER_TAG | ZC_TAG | (u64::from(notice) << NOTICE_SHIFT) | u64::from(slot)
            }
            _ if op.waits_on_peer() => PEER_TAG | u64::from(slot),
            _ => u64::from(slot),
        }
    }

    /// A completion of a zero-copy send: the send's own (which names its notice when
    /// no notification follows: a send that failed early) or its notification.
    fn complete_zc(&self, tag: u64, cqe: &cqueue::Entry) {
        let notice = (tag >> NOTICE_SHIFT) as u32;
        if cqueue::notif(cqe.flags()) {
            let copied = cqe.result() & NOTIF_USAGE_ZC_COPIED != 0;
            self.notices.complete(notice, copied);
            return;
        }
        self.peer_slots.complete(tag as u32, i64::from(cqe.result()));
        if !cqueue::more(cqe.flags()) {
            self.notices.complete(notice, false);
        }
    }

    /// Reaps every available completion; returns how many.
    fn reap(&self) -> usize {
        let mut ring = self.ring.borrow_mut();
        if self.eventfd_on.replace(false) {
            // Awake again: the reactor reaps every tick, no signal needed.
            ring.completion().disable_eventfd();
        }
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
            let cqe: cqueue::Entry = cqe.into();
            let tag = cqe.user_data();
            if tag == CANCEL_TAG {
                continue;
            }
            if tag & STREAM_TAG != 0 {
                self.streams.complete(tag as u32, cqe.result(), cqe.flags());
            } else if tag & ZC_TAG != 0 {
                self.complete_zc(tag, &cqe);
            } else {
                let slots = if tag & PEER_TAG != 0 { &self.peer_slots } else { &self.slots };
                slots.complete(tag as u32, i64::from(cqe.result()));
            }
            n += 1;
        }
        n
    }

    /// Submits what this tick queued; returns whether anything was submitted. When
    /// completions wait for the kernel's task work, the same system call runs it, so
    /// the next tick's reap finds them in the ring without entering the kernel again.
    fn submit_queued(&self) -> bool {
        if self.queued.get() == 0 {
            return false;
        }
        if !self.held.borrow().is_empty() {
            // The device entries alone, so their doorbell does not wait for the socket
            // work. A refusal leaves them queued for the submission below.
            self.submit_devices();
            self.release_held();
        }
        self.enter_all();
        true
    }

    /// Submits the device entries in the submission queue (the held socket entries are
    /// not in it), running any waiting completion work in the same system call.
    fn submit_devices(&self) {
        if self.ring.borrow_mut().submission().is_empty() {
            return;
        }
        self.enter_all();
    }

    /// Submits everything in the submission queue. Short of kernel resources, or with
    /// the completion queue backed up, the entries stay in the queue for the next try.
    fn enter_all(&self) {
        let mut ring = self.ring.borrow_mut();
        let (len, taskrun) = {
            let sq = ring.submission();
            (sq.len() as u32, sq.taskrun())
        };
        let flags = if self.coop && taskrun { IORING_ENTER_GETEVENTS } else { 0 };
        // SAFETY: no argument is passed; the entries were pushed by `push`, whose
        // pointers stay valid until their completions are reaped.
        match unsafe { ring.submitter().enter::<libc::sigset_t>(len, 0, flags, None) } {
            Ok(_) => {
                drop(ring);
                self.submitted();
            }
            Err(e)
                if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EBUSY | libc::EINTR)) => {}
            Err(e) => panic!("io_uring_enter failed: {e}"),
        }
    }

    /// Everything in the submission queue went to the kernel: what is still queued is
    /// the held socket entries.
    fn submitted(&self) {
        self.queued.set(self.held.borrow().len() as u32);
        self.runs.set(0);
        self.run_end.set(None);
    }

    /// Moves the held socket entries into the submission queue (submitting what is
    /// there when it is full), behind the device entries already in it.
    fn release_held(&self) {
        let mut held = self.held.borrow_mut();
        let mut ring = self.ring.borrow_mut();
        for entry in held.iter() {
            // SAFETY: as in `push`: the entry's pointers stay valid until its completion
            // is reaped.
            while unsafe { ring.submission().push(entry).is_err() } {
                if ring.submit().is_err() {
                    // Out of kernel resources with a full queue: wait for a completion
                    // to make room (the completion queue holds every operation).
                    let _ = ring.submit_and_wait(1);
                }
            }
        }
        held.clear();
    }

    /// Work the reactor must not sleep through: queued submissions and any operation in
    /// flight (see the engines' module doc). Completions waiting in the ring, or for the
    /// kernel's task work, belong to operations still in flight until reaped.
    fn has_pending(&self) -> bool {
        self.queued.get() > 0 || self.slots.in_flight() > 0
    }

    /// Asked by a reactor about to sleep: work it must not sleep through
    /// ([`Ring::has_pending`]), or completions already in the ring or waiting for the
    /// kernel's task work. Turns the eventfd on first, so a completion posted after
    /// this check wakes the sleep.
    ///
    /// An awake reactor reaps every tick, so the kernel does not signal the eventfd
    /// then (`IORING_CQ_EVENTFD_DISABLED`): that signal, a lock and a wakeup of the
    /// reactor's own epoll set on every batch of completions, was 4–5 % of the
    /// reactor's samples serving the `null` disk. The re-check after turning it on cannot
    /// miss a completion: socket completions are posted by the reactor's own task work,
    /// whose pending flag (checked here, and the interrupted sleep's
    /// `signal_pending`) is set before the reactor is woken; only device completions
    /// are posted by other threads (the kernel's workers), and a ring with a device
    /// operation in flight never lets the reactor sleep.
    fn wants_reactor(&self) -> bool {
        if self.has_pending() {
            return true;
        }
        let mut ring = self.ring.borrow_mut();
        if !self.eventfd_on.replace(true) {
            ring.completion().enable_eventfd();
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        if self.coop && ring.submission().taskrun() {
            return true;
        }
        let mut cq = ring.completion();
        cq.sync();
        !cq.is_empty()
    }

    /// Holds a socket entry for the end of the tick (see the module doc).
    fn hold(&self, entry: S) {
        let mut held = self.held.borrow_mut();
        if held.capacity() == 0 {
            held.reserve_exact(HELD_MAX);
        }
        debug_assert!(held.len() < HELD_MAX, "held entries are bounded by their slots");
        held.push(entry);
        self.queued.set(self.queued.get() + 1);
    }

    /// A multishot receive on `fd` for stream `i`, queued for the end of the tick.
    pub(crate) fn arm_stream(&self, i: u32, fd: RawFd) {
        let entry = self.streams.arm(i, fd, PEER_TAG | STREAM_TAG | u64::from(i));
        self.hold(S::from(entry));
    }

    /// Cancels stream `i`'s receive, if armed; its last completion follows.
    pub(crate) fn cancel_stream(&self, i: u32) {
        if self.streams.cancel(i) {
            self.send_stream_cancel(i);
        }
    }

    /// Gives stream `i` back (cancelling its receive first, if armed).
    pub(crate) fn release_stream(&self, i: u32) {
        if self.streams.release(i) {
            self.send_stream_cancel(i);
        }
    }

    fn send_stream_cancel(&self, i: u32) {
        let tag = PEER_TAG | STREAM_TAG | u64::from(i);
        self.hold(S::from(opcode::AsyncCancel::new(tag).build().user_data(CANCEL_TAG)));
    }

    /// A stream of multishot receives of its own, or `None` (see `multishot.rs`).
    pub(crate) fn acquire_stream(&self) -> Option<u32> {
        self.streams.acquire(&self.ring.borrow().submitter())
    }

    /// Pushes one entry, submitting what is queued first if the ring is full.
    fn push(&self, entry: &S) -> bool {
        let mut ring = self.ring.borrow_mut();
        // SAFETY: the entry's pointers stay valid until its completion is reaped: the
        // OpFuture that owns its slot borrows them and, on drop, waits for (or cancels
        // and then waits for) the completion. A cancellation carries no pointer.
        let pushed = unsafe { ring.submission().push(entry).is_ok() };
        if !pushed {
            if ring.submit().is_ok() {
                self.submitted();
            }
            // SAFETY: as above.
            if unsafe { ring.submission().push(entry).is_err() } {
                return false;
            }
        }
        self.queued.set(self.queued.get() + 1);
        true
    }
}

/// Whether the kernel takes `IORING_OP_RECV` and `IORING_OP_SENDMSG` (Linux 5.6).
fn probe_sockets<S: squeue::EntryMarker, C: cqueue::EntryMarker>(ring: &IoUring<S, C>) -> bool {
    let mut probe = io_uring::Probe::new();
    ring.submitter().register_probe(&mut probe).is_ok()
        && probe.is_supported(opcode::Recv::CODE)
        && probe.is_supported(opcode::SendMsg::CODE)
        && probe.is_supported(opcode::AsyncCancel::CODE)
}

/// Whether the kernel takes `IORING_OP_SENDMSG_ZC` (Linux 6.1). Its usage report
/// (6.2) cannot be probed: a kernel without it refuses the send with `EINVAL`, and the
/// socket falls back to copying sends (`net.rs`).
fn probe_zero_copy<S: squeue::EntryMarker, C: cqueue::EntryMarker>(ring: &IoUring<S, C>) -> bool {
    let mut probe = io_uring::Probe::new();
    ring.submitter().register_probe(&mut probe).is_ok()
        && probe.is_supported(opcode::SendMsgZc::CODE)
}

/// Whether this reactor's ring can carry zero-copy sends.
pub(crate) fn zero_copy_supported() -> bool {
    current().is_ok_and(|u| u.zero_copy)
}

/// Whether this reactor's ring can carry socket I/O (`nbd.socket_io = "auto"`).
pub(crate) fn sockets_supported() -> bool {
    current().is_ok_and(|u| u.sockets)
}

impl<S: Encode, C: cqueue::EntryMarker> EngineBackend for Ring<S, C> {
    fn slots(&self, op: &IoOp) -> &Slots {
        if op.waits_on_peer() { &self.peer_slots } else { &self.slots }
    }

    fn queue(&self, op: &IoOp, slot: u32) -> bool {
        let fixed = match *op {
            IoOp::Read { ptr, len, .. } => self.fixed_index(ptr as usize, len as usize),
            IoOp::Write { ptr, len, .. } => self.fixed_index(ptr as usize, len as usize),
            _ => None,
        };
        let mut entry = S::encode(op, fixed);
        entry.set_user_data(Self::tag(op, slot));
        if let IoOp::SendMsgZc { notice, .. } = *op {
            // Armed here, so a send that never reaches the ring never waits for a
            // notification.
            self.notices.arm(notice);
        }
        if op.waits_on_peer() {
            self.hold(entry);
            return true;
        }
        if !self.push(&entry) {
            return false;
        }
        // Only device runs count toward the batch: socket entries wait for the end of
        // the tick, where replies are coalesced, and an entry continuing the one before
        // it joins its request in the kernel.
        if !op.continues(self.run_end.replace(op.run_end())) {
            self.runs.set(self.runs.get() + 1);
        }
        if self.runs.get() >= SUBMIT_BATCH {
            self.submit_devices();
        }
        true
    }

    fn wait_for(&self, op: &IoOp, slot: u32) {
        // A held entry must reach the kernel before the cancellation that targets it,
        // and the loops below submit without `submit_queued`.
        self.release_held();
        let slots = self.slots(op);
        if op.waits_on_peer() {
            // A peer may never answer: cancel, then wait for the cancelled completion.
            let cancel = S::from(
                opcode::AsyncCancel::new(Self::tag(op, slot)).build().user_data(CANCEL_TAG),
            );
            while !self.push(&cancel) {
                let _ = self.ring.borrow().submit_and_wait(1);
                self.submitted();
                self.reap();
            }
        }
        loop {
            if slots.entries[slot as usize].result.get().is_some() {
                return;
            }
            let _ = self.ring.borrow().submit_and_wait(1);
            self.submitted();
            self.reap();
        }
    }
}
