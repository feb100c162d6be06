#!/usr/bin/env bash
# Builds the release `archip` binary the way the container image does (Dockerfile runs this
# very script), so CI and the image build the same thing.
#
#   e2e/k8s/build-release.sh                       plain build (file backend)
#   ARCHIP_FEATURES=... e2e/k8s/build-release.sh   with extra cargo features
#
# Installs the build dependencies first (e2e/setup.sh; librados-dev for rados) when root.
set -euo pipefail
cd "$(dirname "$0")/../.."
features=${ARCHIP_FEATURES:-}

e2e/setup.sh
if [[ $features == *rados* ]] && [[ ! -f /usr/include/rados/librados.h ]]; then
  if [[ $(id -u) != 0 ]]; then
    echo "build-release.sh: the rados feature needs librados-dev; as root: apt-get install -y librados-dev" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends librados-dev >/dev/null
fi

cargo build --release --locked --bin archip ${features:+--features "$features"}
ls -l target/release/archip
