//! The data path of a vhost-user-blk virtqueue, on the reactor that owns it.
//!
//! Two pollers per queue: an `Early` one takes requests from the available ring and
//! spawns a task per request into a fixed pool (one slot per descriptor); a `Late` one
//! puts completed requests into the used ring and signals the guest once per tick, if
//! the guest wants to be signalled (EVENT_IDX suppression). While requests keep
//! coming, guest notifications stay disabled: the reactor polls the ring in guest
//! memory and the guest never exits to kick. Before an adaptive reactor sleeps it
//! re-enables them (the queue's "pending" check); if entries arrived meanwhile it stays
//! awake, otherwise the kick eventfd, registered as a wakeup descriptor, wakes it.
//!
//! Requests read and write guest memory in place: the segments handed to the block
//! device point into the guest's shared RAM (the alignment layer bounces only buffers
//! that break the disk's O_DIRECT alignment).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use drivers::{Bdev, BdevChannel, IoError, ZeroFlags};
use poller::{Phase, PollerId, TaskPool};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::blk::{self, BlkReq, ChainError};
use super::inflight::{InflightQueue, InflightRegion};

/// Everything a reactor needs to run a queue.
pub struct QueueStart {
    pub device: u64,
    pub index: u16,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub next_avail: u16,
    pub mem: Arc<GuestMemoryMmap>,
    pub kick: Option<File>,
    pub call: Option<Arc<File>>,
    pub event_idx: bool,
    pub indirect: bool,
    pub bdev: Arc<Bdev>,
    pub inflight: Option<Arc<InflightRegion>>,
    pub serial: [u8; blk::ID_BYTES],
}

struct Runner {
    queue: RefCell<Queue>,
    mem: Arc<GuestMemoryMmap>,
    desc_table: blk::DescTable,
    indirect: bool,
    call: RefCell<Option<Arc<File>>>,
    kick: Option<File>,
    ch: Rc<BdevChannel>,
    completions: RefCell<Vec<(u16, u32)>>,
    in_flight: Cell<u32>,
    stopping: Cell<bool>,
    inflight: Option<(Arc<InflightRegion>, InflightQueue)>,
    counter: Cell<u64>,
    resubmit: RefCell<VecDeque<u16>>,
    notifications_on: Cell<bool>,
    serial: [u8; blk::ID_BYTES],
    broken: Cell<bool>,
    stats: Option<Rc<crate::metrics::LocalStats>>,
}

struct Entry {
    runner: Rc<Runner>,
    pollers: [PollerId; 2],
}

thread_local! {
    static RUNNERS: RefCell<HashMap<(u64, u16), Entry>> = RefCell::new(HashMap::new());
}

impl Runner {
    fn signal(&self) {
        if let Some(call) = self.call.borrow().as_ref() {
            let _ = (&**call).write(&1u64.to_ne_bytes());
        }
    }

    fn mark_broken(&self, why: &str) {
        if !self.broken.replace(true) {
            tracing::error!("vhost-user-blk queue stopped: {why}");
        }
    }

