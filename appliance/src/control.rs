//! The control socket: JSON-RPC 2.0 over a unix socket, for operators and orchestration.
//!
//! Framing is one JSON object per line in each direction (newline-delimited JSON-RPC,
//! as `socat`, `nc -U` and every JSON-RPC client library can speak). The socket is
//! created mode 0600: whoever can open it can add disks, so it is as privileged as the
//! appliance's own user. Each client gets a control-plane thread; nothing here touches
//! a reactor except through the same calls start-up uses (`block_on`), so the data path
//! never waits on this module.
//!
//! Methods (params are named, in an object):
//! - `disk_list` — every disk, its exports, size, QoS and state.
//! - `disk_add` `{ <the keys of a [[disk]] table> }` — validated exactly as the config
//!   file is (same keys, same errors), then opened and exported.
//! - `disk_remove` `{name}` — stops the exports (connections drain: requests in flight
//!   are answered), flushes, closes the image (clearing qcow2's dirty bit).
//! - `disk_flush` `{name}` — makes every completed write durable.
//! - `qos_set` `{name, iops?, bandwidth?, burst?}` — changes limits live; omitted keys
//!   keep their value, 0 lifts a limit.
//! - `stats` `{name?}` — per-disk, per-export request counters and mean latency, and
//!   per-reactor tick counters.
//! - `config_get` — the running configuration as TOML (the file plus changes since).
//! - `reload` — re-reads the config file, as SIGHUP does; returns what changed.
//! - block jobs (`block_jobs`): `mirror_start {disk, target, format?, create?, sync?,
//!   granularity?, buf_size?, copy_mode?, speed?, unmap?, on_source_error?,
//!   on_target_error?}` → `{job}`; `job_list {job?}`; `job_complete {job}`;
//!   `job_cancel {job, force?}`; `job_pause`, `job_resume {job}`; `job_set_speed {job,
//!   speed}`; `stream_start {disk, speed?}`; `commit_start {disk, base?, speed?}`;
//!   `backup_start {disk, target, sync?, bitmap?, speed?, compress?, create?, format?}`
//!   (`backup`);
//!   `export_snapshot {disk, name, bitmap?, temp?}`, `export_snapshot_remove {name}`
//!   (`fleece`: point-in-time NBD exports for pull backups).
//! - dirty bitmaps (`bitmaps`): `bitmap_add`, `bitmap_remove`, `bitmap_clear`,
//!   `bitmap_enable`, `bitmap_disable`, `bitmap_merge`, `bitmap_list`.
//! - internal snapshots (`snapshots`): `snapshot_create {disk, name}`,
//!   `snapshot_delete {disk, name}`, `snapshot_list {disk}`.
//!
//! Errors use JSON-RPC's codes: -32700 parse error, -32600 invalid request, -32601
//! unknown method, -32602 invalid params (with `data.key` naming the offending key when
//! there is one), and -32000 for a request that was valid but failed (no such disk, a
//! disk that does not open, a failed flush); every message names the disk or key.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;

use serde_json::{Value, json};

use crate::serve::{Appliance, ServeError};

/// The longest request line accepted.
const MAX_REQUEST_BYTES: u64 = 1 << 20;

pub const PARSE_ERROR: i64 = -32700;
pub const INVALID_REQUEST: i64 = -32600;
pub const METHOD_NOT_FOUND: i64 = -32601;
pub const INVALID_PARAMS: i64 = -32602;
/// A valid request that failed.
pub const FAILED: i64 = -32000;

