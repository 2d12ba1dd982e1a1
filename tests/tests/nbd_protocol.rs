//! Protocol conformance and abuse: malformed and hostile requests get the protocol's
//! error reply or a clean disconnect, and the server keeps serving everyone else.

use std::io::{Read, Write};
use std::time::Duration;

use appliance_tests::nbd_client::*;
use appliance_tests::{Appliance, Setup, pattern, sparse_file};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 8 * MIB;

fn start() -> Appliance {
    let disks = "[[disk]]\nname = \"d\"\npath = \"{dir}/d.img\"\n\n\
                 [[disk]]\nname = \"ro\"\npath = \"{dir}/ro.img\"\nread_only = true\n\n\
                 [[disk]]\nname = \"m\"\ndriver = \"mem\"\nsize = \"8MiB\"\n"
        .to_string();
    Appliance::start(Setup { disks, ..Setup::default() }, |dir| {
        sparse_file(&dir.join("d.img"), SIZE);
        std::fs::write(dir.join("ro.img"), pattern(9, SIZE as usize)).unwrap();
    })
}

/// A well-behaved client still gets correct service.
fn healthy(a: &Appliance) {
    let mut c = Client::connect(&a.sock, "d", true, false).expect("healthy client connects");
    let data = pattern(42, 4096);
    assert_eq!(c.write(1, 12288, &data).unwrap().error, 0);
    let r = c.read(2, 12288, 4096).unwrap();
    assert_eq!((r.error, r.data == data), (0, true));
    c.disconnect();
}

/// Whether the server closed the connection (EOF or reset on the next read).
fn closed(c: &mut Client) -> bool {
    c.s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut b = [0u8; 1];
    matches!(c.s.read(&mut b), Ok(0) | Err(_))
}

#[test]
fn reads_and_writes_in_every_reply_mode() {
    let mut a = start();
    for (structured, extended) in [(false, false), (true, false), (true, true)] {
        let mut c = Client::connect(&a.sock, "d", structured, extended).unwrap();
        assert_eq!(c.size, SIZE);
        let data = pattern(u64::from(structured) + 2 * u64::from(extended), 3 * 4096 + 100);
        let w = c.write(10, 777, &data).unwrap();
        assert_eq!((w.cookie, w.error), (10, 0));
        let r = c.read(11, 777, data.len()).unwrap();
        assert_eq!(r.cookie, 11);
        assert!(r.data == data, "structured={structured} extended={extended}");
        c.request(CMD_FLUSH, 0, 12, 0, 0, &[]).unwrap();
        assert_eq!(c.reply(0).unwrap().error, 0);
        // Pipelined requests: all answered, by cookie, in whatever order.
        for i in 0..64u64 {
            c.request(CMD_READ, 0, 100 + i, i * 4096, 4096, &[]).unwrap();
        }
        let mut seen: Vec<u64> = (0..64).map(|_| c.reply(4096).unwrap().cookie).collect();
        seen.sort_unstable();
        assert_eq!(seen, (100..164).collect::<Vec<_>>());
        c.disconnect();
    }
    healthy(&a);
    assert!(a.stop().success());
}

#[test]
fn out_of_range_and_invalid_requests_get_errors() {
    let mut a = start();
    for (structured, extended) in [(false, false), (true, false), (true, true)] {
        let mut c = Client::connect(&a.sock, "d", structured, extended).unwrap();
        // Read past the end, and an offset that overflows.
        assert_eq!(c.read(1, SIZE - 512, 4096).unwrap().error, EINVAL);
        c.request(CMD_READ, 0, 2, u64::MAX - 10, 4096, &[]).unwrap();
        assert_eq!(c.reply(4096).unwrap().error, EINVAL);
        // Write past the end: the payload is consumed, ENOSPC returned.
        assert_eq!(c.write(3, SIZE - 100, &[7u8; 4096]).unwrap().error, ENOSPC);
        // Unknown command and unknown flags.
        c.request(99, 0, 4, 0, 0, &[]).unwrap();
        assert_eq!(c.reply(0).unwrap().error, EINVAL);
        c.request(CMD_FLUSH, 0x4000, 5, 0, 0, &[]).unwrap();
        assert_eq!(c.reply(0).unwrap().error, EINVAL);
        // Read larger than the maximum block size.
        c.request(CMD_READ, 0, 6, 0, 64 * MIB, &[]).unwrap();
        assert_eq!(c.reply(0).unwrap().error, EINVAL);
        // Write larger than the maximum block size: drained, refused, still in sync.
        let big = vec![0x5au8; 20 * MIB as usize];
        assert_eq!(c.write(7, 0, &big).unwrap().error, EINVAL);
        // Block status with no metadata context negotiated (simple mode) or of length 0.
        c.request(CMD_BLOCK_STATUS, 0, 8, 0, if structured { 0 } else { 4096 }, &[]).unwrap();
        assert_eq!(c.reply(0).unwrap().error, EINVAL);
        // The connection still works.
        assert_eq!(c.read(9, 0, 512).unwrap().error, 0);
        c.disconnect();
    }
    healthy(&a);
    assert!(a.stop().success());
}

