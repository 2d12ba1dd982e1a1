use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::*;

fn start(n: usize, idle: IdlePolicy) -> Reactors {
    Reactors::start(ReactorOptions {
        cores: (0..n).collect(),
        idle,
        hugepages: HugepageMode::Off,
        dma_pool_bytes: 8 << 20,
        pin: false,
    })
    .expect("reactors start")
}

#[test]
fn call_and_block_on_run_on_the_reactor() {
    let r = start(2, IdlePolicy::adaptive());
    for h in r.handles() {
        let i = h.index();
        assert_eq!(h.call(current_index), i);
        assert!(h.call(on_reactor));
        let v = h.block_on(|| async {
            sleep(Duration::from_millis(2)).await;
            41 + 1
        });
        assert_eq!(v, 42);
    }
    assert!(!on_reactor());
    r.stop();
}

#[test]
fn task_pool_runs_tasks_and_hands_back_when_full() {
    let r = start(1, IdlePolicy::Busy);
    let done = r.handles()[0].block_on(|| async {
        let counter = Rc::new(Cell::new(0));
        let make = |c: Rc<Cell<u32>>| async move {
            yield_now().await;
            sleep(Duration::from_millis(1)).await;
            c.set(c.get() + 1);
        };
        let pool = TaskPool::new(4);
        for _ in 0..4 {
            assert!(pool.spawn(make(counter.clone())).is_ok());
        }
        assert!(pool.is_full());
        assert!(pool.spawn(make(counter.clone())).is_err(), "a full pool hands the task back");
        pool.drain().await;
        for _ in 0..4 {
            assert!(pool.spawn(make(counter.clone())).is_ok(), "slots are reused");
        }
        pool.drain().await;
        counter.get()
    });
    assert_eq!(done, 8);
    r.stop();
}

#[test]
fn task_pool_spawn_with_makes_tasks_in_their_slots() {
    let r = start(1, IdlePolicy::Busy);
    let done = r.handles()[0].block_on(|| async {
        let counter = Rc::new(Cell::new(0u32));
        // A future with a large state (as a request future that can reach metadata
        // writeback is): made in its slot, then run there.
        let make = |c: Rc<Cell<u32>>, k: u32| async move {
            let mut big = [0u8; 64 << 10];
            sleep(Duration::from_millis(1)).await;
            big[k as usize] = 1;
            c.set(c.get() + u32::from(big.iter().map(|&b| b as u32).sum::<u32>() == 1));
        };
        let pool = TaskPool::new(3);
        for k in 0..3 {
            assert!(pool.spawn_with(|| make(counter.clone(), k)));
        }
        let mut called = false;
        assert!(!pool.spawn_with(|| {
            called = true;
            make(counter.clone(), 0)
        }));
        assert!(!called, "a full pool does not make the task");
        pool.drain().await;
        for k in 0..3 {
            assert!(pool.spawn_with(|| make(counter.clone(), k)), "slots are reused");
        }
        pool.drain().await;
        counter.get()
    });
    assert_eq!(done, 6);
    r.stop();
}

#[test]
fn task_pool_grows_by_chunks_to_its_high_water_mark() {
    let r = start(1, IdlePolicy::Busy);
    let grown = r.handles()[0].block_on(|| async {
        let make = || async {
            sleep(Duration::from_millis(1)).await;
        };
        let before = crate::executor::pool_growths();
        let pool = TaskPool::new(40);
        let mut seen = Vec::new();
        // 17 at once: two chunks; the same depth again grows nothing; 40 at once takes
        // the third (a short one of 8), and the pool is then full.
        for depth in [17, 17, 40] {
            for _ in 0..depth {
                assert!(pool.spawn(make()).is_ok());
            }
            seen.push(crate::executor::pool_growths() - before);
            pool.drain().await;
        }
        assert!(pool.spawn(make()).is_ok());
        pool.drain().await;
        seen.push(crate::executor::pool_growths() - before);
        seen
    });
    assert_eq!(grown, [2, 2, 3, 3]);
    r.stop();
}

#[test]
fn timers_fire_in_order_and_timeouts_expire() {
    let r = start(1, IdlePolicy::adaptive());
    let order = r.handles()[0].block_on(|| async {
        let log = Rc::new(std::cell::RefCell::new(Vec::new()));
        for (i, ms) in [(0u32, 30u64), (1, 10), (2, 20)] {
            let log = log.clone();
            spawn(async move {
                sleep(Duration::from_millis(ms)).await;
                log.borrow_mut().push(i);
            });
        }
        let t0 = Instant::now();
        let r = timeout(Duration::from_millis(5), sleep(Duration::from_secs(10))).await;
        assert_eq!(r, Err(Elapsed));
        assert!(t0.elapsed() < Duration::from_secs(5));
        assert_eq!(timeout(Duration::from_secs(5), async { 7 }).await, Ok(7));
        sleep(Duration::from_millis(50)).await;
        log.borrow().clone()
    });
    assert_eq!(order, vec![1, 2, 0]);
    r.stop();
}

