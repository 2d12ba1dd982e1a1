//! The per-reactor executor for `!Send` tasks.
//!
//! Two kinds of task storage:
//! - [`TaskPool<F>`]: a fixed-capacity pool of one future type. Request handlers (an NBD
//!   request, a virtqueue descriptor chain) are spawned into a pool: spawning writes the
//!   future into a free slot, so the steady state allocates nothing. A pool grows in
//!   chunks up to its capacity the first time its in-flight count reaches a new high, and
//!   never shrinks; a full pool hands the future back (backpressure is a status). A
//!   growth is one allocation (the chunk), at most `capacity / 16` per pool, counted per
//!   thread ([`pool_growths`]) so a test of the steady state can tell it from an
//!   allocation per I/O: when a pool first sees a deeper burst is a matter of timing.
//! - [`spawn`]: a boxed future for long-lived tasks (a connection's reader loop, a
//!   control operation). One allocation per task, never per I/O.
//!
//! A waker is a packed [`TaskRef`] (reactor, pool, slot, generation) in the raw waker's
//! data word, so cloning and waking allocate nothing. Waking on the owning reactor pushes
//! onto its ready queue; waking from any other thread goes through that reactor's remote
//! wake ring and doorbell. A stale waker (its task finished, its slot reused) causes at
//! most a spurious poll, which the `Future` contract allows, because the generation check
//! filters most of them and a spurious poll is harmless for the rest.

use std::cell::{Cell, RefCell, UnsafeCell};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, RawWaker, RawWakerVTable, Waker};

use crate::reactor;

/// Slots per chunk of a [`TaskPool`].
const POOL_CHUNK_SLOTS: u32 = 16;

thread_local! {
    /// Chunks the task pools of this thread have grown by.
    static POOL_GROWTHS: Cell<u64> = const { Cell::new(0) };
}

/// How many chunks this thread's task pools have grown by (one allocation each).
pub fn pool_growths() -> u64 {
    POOL_GROWTHS.get()
}
const SLOT_BITS: u32 = 16;
const POOL_BITS: u32 = 16;
const GEN_BITS: u32 = 20;
const REACTOR_BITS: u32 = 12;
const _: () = assert!(SLOT_BITS + POOL_BITS + GEN_BITS + REACTOR_BITS == 64);

/// The most slots one pool may have.
pub const MAX_POOL_SLOTS: u32 = 1 << SLOT_BITS;
/// The most reactors a process may have alive at once.
pub const MAX_REACTORS: usize = 1 << REACTOR_BITS;

/// A task's identity, packed into 64 bits so a waker needs no allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TaskRef(u64);

impl TaskRef {
    fn new(reactor: usize, pool: u32, slot: u32, generation: u32) -> Self {
        debug_assert!(reactor < MAX_REACTORS && pool < (1 << POOL_BITS) && slot < MAX_POOL_SLOTS);
        let g = u64::from(generation & ((1 << GEN_BITS) - 1));
        TaskRef(
            (reactor as u64) << (POOL_BITS + SLOT_BITS + GEN_BITS)
                | u64::from(pool) << (SLOT_BITS + GEN_BITS)
                | u64::from(slot) << GEN_BITS
                | g,
        )
    }
    pub(crate) fn reactor(self) -> usize {
        (self.0 >> (POOL_BITS + SLOT_BITS + GEN_BITS)) as usize
    }
    fn pool(self) -> u32 {
        ((self.0 >> (SLOT_BITS + GEN_BITS)) & ((1 << POOL_BITS) - 1)) as u32
    }
    fn slot(self) -> u32 {
        ((self.0 >> GEN_BITS) & ((1 << SLOT_BITS) - 1)) as u32
    }
    fn generation(self) -> u32 {
        (self.0 & ((1 << GEN_BITS) - 1)) as u32
    }
    pub(crate) fn raw(self) -> u64 {
        self.0
    }
    pub(crate) fn from_raw(v: u64) -> Self {
        TaskRef(v)
    }
}

static VTABLE: RawWakerVTable = RawWakerVTable::new(clone_raw, wake_raw, wake_raw, drop_raw);

fn clone_raw(data: *const ()) -> RawWaker {
    RawWaker::new(data, &VTABLE)
}
fn wake_raw(data: *const ()) {
    reactor::wake_task(TaskRef(data as usize as u64));
}
fn drop_raw(_: *const ()) {}

const _: () = assert!(std::mem::size_of::<usize>() == 8, "task refs are packed into 64 bits");