/// A running control socket.
pub struct ControlServer {
    path: PathBuf,
    listener: Arc<UnixListener>,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ControlServer {
    /// Binds the socket (replacing a stale socket, refusing any other file) with the
    /// configured owner and mode (0600 by default).
    pub fn start(
        control: &config::Control,
        app: Weak<Appliance>,
    ) -> std::io::Result<ControlServer> {
        let path: &Path = &control.socket;
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
            Ok(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "exists and is not a socket; refusing to replace it",
                ));
            }
            Err(_) => {}
        }
        let listener = Arc::new(UnixListener::bind(path)?);
        crate::perms::apply(path, &control.perms)?;
        let stopping = Arc::new(AtomicBool::new(false));
        let (l2, s2) = (listener.clone(), stopping.clone());
        let thread = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || accept_loop(&l2, &s2, &app))?;
        Ok(ControlServer { path: path.to_path_buf(), listener, stopping, thread: Some(thread) })
    }

    /// Stops accepting and removes the socket. Clients mid-call finish their call.
    pub fn shutdown(mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // SAFETY: shutdown(2) on the listening socket we own wakes its blocked accept().
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn accept_loop(listener: &UnixListener, stopping: &AtomicBool, app: &Weak<Appliance>) {
    loop {
        let r = listener.accept();
        if stopping.load(Ordering::SeqCst) {
            return;
        }
        match r {
            Ok((stream, _)) => {
                let app = app.clone();
                let spawned = std::thread::Builder::new()
                    .name("control-client".into())
                    .spawn(move || serve_client(stream, &app));
                if let Err(e) = spawned {
                    tracing::warn!("control socket: cannot start a client thread: {e}");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!("control socket: accept failed: {e}");
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
    }
}

fn serve_client(stream: UnixStream, app: &Weak<Appliance>) {
    let mut out = match stream.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    };
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = match (&mut reader).take(MAX_REQUEST_BYTES + 1).read_until(b'\n', &mut line) {
            Ok(n) => n,
            Err(_) => return,
        };
        if n == 0 {
            return;
        }
        if line.last() != Some(&b'\n') && n as u64 > MAX_REQUEST_BYTES {
            let r = error(
                Value::Null,
                INVALID_REQUEST,
                format!("request longer than {MAX_REQUEST_BYTES} bytes"),
                None,
            );
            let _ = writeln!(out, "{r}");
            return;
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let Some(app) = app.upgrade() else {
            let r = error(Value::Null, FAILED, "the appliance is shutting down".into(), None);
            let _ = writeln!(out, "{r}");
            return;
        };
        if let Some(reply) = handle_line(&app, &line) {
            drop(app);
            if writeln!(out, "{reply}").is_err() {
                return;
            }
        }
    }
}

fn error(id: Value, code: i64, message: String, data: Option<Value>) -> Value {
    let mut e = json!({"code": code, "message": message});
    if let Some(d) = data {
        e["data"] = d;
    }
    json!({"jsonrpc": "2.0", "id": id, "error": e})
}

/// A method's failure: code, message, optional data.
pub(crate) struct Fail(pub i64, pub String, pub Option<Value>);

impl Fail {
    fn params(msg: impl Into<String>) -> Fail {
        Fail(INVALID_PARAMS, msg.into(), None)
    }
}

impl From<ServeError> for Fail {
    fn from(e: ServeError) -> Fail {
        let data = match &e {
            ServeError::NotFound(n)
            | ServeError::Exists(n)
            | ServeError::Clash(n)
            | ServeError::Flush(n, _)
            | ServeError::InUse { disk: n, .. }
            | ServeError::Disk { disk: n, .. }
            | ServeError::JobRunning(n, _) => Some(json!({"disk": n})),
            _ => None,
        };
        Fail(FAILED, e.to_string(), data)
    }
}

/// Answers one request line; `None` for a notification (no `id`).
pub fn handle_line(app: &Arc<Appliance>, line: &[u8]) -> Option<Value> {
    let req: Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(e) => return Some(error(Value::Null, PARSE_ERROR, format!("not JSON: {e}"), None)),
    };
    let Value::Object(req) = req else {
        let msg = if req.is_array() {
            "batches are not supported"
        } else {
            "a request must be a JSON object"
        };
        return Some(error(Value::Null, INVALID_REQUEST, msg.into(), None));
    };
    let id = req.get("id").cloned();
    if let Some(i) = &id
        && !(i.is_string() || i.is_number() || i.is_null())
    {
        return Some(error(
            Value::Null,
            INVALID_REQUEST,
            "`id` must be a string, a number or null".into(),
            None,
        ));
    }
    let reply_id = id.clone().unwrap_or(Value::Null);
    if req.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Some(error(reply_id, INVALID_REQUEST, "`jsonrpc` must be \"2.0\"".into(), None));
    }
    let Some(method) = req.get("method").and_then(Value::as_str) else {
        return Some(error(reply_id, INVALID_REQUEST, "`method` must be a string".into(), None));
    };
    let params = match req.get("params") {
        None | Some(Value::Null) => serde_json::Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => {
            return Some(error(
                reply_id,
                INVALID_PARAMS,
                "`params` must be an object of named parameters".into(),
                None,
            ));
        }
    };
    let result = call(app, method, &params);
    if let Err(Fail(code, msg, _)) = &result {
        tracing::info!(method, code, "control request failed: {msg}");
    }
    id.as_ref()?;
    Some(match result {
        Ok(v) => json!({"jsonrpc": "2.0", "id": reply_id, "result": v}),
        Err(Fail(code, msg, data)) => error(reply_id, code, msg, data),
    })
}

pub(crate) type Params = serde_json::Map<String, Value>;

pub(crate) fn only(params: &Params, method: &str, allowed: &[&str]) -> Result<(), Fail> {
    for k in params.keys() {
        if !allowed.contains(&k.as_str()) {
            let expected =
                if allowed.is_empty() { "no parameters".to_string() } else { allowed.join(", ") };
            return Err(Fail(
                INVALID_PARAMS,
                format!("{method}: unknown parameter `{k}` (expected {expected})"),
                Some(json!({"key": k})),
            ));
        }
    }
    Ok(())
}

fn name_param(params: &Params, method: &str) -> Result<String, Fail> {
    match params.get("name") {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        Some(_) => Err(Fail(
            INVALID_PARAMS,
            format!("{method}: `name` must be a non-empty string"),
            Some(json!({"key": "name"})),
        )),
        None => Err(Fail(
            INVALID_PARAMS,
            format!("{method}: `name` is required"),
            Some(json!({"key": "name"})),
        )),
    }
}

/// Typed access to a method's parameters; every error names the key.
pub(crate) struct Args<'a> {
    pub(crate) method: &'a str,
    pub(crate) params: &'a Params,
}

