#!/bin/sh
# ublk-bench-guest.sh - runs INSIDE the VM, called by e2e/vm/ublk-bench.sh.
# fio (io_uring, O_DIRECT) on /dev/ublkbN (a volume served by the peer set, objects on tmpfs)
# vs a loop device over a file on the same tmpfs, in the same boot, same data, same jobs:
#   4 KiB random read and write at iodepth 32, 1 MiB sequential read and write at iodepth 8.
# Prints one line "BENCH-JSON: {...}" with both sides and the ublk/loop ratios.
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
UB=$($A map bench --queues "$(nproc)" --depth 64) || fail "map"
dd if=/dev/zero of=/tmp/loop.img bs=1M count=0 seek="$SIZE_MIB" 2>/dev/null
LO=$(losetup -f) && losetup "$LO" /tmp/loop.img || fail "losetup"
# Same data on both, so reads hit real objects / real pages rather than holes.
dd if=/dev/urandom of=/tmp/fill bs=1M count=16 2>/dev/null
for d in "$UB" "$LO"; do
  i=0; while [ $i -lt "$SIZE_MIB" ]; do
    dd if=/tmp/fill of="$d" bs=1M seek=$i oflag=direct conv=notrunc 2>/dev/null || fail "fill $d"
    i=$((i + 16))
  done
done
rm -f /tmp/fill; sync; echo 3 >/proc/sys/vm/drop_caches
echo "ublk-bench: kernel $(uname -r), $(nproc) cpus, $UB vs $LO (${SIZE_MIB} MiB each, filled)"

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
  u=$(run "$1" "$1" "$2" "$3" "$UB"); l=$(run "$1" "$1" "$2" "$3" "$LO")
  ui=${u% *} ub=${u#* } li=${l% *} lb=${l#* }
  r=$(awk -v a="$ui" -v b="$li" 'BEGIN{ if (b > 0) printf "%.3f", a/b; else print "null" }')
  echo "ublk-bench: $1 bs=$2 qd=$3: ublk $ui IOPS ($ub MiB/s), loop $li IOPS ($lb MiB/s), ratio $r"
  json="$json\"$1_$2\":{\"ublk_iops\":$ui,\"ublk_mibs\":$ub,\"loop_iops\":$li,\"loop_mibs\":$lb,\"ratio\":$r},"
done
grep -h 'stats=' /run/archip/*.log >/dev/null 2>&1
$A unmap bench || fail "unmap"
losetup -d "$LO"
echo "BENCH-JSON: {\"kernel\":\"$(uname -r)\",\"cpus\":$(nproc),\"size_mib\":$SIZE_MIB,\"runtime_s\":$RUNTIME,\"backing\":\"tmpfs\",${json%,}}"
