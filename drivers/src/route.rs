//! Forwarding requests to the reactor that owns what they touch, without copying or
//! allocating: the machinery under qcow2's shards (`format::qcow2::route`) and the NBD
//! client's single owner reactor (`io::nbd`).
//!
//! A request becomes a [`RemoteCall`] that lives inside the caller's pinned future
//! ([`Forward`]): the operation, the offset, a pointer to the caller's segments, and
//! atomics for the result. On the owner's reactor the call goes straight into the
//! owner's [`Sink`] (an [`Inbox`], or several by class); from another reactor only a
//! pointer crosses the owner's mailbox (a typed, bounded ring) and the mailbox handler
//! puts it in the sink. The inbox is an intrusive FIFO through the calls themselves, so
//! queueing allocates nothing and is bounded by the calls that exist. A dispatcher
//! ([`dispatch`]) runs each call in a task from a fixed pool, stores the result, sets
//! `done` (Release) and wakes the caller. The data is never copied: the owner reads and
//! writes the caller's buffers directly (shared memory). A caller future dropped before
//! `done` waits for it, so the owner never touches memory that is gone.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::marker::{PhantomData, PhantomPinned};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicPtr, AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};

use poller::{MailSender, TaskPool};

use crate::driver::BlockStatus;
use crate::error::IoError;
use crate::seg::IoSeg;

/// One forwarded request; `O` says what to do (the owner's operation type).
pub(crate) struct RemoteCall<O> {
    pub op: O,
    pub off: u64,
    segs: *const IoSeg<'static>,
    nsegs: usize,
    waker: Option<Waker>,
    result: AtomicI64,
    status: AtomicU64,
    done: AtomicBool,
    /// The inbox link; only the owner's thread touches it.
    next: AtomicPtr<RemoteCall<O>>,
}

/// A pointer to a [`RemoteCall`], sent to the owner.
pub(crate) struct CallPtr<O>(pub *const RemoteCall<O>);

// SAFETY: the call it points at stays valid until `done` is set (the caller's future
// waits for it even when dropped), and the owner accesses it only through atomics and
// fields written before the pointer was sent.
unsafe impl<O> Send for CallPtr<O> {}

impl<O> RemoteCall<O> {
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

/// A block status in one word: two flags, eight bits of depth, the length above.
pub(crate) fn encode_status(s: BlockStatus) -> u64 {
    debug_assert!(s.len < 1 << 54, "a block status run of {} bytes", s.len);
    (s.len << 10) | u64::from(s.depth) << 2 | u64::from(s.hole) << 1 | u64::from(s.zero)
}

pub(crate) fn decode_status(v: u64) -> BlockStatus {
    BlockStatus { len: v >> 10, depth: (v >> 2) as u8, hole: v & 2 != 0, zero: v & 1 != 0 }
}

/// A queue of calls to run: an intrusive FIFO on the owner's thread.
pub(crate) struct Inbox<O> {
    head: Cell<*const RemoteCall<O>>,
    tail: Cell<*const RemoteCall<O>>,
    waker: RefCell<Option<Waker>>,
    closed: Cell<bool>,
}

/// Where an owner takes the calls sent to it.
pub(crate) trait Sink<O> {
    fn push(&self, p: CallPtr<O>);
}

impl<O> Sink<O> for Inbox<O> {
    fn push(&self, p: CallPtr<O>) {
        Inbox::push(self, p)
    }
}

impl<O> Inbox<O> {
    pub(crate) fn new() -> Rc<Inbox<O>> {
        Rc::new(Inbox {
            head: Cell::new(std::ptr::null()),
            tail: Cell::new(std::ptr::null()),
            waker: RefCell::new(None),
            closed: Cell::new(false),
        })
    }

    pub(crate) fn push(&self, p: CallPtr<O>) {
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

    fn take(&self) -> Option<CallPtr<O>> {
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
    async fn pop(&self) -> Option<CallPtr<O>> {
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

/// Runs the calls of `inbox` with `run`, at most `capacity` at once, until the inbox
/// is closed and empty and every call has finished.
pub(crate) async fn dispatch<O, F, Fut>(inbox: Rc<Inbox<O>>, capacity: u32, run: F)
where
    F: Fn(CallPtr<O>) -> Fut,
    Fut: Future<Output = ()> + 'static,
{
    let pool = TaskPool::new(capacity);
    while let Some(p) = inbox.pop().await {
        while pool.is_full() {
            pool.finished().await;
        }
        if !pool.spawn_with(|| run(p)) {
            unreachable!("the pool had room");
        }
    }
    pool.drain().await;
}

/// Where calls to one owner go.
pub(crate) enum Route<O, S: Sink<O>> {
    /// The owner is on this reactor.
    Local(Rc<S>),
    /// Another reactor is; its mailbox takes the calls.
    Remote(MailSender<CallPtr<O>>),
}

/// A call on its way to the owner; resolves to (result, status word).
pub(crate) struct Forward<'a, O, S: Sink<O>> {
    call: RemoteCall<O>,
    route: &'a Route<O, S>,
    sent: bool,
    _pin: PhantomPinned,
    _segs: PhantomData<&'a [IoSeg<'a>]>,
}

impl<'a, O, S: Sink<O>> Forward<'a, O, S> {
    pub(crate) fn new(route: &'a Route<O, S>, op: O, off: u64, segs: &'a [IoSeg<'a>]) -> Self {
        Forward {
            call: RemoteCall {
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

impl<O: Send, S: Sink<O>> Future for Forward<'_, O, S> {
    type Output = (Result<(), IoError>, u64);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // SAFETY: nothing is moved out; the call stays where it is until we return
        // Ready or are dropped (which waits for `done`).
        let this = unsafe { self.get_unchecked_mut() };
        if !this.sent {
            this.call.waker = Some(cx.waker().clone());
            match this.route {
                Route::Local(sink) => {
                    sink.push(CallPtr(&this.call));
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

impl<O, S: Sink<O>> Drop for Forward<'_, O, S> {
    fn drop(&mut self) {
        if self.sent {
            while !self.call.done.load(Ordering::Acquire) {
                std::thread::yield_now();
            }
        }
    }
}
