//! The mirror job: copies a disk to a target while the disk is served, then switches
//! the disk to the target (the pivot) or leaves the target as a point-in-time copy.
//!
//! QEMU's block/mirror.c is the model. The job puts a [`MirrorFilter`] in front of the
//! disk (while it is quiesced, so no write is half-seen), which marks every change in
//! a dirty bitmap; `sync = "full"` starts with every chunk dirty, `"none"` with none.
//! The copy loop (on the job's reactor) takes runs of dirty chunks that no one else has
//! busy, takes them busy, clears their bits *before* reading the source (a write that
//! lands meanwhile dirties them again), asks the source's block status and copies,
//! writes zeroes or unmaps on the target accordingly; at most `buf_size` bytes are in
//! flight, in copies of at most [`MAX_COPY`], at most `speed` bytes per second. When
//! the bitmap is clean with nothing in flight the job is `ready`; it keeps copying
//! what new writes dirty.
//!
//! Convergence: `copy_mode = "write-blocking"` makes the filter write changes to
//! clean chunks to the target before the guest's request completes, so the dirty set
//! only shrinks; `"adaptive"` (the default) starts in the background and switches to
//! write-blocking once writers dirty clean chunks at least as fast as the job cleans
//! them for two seconds running — QEMU leaves that switch to the operator, and a mirror
//! under a write load faster than its speed limit never becomes ready there.
//!
//! Completing: the disk is quiesced on every reactor, the remaining dirty chunks are
//! copied, the target flushed, the filter removed and (for `job_complete`) the disk's
//! driver replaced by the target's; then the disk resumes. Requests parked meanwhile
//! go to the target, in order, on the same connections.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use drivers::driver::BlockDriver;
use drivers::{Bdev, BdevChannel, IoError, ZeroFlags};
use poller::{ReactorHandle, TaskPool};

use crate::bitmap::{Busy, DirtyBitmap, MAX_GRANULARITY, MIN_GRANULARITY};
use crate::filter::MirrorFilter;
use crate::job::{ErrorPolicy, Job, JobError, JobKind, JobState, Jobs, end_off_reactor};
use crate::speed::Limiter;

/// The largest single copy.
pub const MAX_COPY: u64 = 1 << 20;
/// Default bytes in flight.
pub const DEFAULT_BUF_SIZE: u64 = 16 << 20;
/// Copies in flight at most.
const MAX_COPIES: u32 = 16;
/// How long a quiesce may wait for the disk's requests in flight.
const QUIESCE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the loop looks at its requests and rates when it has nothing to copy.
const IDLE_TICK: Duration = Duration::from_millis(10);
/// The pause before a range whose copy failed is tried again.
const RETRY_DELAY: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// The whole disk.
    Full,
    /// Only new writes.
    None,
    /// What the images above depth `n` of the disk's chain hold (a commit into the
    /// image at depth `n`, which has the rest), and new writes.
    Above(u8),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyMode {
    Background,
    WriteBlocking,
    Adaptive,
}

impl CopyMode {
    pub fn parse(s: &str) -> Option<CopyMode> {
        match s {
            "background" => Some(CopyMode::Background),
            "write-blocking" => Some(CopyMode::WriteBlocking),
            "adaptive" => Some(CopyMode::Adaptive),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            CopyMode::Background => "background",
            CopyMode::WriteBlocking => "write-blocking",
            CopyMode::Adaptive => "adaptive",
        }
    }
}

#[derive(Debug, Clone)]
pub struct MirrorOptions {
    pub sync: SyncMode,
    pub granularity: u64,
    pub buf_size: u64,
    pub copy_mode: CopyMode,
    /// Bytes per second; 0: unlimited.
    pub speed: u64,
    /// Unmap on the target where the source has holes.
    pub unmap: bool,
    pub on_source_error: ErrorPolicy,
    pub on_target_error: ErrorPolicy,
}

impl Default for MirrorOptions {
    fn default() -> Self {
        MirrorOptions {
            sync: SyncMode::Full,
            granularity: 64 << 10,
            buf_size: DEFAULT_BUF_SIZE,
            copy_mode: CopyMode::Adaptive,
            speed: 0,
            unmap: true,
            on_source_error: ErrorPolicy::Report,
            on_target_error: ErrorPolicy::Report,
        }
    }
}

