//! The backup job (push): writes a point-in-time copy of a disk to a target while the
//! guest keeps writing (QEMU's `blockdev-backup`, with its copy-before-write filter).
//!
//! At the start, with the disk quiesced for an instant, the job puts a
//! [`BackupFilter`] in front of the disk and fills its *to-do* bitmap: every chunk for
//! `sync = "full"`, or the chunks a named dirty bitmap marks for `"incremental"` and
//! `"bitmap"`. An incremental backup also clears that bitmap at the same instant (it
//! then records what changes after the backup's point in time), keeping a frozen copy
//! of what it held.
//!
//! From then on two kinds of copies move the old contents of to-do chunks to the target:
//! - the job's copy loop takes runs of to-do chunks busy, copies them (block status
//!   decides between data and zeroes), *then* clears their to-do bits and releases
//!   them;
//! - a guest change that touches a to-do chunk is a copy-before-write: the filter takes
//!   the chunks it touches busy (waiting while a copy holds one), the request copies the
//!   old contents of the to-do ones to the target, the filter clears their bits, the
//!   change goes to the disk, and the chunks are released.
//!
//! So a chunk's to-do bit is cleared only once the target holds its contents as they
//! were at the start, and no change reaches a to-do chunk before that. The job ends when
//! no chunk is to do: the filter is removed (quiesced), the target flushed and closed.
//! A failure — reading the disk, writing the target, or a copy-before-write that could
//! not save a chunk (the guest's write still goes ahead: the backup breaks, not the
//! guest) — aborts the job; an incremental backup then merges its frozen copy back into
//! the bitmap, so the next one copies those chunks again.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use drivers::{Bdev, BdevChannel, Decision, IoError, WriteFilter, ZeroFlags};
use poller::{ReactorHandle, TaskPool};

use crate::bitmap::{Busy, DirtyBitmap};
use crate::job::{Job, JobError, JobKind, JobState, Jobs, end_off_reactor};
use crate::mirror::{MAX_COPY, quiesce};
use crate::speed::Limiter;

/// The job's chunk unless a bitmap's coarser one is used.
pub const DEFAULT_GRANULARITY: u64 = 64 << 10;
/// Copies in flight at most.
const MAX_COPIES: u32 = 8;

/// What the backup copies.
#[derive(Clone)]
pub enum BackupSync {
    /// The whole disk.
    Full,
    /// What `map` (the disk's named bitmap `name`) marks; `clear`: the bitmap is
    /// cleared at the start, and its bits merged back if the backup fails
    /// (`incremental`), else left as it is (`bitmap`).
    Bitmap { name: String, map: Arc<DirtyBitmap>, clear: bool },
    /// Image fleecing: no copies of its own, only copy-before-write, until cancelled
    /// (the point-in-time export is removed), which ends it `concluded`. `bitmap`: the
    /// disk's bitmap, copied into the second (which the export offers) and cleared at
    /// the instant.
    Fleece { bitmap: Option<(Arc<DirtyBitmap>, Arc<DirtyBitmap>)>, view: Arc<FleeceView> },
}

/// What a point-in-time export reads: the chunks not saved yet from the disk (see
/// `drivers::api::view`).
pub struct FleeceView {
    origin: Arc<Bdev>,
    todo: Arc<DirtyBitmap>,
}

impl FleeceView {
    /// A view of `origin` where nothing is saved yet.
    pub fn new(origin: Arc<Bdev>) -> Arc<FleeceView> {
        let todo = Arc::new(DirtyBitmap::new(origin.info().size, DEFAULT_GRANULARITY));
        todo.set_all();
        Arc::new(FleeceView { origin, todo })
    }
}

impl drivers::api::view::PointInTime for FleeceView {
    fn origin(&self) -> &Arc<Bdev> {
        &self.origin
    }

    fn extent(&self, off: u64, max: u64) -> (bool, u64) {
        self.todo.extent(off, max)
    }
}

/// A backup to start.
pub struct Backup {
    pub source: Arc<Bdev>,
    pub target: Arc<Bdev>,
    /// The target as `job_list` shows it.
    pub target_name: String,
    /// The target reads as zeros everywhere (made for this job): zero runs are skipped.
    pub target_zeroed: bool,
    /// Data reaches the target compressed (its driver must compress: a qcow2 image).
    pub compress: bool,
    pub sync: BackupSync,
    /// Bytes per second; 0: unlimited.
    pub speed: u64,
    /// Every reactor that may serve the disk (the first runs the job).
    pub reactors: Vec<ReactorHandle>,
    /// Called off the reactors once the job has ended and the target is closed
    /// (`true`: the backup is complete).
    pub on_end: Box<dyn FnOnce(bool) + Send>,
}

