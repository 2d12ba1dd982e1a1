#!/usr/bin/env bash
# Builds the test guest used by the vhost-user-blk end-to-end tests (tests/src/guest.rs):
#
#   $OUT/vmlinuz       Debian cloud kernel (linux-image-cloud-amd64)
#   $OUT/base.cpio.gz  initramfs: busybox-static + applet links, /bin/xio (tests/guest/xio.c),
#                      the virtio modules and /init (see the heredoc below)
#
# $OUT defaults to <workspace>/target/guest. Idempotent: installs packages only when they
# are missing, downloads the kernel once (remembered in $OUT/kernel.pkg; set
# GUEST_KERNEL_REFRESH=1 to re-resolve, or GUEST_KERNEL_PKG=linux-image-... to pin one), and
# rebuilds the initramfs only when this script, xio.c or the kernel changed. Concurrent runs
# are serialised with flock on $OUT/.lock.
#
# Add a test script with: tests/guest/mkinitrd.sh $OUT/base.cpio.gz test.sh initrd.gz
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
WORKSPACE=$(cd "$HERE/../.." && pwd)
OUT=${OUT:-$WORKSPACE/target/guest}
export DEBIAN_FRONTEND=noninteractive

log() { echo "guest/build.sh: $*" >&2; }
die() { echo "guest/build.sh: error: $*" >&2; exit 1; }

# The virtio modules, in load order (the cloud kernel builds them as modules).
MODULES=(virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk)

mkdir -p "$OUT"
exec 9>"$OUT/.lock"
flock -w 1800 9 || die "timed out waiting for another build.sh holding $OUT/.lock"

apt_get() {
	[ "$(id -u)" = 0 ] || die "need root to run 'apt-get $*' (or install it yourself first)"
	timeout 1200 apt-get -q -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "$@" \
		|| die "apt-get $* failed"
}

