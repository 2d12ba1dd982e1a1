//! The stream job: pulls everything a disk's backing chain provides up into the disk's
//! own image, then drops the backing link, while the guest keeps running.
//!
//! The job walks the disk in chunks, asks block status where each run comes from, and
//! for runs the chain provides (depth 2 or more, holding data) reads them through the
//! chain and *populates* the image: the qcow2 engine writes only the clusters the image
//! does not hold yet, judged under the clusters' lock, so a guest write that landed
//! meanwhile is never overwritten with older backing data. Runs the chain holds as
//! zeros need nothing: once the image stands alone, what it does not hold reads as
//! zeros. At the end the disk is quiesced, everything is flushed, the header stops
//! naming a backing file (one write, synced) and the shards stop reading the chain.

use std::sync::Arc;
use std::time::Duration;

use drivers::{Bdev, IoSeg};
use poller::ReactorHandle;

use crate::job::{Job, JobError, JobKind, JobState, Jobs, off_reactor};
use crate::speed::Limiter;

/// Bytes asked and copied at a time.
const CHUNK: u64 = 1 << 20;
/// How long the final quiesce may wait.
const QUIESCE_TIMEOUT: Duration = Duration::from_secs(30);

/// A stream to start.
pub struct Stream {
    pub disk: Arc<Bdev>,
    /// Every reactor that may serve the disk (the first runs the job).
    pub reactors: Vec<ReactorHandle>,
    /// Bytes per second; 0: unlimited.
    pub speed: u64,
    /// Called off the reactors when the job has ended (`true`: the image stands alone).
    pub on_end: Box<dyn FnOnce(bool) + Send>,
}

/// Validates `s` and starts it as a job of `jobs`.
pub fn start(jobs: &Arc<Jobs>, s: Stream) -> Result<Arc<Job>, JobError> {
    let chain = s.disk.driver().chain();
    if chain.len() < 2 {
        return Err(JobError::Invalid(format!(
            "disk: `{}` has no backing file to stream from",
            s.disk.name()
        )));
    }
    let job = Job::new(jobs.next_id(), JobKind::Stream, s.disk.name(), s.speed);
    let names: Vec<String> = chain.iter().map(|l| l.path.display().to_string()).collect();
    job.set_detail("chain", names.into());
    jobs.add_tracked(job.clone())?;
    let (runner, j) = (s.reactors[0].clone(), job.clone());
    runner.spawn(move || run(j, s));
    Ok(job)
}

async fn run(job: Arc<Job>, s: Stream) {
    job.set_state(JobState::Running);
    let r = match copy(&job, &s.disk).await {
        Ok(true) => finish(&s.disk, &s.reactors).await.map(|()| true),
        Ok(false) => Ok(false),
        Err(e) => Err(e),
    };
    let done = match r {
        Ok(true) => {
            job.set_state(JobState::Concluded);
            true
        }
        Ok(false) => {
            job.set_error(Some("cancelled".into()));
            job.set_state(JobState::Aborted);
            false
        }
        Err(e) => {
            job.set_error(Some(e));
            job.set_state(JobState::Aborted);
            false
        }
    };
    let on_end = s.on_end;
    let j = job.clone();
    if let Err(e) = off_reactor(move || {
        on_end(done);
        j.finish();
    })
    .await
    {
        tracing::error!(job = job.id, "{e}");
        job.finish();
    }
}

/// The pass over the disk; `Ok(false)` when cancelled.
async fn copy(job: &Job, disk: &Arc<Bdev>) -> Result<bool, String> {
    let ch = disk.internal_channel().map_err(|e| format!("disk: {e}"))?;
    let size = disk.info().size;
    let mut limiter = Limiter::new();
    let mut off = 0u64;
    let mut copied = 0u64;
    while off < size {
        if job.cancel_requested() {
            return Ok(false);
        }
        if job.pause_requested() {
            job.set_state(JobState::Paused);
            poller::sleep(Duration::from_millis(10)).await;
            continue;
        }
        job.set_state(JobState::Running);
        let st = ch
            .block_status(off, CHUNK.min(size - off))
            .await
            .map_err(|e| format!("block status at {off}: {e}"))?;
        if st.depth >= 2 && !st.zero {
            let mut buf = poller::dma::alloc_wait(st.len as usize)
                .await
                .map_err(|_| "no buffer".to_string())?;
            let seg = [IoSeg::from_dma(&mut buf)];
            ch.read(off, &seg).await.map_err(|e| format!("reading the chain at {off}: {e}"))?;
            ch.populate(off, &seg).await.map_err(|e| format!("writing the image at {off}: {e}"))?;
            copied += st.len;
            limiter.wait(st.len, job.speed()).await;
        }
        off += st.len;
        job.set_progress(off, size);
        job.set_detail("copied", copied.into());
    }
    Ok(true)
}

/// With the disk quiesced: flush, header, shards (control-plane work, off the reactor).
async fn finish(disk: &Arc<Bdev>, reactors: &[ReactorHandle]) -> Result<(), String> {
    let q = disk.quiesce(reactors, QUIESCE_TIMEOUT).await.map_err(|e| {
        format!("the disk's requests did not finish within {QUIESCE_TIMEOUT:?}: {e}")
    })?;
    let d = disk.clone();
    let r = off_reactor(move || d.driver().drop_backing()).await;
    drop(q);
    r?.map_err(|e| format!("dropping the backing file: {e}"))
}
