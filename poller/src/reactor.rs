//! Reactors: one pinned thread per configured core, each running a bounded tick.
//!
//! One tick:
//! 1. a bounded batch of control messages and remote wakes from other threads;
//! 2. `Early` pollers: typed mailboxes from other reactors, I/O completion reaping;
//! 3. ready tasks (bounded);
//! 4. socket readiness (`epoll_wait` with a zero timeout, only when sockets are
//!    registered) and due timers, then ready tasks again;
//! 5. `Late` pollers: submit everything queued this tick in one batch.
//!
//! The clock is read once per tick, at its start, for the timers, the idle policy and
//! the busy-time account: the time from the start of a tick that did work to the start
//! of the next (`ReactorStats::busy_ns`) is the reactor's work, as against its spinning
//! and sleeping, which a polling process's CPU time cannot tell apart.
//!
//! Every step reports whether it did work. Under the `adaptive` idle policy a reactor
//! that found no work for a while (the spin window) announces that it is going to sleep
//! (`Doorbell::sleeping`, SeqCst), re-checks every queue a producer could have filled in
//! the meantime, and sleeps in `epoll_wait` on its doorbell eventfd, the I/O drivers'
//! completion eventfds and its sockets, with the next timer as the timeout. Producers
//! push first and ring the doorbell only when the flag is set, so a busy reactor costs
//! its producers no syscall, and the SeqCst pair (flag store / queue re-check against
//! queue push / flag load) means no wakeup is lost.
//!
//! The control plane (config, listeners, vhost-user messages) runs on ordinary threads
//! and talks to reactors only through [`ReactorHandle`]: boxed closures for rare control
//! operations, typed [`crate::mailbox`] rings for anything on the data path.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;

use crate::dma::{DmaPool, HugepageMode};
use crate::executor::{Executor, MAX_REACTORS, TaskRef};
use crate::fd::FdTable;
use crate::timer::Timers;

/// Control messages drained per tick.
const CONTROL_BATCH: usize = 16;
/// Remote wakes drained per tick.
const REMOTE_WAKE_BATCH: usize = 256;
/// Ready tasks polled per step of a tick.
const TASK_BUDGET: usize = 256;
/// Capacity of the control ring and of the remote-wake ring.
const CONTROL_RING: usize = 1024;
const REMOTE_WAKE_RING: usize = 4096;
/// Idle ticks between checks of the spin window.
const IDLE_CLOCK_EVERY: u32 = 32;
/// A busy reactor yields its core once per this many idle ticks in a row (tens of
/// microseconds): often enough for io_uring's kernel workers, rarely enough that the
/// syscall does not show in request latency.
const BUSY_YIELD_EVERY: u32 = 512;

/// What a reactor does when it has no work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdlePolicy {
    /// Spin forever: lowest latency, one full core.
    Busy,
    /// Spin for `spin`, then sleep until work arrives.
    Adaptive { spin: Duration },
}

impl IdlePolicy {
    /// The adaptive policy with its default spin window.
    pub const fn adaptive() -> Self {
        IdlePolicy::Adaptive { spin: Duration::from_micros(200) }
    }
}

/// How to start a group of reactors.
#[derive(Debug, Clone)]
pub struct ReactorOptions {
    /// One reactor per entry, pinned to that CPU.
    pub cores: Vec<usize>,
    pub idle: IdlePolicy,
    pub hugepages: HugepageMode,
    /// Bytes of DMA buffer pool per reactor (a power of two).
    pub dma_pool_bytes: usize,
    /// Pin threads to their cores (tests may run unpinned).
    pub pin: bool,
}

impl Default for ReactorOptions {
    fn default() -> Self {
        ReactorOptions {
            cores: vec![0],
            idle: IdlePolicy::adaptive(),
            hugepages: HugepageMode::Off,
            dma_pool_bytes: 32 << 20,
            pin: false,
        }
    }
}

/// Which step of the tick a poller runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Before tasks run: reap completions, drain mailboxes.
    Early,
    /// At the end of the tick: submit what tasks queued.
    Late,
}

type ControlMsg = Box<dyn FnOnce() + Send>;

