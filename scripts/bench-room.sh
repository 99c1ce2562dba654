#!/usr/bin/env bash
# Issue 18's room benchmark, the way a user meets it: shoal's daemon beside
# llama.cpp's llama-server in the same run, same model file, same prompts,
# through the streaming OpenAI chat API (/v1/chat/completions).
#
#  1. Load levels: N concurrent clients (CLIENTS), one streaming request each
#     (a distinct short question, max_tokens TOKENS, temperature 0,
#     stream_options.include_usage), all sent together. Per level: aggregate
#     tok/s (all completion tokens / wall time from the first send to the
#     last done), TTFT p50/p95 (send -> first non-empty content chunk),
#     per-client tok/s. Each server is started afresh per level with N slots
#     (shoal: inference.parallel = N, empty KV dir; llama-server: -np N
#     -c N*CTX_PER_SLOT -cb) and warmed up with one request first.
#  2. Single client: temperature 0 against temperature 0.7 / top_p 0.95
#     (seed 42), RUNS runs each, tok/s of the generation part (after the
#     first token), ratio t0.7/t0; and the raw engine's decode rate for
#     reference (`shoal generate`, same threads, no HTTP, greedy).
#  3. RSS: shoal's VmRSS after model load and warm-up (idle), and sampled
#     every 100 ms during the largest level (peak), beside inference.kv_budget.
#  4. Batching never changes answers: on the largest level's server, each of
#     its prompts again alone, one after the other (greedy); every answer
#     must equal its batched one (SKIP_ALONE=1 skips it).
#  5. Restart TTFT (shoal): a ~1,150-token shared system prompt plus a
#     question, 8 new tokens. (a) cold, on a fresh daemon with an empty KV
#     dir (model load included); (b) SIGTERM the daemon (once its KV
#     write-behind is done), start it again on the same data dir, first
#     request with the same system prompt and a new question; ratio b/a.
#     Where the time goes: the daemon's start to its API being up, and (c)
#     the next request with another question (model loaded, blocks in RAM):
#     b - c is the model load plus reading the prefix blocks from disk.
#     llama-server's cold TTFT of that prompt for reference.
#     The page cache is not dropped: the blocks just written are read back
#     from it, as after a daemon restart (not a reboot).
#
# llama.cpp's threads spin while they wait: on a machine loaded by other
# work its figures collapse far more than shoal's. Run it on a quiet machine
# (the load average at the start is printed and recorded); LLAMA_ARGS adds
# arguments to llama-server (e.g. "--poll 0").
#
# Prints progress and a summary table on stderr/stdout, then one final JSON
# line with every figure, the ratios shoal/llama-server and the goals.
#
# Usage: scripts/bench-room.sh
# Env:   CLIENTS="1 4 8 16"  TOKENS=96  THREADS=2  KV_BUDGET=256M  RUNS=3
#        RESTART_RUNS=3  CTX_PER_SLOT=2048  SKIP_LLAMA=1  SKIP_RESTART=1  SKIP_ALONE=1
#        SHOAL_BIN=target/release/shoal  SHOAL_TEST_MODEL=<gguf>  SYS_WORDS=860  LLAMA_ARGS=
# Smoke test: CLIENTS="1 4" TOKENS=16 RESTART_RUNS=1 scripts/bench-room.sh
# Everything listens on 127.0.0.1 (shoal: mDNS off, no peers); every server
# is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
HERE=$PWD
CLIENTS=${CLIENTS:-1 4 8 16}
TOKENS=${TOKENS:-96}
THREADS=${THREADS:-2}
KV_BUDGET=${KV_BUDGET:-256M}
RUNS=${RUNS:-3}
RESTART_RUNS=${RESTART_RUNS:-3}
CTX_PER_SLOT=${CTX_PER_SLOT:-2048}
SYS_WORDS=${SYS_WORDS:-860}
SKIP_LLAMA=${SKIP_LLAMA:-0}
SKIP_RESTART=${SKIP_RESTART:-0}
SKIP_ALONE=${SKIP_ALONE:-0}
read -r -a LLAMA_ARGS <<<"${LLAMA_ARGS:-}"
SHOAL_BIN=$(realpath "${SHOAL_BIN:-target/release/shoal}")
MODEL=${SHOAL_TEST_MODEL:-$HOME/.cache/shoal/models/SmolLM2-135M-Instruct.Q4_1.gguf}
NAME=bench-room:model
PY=(python3 "$HERE/scripts/bench-room.py")

