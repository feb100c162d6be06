#!/bin/sh
# ublk-guest.sh - runs INSIDE the VM (busybox sh), called by e2e/vm/ublk-suite.sh:
#   run-in-vm.sh --cpus 2 --mem 2G --bin archip-ublk-test --file ublk-guest.sh -- sh /root/ublk-guest.sh
# A peer set (blocker, mapper, vlmc) runs in one process; each mapped volume gets its own
# server process (`archip-ublk-test map`, the same library calls as `archip map`). Checks:
#   raw volume: queue limits, O_DIRECT data through the device == VolumeClient's view (both
#     ways), DISCARD and WRITE_ZEROES turn whole blocks into ZERO entries;
#   ext4: mkfs, mount, files, sync, snapshot, clone, map the clone (per-tag-buffer copy path),
#     files verify, clone writes do not leak into the origin; fstrim turns freed blocks ZERO;
#   restart: kill -9 of a device server under a write+fsync load, device stays, recover,
#     the load completes, ext4 stays rw with no I/O errors, every file verifies;
#     then kill -9 of the peer set AND every server at once (a node-pod restart), same checks;
#   online resize (7.x: the device grows; 6.12: refused as unsupported);
#   whole-device read == VolumeClient dump; unmap removes every device.
# Prints "ublk-guest: PASS" and exits 0 on success.
set -u
export ARCHIP_SEGMENT=/run/archip/seg ARCHIP_UBLK_STATE=/run/archip/state.json RUST_LOG=${RUST_LOG:-info,libublk=warn}
A=archip-ublk-test
T0=$(cut -d' ' -f1 /proc/uptime)
step() { echo "ublk-guest: [$(awk -v a="$T0" -v b="$(cut -d' ' -f1 /proc/uptime)" 'BEGIN{printf "%6.2f", b-a}')s] $*"; }
fail() {
  echo "ublk-guest: FAIL: $*"
  for f in /run/archip/*.log /tmp/peers.log; do [ -f "$f" ] && { echo "--- $f"; tail -n 30 "$f"; }; done
  dmesg | tail -n 30
  exit 1
}
info() { $A info "$1" || fail "info $1"; }
field() { sed -n "s/.*\"$1\":\([0-9]*\).*/\1/p"; }   # a numeric JSON field
dev_of() { $A showmapped | grep "\"volume\":\"$1\"" | sed -n 's/.*"device":"\([^"]*\)".*/\1/p'; }
pid_of() { $A showmapped | grep "\"volume\":\"$1\"" | field pid; }
state_of() { $A showmapped | grep "\"volume\":\"$1\"" | sed -n 's/.*"state":"\([^"]*\)".*/\1/p'; }
io_errors() { dmesg | grep -E -i 'EXT4-fs (error|warning)|I/O error|Remounting filesystem read-only|Buffer I/O' ; }

mkdir -p /run/archip /tmp/data /mnt/a /mnt/c
start_peers() {
  rm -f /tmp/peers.fifo; mkfifo /tmp/peers.fifo
  $A peers --data /tmp/data >/tmp/peers.fifo 2>>/tmp/peers.log &
  PEERS=$!
  read -r line </tmp/peers.fifo || fail "peers did not start"
  case "$line" in READY*) ;; *) fail "peers: $line" ;; esac
}
FEAT=$($A features) || fail "no ublk features"
step "kernel $(uname -r), $(nproc) cpus, ublk features $FEAT"
start_peers
step "peer set up (pid $PEERS)"

