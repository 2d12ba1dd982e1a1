#!/usr/bin/env bash
# Two appliance set-ups served at once, compared in short runs that alternate between
# them: the pairs are seconds apart, so a shared machine's swings (on the benchmark
# machine the reactor's cost per 64 KiB write changes threefold from one 3 s run to the
# next; docs/perf/profile.md 2026-12-07 07:30) hit both arms of a pair alike, which
# separate processes started minutes apart (the harness's rounds) cannot promise.
#
#   bash bench/profile/pair.sh
#
# Environment:
#   IMG_A, IMG_B   images (format from the suffix, .raw or .qcow2); default: a raw image
#                  filled with data and a qcow2 converted from it, so the default compares
#                  qcow2 against raw
#   APP_A, APP_B   appliance binaries (default target/release/appliance)
#   ENV_A, ENV_B   extra environment for each server (e.g. RUST_LOG=warn)
#   RW=write BS=64k QD=8 SECS=3 PAIRS=12 SIZE=2G WORK=/var/tmp
# Both servers run the `adaptive` idle policy on CPU 0 (the one not being measured sleeps),
# fio's nbd engine on CPU 1; each pair runs A then B or B then A in turn. Prints every
# pair and the medians of B/A (IOPS, and the reactor's busy time per request).
set -euo pipefail
RW=${RW:-write}; BS=${BS:-64k}; QD=${QD:-8}; SECS=${SECS:-3}; PAIRS=${PAIRS:-12}; SIZE=${SIZE:-2G}
WORK=$(mktemp -d "${WORK:-/var/tmp}/appliance-pair.XXXXXX")
APP_A=${APP_A:-target/release/appliance}; APP_B=${APP_B:-$APP_A}
trap 'pkill -f "$WORK" 2>/dev/null || true; rm -rf "$WORK"' EXIT

if [ -z "${IMG_A:-}" ] || [ -z "${IMG_B:-}" ]; then
  head -c "$SIZE" /dev/urandom > "$WORK/img.raw"
  qemu-img convert -f raw -O qcow2 "$WORK/img.raw" "$WORK/img.qcow2"
  sync
  IMG_A=${IMG_A:-$WORK/img.raw}; IMG_B=${IMG_B:-$WORK/img.qcow2}
fi

start() { # arm binary image env
  cat > "$WORK/$1.toml" <<EOF
[appliance]
cores = [0]
idle = "adaptive"

[nbd]
listen = ["unix:$WORK/$1.sock"]

[control]
socket = "$WORK/$1.ctl"

[[disk]]
name = "d"
path = "$3"
format = "${3##*.}"
driver = "io_uring"
EOF
  # shellcheck disable=SC2086
  env ${4:-} taskset -c 0 "$2" serve --config "$WORK/$1.toml" > "$WORK/$1.log" 2>&1 &
}
start a "$APP_A" "$IMG_A" "${ENV_A:-}"
start b "$APP_B" "$IMG_B" "${ENV_B:-}"
for _ in $(seq 200); do [ -S "$WORK/a.sock" ] && [ -S "$WORK/b.sock" ] && break; sleep 0.05; done
for arm in a b; do
  [ -S "$WORK/$arm.sock" ] || { echo "server $arm did not start:" >&2; cat "$WORK/$arm.log" >&2; exit 1; }
done

busy() { "$APP_A" ctl --socket "$WORK/$1.ctl" stats | python3 -c 'import json,sys; print(json.load(sys.stdin)["reactors"][0]["busy_ns"])'; }
one() { # arm -> "iops busy_us_per_io"
  local b0 b1
  b0=$(busy "$1")
  taskset -c 1 fio --name=j --ioengine=nbd --uri="nbd+unix:///d?socket=$WORK/$1.sock" --rw="$RW" \
    --bs="$BS" --iodepth="$QD" --time_based --runtime="$SECS" --size="$SIZE" \
    --output-format=json > "$WORK/fio.json" 2> "$WORK/fio.err" \
    || { echo "fio against server $1 failed:" >&2; cat "$WORK/fio.err" >&2; return 1; }
  b1=$(busy "$1")
  python3 - "$WORK/fio.json" "$b0" "$b1" "$SECS" <<'PY'
import json, sys
t = open(sys.argv[1]).read()
j = json.loads(t[t.index('{'):])['jobs'][0]
n = j['read']['total_ios'] + j['write']['total_ios']
if n == 0:
    sys.exit('fio completed no I/O')
print('%.0f %.2f' % (n / float(sys.argv[4]), (int(sys.argv[3]) - int(sys.argv[2])) / 1e3 / n))
PY
}

echo "A: $IMG_A ($APP_A ${ENV_A:-})"
echo "B: $IMG_B ($APP_B ${ENV_B:-})"
echo "$RW $BS QD$QD, $PAIRS pairs of ${SECS} s runs"
rows=()
for p in $(seq "$PAIRS"); do
  if (( p % 2 )); then x=$(one a); y=$(one b); else y=$(one b); x=$(one a); fi
  rows+=("$x $y")
done
printf '%s\n' "${rows[@]}" | python3 -c '
import statistics as st, sys
rows = [list(map(float, l.split())) for l in sys.stdin if l.strip()]
print("pair  A IOPS  A busy us/IO   B IOPS  B busy us/IO   B/A IOPS  B/A busy")
for i, (ai, ab, bi, bb) in enumerate(rows, 1):
    print("%4d %7.0f %13.2f %8.0f %13.2f %10.2f %9.2f" % (i, ai, ab, bi, bb, bi / ai, bb / ab))
r = [b[2] / b[0] for b in rows]; c = [b[3] / b[1] for b in rows]
print("median B/A: IOPS %.3f (%.2f-%.2f), busy per request %.3f (%.2f-%.2f)" % (
    st.median(r), min(r), max(r), st.median(c), min(c), max(c)))'
