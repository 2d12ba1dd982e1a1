#!/usr/bin/env bash
# vhost-user-blk at the back end's ceiling: libblkio's virtio-blk-vhost-user front-end
# (bench/src/bin/blkio-load.rs, no guest) against the appliance and qemu-storage-daemon
# exporting the same raw file, and fio with io_uring on the file itself (the device,
# from the server's CPU and from the client's: where the disk's completion interrupt
# lands decides much of what it does for one core, and the better figure is the
# device's), in alternating rounds.
#
#   bash bench/blkio-vhost.sh [OUT_DIR]
#
# Environment: JOBS='randread 4k 32;read 64k 8' (default: 4k QD32 randread and randwrite,
# 64k QD8 read and write) ROUNDS=3 SECS=5 SIZE=2G QUEUES=1 WORK=/var/tmp SERVER_CPU=0 CLIENT_CPU=1
# APPLIANCE_CPUS=0 (e.g. 0,1 with QUEUES=2: one queue per reactor) LOAD_ARGS= (e.g. --wait:
# the front-end's threads block on their completion eventfds instead of polling, which a
# reactor sharing their CPU needs: on a 2-vCPU machine, two polling front-end threads
# on a reactor's CPU halve what it serves).
set -euo pipefail
OUT=${1:-bench/results/blkio-vhost-$(date -u +%Y%m%dT%H%M%SZ)}
ROUNDS=${ROUNDS:-3}; SECS=${SECS:-5}; SIZE=${SIZE:-2G}; QUEUES=${QUEUES:-1}
SERVER_CPU=${SERVER_CPU:-0}; CLIENT_CPU=${CLIENT_CPU:-1}; APPLIANCE_CPUS=${APPLIANCE_CPUS:-$SERVER_CPU}
LOAD=${LOAD:-target/release/blkio-load}; APPLIANCE=${APPLIANCE:-target/release/appliance}
WORK=$(mktemp -d "${WORK:-/var/tmp}/appliance-blkio.XXXXXX")
mkdir -p "$OUT"
trap 'pkill -f "$WORK" 2>/dev/null || true; rm -rf "$WORK"' EXIT
SOCK=$WORK/vhost.sock
head -c "$SIZE" /dev/urandom > "$WORK/img.raw"
sync; echo 3 > /proc/sys/vm/drop_caches || true
if [ -n "${JOBS:-}" ]; then IFS=';' read -r -a JOBS <<< "$JOBS"
else JOBS=("randread 4k 32" "randwrite 4k 32" "read 64k 8" "write 64k 8"); fi

start() {
  rm -f "$SOCK"
  case $1 in
    appliance)
      printf '[appliance]\ncores = [%s]\nidle = "%s"\n\n[[disk]]\nname = "d"\npath = "%s"\nformat = "raw"\ndriver = "io_uring"\n\n[disk.vhost_user_blk]\nsocket = "%s"\nqueues = %s\n' \
        "$APPLIANCE_CPUS" "${IDLE:-busy}" "$WORK/img.raw" "$SOCK" "$QUEUES" > "$WORK/a.toml"
      taskset -c "$APPLIANCE_CPUS" "$APPLIANCE" serve --config "$WORK/a.toml" > "$WORK/server.log" 2>&1 & ;;
    qsd)
      taskset -c "$SERVER_CPU" qemu-storage-daemon \
        --blockdev driver=file,node-name=f,filename="$WORK/img.raw",cache.direct=on,aio=io_uring \
        --export type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path="$SOCK",writable=on,num-queues="$QUEUES" \
        > "$WORK/server.log" 2>&1 & ;;
  esac
  PID=$!
  for _ in $(seq 100); do [ -S "$SOCK" ] && return 0; sleep 0.05; done
  echo "$1 did not listen" >&2; cat "$WORK/server.log" >&2; exit 1
}

one() { # target workload bs qd -> IOPS
  local t=$1 w=$2 bs=$3 qd=$4
  if [ "$t" = device ] || [ "$t" = device-client-core ]; then
    local cpu=$SERVER_CPU; [ "$t" = device ] || cpu=$CLIENT_CPU
    taskset -c "$cpu" fio --name=d --ioengine=io_uring --direct=1 --filename="$WORK/img.raw" \
      --rw="$w" --bs="$bs" --iodepth="$qd" --numjobs="$QUEUES" --group_reporting --runtime="$SECS" \
      --ramp_time=1 --time_based --output-format=json 2>/dev/null |
      python3 -c "import json,sys;x=json.load(sys.stdin)['jobs'][0];print(round(x['read']['iops']+x['write']['iops']))"
    return
  fi
  start "$t"
  taskset -c "$CLIENT_CPU" "$LOAD" --socket "$SOCK" --workload "$w" --bs "$bs" --qd "$qd" \
    --queues "$QUEUES" --time "$SECS" --json ${LOAD_ARGS:-} | python3 -c "import json,sys;print(json.load(sys.stdin)['iops'])"
  kill "$PID"; wait "$PID" 2>/dev/null || true
}

echo "round,job,target,iops" > "$OUT/runs.csv"
for r in $(seq "$ROUNDS"); do
  order=(appliance qsd device device-client-core)
  [ $((r % 2)) = 0 ] && order=(device-client-core device qsd appliance)
  for j in "${JOBS[@]}"; do
    read -r w bs qd <<< "$j"
    for t in "${order[@]}"; do
      v=$(one "$t" "$w" "$bs" "$qd")
      echo "$r,$w-$bs-qd$qd,$t,$v" | tee -a "$OUT/runs.csv"
    done
  done
done
python3 - "$OUT/runs.csv" "$QUEUES" "${LOAD_ARGS:-}" > "$OUT/table.md" <<'PY'
import csv, statistics as st, sys
rows = list(csv.DictReader(open(sys.argv[1])))
jobs = list(dict.fromkeys(r['job'] for r in rows))
rounds = sorted({r['round'] for r in rows})
v = {(r['round'], r['job'], r['target']): float(r['iops']) for r in rows}
for k in rounds:
    for j in jobs:
        d = [v[(k, j, t)] for t in ('device', 'device-client-core') if (k, j, t) in v]
        if d:
            v[(k, j, 'best')] = max(d)
def ratio(j, a, b):
    xs = [v[(k, j, a)] / v[(k, j, b)] for k in rounds if (k, j, a) in v and (k, j, b) in v and v[(k, j, b)] > 0]
    return f"{st.median(xs):.2f} ({min(xs):.2f}–{max(xs):.2f})" if xs else "–"
def med(j, t):
    xs = [v[(k, j, t)] for k in rounds if (k, j, t) in v]
    return f"{st.median(xs)/1000:.1f}k" if xs else "–"
print(f"queues: {sys.argv[2]}, front-end {'`' + sys.argv[3] + '`' if sys.argv[3] else 'polling'}, {len(rounds)} alternating rounds; medians, ratios are medians of per-round ratios (range)\n")
print("`device` is fio on the file from the server's CPU, `device-client-core` from the client's; appliance/device is against the better of the two, round by round.\n")
print("| job | appliance | qsd | device | device-client-core | appliance/device | appliance/qsd |")
print("|---|---:|---:|---:|---:|---:|---:|")
for j in jobs:
    print(f"| {j} | {med(j,'appliance')} | {med(j,'qsd')} | {med(j,'device')} | {med(j,'device-client-core')} | {ratio(j,'appliance','best')} | {ratio(j,'appliance','qsd')} |")
PY
cat "$OUT/table.md"
