#!/usr/bin/env bash
# Installs what building and testing Archipelago needs beyond Rust and gcc, on Debian/Ubuntu.
#
#   e2e/setup.sh          check, and install what is missing when run as root
#   e2e/setup.sh --check  only check; print the install line and fail if something is missing
#
# Needed: libclang (libublk's bindgen, at build time), e2fsprogs and xfsprogs (mkfs in the node
# tests), qemu-utils (qemu-img/qemu-io against the NBD export). protoc is NOT needed: the CSI
# protobufs are compiled in pure Rust (protox). The VM and Ceph suites install their own extras
# (e2e/vm/run-in-vm.sh, e2e/ceph/start-ceph.sh).
set -euo pipefail

check_only=0
[[ ${1:-} == --check ]] && check_only=1

missing=()
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

# bindgen loads libclang.so at build time; any libclang-N-dev or libclang1-N provides it.
if ! ls /usr/lib/llvm-*/lib/libclang.so* /usr/lib/llvm-*/lib/libclang-[0-9]*.so* /usr/lib/x86_64-linux-gnu/libclang-[0-9]*.so* >/dev/null 2>&1; then
  missing+=(libclang-dev)
fi
for pkg in e2fsprogs xfsprogs qemu-utils pkg-config; do
  have_pkg "$pkg" || missing+=("$pkg")
done

if [[ ${#missing[@]} -eq 0 ]]; then
  exit 0
fi
line="apt-get update && apt-get install -y --no-install-recommends ${missing[*]}"
if [[ $check_only == 0 && $(id -u) == 0 ]]; then
  echo "e2e/setup.sh: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  exit 0
fi
echo "e2e/setup.sh: missing ${missing[*]}; as root, run:" >&2
echo "  $line" >&2
exit 1
