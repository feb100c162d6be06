#!/bin/sh
# archip-rados-guest.sh - runs INSIDE the VM (busybox sh), called by e2e/vm/ublk-suite.sh's
# `rados` part: the `archip` binary (built with --features rados) on a RADOS-backed volume
# mapped as a real ublk device, against the host's Ceph cluster.
#
# How the guest reaches a cluster bound to the host's 127.0.0.1: the monitors and OSDs announce
# 127.0.0.1:PORT in the monmap/osdmap, so librados here connects to 127.0.0.1:PORT. One socat
# relay per port in ARCHIP_VM_RELAY_PORTS listens on the guest's loopback and forwards to
# 10.0.2.2:PORT, which qemu's user-mode network turns into the host's 127.0.0.1:PORT. The
# cluster stays loopback-only on the host; nothing is exposed.
#
# Environment (set by the host side): ARCHIP_BACKEND (rados:...,conf=/root/ceph.conf,
# keyring=/root/ceph.keyring: the key is in that 0600 file, never in an argument),
# ARCHIP_VM_RELAY_PORTS (the monitor's and the OSDs' public ports).
# Steps: relays, `archip up` on the backend, create, map -> /dev/ublkbN, mkfs.ext4, mount,
# files, sync, snapshot, clone, map the clone, files verify in the clone, clone writes stay in
# the clone, unmap both, delete clone/snapshot/volume, gc, stop. Exits non-zero on the first
# failure; prints "archip-rados: PASS" at the end.
set -eu
: "${ARCHIP_BACKEND:?}" "${ARCHIP_VM_RELAY_PORTS:?}"
# A private (0700) directory for the instance's local files: control socket, device state.
mkdir -m 700 /tmp/archip
export ARCHIP_DATA_DIR=/tmp/archip/data ARCHIP_SEGMENT=archip-rados ARCHIP_UBLK_STATE=/tmp/archip/ublk-devices.json
export RUST_LOG=${RUST_LOG:-info,libublk=warn}
A=/usr/local/bin/archip-rados
T0=$(cut -d' ' -f1 /proc/uptime)
step() { echo "archip-rados: [$(awk -v a="$T0" -v b="$(cut -d' ' -f1 /proc/uptime)" 'BEGIN{printf "%6.2f", b-a}')s] $*"; }
fail() {
  echo "archip-rados: FAIL: $*"
  for f in /tmp/up.log /tmp/relay-*.log; do [ -s "$f" ] && { echo "--- $f"; tail -n 30 "$f"; }; done
  dmesg | tail -n 20
  exit 1
}
# Polls `cmd` every 0.1 s for up to $1 tenths of a second.
poll() {
  n=$1; shift
  i=0
  until "$@"; do
    i=$((i + 1)); [ $i -lt "$n" ] || return 1
    sleep 0.1
  done
}
# True when something listens on 127.0.0.1:$1 (/proc/net/tcp: local address, state 0A).
listening() { grep -qi " 0100007F:$(printf '%04X' "$1") 00000000:0000 0A " /proc/net/tcp; }

# ---------------------------------------------------------------- relays to the host's cluster
for p in $ARCHIP_VM_RELAY_PORTS; do
  socat "TCP-LISTEN:$p,bind=127.0.0.1,fork,reuseaddr" "TCP:10.0.2.2:$p" 2>"/tmp/relay-$p.log" &
done
for p in $ARCHIP_VM_RELAY_PORTS; do
  poll 100 listening "$p" || fail "relay on 127.0.0.1:$p did not start"
done
step "relays up: 127.0.0.1:{$(echo $ARCHIP_VM_RELAY_PORTS | tr ' ' ',')} -> host"

