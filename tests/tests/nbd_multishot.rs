//! Receives through one multishot receive per connection (`nbd.multishot_receive =
//! "on"`), judged by the bytes real clients (fio's nbd engine, qemu-img) write and read
//! back (writes switch a connection to direct receives and reads switch it back), by
//! the server's own count of receives that came that way, by a client that pipelines
//! until the stream's buffers run out, and by clients that vanish mid-request (more of
//! them than a reactor has streams: a stream not given back would show).

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::{Duration, Instant};

use appliance_tests::nbd_client::*;
use appliance_tests::ops::{control_extra, nbd_counters};
use appliance_tests::{Appliance, Setup, fio_verify, pattern, require_tool, run};

const MIB: usize = 1 << 20;
const SIZE: usize = 64 * MIB;

fn start(multishot: &str) -> (Appliance, Vec<u8>) {
    let data = pattern(41, SIZE);
    let a = Appliance::start(
        Setup {
            nbd: format!("multishot_receive = \"{multishot}\"\n"),
            extra: control_extra(None),
            disks: "[[disk]]\nname = \"d\"\npath = \"{dir}/d.img\"\n".into(),
            ..Setup::default()
        },
        |dir| std::fs::write(dir.join("d.img"), &data).unwrap(),
    );
    (a, data)
}

/// The export's count of receives that came through multishot receives.
fn multishot_receives(a: &Appliance) -> u64 {
    nbd_counters(a, "d", ["multishot_receives"])[0]
}

/// The file behind the export holds what the export serves (qemu-img as the oracle).
fn export_matches_file(a: &Appliance) {
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(a.path("d.img"))
        .arg(a.uri("d")));
}

#[test]
fn writes_through_multishot_receives_land_and_read_back() {
    require_tool("fio", "fio");
    require_tool("qemu-img", "qemu-utils");
    let (a, _) = start("on");
    // 4k writes at depth, then their verifying reads: the writes switch the connection
    // to direct receives, the run of reads switches it back to the stream.
    fio_verify(&a.uri("d"), "32M", "4k-4k", 32);
    let small = multishot_receives(&a);
    assert!(small > 1000, "the reads at QD32 came through the stream: {small} receives");
    // Sizes up to 256 KiB over TCP and down to 512 bytes: the switches happen mid-run,
    // with parts of payloads already in the stream's buffers; the bytes stay in order.
    fio_verify(&a.tcp_uri("d"), "48M", "4k-256k", 8);
    fio_verify(&a.uri("d"), "48M", "512-64k", 16);
    export_matches_file(&a);
    assert!(multishot_receives(&a) > small, "the mixed-size runs used the stream too");
}

#[test]
fn off_receives_one_at_a_time() {
    require_tool("fio", "fio");
    let (a, _) = start("off");
    fio_verify(&a.uri("d"), "16M", "4k-64k", 16);
    assert_eq!(multishot_receives(&a), 0, "multishot_receive = \"off\" never streams");
}

/// Pipelines 1 MiB reads without reading a reply until the socket stops taking them:
/// the server stops taking requests (its buffer budget is full of unsent replies),
/// the stream's buffers fill and its receive stops for want of them. Every reply then
/// arrives with the file's bytes, and the connection goes on working.
#[test]
fn a_stream_out_of_buffers_resumes_in_order() {
    let (a, data) = start("on");
    let mut c = Client::connect(&a.sock, "d", false, false).expect("connect");
    c.s.set_write_timeout(Some(Duration::from_millis(500))).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut sent = 0u64;
    let off = |i: u64| (i * MIB as u64) % (SIZE as u64);
    while c.request(CMD_READ, 0, sent, off(sent), MIB as u64, &[]).is_ok() {
        sent += 1;
        assert!(Instant::now() < deadline, "the server kept reading: {sent} requests");
    }
    assert!(sent > 1000, "the socket took {sent} requests before it filled");
    // A 28-byte header goes into the socket whole or not at all, so the stream the
    // server reads next is whole requests.
    c.s.set_write_timeout(None).unwrap();
    c.s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut seen = 0u64;
    while seen < sent {
        let r =
            c.reply(MIB).unwrap_or_else(|e| panic!("reply {seen} of {sent}: {e}\n{}", a.logs()));
        assert_eq!(r.error, 0, "read {} failed", r.cookie);
        let at = off(r.cookie) as usize;
        assert!(r.data == data[at..at + MIB], "read {} returned other bytes", r.cookie);
        seen += 1;
    }
    let block = pattern(7, 64 << 10);
    assert_eq!(c.write(u64::MAX - 1, 0, &block).unwrap().error, 0);
    let r = c.read(u64::MAX, 0, block.len()).unwrap();
    assert!(r.error == 0 && r.data == block, "the connection works after the flood");
    c.disconnect();
}

/// 600 clients (a reactor has 512 streams) each vanish in the middle of a request:
/// half a header, or a write's header and part of its payload. Each stream must be
/// given back; a client after them still gets one, and its writes land.
#[test]
fn streams_are_given_back_when_clients_vanish() {
    require_tool("fio", "fio");
    let (a, _) = start("on");
    for i in 0..600u64 {
        let mut c = Client::connect(&a.sock, "d", false, false).expect("connect");
        let mut hdr = Vec::new();
        hdr.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        hdr.extend_from_slice(&0u16.to_be_bytes());
        hdr.extend_from_slice(&CMD_WRITE.to_be_bytes());
        hdr.extend_from_slice(&i.to_be_bytes());
        hdr.extend_from_slice(&0u64.to_be_bytes());
        hdr.extend_from_slice(&(128u32 << 10).to_be_bytes());
        if i % 2 == 0 {
            hdr.truncate(13);
        } else {
            hdr.extend_from_slice(&pattern(i, 40 << 10));
        }
        c.s.write_all(&hdr).unwrap();
        if i % 100 == 99 {
            // Let the server catch up with the closes (max_connections).
            std::thread::sleep(Duration::from_millis(200));
        }
        drop(c);
    }
    std::thread::sleep(Duration::from_millis(500));
    let before = multishot_receives(&a);
    fio_verify(&a.uri("d"), "8M", "4k-4k", 16);
    let after = multishot_receives(&a);
    assert!(after > before + 100, "a client after 600 vanished ones streams: {before} -> {after}");
    let probe = UnixStream::connect(&a.sock);
    assert!(probe.is_ok(), "the server still accepts");
}
