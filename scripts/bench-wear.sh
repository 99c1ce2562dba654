#!/usr/bin/env bash
# SD-card wear (issue 17): bytes a node writes to disk
#   1. per byte fetched when it pulls a model from a peer (the demo model
#      and Gemma 3 270M), and
#   2. per 1,000 generated tokens through its HTTP API with the KV disk tier
#      on (distinct prompts, so every KV block is new and written behind),
#      split into the KV disk tier and the rest (the fjall metadata store).
#
# Two daemons on loopback (mDNS off, static peer): A holds the models, B
# pulls them and serves the completions. The figures are B's
# /proc/PID/io `write_bytes`: bytes the process caused to be sent to the
# block layer. Linux charges a buffered write when the page is *dirtied*
# (folio_account_dirtied -> task_io_account_write), not at writeback, so the
# count is complete as soon as write() returns (checked: the script reads it
# before and after `sync` and prints both); rewriting a page that is still
# dirty is not charged twice, and truncating a dirty page before writeback
# is subtracted (`cancelled_write_bytes`, reported). What is NOT in it:
# ext4's journal (written by the jbd2 thread) and the filesystem's own
# metadata blocks; the device-level delta of /sys/block/<dev>/stat around
# each phase (system-wide, so other processes add to it) is printed as an
# upper bound. The per-thread split reads /proc/PID/task/*/io: the KV tier
# writes from its own thread (`kv-write-behind`), fjall's flushes and
# compactions from its threads, the pull and fjall's journal from tokio
# workers. The data directories live under $WEAR_DIR (default /var/tmp,
# which must be a real disk: on tmpfs write_bytes is 0).
#
#   scripts/bench-wear.sh               (TOKENS=1024 MAX_TOKENS=64)
#   SHOAL=/path/to/shoal  GEMMA=/path/to/gemma.gguf  (GEMMA=none skips it)
#   KV_WRITE_BUDGET=1M scripts/bench-wear.sh   (kv.disk_write_budget_per_hour of B)
#
# Prints JSON lines ({"phase": ...}) and a summary; stops itself.
set -euo pipefail
cd "$(dirname "$0")/.."
SHOAL=$(realpath "${SHOAL:-${CARGO_TARGET_DIR:-target}/release/shoal}")
DEMO=${SHOAL_TEST_MODEL:-$HOME/.cache/shoal/models/SmolLM2-135M-Instruct.Q4_1.gguf}
GEMMA=${GEMMA:-$HOME/.cache/shoal/models/gemma-3-270m-Q4_K_M.gguf}
TOKENS=${TOKENS:-1024}
MAX_TOKENS=${MAX_TOKENS:-64}
[ -f "$DEMO" ] || DEMO=$(scripts/fetch-model.sh)
W=$(mktemp -d "${WEAR_DIR:-/var/tmp}/shoal-wear.XXXXXX")
FSTYPE=$(stat -f -c %T "$W")
if [ "$FSTYPE" = tmpfs ] || [ "$FSTYPE" = ramfs ]; then
    echo "$W is on $FSTYPE: write_bytes would be 0; set WEAR_DIR to a real disk" >&2
    rm -rf "$W"
    exit 1
fi
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$W"
}
trap cleanup EXIT INT TERM

echo "# $(date -u '+%Y-%m-%d %H:%M UTC'), load: $(cut -d' ' -f1-3 /proc/loadavg), data dirs on $FSTYPE ($(df --output=source "$W" | tail -1))" >&2

MODELS=("$DEMO")
[ "$GEMMA" != none ] && [ -f "$GEMMA" ] && MODELS+=("$GEMMA")
for m in "${MODELS[@]}"; do
    "$SHOAL" --data-dir "$W/a" --json add "$m" >/dev/null
