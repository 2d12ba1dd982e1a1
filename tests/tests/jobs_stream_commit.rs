//! Stream and commit on a three-deep chain (base ← mid ← top, each holding data of its
//! own, mid zeroing part of base), served while a writer keeps writing.
//!
//! Judged by qemu-img: afterwards the guest view (`qemu-img convert -O raw`) equals the
//! view before plus the writes (the writer's blocks read back), the chain is what it
//! should be (`qemu-img info --backing-chain`), and every image checks clean.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use appliance_tests::jobs::*;
use appliance_tests::ops::{control_extra, rpc};
use appliance_tests::{Appliance, Setup, require_tool, run};
use serde_json::{Value, json};

fn qemu_img(args: &[&str], dir: &Path) {
    run(Command::new("qemu-img").current_dir(dir).args(args));
}

/// base (data 0x01 at 0..12M), mid over it (0x02 at 4..8M, zeroes at 8..9M), top over
/// mid (0x03 at 6..7M); 128 MiB; `top.qcow2` served as disk `vm` on two reactors.
fn start_chain() -> Appliance {
    require_tool("qemu-img", "qemu-utils");
    let setup = Setup {
        cores: "[0, 1]",
        disks: "[[disk]]\nname = \"vm\"\npath = \"{dir}/top.qcow2\"\nformat = \"qcow2\"\n".into(),
        extra: control_extra(None),
        ..Setup::default()
    };
    Appliance::start(setup, |dir| {
        qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "128M"], dir);
        qemu_io(&dir.join("base.qcow2"), &["write -P 0x01 0 12M"]);
        qemu_img(
            &["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "mid.qcow2"],
            dir,
        );
        qemu_io(&dir.join("mid.qcow2"), &["write -P 0x02 4M 4M", "write -z 8M 1M"]);
        qemu_img(
            &["create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2"],
            dir,
        );
        qemu_io(&dir.join("top.qcow2"), &["write -P 0x03 6M 1M"]);
    })
}

/// The chain's view outside the writer's region, as the test expects it.
fn check_view(a: &Appliance) {
    read_pattern_ok(a, "read -P 0x01 0 4M");
    read_pattern_ok(a, "read -P 0x02 4M 2M");
    read_pattern_ok(a, "read -P 0x03 6M 1M");
    read_pattern_ok(a, "read -P 0x02 7M 1M");
    read_pattern_ok(a, "read -P 0 8M 1M");
    read_pattern_ok(a, "read -P 0x01 9M 3M");
    read_pattern_ok(a, "read -P 0 12M 84M");
}