    fn take_request(&self, head: u16) -> Option<BlkReq> {
        match blk::parse(&self.mem, &self.desc_table, head, self.indirect) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(head, "bad virtio-blk descriptor chain: {e:?}");
                // Nothing in it can be trusted to carry a status: complete it empty.
                let _ = e == ChainError::Malformed;
                self.completions.borrow_mut().push((head, 0));
                None
            }
        }
    }

    /// Takes available requests into the pool. Returns whether it found work.
    fn pop<F>(self: &Rc<Self>, pool: &TaskPool<F>, make: &impl Fn(Rc<Runner>, BlkReq) -> F) -> bool
    where
        F: std::future::Future<Output = ()> + 'static,
    {
        if self.stopping.get() || self.broken.get() {
            return false;
        }
        let mut work = false;
        loop {
            if pool.is_full() {
                break;
            }
            let resubmitted = self.resubmit.borrow_mut().pop_front();
            let head = match resubmitted {
                Some(h) => h,
                None => {
                    let next = {
                        let mut q = self.queue.borrow_mut();
                        q.pop_descriptor_chain(&*self.mem).map(|c| c.head_index())
                    };
                    let Some(h) = next else { break };
                    if let Some((_, iq)) = &self.inflight {
                        let c = self.counter.get();
                        self.counter.set(c + 1);
                        iq.get(h, c);
                    }
                    h
                }
            };
            work = true;
            if self.notifications_on.replace(false) {
                let _ = self.queue.borrow_mut().disable_notification(&*self.mem);
            }
            if let Some(req) = self.take_request(head) {
                self.in_flight.set(self.in_flight.get() + 1);
                if !pool.spawn_with(|| make(self.clone(), req)) {
                    unreachable!("the pool had room");
                }
            }
        }
        work
    }

    /// Puts completions into the used ring and signals the guest if it asks.
    fn complete(&self) -> bool {
        let mut done = self.completions.borrow_mut();
        if done.is_empty() {
            return false;
        }
        let mut q = self.queue.borrow_mut();
        for &(head, len) in done.iter() {
            if let Some((_, iq)) = &self.inflight {
                iq.pre_put(head);
            }
            if let Err(e) = q.add_used(&*self.mem, head, len) {
                drop(q);
                done.clear();
                self.mark_broken(&format!("used ring: {e}"));
                return true;
            }
            if let Some((_, iq)) = &self.inflight {
                iq.post_put(head, q.next_used());
            }
        }
        done.clear();
        let notify = q.needs_notification(&*self.mem).unwrap_or(true);
        drop(q);
        if notify {
            self.signal();
        }
        true
    }

    /// Before the reactor sleeps: true if it must stay awake.
    fn pending(&self) -> bool {
        if !self.completions.borrow().is_empty() {
            return true;
        }
        if self.stopping.get() || self.broken.get() {
            return false;
        }
        if !self.resubmit.borrow().is_empty() {
            return true;
        }
        self.notifications_on.set(true);
        self.queue.borrow_mut().enable_notification(&*self.mem).unwrap_or(false)
    }
}

/// The one place a device error becomes a virtio-blk status.
fn status_of(r: Result<(), IoError>) -> u8 {
    match r {
        Ok(()) => blk::S_OK,
        Err(IoError::NotSupported) => blk::S_UNSUPP,
        Err(_) => blk::S_IOERR,
    }
}

/// Runs one request; returns its status and the bytes written into the guest's
/// buffers (before the status byte). Ranges, read-only and sizes are checked by the
/// device's shared validation step (`DeviceInfo::admit`); what is checked here is
/// virtio-blk's own framing: sector-multiple data lengths and the discard/write-zeroes
/// range descriptors.
pub(crate) async fn execute(
    ch: &BdevChannel,
    serial: &[u8; blk::ID_BYTES],
    req: &BlkReq,
) -> (u8, u32) {
    let off = req.sector.checked_mul(512);
    match req.kind {
        blk::T_IN => {
            let len = drivers::seg::total_len(req.data_in());
            let Some(off) = off.filter(|_| len.is_multiple_of(512)) else {
                return (blk::S_IOERR, 0);
            };
            match ch.read(off, req.data_in()).await {
                Ok(()) => (blk::S_OK, len as u32),
                Err(e) => (status_of(Err(e)), 0),
            }
        }
        blk::T_OUT => {
            let len = drivers::seg::total_len(req.data_out());
            let Some(off) = off.filter(|_| len.is_multiple_of(512)) else {
                return (blk::S_IOERR, 0);
            };
            (status_of(ch.write(off, req.data_out(), false).await), 0)
        }
        blk::T_FLUSH => (status_of(ch.flush().await), 0),
        blk::T_GET_ID => {
            // As QEMU: as much of the 20-byte serial as the buffer holds.
            let n = blk::write_to_segs(req.data_in(), serial);
            (blk::S_OK, n as u32)
        }
        blk::T_DISCARD | blk::T_WRITE_ZEROES => (ranges(ch, req).await, 0),
        _ => (blk::S_UNSUPP, 0),
    }
}

