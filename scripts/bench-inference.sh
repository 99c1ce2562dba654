#!/usr/bin/env bash
# Benchmarks shoal's inference against llama.cpp (llama-cpp-python, built from
# its PyPI source distribution) on the demo model, same machine, same run,
# same thread counts; prints JSON lines and the ratios.
#
#   scripts/bench-inference.sh [--threads 1,2] [--pp 512] [--tg 128] [--reps 3]
#   scripts/bench-inference.sh --fixtures   # (re)write tests/fixtures/tokenizer_smollm2.json
#
# The llama.cpp build takes a few minutes on 2 cores (once; cached in a venv).
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=1,2; PP=512; TG=128; REPS=3; FIXTURES=0
while [ $# -gt 0 ]; do
  case "$1" in
    --threads) THREADS="$2"; shift 2;;
    --pp) PP="$2"; shift 2;;
    --tg) TG="$2"; shift 2;;
    --reps) REPS="$2"; shift 2;;
    --fixtures) FIXTURES=1; shift;;
    *) echo "unknown option $1" >&2; exit 2;;
  esac
done
MODEL="${SHOAL_TEST_MODEL:-$(scripts/fetch-model.sh)}"
VENV="${SHOAL_BENCH_VENV:-$HOME/.cache/shoal/bench-venv}"
if [ ! -x "$VENV/bin/python" ]; then python3 -m venv "$VENV"; fi
if ! "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
  echo "installing llama-cpp-python from PyPI (builds llama.cpp; a few minutes) ..." >&2
  CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON -DGGML_OPENMP=OFF}" \
    "$VENV/bin/pip" install --quiet --no-cache-dir llama-cpp-python >&2
fi
PY="$VENV/bin/python"

if [ "$FIXTURES" = 1 ]; then
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

cargo build --release --bench inference >&2 2>/dev/null || cargo bench --no-run --bench inference >&2
BENCH="$(ls -t target/release/deps/inference-* | grep -v '\.d$' | head -1)"

llama() {
  "$PY" - "$MODEL" "$1" "$PP" "$TG" "$REPS" <<'PY'
import json, resource, sys, time, os
t0 = time.perf_counter()
from llama_cpp import Llama
path, threads, pp, tg, reps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
t1 = time.perf_counter()
m = Llama(model_path=path, n_ctx=pp + tg + 8, n_batch=pp, n_ubatch=pp, n_threads=threads,
          n_threads_batch=threads, verbose=False)
load_ms = (time.perf_counter() - t1) * 1e3
rss = int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0])
vocab = m.n_vocab()
prompt = [(i * 7919 + 13) % vocab for i in range(pp)]
best_pp = best_tg = float("inf")
for _ in range(reps):
    m.reset(); m._ctx.kv_cache_clear() if hasattr(m._ctx, "kv_cache_clear") else None
    t = time.perf_counter(); m.eval(prompt); best_pp = min(best_pp, time.perf_counter() - t)
    m.reset(); m._ctx.kv_cache_clear() if hasattr(m._ctx, "kv_cache_clear") else None
    m.eval(prompt[:1])
    t = time.perf_counter()
    for i in range(tg):
        m.eval([prompt[(i + 1) % pp]])
    best_tg = min(best_tg, time.perf_counter() - t)
print(json.dumps({"impl": "llama.cpp", "threads": threads, "pp": pp, "pp_tps": round(pp / best_pp, 1),
                  "tg": tg, "tg_tps": round(tg / best_tg, 1), "load_ms": round(load_ms, 1),
                  "rss_after_load_kib": rss, "file_bytes": os.path.getsize(path)}))
PY
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
      f"load shoal {s['load_ms']} ms / llama.cpp {l['load_ms']} ms; tokenizer {s['tokenizer_load_ms']} ms; "
      f"RSS after load shoal {s['rss_after_load_kib']//1024} MiB, llama.cpp {l['rss_after_load_kib']//1024} MiB, file {s['file_bytes']//(1<<20)} MiB")
PY
done