/// How a mirror ended, for the appliance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The disk is served from the target now.
    Pivoted,
    /// The target is a point-in-time copy (cancelled once ready); the disk unchanged.
    Copied,
    /// Cancelled before ready, or failed: the target is a partial copy.
    Aborted,
}

/// A mirror to start.
pub struct Mirror {
    /// `Mirror`, or `Commit` for an active commit (a mirror into the disk's backing
    /// image, which takes over the disk at the pivot).
    pub kind: JobKind,
    pub source: Arc<Bdev>,
    pub target: Arc<Bdev>,
    /// The target as `job_list` shows it (a path or an NBD URI).
    pub target_name: String,
    /// The target reads as zeros everywhere (made for this job): zero runs need no
    /// writing until the first pass has been over them.
    pub target_zeroed: bool,
    /// Every reactor that may serve the disk (the first runs the job).
    pub reactors: Vec<ReactorHandle>,
    pub opts: MirrorOptions,
    /// Called off the reactors once the job has ended and its drivers are closed.
    pub on_end: Box<dyn FnOnce(Ending) + Send>,
}

/// Validates `m` and starts it as a job of `jobs`.
pub fn start(jobs: &Arc<Jobs>, m: Mirror) -> Result<Arc<Job>, JobError> {
    let o = &m.opts;
    if !o.granularity.is_power_of_two()
        || !(MIN_GRANULARITY..=MAX_GRANULARITY).contains(&o.granularity)
    {
        return Err(JobError::Invalid(format!(
            "granularity: {} is not a power of two from {MIN_GRANULARITY} to {MAX_GRANULARITY}",
            o.granularity
        )));
    }
    if o.buf_size < o.granularity.min(MAX_COPY) {
        return Err(JobError::Invalid(format!(
            "buf_size: {} is smaller than one copy ({})",
            o.buf_size,
            o.granularity.min(MAX_COPY)
        )));
    }
    if Arc::ptr_eq(&m.source, &m.target) {
        return Err(JobError::Invalid("target: the disk itself".into()));
    }
    if m.target.info().size != m.source.info().size || m.target.info().read_only {
        return Err(JobError::Invalid(format!(
            "target: {} is {} bytes{}, the disk {} bytes",
            m.target_name,
            m.target.info().size,
            if m.target.info().read_only { " and read-only" } else { "" },
            m.source.info().size
        )));
    }
    let job = Job::new(jobs.next_id(), m.kind, m.source.name(), o.speed);
    job.set_detail("target", m.target_name.clone().into());
    let sync = match o.sync {
        SyncMode::Full => "full",
        SyncMode::None => "none",
        SyncMode::Above(_) => "top",
    };
    job.set_detail("sync", sync.into());
    job.set_detail("copy_mode", o.copy_mode.name().into());
    job.set_detail("write_blocking", (o.copy_mode == CopyMode::WriteBlocking).into());
    job.set_detail("granularity", o.granularity.into());
    job.set_detail("buf_size", o.buf_size.into());
    jobs.add_tracked(job.clone())?;
    let (runner, j) = (m.reactors[0].clone(), job.clone());
    runner.spawn(move || run(j, m));
    Ok(job)
}

/// What one copy needs, shared by the loop and its copies.
struct Ctx {
    src: BdevChannel,
    dst: BdevChannel,
    dirty: Arc<DirtyBitmap>,
    busy: Arc<Busy>,
    /// Chunks the target has been written in (when it started zeroed).
    written: Option<Busy>,
    unmap: bool,
    in_flight: Cell<u64>,
    copied: Cell<u64>,
    /// Bytes read and written (not zeroed) so far.
    data: Cell<u64>,
    cleared: Cell<u64>,
    /// The first failure since the loop last looked.
    failure: Cell<Option<(Side, IoError)>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Source,
    Target,
}

/// Why the copy loop stopped.
enum Stop {
    Complete,
    /// Cancelled; `ready` says whether the target had caught up.
    Cancel {
        ready: bool,
    },
    Failed(String),
}