pub(crate) fn waker_for(task: TaskRef) -> Waker {
    // SAFETY: the vtable functions treat the data word as a plain integer (a packed
    // TaskRef); they never dereference it, so any value is valid and thread-safe.
    unsafe { Waker::from_raw(RawWaker::new(task.0 as usize as *const (), &VTABLE)) }
}

/// Type-erased access to a pool, for the executor.
pub(crate) trait PoolDyn {
    /// Marks the slot queued; returns false when it already was (or is stale).
    fn mark_queued(&self, slot: u32, generation: u32) -> bool;
    /// Polls the task in `slot` if `generation` still names it.
    fn poll_slot(&self, task: TaskRef);
}

/// The executor's state on one reactor.
pub(crate) struct Executor {
    reactor: usize,
    ready: RefCell<VecDeque<TaskRef>>,
    pools: RefCell<Vec<Option<Rc<dyn PoolDyn>>>>,
    free_pool_ids: RefCell<Vec<u32>>,
    boxed: Rc<BoxedTasks>,
    boxed_pool_id: u32,
}

impl Executor {
    pub(crate) fn new(reactor: usize) -> Rc<Self> {
        let boxed = Rc::new(BoxedTasks {
            reactor,
            slots: RefCell::new(Vec::new()),
            free: RefCell::new(Vec::new()),
        });
        let exec = Rc::new(Executor {
            reactor,
            ready: RefCell::new(VecDeque::with_capacity(4096)),
            pools: RefCell::new(Vec::new()),
            free_pool_ids: RefCell::new(Vec::new()),
            boxed: boxed.clone(),
            boxed_pool_id: 0,
        });
        let id = exec.register_pool(boxed, 0);
        debug_assert_eq!(id, exec.boxed_pool_id);
        exec
    }

    pub(crate) fn register_pool(&self, pool: Rc<dyn PoolDyn>, capacity: u32) -> u32 {
        self.ready.borrow_mut().reserve(capacity as usize);
        let mut pools = self.pools.borrow_mut();
        let id = match self.free_pool_ids.borrow_mut().pop() {
            Some(id) => {
                pools[id as usize] = Some(pool);
                id
            }
            None => {
                pools.push(Some(pool));
                (pools.len() - 1) as u32
            }
        };
        assert!(id < (1 << POOL_BITS), "more than {} task pools on one reactor", 1 << POOL_BITS);
        id
    }

    pub(crate) fn unregister_pool(&self, id: u32) {
        if let Some(slot) = self.pools.borrow_mut().get_mut(id as usize) {
            *slot = None;
            self.free_pool_ids.borrow_mut().push(id);
        }
    }

    /// Queues a task of this reactor to be polled.
    pub(crate) fn schedule(&self, task: TaskRef) {
        debug_assert_eq!(task.reactor(), self.reactor);
        let pool = self.pools.borrow().get(task.pool() as usize).and_then(|p| p.clone());
        if let Some(pool) = pool
            && pool.mark_queued(task.slot(), task.generation())
        {
            self.ready.borrow_mut().push_back(task);
        }
    }

    /// Polls up to `budget` ready tasks; returns how many were polled.
    pub(crate) fn run_ready(&self, budget: usize) -> usize {
        let mut polled = 0;
        while polled < budget {
            let Some(task) = self.ready.borrow_mut().pop_front() else { break };
            let pool = self.pools.borrow().get(task.pool() as usize).and_then(|p| p.clone());
            if let Some(pool) = pool {
                pool.poll_slot(task);
            }
            polled += 1;
        }
        polled
    }

    pub(crate) fn has_ready(&self) -> bool {
        !self.ready.borrow().is_empty()
    }

    pub(crate) fn spawn_boxed(&self, fut: Pin<Box<dyn Future<Output = ()>>>) {
        let slot = self.boxed.insert(fut);
        let generation = self.boxed.generation(slot);
        self.schedule(TaskRef::new(self.reactor, self.boxed_pool_id, slot, generation));
    }

    pub(crate) fn boxed_task_count(&self) -> usize {
        self.boxed.live()
    }
}

/// Storage for boxed, long-lived tasks.
struct BoxedTasks {
    reactor: usize,
    slots: RefCell<Vec<BoxedSlot>>,
    free: RefCell<Vec<u32>>,
}

struct BoxedSlot {
    fut: Option<Pin<Box<dyn Future<Output = ()>>>>,
    generation: u32,
    queued: bool,
    /// The future is out of the slot being polled; wakes must still queue it.
    running: bool,
}

