#!/usr/bin/env bash
# Per-request server cost over NBD: IOPS, server CPU per I/O, the appliance reactor's
# busy time per I/O (its ticks that did work, without the polling between them),
# syscalls per I/O and a perf profile, for the appliance and qemu-storage-daemon on the
# same job.
#
#   bash bench/profile/run.sh [OUT_DIR]
#
# Environment: TARGETS="null raw qcow2" SERVERS="appliance qsd device" JOBS="randread randwrite"
# (appliance-epoll and appliance-io_uring are the appliance with that nbd.socket_io,
# appliance-multishot the appliance with nbd.multishot_receive = "on")
# QD=32 SECS=6 IDLE=adaptive|busy SIZE=2G WORK=/var/tmp PERF=1 APPLIANCE=target/release/appliance
# PERF_CALLGRAPH="--call-graph dwarf,16384" (perf's call-graph option, default -g)
# Server on CPU 0, fio (nbd engine) on CPU 1. Images: raw filled with data, qcow2 converted
# from it (every cluster allocated), both dropped from the page cache.
set -euo pipefail
OUT=${1:-bench/results/profile-$(date -u +%Y%m%dT%H%M%SZ)}
TARGETS=${TARGETS:-"null raw qcow2"}
SERVERS=${SERVERS:-"appliance qsd"}
JOBS=${JOBS:-"randread randwrite"}
QD=${QD:-32}; SECS=${SECS:-6}; IDLE=${IDLE:-adaptive}; SIZE=${SIZE:-2G}
WORK=$(mktemp -d "${WORK:-/var/tmp}/appliance-profile.XXXXXX")
APPLIANCE=${APPLIANCE:-target/release/appliance}
PERF=${PERF:-1}
mkdir -p "$OUT"
trap 'pkill -f "$WORK" 2>/dev/null || true; rm -rf "$WORK"' EXIT
SOCK=$WORK/nbd.sock

if [[ " $TARGETS " == *" raw "* || " $TARGETS " == *" qcow2 "* ]]; then
  head -c "$SIZE" /dev/urandom > "$WORK/img.raw" 2>/dev/null || true
  qemu-img convert -f raw -O qcow2 "$WORK/img.raw" "$WORK/img.qcow2"
  sync; echo 3 > /proc/sys/vm/drop_caches || true
fi

start() { # server target
  rm -f "$SOCK" "$WORK/ctl.sock"
  case $1 in
    appliance*)
      local disk sio=auto ms=off
      case $1 in
        appliance) ;;
        appliance-multishot) ms=on ;;
        *) sio=${1#appliance-} ;;
      esac
      case $2 in
        null) disk="driver = \"null\"
size = \"$SIZE\"" ;;
        *) disk="path = \"$WORK/img.$2\"
format = \"$2\"
driver = \"io_uring\"" ;;
      esac
      printf '[appliance]\ncores = [0]\nidle = "%s"\n\n[nbd]\nlisten = ["unix:%s"]\nsocket_io = "%s"\nmultishot_receive = "%s"\n\n[control]\nsocket = "%s"\n\n[[disk]]\nname = "d"\n%s\n' \
        "$IDLE" "$SOCK" "$sio" "$ms" "$WORK/ctl.sock" "$disk" > "$WORK/a.toml"
      taskset -c 0 "$APPLIANCE" serve --config "$WORK/a.toml" > "$WORK/server.log" 2>&1 & ;;
    qsd)
      local bd
      case $2 in
        null) bd="--blockdev driver=null-co,node-name=n,size=$(numfmt --from=iec "$SIZE"),read-zeroes=off" ;;
        raw) bd="--blockdev driver=file,node-name=n,filename=$WORK/img.raw,cache.direct=on,aio=io_uring" ;;
        qcow2) bd="--blockdev driver=file,node-name=f,filename=$WORK/img.qcow2,cache.direct=on,aio=io_uring --blockdev driver=qcow2,node-name=n,file=f" ;;
      esac
      # shellcheck disable=SC2086
      taskset -c 0 qemu-storage-daemon $bd --nbd-server addr.type=unix,addr.path="$SOCK" \
        --export type=nbd,id=e,node-name=n,name=d,writable=on > "$WORK/server.log" 2>&1 & ;;
  esac
  PID=$!
  for _ in $(seq 100); do [ -S "$SOCK" ] && return 0; sleep 0.05; done
  echo "server $1 did not listen" >&2; cat "$WORK/server.log" >&2; exit 1
}

cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
# The appliance reactor's time in ticks that did work, in ns (0 for other servers).
busy_ns() {
  [ -S "$WORK/ctl.sock" ] || { echo 0; return; }
  "$APPLIANCE" ctl --socket "$WORK/ctl.sock" stats 2>/dev/null \
    | python3 -c 'import json,sys; print(sum(r["busy_ns"] for r in json.load(sys.stdin)["reactors"]))' 2>/dev/null || echo 0
}

printf '| server | disk | job | IOPS | server CPU (cores) | CPU µs/IO | busy µs/IO | syscalls/IO | top symbols |\n|---|---|---|---:|---:|---:|---:|---:|---|\n' > "$OUT/table.md"
for t in $TARGETS; do for j in $JOBS; do for s in $SERVERS; do
  if [ "$s" = device ]; then
    # The device limit: fio with io_uring straight on the raw file, on the server core.
    [ "$t" = raw ] || continue
    taskset -c 0 fio --name=p --ioengine=io_uring --direct=1 --filename="$WORK/img.raw" --rw="$j" \
      --bs=4k --iodepth="$QD" --runtime="$SECS" --ramp_time=1 --time_based --output-format=json \
      > "$OUT/device-raw-$j.fio.json" 2>/dev/null
    python3 - "$OUT/device-raw-$j.fio.json" "$j" >> "$OUT/table.md" <<'PY'
import json, sys
x = json.load(open(sys.argv[1]))['jobs'][0]
print(f"| device | raw file | {sys.argv[2]} | {(x['read']['iops'] + x['write']['iops'])/1000:.1f}k | – | – | – | – | fio io_uring, no server |")
PY
    tail -1 "$OUT/table.md"; continue
  fi
  start "$s" "$t"
  name="$s-$t-$j"
  taskset -c 1 fio --name=p --ioengine=nbd --uri="nbd+unix:///d?socket=$SOCK" --rw="$j" --bs=4k \
    --iodepth="$QD" --runtime=$((SECS + 1)) --ramp_time=1 --time_based --output-format=json \
    > "$OUT/$name.fio.json" 2>/dev/null &
  FIO=$!
  sleep 1.5
  c0=$(cpu_ticks "$PID"); b0=$(busy_ns); t0=$(date +%s.%N)
  perf stat -x, -e 'raw_syscalls:sys_enter' -p "$PID" -o "$OUT/$name.stat" -- sleep 2 >/dev/null 2>&1 || true
  if [ "$PERF" = 1 ]; then
    perf record -q -F 2999 ${PERF_CALLGRAPH:--g} -p "$PID" -o "$OUT/$name.perf" -- sleep 2 >/dev/null 2>&1 || true
  fi
  c1=$(cpu_ticks "$PID"); b1=$(busy_ns); t1=$(date +%s.%N)
  wait "$FIO"
  kill "$PID"; wait "$PID" 2>/dev/null || true
  hz=$(getconf CLK_TCK)
  python3 - "$OUT" "$name" "$s" "$t" "$j" "$c0" "$c1" "$t0" "$t1" "$hz" "$PERF" "$b0" "$b1" >> "$OUT/table.md" <<'PY'
import json, subprocess, sys
out, name, s, t, j, c0, c1, t0, t1, hz, perf, b0, b1 = sys.argv[1:]
txt = open(f"{out}/{name}.fio.json").read(); x = json.loads(txt[txt.index('{'):])['jobs'][0]
iops = x['read']['iops'] + x['write']['iops']
cores = (int(c1) - int(c0)) / int(hz) / (float(t1) - float(t0))
sysc = 0
for line in open(f"{out}/{name}.stat"):
    f = line.split(',')
    if len(f) > 2 and 'sys_enter' in f[2]:
        sysc = float(f[0]) / 2.0
top = ''
if perf == '1':
    r = subprocess.run(['perf', 'report', '-i', f'{out}/{name}.perf', '--no-children', '--sort', 'sym',
                        '--stdio', '-g', 'none', '--percent-limit', '4'], capture_output=True, text=True).stdout
    syms = [l.split(None, 2) for l in r.splitlines() if l.strip().endswith(tuple('abcdefghijklmnopqrstuvwxyz_0123456789>')) and '%' in l and not l.startswith('#')]
    top = '; '.join(f"{p[0]} {p[2].replace('[k] ', '').replace('[.] ', '')[:40]}" for p in syms[:4] if len(p) == 3)
busy = (int(b1) - int(b0)) / 1e9 / (float(t1) - float(t0))
work = f"{busy*1e6/iops:.2f}" if busy > 0 else '–'
print(f"| {s} | {t} | {j} | {iops/1000:.1f}k | {cores:.2f} | {cores*1e6/iops:.2f} | {work} | {sysc/iops:.2f} | {top} |")
PY
  tail -1 "$OUT/table.md"
done; done; done
