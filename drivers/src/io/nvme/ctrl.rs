//! An NVMe controller driven from userspace over VFIO: registers in BAR0, the admin
//! queue, Identify, and I/O queue pairs created for the reactors ([`super::queue`]).
//!
//! The admin queue is the control plane's: commands go one at a time under a mutex and
//! their completions are polled (no interrupts are set up at all). Start-up follows the
//! specification's initialisation: disable the controller and wait for CSTS.RDY to
//! clear, program the admin queues (AQA, ASQ, ACQ), enable with 64-byte submission and
//! 16-byte completion entries and 4 KiB memory pages, wait for RDY within CAP.TO,
//! Identify the controller and the namespace, and ask for I/O queues (Set Features,
//! Number of Queues). Dropping the controller shuts it down normally (CC.SHN) and
//! disables it, so the kernel's driver finds it in a usable state when it is bound back.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::identify::{self, NsError, NsInfo};
use super::vfio::Vfio;

const CAP: usize = 0x00;
const CC: usize = 0x14;
const CSTS: usize = 0x1c;
const AQA: usize = 0x24;
const ASQ: usize = 0x28;
const ACQ: usize = 0x30;
const CC_EN: u32 = 1;
/// IOSQES = 6 (64 bytes), IOCQES = 4 (16 bytes).
const CC_ENTRY_SIZES: u32 = (6 << 16) | (4 << 20);
const CC_SHN_NORMAL: u32 = 1 << 14;
const CSTS_RDY: u32 = 1;
const CSTS_CFS: u32 = 1 << 1;
const CSTS_SHST_MASK: u32 = 3 << 2;
const CSTS_SHST_DONE: u32 = 2 << 2;
/// Admin queue entries (one page of submission entries).
const ADMIN_DEPTH: u16 = 64;
/// Admin opcodes.
const DELETE_SQ: u8 = 0x00;
const CREATE_SQ: u8 = 0x01;
const DELETE_CQ: u8 = 0x04;
const CREATE_CQ: u8 = 0x05;
const SET_FEATURES: u8 = 0x09;
const FEAT_NUM_QUEUES: u32 = 0x07;
/// How long an admin command may take.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);

/// One submission queue entry.
pub(crate) type Sqe = [u32; 16];

/// A submission entry for `opcode` on namespace `nsid` (the command ID is set when
/// queued).
pub(crate) fn sqe(opcode: u8, nsid: u32) -> Sqe {
    let mut e = [0u32; 16];
    e[0] = u32::from(opcode);
    e[1] = nsid;
    e
}

/// The status of a completion entry's DW3, in the layout of [`super::status`].
pub(crate) fn cqe_status(dw3: u32) -> i64 {
    i64::from((dw3 >> 17) & 0x7fff)
}

/// A queue whose commands run one at a time, polled: the admin queue, and the I/O
/// queue of the control plane's synchronous reads and writes.
struct PolledQueue {
    qid: u16,
    /// Four pages: submission queue, completion queue, a data (or PRP list) page, spare.
    mem: *mut u8,
    iova: u64,
    tail: u16,
    head: u16,
    phase: bool,
    cid: u16,
}

// SAFETY: the queue's memory is only touched under the controller's mutex.
unsafe impl Send for PolledQueue {}

impl PolledQueue {
    /// Back to empty, for a controller that was reset: head and tail at 0, phase 1,
    /// the completion page cleared.
    fn restart(&mut self) {
        (self.tail, self.head, self.phase) = (0, 0, true);
        // SAFETY: the completion page of this queue's memory, not in the device's use
        // while the controller is disabled.
        unsafe { std::ptr::write_bytes(self.mem.add(4096), 0, 4096) };
    }
}

/// The control plane's I/O queue and its bounce buffer.
struct SyncIo {
    q: PolledQueue,
    bounce: *mut u8,
    bounce_iova: u64,
}

// SAFETY: as for PolledQueue.
unsafe impl Send for SyncIo {}