async fn run(job: Arc<Job>, m: Mirror) {
    let Mirror { source, target, reactors, opts, on_end, target_zeroed, .. } = m;
    let (ending, old) = match mirror(&job, &source, &target, &reactors, &opts, target_zeroed).await
    {
        Ok(e) => e,
        Err(e) => {
            job.set_error(Some(e));
            (Ending::Aborted, None)
        }
    };
    let ended = if ending == Ending::Aborted { JobState::Aborted } else { JobState::Concluded };
    // Closing drivers is control-plane work (it waits on reactors): off this one. After
    // a pivot the disk's old driver is closed (its metadata written, its file
    // unlocked) and the target takes its image locks (a commit's base was opened
    // without them); otherwise the target is closed.
    let id = job.id.clone();
    // Ended once everything is closed and the disk's configuration follows it.
    end_off_reactor(&job, ended, move || {
        let closed = match &old {
            Some(old) => old.close(),
            None => target.close(),
        };
        if let Err(e) = closed {
            let what = if old.is_some() { "the disk's old image" } else { "the target" };
            tracing::warn!(job = id, "closing {what}: {e}");
        }
        drop(old);
        if ending == Ending::Pivoted
            && let Err(e) = target.driver().lock_images()
        {
            tracing::warn!(job = id, "locking the disk's new image: {e}");
        }
        on_end(ending);
    })
    .await;
}

/// The whole job; returns how it ended (with the disk's old driver after a pivot), or
/// the error that ended it.
async fn mirror(
    job: &Arc<Job>,
    source: &Arc<Bdev>,
    target: &Arc<Bdev>,
    reactors: &[ReactorHandle],
    opts: &MirrorOptions,
    target_zeroed: bool,
) -> Result<(Ending, Option<Arc<dyn BlockDriver>>), String> {
    let size = source.info().size;
    let dirty = Arc::new(DirtyBitmap::new(size, opts.granularity));
    let busy = Arc::new(Busy::new(dirty.chunks()));
    if opts.sync == SyncMode::Full {
        dirty.set_all();
    }
    let active = opts.copy_mode == CopyMode::WriteBlocking;
    let filter = Arc::new(MirrorFilter::new(dirty.clone(), busy.clone(), target.clone(), active));
    let ctx = Rc::new(Ctx {
        src: source.internal_channel().map_err(|e| format!("source: {e}"))?,
        dst: target.internal_channel().map_err(|e| format!("target: {e}"))?,
        dirty: dirty.clone(),
        busy,
        written: target_zeroed.then(|| Busy::new(dirty.chunks())),
        unmap: opts.unmap,
        in_flight: Cell::new(0),
        copied: Cell::new(0),
        data: Cell::new(0),
        cleared: Cell::new(0),
        failure: Cell::new(None),
    });
    {
        let q = quiesce(source, reactors).await?;
        source.set_filter(&q, Some(filter.clone()));
    }
    if let SyncMode::Above(depth) = opts.sync {
        // After the filter is in: a write from now on is seen by it, one before by this.
        if let Err(e) = mark_above(&ctx, depth).await {
            let q = quiesce(source, reactors).await?;
            source.set_filter(&q, None);
            return Err(e);
        }
    }
    job.set_state(JobState::Running);
    let stop = copy_loop(job, &ctx, &filter, opts).await;
    let q = match quiesce(source, reactors).await {
        Ok(q) => q,
        Err(e) => {
            // The filter stays until a quiesce succeeds: without it writes go unseen.
            return Err(format!("{e}; the disk still has the job's filter"));
        }
    };
    let finish =
        matches!(stop, Stop::Complete | Stop::Cancel { ready: true }) && !job.force_requested();
    if finish {
        job.set_state(JobState::Completing);
        if let Err(e) = drain(&ctx).await {
            source.set_filter(&q, None);
            return Err(e);
        }
    }
    source.set_filter(&q, None);
    match stop {
        Stop::Complete if finish => {
            let old = source
                .replace_driver(&q, target.driver())
                .map_err(|e| format!("switching the disk to the target: {e}"))?;
            tracing::info!(job = job.id, disk = source.name(), "pivoted to the mirror target");
            Ok((Ending::Pivoted, Some(old)))
        }
        Stop::Cancel { ready: true } if finish => Ok((Ending::Copied, None)),
        Stop::Failed(e) => Err(e),
        _ => {
            job.set_error(Some("cancelled".into()));
            Ok((Ending::Aborted, None))
        }
    }
}

