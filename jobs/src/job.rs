//! Jobs as the control plane sees them: an id, a type, a disk, a state, progress, a
//! speed limit, error policies and the error that ended them; and the registry that
//! lists them.
//!
//! A job's work runs as a task on a reactor (see `mirror`); the control plane talks to
//! it only through the [`Job`]'s atomics and small locked fields: requests (pause,
//! resume, complete, cancel, a new speed) are flags the task reads between copies, and
//! the task publishes its state and progress the same way. Nothing here is on a data
//! path.
//!
//! With a journal (`[appliance] state_dir`), the registry writes the live jobs to a
//! file whenever one starts or finishes; at start-up the jobs found there — ended by a
//! crash or a stop — are listed as `aborted`, saying what to start again, and the
//! journal is cleared.
//!
//! States: `created` → `running` ⇄ `paused`; a mirror whose target has caught up is
//! `ready` (and goes back to `running`/`paused` as asked); `completing` while it pivots
//! or finishes its point-in-time copy; it ends `concluded` (done) or `aborted`
//! (cancelled before it was ready, or failed: the error says why). Ended jobs stay
//! listed (the last [`HISTORY`] of them).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Ended jobs kept in the list.
pub const HISTORY: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobKind {
    Mirror,
    Stream,
    Commit,
    Backup,
}

impl JobKind {
    pub fn name(self) -> &'static str {
        match self {
            JobKind::Mirror => "mirror",
            JobKind::Stream => "stream",
            JobKind::Commit => "commit",
            JobKind::Backup => "backup",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    Created,
    Running,
    Paused,
    Ready,
    Completing,
    Concluded,
    Aborted,
}

impl JobState {
    pub const ALL: [JobState; 7] = [
        JobState::Created,
        JobState::Running,
        JobState::Paused,
        JobState::Ready,
        JobState::Completing,
        JobState::Concluded,
        JobState::Aborted,
    ];

    pub fn name(self) -> &'static str {
        match self {
            JobState::Created => "created",
            JobState::Running => "running",
            JobState::Paused => "paused",
            JobState::Ready => "ready",
            JobState::Completing => "completing",
            JobState::Concluded => "concluded",
            JobState::Aborted => "aborted",
        }
    }

    pub fn ended(self) -> bool {
        matches!(self, JobState::Concluded | JobState::Aborted)
    }
}

/// What a job does when reading its source or writing its target fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorPolicy {
    /// End the job with the error.
    Report,
    /// Keep the range dirty and try it again later.
    Ignore,
    /// Pause the job (with the error shown) until `job_resume`.
    Stop,
}

impl ErrorPolicy {
    pub fn parse(s: &str) -> Option<ErrorPolicy> {
        match s {
            "report" => Some(ErrorPolicy::Report),
            "ignore" => Some(ErrorPolicy::Ignore),
            "stop" => Some(ErrorPolicy::Stop),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ErrorPolicy::Report => "report",
            ErrorPolicy::Ignore => "ignore",
            ErrorPolicy::Stop => "stop",
        }
    }
}

/// Why a control request on a job was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JobError {
    #[error("no job `{0}`")]
    NotFound(String),
    #[error("job `{0}` is {1}: {2}")]
    WrongState(String, &'static str, &'static str),
    #[error("disk `{0}` already has a job running (`{1}`)")]
    Busy(String, String),
    #[error("{0}")]
    Invalid(String),
}

/// One job.
pub struct Job {
    pub id: String,
    pub kind: JobKind,
    pub disk: String,
    state: Mutex<JobState>,
    /// Bytes done, and the total as now known (grows as writes dirty the disk).
    offset: AtomicU64,
    len: AtomicU64,
    /// Bytes per second; 0: unlimited.
    speed: AtomicU64,
    error: Mutex<Option<String>>,
    /// Kind-specific fields for `job_list` (target, copy mode...).
    details: Mutex<serde_json::Map<String, Value>>,
    want_pause: AtomicBool,
    want_complete: AtomicBool,
    want_cancel: AtomicBool,
    force_cancel: AtomicBool,
    /// Ended, and everything it held is closed.
    finished: (Mutex<bool>, Condvar),
    started: Instant,
    /// When it started, for the journal.
    since: u64,
    /// The registry it is in (to rewrite the journal when it finishes).
    registry: Mutex<std::sync::Weak<Jobs>>,
}

