//! A simulated disk for fault injection: a volatile write cache in front of durable
//! contents, with seeded power cuts.
//!
//! - Writes (and write-zeroes, discards) land in the *current* view at once and are
//!   queued as *pending*; a flush makes every pending write durable. This is the
//!   contract of a disk with a volatile cache: a completed write survives a power cut
//!   only if a flush completed after it.
//! - A power cut after a seeded number of operations fails that operation and every
//!   one after it. [`SimDisk::crash_image`] then builds what a disk could hold after
//!   the cut: the durable contents plus any subset of the pending writes, each dropped,
//!   applied, or torn at 512-byte sector granularity, chosen by a seed — which also
//!   models the disk reordering unflushed writes.
//! - Seeded yields before I/O let concurrent requests interleave differently per seed
//!   while the run stays deterministic on one reactor.
//!
//! Test infrastructure: it allocates per write and takes a mutex, which the real
//! backends never do.

use std::sync::{Arc, Mutex};

use crate::error::IoError;
use crate::seg::{self, IoSeg};

use super::probe::Alignment;
use super::{Allocation, Backend, BackendChannel, Extent, Storage, StoreFuture};

/// Storage over a simulated disk, with 512-byte request alignment so the
/// read-modify-write paths run as on a real disk.
pub(crate) fn open(disk: Arc<SimDisk>) -> Arc<Storage> {
    let size = disk.len();
    let align = Alignment { mem: 1, request: 512 };
    Storage::new(Box::new(SimBackend(disk)), None, align, size, false, false)
}

struct SimBackend(Arc<SimDisk>);

impl Backend for SimBackend {
    fn kind(&self) -> &'static str {
        "<sim>"
    }
    fn open_channel(&self) -> Result<Box<dyn BackendChannel>, IoError> {
        Ok(Box::new(SimBackend(self.0.clone())))
    }
    fn read_sync(&self, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
        Ok(self.0.read_sync(buf, off))
    }
    fn write_sync(&self, buf: &[u8], off: u64) -> std::io::Result<()> {
        self.0
            .write_bytes(off, buf.to_vec())
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
    fn sync(&self) -> std::io::Result<()> {
        self.0.flush().map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
}

impl SimBackend {
    /// A seeded yield before an operation, as a real disk's requests interleave.
    async fn maybe_yield(&self) {
        if self.0.should_yield() {
            poller::yield_now().await;
        }
    }
}

impl BackendChannel for SimBackend {
    fn read<'a>(&'a self, off: u64, segs: &'a [IoSeg<'a>]) -> StoreFuture<'a> {
        StoreFuture::new(async move {
            self.maybe_yield().await;
            self.0.read(off, segs)
        })
    }
    fn write<'a>(&'a self, off: u64, segs: &'a [IoSeg<'a>], _fua: bool) -> StoreFuture<'a> {
        StoreFuture::new(async move {
            self.maybe_yield().await;
            self.0.write(off, segs)
        })
    }
    fn flush(&self) -> StoreFuture<'_> {
        StoreFuture::new(async move {
            self.maybe_yield().await;
            self.0.flush()
        })
    }
    fn zero_range(&self, off: u64, len: u64, _unmap: bool, _grows: bool) -> StoreFuture<'_> {
        // As a real fallocate: other requests run while it is in flight.
        StoreFuture::new(async move {
            self.maybe_yield().await;
            self.0.write_bytes(off, vec![0u8; len as usize])
        })
    }
    fn discard(&self, off: u64, len: u64) -> StoreFuture<'_, bool> {
        StoreFuture::new(async move {
            self.maybe_yield().await;
            self.0.write_bytes(off, vec![0u8; len as usize]).map(|()| true)
        })
    }
    fn block_status(&self, _off: u64, len: u64) -> StoreFuture<'_, Extent> {
        StoreFuture::ready(Ok(Extent { len, allocation: Allocation::Data }))
    }
}

const SECTOR: usize = 512;

struct State {
    current: Vec<u8>,
    durable: Vec<u8>,
    pending: Vec<(u64, Vec<u8>)>,
    rng: u64,
    ops: u64,
    cut_after: Option<u64>,
    cut: bool,
    yield_per_mille: u64,
}

/// A simulated disk.
pub struct SimDisk {
    state: Mutex<State>,
    /// The disk whose power this one shares (one cut, one count of operations over
    /// both: an image and its external data file on one machine).
    power: Option<Arc<SimDisk>>,
}

fn next(rng: &mut u64) -> u64 {
    *rng ^= *rng << 13;
    *rng ^= *rng >> 7;
    *rng ^= *rng << 17;
    *rng
}

fn apply(buf: &mut Vec<u8>, off: u64, data: &[u8]) {
    let end = off as usize + data.len();
    if buf.len() < end {
        buf.resize(end, 0);
    }
    buf[off as usize..end].copy_from_slice(data);
}

impl SimDisk {
    /// A disk holding `image` (durable), with a power cut on operation number
    /// `cut_after` (counting writes, zeroes, discards and flushes), if any.
    pub fn new(image: Vec<u8>, seed: u64, cut_after: Option<u64>) -> SimDisk {
        SimDisk {
            state: Mutex::new(State {
                current: image.clone(),
                durable: image,
                pending: Vec::new(),
                rng: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
                ops: 0,
                cut_after,
                cut: false,
                yield_per_mille: 300,
            }),
            power: None,
        }
    }