/// Keeps to-do chunks from changing before their old contents reach the target.
pub struct BackupFilter {
    todo: Arc<DirtyBitmap>,
    busy: Arc<Busy>,
    target: Arc<Bdev>,
    /// Copy-before-writes that failed (the backup is broken).
    failed: AtomicU64,
    /// Chunks saved by copy-before-write.
    saved: AtomicU64,
    /// Saved chunks reach the target compressed.
    compress: bool,
}

impl BackupFilter {
    fn chunks(&self, off: u64, end: u64) -> (u64, u64) {
        self.todo.chunks_of(off, end - off)
    }
}

impl WriteFilter for BackupFilter {
    fn begin(&self, off: u64, len: u64) -> Decision {
        let (first, end) = self.todo.chunks_of(off, len);
        if !self.todo.any_in(first, end) {
            return Decision::Track;
        }
        if self.busy.try_take(first, end) { Decision::CopyBefore } else { Decision::Wait }
    }

    fn changed(&self, _off: u64, _len: u64) {}

    fn compress(&self) -> bool {
        self.compress
    }

    fn mirrored(&self, _off: u64, _len: u64, _source_ok: bool, _target_ok: bool) {
        unreachable!("a backup filter never asks to mirror");
    }

    fn target(&self) -> Option<Arc<Bdev>> {
        Some(self.target.clone())
    }

    fn copy_before(&self, off: u64, end: u64) -> Option<(u64, u64)> {
        // Only inside the change's range: the chunks past it are not reserved.
        if off >= end {
            return None;
        }
        let (first, last) = self.chunks(off, end);
        let c = (first..last).find(|&c| self.todo.is_set(c))?;
        let max = (MAX_COPY / self.todo.granularity()).max(1);
        let mut e = c + 1;
        while e < last && e - c < max && self.todo.is_set(e) {
            e += 1;
        }
        let (o, _) = self.todo.range(c);
        let (lo, ll) = self.todo.range(e - 1);
        Some((o, lo + ll - o))
    }

    fn copied(&self, off: u64, len: u64, ok: bool) {
        if !ok {
            self.failed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let (first, end) = self.todo.chunks_of(off, len);
        for c in first..end {
            self.todo.clear(c);
        }
        self.saved.fetch_add(end - first, Ordering::Relaxed);
    }

    fn release(&self, off: u64, len: u64) {
        let (first, end) = self.todo.chunks_of(off, len);
        self.busy.release(first, end);
    }
}

/// Validates `b` and starts it as a job of `jobs`.
pub fn start(jobs: &Arc<Jobs>, b: Backup) -> Result<Arc<Job>, JobError> {
    if Arc::ptr_eq(&b.source, &b.target) {
        return Err(JobError::Invalid("target: the disk itself".into()));
    }
    if b.target.info().size != b.source.info().size || b.target.info().read_only {
        return Err(JobError::Invalid(format!(
            "target: {} is {} bytes{}, the disk {} bytes",
            b.target_name,
            b.target.info().size,
            if b.target.info().read_only { " and read-only" } else { "" },
            b.source.info().size
        )));
    }
    let job = Job::new(jobs.next_id(), JobKind::Backup, b.source.name(), b.speed);
    job.set_detail("target", b.target_name.clone().into());
    let sync = match &b.sync {
        BackupSync::Full => "full".to_string(),
        BackupSync::Bitmap { name, clear: true, .. } => format!("incremental ({name})"),
        BackupSync::Bitmap { name, clear: false, .. } => format!("bitmap ({name})"),
        BackupSync::Fleece { .. } => "none (point-in-time export)".to_string(),
    };
    job.set_detail("sync", sync.into());
    jobs.add_tracked(job.clone())?;
    let (runner, j) = (b.reactors[0].clone(), job.clone());
    runner.spawn(move || run(j, b));
    Ok(job)
}

async fn run(job: Arc<Job>, b: Backup) {
    let Backup { source, target, reactors, sync, on_end, target_zeroed, compress, .. } = b;
    let out = Out { target: &target, zeroed: target_zeroed, compress };
    let r = backup(&job, &source, &out, &reactors, &sync).await;
    let done = match r {
        Ok(true) => true,
        Ok(false) => {
            job.set_error(Some("cancelled".into()));
            false
        }
        Err(e) => {
            job.set_error(Some(e));
            false
        }
    };
    // Ended once the target is closed (its metadata written, its file unlocked).
    let ended = if done { JobState::Concluded } else { JobState::Aborted };
    let id = job.id.clone();
    end_off_reactor(&job, ended, move || {
        if let Err(e) = target.close() {
            tracing::warn!(job = id, "closing the backup target: {e}");
        }
        on_end(done);
    })
    .await;
}

/// What the copies share.
struct Ctx {
    src: BdevChannel,
    dst: BdevChannel,
    filter: Arc<BackupFilter>,
    zeroed: bool,
    compress: bool,
    in_flight: Cell<u64>,
    copied: Cell<u64>,
    failure: Cell<Option<String>>,
}

/// Where the backup goes, and how.
struct Out<'a> {
    target: &'a Arc<Bdev>,
    /// The target reads as zeros everywhere.
    zeroed: bool,
    compress: bool,
}