# --- packages -------------------------------------------------------------------------
ensure_packages() {
	local missing=() pkgs=()
	command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
	dpkg -s busybox-static >/dev/null 2>&1 || missing+=(busybox-static)
	dpkg -s cpio >/dev/null 2>&1 || missing+=(cpio)
	command -v gcc >/dev/null || missing+=(gcc libc6-dev)
	[ ${#missing[@]} -eq 0 ] && return
	log "installing ${missing[*]}"
	apt_get update
	pkgs=("${missing[@]}")
	if [[ " ${missing[*]} " == *" qemu-system-x86 "* ]]; then
		# qemu-system-x86 only exists in bookworm main (7.2); a newer qemu-utils (e.g. from
		# backports) Breaks that qemu-system-common, so pin qemu-utils to the same version,
		# downgrading it if needed. This keeps qemu-img/qemu-io/qemu-storage-daemon and
		# qemu-system-x86_64 one consistent set.
		local v
		v=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
		[ -n "$v" ] && [ "$v" != "(none)" ] || die "no installable qemu-system-x86 in the apt sources"
		pkgs+=("qemu-utils=$v")
	fi
	apt_get install -y --no-install-recommends --allow-downgrades "${pkgs[@]}"
	command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 still missing after install"
}

# --- kernel -----------------------------------------------------------------------------
# Sets KPKG and KDIR (the extracted package).
ensure_kernel() {
	KPKG=${GUEST_KERNEL_PKG:-}
	if [ -z "$KPKG" ] && [ -z "${GUEST_KERNEL_REFRESH:-}" ] && [ -s "$OUT/kernel.pkg" ]; then
		KPKG=$(cat "$OUT/kernel.pkg")
	fi
	if [ -z "$KPKG" ]; then
		resolve() { apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}'; }
		KPKG=$(resolve || true)
		if [ -z "$KPKG" ]; then
			apt_get update
			KPKG=$(resolve || true)
		fi
		[ -n "$KPKG" ] || die "cannot resolve linux-image-cloud-amd64 to a kernel package"
	fi
	KDIR=$OUT/kernel/$KPKG
	if [ ! -f "$KDIR/.extracted" ]; then
		log "downloading $KPKG"
		local tmp=$OUT/kernel/.dl
		rm -rf "$tmp" "$KDIR"
		mkdir -p "$tmp"
		# apt-get download writes into the current directory.
		if ! (cd "$tmp" && timeout 600 apt-get -q download "$KPKG" >&2); then
			apt_get update
			(cd "$tmp" && timeout 600 apt-get -q download "$KPKG" >&2) || die "apt-get download $KPKG failed"
		fi
		mkdir -p "$KDIR"
		dpkg-deb -x "$tmp"/*.deb "$KDIR" || die "cannot extract $tmp/*.deb"
		rm -rf "$tmp"
		touch "$KDIR/.extracted"
	fi
	echo "$KPKG" >"$OUT/kernel.pkg"
}

# --- initramfs --------------------------------------------------------------------------
build_initramfs() {
	local root=$OUT/rootfs vmlinuz kver busybox=/bin/busybox
	vmlinuz=$(ls "$KDIR"/boot/vmlinuz-* 2>/dev/null | head -n1)
	[ -n "$vmlinuz" ] || die "no boot/vmlinuz-* in $KDIR"
	kver=${vmlinuz##*/vmlinuz-}
	[ -x "$busybox" ] || die "$busybox missing: is busybox-static installed?"

	log "building initramfs for $kver"
	rm -rf "$root"
	mkdir -p "$root"/{bin,dev,proc,sys,tmp,lib/modules}
	cp "$busybox" "$root/bin/busybox"
	local a
	for a in $("$root/bin/busybox" --list); do
		[ "$a" = busybox ] || ln -s busybox "$root/bin/$a"
	done

	gcc -static -O2 -s -Wall -o "$root/bin/xio" "$HERE/xio.c" || die "compiling xio.c failed"

	local m f
	for m in "${MODULES[@]}"; do
		f=$(find "$KDIR/lib/modules/$kver/kernel" -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" -o -name "$m.ko.gz" | head -n1)
		[ -n "$f" ] || die "module $m not found under $KDIR/lib/modules/$kver (built in? then drop it from MODULES)"
		# busybox insmod does not decompress: store plain .ko files.
		case "$f" in
			*.xz) xz -dc "$f" >"$root/lib/modules/$m.ko" ;;
			*.zst) zstd -qdc "$f" >"$root/lib/modules/$m.ko" ;;
			*.gz) gzip -dc "$f" >"$root/lib/modules/$m.ko" ;;
			*) cp "$f" "$root/lib/modules/$m.ko" ;;
		esac
	done

	cat >"$root/init" <<EOF
#!/bin/sh
# Test guest init (generated by tests/guest/build.sh).
export PATH=/bin HOME=/tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
# The initramfs has no /dev/console node; use the devtmpfs one.
exec </dev/console >/dev/console 2>&1
for m in ${MODULES[*]}; do
	insmod /lib/modules/\$m.ko || echo "GUEST-WARN insmod \$m failed"
done
i=0
while [ ! -b /dev/vda ] && [ \$i -lt 50 ]; do usleep 100000; i=\$((i + 1)); done
[ -b /dev/vda ] || echo "GUEST-WARN /dev/vda did not appear"
echo GUEST-READY
st=0
if [ -f /test.sh ]; then
	cd /tmp
	sh /test.sh
	st=\$?
fi
echo "GUEST-EXIT \$st"
sync
poweroff -f
EOF
	chmod 755 "$root/init"

	(cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) | gzip -9n >"$OUT/base.cpio.gz.tmp"
	mv "$OUT/base.cpio.gz.tmp" "$OUT/base.cpio.gz"
	cp "$vmlinuz" "$OUT/vmlinuz.tmp"
	mv "$OUT/vmlinuz.tmp" "$OUT/vmlinuz"
	rm -rf "$root"
}

ensure_packages
ensure_kernel
stamp=$(cat "$HERE/build.sh" "$HERE/xio.c" <(echo "$KPKG") | sha256sum | cut -d' ' -f1)
if [ -s "$OUT/vmlinuz" ] && [ -s "$OUT/base.cpio.gz" ] && [ "$(cat "$OUT/.stamp" 2>/dev/null)" = "$stamp" ]; then
	log "up to date ($OUT)"
else
	build_initramfs
	echo "$stamp" >"$OUT/.stamp"
	log "built $OUT/vmlinuz and $OUT/base.cpio.gz"
fi
