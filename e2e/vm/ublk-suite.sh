#!/usr/bin/env bash
# ublk-suite.sh - the ublk frontend's end-to-end suite, in a VM, on each supported kernel.
#
# usage: ublk-suite.sh [-h|--help] [SUITE...]
#
# Builds `archip-ublk-test` (node/src/bin: the ublk CLI functions `archip map/unmap/
# showmapped/recover` call, plus a peer-set runner and volume operations) and node's
# `ublk_device` test binary (release), then for each Debian suite (default:
# bookworm-backports = 6.12 LTS, trixie-backports = newest 7.x) boots the VM twice:
#   1. suites/ublk-guest.sh: raw I/O both ways, discard/write-zeroes -> ZERO entries, ext4 +
#      snapshot + clone + verify, fstrim, kill -9 of a server and of the whole node under
#      load + recover, online resize (7.x) or its refusal (6.12), whole-device compare, unmap;
#   2. the ublk_device test binary (in-process device over an in-process peer set, user copy
#      and copy fallback).
# 2 vCPUs, so that the devices really get 2 hardware queues (the kernel caps queues at the
# CPU count). Prints the wall time per kernel and a summary; exits 0 only if all passed.
# Run-in-vm.sh options can be added through ARCHIP_VM_SUITE_ARGS (e.g. "--timeout 900").
set -euo pipefail

case "${1:-}" in -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;; esac
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
[ $# -gt 0 ] || set -- bookworm-backports trixie-backports
read -r -a EXTRA <<<"${ARCHIP_VM_SUITE_ARGS:-}"

now() { echo "${EPOCHREALTIME/./}"; }
secs() { local d=$(( $(now) - $1 )); printf '%d.%02d' $((d / 1000000)) $((d % 1000000 / 10000)); }

t=$(now)
echo "=== ublk suite: building (release)" >&2
(cd "$ROOT" && cargo build --release -q -p node --bin archip-ublk-test && cargo build --release -q -p archipelago --bin archip)
TESTBIN=$(cd "$ROOT" && cargo test --release -q -p node --test ublk_device --no-run --message-format=json 2>/dev/null |
  grep '"name":"ublk_device"' | grep '"kind":\["test"\]' | grep -o '"executable":"[^"]*"' | sed 's/"executable":"\(.*\)"/\1/' | tail -n 1)
[ -x "$TESTBIN" ] || { echo "ublk-suite: no ublk_device test binary" >&2; exit 1; }
CSIBIN=$(cd "$ROOT" && cargo test --release -q -p node --test csi_node --no-run --message-format=json 2>/dev/null |
  grep '"name":"csi_node"' | grep '"kind":\["test"\]' | grep -o '"executable":"[^"]*"' | sed 's/"executable":"\(.*\)"/\1/' | tail -n 1)
[ -x "$CSIBIN" ] || { echo "ublk-suite: no csi_node test binary" >&2; exit 1; }
echo "=== ublk suite: built in $(secs "$t")s" >&2

summary=() failed=0
for suite in "$@"; do
  for part in guest tests cli; do
    echo "=== ublk suite: $suite: $part" >&2
    t=$(now) rc=0
    if [ "$part" = guest ]; then
      "$HERE/run-in-vm.sh" "${EXTRA[@]}" --suite "$suite" --cpus 2 --mem 2G --timeout 900 \
        --bin "$TARGET/release/archip-ublk-test" --file "$HERE/suites/ublk-guest.sh" \
        -- sh /root/ublk-guest.sh || rc=$?
    elif [ "$part" = tests ]; then
      "$HERE/run-in-vm.sh" "${EXTRA[@]}" --suite "$suite" --cpus 2 --mem 2G --timeout 600 \
        --no-tools --runner "$TESTBIN" --test-threads=1 || rc=$?
      # and the CSI Node service (stage/publish over gRPC; device servers: archip-ublk-test).
      "$HERE/run-in-vm.sh" "${EXTRA[@]}" --suite "$suite" --cpus 2 --mem 2G --timeout 600 \
        --bin "$ROOT/target/release/archip-ublk-test" --bin "$(command -v resize2fs)" \
        --bin "$(command -v xfs_growfs)" --runner "$CSIBIN" --test-threads=1 || rc=$?
    else
      # 3. the `archip` CLI itself: up, map, I/O, kill -9 + recover, unmap.
      "$HERE/run-in-vm.sh" "${EXTRA[@]}" --suite "$suite" --cpus 2 --mem 2G --timeout 600 \
        --bin "$TARGET/release/archip" --file "$HERE/suites/archip-cli-guest.sh" \
        -- sh /root/archip-cli-guest.sh || rc=$?
    fi
    if [ "$rc" = 0 ]; then r=PASS; else r="FAIL (status $rc)"; failed=1; fi
    summary+=("$suite $part: $r, wall $(secs "$t")s")
  done
done
echo "=== ublk suite summary" >&2
printf '  %s\n' "${summary[@]}" >&2
exit "$failed"