impl Args<'_> {
    pub(crate) fn bad(&self, key: &str, what: &str) -> Fail {
        Fail(INVALID_PARAMS, format!("{}: `{key}` {what}", self.method), Some(json!({"key": key})))
    }

    pub(crate) fn opt_str(&self, key: &str) -> Result<Option<&str>, Fail> {
        match self.params.get(key) {
            None => Ok(None),
            Some(Value::String(s)) if !s.is_empty() => Ok(Some(s)),
            Some(_) => Err(self.bad(key, "must be a non-empty string")),
        }
    }

    pub(crate) fn str(&self, key: &str) -> Result<&str, Fail> {
        self.opt_str(key)?.ok_or_else(|| self.bad(key, "is required"))
    }

    pub(crate) fn opt_u64(&self, key: &str) -> Result<Option<u64>, Fail> {
        match self.params.get(key) {
            None => Ok(None),
            Some(v) => {
                v.as_u64().map(Some).ok_or_else(|| self.bad(key, "must be a non-negative integer"))
            }
        }
    }

    pub(crate) fn opt_bool(&self, key: &str) -> Result<Option<bool>, Fail> {
        match self.params.get(key) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| self.bad(key, "must be true or false")),
        }
    }

    /// One of `choices`, parsed by `parse`.
    pub(crate) fn opt_enum<T>(
        &self,
        key: &str,
        choices: &str,
        parse: impl Fn(&str) -> Option<T>,
    ) -> Result<Option<T>, Fail> {
        match self.opt_str(key)? {
            None => Ok(None),
            Some(s) => parse(s)
                .map(Some)
                .ok_or_else(|| self.bad(key, &format!("must be one of {choices}, not \"{s}\""))),
        }
    }
}

