#!/usr/bin/env bash
# Benchmarks shoal's inference against llama.cpp's `llama-bench` (built from
# the llama-cpp-python PyPI sdist by scripts/build-llama-cpp.sh, once) on a
# model (default: the demo model; MODEL=gemma3 for Gemma 3 270M Q4_K_M, or a
# path), same machine, same run, same thread counts; prints JSON lines and
# the ratios.
#
#   scripts/bench-inference.sh [--model demo|gemma3|PATH] [--threads 1,2] [--pp 512] [--tg 128] [--reps 3]
#   scripts/bench-inference.sh --fixtures   # (re)write tests/fixtures/tokenizer_smollm2.json (llama-cpp-python venv)
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=1,2; PP=512; TG=128; REPS=3; FIXTURES=0; MODEL_ARG=${MODEL:-demo}
while [ $# -gt 0 ]; do
  case "$1" in
    --threads) THREADS="$2"; shift 2;;
    --pp) PP="$2"; shift 2;;
    --tg) TG="$2"; shift 2;;
    --reps) REPS="$2"; shift 2;;
    --fixtures) FIXTURES=1; shift;;
    --model) MODEL_ARG="$2"; shift 2;;
    *) echo "unknown option $1" >&2; exit 2;;
  esac
done
case "$MODEL_ARG" in
  demo) MODEL="${SHOAL_TEST_MODEL:-$(scripts/fetch-model.sh)}";;
  gemma3) MODEL="${SHOAL_GEMMA3_MODEL:-$(scripts/fetch-gemma3.sh)}";;
  *) MODEL="$MODEL_ARG";;
esac
if [ "$FIXTURES" = 1 ]; then
VENV="${SHOAL_BENCH_VENV:-$HOME/.cache/shoal/bench-venv}"
if [ ! -x "$VENV/bin/python" ]; then python3 -m venv "$VENV"; fi
if ! "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
  echo "installing llama-cpp-python from PyPI (builds llama.cpp; a few minutes) ..." >&2
  CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON -DGGML_OPENMP=OFF}" \
    "$VENV/bin/pip" install --quiet --no-cache-dir llama-cpp-python >&2
fi
PY="$VENV/bin/python"
  "$PY" - "$MODEL" tests/fixtures/tokenizer_smollm2.json <<'PY'
import json, sys
from llama_cpp import Llama
m = Llama(model_path=sys.argv[1], vocab_only=True, verbose=False)
texts = [
    "Hello, world! How are you today?",
    "The year 2024 had 366 days; π ≈ 3.14159.",
    "Größere Übungen für Äpfel — naïve café, déjà vu.",
    "Привет, как дела? Всё хорошо.",
    "你好，世界！今天天气很好。",
    "日本語のテキストとカタカナ、ひらがな。",
    "नमस्ते दुनिया, यह एक परीक्षण है।",
    "Emoji: 🦀🔥👍🏽 and ZWJ 👨‍👩‍👧",
    "fn main() {\n    println!(\"{}\", 1 + 2);\n}\n",
    "  leading spaces,\ttabs\t\tand   trailing   ",
    "line one\n\n\nline two\r\nline three",
    "it's we're they've I'm you'll he'd DON'T",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
]
cases = [[t, m.tokenize(t.encode(), add_bos=True, special=True)] for t in texts]
with open(sys.argv[2], "w") as f:
    json.dump(cases, f, ensure_ascii=False, indent=1)
    f.write("\n")
print(f"wrote {len(cases)} cases to {sys.argv[2]} (llama-cpp-python {__import__('llama_cpp').__version__})")
PY
  exit 0
fi


TOOLS="$(scripts/build-llama-cpp.sh)"
cargo build --release --bench inference >&2 2>/dev/null || cargo bench --no-run --bench inference >&2
BENCH="$(ls -t target/release/deps/inference-* | grep -v '\.d$' | head -1)"

llama() {
  "$TOOLS/bin/llama-bench" -m "$MODEL" -t "$1" -p "$PP" -n "$TG" -r "$REPS" -o json 2>/dev/null |
    python3 -c '
import json, os, sys
rows = json.load(sys.stdin)
out = {"impl": "llama.cpp (llama-bench)", "threads": rows[0]["n_threads"], "file_bytes": os.path.getsize(sys.argv[1]),
       "build": rows[0].get("build_commit", "")}
for r in rows:
    if r["n_prompt"] > 0 and r["n_gen"] == 0:
        out["pp"], out["pp_tps"] = r["n_prompt"], round(r["avg_ts"], 1)
    elif r["n_gen"] > 0 and r["n_prompt"] == 0:
        out["tg"], out["tg_tps"] = r["n_gen"], round(r["avg_ts"], 1)
print(json.dumps(out))' "$MODEL"
}

echo "# $(date -u +%FT%TZ) $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), model $MODEL" >&2
IFS=, read -ra TS <<< "$THREADS"
for t in "${TS[@]}"; do
  L="$(llama "$t")"
  S="$("$BENCH" --model "$MODEL" --threads "$t" --pp "$PP" --tg "$TG" --reps "$REPS")"
  echo "$L"; echo "$S"
  python3 - "$L" "$S" <<'PY'
import json, sys
l, s = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"threads {s['threads']}: pp{s['pp']} shoal {s['pp_tps']} / llama.cpp {l['pp_tps']} tok/s = {s['pp_tps']/l['pp_tps']:.2f}x; "
      f"tg{s['tg']} shoal {s['tg_tps']} / llama.cpp {l['tg_tps']} tok/s = {s['tg_tps']/l['tg_tps']:.2f}x; "
      f"load shoal {s['load_ms']} ms; tokenizer {s['tokenizer_load_ms']} ms; "
      f"RSS after load {s['rss_after_load_kib']//1024} MiB, file {s['file_bytes']//(1<<20)} MiB")
PY
done
