//! Crash consistency of the qcow2 engine, by simulated power loss.
//!
//! Each trial, from a seed: a fresh image (cluster size, refcount width, version and
//! lazy refcounts chosen by the seed) on a [`SimDisk`] with a volatile write cache;
//! several concurrent workers on one reactor issue random allocating writes (unaligned,
//! across clusters, into regions that share clusters), write-zeroes, discards and
//! flushes; the power is cut after a seeded number of disk operations; the disk keeps
//! its flushed contents plus a seeded subset of unflushed writes, some torn. Then:
//! - `qemu-img check` (and our own check) finds no corruption — leaks are allowed (for
//!   lazy-refcount images, after the repair that opening them read-write performs);
//! - the image opens, and every byte written by a request that completed before the
//!   start of the last completed flush reads back.
//!
//! The run is deterministic for a seed (one reactor, no real I/O, seeded yields); a
//! failing trial prints its seed. `CRASH_TRIALS` sets the number of trials (default
//! 1000), `CRASH_SEED` runs one seed.

use std::cell::RefCell;
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;

use drivers::qcow2::check::{Repair, check_io};
use drivers::qcow2::create::{CreateOptions, create};
use drivers::qcow2::{OpenOptions, Qcow2Device};
use drivers::sim::SimDisk;
use drivers::{EngineKind, IoSeg, Storage};
use poller::{HugepageMode, IdlePolicy, ReactorHandle, ReactorOptions, Reactors, TaskPool};

const SIZE: u64 = 4 << 20;
const WORKERS: u64 = 4;
const OPS_PER_WORKER: u64 = 40;

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// What the workers did, in completion order.
#[derive(Default)]
struct Model {
    seq: u64,
    /// (completion seq, offset, bytes) of completed writes (zeros for zero/discard).
    done: Vec<(u64, u64, Vec<u8>)>,
    /// Ranges of requests that did not complete successfully.
    failed: Vec<(u64, u64)>,
    /// Completed writes with a seq below this are durable.
    durable_below: u64,
}

fn image_bytes(seed: u64, dir: &Path) -> (Vec<u8>, String) {
    let mut r = Rng::new(seed ^ 0xabcdef);
    let cluster = [512u64, 4096, 65536][r.below(3) as usize];
    let refcount_bits = [1u32, 16, 64][r.below(3) as usize];
    let v2 = r.below(5) == 0;
    let lazy = !v2 && r.below(3) == 0;
    let opts = CreateOptions {
        size: SIZE,
        cluster_size: cluster,
        refcount_bits: if v2 { 16 } else { refcount_bits },
        version: if v2 { 2 } else { 3 },
        lazy_refcounts: lazy,
        ..Default::default()
    };
    let path = dir.join(format!("seed{seed}.qcow2"));
    create(&path, &opts).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let desc = format!(
        "cluster {cluster}, refcount bits {}, v{}, lazy {lazy}",
        opts.refcount_bits, opts.version
    );
    (bytes, desc)
}

fn open(disk: Arc<SimDisk>, owner: &ReactorHandle, name: &str) -> Arc<Qcow2Device> {
    let opts = OpenOptions {
        engine: EngineKind::IoUring,
        direct: false,
        read_only: false,
        allowed_backing_dirs: vec![],
        l2_cache_bytes: Some(64 << 10),
        refcount_cache_bytes: Some(16 << 10),
        storage: Some(Storage::sim(disk)),
    };
    Qcow2Device::open(Path::new(name), opts, owner.clone())
        .unwrap_or_else(|e| panic!("{name}: open failed: {e}"))
}

async fn worker(dev: Arc<Qcow2Device>, model: Rc<RefCell<Model>>, id: u64, seed: u64) {
    let ch = dev.channel().unwrap();
    let mut r = Rng::new(seed * 31 + id);
    // Each worker owns a region; regions meet inside clusters.
    let region = SIZE / WORKERS;
    let base = id * region;
    for _ in 0..OPS_PER_WORKER {
        let kind = r.below(20);
        let len = 1 + r.below(3 * 4096 + 700);
        let off = base + r.below(region - len);
        let result = match kind {
            0..=12 => {
                let mut data: Vec<u8> = (0..len).map(|_| r.next() as u8).collect();
                let res = ch.write(off, &[IoSeg::new(&mut data)], r.below(10) == 0).await;
                res.map(|()| data)
            }
            13..=14 => ch
                .write_zeroes(off, len, r.below(2) == 0, false)
                .await
                .map(|()| vec![0u8; len as usize]),
            15 => ch.discard(off, len).await.map(|()| Vec::new()),
            _ => {
                let issued = model.borrow().seq;
                match ch.flush().await {
                    Ok(()) => {
                        let mut m = model.borrow_mut();
                        m.durable_below = m.durable_below.max(issued);
                        continue;
                    }
                    Err(_) => return,
                }
            }
        };
        let mut m = model.borrow_mut();
        match result {
            Ok(data) if kind == 15 => {
                // Discarded whole clusters read as zeros, partial ones keep their data;
                // either way the range's contents are the image's business now.
                let _ = data;
                m.failed.push((off, len));
            }
            Ok(data) => {
                let s = m.seq;
                m.seq += 1;
                m.done.push((s, off, data));
            }
            Err(_) => {
                m.failed.push((off, len));
                return;
            }
        }
    }
}

