//! `appliance ctl`: a client for the control socket ([`crate::control`]).
//!
//! Sends one JSON-RPC request, prints the result (JSON, or a table for `list`), and
//! exits non-zero with the server's message when the call fails.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use clap::Subcommand;
use serde_json::{Value, json};

/// The socket used when neither `--socket` nor `--config` is given: the quick-start's.
pub const DEFAULT_SOCKET: &str = "appliance-data/control.sock";

#[derive(Subcommand, Debug)]
pub enum CtlCommand {
    /// List the disks and their exports.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Add and export a disk. Keys are those of a `[[disk]]` table, nested keys
    /// dotted: `name=vm1 path=/images/vm1.qcow2 format=qcow2
    /// vhost_user_blk.socket=/run/vm1.sock qos.iops=5000`.
    Add {
        /// key=value pairs (values are TOML: numbers and true/false are typed, anything
        /// else is a string).
        #[arg(required = true)]
        settings: Vec<String>,
    },
    /// Stop exporting a disk: connections drain, the image is flushed and closed.
    Remove { name: String },
    /// Make every completed write of a disk durable.
    Flush { name: String },
    /// Grow a served disk to SIZE (bytes, or with a unit: 20GiB); a vhost-user-blk
    /// guest sees the new size at once, NBD clients when they next connect.
    Resize { disk: String, size: String },
    /// Request counters and latency per disk and export; reactor activity.
    Stats { name: Option<String> },
    /// Change a disk's QoS limits live (0 lifts a limit).
    Qos {
        name: String,
        #[arg(long)]
        iops: Option<u64>,
        /// Bytes per second, or with a unit: 100MiB/s.
        #[arg(long)]
        bandwidth: Option<String>,
        /// Seconds of unused budget a disk may save up.
        #[arg(long)]
        burst: Option<f64>,
    },
    /// Print the running configuration as TOML.
    Config,
    /// Re-read the config file (as SIGHUP does) and apply its disk set.
    Reload,
    /// Start a mirror of DISK to TARGET (a file, an NBD URI or an RBD image,
    /// `rbd:POOL/IMAGE[:conf=PATH:id=ID:keyring=PATH]`); then `job complete` pivots to it.
    /// Options are key=value pairs: format=qcow2 create=true sync=full|none
    /// granularity=65536 buf_size=16777216 copy_mode=adaptive speed=BYTES unmap=true
    /// on_source_error=report|ignore|stop on_target_error=...
    Mirror {
        disk: String,
        target: String,
        options: Vec<String>,
        /// Wait (with a progress bar) until the job is ready or has ended.
        #[arg(long)]
        wait: bool,
    },
    /// Pull DISK's backing chain up into its image, then drop the backing link.
    Stream {
        disk: String,
        /// Bytes per second (0: unlimited).
        #[arg(long)]
        speed: Option<u64>,
        /// Wait (with a progress bar) until the job has ended.
        #[arg(long)]
        wait: bool,
    },
    /// Commit DISK's image into BASE (default: its backing file); `job complete` then
    /// switches the disk onto the base.
    Commit {
        disk: String,
        #[arg(long)]
        base: Option<String>,
        #[arg(long)]
        speed: Option<u64>,
        /// Wait until the job is ready.
        #[arg(long)]
        wait: bool,
    },
    /// List block jobs (or one).
    Jobs { job: Option<String> },
    /// Control a block job.
    Job {
        #[command(subcommand)]
        action: JobAction,
    },
    /// Call any method with JSON params.
    Call { method: String, params: Option<String> },
}

#[derive(Subcommand, Debug)]
pub enum JobAction {
    /// Finish a ready job (a mirror pivots to its target).
    Complete {
        job: String,
        /// Wait until it has ended.
        #[arg(long)]
        wait: bool,
    },
    /// Cancel: a ready mirror ends as a point-in-time copy; --force stops at once.
    Cancel {
        job: String,
        #[arg(long)]
        force: bool,
    },
    Pause {
        job: String,
    },
    Resume {
        job: String,
    },
    /// Change the speed limit (bytes per second, 0 for none).
    Speed {
        job: String,
        speed: u64,
    },
    /// Wait until the job is ready or has ended, with a progress bar.
    Wait {
        job: String,
    },
}