fn call(app: &Arc<Appliance>, method: &str, params: &Params) -> Result<Value, Fail> {
    if crate::block_jobs::METHODS.contains(&method) {
        return crate::block_jobs::call(app, method, params);
    }
    if crate::bitmaps::METHODS.contains(&method) {
        return crate::bitmaps::call(app, method, params);
    }
    if crate::backup::METHODS.contains(&method) {
        return crate::backup::call(app, method, params);
    }
    if crate::fleece::METHODS.contains(&method) {
        return crate::fleece::call(app, method, params);
    }
    if crate::snapshots::METHODS.contains(&method) {
        return crate::snapshots::call(app, method, params);
    }
    if crate::resize::METHODS.contains(&method) {
        return crate::resize::call(app, method, params);
    }
    match method {
        "disk_list" => {
            only(params, method, &[])?;
            Ok(app.list())
        }
        "disk_add" => {
            let disk = disk_from_json(app, params)?;
            let name = disk.name.clone();
            app.add_disk(disk)?;
            Ok(json!({"name": name}))
        }
        "disk_remove" => {
            only(params, method, &["name"])?;
            let name = name_param(params, method)?;
            app.remove_disk(&name)?;
            Ok(json!({"name": name}))
        }
        "disk_flush" => {
            only(params, method, &["name"])?;
            let name = name_param(params, method)?;
            app.flush_disk(&name)?;
            Ok(json!({"name": name}))
        }
        "qos_set" => {
            only(params, method, &["name", "iops", "bandwidth", "burst"])?;
            let name = name_param(params, method)?;
            let mut q = app
                .config()
                .disk(&name)
                .ok_or_else(|| Fail::from(ServeError::NotFound(name.clone())))?
                .qos
                .unwrap_or(config::Qos { iops: 0, bandwidth: 0, burst: config::DEFAULT_QOS_BURST });
            if let Some(v) = params.get("iops") {
                q.iops = v.as_u64().ok_or_else(|| {
                    Fail::params("qos_set: `iops` must be a whole number (0 lifts the limit)")
                })?;
            }
            if let Some(v) = params.get("bandwidth") {
                q.bandwidth = match v {
                    Value::Number(n) => n.as_u64().ok_or_else(|| Fail::params("qos_set: `bandwidth` must be a whole number of bytes/s or a string such as \"100MiB/s\""))?,
                    Value::String(s) => config::parse_bandwidth(s).map_err(|e| Fail::params(format!("qos_set: `bandwidth`: {e}")))?,
                    _ => return Err(Fail::params("qos_set: `bandwidth` must be bytes/s or a string such as \"100MiB/s\"")),
                };
            }
            if let Some(v) = params.get("burst") {
                q.burst =
                    v.as_f64().filter(|b| b.is_finite() && *b > 0.0 && *b <= 60.0).ok_or_else(
                        || Fail::params("qos_set: `burst` must be seconds, above 0 and at most 60"),
                    )?;
            }
            app.set_qos(&name, q)?;
            Ok(json!({"name": name, "iops": q.iops, "bandwidth": q.bandwidth, "burst": q.burst}))
        }
        "stats" => {
            only(params, method, &["name"])?;
            let name = match params.get("name") {
                None => None,
                Some(_) => Some(name_param(params, method)?),
            };
            let config = app.config();
            if let Some(n) = &name
                && config.disk(n).is_none()
            {
                return Err(ServeError::NotFound(n.clone()).into());
            }
            let mut disks = crate::metrics::totals_json(name.as_deref());
            if let Value::Object(m) = &mut disks {
                m.retain(|d, _| config.disk(d).is_some());
                for d in &config.disks {
                    if name.as_ref().is_none_or(|n| n == &d.name) {
                        m.entry(d.name.clone()).or_insert_with(|| json!({}));
                    }
                }
            }
            let reactors: Vec<Value> = app
                .reactor_handles()
                .iter()
                .zip(&config.appliance.cores)
                .map(|(h, core)| {
                    let s = h.stats();
                    json!({"core": core, "busy_ns": s.busy_ns, "busy_ticks": s.busy_ticks, "idle_ticks": s.idle_ticks, "sleeps": s.sleeps, "tasks_polled": s.tasks_polled, "messages": s.messages})
                })
                .collect();
            Ok(json!({"disks": disks, "reactors": reactors}))
        }
        "config_get" => {
            only(params, method, &[])?;
            Ok(Value::String(app.config().to_toml()))
        }
        "reload" => {
            only(params, method, &[])?;
            let Some(path) = app.config().source else {
                return Err(Fail(
                    FAILED,
                    "the quick-start configuration has no file to reload".into(),
                    None,
                ));
            };
            let report = crate::serve::reload_from(app, &path);
            if let Some(e) = report.iter().find_map(|r| r.strip_prefix("error: ")) {
                return Err(Fail(FAILED, e.to_string(), None));
            }
            Ok(json!({"changes": report}))
        }
        _ => Err(Fail(
            METHOD_NOT_FOUND,
            format!(
                "unknown method `{method}`; methods: disk_list, disk_add, disk_remove, disk_flush, disk_resize, qos_set, stats, config_get, reload, {}, {}, {}, {}, {}",
                crate::block_jobs::METHODS.join(", "),
                crate::bitmaps::METHODS.join(", "),
                crate::backup::METHODS.join(", "),
                crate::fleece::METHODS.join(", "),
                crate::snapshots::METHODS.join(", ")
            ),
            None,
        )),
    }
}