/// The whole job; `Ok(false)` when cancelled.
async fn backup(
    job: &Arc<Job>,
    source: &Arc<Bdev>,
    out: &Out<'_>,
    reactors: &[ReactorHandle],
    sync: &BackupSync,
) -> Result<bool, String> {
    let Out { target, zeroed, compress } = *out;
    let size = source.info().size;
    let granularity = match sync {
        BackupSync::Full | BackupSync::Fleece { .. } => DEFAULT_GRANULARITY,
        BackupSync::Bitmap { map, .. } => map.granularity().max(DEFAULT_GRANULARITY),
    };
    let todo = match sync {
        BackupSync::Fleece { view, .. } => view.todo.clone(),
        _ => Arc::new(DirtyBitmap::new(size, granularity)),
    };
    let filter = Arc::new(BackupFilter {
        busy: Arc::new(Busy::new(todo.chunks())),
        todo: todo.clone(),
        target: target.clone(),
        failed: AtomicU64::new(0),
        saved: AtomicU64::new(0),
        compress,
    });
    let ctx = Rc::new(Ctx {
        src: source.internal_channel().map_err(|e| format!("disk: {e}"))?,
        dst: target.internal_channel().map_err(|e| format!("target: {e}"))?,
        filter: filter.clone(),
        zeroed,
        compress,
        in_flight: Cell::new(0),
        copied: Cell::new(0),
        failure: Cell::new(None),
    });
    // The point in time: filter, to-do set and bitmap clear at one instant.
    let frozen = {
        let q = quiesce(source, reactors).await?;
        source.set_filter(&q, Some(filter.clone()));
        match sync {
            BackupSync::Full => {
                todo.set_all();
                None
            }
            BackupSync::Fleece { bitmap, .. } => {
                todo.set_all();
                if let Some((map, copy)) = bitmap {
                    copy.merge_from(map);
                    map.clear_all();
                }
                None
            }
            BackupSync::Bitmap { map, clear, .. } => {
                todo.merge_from(map);
                let frozen = DirtyBitmap::new(size, map.granularity());
                frozen.merge_from(map);
                if *clear {
                    map.clear_all();
                }
                clear.then_some(frozen)
            }
        }
    };
    job.set_state(JobState::Running);
    job.set_detail("total", todo.dirty_bytes().into());
    let r = match sync {
        BackupSync::Fleece { .. } => hold(job, &ctx).await,
        _ => copy_loop(job, &ctx).await,
    };
    let q = quiesce(source, reactors)
        .await
        .map_err(|e| format!("{e}; the disk still has the backup's filter"))?;
    source.set_filter(&q, None);
    drop(q);
    let r = match r {
        Ok(true) => ctx.dst.flush().await.map(|()| true).map_err(|e| format!("flushing: {e}")),
        other => other,
    };
    if r != Ok(true)
        && let (Some(frozen), BackupSync::Bitmap { map, name, .. }) = (&frozen, sync)
    {
        map.merge_from(frozen);
        tracing::info!(job = job.id, bitmap = %name, "the backup did not complete: the bitmap keeps its bits");
    }
    r
}

/// Fleecing: copy-before-write only, until cancelled (a normal end) or broken.
async fn hold(job: &Job, ctx: &Ctx) -> Result<bool, String> {
    loop {
        if job.cancel_requested() {
            return Ok(true);
        }
        if ctx.filter.failed.load(Ordering::Relaxed) > 0 {
            return Err("a guest write could not save the old contents of its range to the \
                        temporary image; the point-in-time export is broken"
                .into());
        }
        publish(job, ctx);
        poller::sleep(Duration::from_millis(20)).await;
    }
}

