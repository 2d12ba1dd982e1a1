//! Multishot receives: one `IORING_OP_RECV` with `IORING_RECV_MULTISHOT` that keeps
//! receiving into buffers the ring provides, posting a completion per receive, until
//! it is cancelled, the peer closes, or the buffers run out.
//!
//! Each stream (one per connection that asks) has a buffer group of its own: a
//! registered ring of [`STREAM_BUFS`] buffers of [`STREAM_BUF_LEN`] bytes
//! (`IORING_REGISTER_PBUF_RING`), its group id the stream's index. A group per stream,
//! not one per reactor, because the kernel fills a stream's buffers as data arrives,
//! whether or not the connection is taking it: a client that pipelines while its
//! server holds back (budgets, a full task pool) would drain a shared pool and starve
//! every other connection. With a group of its own it fills its own buffers, its
//! receive stops (`ENOBUFS`), and the rest waits in the socket, whose window closes:
//! the same back-pressure a single receive gives.
//!
//! The group is registered for incremental consumption (`IOU_PBUF_RING_INC`, Linux
//! 6.12) where the kernel has it: a receive takes only the bytes it needs from the
//! current buffer, and the next one continues in it (the completion's
//! `IORING_CQE_F_BUF_MORE`). Without it every receive takes a whole buffer, so eight
//! request headers arriving one by one would use up the group. A completion names its
//! buffer; the buffer stays the stream owner's from the completion that finishes it
//! until it is given back ([`Streams::recycle`], a store to the ring's tail).
//! Completions are queued per stream in arrival order, one continuing the piece of the
//! same buffer queued before it joining that piece, so at most `STREAM_BUFS` pieces are
//! queued. The last completion of a receive has no
//! `IORING_CQE_F_MORE` and says why it stopped ([`Stop`]); the owner re-arms after
//! `ENOBUFS`, and nothing is received in any other way while a receive is armed, so the
//! stream's bytes stay in order.
//!
//! The table is fixed per ring, as is each entry's memory once first used (mapped on
//! first use, kept for reuse), so a receive costs no allocation. An entry whose handle
//! is dropped while its receive is armed is orphaned: the receive is cancelled, and the
//! entry is free only when its last completion has arrived, so the kernel never writes
//! into buffers a new stream owns. Reusing an entry registers its group afresh.

use std::cell::{Cell, OnceCell, RefCell};
use std::io;
use std::task::{Context, Poll, Waker};

use io_uring::{cqueue, opcode, squeue, types};

/// Buffers per stream (a power of two, the size of its provided-buffer ring).
pub const STREAM_BUFS: u16 = 8;
/// Bytes per buffer: 8 x 16 KiB, twice a single receive's 64 KiB buffer.
pub const STREAM_BUF_LEN: u32 = 16 << 10;
/// `IOU_PBUF_RING_INC` and `IORING_CQE_F_BUF_MORE` (the io-uring crate keeps them private).
const PBUF_RING_INC: u16 = 2;
const CQE_F_BUF_MORE: u32 = 1 << 4;
/// The ring's entries take one page (the kernel wants it page-aligned).
const RING_BYTES: usize = 4096;
const _: () = assert!(STREAM_BUFS.is_power_of_two());
const _: () =
    assert!(STREAM_BUFS as usize * std::mem::size_of::<types::BufRingEntry>() <= RING_BYTES);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Free,
    /// Owned; no receive armed.
    Idle,
    Armed,
    /// Armed, and a cancellation sent.
    Cancelling,
    /// Its handle dropped while armed: free when the last completion arrives.
    Orphaned,
}

/// Why a stream's receive stopped (its last completion's result).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stop {
    /// Never armed, or stopped where re-arming continues it (out of buffers).
    Resumable,
    Cancelled,
    /// The peer closed its side.
    Eof,
    /// The kernel's error, negated.
    Error(i32),
}

/// An entry's provided-buffer ring and buffers, in one anonymous mapping.
struct Region {
    base: *mut u8,
}

const REGION_BYTES: usize = RING_BYTES + STREAM_BUFS as usize * STREAM_BUF_LEN as usize;

