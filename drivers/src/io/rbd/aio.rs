//! One librbd asynchronous request as a future, and its completion.
//!
//! The future is submitted on its first poll (when it is pinned): it creates an
//! `rbd_completion_t` whose argument points at the future's own [`Cell`]. librbd calls
//! [`complete`] on one of its threads; that stores the result, publishes it with a
//! Release store of `done`, and wakes the task. The executor's waker is a packed task
//! reference, so waking from librbd's thread pushes it onto the submitting reactor's
//! lock-free remote-wake ring and rings its doorbell (the bottom half QEMU schedules
//! from its rbd callback). Nothing is allocated on the reactor side; librbd allocates
//! its completion, as it does for every caller.
//!
//! While librbd holds a request the reactor's idle policy does not spin for it
//! (`poller::ForeignWait`): librbd's threads, which complete it, may need that core.
//!
//! A future dropped while its request is in flight waits for the completion before the
//! memory goes (as the io_uring engine does): the buffers and the cell must outlive
//! librbd's use of them. That wait is bounded by `rados_osd_op_timeout`.

use std::cell::UnsafeCell;
use std::ffi::c_void;
use std::future::Future;
use std::marker::PhantomPinned;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::task::{Context, Poll, Waker};

use super::ffi::{CompletionT, ImageT, Lib};

/// What to ask librbd.
#[derive(Clone, Copy)]
pub(crate) enum Op {
    Readv { iov: *const libc::iovec, n: i32, off: u64 },
    Writev { iov: *const libc::iovec, n: i32, off: u64 },
    Flush,
    Discard { off: u64, len: u64 },
    WriteZeroes { off: u64, len: u64 },
}

struct Cell {
    result: AtomicI64,
    done: AtomicBool,
    /// Written by the reactor before submission, taken by [`complete`] before `done`.
    waker: UnsafeCell<Option<Waker>>,
}

/// A request in flight; resolves to librbd's return value (bytes, 0, or -errno).
pub(crate) struct Aio {
    lib: &'static Lib,
    image: ImageT,
    op: Op,
    cell: Cell,
    submitted: bool,
    /// Held while librbd has the request: the reactor sleeps rather than spin for it.
    waiting: Option<poller::ForeignWait>,
    _pin: PhantomPinned,
}

impl Aio {
    /// A request on `image`, which must stay open until the future completes (the
    /// channel that makes it holds the image).
    pub(crate) fn new(lib: &'static Lib, image: ImageT, op: Op) -> Aio {
        Aio {
            lib,
            image,
            op,
            cell: Cell {
                result: AtomicI64::new(0),
                done: AtomicBool::new(false),
                waker: UnsafeCell::new(None),
            },
            submitted: false,
            waiting: None,
            _pin: PhantomPinned,
        }
    }

    /// Hands the request to librbd; a negative errno if it refused it.
    fn submit(&mut self, waker: &Waker) -> i64 {
        let lib = self.lib;
        // SAFETY: nothing else touches the waker slot before submission.
        unsafe { *self.cell.waker.get() = Some(waker.clone()) };
        let mut c: CompletionT = std::ptr::null_mut();
        let arg = (&self.cell as *const Cell).cast_mut().cast::<c_void>();
        // SAFETY: `arg` points at the pinned cell, which outlives the request (Drop
        // waits for it); `c` is an out-parameter.
        let rc = unsafe { (lib.rbd_aio_create_completion)(arg, complete, &mut c) };
        if rc < 0 {
            return rc.into();
        }
        // SAFETY: a live image (held by the channel), a fresh completion, and buffers
        // (the iovecs and what they point at) borrowed by the caller for the future's
        // life, which lasts until completion.
        let rc = unsafe {
            match self.op {
                Op::Readv { iov, n, off } => (lib.rbd_aio_readv)(self.image, iov, n, off, c),
                Op::Writev { iov, n, off } => (lib.rbd_aio_writev)(self.image, iov, n, off, c),
                Op::Flush => (lib.rbd_aio_flush)(self.image, c),
                Op::Discard { off, len } => (lib.rbd_aio_discard)(self.image, off, len, c),
                Op::WriteZeroes { off, len } => {
                    (lib.rbd_aio_write_zeroes)(self.image, off, len as usize, c, 0, 0)
                }
            }
        };
        if rc < 0 {
            // SAFETY: librbd refused the request, so the completion never fires.
            unsafe { (lib.rbd_aio_release)(c) };
            return rc.into();
        }
        0
    }
}

/// librbd's completion callback, on one of its threads.
unsafe extern "C" fn complete(c: CompletionT, arg: *mut c_void) {
    // SAFETY: `arg` is the cell of a future that waits for `done` before going away.
    let cell = unsafe { &*arg.cast::<Cell>() };
    // SAFETY: the completion is live until released here, once.
    let rv = unsafe {
        let lib = super::ffi::lib().expect("librbd is loaded: it called back");
        let rv = (lib.rbd_aio_get_return_value)(c);
        (lib.rbd_aio_release)(c);
        rv
    };
    // SAFETY: the reactor wrote the waker before submitting and does not touch it again
    // until `done`.
    let waker = unsafe { (*cell.waker.get()).take() };
    cell.result.store(rv as i64, Ordering::Relaxed);
    // Release: the result (and a read's data) is visible to whoever sees `done`; after
    // this store the cell may be gone.
    cell.done.store(true, Ordering::Release);
    if let Some(w) = waker {
        w.wake();
    }
}

impl Future for Aio {
    type Output = i64;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<i64> {
        // SAFETY: nothing is moved out of the pinned future; the cell stays in place.
        let this = unsafe { self.get_unchecked_mut() };
        if !this.submitted {
            let rc = this.submit(cx.waker());
            if rc < 0 {
                return Poll::Ready(rc);
            }
            this.submitted = true;
            this.waiting = Some(poller::ForeignWait::begin());
            return Poll::Pending;
        }
        // Acquire: pairs with the Release store in `complete`.
        if this.cell.done.load(Ordering::Acquire) {
            this.waiting = None;
            return Poll::Ready(this.cell.result.load(Ordering::Relaxed));
        }
        Poll::Pending
    }
}

impl Drop for Aio {
    fn drop(&mut self) {
        if self.submitted {
            while !self.cell.done.load(Ordering::Acquire) {
                std::thread::yield_now();
            }
        }
    }
}
