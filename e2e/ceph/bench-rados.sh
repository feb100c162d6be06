#!/usr/bin/env bash
# bench-rados.sh - `archip bench rados` (our stack vs RBD) on a throw-away Ceph cluster.
#
# usage: bench-rados.sh [-h|--help] [DIR [BENCH-ARGS...]]
#
# Starts a single-node cluster in DIR (default /tmp/archip-bench-rados) with
# start-ceph.sh, builds archip in release with the `rados` feature, runs
#     archip --backend rados:pool=..,conf=..,keyring=.. bench rados BENCH-ARGS...
# against it, and prints the bench's JSON on stdout (also saved as
# DIR.json, outside DIR, so it survives the purge). The cluster is stopped and
# removed whatever the outcome. Build and cluster progress go to stderr.
#
# The start-ceph.sh knobs pass through: CEPH_OBJECTSTORE=bluestore measures on
# an on-disk object store instead of memstore (RAM); CEPH_MON_PORT moves the
# monitor off the default port when another cluster uses it. No ceph-mgr is
# started: neither side of the bench asks for pool statistics. The memstore
# gets 6 GiB unless CEPH_MEMSTORE_BYTES says otherwise: the bench writes its
# volume, the RBD image and a set of plain objects of the same size (1 GiB by
# default, --size-mib).
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
case "${1:-}" in -h|--help) usage; exit 0 ;; esac
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
DIR=${1:-/tmp/archip-bench-rados}
[ $# -gt 0 ] && shift

cd "$ROOT"
# Build first: on a loaded machine this takes long, and the cluster need not wait for it.
cargo build --release --features rados --bin archip >&2
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/archip"

trap '"$HERE/stop-ceph.sh" "$DIR" --purge >&2 || true' EXIT
eval "$(CEPH_MEMSTORE_BYTES=${CEPH_MEMSTORE_BYTES:-6442450944} CEPH_FORCE_NEW=1 \
    "$HERE/start-ceph.sh" "$DIR")"

"$BIN" bench rados \
    --backend "rados:pool=$ARCHIP_CEPH_POOL,conf=$ARCHIP_CEPH_CONF,keyring=$ARCHIP_CEPH_KEYRING" \
    "$@" | tee "$DIR.json"
