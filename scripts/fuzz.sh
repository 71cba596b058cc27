#!/usr/bin/env bash
# Runs every libFuzzer target of fuzz/ for a fixed time each and prints a summary.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     (default 300 s, all targets)
#
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`); libFuzzer needs nightly flags,
# which RUSTC_BOOTSTRAP=1 enables on the stable toolchain. One core per target, one
# target at a time. Memory: -rss_limit_mb=2048 and -malloc_limit_mb=256 (the decoder
# targets declare up to 2^34 elements but decode at most 8 MiB per tensor, their
# stand-in for the snapshot budget: a larger allocation is a finding). A crash leaves
# its input in fuzz/artifacts/<target>/; copy it to fuzz/regressions/<target>/ with a
# name, and add a named test to bitsnap-core/tests/fuzz_smoke.rs.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs="${1:-300}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(snapshot_header decode_planes decode_xor decode_bitmask decode_cluster manifest safetensors)
fi
export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR="${BITSNAP_FUZZ_TARGET_DIR:-/var/tmp/bitsnap-fuzz-target}"
# Scratch files of the manifest and safetensors targets: in memory where possible.
if [ -d /dev/shm ]; then export TMPDIR=/dev/shm; fi
log_dir="${BITSNAP_FUZZ_LOG_DIR:-$PWD/logs}"
mkdir -p "$log_dir"
cargo fuzz build --release --debug-assertions
printf '%-16s %8s %12s %10s %8s %s\n' target seconds executions exec/s crashes corpus
for t in "${targets[@]}"; do
  log="$log_dir/$t.log"
  work="$(mktemp -d)"
  # Grow a scratch corpus from the committed seeds; the committed corpus stays small.
  cp corpus/"$t"/* "$work"/ 2>/dev/null || true
  mkdir -p artifacts/"$t"
  set +e
  cargo fuzz run --release --debug-assertions "$t" "$work" -- \
    -max_total_time="$secs" -rss_limit_mb=2048 -malloc_limit_mb=256 -timeout=10 \
    -max_len=65536 -print_final_stats=1 -artifact_prefix=artifacts/"$t"/ \
    >"$log" 2>&1
  rc=$?
  set -e
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
  rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
  crashes=$(find artifacts/"$t" -type f | wc -l)
  printf '%-16s %8s %12s %10s %8s %s (rc %s)\n' "$t" "$secs" "$execs" "$rate" "$crashes" "$(ls "$work" | wc -l)" "$rc"
  rm -rf "$work"
done