fn qemu_img_corruptions(path: &Path) -> Option<u64> {
    let out = std::process::Command::new("qemu-img")
        .args(["check", "--output=json"])
        .arg(path)
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    Some(v["corruptions"].as_u64().unwrap_or(0) + v["check-errors"].as_u64().unwrap_or(0))
}

fn trial(seed: u64, owner: &ReactorHandle, dir: &Path, have_qemu: bool) {
    let (bytes, desc) = image_bytes(seed, dir);
    let lazy = desc.contains("lazy true");
    let mut r = Rng::new(seed ^ 0x5eed);
    let cut_after = 1 + r.below(500);
    let disk = Arc::new(SimDisk::new(bytes, seed, Some(cut_after)));
    let name = format!("sim-{seed}.qcow2");
    let dev = open(disk.clone(), owner, &name);
    let model = Rc::new(RefCell::new(Model::default()));
    let d2 = dev.clone();
    let model_out = owner.block_on(move || async move {
        let model = Rc::new(RefCell::new(Model::default()));
        let pool = TaskPool::new(WORKERS as u32);
        for id in 0..WORKERS {
            let _ = pool.spawn(worker(d2.clone(), model.clone(), id, seed));
        }
        pool.drain().await;

        std::mem::take(&mut *model.borrow_mut())
    });
    drop(model);
    let _ = dev.close();
    let crash = disk.crash_image(seed ^ 0xc0ffee);
    let crash_path = dir.join(format!("crash{seed}.qcow2"));
    std::fs::write(&crash_path, &crash).unwrap();
    let ctx = format!("seed {seed} ({desc}, cut after {cut_after} disk ops)");
    if !lazy {
        let report = check_io(
            &crash_path,
            &std::fs::File::open(&crash_path).unwrap(),
            Repair::None,
            &mut |_, _| {},
        )
        .unwrap_or_else(|e| panic!("{ctx}: check could not run: {e}"));
        assert_eq!(
            report.corruptions, 0,
            "{ctx}: corruption after the crash: {:?}",
            report.messages
        );
        if have_qemu {
            assert_eq!(
                qemu_img_corruptions(&crash_path),
                Some(0),
                "{ctx}: qemu-img check finds corruption"
            );
        }
    }
    // The image opens (repairing a dirty lazy-refcounts image) and the durable writes
    // read back.
    let disk2 = Arc::new(SimDisk::new(crash, seed, None));
    let dev2 = open(disk2.clone(), owner, &name);
    let d3 = dev2.clone();
    let content = owner.block_on(move || async move {
        let ch = d3.channel().unwrap();
        let mut buf = vec![0u8; SIZE as usize];
        ch.read(0, &[IoSeg::new(&mut buf)]).await.map(|()| buf)
    });
    let content =
        content.unwrap_or_else(|e| panic!("{ctx}: reading the crashed image failed: {e}"));
    dev2.close().unwrap_or_else(|e| panic!("{ctx}: closing the reopened image failed: {e}"));
    let mut expected = vec![0u8; SIZE as usize];
    let mut uncertain = vec![false; SIZE as usize];
    for (s, off, data) in &model_out.done {
        let r = *off as usize..*off as usize + data.len();
        if *s < model_out.durable_below {
            expected[r].copy_from_slice(data);
        } else {
            uncertain[r].fill(true);
        }
    }
    for &(off, len) in &model_out.failed {
        uncertain[off as usize..(off + len) as usize].fill(true);
    }
    for i in 0..SIZE as usize {
        if !uncertain[i] && content[i] != expected[i] {
            panic!(
                "{ctx}: byte {i} reads {:#x}, but a write completed before the last completed flush put {:#x} there",
                content[i], expected[i]
            );
        }
    }
    // After the reopen and a clean close, the image is fully consistent.
    let final_image = disk2.current();
    std::fs::write(&crash_path, &final_image).unwrap();
    let report = check_io(
        &crash_path,
        &std::fs::File::open(&crash_path).unwrap(),
        Repair::None,
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(report.corruptions, 0, "{ctx}: corruption after reopening: {:?}", report.messages);
    let _ = std::fs::remove_file(&crash_path);
    let _ = std::fs::remove_file(dir.join(format!("seed{seed}.qcow2")));
}

#[test]
fn power_loss_never_corrupts_and_keeps_flushed_writes() {
    let reactors = Reactors::start(ReactorOptions {
        cores: vec![0],
        idle: IdlePolicy::Busy,
        hugepages: HugepageMode::Off,
        dma_pool_bytes: 32 << 20,
        pin: false,
    })
    .unwrap();
    let owner = reactors.handles()[0].clone();
    let dir = tempfile::tempdir().unwrap();
    let have_qemu = std::process::Command::new("qemu-img").arg("--version").output().is_ok();
    let seeds: Vec<u64> = match std::env::var("CRASH_SEED") {
        Ok(s) => vec![s.parse().expect("CRASH_SEED")],
        Err(_) => {
            let n: u64 =
                std::env::var("CRASH_TRIALS").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
            (1..=n).collect()
        }
    };
    for seed in seeds {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            trial(seed, &owner, dir.path(), have_qemu)
        }));
        if let Err(e) = result {
            eprintln!("crash trial failed: rerun with CRASH_SEED={seed}");
            std::panic::resume_unwind(e);
        }
    }
    reactors.stop();
}