# ---------------------------------------------------------------- raw volume
$A create raw 64M --block-size 1M >/dev/null || fail "create raw"
RAW=$($A map raw --queues 2 --depth 64 --block-size 4096) || fail "map raw"
[ -b "$RAW" ] || fail "$RAW is not a block device"
R=$(basename "$RAW")
q=/sys/block/$R/queue
[ "$(cat $q/logical_block_size)" = 4096 ] || fail "logical block size $(cat $q/logical_block_size)"
[ "$(cat /sys/block/$R/size)" = $((64 * 2048)) ] || fail "size $(cat /sys/block/$R/size) sectors"
[ "$(cat $q/discard_granularity)" = 4096 ] || fail "discard granularity $(cat $q/discard_granularity)"
[ "$(cat $q/discard_max_bytes)" -gt 0 ] || fail "no discard"
[ "$(cat $q/write_zeroes_max_bytes)" -gt 0 ] || fail "no write zeroes"
grep -q "write back" $q/write_cache || fail "write cache not advertised (FLUSH would not be sent)"
nq=$(ls /sys/block/$R/mq | wc -l); want=2; [ "$(nproc)" -lt 2 ] && want=1
[ "$nq" = "$want" ] || fail "$nq hardware queues, wanted $want"
[ "$(cat /sys/block/$R/mq/0/nr_tags)" = 64 ] || fail "queue depth $(cat /sys/block/$R/mq/0/nr_tags)"
step "ok: $RAW: 64 MiB, lbs 4096, $nq queues x 64, discard/write-zeroes/flush advertised"

dd if=/dev/urandom of=/tmp/pat bs=1M count=16 2>/dev/null
dd if=/tmp/pat of="$RAW" bs=1M seek=8 oflag=direct conv=fsync 2>/dev/null || fail "dd write"
$A dump raw /tmp/back --offset 8M --len 16M || fail "dump"
cmp /tmp/pat /tmp/back || fail "device write != VolumeClient read"
dd if=/dev/urandom of=/tmp/pat2 bs=1M count=4 2>/dev/null
$A load raw /tmp/pat2 --offset 40M || fail "load"
dd if="$RAW" of=/tmp/back2 bs=1M skip=40 count=4 iflag=direct 2>/dev/null || fail "dd read"
cmp /tmp/pat2 /tmp/back2 || fail "VolumeClient write != device read"
step "ok: O_DIRECT writes through $RAW read back by VolumeClient and vice versa (20 MiB)"

z0=$(info raw | field zero); o0=$(info raw | field owned)
[ "$o0" -ge 20 ] || fail "only $o0 owned blocks after writing 20 MiB"
blkdiscard -o $((8 << 20)) -l $((8 << 20)) "$RAW" || fail "blkdiscard"
z1=$(info raw | field zero)
[ "$z1" -eq $((z0 + 8)) ] || fail "discard of 8 blocks: zero entries $z0 -> $z1"
$A zeroout "$RAW" 16M 4M || fail "BLKZEROOUT (write zeroes)"
z2=$(info raw | field zero)
[ "$z2" -eq $((z1 + 4)) ] || fail "write-zeroes of 4 blocks: zero entries $z1 -> $z2"
dd if="$RAW" of=/tmp/z bs=1M skip=8 count=12 iflag=direct 2>/dev/null
dd if=/dev/zero of=/tmp/zz bs=1M count=12 2>/dev/null
cmp /tmp/z /tmp/zz || fail "discarded range does not read as zeros"
dd if="$RAW" of=/tmp/back bs=1M skip=20 count=4 iflag=direct 2>/dev/null
dd if=/tmp/pat of=/tmp/tail bs=1M skip=12 count=4 2>/dev/null
cmp /tmp/back /tmp/tail || fail "data next to the discarded range changed"
step "ok: blkdiscard: 8 blocks -> ZERO ($z0 -> $z1), write-zeroes: 4 more ($z2), reads zeros, neighbours intact"
rm -f /tmp/pat /tmp/pat2 /tmp/back /tmp/back2 /tmp/z /tmp/zz /tmp/tail

# ---------------------------------------------------------------- ext4, snapshot, clone
$A create vol1 128M >/dev/null || fail "create vol1"
D1=$($A map vol1) || fail "map vol1"
mkfs.ext4 -q -F "$D1" || fail "mkfs.ext4 $D1"
mount -t ext4 "$D1" /mnt/a || fail "mount $D1"
i=0
while [ $i -lt 8 ]; do
  dd if=/dev/urandom of=/mnt/a/f$i bs=64k count=$((8 + i * 4)) 2>/dev/null || fail "write f$i"
  i=$((i + 1))
