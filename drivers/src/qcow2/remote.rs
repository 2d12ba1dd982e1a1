//! Forwarding requests to the reactor that owns an image's shard.
//!
//! A request on another reactor becomes a [`RemoteCall`] that lives inside the
//! caller's pinned future: the operation, the offset, a pointer to the caller's
//! segments, and atomics for the result. Only a pointer crosses the owner's mailbox (a
//! typed, bounded ring); the owner runs the operation in a task from a fixed pool,
//! stores the result, sets `done` (Release) and wakes the caller's task through its
//! reactor's remote-wake ring. Nothing is allocated, and the data itself is never
//! copied: the owner reads and writes the caller's buffers directly (shared memory).
//! A caller future dropped before `done` waits for it, so the owner never touches
//! memory that is gone.

use std::future::Future;
use std::marker::{PhantomData, PhantomPinned};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};

use poller::MailSender;

use crate::error::IoError;
use crate::seg::IoSeg;

/// The operation of a forwarded request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Read,
    Write { fua: bool },
    Flush,
    Zero { len: u64, unmap: bool, fast: bool },
    Discard { len: u64 },
    Status { len: u64 },
}

pub(crate) struct RemoteCall {
    pub op: Op,
    pub off: u64,
    segs: *const IoSeg<'static>,
    nsegs: usize,
    waker: Option<Waker>,
    result: AtomicI64,
    status: AtomicU64,
    done: AtomicBool,
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

/// A request forwarded to the owner; resolves to (result, status word).
pub(crate) struct Forward<'a> {
    call: RemoteCall,
    tx: &'a MailSender<CallPtr>,
    sent: bool,
    _pin: PhantomPinned,
    _segs: PhantomData<&'a [IoSeg<'a>]>,
}

impl<'a> Forward<'a> {
    pub(crate) fn new(
        tx: &'a MailSender<CallPtr>,
        op: Op,
        off: u64,
        segs: &'a [IoSeg<'a>],
    ) -> Self {
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
            },
            tx,
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
            match this.tx.try_send(CallPtr(&this.call)) {
                Ok(()) => this.sent = true,
                Err(_) => cx.waker().wake_by_ref(),
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
