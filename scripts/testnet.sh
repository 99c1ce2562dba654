#!/usr/bin/env bash
# Network-namespace testnet: real `shoal serve` processes, one per namespace,
# on a Linux bridge, each link rate-limited with tbf, mDNS discovery on.
#
#   scripts/testnet.sh [SCENARIO...]        (default: all)
#
# Scenarios (the default set are tests): fanout seeder-killed liar psk origin sigkill-restart
#   discovery-redial
# Discovery scenarios (run by name; the netns test runs them with STARTS=3):
#   discovery-soak   STARTS (default 20) cold starts of NODES nodes with mDNS on one
#                    bridge; in each, every node must be connected to all the others
#                    within DISCOVERY_SECS (default 5) of the last node's start (the
#                    nodes' own log timestamps);
#                    one line per start and a summary (LOAD=N adds N busy loops)
#   discovery-redial two nodes find each other by mDNS while their TCP ports are
#                    unreachable; once reachable they must connect (a failed dial
#                    to an mDNS peer is retried)
# Scale scenario (issue 20; run by name):
#   scale        NODES (default 64 here) daemons with mDNS on one bridge, started
#                in batches of BATCH (8), each with mesh.max_connections MAX_CONN
#                (48) and mesh.min_connections MIN_CONN (8). Every node must come
#                to know NODES-1 peers (shoal_peers_known) within WAIT_SECS; then
#                SAMPLES (7) samples over SAMPLE_SECS (30) of each node's
#                established TCP connections on the mesh port (ss, both
#                directions) and shoal_peers_connected: no node's connections
#                (the metric) may exceed MAX_CONN (TCP may, by handshakes in flight);
#                a signed release posted to node 0 must be resolved by every node
#                (GET /admin/releases) within WAIT_SECS; after SETTLE_SECS (10)
#                each daemon's CPU (utime+stime) over IDLE_SECS (30), fds, RSS.
#                One RESULT line; goals (release <= 5 s, idle CPU <= 1 % of a
#                core) are logged as met or MISSED
# Benchmark scenarios (run by name; they print figures):
#   swarm        a single 1 -> 1 transfer, then 1 seeder -> NODES-1 nodes; the last
#                node's completion time as a ratio to the single transfer
#   kv-neighbour time to first token on node 1 with the prefix KV blocks of node 0
#                (which answered the prompt) against node 0's cold answer
#                (use RATE=1gbit; needs the demo model, SHOAL_TEST_MODEL)
# Routing scenarios (issue 19; run by name; need SHOAL_TEST_MODEL, added as `demo`
#   on the holders only; the issue's nodes 1..4 are nodes 0..3 here; the load
#   client is scripts/route-client.py). Correctness fails the run; speed goals
#   are logged as "goal ...: met" or "MISSED":
#   route-forward  only node 0 holds the model (use RATE=1gbit BURST=1mb); all
#                  trust node 0's key, which names it. RUNS (default 5) streamed
#                  chats straight to node 0 and via node 2 (route.pull = never),
#                  all served by node 0 (X-Shoal-Served-By): median TTFTs (goal:
#                  via <= direct + 50 ms). Then node 3's first request (pull on
#                  first use) must be served by node 0 while node 3 pulls in the
#                  background (far below the transfer time); node 3 must end up
#                  holding the model
#   route-balance  nodes 0 and 1 hold the model, THREADS (default 1) inference
#                  threads each; CLIENTS (16) streaming clients round-robin over
#                  the live nodes, TOKENS (64) tokens, temperature 0, for DURATION
#                  seconds (30) or REQUESTS per client: first node 0 alone (node 1
#                  not started), then both. Aggregate tok/s (all, and of the
#                  steady state between RAMP and DURATION), the ratio (of the
#                  steady state with DURATION; goal >= 1.8),
#                  failed requests (must be 0), |queue0 - queue1| sampled every
#                  200 ms (shoal_queue_depth; goal: max <= 2). RAMP=S spreads the
#                  clients' starts over S seconds (default 0: all at once; also
#                  in route-failover)
#   route-prefix   nodes 1 and 2 hold the model; a ~1,000-token system prompt
#                  (SYSTEM_WORDS, 750 words) sent to node 1 with X-Shoal-Route:
#                  local; a same-length other one to node 2 alone (cold); then K
#                  (5) questions with the first prompt at node 2: each must be
#                  served by node 1, median TTFT < PREFIX_BOUND (0.5) x cold
#                  (goal <= 0.05x)
#   route-failover nodes 0 and 1 hold the model, inference.parallel = 2; node 3
#                  gets FAILOVER_REQUESTS (12) concurrent streams of
#                  FAILOVER_TOKENS (200); once KILL_AFTER (2) have a token, the
#                  holder serving most is SIGKILLed: every request without a token
#                  then must complete on the other; those streaming from the
#                  killed node must end with an error event; none may hang
# Environment: NODES (default 4), RATE (tbf rate, default 100mbit),
#   BURST (tbf bucket, default 256kb; ~1mb for RATE=1gbit),
#   ONLINE (origin scenario: how many nodes may use the origin, default 2),
#   SIZE_MB (artifact size, default 32), SHOAL (binary, default target/release/shoal),
#   WAIT_SECS (bound on every wait, default 120), KEEP=1 keeps the work dir,
#   NODE_LOG (the nodes' --log filter, default info; e.g. info,shoal::mesh=debug).
#   In the routing scenarios WAIT_SECS also bounds every request (a hang fails).
#
# Needs root (network namespaces). Without root it says so loudly and exits 0.
# Everything it creates (namespaces, veths, bridge, processes, files) is removed
# on exit, also on failure or Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "!!!!!!!! SKIPPED: scripts/testnet.sh needs root for network namespaces !!!!!!!!" >&2
    exit 0
fi

