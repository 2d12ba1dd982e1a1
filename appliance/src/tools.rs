//! Image tools: `create`, `info`, `check` and `map`, with text output for people and
//! JSON output shaped like `qemu-img`'s for scripts. Exit codes of `check` follow
//! `qemu-img check`: 0 clean, 1 check failed, 2 corrupt, 3 leaks only.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use drivers::qcow2::check::{self, Repair};
use drivers::qcow2::create::{self, CreateOptions};
use drivers::qcow2::tools;
use drivers::qcow2::types::Compression;
use serde_json::json;

/// Parses `-o key=value,...` creation options into `opts`.
pub fn apply_create_options(opts: &mut CreateOptions, spec: &str) -> Result<(), String> {
    for item in spec.split(',').filter(|s| !s.is_empty()) {
        let (k, v) =
            item.split_once('=').ok_or_else(|| format!("option `{item}` is not key=value"))?;
        let on = |v: &str| match v {
            "on" | "true" | "yes" => Ok(true),
            "off" | "false" | "no" => Ok(false),
            _ => Err(format!("option {k}: `{v}` is not on or off")),
        };
        match k {
            "cluster_size" => {
                opts.cluster_size =
                    config::parse_byte_size(v).map_err(|e| format!("cluster_size: {e}"))?
            }
            "refcount_bits" => {
                opts.refcount_bits = v.parse().map_err(|_| format!("refcount_bits: `{v}`"))?
            }
            "compat" => {
                opts.version = match v {
                    "0.10" | "v2" => 2,
                    "1.1" | "v3" => 3,
                    _ => return Err(format!("compat `{v}` is not 0.10 or 1.1")),
                }
            }
            "lazy_refcounts" => opts.lazy_refcounts = on(v)?,
            "extended_l2" => opts.extended_l2 = on(v)?,
            "preallocation" => {
                opts.preallocate_metadata = match v {
                    "off" => false,
                    "metadata" => true,
                    _ => return Err(format!("preallocation `{v}` is not off or metadata")),
                }
            }
            "compression_type" => {
                opts.compression = match v {
                    "zlib" => Compression::Zlib,
                    "zstd" => Compression::Zstd,
                    _ => return Err(format!("compression_type `{v}` is not zlib or zstd")),
                }
            }
            "backing_file" => opts.backing_file = Some(v.to_string()),
            "backing_fmt" => opts.backing_format = Some(v.to_string()),
            "encrypt.format" => {
                if v != "luks" {
                    return Err(format!("encrypt.format `{v}` is not luks"));
                }
                let iter = opts.luks.take().map_or(Duration::from_secs(2), |(_, t)| t);
                opts.luks = Some((Vec::new(), iter));
            }
            "encrypt.key-file" => {
                let key = std::fs::read(v).map_err(|e| format!("encrypt.key-file {v}: {e}"))?;
                let iter = opts.luks.take().map_or(Duration::from_secs(2), |(_, t)| t);
                opts.luks = Some((key, iter));
            }
            "encrypt.iter-time" => {
                let ms: u64 = v.parse().map_err(|_| format!("encrypt.iter-time: `{v}`"))?;
                let key = opts.luks.take().map_or(Vec::new(), |(k, _)| k);
                opts.luks = Some((key, Duration::from_millis(ms)));
            }
            "data_file" => opts.data_file = Some(v.to_string()),
            "data_file_raw" => opts.data_file_raw = on(v)?,
            _ => return Err(format!("unknown option `{k}`")),
        }
    }
    let luks = spec.split(',').any(|i| i == "encrypt.format=luks");
    match &opts.luks {
        Some((key, _)) if key.is_empty() => {
            Err("encrypt.format=luks needs encrypt.key-file (the file holding the key)".into())
        }
        Some(_) if !luks => {
            Err("encrypt.key-file and encrypt.iter-time need encrypt.format=luks".into())
        }
        _ => Ok(()),
    }
}

