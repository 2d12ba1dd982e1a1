#!/usr/bin/env bash
# Runs the qcow2_image fuzz target for SECONDS (default 60) from the seed corpus and
# every input that once failed. Installs cargo-fuzz if needed; uses the nightly
# toolchain when installed, else RUSTC_BOOTSTRAP=1 on stable (cargo-fuzz needs -Z
# flags). New inputs go to a scratch corpus; a failing input is left in
# fuzz/artifacts/qcow2_image/ (copy it into fuzz/regressions/qcow2_image/ once fixed).
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-60}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
toolchain=()
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    toolchain=(+nightly)
else
    export RUSTC_BOOTSTRAP=1
fi
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
cp corpus/qcow2_image/* regressions/qcow2_image/* "$scratch"/
cargo "${toolchain[@]}" fuzz run qcow2_image "$scratch" -- \
    -max_total_time="$secs" -timeout=20 -rss_limit_mb=4096 -print_final_stats=1 2>&1 \
    | grep -v '^#[0-9]*\s*\(NEW\|REDUCE\|pulse\)' | tail -n 60
exit "${PIPESTATUS[0]}"
