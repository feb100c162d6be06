#!/usr/bin/env bash
# stop-ceph.sh - stop exactly the daemons e2e/ceph/start-ceph.sh started in DIR.
#
# usage: stop-ceph.sh [-h|--help] DIR [--purge]
#
# Reads DIR/run/*.pid and checks that each PID is still a ceph daemon running
# with DIR/ceph.conf (guards against PID reuse); nothing else is signalled.
# OSDs and the mgr are stopped first, the monitor last (an OSD reports its
# shutdown to the mon; without a mon it waits for a timeout). SIGTERM, then
# SIGKILL after CEPH_STOP_WAIT seconds (default 10). --purge also deletes DIR.
# Exits 0 when DIR does not exist.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
case "${1:-}" in -h|--help) usage; exit 0 ;; esac
if [ $# -lt 1 ] || [ $# -gt 2 ]; then usage >&2; exit 2; fi
[ $# -eq 1 ] || [ "$2" = --purge ] || { usage >&2; exit 2; }
[ -d "$1" ] || { echo "stop-ceph: no such dir $1 (nothing to stop)" >&2; exit 0; }
DIR=$(cd "$1" && pwd)
WAIT=${CEPH_STOP_WAIT:-10}

stop_group() {  # pidfile...
    local pf pid end pids=()
    for pf in "$@"; do
        [ -f "$pf" ] || continue
        pid=$(cat "$pf" 2>/dev/null || true)
        if [[ "$pid" =~ ^[0-9]+$ ]] && [ -r "/proc/$pid/cmdline" ] &&
           tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "ceph-.* -c $DIR/ceph.conf"; then
            echo "stop-ceph: stopping $(basename "$pf" .pid) (pid $pid)" >&2
            if kill -TERM "$pid" 2>/dev/null; then pids+=("$pid"); fi
        fi
        rm -f "$pf"
    done
    end=$(( $(date +%s) + WAIT ))
    for pid in "${pids[@]}"; do
        while kill -0 "$pid" 2>/dev/null; do
            if [ "$(date +%s)" -ge "$end" ]; then
                echo "stop-ceph: pid $pid did not exit, SIGKILL" >&2
                kill -KILL "$pid" 2>/dev/null || true
                break
            fi
            sleep 0.1
        done
    done
}

shopt -s nullglob
stop_group "$DIR"/run/osd.*.pid "$DIR"/run/mgr.*.pid
stop_group "$DIR"/run/mon.*.pid
if [ "${2:-}" = --purge ]; then
    rm -rf "$DIR"
    echo "stop-ceph: removed $DIR" >&2
fi
exit 0