/// Copies every to-do chunk; `Ok(false)` when cancelled.
async fn copy_loop(job: &Job, ctx: &Rc<Ctx>) -> Result<bool, String> {
    let pool = TaskPool::new(MAX_COPIES);
    let mut limiter = Limiter::new();
    let mut cursor = 0u64;
    let todo = &ctx.filter.todo;
    let busy = &ctx.filter.busy;
    let r = loop {
        if job.cancel_requested() {
            break Ok(false);
        }
        if let Some(e) = ctx.failure.take() {
            break Err(e);
        }
        if ctx.filter.failed.load(Ordering::Relaxed) > 0 {
            break Err("a guest write could not save the old contents of its range to the \
                       target (copy-before-write failed); the backup is broken"
                .into());
        }
        if job.pause_requested() {
            job.set_state(JobState::Paused);
            poller::sleep(Duration::from_millis(10)).await;
            continue;
        }
        job.set_state(JobState::Running);
        publish(job, ctx);
        if pool.is_full() {
            pool.finished().await;
            continue;
        }
        let Some(c) = todo.next_set(cursor) else {
            if pool.live() > 0 {
                pool.finished().await;
                continue;
            }
            break Ok(true);
        };
        let max = (MAX_COPY / todo.granularity()).max(1);
        let mut end = c + 1;
        while end < todo.chunks() && end - c < max && todo.is_set(end) && !busy.is_taken(end) {
            end += 1;
        }
        if !busy.try_take(c, end) {
            // A guest write is saving it: look past it.
            cursor = end;
            poller::sleep(Duration::from_micros(100)).await;
            continue;
        }
        let (off, _) = todo.range(c);
        let (lo, ll) = todo.range(end - 1);
        let len = lo + ll - off;
        limiter.wait(len, job.speed()).await;
        if pool.spawn(copy(ctx.clone(), c, end, len)).is_err() {
            unreachable!("the pool had room");
        }
        cursor = end;
    };
    pool.drain().await;
    publish(job, ctx);
    r
}

/// Copies the to-do chunks of `c..end` (taken busy), clears their to-do bits once the
/// target holds them, and releases the chunks. Only to-do ones: between the loop's
/// look and its take, a guest write may have saved (and then changed) some.
async fn copy(ctx: Rc<Ctx>, c: u64, end: u64, len: u64) {
    let todo = &ctx.filter.todo;
    ctx.in_flight.set(ctx.in_flight.get() + len);
    let mut k = c;
    while k < end {
        if !todo.is_set(k) {
            k += 1;
            continue;
        }
        let mut e = k + 1;
        while e < end && todo.is_set(e) {
            e += 1;
        }
        let (o, _) = todo.range(k);
        let (lo, ll) = todo.range(e - 1);
        match copy_range(&ctx, o, lo + ll - o).await {
            Ok(()) => {
                for x in k..e {
                    todo.clear(x);
                }
                ctx.copied.set(ctx.copied.get() + lo + ll - o);
            }
            Err(err) => {
                let first = ctx.failure.take();
                ctx.failure.set(first.or(Some(err)));
                break;
            }
        }
        k = e;
    }
    ctx.in_flight.set(ctx.in_flight.get() - len);
    ctx.filter.busy.release(c, end);
}

async fn copy_range(ctx: &Ctx, off: u64, len: u64) -> Result<(), String> {
    let mut pos = off;
    while pos < off + len {
        let st = ctx
            .src
            .block_status(pos, off + len - pos)
            .await
            .map_err(|e| format!("reading the disk at {pos}: {e}"))?;
        let n = st.len;
        let target = |e: IoError| format!("writing the target at {pos}: {e}");
        if st.zero {
            if !ctx.zeroed {
                ctx.dst.write_zeroes(pos, n, ZeroFlags::default()).await.map_err(target)?;
            }
        } else {
            let mut buf = poller::dma::alloc_wait(n as usize)
                .await
                .map_err(|_| format!("no buffer for {n} bytes"))?;
            let seg = [drivers::IoSeg::from_dma(&mut buf)];
            ctx.src.read(pos, &seg).await.map_err(|e| format!("reading the disk at {pos}: {e}"))?;
            if ctx.compress {
                ctx.dst.write_compressed(pos, &seg).await.map_err(target)?;
            } else {
                ctx.dst.write(pos, &seg, false).await.map_err(target)?;
            }
        }
        pos += n;
    }
    Ok(())
}

/// Progress: bytes done (by the job and by copy-before-write) of those to do.
fn publish(job: &Job, ctx: &Ctx) {
    let g = ctx.filter.todo.granularity();
    let saved = ctx.filter.saved.load(Ordering::Relaxed) * g;
    let done = ctx.copied.get() + saved;
    job.set_progress(done, done + ctx.filter.todo.dirty_bytes() + ctx.in_flight.get());
    job.set_detail("copied_before_write", saved.into());
}