    /// A disk holding `image` on `power`'s power: its operations count towards
    /// `power`'s cut, and it is cut when `power` is.
    pub fn on_power_of(image: Vec<u8>, seed: u64, power: Arc<SimDisk>) -> SimDisk {
        assert!(power.power.is_none(), "one level of shared power");
        SimDisk { power: Some(power), ..SimDisk::new(image, seed, None) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the next I/O should yield first (seeded interleaving).
    fn should_yield(&self) -> bool {
        let mut s = self.lock();
        let p = s.yield_per_mille;
        next(&mut s.rng) % 1000 < p
    }

    /// Counts a mutating operation (on the disk whose power this one is on); false
    /// once the power is cut. Lock order: this disk, then the power's.
    fn tick(&self, s: &mut State) -> bool {
        match &self.power {
            Some(p) => Self::tick_state(&mut p.lock()),
            None => Self::tick_state(s),
        }
    }

    fn tick_state(s: &mut State) -> bool {
        if s.cut {
            return false;
        }
        s.ops += 1;
        if s.cut_after.is_some_and(|c| s.ops >= c) {
            s.cut = true;
            return false;
        }
        true
    }

    pub fn len(&self) -> u64 {
        self.lock().current.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the power has been cut.
    pub fn is_cut(&self) -> bool {
        match &self.power {
            Some(p) => p.is_cut(),
            None => self.lock().cut,
        }
    }

    /// Mutating operations so far (on the disks sharing the power).
    pub fn ops(&self) -> u64 {
        match &self.power {
            Some(p) => p.ops(),
            None => self.lock().ops,
        }
    }

    fn read(&self, off: u64, segs: &[IoSeg<'_>]) -> Result<(), IoError> {
        let cut = self.is_cut();
        let s = self.lock();
        if cut {
            return Err(IoError::Os(libc::EIO));
        }
        let total = seg::total_len(segs);
        let have = (s.current.len() as u64).saturating_sub(off).min(total as u64) as usize;
        if have > 0 {
            // SAFETY: `off..off+have` lies inside `current`.
            unsafe { seg::copy_into_segs(segs, 0, s.current.as_ptr().add(off as usize), have) };
        }
        seg::zero_segs(segs, have, total - have);
        Ok(())
    }

    fn write(&self, off: u64, segs: &[IoSeg<'_>]) -> Result<(), IoError> {
        let mut data = vec![0u8; seg::total_len(segs)];
        // SAFETY: `data` holds exactly the segments' length.
        unsafe { seg::copy_from_segs(segs, 0, data.as_mut_ptr(), data.len()) };
        self.write_bytes(off, data)
    }

    fn write_bytes(&self, off: u64, data: Vec<u8>) -> Result<(), IoError> {
        let mut s = self.lock();
        if !self.tick(&mut s) {
            return Err(IoError::Os(libc::EIO));
        }
        apply(&mut s.current, off, &data);
        s.pending.push((off, data));
        Ok(())
    }

    fn flush(&self) -> Result<(), IoError> {
        let mut s = self.lock();
        if !self.tick(&mut s) {
            return Err(IoError::Os(libc::EIO));
        }
        let pending = std::mem::take(&mut s.pending);
        for (off, data) in pending {
            apply(&mut s.durable, off, &data);
        }
        Ok(())
    }

    /// Synchronous metadata access for the control plane.
    fn read_sync(&self, buf: &mut [u8], off: u64) -> usize {
        let s = self.lock();
        let have = (s.current.len() as u64).saturating_sub(off).min(buf.len() as u64) as usize;
        buf[..have].copy_from_slice(&s.current[off as usize..off as usize + have]);
        buf[have..].fill(0);
        buf.len()
    }

    /// The current contents (what reads return).
    pub fn current(&self) -> Vec<u8> {
        self.lock().current.clone()
    }

    /// What the disk could hold after the power cut: durable contents plus each pending
    /// write dropped, applied or torn, by `seed`.
    pub fn crash_image(&self, seed: u64) -> Vec<u8> {
        let s = self.lock();
        let mut img = s.durable.clone();
        let mut rng = seed.wrapping_mul(0xD1B5_4A32_D192_ED03) | 1;
        for (off, data) in &s.pending {
            match next(&mut rng) % 3 {
                0 => {}
                1 => apply(&mut img, *off, data),
                _ => {
                    // Torn: some sectors made it, some did not.
                    let first = (*off as usize) / SECTOR;
                    let last = (*off as usize + data.len()).div_ceil(SECTOR);
                    for sector in first..last {
                        if next(&mut rng).is_multiple_of(2) {
                            let lo = (sector * SECTOR).max(*off as usize);
                            let hi = ((sector + 1) * SECTOR).min(*off as usize + data.len());
                            apply(
                                &mut img,
                                lo as u64,
                                &data[lo - *off as usize..hi - *off as usize],
                            );
                        }
                    }
                }
            }
        }
        img
    }
}
