//! Offload workers: a few plain threads that run the blocking file operations the
//! engines cannot issue asynchronously (`lseek(SEEK_DATA/SEEK_HOLE)` for block status on
//! both engines, `fallocate` under AIO), so that no reactor ever makes a blocking
//! syscall.
//!
//! No allocation per operation: the job carries a pointer to a result cell inside the
//! (pinned) [`Offload`] future and the task's waker (an integer, see `poller::executor`).
//! The worker writes the result, sets `done` with Release ordering and wakes the task.
//! If the future is dropped while its job is queued or running, its destructor waits for
//! `done` before the cell goes away.

use std::future::Future;
use std::marker::PhantomPinned;
use std::os::fd::RawFd;
use std::pin::Pin;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::task::{Context, Poll, Waker};
use std::thread::Thread;

use crossbeam_queue::ArrayQueue;

/// Worker threads (blocking file metadata calls are short; two cover a busy host).
const WORKERS: usize = 2;
/// Jobs waiting at most.
const QUEUE_DEPTH: usize = 4096;

/// A blocking operation.
#[derive(Clone, Copy, Debug)]
pub(crate) enum BlockingOp {
    SeekData {
        fd: RawFd,
        off: u64,
    },
    SeekHole {
        fd: RawFd,
        off: u64,
    },
    Fallocate {
        fd: RawFd,
        off: u64,
        len: u64,
        mode: i32,
    },
    /// Grows a regular file to at least `len` bytes (ahead of appends); never shrinks
    /// it: channels on several reactors grow the same file, and a smaller target
    /// arriving late must not cut off what a larger one made room for.
    Ftruncate {
        fd: RawFd,
        len: u64,
    },
    /// A driver's own blocking call (`f(ctx, a, b)`, returning a value or -errno),
    /// such as librbd's synchronous `rbd_diff_iterate2` and `rbd_resize`. `ctx` points at
    /// state the caller keeps alive until the operation completes.
    Call {
        f: fn(usize, u64, u64) -> i64,
        ctx: usize,
        a: u64,
        b: u64,
    },
}

/// Serialises file growth (on the offload threads, never on a reactor): the size check
/// and the ftruncate must not interleave with another's.
static GROW: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn grow_file(fd: RawFd, len: u64) -> i64 {
    let _g = GROW.lock().unwrap_or_else(|p| p.into_inner());
    // SAFETY: `st` is a valid out-parameter; `fd` is open for the op's lifetime.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstat(fd, &mut st) } < 0 {
        return -1;
    }
    if st.st_size as u64 >= len {
        return 0;
    }
    // SAFETY: as above.
    i64::from(unsafe { libc::ftruncate(fd, len as i64) })
}

struct Cell {
    result: AtomicI64,
    done: AtomicBool,
}

struct Job {
    op: BlockingOp,
    cell: *const Cell,
    waker: Waker,
}

// SAFETY: the cell pointer targets a pinned future that waits for `done` before it is
// dropped, so the worker thread may write through it; everything else is Send.
unsafe impl Send for Job {}

struct Pool {
    queue: ArrayQueue<Job>,
    workers: OnceLock<Vec<Thread>>,
}

/// The pool for file operations, and the one for drivers' own calls (which may wait on
/// a network: a cluster that stops answering must not hold up another disk's files).
static POOLS: [OnceLock<Pool>; 2] = [OnceLock::new(), OnceLock::new()];

fn pool(op: &BlockingOp) -> &'static Pool {
    let lane = usize::from(matches!(op, BlockingOp::Call { .. }));
    let pool = POOLS[lane]
        .get_or_init(|| Pool { queue: ArrayQueue::new(QUEUE_DEPTH), workers: OnceLock::new() });
    pool.workers.get_or_init(|| {
        (0..WORKERS)
            .map(|i| {
                std::thread::Builder::new()
                    .name(format!("offload-{lane}-{i}"))
                    .spawn(move || worker(POOLS[lane].get().expect("pool initialised")))
                    .expect("spawn offload worker")
                    .thread()
                    .clone()
            })
            .collect()
    });
    pool
}

fn worker(pool: &Pool) {
    loop {
        match pool.queue.pop() {
            Some(job) => {
                let res = run(job.op);
                // SAFETY: see `Job`: the cell outlives the job.
                let cell = unsafe { &*job.cell };
                cell.result.store(res, Ordering::Relaxed);
                // Release: the result is visible to whoever sees `done`.
                cell.done.store(true, Ordering::Release);
                job.waker.wake();
            }
            None => std::thread::park_timeout(std::time::Duration::from_millis(100)),
        }
    }
}

fn run(op: BlockingOp) -> i64 {
    let r = match op {
        // SAFETY: lseek and fallocate take plain integers; a bad fd is an error return.
        BlockingOp::SeekData { fd, off } => unsafe { libc::lseek(fd, off as i64, libc::SEEK_DATA) },
        // SAFETY: as above.
        BlockingOp::SeekHole { fd, off } => unsafe { libc::lseek(fd, off as i64, libc::SEEK_HOLE) },
        BlockingOp::Fallocate { fd, off, len, mode } => {
            // SAFETY: as above.
            i64::from(unsafe { libc::fallocate(fd, mode, off as i64, len as i64) })
        }
        BlockingOp::Ftruncate { fd, len } => grow_file(fd, len),
        BlockingOp::Call { f, ctx, a, b } => return f(ctx, a, b),
    };
    if r < 0 {
        -i64::from(std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO))
    } else {
        r
    }
}

/// Runs `op` on an offload worker; resolves to its result (or -errno).
pub(crate) struct Offload {
    op: BlockingOp,
    cell: Cell,
    submitted: bool,
    /// Held while a worker has the job: the reactor sleeps rather than spin for it.
    waiting: Option<poller::ForeignWait>,
    _pin: PhantomPinned,
}

impl Offload {
    pub(crate) fn new(op: BlockingOp) -> Self {
        Offload {
            op,
            cell: Cell { result: AtomicI64::new(0), done: AtomicBool::new(false) },
            submitted: false,
            waiting: None,
            _pin: PhantomPinned,
        }
    }
}

impl Future for Offload {
    type Output = i64;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<i64> {
        // SAFETY: we never move out of the pinned future; `cell` stays in place.
        let this = unsafe { self.get_unchecked_mut() };
        if this.submitted {
            // Acquire: pairs with the worker's Release store of `done`.
            if this.cell.done.load(Ordering::Acquire) {
                this.waiting = None;
                return Poll::Ready(this.cell.result.load(Ordering::Relaxed));
            }
            return Poll::Pending;
        }
        let pool = pool(&this.op);
        let job = Job { op: this.op, cell: &this.cell, waker: cx.waker().clone() };
        match pool.queue.push(job) {
            Ok(()) => {
                this.submitted = true;
                this.waiting = Some(poller::ForeignWait::begin());
                for w in pool.workers.get().into_iter().flatten() {
                    w.unpark();
                }
            }
            Err(_) => cx.waker().wake_by_ref(),
        }
        Poll::Pending
    }
}

impl Drop for Offload {
    fn drop(&mut self) {
        if self.submitted {
            while !self.cell.done.load(Ordering::Acquire) {
                std::thread::yield_now();
            }
        }
    }
}
