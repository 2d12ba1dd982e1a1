//! Fuzzing entry points: each feeds untrusted bytes to the real code, the cargo-fuzz
//! targets in `fuzz/` call them, and `tests/tests/fuzz_replay.rs` replays their seeds
//! and past failures under `cargo test`.
//!
//! - [`nbd_session`]: a client's byte stream (handshake, then requests) into the real
//!   NBD connection code over an in-memory transport (a socketpair), against a RAM
//!   disk, a read-only RAM disk and a qcow2 image, on two reactors; replies are read
//!   and dropped. The session must end (at the end of the input) without a panic.
//! - [`vhost_messages`]: vhost-user control messages (the wire format, with file
//!   descriptors attached where a message carries one: guest memory, kick and call
//!   eventfds, the inflight region) into the real backend through the `vhost` crate's
//!   request handler; queues it starts run on the reactors over the fuzzed guest
//!   memory.
//! - [`virtqueue_chain`]: a guest memory image and a descriptor head into the chain
//!   walk, then the request it yields into the real virtio-blk request code.
//! - [`config_text`]: TOML into the config parser; what parses must render back to TOML
//!   that parses to the same configuration.
//!
//! The process-wide world (reactors, disks) is built once; state carries over between
//! inputs as it would between a server's clients.

#![doc(hidden)]

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use drivers::{Bdev, BdevChannel};
use poller::{HugepageMode, IdlePolicy, ReactorHandle, ReactorOptions, Reactors};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::nbd::Exports;
use crate::vhost::backend::VuBlk;
use crate::vhost::blk;

struct World {
    reactors: Reactors,
    exports: Arc<Exports>,
    ram: Arc<Bdev>,
    vhost: Arc<Mutex<VuBlk>>,
    _dir: std::path::PathBuf,
}

const DISKS: &str = r#"
[[disk]]
name = "m"
driver = "mem"
size = "8MiB"

[[disk]]
name = "ro"
driver = "mem"
size = "1MiB"
read_only = true

[[disk]]
name = "q"
path = "q.qcow2"
format = "qcow2"
direct = false
l2_cache = "64KiB"
refcount_cache = "16KiB"
"#;

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let reactors = Reactors::start(ReactorOptions {
            cores: vec![0, 1],
            idle: IdlePolicy::adaptive(),
            hugepages: HugepageMode::Off,
            dma_pool_bytes: 16 << 20,
            pin: false,
        })
        .expect("start the reactors");
        let dir = std::env::temp_dir().join(format!("appliance-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("fuzz scratch directory");
        let opts = drivers::qcow2::create::CreateOptions {
            size: 16 << 20,
            cluster_size: 4096,
            ..Default::default()
        };
        drivers::qcow2::create::create(&dir.join("q.qcow2"), &opts).expect("create the image");
        let cfg = config::Config::parse_lenient(DISKS, "fuzz disks", &dir).expect("disk config");
        let h = reactors.handles();
        let bdevs: Vec<Arc<Bdev>> = cfg
            .disks
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let mut r = h.to_vec();
                r.rotate_left(i % h.len());
                Bdev::open(d, &r).expect("open a fuzz disk")
            })
            .collect();
        let ram = bdevs[0].clone();
        let vhost = Arc::new(Mutex::new(VuBlk::new(u64::MAX, bdevs[2].clone(), 2, h.to_vec())));
        World { reactors, exports: Exports::new(bdevs), ram, vhost, _dir: dir }
    })
}

fn reactor(i: usize) -> &'static ReactorHandle {
    let h = world().reactors.handles();
    &h[i % h.len()]
}

// --- NBD ---------------------------------------------------------------------------

