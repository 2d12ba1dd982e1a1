//! A resize under a power cut: the image a trial left (checked, reopened, closed
//! cleanly) grows offline through `resize_io` on a [`SimDisk`], whose power is cut on
//! a seeded one of the resize's disk operations (a dry run counts them), or not at all.
//! The crash image must check clean (leaks allowed), have the old or the new size (the
//! new one if the resize returned), keep the data, read zeros in the grown area, and
//! take writes there.

use std::path::Path;
use std::sync::Arc;

use drivers::io::sim::SimDisk;
use drivers::qcow2::resize::resize_io;
use drivers::{IoSeg, Storage};

use crate::coverage::{Coverage, shape};
use crate::workload::{Rng, SIZE};
use crate::{Clean, Env, QemuCheck, check_clean, open};

/// Grows `image`, whose guest content is `content`, and checks the outcome.
pub fn run(seed: u64, image: Vec<u8>, content: &[u8], env: &Env, ctx: &str, cov: &mut Coverage) {
    let mut r = Rng::new(seed ^ 0x2e51);
    let old = shape(&image);
    assert_eq!(old.size, SIZE, "{ctx}: the image was not at its original size");
    let new_size = SIZE + 512 * (1 + r.below(8192));
    let name = Path::new("sim-resize.qcow2");
    let dry = Arc::new(SimDisk::new(image.clone(), seed, None));
    let grown = resize_io(name, &*Storage::sim(dry.clone()), new_size)
        .unwrap_or_else(|e| panic!("{ctx}: resize to {new_size} (no power cut) failed: {e}"));
    let ops = dry.ops();
    let cut = 1 + r.below(ops + 1);
    let ctx = format!("{ctx}; resize to {new_size}, cut on disk op {cut} of {ops}");
    let disk = Arc::new(SimDisk::new(image, seed, Some(cut)));
    let result = resize_io(name, &*Storage::sim(disk.clone()), new_size);
    assert_eq!(result.is_ok(), !disk.is_cut(), "{ctx}: resize result {result:?}");
    let crash = disk.crash_image(seed ^ 0x5157);
    // A resize that grew the L1 table and ran to its end repaired every leak (the
    // earlier crash's too), and a clean close adds none.
    let l1_grown = grown.new_l1_entries > grown.old_l1_entries;
    let want = if l1_grown && !disk.is_cut() { Clean::NoLeaks } else { Clean::NoCorruption };
    let qemu = check_clean(&crash, None, env, &format!("{ctx} (crash image)"), want, true);
    let size = shape(&crash).size;
    assert!(
        size == SIZE || size == new_size,
        "{ctx}: the crash image has size {size}, neither the old nor the new"
    );
    if result.is_ok() {
        assert_eq!(size, new_size, "{ctx}: the resize returned but the size did not stick");
    }
    let final_image = read_and_extend(crash, size, content, env, &ctx);
    let ctx2 = format!("{ctx} (after writing the grown image)");
    let _ = check_clean(&final_image, None, env, &ctx2, want, false);
    qemu.into_iter().for_each(QemuCheck::finish);
    cov.resize += 1;
    cov.resize_cut += u64::from(disk.is_cut());
    cov.resize_old_size += u64::from(size == SIZE);
    cov.resize_new_size += u64::from(size == new_size);
    cov.resize_l1_grown += u64::from(l1_grown);
}

/// Opens the resized image: the old content reads back, the grown area reads zeros,
/// and a write at the very end of the image reads back. Returns the image after a
/// clean close.
fn read_and_extend(crash: Vec<u8>, size: u64, content: &[u8], env: &Env, ctx: &str) -> Vec<u8> {
    let disk = Arc::new(SimDisk::new(crash, 7, None));
    let dev = open(disk.clone(), env, "sim-resized.qcow2");
    let d = dev.clone();
    let got = env.owner.block_on(move || async move {
        let ch = d.channel().expect("channel");
        let mut buf = vec![0u8; size as usize];
        ch.read(0, &[IoSeg::new(&mut buf)]).await?;
        let mut tail = vec![0xa5u8; 700];
        ch.write(size - 700, &[IoSeg::new(&mut tail)], true).await?;
        ch.read(size - 700, &[IoSeg::new(&mut tail)]).await?;
        Ok::<_, drivers::IoError>((buf, tail))
    });
    let (buf, tail) = got.unwrap_or_else(|e| panic!("{ctx}: I/O on the resized image: {e}"));
    dev.close().unwrap_or_else(|e| panic!("{ctx}: closing the resized image: {e}"));
    let (kept, grown) = buf.split_at(SIZE as usize);
    if let Some(i) = kept.iter().zip(content).position(|(a, b)| a != b) {
        panic!("{ctx}: byte {i} reads {:#04x} after the resize, was {:#04x}", kept[i], content[i]);
    }
    if let Some(i) = grown.iter().position(|&b| b != 0) {
        panic!(
            "{ctx}: byte {} of the grown area reads {:#04x}, not zero",
            SIZE as usize + i,
            grown[i]
        );
    }
    assert!(
        tail.iter().all(|&b| b == 0xa5),
        "{ctx}: a write at the end of the grown image is lost"
    );
    disk.current()
}
