#!/usr/bin/env bash
# The cost of LUKS encryption: fio's nbd engine against the appliance and
# qemu-storage-daemon serving the same qcow2 image, plain and LUKS-encrypted
# (aes-256-xts-plain64, made by qemu-img convert from the same random data), in
# alternating rounds. Prints the median IOPS per job and target, the round spread, and
# the ratios appliance/qsd and encrypted/plain.
#
#   bash bench/luks.sh [OUT_DIR]
#
# Environment: JOBS='randread 4k 32;randwrite 4k 32;read 64k 8' ROUNDS=3 SECS=5 SIZE=1G
# WORK=/var/tmp SERVER_CPU=0 CLIENT_CPU=1.
set -euo pipefail
. "$(dirname "$0")/nbd-lib.sh"
OUT=${1:-bench/results/luks-$(date -u +%Y%m%dT%H%M%SZ)}
ROUNDS=${ROUNDS:-3}; SECS=${SECS:-5}; SIZE=${SIZE:-1G}
SERVER_CPU=${SERVER_CPU:-0}; CLIENT_CPU=${CLIENT_CPU:-1}
APPLIANCE=${APPLIANCE:-target/release/appliance}
WORK=$(mktemp -d "${WORK:-/var/tmp}/appliance-luks.XXXXXX")
mkdir -p "$OUT"
trap 'pkill -f "$WORK" 2>/dev/null || true; rm -rf "$WORK"' EXIT
SOCK=$WORK/nbd.sock
KEY=benchkey
printf '%s' "$KEY" > "$WORK/key"
SECRET="secret,id=s0,data=$KEY"
head -c "$SIZE" /dev/urandom > "$WORK/src.raw"
qemu-img convert -O qcow2 "$WORK/src.raw" "$WORK/plain.qcow2"
qemu-img convert --object "$SECRET" -O qcow2 \
  -o encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=100 "$WORK/src.raw" "$WORK/luks.qcow2"
rm -f "$WORK/src.raw"
if [ -n "${JOBS:-}" ]; then IFS=';' read -r -a JOBS <<< "$JOBS"
else JOBS=("randread 4k 32" "randwrite 4k 32" "read 64k 8"); fi

start() { # server image
  rm -f "$SOCK"
  case $1 in
    appliance)
      local enc=""
      [ "$2" = luks ] && enc=$(printf '[disk.encryption]\nkey_file = "%s"\n' "$WORK/key")
      start_appliance "$WORK/a.toml" "$WORK/$2.qcow2" "$enc" ;;
    qsd)
      local enc=""
      [ "$2" = luks ] && enc=",encrypt.format=luks,encrypt.key-secret=s0"
      taskset -c "$SERVER_CPU" qemu-storage-daemon --object "$SECRET" \
        --blockdev driver=file,node-name=f,filename="$WORK/$2.qcow2",cache.direct=on,aio=io_uring \
        --blockdev "driver=qcow2,node-name=q,file=f$enc" \
        --nbd-server addr.type=unix,addr.path="$SOCK" \
        --export type=nbd,id=e,node-name=q,name=d,writable=on \
        > "$WORK/server.log" 2>&1 &
      PID=$! ;;
  esac
  wait_export "$1"
}

one() { # server image workload bs qd -> IOPS
  start "$1" "$2"
  taskset -c "$CLIENT_CPU" fio --name=j --ioengine=nbd --uri="nbd+unix:///d?socket=$SOCK" \
    --rw="$3" --bs="$4" --iodepth="$5" --runtime="$SECS" --ramp_time=1 --time_based \
    --output-format=json 2>/dev/null |
    python3 -c "import json,sys;s=sys.stdin.read();x=json.loads(s[s.index('{'):])['jobs'][0];print(round(x['read']['iops']+x['write']['iops']))"
  kill "$PID"; wait "$PID" 2>/dev/null || true
}

echo "round,job,target,iops" > "$OUT/runs.csv"
for r in $(seq "$ROUNDS"); do
  for j in "${JOBS[@]}"; do
    read -r w bs qd <<< "$j"
    # Alternate the order between rounds.
    targets=("appliance plain" "qsd plain" "appliance luks" "qsd luks")
    [ $((r % 2)) -eq 0 ] && targets=("qsd luks" "appliance luks" "qsd plain" "appliance plain")
    for t in "${targets[@]}"; do
      read -r s img <<< "$t"
      echo "$r,$w $bs QD$qd,$s-$img,$(one "$s" "$img" "$w" "$bs" "$qd")" >> "$OUT/runs.csv"
    done
  done
done
python3 - "$OUT/runs.csv" <<'EOF' | tee "$OUT/summary.txt"
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
jobs = list(dict.fromkeys(r["job"] for r in rows))
med = {}
for j in jobs:
    for t in ["appliance-plain", "qsd-plain", "appliance-luks", "qsd-luks"]:
        v = [int(r["iops"]) for r in rows if r["job"] == j and r["target"] == t]
        med[j, t] = statistics.median(v)
        spread = (max(v) - min(v)) / statistics.median(v) * 100
        print(f"{j:18} {t:16} median {med[j, t]:>8.0f} IOPS  spread {spread:4.0f}%  rounds {v}")
    a, q = med[j, "appliance-luks"], med[j, "qsd-luks"]
    print(f"{j:18} luks appliance/qsd {a / q:.2f}x; luks/plain appliance "
          f"{a / med[j, 'appliance-plain']:.2f}, qsd {q / med[j, 'qsd-plain']:.2f}")
EOF
