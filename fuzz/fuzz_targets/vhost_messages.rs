//! Fuzzes `appliance::fuzzing::vhost_messages` (see that module for what it drives).
//!
//! Run: `bash fuzz/run.sh SECONDS vhost_messages` (seeds in fuzz/corpus/vhost_messages/, past failures in
//! fuzz/regressions/vhost_messages/, both replayed by `cargo test` in tests/tests/fuzz_replay.rs).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = appliance::fuzzing::vhost_messages(data);
});