/// Counters a reactor publishes for the control plane. Single writer (the reactor), so
/// updates are plain relaxed load/store pairs, never locked read-modify-writes.
#[derive(Debug, Default)]
pub struct ReactorStats {
    pub busy_ticks: AtomicU64,
    /// Nanoseconds spent in ticks that did work.
    pub busy_ns: AtomicU64,
    pub idle_ticks: AtomicU64,
    pub sleeps: AtomicU64,
    pub tasks_polled: AtomicU64,
    /// Control messages and cross-reactor wakes taken off this reactor's rings.
    pub messages: AtomicU64,
}

/// A point-in-time copy of [`ReactorStats`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub busy_ticks: u64,
    pub busy_ns: u64,
    pub idle_ticks: u64,
    pub sleeps: u64,
    pub tasks_polled: u64,
    pub messages: u64,
    /// Entries waiting in the control ring when the snapshot was taken.
    pub control_ring: u64,
    /// Entries waiting in the cross-reactor wake ring when the snapshot was taken.
    pub wake_ring: u64,
}

impl ReactorStats {
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            busy_ticks: self.busy_ticks.load(Ordering::Relaxed),
            busy_ns: self.busy_ns.load(Ordering::Relaxed),
            idle_ticks: self.idle_ticks.load(Ordering::Relaxed),
            sleeps: self.sleeps.load(Ordering::Relaxed),
            tasks_polled: self.tasks_polled.load(Ordering::Relaxed),
            messages: self.messages.load(Ordering::Relaxed),
            control_ring: 0,
            wake_ring: 0,
        }
    }
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.store(counter.load(Ordering::Relaxed) + by, Ordering::Relaxed);
}

/// An eventfd that wakes a sleeping reactor.
pub(crate) struct Doorbell {
    fd: OwnedFd,
    sleeping: AtomicBool,
}

impl Doorbell {
    fn new() -> io::Result<Self> {
        // SAFETY: eventfd has no memory-safety preconditions.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor owned by nobody else.
        Ok(Doorbell { fd: unsafe { OwnedFd::from_raw_fd(fd) }, sleeping: AtomicBool::new(false) })
    }

    /// Wakes the reactor if it is asleep or about to sleep. Call after publishing work.
    pub(crate) fn ring(&self) {
        if self.sleeping.load(Ordering::SeqCst) {
            self.force();
        }
    }

    fn force(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to an eventfd we own.
        let _ = unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }
}

/// The part of a reactor other threads may touch.
pub(crate) struct Shared {
    /// Position in its group, 0-based.
    index: usize,
    /// Unique among live reactors of the process; packed into task references.
    global_id: usize,
    core_id: Option<usize>,
    control: ArrayQueue<ControlMsg>,
    remote_wakes: ArrayQueue<u64>,
    pub(crate) doorbell: Doorbell,
    stop: AtomicBool,
    stats: ReactorStats,
}

/// Live reactors by global id, for wakes from foreign threads, without a lock: a
/// waker pins the slot (`users`), loads the pointer and uses it; a reactor going away
/// clears its pointer, waits until no waker pins the slot, and only then drops its
/// reference. Ids are handed out under `ALLOC` (control plane: reactor start and stop).
struct Slot {
    shared: AtomicPtr<Shared>,
    users: AtomicUsize,
}

static SLOTS: [Slot; MAX_REACTORS] =
    [const { Slot { shared: AtomicPtr::new(std::ptr::null_mut()), users: AtomicUsize::new(0) } };
        MAX_REACTORS];
static ALLOC: Mutex<[bool; MAX_REACTORS]> = Mutex::new([false; MAX_REACTORS]);

fn register_global(make: impl FnOnce(usize) -> Arc<Shared>) -> Arc<Shared> {
    let mut used = ALLOC.lock().unwrap_or_else(|p| p.into_inner());
    let id = used.iter().position(|u| !u);
    let id = id.unwrap_or_else(|| panic!("more than {MAX_REACTORS} live reactors"));
    used[id] = true;
    let shared = make(id);
    // The slot holds one strong reference, given back in `unregister_global`.
    let raw = Arc::into_raw(shared.clone()).cast_mut();
    // Release: a waker that loads the pointer sees the reactor fully built.
    SLOTS[id].shared.store(raw, Ordering::Release);
    shared
}

