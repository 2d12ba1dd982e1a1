//! Routing requests to the shard that owns them, and running them there.
//!
//! A channel sends each request to the shard owning its first byte (see `image`); a
//! flush goes to the leader, which runs the barrier over all shards. A shard that gets
//! a request reaching into another shard's range serves its own part and sends each
//! other part, as a *piece*, to its owner, joining the results (a piece never spans
//! owners, so it is never split again). Shards also send each other *control* calls:
//! frees into another's allocation group, and the leader's operations (refcount blocks,
//! refcount table growth, the dirty and corrupt bits, a shard's half of the barrier).
//! Each class has its own inbox and task pool on the receiving shard, so a call never
//! waits for a pool slot held by a call that waits for it: data calls wait for pieces
//! and control calls, pieces for control calls, control calls for no other call but
//! frees, which wait for nothing remote.
//!
//! Every request, local or not, becomes a [`RemoteCall`] that lives inside the caller's
//! pinned future: the operation, the offset, a pointer to the caller's segments, and
//! atomics for the result. On the owner's reactor the call goes straight into the
//! shard's [`Inbox`]; from another reactor only a pointer crosses the owner's mailbox (a
//! typed, bounded ring) and the mailbox handler puts it in the inbox. The inbox is an
//! intrusive FIFO through the calls themselves, so queueing allocates nothing and is
//! bounded by the calls that exist. The dispatcher runs each call in a task from a
//! fixed pool (the request state, which is large, lives there, not in the caller's
//! future), stores the result, sets `done` (Release) and wakes the caller. The data is
//! never copied: the owner reads and writes the caller's buffers directly (shared
//! memory). A caller future dropped before `done` waits for it, so the owner never
//! touches memory that is gone.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::marker::{PhantomData, PhantomPinned};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicPtr, AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};

use poller::{MailSender, TaskPool};

use crate::driver::{BlockStatus, DriverChannel, IoFuture, ZeroFlags};
use crate::error::IoError;
use crate::seg::IoSeg;

use super::direct::Direct;
use super::image::Image;
use super::shard::Shard;

/// Calls from channels running at once per shard.
pub(crate) const CALL_POOL: u32 = 512;
/// Pieces and control calls from other shards running at once per shard.
const PIECE_POOL: u32 = 256;
const CONTROL_POOL: u32 = 256;
/// The most shards an image may have.
pub const MAX_SHARDS: usize = 64;

/// The operation of a call. For control calls, `off` carries the argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Read,
    Write {
        fua: bool,
    },
    Flush,
    Zero {
        len: u64,
        unmap: bool,
        fast: bool,
    },
    Discard {
        len: u64,
    },
    Status {
        len: u64,
    },
    /// Control: release a cluster of the receiver's group (`off`), durable elsewhere.
    Free {
        punch: bool,
    },
    /// Control, leader: a refcount block for table entry `off`.
    CreateRefblock,
    /// Control, leader: a refcount table of at least `off` entries.
    GrowReftable,
    /// Control, leader: the dirty bit on (`off` = 1) or off.
    DirtyBit,
    /// Control, leader: the corrupt bit.
    MarkCorrupt,
    /// Control: the receiver's flush round, for the leader's barrier.
    LocalFlush,
}

impl Op {
    /// The same operation over `len` bytes (a piece of it).
    pub(crate) fn with_len(self, len: u64) -> Op {
        match self {
            Op::Zero { unmap, fast, .. } => Op::Zero { len, unmap, fast },
            Op::Discard { .. } => Op::Discard { len },
            Op::Status { .. } => Op::Status { len },
            op => op,
        }
    }
}

/// Who sent a call, which decides the inbox and pool that run it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    /// From a channel.
    Data,
    /// Part of a request, from the shard that split it.
    Piece,
    /// From another shard (or the leader's barrier).
    Control,
}