impl BoxedTasks {
    fn insert(&self, fut: Pin<Box<dyn Future<Output = ()>>>) -> u32 {
        let mut slots = self.slots.borrow_mut();
        match self.free.borrow_mut().pop() {
            Some(i) => {
                slots[i as usize].fut = Some(fut);
                i
            }
            None => {
                slots.push(BoxedSlot {
                    fut: Some(fut),
                    generation: 0,
                    queued: false,
                    running: false,
                });
                assert!(slots.len() <= MAX_POOL_SLOTS as usize, "too many boxed tasks");
                (slots.len() - 1) as u32
            }
        }
    }
    fn generation(&self, slot: u32) -> u32 {
        self.slots.borrow()[slot as usize].generation
    }
    fn live(&self) -> usize {
        self.slots.borrow().iter().filter(|s| s.fut.is_some()).count()
    }
}

impl PoolDyn for BoxedTasks {
    fn mark_queued(&self, slot: u32, generation: u32) -> bool {
        let mut slots = self.slots.borrow_mut();
        match slots.get_mut(slot as usize) {
            Some(s)
                if (s.fut.is_some() || s.running)
                    && gen_eq(s.generation, generation)
                    && !s.queued =>
            {
                s.queued = true;
                true
            }
            _ => false,
        }
    }

    fn poll_slot(&self, task: TaskRef) {
        let slot = task.slot() as usize;
        // Take the future out so the task may spawn other tasks while it runs.
        let (mut fut, generation) = {
            let mut slots = self.slots.borrow_mut();
            let Some(s) = slots.get_mut(slot) else { return };
            if !gen_eq(s.generation, task.generation()) {
                return;
            }
            s.queued = false;
            match s.fut.take() {
                Some(f) => {
                    s.running = true;
                    (f, s.generation)
                }
                None => return,
            }
        };
        let waker = waker_for(TaskRef::new(self.reactor, task.pool(), task.slot(), generation));
        let mut cx = Context::from_waker(&waker);
        let done = fut.as_mut().poll(&mut cx).is_ready();
        let mut slots = self.slots.borrow_mut();
        slots[slot].running = false;
        if done {
            slots[slot].generation = slots[slot].generation.wrapping_add(1);
            slots[slot].queued = false;
            drop(slots);
            drop(fut);
            self.free.borrow_mut().push(slot as u32);
        } else {
            slots[slot].fut = Some(fut);
        }
    }
}

fn gen_eq(a: u32, b: u32) -> bool {
    (a & ((1 << GEN_BITS) - 1)) == (b & ((1 << GEN_BITS) - 1))
}

/// A fixed-capacity pool of tasks of one future type, owned by one reactor.
///
/// Dropping the pool drops every task still in it; owners drain their tasks first.
pub struct TaskPool<F: Future<Output = ()> + 'static> {
    inner: Rc<PoolInner<F>>,
}

struct PoolInner<F> {
    id: Cell<u32>,
    reactor: usize,
    capacity: u32,
    chunks: RefCell<Vec<Box<[Slot<F>]>>>,
    free: RefCell<Vec<u32>>,
    live: Cell<u32>,
    /// Woken whenever a task finishes, for owners waiting to drain or for space.
    on_finish: RefCell<Option<Waker>>,
}

struct Slot<F> {
    fut: UnsafeCell<Option<F>>,
    generation: Cell<u32>,
    queued: Cell<bool>,
    running: Cell<bool>,
}