/// Discard and write-zeroes: a list of 16-byte range descriptors (sector, sectors,
/// flags), each validated before the device sees it.
async fn ranges(ch: &BdevChannel, req: &BlkReq) -> u8 {
    let total = drivers::seg::total_len(req.data_out());
    let n = total / 16;
    if !total.is_multiple_of(16) || n == 0 || n > blk::MAX_DISCARD_SEG as usize {
        return blk::S_UNSUPP;
    }
    for i in 0..n {
        let mut range = [0u8; 16];
        if !blk::read_from_segs(req.data_out(), i * 16, &mut range) {
            return blk::S_IOERR;
        }
        let sector = u64::from_le_bytes(range[0..8].try_into().expect("8"));
        let sectors = u32::from_le_bytes(range[8..12].try_into().expect("4"));
        let flags = u32::from_le_bytes(range[12..16].try_into().expect("4"));
        let unmap = flags & 1 != 0;
        if sectors > blk::MAX_DISCARD_SECTORS
            || flags & !1 != 0
            || (unmap && req.kind == blk::T_DISCARD)
        {
            return blk::S_UNSUPP;
        }
        let Some(off) = sector.checked_mul(512) else { return blk::S_IOERR };
        let len = u64::from(sectors) * 512;
        let res = if req.kind == blk::T_DISCARD {
            ch.discard(off, len).await
        } else {
            let flags = ZeroFlags { may_unmap: unmap, fast_only: false, fua: false };
            ch.write_zeroes(off, len, flags).await
        };
        if res.is_err() {
            return status_of(res);
        }
    }
    blk::S_OK
}

async fn serve(r: Rc<Runner>, req: BlkReq) {
    let len = drivers::seg::total_len(req.data_in()) + drivers::seg::total_len(req.data_out());
    crate::debug::before_request(req.sector.saturating_mul(512), len as u64).await;
    let started = r.stats.as_ref().map(|s| s.start());
    let (status, written) = execute(&r.ch, &r.serial, &req).await;
    if let (Some(s), Some(t)) = (&r.stats, started) {
        use crate::metrics::Op;
        let op = match req.kind {
            blk::T_IN => Op::Read,
            blk::T_OUT => Op::Write,
            blk::T_FLUSH => Op::Flush,
            blk::T_DISCARD => Op::Discard,
            blk::T_WRITE_ZEROES => Op::WriteZeroes,
            _ => Op::Other,
        };
        let bytes = match req.kind {
            blk::T_IN => drivers::seg::total_len(req.data_in()) as u64,
            blk::T_OUT => drivers::seg::total_len(req.data_out()) as u64,
            _ => 0,
        };
        s.done(op, bytes, status == blk::S_OK, t);
    }
    // SAFETY: the status byte is a device-writable byte of the request's chain, inside
    // mapped guest memory that outlives the queue.
    unsafe { req.status.write_volatile(status) };
    r.completions.borrow_mut().push((req.head, written + 1));
    r.in_flight.set(r.in_flight.get() - 1);
}

