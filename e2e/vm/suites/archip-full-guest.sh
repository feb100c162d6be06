#!/bin/sh
# Guest side: a full backend under a ublk device. The data directory is a 48 MiB tmpfs; a
# flushed pattern goes onto one device, a filler volume's device is written until the backend
# is full, and then: a write to either device fails with ENOSPC (not EIO: the peers say "no
# space" and the device passes it on); the flushed pattern is intact; deleting the filler and
# collecting garbage frees space; writes go on; everything flushed before is still there.
# Exits non-zero on the first failure.
set -eu
A=/usr/local/bin/archip
fail() { echo "archip-full: FAIL: $*"; exit 1; }
# Direct I/O so each write reports its own error (coreutils dd, copied in by ublk-suite.sh).
wr() { dd if="$1" of="$2" bs=1M seek="$3" count=1 oflag=direct conv=fsync,notrunc 2>/tmp/dd.err; }

mkdir -p /mnt/full
mount -t tmpfs -o size=48m,mode=0700 archip-full /mnt/full
export ARCHIP_DATA_DIR=/mnt/full/data ARCHIP_SEGMENT=archip-full ARCHIP_UBLK_STATE=/tmp/ublk-full.json

$A up >/tmp/up.log 2>&1 &
UP=$!
i=0
until grep -q 'archip: ready' /tmp/up.log; do
  i=$((i + 1)); [ $i -lt 300 ] || fail "up did not get ready: $(cat /tmp/up.log)"
  kill -0 $UP 2>/dev/null || fail "up exited: $(cat /tmp/up.log)"
  sleep 0.1
done
$A volume create disk --size 16M --block-size 1M
$A volume create filler --size 128M --block-size 1M
dev=$($A map disk)
fdev=$($A map filler)
[ -b "$dev" ] && [ -b "$fdev" ] || fail "map printed $dev and $fdev"

# Flushed before the backend fills.
dd if=/dev/urandom of=/tmp/before bs=1M count=4 2>/dev/null
dd if=/tmp/before of="$dev" bs=1M oflag=direct conv=fsync 2>/dev/null || fail "first write"
dd if=/dev/urandom of=/tmp/chunk bs=1M count=1 2>/dev/null

# Fill: 1 MiB blocks of the filler until a write fails; it must be ENOSPC.
n=0
while wr /tmp/chunk "$fdev" "$n"; do
  n=$((n + 1))
  [ $n -lt 128 ] || fail "128 MiB fit on a 48 MiB backend"
done
grep -q 'No space left on device' /tmp/dd.err || fail "a write to the full backend failed with: $(cat /tmp/dd.err)"
echo "archip-full: the backend filled after $n MiB of filler: $(cat /tmp/dd.err | head -n 1)"
# A new block of the other device: ENOSPC too.
if wr /tmp/chunk "$dev" 8; then fail "a write to a new block succeeded on a full backend"; fi
grep -q 'No space left on device' /tmp/dd.err || fail "disk's write on the full backend failed with: $(cat /tmp/dd.err)"
# The flushed pattern reads back intact while the backend is full.
dd if="$dev" of=/tmp/back bs=1M count=4 iflag=direct 2>/dev/null || fail "read on a full backend"
cmp /tmp/before /tmp/back || fail "flushed data differs while the backend is full"

# Free space: drop the filler and collect its objects.
$A unmap "$fdev"
$A volume delete filler
$A gc --grace 0 || fail "gc failed"
df -k /mnt/full

# Writes go on, on the same device, and nothing flushed before is lost.
wr /tmp/chunk "$dev" 8 || fail "write after freeing space: $(cat /tmp/dd.err)"
wr /tmp/chunk "$dev" 15 || fail "write after freeing space: $(cat /tmp/dd.err)"
dd if="$dev" of=/tmp/back bs=1M count=4 iflag=direct 2>/dev/null
cmp /tmp/before /tmp/back || fail "data flushed before the backend filled is lost"
for b in 8 15; do
  dd if="$dev" of=/tmp/back1 bs=1M skip=$b count=1 iflag=direct 2>/dev/null
  cmp /tmp/chunk /tmp/back1 || fail "block $b written after freeing space differs"
done
# The same through the peers, bypassing the device.
$A export disk /tmp/export.raw
dd if=/tmp/export.raw of=/tmp/back bs=1M count=4 2>/dev/null
cmp /tmp/before /tmp/back || fail "archip export differs from what was flushed"

$A unmap "$dev"
kill -TERM $UP
wait $UP || fail "up did not exit cleanly"
echo "archip-full: PASS"