impl<F: Future<Output = ()> + 'static> TaskPool<F> {
    /// Creates a pool on the current reactor. Panics when not on a reactor thread.
    pub fn new(capacity: u32) -> Self {
        assert!(capacity > 0 && capacity <= MAX_POOL_SLOTS, "pool capacity {capacity}");
        let exec = reactor::executor();
        let inner = Rc::new(PoolInner {
            id: Cell::new(u32::MAX),
            reactor: exec.reactor,
            capacity,
            // Room for every chunk, so a growth is the chunk's allocation alone.
            chunks: RefCell::new(Vec::with_capacity(capacity.div_ceil(POOL_CHUNK_SLOTS) as usize)),
            free: RefCell::new(Vec::with_capacity(capacity as usize)),
            live: Cell::new(0),
            on_finish: RefCell::new(None),
        });
        let id = exec.register_pool(inner.clone(), capacity);
        inner.id.set(id);
        TaskPool { inner }
    }

    /// Spawns `fut`, or hands it back when every slot is busy.
    pub fn spawn(&self, fut: F) -> Result<(), F> {
        let Some(index) = self.free_slot() else { return Err(fut) };
        let slot = self.inner.slot(index);
        // SAFETY: the slot is free (it came off the free list), so no task runs in it and
        // nothing else holds a reference to its future.
        unsafe { *slot.fut.get() = Some(fut) };
        self.start(index);
        Ok(())
    }

    /// Spawns the future `make` returns, made straight into a free slot; false (and
    /// `make` not called) when every slot is busy.
    ///
    /// For large futures: passing one by value copies all of it, however little of its
    /// state is initialised yet (an `async fn` future starts with only its arguments
    /// set), and a request future that can reach rare deep paths (metadata writeback)
    /// runs to tens of KiB, a copy per request that cost a qcow2 reactor 14 % of its
    /// time. Made in place, only the arguments are written.
    pub fn spawn_with(&self, make: impl FnOnce() -> F) -> bool {
        let Some(index) = self.free_slot() else { return false };
        let slot = self.inner.slot(index);
        // SAFETY: as in `spawn`. The slot holds `None` (a free slot's future was dropped
        // when its task finished), so writing over it without dropping leaks nothing.
        unsafe {
            let p = slot.fut.get();
            debug_assert!((*p).is_none());
            std::ptr::write(p, Some(make()));
        }
        self.start(index);
        true
    }

    /// Takes a free slot, growing the pool up to its capacity.
    fn free_slot(&self) -> Option<u32> {
        let inner = &self.inner;
        let popped = inner.free.borrow_mut().pop();
        match popped {
            Some(i) => Some(i),
            None if inner.grow() => {
                Some(inner.free.borrow_mut().pop().expect("grow added free slots"))
            }
            None => None,
        }
    }

    /// Schedules the task just put in slot `index`.
    fn start(&self, index: u32) {
        let inner = &self.inner;
        let slot = inner.slot(index);
        inner.live.set(inner.live.get() + 1);
        reactor::executor().schedule(TaskRef::new(
            inner.reactor,
            inner.id.get(),
            index,
            slot.generation.get(),
        ));
    }

    /// Tasks currently in the pool.
    pub fn live(&self) -> u32 {
        self.inner.live.get()
    }

    pub fn capacity(&self) -> u32 {
        self.inner.capacity
    }

    pub fn is_full(&self) -> bool {
        self.inner.live.get() >= self.inner.capacity
    }

    /// Waits until a task finishes (or returns at once if the pool is empty).
    pub async fn finished(&self) {
        let mut first = true;
        std::future::poll_fn(|cx| {
            if self.inner.live.get() == 0 || !first {
                return Poll::Ready(());
            }
            first = false;
            *self.inner.on_finish.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// Waits until every task in the pool has finished.
    pub async fn drain(&self) {
        while self.inner.live.get() > 0 {
            self.finished().await;
        }
    }
}

impl<F: Future<Output = ()> + 'static> Drop for TaskPool<F> {
    fn drop(&mut self) {
        if let Some(exec) = reactor::try_executor() {
            exec.unregister_pool(self.inner.id.get());
        }
    }
}

impl<F> PoolInner<F> {
    fn slot(&self, index: u32) -> &Slot<F> {
        let chunks = self.chunks.borrow();
        let chunk = &chunks[(index / POOL_CHUNK_SLOTS) as usize];
        let ptr: *const Slot<F> = &chunk[(index % POOL_CHUNK_SLOTS) as usize];
        // SAFETY: chunks are boxed slices that are never freed or moved while the pool
        // lives (growing the Vec moves the boxes, not their contents), so the slot
        // outlives this borrow of `self`.
        unsafe { &*ptr }
    }

    fn grow(&self) -> bool {
        let mut chunks = self.chunks.borrow_mut();
        let have = chunks.len() as u32 * POOL_CHUNK_SLOTS;
        if have >= self.capacity {
            return false;
        }
        let n = POOL_CHUNK_SLOTS.min(self.capacity - have);
        let chunk: Box<[Slot<F>]> = (0..n)
            .map(|_| Slot {
                fut: UnsafeCell::new(None),
                generation: Cell::new(0),
                queued: Cell::new(false),
                running: Cell::new(false),
            })
            .collect();
        debug_assert!(chunks.len() < chunks.capacity(), "the chunk list was sized at creation");
        chunks.push(chunk);
        POOL_GROWTHS.set(POOL_GROWTHS.get() + 1);
        let mut free = self.free.borrow_mut();
        for i in (have..have + n).rev() {
            free.push(i);
        }
        true
    }

    fn exists(&self, index: u32) -> bool {
        index < self.chunks.borrow().len() as u32 * POOL_CHUNK_SLOTS
    }
}

impl<F: Future<Output = ()> + 'static> PoolDyn for PoolInner<F> {
    fn mark_queued(&self, index: u32, generation: u32) -> bool {
        if !self.exists(index) {
            return false;
        }
        let slot = self.slot(index);
        if !gen_eq(slot.generation.get(), generation) || slot.queued.get() {
            return false;
        }
        slot.queued.set(true);
        true
    }

    fn poll_slot(&self, task: TaskRef) {
        let index = task.slot();
        if !self.exists(index) {
            return;
        }
        let slot = self.slot(index);
        if !gen_eq(slot.generation.get(), task.generation()) || slot.running.get() {
            return;
        }
        slot.queued.set(false);
        // SAFETY: only this function touches a live slot's future, it is not re-entered
        // for the same slot (`running`), and the future is never moved while it is in the
        // slot: the chunk's memory is stable for the pool's life.
        let fut = unsafe { &mut *slot.fut.get() };
        let Some(f) = fut.as_mut() else { return };
        slot.running.set(true);
        let waker = waker_for(task);
        let mut cx = Context::from_waker(&waker);
        // SAFETY: see above; the future stays pinned in place until it is dropped here.
        let done = unsafe { Pin::new_unchecked(f) }.poll(&mut cx).is_ready();
        slot.running.set(false);
        if done {
            *fut = None;
            slot.generation.set(slot.generation.get().wrapping_add(1));
            self.free.borrow_mut().push(index);
            self.live.set(self.live.get() - 1);
            if let Some(w) = self.on_finish.borrow_mut().take() {
                w.wake();
            }
        }
    }
}