# ---------------------------------------------------------------- peer set on RADOS
$A up >/tmp/up.log 2>&1 &
UP=$!
up_ready() {
  kill -0 $UP 2>/dev/null || fail "up exited: $(cat /tmp/up.log)"
  grep -q 'archip: ready' /tmp/up.log
}
poll 1200 up_ready || fail "up did not get ready in 120 s"
step "archip up ready on $(echo "$ARCHIP_BACKEND" | sed 's/,.*//')"

$A volume create vol --size 128M >/dev/null || fail "create vol"
D1=$($A map vol) || fail "map vol"
case "$D1" in /dev/ublkb*) ;; *) fail "map printed '$D1', not /dev/ublkbN" ;; esac
[ -b "$D1" ] || fail "$D1 is not a block device"
step "ok: vol mapped at $D1"

mkfs.ext4 -q -F "$D1" || fail "mkfs.ext4 $D1"
mkdir -p /mnt/a /mnt/c
mount -t ext4 "$D1" /mnt/a || fail "mount $D1"
i=0
while [ $i -lt 6 ]; do
  dd if=/dev/urandom of=/mnt/a/f$i bs=64k count=$((8 + i * 8)) 2>/dev/null || fail "write f$i"
  i=$((i + 1))
done
mkdir /mnt/a/dir && echo "hello rados" >/mnt/a/dir/hello
(cd /mnt/a && md5sum f* dir/hello >/tmp/sums)
sync
step "ok: mkfs.ext4 + mount, 7 files ($(du -sk /mnt/a | cut -f1) KiB) written and synced"

# Nothing may have gone to a local file backend: the data is in the pool.
if [ -d "$ARCHIP_DATA_DIR/objects" ] && [ -n "$(ls -A "$ARCHIP_DATA_DIR/objects")" ]; then
  fail "objects in the local data dir: the backend is not RADOS"
fi

$A snapshot create vol snap >/dev/null || fail "snapshot"
$A clone snap clone >/dev/null || fail "clone"
DC=$($A map clone) || fail "map clone"
[ -b "$DC" ] && [ "$DC" != "$D1" ] || fail "clone mapped at '$DC'"
mount -t ext4 "$DC" /mnt/c || fail "mount the clone"
(cd /mnt/c && md5sum -c /tmp/sums >/dev/null) || fail "clone files differ"
step "ok: snapshot + clone mapped at $DC: all files verify"

echo "clone only" >/mnt/c/clone-only
dd if=/dev/urandom of=/mnt/c/f0 bs=64k count=8 conv=notrunc 2>/dev/null || fail "write to the clone"
sync
[ ! -e /mnt/a/clone-only ] || fail "clone write visible in the origin"
umount /mnt/a || fail "umount vol"
echo 3 >/proc/sys/vm/drop_caches
mount -t ext4 "$D1" /mnt/a || fail "remount vol"
(cd /mnt/a && md5sum -c /tmp/sums >/dev/null) || fail "origin changed by writes to its clone"
[ ! -e /mnt/a/clone-only ] || fail "clone write visible in the origin after a remount"
step "ok: clone writes stay in the clone (origin re-read from RADOS after a cache drop)"

# ---------------------------------------------------------------- teardown
umount /mnt/c || fail "umount clone"
umount /mnt/a || fail "umount vol"
$A unmap "$DC" || fail "unmap $DC"
$A unmap "$D1" || fail "unmap $D1"
[ "$($A showmapped --json | wc -l)" = 0 ] || fail "still mapped: $($A showmapped --json)"
! ls /dev/ublkb* >/dev/null 2>&1 || fail "devices left: $(ls /dev/ublkb*)"
$A volume delete clone >/dev/null || fail "delete clone"
$A snapshot delete snap >/dev/null || fail "delete snap"
$A volume delete vol >/dev/null || fail "delete vol"
$A gc >/dev/null || fail "gc"
step "ok: unmapped, deleted, collected"
kill -TERM $UP
wait $UP || fail "up did not exit cleanly: $(tail -n 20 /tmp/up.log)"
echo "archip-rados: PASS"
