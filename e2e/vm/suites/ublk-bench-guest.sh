#!/bin/sh
# ublk-bench-guest.sh - runs INSIDE the VM, called by e2e/vm/ublk-bench.sh.
# fio (io_uring, O_DIRECT) on /dev/ublkbN (a volume served by the peer set, objects on tmpfs)
# vs a loop device over a file on the same tmpfs, in the same boot, same data, same jobs:
#   4 KiB random read and write at iodepth 32, 1 MiB sequential read and write at iodepth 8.
# A second volume is mapped with ARCHIP_UBLK_REPLY_THREAD=1 (replies through a receiver thread
# per queue, the way before the queue took them itself): its figures and the own/thread ratio
# show what that change is worth, in the same boot.
# Prints one line "BENCH-JSON: {...}" with all three and the ublk/loop ratios.
set -u
SIZE_MIB=${1:-128} RUNTIME=${2:-6}
export ARCHIP_SEGMENT=/run/archip/seg ARCHIP_UBLK_STATE=/run/archip/state.json RUST_LOG=warn
A=archip-ublk-test
fail() { echo "ublk-bench: FAIL: $*"; tail -n 20 /run/archip/*.log /tmp/peers.log 2>/dev/null; exit 1; }
mkdir -p /run/archip /tmp/data
mkfifo /tmp/peers.fifo
$A peers --data /tmp/data >/tmp/peers.fifo 2>/tmp/peers.log &
read -r line </tmp/peers.fifo || fail "peers"
$A create bench "${SIZE_MIB}M" >/dev/null || fail "create"
$A create bench-rx "${SIZE_MIB}M" >/dev/null || fail "create"
UB=$($A map bench --queues "$(nproc)" --depth 64) || fail "map"
RX=$(ARCHIP_UBLK_REPLY_THREAD=1 $A map bench-rx --queues "$(nproc)" --depth 64) || fail "map"
# Which way the queues take their replies: a receiver thread is named ublk-rx-<dev>-<queue>,
# so only the second device's queues should have one.
rx=$(cat /proc/[0-9]*/task/*/comm 2>/dev/null | grep -c '^ublk-rx-')
echo "ublk-bench: receiver threads running: $rx (the receiver-thread device has $(nproc) queues, the other none)"
dd if=/dev/zero of=/tmp/loop.img bs=1M count=0 seek="$SIZE_MIB" 2>/dev/null
LO=$(losetup -f) && losetup "$LO" /tmp/loop.img || fail "losetup"
# Same data on both, so reads hit real objects / real pages rather than holes.
dd if=/dev/urandom of=/tmp/fill bs=1M count=16 2>/dev/null
for d in "$UB" "$RX" "$LO"; do
  i=0; while [ $i -lt "$SIZE_MIB" ]; do
    dd if=/tmp/fill of="$d" bs=1M seek=$i oflag=direct conv=notrunc 2>/dev/null || fail "fill $d"
    i=$((i + 16))
  done
done
rm -f /tmp/fill; sync; echo 3 >/proc/sys/vm/drop_caches
echo "ublk-bench: kernel $(uname -r), $(nproc) cpus, $UB (and $RX with a receiver thread) vs $LO (${SIZE_MIB} MiB each, filled)"

# job name, rw, bs, iodepth -> prints "iops MiB/s" (terse v3: read fields 7/8, write 48/49)
run() {
  out=$(fio --name="$1" --filename="$5" --rw="$2" --bs="$3" --iodepth="$4" --direct=1 \
    --ioengine=io_uring --runtime="$RUNTIME" --ramp_time=1 --time_based --size="${SIZE_MIB}M" \
    --output-format=terse --terse-version=3 2>/dev/null) || fail "fio $1 on $5"
  echo "$out" | awk -F';' -v rw="$2" '{ if (rw ~ /write/) { b=$48; i=$49 } else { b=$7; i=$8 }
    printf "%.0f %.1f\n", i, b/1024 }'
}
json=""
for job in "randread 4k 32" "randwrite 4k 32" "read 1M 8" "write 1M 8"; do
  set -- $job
  u=$(run "$1" "$1" "$2" "$3" "$UB"); x=$(run "$1" "$1" "$2" "$3" "$RX"); l=$(run "$1" "$1" "$2" "$3" "$LO")
  ui=${u% *} ub=${u#* } xi=${x% *} xb=${x#* } li=${l% *} lb=${l#* }
  ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b > 0) printf "%.3f", a/b; else print "null" }'; }
  r=$(ratio "$ui" "$li"); rx=$(ratio "$xi" "$li"); own=$(ratio "$ui" "$xi")
  echo "ublk-bench: $1 bs=$2 qd=$3: ublk $ui IOPS ($ub MiB/s), with a receiver thread $xi IOPS ($xb MiB/s), loop $li IOPS ($lb MiB/s); ublk/loop $r, receiver-thread/loop $rx, own/receiver-thread $own"
  json="$json\"$1_$2\":{\"ublk_iops\":$ui,\"ublk_mibs\":$ub,\"rx_thread_iops\":$xi,\"rx_thread_mibs\":$xb,\"loop_iops\":$li,\"loop_mibs\":$lb,\"ratio\":$r,\"rx_thread_ratio\":$rx,\"own_vs_rx_thread\":$own},"
done
grep -h 'stats=' /run/archip/*.log >/dev/null 2>&1
$A unmap bench || fail "unmap"
$A unmap bench-rx || fail "unmap"
losetup -d "$LO"
echo "BENCH-JSON: {\"kernel\":\"$(uname -r)\",\"cpus\":$(nproc),\"size_mib\":$SIZE_MIB,\"runtime_s\":$RUNTIME,\"backing\":\"tmpfs\",${json%,}}"
