#!/usr/bin/env bash
# Mesh benchmark, one peer -> one peer over loopback, written durably, with
# its anchor measured in the same run:
#   anchor: python3 http.server + curl (no encryption, no verification), then fsync
#   shoal:  two daemons (mDNS off, static peer), `shoal pull` until activated
#           (noise encryption, per-chunk BLAKE3, fdatasync, whole-file check)
#   sendme: iroh's sendme, when on PATH (`cargo install sendme`), --relay disabled
#
#   scripts/bench-mesh.sh            (SIZE_MB=1024 by default)
#
# Prints one line per system and the ratios; figures go to docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MB=${SIZE_MB:-1024}
SHOAL=$(realpath "${SHOAL:-target/release/shoal}")
W=$(mktemp -d /tmp/shoal-bench.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$W"
}
trap cleanup EXIT INT TERM

now() { python3 -c 'import time; print(time.monotonic())'; }
rate() { python3 -c "print('%.0f' % ($SIZE_MB * 1048576 / ($2 - $1) / 1e6))"; }

head -c $((SIZE_MB * 1048576)) /dev/urandom >"$W/f.bin"
echo "artifact: $SIZE_MB MiB random bytes" >&2

# Anchor: plain HTTP over loopback.
python3 -m http.server --bind 127.0.0.1 18900 --directory "$W" >/dev/null 2>&1 &
PIDS+=($!)
until curl -sf -o /dev/null http://127.0.0.1:18900/; do sleep 0.1; done
t0=$(now)
curl -sf -o "$W/http.bin" http://127.0.0.1:18900/f.bin
sync "$W/http.bin"
t1=$(now)
HTTP=$(rate "$t0" "$t1")
echo "http.server+curl: $HTTP MB/s" >&2
rm -f "$W/http.bin"

# shoal: seeder a, downloader b.
"$SHOAL" --data-dir "$W/a" add "$W/f.bin" >/dev/null
ID=$("$SHOAL" --data-dir "$W/a" --json ls | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["id"])')
"$SHOAL" --data-dir "$W/a" serve --no-mdns --listen /ip4/127.0.0.1/tcp/18971 --api 127.0.0.1:18970 >"$W/a.log" 2>&1 &
PIDS+=($!)
"$SHOAL" --data-dir "$W/b" serve --no-mdns --listen /ip4/127.0.0.1/tcp/18981 --api 127.0.0.1:18980 \
    --peer /ip4/127.0.0.1/tcp/18971 >"$W/b.log" 2>&1 &
PIDS+=($!)
until [ "$("$SHOAL" --json status --api 127.0.0.1:18980 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["connected"])' 2>/dev/null || echo 0)" -ge 1 ]; do sleep 0.1; done
t0=$(now)
"$SHOAL" --json pull "$ID" --api 127.0.0.1:18980 >"$W/pull.json"
t1=$(now)
SHOAL_RATE=$(rate "$t0" "$t1")
INNER=$(python3 -c "import json; j=json.load(open('$W/pull.json')); print('%.0f' % ($SIZE_MB*1048576/(j['elapsed_ms']/1000)/1e6))")
cmp -s "$W/f.bin" "$W/b/objects/$ID" || { echo "shoal copy differs!" >&2; exit 1; }
echo "shoal pull: $SHOAL_RATE MB/s wall clock (daemon-measured $INNER MB/s)" >&2

SENDME=""
if command -v sendme >/dev/null 2>&1; then
    (cd "$W" && sendme send --relay disabled f.bin >"$W/sendme.out" 2>&1) &
    PIDS+=($!)
    until TICKET=$(grep -o 'blob[a-z0-9]*' "$W/sendme.out" | head -1) && [ -n "$TICKET" ]; do sleep 0.2; done
    mkdir -p "$W/recv"
    t0=$(now)
    (cd "$W/recv" && sendme receive --relay disabled "$TICKET" >/dev/null 2>&1)
    sync "$W/recv/f.bin"
    t1=$(now)
    SENDME=$(rate "$t0" "$t1")
    echo "sendme: $SENDME MB/s" >&2
fi

echo "RESULT size_mb=$SIZE_MB http_mbps=$HTTP shoal_mbps=$SHOAL_RATE shoal_inner_mbps=$INNER sendme_mbps=${SENDME:-n/a} shoal/http=$(python3 -c "print(round($SHOAL_RATE/$HTTP, 2))")${SENDME:+ shoal/sendme=$(python3 -c "print(round($SHOAL_RATE/$SENDME, 2))")}"
