#!/usr/bin/env bash
# ublk-suite.sh - the ublk frontend's end-to-end suite, in a VM, on each supported kernel.
#
# usage: ublk-suite.sh [-h|--help] [SUITE...]
#
# Builds `archip-ublk-test` (node/src/bin: the ublk CLI functions `archip map/unmap/
# showmapped/recover` call, plus a peer-set runner and volume operations), `archip`, and the
# test binaries below (release), then for each Debian suite (default: bookworm-backports =
# 6.12 LTS, trixie-backports = newest 7.x) boots the VM once per part:
#   guest   suites/ublk-guest.sh: raw I/O both ways, discard/write-zeroes -> ZERO entries,
#           ext4 + snapshot + clone + verify, fstrim, kill -9 of a server and of the whole
#           node under load + recover, online resize (7.x) or its refusal (6.12),
#           whole-device compare, unmap;
#   device  node's ublk_device test binary (in-process device over an in-process peer set,
#           user copy and copy fallback);
#   node    node's csi_node test binary: the CSI Node service over gRPC (ext4 and xfs
#           staging, block mode, the publication table per access mode,
#           volume_mount_group, stats, expansion); device servers are archip-ublk-test;
#   cli     suites/archip-cli-guest.sh (the `archip` CLI: up, map, I/O, kill -9 + recover,
#           unmap), then in the same boot the root csi_binary test binary: the real
#           `archip up --csi-endpoint`, and `archip controller` + `archip node`, as child
#           processes driven by a gRPC CSI client (volumes, snapshots, clones, stage/publish
#           in mount and block mode, clean SIGTERM shutdown).
#   full    suites/archip-full-guest.sh: `archip up` on a 48 MiB tmpfs, devices written until
#           the backend is full: writes fail with ENOSPC (not EIO), flushed data stays intact,
#           and after delete + gc writes go on.
#   rados   (not in the default list) suites/archip-rados-guest.sh: `archip` built with
#           --features rados, `archip up --backend rados:...` against a real Ceph cluster on
#           the host: create, map -> /dev/ublkbN, mkfs.ext4, mount, files, snapshot, clone, map
#           the clone, files verify, unmap, delete, gc; then, in the same boot, node's
#           rados_stage test binary (built with --features rados): CSI NodeStage of a RADOS
#           volume with the guest user's node-stage secrets (a wrong key refused), ext4 made
#           and mounted on a ublk device, published, written, unstaged, re-staged with the
#           data intact. The cluster: the one described by
#           ARCHIP_CEPH_CONF/ARCHIP_CEPH_KEYRING/ARCHIP_CEPH_POOL if set (e.g. after
#           `eval "$(e2e/ceph/start-ceph.sh DIR)"`), else a throw-away one started here with
#           e2e/ceph/start-ceph.sh (monitor port ARCHIP_VM_CEPH_PORT, default 40889) and purged
#           at the end. The guest gets a cephx user of its own (`profile rbd`, limited to the
#           pool and one namespace per run) in a 0600 keyring file, never the admin key and
#           never a key in an argument. The cluster stays bound to the host's loopback: the
#           guest's librados connects to the 127.0.0.1:PORT the monmap/osdmap announce, where a
#           socat relay forwards to qemu user-mode networking's 10.0.2.2:PORT = the host's
#           127.0.0.1:PORT (run-in-vm.sh --net). Host needs socat (apt-get installed as root).
# Only the binaries the selected parts run are built.
# ARCHIP_UBLK_PARTS selects parts (default "guest device node cli full"; "tests" = device node),
# e.g. ARCHIP_UBLK_PARTS="node cli" e2e/vm/ublk-suite.sh bookworm-backports.
# ARCHIP_UBLK_FILTER, if set, is passed to the csi_node and csi_binary test binaries as a
# test-name filter (e.g. "xfs").
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

