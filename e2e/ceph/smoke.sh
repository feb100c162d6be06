#!/usr/bin/env bash
# smoke.sh - self-check of the single-node Ceph test cluster.
#
# usage: smoke.sh [-h|--help] [DIR]
#
# Starts a fresh cluster with start-ceph.sh in DIR (default: a new temp dir),
# does a `rados -p $ARCHIP_CEPH_POOL put / get / ls` round trip (1 MiB random
# object, compared byte for byte), checks that the mon runs with
# CEPH_CONF from the printed env, then stops the cluster and removes DIR.
# Prints wall times of each phase. Exit 0 = all good. Needs root (or the ceph
# packages already installed). Knobs of start-ceph.sh apply (CEPH_OBJECTSTORE=...).
set -euo pipefail

case "${1:-}" in -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;; esac
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DIR=${1:-$(mktemp -d "${TMPDIR:-/tmp}/archip-ceph-smoke.XXXXXX")}
export CEPH_FORCE_NEW=1

now() { echo "${EPOCHREALTIME/./}"; }
secs() { local d=$(( $(now) - $1 )); printf '%d.%02d' $((d / 1000000)) $((d % 1000000 / 10000)); }
say() { echo "ceph-smoke: $*" >&2; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/archip-ceph-smoke-data.XXXXXX")
started=0
cleanup() {
    rc=$?
    if [ "$started" = 1 ]; then
        t=$(now)
        "$HERE/stop-ceph.sh" "$DIR" --purge || rc=1
        say "stop: $(secs "$t")s"
    fi
    rm -rf "$WORK"
    if [ "$rc" = 0 ]; then say "PASS"; else say "FAIL (status $rc)"; fi
    exit "$rc"
}
trap cleanup EXIT

t=$(now)
started=1
ENV_LINES=$("$HERE/start-ceph.sh" "$DIR")
eval "$ENV_LINES"
say "start (to usable, incl. any package install): $(secs "$t")s"
: "${CEPH_CONF:?start-ceph.sh did not print CEPH_CONF}" "${ARCHIP_CEPH_POOL:?}"

t=$(now)
head -c 1048576 /dev/urandom >"$WORK/obj.in"
rados -p "$ARCHIP_CEPH_POOL" put smoke-obj "$WORK/obj.in"           # CEPH_CONF from the env
rados -p "$ARCHIP_CEPH_POOL" get smoke-obj "$WORK/obj.out"
cmp "$WORK/obj.in" "$WORK/obj.out" || { say "get returned different bytes"; exit 1; }
rados -p "$ARCHIP_CEPH_POOL" ls >"$WORK/ls"
grep -qx smoke-obj "$WORK/ls" || { say "ls does not list smoke-obj: $(cat "$WORK/ls")"; exit 1; }
rados -p "$ARCHIP_CEPH_POOL" rm smoke-obj
say "rados put/get/ls/rm round trip (1 MiB): $(secs "$t")s"