impl Region {
    fn new() -> io::Result<Region> {
        // SAFETY: an anonymous private mapping has no preconditions; the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                REGION_BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Region { base: p.cast() })
    }

    fn ring(&self) -> *mut types::BufRingEntry {
        self.base.cast()
    }

    fn buf(&self, bid: u16) -> *mut u8 {
        assert!(bid < STREAM_BUFS, "buffer id {bid} out of range");
        // SAFETY: in bounds of the mapping: RING_BYTES + bid * STREAM_BUF_LEN < REGION_BYTES.
        unsafe { self.base.add(RING_BYTES + bid as usize * STREAM_BUF_LEN as usize) }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: `base` is this region's own mapping of REGION_BYTES; the ring that used
        // it is gone (regions live in the ring's table and drop with it).
        unsafe { libc::munmap(self.base.cast(), REGION_BYTES) };
    }
}

struct Entry {
    state: Cell<State>,
    stop: Cell<Stop>,
    /// Received pieces not yet taken, a FIFO of `STREAM_BUFS`.
    ready: [Cell<Piece>; STREAM_BUFS as usize],
    /// Per buffer, the bytes the kernel has filled so far (incremental consumption).
    filled: [Cell<u32>; STREAM_BUFS as usize],
    /// The group consumes buffers incrementally.
    incremental: Cell<bool>,
    head: Cell<u16>,
    count: Cell<u16>,
    /// The provided ring's tail, as this side last published it.
    tail: Cell<u16>,
    /// Whether any data arrived since the entry was acquired.
    received: Cell<bool>,
    registered: Cell<bool>,
    region: OnceCell<Region>,
    waker: RefCell<Option<Waker>>,
}

/// The multishot receive streams of one ring.
pub(crate) struct Streams {
    entries: Box<[Entry]>,
    free: RefCell<Vec<u32>>,
}

/// Received bytes: `len` bytes at `off` in buffer `bid`; `last` when the kernel has
/// finished with the buffer (the owner gives it back after taking them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Piece {
    pub bid: u16,
    pub off: u32,
    pub len: u32,
    pub last: bool,
}

/// What a stream's owner finds when it looks for data.
pub(crate) enum Next {
    Data(Piece),
    /// No data queued and no receive armed, stopped as it says.
    Stopped(Stop),
}

impl Streams {
    pub(crate) fn new(n: u32) -> Self {
        let entry = || Entry {
            state: Cell::new(State::Free),
            stop: Cell::new(Stop::Resumable),
            ready: std::array::from_fn(|_| Cell::new(Piece::default())),
            filled: std::array::from_fn(|_| Cell::new(0)),
            incremental: Cell::new(false),
            head: Cell::new(0),
            count: Cell::new(0),
            tail: Cell::new(0),
            received: Cell::new(false),
            registered: Cell::new(false),
            region: OnceCell::new(),
            waker: RefCell::new(None),
        };
        Streams {
            entries: (0..n).map(|_| entry()).collect(),
            free: RefCell::new((0..n).rev().collect()),
        }
    }

    /// An entry with its buffer group registered afresh (every buffer provided), or
    /// `None` when the table is full or the kernel refuses the group.
    pub(crate) fn acquire(&self, submitter: &io_uring::Submitter<'_>) -> Option<u32> {
        let i = self.free.borrow_mut().pop()?;
        match self.register(i, submitter) {
            Ok(()) => Some(i),
            Err(e) => {
                tracing::debug!("no multishot receive: cannot register a buffer ring: {e}");
                self.free.borrow_mut().push(i);
                None
            }
        }
    }

