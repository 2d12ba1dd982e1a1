//! A disk's handle on one reactor: every request is validated, counted in at the
//! disk's gate, admitted by QoS, then goes to the driver's channel — through the
//! disk's write filter when a job has put one there.
//!
//! The driver channel and the filter (with a channel to the filter's target) are what
//! the disk's generation said when they were opened. A request that finds the
//! generation changed reopens them first; that happens only after a quiesce, so no
//! request of this channel is in flight on the old ones (a job's own channel, which a
//! quiesce does not hold back, may still finish one there: each request holds the
//! generation it started on).

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::gate::{CurrentCell, Gate, InFlight, gate};
use super::{Admit, Bdev, ReqKind};
use crate::driver::{BlockStatus, DriverChannel, ZeroFlags};
use crate::error::IoError;
use crate::seg::{self, IoSeg};

use super::bitmap::DirtyBitmap;
use super::filter::{Decision, WriteFilter};
use super::view::PointInTime;

/// Segments one read of a view passes down at once (a large request is read in parts).
const MAX_VIEW_SEGS: usize = 64;

/// How long a change waits before asking a filter again about a busy range (a copy of
/// it is under way, typically for a millisecond).
const FILTER_WAIT: std::time::Duration = std::time::Duration::from_micros(50);

/// What this channel opened at one generation of its disk.
pub(crate) struct Current {
    pub(crate) generation: u64,
    ch: Box<dyn DriverChannel>,
    filter: Option<Arc<dyn WriteFilter>>,
    /// The filter's target's driver on this reactor, for mirrored changes (requests
    /// here are already validated against a disk of the same size).
    target: Option<Box<dyn DriverChannel>>,
    /// The disk's enabled named bitmaps.
    tracking: Arc<[Arc<DirtyBitmap>]>,
    /// A point-in-time view's origin, with a channel to its driver.
    view: Option<(Arc<dyn PointInTime>, Box<dyn DriverChannel>)>,
}

/// A device's handle on one reactor.
pub struct BdevChannel {
    bdev: Arc<Bdev>,
    cur: Rc<CurrentCell>,
    gate: Rc<Gate>,
    /// A block job's channel: passes a paused gate, not counted.
    internal: bool,
}

/// A change a filter sees.
#[derive(Clone, Copy)]
enum Change<'a> {
    Write(&'a [IoSeg<'a>], bool),
    /// A write compressed where the driver can (see `DriverChannel::write_compressed`).
    Compressed(&'a [IoSeg<'a>]),
    Zero(ZeroFlags),
    Discard,
}

impl Change<'_> {
    async fn apply(self, ch: &dyn DriverChannel, off: u64, len: u64) -> Result<(), IoError> {
        match self {
            Change::Write(segs, fua) => ch.write(off, segs, fua).await,
            Change::Compressed(segs) => ch.write_compressed(off, segs).await,
            Change::Zero(flags) => ch.write_zeroes(off, len, flags).await,
            Change::Discard => ch.discard(off, len).await,
        }
    }

    /// The change as the target takes it: it must read zeros where the disk does, so
    /// never a zero write that may fail for being slow.
    fn for_target(self) -> Self {
        match self {
            Change::Zero(flags) => Change::Zero(ZeroFlags { fast_only: false, ..flags }),
            Change::Compressed(segs) => Change::Write(segs, false),
            c => c,
        }
    }
}

impl BdevChannel {
    pub(super) fn open(bdev: &Arc<Bdev>, internal: bool) -> Result<BdevChannel, IoError> {
        let cur = Rc::new(RefCell::new(Rc::new(current_of(bdev)?)));
        let gate = gate(bdev.id);
        gate.register(&cur);
        Ok(BdevChannel { bdev: bdev.clone(), cur, gate, internal })
    }

    pub fn bdev(&self) -> &Arc<Bdev> {
        &self.bdev
    }

    pub fn info(&self) -> super::DeviceInfo {
        self.bdev.info()
    }

    /// The channels of the disk's current generation, reopened if it changed.
    fn current(&self) -> Result<Rc<Current>, IoError> {
        let g = self.bdev.generation.load(Ordering::Acquire);
        let mut cur = self.cur.borrow_mut();
        if cur.generation != g {
            *cur = Rc::new(current_of(&self.bdev)?);
        }
        Ok(cur.clone())
    }

