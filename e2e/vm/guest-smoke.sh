#!/bin/sh
# guest-smoke.sh - runs INSIDE the VM (busybox sh), called by e2e/vm/smoke.sh:
#   run-in-vm.sh --file e2e/vm/guest-smoke.sh -- sh /root/guest-smoke.sh
# Checks: /dev/ublk-control exists; mkfs.ext4 + mount of a loop device works
# (write, remount, read back, fstrim); the same for xfs; blkid sees both; fio
# runs (when copied in). Prints "guest-smoke: PASS" and exits 0 on success.
set -eu
fail() { echo "guest-smoke: FAIL: $*"; exit 1; }
step() { echo "guest-smoke: [$(cut -d' ' -f1 /proc/uptime)s] $*"; }

step "kernel $(uname -r)"
[ -c /dev/ublk-control ] || fail "/dev/ublk-control missing"
step "ok: /dev/ublk-control ($(grep -w ublk_drv /proc/modules | cut -d' ' -f1) loaded)"
for t in mkfs.ext4 mkfs.xfs blkid mount losetup fstrim blkdiscard fio; do
  command -v "$t" >/dev/null || fail "tool $t missing in the guest"
done
step "ok: tools present: mkfs.ext4 mkfs.xfs blkid mount losetup fstrim blkdiscard fio"

mkdir -p /mnt/t
fs_check() {  # fstype image-size-MiB mkfs-cmd...
  fs=$1 size=$2; shift 2
  img=/tmp/$fs.img
  dd if=/dev/zero of="$img" bs=1M count=0 seek="$size" 2>/dev/null   # sparse on tmpfs
  dev=$(losetup -f)
  losetup "$dev" "$img" || fail "losetup $dev"
  "$@" "$dev" >/dev/null || fail "$* $dev"
  blkid "$dev" | grep -q "TYPE=\"$fs\"" || fail "blkid does not see $fs on $dev: $(blkid "$dev")"
  mount -t "$fs" "$dev" /mnt/t || fail "mount -t $fs $dev"
  dd if=/dev/urandom of=/mnt/t/data bs=64k count=16 2>/dev/null
  want=$(md5sum </mnt/t/data)
  sync
  umount /mnt/t
  mount -t "$fs" "$dev" /mnt/t || fail "re-mount $fs"
  [ "$(md5sum </mnt/t/data)" = "$want" ] || fail "$fs: data differs after remount"
  rm /mnt/t/data
  fstrim /mnt/t >/dev/null || fail "fstrim on $fs"
  umount /mnt/t
  losetup -d "$dev"
  rm -f "$img"
  step "ok: $fs on $dev: mkfs, blkid, mount, write, remount, verify, fstrim"
}
fs_check ext4 64 mkfs.ext4 -q -F
fs_check xfs 320 mkfs.xfs -q -f

dd if=/dev/zero of=/tmp/blk.img bs=1M count=0 seek=16 2>/dev/null
dev=$(losetup -f); losetup "$dev" /tmp/blk.img
blkdiscard "$dev" || fail "blkdiscard $dev"
fio --name=smoke --filename="$dev" --rw=randrw --bs=4k --size=8m --direct=1 \
    --ioengine=io_uring --iodepth=4 --runtime=1 --time_based --output-format=terse >/tmp/fio.out ||
  fail "fio: $(cat /tmp/fio.out)"
losetup -d "$dev"
step "ok: blkdiscard + fio (io_uring, O_DIRECT) on a loop device"
echo "guest-smoke: PASS"
