//! The machine and tool description stamped on every result.

use std::path::Path;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// Where and with what a result was measured.
#[derive(Debug, Clone, Serialize)]
pub struct Stamp {
    /// UTC, `YYYY-MM-DDTHH:MM:SSZ`.
    pub date: String,
    pub nproc: usize,
    pub cpu_model: String,
    pub kernel: String,
    pub memory: String,
    pub fio: String,
    pub qemu: String,
    /// `git describe`-like commit of the appliance's workspace, with `-dirty` when the
    /// tree has changes.
    pub appliance_commit: String,
}

impl Stamp {
    /// Collects the description now. Missing tools read "unavailable".
    pub fn collect(workspace: &Path) -> Stamp {
        Stamp {
            date: utc_string(SystemTime::now(), true),
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model: cpu_model(),
            kernel: read_trim("/proc/sys/kernel/osrelease"),
            memory: memory(),
            fio: first_line(Command::new("fio").arg("--version")),
            qemu: first_line(Command::new("qemu-storage-daemon").arg("--version")),
            appliance_commit: git_commit(workspace),
        }
    }

    /// One line for plots and tables.
    pub fn line(&self) -> String {
        format!(
            "{} | {} x {} | Linux {} | {} RAM | {} | {} | appliance {}",
            self.date,
            self.nproc,
            self.cpu_model,
            self.kernel,
            self.memory,
            self.fio,
            self.qemu,
            self.appliance_commit
        )
    }
}

fn read_trim(p: &str) -> String {
    std::fs::read_to_string(p).map(|s| s.trim().to_string()).unwrap_or_else(|_| "unknown".into())
}

fn cpu_model() -> String {
    let s = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    s.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == "model name").then(|| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

fn memory() -> String {
    let s = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    s.lines()
        .find_map(|l| {
            let kb: u64 =
                l.strip_prefix("MemTotal:")?.trim().trim_end_matches("kB").trim().parse().ok()?;
            Some(format!("{:.1} GiB", kb as f64 / (1u64 << 20) as f64))
        })
        .unwrap_or_else(|| "unknown".into())
}

fn first_line(cmd: &mut Command) -> String {
    match cmd.output() {
        Ok(o) if o.status.success() => {
            String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or("").trim().to_string()
        }
        _ => "unavailable".into(),
    }
}

fn git_commit(workspace: &Path) -> String {
    let head = first_line(Command::new("git").current_dir(workspace).args([
        "rev-parse",
        "--short=12",
        "HEAD",
    ]));
    if head == "unavailable" {
        return "unknown (not a git checkout)".into();
    }
    let dirty = Command::new("git")
        .current_dir(workspace)
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .is_ok_and(|o| !o.stdout.is_empty());
    if dirty { format!("{head}-dirty") } else { head }
}

/// `t` in UTC: `2024-05-01T12:34:56Z`, or with `pretty == false` `2024-05-01T12-34-56Z`
/// (for directory names).
pub fn utc_string(t: SystemTime, pretty: bool) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86400, secs % 86400);
    let (y, m, d) = civil_from_days(days as i64);
    let (hh, mm, ss) = (rem / 3600, rem % 3600 / 60, rem % 60);
    let sep = if pretty { ':' } else { '-' };
    format!("{y:04}-{m:02}-{d:02}T{hh:02}{sep}{mm:02}{sep}{ss:02}Z")
}

/// Days since 1970-01-01 to (year, month, day), after Howard Hinnant's algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn utc() {
        assert_eq!(utc_string(UNIX_EPOCH, true), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_709_251_199); // 2024-02-29T23:59:59Z
        assert_eq!(utc_string(t, true), "2024-02-29T23:59:59Z");
        assert_eq!(utc_string(t, false), "2024-02-29T23-59-59Z");
    }
}
