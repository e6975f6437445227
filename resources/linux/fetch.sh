#!/usr/bin/env bash
# Fetches Debian's cloud kernel and busybox-static, and builds an initramfs whose init
# prints a marker and reboots. Output: resources/linux/build/{bzImage,initramfs.cpio.gz}.
# Needs apt-get (Debian) and cpio; run as root or as a user that may use apt-get download.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out="$here/build"
mkdir -p "$out"
if [ -s "$out/bzImage" ] && [ -s "$out/initramfs.cpio.gz" ]; then
  echo "already fetched: $out"
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
command -v cpio >/dev/null || { apt-get update -qq && apt-get install -y -qq cpio >/dev/null; }
apt-get update -qq || true
# linux-image-cloud-amd64 is a metapackage; the kernel is in the package it depends on.
kpkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
[ -n "$kpkg" ] || { echo "cannot resolve the package behind linux-image-cloud-amd64" >&2; exit 1; }
apt-get download "$kpkg" busybox-static >/dev/null
dpkg-deb -x "$kpkg"_*.deb kernel
dpkg-deb -x busybox-static_*.deb bb
cp kernel/boot/vmlinuz-* "$out/bzImage"
mkdir -p root/bin root/proc root/sys root/dev
cp bb/bin/busybox root/bin/busybox
cat > root/init <<'INIT'
#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox echo "TINYVMM INIT OK: $(/bin/busybox uname -r) cmdline: $(/bin/busybox cat /proc/cmdline)"
/bin/busybox reboot -f
INIT
chmod +x root/init
(cd root && find . | cpio -o -H newc --quiet | gzip -9) > "$out/initramfs.cpio.gz"
echo "kernel package: $kpkg"
ls -la "$out"
