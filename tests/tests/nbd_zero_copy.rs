//! Read replies sent without copying (`nbd.zero_copy_send`) over TCP, judged by the
//! bytes real clients (nbdcopy, fio's nbd engine) read back, by the server's own count
//! of zero-copy sends, and by clients killed while replies are in flight.
//!
//! On loopback the kernel copies a zero-copy send after all and says so in the send's
//! notification; `always` keeps sending without copying regardless, so these tests run
//! the path (stages held until their notifications, partial sends finished in the next
//! stage, connections torn down with sends in flight) even on this machine. `auto`
//! must stop after the first report.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use appliance_tests::ops::{control_extra, nbd_counters};
use appliance_tests::{Appliance, Setup, fio_verify, pattern, require_tool, run};

const MIB: usize = 1 << 20;

fn start(mode: &str, size: usize) -> (Appliance, Vec<u8>) {
    start_with(mode, size, "")
}

fn start_with(mode: &str, size: usize, nbd: &str) -> (Appliance, Vec<u8>) {
    let data = pattern(23, size);
    let a = Appliance::start(
        Setup {
            nbd: format!("zero_copy_send = \"{mode}\"\n{nbd}"),
            extra: control_extra(None),
            disks: "[[disk]]\nname = \"d\"\npath = \"{dir}/d.img\"\n".into(),
            ..Setup::default()
        },
        |dir| std::fs::write(dir.join("d.img"), &data).unwrap(),
    );
    (a, data)
}

/// The export's (zero-copy sends, sends the kernel reported copied).
fn zero_copy_counts(a: &Appliance) -> (u64, u64) {
    let [sends, copied] = nbd_counters(a, "d", ["zero_copy_sends", "zero_copy_copied"]);
    (sends, copied)
}

fn nbdcopy_out(uri: &str, into: &std::path::Path, connections: u32) -> Vec<u8> {
    run(Command::new("nbdcopy")
        .arg(format!("--connections={connections}"))
        .args(["--requests=16", "--request-size=1048576"])
        .arg(uri)
        .arg(into));
    std::fs::read(into).unwrap()
}

#[test]
fn replies_sent_without_copying_carry_the_files_bytes() {
    require_tool("nbdcopy", "libnbd-bin");
    require_tool("fio", "fio");
    let (mut a, data) = start("always", 64 * MIB);
    let back = nbdcopy_out(&a.tcp_uri("d"), &a.path("back.img"), 4);
    assert!(back == data, "the export read over TCP differs from the file");
    let (sends, copied) = zero_copy_counts(&a);
    assert!(sends >= 8, "64 MiB in 1 MiB reads went without copying: {sends} sends");
    assert!(copied > 0, "loopback: the kernel reports it copied ({copied} of {sends})");

    // Over the unix socket every reply is copied: the count does not move.
    let _ = nbdcopy_out(&a.uri("d"), &a.path("back2.img"), 2);
    assert_eq!(zero_copy_counts(&a).0, sends, "no zero-copy send on a unix socket");

    // Mixed sizes at depth: small replies copied, large ones not, in one stream; a
    // reply partly sent without copying is finished the same way.
    let job = fio_verify(&a.tcp_uri("d"), "48M", "4k-1M", 16);
    assert!(job["read"]["io_bytes"].as_u64().unwrap() >= 48 * MIB as u64);
    assert!(zero_copy_counts(&a).0 > sends, "fio's large reads went without copying");
    assert!(a.stop().success(), "{}", a.logs());
}

#[test]
fn auto_stops_sending_without_copying_once_the_kernel_copies() {
    require_tool("nbdcopy", "libnbd-bin");
    let (mut a, data) = start("auto", 32 * MIB);
    let back = nbdcopy_out(&a.tcp_uri("d"), &a.path("back.img"), 1);
    assert!(back == data, "the export read over TCP differs from the file");
    let (sends, copied) = zero_copy_counts(&a);
    // The first report comes back when the connection's first stage is reused: at
    // most its four stages (and one send finishing a partial reply) go before it.
    assert!((1..=8).contains(&sends), "auto on loopback: {sends} zero-copy sends of 32");
    assert!(copied >= 1, "the kernel's report was seen ({copied})");
    let off = start("off", 8 * MIB).0;
    let _ = nbdcopy_out(&off.tcp_uri("d"), &off.path("back.img"), 1);
    assert_eq!(zero_copy_counts(&off).0, 0, "off: every reply copied");
    assert!(a.stop().success(), "{}", a.logs());
}