done
mkdir /mnt/a/dir && echo "hello archipelago" >/mnt/a/dir/hello
(cd /mnt/a && md5sum f* dir/hello >/tmp/sums)
sync
step "ok: mkfs.ext4 + mount $D1, 8 files ($(du -sk /mnt/a | cut -f1) KiB) written and synced"

$A snapshot vol1 snap1 || fail "snapshot"
$A clone snap1 clone1 || fail "clone"
DC=$($A map clone1 --no-user-copy) || fail "map clone1"
mount -t ext4 "$DC" /mnt/c || fail "mount the clone"
(cd /mnt/c && md5sum -c /tmp/sums >/dev/null) || fail "clone files differ"
echo "clone only" >/mnt/c/clone-only && dd if=/dev/urandom of=/mnt/c/f0 bs=64k count=8 conv=notrunc 2>/dev/null
sync
[ ! -e /mnt/a/clone-only ] || fail "clone write visible in the origin"
echo 3 >/proc/sys/vm/drop_caches
(cd /mnt/a && md5sum -c /tmp/sums >/dev/null) || fail "origin changed by writes to its clone"
step "ok: snapshot + clone + map $DC (copy path): files verify, clone writes stay in the clone"

mid=$(info vol1); zm=$(echo "$mid" | field zero)
dd if=/dev/urandom of=/mnt/a/big bs=1M count=48 conv=fsync 2>/dev/null || fail "write big"
zw=$(info vol1 | field zero)
rm /mnt/a/big && sync
fstrim -v /mnt/a || fail "fstrim"
zt=$(info vol1 | field zero)
[ "$zt" -gt "$zw" ] || fail "fstrim freed no block: zero entries $zm -> $zw (48 MiB written) -> $zt"
(cd /mnt/a && md5sum -c /tmp/sums >/dev/null) || fail "files damaged by fstrim"
step "ok: fstrim: zero entries $zm -> $zw after a 48 MiB file -> $zt after rm + fstrim"

# ---------------------------------------------------------------- restart: server only
writer() {  # $1 = name prefix; writes + fsyncs 16 files, records their sums
  j=0
  while [ $j -lt 16 ]; do
    dd if=/dev/urandom of=/mnt/a/$1$j bs=64k count=4 conv=fsync 2>/dev/null || exit 1
    (cd /mnt/a && md5sum $1$j) >>/tmp/sums.$1 || exit 1
    j=$((j + 1))
  done
}
check_fs() {  # $1 = what happened
  grep " /mnt/a " /proc/mounts | grep -q " rw," || fail "$1: /mnt/a is no longer rw: $(grep /mnt/a /proc/mounts)"
  [ -z "$(io_errors)" ] || fail "$1: kernel reported errors: $(io_errors)"
  echo "after $1" >/mnt/a/after && sync || fail "$1: cannot write after recovery"
  echo 3 >/proc/sys/vm/drop_caches
  (cd /mnt/a && md5sum -c /tmp/sums /tmp/sums.* >/dev/null) || fail "$1: files differ after recovery"
}
OLD=$(pid_of vol1)
[ -n "$OLD" ] || fail "no server pid for vol1"
writer w &
W=$!
dd if=/dev/urandom of=/mnt/a/pre bs=64k count=16 conv=fsync 2>/dev/null   # keep I/O flowing
kill -9 "$OLD" || fail "kill -9 $OLD"
tk=$(cut -d' ' -f1 /proc/uptime)
[ -b "$D1" ] || fail "$D1 vanished with its server"
st=$(state_of vol1)
case "$st" in live|quiesced) ;; *) fail "state after kill: '$st'" ;; esac
REC=$($A recover) || fail "recover"
echo "$REC" | grep -q "$D1" || fail "recover did not restart $D1 ($REC)"
wait $W || fail "writer failed across the restart"
tr=$(awk -v a="$tk" -v b="$(cut -d' ' -f1 /proc/uptime)" 'BEGIN{printf "%.2f", b-a}')
NEW=$(pid_of vol1)
[ "$NEW" != "$OLD" ] || fail "still the old server"
[ "$(state_of vol1)" = live ] || fail "state after recover: $(state_of vol1)"
check_fs "kill -9 of the vol1 server"
step "ok: kill -9 server $OLD under write+fsync load: $D1 stayed (state $st), recovered by $NEW, load done ${tr}s after the kill, ext4 rw, all files verify"