log() { echo "bench-room: $*" >&2; }
[[ -x $SHOAL_BIN ]] || { log "no shoal binary at $SHOAL_BIN (set SHOAL_BIN)"; exit 1; }
[[ -f $MODEL ]] || MODEL=$(scripts/fetch-model.sh)
LLAMA_BIN=
if [[ $SKIP_LLAMA != 1 ]]; then
    LLAMA_BIN=$(scripts/build-llama-cpp.sh)/bin/llama-server
    [[ -x $LLAMA_BIN ]] || { log "no llama-server at $LLAMA_BIN"; exit 1; }
fi
read -r -a LEVELS <<<"$CLIENTS"
MAXN=0
for n in "${LEVELS[@]}"; do
    [[ $n =~ ^[1-9][0-9]*$ ]] || { log "CLIENTS must be positive integers: $CLIENTS"; exit 2; }
    ((n > MAXN)) && MAXN=$n
done

W=$(mktemp -d "${TMPDIR:-/tmp}/shoal-bench-room.XXXXXX")
OUT=$W/results.jsonl
# A copy of the binary: the whole run uses one build even if SHOAL_BIN is rebuilt meanwhile.
cp "$SHOAL_BIN" "$W/shoal"
SHOAL_BIN=$W/shoal
: >"$OUT"
SHOAL_PID=
LLAMA_PID=
# Stops a process: SIGTERM, up to 60 s, then SIGKILL.
stop_pid() {
    local pid=$1
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 600); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
# Runs a client phase in the background and waits for it, so that a signal
# stops the run at once (bash defers traps while a foreground child runs).
PY_PID=
py() {
    "$@" &
    PY_PID=$!
    wait "$PY_PID"
    PY_PID=
}
cleanup() {
    [[ -n $PY_PID ]] && { kill "$PY_PID" 2>/dev/null || true; }
    [[ -n $SHOAL_PID ]] && stop_pid "$SHOAL_PID"
    [[ -n $LLAMA_PID ]] && stop_pid "$LLAMA_PID"
    rm -rf "$W"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

DATE=$(date -u '+%Y-%m-%d %H:%M UTC')
LOADAVG=$(cut -d' ' -f1-3 /proc/loadavg)
echo "# $DATE, load: $LOADAVG, $(nproc) cores; shoal $("$SHOAL_BIN" --version 2>/dev/null | head -1); model $(basename "$MODEL")"
if python3 -c 'import os, sys; sys.exit(os.getloadavg()[0] <= os.cpu_count() / 2)'; then
    log "WARNING: load average $LOADAVG on $(nproc) cores: other work shares the CPU, the figures (llama-server's most) are not representative"
fi
[[ -n $LLAMA_BIN ]] && echo "# llama-server: $(head -1 "$(dirname "$LLAMA_BIN")/../BUILD.txt" 2>/dev/null || echo '?')"

# shoal runs with a clean environment: its own HOME, no SHOAL_* variables.
SHOAL_ENV=(env)
for v in $(compgen -e); do [[ $v == SHOAL_* ]] && SHOAL_ENV+=(-u "$v"); done
SHOAL_ENV+=(HOME="$W/home" XDG_CONFIG_HOME="$W/home/cfg" XDG_DATA_HOME="$W/home/data")
mkdir -p "$W/home"
D=$W/data
"${SHOAL_ENV[@]}" "$SHOAL_BIN" --data-dir "$D" add "$MODEL" --name "$NAME" >/dev/null

# inference.parallel and inference.kv_budget are issue 18's keys: an older
# binary refuses unknown keys, so each is written only when the binary takes it.
supports_key() { # section key value
    printf 'version = 1\n[%s]\n%s = %s\n' "$1" "$2" "$3" >"$W/probe.toml"
    "${SHOAL_ENV[@]}" "$SHOAL_BIN" --config "$W/probe.toml" config show >/dev/null 2>&1
}
HAS_PARALLEL=0
HAS_KV_BUDGET=0
supports_key inference parallel 1 && HAS_PARALLEL=1
supports_key inference kv_budget "\"$KV_BUDGET\"" && HAS_KV_BUDGET=1
((HAS_PARALLEL)) || log "this shoal has no inference.parallel: levels run with its default"
((HAS_KV_BUDGET)) || log "this shoal has no inference.kv_budget: not set"

SHOAL_URL=
SPAWN_TO_API=
start_shoal() { # parallel
    local n=$1 cfg=$W/shoal-$1.toml
    {
        echo "version = 1"
        echo "[inference]"
        echo "threads = $THREADS"
        echo "queue_depth = $((n > 16 ? n : 16))"
        # As a deployed node is set up: the model it serves is loaded at start.
        echo "default_model = \"$NAME\""
        ((HAS_PARALLEL)) && echo "parallel = $n"
        ((HAS_KV_BUDGET)) && echo "kv_budget = \"$KV_BUDGET\""
        echo "[response_cache]"
        echo "budget = 0"
    } >"$cfg"
    : >"$W/shoal.log"
    local t0
    t0=$(date +%s.%N)
    "${SHOAL_ENV[@]}" "$SHOAL_BIN" --data-dir "$D" --config "$cfg" serve --no-mdns \
        --listen /ip4/127.0.0.1/tcp/0 --api 127.0.0.1:0 --log warn 2>"$W/shoal.log" &
    SHOAL_PID=$!
    SHOAL_URL=
    for _ in $(seq 600); do
        SHOAL_URL=$(grep -ao 'API on http://127\.0\.0\.1:[0-9]*' "$W/shoal.log" | head -1 | sed 's/^API on //' || true)
        [[ -n $SHOAL_URL ]] && break
        kill -0 "$SHOAL_PID" 2>/dev/null || break
        sleep 0.05
    done
    if [[ -z $SHOAL_URL ]]; then
        log "shoal serve did not come up; its log:"; tail -20 "$W/shoal.log" >&2; exit 1
    fi
    SPAWN_TO_API=$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.4f}')" "$t0" "$(date +%s.%N)")
}
stop_shoal() { stop_pid "$SHOAL_PID"; SHOAL_PID=; }

