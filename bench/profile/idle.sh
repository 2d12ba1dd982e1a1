#!/usr/bin/env bash
# The idle policy's price: the appliance with `idle = "adaptive"` against `idle = "busy"`
# on the same image and job, a fresh server per run, the two policies alternating (ABBA)
# so the disk's drift hits both; then what an idle `adaptive` reactor costs with no
# client and with one idle NBD connection.
#
#   bash bench/profile/idle.sh
#
# Environment: IMG (default: a raw image filled with data; .raw or .qcow2) JOBS="randread
# randwrite" BS=4k QD=32 SECS=5 ROUNDS=4 IDLE_SECS=10 SIZE=2G WORK=/var/tmp
# APPLIANCE=target/release/appliance. Server on CPU 0, fio's nbd engine on CPU 1.
# Prints each run (IOPS, server CPU in cores), the medians and adaptive/busy per job, and
# the idle CPU time; the aim (issue 13): adaptive within 5 % of busy at QD32, near-zero
# CPU when idle.
set -euo pipefail
JOBS=${JOBS:-"randread randwrite"}; BS=${BS:-4k}; QD=${QD:-32}; SECS=${SECS:-5}
ROUNDS=${ROUNDS:-4}; IDLE_SECS=${IDLE_SECS:-10}; SIZE=${SIZE:-2G}
APPLIANCE=${APPLIANCE:-target/release/appliance}
WORK=$(mktemp -d "${WORK:-/var/tmp}/appliance-idle.XXXXXX")
trap 'pkill -f "$WORK" 2>/dev/null || true; rm -rf "$WORK"' EXIT
if [ -z "${IMG:-}" ]; then
  IMG=$WORK/img.raw
  head -c "$SIZE" /dev/urandom > "$IMG"
  sync
fi
TICK=$(getconf CLK_TCK)

start() { # policy -> pid
  rm -f "$WORK/nbd.sock"
  cat > "$WORK/a.toml" <<EOF
[appliance]
cores = [0]
idle = "$1"

[nbd]
listen = ["unix:$WORK/nbd.sock"]

[[disk]]
name = "d"
path = "$IMG"
format = "${IMG##*.}"
driver = "io_uring"
EOF
  taskset -c 0 "$APPLIANCE" serve --config "$WORK/a.toml" > "$WORK/a.log" 2>&1 &
  local pid=$!
  for _ in $(seq 200); do [ -S "$WORK/nbd.sock" ] && break; sleep 0.05; done
  [ -S "$WORK/nbd.sock" ] || { echo "appliance did not start:" >&2; cat "$WORK/a.log" >&2; exit 1; }
  echo "$pid"
}
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# The server runs in a command substitution's subshell, not as this shell's child, so it
# is waited for by polling.
stop() {
  kill "$1" 2>/dev/null || return 0
  for _ in $(seq 100); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.05; done
  kill -9 "$1" 2>/dev/null || true
}

one() { # policy job -> "iops cores"
  local pid t0 t1 w0 w1
  pid=$(start "$1")
  [ -n "$pid" ] || return 1
  t0=$(ticks "$pid"); w0=$(date +%s.%N)
  taskset -c 1 fio --name=j --ioengine=nbd --uri="nbd+unix:///d?socket=$WORK/nbd.sock" \
    --rw="$2" --bs="$BS" --iodepth="$QD" --time_based --runtime="$SECS" --size="$SIZE" \
    --output-format=json > "$WORK/fio.json" 2> "$WORK/fio.err" \
    || { echo "fio ($1, $2) failed:" >&2; cat "$WORK/fio.err" >&2; stop "$pid"; return 1; }
  t1=$(ticks "$pid"); w1=$(date +%s.%N)
  stop "$pid"
  # IOPS over fio's run; cores over the wall time the CPU ticks were counted in (fio's
  # start and connection included).
  python3 - "$WORK/fio.json" "$t0" "$t1" "$TICK" "$w0" "$w1" <<'PY'
import json, sys
t = open(sys.argv[1]).read()
j = json.loads(t[t.index('{'):])['jobs'][0]
n = j['read']['total_ios'] + j['write']['total_ios']
secs = j['job_runtime'] / 1000.0
if n == 0 or secs == 0:
    sys.exit('fio completed no I/O')
wall = float(sys.argv[6]) - float(sys.argv[5])
print('%.0f %.2f' % (n / secs, (int(sys.argv[3]) - int(sys.argv[2])) / float(sys.argv[4]) / wall))
PY
}

echo "image $IMG, $BS QD$QD, $ROUNDS rounds of ${SECS} s per policy and job"
for job in $JOBS; do
  rows=()
  for r in $(seq "$ROUNDS"); do
    if (( r % 2 )); then b=$(one busy "$job"); a=$(one adaptive "$job")
    else a=$(one adaptive "$job"); b=$(one busy "$job"); fi
    echo "  $job round $r: busy $b | adaptive $a (IOPS cores)"
    rows+=("$b $a")
  done
  printf '%s\n' "${rows[@]}" | python3 -c '
import statistics as st, sys
job = sys.argv[1]
rows = [list(map(float, l.split())) for l in sys.stdin if l.strip()]
b = st.median(r[0] for r in rows); a = st.median(r[2] for r in rows)
ratios = [r[2] / r[0] for r in rows]
print("%s: busy %.1fk, adaptive %.1fk IOPS (medians); adaptive/busy %.3f (rounds %.2f-%.2f); cores %.2f / %.2f" % (
    job, b / 1e3, a / 1e3, a / b, min(ratios), max(ratios),
    st.median(r[1] for r in rows), st.median(r[3] for r in rows)))' "$job"
done

pid=$(start adaptive)
[ -n "$pid" ] || exit 1
sleep 1
t0=$(ticks "$pid"); sleep "$IDLE_SECS"; t1=$(ticks "$pid")
echo "adaptive, no client: $((t1 - t0)) CPU ticks (1/$TICK s) in ${IDLE_SECS} s"
# The distribution's interpreter: python3-libnbd installs there, not into a pyenv.
/usr/bin/python3 - "$WORK/nbd.sock" "$IDLE_SECS" "$pid" <<'PY'
import nbd, sys, time
h = nbd.NBD()
h.connect_unix(sys.argv[1])
def ticks():
    f = open('/proc/%s/stat' % sys.argv[3]).read().rsplit(')', 1)[1].split()
    return int(f[11]) + int(f[12])
t0 = ticks(); time.sleep(float(sys.argv[2])); t1 = ticks()
print('adaptive, one idle NBD connection: %d CPU ticks in %s s' % (t1 - t0, sys.argv[2]))
h.shutdown()
PY
stop "$pid"
