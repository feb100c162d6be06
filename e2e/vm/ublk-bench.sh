#!/usr/bin/env bash
# ublk-bench.sh - fio on a ublk-mapped volume vs a loop device, in the VM, same run.
#
# usage: ublk-bench.sh [-h|--help] [SUITE]      (default bookworm-backports = 6.12)
#
# Builds archip-ublk-test (release), boots the VM (ARCHIP_BENCH_CPUS vCPUs, default 1: under
# TCG a second vCPU makes every ublk request a cross-vCPU wake-up, see e2e/README.md) and runs
# suites/ublk-bench-guest.sh: 4 KiB random read/write at iodepth 32 and 1 MiB sequential
# read/write (io_uring, O_DIRECT) on /dev/ublkbN and on a loop device over a file on the same
# tmpfs that holds the volume's objects. Prints one JSON object with both sides and the
# ublk/loop ratios on stdout. TCG numbers are slow in absolute terms; the ratio is the figure.
# ARCHIP_BENCH_SIZE_MIB (default 128), ARCHIP_BENCH_RUNTIME (s per job, default 6);
# ARCHIP_XSEG_BUSY_NS / ARCHIP_XSEG_SPIN_NS are passed to the guest when set.
set -euo pipefail

case "${1:-}" in -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;; esac
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
SUITE=${1:-bookworm-backports}
(cd "$ROOT" && cargo build --release -q -p node --bin archip-ublk-test)
# The xseg wait policy (spin before sleeping) can be tuned for the run.
ENVS=()
for v in ARCHIP_XSEG_BUSY_NS ARCHIP_XSEG_SPIN_NS; do
  [ -z "${!v:-}" ] || ENVS+=(--env "$v=${!v}")
done
out=$(mktemp)
trap 'rm -f "$out"' EXIT
rc=0
"$HERE/run-in-vm.sh" --suite "$SUITE" --cpus "${ARCHIP_BENCH_CPUS:-1}" --mem 2G --timeout 900 \
  "${ENVS[@]}" --bin "$ROOT/target/release/archip-ublk-test" --file "$HERE/suites/ublk-bench-guest.sh" \
  -- sh /root/ublk-bench-guest.sh "${ARCHIP_BENCH_SIZE_MIB:-128}" "${ARCHIP_BENCH_RUNTIME:-6}" \
  >"$out" 2>&1 || rc=$?
tr -d '\r' <"$out" | grep '^ublk-bench:' >&2 || true
json=$(tr -d '\r' <"$out" | sed -n 's/^BENCH-JSON: //p')
if [ "$rc" != 0 ] || [ -z "$json" ]; then
  tr -d '\r' <"$out" | tail -n 40 >&2
  echo "ublk-bench: failed (status $rc)" >&2
  exit 1
fi
echo "$json"
