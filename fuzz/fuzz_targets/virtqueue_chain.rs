//! Fuzzes `appliance::fuzzing::virtqueue_chain` (see that module for what it drives).
//!
//! Run: `bash fuzz/run.sh SECONDS virtqueue_chain` (seeds in fuzz/corpus/virtqueue_chain/, past failures in
//! fuzz/regressions/virtqueue_chain/, both replayed by `cargo test` in tests/tests/fuzz_replay.rs).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = appliance::fuzzing::virtqueue_chain(data);
});
