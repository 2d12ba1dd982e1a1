#!/usr/bin/env bash
# The first write into each cluster of a backed image, with and without extended L2
# entries (subclusters): fio's nbd engine writes 4 KiB at the start of every 2 MiB
# cluster of a fresh qcow2 overlay (2 MiB clusters) over a raw backing file full of
# random data, once per cluster, against the appliance and qemu-storage-daemon, in
# alternating rounds. Without subclusters each write copies its whole cluster from the
# backing file (2 MiB); with them, its subcluster (64 KiB). Prints the median IOPS and
# mean latency per job and target, the round spread, the bytes each overlay allocated
# per write, and the ratios subclusters/whole clusters and appliance/qsd. Both servers
# open the overlay and the backing file with O_DIRECT.
#
#   bash bench/extl2.sh [OUT_DIR]
#
# Environment: JOBS='1;16' (queue depths) ROUNDS=3 SIZE=2G OFFSET=0 (where in each
# cluster the write lands, e.g. 1M: mid-cluster, copying both ends) WORK=/var/tmp
# SERVER_CPU=0 CLIENT_CPU=1.
set -euo pipefail
. "$(dirname "$0")/nbd-lib.sh"
OUT=${1:-bench/results/extl2-$(date -u +%Y%m%dT%H%M%SZ)}
ROUNDS=${ROUNDS:-3}; SIZE=${SIZE:-2G}; OFFSET=${OFFSET:-0}
SERVER_CPU=${SERVER_CPU:-0}; CLIENT_CPU=${CLIENT_CPU:-1}
APPLIANCE=${APPLIANCE:-target/release/appliance}
WORK=$(mktemp -d "${WORK:-/var/tmp}/appliance-extl2.XXXXXX")
mkdir -p "$OUT"
trap 'pkill -f "$WORK" 2>/dev/null || true; rm -rf "$WORK"' EXIT
SOCK=$WORK/nbd.sock
head -c "$SIZE" /dev/urandom > "$WORK/base.raw"
if [ -n "${JOBS:-}" ]; then IFS=';' read -r -a JOBS <<< "$JOBS"; else JOBS=(1 16); fi

overlay() { # extl2(on|off) -> fresh overlay
  rm -f "$WORK/top.qcow2"
  qemu-img create -q -f qcow2 -o "cluster_size=2M,extended_l2=$1" \
    -b "$WORK/base.raw" -F raw "$WORK/top.qcow2" "$SIZE"
}

start() { # server
  rm -f "$SOCK"
  case $1 in
    appliance)
      start_appliance "$WORK/a.toml" "$WORK/top.qcow2" ;;
    qsd)
      taskset -c "$SERVER_CPU" qemu-storage-daemon \
        --blockdev driver=file,node-name=f,filename="$WORK/top.qcow2",cache.direct=on,aio=io_uring \
        --blockdev driver=file,node-name=bf,filename="$WORK/base.raw",cache.direct=on,aio=io_uring,read-only=on \
        --blockdev driver=raw,node-name=b,file=bf,read-only=on \
        --blockdev driver=qcow2,node-name=q,file=f,backing=b \
        --nbd-server addr.type=unix,addr.path="$SOCK" \
        --export type=nbd,id=e,node-name=q,name=d,writable=on \
        > "$WORK/server.log" 2>&1 &
      PID=$! ;;
  esac
  wait_export "$1"
}

one() { # server extl2 qd -> "IOPS mean-latency-us allocated-bytes-per-write"
  overlay "$2"
  local before; before=$(du -B1 "$WORK/top.qcow2" | cut -f1)
  start "$1"
  local r bytes off
  bytes=$(numfmt --from=iec "$SIZE"); off=$(numfmt --from=iec "$OFFSET")
  r=$(taskset -c "$CLIENT_CPU" fio --name=j --ioengine=nbd --uri="nbd+unix:///d?socket=$SOCK" \
    --rw=write --bs=4k --iodepth="$3" --zonemode=strided --zonesize=4k --zonerange=2M \
    --offset="$off" --size=$((bytes - off)) --io_size=$(( (bytes - off) / 2097152 * 4096 )) \
    --output-format=json 2>/dev/null |
    python3 -c "import json,sys;s=sys.stdin.read();x=json.loads(s[s.index('{'):])['jobs'][0]['write'];print(round(x['iops']), round(x['clat_ns']['mean']/1000), x['total_ios'])")
  kill "$PID"; wait "$PID" 2>/dev/null || true
  local after; after=$(du -B1 "$WORK/top.qcow2" | cut -f1)
  read -r iops lat n <<< "$r"
  echo "$iops,$lat,$(( (after - before) / n ))"
}

echo "round,qd,target,iops,lat_us,alloc_per_write" > "$OUT/runs.csv"
for r in $(seq "$ROUNDS"); do
  for qd in "${JOBS[@]}"; do
    targets=("appliance on" "qsd on" "appliance off" "qsd off")
    [ $((r % 2)) -eq 0 ] && targets=("qsd off" "appliance off" "qsd on" "appliance on")
    for t in "${targets[@]}"; do
      read -r s e <<< "$t"
      echo "$r,$qd,$s-$e,$(one "$s" "$e" "$qd")" >> "$OUT/runs.csv"
    done
  done
done
python3 - "$OUT/runs.csv" <<'EOF' | tee "$OUT/summary.txt"
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
med = {}
for qd in dict.fromkeys(r["qd"] for r in rows):
    for t in ["appliance-on", "qsd-on", "appliance-off", "qsd-off"]:
        sel = [r for r in rows if r["qd"] == qd and r["target"] == t]
        v = [int(r["iops"]) for r in sel]
        lat = statistics.median(int(r["lat_us"]) for r in sel)
        alloc = statistics.median(int(r["alloc_per_write"]) for r in sel)
        med[qd, t] = statistics.median(v)
        spread = (max(v) - min(v)) / med[qd, t] * 100
        print(f"QD{qd:<3} {t:14} median {med[qd, t]:>7.0f} IOPS  {lat:>6.0f} us  "
              f"{alloc / 1024:>6.0f} KiB allocated/write  spread {spread:3.0f}%  rounds {v}")
    m = lambda t: med[qd, t]
    print(f"QD{qd:<3} subclusters/whole: appliance {m('appliance-on') / m('appliance-off'):.1f}x, "
          f"qsd {m('qsd-on') / m('qsd-off'):.1f}x; appliance/qsd: with subclusters "
          f"{m('appliance-on') / m('qsd-on'):.2f}x, without {m('appliance-off') / m('qsd-off'):.2f}x")
EOF