/// Quiesces `source` on `reactors`, the error saying how long it waited.
pub(crate) async fn quiesce(
    source: &Arc<Bdev>,
    reactors: &[ReactorHandle],
) -> Result<drivers::Quiesced, String> {
    source
        .quiesce(reactors, QUIESCE_TIMEOUT)
        .await
        .map_err(|e| format!("the disk's requests did not finish within {QUIESCE_TIMEOUT:?}: {e}"))
}

/// Marks dirty what images above `depth` hold (their data and zeroes).
async fn mark_above(ctx: &Ctx, depth: u8) -> Result<(), String> {
    let size = ctx.dirty.len();
    let mut off = 0;
    while off < size {
        let st = ctx
            .src
            .block_status(off, (1 << 30).min(size - off))
            .await
            .map_err(|e| format!("block status at {off}: {e}"))?;
        if (1..depth).contains(&st.depth) {
            ctx.dirty.set_range(off, st.len);
        }
        off += st.len;
    }
    Ok(())
}

/// With the disk quiesced: copies every dirty chunk, then flushes the target.
async fn drain(ctx: &Rc<Ctx>) -> Result<(), String> {
    let pool = TaskPool::new(MAX_COPIES);
    while ctx.dirty.count() > 0 {
        let mut from = 0;
        while let Some(c) = ctx.dirty.next_set(from).filter(|&c| c >= from) {
            let end = run_end(ctx, c);
            if ctx.busy.try_take(c, end) {
                take(ctx, c, end);
                while pool.is_full() {
                    pool.finished().await;
                }
                if pool.spawn(copy(ctx.clone(), c, end)).is_err() {
                    unreachable!("the pool had room");
                }
            }
            from = end;
        }
        pool.drain().await;
        if let Some((side, e)) = ctx.failure.take() {
            return Err(format!("{} failed while completing: {e}", side.name()));
        }
    }
    ctx.dst.flush().await.map_err(|e| format!("flushing the target: {e}"))
}

/// The end of the run of dirty, idle chunks from `c` (at most [`MAX_COPY`] bytes).
fn run_end(ctx: &Ctx, c: u64) -> u64 {
    let g = ctx.dirty.granularity();
    let max = (MAX_COPY / g).max(1);
    let mut end = c + 1;
    while end < ctx.dirty.chunks()
        && end - c < max
        && ctx.dirty.is_set(end)
        && !ctx.busy.is_taken(end)
    {
        end += 1;
    }
    end
}

/// Clears the dirty bits of taken chunks `c..end` (before their source is read).
fn take(ctx: &Ctx, c: u64, end: u64) {
    for k in c..end {
        if ctx.dirty.clear(k) {
            ctx.cleared.set(ctx.cleared.get() + 1);
        }
    }
}

/// Copies chunks `c..end` (taken busy, bits cleared): block status of the source
/// decides between data, zeroes and unmapping. On failure the chunks are dirty again
/// and the failure is left for the loop. Releases the chunks.
async fn copy(ctx: Rc<Ctx>, c: u64, end: u64) {
    let (off, _) = ctx.dirty.range(c);
    let (last, last_len) = ctx.dirty.range(end - 1);
    let len = last + last_len - off;
    ctx.in_flight.set(ctx.in_flight.get() + len);
    let fresh = ctx.written.as_ref().is_some_and(|w| w.try_take(c, end));
    let r = copy_range(&ctx, off, len, fresh).await;
    if let Err(f) = r {
        ctx.dirty.set_range(off, len);
        if ctx.failure.get().is_none() {
            ctx.failure.set(Some(f));
        }
    } else {
        ctx.copied.set(ctx.copied.get() + len);
    }
    ctx.busy.release(c, end);
    ctx.in_flight.set(ctx.in_flight.get() - len);
}

