#!/usr/bin/env bash
# Time to first token of a ~1,000-token prompt through shoal's OpenAI API:
# cold (the anchor), then a follow-up sharing the prefix from the KV cache in
# RAM and from disk after a restart. Prints a Markdown table (ratios to cold).
#
# Usage: scripts/bench-serving.sh            (RUNS=3 WORDS=925 BLOCK=16)
# Needs the demo model (scripts/fetch-model.sh) or SHOAL_TEST_MODEL.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${SHOAL_TEST_MODEL:-}" ]]; then
    SHOAL_TEST_MODEL="$(scripts/fetch-model.sh)"
    export SHOAL_TEST_MODEL
fi
echo "# $(date -u '+%Y-%m-%d %H:%M UTC'), load: $(cut -d' ' -f1-3 /proc/loadavg)"
cargo bench --bench serving 2>/dev/null
