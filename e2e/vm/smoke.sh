#!/usr/bin/env bash
# smoke.sh - self-check of the VM harness on each supported kernel.
#
# usage: smoke.sh [-h|--help] [SUITE...]
#
# For each Debian suite (default: bookworm-backports trixie-backports, i.e. the
# 6.12 LTS kernel and the newest 7.x), boots the VM with run-in-vm.sh and runs
# guest-smoke.sh inside: /dev/ublk-control must exist, and mkfs.ext4 (and
# mkfs.xfs) + mount of a loop device, remount, read back, fstrim, blkdiscard
# and fio must work. Prints the wall time of each boot and a summary; exits 0
# only if every suite passed. Run-in-vm.sh options can be passed through
# ARCHIP_VM_SMOKE_ARGS (e.g. "--timeout 600").
set -euo pipefail

case "${1:-}" in -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;; esac
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
[ $# -gt 0 ] || set -- bookworm-backports trixie-backports
read -r -a EXTRA <<<"${ARCHIP_VM_SMOKE_ARGS:-}"

summary=() failed=0
for suite in "$@"; do
    echo "=== vm smoke: $suite" >&2
    t0=${EPOCHREALTIME/./}
    rc=0
    "$HERE/run-in-vm.sh" "${EXTRA[@]}" --suite "$suite" --timeout 300 \
        --file "$HERE/guest-smoke.sh" -- sh /root/guest-smoke.sh || rc=$?
    d=$(( ${EPOCHREALTIME/./} - t0 ))
    wall=$(printf '%d.%02d' $((d / 1000000)) $((d % 1000000 / 10000)))
    if [ "$rc" = 0 ]; then r=PASS; else r="FAIL (status $rc)"; failed=1; fi
    summary+=("$suite: $r, wall ${wall}s")
done
echo "=== vm smoke summary" >&2
printf '  %s\n' "${summary[@]}" >&2
exit "$failed"