/// Bytes per synchronous command (the bounce buffer).
const SYNC_BYTES: usize = 128 << 10;

/// An anonymous, page-aligned mapping of `len` bytes, mapped for the device.
fn dma_pages(vfio: &Vfio, len: usize) -> std::io::Result<(*mut u8, u64)> {
    // SAFETY: a fresh anonymous mapping, owned by the controller until drop.
    let mem = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if mem == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok((mem.cast(), vfio.map(mem as usize, len)?))
}

/// An enabled controller and the namespace it serves.
pub(crate) struct Controller {
    vfio: Vfio,
    regs: *mut u8,
    /// Doorbell stride in bytes.
    stride: usize,
    /// Largest I/O queue (entries).
    pub max_entries: u16,
    admin: Mutex<PolledQueue>,
    sync_io: Mutex<Option<SyncIo>>,
    pub info: NsInfo,
    /// Free I/O queue IDs.
    qids: Mutex<Vec<u16>>,
    /// DMA regions mapped for the reactors: (start, length, IOVA).
    regions: Mutex<Vec<(usize, usize, u64)>>,
    /// CAP.TO: how long enabling or disabling may take.
    timeout: Duration,
    epoch: AtomicU32,
    resetting: Mutex<()>,
}

// SAFETY: registers are accessed with volatile operations; the admin queue is behind a
// mutex; each I/O queue's doorbells are written only by the reactor owning it.
unsafe impl Send for Controller {}
// SAFETY: as above.
unsafe impl Sync for Controller {}

fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}

impl Controller {
    /// Resets and enables the controller of `vfio`, identifies namespace `nsid` and
    /// reserves I/O queues.
    pub(crate) fn start(vfio: Vfio, nsid: u32) -> std::io::Result<Result<Controller, NsError>> {
        let (regs, len) = vfio.bar0();
        assert!(len >= 0x2000, "BAR0 checked when mapped");
        let (mem, iova) = dma_pages(&vfio, 4 * 4096)?;
        let admin = PolledQueue { qid: 0, mem, iova, tail: 0, head: 0, phase: true, cid: 0 };
        let mut c = Controller {
            vfio,
            regs,
            stride: 4,
            max_entries: 2,
            admin: Mutex::new(admin),
            sync_io: Mutex::new(None),
            info: NsInfo {
                nsid,
                lba_shift: 9,
                blocks: 0,
                max_transfer: None,
                write_zeroes: false,
                dsm: false,
                dealloc_zeroes: false,
            },
            qids: Mutex::new(Vec::new()),
            regions: Mutex::new(Vec::new()),
            timeout: Duration::from_secs(1),
            epoch: AtomicU32::new(0),
            resetting: Mutex::new(()),
        };
        let cap = c.read64(CAP);
        c.stride = 4 << ((cap >> 32) & 0xf);
        c.max_entries = ((cap & 0xffff) as u16).saturating_add(1).max(2);
        if (cap >> 48) & 0xf != 0 {
            return Err(std::io::Error::other(
                "the controller's smallest memory page is above 4 KiB",
            ));
        }
        c.timeout = Duration::from_millis(500 * ((cap >> 24) & 0xff).max(1));
        c.enable(c.timeout)?;
        match c.identify(nsid)? {
            Ok(info) => c.info = info,
            Err(e) => return Ok(Err(e)),
        }
        let res = c.admin_cmd({
            let mut e = sqe(SET_FEATURES, 0);
            e[10] = FEAT_NUM_QUEUES;
            e[11] = (63 << 16) | 63;
            e
        })?;
        let queues = ((res & 0xffff).min(res >> 16) + 1).min(64) as u16;
        *c.qids.lock().unwrap_or_else(|e| e.into_inner()) = (1..=queues).rev().collect();
        c.start_sync_io()?;
        Ok(Ok(c))
    }

