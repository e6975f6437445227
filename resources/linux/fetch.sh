#!/usr/bin/env bash
# Fetches Debian's cloud kernel and busybox-static, and builds an initramfs whose init
# loads the kernel package's own virtio modules (virtio-mmio, -blk, -vsock, -balloon), reports
# the virtio devices the kernel found (and the first disk's size and checksum), prints a
# marker and reboots. Output: resources/linux/build/{bzImage,initramfs.cpio.gz},
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

# Bump when the initramfs changes: an older one is rebuilt.
initramfs_version=2
if [ -s "$out/bzImage" ] && [ -s "$out/initramfs.cpio.gz" ] &&
   [ "$(cat "$out/initramfs.version" 2>/dev/null)" = "$initramfs_version" ]; then
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
mkdir -p root/bin root/proc root/sys root/dev root/lib/modules
cp bb/bin/busybox root/bin/busybox
# The virtio drivers are modules in Debian's cloud kernel: copy them and what they depend on
# (the `depends=` of each module's .modinfo), in load order, into /lib/modules/order.
kmods=$(find kernel/lib/modules -maxdepth 1 -mindepth 1 -type d | head -1)/kernel
module_path() { find "$kmods" -name "$1.ko*" | head -1; }
module_deps() { tr '\0' '\n' < "$1" | grep -a '^depends=' | cut -d= -f2 | tr ',' ' '; }
add_module() {
  local name=$1 path dep
  grep -qx "$name" root/lib/modules/order 2>/dev/null && return 0
  path=$(module_path "$name")
  [ -n "$path" ] || { echo "module $name not in $kpkg" >&2; return 1; }
  case "$path" in
    *.ko.xz) xz -dc "$path" > "root/lib/modules/$name.ko" ;;
    *.ko.zst) zstd -dcq "$path" > "root/lib/modules/$name.ko" ;;
    *) cp "$path" "root/lib/modules/$name.ko" ;;
  esac
  for dep in $(module_deps "root/lib/modules/$name.ko"); do add_module "$dep"; done
  echo "$name" >> root/lib/modules/order
}
: > root/lib/modules/order
for m in virtio_mmio virtio_blk vmw_vsock_virtio_transport virtio_balloon; do add_module "$m"; done
cat > root/init <<'INIT'
#!/bin/busybox sh
bb=/bin/busybox
$bb mount -t proc proc /proc
$bb mount -t sysfs sysfs /sys
$bb mount -t devtmpfs devtmpfs /dev 2>/dev/null
for m in $($bb cat /lib/modules/order); do
  $bb insmod /lib/modules/$m.ko 2>/dev/null || $bb echo "TINYVMM MODULE FAILED: $m"
done
$bb sleep 1
ids=""
for d in /sys/bus/virtio/devices/*; do
  [ -e "$d/device" ] && ids="$ids $($bb cat "$d/device")"
done
$bb echo "TINYVMM VIRTIO:${ids:- none}"
if [ -b /dev/vda ]; then
  $bb echo "TINYVMM DISK: vda sectors=$($bb cat /sys/block/vda/size) md5=$($bb head -c 1048576 /dev/vda | $bb md5sum | $bb cut -d' ' -f1)"
fi
$bb echo "TINYVMM INIT OK: $($bb uname -r) cmdline: $($bb cat /proc/cmdline)"
$bb reboot -f
INIT
chmod +x root/init
(cd root && find . | cpio -o -H newc --quiet | gzip -9) > "$out/initramfs.cpio.gz"
echo "$initramfs_version" > "$out/initramfs.version"
echo "kernel package: $kpkg"
echo "modules in the initramfs: $(tr '\n' ' ' < root/lib/modules/order)"
ls -la "$out"