/// The backing chain qemu-img reports for `img`, top first.
fn chain_of(img: &Path) -> Vec<String> {
    let out = run(Command::new("qemu-img")
        .args(["info", "--backing-chain", "--output=json", "-U"])
        .arg(img));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|i| {
            Path::new(i["filename"].as_str().unwrap())
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

/// Converting the image to raw gives the view: compared with what the served disk shows.
fn same_view_offline(a: &Appliance, img: &Path, served: &Path) {
    let out = run(Command::new("qemu-img")
        .args(["compare", "-U", "-f", "qcow2", "-F", "raw"])
        .arg(img)
        .arg(served));
    assert!(out.status.success(), "{}: {}", img.display(), String::from_utf8_lossy(&out.stdout));
    let _ = a;
}

#[test]
fn stream_pulls_the_chain_up_and_drops_the_backing_link() {
    let mut a = start_chain();
    check_view(&a);
    let writer = Writer::start(&a.sock);
    let r = rpc(&a, "stream_start", json!({"disk": "vm"}));
    let job = r["result"]["job"].as_str().unwrap_or_else(|| panic!("{r}")).to_string();
    let j = wait_state(&a, &job, &["concluded"], Duration::from_secs(90));
    assert_eq!(j["type"], "stream");
    assert_eq!(j["offset"], j["len"], "{j}");
    let last = writer.finish();
    check_writer(&a.sock, &last);
    check_view(&a);
    // The served view, saved, for the offline comparison after shutdown.
    let served = a.path("served.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &a.uri("vm")])
        .arg(&served));
    assert!(a.stop().success(), "{}", a.logs());
    let top = a.path("top.qcow2");
    assert_eq!(chain_of(&top), vec!["top.qcow2"], "the image stands alone");
    qemu_img_clean(&top);
    same_view_offline(&a, &top, &served);
}

#[test]
fn commit_into_the_backing_file_pivots_onto_it() {
    let mut a = start_chain();
    let writer = Writer::start(&a.sock);
    let r = rpc(&a, "commit_start", json!({"disk": "vm"}));
    let job = r["result"]["job"].as_str().unwrap_or_else(|| panic!("{r}")).to_string();
    let j = wait_state(&a, &job, &["ready"], Duration::from_secs(90));
    assert_eq!(j["type"], "commit");
    assert!(j["target"].as_str().unwrap().ends_with("mid.qcow2"), "{j}");
    assert!(rpc(&a, "job_complete", json!({"job": job}))["result"].is_object());
    wait_state(&a, &job, &["concluded"], Duration::from_secs(60));
    let list = rpc(&a, "disk_list", json!({}));
    assert_eq!(list["result"][0]["path"], a.path("mid.qcow2").display().to_string(), "{list}");
    std::thread::sleep(Duration::from_millis(300));
    let last = writer.finish();
    check_writer(&a.sock, &last);
    check_view(&a);
    let served = a.path("served.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &a.uri("vm")])
        .arg(&served));
    assert!(a.stop().success(), "{}", a.logs());
    let mid = a.path("mid.qcow2");
    assert_eq!(chain_of(&mid), vec!["mid.qcow2", "base.qcow2"]);
    qemu_img_clean(&mid);
    qemu_img_clean(&a.path("base.qcow2"));
    same_view_offline(&a, &mid, &served);
}

#[test]
fn commit_into_the_bottom_of_the_chain_takes_every_layer() {
    let mut a = start_chain();
    let writer = Writer::start(&a.sock);
    let r = rpc(&a, "commit_start", json!({"disk": "vm", "base": a.path("base.qcow2")}));
    let job = r["result"]["job"].as_str().unwrap_or_else(|| panic!("{r}")).to_string();
    wait_state(&a, &job, &["ready"], Duration::from_secs(90));
    assert!(rpc(&a, "job_complete", json!({"job": job}))["result"].is_object());
    wait_state(&a, &job, &["concluded"], Duration::from_secs(60));
    let last = writer.finish();
    check_writer(&a.sock, &last);
    check_view(&a);
    assert!(a.stop().success(), "{}", a.logs());
    let base = a.path("base.qcow2");
    assert_eq!(chain_of(&base), vec!["base.qcow2"]);
    qemu_img_clean(&base);
}

#[test]
fn bad_stream_and_commit_requests_name_the_field() {
    let setup = Setup {
        disks: "[[disk]]\nname = \"flat\"\npath = \"{dir}/flat.qcow2\"\nformat = \"qcow2\"\n"
            .into(),
        extra: control_extra(None),
        ..Setup::default()
    };
    let mut flat = Appliance::start(setup, |dir| {
        qemu_img(&["create", "-q", "-f", "qcow2", "flat.qcow2", "16M"], dir);
    });
    for (m, p) in
        [("stream_start", json!({"disk": "flat"})), ("commit_start", json!({"disk": "flat"}))]
    {
        let r = rpc(&flat, m, p);
        assert_eq!(r["error"]["data"]["key"], "disk", "{r}");
        assert!(r["error"]["message"].as_str().unwrap().contains("backing"), "{r}");
    }
    assert!(flat.stop().success());
    let mut a = start_chain();
    let r = rpc(&a, "commit_start", json!({"disk": "vm", "base": "/elsewhere.qcow2"}));
    assert_eq!(r["error"]["data"]["key"], "base", "{r}");
    let r = rpc(&a, "commit_start", json!({"disk": "vm", "top": a.path("mid.qcow2")}));
    assert_eq!(r["error"]["data"]["key"], "top", "{r}");
    let r = rpc(&a, "stream_start", json!({"disk": "vm", "base": "x"}));
    assert_eq!(r["error"]["data"]["key"], "base", "unknown parameter: {r}");
    assert!(a.stop().success());
}
