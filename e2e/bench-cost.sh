#!/usr/bin/env bash
# bench-cost.sh - machine instructions per 4 KiB I/O through the volume path, against
# pread/pwrite on the same object files, counted by valgrind's callgrind (repeatable on a
# noisy machine, unlike time or cycles; this machine's kernel exposes no hardware counters).
#
# usage: bench-cost.sh [-h|--help] [IOS]
#
# For each QD1 scenario of `archip bench cost` (reads and writes: volume client, xseg port
# from a plain thread as the ublk queue does, and the pread/pwrite baseline) it
# runs the release binary under callgrind twice, with IOS and 2*IOS I/Os (default 2000), and
# reports (Ir(2*IOS) - Ir(IOS)) / IOS: set-up, fill and tear-down cancel out, what is left is
# the steady-state cost of one I/O, summed over every thread of the process (client, vlmc,
# blocker, runtime). xseg ports do not spin here (ARCHIP_XSEG_BUSY_NS=0, ARCHIP_XSEG_SPIN_NS=0):
# under callgrind threads run one at a time, so a spinning wait would count instructions that
# depend on scheduling, not on the data path. Prints one JSON object with the ratio per pair.
# Installs valgrind with apt-get when run as root, else prints the line to run.
# ARCHIP_BENCH_BIN=/path/to/archip measures that binary instead of building this tree's.
set -euo pipefail

case "${1:-}" in -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;; esac
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
IOS=${1:-2000}
[[ $IOS =~ ^[1-9][0-9]*$ ]] || { echo "bench-cost: IOS must be a positive number" >&2; exit 2; }

if ! command -v valgrind >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends valgrind >/dev/null
  else
    echo "bench-cost: needs valgrind: sudo apt-get install valgrind" >&2
    exit 1
  fi
fi
# ARCHIP_BENCH_BIN: an archip binary to measure instead of building this tree's (to compare two
# builds, e.g. before and after a change, with the same script).
if [[ -n ${ARCHIP_BENCH_BIN:-} ]]; then
  BIN=$ARCHIP_BENCH_BIN
else
  (cd "$ROOT" && cargo build --release -q -p archipelago --bin archip)
  BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/archip
fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/archip-bench-cost.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# Total instructions of one run (every thread) of scenario $1 with $2 I/Os.
instructions() {
  local out="$WORK/cg.$1.$2"
  ARCHIP_XSEG_BUSY_NS=0 ARCHIP_XSEG_SPIN_NS=0 valgrind -q --tool=callgrind \
    --callgrind-out-file="$out" "$BIN" bench cost --ios "$2" --only "$1" --dir "$WORK/scratch" >/dev/null
  sed -n 's/^summary: *\([0-9]*\).*/\1/p' "$out" | head -n 1
}

per_io() {
  local a b
  a=$(instructions "$1" "$IOS")
  b=$(instructions "$1" $((IOS * 2)))
  echo $(( (b - a) / IOS ))
}

declare -A ir
for s in volume-read-qd1 port-read-qd1 pread-qd1 volume-write-qd1 port-write-qd1 pwrite-qd1; do
  ir[$s]=$(per_io "$s")
  echo "bench-cost: $s: ${ir[$s]} instructions per I/O" >&2
done
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.1f", a / b; else print "null" }'; }
printf '{"bench":"cost-instructions","ios":%d,"read":{"ours":%d,"port":%d,"pread":%d,"ratio":%s,"port_ratio":%s},"write":{"ours":%d,"port":%d,"pwrite":%d,"ratio":%s,"port_ratio":%s}}\n' \
  "$IOS" "${ir[volume-read-qd1]}" "${ir[port-read-qd1]}" "${ir[pread-qd1]}" \
  "$(ratio "${ir[volume-read-qd1]}" "${ir[pread-qd1]}")" "$(ratio "${ir[port-read-qd1]}" "${ir[pread-qd1]}")" \
  "${ir[volume-write-qd1]}" "${ir[port-write-qd1]}" "${ir[pwrite-qd1]}" \
  "$(ratio "${ir[volume-write-qd1]}" "${ir[pwrite-qd1]}")" "$(ratio "${ir[port-write-qd1]}" "${ir[pwrite-qd1]}")"
