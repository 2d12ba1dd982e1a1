//! I/O engines: one io_uring or one Linux AIO context per reactor, shared by every file
//! the reactor touches.
//!
//! Both engines satisfy one completion contract:
//! - an operation takes a slot from a fixed per-reactor completion table; the slot
//!   index is the kernel's tag (io_uring `user_data`, AIO `aio_data`), so an I/O costs
//!   no allocation;
//! - operations are queued during the tick and submitted in one batch by the engine's
//!   `Late` poller (`io_uring_enter` / `io_submit`); completions are reaped by its
//!   `Early` poller without a syscall (the io_uring CQ and the AIO completion ring are
//!   both shared memory);
//! - out of slots or submission space is a status: the operation parks on the
//!   engine's wait list and retries when a slot frees;
//! - an operation future dropped while its I/O is in flight waits (reaping) for that
//!   I/O before returning, so a borrowed buffer is never written after its borrow ends.
//!
//! The engines register their completion eventfds as reactor wakeup descriptors, so an
//! adaptive reactor asleep in `epoll_wait` wakes when I/O completes. But an adaptive
//! reactor never goes to sleep while an operation is in flight: the completion is
//! coming, and on a virtual machine the wake-up from an idle vCPU costs tens of
//! microseconds, which at QD32 cost 10 % of the throughput of `busy` (medians of three
//! alternating rounds; docs/perf/profile.md). It sleeps once the disk is idle.

pub(crate) mod aio;
mod fixed;
pub(crate) mod multishot;
pub(crate) mod offload;
pub(crate) mod uring;
pub(crate) mod zc;

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::marker::PhantomData;
use std::os::fd::RawFd;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use poller::WaitList;

/// In-flight device operations per engine per reactor.
pub const ENGINE_DEPTH: u32 = 1024;
/// Queued operations that are submitted at once instead of waiting for the end of the
/// tick. Batching submissions saves system calls, but a batch reaches the device as one
/// burst: its first request waits for the rest to be built, the virtual disk completes
/// them as one burst, and the queue runs in convoys. On this project's virtio disk, 4k
/// reads at QD32 over vhost-user-blk ran at 47–55k IOPS with one submission per tick
/// and 56–63k with one every 4 or 8 entries (2026-12-05, a day the disk was slow); on a
/// faster day (2026-12-06, the disk at 199k for fio alone) every 8 entries ran at 176.8k
/// (requests at the disk for 117 µs on average), every 2 at 189.6k (96 µs) and every
/// entry at 184.6k, random writes at 151.0k, 155.2k and 159.4k, 64k reads and writes
/// alike (medians of 3 alternating rounds, docs/perf/vhost.md). The io_uring engine
/// counts runs, not entries: a read or write that starts where the one queued before it
/// ends is merged with it by the block layer's plug, so it rides along (64k sequential
/// reads over NBD at QD8: 20.1k IOPS when every 2 entries went, 21.9k every 8).
pub const SUBMIT_BATCH: u32 = 2;
/// In-flight socket operations per io_uring per reactor: a receive and a send for each
/// of [`net::MAX_SOCKETS`](super::net::MAX_SOCKETS) sockets. Their own table, so
/// connections that never speak can hold every socket slot without taking one from
/// the disks.
pub const PEER_DEPTH: u32 = 2 * super::net::MAX_SOCKETS;

