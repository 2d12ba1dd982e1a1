//! Exercises untrusted image bytes through every entry point, for the fuzz target
//! (`fuzz/fuzz_targets/qcow2_image.rs`) and the corpus replay test.
//!
//! The bytes become an image file next to trusted backing files (`base.raw`,
//! `base.qcow2`), so backing names in the header resolve — or are refused — as they
//! would in production. Then: `info`, `map` and a read-only `check` run; the image is
//! opened read-only and read-write; reads, block status, writes, write-zeroes, discards
//! and flushes are issued at offsets derived from the bytes; the image is closed; a
//! check with repair runs on a copy. Any error is fine; a panic, a hang or a request
//! that reaches outside the image's own file is a bug.
//!
//! Invariants checked beyond "no panic":
//! - an image the checker finds consistent is still consistent after a read-write
//!   open, the requests and a close that stores its bitmaps;
//! - on an image the checker finds consistent, a successful write followed by a
//!   successful read of the same range returns the written bytes;
//! - after `Repair::All`, a fresh check finds what the repair reported as left, and
//!   never a refcount or COPIED-flag error (structures it cannot rebuild, such as a
//!   bitmap directory past the end of the file, may remain, as with qemu-img).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use poller::{ReactorHandle, TaskPool};

use super::check::{Repair, check};
use super::{OpenOptions, Qcow2Device};
use crate::error::IoError;
use crate::io::EngineKind;
use crate::seg::IoSeg;

/// Images above this many bytes are skipped (the fuzzer's inputs are far smaller).
pub const MAX_INPUT: usize = 4 << 20;

/// A directory with the trusted backing files, created once per process.
pub fn workdir() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        // tmpfs when there is one: flushes are then free, and inputs run fast.
        let shm = Path::new("/dev/shm");
        let base = if shm.is_dir() { shm.to_path_buf() } else { std::env::temp_dir() };
        let d = base.join(format!("qcow2-fuzz-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&d);
        let _ = std::fs::write(d.join("base.raw"), vec![0x5au8; 1 << 20]);
        let opts = super::create::CreateOptions { size: 1 << 20, ..Default::default() };
        let _ = super::create::create(&d.join("base.qcow2"), &opts);
        d
    })
    .clone()
}