    /// Creates the control plane's I/O queue (the first I/O queue ID).
    fn start_sync_io(&self) -> std::io::Result<()> {
        let (mem, iova) = dma_pages(&self.vfio, 4 * 4096)?;
        let (bounce, bounce_iova) = dma_pages(&self.vfio, SYNC_BYTES)?;
        let qid = self
            .create_polled_queue(iova)?
            .ok_or_else(|| std::io::Error::other("the controller has no I/O queue"))?;
        let q = PolledQueue { qid, mem, iova, tail: 0, head: 0, phase: true, cid: 0 };
        *self.sync_io.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(SyncIo { q, bounce, bounce_iova });
        Ok(())
    }

    fn create_polled_queue(&self, iova: u64) -> std::io::Result<Option<u16>> {
        self.create_queue(ADMIN_DEPTH, iova, iova + 4096)
    }

    /// A synchronous READ or WRITE of `len` bytes at byte `off` (whole blocks) from or
    /// into `buf`, through the bounce buffer, for the control plane.
    pub(crate) fn io_sync(
        &self,
        write: bool,
        buf: *mut u8,
        len: usize,
        off: u64,
    ) -> std::io::Result<()> {
        let mut guard = self.sync_io.lock().unwrap_or_else(|e| e.into_inner());
        let s = guard.as_mut().ok_or_else(|| std::io::Error::other("no synchronous queue"))?;
        let shift = self.info.lba_shift;
        let mut done = 0;
        while done < len {
            let n = (len - done).min(SYNC_BYTES);
            if write {
                // SAFETY: `buf` holds `len` bytes (the caller's), the bounce SYNC_BYTES.
                unsafe { std::ptr::copy_nonoverlapping(buf.wrapping_add(done), s.bounce, n) };
            }
            let opcode = if write { super::opc::WRITE } else { super::opc::READ };
            let at = off + done as u64;
            let mut e = sqe(opcode, self.info.nsid);
            let list = (s.q.mem.wrapping_add(2 * 4096).cast::<u64>(), s.q.iova + 2 * 4096);
            let (prp1, prp2) = prps(s.bounce_iova, n, list);
            (e[6], e[7], e[8], e[9]) =
                (prp1 as u32, (prp1 >> 32) as u32, prp2 as u32, (prp2 >> 32) as u32);
            (e[10], e[11], e[12]) =
                ((at >> shift) as u32, (at >> (shift + 32)) as u32, ((n >> shift) - 1) as u32);
            self.polled_cmd(&mut s.q, e)?;
            if !write {
                // SAFETY: as above.
                unsafe { std::ptr::copy_nonoverlapping(s.bounce, buf.wrapping_add(done), n) };
            }
            done += n;
        }
        Ok(())
    }

    /// A synchronous FLUSH.
    pub(crate) fn flush_sync(&self) -> std::io::Result<()> {
        let mut guard = self.sync_io.lock().unwrap_or_else(|e| e.into_inner());
        let s = guard.as_mut().ok_or_else(|| std::io::Error::other("no synchronous queue"))?;
        self.polled_cmd(&mut s.q, sqe(super::opc::FLUSH, self.info.nsid)).map(|_| ())
    }

    fn reg(&self, off: usize) -> *mut u32 {
        // SAFETY (of the arithmetic): register offsets are below BAR0's checked size.
        self.regs.wrapping_add(off).cast()
    }

    fn read32(&self, off: usize) -> u32 {
        // SAFETY: a register inside the mapped BAR0, read as the device expects.
        unsafe { std::ptr::read_volatile(self.reg(off)) }
    }

    fn write32(&self, off: usize, v: u32) {
        // SAFETY: as in `read32`.
        unsafe { std::ptr::write_volatile(self.reg(off), v) }
    }

    fn read64(&self, off: usize) -> u64 {
        u64::from(self.read32(off)) | (u64::from(self.read32(off + 4)) << 32)
    }

    fn write64(&self, off: usize, v: u64) {
        self.write32(off, v as u32);
        self.write32(off + 4, (v >> 32) as u32);
    }