/// Starts a queue on the current reactor.
pub fn start(s: QueueStart) -> Result<(), String> {
    let mut q = Queue::new(s.size).map_err(|e| format!("queue size {}: {e}", s.size))?;
    q.set_size(s.size);
    q.set_desc_table_address(Some(s.desc as u32), Some((s.desc >> 32) as u32));
    q.set_avail_ring_address(Some(s.avail as u32), Some((s.avail >> 32) as u32));
    q.set_used_ring_address(Some(s.used as u32), Some((s.used >> 32) as u32));
    q.set_event_idx(s.event_idx);
    q.set_ready(true);
    if !q.is_valid(&*s.mem) {
        return Err(format!("queue {}: rings outside guest memory or misaligned", s.index));
    }
    let used_idx =
        q.used_idx(&*s.mem, std::sync::atomic::Ordering::Acquire).map_err(|e| e.to_string())?;
    q.set_next_used(used_idx.0);
    let mut resubmit = VecDeque::new();
    let mut counter = 0;
    let inflight = match &s.inflight {
        Some(region) => {
            let iq = region.queue(s.index).ok_or("queue beyond the inflight region")?;
            let (heads, next) = iq.recover(used_idx.0);
            // Entries still in flight were popped after everything used: resume after them.
            q.set_next_avail(used_idx.0.wrapping_add(heads.len() as u16));
            tracing::info!(
                queue = s.index,
                used = used_idx.0,
                avail_base = s.next_avail,
                resubmitted = heads.len(),
                "virtqueue started with inflight tracking"
            );
            resubmit.extend(heads);
            counter = next;
            Some((region.clone(), iq))
        }
        None => {
            q.set_next_avail(s.next_avail);
            None
        }
    };
    let ch = crate::nbd::channel_for(&s.bdev).map_err(|e| e.to_string())?;
    if let Some(k) = &s.kick {
        poller::register_wakeup_fd(k.as_raw_fd()).map_err(|e| e.to_string())?;
    }
    let desc_table = blk::DescTable::new(&s.mem, s.desc, u32::from(s.size));
    let runner = Rc::new(Runner {
        queue: RefCell::new(q),
        mem: s.mem,
        desc_table,
        indirect: s.indirect,
        call: RefCell::new(s.call),
        kick: s.kick,
        ch,
        completions: RefCell::new(Vec::with_capacity(usize::from(s.size))),
        in_flight: Cell::new(0),
        stopping: Cell::new(false),
        inflight,
        counter: Cell::new(counter),
        resubmit: RefCell::new(resubmit),
        notifications_on: Cell::new(true),
        serial: s.serial,
        broken: Cell::new(false),
        stats: crate::metrics::local_stats(s.bdev.name(), "vhost-user-blk"),
    });
    let pool = TaskPool::new(u32::from(s.size));
    let (r1, r2, r3) = (runner.clone(), runner.clone(), runner.clone());
    let early = poller::register_poller_with_pending(
        Phase::Early,
        move || r1.pop(&pool, &|r, req| serve(r, req)),
        move || r3.pending(),
    );
    let late = poller::register_poller(Phase::Late, move || r2.complete());
    RUNNERS.with(|m| {
        m.borrow_mut().insert((s.device, s.index), Entry { runner, pollers: [early, late] })
    });
    Ok(())
}

/// Stops a queue after its requests in flight complete; returns the next available
/// index (for GET_VRING_BASE).
pub async fn stop(device: u64, index: u16) -> Option<u16> {
    let runner = RUNNERS.with(|m| m.borrow().get(&(device, index)).map(|e| e.runner.clone()))?;
    runner.stopping.set(true);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while runner.in_flight.get() > 0 || !runner.completions.borrow().is_empty() {
        if std::time::Instant::now() > deadline {
            tracing::error!(queue = index, "requests still in flight after 60 s; stopping anyway");
            break;
        }
        poller::sleep(Duration::from_micros(200)).await;
    }
    let entry = RUNNERS.with(|m| m.borrow_mut().remove(&(device, index)))?;
    for p in entry.pollers {
        poller::unregister_poller(p);
    }
    if let Some(k) = &entry.runner.kick {
        poller::unregister_wakeup_fd(k.as_raw_fd());
    }
    let next = entry.runner.queue.borrow().next_avail();
    // Resubmissions not yet taken are still in flight in the region; the next start
    // finds them again.
    Some(next)
}

/// Replaces a running queue's call eventfd.
pub fn set_call(device: u64, index: u16, call: Option<Arc<File>>) {
    RUNNERS.with(|m| {
        if let Some(e) = m.borrow().get(&(device, index)) {
            *e.runner.call.borrow_mut() = call;
        }
    });
}
