#!/usr/bin/env bash
# run-in-vm.sh - run a command inside a throw-away qemu VM whose Debian kernel
# has the ublk driver loaded, and pass the command's exit status back.
#
# usage: run-in-vm.sh [OPTIONS] [--] COMMAND [ARG...]
#        run-in-vm.sh [OPTIONS] --runner EXE [ARG...]      (cargo target runner)
#        run-in-vm.sh [OPTIONS] --prepare                  (only fill the cache)
#
# Options (all must come before COMMAND / --runner):
#   --suite S      Debian suite to take linux-image-amd64 from (default
#                  $ARCHIP_VM_SUITE or bookworm-backports = 6.12 LTS;
#                  trixie-backports = newest 7.x). bookworm's own 6.1 kernel
#                  is built without ublk.
#   --bin PATH     copy an executable to /usr/local/bin/<name> in the guest,
#                  with the shared libraries and loader ldd reports (repeatable)
#   --file S[:D]   copy a file into the guest (default D = /root/<name>)
#   --env K=V      export K=V for COMMAND (repeatable)
#   --share DIR    host DIR over virtio-9p, read-write, at /mnt/host
#   --disk FILE    FILE as a raw virtio-blk disk, /dev/vda
#   --net          a virtio NIC on qemu user-mode networking (slirp): guest eth0
#                  10.0.2.15/24, gateway 10.0.2.2 = the host's loopback (a
#                  guest connection to 10.0.2.2:P reaches the host's 127.0.0.1:P
#                  as an ordinary local client). Nothing listens on the host for
#                  the guest (no hostfwd), so this opens no port to the outside.
#   --mem M        guest RAM, qemu -m syntax (default 1G)
#   --cpus N       vCPUs (default 1: under TCG a 2nd vCPU makes QD1 ublk I/O
#                  10-30x slower because of cross-vCPU wakeups)
#   --timeout S    kill the VM after S seconds -> exit 124 (default 300)
#   --accel A      tcg (default, works everywhere) or kvm
#   --no-tools     do not copy the built-in tool list (below)
#   --verbose      show all kernel messages
#   --runner EXE [ARG...]   same as `--bin EXE -- EXE ARG...`, so this script
#                  can be cargo's target runner (each test binary = one boot):
#      CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER="$PWD/e2e/vm/run-in-vm.sh --runner" cargo test
#   --prepare      install/download/cache everything, do not boot
#   -h, --help     this text
#
# The guest: busybox userland (sh, mount, losetup, dd, md5sum, ...), /proc,
# /sys, /dev (devtmpfs), /dev/pts, tmpfs /run and /tmp, clock set from the
# host. COMMAND runs as root in /root under `sh`, stdin = /dev/null. Loaded
# modules (with their dependencies, resolved from the .ko files): ublk_drv
# (/dev/ublk-control), loop, crc32c, ext4, xfs, virtio_blk, 9p, virtio_net; more via
# ARCHIP_VM_EXTRA_MODS="a b". Built-in tools copied from the host with their
# libraries when present (in /usr/local/sbin, ahead of busybox on PATH):
#   mkfs.ext4 e2fsck fsck.ext4 tune2fs dumpe2fs mkfs.xfs xfs_repair xfs_db
#   blkid lsblk losetup wipefs fstrim blkdiscard fio
# Extra host tools: --bin "$(command -v TOOL)".
#
# Exit status: COMMAND's status; 124 = timeout, 125 = the VM died without
# reporting a status (e.g. guest kernel panic), 126 = setup error (missing
# packages, download failure, bad option).
#
# Host needs: qemu-system-x86 cpio xz-utils busybox-static e2fsprogs xfsprogs
# util-linux [fio]. As root, missing ones are apt-get installed; otherwise the
# exact apt-get line is printed and the script exits 126. The kernel .deb is
# only downloaded and unpacked (private apt lists under the cache, host apt
# configuration untouched), never installed.
#
# Environment:
#   ARCHIP_VM_CACHE       cache dir (default $HOME/.cache/archip-vm; per suite
#                         ~35 MB unpacked + 106-121 MB kernel .debs, plus the
#                         tool image, ~90 MB with fio's libraries)
#   ARCHIP_VM_SUITE       default for --suite
#   ARCHIP_VM_MIRROR      Debian archive URL (default: the host's apt sources,
#                         else http://deb.debian.org/debian)
#   ARCHIP_VM_KERNEL_PKG  exact kernel package (e.g. linux-image-6.12.95+deb12-amd64);
#                         backports keep only the newest version, pins vanish
#   ARCHIP_VM_EXTRA_MODS  more modules to load
#   ARCHIP_VM_MODS        replace the default module list (e.g. without xfs,
#                         whose insmod alone takes ~0.9 s under TCG)
#   ARCHIP_VM_QEMU_ARGS   extra qemu arguments (word-split)
#   ARCHIP_VM_FIO         0 = do not install fio on the host (default 1)
set -euo pipefail