    /// The submission (`cq = false`) or completion doorbell of queue `qid`.
    pub(crate) fn doorbell(&self, qid: u16, cq: bool) -> *mut u32 {
        self.reg(0x1000 + (2 * usize::from(qid) + usize::from(cq)) * self.stride)
    }

    fn enable(&self, timeout: Duration) -> std::io::Result<()> {
        if self.read32(CC) & CC_EN != 0 {
            self.write32(CC, self.read32(CC) & !CC_EN);
        }
        if !wait_until(timeout, || self.read32(CSTS) & CSTS_RDY == 0) {
            return Err(std::io::Error::other("the controller did not disable (CSTS.RDY stuck)"));
        }
        let admin = self.admin.lock().unwrap_or_else(|e| e.into_inner());
        let n = u32::from(ADMIN_DEPTH - 1);
        self.write32(AQA, (n << 16) | n);
        self.write64(ASQ, admin.iova);
        self.write64(ACQ, admin.iova + 4096);
        drop(admin);
        self.write32(CC, CC_EN | CC_ENTRY_SIZES);
        let ready = wait_until(timeout, || self.read32(CSTS) & (CSTS_RDY | CSTS_CFS) != 0);
        if !ready || self.read32(CSTS) & CSTS_CFS != 0 {
            return Err(std::io::Error::other(format!(
                "the controller did not become ready within {timeout:?} (CSTS {:#x})",
                self.read32(CSTS)
            )));
        }
        Ok(())
    }

    /// Runs one admin command and waits for it; returns its DW0. The data page (the
    /// third page of the admin memory) is PRP1 when `e[6..8]` is left zero and the
    /// command transfers data.
    fn admin_cmd(&self, e: Sqe) -> std::io::Result<u32> {
        let mut a = self.admin.lock().unwrap_or_else(|e| e.into_inner());
        self.polled_cmd(&mut a, e)
    }

    /// Runs one command on a polled queue and waits for it; returns its DW0.
    fn polled_cmd(&self, a: &mut PolledQueue, mut e: Sqe) -> std::io::Result<u32> {
        a.cid = a.cid.wrapping_add(1);
        e[0] = (e[0] & 0xffff) | (u32::from(a.cid) << 16);
        let slot = a.mem.wrapping_add(usize::from(a.tail) * 64).cast::<Sqe>();
        // SAFETY: `slot` is inside the admin submission page, which the controller
        // reads only after the doorbell write below.
        unsafe { std::ptr::write_volatile(slot, e) };
        a.tail = (a.tail + 1) % ADMIN_DEPTH;
        // SAFETY: the queue's submission doorbell inside BAR0.
        unsafe { std::ptr::write_volatile(self.doorbell(a.qid, false), u32::from(a.tail)) };
        let cqe = a.mem.wrapping_add(4096 + usize::from(a.head) * 16).cast::<[u32; 4]>();
        let phase = a.phase;
        // SAFETY: reads of the admin completion page, which the controller writes.
        let done = wait_until(ADMIN_TIMEOUT, || unsafe {
            (std::ptr::read_volatile(cqe)[3] >> 16) & 1 == u32::from(phase)
        });
        if !done {
            return Err(std::io::Error::other(format!(
                "admin command {:#04x} did not complete within {ADMIN_TIMEOUT:?}",
                e[0] & 0xff
            )));
        }
        // SAFETY: as above; the entry is complete.
        let c = unsafe { std::ptr::read_volatile(cqe) };
        a.head = (a.head + 1) % ADMIN_DEPTH;
        if a.head == 0 {
            a.phase = !a.phase;
        }
        // SAFETY: the queue's completion doorbell inside BAR0.
        unsafe { std::ptr::write_volatile(self.doorbell(a.qid, true), u32::from(a.head)) };
        let status = cqe_status(c[3]);
        super::status(status).map_err(|err| {
            std::io::Error::other(format!(
                "admin command {:#04x} failed: status {status:#x} ({err})",
                e[0] & 0xff
            ))
        })?;
        Ok(c[0])
    }