/// `appliance create`.
pub fn create_image(
    path: &Path,
    size: Option<&str>,
    options: Option<&str>,
    backing: Option<&str>,
    backing_fmt: Option<&str>,
) -> Result<(), String> {
    let mut o = CreateOptions::default();
    if let Some(spec) = options {
        apply_create_options(&mut o, spec)?;
    }
    if let Some(b) = backing {
        o.backing_file = Some(b.to_string());
    }
    if let Some(f) = backing_fmt {
        o.backing_format = Some(f.to_string());
    }
    o.size = match size {
        Some(s) => config::parse_byte_size(s).map_err(|e| format!("size: {e}"))?,
        None => {
            let Some(b) = &o.backing_file else {
                return Err("a size is needed (or a backing file to take it from)".into());
            };
            let bpath = if Path::new(b).is_absolute() {
                PathBuf::from(b)
            } else {
                path.parent().unwrap_or(Path::new(".")).join(b)
            };
            tools::info(&bpath).map_err(|e| e.to_string())?.virtual_size
        }
    };
    if o.backing_file.is_some() && o.backing_format.is_none() {
        let b = o.backing_file.clone().unwrap_or_default();
        let bpath = path.parent().unwrap_or(Path::new(".")).join(&b);
        if let Ok(i) = tools::info(&bpath) {
            o.backing_format = Some(i.format.to_string());
        }
    }
    create::create(path, &o).map_err(|e| e.to_string())
}

/// `appliance resize`: grows an image (qcow2 or raw) that is not in use. `size` is
/// absolute (`20G`) or relative (`+10G`).
/// `appliance snapshot -l|-c|-a|-d NAME FILE`.
pub fn snapshot(
    path: &Path,
    list: bool,
    create: Option<String>,
    apply: Option<String>,
    delete: Option<String>,
) -> Result<(), String> {
    use drivers::qcow2::snapshots::{Op, change};
    let e = |e: drivers::OpenError| e.to_string();
    let op = match (&create, &apply, &delete) {
        (Some(n), None, None) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            Op::Create { name: n, now: (now.as_secs() as u32, now.subsec_nanos()) }
        }
        (None, Some(n), None) => Op::Apply(n),
        (None, None, Some(n)) => Op::Delete(n),
        (None, None, None) if list => {
            let snaps = drivers::qcow2::snapshots::list(path).map_err(e)?;
            println!("Snapshot list:");
            println!("{:<10}{:<20}{:>10} {:<20}{:>15}", "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK");
            for s in snaps {
                let clock = s.vm_clock_nsec / 1_000_000;
                let (h, m, sec, ms) =
                    (clock / 3_600_000, clock / 60_000 % 60, clock / 1000 % 60, clock % 1000);
                println!(
                    "{:<10}{:<20}{:>10} {:<20}{:>15}",
                    s.id,
                    s.name,
                    human(s.vm_state_size),
                    date(u64::from(s.date_sec)),
                    format!("{h:02}:{m:02}:{sec:02}.{ms:03}")
                );
            }
            return Ok(());
        }
        _ => return Err("give one of -l, -c NAME, -a NAME, -d NAME".into()),
    };
    change(path, op).map_err(e)
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) of a Unix time.
fn date(t: u64) -> String {
    let (days, rem) = (t / 86400, t % 86400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}", rem / 3600, rem / 60 % 60, rem % 60)
}

pub fn resize(path: &Path, size: &str) -> Result<(), String> {
    let current = tools::info(path).map_err(|e| e.to_string())?;
    let new_size = match size.strip_prefix('+') {
        Some(delta) => {
            let d = config::parse_byte_size(delta).map_err(|e| format!("size: {e}"))?;
            current
                .virtual_size
                .checked_add(d)
                .ok_or_else(|| format!("size: {} + {d} overflows", current.virtual_size))?
        }
        None => config::parse_byte_size(size).map_err(|e| format!("size: {e}"))?,
    };
    if current.format == "qcow2" {
        drivers::qcow2::resize::resize(path, new_size).map_err(|e| e.to_string())?;
    } else {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| e.to_string())?;
        // Not under a running user: the appliance or QEMU serving it would not see the size.
        drivers::io::lock::lock_image(&f, path, true).map_err(|e| e.to_string())?;
        // Shrinking only over a hole: nothing past the new end holds data.
        drivers::io::resize_fd(std::os::fd::AsRawFd::as_raw_fd(&f), new_size)
            .and_then(|()| f.sync_all())
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    println!("Image resized.");
    Ok(())
}