#[test]
fn clients_killed_with_replies_in_flight_leave_the_server_serving() {
    require_tool("nbdcopy", "libnbd-bin");
    require_tool("fio", "fio");
    let (mut a, data) = start("always", 64 * MIB);
    for round in 0..4 {
        let mut fio = Command::new("fio")
            .args(["--name=r", "--ioengine=nbd", "--rw=randread", "--bs=1M", "--iodepth=32"])
            .args(["--numjobs=2", "--time_based", "--runtime=30", "--size=64M"])
            .arg(format!("--uri={}", a.tcp_uri("d")))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(700 + 300 * round));
        fio.kill().unwrap();
        fio.wait().unwrap();
        assert!(a.alive(), "round {round}: the server died\n{}", a.logs());
    }
    // The dead connections' buffers came back: the export serves whole 1 MiB reads
    // at depth, and every byte is the file's.
    let back = nbdcopy_out(&a.tcp_uri("d"), &a.path("back.img"), 4);
    assert!(back == data, "the export read after the kills differs from the file");
    assert!(zero_copy_counts(&a).0 > 0);
    assert!(!a.logs().contains("panicked"), "{}", a.logs());
    assert!(a.stop().success(), "{}", a.logs());
}

/// A bare NBD client over TCP (newstyle, `NBD_OPT_EXPORT_NAME`): enough to pipeline
/// requests and never read a reply.
fn raw_tcp_client(a: &Appliance, export: &str) -> TcpStream {
    let mut s = TcpStream::connect(a.tcp).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    s.write_all(&3u32.to_be_bytes()).unwrap(); // FIXED_NEWSTYLE | NO_ZEROES
    let mut opt = b"IHAVEOPT".to_vec();
    opt.extend_from_slice(&1u32.to_be_bytes()); // NBD_OPT_EXPORT_NAME
    opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
    opt.extend_from_slice(export.as_bytes());
    s.write_all(&opt).unwrap();
    let mut info = [0u8; 10];
    s.read_exact(&mut info).unwrap();
    s
}

/// A read request (simple replies).
fn read_request(cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut r = 0x2560_9513u32.to_be_bytes().to_vec();
    r.extend_from_slice(&0u16.to_be_bytes());
    r.extend_from_slice(&0u16.to_be_bytes()); // NBD_CMD_READ
    r.extend_from_slice(&cookie.to_be_bytes());
    r.extend_from_slice(&offset.to_be_bytes());
    r.extend_from_slice(&len.to_be_bytes());
    r
}

#[test]
fn a_tcp_client_that_stops_reading_is_cut_off_and_its_buffers_return() {
    require_tool("nbdcopy", "libnbd-bin");
    let (mut a, data) = start_with("always", 32 * MIB, "stall_timeout = 2");
    let mut stuck = raw_tcp_client(&a, "d");
    stuck.set_write_timeout(Some(Duration::from_millis(500))).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut sent = 0u64;
    while stuck.write_all(&read_request(sent, (sent % 32) * MIB as u64, MIB as u32)).is_ok() {
        sent += 1;
        assert!(Instant::now() < deadline, "the server kept reading: {sent} requests");
    }
    // Past stall_timeout the server hangs up; reading then finds what the kernel had
    // queued, then the end of the stream.
    std::thread::sleep(Duration::from_secs(4));
    stuck.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut sink = vec![0u8; MIB];
    let closed = loop {
        match stuck.read(&mut sink) {
            Ok(0) | Err(_) => break true,
            Ok(_) if Instant::now() > deadline + Duration::from_secs(30) => break false,
            Ok(_) => {}
        }
    };
    assert!(closed, "the server kept a client that read nothing for 4 s");
    assert!(a.logs().contains("made no progress"), "{}", a.logs());
    // Its buffers came back: the export serves whole 1 MiB reads at depth again.
    let back = nbdcopy_out(&a.tcp_uri("d"), &a.path("back.img"), 2);
    assert!(back == data, "the export read after the cut-off differs from the file");
    assert!(a.stop().success(), "{}", a.logs());
}