fn unregister_global(id: usize) {
    let mut used = ALLOC.lock().unwrap_or_else(|p| p.into_inner());
    let Some(slot) = SLOTS.get(id) else { return };
    let raw = slot.shared.swap(std::ptr::null_mut(), Ordering::AcqRel);
    // Wakers that loaded the pointer before the swap are done with it once `users`
    // drops to zero (SeqCst pairs with theirs: either they see null, or we see them).
    while slot.users.load(Ordering::SeqCst) != 0 {
        std::hint::spin_loop();
    }
    if !raw.is_null() {
        // SAFETY: `raw` came from `Arc::into_raw` in `register_global`, and no waker
        // can reach it any more (see above).
        drop(unsafe { Arc::from_raw(raw) });
    }
    used[id] = false;
}

/// Runs `f` on the live reactor `id`, if any, with no lock and no allocation.
fn with_reactor(id: usize, f: impl FnOnce(&Shared)) {
    let Some(slot) = SLOTS.get(id) else { return };
    slot.users.fetch_add(1, Ordering::SeqCst);
    let raw = slot.shared.load(Ordering::SeqCst);
    if !raw.is_null() {
        // SAFETY: the slot's reference keeps the reactor alive while `users` is
        // raised (`unregister_global` waits for it).
        f(unsafe { &*raw });
    }
    slot.users.fetch_sub(1, Ordering::SeqCst);
}

/// A handle to a reactor, usable from any thread.
#[derive(Clone)]
pub struct ReactorHandle {
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for ReactorHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "reactor {} (core {:?})", self.shared.index, self.shared.core_id)
    }
}

impl ReactorHandle {
    /// Position of the reactor in its group.
    pub fn index(&self) -> usize {
        self.shared.index
    }

    /// The CPU this reactor is pinned to.
    pub fn core_id(&self) -> Option<usize> {
        self.shared.core_id
    }

    pub fn stats(&self) -> StatsSnapshot {
        let mut s = self.shared.stats.snapshot();
        s.control_ring = self.shared.control.len() as u64;
        s.wake_ring = self.shared.remote_wakes.len() as u64;
        s
    }

    /// Runs `f` on the reactor at its next tick. For the control plane: it allocates.
    /// Waits (off the data path) while the control ring is full.
    pub fn run(&self, f: impl FnOnce() + Send + 'static) {
        let mut msg: ControlMsg = Box::new(f);
        loop {
            match self.shared.control.push(msg) {
                Ok(()) => break,
                Err(back) => {
                    msg = back;
                    self.shared.doorbell.force();
                    std::thread::sleep(Duration::from_micros(50));
                }
            }
        }
        self.shared.doorbell.ring();
    }

    /// Runs `f` on the reactor and waits for its result. Control plane only: never call
    /// it from a reactor thread (it would wait on itself).
    pub fn call<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> R {
        assert!(!on_reactor(), "ReactorHandle::call from a reactor thread would deadlock");
        let (tx, rx) = mpsc::sync_channel(1);
        self.run(move || {
            let _ = tx.send(f());
        });
        rx.recv().expect("reactor stopped before answering a call")
    }

    /// Spawns the future made by `make` as a boxed task on the reactor.
    pub fn spawn<F, Fut>(&self, make: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        self.run(move || crate::executor::spawn(make()));
    }

    /// Runs the future made by `make` on the reactor and waits for its output.
    /// Control plane only.
    pub fn block_on<F, Fut, R>(&self, make: F) -> R
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = R> + 'static,
        R: Send + 'static,
    {
        assert!(!on_reactor(), "ReactorHandle::block_on from a reactor thread would deadlock");
        let (tx, rx) = mpsc::sync_channel(1);
        self.run(move || {
            crate::executor::spawn(async move {
                let _ = tx.send(make().await);
            })
        });
        rx.recv().expect("reactor stopped before finishing a task")
    }
}

