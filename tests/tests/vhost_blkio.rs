//! libblkio's `virtio-blk-vhost-user` driver (the front-end QEMU's blkio block driver
//! uses, and the benchmark's `blkio-load`) against the vhost-user-blk export, on raw and
//! qcow2 with two queues: it maps its memory with `VHOST_USER_ADD_MEM_REG` one region at
//! a time, then writes patterns through both queues, flushes, reads them back, and the
//! image's content is checked by qemu-img (`compare` against a raw copy written the same
//! way, and `check` for the qcow2).

use std::mem::MaybeUninit;
use std::path::Path;

use appliance_tests::{Appliance, Setup, pattern, require_tool, run};
use blkio::{Blkio, Blkioq, Completion, ReqFlags};

const IMG: u64 = 16 << 20;
const BUF: usize = 1 << 20;

/// Runs `n` queued requests to completion; every one must succeed.
fn complete(q: &mut Blkioq, n: usize) {
    let mut done: Vec<MaybeUninit<Completion>> = (0..n).map(|_| MaybeUninit::uninit()).collect();
    let mut left = n;
    while left > 0 {
        let got = q.do_io(&mut done[..left], left, None, None).expect("do_io");
        for c in &done[..got] {
            // SAFETY: do_io initialised the first `got` completions.
            let c = unsafe { c.assume_init_ref() };
            assert_eq!(c.ret, 0, "request {} failed", c.user_data);
        }
        left -= got;
    }
}

/// Writes the test's pattern through the front-end, reads it back, and returns the
/// bytes written where, for the oracle.
fn exercise(sock: &Path) -> Vec<(u64, Vec<u8>)> {
    let mut b = Blkio::new("virtio-blk-vhost-user").unwrap();
    b.set_str("path", sock.to_str().unwrap()).unwrap();
    b.connect().unwrap_or_else(|e| panic!("connect {}: {e}", sock.display()));
    b.set_i32("num-queues", 2).unwrap();
    let started = b.start().unwrap();
    assert_eq!(b.get_u64("capacity").unwrap(), IMG);
    let mut queues = started.queues;
    assert_eq!(queues.len(), 2);
    // Two regions, each added on its own (ADD_MEM_REG), one per queue.
    let regions: Vec<_> = (0..2)
        .map(|_| {
            let r = b.alloc_mem_region(2 * BUF).unwrap();
            b.map_mem_region(&r).unwrap();
            r
        })
        .collect();
    let mut written = Vec::new();
    for (i, (q, r)) in queues.iter_mut().zip(&regions).enumerate() {
        // Eight 4 KiB..128 KiB writes per queue, unaligned to clusters, interleaved
        // between the queues.
        let base = r.addr as *mut u8;
        let mut at = 0usize;
        for k in 0..8u64 {
            let len = 4096usize << (k % 6);
            let off = (k * 2 + i as u64) * (1 << 20) + 512 * (k + 1);
            let data = pattern(100 + k * 2 + i as u64, len);
            // SAFETY: `at + len` ≤ BUF within the region we own and mapped.
            let src = unsafe { base.add(at) };
            // SAFETY: as above; `data` is `len` bytes and does not overlap the region.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), src, len) };
            q.write(off, src.cast_const(), len, k as usize, ReqFlags::empty());
            written.push((off, data));
            at += len;
        }
        complete(q, 8);
        q.flush(99, ReqFlags::empty());
        complete(q, 1);
    }
    // Read everything back through the other queue, into the second half of its region.
    for (i, (off, data)) in written.iter().enumerate() {
        let q = &mut queues[(i + 1) % 2];
        let dst = (regions[(i + 1) % 2].addr + BUF) as *mut u8;
        q.read(*off, dst, data.len(), i, ReqFlags::empty());
        complete(q, 1);
        // SAFETY: `data.len()` ≤ BUF bytes of our mapped region, just filled by the read.
        let got = unsafe { std::slice::from_raw_parts(dst, data.len()) };
        assert!(got == &data[..], "read back at {off} differs");
    }
    written
}

#[test]
fn libblkio_front_end_reads_back_what_it_wrote() {
    require_tool("qemu-img", "qemu-utils");
    let disks = "[[disk]]\nname = \"r\"\npath = \"{dir}/r.img\"\n[disk.vhost_user_blk]\nsocket = \"{dir}/r.vhost\"\nqueues = 2\n\n\
                 [[disk]]\nname = \"q\"\npath = \"{dir}/q.qcow2\"\nformat = \"qcow2\"\n[disk.vhost_user_blk]\nsocket = \"{dir}/q.vhost\"\nqueues = 2\n"
        .to_string();
    let mut app = Appliance::start(Setup { cores: "[0, 1]", disks, ..Setup::default() }, |dir| {
        appliance_tests::sparse_file(&dir.join("r.img"), IMG);
        run(std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536"])
            .arg(dir.join("q.qcow2"))
            .arg(IMG.to_string()));
    });
    let dir = app.dir.path().to_path_buf();
    let written = exercise(&dir.join("r.vhost"));
    assert_eq!(exercise(&dir.join("q.vhost")), written);
    assert!(app.stop().success(), "clean shutdown:\n{}", app.logs());
    // The oracle: a raw file with the same writes, compared with both images.
    let expect = dir.join("expect.img");
    appliance_tests::sparse_file(&expect, IMG);
    let f = std::fs::OpenOptions::new().write(true).open(&expect).unwrap();
    for (off, data) in &written {
        std::os::unix::fs::FileExt::write_all_at(&f, data, *off).unwrap();
    }
    run(std::process::Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(dir.join("q.qcow2")));
    for (fmt, img) in [("raw", "r.img"), ("qcow2", "q.qcow2")] {
        run(std::process::Command::new("qemu-img")
            .args(["compare", "-f", fmt, "-F", "raw"])
            .arg(dir.join(img))
            .arg(&expect));
    }
}
