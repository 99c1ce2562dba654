#!/usr/bin/env bash
# Time to first token of llama.cpp's server (`cache_prompt`) on the very
# prompts of shoal's serving benchmark, beside shoal's own figures from the
# same invocation (scripts/bench-serving.sh). Prints one Markdown table:
# every figure as a ratio to the cold request of the same system, and the
# ratio shoal / llama.cpp.
#
# Usage: scripts/bench-llama-server.sh     (RUNS=3 WORDS=925 THREADS=2 CTX=2048)
#        SHOAL_BENCH=0 ...                 llama-server only
#        BUILD_ONLY=1 ...                  build (or find) llama-server and exit
#        SHOAL_REPO=DIR ...                run cargo (prompts, shoal's benchmark) in DIR
#
# llama-server is built from the llama.cpp tree vendored in the PyPI sdist of
# llama-cpp-python by scripts/build-llama-cpp.sh (Release, GGML_NATIVE, CPU
# only, no curl, no web UI, static, `-j2`; cached under
# ~/.cache/shoal/tools/llama.cpp-<version>/ and reused; no network during the
# build when run as root).
# The server binds 127.0.0.1 only and loads the local demo model GGUF.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(realpath "${SHOAL_REPO:-$PWD}")
RUNS=${RUNS:-3}
WORDS=${WORDS:-925}
THREADS=${THREADS:-2}
CTX=${CTX:-2048}
PORT=${PORT:-18089}

log() { echo "bench-llama-server: $*" >&2; }

# The tools (llama-server among them) are built once by scripts/build-llama-cpp.sh.
TOOLS=$(scripts/build-llama-cpp.sh)
BIN=$TOOLS/bin/llama-server
[[ -n ${BUILD_ONLY:-} ]] && { cat "$TOOLS/BUILD.txt"; exit 0; }

if [[ -z "${SHOAL_TEST_MODEL:-}" ]]; then
    SHOAL_TEST_MODEL="$(scripts/fetch-model.sh)"
    export SHOAL_TEST_MODEL
fi
TMP=$(mktemp -d)
SERVER_PID=
cleanup() {
    if [[ -n $SERVER_PID ]]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
    rm -rf "$TMP"
}
trap cleanup EXIT

echo "# $(date -u '+%Y-%m-%d %H:%M UTC'), load: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# llama-server: $(head -1 "$TOOLS/BUILD.txt"); $("$BIN" --version 2>&1 | grep -m1 -i version || true)"

# The exact prompts of shoal's benchmark (benches/serving.rs).
(cd "$REPO" && DUMP_PROMPTS=$TMP/prompts.json RUNS=$RUNS WORDS=$WORDS cargo bench --bench serving 2>/dev/null)

# shoal first, in the same invocation.
if [[ ${SHOAL_BENCH:-1} != 0 ]]; then
    RUNS=$RUNS WORDS=$WORDS "$REPO"/scripts/bench-serving.sh | tee "$TMP/shoal.txt"
    grep '^{' "$TMP/shoal.txt" | tail -1 >"$TMP/shoal.json"
else
    echo '{}' >"$TMP/shoal.json"
fi

start_server() {
    "$BIN" -m "$SHOAL_TEST_MODEL" --host 127.0.0.1 --port "$PORT" -t "$THREADS" -tb "$THREADS" \
        -c "$CTX" -np 1 --no-webui >>"$TMP/llama-server.log" 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 1 300); do
        if curl -sf "http://127.0.0.1:$PORT/health" >/dev/null 2>&1; then return 0; fi
        kill -0 "$SERVER_PID" 2>/dev/null || { tail -20 "$TMP/llama-server.log" >&2; exit 1; }
        sleep 0.1
    done
    log "llama-server did not become healthy"; tail -20 "$TMP/llama-server.log" >&2; exit 1
}
stop_server() {
    kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=
}

# One request per line of stdin ("<phase> <run> <which>"), same timing as
# benches/serving.rs: streaming /v1/completions, max_tokens 2, temperature 0,
# from sending to the first token chunk. Prints a JSON line per request.
cat >"$TMP/client.py" <<'EOF'
import json, socket, sys, time
port, prompts = int(sys.argv[1]), json.load(open(sys.argv[2]))
def ask(prompt, cache_prompt=True):
    body = json.dumps({"model": "demo", "prompt": prompt, "max_tokens": 2, "temperature": 0,
                       "stream": True, "stream_options": {"include_usage": True},
                       "cache_prompt": cache_prompt}).encode()
    req = (b"POST /v1/completions HTTP/1.1\r\nHost: b\r\nConnection: close\r\n"
           b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)) + body
    s = socket.create_connection(("127.0.0.1", port))
    t0 = time.perf_counter()
    s.sendall(req)
    got, first = b"", None
    while True:
        b = s.recv(65536)
        if not b:
            break
        got += b
        if first is None and b"data: {" in got:
            first = time.perf_counter() - t0
    s.close()
    chunks = [json.loads(l[6:]) for l in got.decode("utf-8", "replace").splitlines()
              if l.startswith("data: {")]
    text = "".join(c["choices"][0].get("text", "") for c in chunks if c.get("choices"))
    timings = next((c["timings"] for c in reversed(chunks) if "timings" in c), {})
    usage = next((c["usage"] for c in reversed(chunks) if c.get("usage")), {})
    return {"ttft": first, "first_chunk_text": chunks[0]["choices"][0].get("text") if chunks and chunks[0].get("choices") else None,
            "text": text, "prompt_tokens": usage.get("prompt_tokens"),
            "prompt_n": timings.get("prompt_n"), "cache_n": timings.get("cache_n"),
            "prompt_ms": timings.get("prompt_ms")}