PARTS=${ARCHIP_UBLK_PARTS:-guest device node cli full}
PARTS=${PARTS//tests/device node}
FILTER=()
[ -z "${ARCHIP_UBLK_FILTER:-}" ] || FILTER=("$ARCHIP_UBLK_FILTER")
wants() { case " $PARTS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
# The test binary of `cargo test --release -p $1 --test $2 [$3...]` ($3...: e.g. --features X).
test_binary() {
  local exe
  exe=$(cd "$ROOT" && cargo test --release -q -p "$1" --test "$2" "${@:3}" --no-run --message-format=json 2>/dev/null |
    grep "\"name\":\"$2\"" | grep '"kind":\["test"\]' | grep -o '"executable":"[^"]*"' | sed 's/"executable":"\(.*\)"/\1/' | tail -n 1)
  [ -x "$exe" ] || { echo "ublk-suite: no $2 test binary" >&2; exit 1; }
  echo "$exe"
}

t=$(now)
echo "=== ublk suite: building (release)" >&2
if wants guest || wants node || wants rados; then
  (cd "$ROOT" && cargo build --release -q -p node --bin archip-ublk-test)
fi
if wants rados; then
  # Kept as archip-rados: the plain build below (cli, full) replaces release/archip.
  (cd "$ROOT" && cargo build --release -q -p archipelago --bin archip --features rados)
  cp "$TARGET/release/archip" "$TARGET/release/archip-rados"
fi
if wants cli || wants full; then
  (cd "$ROOT" && cargo build --release -q -p archipelago --bin archip)
fi
TESTBIN='' CSIBIN='' BINTEST='' STAGEBIN=''
if wants device; then TESTBIN=$(test_binary node ublk_device); fi
if wants node; then CSIBIN=$(test_binary node csi_node); fi
if wants cli; then BINTEST=$(test_binary archipelago csi_binary); fi
if wants rados; then STAGEBIN=$(test_binary node rados_stage --features rados); fi
echo "=== ublk suite: built in $(secs "$t")s" >&2

# ------------------------------------------------------------------ the rados part's cluster
RADOS_WORK='' RADOS_OWN='' RADOS_CLIENT='' RADOS_POOL='' RADOS_PORTS='' RADOS_ADMIN=()
rados_cleanup() {
  [ -n "$RADOS_WORK" ] || return 0
  if [ -n "$RADOS_OWN" ]; then
    "$ROOT/e2e/ceph/stop-ceph.sh" "$RADOS_OWN" --purge >&2 || true
  elif [ -n "$RADOS_CLIENT" ]; then
    ceph "${RADOS_ADMIN[@]}" auth rm "$RADOS_CLIENT" >/dev/null 2>&1 || true
  fi
  rm -rf "$RADOS_WORK"
}
# Starts or joins the cluster; writes the guest's ceph.conf and keyring into $RADOS_WORK.
rados_setup() {
  if ! command -v socat >/dev/null; then
    [ "$(id -u)" = 0 ] || { echo "ublk-suite: the rados part needs socat: apt-get install socat" >&2; return 1; }
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends socat >/dev/null
  fi
  RADOS_WORK=$(mktemp -d "${TMPDIR:-/tmp}/archip-vm-rados.XXXXXX")   # 0700: holds a key
  if [ -z "${ARCHIP_CEPH_CONF:-}" ]; then
    RADOS_OWN=$RADOS_WORK/cluster
    local env
    env=$(CEPH_MON_PORT=${ARCHIP_VM_CEPH_PORT:-40889} CEPH_FORCE_NEW=1 "$ROOT/e2e/ceph/start-ceph.sh" "$RADOS_OWN") || return 1
    eval "$env"
  fi
  export CEPH_CONF=$ARCHIP_CEPH_CONF
  RADOS_POOL=${ARCHIP_CEPH_POOL:-archip}
  [ -z "${ARCHIP_CEPH_KEYRING:-}" ] || RADOS_ADMIN=(--keyring "$ARCHIP_CEPH_KEYRING")
  RADOS_CLIENT=client.archip-vm-$$
  # One namespace per suite run (vm-SUITE-PID): the user may touch only those.
  local caps="profile rbd pool=$RADOS_POOL namespace=vm-*"
  ceph "${RADOS_ADMIN[@]}" auth get-or-create "$RADOS_CLIENT" mon 'profile rbd' osd "$caps" \
    -o "$RADOS_WORK/ceph.keyring" >/dev/null
  chmod 600 "$RADOS_WORK/ceph.keyring"
  # What the guest's librados connects to: the monitors' and the OSDs' public ports.
  RADOS_PORTS=$( { ceph "${RADOS_ADMIN[@]}" mon dump -f json; echo; ceph "${RADOS_ADMIN[@]}" osd dump -f json; } | python3 -c '
import json, sys
ports, text, i, docs = set(), sys.stdin.read(), 0, []
while text[i:].strip():
    d, i = json.JSONDecoder().raw_decode(text, len(text) - len(text[i:].lstrip()))
    docs.append(d)
for d in docs:
    addrs = [m["public_addrs"] for m in d.get("mons", [])] + [o["public_addrs"] for o in d.get("osds", [])]
    for a in addrs:
        for v in a["addrvec"]:
            host, port = v["addr"].rsplit(":", 1)
            if host != "127.0.0.1":
                sys.exit("not on loopback: " + v["addr"])
            ports.add(int(port))
print(" ".join(str(p) for p in sorted(ports)))')
  [ -n "$RADOS_PORTS" ] || { echo "ublk-suite: no monitor/OSD ports found" >&2; return 1; }
  {
    echo "[global]"
    grep -E '^mon host *=' "$ARCHIP_CEPH_CONF"
    echo "auth client required = cephx"
    echo "ms bind ipv6 = false"
    echo "log file = /tmp/ceph-client.log"
    echo "admin socket ="
  } >"$RADOS_WORK/ceph.conf"
  echo "=== ublk suite: rados: cluster $(ceph "${RADOS_ADMIN[@]}" fsid), pool $RADOS_POOL, user $RADOS_CLIENT, relayed ports $RADOS_PORTS" >&2
}
if wants rados; then
  trap rados_cleanup EXIT
  t=$(now)
  rados_setup
  echo "=== ublk suite: rados: cluster ready in $(secs "$t")s" >&2
fi

summary=() failed=0
for suite in "$@"; do
  for part in $PARTS; do
    echo "=== ublk suite: $suite: $part" >&2
    t=$(now) rc=0
    if [ "$part" = guest ]; then
      "$HERE/run-in-vm.sh" "${EXTRA[@]}" --suite "$suite" --cpus 2 --mem 2G --timeout 900 \
        --bin "$TARGET/release/archip-ublk-test" --file "$HERE/suites/ublk-guest.sh" \
        -- sh /root/ublk-guest.sh || rc=$?
    elif [ "$part" = device ]; then
      "$HERE/run-in-vm.sh" "${EXTRA[@]}" --suite "$suite" --cpus 2 --mem 2G --timeout 600 \
        --no-tools --runner "$TESTBIN" --test-threads=1 || rc=$?
    elif [ "$part" = node ]; then
      # The CSI Node service (stage/publish over gRPC; device servers: archip-ublk-test).
      "$HERE/run-in-vm.sh" "${EXTRA[@]}" --suite "$suite" --cpus 2 --mem 2G --timeout 900 \
        --bin "$TARGET/release/archip-ublk-test" --bin "$(command -v resize2fs)" \
        --bin "$(command -v xfs_growfs)" --runner "$CSIBIN" --test-threads=1 "${FILTER[@]}" || rc=$?
    elif [ "$part" = cli ]; then
      # The `archip` binary: the CLI script, then the CSI plugin processes (csi_binary).
      "$HERE/run-in-vm.sh" "${EXTRA[@]}" --suite "$suite" --cpus 2 --mem 2G --timeout 900 \
        --bin "$TARGET/release/archip" --bin "$BINTEST" \
        --env ARCHIP_BIN=/usr/local/bin/archip --file "$HERE/suites/archip-cli-guest.sh" \
        -- sh -c "sh /root/archip-cli-guest.sh && $(basename "$BINTEST") --test-threads=1 ${FILTER[*]:-}" || rc=$?
    elif [ "$part" = full ]; then
      # A full backend under ublk devices (coreutils dd: busybox's has no oflag=direct).
      "$HERE/run-in-vm.sh" "${EXTRA[@]}" --suite "$suite" --cpus 2 --mem 2G --timeout 900 \
        --bin "$TARGET/release/archip" --bin "$(command -v dd)" \
        --file "$HERE/suites/archip-full-guest.sh" \
        -- sh /root/archip-full-guest.sh || rc=$?
    elif [ "$part" = rados ]; then
      # A RADOS-backed volume as a ublk device; the guest reaches the host's cluster (above).
      ns=vm-$suite-$$
      "$HERE/run-in-vm.sh" "${EXTRA[@]}" --suite "$suite" --cpus 2 --mem 2G --timeout 900 --net \
        --bin "$TARGET/release/archip-rados" --bin "$(command -v socat)" \
        --bin "$TARGET/release/archip-ublk-test" --bin "$STAGEBIN" \
        --file "$RADOS_WORK/ceph.conf:/root/ceph.conf" --file "$RADOS_WORK/ceph.keyring:/root/ceph.keyring" \
        --env "ARCHIP_BACKEND=rados:pool=$RADOS_POOL,namespace=$ns,conf=/root/ceph.conf,id=${RADOS_CLIENT#client.},keyring=/root/ceph.keyring" \
        --env "ARCHIP_VM_RELAY_PORTS=$RADOS_PORTS" \
        --env "ARCHIP_STAGE_USER=${RADOS_CLIENT#client.}" --env ARCHIP_STAGE_KEY_FILE=/root/ceph.keyring \
        --env ARCHIP_STAGE_REQUIRED=1 --env ARCHIP_UBLK_SERVER=/usr/local/bin/archip-ublk-test \
        --file "$HERE/suites/archip-rados-guest.sh" \
        -- sh -c "sh /root/archip-rados-guest.sh && $(basename "$STAGEBIN") --test-threads=1 --nocapture node_stage_maps" || rc=$?
      left=$(rados -p "$RADOS_POOL" -N "$ns" ls 2>/dev/null | wc -l)
      echo "=== ublk suite: rados: $left objects left in namespace $ns after the guest's gc" >&2
      if [ -z "$RADOS_OWN" ]; then   # a cluster we only joined: leave nothing behind
        rados -p "$RADOS_POOL" -N "$ns" ls 2>/dev/null | while read -r o; do rados -p "$RADOS_POOL" -N "$ns" rm "$o"; done
      fi
    else
      echo "ublk-suite: unknown part '$part' (guest, device, node, cli, full, tests, rados)" >&2; rc=2
    fi
    if [ "$rc" = 0 ]; then r=PASS; else r="FAIL (status $rc)"; failed=1; fi
    summary+=("$suite $part: $r, wall $(secs "$t")s")
  done
done
echo "=== ublk suite summary" >&2
printf '  %s\n' "${summary[@]}" >&2
exit "$failed"
