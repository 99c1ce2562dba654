#!/usr/bin/env bash
# Hostile-classroom soak: runs classes of hostile inputs (malformed requests,
# unauthenticated admin calls, foreign pages, id aliases, unknown ids, idle and
# slow connections, a chat template that never ends, a model file truncated
# while served, corrupt weights, damaged metadata, SIGKILLs, greedy answers
# cold and cached) against real `shoal` daemons on loopback, and prints one
# line per class: inputs tried, panics, hangs, data-loss cases, wrong answers.
#
# usage: scripts/soak.sh [--short] [CLASS...]
#   --short   the bounded version CI runs (a few minutes)
# Bounded: at most 10 minutes (SOAK_BUDGET seconds, default 600); nothing
# leaves loopback (mDNS off, --offline, static loopback ports).
# Exit status 0 only if every count but `tried` is zero.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p shoal-node >&2
MODEL="${SHOAL_TEST_MODEL:-$(scripts/fetch-model.sh)}"
exec timeout --kill-after=30 "${SOAK_TIMEOUT:-900}" \
  python3 scripts/soak.py --bin target/release/shoal --model "$MODEL" \
  --budget "${SOAK_BUDGET:-600}" "$@"
