#!/bin/bash
# Builds the seed corpus of the qcow2_image fuzz target with qemu-img and qemu-io:
# small images covering the features the engine reads (both versions, cluster sizes,
# refcount widths, compressed clusters with zlib and zstd, snapshots, backing files,
# lazy refcounts, zero clusters, bitmaps, extended L2 with subclusters in every state).
set -euo pipefail
out=$(realpath -m "${1:-$(dirname "$0")/corpus/qcow2_image}")
mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
qemu-img create -q -f raw base.raw 1M
qemu-img create -q -f qcow2 -o cluster_size=512 base.qcow2 1M
img() { # name, options, size, qemu-io commands...
    local name=$1 opts=$2 size=$3
    shift 3
    qemu-img create -q -f qcow2 -o "$opts" "$name" "$size"
    for c in "$@"; do qemu-io -f qcow2 -c "$c" "$name" >/dev/null; done
    cp "$name" "$out/$name"
}
img v3-512.qcow2 cluster_size=512 1M "write -P 0x11 0 8k" "write -z 16k 4k" "discard 4k 512"
img v3-4k.qcow2 cluster_size=4096 4M "write -P 0x22 0 64k" "write -P 0x23 1M 4k"
img v2-4k.qcow2 cluster_size=4096,compat=0.10 2M "write -P 0x33 0 32k"
img rc1.qcow2 cluster_size=512,refcount_bits=1 1M "write -P 0x44 0 4k"
img rc64.qcow2 cluster_size=512,refcount_bits=64 1M "write -P 0x45 0 4k"
img lazy.qcow2 cluster_size=512,lazy_refcounts=on 1M "write -P 0x46 0 4k"
img big-virtual.qcow2 cluster_size=65536 1T "write -P 0x47 512G 4k"
# Compressed clusters.
qemu-img create -q -f raw data.raw 256k
qemu-io -f raw -c "write -P 0x61 0 128k" data.raw >/dev/null
qemu-img convert -q -c -O qcow2 -o cluster_size=4096 data.raw "$out/zlib.qcow2"
qemu-img convert -q -c -O qcow2 -o cluster_size=4096,compression_type=zstd data.raw "$out/zstd.qcow2"
# Internal snapshots.
img snap.qcow2 cluster_size=512 1M "write -P 0x51 0 4k"
qemu-img snapshot -c s1 snap.qcow2
qemu-io -f qcow2 -c "write -P 0x52 0 4k" snap.qcow2 >/dev/null
cp snap.qcow2 "$out/snap.qcow2"
# Backing files (names relative to the image).
qemu-img create -q -f qcow2 -o cluster_size=512 -b base.raw -F raw over-raw.qcow2
qemu-io -f qcow2 -c "write -P 0x71 4k 4k" over-raw.qcow2 >/dev/null
cp over-raw.qcow2 "$out/"
qemu-img create -q -f qcow2 -o cluster_size=512 -b base.qcow2 -F qcow2 over-qcow2.qcow2
cp over-qcow2.qcow2 "$out/"
# Persistent dirty bitmap.
img bitmap.qcow2 cluster_size=4096 1M
qemu-img bitmap --add bitmap.qcow2 b0
cp bitmap.qcow2 "$out/bitmap.qcow2"
# Extended L2: allocated, zero and unallocated subclusters, a compressed cluster.
img extl2.qcow2 cluster_size=16384,extended_l2=on 1M "write -P 0x81 0 4k" "write -z 8k 1k" \
    "write -P 0x82 20k 1k" "write -z 64k 16k" "write -c -P 0x83 128k 16k" "discard 256k 16k"
ls -l "$out"