LLAMA_URL=
start_llama() { # slots
    local n=$1 port
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    "$LLAMA_BIN" -m "$MODEL" --host 127.0.0.1 --port "$port" -t "$THREADS" -tb "$THREADS" \
        -c $((n * CTX_PER_SLOT)) -np "$n" -cb --no-webui "${LLAMA_ARGS[@]}" >"$W/llama.log" 2>&1 &
    LLAMA_PID=$!
    LLAMA_URL=http://127.0.0.1:$port
    for _ in $(seq 1200); do
        curl -sf "$LLAMA_URL/health" >/dev/null 2>&1 && return 0
        kill -0 "$LLAMA_PID" 2>/dev/null || break
        sleep 0.1
    done
    log "llama-server did not become healthy; its log:"; tail -20 "$W/llama.log" >&2; exit 1
}
stop_llama() { stop_pid "$LLAMA_PID"; LLAMA_PID=; }

# One server through the load levels and the single-client test, started
# afresh (empty KV dir for shoal) with N slots for each level.
start_server() { # shoal|llama slots
    if [[ $1 == shoal ]]; then
        rm -rf "$D/kv"
        start_shoal "$2"; URL=$SHOAL_URL; PID=$SHOAL_PID
    else
        start_llama "$2"; URL=$LLAMA_URL; PID=$LLAMA_PID
    fi
    log "$1 with $2 slot(s) at $URL"
    py "${PY[@]}" warm --url "$URL" --model "$NAME" --out "$OUT" --server "$1"
}
stop_server() { if [[ $1 == shoal ]]; then stop_shoal; else stop_llama; fi; }
run_single() { # shoal|llama
    py "${PY[@]}" single --url "$URL" --model "$NAME" --out "$OUT" --server "$1" --tokens "$TOKENS" --runs "$RUNS"
}
run_levels() { # shoal|llama
    local s=$1 single_done=0 rss
    for n in "${LEVELS[@]}"; do
        start_server "$s" "$n"
        rss=()
        if ((n == MAXN)); then
            py "${PY[@]}" rss --pid "$PID" --out "$OUT" --server "$s" --what idle --clients "$n"
            rss=(--rss-pid "$PID")
        fi
        py "${PY[@]}" load --url "$URL" --model "$NAME" --out "$OUT" --server "$s" --clients "$n" \
            --tokens "$TOKENS" "${rss[@]}"
        if ((n == MAXN && n > 1)) && [[ $SKIP_ALONE != 1 ]]; then
            py "${PY[@]}" alone --url "$URL" --model "$NAME" --out "$OUT" --server "$s" --clients "$n" --tokens "$TOKENS"
        fi
        if ((n == 1 && !single_done)); then
            run_single "$s"
            single_done=1
        fi
        stop_server "$s"
    done
    if ((!single_done)); then
        start_server "$s" 1
        run_single "$s"
        stop_server "$s"
    fi
}

