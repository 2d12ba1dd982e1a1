//! The fuzz targets of `appliance::fuzzing` (NBD sessions, vhost-user messages,
//! virtqueue descriptor chains, config text) under `cargo test`: every seed, every
//! committed corpus input and every input that once failed (`fuzz/regressions/`) is
//! replayed, then the seeds are mutated for a bounded number of rounds, with the same
//! harnesses the cargo-fuzz targets in `fuzz/` run for hours. `FUZZ_ROUNDS` sets the
//! mutated inputs per target (default 300); `FUZZ_INPUT=target:file` replays one file;
//! `FUZZ_WRITE_SEEDS=1` (re)writes the seeds into `fuzz/corpus/`.

use std::path::{Path, PathBuf};

use appliance::fuzzing;
use appliance_tests::fuzz_seeds::{TARGETS, seeds};
use appliance_tests::workspace;

/// Runs one input; returns what it did, for the checks on the seeds.
fn harness(target: &str, input: &[u8]) -> String {
    match target {
        "nbd_session" => format!("{} reply bytes", fuzzing::nbd_session(input)),
        "vhost_messages" => {
            let (replies, served) = fuzzing::vhost_messages(input);
            format!("{replies} reply bytes, served {served}")
        }
        "virtqueue_chain" => format!("status {:?}", fuzzing::virtqueue_chain(input)),
        "config" => format!("parsed {}", fuzzing::config_text(input)),
        t => panic!("no fuzz target {t}"),
    }
}

/// What the well-formed seeds must do, so a harness that stopped exercising the code
/// fails here instead of fuzzing nothing.
fn check_seed(target: &str, name: &str, outcome: &str) {
    let want: &[&str] = match (target, name) {
        ("nbd_session", _) => &["reply bytes"],
        ("vhost_messages", "running-queue" | "qemu-start-stop") => &["served true"],
        ("virtqueue_chain", _) => &["status Some(0)"],
        ("config", _) => &["parsed true"],
        _ => &[],
    };
    for w in want {
        assert!(outcome.contains(w), "{target} seed {name}: {outcome} (expected {w})");
    }
    if target == "nbd_session" {
        let n: usize = outcome.split(' ').next().unwrap().parse().unwrap();
        assert!(n >= 16, "{target} seed {name} got only {n} reply bytes");
    }
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|r| r.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_file()).collect())
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
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Byte-level mutations: flips, interesting values, truncation, duplication.
fn mutate(seed: &[u8], r: &mut Rng) -> Vec<u8> {
    let mut d = seed.to_vec();
    for _ in 0..1 + r.below(4) {
        if d.is_empty() {
            d.push(r.next() as u8);
            continue;
        }
        let at = r.below(d.len());
        match r.below(6) {
            0 => d[at] ^= 1 << r.below(8),
            1 => d[at] = [0, 0xff, 0x7f, 0x80, 1][r.below(5)],
            2 => {
                let v = [0u32, u32::MAX, 1 << 31, 4096, 1 << 25][r.below(5)];
                let end = (at + 4).min(d.len());
                d[at..end].copy_from_slice(&v.to_be_bytes()[..end - at]);
            }
            3 => d.truncate(at),
            4 => {
                let n = r.below(64).min(d.len() - at);
                let chunk = d[at..at + n].to_vec();
                d.splice(at..at, chunk);
            }
            _ => d.insert(at, r.next() as u8),
        }
    }
    d
}

fn run_one(target: &str, name: &str, input: &[u8]) -> String {
    let r = std::panic::catch_unwind(|| harness(target, input));
    match r {
        Ok(outcome) => outcome,
        Err(e) => {
            let dir = std::env::temp_dir().join("appliance-fuzz-failures");
            let _ = std::fs::create_dir_all(&dir);
            let path = dir.join(format!("{target}-{name}"));
            let _ = std::fs::write(&path, input);
            eprintln!("{target}: input {name} failed; saved as {}", path.display());
            std::panic::resume_unwind(e);
        }
    }
}

#[test]
fn fuzz_targets_replay_their_corpora_and_survive_mutations() {
    if let Ok(spec) = std::env::var("FUZZ_INPUT") {
        let (target, file) = spec.split_once(':').expect("FUZZ_INPUT=target:file");
        let outcome = run_one(target, "input", &std::fs::read(file).expect("FUZZ_INPUT file"));
        eprintln!("{target}: {outcome}");
        return;
    }
    let rounds: usize =
        std::env::var("FUZZ_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(300);
    let write = std::env::var_os("FUZZ_WRITE_SEEDS").is_some();
    let root = workspace().join("fuzz");
    for target in TARGETS {
        let mut inputs: Vec<(String, Vec<u8>)> = seeds(target);
        assert!(!inputs.is_empty(), "{target} has seeds");
        for (name, bytes) in &inputs {
            check_seed(target, name, &run_one(target, name, bytes));
        }
        if write {
            let dir = root.join("corpus").join(target);
            std::fs::create_dir_all(&dir).unwrap();
            for (name, bytes) in &inputs {
                std::fs::write(dir.join(name), bytes).unwrap();
            }
        }
        for sub in ["corpus", "regressions"] {
            for p in files(&root.join(sub).join(target)) {
                let name = format!("{sub}/{}", p.file_name().unwrap().to_string_lossy());
                inputs.push((name, std::fs::read(&p).unwrap()));
            }
        }
        for (name, bytes) in &inputs {
            run_one(target, name, bytes);
        }
        let mut r = Rng(0x5eed_f00d ^ target.len() as u64);
        for i in 0..rounds {
            let (_, seed) = &inputs[r.below(inputs.len())];
            let m = mutate(seed, &mut r);
            run_one(target, &format!("mutation-{i}"), &m);
        }
        eprintln!("{target}: {} inputs and {rounds} mutations", inputs.len());
    }
}
