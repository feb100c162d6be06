#!/usr/bin/env bash
# suite-on-rados.sh - the peers' backend-parameterized tests on a real Ceph cluster.
#
# usage: suite-on-rados.sh [-h|--help] [DIR]
#
# Starts a throw-away single-node cluster in DIR (default /tmp/archip-suite-on-rados)
# with start-ceph.sh, then runs the same test code that `cargo test -p peers`
# runs on files, this time with ARCHIP_TEST_BACKEND=rados and `--features rados`:
# every test gets a fresh RADOS namespace of its own in the pool (see
# TestBackend in peers/tests/common/mod.rs), and the crash test's peer
# processes get that namespace's description. Namespaces are not cleaned up one
# by one: the whole cluster is stopped and purged at the end, whatever the
# outcome. Exits with cargo's status.
#
# Bounded in time (a few minutes on 2 cores, after the build): the long
# randomized tests run shorter than on files. Knobs (environment):
#   ARCHIP_MODEL_OPS    mapper model test operations (default here 4000)
#   ARCHIP_OPS          xseg model test operations (default here 3000)
#   ARCHIP_CRASH_ITERS  crash test kill/restart iterations (default here 30)
#   ARCHIP_SEED         replays a randomized run
#   CEPH_MON_PORT       passed to start-ceph.sh (to run beside another cluster)
# Needs root the first time (start-ceph.sh installs ceph and librados-dev).
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
case "${1:-}" in -h|--help) usage; exit 0 ;; esac
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
DIR=${1:-/tmp/archip-suite-on-rados}

trap '"$HERE/stop-ceph.sh" "$DIR" --purge >&2 || true' EXIT
# No ceph-mgr: none of these tests asks for capacity (rados-suite.sh covers it).
eval "$(CEPH_FORCE_NEW=1 "$HERE/start-ceph.sh" "$DIR")"

export ARCHIP_TEST_BACKEND=rados
export ARCHIP_MODEL_OPS=${ARCHIP_MODEL_OPS:-4000}
export ARCHIP_OPS=${ARCHIP_OPS:-3000}
export ARCHIP_CRASH_ITERS=${ARCHIP_CRASH_ITERS:-30}

cd "$ROOT"
cargo test -p peers --features rados --no-fail-fast \
  --test model --test xseg_model --test crash --test dedup_gc --test qos \
  --test shared_volumes --test names --test xseg_volumes