fn mix(data: &[u8]) -> u64 {
    // FNV-1a over the input: offsets and choices follow the bytes, deterministically.
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for &b in data.iter().take(4096) {
        h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    h ^ data.len() as u64
}

/// Runs one input. `owner` is the reactor that serves the image.
pub fn exercise(data: &[u8], owner: &ReactorHandle) {
    if data.len() > MAX_INPUT {
        return;
    }
    let dir = workdir();
    let path = dir.join("image.qcow2");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let allowed = vec![dir.clone()];
    let _ = super::tools::info(&path);
    let _ = super::tools::map(&path, &allowed);
    // Read-back is checked only on images the checker finds consistent: in one it
    // calls corrupt (a data cluster whose refcount is 0, two entries sharing a
    // cluster), a write may land where another guest cluster's data lives — as in
    // QEMU; what holds there is no panic, no hang, no access outside the image.
    let consistent = check(&path, Repair::None, &mut |_, _| {}).is_ok_and(|r| r.corruptions == 0);

    for read_only in [true, false] {
        let opts = OpenOptions {
            engine: EngineKind::IoUring,
            direct: false,
            read_only,
            allowed_backing_dirs: allowed.clone(),
            l2_cache_bytes: Some(64 << 10),
            refcount_cache_bytes: Some(16 << 10),
            storage: None,
            data_storage: None,
            zero_hop: true,
            locking: true,
            encryption_key: None,
        };
        let Ok(dev) = Qcow2Device::open(&path, opts, std::slice::from_ref(owner)) else { continue };
        let seed = mix(data);
        let d2 = dev.clone();
        owner.block_on(move || async move { drive(d2, seed, read_only, consistent).await });
        // Closing stores the bitmaps it loaded (a read-write open flagged them in use):
        // an image that was consistent stays so.
        let stored = dev.close_storing(&dev.stored_bitmaps());
        if consistent && !read_only && stored.is_ok() {
            let r = check(&path, Repair::None, &mut |_, _| {});
            if let Ok(r) = r {
                assert_eq!(
                    r.corruptions, 0,
                    "storing bitmaps corrupted the image: {:?}",
                    r.messages
                );
            }
        }
    }

    // Repair a copy. The report tells what is left (a fresh check agrees), and what is
    // left is never a refcount or COPIED-flag error: the rebuild always fixes those.
    let copy = dir.join("repair.qcow2");
    if std::fs::write(&copy, data).is_ok()
        && let Ok(r) = check(&copy, Repair::All, &mut |_, _| {})
        && r.check_errors == 0
        && let Ok(again) = check(&copy, Repair::None, &mut |_, _| {})
    {
        assert_eq!(
            again.corruptions, r.corruptions,
            "the repair report is not what a fresh check finds"
        );
        assert!(
            !again.messages.iter().any(|m| m.contains("refcount=") || m.contains("OFLAG_COPIED")),
            "refcount errors left after a full repair: {:?}",
            again.messages
        );
    }
}

async fn drive(dev: Arc<Qcow2Device>, seed: u64, read_only: bool, consistent: bool) {
    let Ok(ch) = dev.channel() else { return };
    let size = dev.header().size;
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut buf = vec![0u8; 256 << 10];
    let mut corrupt = false;
    // Whole-prefix read and status walk.
    let first = size.min(buf.len() as u64) as usize;
    let _ = ch.read(0, &[IoSeg::new(&mut buf[..first])]).await;
    let mut off = 0;
    for _ in 0..64 {
        if off >= size {
            break;
        }
        match ch.block_status(off, (size - off).min(1 << 30)).await {
            Ok(st) if st.len > 0 => off += st.len,
            _ => break,
        }
    }
    if size == 0 {
        return;
    }
    for _ in 0..24 {
        let len = 1 + next() % (64 << 10);
        let len = len.min(size);
        let off = next() % (size - len + 1);
        let b = &mut buf[..len as usize];
        match next() % 8 {
            0..=2 => {
                let _ = ch.read(off, &[IoSeg::new(b)]).await;
            }
            3 | 4 if !read_only => {
                let fill = next() as u8;
                b.fill(fill);
                let w = ch.write(off, &[IoSeg::new(b)], next() % 4 == 0).await;
                corrupt |= w == Err(IoError::Corrupt);
                if w.is_ok() {
                    b.fill(!fill);
                    let r = ch.read(off, &[IoSeg::new(b)]).await;
                    corrupt |= r == Err(IoError::Corrupt);
                    if r.is_ok() && !corrupt && consistent {
                        let bad = b.iter().position(|&v| v != fill);
                        assert!(
                            bad.is_none(),
                            "a write of {len} bytes at {off} did not read back (byte {bad:?} differs)"
                        );
                    }
                }
            }
            5 if !read_only => {
                let _ = ch.write_zeroes(off, len, next() % 2 == 0, false).await;
            }
            6 if !read_only => {
                let _ = ch.discard(off, len).await;
            }
            _ => {
                let _ = ch.flush().await;
            }
        }
    }
    // A few requests at once, as a guest would issue them.
    let pool = TaskPool::new(4);
    for i in 0..4u64 {
        let dev = dev.clone();
        let off = (next() % size) & !511;
        let _ = pool.spawn(async move {
            let Ok(ch) = dev.channel() else { return };
            let mut b = vec![i as u8; 4096];
            let len = (size - off).min(4096) as usize;
            if read_only || i % 2 == 0 {
                let _ = ch.read(off, &[IoSeg::new(&mut b[..len])]).await;
            } else {
                let _ = ch.write(off, &[IoSeg::new(&mut b[..len])], false).await;
            }
        });
    }
    pool.drain().await;
    let _ = ch.flush().await;
}

/// The corpus directory of the fuzz target, for the replay test.
pub fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/qcow2_image")
}