/// One kernel I/O operation. Pointers must stay valid until the operation completes;
/// [`OpFuture`] guarantees that by borrowing them for its lifetime.
#[derive(Clone, Copy, Debug)]
pub(crate) enum IoOp {
    Read {
        fd: RawFd,
        off: u64,
        ptr: *mut u8,
        len: u32,
    },
    Write {
        fd: RawFd,
        off: u64,
        ptr: *const u8,
        len: u32,
        fua: bool,
    },
    Readv {
        fd: RawFd,
        off: u64,
        iov: *const libc::iovec,
        cnt: u32,
    },
    Writev {
        fd: RawFd,
        off: u64,
        iov: *const libc::iovec,
        cnt: u32,
        fua: bool,
    },
    /// fdatasync.
    Fsync {
        fd: RawFd,
    },
    Fallocate {
        fd: RawFd,
        off: u64,
        len: u64,
        mode: i32,
    },
    /// A socket receive (io_uring only): completes when data, end of stream or an
    /// error arrives, which may be never; see [`IoOp::waits_on_peer`].
    Recv {
        fd: RawFd,
        ptr: *mut u8,
        len: u32,
    },
    /// A socket `sendmsg` with `MSG_NOSIGNAL` (io_uring only).
    SendMsg {
        fd: RawFd,
        msg: *const libc::msghdr,
    },
    /// A zero-copy `sendmsg` (io_uring only): the buffers stay the kernel's until the
    /// notification of `notice` arrives, after the operation completes (see `zc.rs`).
    SendMsgZc {
        fd: RawFd,
        msg: *const libc::msghdr,
        notice: u32,
    },
    /// A driver command (`IORING_OP_URING_CMD`, the NVMe ring only): `cmd_op` names
    /// the command set, `cmd` its 80 bytes (copied into the entry when queued). With
    /// `fixed`, the data buffer is in the ring's registered buffer of that index (the
    /// reactor's DMA region, see [`uring::NvmeRing`]).
    UringCmd {
        fd: RawFd,
        cmd_op: u32,
        cmd: *const [u8; 80],
        fixed: Option<u16>,
    },
}

impl IoOp {
    /// The file range of a single-buffer read or write: (file, write, offset, end).
    fn extent(&self) -> Option<(RawFd, bool, u64, u64)> {
        match *self {
            IoOp::Read { fd, off, len, .. } => Some((fd, false, off, off + u64::from(len))),
            IoOp::Write { fd, off, len, .. } => Some((fd, true, off, off + u64::from(len))),
            _ => None,
        }
    }

    /// Whether the block layer can merge this operation into `prev`'s request when both
    /// are submitted together: the same file and direction, starting where `prev` ends.
    pub(crate) fn continues(&self, prev: Option<(RawFd, bool, u64)>) -> bool {
        match (self.extent(), prev) {
            (Some((fd, w, off, _)), Some((pfd, pw, end))) => fd == pfd && w == pw && off == end,
            _ => false,
        }
    }

    /// Where a following operation would have to start to continue this one.
    pub(crate) fn run_end(&self) -> Option<(RawFd, bool, u64)> {
        self.extent().map(|(fd, w, _, end)| (fd, w, end))
    }

    /// An operation that waits on a network peer rather than on a device: it takes its
    /// slot from the socket table, it does not keep an adaptive reactor awake, and a
    /// future dropped while it is in flight cancels it instead of waiting for it.
    pub(crate) fn waits_on_peer(&self) -> bool {
        matches!(self, IoOp::Recv { .. } | IoOp::SendMsg { .. } | IoOp::SendMsgZc { .. })
    }
}

/// The per-reactor table of in-flight operations.
pub(crate) struct Slots {
    entries: Box<[SlotEntry]>,
    free: RefCell<Vec<u32>>,
    waiters: WaitList,
}

struct SlotEntry {
    result: Cell<Option<i64>>,
    waker: RefCell<Option<Waker>>,
}

impl Slots {
    pub(crate) fn new(depth: u32) -> Self {
        Slots {
            entries: (0..depth)
                .map(|_| SlotEntry { result: Cell::new(None), waker: RefCell::new(None) })
                .collect(),
            free: RefCell::new((0..depth).rev().collect()),
            waiters: WaitList::new(),
        }
    }

    fn acquire(&self) -> Option<u32> {
        self.free.borrow_mut().pop()
    }

    fn release(&self, slot: u32) {
        let e = &self.entries[slot as usize];
        e.result.set(None);
        e.waker.borrow_mut().take();
        self.free.borrow_mut().push(slot);
        self.waiters.wake_one();
    }

    /// Records a completion and wakes the operation's task.
    pub(crate) fn complete(&self, slot: u32, result: i64) {
        let Some(e) = self.entries.get(slot as usize) else {
            debug_assert!(false, "completion for unknown slot {slot}");
            return;
        };
        e.result.set(Some(result));
        let w = e.waker.borrow_mut().take();
        if let Some(w) = w {
            w.wake();
        }
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.entries.len() - self.free.borrow().len()
    }
}

/// What an engine does for [`OpFuture`].
pub(crate) trait EngineBackend {
    /// The slot table `op` takes its slot from.
    fn slots(&self, op: &IoOp) -> &Slots;
    /// Queues `op` tagged with `slot`; false when there is no submission space even
    /// after submitting what was queued.
    fn queue(&self, op: &IoOp, slot: u32) -> bool;
    /// Submits queued operations and reaps completions until `op` (in `slot`)
    /// completes, cancelling it first if it waits on a peer. Only for the abnormal
    /// path (a future dropped mid-flight).
    fn wait_for(&self, op: &IoOp, slot: u32);
}

