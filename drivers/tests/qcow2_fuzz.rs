//! Replays the qcow2 fuzz target's seed corpus and every input that once failed
//! (`fuzz/regressions/`), then mutates the seeds for a bounded number of rounds — the
//! same harness as `fuzz/fuzz_targets/qcow2_image.rs`, run by `cargo test` so every
//! change meets it. `QCOW2_FUZZ_ROUNDS` sets the number of mutated inputs (default
//! 1000); `QCOW2_FUZZ_INPUT` replays one file.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use drivers::qcow2::fuzzing::{corpus_dir, exercise};
use poller::{HugepageMode, IdlePolicy, ReactorOptions, Reactors};

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|r| r.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    v.sort();
    v
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// A structure-aware mutation: header fields, table entries and random bytes.
fn mutate(seed: &[u8], r: &mut Rng) -> Vec<u8> {
    let mut d = seed.to_vec();
    for _ in 0..1 + r.next() % 4 {
        if d.is_empty() {
            break;
        }
        match r.next() % 6 {
            // A header field (the first 104 bytes) set to an interesting value.
            0 => {
                let at = (r.next() % 13 * 8) as usize % 104;
                let v: u64 = match r.next() % 6 {
                    0 => 0,
                    1 => u64::MAX,
                    2 => 1 << (r.next() % 64),
                    3 => d.len() as u64 + r.next() % 4096,
                    4 => r.next() % 64,
                    _ => r.next(),
                };
                if at + 8 <= d.len() {
                    d[at..at + 8].copy_from_slice(&v.to_be_bytes());
                }
            }
            // An 8-byte entry anywhere (L1, L2, refcount table) corrupted.
            1 => {
                let at = (r.next() as usize % d.len()) & !7;
                let v = match r.next() % 4 {
                    0 => 0x8000_0000_0000_0000 | (r.next() % (d.len() as u64 * 2)) & !511,
                    1 => r.next() % (d.len() as u64 * 2),
                    2 => 0x4000_0000_0000_0000 | r.next(),
                    _ => 1,
                };
                if at + 8 <= d.len() {
                    d[at..at + 8].copy_from_slice(&v.to_be_bytes());
                }
            }
            // Random bytes.
            2 | 3 => {
                let at = r.next() as usize % d.len();
                d[at] = r.next() as u8;
            }
            // Truncated.
            4 => d.truncate(r.next() as usize % d.len()),
            // A refcount entry zeroed or maxed.
            _ => {
                let at = (r.next() as usize % d.len()) & !1;
                if at + 2 <= d.len() {
                    let v: u16 = if r.next().is_multiple_of(2) { 0 } else { 0xffff };
                    d[at..at + 2].copy_from_slice(&v.to_be_bytes());
                }
            }
        }
    }
    d
}

#[test]
fn image_bytes_never_panic_or_hang() {
    let reactors = Reactors::start(ReactorOptions {
        cores: vec![0],
        idle: IdlePolicy::adaptive(),
        hugepages: HugepageMode::Off,
        dma_pool_bytes: 16 << 20,
        pin: false,
    })
    .unwrap();
    let owner = reactors.handles()[0].clone();
    let run = |name: &str, data: &[u8]| {
        let t = Instant::now();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| exercise(data, &owner)));
        if let Err(e) = r {
            let keep = std::env::temp_dir().join("qcow2-fuzz-failure.qcow2");
            let _ = std::fs::write(&keep, data);
            eprintln!("input {name} failed; saved as {}", keep.display());
            std::panic::resume_unwind(e);
        }
        assert!(t.elapsed() < Duration::from_secs(20), "input {name} took {:?}", t.elapsed());
    };
    if let Ok(one) = std::env::var("QCOW2_FUZZ_INPUT") {
        run(&one, &std::fs::read(&one).unwrap());
        reactors.stop();
        return;
    }
    let seeds: Vec<(PathBuf, Vec<u8>)> =
        files(&corpus_dir()).into_iter().map(|p| (p.clone(), std::fs::read(&p).unwrap())).collect();
    assert!(seeds.len() >= 10, "the seed corpus is missing: {}", corpus_dir().display());
    for (p, d) in &seeds {
        run(&p.display().to_string(), d);
    }
    for p in files(&corpus_dir().join("../../regressions/qcow2_image")) {
        run(&p.display().to_string(), &std::fs::read(&p).unwrap());
    }
    let rounds: u64 =
        std::env::var("QCOW2_FUZZ_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    let mut r = Rng(0x9e37_79b9_7f4a_7c15);
    for i in 0..rounds {
        let (p, seed) = &seeds[(r.next() % seeds.len() as u64) as usize];
        let d = mutate(seed, &mut r);
        run(&format!("mutation {i} of {}", p.display()), &d);
    }
    reactors.stop();
}