impl Job {
    pub fn new(id: String, kind: JobKind, disk: &str, speed: u64) -> Arc<Job> {
        Arc::new(Job {
            id,
            kind,
            disk: disk.to_string(),
            state: Mutex::new(JobState::Created),
            offset: AtomicU64::new(0),
            len: AtomicU64::new(0),
            speed: AtomicU64::new(speed),
            error: Mutex::new(None),
            details: Mutex::new(serde_json::Map::new()),
            want_pause: AtomicBool::new(false),
            want_complete: AtomicBool::new(false),
            want_cancel: AtomicBool::new(false),
            force_cancel: AtomicBool::new(false),
            finished: (Mutex::new(false), Condvar::new()),
            started: Instant::now(),
            since: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            registry: Mutex::new(std::sync::Weak::new()),
        })
    }

    pub fn state(&self) -> JobState {
        *self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Moves to `s`, logging the change. An ended job stays ended.
    pub fn set_state(&self, s: JobState) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if *st == s || st.ended() {
            return;
        }
        tracing::info!(
            job = self.id,
            disk = self.disk,
            kind = self.kind.name(),
            "job {} -> {}",
            st.name(),
            s.name()
        );
        *st = s;
    }

    pub fn set_progress(&self, offset: u64, len: u64) {
        self.offset.store(offset, Ordering::Relaxed);
        self.len.store(len.max(offset), Ordering::Relaxed);
    }

    pub fn progress(&self) -> (u64, u64) {
        (self.offset.load(Ordering::Relaxed), self.len.load(Ordering::Relaxed))
    }

    pub fn speed(&self) -> u64 {
        self.speed.load(Ordering::Relaxed)
    }

    pub fn set_speed(&self, bytes_per_sec: u64) {
        self.speed.store(bytes_per_sec, Ordering::Relaxed);
    }

    pub fn error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Records the error that ended (or stopped) the job.
    pub fn set_error(&self, e: Option<String>) {
        if let Some(e) = &e {
            tracing::warn!(job = self.id, disk = self.disk, "job error: {e}");
        }
        *self.error.lock().unwrap_or_else(|p| p.into_inner()) = e;
    }

    pub fn set_detail(&self, key: &str, v: Value) {
        self.details.lock().unwrap_or_else(|p| p.into_inner()).insert(key.to_string(), v);
    }

    pub fn pause_requested(&self) -> bool {
        self.want_pause.load(Ordering::SeqCst)
    }

    pub fn complete_requested(&self) -> bool {
        self.want_complete.load(Ordering::SeqCst)
    }

    pub fn cancel_requested(&self) -> bool {
        self.want_cancel.load(Ordering::SeqCst)
    }

    pub fn force_requested(&self) -> bool {
        self.force_cancel.load(Ordering::SeqCst)
    }