# The scale scenario alone defaults to 64 nodes.
[ -n "${NODES:-}" ] || [ "$*" != scale ] || NODES=64
NODES=${NODES:-4}
RATE=${RATE:-100mbit}
# tbf's bucket: at least rate / HZ, so 256kb suits 100mbit; use ~1mb for 1gbit.
BURST=${BURST:-256kb}
SIZE_MB=${SIZE_MB:-32}
WAIT_SECS=${WAIT_SECS:-120}
SHOAL=$(realpath "${SHOAL:-target/release/shoal}")
[ -x "$SHOAL" ] || { echo "no shoal binary at $SHOAL (cargo build --release -p shoal-node)" >&2; exit 1; }
SCENARIOS=("$@")
[ ${#SCENARIOS[@]} -gt 0 ] || SCENARIOS=(fanout seeder-killed liar psk origin sigkill-restart discovery-redial)

TAG="sh$$"
TAG=${TAG:0:8}
BR="${TAG}br"
WORK=$(mktemp -d /tmp/shoal-testnet.XXXXXX)
NSES=()
PIDS=()
FAILED=0

log() { echo "[testnet $(date +%T)] $*" >&2; }
fail() {
    log "FAIL: $*"
    FAILED=1
    exit 1
}

cleanup() {
    local rc=$?
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    for ns in "${NSES[@]}"; do
        ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
        ip netns del "$ns" 2>/dev/null || true
    done
    ip link del "$BR" 2>/dev/null || true
    if [ "${KEEP:-0}" = 1 ] || [ $rc != 0 ]; then
        log "work dir kept: $WORK"
    else
        rm -rf "$WORK"
    fi
    exit $rc
}
trap cleanup EXIT INT TERM

ns() { echo "${TAG}-$1"; }
ipof() { echo "10.77.0.$((10 + $1))"; }

setup_net() {
    ip link add "$BR" type bridge
    ip link set "$BR" up
    local i
    for ((i = 0; i < NODES + 1; i++)); do
        local n v p
        n=$(ns "$i") v="${TAG}v$i" p="${TAG}p$i"
        ip netns add "$n"
        NSES+=("$n")
        ip link add "$v" type veth peer name "$p"
        ip link set "$p" netns "$n"
        ip -n "$n" link set "$p" name eth0
        ip -n "$n" addr add "$(ipof "$i")/24" dev eth0
        ip -n "$n" link set eth0 up
        ip -n "$n" link set lo up
        ip -n "$n" route add 224.0.0.0/4 dev eth0
        ip link set "$v" master "$BR"
        ip link set "$v" up
        # Both directions limited: the node's uplink and its downlink.
        tc -n "$n" qdisc add dev eth0 root tbf rate "$RATE" burst "$BURST" latency 100ms
        tc qdisc add dev "$v" root tbf rate "$RATE" burst "$BURST" latency 100ms
    done
    log "network: $((NODES + 1)) namespaces on bridge $BR, links $RATE"
}

# nsx I ARGS...: run the shoal CLI inside node I's namespace (API on its own loopback).
nsx() {
    local i=$1
    shift
    ip netns exec "$(ns "$i")" "$SHOAL" --data-dir "$WORK/n$i" "$@"
}

# launch_node I ARGS...: start node I's daemon without waiting for it.
launch_node() {
    local i=$1
    shift
    ip netns exec "$(ns "$i")" "$SHOAL" --data-dir "$WORK/n$i" --log "${NODE_LOG:-info}" serve \
        --listen /ip4/0.0.0.0/tcp/7071 --api 127.0.0.1:7070 "$@" >>"$WORK/n$i.log" 2>&1 &
    echo $! >"$WORK/n$i.pid"
    PIDS+=($!)
    disown $!
}

start_node() {
    launch_node "$@"
    wait_up "$1"
}

# wait_up I: until node I's API answers.
wait_up() {
    local i=$1 t=0
    until nsx "$i" status >/dev/null 2>&1; do
        sleep 0.2
        t=$((t + 1))
        [ $t -lt $((WAIT_SECS * 5)) ] || fail "node $i never answered (see $WORK/n$i.log)"
    done
}

stop_node() {
    local i=$1 sig=${2:-TERM}
    local pid
    pid=$(cat "$WORK/n$i.pid")
    kill "-$sig" "$pid" 2>/dev/null || true
    local t=0
    while kill -0 "$pid" 2>/dev/null; do
        sleep 0.1
        t=$((t + 1))
        [ $t -lt $((WAIT_SECS * 10)) ] || fail "node $i does not stop"
    done
}

stop_all() {
    local i
    for ((i = 0; i < NODES + 1; i++)); do
        [ -f "$WORK/n$i.pid" ] && stop_node "$i" KILL
        rm -f "$WORK/n$i.pid"
    done
    rm -rf "$WORK"/n*/  # data dirs; the logs stay for KEEP=1
}

# jqpy EXPR < json: evaluate a Python expression on the parsed JSON `j`.
jqpy() { python3 -c "import json,sys; j=json.load(sys.stdin); print($1)"; }

wait_peers() {
    local i=$1 want=$2 t=0
    until [ "$(nsx "$i" --json status 2>/dev/null | jqpy 'j["connected"]' 2>/dev/null || echo 0)" -ge "$want" ]; do
        sleep 0.2
        t=$((t + 1))
        [ $t -lt $((WAIT_SECS * 5)) ] || fail "node $i has fewer than $want peers"
    done
}

# progress I ID: bytes present of ID's download on node I (0 if none yet).
progress() {
    nsx "$1" --json status 2>/dev/null |
        jqpy "next((d['have_bytes'] for d in j['downloads'] if d['id']=='$2'), 0)" 2>/dev/null || echo 0
}

wait_progress() {
    local i=$1 id=$2 bytes=$3 t=0
    until [ "$(progress "$i" "$id")" -ge "$bytes" ]; do
        sleep 0.1
        t=$((t + 1))
        [ $t -lt $((WAIT_SECS * 10)) ] || fail "node $i never reached $bytes bytes"
    done
}

assert_identical() {
    local i=$1 id=$2
    cmp -s "$WORK/n$i/objects/$id" "$SRC" || fail "node $i: artifact differs from the source"
}

seed() {
    local i=$1
    "$SHOAL" --data-dir "$WORK/n$i" --json add "$SRC" | jqpy 'j["id"]'
}

# pull_all ID NODES...: concurrent `shoal pull` on NODES; each one's JSON progress in $WORK/pull-I.json.
pull_all() {
    local id=$1
    shift
    local pids=() i
    for i in "$@"; do
        timeout "$WAIT_SECS" bash -c "ip netns exec $(ns "$i") $SHOAL --data-dir $WORK/n$i --json pull $id >$WORK/pull-$i.json 2>>$WORK/pull-$i.err" &
        pids+=($!)
    done
    local k=0
    for i in "$@"; do
        wait "${pids[$k]}" || fail "pull on node $i failed: $(cat "$WORK/pull-$i.err" "$WORK/pull-$i.json" 2>/dev/null | tail -3)"
        k=$((k + 1))
    done
}

field() { jqpy "j['$2']" <"$WORK/pull-$1.json"; }

report_pulls() {
    local i
    for i in "$@"; do
        log "  node $i: $(jqpy '"%.1fs, peers %d B, origin %d B, local %d chunks, bad %d, banned %s" % (j["elapsed_ms"]/1000, j["bytes_from_peers"], j["bytes_from_origin"], j["local_chunks"], j["bad_chunks"], j["banned"])' <"$WORK/pull-$i.json")"
    done
}

downloaders() { seq 1 $((NODES - 1)); }
now() { date +%s.%N; }
since() { python3 -c "import sys; print(round($(now) - $1, 2))"; }

scenario_fanout() {
    local id
    id=$(seed 0)
    start_node 0
    for i in $(downloaders); do start_node "$i"; done
    for i in $(downloaders); do wait_peers "$i" 1; done
    local t0=$SECONDS
    pull_all "$id" $(downloaders)
    log "fanout: 1 seeder -> $((NODES - 1)) nodes in $((SECONDS - t0))s"
    report_pulls $(downloaders)
    for i in $(downloaders); do
        assert_identical "$i" "$id"
        [ "$(field "$i" bad_chunks)" = 0 ] || fail "node $i saw bad chunks"
    done
    local corrupted
    for i in 0 $(downloaders); do
        corrupted=$(nsx "$i" --json status | jqpy 'j["served"]["corrupted"]')
        [ "$corrupted" = 0 ] || fail "node $i served corrupt chunks"
    done
}

scenario_seeder_killed() {
    local id
    id=$(seed 0)
    seed 1 >/dev/null
    start_node 0
    start_node 1
    local ds=($(seq 2 $((NODES - 1))))
    for i in "${ds[@]}"; do start_node "$i"; done
    for i in "${ds[@]}"; do wait_peers "$i" 2; done
    for i in "${ds[@]}"; do nsx "$i" pull --no-wait "$id" >/dev/null; done
    wait_progress "${ds[0]}" "$id" $((SIZE_MB * 1024 * 1024 / 4))
    log "killing seeder 0 (SIGKILL) mid-transfer"
    stop_node 0 KILL
    rm -f "$WORK/n0.pid"
    pull_all "$id" "${ds[@]}"
    report_pulls "${ds[@]}"
    for i in "${ds[@]}"; do assert_identical "$i" "$id"; done
}

scenario_liar() {
    local id liar_id
    id=$(seed 0)
    seed 1 >/dev/null
    start_node 0 --test-corrupt-chunks
    start_node 1
    liar_id=$(nsx 0 --json status | jqpy 'j["peer_id"]')
    local ds=($(seq 2 $((NODES - 1))))
    for i in "${ds[@]}"; do start_node "$i"; done
    for i in "${ds[@]}"; do wait_peers "$i" 2; done
    pull_all "$id" "${ds[@]}"
    report_pulls "${ds[@]}"
    local banned_somewhere=0
    for i in "${ds[@]}"; do
        assert_identical "$i" "$id"
        local bad banned
        bad=$(field "$i" bad_chunks)
        banned=$(jqpy "'$liar_id' in j['banned']" <"$WORK/pull-$i.json")
        if [ "$bad" != 0 ]; then
            [ "$banned" = True ] || fail "node $i got bad chunks but did not ban the liar"
            banned_somewhere=1
        fi
        [ "$(nsx "$i" --json status | jqpy 'j["served"]["corrupted"]')" = 0 ] || fail "node $i served corrupt bytes"
    done
    [ $banned_somewhere = 1 ] || fail "no downloader ever met the liar (inconclusive)"
    [ "$(nsx 0 --json status | jqpy 'j["served"]["corrupted"] > 0')" = True ] || fail "the liar never lied"
}

scenario_psk() {
    local id key="$WORK/swarm.key"
    "$SHOAL" psk new --out "$key" 2>/dev/null
    id=$(seed 0)
    start_node 0 --psk-file "$key"
    start_node 1 --psk-file "$key"
    start_node 2
    wait_peers 1 1
    nsx 2 pull --no-wait "$id" >/dev/null
    pull_all "$id" 1
    assert_identical 1 "$id"
    [ "$(nsx 2 --json status | jqpy 'j["connected"]')" = 0 ] || fail "the node without the key got connected"
    [ "$(progress 2 "$id")" = 0 ] || fail "the node without the key received bytes"
    log "psk: member pulled, stranger has no connection"
}

scenario_origin() {
    # The origin: node NODES's namespace, a Range/ETag HTTP server; nobody holds the artifact.
    local o=$NODES oip
    oip=$(ipof "$o")
    local url="http://$oip:8000/model.bin"
    local pub="$WORK/publisher"
    local id key rel
    id=$("$SHOAL" --data-dir "$pub" --json add "$SRC" | jqpy 'j["id"]')
    key=$("$SHOAL" --data-dir "$pub" keygen)
    rel=$("$SHOAL" --data-dir "$pub" --json publish "$id" --name testnet-model:v1 --origin "$url" | jqpy 'j["release"]')
    # The manifest goes next to the file (from the publisher's admin API, inside the origin namespace).
    mkdir -p "$WORK/origin"
    cp "$SRC" "$WORK/origin/model.bin"
    ip netns exec "$(ns "$o")" "$SHOAL" --data-dir "$pub" serve --no-mdns --listen /ip4/127.0.0.1/tcp/7071 --api 127.0.0.1:7070 >>"$WORK/pub.log" 2>&1 &
    local pp=$!
    PIDS+=($pp)
    local t=0
    # The admin API needs the node's token (in its data dir).
    until ip netns exec "$(ns "$o")" python3 -c "import sys, urllib.request; open(sys.argv[2], 'wb').write(urllib.request.urlopen(urllib.request.Request(sys.argv[1], headers={'Authorization': 'Bearer ' + open(sys.argv[3]).read().strip()})).read())" \
        "http://127.0.0.1:7070/admin/manifest/$id" "$WORK/origin/model.bin.manifest" "$pub/admin.token" 2>/dev/null; do
        sleep 0.2
        t=$((t + 1))
        [ $t -lt $((WAIT_SECS * 5)) ] || fail "publisher daemon never answered"
    done
    kill "$pp"
    wait "$pp" 2>/dev/null || true
    ip netns exec "$(ns "$o")" python3 scripts/range-server.py "$WORK/origin" "$oip" 8000 "$WORK/origin.log" &
    PIDS+=($!)
    touch "$WORK/origin.log"
    # Nodes 0 .. ONLINE-1 may use the origin; the others are offline.
    local n_online=${ONLINE:-2} i
    local offline=($(seq "$n_online" $((NODES - 1))))
    for i in $(seq 0 $((NODES - 1))); do
        nsx "$i" trust add "$key" >/dev/null
        if [ "$i" -lt "$n_online" ]; then start_node "$i"; else start_node "$i" --offline; fi
        ip netns exec "$(ns "$i")" python3 -c "import sys, json, urllib.request; urllib.request.urlopen(urllib.request.Request('http://127.0.0.1:7070/admin/releases', json.dumps({'signed': sys.argv[1]}).encode(), {'Content-Type': 'application/json', 'Authorization': 'Bearer ' + open(sys.argv[2]).read().strip()}))" \
            "$rel" "$WORK/n$i/admin.token" || fail "node $i refused the release"
    done
    if [ "$NODES" -gt 1 ]; then
        for i in $(seq 0 $((NODES - 1))); do wait_peers "$i" 1; done
    fi
    local t0
    t0=$(now)
    pull_all testnet-model:v1 $(seq 0 $((NODES - 1)))
    log "origin: $NODES nodes ($n_online online) done in $(since "$t0")s"
    report_pulls $(seq 0 $((NODES - 1)))
    for i in $(seq 0 $((NODES - 1))); do assert_identical "$i" "$id"; done
    for i in "${offline[@]}"; do
        ! grep -q "^$(ipof "$i") " "$WORK/origin.log" || fail "offline node $i contacted the origin"
        [ "$(field "$i" bytes_from_origin)" = 0 ] || fail "offline node $i counted origin bytes"
    done
    local egress size
    egress=$(awk '$3 == "/model.bin" {s += $2} END {print s + 0}' "$WORK/origin.log")
    size=$(stat -c %s "$SRC")
    log "origin egress: $egress bytes for a $size-byte artifact and $NODES nodes ($(python3 -c "print(round($egress / $size, 3))") copies)"
    python3 -c "import sys; sys.exit(0 if $egress <= 1.1 * $size else 1)" || fail "origin egress is more than one copy"
}

scenario_sigkill_restart() {
    local id
    id=$(seed 0)
    start_node 0
    start_node 1
    wait_peers 1 1
    nsx 1 pull --no-wait "$id" >/dev/null
    wait_progress 1 "$id" $((SIZE_MB * 1024 * 1024 * 2 / 5))
    log "SIGKILL node 1 mid-download"
    stop_node 1 KILL
    start_node 1
    wait_peers 1 1
    pull_all "$id" 1
    report_pulls 1
    assert_identical 1 "$id"
    local local_chunks total got
    local_chunks=$(field 1 local_chunks)
    [ "$local_chunks" -gt 0 ] || fail "nothing survived the SIGKILL (resume not exercised)"
    total=$(field 1 total_bytes)
    got=$(jqpy 'j["bytes_from_peers"] + j["bytes_from_origin"] + j["local_bytes"]' <"$WORK/pull-1.json")
    [ "$got" = "$total" ] || fail "after restart: fetched + kept = $got, file = $total (a verified chunk was fetched again?)"
    log "restart: $local_chunks chunks kept, the rest fetched once"
}

scenario_swarm() {
    local id t0 single all i
    id=$(seed 0)
    start_node 0
    start_node 1
    wait_peers 1 1
    t0=$(now)
    pull_all "$id" 1
    single=$(since "$t0")
    assert_identical 1 "$id"
    log "swarm: single 1 -> 1 transfer of $SIZE_MB MiB at $RATE: ${single}s"
    stop_all
    id=$(seed 0)
    start_node 0
    for i in $(downloaders); do start_node "$i"; done
    for i in $(downloaders); do wait_peers "$i" 1; done
    t0=$(now)
    pull_all "$id" $(downloaders)
    all=$(since "$t0")
    report_pulls $(downloaders)
    for i in $(downloaders); do assert_identical "$i" "$id"; done
    local seeded
    seeded=$(nsx 0 --json status | jqpy 'j["served"]["bytes"]' 2>/dev/null || echo "?")
    log "swarm: 1 seeder -> $((NODES - 1)) nodes of $SIZE_MB MiB at $RATE: last node done in ${all}s"
    log "swarm: RESULT nodes=$((NODES - 1)) size_mb=$SIZE_MB rate=$RATE single_s=$single swarm_s=$all ratio=$(python3 -c "print(round($all / $single, 3))") seeder_uploaded=$seeded"
}

# ttft I PROMPT_FILE: seconds to the first streamed token of a /v1/completions
# request (max_tokens 2, temperature 0) on node I, and the cached tokens.
ttft() {
    ip netns exec "$(ns "$1")" python3 - "$2" "$KV_MODEL_NAME" <<'PY'
import http.client, json, sys, time
prompt = open(sys.argv[1]).read()
body = json.dumps({"model": sys.argv[2], "prompt": prompt, "max_tokens": 2, "temperature": 0,
                   "stream": True, "stream_options": {"include_usage": True}})
c = http.client.HTTPConnection("127.0.0.1", 7070, timeout=600)
t0 = time.monotonic()
# Local only: this scenario measures the KV tier, not the router.
c.request("POST", "/v1/completions", body, {"Content-Type": "application/json", "X-Shoal-Route": "local"})
r = c.getresponse()
assert r.status == 200, (r.status, r.read())
first, cached = None, 0
for line in r:
    line = line.strip()
    if not line.startswith(b"data: ") or line == b"data: [DONE]":
        continue
    j = json.loads(line[6:])
    if first is None and j.get("choices") and j["choices"][0].get("text") is not None:
        first = time.monotonic() - t0
    u = j.get("usage") or {}
    cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens", cached) or cached
print(f"{first:.4f} {cached}")
PY
}

scenario_kv_neighbour() {
    local model=${SHOAL_TEST_MODEL:-}
    [ -f "$model" ] || fail "kv-neighbour needs the demo model: SHOAL_TEST_MODEL=\$(scripts/fetch-model.sh)"
    KV_MODEL_NAME=demo
    local i
    for i in 0 1; do
        "$SHOAL" --data-dir "$WORK/n$i" add "$model" --name "$KV_MODEL_NAME" >/dev/null
    done
    # The serving benchmark's own prompts (a JSON list of {cold, followup}).
    local prompts="$WORK/prompts.json"
    if [ -n "${PROMPTS:-}" ]; then cp "$PROMPTS" "$prompts"; else
        DUMP_PROMPTS="$prompts" RUNS="${RUNS:-3}" cargo bench -q --bench serving >/dev/null 2>&1 ||
            fail "could not write the benchmark prompts (cargo bench --bench serving with DUMP_PROMPTS)"
    fi
    start_node 0
    start_node 1
    wait_peers 1 1
    local n r cold=() nb=() sents=() t c sent
    n=$(jqpy 'len(j)' <"$prompts")
    # Warm-up: load the model on both nodes.
    echo "Hello there" >"$WORK/hello.txt"
    ttft 0 "$WORK/hello.txt" >/dev/null
    ttft 1 "$WORK/hello.txt" >/dev/null
    for ((r = 0; r < n; r++)); do
        jqpy "j[$r]['cold']" <"$prompts" >"$WORK/cold-$r.txt"
        jqpy "j[$r]['followup']" <"$prompts" >"$WORK/follow-$r.txt"
        # jqpy's print adds a newline; the bench sends the text as is.
        python3 -c "import sys; p=sys.argv[1]; s=open(p).read(); open(p,'w').write(s[:-1])" "$WORK/cold-$r.txt"
        python3 -c "import sys; p=sys.argv[1]; s=open(p).read(); open(p,'w').write(s[:-1])" "$WORK/follow-$r.txt"
        read -r t c < <(ttft 0 "$WORK/cold-$r.txt")
        log "kv-neighbour: run $r: node 0 cold ${t}s (cached $c)"
        cold+=("$t")
        local sent0
        sent0=$(qdisc_sent 0)
        read -r t c < <(ttft 1 "$WORK/follow-$r.txt")
        # The blocks must have crossed node 0's tbf-limited uplink.
        sent=$(($(qdisc_sent 0) - sent0))
        log "kv-neighbour: run $r: node 1 follow-up with node 0's blocks ${t}s (cached $c tokens; node 0 sent $sent bytes through its $RATE tbf uplink)"
        [ "$c" -gt 0 ] || fail "node 1 took no KV block from node 0"
        [ "$sent" -gt 1000000 ] || fail "node 0's uplink carried only $sent bytes: the blocks did not cross the tbf link"
        nb+=("$t")
        sents+=("$sent")
    done
    python3 - "$RATE" "${cold[*]}" "${nb[*]}" "${sents[*]}" <<'PY'
import statistics, sys
cold = statistics.median(float(x) for x in sys.argv[2].split())
nb = statistics.median(float(x) for x in sys.argv[3].split())
mb = statistics.median(int(x) for x in sys.argv[4].split()) / 1e6
print(f"[testnet] kv-neighbour: RESULT rate={sys.argv[1]} runs={len(sys.argv[2].split())} cold_s={cold:.3f} "
      f"neighbour_s={nb:.4f} ratio={nb / cold:.4f} link_mb_per_followup={mb:.1f}", file=sys.stderr)
PY
}

# connected I: node I's connected peers (0 while its API does not answer).
connected() {
    nsx "$1" --json status 2>/dev/null | jqpy 'j["connected"]' 2>/dev/null || echo 0
}

scenario_discovery_soak() {
    local starts=${STARTS:-20} bound=${DISCOVERY_SECS:-5} k i load=()
    local want=$((NODES - 1)) over=0 times=()
    for ((i = 0; i < ${LOAD:-0}; i++)); do
        (while :; do :; done) &
        load+=($!)
        PIDS+=($!)
    done
    [ ${#load[@]} = 0 ] || log "discovery-soak: ${#load[@]} busy loops running"
    for ((k = 1; k <= starts; k++)); do
        local t0 up
        t0=$(now)
        for i in $(seq 0 $((NODES - 1))); do launch_node "$i"; done
        for i in $(seq 0 $((NODES - 1))); do wait_up "$i"; done
        up=$(now)
        # Wait (bounded) until every node is connected to all the others; one
        # poller per node. The figures come from the nodes' own log timestamps,
        # so the polling's delay does not count.
        local pollers=()
        for i in $(seq 0 $((NODES - 1))); do
            (
                local n=0
                while [ "$n" -lt $(((bound + 25) * 5)) ]; do
                    [ "$(connected "$i")" -ge "$want" ] && break
                    sleep 0.2
                    n=$((n + 1))
                done
            ) &
            pollers+=($!)
        done
        for p in "${pollers[@]}"; do wait "$p" || true; done
        local worst line
        # worst: from the last node's mesh start (its first "listening" line)
        # until the last node has seen all the others connect; "inf" if one never did.
        read -r worst line < <(python3 - "$want" "$WORK" "$NODES" <<'PY'
import datetime, re, sys
want, work, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
ansi = re.compile(r"\x1b\[[0-9;]*m")
def ts(l):
    return datetime.datetime.fromisoformat(l.split()[0].rstrip("Z")).timestamp()
starts, dones = [], []
for i in range(n):
    start, peers, done = None, set(), None
    for l in open(f"{work}/n{i}.log", errors="replace"):
        l = ansi.sub("", l)
        if start is None and " listening " in l:
            start = ts(l)
        m = re.search(r"peer connected peer=(\S+)", l)
        if m and done is None:
            peers.add(m.group(1))
            if len(peers) >= want:
                done = ts(l)
    starts.append(start)
    dones.append(done)
if None in starts or None in dones:
    print("inf", "per node: " + " ".join("-" if d is None or s is None else f"{d - s:.2f}" for s, d in zip(starts, dones)))
else:
    print(f"{max(dones) - max(starts):.3f}", "per node (from its own start): " + " ".join(f"{d - s:.2f}" for s, d in zip(starts, dones)))
PY
        )
        line="start $k/$starts: nodes up in $(python3 -c "print(round($up - $t0, 2))")s, all $NODES connected to all peers ${worst}s after the last one started ($line)"
        if [ "$worst" = inf ] || python3 -c "import sys; sys.exit(0 if $worst > $bound else 1)"; then
            over=$((over + 1))
            log "discovery-soak: $line  OVER ${bound}s"
            for i in $(seq 0 $((NODES - 1))); do cp "$WORK/n$i.log" "$WORK/soak-$k-n$i.log"; done
        else
            log "discovery-soak: $line"
        fi
        times+=("$worst")
        stop_all
        for i in $(seq 0 $((NODES - 1))); do mv "$WORK/n$i.log" "$WORK/start-$k-n$i.log"; done
    done
    for p in ${load[@]+"${load[@]}"}; do kill "$p" 2>/dev/null || true; done
    python3 - "$bound" "$over" "${times[@]}" <<'PY' >&2
import statistics, sys
bound, over, t = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
ok = sorted(float(x) for x in t if x != "inf")
print(f"[testnet] discovery-soak: RESULT starts={len(t)} over_{bound:g}s={over} "
      f"median_s={statistics.median(ok) if ok else 'nan'} max_s={max(ok) if ok else 'nan'} never={len(t) - len(ok)}")
PY
    [ "$over" = 0 ] || fail "discovery-soak: $over of $starts starts took more than ${bound}s (logs: $WORK/soak-*)"
}

scenario_discovery_redial() {
    # Unicast between nodes 0 and 1 is unreachable (mDNS is multicast and passes):
    # each finds the other and its dial fails.
    ip -n "$(ns 0)" route add unreachable "$(ipof 1)/32"
    ip -n "$(ns 1)" route add unreachable "$(ipof 0)/32"
    start_node 0
    start_node 1
    local t=0 i
    for i in 0 1; do
        until grep -q "discovered via mDNS" "$WORK/n$i.log"; do
            sleep 0.1
            t=$((t + 1))
            [ $t -lt $((WAIT_SECS * 10)) ] || fail "node $i never discovered the other by mDNS"
        done
    done
    [ "$(connected 0)" = 0 ] || fail "nodes connected through an unreachable route (inconclusive)"
    ip -n "$(ns 0)" route del unreachable "$(ipof 1)/32"
    ip -n "$(ns 1)" route del unreachable "$(ipof 0)/32"
    log "discovery-redial: routes open; the nodes must now connect by themselves"
    # Generous: the redial backoff is at most 30 s; mDNS alone would not retry for minutes.
    t=0
    until [ "$(connected 0)" -ge 1 ] && [ "$(connected 1)" -ge 1 ]; do
        sleep 0.2
        t=$((t + 1))
        [ $t -lt 200 ] || fail "discovery-redial: nodes found by mDNS were never redialled"
    done
    log "discovery-redial: connected after the failed first dials"
}

# ---------------------------------------------------------------------------
# Routing across the mesh (issue 19). The issue numbers its nodes 1..4; here
# they are 0..3 (issue node k = script node k-1). The model is the demo model
# (SHOAL_TEST_MODEL), added as `demo` on the holders only. Every node runs with
# the response cache off (SHOAL_RESPONSE_CACHE=0: a deterministic request must
# reach an engine); the nodes that must not become holders run with
# SHOAL_ROUTE_PULL=never. The load client is scripts/route-client.py, run from
# the root namespace: each of its threads enters the namespace of the node it
# asks, whose API stays on its own loopback.

ROUTE_MODEL=demo

need_model() {
    [ -f "${SHOAL_TEST_MODEL:-}" ] || fail "$1 needs the demo model: SHOAL_TEST_MODEL=\$(scripts/fetch-model.sh)"
}

# hold I: add the demo model to node I's store as `demo`; prints its id.
hold() {
    "$SHOAL" --data-dir "$WORK/n$1" --json add "$SHOAL_TEST_MODEL" --name "$ROUTE_MODEL" | jqpy 'j["id"]'
}

# rnode I [VAR=VALUE...]: start node I (and wait for its API) with these
# settings in its environment, the response cache off.
rnode() {
    local i=$1
    shift
    local -x SHOAL_RESPONSE_CACHE=0 "$@"
    launch_node "$i"
    wait_up "$i"
}

peer_of() { nsx "$1" --json status | jqpy 'j["peer_id"]'; }

# api_get I PATH: GET PATH from node I's API with its admin token; the body on stdout.
api_get() {
    ip netns exec "$(ns "$1")" python3 -c "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(urllib.request.Request('http://127.0.0.1:7070' + sys.argv[1], headers={'Authorization': 'Bearer ' + open(sys.argv[2]).read().strip()}), timeout=5).read().decode())" \
        "$2" "$WORK/n$1/admin.token"
}

# wait_card I PEER COUNT: until node I holds a fresh serving card of PEER
# (GET /admin/route); where that route is absent, until node I's
# shoal_route_cards (fresh cards of peers serving models) reaches COUNT.
wait_card() {
    local i=$1 peer=$2 count=$3 t=0 have
    while :; do
        have=$(api_get "$i" /admin/route 2>/dev/null | jqpy "'$peer' in json.dumps(j.get('cards', []))" 2>/dev/null ||
            api_get "$i" /metrics 2>/dev/null | python3 -c "import sys; print(any(l.startswith('shoal_route_cards ') and float(l.split()[1]) >= $count for l in sys.stdin))" 2>/dev/null ||
            echo err)
        [ "$have" = True ] && return 0
        sleep 0.2
        t=$((t + 1))
        [ $t -lt $((WAIT_SECS * 5)) ] || fail "node $i: no card of $peer (GET /admin/route: $(api_get "$i" /admin/route 2>&1 | head -c 300))"
    done
}

nodearg() { echo "n$1=$(ns "$1")"; }

# rclient OUT ARGS...: scripts/route-client.py run ARGS; its JSON lines go to
# OUT, its summary (JSON) to stdout. Bounded by the client's own deadline.
rclient() {
    local out=$1
    shift
    timeout $((WAIT_SECS * 4)) python3 scripts/route-client.py run --model "$ROUTE_MODEL" --timeout "$WAIT_SECS" \
        "$@" >"$out" 2>>"$WORK/client.err" || fail "route-client failed ($out): $(tail -3 "$WORK/client.err")"
    local sum
    sum=$(sed -n 's/^SUMMARY //p' "$out")
    [ "$(jqpy 'j.get("served_mismatch", 0)' <<<"$sum")" = 0 ] ||
        fail "X-Shoal-Served-By and the first chunk's served_by disagree ($out)"
    echo "$sum"
}

# warm I: one short request served by node I itself (loads the model there).
warm() {
    local s
    s=$(rclient "$WORK/warm-$1.jsonl" --node "$(nodearg "$1")" --header "X-Shoal-Route: local" --tokens 4 \
        --question-offset $((900 + $1)))
    [ "$(jqpy 'j["ok"]' <<<"$s")" = 1 ] || fail "warm-up on node $1 failed: $(cat "$WORK/warm-$1.jsonl")"
}

# rate_bps RATE: tc's rate (100mbit, 1gbit, ...) in bits per second.
rate_bps() {
    python3 -c "import re,sys; m=re.fullmatch(r'([0-9.]+)([kmg]?)(bit|bps)?', sys.argv[1].lower()); v=float(m.group(1))*{'':1,'k':1e3,'m':1e6,'g':1e9}[m.group(2)]; print(v*(8 if m.group(3)=='bps' else 1))" "$1"
}

# verdict NAME OK TEXT: log a goal as met or MISSED (speed goals do not fail the run).
verdict() { if [ "$2" = True ]; then log "$1: goal $3: met"; else log "$1: goal $3: MISSED"; fi; }

scenario_route_forward() {
    need_model route-forward
    local id i p0 key runs=${RUNS:-5} who
    # The site's publisher is node 0 (its key signs the name `demo`); every
    # node trusts it, so node 3 can resolve the name it pulls in the background.
    key=$("$SHOAL" --data-dir "$WORK/n0" keygen 2>/dev/null)
    id=$(hold 0)
    for ((i = 1; i < NODES; i++)); do "$SHOAL" --data-dir "$WORK/n$i" trust add "$key" >/dev/null; done
    # Node LAST pulls on first use (the default); the others never do, so the
    # timed requests via node 2 always cross the mesh.
    rnode 0
    for ((i = 1; i < NODES - 1; i++)); do rnode "$i" SHOAL_ROUTE_PULL=never; done
    local last=$((NODES - 1)) via_node=$((NODES > 3 ? 2 : 1))
    rnode "$last"
    p0=$(peer_of 0)
    wait_card "$via_node" "$p0" 1
    wait_card "$last" "$p0" 1
    warm 0
    # RUNS rounds: one request straight to node 0, one via node VIA (no model,
    # route.pull = never), alternating which goes first; distinct questions
    # (no prefix shared beyond the chat template).
    local r direct=() via=() t a b s
    for ((r = 0; r < runs; r++)); do
        for k in 0 1; do
            if [ $(((r + k) % 2)) = 0 ]; then
                s=$(rclient "$WORK/direct-$r.jsonl" --node "$(nodearg 0)" --tokens 8 --question-offset $((60 + 2 * r)))
                t=$(jqpy 'j["ttft_min"]' <<<"$s")
                direct+=("$t")
            else
                s=$(rclient "$WORK/via-$r.jsonl" --node "$(nodearg "$via_node")" --tokens 8 --question-offset $((61 + 2 * r)))
                t=$(jqpy 'j["ttft_min"]' <<<"$s")
                who=$(jqpy 'next(iter(j["served"]), "-")' <<<"$s")
                [ "$who" = "$p0" ] || fail "route-forward: run $r: node $via_node's request served by $who, not node 0 ($p0)"
                via+=("$t")
            fi
            [ "$(jqpy 'j["ok"]' <<<"$s")" = 1 ] || fail "route-forward: run $r failed: $(cat "$WORK/direct-$r.jsonl" "$WORK/via-$r.jsonl" 2>/dev/null)"
        done
        log "route-forward: run $r: node 0 direct ${direct[$r]}s, via node $via_node ${via[$r]}s"
    done
    read -r a b <<<"$(python3 -c "import statistics as s, sys; print(round(s.median(map(float, sys.argv[1].split())), 4), round(s.median(map(float, sys.argv[2].split())), 4))" "${direct[*]}" "${via[*]}")"
    # Node LAST's very first request: it has no model; a holder must serve it
    # while the pull (route.pull = first-use) goes on in the background.
    local first transfer
    s=$(rclient "$WORK/first.jsonl" --node "$(nodearg "$last")" --tokens 8 --question-offset 50)
    read -r first who <<<"$(jqpy '"%s %s" % (j["ttft_min"], next(iter(j["served"]), "-"))' <<<"$s")"
    [ "$(jqpy 'j["ok"]' <<<"$s")" = 1 ] || fail "route-forward: node $last's first request failed: $(head -1 "$WORK/first.jsonl")"
    [ "$who" = "$p0" ] || fail "route-forward: node $last's first request served by $who, not node 0 ($p0)"
    transfer=$(python3 -c "import os,sys; print(round(os.path.getsize(sys.argv[1]) * 8 / $(rate_bps "$RATE"), 3))" "$SHOAL_TEST_MODEL")
    log "route-forward: node $last's first request: TTFT ${first}s, served by node 0; the model's transfer alone takes >= ${transfer}s at $RATE"
    verdict route-forward "$(python3 -c "print($first < $transfer / 2)")" "first TTFT < half the transfer time"
    # The background pull: node LAST ends up holding the artifact.
    local t0=$SECONDS held=False
    while [ $((SECONDS - t0)) -lt "$WAIT_SECS" ]; do
        held=$(nsx "$last" --json ls 2>/dev/null | jqpy "'$id' in json.dumps(j)" 2>/dev/null || echo False)
        [ "$held" = True ] && break
        sleep 0.5
    done
    [ "$held" = True ] || fail "route-forward: node $last never pulled the model in the background (route.pull = first-use)"
    log "route-forward: node $last holds the model now (background pull, within $((SECONDS - t0 + 1))s of its first answer)"
    log "route-forward: RESULT rate=$RATE runs=$runs direct_ttft_s=$a via_ttft_s=$b extra_ms=$(python3 -c "print(round(($b - $a) * 1000, 1))") first_ttft_s=$first transfer_s=$transfer"
    verdict route-forward "$(python3 -c "print($b <= $a + 0.050)")" "via node $via_node <= direct + 50 ms"
}

scenario_route_balance() {
    need_model route-balance
    local threads=${THREADS:-1} clients=${CLIENTS:-16} tokens=${TOKENS:-64} dur=${DURATION:-30} i
    local load=(--clients "$clients" --tokens "$tokens")
    if [ -n "${REQUESTS:-}" ]; then load+=(--requests "$REQUESTS"); else load+=(--duration "$dur"); fi
    load+=(--deadline $((WAIT_SECS * 3)) --ramp "${RAMP:-0}")
    log "route-balance: holders run $threads inference thread(s) each on a $(nproc)-core machine: one holder alone = $threads core(s), two holders = $((2 * threads))"
    hold 0 >/dev/null
    hold 1 >/dev/null
    # Baseline: node 0 the only holder (node 1 not started); the clients round-robin over the live nodes.
    rnode 0 SHOAL_THREADS="$threads"
    for ((i = 2; i < NODES; i++)); do rnode "$i" SHOAL_ROUTE_PULL=never; done
    local p0 p1 nodes=()
    p0=$(peer_of 0)
    for ((i = 2; i < NODES; i++)); do wait_card "$i" "$p0" 1; done
    warm 0
    nodes=(--node "$(nodearg 0)")
    for ((i = 2; i < NODES; i++)); do nodes+=(--node "$(nodearg "$i")"); done
    local base both
    base=$(rclient "$WORK/balance-one.jsonl" "${nodes[@]}" "${load[@]}" --question-offset 0 --sample "$(nodearg 0)")
    log "route-balance: one holder: $(jqpy '"%d requests, %d failed, %d tokens in %.1fs: %.1f tok/s, served %s" % (j["requests"], j["failed"], j["tokens"], j["wall_s"], j["tok_s"], j["served"])' <<<"$base")"
    # Both holders.
    rnode 1 SHOAL_THREADS="$threads"
    p1=$(peer_of 1)
    wait_card 0 "$p1" 1
    for ((i = 2; i < NODES; i++)); do wait_card "$i" "$p1" 2; done
    wait_card 1 "$p0" 1
    warm 1
    nodes=()
    for ((i = 0; i < NODES; i++)); do nodes+=(--node "$(nodearg "$i")"); done
    both=$(rclient "$WORK/balance-two.jsonl" "${nodes[@]}" "${load[@]}" --question-offset 1000 \
        --sample "$(nodearg 0)" --sample "$(nodearg 1)")
    log "route-balance: two holders: $(jqpy '"%d requests, %d failed, %d tokens in %.1fs: %.1f tok/s, served %s, load %s" % (j["requests"], j["failed"], j["tokens"], j["wall_s"], j["tok_s"], j["served"], j["load"])' <<<"$both")"
    local f1 f2 ratio dmax dmean
    f1=$(jqpy 'j["failed"]' <<<"$base")
    f2=$(jqpy 'j["failed"]' <<<"$both")
    # The ratio of the steady state (every client busy) with DURATION, else of the whole runs.
    ratio=$(python3 -c "import json,sys; a,b=json.loads(sys.argv[1]),json.loads(sys.argv[2]); k='window_tok_s' if 'window_tok_s' in a else 'tok_s'; print(round(b[k]/a[k],3))" "$base" "$both")
    dmax=$(jqpy 'j.get("load_diff_max")' <<<"$both")
    dmean=$(jqpy 'j.get("load_diff_mean")' <<<"$both")
    log "route-balance: RESULT clients=$clients tokens=$tokens threads=$threads one_tok_s=$(jqpy 'j["tok_s"]' <<<"$base") two_tok_s=$(jqpy 'j["tok_s"]' <<<"$both") one_window_tok_s=$(jqpy 'j.get("window_tok_s")' <<<"$base") two_window_tok_s=$(jqpy 'j.get("window_tok_s")' <<<"$both") ratio=$ratio failed_one=$f1 failed_two=$f2 queue_diff_max=$dmax queue_diff_mean=$dmean busy_samples=$(jqpy 'j.get("load_samples_busy")' <<<"$both")"
    [ "$f1" = 0 ] && [ "$f2" = 0 ] || fail "route-balance: failed requests (one holder: $f1, two: $f2); see $WORK/balance-*.jsonl"
    [ "$(jqpy "j['served'].get('$p0', 0) > 0 and j['served'].get('$p1', 0) > 0" <<<"$both")" = True ] ||
        fail "route-balance: with two holders one served nothing: $(jqpy 'j["served"]' <<<"$both")"
    verdict route-balance "$(python3 -c "print($ratio >= 1.8)")" "two holders >= 1.8x one"
    verdict route-balance "$(python3 -c "print('$dmax' != 'None' and float('$dmax') <= 2)")" "|queue0 - queue1| <= 2 (max of the samples)"
}

scenario_route_prefix() {
    need_model route-prefix
    local k=${K:-5} words=${SYSTEM_WORDS:-750} i
    hold 1 >/dev/null
    hold 2 >/dev/null
    rnode 0 SHOAL_ROUTE_PULL=never
    rnode 1
    rnode 2
    for ((i = 3; i < NODES; i++)); do rnode "$i" SHOAL_ROUTE_PULL=never; done
    local p1 p2
    p1=$(peer_of 1)
    p2=$(peer_of 2)
    wait_card 2 "$p1" 1
    warm 1
    warm 2
    local s cold warmup
    # The shared system prompt, warm on node 1 only.
    warmup=$(rclient "$WORK/prefix-warm.jsonl" --node "$(nodearg 1)" --header "X-Shoal-Route: local" --tokens 8 \
        --system-words "$words" --system-variant 0 --question-offset 200)
    [ "$(jqpy 'j["ok"]' <<<"$warmup")" = 1 ] || fail "route-prefix: warming node 1 failed: $(cat "$WORK/prefix-warm.jsonl")"
    # Cold: a system prompt of the same length, other text, first time, node 2 alone.
    s=$(rclient "$WORK/prefix-cold.jsonl" --node "$(nodearg 2)" --header "X-Shoal-Route: local" --tokens 8 \
        --system-words "$words" --system-variant 1 --question-offset 200)
    [ "$(jqpy 'j["ok"]' <<<"$s")" = 1 ] || fail "route-prefix: cold request failed: $(cat "$WORK/prefix-cold.jsonl")"
    cold=$(jqpy 'j["ttft_min"]' <<<"$s")
    log "route-prefix: node 1 warmed (TTFT $(jqpy 'j["ttft_min"]' <<<"$warmup")s, $(head -1 "$WORK/prefix-warm.jsonl" | jqpy 'j["prompt_tokens"]') prompt tokens); node 2 cold, other text: ${cold}s ($(head -1 "$WORK/prefix-cold.jsonl" | jqpy 'j["prompt_tokens"]') prompt tokens)"
    # Node 1's card must carry the new warm prefix before the requests arrive at node 2.
    sleep "${CARD_SETTLE:-3}"
    s=$(rclient "$WORK/prefix-routed.jsonl" --node "$(nodearg 2)" --requests "$k" --tokens 8 \
        --system-words "$words" --system-variant 0 --question-offset 201)
    local line
    while read -r line; do log "route-prefix: $line"; done < <(python3 - "$WORK/prefix-routed.jsonl" "$p1" <<'PY'
import json, sys
for l in open(sys.argv[1]):
    if l.startswith("{"):
        r = json.loads(l)
        who = r["served_by_chunk"] or r["served_by"]
        print(f"request {r['i']}: status {r['status']}, TTFT {r['ttft']}, served by {'node 1' if who == sys.argv[2] else who}, cached {r['cached_tokens']}, error {r['error']}")
PY
)
    [ "$(jqpy 'j["failed"]' <<<"$s")" = 0 ] || fail "route-prefix: failed requests: $(cat "$WORK/prefix-routed.jsonl")"
    [ "$(jqpy "list(j['served']) == ['$p1']" <<<"$s")" = True ] || fail "route-prefix: not all served by node 1 ($p1; node 2 is $p2): $(jqpy 'j["served"]' <<<"$s")"
    local med ratio
    med=$(jqpy 'j["ttft_median"]' <<<"$s")
    ratio=$(python3 -c "print(round($med / $cold, 4))")
    log "route-prefix: RESULT k=$k system_words=$words cold_s=$cold warm_routed_median_s=$med ratio=$ratio"
    python3 -c "import sys; sys.exit(0 if $ratio < ${PREFIX_BOUND:-0.5} else 1)" ||
        fail "route-prefix: warm routed TTFT $med s is not well below the cold $cold s (ratio $ratio >= ${PREFIX_BOUND:-0.5})"
    verdict route-prefix "$(python3 -c "print($ratio <= 0.05)")" "warm routed <= 0.05x cold"
}

scenario_route_failover() {
    need_model route-failover
    local n=${FAILOVER_REQUESTS:-12} tokens=${FAILOVER_TOKENS:-200} i
    hold 0 >/dev/null
    hold 1 >/dev/null
    rnode 0 SHOAL_PARALLEL=2
    rnode 1 SHOAL_PARALLEL=2
    for ((i = 2; i < NODES; i++)); do rnode "$i" SHOAL_ROUTE_PULL=never; done
    local last=$((NODES - 1)) p0 p1
    p0=$(peer_of 0)
    p1=$(peer_of 1)
    wait_card "$last" "$p0" 2
    wait_card "$last" "$p1" 2
    warm 0
    warm 1
    local s
    s=$(rclient "$WORK/failover.jsonl" --node "$(nodearg "$last")" --clients "$n" --requests 1 --tokens "$tokens" \
        --question-offset 300 --kill "$p0=$(cat "$WORK/n0.pid")" --kill "$p1=$(cat "$WORK/n1.pid")" \
        --kill-after "${KILL_AFTER:-2}" --ramp "${RAMP:-0}" --timeout "$WAIT_SECS" --deadline $((WAIT_SECS + 30)))
    local victim
    victim=$(jqpy 'j["killed"]' <<<"$s")
    [ "$victim" != None ] || fail "route-failover: nobody was killed (no request got a token?): $s"
    if [ "$victim" = "$p0" ]; then rm -f "$WORK/n0.pid"; else rm -f "$WORK/n1.pid"; fi
    local out
    out=$(python3 - "$WORK/failover.jsonl" "$victim" "$p0" "$p1" <<'PY'
import json, sys
path, victim, p0, p1 = sys.argv[1:]
name = {p0: "node 0", p1: "node 1"}
rs = [json.loads(l) for l in open(path) if l.startswith("{")]
bad, c = [], {"untouched_ok": 0, "untouched": 0, "streaming_victim": 0, "victim_error_event": 0,
              "streaming_other": 0, "hangs": 0}
for r in rs:
    who = r["served_by_chunk"] or r["served_by"]
    tag = f"request {r['i']}: status {r['status']}, served by {name.get(who, who)}, ttft {r['ttft']}, tokens {r['tokens']} ({r['events']} events), finish {r['finish']}, error {r['error']!r}"
    print("  " + tag, file=sys.stderr)
    if r["hang"]:
        c["hangs"] += 1
        bad.append("hang: " + tag)
    if not r["token_at_kill"]:
        c["untouched"] += 1
        if r["status"] == 200 and r["error"] is None and r["done"] and who not in (victim, None):
            c["untouched_ok"] += 1
        else:
            bad.append("no token at the kill, did not complete elsewhere: " + tag)
    elif who == victim:
        c["streaming_victim"] += 1
        if r["error_event"] and not r["hang"]:
            c["victim_error_event"] += 1
        else:
            bad.append("streaming from the killed node, no error event: " + tag)
    else:
        c["streaming_other"] += 1
        if not (r["status"] == 200 and r["error"] is None and r["done"]):
            bad.append("streaming from the survivor, did not complete: " + tag)
print(json.dumps({"counts": c, "bad": bad}))
PY
)
    log "route-failover: SIGKILL $( [ "$victim" = "$p0" ] && echo "node 0" || echo "node 1") at $(jqpy 'round(j["kill_at_s"], 3)' <<<"$s")s; complete answers by server: $(jqpy 'j["served"]' <<<"$s")"
    log "route-failover: RESULT requests=$n tokens=$tokens $(jqpy '" ".join("%s=%s" % kv for kv in j["counts"].items())' <<<"$out")"
    [ "$(jqpy 'len(j["bad"])' <<<"$out")" = 0 ] || fail "route-failover: $(jqpy '"; ".join(j["bad"])' <<<"$out")"
    [ "$(jqpy 'j["counts"]["untouched"]' <<<"$out")" -gt 0 ] || fail "route-failover: no request was waiting at the kill (inconclusive)"
}

# ---------------------------------------------------------------------------
# Scale (issue 20): NODES (default 64 for this scenario) real daemons with mDNS
# on one bridge and a bounded set of connections each. One monitor process
# (scale_mon, Python) does the polling: each of its threads enters one node's
# namespace (setns(2) moves the calling thread only) and talks to that node's
# API on its own loopback, so 64 nodes are polled without 64 processes a poll.

# scale_mon ARGS...: the monitor (written to the work dir once); JSON on stdout.
scale_mon() {
    [ -f "$WORK/scale-mon.py" ] || cat >"$WORK/scale-mon.py" <<'PY'
import ctypes, json, os, re, statistics, subprocess, sys, threading, time, urllib.request

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
work, tag, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
mode, args = sys.argv[4], sys.argv[5:]


def ns(i):
    return f"{tag}-{i}"


def enter(i):
    fd = os.open(f"/run/netns/{ns(i)}", os.O_RDONLY)
    try:
        if hasattr(os, "setns"):
            os.setns(fd, CLONE_NEWNET)
        elif _libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {ns(i)}")
    finally:
        os.close(fd)


def get(i, path):
    tok = open(f"{work}/n{i}/admin.token").read().strip()
    req = urllib.request.Request("http://127.0.0.1:7070" + path, headers={"Authorization": "Bearer " + tok})
    return urllib.request.urlopen(req, timeout=5).read().decode()


def metric(text, name):
    for l in text.splitlines():
        if l.startswith(name + " ") or l.startswith(name + "{"):
            return float(l.split()[-1])
    return None


def per_node(fn):
    """Runs fn(i) for every node, each in its own thread inside node i's namespace."""
    out = [None] * n

    def run(i):
        enter(i)
        try:
            out[i] = fn(i)
        except Exception as e:  # a node that does not answer counts as such
            out[i] = e

    ts = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return out


def stats(xs):
    return {"min": min(xs), "mean": round(statistics.mean(xs), 2), "max": max(xs)} if xs else None


def wait_each(check, bound, every, t0):
    """Per node: seconds since t0 until check(i) holds (None if it never did within bound)."""
    def fn(i):
        while True:
            try:
                if check(i):
                    return round(time.time() - t0, 3)
            except Exception:
                pass
            if time.time() - t0 > bound:
                return None
            time.sleep(every)
    return per_node(fn)


if mode == "known":
    # Until every node knows WANT peers (shoal_peers_known; a connected peer
    # is a known one, so the larger of the two gauges counts).
    want, bound, t0 = int(args[0]), float(args[1]), float(args[2])

    def check(i):
        m = get(i, "/metrics")
        return max(metric(m, "shoal_peers_known") or 0, metric(m, "shoal_peers_connected") or 0) >= want
    ts = wait_each(check, bound, 0.5, t0)
    final = per_node(lambda i: [metric(get(i, "/metrics"), k) for k in ("shoal_peers_known", "shoal_peers_connected")])
    print(json.dumps({"times": ts, "missing": [i for i, t in enumerate(ts) if t is None],
                      "all_s": None if None in ts else max(ts),
                      "known_metric": [None if isinstance(f, Exception) else f[0] for f in final]}))
elif mode == "sample":
    # COUNT samples EVERY seconds apart: established TCP connections on the
    # mesh port (ss, both directions) and shoal_peers_connected, per node.
    count, every, bound = int(args[0]), float(args[1]), int(args[2])
    tcp, peers, over, lines = [], [], [], []
    for k in range(count):
        t = time.time()
        conns = [None] * n

        def ss(i):
            r = subprocess.run(["ip", "netns", "exec", ns(i), "ss", "-Htn", "state", "established",
                                "( sport = :7071 or dport = :7071 )"], capture_output=True, text=True)
            conns[i] = len([l for l in r.stdout.splitlines() if l.strip()])
        sst = [threading.Thread(target=ss, args=(i,)) for i in range(n)]
        for th in sst:
            th.start()
        pc = per_node(lambda i: metric(get(i, "/metrics"), "shoal_peers_connected"))
        for th in sst:
            th.join()
        for i in range(n):
            if isinstance(pc[i], Exception) or pc[i] is None:
                over.append(f"sample {k}: node {i}: no metrics ({pc[i]})")
                continue
            tcp.append(conns[i])
            peers.append(int(pc[i]))
            # The bound is on libp2p connections (the metric). A TCP
            # connection still in its handshake counts in `ss` but not
            # there: the cap refuses it once the handshake is done, so TCP
            # may pass the bound by the handshakes in flight (logged).
            if pc[i] > bound:
                over.append(f"sample {k}: node {i}: {int(pc[i])} peers > {bound} ({conns[i]} TCP connections)")
            elif conns[i] > bound:
                lines.append(f"sample {k}: node {i}: {conns[i]} TCP connections, {int(pc[i])} peers: handshakes in flight")
        lines.append(f"sample {k}: TCP {stats(conns)} peers {stats([int(p) for p in pc if isinstance(p, float)])}")
        time.sleep(max(0.0, every - (time.time() - t)))
    print(json.dumps({"tcp": stats(tcp), "peers": stats(peers), "over": over, "samples": lines}))
elif mode == "release":
    # Until every node resolves NAME (GET /admin/releases), from T0.
    name, bound, t0 = args[0], float(args[1]), float(args[2])
    ts = wait_each(lambda i: any(r["name"] == name for r in json.loads(get(i, "/admin/releases"))), bound, 0.1, t0)
    print(json.dumps({"times": ts, "missing": [i for i, t in enumerate(ts) if t is None],
                      "all_s": None if None in ts else max(ts)}))
elif mode == "usage":
    # utime+stime of every daemon over SECS (% of one core), its open file
    # descriptors, threads and resident memory.
    secs = float(args[0])
    pids = [int(open(f"{work}/n{i}.pid").read()) for i in range(n)]
    hz = os.sysconf("SC_CLK_TCK")

    def cpu(p):
        f = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
        return int(f[11]) + int(f[12])
    a, t = [cpu(p) for p in pids], time.time()
    time.sleep(secs)
    b, dt = [cpu(p) for p in pids], time.time() - t
    pct = [round(100.0 * (y - x) / hz / dt, 3) for x, y in zip(a, b)]

    def status(p, key):
        for l in open(f"/proc/{p}/status"):
            if l.startswith(key + ":"):
                return int(l.split()[1])
    fds = [len(os.listdir(f"/proc/{p}/fd")) for p in pids]
    # The busiest daemons by name, so an outlier can be looked into.
    top = sorted(range(n), key=lambda i: -pct[i])[:3]
    print(json.dumps({"cpu_pct": stats(pct), "fds": stats(fds),
                      "busiest": ["n%d %.3f%% (%d fds)" % (i, pct[i], fds[i]) for i in top],
                      "threads": stats([status(p, "Threads") for p in pids]),
                      "rss_mib": stats([round(status(p, "VmRSS") / 1024, 1) for p in pids])}))
PY
    python3 "$WORK/scale-mon.py" "$WORK" "$TAG" "$NODES" "$@"
}

scenario_scale() {
    local max=${MAX_CONN:-48} min=${MIN_CONN:-8} batch=${BATCH:-8} i j problems=()
    local want=$((NODES - 1)) name=scale-release:v1
    # A configuration file, not SHOAL_MAX/MIN_CONNECTIONS: the environment is
    # checked one variable at a time (max 6 with the default min 8 is refused).
    printf '[mesh]\nmax_connections = %d\nmin_connections = %d\n' "$max" "$min" >"$WORK/scale.toml"
    local -x SHOAL_CONFIG="$WORK/scale.toml"
    # The publisher: its own data dir and key (like the origin scenario); every
    # node trusts its key before it starts. The release names a small artifact
    # nobody needs to hold: only the name's resolution is measured.
    local pub="$WORK/publisher" key id rel
    head -c 4096 /dev/urandom >"$WORK/scale.bin"
    id=$("$SHOAL" --data-dir "$pub" --json add "$WORK/scale.bin" | jqpy 'j["id"]')
    key=$("$SHOAL" --data-dir "$pub" keygen 2>/dev/null)
    rel=$("$SHOAL" --data-dir "$pub" --json publish "$id" --name "$name" | jqpy 'j["release"]')
    for ((i = 0; i < NODES; i++)); do "$SHOAL" --data-dir "$WORK/n$i" trust add "$key" >/dev/null; done
    # 1. Start in batches of BATCH (each batch answering before the next starts).
    local t_first t_up
    t_first=$(now)
    for ((i = 0; i < NODES; i += batch)); do
        for ((j = i; j < i + batch && j < NODES; j++)); do launch_node "$j"; done
        for ((j = i; j < i + batch && j < NODES; j++)); do wait_up "$j"; done
    done
    t_up=$(now)
    log "scale: $NODES nodes up in $(python3 -c "print(round($t_up - $t_first, 1))")s (batches of $batch; max_connections $max, min_connections $min)"
    # 2. Discovery: every node knows all the others.
    local known
    known=$(scale_mon known "$want" "$WAIT_SECS" "$t_up")
    log "scale: discovery: all know all $(jqpy 'j["all_s"]' <<<"$known")s after the last node answered (shoal_peers_known per node at the end: $(jqpy '" ".join(str(int(k)) if k is not None else "-" for k in j["known_metric"])' <<<"$known"))"
    [ "$(jqpy 'len(j["missing"])' <<<"$known")" = 0 ] ||
        problems+=("discovery: nodes $(jqpy 'j["missing"]' <<<"$known") did not know $want peers within ${WAIT_SECS}s")
    # 3. The bound, sampled SAMPLES times over ~SAMPLE_SECS.
    local samples=${SAMPLES:-7} span=${SAMPLE_SECS:-30} bound s
    bound=$(scale_mon sample "$samples" "$(python3 -c "print($span / max(1, $samples - 1))")" "$max")
    while read -r s; do log "scale: $s"; done < <(jqpy '"\n".join(j["samples"])' <<<"$bound")
    if [ "$(jqpy 'len(j["over"])' <<<"$bound")" != 0 ]; then
        problems+=("bound: $(jqpy 'len(j["over"])' <<<"$bound") node-samples over $max, e.g. $(jqpy '"; ".join(j["over"][:3])' <<<"$bound")")
    fi
    # 4. A release published on node 0 (POST /admin/releases) until every node resolves it.
    local t0 release
    t0=$(now)
    ip netns exec "$(ns 0)" python3 -c "import sys, json, urllib.request; urllib.request.urlopen(urllib.request.Request('http://127.0.0.1:7070/admin/releases', json.dumps({'signed': sys.argv[1]}).encode(), {'Content-Type': 'application/json', 'Authorization': 'Bearer ' + open(sys.argv[2]).read().strip()}))" \
        "$rel" "$WORK/n0/admin.token" || fail "scale: node 0 refused the release"
    release=$(scale_mon release "$name" "$WAIT_SECS" "$t0")
    log "scale: release: every node resolves $name $(jqpy 'j["all_s"]' <<<"$release")s after node 0 took it (median $(jqpy '__import__("statistics").median([t for t in j["times"] if t is not None] or [float("nan")])' <<<"$release")s, $(jqpy 'len(j["times"]) - len(j["missing"])' <<<"$release") of $NODES)"
    [ "$(jqpy 'len(j["missing"])' <<<"$release")" = 0 ] ||
        problems+=("release: nodes $(jqpy 'j["missing"]' <<<"$release") never resolved $name within ${WAIT_SECS}s")
    # 5. Idle: SETTLE_SECS more, then every daemon's CPU over IDLE_SECS.
    sleep "${SETTLE_SECS:-10}"
    local usage
    usage=$(scale_mon usage "${IDLE_SECS:-30}")
    log "scale: idle ${IDLE_SECS:-30}s per daemon: CPU % of a core $(jqpy 'j["cpu_pct"]' <<<"$usage"), fds $(jqpy 'j["fds"]' <<<"$usage"), threads $(jqpy 'j["threads"]' <<<"$usage"), RSS MiB $(jqpy 'j["rss_mib"]' <<<"$usage"); busiest: $(jqpy '", ".join(j["busiest"])' <<<"$usage")"
    local st='lambda d, k: "%s/%s/%s" % (d[k]["min"], d[k]["mean"], d[k]["max"]) if d.get(k) else "-"'
    log "scale: RESULT nodes=$NODES max_conn=$max min_conn=$min discovery_s=$(jqpy 'j["all_s"]' <<<"$known") knowing_all=$(jqpy 'len(j["times"]) - len(j["missing"])' <<<"$known") tcp_min_mean_max=$(jqpy "($st)(j, 'tcp')" <<<"$bound") peers_min_mean_max=$(jqpy "($st)(j, 'peers')" <<<"$bound") over_bound=$(jqpy 'len(j["over"])' <<<"$bound") release_s=$(jqpy 'j["all_s"]' <<<"$release") resolved=$(jqpy 'len(j["times"]) - len(j["missing"])' <<<"$release") idle_cpu_pct_min_mean_max=$(jqpy "($st)(j, 'cpu_pct')" <<<"$usage") fds_min_mean_max=$(jqpy "($st)(j, 'fds')" <<<"$usage") rss_mib_min_mean_max=$(jqpy "($st)(j, 'rss_mib')" <<<"$usage")"
    verdict scale "$(jqpy 'j["all_s"] is not None and j["all_s"] <= 5' <<<"$release")" "release known everywhere <= 5 s"
    verdict scale "$(jqpy 'j["cpu_pct"]["max"] <= 1' <<<"$usage")" "idle CPU <= 1 % of a core (max)"
    [ ${#problems[@]} = 0 ] || fail "scale: $(printf '%s; ' "${problems[@]}")"
}

# qdisc_sent I: bytes sent so far through the tbf qdisc of node I's eth0.
qdisc_sent() {
    tc -n "$(ns "$1")" -s qdisc show dev eth0 | awk '$1 == "Sent" {print $2; exit}'
}

setup_net
SRC="$WORK/model.bin"
head -c $((SIZE_MB * 1024 * 1024)) /dev/urandom >"$SRC"
for s in "${SCENARIOS[@]}"; do
    log "=== scenario $s ==="
    "scenario_${s//-/_}"
    stop_all
    log "=== scenario $s: OK ==="
done
log "all scenarios passed: ${SCENARIOS[*]}"
