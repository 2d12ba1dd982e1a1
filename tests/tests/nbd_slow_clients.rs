//! Clients that hold the server's resources: pipelining requests without reading the
//! replies, sending a header and stalling, opening more connections than allowed,
//! idling. Each costs bounded memory, never stalls the other connections of its
//! reactor, and is disconnected when it stops making progress.

use std::io::{Read, Write};
use std::process::Command;
use std::time::{Duration, Instant};

use appliance_tests::nbd_client::*;
use appliance_tests::{Appliance, Setup, pattern, run, run_unchecked, stdout};

const MIB: u64 = 1 << 20;

fn start(nbd: &str) -> Appliance {
    let disks = "[[disk]]\nname = \"m\"\ndriver = \"mem\"\nsize = \"64MiB\"\n".to_string();
    // One reactor: every connection shares it (and its 64 MiB buffer pool).
    Appliance::start(Setup { disks, nbd: nbd.to_string(), ..Setup::default() }, |_| {})
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Sends requests until the socket stops taking them (the server stopped reading: its
/// budget is full of replies the client does not read); returns how many were sent.
fn flood(c: &mut Client, kind: u16, len: u64) -> u64 {
    c.s.set_write_timeout(Some(Duration::from_millis(500))).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut sent = 0;
    while c.request(kind, 0, sent, (sent * MIB) % (32 * MIB), len, &[]).is_ok() {
        sent += 1;
        assert!(Instant::now() < deadline, "the server kept reading: {sent} requests");
    }
    sent
}

/// A healthy client's verified round trip, timed.
fn healthy(a: &Appliance, seed: u64) -> Duration {
    let t = Instant::now();
    let mut c = Client::connect(&a.sock, "m", true, false).expect("a healthy client connects");
    let data = pattern(seed, 256 << 10);
    let failed = |e: std::io::Error| -> Reply { panic!("healthy client: {e}\n{}", a.logs()) };
    for i in 0..16 {
        assert_eq!(c.write(i, 40 * MIB + i * (256 << 10), &data).unwrap_or_else(failed).error, 0);
        let r = c.read(100 + i, 40 * MIB + i * (256 << 10), data.len()).unwrap_or_else(failed);
        assert!(r.error == 0 && r.data == data, "healthy client's data");
    }
    c.disconnect();
    t.elapsed()
}

/// Whether the server has closed the connection (EOF after whatever it had queued).
fn closed_by_server(c: &mut Client, within: Duration) -> bool {
    c.s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let deadline = Instant::now() + within;
    let mut b = vec![0u8; 1 << 20];
    while Instant::now() < deadline {
        match c.s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return true,
        }
    }
    false
}

#[test]
fn clients_that_never_read_replies_are_bounded_and_harmless() {
    let mut a = start("stall_timeout = 3");
    let before = rss_kib(a.pid());
    // Two clients pipeline requests and never read a reply: 1 MiB reads (buffers the
    // server must hold) and flushes (replies without data, which must not pile up).
    let mut readers = Client::connect(&a.sock, "m", false, false).unwrap();
    let mut flushers = Client::connect(&a.sock, "m", true, false).unwrap();
    let reads = flood(&mut readers, CMD_READ, MIB);
    let flushes = flood(&mut flushers, CMD_FLUSH, 0);
    eprintln!("requests sent before the server stopped reading: {reads} reads, {flushes} flushes");
    // The reactor's other clients are served promptly meanwhile.
    let took = healthy(&a, 1);
    assert!(took < Duration::from_secs(10), "a healthy client took {took:?}");
    let grown = rss_kib(a.pid()).saturating_sub(before);
    assert!(grown < 96 << 10, "the stalled clients cost {grown} KiB of memory");
    // With no progress for stall_timeout, the server hangs up on both (reading now
    // only finds what the kernel had queued, then the end of the stream).
    std::thread::sleep(Duration::from_secs(5));
    assert!(closed_by_server(&mut readers, Duration::from_secs(15)), "{}", a.logs());
    assert!(closed_by_server(&mut flushers, Duration::from_secs(15)), "{}", a.logs());
    assert!(a.logs().contains("made no progress"), "{}", a.logs());
    healthy(&a, 2);
    assert!(a.stop().success());
}

#[test]
fn clients_that_send_a_header_and_stall_are_disconnected() {
    let mut a = start("stall_timeout = 2");
    let mut stalled = Vec::new();
    for i in 0..6u64 {
        // Write headers announcing 8 MiB payloads; a few bytes of payload, then silence.
        let mut c = Client::connect(&a.sock, "m", i % 2 == 0, false).unwrap();
        c.request(CMD_WRITE, 0, 1, 0, 8 * MIB, &[0x11; 100]).unwrap();
        stalled.push(c);
    }
    // A half header, then silence.
    let mut half = Client::connect(&a.sock, "m", false, false).unwrap();
    half.s.write_all(&REQUEST_MAGIC.to_be_bytes()).unwrap();
    let took = healthy(&a, 3);
    assert!(took < Duration::from_secs(10), "a healthy client took {took:?}");
    std::thread::sleep(Duration::from_secs(3));
    for c in &mut stalled {
        assert!(closed_by_server(c, Duration::from_secs(10)), "{}", a.logs());
    }
    assert!(closed_by_server(&mut half, Duration::from_secs(10)), "{}", a.logs());
    // Nothing of the stalled writes reached the disk.
    let out = run(Command::new("qemu-io").args(["-f", "raw", "-c", "read -P 0 0 8M", &a.uri("m")]));
    assert!(!stdout(&out).contains("fail"), "{}", stdout(&out));
    assert!(a.stop().success());
}

/// Stalled clients that hold all of the reactor's NBD buffers keep a healthy client of
/// the same reactor waiting for the pressure grace (2 s), not for `stall_timeout`.
#[test]
fn stalled_clients_holding_the_buffers_others_need_go_first() {
    let mut a = start("stall_timeout = 60");
    // Four 8 MiB write headers fill the reactor's NBD half of its 64 MiB pool.
    let mut stalled: Vec<Client> = (0..4)
        .map(|i| {
            let mut c = Client::connect(&a.sock, "m", i % 2 == 0, false).unwrap();
            c.request(CMD_WRITE, 0, 1, 0, 8 * MIB, &[0x22; 100]).unwrap();
            c
        })
        .collect();
    let took = healthy(&a, 4);
    assert!(took < Duration::from_secs(10), "a healthy client took {took:?}\n{}", a.logs());
    // As many as made room went (at least one); the rest hold their buffers until
    // stall_timeout, with nobody waiting for them.
    let closed = stalled
        .iter_mut()
        .map(|c| closed_by_server(c, Duration::from_secs(1)))
        .filter(|&x| x)
        .count();
    assert!(closed >= 1, "{}", a.logs());
    assert!(a.logs().contains("while holding buffers other requests wait for"), "{}", a.logs());
    drop(stalled);
    healthy(&a, 5);
    assert!(a.stop().success());
}

#[test]
fn connections_past_max_connections_are_refused_with_a_reason() {
    let mut a = start("max_connections = 3");
    let mut open: Vec<Client> =
        (0..3).map(|_| Client::connect(&a.sock, "m", true, false).unwrap()).collect();
    // The fourth gets the greeting and a policy error naming the limit.
    let err = Client::connect(&a.sock, "m", false, false).err().expect("refused");
    assert!(err.to_string().contains("too many connections"), "{err}");
    let out = run_unchecked(
        Command::new("qemu-img").args(["info", &a.uri("m")]),
        Duration::from_secs(30),
    );
    assert!(!out.status.success());
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(msg.contains("too many connections"), "qemu-img shows the reason: {msg}");
    // The open ones are unaffected; closing one makes room.
    assert_eq!(open[0].read(1, 0, 4096).unwrap().error, 0);
    open.pop().unwrap().disconnect();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut c = loop {
        match Client::connect(&a.sock, "m", false, false) {
            Ok(c) => break c,
            Err(e) => assert!(Instant::now() < deadline, "no room after a disconnect: {e}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(c.read(2, 0, 4096).unwrap().error, 0);
    c.disconnect();
    assert!(a.stop().success());
}

#[test]
fn idle_connections_time_out_when_configured() {
    let mut a = start("idle_timeout = 1");
    let mut idle = Client::connect(&a.sock, "m", false, false).unwrap();
    assert_eq!(idle.read(1, 0, 512).unwrap().error, 0);
    let mut busy = Client::connect(&a.sock, "m", false, false).unwrap();
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(3) {
        assert_eq!(busy.read(2, 0, 512).unwrap().error, 0, "a busy client is never idle");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(closed_by_server(&mut idle, Duration::from_secs(5)), "{}", a.logs());
    assert!(a.logs().contains("idle"), "{}", a.logs());
    busy.disconnect();
    assert!(a.stop().success());
}

/// Connections that say nothing hold a receive each on the reactor's io_uring; more of
/// them than the ring has operation slots (1200 on one reactor, past the 1024 slots a
/// disk's reads and writes use) must still leave the file disk on that ring its I/O.
#[test]
fn silent_connections_past_the_ring_slots_leave_the_disk_its_io() {
    let disks =
        "[[disk]]\nname = \"f\"\npath = \"f.raw\"\nformat = \"raw\"\ndriver = \"io_uring\"\n";
    let setup = Setup {
        disks: disks.to_string(),
        nbd: "max_connections = 1300\nsocket_io = \"io_uring\"".to_string(),
        ..Setup::default()
    };
    let mut a =
        Appliance::start(setup, |dir| appliance_tests::sparse_file(&dir.join("f.raw"), 64 * MIB));
    let mut silent: Vec<Client> = (0..1200)
        .map(|i| {
            Client::connect(&a.sock, "f", i % 2 == 0, false)
                .unwrap_or_else(|e| panic!("connection {i}: {e}\n{}", a.logs()))
        })
        .collect();
    // Each of these is served (the ones past the ring's socket slots through epoll).
    for (i, c) in silent.iter_mut().rev().take(3).enumerate() {
        assert_eq!(c.read(i as u64, 0, 4096).unwrap().error, 0);
    }
    let out = run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x5a 1M 4M",
        "-c",
        "read -P 0x5a 1M 4M",
        &a.uri("f"),
    ]));
    assert!(!stdout(&out).contains("fail"), "{}", stdout(&out));
    let took = healthy_file(&a);
    assert!(took < Duration::from_secs(10), "a healthy client took {took:?}");
    drop(silent);
    assert!(a.stop().success());
}

fn healthy_file(a: &Appliance) -> Duration {
    let t = Instant::now();
    let mut c = Client::connect(&a.sock, "f", true, false).expect("a healthy client connects");
    let data = pattern(7, 64 << 10);
    for i in 0..16 {
        assert_eq!(c.write(i, 8 * MIB + i * (64 << 10), &data).unwrap().error, 0);
        let r = c.read(100 + i, 8 * MIB + i * (64 << 10), data.len()).unwrap();
        assert!(r.error == 0 && r.data == data, "healthy client's data");
    }
    c.disconnect();
    t.elapsed()
}
