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
                 [[disk]]\nname = \"ro\"\npath = \"{dir}/ro.img\"\nread_only = true\n[disk.vhost_user_blk]\nsocket = \"{dir}/ro.vhost\"\n"
        .to_string();
    Appliance::start(Setup { disks, ..Setup::default() }, |dir| {
        std::fs::write(dir.join("rw.img"), pattern(1, 4 << 20)).unwrap();
        std::fs::write(dir.join("ro.img"), pattern(2, 4 << 20)).unwrap();
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