#[test]
fn mailboxes_carry_typed_messages_between_reactors() {
    let r = start(2, IdlePolicy::adaptive());
    let total = Arc::new(AtomicUsize::new(0));
    let t = total.clone();
    let tx = r.handles()[1].call(move || {
        let (mb, tx) = mailbox::<u64>(64, move |v| {
            t.fetch_add(v as usize, Ordering::SeqCst);
        });
        std::mem::forget(mb);
        tx
    });
    r.handles()[0].block_on(move || async move {
        for i in 1..=1000u64 {
            tx.send(i).await;
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while total.load(Ordering::SeqCst) != 500500 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(total.load(Ordering::SeqCst), 500500);
    r.stop();
}

#[test]
fn foreign_thread_wakes_a_sleeping_task() {
    let r = start(1, IdlePolicy::adaptive());
    let (tx, rx) = std::sync::mpsc::channel::<std::task::Waker>();
    let flag = Arc::new(AtomicUsize::new(0));
    let f2 = flag.clone();
    let waiter = std::thread::spawn(move || {
        let w = rx.recv().unwrap();
        std::thread::sleep(Duration::from_millis(20));
        f2.store(1, Ordering::SeqCst);
        w.wake();
    });
    let f3 = flag.clone();
    let ok = r.handles()[0].block_on(move || async move {
        let mut sent = false;
        std::future::poll_fn(|cx| {
            if f3.load(Ordering::SeqCst) == 1 {
                return std::task::Poll::Ready(true);
            }
            if !sent {
                tx.send(cx.waker().clone()).unwrap();
                sent = true;
            }
            std::task::Poll::Pending
        })
        .await
    });
    assert!(ok);
    waiter.join().unwrap();
    r.stop();
}

fn thread_cpu_time(pid_tid: (u32, u32)) -> Duration {
    let stat =
        std::fs::read_to_string(format!("/proc/{}/task/{}/stat", pid_tid.0, pid_tid.1)).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

#[test]
fn adaptive_reactor_sleeps_when_idle_and_wakes_on_work() {
    let r = start(1, IdlePolicy::adaptive());
    // SAFETY: gettid has no preconditions.
    let tid = r.handles()[0].call(|| unsafe { libc::gettid() } as u32);
    let before = thread_cpu_time((std::process::id(), tid));
    std::thread::sleep(Duration::from_millis(500));
    let used = thread_cpu_time((std::process::id(), tid)) - before;
    assert!(used < Duration::from_millis(100), "idle reactor used {used:?} of CPU in 500ms");
    assert!(r.handles()[0].stats().sleeps > 0);
    // It still answers promptly.
    let t0 = Instant::now();
    assert_eq!(r.handles()[0].call(|| 5), 5);
    assert!(t0.elapsed() < Duration::from_secs(1));
    r.stop();
}

#[test]
fn dma_buffers_are_aligned_and_waiters_get_freed_buffers() {
    let r = start(1, IdlePolicy::Busy);
    r.handles()[0].block_on(|| async {
        let max = dma::max_len();
        assert_eq!(max, 2 << 20);
        let (base, len) = dma::region();
        assert_eq!((base % (2 << 20), len), (0, 8 << 20), "the region is 2 MiB-aligned");
        let a = dma::alloc(512).unwrap();
        assert_eq!(a.as_ptr() as usize % 4096, 0);
        assert_eq!(a.capacity(), 4096);
        let big = dma::alloc_wait(max).await.unwrap();
        assert_eq!(big.len(), max);
        assert!(dma::alloc_wait(max + 1).await.is_err());
        // Exhaust the pool, then free one buffer from another task.
        let mut held = Vec::new();
        while let Some(b) = dma::alloc(max) {
            held.push(b);
        }
        let released = Rc::new(Cell::new(false));
        let rel = released.clone();
        let last = held.pop().unwrap();
        spawn(async move {
            sleep(Duration::from_millis(5)).await;
            rel.set(true);
            drop(last);
        });
        let got = dma::alloc_wait(max).await.unwrap();
        assert!(released.get(), "the waiter ran only after a buffer was freed");
        drop((a, big, got, held));
        assert_eq!(dma::free_bytes(), 8 << 20);
    });
    r.stop();
}

/// A short read marks a socket drained; but when the peer's close was already reported
/// (data and FIN in one edge), no further edge will come, so the next read must still
/// see end of stream instead of waiting forever.
#[test]
fn a_short_read_after_the_peer_closed_still_sees_end_of_stream() {
    use std::io::Write;
    use std::os::fd::OwnedFd;
    let r = start(1, IdlePolicy::Busy);
    let (mut peer, ours) = std::os::unix::net::UnixStream::pair().unwrap();
    let got = r.handles()[0].block_on(move || async move {
        let sock = Async::new(OwnedFd::from(ours)).unwrap();
        peer.write_all(b"abc").unwrap();
        peer.shutdown(std::net::Shutdown::Write).unwrap();
        // Let the reactor collect the data-and-close edge before the first read.
        sleep(Duration::from_millis(20)).await;
        let mut buf = [0u8; 64];
        let first = sock.read(&mut buf).await.unwrap();
        let second = timeout(Duration::from_secs(5), sock.read(&mut buf)).await;
        (first, second.map(|r| r.unwrap()).ok())
    });
    assert_eq!(got, (3, Some(0)), "3 bytes, then end of stream (None: the read hung)");
    r.stop();
}