pub(crate) struct RemoteCall {
    pub class: Class,
    pub op: Op,
    pub off: u64,
    segs: *const IoSeg<'static>,
    nsegs: usize,
    waker: Option<Waker>,
    result: AtomicI64,
    status: AtomicU64,
    done: AtomicBool,
    /// The inbox link; only the owner's thread touches it.
    next: AtomicPtr<RemoteCall>,
}

/// A pointer to a [`RemoteCall`], sent to the owner.
pub(crate) struct CallPtr(pub *const RemoteCall);

// SAFETY: the call it points at stays valid until `done` is set (the caller's future
// waits for it even when dropped), and the owner accesses it only through atomics and
// fields written before the pointer was sent.
unsafe impl Send for CallPtr {}

impl RemoteCall {
    /// The caller's segments.
    ///
    /// # Safety
    /// Only between receiving the pointer and setting `done`.
    pub(crate) unsafe fn segs(&self) -> &[IoSeg<'static>] {
        if self.nsegs == 0 {
            return &[];
        }
        // SAFETY: the caller's future borrows these segments until `done`.
        unsafe { std::slice::from_raw_parts(self.segs, self.nsegs) }
    }

    /// Publishes the result and wakes the caller. The call must not be touched after.
    pub(crate) fn complete(&self, r: Result<(), IoError>, status: u64) {
        let waker = self.waker.clone();
        self.status.store(status, Ordering::Relaxed);
        self.result.store(encode(r), Ordering::Relaxed);
        // Release: the caller that sees `done` sees the result (and our data writes).
        self.done.store(true, Ordering::Release);
        if let Some(w) = waker {
            w.wake();
        }
    }
}

fn encode(r: Result<(), IoError>) -> i64 {
    match r {
        Ok(()) => 0,
        Err(IoError::Os(e)) => i64::from(e),
        Err(IoError::OutOfRange) => -1,
        Err(IoError::ReadOnly) => -2,
        Err(IoError::NotSupported) => -3,
        Err(IoError::NoSpace) => -4,
        Err(IoError::Corrupt) => -5,
        Err(IoError::TooLarge) => -6,
        Err(IoError::Shutdown) => -7,
        Err(IoError::Invalid) => -8,
    }
}

fn decode(v: i64) -> Result<(), IoError> {
    match v {
        0 => Ok(()),
        -1 => Err(IoError::OutOfRange),
        -2 => Err(IoError::ReadOnly),
        -3 => Err(IoError::NotSupported),
        -4 => Err(IoError::NoSpace),
        -5 => Err(IoError::Corrupt),
        -6 => Err(IoError::TooLarge),
        -7 => Err(IoError::Shutdown),
        -8 => Err(IoError::Invalid),
        e => Err(IoError::Os(e as i32)),
    }
}

pub(crate) fn encode_status(s: BlockStatus) -> u64 {
    (s.len << 2) | u64::from(s.hole) << 1 | u64::from(s.zero)
}

fn decode_status(v: u64) -> BlockStatus {
    BlockStatus { len: v >> 2, hole: v & 2 != 0, zero: v & 1 != 0 }
}

/// A shard's queue of calls to run: an intrusive FIFO on the owner's thread.
pub(crate) struct Inbox {
    head: Cell<*const RemoteCall>,
    tail: Cell<*const RemoteCall>,
    waker: RefCell<Option<Waker>>,
    closed: Cell<bool>,
}

impl Inbox {
    pub(crate) fn new() -> Rc<Inbox> {
        Rc::new(Inbox {
            head: Cell::new(std::ptr::null()),
            tail: Cell::new(std::ptr::null()),
            waker: RefCell::new(None),
            closed: Cell::new(false),
        })
    }

