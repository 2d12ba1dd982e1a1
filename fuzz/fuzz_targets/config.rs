//! Fuzzes `appliance::fuzzing::config` (see that module for what it drives).
//!
//! Run: `bash fuzz/run.sh SECONDS config` (seeds in fuzz/corpus/config/, past failures in
//! fuzz/regressions/config/, both replayed by `cargo test` in tests/tests/fuzz_replay.rs).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = appliance::fuzzing::config_text(data);
});