done
mapfile -t IDS < <("$SHOAL" --data-dir "$W/a" --json ls | python3 -c '
import json, sys
for a in json.load(sys.stdin): print(a["id"], a.get("size", 0))')

ENV_B=()
[ -n "${KV_WRITE_BUDGET:-}" ] && ENV_B=(env "SHOAL_KV_DISK_WRITE_BUDGET=$KV_WRITE_BUDGET")
"$SHOAL" --data-dir "$W/a" serve --no-mdns --listen /ip4/127.0.0.1/tcp/19471 --api 127.0.0.1:19470 >"$W/a.log" 2>&1 &
PIDS+=($!)
"${ENV_B[@]}" "$SHOAL" --data-dir "$W/b" serve --no-mdns --listen /ip4/127.0.0.1/tcp/19481 --api 127.0.0.1:19480 \
    --peer /ip4/127.0.0.1/tcp/19471 >"$W/b.log" 2>&1 &
BPID=$!
PIDS+=($BPID)
for _ in $(seq 600); do
    c=$("$SHOAL" --data-dir "$W/b" --json status --api 127.0.0.1:19480 2>/dev/null |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["connected"])' 2>/dev/null || echo 0)
    [ "$c" -ge 1 ] && break
    sleep 0.1
done
[ "$c" -ge 1 ] || { echo "B never connected to A" >&2; cat "$W/b.log" >&2; exit 1; }

DEV=$(lsblk -no pkname "$(df --output=source "$W" | tail -1)" 2>/dev/null | head -1)
[ -n "$DEV" ] || DEV=$(basename "$(df --output=source "$W" | tail -1)")
export W BPID DEV SHOAL TOKENS MAX_TOKENS
python3 - "${IDS[@]}" <<'PY'
import glob, json, os, subprocess, sys, time, urllib.request

W, PID, DEV = os.environ["W"], int(os.environ["BPID"]), os.environ["DEV"]
SHOAL = os.environ["SHOAL"]
TOKENS, MAX_TOKENS = int(os.environ["TOKENS"]), int(os.environ["MAX_TOKENS"])
API = "http://127.0.0.1:19480"
models = [(l.split()[0], int(l.split()[1])) for l in sys.argv[1:]]


def io(path):
    out = {}
    with open(path) as f:
        for line in f:
            k, v = line.split(":")
            out[k] = int(v)
    return out


def threads():
    """write_bytes per thread name (threads of one name summed)."""
    out = {}
    for t in glob.glob(f"/proc/{PID}/task/*"):
        try:
            name = open(f"{t}/comm").read().strip()
            wb = io(f"{t}/io")["write_bytes"]
        except OSError:
            continue
        # tokio-runtime-w, fjall:..., kv-write-behind: group by the name.
        out[name] = out.get(name, 0) + wb
    return out


def dev_written():
    try:
        # field 7 (0-based 6): sectors written, 512 bytes each.
        return int(open(f"/sys/block/{DEV}/stat").read().split()[6]) * 512
    except (OSError, IndexError, ValueError):
        return 0


def du(d):
    total = 0
    for root, _, files in os.walk(d):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def snap():
    return {"io": io(f"/proc/{PID}/io"), "threads": threads(), "dev": dev_written()}


def delta(a, b):
    d = {k: b["io"][k] - a["io"].get(k, 0) for k in b["io"]}
    th = {k: v - a["threads"].get(k, 0) for k, v in b["threads"].items()}
    # A thread that exited took its count out of the per-thread sums (it
    # stays in the process total): only growth is shown.
    th = {k: v for k, v in th.items() if v > 0}
    return d, th, b["dev"] - a["dev"]


def metrics():
    try:
        text = urllib.request.urlopen(f"{API}/metrics", timeout=10).read().decode()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        if line.startswith("shoal_kv_disk_"):
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
    return out


def emit(**kw):
    print(json.dumps(kw), flush=True)


summary = []
subprocess.run(["sync"], check=True)
for mid, size in models:
    s0 = snap()
    t0 = time.time()
    subprocess.run([SHOAL, "--data-dir", f"{W}/b", "--json", "pull", mid, "--api", "127.0.0.1:19480"],
                   check=True, stdout=subprocess.DEVNULL)
    secs = time.time() - t0
    s1 = snap()
    subprocess.run(["sync"], check=True)
    s2 = snap()
    d, th, dev = delta(s0, s2)
    d1, _, _ = delta(s0, s1)
    ratio = d["write_bytes"] / size
    emit(phase="pull", model=mid[:16], bytes_fetched=size, seconds=round(secs, 2),
         write_bytes=d["write_bytes"], write_bytes_before_sync=d1["write_bytes"],
         cancelled_write_bytes=d["cancelled_write_bytes"], wchar=d["wchar"], rchar=d["rchar"],
         written_per_fetched=round(ratio, 4), device_bytes_system_wide=dev,
         by_thread=th, meta_dir_bytes=du(f"{W}/b/meta"))
    summary.append(f"pull {mid[:12]} ({size / 1e6:.1f} MB): {ratio:.4f} bytes written per byte fetched "
                   f"(write_bytes {d['write_bytes']}, device-level upper bound {dev / size:.3f})")

# Generation on B with the KV disk tier on: distinct prompts, so every block is new.
mid = models[0][0]
words = ("river stone lantern copper meadow harbor falcon orchard glacier ember willow canyon "
         "thistle beacon marble sparrow tundra violet quarry saffron").split()
s0 = snap()
m0 = metrics()
kv0 = du(f"{W}/b/kv")
meta0 = du(f"{W}/b/meta")
gen, prompt_tok, req = 0, 0, 0
t0 = time.time()
while gen < TOKENS and req < 200:
    a, b, c = words[req % 20], words[(req * 7 + 3) % 20], words[(req * 13 + 5) % 20]
    prompt = (f"Request {req}. Write a short, plain story about a {a}, a {b} and a {c}. "
              f"It takes place in the year {1800 + req * 3}, in a town numbered {req * 97 % 1000}. "
              "Describe the weather, the people, the sounds and the smells of the place, "
              "then tell what happens from morning to night, in simple sentences.")
    body = json.dumps({"model": mid, "prompt": prompt, "max_tokens": MAX_TOKENS,
                       "temperature": 0.8, "seed": req}).encode()
    r = urllib.request.Request(f"{API}/v1/completions", data=body,
                               headers={"content-type": "application/json"})
    resp = json.load(urllib.request.urlopen(r, timeout=600))
    gen += resp["usage"]["completion_tokens"]
    prompt_tok += resp["usage"]["prompt_tokens"]
    req += 1
secs = time.time() - t0
# Let the write-behind thread finish (it defers while a job runs, <= 2 s).
time.sleep(3)
s1 = snap()
m1 = metrics()
subprocess.run(["sync"], check=True)
s2 = snap()
d, th, dev = delta(s0, s2)
kv = th.get("kv-write-behind", 0)
other = d["write_bytes"] - kv
per = 1000 / max(gen, 1)
mdelta = {k: v - m0.get(k, 0) for k, v in m1.items()}
emit(phase="generate", requests=req, prompt_tokens=prompt_tok, generated_tokens=gen, seconds=round(secs, 1),
     write_bytes=d["write_bytes"], kv_thread_write_bytes=kv, other_write_bytes=other,
     write_bytes_per_1000_tokens=round(d["write_bytes"] * per),
     kv_per_1000_tokens=round(kv * per), other_per_1000_tokens=round(other * per),
     cancelled_write_bytes=d["cancelled_write_bytes"], device_bytes_system_wide=dev,
     kv_dir_growth=du(f"{W}/b/kv") - kv0, meta_dir_growth=du(f"{W}/b/meta") - meta0,
     by_thread=th, metrics=mdelta)
summary.append(f"generate: {gen} tokens ({prompt_tok} prompt tokens, {req} requests, {secs:.0f} s): "
               f"{d['write_bytes'] * per / 1e6:.2f} MB written per 1,000 generated tokens "
               f"(KV disk tier {kv * per / 1e6:.2f} MB, other incl. metadata {other * per / 1e6:.3f} MB)")
if mdelta:
    summary.append("metrics: " + ", ".join(f"{k} +{v:.0f}" for k, v in sorted(mdelta.items())))
print("\n".join("# " + s for s in summary), file=sys.stderr)
PY
