#!/usr/bin/env bash
# Runs every fuzz target in fuzz/ (libFuzzer through cargo-fuzz) for a bounded time each.
#
#   e2e/fuzz.sh                 every target, ARCHIP_FUZZ_SECS seconds each (default 30)
#   e2e/fuzz.sh map_page nbd_proto
#
# Starts from the committed seed corpus (fuzz/corpus/<target>/, regenerate with
# fuzz/gen_corpus.py) and adds what it finds to a scratch directory, so the tree is not
# touched. Fails if any target crashes (a panic, an out-of-bounds access, a leak of the
# sanitizer, an allocation past -rss_limit_mb, an input slower than -timeout) and prints the
# path of each crashing input: reproduce with
#   cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run <target> <path>
# and turn it into a unit test in the owning crate next to the fix.
#
# cargo-fuzz wants nightly; RUSTC_BOOTSTRAP=1 lets the stable toolchain build it. The RADOS
# lock decoder is fuzzed only where librados is installed (as the `rados` feature needs).
set -euo pipefail

secs=${ARCHIP_FUZZ_SECS:-30}
seed=${ARCHIP_FUZZ_SEED:-1}
[[ $seed == random ]] && seed=$(( (RANDOM << 15 | RANDOM) + 1 ))
[[ $seed =~ ^[1-9][0-9]*$ ]] || { echo "fuzz: ARCHIP_FUZZ_SEED must be a positive number or 'random'" >&2; exit 2; }
root=$(cd "$(dirname "$0")/.." && pwd)
fuzz="$root/fuzz"
export RUSTC_BOOTSTRAP=1
export CARGO_PROFILE_RELEASE_DEBUG=line-tables-only

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

features=()
# The link-time name (librados.so, from librados-dev), not just the runtime librados.so.2 that
# qemu-utils pulls in through librbd1.
if ! ldconfig -p 2>/dev/null | grep -q 'librados\.so ('; then
  echo "fuzz: librados not found; the RADOS lock decoder is not fuzzed"
  features=(--no-default-features --features node,csi)
fi

if [[ $# -gt 0 ]]; then
  targets=("$@")
else
  mapfile -t targets < <(cd "$fuzz" && cargo fuzz list)
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/archip-fuzz.XXXXXX")
artifacts="$work/artifacts"
mkdir -p "$artifacts"
# The targets' scratch files (nbd_session's peer set, the xseg images) live under $work and
# /dev/shm; a fuzzing process exits without running destructors, so clean up here.
cleanup() {
  rm -rf "$work/tmp" "$work/corpus"
  rm -rf /dev/shm/xseg-nbdfuzz-* /dev/shm/archip-fuzz-xseg* 2>/dev/null || true
}
trap cleanup EXIT

cd "$fuzz"
echo "fuzz: building ${#targets[@]} targets"
cargo fuzz build "${features[@]}"

failed=()
for t in "${targets[@]}"; do
  mkdir -p "$work/corpus/$t" "$work/tmp"
  echo "fuzz: $t for ${secs}s, seed $seed"
  log="$work/$t.log"
  # -timeout: one input may take at most this long (a hang is a finding);
  # -rss_limit_mb / -malloc_limit_mb: a length field must not make us allocate gigabytes.
  if TMPDIR="$work/tmp" cargo fuzz run "${features[@]}" "$t" "$work/corpus/$t" "corpus/$t" -- \
      -seed="$seed" -max_total_time="$secs" -timeout=25 -rss_limit_mb=2048 -malloc_limit_mb=1024 \
      -artifact_prefix="$artifacts/$t-" -print_final_stats=1 >"$log" 2>&1; then
    grep -E '^stat::number_of_executed_units|^Done [0-9]+ runs' "$log" | tail -1 | sed "s/^/fuzz: $t: /" || true
  else
    failed+=("$t")
    echo "fuzz: $t FAILED (seed $seed: ARCHIP_FUZZ_SEED=$seed e2e/fuzz.sh $t); last lines of its log ($log):"
    tail -40 "$log"
  fi
  rm -rf /dev/shm/xseg-nbdfuzz-* 2>/dev/null || true
done

shopt -s nullglob
crashes=("$artifacts"/*)
if [[ ${#failed[@]} -gt 0 || ${#crashes[@]} -gt 0 ]]; then
  echo "fuzz: failing targets: ${failed[*]:-none}"
  for c in "${crashes[@]}"; do
    # In base64 too, so that a finding in CI (whose scratch files are gone) can be reproduced:
    #   base64 -d > crash <<< '...'; cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run <target> crash
    echo "fuzz: crashing input: $c ($(stat -c %s "$c") bytes), base64:"
    head -c 65536 "$c" | base64 -w 0
    echo
  done
  trap - EXIT
  rm -rf "$work/tmp" "$work/corpus"
  exit 1
fi
echo "fuzz: ${#targets[@]} targets, no crash"
rm -rf "$work"
