//! Fuzzes the qcow2 engine with image bytes: tools, open (read-only and read-write),
//! I/O, close and repair, through `drivers::qcow2::fuzzing::exercise`.
//!
//! Run: `cargo +nightly fuzz run qcow2_image fuzz/corpus/qcow2_image`
//! (or with `RUSTC_BOOTSTRAP=1` on stable).

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use poller::{HugepageMode, IdlePolicy, ReactorHandle, ReactorOptions, Reactors};

fn owner() -> &'static ReactorHandle {
    // The reactor lives as long as the fuzzing process (reachable from this static,
    // so the leak checker does not report it).
    static REACTORS: OnceLock<Reactors> = OnceLock::new();
    let reactors = REACTORS.get_or_init(|| {
        Reactors::start(ReactorOptions {
            cores: vec![0],
            idle: IdlePolicy::adaptive(),
            hugepages: HugepageMode::Off,
            dma_pool_bytes: 16 << 20,
            pin: false,
        })
        .expect("start a reactor")
    });
    &reactors.handles()[0]
}

fuzz_target!(|data: &[u8]| {
    drivers::qcow2::fuzzing::exercise(data, owner());
});
