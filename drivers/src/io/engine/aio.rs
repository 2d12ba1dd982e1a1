//! The Linux native AIO engine: one context per reactor, created on first use.
//!
//! `iocb`s live in a fixed array indexed by completion slot, so queuing an operation
//! writes one array entry and one pointer; the `Late` poller hands the tick's batch to
//! `io_submit` (or `queue` does, once [`SUBMIT_BATCH`] wait). Completions are reaped from the context's completion ring in user space
//! (the ring is mapped into the process; its header carries a magic number and the
//! head/tail indices), as SPDK does, so reaping costs no syscall; if the ring's layout is
//! not the expected one, `io_getevents` with a zero timeout is used instead. Each iocb
//! asks for an eventfd notification so a sleeping reactor wakes on completion.
//!
//! AIO has no fallocate; callers route discard and write-zeroes through the offload
//! workers. With buffered files (`direct = false`) the kernel performs AIO
//! synchronously inside `io_submit`: that configuration works but blocks the reactor for
//! each batch, which is why `io_uring` is the default driver.

use std::cell::{Cell, OnceCell, RefCell};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicU32, Ordering};

use super::{ENGINE_DEPTH, EngineBackend, IoOp, SUBMIT_BATCH, Slots};

const IOCB_CMD_PREAD: u16 = 0;
const IOCB_CMD_PWRITE: u16 = 1;
const IOCB_CMD_FDSYNC: u16 = 3;
const IOCB_CMD_PREADV: u16 = 7;
const IOCB_CMD_PWRITEV: u16 = 8;
const IOCB_FLAG_RESFD: u32 = 1;
const AIO_RING_MAGIC: u32 = 0xa10a10a1;
/// Events reaped per call.
const REAP_BATCH: usize = 256;

/// `struct iocb` from linux/aio_abi.h (little-endian layout).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Iocb {
    aio_data: u64,
    aio_key: u32,
    aio_rw_flags: i32,
    aio_lio_opcode: u16,
    aio_reqprio: i16,
    aio_fildes: u32,
    aio_buf: u64,
    aio_nbytes: u64,
    aio_offset: i64,
    aio_reserved2: u64,
    aio_flags: u32,
    aio_resfd: u32,
}
const _: () = assert!(std::mem::size_of::<Iocb>() == 64);

/// `struct io_event`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct IoEvent {
    data: u64,
    obj: u64,
    res: i64,
    res2: i64,
}
const _: () = assert!(std::mem::size_of::<IoEvent>() == 32);

/// The header of the completion ring the kernel maps at the context address.
#[repr(C)]
struct AioRing {
    id: u32,
    nr: u32,
    head: AtomicU32,
    tail: AtomicU32,
    magic: u32,
    compat_features: u32,
    incompat_features: u32,
    header_length: u32,
}

pub(crate) struct Aio {
    ctx: libc::c_ulong,
    iocbs: RefCell<Box<[Iocb]>>,
    pending: RefCell<Vec<*mut Iocb>>,
    slots: Slots,
    user_ring: bool,
    events: RefCell<Box<[IoEvent]>>,
    queued: Cell<u32>,
    eventfd: OwnedFd,
}

thread_local! {
    static AIO: OnceCell<Rc<Aio>> = const { OnceCell::new() };
}

/// The current reactor's AIO context, created (and its pollers registered) on first use.
pub(crate) fn current() -> io::Result<Rc<Aio>> {
    if let Some(a) = AIO.with(|c| c.get().cloned()) {
        return Ok(a);
    }
    let a = Rc::new(Aio::new()?);
    let reap = a.clone();
    let submit = a.clone();
    let pending = a.clone();
    poller::register_poller_with_pending(
        poller::Phase::Early,
        move || reap.reap() > 0,
        move || pending.has_pending(),
    );
    poller::register_poller(poller::Phase::Late, move || submit.submit_queued());
    poller::register_wakeup_fd(a.eventfd.as_raw_fd())?;
    AIO.with(|c| {
        let _ = c.set(a.clone());
    });
    Ok(a)
}