    pub(crate) fn push(&self, p: CallPtr) {
        // SAFETY: the call stays valid until it is completed, which happens after it
        // leaves the inbox; only this thread touches its link.
        let call = unsafe { &*p.0 };
        call.next.store(std::ptr::null_mut(), Ordering::Relaxed);
        let tail = self.tail.get();
        if tail.is_null() {
            self.head.set(p.0);
        } else {
            // SAFETY: `tail` is a queued, valid call (see above).
            unsafe { &*tail }.next.store(p.0.cast_mut(), Ordering::Relaxed);
        }
        self.tail.set(p.0);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    fn take(&self) -> Option<CallPtr> {
        let head = self.head.get();
        if head.is_null() {
            return None;
        }
        // SAFETY: `head` is a queued, valid call.
        let next = unsafe { &*head }.next.load(Ordering::Relaxed);
        self.head.set(next);
        if next.is_null() {
            self.tail.set(std::ptr::null());
        }
        Some(CallPtr(head))
    }

    /// The next call, or `None` once closed and empty.
    async fn pop(&self) -> Option<CallPtr> {
        std::future::poll_fn(|cx| match self.take() {
            Some(p) => Poll::Ready(Some(p)),
            None if self.closed.get() => Poll::Ready(None),
            None => {
                *self.waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }

    /// Lets the dispatcher finish once the calls queued so far are done.
    pub(crate) fn close(&self) {
        self.closed.set(true);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }
}

/// A shard's inboxes, one per class of call.
pub(crate) struct Inboxes {
    data: Rc<Inbox>,
    piece: Rc<Inbox>,
    control: Rc<Inbox>,
}

impl Inboxes {
    /// The inboxes, with a dispatcher task for each on the current reactor.
    pub(crate) fn start(shard: &Rc<Shard>) -> Rc<Inboxes> {
        let b = Rc::new(Inboxes { data: Inbox::new(), piece: Inbox::new(), control: Inbox::new() });
        poller::spawn(dispatch(shard.clone(), b.data.clone(), CALL_POOL));
        poller::spawn(dispatch(shard.clone(), b.piece.clone(), PIECE_POOL));
        poller::spawn(dispatch(shard.clone(), b.control.clone(), CONTROL_POOL));
        b
    }

    pub(crate) fn push(&self, p: CallPtr) {
        // SAFETY: see `CallPtr`; `class` was written before the pointer was sent.
        let class = unsafe { &*p.0 }.class;
        match class {
            Class::Data => self.data.push(p),
            Class::Piece => self.piece.push(p),
            Class::Control => self.control.push(p),
        }
    }

    pub(crate) fn close(&self) {
        self.data.close();
        self.piece.close();
        self.control.close();
    }
}

async fn execute(shard: Rc<Shard>, p: CallPtr) {
    // SAFETY: see `CallPtr`: valid until we complete it.
    let call = unsafe { &*p.0 };
    // SAFETY: as above.
    let segs = unsafe { call.segs() };
    let (r, status) = match call.class {
        Class::Control => (shard.control(call.op, call.off, true).await, 0),
        Class::Data | Class::Piece => shard.serve(call.op, call.off, segs).await,
    };
    call.complete(r, status);
}

/// Runs the calls of `inbox` on `shard`, at most `capacity` at once.
async fn dispatch(shard: Rc<Shard>, inbox: Rc<Inbox>, capacity: u32) {
    let pool = TaskPool::new(capacity);
    while let Some(p) = inbox.pop().await {
        while pool.is_full() {
            pool.finished().await;
        }
        if pool.spawn(execute(shard.clone(), p)).is_err() {
            unreachable!("the pool had room");
        }
    }
    pool.drain().await;
}

/// Where calls to one shard go.
pub(crate) enum Route {
    /// The shard is on this reactor.
    Local(Rc<Inboxes>),
    /// Another reactor does; its mailbox takes the calls.
    Remote(MailSender<CallPtr>),
}

/// A call on its way to the owner; resolves to (result, status word).
pub(crate) struct Forward<'a> {
    call: RemoteCall,
    route: &'a Route,
    sent: bool,
    _pin: PhantomPinned,
    _segs: PhantomData<&'a [IoSeg<'a>]>,
}

impl<'a> Forward<'a> {
    pub(crate) fn new(
        route: &'a Route,
        class: Class,
        op: Op,
        off: u64,
        segs: &'a [IoSeg<'a>],
    ) -> Self {
        Forward {
            call: RemoteCall {
                class,
                op,
                off,
                segs: segs.as_ptr().cast(),
                nsegs: segs.len(),
                waker: None,
                result: AtomicI64::new(0),
                status: AtomicU64::new(0),
                done: AtomicBool::new(false),
                next: AtomicPtr::new(std::ptr::null_mut()),
            },
            route,
            sent: false,
            _pin: PhantomPinned,
            _segs: PhantomData,
        }
    }
}

impl Future for Forward<'_> {
    type Output = (Result<(), IoError>, u64);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // SAFETY: nothing is moved out; the call stays where it is until we return
        // Ready or are dropped (which waits for `done`).
        let this = unsafe { self.get_unchecked_mut() };
        if !this.sent {
            this.call.waker = Some(cx.waker().clone());
            match this.route {
                Route::Local(inbox) => {
                    inbox.push(CallPtr(&this.call));
                    this.sent = true;
                }
                Route::Remote(tx) => match tx.try_send(CallPtr(&this.call)) {
                    Ok(()) => this.sent = true,
                    // The owner's ring is full: try again next tick.
                    Err(_) => cx.waker().wake_by_ref(),
                },
            }
            return Poll::Pending;
        }
        // Acquire: pairs with the owner's Release store of `done`.
        if this.call.done.load(Ordering::Acquire) {
            this.sent = false;
            let r = decode(this.call.result.load(Ordering::Relaxed));
            Poll::Ready((r, this.call.status.load(Ordering::Relaxed)))
        } else {
            Poll::Pending
        }
    }
}