    fn register(&self, i: u32, submitter: &io_uring::Submitter<'_>) -> io::Result<()> {
        let e = &self.entries[i as usize];
        assert_eq!(e.state.get(), State::Free, "stream {i} on the free list in use");
        if e.registered.replace(false) {
            submitter.unregister_buf_ring(i as u16)?;
        }
        let region = match e.region.get() {
            Some(r) => r,
            None => {
                let r = Region::new()?;
                e.region.get_or_init(|| r)
            }
        };
        for bid in 0..STREAM_BUFS {
            provide(region, bid, bid);
        }
        let register = |flags| {
            // SAFETY: the ring lies in the region, which lives as long as the table (the
            // ring's), i.e. until the group is unregistered or the ring destroyed.
            unsafe {
                submitter.register_buf_ring_with_flags(
                    region.ring() as u64,
                    STREAM_BUFS,
                    i as u16,
                    flags,
                )
            }
        };
        // Kernels before 6.12 refuse incremental consumption.
        let incremental = register(PBUF_RING_INC).is_ok();
        if !incremental {
            register(0)?;
        }
        e.incremental.set(incremental);
        for f in &e.filled {
            f.set(0);
        }
        publish_tail(region, STREAM_BUFS);
        e.registered.set(true);
        e.tail.set(STREAM_BUFS);
        e.head.set(0);
        e.count.set(0);
        e.received.set(false);
        e.stop.set(Stop::Resumable);
        e.state.set(State::Idle);
        Ok(())
    }

    /// The receive to queue for an idle stream on `fd`, tagged `tag`.
    pub(crate) fn arm(&self, i: u32, fd: i32, tag: u64) -> squeue::Entry {
        let e = &self.entries[i as usize];
        assert_eq!(e.state.get(), State::Idle, "stream {i} armed twice");
        e.state.set(State::Armed);
        e.stop.set(Stop::Resumable);
        opcode::RecvMulti::new(types::Fd(fd), i as u16).build().user_data(tag)
    }

    /// Marks an armed stream cancelled; true when the caller must send the
    /// cancellation.
    pub(crate) fn cancel(&self, i: u32) -> bool {
        let e = &self.entries[i as usize];
        if e.state.get() != State::Armed {
            return false;
        }
        e.state.set(State::Cancelling);
        true
    }

    /// Gives an entry back: at once, or (orphaned) when its receive's last completion
    /// arrives. True when the caller must send a cancellation.
    pub(crate) fn release(&self, i: u32) -> bool {
        let e = &self.entries[i as usize];
        e.waker.borrow_mut().take();
        match e.state.get() {
            State::Idle => {
                e.state.set(State::Free);
                self.free.borrow_mut().push(i);
                false
            }
            State::Armed => {
                e.state.set(State::Orphaned);
                true
            }
            State::Cancelling => {
                e.state.set(State::Orphaned);
                false
            }
            s => panic!("stream {i} released in state {s:?}"),
        }
    }

    /// A completion of stream `i`'s receive.
    pub(crate) fn complete(&self, i: u32, res: i32, flags: u32) {
        let Some(e) = self.entries.get(i as usize) else {
            debug_assert!(false, "completion for unknown stream {i}");
            return;
        };
        let last = !cqueue::more(flags);
        match e.state.get() {
            State::Orphaned => {
                if last {
                    e.state.set(State::Free);
                    self.free.borrow_mut().push(i);
                }
                return;
            }
            State::Armed | State::Cancelling => {}
            s => {
                debug_assert!(false, "completion for stream {i} in state {s:?}");
                return;
            }
        }
        if res > 0 {
            let bid = cqueue::buffer_select(flags).expect("a multishot receive names its buffer");
            assert!(bid < STREAM_BUFS, "stream {i}: buffer id {bid} out of range");
            e.push(self.piece(e, bid, res as u32, flags));
            e.received.set(true);
        }
        if last {
            let cancelling = e.state.get() == State::Cancelling;
            e.stop.set(match res {
                0 => Stop::Eof,
                r if r > 0 || r == -libc::ENOBUFS || r == -libc::ECANCELED => {
                    if cancelling || r == -libc::ECANCELED {
                        Stop::Cancelled
                    } else {
                        Stop::Resumable
                    }
                }
                r => Stop::Error(-r),
            });
            e.state.set(State::Idle);
        }
        if let Some(w) = e.waker.borrow_mut().take() {
            w.wake();
        }
    }

    /// The piece of buffer `bid` a completion of `len` bytes filled.
    fn piece(&self, e: &Entry, bid: u16, len: u32, flags: u32) -> Piece {
        let filled = &e.filled[usize::from(bid)];
        let off = filled.get();
        let more = e.incremental.get() && flags & CQE_F_BUF_MORE != 0;
        assert!(off + len <= STREAM_BUF_LEN, "a receive past the end of its buffer");
        filled.set(if more { off + len } else { 0 });
        Piece { bid, off, len, last: !more }
    }

