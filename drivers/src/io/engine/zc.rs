//! The second completion of a zero-copy send (`IORING_OP_SENDMSG_ZC`).
//!
//! A zero-copy send completes twice. The first completion says how many bytes the
//! socket took, as a `sendmsg` would, and carries `IORING_CQE_F_MORE`; the pages of
//! its buffers stay referenced by the kernel's socket buffers until the data has left
//! (for TCP, until the peer has acknowledged it), and only then does the second
//! completion, the notification (`IORING_CQE_F_NOTIF`), arrive. Until it does, the
//! buffers must not be written, freed or reused: TCP may retransmit from them.
//!
//! The send's slot in the socket table is released at the first completion, as for
//! any operation; the notification finds its way through a [`Notices`] entry whose
//! index is part of the operation's tag (see `uring.rs`). An entry belongs to whoever
//! acquired it (a connection's send stage) and is armed for one send at a time. A
//! handle dropped while its entry is armed leaves the entry orphaned, and the
//! notification frees it: the table never reuses an index the kernel still owes a
//! completion for. No allocation per send: the table is fixed per ring.
//!
//! The notification also says whether the kernel had to copy after all
//! (`IORING_NOTIF_USAGE_ZC_COPIED`, asked for with `IORING_SEND_ZC_REPORT_USAGE`): a
//! loopback peer, or a device without scatter-gather, makes zero-copy a cost, and the
//! caller stops using it.

use std::cell::{Cell, RefCell};
use std::task::{Context, Poll, Waker};

/// Notification entries per ring: the four send stages of 256 connections. A
/// connection that finds none left copies its replies.
pub const NOTICES: u32 = 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Free,
    /// Acquired; no send in flight.
    Idle,
    /// A send in flight, its notification not yet arrived.
    Armed,
    /// The notification arrived; `copied` is the kernel's report.
    Done {
        copied: bool,
    },
    /// Its handle was dropped while armed: freed when the notification arrives.
    Orphaned,
}

struct Entry {
    state: Cell<State>,
    waker: RefCell<Option<Waker>>,
}

/// The notification table of one ring.
pub(crate) struct Notices {
    entries: Box<[Entry]>,
    free: RefCell<Vec<u32>>,
}

impl Notices {
    pub(crate) fn new(n: u32) -> Self {
        Notices {
            entries: (0..n)
                .map(|_| Entry { state: Cell::new(State::Free), waker: RefCell::new(None) })
                .collect(),
            free: RefCell::new((0..n).rev().collect()),
        }
    }

    /// An entry of its own for a caller, or `None` when every entry is taken.
    pub(crate) fn acquire(&self) -> Option<u32> {
        let i = self.free.borrow_mut().pop()?;
        let e = &self.entries[i as usize];
        assert_eq!(e.state.get(), State::Free, "notice {i} on the free list in use");
        e.state.set(State::Idle);
        Some(i)
    }

    /// Gives an entry back: at once, or when its notification arrives.
    pub(crate) fn release(&self, i: u32) {
        let e = &self.entries[i as usize];
        e.waker.borrow_mut().take();
        match e.state.get() {
            State::Armed => e.state.set(State::Orphaned),
            State::Idle | State::Done { .. } => self.free_entry(i),
            s => panic!("notice {i} released in state {s:?}"),
        }
    }

    fn free_entry(&self, i: u32) {
        self.entries[i as usize].state.set(State::Free);
        self.free.borrow_mut().push(i);
    }

    /// A send is about to be queued with this entry's index in its tag.
    pub(crate) fn arm(&self, i: u32) {
        let e = &self.entries[i as usize];
        assert!(
            matches!(e.state.get(), State::Idle | State::Done { .. }),
            "notice {i} armed twice (state {:?})",
            e.state.get()
        );
        e.state.set(State::Armed);
    }

    /// The send's notification arrived (or, for a send that failed without one, its
    /// only completion).
    pub(crate) fn complete(&self, i: u32, copied: bool) {
        let Some(e) = self.entries.get(i as usize) else {
            debug_assert!(false, "notification for unknown notice {i}");
            return;
        };
        match e.state.get() {
            State::Armed => {
                e.state.set(State::Done { copied });
                if let Some(w) = e.waker.borrow_mut().take() {
                    w.wake();
                }
            }
            State::Orphaned => self.free_entry(i),
            s => debug_assert!(false, "notification for notice {i} in state {s:?}"),
        }
    }

    /// Ready once no send holds the entry's buffers, with whether the last one was
    /// copied; otherwise registers `cx`'s waker.
    pub(crate) fn poll(&self, i: u32, cx: &mut Context<'_>) -> Poll<bool> {
        let e = &self.entries[i as usize];
        match e.state.get() {
            State::Idle => Poll::Ready(false),
            State::Done { copied } => Poll::Ready(copied),
            State::Armed => {
                let mut w = e.waker.borrow_mut();
                match &*w {
                    Some(old) if old.will_wake(cx.waker()) => {}
                    _ => *w = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
            s => panic!("notice {i} polled in state {s:?}"),
        }
    }

    /// Whether a send on this entry still holds its buffers.
    pub(crate) fn armed(&self, i: u32) -> bool {
        self.entries[i as usize].state.get() == State::Armed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Waker;

    #[test]
    fn an_entry_is_reused_only_after_its_notification() {
        let n = Notices::new(2);
        let a = n.acquire().unwrap();
        let b = n.acquire().unwrap();
        assert!(n.acquire().is_none(), "two entries");
        n.arm(a);
        assert!(n.armed(a));
        let mut cx = Context::from_waker(Waker::noop());
        assert_eq!(n.poll(a, &mut cx), Poll::Pending);
        n.release(a);
        assert!(n.acquire().is_none(), "an orphaned entry is not free until notified");
        n.complete(a, false);
        assert_eq!(n.acquire(), Some(a));
        n.arm(b);
        n.complete(b, true);
        assert_eq!(n.poll(b, &mut cx), Poll::Ready(true), "the kernel's copy report");
        n.arm(b);
        assert_eq!(n.poll(b, &mut cx), Poll::Pending, "armed again for the next send");
        n.complete(b, false);
        assert_eq!(n.poll(b, &mut cx), Poll::Ready(false));
        n.release(b);
        assert_eq!(n.acquire(), Some(b));
    }
}