impl Drop for Forward<'_> {
    fn drop(&mut self) {
        if self.sent {
            while !self.call.done.load(Ordering::Acquire) {
                std::thread::yield_now();
            }
        }
    }
}

/// Runs `op` as a control call on every shard but `me`, alongside `local`; the first
/// error of any. No allocation: the calls live in an array in this future.
pub(crate) async fn broadcast(
    peers: &[Route],
    me: usize,
    op: Op,
    local: impl Future<Output = Result<(), IoError>>,
) -> Result<(), IoError> {
    let mut calls: [Option<Forward<'_>>; MAX_SHARDS] = std::array::from_fn(|_| None);
    for (k, r) in peers.iter().enumerate() {
        if k != me {
            calls[k] = Some(Forward::new(r, Class::Control, op, 0, &[]));
        }
    }
    let mut calls = std::pin::pin!(calls);
    let mut local = std::pin::pin!(local);
    let mut local_result = None;
    let mut first_err = None;
    std::future::poll_fn(|cx| {
        if local_result.is_none()
            && let Poll::Ready(r) = local.as_mut().poll(cx)
        {
            local_result = Some(r);
        }
        let mut pending = local_result.is_none();
        // SAFETY: the array is pinned and its elements are never moved: each is polled
        // and dropped in place.
        let arr = unsafe { calls.as_mut().get_unchecked_mut() };
        for slot in arr.iter_mut() {
            if let Some(f) = slot {
                // SAFETY: as above: `f` lives in the pinned array.
                match unsafe { Pin::new_unchecked(f) }.poll(cx) {
                    Poll::Ready((r, _)) => {
                        if let Err(e) = r {
                            first_err.get_or_insert(e);
                        }
                        *slot = None;
                    }
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending { Poll::Pending } else { Poll::Ready(()) }
    })
    .await;
    match (local_result, first_err) {
        (Some(Err(e)), _) | (_, Some(e)) => Err(e),
        _ => Ok(()),
    }
}

/// An image's handle on one reactor: every request is a call routed to the shard that
/// owns its first byte. Requests of no bytes complete here, before the shard (the
/// consumer API filters them too; this keeps the qcow2 engine's own callers, the crash
/// and fuzz harnesses, inside the same contract).
pub struct Qcow2Channel {
    pub(crate) routes: Vec<Route>,
    pub(crate) img: Arc<Image>,
    /// Reads and in-place writes with no hop, when the hints allow.
    pub(crate) direct: Option<Direct>,
}

impl Qcow2Channel {
    async fn call(&self, op: Op, off: u64, segs: &[IoSeg<'_>]) -> (Result<(), IoError>, u64) {
        let owner = if op == Op::Flush { 0 } else { self.img.guest_owner(off) };
        Forward::new(&self.routes[owner], Class::Data, op, off, segs).await
    }

    pub async fn read(&self, off: u64, segs: &[IoSeg<'_>]) -> Result<(), IoError> {
        if crate::seg::total_len(segs) == 0 {
            return Ok(());
        }
        if let Some(d) = &self.direct
            && let Some(r) = d.read(off, segs).await
        {
            return r;
        }
        self.call(Op::Read, off, segs).await.0
    }

    pub async fn write(&self, off: u64, segs: &[IoSeg<'_>], fua: bool) -> Result<(), IoError> {
        if crate::seg::total_len(segs) == 0 {
            return if fua { self.flush().await } else { Ok(()) };
        }
        if !fua
            && let Some(d) = &self.direct
            && let Some(r) = d.write(off, segs).await
        {
            return r;
        }
        self.call(Op::Write { fua }, off, segs).await.0
    }

    pub async fn flush(&self) -> Result<(), IoError> {
        self.call(Op::Flush, 0, &[]).await.0
    }

    pub async fn write_zeroes(
        &self,
        off: u64,
        len: u64,
        unmap: bool,
        fast: bool,
    ) -> Result<(), IoError> {
        if len == 0 {
            return Ok(());
        }
        self.call(Op::Zero { len, unmap, fast }, off, &[]).await.0
    }

    pub async fn discard(&self, off: u64, len: u64) -> Result<(), IoError> {
        if len == 0 {
            return Ok(());
        }
        self.call(Op::Discard { len }, off, &[]).await.0
    }

    /// The status of the range from `off`.
    pub async fn block_status(&self, off: u64, len: u64) -> Result<BlockStatus, IoError> {
        if len == 0 {
            return Err(IoError::Invalid);
        }
        let (r, st) = self.call(Op::Status { len }, off, &[]).await;
        r.map(|()| decode_status(st))
    }

    async fn zeroes(&self, off: u64, len: u64, flags: ZeroFlags) -> Result<(), IoError> {
        self.write_zeroes(off, len, flags.may_unmap, flags.fast_only).await?;
        if flags.fua { self.flush().await } else { Ok(()) }
    }
}

impl DriverChannel for Qcow2Channel {
    fn read<'a>(&'a self, off: u64, segs: &'a [IoSeg<'a>]) -> IoFuture<'a> {
        IoFuture::new(Qcow2Channel::read(self, off, segs))
    }
    fn write<'a>(&'a self, off: u64, segs: &'a [IoSeg<'a>], fua: bool) -> IoFuture<'a> {
        IoFuture::new(Qcow2Channel::write(self, off, segs, fua))
    }
    fn flush(&self) -> IoFuture<'_> {
        IoFuture::new(Qcow2Channel::flush(self))
    }
    fn write_zeroes(&self, off: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_> {
        IoFuture::new(self.zeroes(off, len, flags))
    }
    fn discard(&self, off: u64, len: u64) -> IoFuture<'_> {
        IoFuture::new(Qcow2Channel::discard(self, off, len))
    }
    fn block_status(&self, off: u64, len: u64) -> IoFuture<'_, BlockStatus> {
        IoFuture::new(Qcow2Channel::block_status(self, off, len))
    }
}
