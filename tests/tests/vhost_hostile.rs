//! A hostile vhost-user front-end: hand-built rings in shared memory with chains that
//! point outside guest memory, loop, are too large, break the virtio-blk layout or write
//! a read-only disk; and malformed protocol messages. Each gets an error status, an
//! empty completion or a refused message — and the appliance keeps serving.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use appliance_tests::{Appliance, Setup, pattern};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

const MEM: usize = 16 << 20;
const QSIZE: u16 = 16;
const DESC: u64 = 0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

struct Front {
    fe: Frontend,
    base: *mut u8,
    _memfd: File,
    kick: EventFd,
    _call: EventFd,
    avail_idx: u16,
    used_seen: u16,
}

impl Front {
    fn connect(sock: &std::path::Path) -> Front {
        let mut fe = None;
        let deadline = Instant::now() + Duration::from_secs(20);
        while fe.is_none() {
            match Frontend::connect(sock, 1) {
                Ok(f) => fe = Some(f),
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => panic!("connect: {e}"),
            }
        }
        let mut fe = fe.unwrap();
        fe.set_owner().unwrap();
        let features = fe.get_features().unwrap();
        assert_ne!(features & (1 << 32), 0, "VERSION_1 offered");
        fe.set_features(
            features
                & ((1 << 32) | (1 << 30) | (1 << 28) | (1 << 9) | (1 << 13) | (1 << 14) | (1 << 5)),
        )
        .unwrap();
        let proto = fe.get_protocol_features().unwrap();
        fe.set_protocol_features(
            proto
                & (VhostUserProtocolFeatures::REPLY_ACK
                    | VhostUserProtocolFeatures::CONFIG
                    | VhostUserProtocolFeatures::MQ),
        )
        .unwrap();
        // Ask for an acknowledgement of every message, so refusals are visible.
        fe.set_hdr_flags(vhost::vhost_user::message::VhostUserHeaderFlag::NEED_REPLY);
        // SAFETY: memfd_create with a valid name.
        let fd = unsafe { libc::memfd_create(c"guest".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor we own.
        let memfd = unsafe { File::from_raw_fd(fd) };
        memfd.set_len(MEM as u64).unwrap();
        // SAFETY: a shared mapping of our memfd.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MEM,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                memfd.as_raw_fd(),
                0,
            )
        } as *mut u8;
        assert_ne!(base as *mut libc::c_void, libc::MAP_FAILED);
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: MEM as u64,
            userspace_addr: base as u64,
            mmap_offset: 0,
            mmap_handle: memfd.as_raw_fd(),
        };
        fe.set_mem_table(&[region]).unwrap();
        fe.set_vring_num(0, QSIZE).unwrap();
        let va = |gpa: u64| base as u64 + gpa;
        fe.set_vring_addr(
            0,
            &VringConfigData {
                queue_max_size: QSIZE,
                queue_size: QSIZE,
                flags: 0,
                desc_table_addr: va(DESC),
                used_ring_addr: va(USED),
                avail_ring_addr: va(AVAIL),
                log_addr: None,
            },
        )
        .unwrap();
        fe.set_vring_base(0, 0).unwrap();
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        fe.set_vring_call(0, &call).unwrap();
        fe.set_vring_kick(0, &kick).unwrap();
        fe.set_vring_enable(0, true).unwrap();
        Front { fe, base, _memfd: memfd, kick, _call: call, avail_idx: 0, used_seen: 0 }
    }

    fn put<T: Copy>(&self, gpa: u64, v: T) {
        // SAFETY: inside our mapping (tests keep addresses below MEM).
        unsafe { std::ptr::write_unaligned(self.base.add(gpa as usize).cast(), v) };
    }

    fn get<T: Copy>(&self, gpa: u64) -> T {
        // SAFETY: inside our mapping.
        unsafe { std::ptr::read_volatile(self.base.add(gpa as usize).cast()) }
    }

    fn desc(&self, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = table + u64::from(i) * 16;
        self.put(at, addr.to_le());
        self.put(at + 8, len.to_le());
        self.put(at + 12, flags.to_le());
        self.put(at + 14, next.to_le());
    }

    fn header(&self, gpa: u64, kind: u32, sector: u64) {
        self.put(gpa, kind.to_le());
        self.put(gpa + 4, 0u32);
        self.put(gpa + 8, sector.to_le());
    }

    /// Makes `head` available and kicks; returns the used length of the completion.
    fn submit(&mut self, head: u16) -> u32 {
        self.put(AVAIL + 4 + u64::from(self.avail_idx % QSIZE) * 2, head.to_le());
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.put(AVAIL + 2, self.avail_idx.to_le());
        self.kick.write(1).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let used: u16 = u16::from_le(self.get(USED + 2));
            if used != self.used_seen {
                let slot = USED + 4 + u64::from(self.used_seen % QSIZE) * 8;
                let id: u32 = u32::from_le(self.get(slot));
                let len: u32 = u32::from_le(self.get(slot + 4));
                self.used_seen = self.used_seen.wrapping_add(1);
                assert_eq!(id, u32::from(head), "completion for the request made");
                return len;
            }
            assert!(Instant::now() < deadline, "no completion for head {head}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// A well-formed 3-descriptor request at table slots 0..3.
    fn simple(&mut self, kind: u32, sector: u64, data_len: u32, write_data: bool) -> (u32, u8) {
        self.header(0x10000, kind, sector);
        self.put(0x30000u64, 0xffu8);
        self.desc(DESC, 0, 0x10000, 16, F_NEXT, 1);
        self.desc(DESC, 1, 0x20000, data_len, F_NEXT | if write_data { 0 } else { F_WRITE }, 2);
        self.desc(DESC, 2, 0x30000, 1, F_WRITE, 0);
        let len = self.submit(0);
        (len, self.get(0x30000))
    }
}

impl Drop for Front {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping.
        unsafe { libc::munmap(self.base.cast(), MEM) };
    }
}