PROG=run-in-vm
die() { echo "$PROG: $*" >&2; exit 126; }
log() { echo "$PROG: $*" >&2; }
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

MEM=1G CPUS=1 TIMEOUT=300 ACCEL=tcg VERBOSE=0 SHARE='' DISK='' NET=0 TOOLS=1 PREPARE=0
SUITE=${ARCHIP_VM_SUITE:-}
BINS=() FILES=() ENVS=()
need_arg() { [ $# -ge 2 ] || die "option $1 needs an argument (see --help)"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --suite) need_arg "$@"; SUITE=$2; shift 2 ;;
    --mem) need_arg "$@"; MEM=$2; shift 2 ;;
    --cpus) need_arg "$@"; CPUS=$2; shift 2 ;;
    --timeout) need_arg "$@"; TIMEOUT=$2; shift 2 ;;
    --accel) need_arg "$@"; ACCEL=$2; shift 2 ;;
    --bin) need_arg "$@"; BINS+=("$2"); shift 2 ;;
    --file) need_arg "$@"; FILES+=("$2"); shift 2 ;;
    --env) need_arg "$@"; [[ "$2" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env wants NAME=VALUE"
           ENVS+=("$2"); shift 2 ;;
    --share) need_arg "$@"; SHARE=$(cd "$2" && pwd) || die "--share $2: no such dir"; shift 2 ;;
    --disk) need_arg "$@"; [ -f "$2" ] || die "--disk $2: no such file"; DISK=$2; shift 2 ;;
    --net) NET=1; shift ;;
    --no-tools) TOOLS=0; shift ;;
    --verbose) VERBOSE=1; shift ;;
    --prepare) PREPARE=1; shift ;;
    --runner) shift; [ $# -gt 0 ] || die "--runner needs EXE [ARGS...]"
              BINS+=("$1"); exe=$(basename "$1"); shift; set -- "$exe" "$@"; break ;;
    --) shift; break ;;
    -h|--help) usage; exit 0 ;;
    -*) die "unknown option '$1' (see --help; put '--' before COMMAND)" ;;
    *) break ;;
  esac
done
[ $# -gt 0 ] || [ "$PREPARE" = 1 ] || die "no COMMAND given (see --help)"
case "$ACCEL" in tcg|kvm) ;; *) die "--accel must be tcg or kvm" ;; esac
[[ "$TIMEOUT" =~ ^[0-9]+$ ]] || die "--timeout wants seconds"

CACHE=${ARCHIP_VM_CACHE:-$HOME/.cache/archip-vm}
SUITE=${SUITE:-bookworm-backports}
KDIR=$CACHE/kernel-$SUITE          # vmlinuz, config, version, modules/*.ko, modules/order
BASE=$CACHE/base-$SUITE.cpio       # busybox + /init + modules (newc, uncompressed)
# modules wanted in the guest; dependencies are added from each .ko's depends=
WANT_MODS="${ARCHIP_VM_MODS:-virtio_blk netfs 9pnet 9pnet_virtio 9p ublk_drv loop crc32c_generic crc32c_intel ext4 xfs virtio_net} ${ARCHIP_VM_EXTRA_MODS:-}"
GUEST_TOOLS="mkfs.ext4 e2fsck fsck.ext4 tune2fs dumpe2fs mkfs.xfs xfs_repair xfs_db blkid lsblk losetup wipefs fstrim blkdiscard fio"
# Bump when the layout of the cached kernel dir or base image changes.
FORMAT=2

