#!/usr/bin/env bash
# The NVMe drivers inside the TCG test guest, on QEMU's emulated NVMe controller behind
# an emulated IOMMU: the in-process load generator (loadgen) at 4k QD32 randread and
# randwrite on one reactor, over `nvme` (the userspace driver over VFIO: the controller
# is handed to vfio-pci for its runs and back to the kernel after), `nvme_uring`
# (/dev/ng0n1), `io_uring` and `aio` (O_DIRECT on the block device /dev/nvme0n1), in
# alternating rounds. The absolute figures are TCG's (every guest
# instruction emulated); the ratios between drivers on the same controller are what
# counts. Prints a markdown table (median IOPS, round spread, CPU per I/O, ratios).
#
#   bash bench/nvme-guest.sh [OUT_DIR]
#
# Environment: ROUNDS=3 SECS=5 SIZE=512M WORK=/var/tmp
# DRIVERS='nvme nvme_uring io_uring aio' WORKLOADS='randread randwrite' QD=32.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/results/nvme-guest-$(date -u +%Y%m%dT%H%M%SZ)}
ROUNDS=${ROUNDS:-3}; SECS=${SECS:-5}; SIZE=${SIZE:-512M}; QD=${QD:-32}
DRIVERS=${DRIVERS:-nvme nvme_uring io_uring aio}
WORKLOADS=${WORKLOADS:-randread randwrite}
WORK=$(mktemp -d "${WORK:-/var/tmp}/appliance-nvme.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"

bash tests/guest/build.sh
cargo build --release --quiet -p bench --bin loadgen
G=target/guest
objcopy --strip-debug target/release/loadgen "$WORK/loadgen"
files=("$WORK/loadgen=/bin/loadgen")
for lib in $(ldd target/release/loadgen | grep -o '/[^ ]*'); do files+=("$lib=$lib"); done
KMOD=$(ls -d "$G"/kernel/*/lib/modules/*/kernel | head -n1)
for m in virt/lib/irqbypass drivers/vfio/vfio drivers/vfio/vfio_iommu_type1 drivers/vfio/vfio_virqfd \
  drivers/vfio/pci/vfio-pci-core drivers/vfio/pci/vfio-pci; do
  files+=("$KMOD/$m.ko=/lib/modules/$(basename "$m").ko")
done

# The namespace: written through, so reads find data rather than holes.
head -c "$SIZE" /dev/urandom > "$WORK/ns.img"

cat > "$WORK/test.sh" <<EOF
for m in irqbypass vfio vfio_iommu_type1 vfio_virqfd vfio-pci-core vfio-pci; do insmod /lib/modules/\$m.ko; done
pci=\$(basename \$(readlink -f /sys/class/nvme/nvme0/device))
to_vfio() {
  echo \$pci > /sys/bus/pci/devices/\$pci/driver/unbind
  echo vfio-pci > /sys/bus/pci/devices/\$pci/driver_override
  echo \$pci > /sys/bus/pci/drivers_probe
}
to_kernel() {
  echo \$pci > /sys/bus/pci/devices/\$pci/driver/unbind
  echo > /sys/bus/pci/devices/\$pci/driver_override
  echo \$pci > /sys/bus/pci/drivers_probe
  i=0; while [ ! -e /dev/ng0n1 ] && [ \$i -lt 100 ]; do sleep 0.1; i=\$((i + 1)); done
}
for r in \$(seq $ROUNDS); do
  for d in $DRIVERS; do
    dev=/dev/nvme0n1; [ \$d = nvme_uring ] && dev=/dev/ng0n1
    [ \$d = nvme ] && dev=pci:\$pci && to_vfio
    for w in $WORKLOADS; do
      out=\$(/bin/loadgen --target raw:\$dev --driver \$d --workload \$w --qd $QD --cores 0 \\
        --time $SECS --warmup 1 --json --quiet 2>&1 | tr -d '\n')
      echo "LOADGEN round=\$r \$out"
    done
    [ \$d = nvme ] && to_kernel
  done
done
EOF
bash tests/guest/mkinitrd.sh "$G/base.cpio.gz" "$WORK/test.sh" "$WORK/initrd.gz" "${files[@]}"
timeout 3600 qemu-system-x86_64 -no-user-config -accel tcg -machine q35,kernel-irqchip=split \
  -device intel-iommu,intremap=on -m 1024M -smp 2 \
  -display none -vga none -nic none -monitor none -serial stdio -no-reboot \
  -kernel "$G/vmlinuz" -initrd "$WORK/initrd.gz" \
  -append "console=ttyS0 quiet panic=-1 intel_iommu=on" \
  -drive "file=$WORK/ns.img,if=none,id=nv0,format=raw,cache=none,aio=io_uring" \
  -device nvme,drive=nv0,serial=bench | tr -d '\r' > "$OUT/console.log"
grep '^LOADGEN ' "$OUT/console.log" > "$OUT/runs.txt" || { cat "$OUT/console.log"; exit 1; }

python3 - "$OUT/runs.txt" "$ROUNDS" "$SECS" "$SIZE" <<'PY' | tee "$OUT/nvme-guest.md"
import json, statistics, sys
runs, rounds, secs, size = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
by = {}
for line in open(runs):
    _, rnd, js = line.split(' ', 2)
    try:
        j = json.loads(js)
    except ValueError:
        print(f"unparsable run: {line.strip()}", file=sys.stderr)
        continue
    if j.get("errors"):
        print(f"run with errors: {j.get('first_error')}", file=sys.stderr)
    by.setdefault((j["workload"], j["engine"]), {})[int(rnd.split('=')[1])] = j
print(f"{rounds} alternating round(s) x {secs} s (+1 s warm-up), one reactor on vCPU 0, "
      f"QD32 4k, namespace {size} (cache=none, aio=io_uring on the host), "
      f"emulated IOMMU on\n")
print("| workload | driver | IOPS (median) | round spread | p50 µs | p99 µs "
      "| reactor CPU ns/IO | process CPU ns/IO | vs io_uring (per-round median) |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
for (wl, eng), rs in sorted(by.items()):
    iops = [r["iops"] for r in rs.values()]
    base = by.get((wl, "io_uring"), {})
    ratios = [rs[k]["iops"] / base[k]["iops"] for k in rs if k in base]
    med = lambda xs: statistics.median(xs) if xs else float('nan')
    pick = lambda f: med([f(r) for r in rs.values()])
    print(f"| {wl} | {eng} | {med(iops)/1000:.1f}k | {min(iops)/1000:.1f}k–{max(iops)/1000:.1f}k "
          f"| {pick(lambda r: r['latency']['p50_us']):.0f} | {pick(lambda r: r['latency']['p99_us']):.0f} "
          f"| {pick(lambda r: r['reactor_cpu_ns_per_io']):.0f} | {pick(lambda r: r['process_cpu_ns_per_io']):.0f} "
          f"| {med(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f}) |")
PY