    /// Counts a request in (waiting while the disk is quiesced), unless internal.
    async fn gate(&self) -> Option<InFlight<'_>> {
        if self.internal { None } else { Some(self.gate.enter().await) }
    }

    /// The shared validation step, then QoS admission; `false` means there is nothing
    /// to do (a zero-length request) and the caller answers success.
    async fn admit(&self, kind: ReqKind, off: u64, len: u64) -> Result<bool, IoError> {
        if self.bdev.info().admit(kind, off, len)? == Admit::Nothing {
            return Ok(false);
        }
        self.bdev.qos.admit(if kind.moves_data() { len } else { 0 }).await;
        Ok(true)
    }

    pub async fn read(&self, off: u64, segs: &[IoSeg<'_>]) -> Result<(), IoError> {
        if !self.admit(ReqKind::Read, off, seg::total_len(segs) as u64).await? {
            return Ok(());
        }
        let _in = self.gate().await;
        let cur = self.current()?;
        match &cur.view {
            None => cur.ch.read(off, segs).await,
            Some((v, origin)) => view_read(&**v, &**origin, &*cur.ch, off, segs).await,
        }
    }

    /// Writes `segs` at `off`; with `fua` the data is durable on completion.
    pub async fn write(&self, off: u64, segs: &[IoSeg<'_>], fua: bool) -> Result<(), IoError> {
        let len = seg::total_len(segs) as u64;
        if !self.admit(ReqKind::Write, off, len).await? {
            return Ok(());
        }
        self.change(Change::Write(segs, fua), off, len).await
    }

    /// Writes `segs` at `off` compressed where the driver can (a backup target with
    /// `compress`; see [`crate::driver::BlockDriver::compresses`]).
    pub async fn write_compressed(&self, off: u64, segs: &[IoSeg<'_>]) -> Result<(), IoError> {
        let len = seg::total_len(segs) as u64;
        if !self.admit(ReqKind::Write, off, len).await? {
            return Ok(());
        }
        self.change(Change::Compressed(segs), off, len).await
    }

    /// Makes every write completed before this call durable, whichever channel or
    /// reactor completed it.
    pub async fn flush(&self) -> Result<(), IoError> {
        let _in = self.gate().await;
        self.current()?.ch.flush().await
    }

    pub async fn write_zeroes(&self, off: u64, len: u64, flags: ZeroFlags) -> Result<(), IoError> {
        if !self.admit(ReqKind::WriteZeroes, off, len).await? {
            return Ok(());
        }
        self.change(Change::Zero(flags), off, len).await
    }

    /// Releases the range if the device can; contents become unspecified.
    pub async fn discard(&self, off: u64, len: u64) -> Result<(), IoError> {
        if !self.admit(ReqKind::Discard, off, len).await? {
            return Ok(());
        }
        self.change(Change::Discard, off, len).await
    }

    /// A change of the disk's contents, through the filter if there is one, marked in
    /// the enabled bitmaps once it reached the driver (failed or not: a failed write
    /// may have changed part of the range).
    async fn change(&self, c: Change<'_>, off: u64, len: u64) -> Result<(), IoError> {
        let _in = self.gate().await;
        let cur = self.current()?;
        let r = self.filtered(&cur, c, off, len).await;
        for b in cur.tracking.iter() {
            b.set_range(off, len);
        }
        r
    }

    async fn filtered(
        &self,
        cur: &Current,
        c: Change<'_>,
        off: u64,
        len: u64,
    ) -> Result<(), IoError> {
        let Some(f) = &cur.filter else {
            return c.apply(&*cur.ch, off, len).await;
        };
        let mut d = f.begin(off, len);
        while d == Decision::Wait {
            poller::sleep(FILTER_WAIT).await;
            d = f.begin(off, len);
        }
        match d {
            Decision::Wait => unreachable!("waited above"),
            Decision::Track => {
                let r = c.apply(&*cur.ch, off, len).await;
                f.changed(off, len);
                r
            }
            Decision::Mirror => {
                let r = c.apply(&*cur.ch, off, len).await;
                let target_ok = match (&r, &cur.target) {
                    (Ok(()), Some(t)) => c.for_target().apply(&**t, off, len).await.is_ok(),
                    _ => false,
                };
                f.mirrored(off, len, r.is_ok(), target_ok);
                r
            }
            Decision::CopyBefore => {
                let mut pos = off;
                while pos < off + len
                    && let Some((o, l)) = f.copy_before(pos, off + len)
                {
                    assert!(l > 0 && o + l > pos, "copy-before ranges move forward");
                    let ok = match &cur.target {
                        Some(t) => copy_old(&*cur.ch, &**t, o, l, f.compress()).await.is_ok(),
                        None => false,
                    };
                    f.copied(o, l, ok);
                    pos = o + l;
                }
                let r = c.apply(&*cur.ch, off, len).await;
                f.release(off, len);
                r
            }
        }
    }

    /// The status of the bytes from `off`, at most `len` (> 0) of them.
    pub async fn block_status(&self, off: u64, len: u64) -> Result<BlockStatus, IoError> {
        self.bdev.info().admit(ReqKind::BlockStatus, off, len)?;
        let _in = self.gate().await;
        let cur = self.current()?;
        let st = match &cur.view {
            None => cur.ch.block_status(off, len).await?,
            Some((v, origin)) => match v.extent(off, len) {
                (true, n) => origin.block_status(off, n).await?,
                // Saved: data in the temporary image, the view's own.
                (false, n) => BlockStatus { len: n, hole: false, zero: false, depth: 1 },
            },
        };
        debug_assert!(st.len > 0 && st.len <= len, "block status of {} bytes for {len}", st.len);
        Ok(BlockStatus { len: st.len.clamp(1, len), ..st })
    }

    /// Writes `segs` at `off` where the disk's own image holds nothing yet (see
    /// `DriverChannel::populate`): a stream job pulling its backing chain up. The
    /// guest-visible contents do not change, so no filter sees it.
    pub async fn populate(&self, off: u64, segs: &[IoSeg<'_>]) -> Result<(), IoError> {
        if !self.admit(ReqKind::Write, off, seg::total_len(segs) as u64).await? {
            return Ok(());
        }
        let _in = self.gate().await;
        self.current()?.ch.populate(off, segs).await
    }

    /// A hint that the range will be read soon.
    pub async fn cache(&self, off: u64, len: u64) -> Result<(), IoError> {
        self.bdev.info().admit(ReqKind::Cache, off, len).map(|_| ())
    }
}

/// Copies `off..off+len` of the disk to the target (a copy-before-write), through a
/// buffer of the reactor's DMA pool: it happens once per backup chunk, not per request.
async fn copy_old(
    from: &dyn DriverChannel,
    to: &dyn DriverChannel,
    off: u64,
    len: u64,
    compress: bool,
) -> Result<(), IoError> {
    let mut buf = poller::dma::alloc_wait(len as usize).await.map_err(|_| IoError::TooLarge)?;
    let seg = [IoSeg::from_dma(&mut buf)];
    from.read(off, &seg).await?;
    if compress { to.write_compressed(off, &seg).await } else { to.write(off, &seg, false).await }
}

/// What a channel opens at the disk's current generation.
pub(crate) fn current_of(bdev: &Bdev) -> Result<Current, IoError> {
    // The generation first: a change after this load is seen at the next request.
    let generation = bdev.generation.load(Ordering::Acquire);
    let stack = bdev.stack();
    let target = match stack.filter.as_ref().and_then(|f| f.target()) {
        Some(t) => Some(t.driver().open_channel()?),
        None => None,
    };
    let view = match stack.view {
        Some(v) => {
            let origin = v.origin().driver().open_channel()?;
            Some((v, origin))
        }
        None => None,
    };
    Ok(Current {
        generation,
        ch: stack.driver.open_channel()?,
        filter: stack.filter,
        target,
        tracking: stack.tracking,
        view,
    })
}

/// A read of a point-in-time view (see `view`): runs still on the origin read from
/// it and are checked again after; saved runs read from the view's own driver.
async fn view_read(
    v: &dyn PointInTime,
    origin: &dyn DriverChannel,
    own: &dyn DriverChannel,
    off: u64,
    segs: &[IoSeg<'_>],
) -> Result<(), IoError> {
    let len = seg::total_len(segs) as u64;
    let mut pos = off;
    while pos < off + len {
        let skip = (pos - off) as usize;
        let reach = seg::reach(segs, skip, MAX_VIEW_SEGS) as u64;
        let (on_origin, n) = v.extent(pos, (off + len - pos).min(reach));
        let mut w: [IoSeg<'_>; MAX_VIEW_SEGS] = std::array::from_fn(|_| IoSeg::new(&mut []));
        let part = seg::window(segs, skip, n as usize, &mut w)?;
        if !on_origin {
            own.read(pos, part).await?;
            pos += n;
            continue;
        }
        origin.read(pos, part).await?;
        // Saved meanwhile: a change may have reached the origin during the read.
        if v.extent(pos, n) == (true, n) {
            pos += n;
        }
    }
    Ok(())
}