async fn copy_range(ctx: &Ctx, off: u64, len: u64, fresh: bool) -> Result<(), (Side, IoError)> {
    let mut pos = off;
    while pos < off + len {
        let st = ctx.src.block_status(pos, off + len - pos).await.map_err(|e| (Side::Source, e))?;
        let n = st.len;
        if st.zero {
            // A target made for the job already reads zeros where nothing was written.
            if !fresh {
                let flags = ZeroFlags { may_unmap: ctx.unmap && st.hole, ..ZeroFlags::default() };
                ctx.dst.write_zeroes(pos, n, flags).await.map_err(|e| (Side::Target, e))?;
            }
        } else {
            let mut buf = poller::dma::alloc_wait(n as usize)
                .await
                .map_err(|_| (Side::Source, IoError::TooLarge))?;
            let seg = [drivers::IoSeg::from_dma(&mut buf)];
            ctx.src.read(pos, &seg).await.map_err(|e| (Side::Source, e))?;
            ctx.dst.write(pos, &seg, false).await.map_err(|e| (Side::Target, e))?;
            ctx.data.set(ctx.data.get() + n);
        }
        pos += n;
    }
    Ok(())
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Source => "reading the disk",
            Side::Target => "writing the target",
        }
    }
}

/// Decides, once a second, whether an adaptive mirror turns write-blocking.
struct Adaptive {
    at: Instant,
    sets: u64,
    cleared: u64,
    strikes: u32,
}

impl Adaptive {
    /// Whether writers dirtied chunks (clean ones: re-dirtying a dirty chunk costs the
    /// copy nothing) at least as fast as the job cleaned them, two seconds running.
    /// Over a region no one writes the job cleans far faster, so an initial copy does
    /// not trip it; once writers re-dirty what it cleans as fast as it cleans, it
    /// cannot converge.
    fn outrun(&mut self, ctx: &Ctx) -> bool {
        if self.at.elapsed() < Duration::from_secs(1) {
            return false;
        }
        let (sets, cleared) = (ctx.dirty.sets(), ctx.cleared.get());
        let dirtied = sets - self.sets;
        let outrun = dirtied > 0 && dirtied >= cleared - self.cleared && ctx.dirty.count() > 0;
        self.strikes = if outrun { self.strikes + 1 } else { 0 };
        (self.at, self.sets, self.cleared) = (Instant::now(), sets, cleared);
        self.strikes >= 2
    }
}