# Waits until the KV dir stops growing (the write-behind is done), at most 15 s.
kv_settled() {
    local prev=-1 cur
    for _ in $(seq 30); do
        cur=$(find "$D/kv" -type f 2>/dev/null | wc -l)
        ((cur > 0 && cur == prev)) && { echo "$cur"; return 0; }
        prev=$cur
        sleep 0.5
    done
    echo "$cur"
}

log "shoal: load levels ($CLIENTS) and single client"
run_levels shoal
log "shoal: the raw engine's decode rate (shoal generate, $THREADS threads, $RUNS runs)"
py "${SHOAL_ENV[@]}" "${PY[@]}" engine --shoal-bin "$SHOAL_BIN" --model-path "$MODEL" --threads "$THREADS" \
    --tokens "$TOKENS" --runs "$RUNS" --out "$OUT"
if [[ $SKIP_RESTART != 1 ]]; then
    log "shoal: restart TTFT ($RESTART_RUNS runs)"
    for ((r = 0; r < RESTART_RUNS; r++)); do
        rm -rf "$D/kv"
        start_shoal 1
        py "${PY[@]}" restart --url "$SHOAL_URL" --model "$NAME" --out "$OUT" --server shoal --phase cold \
            --run "$r" --sys-words "$SYS_WORDS" --spawn-to-api "$SPAWN_TO_API"
        blocks=$(kv_settled)
        log "  $blocks KV block files on disk before the restart"
        stop_shoal
        start_shoal 1
        py "${PY[@]}" restart --url "$SHOAL_URL" --model "$NAME" --out "$OUT" --server shoal --phase restart \
            --run "$r" --sys-words "$SYS_WORDS" --spawn-to-api "$SPAWN_TO_API"
        py "${PY[@]}" restart --url "$SHOAL_URL" --model "$NAME" --out "$OUT" --server shoal --phase hot \
            --run "$r" --sys-words "$SYS_WORDS"
        stop_shoal
    done
fi
if [[ $SKIP_LLAMA != 1 ]]; then
    log "llama-server: load levels ($CLIENTS) and single client"
    run_levels llama
    if [[ $SKIP_RESTART != 1 ]]; then
        log "llama-server: cold TTFT of the long prompt ($RESTART_RUNS runs)"
        for ((r = 0; r < RESTART_RUNS; r++)); do
            start_llama 1
            py "${PY[@]}" restart --url "$LLAMA_URL" --model "$NAME" --out "$OUT" --server llama --phase cold \
                --run "$r" --sys-words "$SYS_WORDS"
            stop_llama
        done
    fi
fi

KV_BYTES=$(python3 -c '
import sys
s = sys.argv[1].strip().upper()
m = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
print(int(float(s[:-1]) * m[s[-1]]) if s and s[-1] in m else int(s))' "$KV_BUDGET")
META=$(python3 -c 'import json, sys; print(json.dumps(dict(zip(sys.argv[1::2], sys.argv[2::2]))))' \
    date "$DATE" loadavg "$LOADAVG" threads "$THREADS" tokens "$TOKENS" clients "$CLIENTS" \
    kv_budget "$KV_BUDGET" model "$(basename "$MODEL")" ctx_per_slot "$CTX_PER_SLOT")
META=$(python3 -c 'import json, sys; m = json.loads(sys.argv[1]); m["kv_budget_bytes"] = int(sys.argv[2])
m["kv_budget_set"] = sys.argv[3] == "1"; m["parallel_set"] = sys.argv[4] == "1"
for k in ("threads", "tokens", "ctx_per_slot"): m[k] = int(m[k])
print(json.dumps(m))' "$META" "$KV_BYTES" "$HAS_KV_BUDGET" "$HAS_PARALLEL")
echo
py "${PY[@]}" report --out "$OUT" --meta "$META"
