//! Timers: a min-heap of deadlines over a slab of wakers.
//!
//! A [`Sleep`] registers on first poll and cancels on drop by clearing its slab entry; a
//! cancelled entry stays in the heap until its deadline passes and is then skipped, which
//! keeps both operations O(log n) without searching the heap.

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use crate::reactor::with_core;

pub(crate) struct Timers {
    heap: RefCell<BinaryHeap<Reverse<(Instant, u64)>>>,
    slots: RefCell<Vec<TimerSlot>>,
    free: RefCell<Vec<u32>>,
}

struct TimerSlot {
    generation: u32,
    waker: Option<Waker>,
    fired: bool,
}

fn key(index: u32, generation: u32) -> u64 {
    u64::from(generation) << 32 | u64::from(index)
}

impl Timers {
    pub(crate) fn new() -> Self {
        Timers {
            heap: RefCell::new(BinaryHeap::with_capacity(256)),
            slots: RefCell::new(Vec::with_capacity(256)),
            free: RefCell::new(Vec::with_capacity(256)),
        }
    }

    fn insert(&self, deadline: Instant, waker: Waker) -> u64 {
        let mut slots = self.slots.borrow_mut();
        let index = match self.free.borrow_mut().pop() {
            Some(i) => i,
            None => {
                slots.push(TimerSlot { generation: 0, waker: None, fired: false });
                (slots.len() - 1) as u32
            }
        };
        let slot = &mut slots[index as usize];
        slot.waker = Some(waker);
        slot.fired = false;
        let k = key(index, slot.generation);
        self.heap.borrow_mut().push(Reverse((deadline, k)));
        k
    }

    fn update_waker(&self, k: u64, waker: &Waker) {
        let mut slots = self.slots.borrow_mut();
        if let Some(s) = slots.get_mut((k & 0xffff_ffff) as usize)
            && s.generation == (k >> 32) as u32
            && !s.fired
        {
            match &s.waker {
                Some(w) if w.will_wake(waker) => {}
                _ => s.waker = Some(waker.clone()),
            }
        }
    }

    fn remove(&self, k: u64) {
        let mut slots = self.slots.borrow_mut();
        let index = (k & 0xffff_ffff) as usize;
        if let Some(s) = slots.get_mut(index)
            && s.generation == (k >> 32) as u32
        {
            s.generation = s.generation.wrapping_add(1);
            s.waker = None;
            s.fired = false;
            self.free.borrow_mut().push(index as u32);
        }
    }

    /// Wakes every timer whose deadline is `now` or earlier; returns how many fired.
    pub(crate) fn fire_due(&self, now: Instant) -> usize {
        if self.heap.borrow().is_empty() {
            return 0;
        }
        let mut fired = 0;
        loop {
            let k = {
                let mut heap = self.heap.borrow_mut();
                match heap.peek() {
                    Some(Reverse((d, _))) if *d <= now => heap.pop().map(|Reverse((_, k))| k),
                    _ => None,
                }
            };
            let Some(k) = k else { break };
            let waker = {
                let mut slots = self.slots.borrow_mut();
                match slots.get_mut((k & 0xffff_ffff) as usize) {
                    Some(s) if s.generation == (k >> 32) as u32 && !s.fired => {
                        s.fired = true;
                        s.waker.take()
                    }
                    _ => None,
                }
            };
            if let Some(w) = waker {
                w.wake();
                fired += 1;
            }
        }
        fired
    }

    fn is_fired(&self, k: u64) -> bool {
        let slots = self.slots.borrow();
        slots
            .get((k & 0xffff_ffff) as usize)
            .is_some_and(|s| s.generation == (k >> 32) as u32 && s.fired)
    }

    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.heap.borrow().peek().map(|Reverse((d, _))| *d)
    }
}

/// A future that completes at a deadline. Created by [`sleep`] or [`sleep_until`].
pub struct Sleep {
    deadline: Instant,
    key: Option<u64>,
}

/// Sleeps for `d` on the current reactor.
pub fn sleep(d: Duration) -> Sleep {
    sleep_until(Instant::now() + d)
}

/// Sleeps until `deadline` on the current reactor.
pub fn sleep_until(deadline: Instant) -> Sleep {
    Sleep { deadline, key: None }
}

impl Future for Sleep {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        match self.key {
            None => {
                if Instant::now() >= self.deadline {
                    return Poll::Ready(());
                }
                let deadline = self.deadline;
                let k = with_core(|c| c.timers.insert(deadline, cx.waker().clone()));
                self.key = Some(k);
                Poll::Pending
            }
            Some(k) => {
                let fired = with_core(|c| {
                    if c.timers.is_fired(k) {
                        true
                    } else {
                        c.timers.update_waker(k, cx.waker());
                        false
                    }
                });
                if fired || Instant::now() >= self.deadline {
                    Poll::Ready(())
                } else {
                    Poll::Pending
                }
            }
        }
    }
}

impl Drop for Sleep {
    fn drop(&mut self) {
        if let Some(k) = self.key.take() {
            let _ = crate::reactor::try_with_core(|c| c.timers.remove(k));
        }
    }
}

/// The error of [`timeout`]: the deadline passed first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

impl std::fmt::Display for Elapsed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("timed out")
    }
}

impl std::error::Error for Elapsed {}

/// Runs `fut` until it completes or `d` passes.
pub async fn timeout<F: Future>(d: Duration, fut: F) -> Result<F::Output, Elapsed> {
    let mut fut = std::pin::pin!(fut);
    let mut timer = std::pin::pin!(sleep(d));
    std::future::poll_fn(|cx| {
        if let Poll::Ready(v) = fut.as_mut().poll(cx) {
            return Poll::Ready(Ok(v));
        }
        if timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(Elapsed));
        }
        Poll::Pending
    })
    .await
}