/// A running group of reactors.
pub struct Reactors {
    handles: Vec<ReactorHandle>,
    threads: Vec<JoinHandle<()>>,
}

impl Reactors {
    /// Starts one reactor per core. Fails if any reactor cannot set itself up (for
    /// example, hugepages required but not reserved).
    pub fn start(options: ReactorOptions) -> io::Result<Reactors> {
        assert!(!options.cores.is_empty(), "at least one reactor");
        let mut shareds = Vec::new();
        for (index, &core) in options.cores.iter().enumerate() {
            let doorbell = Doorbell::new()?;
            shareds.push(register_global(|global_id| {
                Arc::new(Shared {
                    index,
                    global_id,
                    core_id: Some(core),
                    control: ArrayQueue::new(CONTROL_RING),
                    remote_wakes: ArrayQueue::new(REMOTE_WAKE_RING),
                    doorbell,
                    stop: AtomicBool::new(false),
                    stats: ReactorStats::default(),
                })
            }));
        }
        let handles: Vec<ReactorHandle> =
            shareds.iter().map(|s| ReactorHandle { shared: s.clone() }).collect();
        let peers: Arc<[ReactorHandle]> = handles.clone().into();
        let (ready_tx, ready_rx) = mpsc::channel::<io::Result<()>>();
        let mut threads = Vec::new();
        for shared in shareds {
            let options = options.clone();
            let peers = peers.clone();
            let ready_tx = ready_tx.clone();
            let name = format!("reactor-{}", shared.index);
            let t = std::thread::Builder::new().name(name).spawn(move || {
                let global_id = shared.global_id;
                match Core::new(shared, &options, peers) {
                    Ok(core) => {
                        let _ = ready_tx.send(Ok(()));
                        run(core);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
                unregister_global(global_id);
            })?;
            threads.push(t);
        }
        drop(ready_tx);
        let mut first_err = None;
        for _ in 0..threads.len() {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => first_err = first_err.or(Some(e)),
                Err(_) => first_err = first_err.or(Some(io::Error::other("reactor died"))),
            }
        }
        let reactors = Reactors { handles, threads };
        if let Some(e) = first_err {
            reactors.stop();
            return Err(e);
        }
        Ok(reactors)
    }

    pub fn handles(&self) -> &[ReactorHandle] {
        &self.handles
    }

    pub fn len(&self) -> usize {
        self.handles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Stops every reactor after its current tick and joins the threads. Tasks still
    /// alive are dropped: drain exports before calling this.
    pub fn stop(self) {
        for h in &self.handles {
            h.shared.stop.store(true, Ordering::SeqCst);
            h.shared.doorbell.force();
        }
        for t in self.threads {
            let _ = t.join();
        }
    }
}

type PollFn = Box<dyn FnMut() -> bool>;
type PendingFn = Box<dyn Fn() -> bool>;

struct PollerSlot {
    phase: Phase,
    poll: Option<PollFn>,
    pending: Option<PendingFn>,
    removed: bool,
}

/// An identifier for unregistering a poller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PollerId(usize);

/// The reactor's thread-local state.
pub(crate) struct Core {
    pub(crate) shared: Arc<Shared>,
    pub(crate) executor: Rc<Executor>,
    pollers: RefCell<Vec<PollerSlot>>,
    pub(crate) timers: Timers,
    pub(crate) fds: FdTable,
    pub(crate) dma: DmaPool,
    idle: IdlePolicy,
    peers: Arc<[ReactorHandle]>,
    idle_ticks: Cell<u32>,
    idle_since: Cell<Option<Instant>>,
    /// Operations another thread completes that this reactor's tasks wait for
    /// ([`ForeignWait`]).
    foreign: Cell<u32>,
    /// Counts not yet added to the published stats.
    count: Counts,
}

#[derive(Default)]
struct Counts {
    busy: Cell<u64>,
    idle: Cell<u64>,
    busy_ns: Cell<u64>,
}

thread_local! {
    static CORE: RefCell<Option<Rc<Core>>> = const { RefCell::new(None) };
}

impl Core {
    fn new(
        shared: Arc<Shared>,
        options: &ReactorOptions,
        peers: Arc<[ReactorHandle]>,
    ) -> io::Result<Rc<Core>> {
        if options.pin
            && let Some(core) = shared.core_id
            && !core_affinity::set_for_current(core_affinity::CoreId { id: core })
        {
            tracing::warn!(reactor = shared.index, core, "could not pin reactor to core");
        }
        let fds = FdTable::new()?;
        fds.add_wakeup_fd(shared.doorbell.fd.as_raw_fd())?;
        let dma = DmaPool::new(options.dma_pool_bytes, options.hugepages)?;
        let core = Rc::new(Core {
            executor: Executor::new(shared.global_id),
            shared,
            pollers: RefCell::new(Vec::new()),
            timers: Timers::new(),
            fds,
            dma,
            idle: options.idle,
            peers,
            idle_ticks: Cell::new(0),
            idle_since: Cell::new(None),
            foreign: Cell::new(0),
            count: Counts::default(),
        });
        CORE.with(|c| *c.borrow_mut() = Some(core.clone()));
        Ok(core)
    }

    fn drain_control(&self) -> usize {
        let mut n = 0;
        while n < CONTROL_BATCH {
            let Some(msg) = self.shared.control.pop() else { break };
            msg();
            n += 1;
        }
        n
    }

    fn drain_remote_wakes(&self) -> usize {
        let mut n = 0;
        while n < REMOTE_WAKE_BATCH {
            let Some(raw) = self.shared.remote_wakes.pop() else { break };
            self.executor.schedule(TaskRef::from_raw(raw));
            n += 1;
        }
        n
    }

    fn run_pollers(&self, phase: Phase) -> usize {
        let mut work = 0;
        let count = self.pollers.borrow().len();
        for i in 0..count {
            let taken = {
                let mut pollers = self.pollers.borrow_mut();
                let slot = &mut pollers[i];
                if slot.phase != phase || slot.removed { None } else { slot.poll.take() }
            };
            let Some(mut poll) = taken else { continue };
            if poll() {
                work += 1;
            }
            let mut pollers = self.pollers.borrow_mut();
            if !pollers[i].removed {
                pollers[i].poll = Some(poll);
            }
        }
        work
    }

    fn pollers_pending(&self) -> bool {
        self.pollers.borrow().iter().any(|p| !p.removed && p.pending.as_ref().is_some_and(|f| f()))
    }

    fn tick(&self, now: Instant) -> bool {
        let messages = self.drain_control() + self.drain_remote_wakes();
        if messages > 0 {
            bump(&self.shared.stats.messages, messages as u64);
        }
        let mut work = messages;
        work += self.run_pollers(Phase::Early);
        let mut polled = self.executor.run_ready(TASK_BUDGET);
        if self.fds.has_sources() {
            work += self.poll_fds(0);
        }
        work += self.timers.fire_due(now);
        polled += self.executor.run_ready(TASK_BUDGET);
        work += self.run_pollers(Phase::Late);
        if polled > 0 {
            bump(&self.shared.stats.tasks_polled, polled as u64);
        }
        work + polled > 0
    }

    /// Announces sleep, re-checks every source of work, then sleeps in epoll.
    fn sleep(&self) {
        self.publish();
        let doorbell = &self.shared.doorbell;
        doorbell.sleeping.store(true, Ordering::SeqCst);
        let has_work = !self.shared.control.is_empty()
            || !self.shared.remote_wakes.is_empty()
            || self.shared.stop.load(Ordering::SeqCst)
            || self.executor.has_ready()
            || self.pollers_pending();
        if !has_work {
            let timeout_ms = match self.timers.next_deadline() {
                None => -1,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    // Round up so we never wake before the deadline and spin.
                    left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32
                }
            };
            if timeout_ms != 0 {
                bump(&self.shared.stats.sleeps, 1);
                self.poll_fds(timeout_ms);
            }
        }
        doorbell.sleeping.store(false, Ordering::SeqCst);
    }

    /// Adds the counts since the last call to the published [`ReactorStats`].
    fn publish(&self) {
        let stats = &self.shared.stats;
        bump(&stats.busy_ticks, self.count.busy.take());
        bump(&stats.idle_ticks, self.count.idle.take());
        bump(&stats.busy_ns, self.count.busy_ns.take());
    }

    /// The idle policy after a tick without work.
    fn after_idle_tick(&self, now: Instant) {
        let n = self.idle_ticks.get() + 1;
        self.idle_ticks.set(n);
        if !n.is_multiple_of(IDLE_CLOCK_EVERY) {
            return;
        }
        if n.is_multiple_of(BUSY_YIELD_EVERY) {
            // Spinning (busy, or inside the adaptive spin window): let anything else
            // runnable on this core go first now and then — io_uring's kernel workers
            // finishing requests that could not be issued without blocking (allocating
            // writes), a client library's threads completing the reactor's requests
            // (librbd), which otherwise wait for the scheduler to preempt the loop. With
            // nothing else runnable this returns at once.
            // SAFETY: sched_yield has no preconditions.
            unsafe { libc::sched_yield() };
        }
        let IdlePolicy::Adaptive { spin } = self.idle else { return };
        // Waiting only on other threads (a client library's completions, which ring the
        // doorbell): spinning would take the core from them when they share it.
        let spin = if self.foreign.get() > 0 { Duration::ZERO } else { spin };
        match self.idle_since.get() {
            None if spin.is_zero() => {
                self.sleep();
                self.idle_ticks.set(0);
            }
            None => self.idle_since.set(Some(now)),
            Some(since) if now.duration_since(since) >= spin => {
                self.sleep();
                self.idle_ticks.set(0);
                self.idle_since.set(None);
            }
            Some(_) => {}
        }
    }
}

fn run(core: Rc<Core>) {
    let mut start = Instant::now();
    let mut worked = false;
    while !core.shared.stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if worked {
            core.count.busy_ns.set(core.count.busy_ns.get() + (now - start).as_nanos() as u64);
        }
        start = now;
        worked = core.tick(now);
        let ticks = if worked {
            core.idle_ticks.set(0);
            core.idle_since.set(None);
            &core.count.busy
        } else {
            &core.count.idle
        };
        ticks.set(ticks.get() + 1);
        if (core.count.busy.get() + core.count.idle.get()) & 1023 == 0 {
            core.publish();
        }
        if !worked {
            core.after_idle_tick(now);
        }
    }
    core.publish();
    // Drop tasks and pollers while the thread-local context still exists, so their
    // destructors can reach it.
    core.pollers.borrow_mut().clear();
    CORE.with(|c| c.borrow_mut().take());
    drop(core);
}