    /// `job_pause`.
    pub fn pause(&self) -> Result<(), JobError> {
        self.check_live("cannot be paused")?;
        self.want_pause.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// `job_resume` (also continues a job an error stopped).
    pub fn resume(&self) -> Result<(), JobError> {
        self.check_live("cannot be resumed")?;
        let mut e = self.error.lock().unwrap_or_else(|p| p.into_inner());
        if e.as_deref().is_some_and(|e| e.starts_with("stopped: ")) {
            *e = None;
        }
        drop(e);
        self.want_pause.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// `job_complete`: only once the job is ready.
    pub fn complete(&self) -> Result<(), JobError> {
        let s = self.state();
        if s != JobState::Ready {
            return Err(JobError::WrongState(
                self.id.clone(),
                s.name(),
                "only a ready job completes",
            ));
        }
        self.want_complete.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// `job_cancel`: a ready mirror finishes as a point-in-time copy without pivoting;
    /// with `force`, or before it is ready, the job stops at once.
    pub fn cancel(&self, force: bool) -> Result<(), JobError> {
        self.check_live("has already ended")?;
        self.force_cancel.fetch_or(force, Ordering::SeqCst);
        self.want_cancel.store(true, Ordering::SeqCst);
        Ok(())
    }

    fn check_live(&self, what: &'static str) -> Result<(), JobError> {
        let s = self.state();
        if s.ended() || s == JobState::Completing {
            return Err(JobError::WrongState(self.id.clone(), s.name(), what));
        }
        Ok(())
    }

    /// Marks the job finished: ended, its target and old drivers closed.
    pub fn finish(&self) {
        let (m, c) = &self.finished;
        *m.lock().unwrap_or_else(|p| p.into_inner()) = true;
        c.notify_all();
        let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner()).upgrade();
        if let Some(r) = registry {
            r.save();
        }
    }

    /// Waits until [`Job::finish`], at most until `deadline`; whether it finished.
    pub fn wait_finished(&self, deadline: Instant) -> bool {
        let (m, c) = &self.finished;
        let mut done = m.lock().unwrap_or_else(|p| p.into_inner());
        while !*done {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            done = c.wait_timeout(done, left).unwrap_or_else(|p| p.into_inner()).0;
        }
        true
    }

    /// The job as `job_list` shows it.
    pub fn to_json(&self) -> Value {
        let (offset, len) = self.progress();
        let mut v = json!({
            "job": self.id,
            "type": self.kind.name(),
            "disk": self.disk,
            "state": self.state().name(),
            "offset": offset,
            "len": len,
            "speed": self.speed(),
            "paused": self.pause_requested(),
            "error": self.error(),
            "seconds": self.started.elapsed().as_secs_f64(),
        });
        if let Value::Object(m) = &mut v {
            for (k, x) in self.details.lock().unwrap_or_else(|p| p.into_inner()).iter() {
                m.insert(k.clone(), x.clone());
            }
        }
        v
    }
}

/// Every job of the appliance.
#[derive(Default)]
pub struct Jobs {
    list: Mutex<Vec<Arc<Job>>>,
    next: AtomicU64,
    /// The journal of live jobs, if kept.
    journal: Option<std::path::PathBuf>,
    /// Stopping: jobs ending now stay in the journal (the stop ended them).
    frozen: AtomicBool,
}

impl Jobs {
    pub fn new() -> Arc<Jobs> {
        Arc::new(Jobs::default())
    }

    /// A registry keeping its journal in `dir` (`jobs.json`): the jobs a previous run
    /// left there are listed as aborted, and the journal starts empty.
    pub fn with_journal(dir: &std::path::Path) -> Arc<Jobs> {
        let path = dir.join("jobs.json");
        let jobs = Arc::new(Jobs { journal: Some(path.clone()), ..Jobs::default() });
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => {
                tracing::warn!("{}: cannot read the job journal: {e}", path.display());
                String::new()
            }
        };
        let entries: Vec<Value> = if text.trim().is_empty() {
            Vec::new()
        } else {
            serde_json::from_str(&text).unwrap_or_else(|e| {
                tracing::warn!(
                    "{}: the job journal is not valid ({e}); ignoring it",
                    path.display()
                );
                Vec::new()
            })
        };
        for e in entries.iter().take(HISTORY) {
            jobs.recovered(e);
        }
        jobs.save();
        jobs
    }

    /// Lists a job a previous run left in its journal, as aborted.
    fn recovered(&self, e: &Value) {
        let (Some(id), Some(disk)) = (e["job"].as_str(), e["disk"].as_str()) else { return };
        let kind = match e["type"].as_str() {
            Some("stream") => JobKind::Stream,
            Some("commit") => JobKind::Commit,
            Some("backup") => JobKind::Backup,
            _ => JobKind::Mirror,
        };
        if let Some(n) = id.strip_prefix("job-").and_then(|n| n.parse::<u64>().ok()) {
            self.next.fetch_max(n, Ordering::Relaxed);
        }
        let job = Job::new(id.to_string(), kind, disk, 0);
        let target = e["target"].as_str().map(|t| format!(" to {t}")).unwrap_or_default();
        let what = match kind {
            JobKind::Mirror => "its target is a consistent partial copy",
            JobKind::Stream => "the image keeps its backing file and what was pulled up",
            JobKind::Commit => "the base holds part of the commit, the disk its old image",
            JobKind::Backup => {
                "the target is an incomplete backup (an incremental one's bitmap was \
                 cleared at its start: take a full backup)"
            }
        };
        let msg = format!(
            "ended when the appliance stopped: {} of `{disk}`{target}; {what}; start it again",
            kind.name()
        );
        tracing::warn!(job = id, "{msg}");
        job.set_error(Some(msg));
        job.set_detail("target", e["target"].clone());
        *job.state.lock().unwrap_or_else(|p| p.into_inner()) = JobState::Aborted;
        job.finish();
        self.list.lock().unwrap_or_else(|p| p.into_inner()).push(job);
    }

    /// Writes the live jobs to the journal (a new file renamed over the old).
    fn save(&self) {
        let Some(path) = &self.journal else { return };
        if self.frozen.load(Ordering::SeqCst) {
            return;
        }
        let live: Vec<Value> = self
            .all()
            .iter()
            .filter(|j| !j.state().ended())
            .map(|j| {
                let d = j.details.lock().unwrap_or_else(|p| p.into_inner());
                json!({"job": j.id, "type": j.kind.name(), "disk": j.disk, "target": d.get("target"), "since": j.since})
            })
            .collect();
        let tmp = path.with_extension("json.new");
        let r = std::fs::write(&tmp, Value::Array(live).to_string())
            .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
            .and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = r {
            tracing::warn!("{}: cannot write the job journal: {e}", path.display());
        }
    }

    /// The appliance is stopping: the journal keeps the jobs live now, which the stop
    /// is about to end.
    pub fn stopping(&self) {
        self.save();
        self.frozen.store(true, Ordering::SeqCst);
    }

    /// A fresh job id.
    pub fn next_id(&self) -> String {
        format!("job-{}", self.next.fetch_add(1, Ordering::Relaxed) + 1)
    }

    /// Registers `job`, unless its disk already has a live one. Drops the oldest ended
    /// jobs past [`HISTORY`].
    pub fn add(&self, job: Arc<Job>) -> Result<(), JobError> {
        let mut l = self.list.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(o) = l.iter().find(|j| j.disk == job.disk && !j.state().ended()) {
            return Err(JobError::Busy(job.disk.clone(), o.id.clone()));
        }
        l.push(job.clone());
        let ended = l.iter().filter(|j| j.state().ended()).count();
        if ended > HISTORY {
            let mut drop = ended - HISTORY;
            l.retain(|j| {
                let go = drop > 0 && j.state().ended();
                drop -= usize::from(go);
                !go
            });
        }
        drop(l);
        self.save();
        Ok(())
    }

    /// Registers `job` in `self` (as [`Jobs::add`]) and remembers the registry, so the
    /// journal is rewritten when the job finishes.
    pub fn add_tracked(self: &Arc<Self>, job: Arc<Job>) -> Result<(), JobError> {
        *job.registry.lock().unwrap_or_else(|p| p.into_inner()) = Arc::downgrade(self);
        self.add(job)
    }

    pub fn get(&self, id: &str) -> Result<Arc<Job>, JobError> {
        let l = self.list.lock().unwrap_or_else(|p| p.into_inner());
        l.iter().find(|j| j.id == id).cloned().ok_or_else(|| JobError::NotFound(id.to_string()))
    }

    /// The live job on `disk`, if any.
    pub fn live_on(&self, disk: &str) -> Option<Arc<Job>> {
        let l = self.list.lock().unwrap_or_else(|p| p.into_inner());
        l.iter().find(|j| j.disk == disk && !j.state().ended()).cloned()
    }

    /// Every job, oldest first.
    pub fn all(&self) -> Vec<Arc<Job>> {
        self.list.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn to_json(&self) -> Value {
        Value::Array(self.all().iter().map(|j| j.to_json()).collect())
    }

    /// Waits (control plane) for every job to finish, at most `timeout` in all.
    pub fn wait_finished(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        for j in self.all() {
            if !j.wait_finished(deadline) {
                tracing::warn!(job = j.id, "job still running after {timeout:?}");
            }
        }
    }
}

/// Runs blocking control-plane work (closing drivers, header updates that wait on
/// reactors) on a helper thread, and waits for it from a reactor without blocking it.
/// Fails only if no thread can be started.
pub async fn off_reactor<R: Send + 'static>(
    f: impl FnOnce() -> R + Send + 'static,
) -> Result<R, String> {
    let slot: Arc<Mutex<Option<R>>> = Arc::new(Mutex::new(None));
    let s2 = slot.clone();
    std::thread::Builder::new()
        .name("job-control".into())
        .spawn(move || {
            let r = f();
            *s2.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
        })
        .map_err(|e| format!("cannot start a helper thread: {e}"))?;
    loop {
        if let Some(r) = slot.lock().unwrap_or_else(|p| p.into_inner()).take() {
            return Ok(r);
        }
        poller::sleep(Duration::from_millis(1)).await;
    }
}

/// Ends a job: `f` (closing drivers, telling the appliance: control-plane work) runs off
/// the reactor, then the job is marked `state` and finished; if no helper thread can
/// run it, the job is still marked and finished.
pub async fn end_off_reactor(job: &Arc<Job>, state: JobState, f: impl FnOnce() + Send + 'static) {
    let j = job.clone();
    let r = off_reactor(move || {
        f();
        j.set_state(state);
        j.finish();
    })
    .await;
    if let Err(e) = r {
        tracing::error!(job = job.id, "{e}");
        job.set_state(state);
        job.finish();
    }
}
