#!/usr/bin/env bash
# rados-suite.sh - the RADOS blocker against a real single-node Ceph cluster.
#
# usage: rados-suite.sh [-h|--help] [DIR]
#
# Starts a throw-away cluster in DIR (default /tmp/archip-rados-suite) with
# start-ceph.sh, with a ceph-mgr (the blocker's capacity and the pool quota
# that the full-pool test fills both come from the mgr's statistics), waits
# until the cluster reports its size, runs the peers crate's unit tests and
# its RADOS-only tests against it (the blocker, tests/rados.rs; two nodes on
# one pool with fencing, tests/rados_nodes.rs; forwarding to a holder by
# watch/notify, tests/rados_forward.rs) and CSI on RADOS, and stops and removes the
# cluster whatever the outcome. The backend-parameterized suites (model,
# crash, dedup, GC, locks, QoS, shared, names) run on RADOS through
# suite-on-rados.sh.
# Exits with cargo's status. Needs root the first time (start-ceph.sh
# installs ceph and librados-dev with apt-get).
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
case "${1:-}" in -h|--help) usage; exit 0 ;; esac
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
DIR=${1:-/tmp/archip-rados-suite}

trap '"$HERE/stop-ceph.sh" "$DIR" --purge >&2 || true' EXIT
eval "$(CEPH_WITH_MGR=1 CEPH_FORCE_NEW=1 "$HERE/start-ceph.sh" "$DIR")"

# The mgr reports statistics a few seconds after it starts; until then the cluster's size
# reads as 0 and capacity() rightly refuses to answer.
deadline=$((SECONDS + 90))
until [ "$(rados df -f json 2>/dev/null | sed -n 's/.*"total_space":\([0-9]*\).*/\1/p')" -gt 0 ] 2>/dev/null; do
  if [ $SECONDS -ge $deadline ]; then
    echo "rados-suite: the cluster never reported its size (is ceph-mgr running?)" >&2
    exit 1
  fi
  sleep 0.5
done

cd "$ROOT"
cargo test -p peers --features rados --lib --test rados --test rados_nodes --test rados_forward
# CSI on RADOS: secrets, records in the pool, a second controller (csi/tests/rados.rs), and the
# node plugin's secret checks before staging (node/tests/rados_stage.rs).
cargo test -p csi -p node --features csi/rados,node/rados --test rados --test rados_stage