/// Finds the socket: `--socket`, else the `[control]` socket of `--config`, else the
/// quick-start's.
pub fn socket_path(socket: Option<PathBuf>, config: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(s) = socket {
        return Ok(s);
    }
    if let Some(c) = config {
        let cfg = config::Config::load(c).map_err(|e| e.to_string())?;
        return cfg
            .control
            .map(|c| c.socket)
            .ok_or_else(|| format!("{}: has no [control] socket", c.display()));
    }
    Ok(PathBuf::from(DEFAULT_SOCKET))
}

/// Parses `a.b=value` pairs into a JSON object.
fn settings_object(settings: &[String]) -> Result<Value, String> {
    let mut root = serde_json::Map::new();
    for s in settings {
        let (key, value) = s.split_once('=').ok_or_else(|| format!("`{s}` is not key=value"))?;
        let value: Value = match toml::from_str::<toml::Table>(&format!("v = {value}")) {
            Ok(t) => serde_json::to_value(&t["v"]).map_err(|e| e.to_string())?,
            Err(_) => Value::String(value.to_string()),
        };
        let parts: Vec<&str> = key.split('.').collect();
        let mut obj = &mut root;
        for (i, p) in parts.iter().enumerate() {
            if p.is_empty() {
                return Err(format!("`{key}` is not a valid key"));
            }
            if i + 1 == parts.len() {
                obj.insert(p.to_string(), value.clone());
            } else {
                let e = obj.entry(p.to_string()).or_insert_with(|| json!({}));
                obj = e.as_object_mut().ok_or_else(|| format!("`{key}`: `{p}` is not a table"))?;
            }
        }
    }
    Ok(Value::Object(root))
}

/// Sends one request and returns its result, or the server's error message.
pub fn call(socket: &Path, method: &str, params: Value) -> Result<Value, String> {
    let mut s = UnixStream::connect(socket)
        .map_err(|e| format!("{}: cannot connect to the control socket: {e}", socket.display()))?;
    let req = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
    writeln!(s, "{req}").map_err(|e| format!("{}: {e}", socket.display()))?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).map_err(|e| format!("{}: {e}", socket.display()))?;
    let reply: Value = serde_json::from_str(&line)
        .map_err(|e| format!("{}: malformed reply: {e}", socket.display()))?;
    if let Some(err) = reply.get("error") {
        return Err(err["message"].as_str().unwrap_or("request failed").to_string());
    }
    Ok(reply.get("result").cloned().unwrap_or(Value::Null))
}

/// Runs a `ctl` command; prints its result.
pub fn run(socket: &Path, cmd: CtlCommand) -> Result<(), String> {
    let (method, params) = match &cmd {
        CtlCommand::List { .. } => ("disk_list", json!({})),
        CtlCommand::Add { settings } => ("disk_add", settings_object(settings)?),
        CtlCommand::Remove { name } => ("disk_remove", json!({"name": name})),
        CtlCommand::Flush { name } => ("disk_flush", json!({"name": name})),
        CtlCommand::Resize { disk, size } => ("disk_resize", json!({"disk": disk, "size": size})),
        CtlCommand::Stats { name } => match name {
            Some(n) => ("stats", json!({"name": n})),
            None => ("stats", json!({})),
        },
        CtlCommand::Qos { name, iops, bandwidth, burst } => {
            let mut p = json!({"name": name});
            if let Some(v) = iops {
                p["iops"] = json!(v);
            }
            if let Some(v) = bandwidth {
                p["bandwidth"] = json!(v);
            }
            if let Some(v) = burst {
                p["burst"] = json!(v);
            }
            ("qos_set", p)
        }
        CtlCommand::Config => ("config_get", json!({})),
        CtlCommand::Reload => ("reload", json!({})),
        CtlCommand::Mirror { disk, target, options, .. } => {
            let mut p = settings_object(options)?;
            p["disk"] = json!(disk);
            p["target"] = json!(target);
            ("mirror_start", p)
        }
        CtlCommand::Stream { disk, speed, .. } => {
            let mut p = json!({"disk": disk});
            if let Some(v) = speed {
                p["speed"] = json!(v);
            }
            ("stream_start", p)
        }
        CtlCommand::Commit { disk, base, speed, .. } => {
            let mut p = json!({"disk": disk});
            if let Some(b) = base {
                p["base"] = json!(b);
            }
            if let Some(v) = speed {
                p["speed"] = json!(v);
            }
            ("commit_start", p)
        }
        CtlCommand::Jobs { job } => match job {
            Some(j) => ("job_list", json!({"job": j})),
            None => ("job_list", json!({})),
        },
        CtlCommand::Job { action } => match action {
            JobAction::Complete { job, .. } => ("job_complete", json!({"job": job})),
            JobAction::Cancel { job, force } => ("job_cancel", json!({"job": job, "force": force})),
            JobAction::Pause { job } => ("job_pause", json!({"job": job})),
            JobAction::Resume { job } => ("job_resume", json!({"job": job})),
            JobAction::Speed { job, speed } => {
                ("job_set_speed", json!({"job": job, "speed": speed}))
            }
            JobAction::Wait { job } => return wait_job(socket, job, false),
        },
        CtlCommand::Call { method, params } => {
            let p = match params {
                Some(t) => serde_json::from_str(t).map_err(|e| format!("params: not JSON: {e}"))?,
                None => json!({}),
            };
            (method.as_str(), p)
        }
    };
    let result = call(socket, method, params)?;
    match &cmd {
        CtlCommand::Mirror { wait: true, .. } | CtlCommand::Commit { wait: true, .. } => {
            let job = result["job"].as_str().unwrap_or_default().to_string();
            println!("{job}");
            return wait_job(socket, &job, false);
        }
        CtlCommand::Stream { wait: true, .. } => {
            let job = result["job"].as_str().unwrap_or_default().to_string();
            println!("{job}");
            return wait_job(socket, &job, true);
        }
        CtlCommand::Job { action: JobAction::Complete { job, wait: true } } => {
            return wait_job(socket, job, true);
        }
        _ => {}
    }
    match (&cmd, &result) {
        (CtlCommand::List { json: false }, Value::Array(disks)) => print_table(disks),
        (CtlCommand::Config, Value::String(t)) => print!("{t}"),
        _ => println!("{}", serde_json::to_string_pretty(&result).unwrap_or_default()),
    }
    Ok(())
}