# ---------------------------------------------------------------- restart: everything
writer x &
W=$!
dd if=/dev/urandom of=/mnt/a/pre2 bs=64k count=16 conv=fsync 2>/dev/null
PIDS="$PEERS $(pid_of vol1) $(pid_of clone1) $(pid_of raw)"
kill -9 $PIDS || fail "kill -9 $PIDS"
wait "$PEERS" 2>/dev/null
tk=$(cut -d' ' -f1 /proc/uptime)
for d in "$D1" "$DC" "$RAW"; do [ -b "$d" ] || fail "$d vanished"; done
start_peers
REC=$($A recover) || fail "recover after the node restart"
[ "$(echo "$REC" | wc -l)" = 3 ] || fail "recover restarted: $REC"
wait $W || fail "writer failed across the node restart"
tr=$(awk -v a="$tk" -v b="$(cut -d' ' -f1 /proc/uptime)" 'BEGIN{printf "%.2f", b-a}')
check_fs "kill -9 of the peer set and all servers"
(cd /mnt/c && [ "$(cat clone-only)" = "clone only" ]) || fail "clone lost its file"
step "ok: kill -9 of peers + 3 servers ($PIDS): devices stayed, peers restarted, 3 recovered, load done ${tr}s after the kill, ext4 rw, files verify"

# ---------------------------------------------------------------- online resize
if echo "$FEAT" | grep -q UPDATE_SIZE; then
  $A resize raw 96M || fail "resize raw"
  [ "$(cat /sys/block/$R/size)" = $((96 * 2048)) ] || fail "device size after resize: $(cat /sys/block/$R/size)"
  dd if=/dev/urandom of=/tmp/pat bs=1M count=4 2>/dev/null
  dd if=/tmp/pat of="$RAW" bs=1M seek=90 oflag=direct conv=fsync 2>/dev/null || fail "write past the old end"
  $A dump raw /tmp/back --offset 90M --len 4M && cmp /tmp/pat /tmp/back || fail "data past the old end"
  step "ok: online resize 64 -> 96 MiB (UPDATE_SIZE), I/O beyond the old end"
else
  rc=0; $A resize raw 96M || rc=$?
  [ $rc = 3 ] || fail "resize without UPDATE_SIZE: exit $rc, wanted 3 (unsupported)"
  [ "$(cat /sys/block/$R/size)" = $((64 * 2048)) ] || fail "device size changed without UPDATE_SIZE"
  step "ok: online resize refused as unsupported (no UPDATE_SIZE on $(uname -r)); volume grown, device unchanged"
fi

# ---------------------------------------------------------------- whole device == volume
umount /mnt/c || fail "umount clone"
umount /mnt/a || fail "umount vol1"
dd if="$D1" of=/tmp/dev.img bs=1M iflag=direct 2>/dev/null || fail "read $D1"
$A dump vol1 /tmp/vol.img || fail "dump vol1"
cmp /tmp/dev.img /tmp/vol.img || fail "$D1 != vol1 as VolumeClient reads it"
rm -f /tmp/dev.img /tmp/vol.img
step "ok: all 128 MiB of $D1 == VolumeClient's vol1"

grep -h '"user_copy_bytes"' /run/archip/*.log | sed 's/.*stats=//' | tail -n 3
for v in vol1 clone1 raw; do $A unmap $v || fail "unmap $v"; done
[ -z "$($A showmapped)" ] || fail "still mapped: $($A showmapped)"
ls /dev/ublkb* >/dev/null 2>&1 && fail "devices left: $(ls /dev/ublkb*)"
grep -h 'device stopped' /run/archip/*.log | sed 's/.*stats=//'
kill "$PEERS"
step "ok: unmapped all, no /dev/ublkb* left"
echo "ublk-guest: PASS"