fn start() -> Appliance {
    let disks = "[[disk]]\nname = \"rw\"\npath = \"{dir}/rw.img\"\n[disk.vhost_user_blk]\nsocket = \"{dir}/rw.vhost\"\n\n\
                 [[disk]]\nname = \"ro\"\npath = \"{dir}/ro.img\"\nread_only = true\n[disk.vhost_user_blk]\nsocket = \"{dir}/ro.vhost\"\n\n\
                 [[disk]]\nname = \"q\"\npath = \"{dir}/q.qcow2\"\nformat = \"qcow2\"\n[disk.vhost_user_blk]\nsocket = \"{dir}/q.vhost\"\n"
        .to_string();
    Appliance::start(Setup { disks, ..Setup::default() }, |dir| {
        std::fs::write(dir.join("rw.img"), pattern(1, 4 << 20)).unwrap();
        std::fs::write(dir.join("ro.img"), pattern(2, 4 << 20)).unwrap();
        let q = dir.join("q.qcow2");
        let ok = std::process::Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(dir.join("rw.img"))
            .arg(&q)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "qemu-img convert (qemu-utils) makes the qcow2 disk");
    })
}

#[test]
fn hostile_descriptor_chains_get_errors_and_the_queue_goes_on() {
    let mut a = start();
    let mut f = Front::connect(&a.path("rw.vhost"));
    // A good read first.
    let (len, status) = f.simple(0, 0, 4096, false);
    assert_eq!((len, status), (4097, 0));
    // SAFETY: reading our own mapping.
    let data = unsafe { std::slice::from_raw_parts(f.base.add(0x20000), 4096) };
    assert!(data == &pattern(1, 4096)[..], "the data read is the disk's");
    // Data outside guest memory: an empty completion, nothing touched.
    f.header(0x10000, 0, 0);
    f.desc(DESC, 0, 0x10000, 16, F_NEXT, 1);
    f.desc(DESC, 1, 1 << 40, 4096, F_NEXT | F_WRITE, 2);
    f.desc(DESC, 2, 0x30000, 1, F_WRITE, 0);
    assert_eq!(f.submit(0), 0);
    // A descriptor straddling the end of memory.
    f.desc(DESC, 1, MEM as u64 - 100, 4096, F_NEXT | F_WRITE, 2);
    assert_eq!(f.submit(0), 0);
    // A loop.
    f.desc(DESC, 0, 0x10000, 16, F_NEXT, 1);
    f.desc(DESC, 1, 0x20000, 512, F_NEXT | F_WRITE, 0);
    assert_eq!(f.submit(0), 0);
    // A next index beyond the table.
    f.desc(DESC, 1, 0x20000, 512, F_NEXT | F_WRITE, 999);
    assert_eq!(f.submit(0), 0);
    // An indirect table of a bad size, and nested indirection.
    f.desc(DESC, 0, 0x40000, 17, F_INDIRECT, 0);
    assert_eq!(f.submit(0), 0);
    f.desc(0x40000, 0, 0x50000, 16, F_INDIRECT, 0);
    f.desc(DESC, 0, 0x40000, 16, F_INDIRECT, 0);
    assert_eq!(f.submit(0), 0);
    // No header, no status byte.
    f.desc(DESC, 0, 0x10000, 8, 0, 0);
    assert_eq!(f.submit(0), 0);
    // Reads beyond the disk, of a non-sector length, unknown types: error statuses.
    assert_eq!(f.simple(0, 1 << 40, 4096, false).1, 1, "read past the end: IOERR");
    assert_eq!(f.simple(0, (4 << 20) / 512 - 1, 4096, false).1, 1, "read across the end: IOERR");
    assert_eq!(f.simple(0, 0, 1000, false).1, 1, "odd length: IOERR");
    assert_eq!(f.simple(99, 0, 512, false).1, 2, "unknown type: UNSUPP");
    assert_eq!(f.simple(11, 0, 15, true).1, 2, "malformed discard ranges: UNSUPP");
    // GET_ID answers the serial.
    let (len, status) = f.simple(8, 0, 20, false);
    assert_eq!(status, 0);
    assert!(len >= 3);
    // The queue still serves good requests.
    let (len, status) = f.simple(0, 8, 4096, false);
    assert_eq!((len, status), (4097, 0));
    // A write goes to the disk.
    // SAFETY: writing our own mapping.
    unsafe { std::ptr::write_bytes(f.base.add(0x20000), 0x7a, 4096) };
    assert_eq!(f.simple(1, 16, 4096, true), (1, 0));
    assert_eq!(f.simple(4, 0, 0, true).1, 0, "flush");
    drop(f);
    assert!(a.alive());
    assert!(a.stop().success());
    let img = std::fs::read(a.path("rw.img")).unwrap();
    assert!(img[8192..12288].iter().all(|&b| b == 0x7a));
}

