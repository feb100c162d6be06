#!/usr/bin/env bash
# start-ceph.sh - start a throw-away single-node Ceph (RADOS) cluster for tests.
#
# usage: start-ceph.sh [-h|--help] DIR
#
# Starts one ceph-mon and one ceph-osd (memstore by default) listening on
# 127.0.0.1 ONLY, creates pool $CEPH_POOL (size 1), and writes everything under
# DIR (created if needed): DIR/ceph.conf, DIR/ceph.client.admin.keyring,
# DIR/env, daemon data, pid files, logs. Nothing goes to /etc/ceph or
# /var/lib/ceph; no systemd, containers or cephadm are used.
#
# stdout: only shell `export` lines (also saved as DIR/env), so
#     eval "$(e2e/ceph/start-ceph.sh /tmp/archip-ceph)"
# sets CEPH_CONF (honoured by librados, the `ceph` crate, rados, rbd, ceph),
# ARCHIP_CEPH_CONF, ARCHIP_CEPH_POOL, ARCHIP_CEPH_DIR, ARCHIP_CEPH_MON and
# ARCHIP_CEPH_KEYRING. Progress and errors go to stderr. Stop it with
#     e2e/ceph/stop-ceph.sh DIR [--purge]
#
# Packages (Debian): when a tool or librados-dev is missing and we run as root,
#   apt-get install -y --no-install-recommends ceph-mon ceph-osd ceph-common \
#       librados-dev uuid-runtime [ceph-mgr]
# runs automatically; otherwise that line is printed and the script exits 1.
# (librados-dev is what the `ceph` Rust crate links against.)
#
# Idempotent: if a usable cluster started by this script already runs in DIR
# it is reused; otherwise leftovers recorded in DIR/run/*.pid are stopped and
# the cluster is recreated from scratch.
#
# Environment knobs (all optional):
#   CEPH_OBJECTSTORE      memstore (default, data in RAM) | bluestore (sparse
#                         file DIR/osd/0.block; bounded memory, ~3 s slower)
#   CEPH_MEMSTORE_BYTES   memstore capacity (default 4 GiB; RAM used as filled)
#   CEPH_BLUESTORE_BYTES  bluestore sparse file size (default 20 GiB)
#   CEPH_MON_PORT         monitor msgr v2 port (default 40789; v1 = port+1)
#   CEPH_POOL             pool to create (default archip)
#   CEPH_PG_NUM           pg_num of the pool (default 8)
#   CEPH_WITH_MGR         1 = also start a ceph-mgr (~300 MB; default 0, not
#                         needed for I/O, only for `ceph df`/pg stats)
#   CEPH_AUTH             cephx (default) | none
#   CEPH_TIMEOUT          seconds to wait for the cluster (default 90)
#   CEPH_FORCE_NEW        1 = always recreate, even if a usable cluster runs
#   CEPH_NO_INSTALL       1 = never run apt-get, just report what is missing
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
case "${1:-}" in -h|--help) usage; exit 0 ;; esac
[ $# -eq 1 ] || { usage >&2; exit 2; }
mkdir -p "$1"
DIR=$(cd "$1" && pwd)
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

STORE=${CEPH_OBJECTSTORE:-memstore}
MEM_BYTES=${CEPH_MEMSTORE_BYTES:-4294967296}
BS_BYTES=${CEPH_BLUESTORE_BYTES:-21474836480}
PORT=${CEPH_MON_PORT:-40789}
PORT1=$((PORT + 1))
POOL=${CEPH_POOL:-archip}
PG_NUM=${CEPH_PG_NUM:-8}
WITH_MGR=${CEPH_WITH_MGR:-0}
AUTH=${CEPH_AUTH:-cephx}
TIMEOUT=${CEPH_TIMEOUT:-90}
CONF="$DIR/ceph.conf"
KEYRING="$DIR/ceph.client.admin.keyring"
T0=${EPOCHREALTIME/./}

log() {
    local d=$(( ${EPOCHREALTIME/./} - T0 ))
    printf '[start-ceph %3d.%02ds] %s\n' $((d / 1000000)) $((d % 1000000 / 10000)) "$*" >&2
}
die() {
    local f
    log "ERROR: $*"
    for f in "$DIR"/log/*.log; do
        [ -f "$f" ] && { echo "--- tail $f" >&2; tail -n 30 "$f" >&2; }
    done
    "$HERE/stop-ceph.sh" "$DIR" >&2 || true   # never leave half a cluster running
    exit 1
}

# ---- packages --------------------------------------------------------------
ensure_packages() {
    local pkgs=() b
    for b in ceph-mon ceph-osd ceph-authtool monmaptool ceph rados uuidgen; do
        if ! command -v "$b" >/dev/null; then
            pkgs=(ceph-mon ceph-osd ceph-common uuid-runtime)
            break
        fi
    done
    [ -f /usr/include/rados/librados.h ] || pkgs+=(librados-dev)
    if [ "$WITH_MGR" = 1 ] && ! command -v ceph-mgr >/dev/null; then pkgs+=(ceph-mgr); fi
    [ ${#pkgs[@]} -gt 0 ] || return 0
    local line="apt-get install -y --no-install-recommends ${pkgs[*]}"
    if [ "$(id -u)" != 0 ] || [ "${CEPH_NO_INSTALL:-0}" = 1 ]; then
        echo "start-ceph: missing packages; run as root:  apt-get update && $line" >&2
        exit 1
    fi
    log "installing: ${pkgs[*]}"
    local try
    for try in 1 2 3; do   # another apt may hold the lock (DPkg::Lock::Timeout waits for it)
        if apt-get -o DPkg::Lock::Timeout=300 update -qq >&2 &&
           DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq \
               --no-install-recommends "${pkgs[@]}" >&2; then
            log "packages installed"
            return 0
        fi
        log "apt-get failed (attempt $try), retrying"
        sleep 5
    done
    echo "start-ceph: '$line' failed" >&2
    exit 1
}
ensure_packages

ceph_() { timeout 30 ceph -c "$CONF" --connect-timeout 20 "$@"; }

alive() {  # every daemon we recorded still runs with our ceph.conf
    local pf pid
    for pf in "$DIR"/run/mon.a.pid "$DIR"/run/osd.0.pid; do
        [ -f "$pf" ] || return 1
        pid=$(cat "$pf")
        [[ "$pid" =~ ^[0-9]+$ ]] || return 1
        tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "ceph-.* -c $CONF" || return 1
    done
}

usable() {  # the cluster answers a write + read on the pool
    [ -f "$CONF" ] || return 1
    local v
    timeout 10 rados -c "$CONF" --client-mount-timeout 5 -p "$POOL" put __probe "$DIR/fsid" 2>/dev/null || return 1
    v=$(timeout 10 rados -c "$CONF" --client-mount-timeout 5 -p "$POOL" get __probe - 2>/dev/null) || return 1
    [ "$v" = "$(cat "$DIR/fsid")" ]
}

# Every TCP socket our daemons listen on must be bound to 127.0.0.1 (or ::1).
# Reads /proc/net/tcp{,6} directly so no iproute2/net-tools are needed.
check_loopback_only() {
    local pf pid inodes="" bad="" n=0 line local_addr state inode
    for pf in "$DIR"/run/*.pid; do
        [ -f "$pf" ] || continue
        pid=$(cat "$pf")
        inodes+=" $(find "/proc/$pid/fd" -lname 'socket:*' -printf '%l\n' 2>/dev/null |
                    sed 's/socket:\[\([0-9]*\)\]/\1/' | tr '\n' ' ')"
    done
    while read -r line; do
        # shellcheck disable=SC2086
        set -- $line
        local_addr=$2 state=$4 inode=${10}
        [ "$state" = 0A ] || continue                       # LISTEN
        case " $inodes " in *" $inode "*) ;; *) continue ;; esac
        n=$((n + 1))
        case "${local_addr%:*}" in
            0100007F|00000000000000000000000001000000) ;;   # 127.0.0.1, ::1
            *) bad+=" $local_addr" ;;
        esac
    done < <(tail -q -n +2 /proc/net/tcp /proc/net/tcp6 2>/dev/null)
    [ -z "$bad" ] || die "daemon listening on a non-loopback address:$bad"
    [ "$n" -gt 0 ] || die "found no listening sockets of our daemons (cannot verify loopback-only)"
    log "verified: all $n listening sockets are on loopback"
}

write_env() {
    cat >"$DIR/env" <<EOF
export CEPH_CONF='$CONF'
export ARCHIP_CEPH_CONF='$CONF'
export ARCHIP_CEPH_KEYRING='$KEYRING'
export ARCHIP_CEPH_POOL='$POOL'
export ARCHIP_CEPH_DIR='$DIR'
export ARCHIP_CEPH_MON='127.0.0.1:$PORT'
EOF
    cat "$DIR/env"
}

# ---- idempotency: reuse a running cluster, else clean up leftovers ---------
if [ "${CEPH_FORCE_NEW:-0}" != 1 ] && [ -f "$DIR/.started-by-start-ceph" ] && alive && usable; then
    timeout 10 rados -c "$CONF" -p "$POOL" rm __probe || true
    log "cluster in $DIR already running and usable; reusing"
    write_env
    exit 0
fi
if [ -d "$DIR/run" ]; then
    log "stopping leftovers from a previous run"
    "$HERE/stop-ceph.sh" "$DIR" >&2 || true
fi
# wipe only what this script creates
rm -rf "$DIR/mon" "$DIR/osd" "$DIR/mgr" "$DIR/run" "$DIR/log" "$DIR/tmp" \
       "$CONF" "$KEYRING" "$DIR/monmap" "$DIR/env" "$DIR/fsid" \
       "$DIR/.started-by-start-ceph"
mkdir -p "$DIR"/{mon/a,osd/0,mgr/x,run,log,tmp}
touch "$DIR/.started-by-start-ceph"

# ---- config ------------------------------------------------------------------
FSID=$(uuidgen)
OSD_UUID=$(uuidgen)
echo "$FSID" >"$DIR/fsid"
case "$STORE" in
  memstore)  STORE_CONF="osd objectstore = memstore
memstore device bytes = $MEM_BYTES" ;;
  bluestore) STORE_CONF="osd objectstore = bluestore
bluestore block path = $DIR/osd/0.block
bluestore block create = true
bluestore block size = $BS_BYTES
bluestore block db create = false
bluestore block wal create = false
bluestore fsck on mkfs = false
osd memory target = 1073741824
bluestore cache autotune = true" ;;
  *) echo "unsupported CEPH_OBJECTSTORE=$STORE" >&2; exit 2 ;;
esac
case "$AUTH" in
  none) AUTH_CONF="auth cluster required = none
auth service required = none
auth client required = none
auth supported = none" ;;
  cephx) AUTH_CONF="auth cluster required = cephx
auth service required = cephx
auth client required = cephx" ;;
  *) echo "unsupported CEPH_AUTH=$AUTH" >&2; exit 2 ;;
esac
CLS=$(find /usr/lib -maxdepth 2 -type d -name rados-classes 2>/dev/null | head -n 1)
CLS=${CLS:-/usr/lib/x86_64-linux-gnu/rados-classes}

cat >"$CONF" <<EOF
# generated by e2e/ceph/start-ceph.sh: throw-away single-node test cluster
[global]
fsid = $FSID
mon initial members = a
mon host = [v2:127.0.0.1:$PORT,v1:127.0.0.1:$PORT1]
# loopback only: every daemon binds 127.0.0.1, never another address
public addr = 127.0.0.1
cluster addr = 127.0.0.1
public network = 127.0.0.0/8
cluster network = 127.0.0.0/8
ms bind ipv6 = false
$AUTH_CONF
run dir = $DIR/run
admin socket = $DIR/run/\$name.asok
pid file = $DIR/run/\$name.pid
log file = $DIR/log/\$name.log
mon cluster log file = $DIR/log/cluster.log
crash dir = $DIR/tmp
# single host / single OSD
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = $PG_NUM
osd pool default pgp num = $PG_NUM
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
auth allow insecure global id reclaim = false
mon mgr mkfs grace = 86400
# the big start-up speed-up (default 1 s per map change)
paxos propose interval = 0.1
osd mon shutdown timeout = 1
mon data avail warn = 2
mon data avail crit = 1
mon max pg per osd = 1000
# smaller footprint
mon osd reporter subtree level = osd
osd op num shards = 2
osd op num threads per shard = 2
ms async op threads = 2
osd heartbeat grace = 20
mgr initial modules =

[mon]
mon data = $DIR/mon/\$id

[osd]
osd data = $DIR/osd/\$id
osd class dir = $CLS
osd class load list = *
osd class default list = *
$STORE_CONF

[mgr]
mgr data = $DIR/mgr/\$id

[client]
keyring = $KEYRING
EOF

# ---- keys ----------------------------------------------------------------------
# One bootstrap keyring with every entity; ceph-mon --mkfs imports all of them,
# so no `ceph auth add` round trips are needed later.
KR="$DIR/tmp/bootstrap.keyring"
ceph-authtool "$KR" --create-keyring --gen-key -n mon. --cap mon 'allow *' >/dev/null
ceph-authtool "$KR" --gen-key -n client.admin \
    --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' --cap mds 'allow *' >/dev/null
ceph-authtool "$KR" --gen-key -n osd.0 \
    --cap mon 'allow profile osd' --cap mgr 'allow profile osd' --cap osd 'allow *' >/dev/null
ceph-authtool "$KR" --gen-key -n mgr.x \
    --cap mon 'allow profile mgr' --cap osd 'allow *' --cap mds 'allow *' >/dev/null
one_key() {  # entity outfile
    ceph-authtool "$2" --create-keyring -n "$1" --add-key "$(ceph-authtool "$KR" -n "$1" -p)" >/dev/null
}
one_key client.admin "$KEYRING"
one_key osd.0 "$DIR/osd/0/keyring"
one_key mgr.x "$DIR/mgr/x/keyring"
log "config and keys written in $DIR"

# ---- monitor ---------------------------------------------------------------------
# ceph-mon refuses to start on a nearly full filesystem ('mon data avail crit') and, being a
# daemon, says why only in its log; say it here instead.
free_pct=$(df -P "$DIR" | awk 'NR == 2 { sub("%", "", $5); print 100 - $5 }')
[ "${free_pct:-100}" -gt 1 ] ||
    die "the filesystem holding $DIR is ${free_pct}% free; ceph-mon will not start below 2% (free some space)"
monmaptool --create --fsid "$FSID" --addv a "[v2:127.0.0.1:$PORT,v1:127.0.0.1:$PORT1]" "$DIR/monmap" >/dev/null
ceph-mon -c "$CONF" --mkfs -i a --monmap "$DIR/monmap" --keyring "$KR" 2>"$DIR/log/mon-mkfs.err" ||
    { cat "$DIR/log/mon-mkfs.err" >&2; die "ceph-mon --mkfs failed"; }
ceph-mon -c "$CONF" -i a || die "ceph-mon failed to start"
log "ceph-mon started on 127.0.0.1:$PORT"

# ---- OSD: allocate id 0, mkfs, start (pool creation overlaps) --------------------
OSD_ID=$(ceph_ osd new "$OSD_UUID") || die "ceph osd new failed"
[ "$OSD_ID" = 0 ] || die "unexpected osd id $OSD_ID"
log "osd.0 registered in the osdmap"
( ceph_ osd pool create "$POOL" "$PG_NUM" "$PG_NUM" replicated &&
  ceph_ osd pool application enable "$POOL" rbd ) >"$DIR/log/pool-create.out" 2>&1 &
POOL_PID=$!
ceph-osd -c "$CONF" -i 0 --mkfs --osd-uuid "$OSD_UUID" >"$DIR/log/osd-mkfs.out" 2>&1 ||
    { cat "$DIR/log/osd-mkfs.out" >&2; die "ceph-osd --mkfs failed"; }
log "ceph-osd --mkfs done"
# (stderr: harmless "Falling back to public interface" chatter)
ceph-osd -c "$CONF" -i 0 2>>"$DIR/log/osd-start.err" || die "ceph-osd failed to start"
log "ceph-osd started ($STORE)"
if [ "$WITH_MGR" = 1 ]; then
    ceph-mgr -c "$CONF" -i x || die "ceph-mgr failed to start"
    log "ceph-mgr started"
fi
wait "$POOL_PID" || die "pool create failed: $(cat "$DIR/log/pool-create.out")"
log "pool $POOL created"

# ---- wait until usable -------------------------------------------------------------
deadline=$(( $(date +%s) + TIMEOUT ))
until usable; do
    [ "$(date +%s)" -lt "$deadline" ] || die "cluster not usable after ${TIMEOUT}s"
    sleep 0.3
done
timeout 10 rados -c "$CONF" -p "$POOL" rm __probe || true
rm -f "$KR"
check_loopback_only
log "cluster usable (store=$STORE, mon 127.0.0.1:$PORT, pool $POOL)"
write_env
