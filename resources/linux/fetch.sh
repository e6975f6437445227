#!/usr/bin/env bash
# Fetches Debian's cloud kernel and busybox-static, and builds an initramfs whose init
# prints a marker and reboots. Output: resources/linux/build/{bzImage,initramfs.cpio.gz},
# and vmlinux: the same kernel as an ELF, taken out of the bzImage (hosts that emulate guest
# kernel code spend minutes in the bzImage's decompressor; the ELF starts at once).
# Needs apt-get (Debian), cpio and the bzImage's decompressor (lz4 for Debian's kernels);
# run as root or as a user that may use apt-get download.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out="$here/build"
mkdir -p "$out"
# The ELF inside a bzImage: the setup header's payload_offset/payload_length (boot protocol
# 2.08+) locate the compressed kernel; its magic says which decompressor to run.
extract_vmlinux() {
  local bz=$1 dst=$2 setup_sects off len magic
  setup_sects=$(od -An -t u1 -j $((0x1f1)) -N 1 "$bz" | tr -d ' ')
  [ "$setup_sects" -eq 0 ] && setup_sects=4
  off=$(od -An -t u4 -j $((0x248)) -N 4 "$bz" | tr -d ' ')
  len=$(od -An -t u4 -j $((0x24c)) -N 4 "$bz" | tr -d ' ')
  off=$(( (setup_sects + 1) * 512 + off ))
  magic=$(od -An -t x1 -j "$off" -N 4 "$bz" | tr -d ' ')
  local dec pkg
  case "$magic" in
    02214c18) dec="lz4 -dc" pkg=lz4 ;;
    28b52ffd) dec="zstd -dcq" pkg=zstd ;;
    fd377a58) dec="xz -dcq" pkg=xz-utils ;;
    1f8b08*) dec="gzip -dcq" pkg=gzip ;;
    *) echo "unknown kernel compression (magic $magic)" >&2; return 1 ;;
  esac
  command -v "${dec%% *}" >/dev/null || apt-get install -y -qq "$pkg" >/dev/null
  # Decompressors complain about the 4-byte size the kernel build appends; the ELF is whole.
  tail -c +$((off + 1)) "$bz" | head -c "$len" | $dec > "$dst.tmp" 2>/dev/null || true
  [ "$(head -c 4 "$dst.tmp")" = $'\x7fELF' ] || { echo "no ELF in $bz" >&2; rm -f "$dst.tmp"; return 1; }
  mv "$dst.tmp" "$dst"
}

if [ -s "$out/bzImage" ] && [ -s "$out/initramfs.cpio.gz" ]; then
  [ -s "$out/vmlinux" ] || extract_vmlinux "$out/bzImage" "$out/vmlinux"
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
extract_vmlinux "$out/bzImage" "$out/vmlinux"
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