/// `appliance info`.
pub fn info(path: &Path, as_json: bool) -> Result<(), String> {
    let i = tools::info(path).map_err(|e| e.to_string())?;
    if as_json {
        let mut v = json!({
            "filename": i.filename,
            "format": i.format,
            "virtual-size": i.virtual_size,
            "actual-size": i.actual_size,
            "dirty-flag": i.dirty,
        });
        if i.encrypted {
            v["encrypted"] = json!(true);
        }
        if let Some(cs) = i.cluster_size {
            v["cluster-size"] = json!(cs);
            v["format-specific"] = json!({
                "type": "qcow2",
                "data": {
                    "compat": i.compat,
                    "lazy-refcounts": i.lazy_refcounts,
                    "refcount-bits": i.refcount_bits,
                    "corrupt": i.corrupt,
                    "compression-type": i.compression_type,
                    "extended-l2": i.extended_l2,
                }
            });
            if let Some(d) = &i.data_file {
                v["format-specific"]["data"]["data-file"] = json!(d);
                v["format-specific"]["data"]["data-file-raw"] = json!(i.data_file_raw);
            }
            if !i.bitmaps.is_empty() {
                v["format-specific"]["data"]["bitmaps"] = json!(i
                    .bitmaps
                    .iter()
                    .map(|b| json!({"flags": b.flags, "name": b.name, "granularity": b.granularity}))
                    .collect::<Vec<_>>());
            }
        }
        if let Some(b) = &i.backing_filename {
            v["backing-filename"] = json!(b);
        }
        if let Some(f) = &i.backing_format {
            v["backing-filename-format"] = json!(f);
        }
        if !i.snapshots.is_empty() {
            v["snapshots"] =
                json!(i
                .snapshots
                .iter()
                .map(|s| json!({"id": s.id, "name": s.name, "vm-state-size": s.vm_state_size}))
                .collect::<Vec<_>>());
        }
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(());
    }
    println!("image: {}", i.filename);
    println!("file format: {}", i.format);
    println!("virtual size: {} ({} bytes)", human(i.virtual_size), i.virtual_size);
    println!("disk size: {}", human(i.actual_size));
    if i.encrypted {
        println!("encrypted: yes (LUKS)");
    }
    if let Some(cs) = i.cluster_size {
        println!("cluster_size: {cs}");
    }
    if let Some(b) = &i.backing_filename {
        println!("backing file: {b}");
    }
    if let Some(f) = &i.backing_format {
        println!("backing file format: {f}");
    }
    if !i.snapshots.is_empty() {
        println!(
            "snapshots: {}",
            i.snapshots.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", ")
        );
    }
    if let Some(c) = i.compat {
        println!("Format specific information:");
        println!("    compat: {c}");
        if let Some(t) = i.compression_type {
            println!("    compression type: {t}");
        }
        println!("    lazy refcounts: {}", i.lazy_refcounts);
        println!("    extended l2: {}", i.extended_l2);
        if let Some(d) = &i.data_file {
            println!("    data file: {d}");
            println!("    data file raw: {}", i.data_file_raw);
        }
        if !i.bitmaps.is_empty() {
            println!("    bitmaps:");
            for (k, b) in i.bitmaps.iter().enumerate() {
                println!("        [{k}]:");
                println!("            flags:");
                for (j, f) in b.flags.iter().enumerate() {
                    println!("                [{j}]: {f}");
                }
                println!("            name: {}", b.name);
                println!("            granularity: {}", b.granularity);
            }
        }
        println!("    refcount bits: {}", i.refcount_bits.unwrap_or(16));
        println!("    corrupt: {}", i.corrupt);
        if i.dirty {
            println!(
                "    dirty: true (unclean shutdown with lazy refcounts; repaired on the next read-write open)"
            );
        }
    }
    Ok(())
}

