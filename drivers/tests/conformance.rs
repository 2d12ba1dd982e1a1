//! One conformance suite over every storage driver: io_uring and AIO (with O_DIRECT and
//! buffered), the RAM disk, and (for what it promises) the null device. Each case runs
//! on a real reactor against a real file in a temporary directory.
//!
//! With `APPLIANCE_NVME_DEVICE=/dev/ngXnY` (a namespace of at least 8 MiB whose contents
//! may be destroyed) the cases that run over every driver run over `nvme_uring` on that
//! namespace instead, with the NVMe-only cases; the NVMe guest test
//! (tests/tests/nvme_guest.rs) runs them inside a guest on QEMU's emulated NVMe
//! controller:
//! `conformance aligned_and_unaligned vectored zero_range many_concurrent nvme_`.
//! `APPLIANCE_NVME_DEVICE=pci:0000:00:04.0/ns=1` runs them over the VFIO driver.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::task::{Context, Poll};

use drivers::io::align::Aligned;
use drivers::io::probe::Alignment;
use drivers::{Bdev, EngineKind, IoError, IoSeg, Storage, ZeroFlags};
use poller::{HugepageMode, IdlePolicy, ReactorOptions, Reactors, TaskPool, dma};

fn reactors() -> Reactors {
    Reactors::start(ReactorOptions {
        cores: vec![0],
        idle: IdlePolicy::adaptive(),
        hugepages: HugepageMode::Off,
        dma_pool_bytes: 32 << 20,
        pin: false,
    })
    .unwrap()
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    File(EngineKind, bool),
    Mem,
    Nvme,
}

/// The NVMe namespace to test, if any (see the module docs).
fn nvme_device() -> Option<PathBuf> {
    std::env::var_os("APPLIANCE_NVME_DEVICE").map(PathBuf::from)
}

/// Opens the namespace: `pci:...` with the VFIO driver, a path with passthrough.
fn open_nvme() -> Arc<Storage> {
    let path = nvme_device().expect("APPLIANCE_NVME_DEVICE");
    let name = path.to_string_lossy();
    if name.starts_with("pci:") {
        drivers::io::nvme::user::open(&name, false).unwrap()
    } else {
        drivers::io::nvme::passthru::open(&path, false).unwrap()
    }
}

const KINDS: [Kind; 5] = [
    Kind::File(EngineKind::IoUring, true),
    Kind::File(EngineKind::IoUring, false),
    Kind::File(EngineKind::Aio, true),
    Kind::File(EngineKind::Aio, false),
    Kind::Mem,
];

const SIZE: u64 = 8 << 20;

fn open(kind: Kind, dir: &Path) -> Arc<Storage> {
    match kind {
        Kind::File(engine, direct) => {
            let path = dir.join(format!("{engine:?}-{direct}.img"));
            let f = std::fs::File::create(&path).unwrap();
            f.set_len(SIZE).unwrap();
            Storage::open_file(&path, engine, direct, false).unwrap()
        }
        Kind::Mem => Storage::mem(SIZE).unwrap(),
        Kind::Nvme => {
            let s = open_nvme();
            assert!(s.size() >= SIZE, "{s:?} is smaller than {SIZE} bytes");
            s
        }
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Runs `body` for every driver kind on a reactor.
fn for_each_kind<F, Fut>(body: F)
where
    F: Fn(Kind, Arc<Storage>) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = ()> + 'static,
{
    let r = reactors();
    let dir = tempfile::tempdir().unwrap();
    let kinds = if nvme_device().is_some() { vec![Kind::Nvme] } else { KINDS.to_vec() };
    for kind in kinds {
        let storage = open(kind, dir.path());
        let body = body.clone();
        r.handles()[0].block_on(move || body(kind, storage));
    }
    r.stop();
}

async fn write_bytes(a: &Aligned, off: u64, data: &[u8]) -> Result<(), IoError> {
    let mut buf = data.to_vec();
    a.write(off, &[IoSeg::new(&mut buf)], false).await
}

async fn read_bytes(a: &Aligned, off: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0xAAu8; len];
    a.read(off, &[IoSeg::new(&mut buf)]).await.unwrap();
    buf
}

#[test]
fn direct_io_alignment_is_probed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.img");
    std::fs::File::create(&path).unwrap().set_len(1 << 20).unwrap();
    let s = Storage::open_file(&path, EngineKind::IoUring, true, false).unwrap();
    let a = s.alignment();
    assert!(a.request.is_power_of_two() && (512..=4096).contains(&a.request), "{a:?}");
    assert!(a.mem.is_power_of_two() && a.mem <= 4096, "{a:?}");
    // The image lock: a second user of the same file is refused while the first lives.
    let e = Storage::open_file(&path, EngineKind::IoUring, false, false).unwrap_err();
    assert!(e.to_string().contains("in use"), "{e}");
    drop(s);
    let s = Storage::open_file(&path, EngineKind::IoUring, false, false).unwrap();
    assert_eq!(s.alignment(), Alignment::NONE);
}