/// The copy loop: runs until completed, cancelled or failed (or stopped by an error,
/// then waits for `job_resume`).
async fn copy_loop(job: &Job, ctx: &Rc<Ctx>, filter: &MirrorFilter, opts: &MirrorOptions) -> Stop {
    let pool = TaskPool::new(MAX_COPIES);
    let mut limiter = Limiter::new();
    let mut charged = 0u64;
    let mut cursor = 0u64;
    let mut adaptive = (opts.copy_mode == CopyMode::Adaptive).then(|| Adaptive {
        at: Instant::now(),
        sets: 0,
        cleared: 0,
        strikes: 0,
    });
    let mut target_errors = 0;
    let mut ready = false;
    // A ready job asked to complete (or cancelled: a point-in-time copy) turns
    // write-blocking, so the rest only shrinks, and stops once the disk is in sync.
    let mut finishing: Option<Stop> = None;
    let stop = loop {
        if job.cancel_requested() && (job.force_requested() || !ready) {
            break Stop::Cancel { ready: false };
        }
        if finishing.is_none() && ready {
            if job.cancel_requested() {
                finishing = Some(Stop::Cancel { ready: true });
            } else if job.complete_requested() {
                finishing = Some(Stop::Complete);
            }
            if finishing.is_some() && !filter.is_active() {
                filter.set_active(true);
                job.set_detail("write_blocking", true.into());
            }
        }
        if job.pause_requested() && finishing.is_none() {
            // Copies and mirrored writes that fail while paused (a stopped job's target
            // is often down) leave their chunks dirty; they are not news at resume.
            target_errors = filter.target_errors();
            ctx.failure.take();
            job.set_state(JobState::Paused);
            poller::sleep(IDLE_TICK).await;
            continue;
        }
        match check_failures(job, ctx, filter, opts, &mut target_errors) {
            Some(Retry::Stop(stop)) => break stop,
            // A failing side is not hammered: the range is tried again a little later.
            Some(Retry::Later) => poller::sleep(RETRY_DELAY).await,
            None => {}
        }
        job.set_state(if ready { JobState::Ready } else { JobState::Running });
        publish(job, ctx);
        if let Some(a) = adaptive.as_mut()
            && a.outrun(ctx)
        {
            tracing::info!(job = job.id, "writes outrun the copy: switching to write-blocking");
            filter.set_active(true);
            job.set_detail("write_blocking", true.into());
            adaptive = None;
        }
        if ctx.in_flight.get() >= in_flight_cap(opts, job.speed()) || pool.is_full() {
            pool.finished().await;
            continue;
        }
        let Some(c) = ctx.dirty.next_set(cursor) else {
            if pool.live() > 0 {
                pool.finished().await;
                continue;
            }
            if !ready {
                ready = true;
                job.set_state(JobState::Ready);
            }
            if let Some(stop) = finishing.take() {
                break stop;
            }
            cursor = 0;
            poller::sleep(IDLE_TICK).await;
            continue;
        };
        if ctx.busy.is_taken(c) {
            // Being copied or mirrored: look past it, and let those finish.
            cursor = c + 1;
            if pool.live() > 0 {
                pool.finished().await;
            } else {
                poller::sleep(Duration::from_millis(1)).await;
            }
            continue;
        }
        let end = run_end(ctx, c);
        if !ctx.busy.try_take(c, end) {
            cursor = c + 1;
            continue;
        }
        take(ctx, c, end);
        // As in QEMU, the limit counts the bytes copied, not the zeroes written.
        let data = ctx.data.get();
        limiter.wait(data - charged, job.speed()).await;
        charged = data;
        if pool.spawn(copy(ctx.clone(), c, end)).is_err() {
            unreachable!("the pool had room");
        }
        cursor = end;
    };
    pool.drain().await;
    publish(job, ctx);
    stop
}

/// Bytes of copies in flight at most. The limiter charges the data a copy moved once
/// it is known (zeroes are not charged, as in QEMU), so under a speed limit no more
/// than a tenth of a second's worth may be in flight: otherwise a whole buffer of
/// copies would go out before the first charge.
fn in_flight_cap(opts: &MirrorOptions, speed: u64) -> u64 {
    if speed == 0 { opts.buf_size } else { opts.buf_size.min((speed / 10).max(1)) }
}

/// Publishes progress: bytes copied, and the total as now known.
fn publish(job: &Job, ctx: &Ctx) {
    let done = ctx.copied.get();
    job.set_progress(done, done + ctx.dirty.dirty_bytes() + ctx.in_flight.get());
}

/// What the loop does about a failure.
enum Retry {
    Stop(Stop),
    Later,
}

/// Applies the error policies to failures since the last look.
fn check_failures(
    job: &Job,
    ctx: &Ctx,
    filter: &MirrorFilter,
    opts: &MirrorOptions,
    target_errors: &mut u64,
) -> Option<Retry> {
    let mirrored = filter.target_errors();
    let failure = ctx
        .failure
        .take()
        .or_else(|| (mirrored > *target_errors).then_some((Side::Target, IoError::Os(libc::EIO))));
    *target_errors = mirrored;
    let (side, e) = failure?;
    let policy = if side == Side::Source { opts.on_source_error } else { opts.on_target_error };
    let msg = format!("{} failed: {e}", side.name());
    match policy {
        ErrorPolicy::Report => Some(Retry::Stop(Stop::Failed(msg))),
        ErrorPolicy::Ignore => {
            tracing::warn!(job = job.id, "{msg}; the range stays dirty and is tried again");
            job.set_detail("last_error", msg.into());
            Some(Retry::Later)
        }
        ErrorPolicy::Stop => {
            job.set_error(Some(format!("stopped: {msg}")));
            let _ = job.pause();
            Some(Retry::Later)
        }
    }
}