#[test]
fn read_only_export_refuses_writes_with_eperm() {
    let mut a = start();
    let mut c = Client::connect(&a.sock, "ro", true, false).unwrap();
    assert_ne!(c.flags & 2, 0, "READ_ONLY transmission flag");
    assert_eq!(c.write(1, 0, &[1u8; 4096]).unwrap().error, EPERM);
    c.request(CMD_TRIM, 0, 2, 0, 4096, &[]).unwrap();
    assert_eq!(c.reply(0).unwrap().error, EPERM);
    c.request(CMD_WRITE_ZEROES, 0, 3, 0, 4096, &[]).unwrap();
    assert_eq!(c.reply(0).unwrap().error, EPERM);
    let r = c.read(4, 0, 4096).unwrap();
    assert!(r.error == 0 && r.data == pattern(9, SIZE as usize)[..4096]);
    c.disconnect();
    assert!(a.stop().success());
    assert!(
        std::fs::read(a.path("ro.img")).unwrap() == pattern(9, SIZE as usize),
        "image untouched"
    );
}

#[test]
fn block_status_reports_holes_and_data() {
    let mut a = start();
    for extended in [false, true] {
        let mut c = Client::connect(&a.sock, "d", true, extended).unwrap();
        assert_eq!(c.write(1, MIB, &pattern(1, 64 << 10)).unwrap().error, 0);
        c.request(CMD_BLOCK_STATUS, 0, 2, 0, 2 * MIB, &[]).unwrap();
        let r = c.reply(0).unwrap();
        assert_eq!(r.error, 0);
        let (head, desc) = if extended { (8, 16) } else { (4, 8) };
        let extents: Vec<(u64, u64)> = r.data[head..]
            .chunks(desc)
            .map(|d| {
                if extended {
                    (
                        u64::from_be_bytes(d[..8].try_into().unwrap()),
                        u64::from_be_bytes(d[8..16].try_into().unwrap()),
                    )
                } else {
                    (
                        u64::from(u32::from_be_bytes(d[..4].try_into().unwrap())),
                        u64::from(u32::from_be_bytes(d[4..8].try_into().unwrap())),
                    )
                }
            })
            .collect();
        assert_eq!(extents[0], (MIB, 3), "a hole first: {extents:?}");
        assert_eq!(extents[1].1, 0, "then data: {extents:?}");
        assert!(extents.iter().map(|e| e.0).sum::<u64>() <= 2 * MIB);
        c.disconnect();
    }
    assert!(a.stop().success());
}