impl Aio {
    fn new() -> io::Result<Self> {
        let mut ctx: libc::c_ulong = 0;
        // SAFETY: io_setup writes the context id into `ctx`, a valid c_ulong.
        let rc =
            unsafe { libc::syscall(libc::SYS_io_setup, ENGINE_DEPTH as libc::c_long, &mut ctx) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!(
                    "cannot set up a Linux AIO context of {ENGINE_DEPTH} events: {e} \
                     (see /proc/sys/fs/aio-max-nr)"
                ),
            ));
        }
        // SAFETY: the context id is the address of the kernel-mapped completion ring,
        // which stays mapped until io_destroy; we only read its header here.
        let user_ring = unsafe {
            let ring = &*(ctx as *const AioRing);
            ring.magic == AIO_RING_MAGIC && ring.incompat_features == 0
        };
        // SAFETY: eventfd has no memory-safety preconditions.
        let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Aio {
            ctx,
            iocbs: RefCell::new(vec![Iocb::default(); ENGINE_DEPTH as usize].into_boxed_slice()),
            pending: RefCell::new(Vec::with_capacity(ENGINE_DEPTH as usize)),
            slots: Slots::new(ENGINE_DEPTH),
            user_ring,
            events: RefCell::new(vec![IoEvent::default(); REAP_BATCH].into_boxed_slice()),
            queued: Cell::new(0),
            // SAFETY: `efd` is a fresh descriptor that nothing else owns.
            eventfd: unsafe { OwnedFd::from_raw_fd(efd) },
        })
    }

    fn submit_queued(&self) -> bool {
        let mut pending = self.pending.borrow_mut();
        if pending.is_empty() {
            return false;
        }
        let mut done = 0;
        while done < pending.len() {
            // SAFETY: `pending` holds pointers into `self.iocbs`, which outlives the call;
            // the kernel copies each iocb during io_submit.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_io_submit,
                    self.ctx,
                    (pending.len() - done) as libc::c_long,
                    pending.as_ptr().add(done),
                )
            };
            if rc > 0 {
                done += rc as usize;
                continue;
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                // Out of kernel resources: keep the rest for the next tick.
                Some(libc::EAGAIN) | Some(libc::EINTR) => break,
                _ => {
                    // The first iocb was refused (EINVAL for an unsupported op on this
                    // file, EBADF...): fail it and go on with the rest.
                    // SAFETY: the pointer is into `self.iocbs`.
                    let slot = unsafe { (*pending[done]).aio_data } as u32;
                    let errno = err.raw_os_error().unwrap_or(libc::EIO);
                    self.slots.complete(slot, -i64::from(errno));
                    done += 1;
                }
            }
        }
        pending.drain(..done);
        self.queued.set(pending.len() as u32);
        true
    }

    fn reap(&self) -> usize {
        if self.slots.in_flight() == 0 {
            return 0;
        }
        if self.user_ring { self.reap_user() } else { self.reap_syscall() }
    }

    fn reap_user(&self) -> usize {
        // SAFETY: the ring header is mapped for the context's life (see `new`); head and
        // tail are accessed atomically, as the kernel does.
        let ring = unsafe { &*(self.ctx as *const AioRing) };
        let nr = ring.nr;
        let mut head = ring.head.load(Ordering::Relaxed);
        // Acquire: see the events the kernel wrote before it published the tail.
        let tail = ring.tail.load(Ordering::Acquire);
        let mut n = 0;
        while head != tail {
            // SAFETY: events follow the header; `head < nr` indexes a mapped event.
            let ev = unsafe {
                let base = (self.ctx as *const u8).add(std::mem::size_of::<AioRing>());
                *(base as *const IoEvent).add(head as usize)
            };
            head = (head + 1) % nr;
            self.slots.complete(ev.data as u32, ev.res);
            n += 1;
        }
        if n > 0 {
            // Release: our reads of the events happen before the kernel may reuse them.
            ring.head.store(head, Ordering::Release);
        }
        n
    }

    fn reap_syscall(&self) -> usize {
        let mut events = self.events.borrow_mut();
        let mut zero = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: `events` has REAP_BATCH writable entries; a zero timeout never blocks.
        let n = unsafe {
            libc::syscall(
                libc::SYS_io_getevents,
                self.ctx,
                0 as libc::c_long,
                REAP_BATCH as libc::c_long,
                events.as_mut_ptr(),
                &mut zero,
            )
        };
        if n <= 0 {
            return 0;
        }
        for ev in &events[..n as usize] {
            self.slots.complete(ev.data as u32, ev.res);
        }
        n as usize
    }

    /// Work the reactor must not sleep through: queued submissions and any operation in
    /// flight (see the engines' module doc).
    fn has_pending(&self) -> bool {
        self.queued.get() > 0 || self.slots.in_flight() > 0
    }
}

