#!/usr/bin/env bash
# Runs fuzz targets for SECONDS each (default 60) from their seed corpus and every
# input that once failed:  bash fuzz/run.sh [SECONDS] [TARGET...]
# Targets (default: all): qcow2_image nbd_session vhost_messages virtqueue_chain config.
# For a campaign of hours: bash fuzz/run.sh 14400 (four hours per target), or one
# target per core in parallel: bash fuzz/run.sh 14400 nbd_session & bash fuzz/run.sh 14400 config
#
# Installs cargo-fuzz if needed; uses the nightly toolchain when installed, else
# RUSTC_BOOTSTRAP=1 on stable (cargo-fuzz needs -Z flags). New inputs go to a scratch
# corpus (FUZZ_KEEP_CORPUS=dir keeps it); a failing input is left in
# fuzz/artifacts/TARGET/ (once fixed, copy it into fuzz/regressions/TARGET/, where
# `cargo test` replays it). Prints each target's final libFuzzer stats and exits
# non-zero if any target found a crash, leak or hang.
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(qcow2_image nbd_session vhost_messages virtqueue_chain config)
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
toolchain=()
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    toolchain=(+nightly)
else
    export RUSTC_BOOTSTRAP=1
fi
status=0
for t in "${targets[@]}"; do
    scratch=${FUZZ_KEEP_CORPUS:+$FUZZ_KEEP_CORPUS/$t}
    if [ -z "$scratch" ]; then
        scratch=$(mktemp -d)
    fi
    mkdir -p "$scratch" "regressions/$t"
    cp corpus/"$t"/* "$scratch"/ 2>/dev/null || true
    cp regressions/"$t"/* "$scratch"/ 2>/dev/null || true
    echo "== $t: ${secs}s"
    set +e
    cargo "${toolchain[@]}" fuzz run "$t" "$scratch" -- \
        -max_total_time="$secs" -timeout=20 -rss_limit_mb=4096 -print_final_stats=1 2>&1 \
        | grep -v '^#[0-9]*\s*\(NEW\|REDUCE\|pulse\)' | tail -n 40
    rc=${PIPESTATUS[0]}
    set -e
    [ "$rc" -eq 0 ] || status=1
    [ -n "${FUZZ_KEEP_CORPUS:-}" ] || rm -rf "$scratch"
done
exit "$status"