impl<F> Drop for PoolInner<F> {
    fn drop(&mut self) {
        debug_assert!(
            self.chunks.borrow().iter().flat_map(|c| c.iter()).all(|s| !s.running.get()),
            "task pool dropped while one of its tasks runs"
        );
    }
}

/// Spawns a long-lived boxed task on the current reactor.
pub fn spawn(fut: impl Future<Output = ()> + 'static) {
    reactor::executor().spawn_boxed(Box::pin(fut));
}

/// Yields once to let other tasks and pollers run.
pub async fn yield_now() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    })
    .await
}

/// A list of waiting tasks on one reactor: the building block for backpressure (wait for
/// a buffer, a slot, ring space) and simple events.
#[derive(Default)]
pub struct WaitList {
    waiters: RefCell<VecDeque<Waker>>,
}

impl WaitList {
    pub fn new() -> Self {
        WaitList { waiters: RefCell::new(VecDeque::with_capacity(64)) }
    }

    /// Registers the current task; it is woken by the next `wake_*` call.
    pub fn register(&self, waker: &Waker) {
        let mut w = self.waiters.borrow_mut();
        if !w.iter().any(|x| x.will_wake(waker)) {
            w.push_back(waker.clone());
        }
    }

    /// Waits until the next `wake_*` call.
    pub async fn wait(&self) {
        let mut registered = false;
        std::future::poll_fn(|cx| {
            if registered {
                Poll::Ready(())
            } else {
                registered = true;
                self.register(cx.waker());
                Poll::Pending
            }
        })
        .await
    }

    pub fn wake_one(&self) {
        let w = self.waiters.borrow_mut().pop_front();
        if let Some(w) = w {
            w.wake();
        }
    }

    pub fn wake_all(&self) {
        loop {
            let w = self.waiters.borrow_mut().pop_front();
            match w {
                Some(w) => w.wake(),
                None => break,
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.waiters.borrow().is_empty()
    }
}

/// A one-shot, single-reactor completion cell: one side sets a value, the other awaits it.
pub struct LocalOneshot<T> {
    value: RefCell<Option<T>>,
    waker: RefCell<Option<Waker>>,
}

impl<T> Default for LocalOneshot<T> {
    fn default() -> Self {
        LocalOneshot { value: RefCell::new(None), waker: RefCell::new(None) }
    }
}

impl<T> LocalOneshot<T> {
    pub fn set(&self, v: T) {
        *self.value.borrow_mut() = Some(v);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    pub async fn wait(&self) -> T {
        std::future::poll_fn(|cx| match self.value.borrow_mut().take() {
            Some(v) => Poll::Ready(v),
            None => {
                *self.waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }
}
