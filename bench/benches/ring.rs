//! Cross-core round trips, measured on reactor 0:
//! - a message from reactor 0 to reactor 1 through a mailbox and back through another;
//! - a forwarded call's shape: a message to reactor 1 carrying the sender's waker, which
//!   reactor 1 wakes from its thread (the remote wake ring: no lock, no allocation).

use std::cell::{Cell, RefCell};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use poller::{HugepageMode, IdlePolicy, ReactorOptions, Reactors};

thread_local! {
    /// On reactor 0: the last sequence number that came back, and the task waiting.
    static PONG: Cell<u64> = const { Cell::new(0) };
    static WAITER: RefCell<Option<Waker>> = const { RefCell::new(None) };
    static NEXT: Cell<u64> = const { Cell::new(0) };
}

fn ring(c: &mut Criterion) {
    let cores = if std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2 {
        vec![0, 1]
    } else {
        vec![0, 0]
    };
    let reactors = Reactors::start(ReactorOptions {
        cores,
        idle: IdlePolicy::Busy,
        hugepages: HugepageMode::Off,
        dma_pool_bytes: 4 << 20,
        pin: true,
    })
    .expect("start two reactors");
    let h = reactors.handles().to_vec();
    let (mb_a, tx_a) = h[0].call(|| {
        poller::mailbox::<u64>(64, |m| {
            PONG.with(|p| p.set(m));
            if let Some(w) = WAITER.with(|w| w.borrow_mut().take()) {
                w.wake();
            }
        })
    });
    let (mb_b, tx_b) = h[1].call(move || {
        poller::mailbox::<u64>(64, move |m| {
            if tx_a.try_send(m).is_err() {
                panic!("the return ring is never full: one message in flight");
            }
        })
    });
    let mut g = c.benchmark_group("mailbox");
    g.measurement_time(Duration::from_secs(3));
    g.bench_function("round trip reactor 0 -> 1 -> 0", |b| {
        b.iter_custom(|iters| {
            let tx_b = tx_b.clone();
            h[0].block_on(move || async move {
                let start = Instant::now();
                for _ in 0..iters {
                    let seq = NEXT.with(|n| {
                        n.set(n.get() + 1);
                        n.get()
                    });
                    if tx_b.try_send(seq).is_err() {
                        panic!("the ring is never full: one message in flight");
                    }
                    std::future::poll_fn(|cx| {
                        if PONG.with(Cell::get) == seq {
                            Poll::Ready(())
                        } else {
                            WAITER.with(|w| *w.borrow_mut() = Some(cx.waker().clone()));
                            Poll::Pending
                        }
                    })
                    .await;
                }
                start.elapsed()
            })
        })
    });
    // The forwarded call: the sender's waker crosses, and comes back as a remote wake.
    static DONE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let (mb_c, tx_c) = h[1].call(|| {
        poller::mailbox::<(u64, Waker)>(64, |(seq, w)| {
            DONE.store(seq, std::sync::atomic::Ordering::Release);
            w.wake();
        })
    });
    g.bench_function("call with remote wake reactor 0 -> 1 -> 0", |b| {
        b.iter_custom(|iters| {
            let tx_c = tx_c.clone();
            h[0].block_on(move || async move {
                let start = Instant::now();
                for _ in 0..iters {
                    let seq = NEXT.with(|n| {
                        n.set(n.get() + 1);
                        n.get()
                    });
                    let mut sent = false;
                    std::future::poll_fn(|cx| {
                        if !sent {
                            sent = true;
                            if tx_c.try_send((seq, cx.waker().clone())).is_err() {
                                panic!("the ring is never full: one message in flight");
                            }
                            return Poll::Pending;
                        }
                        if DONE.load(std::sync::atomic::Ordering::Acquire) == seq {
                            Poll::Ready(())
                        } else {
                            Poll::Pending
                        }
                    })
                    .await;
                }
                start.elapsed()
            })
        })
    });
    g.finish();
    h[1].call(move || drop(mb_c));
    h[1].call(move || drop(mb_b));
    h[0].call(move || drop(mb_a));
    reactors.stop();
}

criterion_group!(benches, ring);
criterion_main!(benches);