#[test]
fn missing_file_error_names_the_file() {
    let e = Storage::open_file(Path::new("/nonexistent/disk.img"), EngineKind::Aio, true, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("/nonexistent/disk.img"), "{e}");
}

#[test]
fn aligned_and_unaligned_writes_read_back() {
    for_each_kind(|kind, storage| async move {
        let a = Aligned::new(storage.channel().unwrap());
        // (offset, length) pairs: aligned, unaligned head, tail, both, tiny, crossing MiB.
        let cases: [(u64, usize); 7] = [
            (0, 4096),
            (4096 * 3, 65536),
            (100, 4000),
            (8191, 2),
            (12345, 100_000),
            ((1 << 20) - 7, 3 << 20),
            (SIZE - 513, 513),
        ];
        let mut model = vec![0u8; SIZE as usize];
        for (i, &(off, len)) in cases.iter().enumerate() {
            let data = pattern(i as u64 + 1, len);
            write_bytes(&a, off, &data).await.unwrap();
            model[off as usize..off as usize + len].copy_from_slice(&data);
        }
        for &(off, len) in &cases {
            let lo = off.saturating_sub(1000);
            let hi = (off + len as u64 + 1000).min(SIZE);
            let got = read_bytes(&a, lo, (hi - lo) as usize).await;
            let want = &model[lo as usize..hi as usize];
            let bad = got.iter().zip(want).position(|(g, w)| g != w);
            let last = got.iter().zip(want).rposition(|(g, w)| g != w);
            assert!(
                bad.is_none(),
                "{kind:?}: mismatch around {off}+{len}: bytes {:?}..={:?} differ",
                bad.map(|b| lo + b as u64),
                last.map(|b| lo + b as u64)
            );
        }
        a.flush().await.unwrap();
    });
}

#[test]
fn vectored_io_with_unaligned_memory() {
    for_each_kind(|kind, storage| async move {
        let a = Aligned::new(storage.channel().unwrap());
        let data = pattern(99, 3 * 4096);
        // Three segments, the middle one starting at an odd address.
        let mut backing = vec![0u8; 3 * 4096 + 1];
        backing[1..].copy_from_slice(&data);
        let (x, rest) = backing[1..].split_at_mut(4096);
        let (y, z) = rest.split_at_mut(4096);
        a.write(8192, &[IoSeg::new(x), IoSeg::new(y), IoSeg::new(z)], true).await.unwrap();
        let mut d1 = dma::alloc(4096).unwrap();
        let mut d2 = dma::alloc(8192).unwrap();
        a.read(8192, &[IoSeg::from_dma(&mut d1), IoSeg::from_dma(&mut d2)]).await.unwrap();
        assert_eq!(d1.as_slice(), &data[..4096], "{kind:?}");
        assert_eq!(d2.as_slice(), &data[4096..], "{kind:?}");
    });
}