for line in sys.stdin:
    phase, run, which = line.split()
    prompt = "Hello there" if which == "warmup" else prompts[int(run)][which]
    r = ask(prompt)
    r.update(phase=phase, run=int(run), which=which)
    print(json.dumps(r), flush=True)
EOF
client() { python3 "$TMP/client.py" "$PORT" "$TMP/prompts.json"; }

: >"$TMP/llama.jsonl"
start_server
{
    echo "warm 0 warmup"
    for ((r = 0; r < RUNS; r++)); do
        echo "cold $r cold"
        echo "followup $r followup"
    done
} | client >>"$TMP/llama.jsonl"
stop_server
sleep 0.2
start_server
{
    echo "warm 0 warmup"
    for ((r = 0; r < RUNS; r++)); do echo "restart $r followup"; done
} | client >>"$TMP/llama.jsonl"
stop_server

python3 - "$TMP/llama.jsonl" "$TMP/shoal.json" "$THREADS" "$CTX" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
shoal = json.loads(open(sys.argv[2]).read() or "{}")
threads, ctx = sys.argv[3], sys.argv[4]
def med(phase):
    v = sorted(r["ttft"] for r in rows if r["phase"] == phase)
    return v[len(v) // 2]
def last(phase, k):
    return [r[k] for r in rows if r["phase"] == phase][-1]
for r in rows:
    if r["phase"] != "warm":
        print(f"# llama-server {r['phase']:8} run {r['run']}: ttft {r['ttft']:.4f} s, "
              f"prompt_tokens {r['prompt_tokens']}, timings.prompt_n {r['prompt_n']}, "
              f"cache_n {r['cache_n']}, prompt_ms {r['prompt_ms']}, text {r['text']!r}")
lc, lf, lr = med("cold"), med("followup"), med("restart")
print()
print(f"llama-server: -t {threads} -tb {threads} -c {ctx} -np 1, cache_prompt true; "
      f"prompt {last('cold', 'prompt_tokens')} tokens; median of {len([r for r in rows if r['phase']=='cold'])}")
print()
print("| case | shoal TTFT s | shoal ratio to cold | llama-server TTFT s | llama-server ratio to cold | shoal / llama-server |")
print("|---|---|---|---|---|---|")
def row(name, s, l, lc_, note=""):
    sc = shoal.get("cold")
    cs = f"{s:.4f}" if s is not None else "–"
    cr = f"{s / sc:.4f}x" if s is not None and sc else "–"
    ls = f"{l:.4f}" if l is not None else "–"
    lr_ = f"{l / lc_:.4f}x" if l is not None else "–"
    sl = f"{s / l:.3f}" if s is not None and l is not None else "–"
    print(f"| {name} | {cs} | {cr} | {ls} | {lr_}{note} | {sl} |")
row("cold (anchor)", shoal.get("cold"), lc, lc)
row("follow-up from RAM (shoal: engine's hot sequence; llama-server: slot cache, `cache_prompt`)",
    shoal.get("ram"), lf, lc, f" (prompt_n {last('followup', 'prompt_n')})")
row("follow-up from RAM (shoal: RAM blocks after an unrelated request)", shoal.get("ram_blocks"), None, lc)
row("follow-up after a restart (shoal: disk blocks; llama-server: cache lost, cold again)",
    shoal.get("disk"), lr, lc, f" (prompt_n {last('restart', 'prompt_n')})")
row("follow-up from a neighbour (shoal: loopback mesh; llama-server: not shared)", shoal.get("neighbour"), None, lc)
print()
print(json.dumps({"llama_cold": lc, "llama_followup": lf, "llama_restart": lr,
                  "llama_prompt_tokens": last("cold", "prompt_tokens"),
                  "llama_followup_prompt_n": last("followup", "prompt_n"),
                  "llama_restart_prompt_n": last("restart", "prompt_n"), "shoal": shoal}))
EOF