#[test]
fn writes_to_a_read_only_disk_fail() {
    let mut a = start();
    let mut f = Front::connect(&a.path("ro.vhost"));
    assert_ne!(f.fe.get_features().unwrap() & (1 << 5), 0, "VIRTIO_BLK_F_RO offered");
    assert_eq!(f.simple(1, 0, 4096, true).1, 1, "write: IOERR");
    assert_eq!(f.simple(0, 0, 4096, false).1, 0, "read: OK");
    drop(f);
    assert!(a.stop().success());
    assert!(std::fs::read(a.path("ro.img")).unwrap() == pattern(2, 4 << 20), "image untouched");
}

#[test]
fn malformed_messages_are_refused_and_the_socket_still_serves() {
    let mut a = start();
    let sock = a.path("rw.vhost");
    // Garbage: an unknown request with a huge payload size.
    let mut s = UnixStream::connect(&sock).unwrap();
    let mut hdr = Vec::new();
    hdr.extend_from_slice(&9999u32.to_le_bytes());
    hdr.extend_from_slice(&1u32.to_le_bytes());
    hdr.extend_from_slice(&0x7fff_ffffu32.to_le_bytes());
    s.write_all(&hdr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut b = [0u8; 64];
    let n = std::io::Read::read(&mut s, &mut b).unwrap_or(0);
    assert_eq!(n, 0, "the connection is dropped");
    drop(s);
    // Bad arguments on a real session: refused, session continues.
    let mut f = Front::connect(&sock);
    assert!(f.fe.set_vring_num(0, 3).is_err(), "a queue size that is not a power of two");
    assert!(f.fe.set_vring_num(0, 4096).is_err(), "a queue size beyond the limit");
    let cfg =
        f.fe.get_config(0, 8, vhost::vhost_user::message::VhostUserConfigFlags::empty(), &[0u8; 8]);
    let (_, bytes) = cfg.expect("config space");
    assert_eq!(
        u64::from_le_bytes(bytes[..8].try_into().unwrap()),
        (4 << 20) / 512,
        "capacity in sectors"
    );
    assert!(f.fe.set_features(1 << 63).is_err(), "features never offered");
    // A memory table whose region reaches past the end of its file: mapping it would
    // turn the first touch of the missing pages into a SIGBUS for the whole appliance.
    // SAFETY: memfd_create with a valid name.
    let fd = unsafe { libc::memfd_create(c"short".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a fresh descriptor we own.
    let short = unsafe { File::from_raw_fd(fd) };
    short.set_len(64 << 10).unwrap();
    let past_eof = VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: MEM as u64,
        userspace_addr: f.base as u64,
        mmap_offset: 0,
        mmap_handle: short.as_raw_fd(),
    };
    assert!(f.fe.set_mem_table(&[past_eof]).is_err(), "a region past the end of its file");
    // The session goes on after refusals.
    assert_eq!(f.simple(0, 0, 512, false), (513, 0));
    drop(f);
    // A new front-end works normally.
    let mut f = Front::connect(&sock);
    assert_eq!(f.simple(0, 0, 512, false), (513, 0));
    drop(f);
    assert!(a.alive());
    assert!(a.stop().success());
}

impl Front {
    /// A chain of `descs` (address, length, flags) at table slots 0.., linked in order;
    /// returns the used length and the status byte (the last byte of the last writable
    /// descriptor).
    fn chain(&mut self, descs: &[(u64, u32, u16)]) -> (u32, u8) {
        let n = descs.len() as u16;
        let mut status_at = None;
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let i = i as u16;
            let next = if i + 1 < n { F_NEXT } else { 0 };
            self.desc(DESC, i, addr, len, flags | next, i + 1);
            if flags & F_WRITE != 0 && len > 0 {
                status_at = Some(addr + u64::from(len) - 1);
            }
        }
        let at = status_at.expect("a writable byte for the status");
        self.put(at, 0xffu8);
        let len = self.submit(0);
        (len, self.get(at))
    }
}

/// Degenerate requests of every type: no data segments, tiny and oversized buffers,
/// empty ranges, zero-length segments. Each is answered as virtio-blk says (through
/// the device's shared validation step), and the queue goes on.
#[test]
fn degenerate_requests_of_every_type_get_virtio_answers() {
    let mut a = start();
    degenerate_requests(&a, "q");
    degenerate_requests(&a, "rw");
    assert!(a.alive());
    assert!(a.stop().success(), "{}", a.logs());
    assert!(!a.logs().contains("panicked"));
    let img = std::fs::read(a.path("rw.img")).unwrap();
    assert!(img[24 * 512..24 * 512 + 4096].iter().all(|&b| b == 0x3c));
    assert!(
        img[(4 << 20) - 512..] == pattern(1, 4 << 20)[(4 << 20) - 512..],
        "nothing zeroed past a refused range"
    );
    let out = appliance_tests::run(
        std::process::Command::new("qemu-img").args(["check"]).arg(a.path("q.qcow2")),
    );
    assert!(out.status.success());
}

fn degenerate_requests(a: &Appliance, disk: &str) {
    const HDR: u64 = 0x10000;
    const DATA: u64 = 0x20000;
    const ST: u64 = 0x30000;
    let mut f = Front::connect(&a.path(&format!("{disk}.vhost")));
    let hdr = (HDR, 16, 0);
    let status = (ST, 1, F_WRITE);
    // No data segments at all.
    for (kind, want, what) in [
        (0u32, 0u8, "read of nothing: OK"),
        (1, 0, "write of nothing: OK"),
        (4, 0, "flush: OK"),
        (8, 0, "GET_ID into no buffer: OK"),
        (11, 2, "discard without ranges: UNSUPP"),
        (13, 2, "write-zeroes without ranges: UNSUPP"),
    ] {
        f.header(HDR, kind, 0);
        assert_eq!(f.chain(&[hdr, status]), (1, want), "{what}");
    }
    // GET_ID into tiny and oversized buffers: as much of the serial as fits.
    f.header(HDR, 8, 0);
    assert_eq!(f.chain(&[hdr, (DATA, 3, F_WRITE), status]), (4, 0), "3-byte GET_ID");
    assert_eq!(f.chain(&[hdr, (DATA, 4096, F_WRITE), status]), (21, 0), "4 KiB GET_ID");
    // Zero-length data segments among real ones.
    // SAFETY: writing our own mapping.
    unsafe { std::ptr::write_bytes(f.base.add(DATA as usize), 0x3c, 4096) };
    f.header(HDR, 1, 24);
    assert_eq!(f.chain(&[hdr, (DATA, 0, 0), (DATA, 4096, 0), (DATA, 0, 0), status]), (1, 0));
    f.header(HDR, 0, 24);
    assert_eq!(
        f.chain(&[hdr, (DATA + 8192, 0, F_WRITE), (DATA + 8192, 4096, F_WRITE), status]).1,
        0
    );
    assert_eq!(f.get::<[u8; 16]>(DATA + 8192), [0x3c; 16], "the write landed, the read saw it");
    // Larger than the device's largest transfer (32 MiB): IOERR, nothing touched.
    f.header(HDR, 0, 0);
    let big = 12 << 20;
    let r =
        f.chain(&[hdr, (DATA, big, F_WRITE), (DATA, big, F_WRITE), (DATA, big, F_WRITE), status]);
    assert_eq!(r.1, 1, "a 36 MiB read: IOERR");
    // Ranges: empty, past the end, with flags the type does not take.
    let range = |f: &Front, sector: u64, sectors: u32, flags: u32| {
        f.put(DATA, sector.to_le());
        f.put(DATA + 8, sectors.to_le());
        f.put(DATA + 12, flags.to_le());
    };
    let ranges = (DATA, 16, 0);
    f.header(HDR, 13, 0);
    range(&f, 100, 0, 0);
    assert_eq!(f.chain(&[hdr, ranges, status]).1, 0, "write-zeroes of no sectors: OK");
    range(&f, (4 << 20) / 512 - 1, 8, 0);
    assert_eq!(f.chain(&[hdr, ranges, status]).1, 1, "write-zeroes across the end: IOERR");
    f.header(HDR, 11, 0);
    range(&f, 0, 8, 1);
    assert_eq!(f.chain(&[hdr, ranges, status]).1, 2, "discard with the unmap flag: UNSUPP");
    range(&f, u64::MAX / 256, 8, 0);
    assert_eq!(f.chain(&[hdr, ranges, status]).1, 1, "discard of an overflowing sector: IOERR");
    // More segments than seg_max (through an indirect table): an empty completion.
    for i in 0..200u16 {
        f.desc(0x40000, i, DATA, 512, F_WRITE | if i < 199 { F_NEXT } else { 0 }, i + 1);
    }
    f.desc(0x40000, 0, HDR, 16, F_NEXT, 1);
    f.header(HDR, 0, 0);
    f.desc(DESC, 0, 0x40000, 200 * 16, F_INDIRECT, 0);
    assert_eq!(f.submit(0), 0, "too many segments");
    // The queue still serves.
    assert_eq!(f.simple(0, 8, 4096, false), (4097, 0), "{disk}");
}