    /// The next received piece, or why there is none; registers `cx` to be woken when
    /// the receive is armed and nothing has arrived.
    pub(crate) fn poll_next(&self, i: u32, cx: &mut Context<'_>) -> Poll<Next> {
        let e = &self.entries[i as usize];
        let n = e.count.get();
        if n > 0 {
            let p = e.ready[usize::from(e.head.get())].get();
            e.head.set((e.head.get() + 1) % STREAM_BUFS);
            e.count.set(n - 1);
            return Poll::Ready(Next::Data(p));
        }
        match e.state.get() {
            State::Armed | State::Cancelling => {
                let mut w = e.waker.borrow_mut();
                match &*w {
                    Some(old) if old.will_wake(cx.waker()) => {}
                    _ => *w = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
            State::Idle => Poll::Ready(Next::Stopped(e.stop.get())),
            s => panic!("stream {i} polled in state {s:?}"),
        }
    }

    /// Whether stream `i` has received anything since it was acquired.
    pub(crate) fn received(&self, i: u32) -> bool {
        self.entries[i as usize].received.get()
    }

    /// The bytes of a piece the caller took (and whose buffer it has not given back).
    pub(crate) fn bytes(&self, i: u32, p: &Piece) -> &[u8] {
        let e = &self.entries[i as usize];
        let region = e.region.get().expect("a stream in use has its region");
        assert!(p.off + p.len <= STREAM_BUF_LEN, "a piece past the end of its buffer");
        // SAFETY: the piece lies in the buffer, in the region; the kernel filled it and
        // writes only past it until the buffer is given back by `recycle`, which the
        // caller does after its borrow ends.
        unsafe { std::slice::from_raw_parts(region.buf(p.bid).add(p.off as usize), p.len as usize) }
    }

    /// Gives buffer `bid` back to the kernel for the stream's next receives.
    pub(crate) fn recycle(&self, i: u32, bid: u16) {
        let e = &self.entries[i as usize];
        let region = e.region.get().expect("a stream in use has its region");
        let tail = e.tail.get();
        provide(region, tail % STREAM_BUFS, bid);
        e.tail.set(tail.wrapping_add(1));
        publish_tail(region, tail.wrapping_add(1));
    }
}

/// Writes buffer `bid` into ring slot `slot`.
fn provide(region: &Region, slot: u16, bid: u16) {
    // SAFETY: `slot` < STREAM_BUFS, inside the ring's page; the kernel reads a slot only
    // between the published head and tail, and this slot is past the tail until
    // `publish_tail`.
    let entry = unsafe { &mut *region.ring().add(usize::from(slot)) };
    entry.set_addr(region.buf(bid) as u64);
    entry.set_len(STREAM_BUF_LEN);
    entry.set_bid(bid);
}

/// Publishes the ring's tail, after the entries before it (release ordering).
fn publish_tail(region: &Region, tail: u16) {
    // SAFETY: the tail field overlays the first entry's reserved field, in the ring's
    // page; the kernel reads it atomically, and this is the only writer.
    let t = unsafe {
        &*(types::BufRingEntry::tail(region.ring()) as *const std::sync::atomic::AtomicU16)
    };
    t.store(tail, std::sync::atomic::Ordering::Release);
}

impl Entry {
    /// Queues a piece, joined to the one queued last when it continues it.
    fn push(&self, p: Piece) {
        let n = self.count.get();
        if n > 0 {
            let back = &self.ready[usize::from((self.head.get() + n - 1) % STREAM_BUFS)];
            let b = back.get();
            if b.bid == p.bid && b.off + b.len == p.off && !b.last {
                back.set(Piece { len: b.len + p.len, last: p.last, ..b });
                return;
            }
        }
        assert!(n < STREAM_BUFS, "more pieces queued than buffers");
        self.ready[usize::from((self.head.get() + n) % STREAM_BUFS)].set(p);
        self.count.set(n + 1);
    }
}