/// Validates `disk_add`'s params as a `[[disk]]` table of the config file, with
/// relative paths resolved against the config file's directory.
fn disk_from_json(app: &Appliance, params: &Params) -> Result<config::Disk, Fail> {
    fn has_null(v: &Value) -> Option<String> {
        match v {
            Value::Null => Some(String::new()),
            Value::Array(a) => a.iter().find_map(has_null),
            Value::Object(m) => m.iter().find_map(|(k, v)| {
                has_null(v).map(|p| if p.is_empty() { k.clone() } else { format!("{k}.{p}") })
            }),
            _ => None,
        }
    }
    if let Some(k) = has_null(&Value::Object(params.clone())) {
        return Err(Fail(
            INVALID_PARAMS,
            format!("disk_add: `{k}` is null; leave a key out to take its default"),
            Some(json!({"key": k})),
        ));
    }
    let doc = json!({"disk": [Value::Object(params.clone())]});
    let text = toml::to_string(&doc).map_err(|e| Fail::params(format!("disk_add: {e}")))?;
    let running = app.config();
    let base = running
        .source
        .as_deref()
        .and_then(Path::parent)
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/")));
    match config::Config::parse(&text, "disk_add", &base) {
        Ok(mut c) => c.disks.pop().ok_or_else(|| Fail::params("disk_add: no disk given")),
        Err(config::ConfigError::Invalid { key, message, .. }) => {
            let key = key
                .strip_prefix("disk[0].")
                .or_else(|| key.strip_prefix("disk."))
                .unwrap_or(&key)
                .to_string();
            Err(Fail(
                INVALID_PARAMS,
                format!("disk_add: `{key}`: {message}"),
                Some(json!({"key": key})),
            ))
        }
        Err(e) => {
            let msg = e.to_string();
            let msg = msg.strip_prefix("disk_add: ").unwrap_or(&msg);
            // toml's messages quote the generated text and its line numbers, which mean
            // nothing to the caller; keep the explanation.
            let first: String = msg
                .lines()
                .filter(|l| {
                    !l.trim().is_empty()
                        && !l.starts_with(' ')
                        && !l.starts_with(|c: char| c.is_ascii_digit())
                        && !l.starts_with("TOML parse error")
                })
                .collect::<Vec<_>>()
                .join(" ");
            let first = if first.is_empty() { msg } else { &first };
            Err(Fail::params(format!("disk_add: {}", first.trim())))
        }
    }
}
