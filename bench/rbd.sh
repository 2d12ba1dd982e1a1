#!/usr/bin/env bash
# RBD over NBD: the appliance (driver rbd) against qemu-storage-daemon (its rbd driver)
# serving the same RBD image of the same single-node cluster (tests/ceph/cluster.sh:
# one monitor, one OSD on BlueStore in a sparse file), driven by fio's nbd engine, in
# alternating rounds. Both servers use librbd with its defaults (rbd_cache on, in
# writethrough until the first flush), one server CPU each, and sleep when idle
# (IDLE=adaptive: the cluster's daemons share the machine's cores).
#
#   bash bench/rbd.sh [OUT_DIR]
#
# Environment: JOBS='randread 4k 32;read 64k 8' (default: 4k QD32 randread and
# randwrite, 64k QD8 read and write) ROUNDS=3 SECS=10 SIZE=1G WORK=/var/tmp
# SERVER_CPU=0 CLIENT_CPU=1 IDLE=adaptive.
set -euo pipefail
OUT=${1:-bench/results/rbd-$(date -u +%Y%m%dT%H%M%SZ)}
ROUNDS=${ROUNDS:-3}; SECS=${SECS:-10}; SIZE=${SIZE:-1G}
SERVER_CPU=${SERVER_CPU:-0}; CLIENT_CPU=${CLIENT_CPU:-1}
APPLIANCE=${APPLIANCE:-target/release/appliance}
WORK=$(mktemp -d "${WORK:-/var/tmp}/appliance-rbd.XXXXXX")
mkdir -p "$OUT"
CLUSTER=$WORK/cluster
trap 'pkill -f "$WORK/(a.toml|qsd)" 2>/dev/null || true; bash tests/ceph/cluster.sh stop "$CLUSTER"; rm -rf "$WORK"' EXIT
SOCK=$WORK/nbd.sock
if [ -n "${JOBS:-}" ]; then IFS=';' read -r -a JOBS <<< "$JOBS"
else JOBS=("randread 4k 32" "randwrite 4k 32" "read 64k 8" "write 64k 8"); fi

STORE_BYTES=$((8 << 30)) bash tests/ceph/cluster.sh start "$CLUSTER" "${MON_PORT:-16789}"
CONF=$CLUSTER/ceph.conf
rbd -c "$CONF" create --size "$SIZE" rbd/bench
# Every object written once, so reads hit data.
rbd -c "$CONF" bench --io-type write --io-size 4M --io-total "$SIZE" --io-pattern seq rbd/bench > /dev/null

start() {
  rm -f "$SOCK"
  case $1 in
    appliance)
      printf '[appliance]\ncores = [%s]\nidle = "%s"\n\n[nbd]\nlisten = ["unix:%s"]\n\n[[disk]]\nname = "d"\ndriver = "rbd"\npath = "rbd:rbd/bench"\n[disk.rbd]\nconf = "%s"\n' \
        "$SERVER_CPU" "${IDLE:-adaptive}" "$SOCK" "$CONF" > "$WORK/a.toml"
      taskset -c "$SERVER_CPU" "$APPLIANCE" serve --config "$WORK/a.toml" > "$WORK/server.log" 2>&1 & ;;
    qsd)
      taskset -c "$SERVER_CPU" qemu-storage-daemon \
        --blockdev driver=rbd,node-name=d,pool=rbd,image=bench,conf="$CONF" \
        --nbd-server addr.type=unix,addr.path="$SOCK" \
        --export type=nbd,id=e,node-name=d,name=d,writable=on \
        --pidfile "$WORK/qsd.pid" > "$WORK/server.log" 2>&1 & ;;
  esac
  PID=$!
  for _ in $(seq 200); do
    nbdinfo --size "nbd+unix:///d?socket=$SOCK" > /dev/null 2>&1 && return 0; sleep 0.05
  done
  echo "$1 did not listen" >&2; cat "$WORK/server.log" >&2; exit 1
}

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

one() { # target workload bs qd -> "IOPS CPU-us-per-IO"
  local t=$1 w=$2 bs=$3 qd=$4 c0 c1 iops
  start "$t"
  c0=$(cpu_ticks "$PID")
  iops=$(taskset -c "$CLIENT_CPU" fio --name=t --ioengine=nbd --uri="nbd+unix:///d?socket=$SOCK" \
    --rw="$w" --bs="$bs" --iodepth="$qd" --size="$SIZE" --runtime="$SECS" --time_based \
    --output-format=json 2>/dev/null | sed -n '/^{/,$p' |
    python3 -c "import json,sys;x=json.load(sys.stdin)['jobs'][0];print(round(x['read']['iops']+x['write']['iops']))")
  c1=$(cpu_ticks "$PID")
  kill "$PID"; wait "$PID" 2>/dev/null || true
  python3 -c "import os;t=os.sysconf('SC_CLK_TCK');print($iops, round(($c1-$c0)/t*1e6/max(1,$iops*$SECS),1))"
}

echo "round,job,target,iops,cpu_us_per_io" > "$OUT/runs.csv"
for r in $(seq "$ROUNDS"); do
  order=(appliance qsd); [ $((r % 2)) = 0 ] && order=(qsd appliance)
  for j in "${JOBS[@]}"; do
    read -r w bs qd <<< "$j"
    for t in "${order[@]}"; do
      read -r v c <<< "$(one "$t" "$w" "$bs" "$qd")"
      echo "$r,$w-$bs-qd$qd,$t,$v,$c" | tee -a "$OUT/runs.csv"
    done
  done
done
python3 - "$OUT/runs.csv" > "$OUT/table.md" <<'PY'
import csv, statistics as st, sys
rows = list(csv.DictReader(open(sys.argv[1])))
jobs = list(dict.fromkeys(r['job'] for r in rows))
rounds = sorted({r['round'] for r in rows})
v = {(r['round'], r['job'], r['target']): float(r['iops']) for r in rows}
c = {(r['round'], r['job'], r['target']): float(r['cpu_us_per_io']) for r in rows}
def med(d, j, t, k=1000, f="{:.1f}k"):
    xs = [d[(r, j, t)] for r in rounds if (r, j, t) in d]
    return f.format(st.median(xs) / k) + f" ({min(xs)/k:.1f}–{max(xs)/k:.1f})" if xs else "–"
def ratio(j):
    xs = [v[(r, j, 'appliance')] / v[(r, j, 'qsd')] for r in rounds if v.get((r, j, 'qsd'))]
    return f"{st.median(xs):.2f} ({min(xs):.2f}–{max(xs):.2f})" if xs else "–"
print(f"{len(rounds)} alternating rounds; medians (range); ratio: median of per-round ratios\n")
print("| job | appliance IOPS | qsd IOPS | appliance/qsd | appliance CPU µs/IO | qsd CPU µs/IO |")
print("|---|---:|---:|---:|---:|---:|")
for j in jobs:
    print(f"| {j} | {med(v,j,'appliance')} | {med(v,j,'qsd')} | {ratio(j)} | {med(c,j,'appliance',1,'{:.1f}')} | {med(c,j,'qsd',1,'{:.1f}')} |")
PY
cat "$OUT/table.md"