/// Registered chunks of this process's io_uring fixed-buffer tables (`UserBufs` entries
/// in the rings' fdinfo that are not `<none>`).
fn registered_fixed_chunks() -> usize {
    let mut n = 0;
    for fd in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let is_ring =
            std::fs::read_link(fd.path()).is_ok_and(|l| l.to_string_lossy().contains("io_uring"));
        let info = std::fs::read_to_string(format!(
            "/proc/self/fdinfo/{}",
            fd.file_name().to_string_lossy()
        ));
        if let (true, Ok(info)) = (is_ring, info) {
            let bufs = info.lines().skip_while(|l| !l.starts_with("UserBufs:")).skip(1);
            n += bufs
                .take_while(|l| l.starts_with(char::is_whitespace))
                .filter(|l| l.contains("0x"))
                .count();
        }
    }
    n
}

#[test]
fn dma_buffers_go_to_io_uring_as_fixed_buffers() {
    let r = reactors();
    let dir = tempfile::tempdir().unwrap();
    let storage = open(Kind::File(EngineKind::IoUring, true), dir.path());
    r.handles()[0].block_on(move || async move {
        let a = Aligned::new(storage.channel().unwrap());
        // One chunk-sized buffer (a fixed buffer) and one larger than a chunk (plain),
        // written (FUA for the first) and read back into other DMA buffers.
        for (off, len, fua) in [(0u64, 4096usize, true), (1 << 20, 4 << 20, false)] {
            let data = pattern(off + 7, len);
            let mut w = dma::alloc(len).unwrap();
            w.as_mut_slice().copy_from_slice(&data);
            a.write(off, &[IoSeg::from_dma(&mut w)], fua).await.unwrap();
            let mut rd = dma::alloc(len).unwrap();
            a.read(off, &[IoSeg::from_dma(&mut rd)]).await.unwrap();
            assert!(rd.as_slice() == &data[..], "{len} bytes at {off} read back differently");
        }
        let chunks = registered_fixed_chunks();
        assert!((1..=16).contains(&chunks), "{chunks} chunks of the DMA pool registered");
    });
    r.stop();
}

#[test]
fn reads_past_end_of_file_are_zero() {
    let r = reactors();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("short.img");
    std::fs::write(&path, pattern(5, 6000)).unwrap();
    for engine in [EngineKind::IoUring, EngineKind::Aio] {
        for direct in [true, false] {
            let s = Storage::open_file(&path, engine, direct, true).unwrap();
            r.handles()[0].block_on(move || async move {
                let a = Aligned::new(s.channel().unwrap());
                let got = read_bytes(&a, 4096, 8192).await;
                assert_eq!(&got[..6000 - 4096], &pattern(5, 6000)[4096..]);
                assert!(got[6000 - 4096..].iter().all(|&b| b == 0), "{engine:?} {direct}");
                let e = write_bytes(&a, 0, &[1, 2, 3]).await.unwrap_err();
                assert_eq!(e, IoError::ReadOnly);
            });
        }
    }
    r.stop();
}

#[test]
fn zero_range_discard_and_block_status() {
    for_each_kind(|kind, storage| async move {
        let a = Aligned::new(storage.channel().unwrap());
        write_bytes(&a, 0, &pattern(3, 1 << 20)).await.unwrap();
        a.flush().await.unwrap();
        a.zero_range(4096, 8192, false).await.unwrap();
        a.zero_range(100, 50, true).await.unwrap();
        let got = read_bytes(&a, 0, 16384).await;
        let mut want = pattern(3, 16384);
        want[100..150].fill(0);
        want[4096..12288].fill(0);
        assert!(got == want, "{kind:?}: zeroed ranges wrong");
        assert!(a.discard(65536, 65536).await.unwrap(), "{kind:?}: discard supported");
        assert!(read_bytes(&a, 65536, 65536).await.iter().all(|&b| b == 0));
        if let Kind::File(..) = kind {
            // The tail of the file was never written: a hole.
            let st = a.block_status(4 << 20, 1 << 20).await.unwrap();
            assert_eq!(st.allocation, drivers::io::Allocation::Hole, "{kind:?}");
            let st = a.block_status(0, 4096).await.unwrap();
            assert_eq!(st.allocation, drivers::io::Allocation::Data, "{kind:?}");
            assert_eq!(st.len, 4096);
        }
    });
}