pub(crate) fn with_core<R>(f: impl FnOnce(&Rc<Core>) -> R) -> R {
    CORE.with(|c| {
        let c = c.borrow();
        let core = c.as_ref().expect("not on a reactor thread");
        f(core)
    })
}

/// Runs `f` with the current reactor's state, if this is a reactor thread that is not
/// tearing down.
pub(crate) fn try_with_core<R>(f: impl FnOnce(&Rc<Core>) -> R) -> Option<R> {
    try_core().map(|c| f(&c))
}

fn try_core() -> Option<Rc<Core>> {
    CORE.try_with(|c| c.try_borrow().ok().and_then(|c| c.clone())).ok().flatten()
}

pub(crate) fn executor() -> Rc<Executor> {
    with_core(|c| c.executor.clone())
}

pub(crate) fn try_executor() -> Option<Rc<Executor>> {
    try_core().map(|c| c.executor.clone())
}

/// Marks, for its life, an operation that another thread completes (librbd's
/// completions): while only such operations are outstanding, an `adaptive` reactor
/// sleeps on its doorbell at once instead of spinning, since the threads that will
/// complete them may need this very core. A no-op off a reactor. Not `Send`: created
/// and dropped on one reactor.
pub struct ForeignWait(std::marker::PhantomData<*const ()>);