#[test]
fn hostile_handshakes_are_refused_without_harm() {
    let mut a = start();
    // Unknown option: NBD_REP_ERR_UNSUP, and haggling goes on.
    let mut c = Client::greet(&a.sock).unwrap();
    c.send_option(4242, b"junk").unwrap();
    assert_eq!(c.option_reply().unwrap().0, (1 << 31) | 1);
    // Unknown export: NBD_REP_ERR_UNKNOWN.
    let mut d = Vec::new();
    d.extend_from_slice(&4u32.to_be_bytes());
    d.extend_from_slice(b"nope");
    d.extend_from_slice(&0u16.to_be_bytes());
    c.send_option(OPT_GO, &d).unwrap();
    let (kind, msg) = c.option_reply().unwrap();
    assert_eq!(kind, (1 << 31) | 6);
    assert!(String::from_utf8_lossy(&msg).contains("nope"));
    // Malformed GO data: NBD_REP_ERR_INVALID.
    c.send_option(OPT_GO, &[0, 0, 0, 9, b'x']).unwrap();
    assert_eq!(c.option_reply().unwrap().0, (1 << 31) | 3);
    // TLS is refused by policy.
    c.send_option(5, &[]).unwrap();
    assert_eq!(c.option_reply().unwrap().0, (1 << 31) | 2);
    // Bad option magic: disconnect.
    c.s.write_all(&[0u8; 16]).unwrap();
    assert!(closed(&mut c));

    // Unknown client flags: disconnect.
    let mut s = std::os::unix::net::UnixStream::connect(&a.sock).unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    s.write_all(&0x8000_0000u32.to_be_bytes()).unwrap();
    let mut c2 = Client { s, structured: false, extended: false, size: 0, flags: 0 };
    assert!(closed(&mut c2));

    // An option claiming a gigabyte of data: disconnect.
    let mut c = Client::greet(&a.sock).unwrap();
    let mut h = Vec::new();
    h.extend_from_slice(&IHAVEOPT.to_be_bytes());
    h.extend_from_slice(&OPT_GO.to_be_bytes());
    h.extend_from_slice(&(1u32 << 30).to_be_bytes());
    c.s.write_all(&h).unwrap();
    assert!(closed(&mut c));

    // EXPORT_NAME of an unknown export cannot fail politely: disconnect.
    let mut c = Client::greet(&a.sock).unwrap();
    c.send_option(1, b"missing").unwrap();
    assert!(closed(&mut c));

    // Clients that vanish during the handshake.
    for n in [0usize, 7, 17, 20] {
        let mut s = std::os::unix::net::UnixStream::connect(&a.sock).unwrap();
        let mut g = [0u8; 18];
        s.read_exact(&mut g).unwrap();
        let mut bytes = 3u32.to_be_bytes().to_vec();
        bytes.extend_from_slice(&IHAVEOPT.to_be_bytes());
        bytes.extend_from_slice(&OPT_GO.to_be_bytes());
        bytes.extend_from_slice(&100u32.to_be_bytes());
        s.write_all(&bytes[..n.min(bytes.len())]).unwrap();
    }
    healthy(&a);
    assert!(a.alive());
    assert!(a.stop().success());
}

#[test]
fn bad_magic_and_huge_payloads_end_only_that_connection() {
    let mut a = start();
    let mut other = Client::connect(&a.sock, "d", true, false).unwrap();
    // Bad request magic.
    let mut c = Client::connect(&a.sock, "d", true, false).unwrap();
    c.s.write_all(&[0xAA; 28]).unwrap();
    assert!(closed(&mut c));
    // A write announcing 4 GiB of payload (too large to skip).
    let mut c = Client::connect(&a.sock, "d", false, false).unwrap();
    c.request(CMD_WRITE, 0, 1, 0, u64::from(u32::MAX), &[1, 2, 3]).unwrap();
    assert!(closed(&mut c));
    // Extended headers: a 2^60-byte write.
    let mut c = Client::connect(&a.sock, "d", true, true).unwrap();
    c.request(CMD_WRITE, 0, 1, 0, 1 << 60, &[1, 2, 3]).unwrap();
    assert!(closed(&mut c));
    // The other connection, opened before all this, still works.
    assert_eq!(other.read(5, 0, 4096).unwrap().error, 0);
    other.disconnect();
    healthy(&a);
    assert!(a.stop().success());
}

#[test]
fn clients_vanishing_mid_request_do_not_hurt_the_server() {
    let mut a = start();
    for round in 0..20u64 {
        let mut c =
            Client::connect(&a.sock, if round % 2 == 0 { "d" } else { "m" }, round % 3 == 0, false)
                .unwrap();
        match round % 4 {
            // Half a write payload, then gone.
            0 => c.request(CMD_WRITE, 0, 1, 0, MIB, &vec![1u8; (MIB / 2) as usize]).unwrap(),
            // Half a request header.
            1 => c.s.write_all(&REQUEST_MAGIC.to_be_bytes()).unwrap(),
            // Many reads in flight, replies never read.
            2 => {
                for i in 0..100 {
                    c.request(CMD_READ, 0, i, 0, MIB, &[]).unwrap();
                }
            }
            // Writes in flight, then gone.
            _ => {
                for i in 0..50 {
                    c.request(CMD_WRITE, 0, i, i * 4096, 4096, &[3u8; 4096]).unwrap();
                }
            }
        }
        drop(c);
    }
    std::thread::sleep(Duration::from_millis(200));
    assert!(a.alive(), "server died:\n{}", a.logs());
    healthy(&a);
    assert!(a.stop().success());
}