#[test]
fn many_concurrent_requests_complete() {
    for_each_kind(|kind, storage| async move {
        let a = std::rc::Rc::new(Aligned::new(storage.channel().unwrap()));
        let pool = TaskPool::new(256);
        let make = |i: u64, a: std::rc::Rc<Aligned>| async move {
            let data = pattern(i + 1000, 4096);
            write_bytes(&a, i * 4096, &data).await.unwrap();
            assert_eq!(read_bytes(&a, i * 4096, 4096).await, data);
        };
        for i in 0..1000u64 {
            let mut fut = make(i, a.clone());
            loop {
                match pool.spawn(fut) {
                    Ok(()) => break,
                    Err(back) => {
                        fut = back;
                        pool.finished().await;
                    }
                }
            }
        }
        pool.drain().await;
        let _ = kind;
    });
}

#[test]
fn concurrent_partial_writes_to_one_block_are_serialised() {
    // Two tasks write disjoint bytes of the same 4 KiB unit many times; with O_DIRECT
    // each is a read-modify-write and, unserialised, one would lose the other's bytes.
    let r = Reactors::start(ReactorOptions {
        cores: vec![0, 0],
        idle: IdlePolicy::Busy,
        hugepages: HugepageMode::Off,
        dma_pool_bytes: 32 << 20,
        pin: false,
    })
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rmw.img");
    std::fs::File::create(&path).unwrap().set_len(1 << 20).unwrap();
    let s = Storage::open_file(&path, EngineKind::IoUring, true, false).unwrap();
    if s.alignment().request == 1 {
        r.stop();
        return;
    }
    let handles: Vec<_> = (0..2u8)
        .map(|i| {
            let s = s.clone();
            let h = r.handles()[i as usize].clone();
            std::thread::spawn(move || {
                h.block_on(move || async move {
                    let a = std::rc::Rc::new(Aligned::new(s.channel().unwrap()));
                    let pool = TaskPool::new(8);
                    for t in 0..8u64 {
                        let a = a.clone();
                        let slot = u64::from(i) * 8 + t;
                        let _ = pool.spawn(async move {
                            for round in 0..100u32 {
                                let byte = (round % 250) as u8 + 1;
                                write_bytes(&a, slot * 200 + 10, &[byte; 50]).await.unwrap();
                            }
                        });
                    }
                    pool.drain().await;
                })
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let s2 = s.clone();
    r.handles()[0].block_on(move || async move {
        let a = Aligned::new(s2.channel().unwrap());
        let got = read_bytes(&a, 0, 4096).await;
        let last = 100u8;
        for slot in 0..16usize {
            let r = slot * 200 + 10..slot * 200 + 60;
            assert!(got[r].iter().all(|&b| b == last), "writer {slot}'s bytes were lost");
        }
    });
    r.stop();
}

#[test]
fn bdev_checks_ranges_and_read_only() {
    let r = reactors();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.img");
    let ro_path = dir.path().join("b-ro.img");
    std::fs::File::create(&path).unwrap().set_len(1 << 20).unwrap();
    std::fs::File::create(&ro_path).unwrap().set_len(1 << 20).unwrap();
    let disk = |ro: bool| config::Disk {
        name: "b".into(),
        path: Some(if ro { ro_path.clone() } else { path.clone() }),
        format: config::Format::Raw,
        driver: config::Driver::IoUring,
        direct: true,
        read_only: ro,
        size: None,
        allowed_backing_dirs: vec![],
        l2_cache_bytes: None,
        refcount_cache_bytes: None,
        shards: None,
        vhost_user_blk: None,
        qos: None,
        nbd_allow: None,
        encryption_key_file: None,
        rbd: None,
    };
    let owner = r.handles()[0].clone();
    let rw = Bdev::open(&disk(false), std::slice::from_ref(&owner)).unwrap();
    let ro = Bdev::open(&disk(true), std::slice::from_ref(&owner)).unwrap();
    assert_eq!(rw.info().size, 1 << 20);
    assert!(ro.info().read_only);
    r.handles()[0].block_on(move || async move {
        let ch = rw.channel().unwrap();
        let mut buf = vec![1u8; 4096];
        assert_eq!(
            ch.read((1 << 20) - 100, &[IoSeg::new(&mut buf)]).await,
            Err(IoError::OutOfRange)
        );
        assert_eq!(
            ch.write(u64::MAX - 10, &[IoSeg::new(&mut buf)], false).await,
            Err(IoError::OutOfRange)
        );
        ch.write(0, &[IoSeg::new(&mut buf)], true).await.unwrap();
        ch.write_zeroes(0, 100, ZeroFlags { fast_only: true, ..Default::default() }).await.unwrap();
        let mut back = vec![9u8; 4096];
        ch.read(0, &[IoSeg::new(&mut back)]).await.unwrap();
        assert!(back[..100].iter().all(|&b| b == 0) && back[100..].iter().all(|&b| b == 1));
        let st = ch.block_status(512 << 10, 4096).await.unwrap();
        assert!(st.hole && st.zero);
        let ch = ro.channel().unwrap();
        assert_eq!(ch.write(0, &[IoSeg::new(&mut buf)], false).await, Err(IoError::ReadOnly));
        assert_eq!(ch.discard(0, 4096).await, Err(IoError::ReadOnly));
        ch.read(0, &[IoSeg::new(&mut back)]).await.unwrap();
    });
    r.stop();
}

/// NVMe only: what the controller refuses reaches the caller as an error, and the
/// control plane's byte-granular synchronous access works on whole blocks underneath.
#[test]
fn nvme_controller_errors_and_control_plane_io() {
    let Some(path) = nvme_device() else { return };
    let s = open_nvme();
    let block = s.alignment().request;
    assert!(block == 512 || block == 4096, "{block}");
    s.write_sync(b"header!!", 1000).unwrap();
    let mut back = [0u8; 8];
    s.read_sync(&mut back, 1000).unwrap();
    assert_eq!(&back, b"header!!");
    let r = reactors();
    let s2 = s.clone();
    r.handles()[0].block_on(move || async move {
        let ch = s2.channel().unwrap();
        let mut buf = dma::alloc(block).unwrap();
        // Nothing to transfer: done, no command.
        ch.read(0, &[]).await.unwrap();
        ch.write(0, &[], false).await.unwrap();
        // Past the namespace's end: the controller says LBA out of range.
        let e = ch.read(s2.size(), &[IoSeg::from_dma(&mut buf)]).await.unwrap_err();
        assert_eq!(e, IoError::OutOfRange);
        let at = 1000 / block * block;
        ch.read(at as u64, &[IoSeg::from_dma(&mut buf)]).await.unwrap();
        assert_eq!(&buf.as_slice()[1000 - at..1000 - at + 8], b"header!!");
    });
    r.stop();
    drop(s);
    if path.to_string_lossy().starts_with("pci:") {
        let e = drivers::io::nvme::user::open("pci:0000:99:00.0", false).unwrap_err();
        assert!(e.to_string().contains("no such device"), "{e}");
    } else {
        let e = drivers::io::nvme::passthru::open(Path::new("/dev/null"), false).unwrap_err();
        assert!(e.to_string().contains("not an NVMe generic character device"), "{e}");
    }
}

/// Polls two futures together until both finish (operations queued in the same tick).
async fn both<A: Future, B: Future>(a: A, b: B) -> (A::Output, B::Output) {
    let (mut a, mut b) = (std::pin::pin!(a), std::pin::pin!(b));
    let (mut ra, mut rb) = (None, None);
    std::future::poll_fn(|cx| {
        if ra.is_none()
            && let Poll::Ready(v) = a.as_mut().poll(cx)
        {
            ra = Some(v);
        }
        if rb.is_none()
            && let Poll::Ready(v) = b.as_mut().poll(cx)
        {
            rb = Some(v);
        }
        if ra.is_some() && rb.is_some() { Poll::Ready(()) } else { Poll::Pending }
    })
    .await;
    (ra.unwrap(), rb.unwrap())
}

/// Socket entries wait for the tick's device entries to be submitted first (see
/// drivers/src/io/engine/uring.rs): a receive queued and dropped before the tick ends is
/// still cancelled cleanly, and socket and file operations queued in one tick all
/// complete, in both orders.
#[test]
fn socket_and_file_operations_of_one_tick_complete() {
    // A socket entry that never reaches the kernel hangs its waiter: fail instead.
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        socket_and_file_operations();
        let _ = done.send(());
    });
    match finished.recv_timeout(std::time::Duration::from_secs(60)) {
        Ok(()) => {}
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("socket and file operations of one tick did not complete within 60 s")
        }
        Err(e) => panic!("the test body failed: {e}"),
    }
}

fn socket_and_file_operations() {
    use std::io::{Read, Write};
    use std::os::fd::OwnedFd;
    let r = reactors();
    let dir = tempfile::tempdir().unwrap();
    let storage = open(Kind::File(EngineKind::IoUring, true), dir.path());
    let (ours, mut peer) = std::os::unix::net::UnixStream::pair().unwrap();
    let peer_thread = std::thread::spawn(move || {
        // Answers every 8-byte message with the same bytes, reversed.
        let mut m = [0u8; 8];
        while peer.read_exact(&mut m).is_ok() {
            m.reverse();
            if peer.write_all(&m).is_err() {
                break;
            }
        }
    });
    r.handles()[0].block_on(move || async move {
        ours.set_nonblocking(true).unwrap();
        let fd = OwnedFd::from(ours);
        let sock = drivers::io::net::Socket::new(
            poller::Async::new(fd).unwrap(),
            config::SocketIo::IoUring,
        )
        .unwrap();
        assert!(matches!(sock, drivers::io::net::Socket::Uring(_)), "the ring takes sockets");
        let a = Aligned::new(storage.channel().unwrap());
        // A receive queued, then dropped in the same tick, from a silent peer.
        {
            let mut buf = [0u8; 8];
            let mut recv = std::pin::pin!(sock.read(&mut buf));
            let mut cx = Context::from_waker(std::task::Waker::noop());
            assert!(recv.as_mut().poll(&mut cx).is_pending());
        }
        for round in 0..64u64 {
            let msg = round.to_le_bytes();
            let data = pattern(round, 4096);
            let send = async {
                let n = sock.send(&[std::io::IoSlice::new(&msg)]).await.unwrap();
                assert_eq!(n, 8);
                let mut back = [0u8; 8];
                sock.read_exact(&mut back).await.unwrap();
                back
            };
            let disk = async {
                write_bytes(&a, round * 4096, &data).await.unwrap();
                read_bytes(&a, round * 4096, 4096).await
            };
            let (back, got) = if round % 2 == 0 {
                both(send, disk).await
            } else {
                let (g, b) = both(disk, send).await;
                (b, g)
            };
            let mut want = msg;
            want.reverse();
            assert_eq!(back, want, "round {round}");
            assert!(got == data, "round {round}: the file read back differently");
        }
    });
    r.stop();
    peer_thread.join().unwrap();
}