/// The engine of the current reactor for one kind of file.
#[derive(Clone)]
pub(crate) enum EngineRef {
    Uring(Rc<uring::Uring>),
    Aio(Rc<aio::Aio>),
    Nvme(Rc<uring::NvmeRing>),
}

impl EngineRef {
    fn backend(&self) -> &dyn EngineBackend {
        match self {
            EngineRef::Uring(u) => &**u,
            EngineRef::Aio(a) => &**a,
            EngineRef::Nvme(n) => &**n,
        }
    }

    /// Starts `op`. The `'a` lifetime ties the future to the buffers `op` points at.
    pub(crate) fn submit<'a>(&self, op: IoOp) -> OpFuture<'a> {
        OpFuture { engine: self.clone(), op, state: State::Init, _buffers: PhantomData }
    }

    pub(crate) fn supports_fallocate(&self) -> bool {
        matches!(self, EngineRef::Uring(_))
    }
}

enum State {
    Init,
    InFlight(u32),
    Done,
}

/// An in-progress kernel operation; resolves to the kernel's result (bytes or -errno).
pub(crate) struct OpFuture<'a> {
    engine: EngineRef,
    op: IoOp,
    state: State,
    _buffers: PhantomData<&'a mut [u8]>,
}

impl Future for OpFuture<'_> {
    type Output = i64;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<i64> {
        let this = &mut *self;
        let backend = this.engine.backend();
        let slots = backend.slots(&this.op);
        match this.state {
            State::Init => {
                let Some(slot) = slots.acquire() else {
                    slots.waiters.register(cx.waker());
                    return Poll::Pending;
                };
                *slots.entries[slot as usize].waker.borrow_mut() = Some(cx.waker().clone());
                if !backend.queue(&this.op, slot) {
                    slots.release(slot);
                    slots.waiters.register(cx.waker());
                    return Poll::Pending;
                }
                this.state = State::InFlight(slot);
                Poll::Pending
            }
            State::InFlight(slot) => {
                let e = &slots.entries[slot as usize];
                match e.result.take() {
                    Some(res) => {
                        slots.release(slot);
                        this.state = State::Done;
                        Poll::Ready(res)
                    }
                    None => {
                        let mut w = e.waker.borrow_mut();
                        match &*w {
                            Some(old) if old.will_wake(cx.waker()) => {}
                            _ => *w = Some(cx.waker().clone()),
                        }
                        Poll::Pending
                    }
                }
            }
            State::Done => panic!("OpFuture polled after completion"),
        }
    }
}

impl Drop for OpFuture<'_> {
    fn drop(&mut self) {
        if let State::InFlight(slot) = self.state {
            let backend = self.engine.backend();
            let slots = backend.slots(&self.op);
            if slots.entries[slot as usize].result.get().is_none() {
                backend.wait_for(&self.op, slot);
            }
            slots.release(slot);
        }
    }
}

/// Converts a kernel result into bytes transferred or an error.
pub(crate) fn check(res: i64) -> io::Result<usize> {
    if res < 0 { Err(io::Error::from_raw_os_error((-res) as i32)) } else { Ok(res as usize) }
}

#[cfg(test)]
mod run_tests {
    use super::IoOp;

    fn read(fd: i32, off: u64, len: u32) -> IoOp {
        IoOp::Read { fd, off, ptr: std::ptr::null_mut(), len }
    }

    #[test]
    fn only_a_read_or_write_starting_where_the_last_ends_continues_its_run() {
        let a = read(3, 0, 65536);
        assert!(!a.continues(None));
        assert!(read(3, 65536, 4096).continues(a.run_end()));
        assert!(!read(3, 65536 + 512, 4096).continues(a.run_end()), "a gap");
        assert!(!read(4, 65536, 4096).continues(a.run_end()), "another file");
        let w = IoOp::Write { fd: 3, off: 65536, ptr: std::ptr::null(), len: 4096, fua: false };
        assert!(!w.continues(a.run_end()), "another direction");
        assert!(!IoOp::Fsync { fd: 3 }.continues(a.run_end()));
        assert_eq!(IoOp::Fsync { fd: 3 }.run_end(), None);
    }
}