impl ForeignWait {
    pub fn begin() -> ForeignWait {
        try_with_core(|c| c.foreign.set(c.foreign.get() + 1));
        ForeignWait(std::marker::PhantomData)
    }
}

impl Drop for ForeignWait {
    fn drop(&mut self) {
        try_with_core(|c| c.foreign.set(c.foreign.get().saturating_sub(1)));
    }
}

/// Schedules a task, locally or through its reactor's remote wake ring.
pub(crate) fn wake_task(task: TaskRef) {
    if let Some(core) = try_core()
        && core.shared.global_id == task.reactor()
    {
        core.executor.schedule(task);
        return;
    }
    with_reactor(task.reactor(), |target| {
        if target.remote_wakes.push(task.raw()).is_err() {
            // The ring is full: fall back to a control message (allocates; rare).
            let raw = task.raw();
            let _ = target.control.push(Box::new(move || {
                with_core(|c| c.executor.schedule(TaskRef::from_raw(raw)));
            }));
        }
        target.doorbell.ring();
    });
}

/// Whether the calling thread is a reactor.
pub fn on_reactor() -> bool {
    try_core().is_some()
}

/// The index of the current reactor in its group. Panics off a reactor.
pub fn current_index() -> usize {
    with_core(|c| c.shared.index)
}

