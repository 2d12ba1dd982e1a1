#!/usr/bin/env bash
# Usage: mkinitrd.sh BASE TESTSCRIPT OUT [SRC=DEST ...]
#
# Writes OUT = BASE (the base.cpio.gz from build.sh) followed by a small gzip'd newc cpio
# holding TESTSCRIPT as /test.sh, and each further SRC file as DEST (an absolute path in
# the guest; executables such as the appliance and the libraries `ldd` lists). The kernel
# unpacks concatenated archives in order, so the guest's /init finds /test.sh and runs it
# with sh.
set -euo pipefail
[ $# -ge 3 ] || { echo "usage: $0 BASE TESTSCRIPT OUT [SRC=DEST ...]" >&2; exit 2; }
base=$1 script=$2 out=$3
shift 3
[ -s "$base" ] || { echo "mkinitrd.sh: base initramfs '$base' missing (run tests/guest/build.sh)" >&2; exit 1; }
[ -f "$script" ] || { echo "mkinitrd.sh: test script '$script' missing" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cp "$script" "$tmp/test.sh"
chmod 755 "$tmp/test.sh"
for f in "$@"; do
	src=${f%%=*} dest=${f#*=}
	[ -f "$src" ] && [ "${dest#/}" != "$dest" ] || { echo "mkinitrd.sh: bad file '$f' (SRC=/DEST, SRC a file)" >&2; exit 1; }
	mkdir -p "$tmp/$(dirname "$dest")"
	cp -L "$src" "$tmp$dest"
done
{
	cat "$base"
	(cd "$tmp" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet | gzip -1n)
} >"$out.tmp"
mv "$out.tmp" "$out"
