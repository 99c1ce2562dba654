#!/usr/bin/env bash
# The whole test suite: fetches the demo model if missing, then runs every test
# of the workspace in the release profile (the same build the quickstart uses).
set -euo pipefail
cd "$(dirname "$0")/.."
SHOAL_TEST_MODEL="$(scripts/fetch-model.sh)"
export SHOAL_TEST_MODEL
SHOAL_VOCAB_DIR="$(scripts/fetch-vocabs.sh)"; export SHOAL_VOCAB_DIR
echo "demo model: $SHOAL_TEST_MODEL" >&2
exec cargo test --release --workspace "$@"
