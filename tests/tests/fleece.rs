//! Pull backups from point-in-time exports (image fleecing), judged by real clients: a
//! full backup read with `qemu-img convert` and two incrementals read with libnbd from
//! only the extents `nbdinfo --map=qemu:dirty-bitmap:inc` lists, each from an export
//! taken while a writer and fio keep writing to the disk; each equals the disk at its
//! instant (`qemu-img compare` against a copy read at that instant). The export is
//! read-only, its temporary image is removed with it, and bad requests name the key.

use std::process::Command;
use std::time::Duration;

use appliance_tests::jobs::*;
use appliance_tests::ops::{rpc_error, rpc_ok};
use appliance_tests::{Appliance, require_tool, run, run_unchecked, stdout};
use serde_json::{Value, json};

fn same(a: &Appliance, x: &str, y: &str) {
    let out = run_unchecked(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(a.path(x))
            .arg(a.path(y)),
        Duration::from_secs(120),
    );
    assert!(out.status.success(), "{x} differs from {y}: {}", stdout(&out));
}

/// Patches `file` with the extents of `uri` that `context` marks (libnbd).
fn pull_dirty(a: &Appliance, uri: &str, context: &str, file: &std::path::Path) -> u64 {
    let out = run(Command::new("nbdinfo").arg(format!("--map={context}")).arg("--json").arg(uri));
    let v: Value = serde_json::from_slice(&out.stdout).expect("nbdinfo --json");
    let list: Vec<[u64; 2]> = v
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"].as_u64() == Some(1))
        .map(|e| [e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap()])
        .collect();
    let script = "import nbd, sys, json\n\
        h = nbd.NBD()\n\
        h.connect_uri(sys.argv[1])\n\
        f = open(sys.argv[2], 'r+b')\n\
        for o, l in json.loads(sys.argv[3]):\n\
        \x20   for p in range(o, o + l, 4 << 20):\n\
        \x20       n = min(4 << 20, o + l - p)\n\
        \x20       f.seek(p)\n\
        \x20       f.write(h.pread(n, p))\n";
    let out = run_unchecked(
        Command::new("/usr/bin/python3")
            .args(["-c", script, uri])
            .arg(file)
            .arg(serde_json::to_string(&list).unwrap()),
        Duration::from_secs(120),
    );
    assert!(
        out.status.success(),
        "libnbd reading {uri}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        a.logs()
    );
    list.iter().map(|e| e[1]).sum()
}

#[test]
fn pull_backups_from_point_in_time_exports_under_writes() {
    require_tool("fio", "fio");
    require_tool("nbdinfo", "libnbd-bin");
    require_tool("/usr/bin/python3", "python3-libnbd");
    let a = start_vm();
    // T0: the full backup's export and the bitmap at one instant.
    dump(&a, "vm", "ref0.raw");
    rpc_ok(&a, "bitmap_add", json!({"disk": "vm", "name": "inc"}));
    let s = rpc_ok(&a, "export_snapshot", json!({"disk": "vm", "name": "snap0"}));
    let temp = std::path::PathBuf::from(s["temp"].as_str().unwrap());
    assert!(temp.exists(), "{s}");
    let w = writers(&a);
    dump(&a, "snap0", "backup.raw");
    stop_writers(w);
    same(&a, "backup.raw", "ref0.raw");
    let job = s["job"].as_str().unwrap();
    let j = job_of(&a, job);
    assert!(j["copied_before_write"].as_u64().unwrap_or(0) > 0, "nothing was saved: {j}");
    // Read-only.
    let out = run_unchecked(
        Command::new("qemu-io").args(["-f", "raw", "-c", "write 0 4k", &a.uri("snap0")]),
        Duration::from_secs(30),
    );
    assert!(!out.status.success() || stdout(&out).contains("fail"), "{}", stdout(&out));
    rpc_ok(&a, "export_snapshot_remove", json!({"name": "snap0"}));
    assert!(!temp.exists(), "the temporary image outlived its export");
    assert_eq!(job_of(&a, job)["state"], "concluded");
    // Two incrementals: the bitmap copied and cleared at each export's instant.
    for k in 1..=2 {
        let (name, reference) = (format!("snap{k}"), format!("ref{k}.raw"));
        dump(&a, "vm", &reference);
        rpc_ok(&a, "export_snapshot", json!({"disk": "vm", "name": name, "bitmap": "inc"}));
        let w = writers(&a);
        let copied = pull_dirty(&a, &a.uri(&name), "qemu:dirty-bitmap:inc", &a.path("backup.raw"));
        stop_writers(w);
        assert!(copied > 0 && copied <= 64 * MIB, "incremental {k} read {copied} bytes");
        same(&a, "backup.raw", &reference);
        rpc_ok(&a, "export_snapshot_remove", json!({"name": name}));
    }
}

#[test]
fn point_in_time_export_requests_are_checked() {
    let a = start_vm();
    rpc_ok(&a, "bitmap_add", json!({"disk": "vm", "name": "inc"}));
    for (params, word) in [
        (json!({"disk": "vm", "name": "vm"}), "name"),
        (json!({"disk": "vm", "name": "s", "bitmap": "nope"}), "nope"),
        (json!({"disk": "nope", "name": "s"}), "nope"),
        (json!({"disk": "vm", "name": "s", "temp": "/etc/x.fleece"}), "temp"),
    ] {
        let (_, m) = rpc_error(&a, "export_snapshot", params.clone());
        assert!(m.contains(word), "{params}: {m}");
    }
    let (_, m) = rpc_error(&a, "export_snapshot_remove", json!({"name": "nope"}));
    assert!(m.contains("nope"), "{m}");
    rpc_ok(&a, "export_snapshot", json!({"disk": "vm", "name": "s"}));
    // One job per disk: a mirror waits for the export to go.
    let (_, m) = rpc_error(
        &a,
        "mirror_start",
        json!({"disk": "vm", "target": a.path("m.qcow2").to_str().unwrap(), "create": true}),
    );
    assert!(m.contains("job"), "{m}");
    rpc_ok(&a, "export_snapshot_remove", json!({"name": "s"}));
}