    /// Identify Controller and Namespace through the admin data page.
    fn identify(&self, nsid: u32) -> std::io::Result<Result<NsInfo, NsError>> {
        let (page, page_iova) = {
            let a = self.admin.lock().unwrap_or_else(|e| e.into_inner());
            (a.mem.wrapping_add(2 * 4096), a.iova + 2 * 4096)
        };
        let mut data = [vec![0u8; 4096], vec![0u8; 4096]];
        for (i, (cns, id)) in [(1u32, 0u32), (0, nsid)].into_iter().enumerate() {
            let mut e = sqe(super::opc::IDENTIFY, id);
            e[6] = page_iova as u32;
            e[7] = (page_iova >> 32) as u32;
            e[10] = cns;
            self.admin_cmd(e)?;
            // SAFETY: the admin data page, written by the completed command.
            unsafe { std::ptr::copy_nonoverlapping(page, data[i].as_mut_ptr(), 4096) };
        }
        Ok(identify::parse(nsid, &data[0], &data[1]))
    }

    /// Maps the DMA region `start..start+len` for the device (once per region);
    /// returns its IOVA.
    pub(crate) fn map_region(&self, start: usize, len: usize) -> std::io::Result<u64> {
        let mut regions = self.regions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&(_, _, iova)) = regions.iter().find(|r| r.0 == start && r.1 == len) {
            return Ok(iova);
        }
        let iova = self.vfio.map(start, len)?;
        regions.push((start, len, iova));
        Ok(iova)
    }

    /// Creates I/O queue pair with `entries` entries on the given memory; returns its
    /// ID, or `None` when every queue ID is taken.
    pub(crate) fn create_queue(
        &self,
        entries: u16,
        sq: u64,
        cq: u64,
    ) -> std::io::Result<Option<u16>> {
        let Some(qid) = self.qids.lock().unwrap_or_else(|e| e.into_inner()).pop() else {
            return Ok(None);
        };
        match self.make_queue(qid, entries, sq, cq) {
            Ok(()) => Ok(Some(qid)),
            Err(e) => {
                self.qids.lock().unwrap_or_else(|e| e.into_inner()).push(qid);
                Err(e)
            }
        }
    }

    /// Creates the completion and submission queues of `qid` (again, after a reset).
    pub(crate) fn make_queue(
        &self,
        qid: u16,
        entries: u16,
        sq: u64,
        cq: u64,
    ) -> std::io::Result<()> {
        let size = (u32::from(entries) - 1) << 16 | u32::from(qid);
        let mut c = sqe(CREATE_CQ, 0);
        (c[6], c[7], c[10], c[11]) = (cq as u32, (cq >> 32) as u32, size, 1);
        let mut s = sqe(CREATE_SQ, 0);
        (s[6], s[7], s[10], s[11]) =
            (sq as u32, (sq >> 32) as u32, size, (u32::from(qid) << 16) | 1);
        self.admin_cmd(c)?;
        self.admin_cmd(s).inspect_err(|_| {
            let _ = self.admin_cmd(delete(DELETE_CQ, qid));
        })?;
        Ok(())
    }

    /// The reset generation: bumped by every [`reset`](Self::reset). A queue pair that
    /// sees it change re-creates its queues and resubmits what it had in flight.
    pub(crate) fn epoch(&self) -> u32 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Whether the controller reports a fatal status (CSTS.CFS).
    pub(crate) fn fatal(&self) -> bool {
        self.read32(CSTS) & CSTS_CFS != 0
    }

    /// Resets the controller (unless another reactor already did since `seen`):
    /// disabled, which aborts every command in flight, then enabled again with its admin
    /// queue and the control plane's queue; the I/O queue pairs recover on their
    /// reactors when they see the new epoch.
    pub(crate) fn reset(&self, seen: u32) -> std::io::Result<()> {
        let _one = self.resetting.lock().unwrap_or_else(|e| e.into_inner());
        if self.epoch() != seen {
            return Ok(());
        }
        tracing::warn!(csts = self.read32(CSTS), "NVMe controller reset");
        {
            let mut a = self.admin.lock().unwrap_or_else(|e| e.into_inner());
            self.write32(CC, self.read32(CC) & !CC_EN);
            if !wait_until(self.timeout, || self.read32(CSTS) & CSTS_RDY == 0) {
                return Err(std::io::Error::other("the controller did not disable for a reset"));
            }
            a.restart();
        }
        self.enable(self.timeout)?;
        let _ = self.admin_cmd({
            let mut e = sqe(SET_FEATURES, 0);
            e[10] = FEAT_NUM_QUEUES;
            e[11] = (63 << 16) | 63;
            e
        });
        if let Some(s) = self.sync_io.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            s.q.restart();
            self.make_queue(s.q.qid, ADMIN_DEPTH, s.q.iova, s.q.iova + 4096)?;
        }
        self.epoch.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Deletes I/O queue pair `qid` (nothing in flight on it).
    pub(crate) fn delete_queue(&self, qid: u16) {
        let _ = self.admin_cmd(delete(DELETE_SQ, qid));
        let _ = self.admin_cmd(delete(DELETE_CQ, qid));
        self.qids.lock().unwrap_or_else(|e| e.into_inner()).push(qid);
    }
}