/// Polls a job, drawing its progress on stderr, until it is ready (unless `to_end`)
/// or has ended; fails if it ended in error.
fn wait_job(socket: &Path, job: &str, to_end: bool) -> Result<(), String> {
    loop {
        let j = call(socket, "job_list", json!({"job": job}))?;
        let (off, len) = (j["offset"].as_u64().unwrap_or(0), j["len"].as_u64().unwrap_or(0));
        let state = j["state"].as_str().unwrap_or("").to_string();
        let pct = if len == 0 { 100.0 } else { off as f64 * 100.0 / len as f64 };
        let bar = "#".repeat((pct / 5.0) as usize);
        eprint!("\r{job} {state:<10} [{bar:<20}] {pct:5.1}% {off}/{len} bytes ");
        let ended = state == "concluded" || state == "aborted";
        if ended || (!to_end && state == "ready") {
            eprintln!();
            if state == "aborted" {
                return Err(format!(
                    "{job} aborted: {}",
                    j["error"].as_str().unwrap_or("cancelled")
                ));
            }
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

fn print_table(disks: &[Value]) {
    println!("{:<16} {:<6} {:>14} {:<3} {:<28} PATH", "NAME", "FORMAT", "SIZE", "RO", "EXPORTS");
    for d in disks {
        let exports: Vec<String> = d["exports"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|e| match e["type"].as_str() {
                        Some("vhost-user-blk") => {
                            format!("vhost:{}", e["socket"].as_str().unwrap_or(""))
                        }
                        Some(t) => t.to_string(),
                        None => String::new(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        println!(
            "{:<16} {:<6} {:>14} {:<3} {:<28} {}",
            d["name"].as_str().unwrap_or(""),
            d["format"].as_str().unwrap_or(""),
            d["size"].as_u64().unwrap_or(0),
            if d["read_only"].as_bool().unwrap_or(false) { "yes" } else { "no" },
            exports.join(","),
            d["path"].as_str().unwrap_or("-"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_become_nested_typed_json() {
        let v = settings_object(&[
            "name=vm1".into(),
            "path=/images/vm1.qcow2".into(),
            "read_only=true".into(),
            "vhost_user_blk.socket=/run/vm1.sock".into(),
            "vhost_user_blk.queues=2".into(),
            "qos.bandwidth=100MiB/s".into(),
        ])
        .unwrap();
        assert_eq!(
            v,
            json!({"name": "vm1", "path": "/images/vm1.qcow2", "read_only": true,
                   "vhost_user_blk": {"socket": "/run/vm1.sock", "queues": 2},
                   "qos": {"bandwidth": "100MiB/s"}})
        );
        assert!(settings_object(&["novalue".into()]).is_err());
        assert!(settings_object(&["a=1".into(), "a.b=2".into()]).is_err());
    }
}
