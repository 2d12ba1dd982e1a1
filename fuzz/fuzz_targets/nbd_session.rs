//! Fuzzes `appliance::fuzzing::nbd_session` (see that module for what it drives).
//!
//! Run: `bash fuzz/run.sh SECONDS nbd_session` (seeds in fuzz/corpus/nbd_session/, past failures in
//! fuzz/regressions/nbd_session/, both replayed by `cargo test` in tests/tests/fuzz_replay.rs).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = appliance::fuzzing::nbd_session(data);
});