fn human(b: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{b} B") } else { format!("{v:.3} {}", UNITS[u]) }
}

/// `appliance check`; returns the exit code.
pub fn check(path: &Path, repair: Option<&str>, as_json: bool) -> Result<i32, String> {
    let repair = match repair {
        None => Repair::None,
        Some("leaks") => Repair::Leaks,
        Some("all") => Repair::All,
        Some(o) => return Err(format!("--repair `{o}` is not leaks or all")),
    };
    let tty = std::io::stderr().is_terminal() && !as_json;
    let mut last = 0u64;
    let mut progress = |done: u64, total: u64| {
        if tty && total > 0 {
            let pct = done * 100 / total;
            if pct != last {
                last = pct;
                eprint!("\r    ({pct:3}/100%)");
            }
        }
    };
    let r = check::check(path, repair, &mut progress).map_err(|e| e.to_string())?;
    if tty {
        eprint!("\r              \r");
    }
    if as_json {
        let v = json!({
            "filename": path.display().to_string(),
            "format": "qcow2",
            "check-errors": r.check_errors,
            "corruptions": r.corruptions,
            "leaks": r.leaks,
            "corruptions-fixed": r.corruptions_fixed,
            "leaks-fixed": r.leaks_fixed,
            "image-end-offset": r.image_end_offset,
            "total-clusters": r.total_clusters,
            "allocated-clusters": r.allocated_clusters,
            "fragmented-clusters": r.fragmented_clusters,
            "compressed-clusters": r.compressed_clusters,
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        for m in &r.messages {
            println!("{m}");
        }
        if r.leaks_fixed > 0 || r.corruptions_fixed > 0 {
            println!("The following inconsistencies were found and repaired:\n");
            println!("    {} leaked clusters", r.leaks_fixed);
            println!("    {} corruptions\n", r.corruptions_fixed);
        }
        if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
            println!("No errors were found on the image.");
        } else {
            if r.corruptions > 0 {
                println!("\n{} errors were found on the image.", r.corruptions);
                println!("Data may be corrupted, or further writes to the image may corrupt it.");
            }
            if r.leaks > 0 {
                println!("\n{} leaked clusters were found on the image.", r.leaks);
                println!("This means waste of disk space, but no harm to data.");
            }
        }
        println!(
            "{}/{} = {:.2}% allocated, {} compressed clusters",
            r.allocated_clusters,
            r.total_clusters,
            if r.total_clusters > 0 {
                r.allocated_clusters as f64 * 100.0 / r.total_clusters as f64
            } else {
                0.0
            },
            r.compressed_clusters
        );
        println!("Image end offset: {}", r.image_end_offset);
    }
    Ok(r.exit_code())
}

/// `appliance map`.
pub fn map(path: &Path, allowed: &[PathBuf], as_json: bool) -> Result<(), String> {
    let allowed: Vec<PathBuf> = if allowed.is_empty() {
        vec![path.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."))]
    } else {
        allowed.to_vec()
    };
    let entries = tools::map(path, &allowed).map_err(|e| e.to_string())?;
    if as_json {
        let v: Vec<serde_json::Value> = entries
            .iter()
            .map(|e| {
                let mut o = json!({
                    "start": e.start, "length": e.length, "depth": e.depth, "present": e.present,
                    "zero": e.zero, "data": e.data, "compressed": e.compressed,
                });
                if let Some(off) = e.offset {
                    o["offset"] = json!(off);
                }
                o
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        println!("{:<20}{:<20}{:<20}Depth", "Offset", "Length", "Mapped to");
        for e in entries.iter().filter(|e| e.data) {
            let mapped = e.offset.map_or_else(|| "compressed".to_string(), |o| format!("{o:#x}"));
            println!(
                "{:<20}{:<20}{:<20}{}",
                format!("{:#x}", e.start),
                format!("{:#x}", e.length),
                mapped,
                e.depth
            );
        }
    }
    Ok(())
}
