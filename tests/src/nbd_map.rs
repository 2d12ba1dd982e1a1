//! What NBD clients say about an export: `nbdinfo --map` extents, and qemu-io runs.

use std::process::Command;

use serde_json::Value;

use crate::{Appliance, run, stdout};

/// `nbdinfo --map=CONTEXT --json URI`: (offset, length, type) per extent.
pub fn map(uri: &str, context: &str) -> Vec<(u64, u64, u64)> {
    let out = run(Command::new("nbdinfo").arg(format!("--map={context}")).arg("--json").arg(uri));
    let v: Value = serde_json::from_slice(&out.stdout).expect("nbdinfo --json");
    v.as_array()
        .expect("extents")
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["type"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// The ranges of a map whose type is `t`, adjacent ones merged.
pub fn ranges_of(m: &[(u64, u64, u64)], t: u64) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = Vec::new();
    for &(o, l, ty) in m {
        if ty != t {
            continue;
        }
        match v.last_mut() {
            Some((po, pl)) if *po + *pl == o => *pl += l,
            _ => v.push((o, l)),
        }
    }
    v
}

/// The dirty ranges of `context` (a `qemu:dirty-bitmap:`) at `uri`.
pub fn dirty_ranges(uri: &str, context: &str) -> Vec<(u64, u64)> {
    ranges_of(&map(uri, context), 1)
}

/// qemu-io commands against export `export` over NBD; none may fail.
pub fn io(a: &Appliance, export: &str, cmds: &[&str]) {
    io_with(a, export, cmds, false)
}

/// [`io`] on a read-only export.
pub fn io_ro(a: &Appliance, export: &str, cmds: &[&str]) {
    io_with(a, export, cmds, true)
}

fn io_with(a: &Appliance, export: &str, cmds: &[&str], read_only: bool) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    if read_only {
        c.arg("-r");
    }
    for x in cmds {
        c.args(["-c", x]);
    }
    let out = run(c.arg(a.uri(export)));
    assert!(!stdout(&out).contains("fail"), "{}", stdout(&out));
}

/// A read-only qemu-io command against export `export` that must fail (an I/O error).
pub fn io_fails(a: &Appliance, export: &str, cmd: &str) {
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-r", "-c", cmd])
        .arg(a.uri(export))
        .output()
        .expect("qemu-io");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("error") || text.contains("fail"), "{cmd} on {export}: {text}");
}
