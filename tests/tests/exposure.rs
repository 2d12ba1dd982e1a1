//! Exposure: who can reach what the appliance creates.
//!
//! - Unix sockets (NBD listeners, the control socket, vhost-user-blk sockets) are 0600
//!   and owned by the appliance's user unless configured, and take the configured
//!   owner, group and mode (checked with `stat`).
//! - Mirror file targets named over the control socket must lie in
//!   `[control] allowed_target_dirs` (or the disk's own directory): a path outside,
//!   a `..` escape and a symlink out are refused; NBD targets are not confined.
//! - The example systemd unit names an unprivileged user and passes
//!   `systemd-analyze verify`.

use std::process::Command;

use appliance_tests::jobs::{start_mirror, wait_state};
use appliance_tests::ops::{control_extra, rpc_error};
use appliance_tests::{Appliance, Setup, require_tool, run, stdout, workspace};
use serde_json::json;

fn stat(path: &std::path::Path) -> String {
    let out = run(Command::new("stat").args(["-c", "%a %u %g"]).arg(path));
    stdout(&out).trim().to_string()
}

fn ids() -> (u32, u32) {
    // SAFETY: getuid/getgid cannot fail.
    unsafe { (libc::getuid(), libc::getgid()) }
}

#[test]
fn sockets_are_private_by_default() {
    let setup = Setup {
        disks: "[[disk]]\nname = \"m\"\ndriver = \"mem\"\nsize = \"1MiB\"\n\
                [disk.vhost_user_blk]\nsocket = \"{dir}/vhost.sock\"\n"
            .into(),
        extra: control_extra(None),
        ..Setup::default()
    };
    let a = Appliance::start(setup, |_| {});
    let (uid, gid) = ids();
    let want = format!("600 {uid} {gid}");
    assert_eq!(stat(&a.sock), want, "NBD unix socket");
    assert_eq!(stat(&a.path("control.sock")), want, "control socket");
    assert_eq!(stat(&a.path("vhost.sock")), want, "vhost-user socket");
}

#[test]
fn sockets_take_the_configured_owner_group_and_mode() {
    // Root may give sockets away; anyone else may still set the mode.
    let (uid, gid) = ids();
    let root = uid == 0;
    let (owner, group) = if root { (65534, 65534) } else { (uid, gid) };
    let setup = Setup {
        nbd: format!("socket_mode = 0o660\nsocket_group = {group}\n"),
        disks: format!(
            "[[disk]]\nname = \"m\"\ndriver = \"mem\"\nsize = \"1MiB\"\n\
             [disk.vhost_user_blk]\nsocket = \"{{dir}}/vhost.sock\"\nmode = 0o666\n\
             owner = {owner}\n"
        ),
        extra: format!(
            "[control]\nsocket = \"{{dir}}/control.sock\"\nmode = 0o640\nowner = {owner}\n\
             group = {group}\n"
        ),
        ..Setup::default()
    };
    let a = Appliance::start(setup, |_| {});
    assert_eq!(stat(&a.sock), format!("660 {uid} {group}"), "NBD unix socket");
    assert_eq!(stat(&a.path("control.sock")), format!("640 {owner} {group}"), "control");
    assert_eq!(stat(&a.path("vhost.sock")), format!("666 {owner} {gid}"), "vhost-user");
}

/// An appliance with a 16 MiB raw disk in its directory and `allowed` as its
/// `allowed_target_dirs` (none: the default, the disk's own directory).
fn with_targets(allowed: Option<&str>) -> Appliance {
    let dirs = allowed.map_or(String::new(), |d| format!("allowed_target_dirs = [\"{d}\"]\n"));
    let setup = Setup {
        disks: "[[disk]]\nname = \"vm\"\npath = \"{dir}/vm.raw\"\n".into(),
        extra: format!("{}{dirs}", control_extra(None)),
        ..Setup::default()
    };
    Appliance::start(setup, |dir| {
        std::fs::File::create(dir.join("vm.raw")).unwrap().set_len(16 << 20).unwrap();
        std::fs::create_dir(dir.join("targets")).unwrap();
    })
}

fn refused(a: &Appliance, target: &str) -> String {
    let (_, m) =
        rpc_error(a, "mirror_start", json!({"disk": "vm", "target": target, "create": true}));
    m
}

#[test]
fn mirror_targets_stay_inside_the_allowed_directories() {
    let outside = tempfile::tempdir().unwrap();
    // Default: the disk's own directory.
    let a = with_targets(None);
    let m = refused(&a, &outside.path().join("x.raw").display().to_string());
    assert!(m.contains("outside the allowed target directories"), "{m}");
    let job = start_mirror(
        &a,
        json!({"disk": "vm", "target": a.path("ok.raw").display().to_string(), "create": true}),
    );
    wait_state(&a, &job, &["ready"], std::time::Duration::from_secs(60));
    // Configured: only `targets/` under the appliance's directory.
    let dir = tempfile::tempdir().unwrap();
    let targets = dir.path().join("targets");
    std::fs::create_dir(&targets).unwrap();
    let b = with_targets(Some(&targets.display().to_string()));
    let m = refused(&b, &b.path("beside-the-disk.raw").display().to_string());
    assert!(m.contains("outside"), "{m}");
    let escape = format!("{}/../escaped.raw", targets.display());
    let m = refused(&b, &escape);
    assert!(m.contains("outside"), "{m}");
    assert!(!dir.path().join("escaped.raw").exists());
    std::os::unix::fs::symlink(outside.path(), targets.join("link")).unwrap();
    let m = refused(&b, &format!("{}/link/x.raw", targets.display()));
    assert!(m.contains("outside"), "{m}");
    assert!(!outside.path().join("x.raw").exists());
    std::os::unix::fs::symlink(outside.path().join("y.raw"), targets.join("y.raw")).unwrap();
    let m = refused(&b, &targets.join("y.raw").display().to_string());
    assert!(m.contains("y.raw"), "{m}");
    assert!(!outside.path().join("y.raw").exists());
    let job = start_mirror(
        &b,
        json!({"disk": "vm", "target": targets.join("in.raw").display().to_string(), "create": true}),
    );
    wait_state(&b, &job, &["ready"], std::time::Duration::from_secs(60));
}

#[test]
fn the_example_unit_is_unprivileged_and_verifies() {
    let unit = workspace().join("examples/appliance.service");
    let text = std::fs::read_to_string(&unit).unwrap();
    let user = text.lines().find_map(|l| l.strip_prefix("User=")).expect("a User= line");
    assert!(user != "root" && !user.is_empty(), "runs as {user}");
    assert!(text.contains("\nCapabilityBoundingSet="), "capabilities are bounded");
    assert!(!text.contains("CAP_SYS_ADMIN"), "no CAP_SYS_ADMIN");
    require_tool("systemd-analyze", "systemd");
    // The unit names /usr/local/bin/appliance; verify a copy that names this build.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("appliance.service");
    let bin = appliance_tests::bin();
    std::fs::write(&copy, text.replace("/usr/local/bin/appliance", &bin.display().to_string()))
        .unwrap();
    let out = run(Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(&copy));
    let err = String::from_utf8_lossy(&out.stderr);
    let own: Vec<&str> = err.lines().filter(|l| l.contains("appliance.service")).collect();
    assert!(own.is_empty(), "systemd-analyze verify: {err}");
}