/// PRP1 and PRP2 of a transfer of `len` bytes at the contiguous device address `iova`,
/// writing a PRP list into `list` (memory and its device address) when it takes more
/// than two pages. `iova` is page-aligned after the first page's offset.
pub(crate) fn prps(iova: u64, len: usize, list: (*mut u64, u64)) -> (u64, u64) {
    let first = 4096 - (iova % 4096) as usize;
    if len <= first {
        return (iova, 0);
    }
    let rest = iova + first as u64;
    if len - first <= 4096 {
        return (iova, rest);
    }
    let pages = (len - first).div_ceil(4096);
    assert!(pages <= 512, "{len} bytes exceed one PRP list page");
    for i in 0..pages {
        // SAFETY: the caller's PRP list page holds 512 entries.
        unsafe { std::ptr::write_volatile(list.0.add(i), rest + 4096 * i as u64) };
    }
    (iova, list.1)
}

fn delete(opcode: u8, qid: u16) -> Sqe {
    let mut e = sqe(opcode, 0);
    e[10] = u32::from(qid);
    e
}

impl Drop for Controller {
    fn drop(&mut self) {
        // A normal shutdown, then disabled: the next driver starts from a clean state.
        self.write32(CC, (self.read32(CC) & !(3 << 14)) | CC_SHN_NORMAL);
        let _ = wait_until(Duration::from_secs(5), || {
            self.read32(CSTS) & CSTS_SHST_MASK == CSTS_SHST_DONE
        });
        self.write32(CC, self.read32(CC) & !CC_EN);
        let _ = wait_until(Duration::from_secs(5), || self.read32(CSTS) & CSTS_RDY == 0);
        if let Some(s) = self.sync_io.lock().unwrap_or_else(|e| e.into_inner()).take() {
            self.vfio.unmap(s.q.iova, 4 * 4096);
            self.vfio.unmap(s.bounce_iova, SYNC_BYTES);
            // SAFETY: mappings made in `start_sync_io`, no longer used by the device.
            unsafe {
                libc::munmap(s.q.mem.cast(), 4 * 4096);
                libc::munmap(s.bounce.cast(), SYNC_BYTES);
            }
        }
        for &(_, len, iova) in self.regions.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            self.vfio.unmap(iova, len);
        }
        let a = self.admin.lock().unwrap_or_else(|e| e.into_inner());
        self.vfio.unmap(a.iova, 4 * 4096);
        // SAFETY: the admin mapping made in `start`, no longer used by the device.
        unsafe { libc::munmap(a.mem.cast(), 4 * 4096) };
    }
}
