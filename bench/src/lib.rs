//! Benchmarks of the appliance.
//!
//! - [`loadgen`]: a bdevperf-style load generator that drives block devices in process,
//!   on the appliance's own reactors, with no protocol in between: the `null` device
//!   gives the per-core ceiling of the stack, `mem`, `raw` and `qcow2` add a RAM disk,
//!   a file through io_uring or AIO and the qcow2 engine.
//! - [`harness`]: the side-by-side benchmark: the same fio jobs (NBD engine) against the
//!   appliance, qemu-storage-daemon and qemu-nbd, plus fio straight on the raw file (the
//!   device limit), in ABBA rounds, with a markdown table, JSON and SVG plots.
//! - [`sysinfo`]: the machine and tool description every result is stamped with.
//!
//! Nothing here asserts timings: the machines it runs on are shared and noisy.

pub mod fio;
pub mod harness;
pub mod loadgen;
pub mod plot;
pub mod report;
pub mod servers;
pub mod stats;
pub mod sysinfo;

/// A TOML string literal (basic string, escaped).
pub fn toml_str(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if c.is_control() => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// A disk described by the body of a `[[disk]]` table, through the appliance's own
/// config parser (so defaults and validation are the appliance's, whatever fields the
/// schema grows).
pub fn disk_from_toml(body: &str) -> Result<config::Disk, String> {
    let text = format!("[[disk]]\n{body}\n");
    let c = config::Config::parse(&text, "<bench>", std::path::Path::new("/"))
        .map_err(|e| e.to_string())?;
    c.disks.into_iter().next().ok_or_else(|| "no disk in the config".to_string())
}

/// Parses a size such as `4096`, `4k`, `64KiB`, `1M`, `2G` (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("bad size {s:?}"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(format!("bad size unit in {s:?}")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("size {s:?} overflows"))
}

/// A size for humans: `4k`, `64k`, `1M`, `3G`, or bytes.
pub fn fmt_size(n: u64) -> String {
    for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "k")] {
        if n >= 1 << shift && n.is_multiple_of(1 << shift) {
            return format!("{}{unit}", n >> shift);
        }
    }
    n.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert_eq!(parse_size("64KiB").unwrap(), 65536);
        assert_eq!(parse_size("1M").unwrap(), 1 << 20);
        assert_eq!(parse_size("512").unwrap(), 512);
        assert!(parse_size("4q").is_err());
        assert_eq!(fmt_size(4096), "4k");
        assert_eq!(fmt_size(1 << 30), "1G");
        assert_eq!(fmt_size(1000), "1000");
        assert_eq!(toml_str("a\"b\\c"), "\"a\\\"b\\\\c\"");
    }
}
