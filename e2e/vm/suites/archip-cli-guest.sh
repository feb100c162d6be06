#!/bin/sh
# Guest side: the `archip` binary itself end to end on a real ublk device: up, create, map,
# write through the device, read back through the CLI, kill -9 the device server under load,
# recover, verify, unmap. Exits non-zero on the first failure.
set -eu
export ARCHIP_DATA_DIR=/tmp/archip-data ARCHIP_SEGMENT=archip-cli ARCHIP_UBLK_STATE=/tmp/ublk-devices.json
A=/usr/local/bin/archip
fail() { echo "archip-cli: FAIL: $*"; exit 1; }

$A up >/tmp/up.log 2>&1 &
UP=$!
i=0
until grep -q 'archip: ready' /tmp/up.log; do
  i=$((i + 1)); [ $i -lt 300 ] || fail "up did not get ready: $(cat /tmp/up.log)"
  kill -0 $UP 2>/dev/null || fail "up exited: $(cat /tmp/up.log)"
  sleep 0.1
done
$A volume create disk --size 64M
dev=$($A map disk)
[ -b "$dev" ] || fail "map printed $dev, not a block device"
echo "mapped disk at $dev"
$A showmapped --json | grep -q '"volume":"disk"' || fail "showmapped does not list disk"

# Data written through the device equals what the CLI reads back.
dd if=/dev/urandom of=/tmp/pattern bs=1M count=8 2>/dev/null
dd if=/tmp/pattern of="$dev" bs=1M seek=3 conv=fsync 2>/dev/null
$A export disk /tmp/export.raw
dd if=/tmp/export.raw of=/tmp/back bs=1M skip=3 count=8 2>/dev/null
cmp /tmp/pattern /tmp/back || fail "device data differs from archip export"

# kill -9 of the device server under a write load: the device stays, recover re-attaches it,
# and the writer finishes without an I/O error.
pid=$($A showmapped --json | sed -n 's/.*"pid":\([0-9]*\).*/\1/p' | head -n 1)
[ -n "$pid" ] || fail "no server pid in showmapped: $($A showmapped --json)"
(dd if=/tmp/pattern of="$dev" bs=64k seek=320 conv=fsync 2>/tmp/dd.err; echo $? >/tmp/dd.rc) &
W=$!
kill -9 "$pid"
[ -b "$dev" ] || fail "device vanished after its server was killed"
$A recover
wait $W || true
[ "$(cat /tmp/dd.rc)" = 0 ] || fail "writer failed across the restart: $(cat /tmp/dd.err)"
$A export disk /tmp/export2.raw
dd if=/tmp/export2.raw of=/tmp/back2 bs=64k skip=320 count=128 2>/dev/null
cmp /tmp/pattern /tmp/back2 || fail "data written across the restart differs"

$A unmap "$dev"
[ ! -b "$dev" ] || fail "device still present after unmap"
[ "$($A showmapped --json | wc -l)" = 0 ] || fail "showmapped not empty after unmap"
kill -TERM $UP
wait $UP || fail "up did not exit cleanly"
echo "archip-cli: PASS"
