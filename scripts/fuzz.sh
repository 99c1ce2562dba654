#!/usr/bin/env bash
# Runs every cargo-fuzz target for a bounded time (default 60 s each).
# A benchmark-like run, not part of CI. Crashes land in fuzz/artifacts/<target>/;
# turn each into a regression test before fixing it.
#
# usage: scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."
SECS="${1:-60}"; shift || true
command -v cargo-fuzz >/dev/null 2>&1 || cargo install --quiet cargo-fuzz
# cargo-fuzz needs nightly flags; the stable toolchain accepts them with RUSTC_BOOTSTRAP.
export RUSTC_BOOTSTRAP=1
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo fuzz list --fuzz-dir fuzz)
for t in "${targets[@]}"; do
  echo "==> fuzzing $t for ${SECS}s" >&2
  mkdir -p "fuzz/corpus/$t"
  cargo fuzz run --fuzz-dir fuzz "$t" "fuzz/corpus/$t" -- -max_total_time="$SECS" -rss_limit_mb=2048 -max_len=1048576
done