# ---------------------------------------------------------------- host tools
host_cmd() { PATH=$PATH:/usr/sbin:/sbin command -v "$1" 2>/dev/null; }
is_static() { ! ldd "$1" >/dev/null 2>&1; }
BUSYBOX=
find_busybox() {
  local b
  for b in /bin/busybox /usr/bin/busybox "$(host_cmd busybox || true)"; do
    if [ -n "$b" ] && [ -x "$b" ] && is_static "$b"; then BUSYBOX=$b; return 0; fi
  done
  return 1
}
ensure_host_packages() {
  local need=() fio=${ARCHIP_VM_FIO:-1}
  host_cmd qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
  host_cmd cpio >/dev/null || need+=(cpio)
  host_cmd xz >/dev/null || need+=(xz-utils)
  host_cmd timeout >/dev/null || need+=(coreutils)
  find_busybox || need+=(busybox-static)
  host_cmd mkfs.ext4 >/dev/null || need+=(e2fsprogs)
  host_cmd mkfs.xfs >/dev/null || need+=(xfsprogs)
  host_cmd fstrim >/dev/null || need+=(util-linux)
  [ "$fio" = 0 ] || host_cmd fio >/dev/null || need+=(fio)
  [ ${#need[@]} -gt 0 ] || return 0
  # qemu-system-x86 must match the installed qemu-utils (qemu-img, qemu-nbd: the NBD tests and
  # `archip bench nbd` use them): a machine whose qemu-utils comes from backports would otherwise
  # get the release's older qemu-system-x86, and apt would *remove* qemu-utils to install it.
  # So ask for the same version, from backports when that is where it came from, and never let
  # apt remove anything (--no-remove): a conflict fails here, loudly, instead.
  local extra=()
  if [[ " ${need[*]} " == *" qemu-system-x86 "* ]]; then
    local qv; qv=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)
    if [ -n "$qv" ]; then
      need=("${need[@]/#qemu-system-x86/qemu-system-x86=$qv}")
      [[ $qv != *bpo* ]] || extra=(-t "$(. /etc/os-release; echo "$VERSION_CODENAME")-backports")
    fi
  fi
  local line="apt-get install -y --no-install-recommends --no-remove ${extra[*]} ${need[*]}"
  [ "$(id -u)" = 0 ] || die "missing host packages; as root run:  apt-get update && $line"
  log "installing host packages: ${need[*]}"
  local src=() try
  if [ ${#extra[@]} -gt 0 ]; then src=(-o "Dir::Etc::SourceParts=$(backports_sources)"); fi
  for try in 1 2 3; do   # DPkg::Lock::Timeout waits for a concurrent apt/dpkg
    if apt-get -o DPkg::Lock::Timeout=300 "${src[@]}" update -qq >&2 &&
       DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 "${src[@]}" install -y -qq \
         --no-install-recommends --no-remove "${extra[@]}" "${need[@]}" >/dev/null; then
      find_busybox || die "busybox-static installed but no static busybox found"
      return 0
    fi
    log "apt-get failed (attempt $try)"; sleep 5
  done
  die "'$line' failed"
}

# The host's apt sources plus its release's backports, as a private SourceParts directory: the
# host's own apt configuration stays untouched (backports are only pinned to for one install).
backports_sources() {
  local d=$CACHE/apt/host-sources.d codename mirror
  codename=$(. /etc/os-release; echo "$VERSION_CODENAME")
  mirror=${ARCHIP_VM_MIRROR:-$(host_mirror)}
  mirror=${mirror:-http://deb.debian.org/debian}
  mkdir -p "$d"; rm -f "$d"/*
  cp /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list "$d"/ 2>/dev/null || true
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror $codename-backports main" \
    >"$d/archip-backports.list"
  echo "$d"
}

# ---------------------------------------------------------- kernel download
host_mirror() {  # first plain Debian archive URI in the host's apt sources
  { cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '/^URIs:/{for(i=2;i<=NF;i++) print $i}'
    cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | awk '/^deb /{print $2}'
  } | awk '!/-security/ && /\/debian\/?$/' | head -n 1 || true
}
APT_OPTS=()
apt_private() {  # own sources/lists/archives under $CACHE/apt: host apt config untouched
  local a=$CACHE/apt mirror signed=
  mirror=${ARCHIP_VM_MIRROR:-$(host_mirror)}
  mirror=${mirror:-http://deb.debian.org/debian}
  [ -r /usr/share/keyrings/debian-archive-keyring.gpg ] &&
    signed=" [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg]"
  mkdir -p "$a/lists/partial" "$a/cache/archives/partial"
  echo "deb$signed $mirror $SUITE main" >"$a/sources-$SUITE.list"
  APT_OPTS=(-o "Dir::Etc::SourceList=$a/sources-$SUITE.list" -o Dir::Etc::SourceParts=/dev/null
            -o "Dir::State::Lists=$a/lists" -o "Dir::Cache=$a/cache" -o Dir::State::status=/dev/null
            -o APT::Architecture=amd64 -o Debug::NoLocking=1)
  [ "$(id -u)" != 0 ] || APT_OPTS+=(-o APT::Sandbox::User=root)
  apt-get "${APT_OPTS[@]}" update -qq >&2 || die "apt-get update ($SUITE from $mirror) failed"
}

modname() { echo "${1//-/_}"; }
ko_field() {  # file.ko field -> value of field= in .modinfo
  tr '\0' '\n' <"$1" | sed -n "s/^$2=//p" | head -n 1
}

fetch_kernel() {
  local stamp="$FORMAT ${ARCHIP_VM_KERNEL_PKG:-} $WANT_MODS"
  if [ -s "$KDIR/vmlinuz" ] && [ "$(cat "$KDIR/stamp" 2>/dev/null)" = "$stamp" ]; then return 0; fi
  log "fetching the kernel from Debian $SUITE into $KDIR"
  apt_private
  local tmp; tmp=$(mktemp -d "$CACHE/tmp.XXXXXX")
  # shellcheck disable=SC2064
  trap "rm -rf '$tmp'" EXIT
  (
    set -euo pipefail
    cd "$tmp"
    pkg=${ARCHIP_VM_KERNEL_PKG:-}
    if [ -z "$pkg" ]; then
      apt-get "${APT_OPTS[@]}" download -qq "linux-image-amd64/$SUITE" >&2
      pkg=$(dpkg-deb -f linux-image-amd64_*.deb Depends | tr ',' '\n' |
            sed -n 's/^ *\(linux-image-[^ ]*\).*/\1/p' | head -n 1)
      [ -n "$pkg" ] || { echo "cannot resolve linux-image-amd64 in $SUITE" >&2; exit 1; }
    fi
    # the kernel .debs are kept in $CACHE/debs, so a changed module list
    # (ARCHIP_VM_MODS) does not download them again
    debs=$CACHE/debs-$SUITE; mkdir -p "$debs"; : >used
    get() {  # package -> path of its .deb
      local f
      f=$(find "$debs" -maxdepth 1 -name "$1_*.deb" | head -n 1)
      if [ -z "$f" ]; then
        (cd "$debs" && apt-get "${APT_OPTS[@]}" download -qq "$1" >&2)
        f=$(find "$debs" -maxdepth 1 -name "$1_*.deb" | head -n 1)
      fi
      echo "$f" >>"$tmp/used"; echo "$f"
    }
    deb=$(get "$pkg"); [ -n "$deb" ] || exit 1
    mkdir x; dpkg-deb -x "$deb" x
    # Debian >= 6.17 splits the kernel: linux-image-V (stub) -> linux-binary-V
    # (vmlinuz), linux-modules-V, linux-base-V (config)
    for dep in $(dpkg-deb -f "$deb" Depends | tr ',|' '\n' |
                 sed -n 's/^ *\(linux-\(binary\|modules\|base\)-[^ ]*\).*/\1/p'); do
      f=$(get "$dep"); [ -n "$f" ] || exit 1
      dpkg-deb -x "$f" x
    done
    cfg=$(find x/boot x/lib/modules x/usr/lib/modules -maxdepth 2 \( -name 'config-*' -o -name config \) 2>/dev/null | head -n 1)
    vmlinuz=$(find x/boot x/lib/modules x/usr/lib/modules -maxdepth 2 \( -name 'vmlinuz-*' -o -name vmlinuz \) 2>/dev/null | head -n 1)
    [ -n "$cfg" ] && [ -n "$vmlinuz" ] || { echo "$pkg: no kernel image/config found" >&2; exit 1; }
    grep -q '^CONFIG_BLK_DEV_UBLK=[ym]' "$cfg" ||
      { echo "$pkg is built without ublk ($(grep BLK_DEV_UBLK "$cfg")); use a newer suite" >&2; exit 1; }
    grep -q '^CONFIG_IO_URING=y' "$cfg" || { echo "$pkg has no io_uring" >&2; exit 1; }
    kver=$(find x/lib/modules x/usr/lib/modules -mindepth 1 -maxdepth 1 -type d -printf '%f\n' 2>/dev/null | head -n 1)
    out=$tmp/k; mkdir -p "$out/modules"
    cp "$vmlinuz" "$out/vmlinuz"; cp "$cfg" "$out/config"
    # index: module name -> .ko path
    find x -name '*.ko' -o -name '*.ko.xz' -o -name '*.ko.zst' -o -name '*.ko.gz' >ko.list
    unpack() {  # name -> $out/modules/name.ko; 1 if there is no such module file
      local f
      [ -e "$out/modules/$1.ko" ] && return 0
      f=$(awk -v n="$1" '{b=$0; sub(/.*\//,"",b); sub(/\.ko(\.(xz|zst|gz))?$/,"",b); gsub(/-/,"_",b); if (b==n) {print; exit}}' ko.list)
      [ -n "$f" ] || return 1
      case "$f" in
        *.xz) xz -dc "$f" ;; *.zst) zstd -dqc "$f" ;; *.gz) gzip -dc "$f" ;; *) cat "$f" ;;
      esac >"$out/modules/$1.ko"
    }
    order=()
    visit() {  # depth-first: dependencies before the module
      local m d
      m=$(modname "$1")
      case " ${order[*]:-} " in *" $m "*) return 0 ;; esac
      unpack "$m" || return 1
      for d in $(ko_field "$out/modules/$m.ko" depends | tr ',' ' '); do
        visit "$d" || echo "warning: $m depends on $d, not found" >&2
      done
      order+=("$m")
    }
    for m in $WANT_MODS; do
      if ! visit "$m"; then
        case "$m" in
          ublk_drv) grep -q '^CONFIG_BLK_DEV_UBLK=y' "$cfg" || { echo "ublk_drv.ko not found" >&2; exit 1; } ;;
        esac   # others: built in (=y) or not in this kernel; the guest reports what is missing
      fi
    done
    for f in "$debs"/*.deb; do grep -qxF "$f" used || rm -f "$f"; done   # older kernels
    echo "${order[*]}" >"$out/modules/order"
    echo "$pkg $kver" >"$out/version"
    echo "$stamp" >"$out/stamp"
    rm -rf "$KDIR"; mv "$out" "$KDIR"
  ) || die "fetching the kernel from $SUITE failed"
  rm -rf "$tmp"; trap - EXIT
  rm -f "$BASE"
  log "kernel cached: $(cat "$KDIR/version"); modules: $(cat "$KDIR/modules/order")"
}

# ------------------------------------------------------------ base initramfs
build_base() {
  if [ -s "$BASE" ] && [ "$BASE" -nt "$KDIR/stamp" ] && [ "$BASE" -nt "$0" ] && [ "$BASE" -nt "$BUSYBOX" ]; then
    return 0
  fi
  local r app
  r=$(mktemp -d "$CACHE/tmp.XXXXXX")
  mkdir -p "$r"/{bin,sbin,usr/bin,usr/sbin,usr/local/bin,usr/local/sbin,proc,sys,dev,run,tmp,root,mnt/host,etc,lib/modules,archipvm}
  cp "$BUSYBOX" "$r/bin/busybox"; chmod 755 "$r/bin/busybox"
  for app in $("$r/bin/busybox" --list-full); do
    [ -e "$r/$app" ] || ln -s /bin/busybox "$r/$app"
  done
  cp "$KDIR"/modules/* "$r/lib/modules/"
  echo "root:x:0:0:root:/root:/bin/sh" >"$r/etc/passwd"
  echo "root:x:0:" >"$r/etc/group"
  ln -s /proc/self/mounts "$r/etc/mtab"
  cat >"$r/init" <<'EOF'
#!/bin/sh
# archip-vm guest init (busybox sh). Config comes from /archipvm/config.
export PATH=/usr/local/bin:/usr/local/sbin:/usr/bin:/usr/sbin:/bin:/sbin HOME=/root TERM=dumb
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mount -t tmpfs tmpfs /run; mount -t tmpfs tmpfs /tmp
mkdir -p /dev/pts /dev/shm && mount -t devpts devpts /dev/pts
ln -sf /proc/self/fd /dev/fd
. /archipvm/config
[ -n "$ARCHIPVM_EPOCH" ] && date -s "@$ARCHIPVM_EPOCH" >/dev/null 2>&1
for m in $(cat /lib/modules/order); do
  insmod /lib/modules/$m.ko || echo "archipvm: insmod $m failed" >&2
done
i=0; while [ ! -e /dev/ublk-control ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
[ -e /dev/ublk-control ] || echo "archipvm: WARNING: /dev/ublk-control missing" >&2
ip link set lo up
if [ -n "$ARCHIPVM_NET" ]; then
  { ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2; } \
    || echo "archipvm: configuring eth0 failed" >&2
fi
if [ -n "$ARCHIPVM_SHARE" ]; then
  mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=none hostshare /mnt/host \
    || echo "archipvm: mounting the 9p share failed" >&2
fi
echo "archipvm: ready after $(cut -d' ' -f1 /proc/uptime)s uptime, kernel $(uname -r)"
cd /root
sh /archipvm/cmd </dev/null
rc=$?
[ $rc -ne 0 ] && { echo "archipvm: command failed (status $rc); last kernel messages:"; dmesg | tail -n 25; }
sync
echo "$ARCHIPVM_MARKER $rc"
poweroff -f
sleep 5
EOF
  chmod 755 "$r/init"
  (cd "$r" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) >"$BASE.tmp"
  mv "$BASE.tmp" "$BASE"; rm -rf "$r"
}

# --------------------------------------------------- overlays (cpio pieces)
add_file() {  # root host-path guest-path
  mkdir -p "$1$(dirname "$3")"; cp -L "$2" "$1$3"
}
add_libs() {  # root exe: its shared libraries + loader, at their host paths
  local lib
  ldd "$2" >/dev/null 2>&1 || return 0          # static
  for lib in $(ldd "$2" | grep -o '/[^ ]*' | sort -u); do
    [ -e "$1$lib" ] || add_file "$1" "$lib" "$lib"
  done
}
mkcpio() { (cd "$1" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0); }

TOOLS_CPIO=
build_tools() {  # the built-in tool list, cached by the tools' identity
  local t p found=() key
  for t in $GUEST_TOOLS; do
    p=$(host_cmd "$t") && found+=("$t:$p")
  done
  [ ${#found[@]} -gt 0 ] || return 0
  key=$(for t in "${found[@]}"; do stat -L -c "%n %s %Y" "${t#*:}"; echo "$t"; done | md5sum | cut -c1-12)
  TOOLS_CPIO=$CACHE/tools-$key.cpio
  [ -s "$TOOLS_CPIO" ] && return 0
  local r; r=$(mktemp -d "$CACHE/tmp.XXXXXX")
  for t in "${found[@]}"; do
    add_file "$r" "${t#*:}" "/usr/local/sbin/${t%%:*}"
    add_libs "$r" "${t#*:}"
  done
  [ -f /etc/mke2fs.conf ] && add_file "$r" /etc/mke2fs.conf /etc/mke2fs.conf
  mkcpio "$r" >"$TOOLS_CPIO.tmp"; mv "$TOOLS_CPIO.tmp" "$TOOLS_CPIO"; rm -rf "$r"
  find "$CACHE" -maxdepth 1 -name 'tools-*.cpio' ! -path "$TOOLS_CPIO" -delete
  log "guest tools cached ($(du -h "$TOOLS_CPIO" | cut -f1)): ${found[*]%%:*}"
}

shq() { printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"; }

# ------------------------------------------------------------------- main
mkdir -p "$CACHE"
# One run at a time fills the cache (apt lists, kernel dir, cpio images);
# held until this run's initrd has been assembled. Concurrent runs are fine.
exec 9>"$CACHE/.lock"
flock 9
ensure_host_packages
fetch_kernel
build_base
[ "$TOOLS" = 0 ] || build_tools
if [ "$PREPARE" = 1 ]; then log "cache ready in $CACHE ($(cat "$KDIR/version"))"; exit 0; fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/archip-vm.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
trap 'exit 130' INT TERM
O=$WORK/overlay
mkdir -p "$O/usr/local/bin" "$O/archipvm" "$O/root"
for b in "${BINS[@]}"; do
  [ -f "$b" ] || die "--bin $b: no such file"
  add_file "$O" "$b" "/usr/local/bin/$(basename "$b")"
  chmod 755 "$O/usr/local/bin/$(basename "$b")"
  add_libs "$O" "$b"
done
for f in "${FILES[@]}"; do
  src=${f%%:*}; dst=${f#*:}; [ "$dst" = "$f" ] && dst=/root/$(basename "$src")
  [ -e "$src" ] || die "--file $src: no such file"
  add_file "$O" "$src" "$dst"
done
MARKER="ARCHIPVM-EXIT-$$-$RANDOM$RANDOM:"
{
  echo "ARCHIPVM_MARKER='$MARKER'"
  echo "ARCHIPVM_SHARE='${SHARE:+1}'"
  [ "$NET" = 0 ] || echo "ARCHIPVM_NET=1"
  echo "ARCHIPVM_EPOCH='$(date +%s)'"
} >"$O/archipvm/config"
{
  for e in "${ENVS[@]}"; do echo "export ${e%%=*}=$(shq "${e#*=}")"; done
  for a in "$@"; do printf '%s ' "$(shq "$a")"; done
  echo
} >"$O/archipvm/cmd"
mkcpio "$O" >"$WORK/overlay.cpio"
# the kernel unpacks concatenated newc archives in order
cat "$BASE" ${TOOLS_CPIO:+"$TOOLS_CPIO"} "$WORK/overlay.cpio" >"$WORK/initrd.cpio"
exec 9>&-   # release the cache lock

APPEND="console=ttyS0 panic=-1 rdinit=/init mitigations=off"
[ "$VERBOSE" = 1 ] || APPEND="$APPEND quiet loglevel=4"
QARGS=(-nodefaults -no-user-config -display none -no-reboot
       -machine pc -m "$MEM" -smp "$CPUS"
       -kernel "$KDIR/vmlinuz" -initrd "$WORK/initrd.cpio" -append "$APPEND"
       -serial stdio)
if [ "$ACCEL" = kvm ]; then QARGS+=(-accel kvm -cpu host); else QARGS+=(-accel tcg -cpu max); fi
# shellcheck disable=SC2054
[ -z "$SHARE" ] || QARGS+=(-fsdev "local,id=fs0,path=$SHARE,security_model=none"
                           -device virtio-9p-pci,fsdev=fs0,mount_tag=hostshare)
# shellcheck disable=SC2054
[ "$NET" = 0 ] || QARGS+=(-netdev user,id=net0,ipv6=off -device virtio-net-pci,netdev=net0)
[ -z "$DISK" ] || QARGS+=(-drive "file=$DISK,format=raw,if=virtio,cache=unsafe")
# shellcheck disable=SC2206
[ -z "${ARCHIP_VM_QEMU_ARGS:-}" ] || QARGS+=($ARCHIP_VM_QEMU_ARGS)

# guest serial -> our stdout (CRs stripped, unbuffered) and a copy for the marker
set +e
timeout -k 5 "$TIMEOUT" qemu-system-x86_64 "${QARGS[@]}" </dev/null | sed -u 's/\r$//' | tee "$WORK/console.log"
qrc=${PIPESTATUS[0]}
set -e
status=$(sed -n "s/^.*$MARKER \([0-9]\{1,3\}\)\$/\1/p" "$WORK/console.log" | tail -n 1)
[ -z "$status" ] || exit "$status"
if [ "$qrc" = 124 ] || [ "$qrc" = 137 ]; then log "timeout after ${TIMEOUT}s"; exit 124; fi
log "the VM exited (qemu status $qrc) without reporting the command's status"
exit 125