/// A handle to the current reactor. Panics off a reactor.
pub fn current() -> ReactorHandle {
    with_core(|c| ReactorHandle { shared: c.shared.clone() })
}

/// Every reactor of the current reactor's group, by index.
pub fn peers() -> Arc<[ReactorHandle]> {
    with_core(|c| c.peers.clone())
}

/// Registers a poller on the current reactor. `poll` returns whether it did work.
pub fn register_poller(phase: Phase, poll: impl FnMut() -> bool + 'static) -> PollerId {
    register(phase, Box::new(poll), None)
}

/// Registers a poller with a check the reactor runs before sleeping: if `pending`
/// returns true, the reactor stays awake (a mailbox with messages, say).
pub fn register_poller_with_pending(
    phase: Phase,
    poll: impl FnMut() -> bool + 'static,
    pending: impl Fn() -> bool + 'static,
) -> PollerId {
    register(phase, Box::new(poll), Some(Box::new(pending)))
}

fn register(phase: Phase, poll: PollFn, pending: Option<PendingFn>) -> PollerId {
    with_core(|c| {
        let mut pollers = c.pollers.borrow_mut();
        let slot = PollerSlot { phase, poll: Some(poll), pending, removed: false };
        if let Some(i) = pollers.iter().position(|p| p.removed && p.poll.is_none()) {
            pollers[i] = slot;
            PollerId(i)
        } else {
            pollers.push(slot);
            PollerId(pollers.len() - 1)
        }
    })
}

/// Unregisters a poller; safe to call from inside that poller.
pub fn unregister_poller(id: PollerId) {
    let _ = CORE.try_with(|c| {
        if let Some(core) = c.borrow().as_ref()
            && let Some(p) = core.pollers.borrow_mut().get_mut(id.0)
        {
            p.removed = true;
            p.poll = None;
            p.pending = None;
        }
    });
}

/// Adds a file descriptor (an eventfd) whose events wake the reactor from sleep. The
/// reactor does not read it; registering pollers reap the work it signals.
pub fn register_wakeup_fd(fd: RawFd) -> io::Result<()> {
    with_core(|c| c.fds.add_wakeup_fd(fd))
}

pub fn unregister_wakeup_fd(fd: RawFd) {
    let _ = CORE.try_with(|c| {
        if let Some(core) = c.borrow().as_ref() {
            core.fds.remove_wakeup_fd(fd);
        }
    });
}

/// The live boxed tasks on this reactor (for tests and shutdown checks).
pub fn boxed_task_count() -> usize {
    with_core(|c| c.executor.boxed_task_count())
}

impl Core {
    /// Socket readiness and wakeup fds. An epoll failure other than EINTR means a
    /// broken invariant (a closed epoll fd), so it panics with context.
    fn poll_fds(&self, timeout_ms: i32) -> usize {
        self.fds
            .poll(timeout_ms)
            .unwrap_or_else(|e| panic!("epoll_wait failed on reactor {}: {e}", self.shared.index))
    }
}