#[test]
fn hundreds_of_concurrent_connections() {
    let mut a = start();
    let sock = a.sock.clone();
    let threads: Vec<_> = (0..20u64)
        .map(|t| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                // Each thread holds 15 connections open at once: 300 in total.
                let mut conns: Vec<Client> = (0..15)
                    .map(|i| {
                        Client::connect(&sock, "m", (t + i) % 2 == 0, (t + i) % 3 == 0)
                            .expect("connect")
                    })
                    .collect();
                for (i, c) in conns.iter_mut().enumerate() {
                    let off = (t * 15 + i as u64) * 8192;
                    let data = pattern(off, 8192);
                    assert_eq!(c.write(1, off, &data).unwrap().error, 0);
                }
                for (i, c) in conns.iter_mut().enumerate() {
                    let off = (t * 15 + i as u64) * 8192;
                    let r = c.read(2, off, 8192).unwrap();
                    assert!(
                        r.error == 0 && r.data == pattern(off, 8192),
                        "data of connection {t}/{i}"
                    );
                }
                for c in conns {
                    c.disconnect();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("client thread");
    }
    healthy(&a);
    assert!(a.stop().success());
}

#[test]
fn flush_is_visible_across_connections() {
    // Two connections on what are, with two reactors, different reactors: a write
    // completed on one and a flush on the other leave the data in the file.
    let disks = "[[disk]]\nname = \"d\"\npath = \"{dir}/d.img\"\n".to_string();
    let mut a = Appliance::start(Setup { cores: "[0, 1]", disks, ..Setup::default() }, |dir| {
        sparse_file(&dir.join("d.img"), SIZE)
    });
    let mut w = Client::connect(&a.sock, "d", true, false).unwrap();
    let mut f = Client::connect(&a.sock, "d", true, false).unwrap();
    assert_ne!(w.flags & (1 << 8), 0, "CAN_MULTI_CONN");
    let data = pattern(77, 65536);
    assert_eq!(w.write(1, 65536, &data).unwrap().error, 0);
    f.request(CMD_FLUSH, 0, 2, 0, 0, &[]).unwrap();
    assert_eq!(f.reply(0).unwrap().error, 0);
    let r = f.read(3, 65536, 65536).unwrap();
    assert!(r.data == data, "the other connection reads the write");
    use std::os::unix::fs::FileExt;
    let mut back = vec![0u8; 65536];
    std::fs::File::open(a.path("d.img")).unwrap().read_exact_at(&mut back, 65536).unwrap();
    assert!(back == data);
    w.disconnect();
    f.disconnect();
    assert!(a.stop().success());
}

/// Zero-length and degenerate requests of every command, in every reply mode, through
/// a hand-made client (real clients refuse to send most of them): each is answered as
/// the protocol says, by the shared validation step, and the connection carries on.
#[test]
fn degenerate_requests_get_protocol_answers() {
    let mut a = start();
    for export in ["d", "m"] {
        for (structured, extended) in [(false, false), (true, false), (true, true)] {
            let mode = format!("{export}: structured={structured} extended={extended}");
            let mut c = Client::connect(&a.sock, export, structured, extended).unwrap();
            // Zero-length read: success and no data; a structured reply when negotiated.
            c.request(CMD_READ, 0, 1, 4096, 0, &[]).unwrap();
            let r = c.reply(0).unwrap();
            assert_eq!((r.cookie, r.error, r.data.len()), (1, 0, 0), "{mode}");
            assert_eq!(r.simple, !structured, "{mode}: read reply kind");
            // Zero-length write (no payload), with and without FUA.
            for (cookie, flags) in [(2, 0), (3, 1)] {
                c.request(CMD_WRITE, flags, cookie, 8192, 0, &[]).unwrap();
                assert_eq!(c.reply(0).unwrap().error, 0, "{mode}: empty write");
            }
            // Zero-length trim, write-zeroes, cache: nothing to do, success.
            for (cookie, kind) in [(4, CMD_TRIM), (5, CMD_WRITE_ZEROES), (6, CMD_CACHE)] {
                c.request(kind, 0, cookie, 4096, 0, &[]).unwrap();
                let r = c.reply(0).unwrap();
                assert_eq!((r.cookie, r.error), (cookie, 0), "{mode}: empty command {kind}");
            }
            // Zero length exactly at the end is fine; past the end it is not.
            c.request(CMD_READ, 0, 7, SIZE, 0, &[]).unwrap();
            assert_eq!(c.reply(0).unwrap().error, 0, "{mode}");
            c.request(CMD_READ, 0, 8, SIZE + 512, 0, &[]).unwrap();
            assert_eq!(c.reply(0).unwrap().error, EINVAL, "{mode}");
            c.request(CMD_WRITE, 0, 9, SIZE + 512, 0, &[]).unwrap();
            assert_eq!(c.reply(0).unwrap().error, ENOSPC, "{mode}");
            c.request(CMD_TRIM, 0, 10, u64::MAX, 0, &[]).unwrap();
            assert_eq!(c.reply(0).unwrap().error, EINVAL, "{mode}");
            // Block status of no bytes: EINVAL (a reply needs a non-empty extent).
            c.request(CMD_BLOCK_STATUS, 0, 11, 0, 0, &[]).unwrap();
            assert_eq!(c.reply(0).unwrap().error, EINVAL, "{mode}");
            // Effect lengths beyond the export, and huge ones inside it.
            c.request(CMD_WRITE_ZEROES, 0, 12, SIZE - 4096, 8192, &[]).unwrap();
            assert_eq!(c.reply(0).unwrap().error, ENOSPC, "{mode}");
            c.request(CMD_WRITE_ZEROES, 0, 13, 0, SIZE, &[]).unwrap();
            assert_eq!(c.reply(0).unwrap().error, 0, "{mode}: zeroing the whole export");
            c.request(CMD_TRIM, 0, 14, 0, SIZE, &[]).unwrap();
            assert_eq!(c.reply(0).unwrap().error, 0, "{mode}: trimming the whole export");
            // One-byte and odd-sized requests at odd offsets.
            assert_eq!(c.write(15, SIZE - 1, &[0xab]).unwrap().error, 0, "{mode}");
            let r = c.read(16, SIZE - 1, 1).unwrap();
            assert_eq!((r.error, r.data), (0, vec![0xab]), "{mode}");
            // Flush with a range (reserved fields): still a flush.
            c.request(CMD_FLUSH, 0, 17, 12345, 678, &[]).unwrap();
            assert_eq!(c.reply(0).unwrap().error, 0, "{mode}");
            // The connection is intact.
            let data = pattern(7, 4096);
            assert_eq!(c.write(18, 0, &data).unwrap().error, 0, "{mode}");
            assert_eq!(c.read(19, 0, 4096).unwrap().data, data, "{mode}");
            c.disconnect();
        }
    }
    healthy(&a);
    assert!(a.stop().success(), "{}", a.logs());
    assert!(!a.logs().contains("panicked"), "{}", a.logs());
}

/// The same through libnbd (nbdsh) with its client-side checks switched off: a real
/// client's view of zero-length requests.
#[test]
fn zero_length_requests_through_libnbd() {
    // nbdsh is `python3 -m nbd`; the module is Debian's python3-libnbd, for Debian's
    // python3 (which an interpreter earlier in PATH may not be).
    appliance_tests::require_tool("/usr/bin/python3", "python3-libnbd");
    let mut a = start();
    let script = r#"
h.set_strict_mode(0)
assert h.pread(0, 4096) == b""
h.pwrite(b"", 4096)
h.pwrite(b"", 4096, nbd.CMD_FLAG_FUA)
h.trim(0, 4096)
h.zero(0, 4096)
h.cache(0, 4096)
try:
    h.block_status(0, 0, lambda *a: 0)
    raise SystemExit("empty block status accepted")
except nbd.Error as e:
    assert e.errno in ("EINVAL", errno.EINVAL), e
h.pwrite(b"x" * 512, 0)
assert h.pread(512, 0) == b"x" * 512
print("ok")
"#;
    for export in ["d", "m"] {
        let out = appliance_tests::run(
            std::process::Command::new("/usr/bin/python3")
                .args(["-m", "nbd", "-u", &a.uri(export), "-c", "import errno"])
                .args(["-c", script]),
        );
        assert!(appliance_tests::stdout(&out).contains("ok"), "{export}: {out:?}");
    }
    assert!(a.stop().success(), "{}", a.logs());
}