/// Plays `data` as a client's byte stream into a new NBD connection; returns the bytes
/// the server answered.
pub fn nbd_session(data: &[u8]) -> usize {
    let w = world();
    let (mut client, server) = UnixStream::pair().expect("socketpair");
    let done = Arc::new(AtomicBool::new(false));
    let (exports, done2) = (w.exports.clone(), done.clone());
    let timeouts = crate::nbd::conn::Timeouts { stall: Duration::from_secs(5), idle: None };
    // Both socket paths: io_uring for inputs of even length, epoll for odd.
    let socket_io =
        if data.len().is_multiple_of(2) { config::SocketIo::Auto } else { config::SocketIo::Epoll };
    reactor(data.first().copied().unwrap_or(0) as usize).spawn(move || async move {
        let zero_copy = config::ZeroCopySend::Auto;
        let session = crate::nbd::Session {
            exports,
            tls: None,
            peer: "fuzz".into(),
            zero_copy,
            multishot: false,
        };
        crate::nbd::serve(OwnedFd::from(server), session, timeouts, socket_io).await;
        done2.store(true, Ordering::SeqCst);
    });
    client.set_nonblocking(true).expect("nonblocking");
    let deadline = Instant::now() + Duration::from_secs(15);
    let (mut sent, mut shut, mut answered) = (0, false, 0);
    let mut sink = vec![0u8; 256 << 10];
    loop {
        let mut progress = false;
        if sent < data.len() {
            match client.write(&data[sent..]) {
                Ok(n) => (sent, progress) = (sent + n, true),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => sent = data.len(),
            }
        } else if !shut {
            let _ = client.shutdown(std::net::Shutdown::Write);
            shut = true;
        }
        match client.read(&mut sink) {
            Ok(0) => break,
            Ok(n) => (answered, progress) = (answered + n, true),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(_) => break,
        }
        assert!(Instant::now() < deadline, "the NBD session did not end with its input");
        if !progress {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    while !done.load(Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "the NBD connection task did not finish");
        std::thread::sleep(Duration::from_micros(200));
    }
    answered
}

// --- vhost-user messages ------------------------------------------------------------

const GUEST_BYTES: usize = 2 << 20;

fn memfd(name: &std::ffi::CStr, len: usize, init: &[u8]) -> File {
    // SAFETY: memfd_create with a valid C string; the result is checked.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh descriptor we own.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len as u64).expect("size the memfd");
    std::os::unix::fs::FileExt::write_all_at(&f, &init[..init.len().min(len)], 0).expect("fill");
    f
}

fn eventfd() -> File {
    // SAFETY: eventfd has no memory-safety preconditions; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    assert!(fd >= 0, "eventfd");
    // SAFETY: a fresh descriptor we own.
    unsafe { File::from_raw_fd(fd) }
}

/// The descriptors a front-end attaches to request `code` with `payload` (kept open in
/// `keep` until the session ends).
fn fds_for(code: u32, payload: &[u8], guest: &File, keep: &mut Vec<File>) -> Vec<RawFd> {
    let first_u64 = payload.get(..8).map_or(0, |b| u64::from_le_bytes(b.try_into().expect("8")));
    let mut one = |f: File| {
        let fd = f.as_raw_fd();
        keep.push(f);
        vec![fd]
    };
    match code {
        // SET_MEM_TABLE: one descriptor per region (at most 8).
        5 => (0..first_u64.min(8)).map(|_| guest.as_raw_fd()).collect(),
        // SET_VRING_KICK/CALL/ERR: an eventfd unless the NOFD bit says none.
        12..=14 if first_u64 & 0x100 == 0 => one(eventfd()),
        // SET_LOG_BASE, SET_LOG_FD, SET_INFLIGHT_FD, ADD_MEM_REG: memory.
        6 | 7 | 32 | 37 => one(memfd(c"fuzz-aux", 64 << 10, &[])),
        // SET_BACKEND_REQ_FD: a socket.
        21 => match UnixStream::pair() {
            Ok((a, _)) => one(File::from(OwnedFd::from(a))),
            Err(_) => Vec::new(),
        },
        _ => Vec::new(),
    }
}

fn send_with_fds(sock: &UnixStream, bytes: &[u8], fds: &[RawFd]) -> bool {
    let iov = [std::io::IoSlice::new(bytes)];
    let cmsg = nix::sys::socket::ControlMessage::ScmRights(fds);
    let cmsgs: &[nix::sys::socket::ControlMessage<'_>] =
        if fds.is_empty() { &[] } else { std::slice::from_ref(&cmsg) };
    nix::sys::socket::sendmsg::<()>(
        sock.as_raw_fd(),
        &iov,
        cmsgs,
        nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .is_ok_and(|n| n == bytes.len())
}

/// Plays `data` as a vhost-user front-end: a little-endian `u16` length and that many
/// bytes of guest memory, then messages in wire format (`request`, `flags`, `size`,
/// payload), sent with the descriptors each kind carries. Returns the bytes of the
/// replies and whether the request in guest memory's first ring slot completed (its
/// used index moved).
pub fn vhost_messages(data: &[u8]) -> (usize, bool) {
    let w = world();
    let mem_len = data.get(..2).map_or(0, |b| u16::from_le_bytes([b[0], b[1]]) as usize);
    let rest = data.get(2..).unwrap_or_default();
    let (mem_init, mut msgs) = rest.split_at(mem_len.min(rest.len()));
    let guest = memfd(c"fuzz-guest", GUEST_BYTES, mem_init);
    let (front, back) = UnixStream::pair().expect("socketpair");
    let mut keep = Vec::new();
    let mut sent = Vec::new();
    while msgs.len() >= 12 && sent.len() < 64 {
        let code = u32::from_le_bytes(msgs[0..4].try_into().expect("4"));
        // The version bits right, so most inputs reach the handlers.
        let flags = (u32::from_le_bytes(msgs[4..8].try_into().expect("4")) & !3) | 1;
        let size = (u32::from_le_bytes(msgs[8..12].try_into().expect("4")) as usize).min(4096);
        let payload = &msgs[12..(12 + size).min(msgs.len())];
        let mut m = Vec::with_capacity(12 + payload.len());
        m.extend_from_slice(&code.to_le_bytes());
        m.extend_from_slice(&flags.to_le_bytes());
        m.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        m.extend_from_slice(payload);
        let fds = fds_for(code, payload, &guest, &mut keep);
        if !send_with_fds(&front, &m, &fds) {
            break;
        }
        sent.push(code);
        msgs = &msgs[(12 + size).min(msgs.len())..];
    }
    let _ = front.shutdown(std::net::Shutdown::Write);
    // Replies are read on a thread so the handler never blocks on a full socket.
    let drain = std::thread::spawn(move || {
        let mut front = front;
        let (mut b, mut total) = ([0u8; 4096], 0);
        while let Ok(n @ 1..) = front.read(&mut b) {
            total += n;
        }
        total
    });
    let mut conn = vhost::vhost_user::BackendReqHandler::from_stream(back, w.vhost.clone());
    crate::vhost::serve_session(&mut conn, "fuzz");
    drop(conn);
    // Give a queue that may have started a moment to serve what the guest memory holds.
    let used = |g: &File| {
        let mut idx = [0u8; 2];
        std::os::unix::fs::FileExt::read_exact_at(g, &mut idx, 0x2002).map(|()| idx != [0, 0])
    };
    let wait = if sent.contains(&12) { Duration::from_millis(100) } else { Duration::ZERO };
    let deadline = Instant::now() + wait;
    while !used(&guest).unwrap_or(true) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    let served = used(&guest).unwrap_or(false);
    w.vhost.lock().unwrap_or_else(|p| p.into_inner()).reset();
    (drain.join().unwrap_or(0), served)
}

// --- virtqueue chains --------------------------------------------------------------

/// A request whose segments point into guest memory that outlives the call.
struct OnReactor(blk::BlkReq);
// SAFETY: the guest memory the request points into stays alive and untouched by this
// thread until the reactor is done with it (`block_on` waits).
unsafe impl Send for OnReactor {}

/// Walks the descriptor chain at the head named by `data` in guest memory made of the
/// rest of `data` (a 64 KiB region at 0, and a 4 KiB one at 1 MiB, so chains can point
/// into a gap or straddle), then runs the request on a RAM disk. Returns its status,
/// or `None` if the chain is refused.
pub fn virtqueue_chain(data: &[u8]) -> Option<u8> {
    let w = world();
    if data.len() < 5 {
        return None;
    }
    let size = u32::from(u16::from_le_bytes([data[0], data[1]]));
    let head = u16::from_le_bytes([data[2], data[3]]);
    let indirect = data[4] & 1 != 0;
    let ranges = [(GuestAddress(0), 64 << 10), (GuestAddress(1 << 20), 4096)];
    let mem = GuestMemoryMmap::from_ranges(&ranges).expect("guest memory");
    let body = &data[5..];
    let first = body.len().min(64 << 10);
    mem.write_slice(&body[..first], GuestAddress(0)).expect("fill region 0");
    let second = &body[first..body.len().min(first + 4096)];
    mem.write_slice(second, GuestAddress(1 << 20)).expect("fill region 1");
    let req = blk::parse(&mem, &blk::DescTable::new(&mem, 0, size), head, indirect).ok()?;
    let req = OnReactor(req);
    let ram = w.ram.clone();
    let (status, written) = reactor(0).block_on(move || async move {
        let req = req;
        let Ok(ch): Result<BdevChannel, _> = ram.channel() else { return (blk::S_IOERR, 0) };
        crate::vhost::queue::execute(&ch, b"fuzz-serial-0123456\0", &req.0).await
    });
    assert!(
        matches!(status, blk::S_OK | blk::S_IOERR | blk::S_UNSUPP),
        "status {status} out of the protocol's range"
    );
    assert!(written as usize <= GUEST_BYTES, "wrote {written} bytes");
    Some(status)
}

// --- config -------------------------------------------------------------------------

/// Parses `data` as a config file; a configuration that parses must render to TOML that
/// parses back to itself. Returns whether it parsed.
pub fn config_text(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else { return false };
    let base = Path::new("/fuzz");
    let Ok(c) = config::Config::parse_lenient(text, "fuzz.toml", base) else { return false };
    let rendered = c.to_toml();
    let again = config::Config::parse_lenient(&rendered, "rendered.toml", base)
        .unwrap_or_else(|e| panic!("the rendered config does not parse: {e}\n{rendered}"));
    assert_eq!(c, again, "the config changed through rendering:\n{rendered}");
    true
}