impl EngineBackend for Aio {
    fn slots(&self, _op: &IoOp) -> &Slots {
        &self.slots
    }

    fn queue(&self, op: &IoOp, slot: u32) -> bool {
        let mut cb = Iocb {
            aio_data: u64::from(slot),
            aio_flags: IOCB_FLAG_RESFD,
            aio_resfd: self.eventfd.as_raw_fd() as u32,
            ..Iocb::default()
        };
        let dsync = |fua: bool| if fua { libc::RWF_DSYNC } else { 0 };
        match *op {
            IoOp::Read { fd, off, ptr, len } => {
                cb.aio_lio_opcode = IOCB_CMD_PREAD;
                (cb.aio_fildes, cb.aio_offset, cb.aio_buf, cb.aio_nbytes) =
                    (fd as u32, off as i64, ptr as u64, u64::from(len));
            }
            IoOp::Write { fd, off, ptr, len, fua } => {
                cb.aio_lio_opcode = IOCB_CMD_PWRITE;
                cb.aio_rw_flags = dsync(fua);
                (cb.aio_fildes, cb.aio_offset, cb.aio_buf, cb.aio_nbytes) =
                    (fd as u32, off as i64, ptr as u64, u64::from(len));
            }
            IoOp::Readv { fd, off, iov, cnt } => {
                cb.aio_lio_opcode = IOCB_CMD_PREADV;
                (cb.aio_fildes, cb.aio_offset, cb.aio_buf, cb.aio_nbytes) =
                    (fd as u32, off as i64, iov as u64, u64::from(cnt));
            }
            IoOp::Writev { fd, off, iov, cnt, fua } => {
                cb.aio_lio_opcode = IOCB_CMD_PWRITEV;
                cb.aio_rw_flags = dsync(fua);
                (cb.aio_fildes, cb.aio_offset, cb.aio_buf, cb.aio_nbytes) =
                    (fd as u32, off as i64, iov as u64, u64::from(cnt));
            }
            IoOp::Fsync { fd } => {
                cb.aio_lio_opcode = IOCB_CMD_FDSYNC;
                cb.aio_fildes = fd as u32;
            }
            IoOp::Fallocate { .. }
            | IoOp::Recv { .. }
            | IoOp::SendMsg { .. }
            | IoOp::SendMsgZc { .. }
            | IoOp::UringCmd { .. } => {
                // Callers route fallocate through the offload workers, socket I/O
                // through io_uring and passthrough commands through the NVMe ring.
                self.slots.complete(slot, -i64::from(libc::EOPNOTSUPP));
                return true;
            }
        }
        let ptr: *mut Iocb = {
            let mut iocbs = self.iocbs.borrow_mut();
            iocbs[slot as usize] = cb;
            &mut iocbs[slot as usize]
        };
        self.pending.borrow_mut().push(ptr);
        self.queued.set(self.queued.get() + 1);
        if self.queued.get() >= SUBMIT_BATCH {
            self.submit_queued();
        }
        true
    }

    fn wait_for(&self, _op: &IoOp, slot: u32) {
        loop {
            if self.slots.entries[slot as usize].result.get().is_some() {
                return;
            }
            self.submit_queued();
            if self.reap() == 0 {
                std::thread::yield_now();
            }
        }
    }
}

impl Drop for Aio {
    fn drop(&mut self) {
        // SAFETY: destroys the context created in `new`; waits for in-flight I/O.
        unsafe { libc::syscall(libc::SYS_io_destroy, self.ctx) };
    }
}
