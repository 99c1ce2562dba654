#!/usr/bin/env bash
# Mesh benchmark, one peer -> one peer over loopback, written durably, with
# its anchors measured in the same run (issue 3):
#   http:   nginx (sendfile) + curl when nginx is installed (apt `nginx`),
#           else python3 http.server + curl; then `sync` of the file
#           (no encryption, no verification)
#   shoal:  two daemons (mDNS off, static peer), `shoal pull` until activated
#           (TLS 1.3 AES-GCM, per-chunk BLAKE3, fdatasync, whole-file check)
#   sendme: iroh's sendme (`cargo install sendme --root ~/.cache/shoal/tools`),
#           --relay disabled, address-only ticket on 127.0.0.1, received into
#           a directory on the same filesystem, then `sync`; timed until the
#           file is complete. Run inside a fresh network namespace holding only
#           `lo`: even with --relay disabled sendme's endpoint (iroh's N0
#           preset) publishes to and resolves through n0's DNS/pkarr servers,
#           so outside a namespace it would send DNS and HTTPS to the internet.
#
#   SIZE_MB=1024 scripts/bench-mesh.sh      (SIZE_MB=1024 by default)
#   SENDME=/path/to/sendme (SENDME=none skips it), NGINX=0 (force http.server),
#   SHOAL=/path/to/shoal; the daemons read SHOAL_* settings from the
#   environment, e.g. SHOAL_SECURITY=noise or SHOAL_ASYNC_THREADS=0 for the
#   ablations in docs/benchmarks.md.
#
# Prints a Markdown table (ratios to the HTTP anchor and to sendme) and a
# RESULT line; figures go to docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MB=${SIZE_MB:-1024}
SHOAL=$(realpath "${SHOAL:-${CARGO_TARGET_DIR:-target}/release/shoal}")
SENDME=${SENDME:-$(command -v sendme || echo "$HOME/.cache/shoal/tools/bin/sendme")}
[ -x "$SENDME" ] || SENDME=""  # SENDME=none skips it
W=$(mktemp -d /tmp/shoal-bench.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$W"
}
trap cleanup EXIT INT TERM

now() { date +%s.%N; }
# settle: run right before each timed section. `sync` first, so no system
# pays for another's (or the test file's) writeback. Then touch and free
# PREFAULT_MB of memory (default 2.5x the file): on a VM whose balloon
# reports free pages to the host (virtio-balloon free page reporting, on
# this machine), the first write to a reported page faults in the host, and
# a page-cache write ran at a third of its speed in `perf` (kernel
# copy_folio_from_iter_atomic). Touching the memory first hands every
# system freshly backed pages; PREFAULT_MB=0 turns it off.
PREFAULT_MB=${PREFAULT_MB:-$((SIZE_MB * 5 / 2))}
export PREFAULT_MB
settle() {
    sync
    [ "$PREFAULT_MB" -gt 0 ] || return 0
    python3 -c "
n = $PREFAULT_MB << 20
b = bytearray(n)
b[::4096] = b'\\x01' * len(range(0, n, 4096))"
}
rate() { python3 -c "print('%.0f' % ($SIZE_MB * 1048576 / ($2 - $1) / 1e6))"; }
ratio() { python3 -c "print('%.2f' % ($1 / $2))"; }

echo "# $(date -u '+%Y-%m-%d %H:%M UTC'), load: $(cut -d' ' -f1-3 /proc/loadavg), $SIZE_MB MiB random bytes" >&2
head -c $((SIZE_MB * 1048576)) /dev/urandom >"$W/f.bin"

# Anchor: plain HTTP over loopback.
if [ "${NGINX:-1}" != 0 ] && command -v nginx >/dev/null 2>&1; then
    HTTP_NAME="nginx + curl + sync"
    mkdir -p "$W/nginx/tmp" "$W/www"
    ln "$W/f.bin" "$W/www/f.bin"
    chmod 755 "$W" "$W/www"; chmod 644 "$W/f.bin"
    cat >"$W/nginx/nginx.conf" <<CONF
daemon off;
worker_processes 1;
pid $W/nginx/nginx.pid;
error_log $W/nginx/error.log;
events { worker_connections 64; }
http {
    access_log off;
    sendfile on;
    tcp_nopush on;
    client_body_temp_path $W/nginx/tmp/body;
    proxy_temp_path $W/nginx/tmp/proxy;
    fastcgi_temp_path $W/nginx/tmp/fastcgi;
    uwsgi_temp_path $W/nginx/tmp/uwsgi;
    scgi_temp_path $W/nginx/tmp/scgi;
    server { listen 127.0.0.1:18900; root $W/www; }
}
CONF
    nginx -e "$W/nginx/error.log" -p "$W/nginx" -c "$W/nginx/nginx.conf" &
    PIDS+=($!)
else
    HTTP_NAME="python3 http.server + curl + sync"
    mkdir -p "$W/www" && ln "$W/f.bin" "$W/www/f.bin"
    python3 -m http.server --bind 127.0.0.1 18900 --directory "$W/www" >/dev/null 2>&1 &
    PIDS+=($!)
fi
until curl -s -o /dev/null http://127.0.0.1:18900/; do sleep 0.1; done
settle
t0=$(now)
curl -sf -o "$W/http.bin" http://127.0.0.1:18900/f.bin
sync "$W/http.bin"
t1=$(now)
HTTP=$(rate "$t0" "$t1")
cmp -s "$W/f.bin" "$W/http.bin" || { echo "http copy differs!" >&2; exit 1; }
echo "$HTTP_NAME: $HTTP MB/s" >&2
rm -f "$W/http.bin"

# shoal: seeder a, downloader b.
"$SHOAL" --data-dir "$W/a" add "$W/f.bin" >/dev/null
ID=$("$SHOAL" --data-dir "$W/a" --json ls | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["id"])')
"$SHOAL" --data-dir "$W/a" serve --no-mdns --listen /ip4/127.0.0.1/tcp/18971 --api 127.0.0.1:18970 >"$W/a.log" 2>&1 &
PIDS+=($!)
"$SHOAL" --data-dir "$W/b" serve --no-mdns --listen /ip4/127.0.0.1/tcp/18981 --api 127.0.0.1:18980 \
    --peer /ip4/127.0.0.1/tcp/18971 >"$W/b.log" 2>&1 &
PIDS+=($!)
until [ "$("$SHOAL" --data-dir "$W/b" --json status --api 127.0.0.1:18980 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["connected"])' 2>/dev/null || echo 0)" -ge 1 ]; do sleep 0.1; done
settle
t0=$(now)
"$SHOAL" --data-dir "$W/b" --json pull "$ID" --api 127.0.0.1:18980 >"$W/pull.json"
t1=$(now)
SHOAL_RATE=$(rate "$t0" "$t1")
INNER=$(python3 -c "import json; j=json.load(open('$W/pull.json')); print('%.0f' % ($SIZE_MB*1048576/(j['elapsed_ms']/1000)/1e6))")
cmp -s "$W/f.bin" "$W/b/objects/$ID" || { echo "shoal copy differs!" >&2; exit 1; }
echo "shoal pull: $SHOAL_RATE MB/s wall clock (daemon-measured $INNER MB/s)" >&2
# The daemons are done: free their CPU and memory before sendme runs.
for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
wait 2>/dev/null || true
PIDS=()

SENDME_RATE="" SENDME_INNER=""
if [ -n "$SENDME" ]; then
    # Sender and receiver in a new network namespace with only loopback up.
    NS=(unshare --net)
    [ "$(id -u)" = 0 ] || NS=(unshare --user --map-root-user --net)
    mkdir -p "$W/send" "$W/recv"
    ln "$W/f.bin" "$W/send/f.bin"
    OUT=$(W="$W" SENDME="$SENDME" SETTLE="$(declare -f settle)" "${NS[@]}" bash -euo pipefail -c '
        eval "$SETTLE"
        ip link set lo up
        now() { python3 -c "import time; print(time.monotonic())"; }
        common=(--relay disabled --no-progress --magic-ipv4-addr 127.0.0.1:0 --magic-ipv6-addr "[::1]:0")
        cd "$W/send"
        "$SENDME" send "${common[@]}" --ticket-type addresses f.bin >"$W/sendme-send.out" 2>"$W/sendme-send.err" &
        SP=$!
        trap "kill -INT $SP 2>/dev/null || true; wait $SP 2>/dev/null || true" EXIT
        until TICKET=$(grep -o "blob[a-z0-9]*" "$W/sendme-send.out" | head -1) && [ -n "$TICKET" ]; do
            kill -0 $SP 2>/dev/null || { cat "$W/sendme-send.err" >&2; exit 1; }
            sleep 0.1
        done
        cd "$W/recv"
        settle
        t0=$(now)
        "$SENDME" receive "${common[@]}" -v "$TICKET" >"$W/sendme-recv.out" 2>"$W/sendme-recv.err"
        sync f.bin
        t1=$(now)
        echo "$t0 $t1"
    ')
    read -r t0 t1 <<<"$OUT"
    cmp -s "$W/f.bin" "$W/recv/f.bin" || { echo "sendme copy differs!" >&2; exit 1; }
    SENDME_RATE=$(rate "$t0" "$t1")
    # sendme's own figure: the transfer into its store, before the export copy.
    SENDME_INNER=$(python3 - "$W/sendme-recv.out" <<'PY'
import re, sys
m = re.search(r"\(([\d.]+) (B|KiB|MiB|GiB)/s\)", open(sys.argv[1]).read())
print("%.0f" % (float(m.group(1)) * {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[m.group(2)] / 1e6) if m else "n/a")
PY
)
    echo "sendme: $SENDME_RATE MB/s wall clock (sendme-measured transfer $SENDME_INNER MB/s)" >&2
else
    echo "sendme not found (cargo install sendme --root ~/.cache/shoal/tools): skipped" >&2
fi

echo "| system ($SIZE_MB MiB, load $(cut -d' ' -f1-3 /proc/loadavg)) | MB/s | ratio to HTTP | ratio to sendme |"
echo "| --- | --- | --- | --- |"
row() {
    local sm="n/a"
    [ -n "$SENDME_RATE" ] && sm="$(ratio "$2" "$SENDME_RATE")"
    echo "| $1 | $2 | $(ratio "$2" "$HTTP") | $sm |"
}
row "$HTTP_NAME (anchor)" "$HTTP"
row "shoal pull (wall clock of the CLI)" "$SHOAL_RATE"
row "shoal pull (daemon-measured, start to activation)" "$INNER"
if [ -n "$SENDME_RATE" ]; then
    row "sendme receive + sync (wall clock)" "$SENDME_RATE"
    [ "$SENDME_INNER" != n/a ] && row "sendme (its own transfer figure, before export)" "$SENDME_INNER"
fi
echo "RESULT size_mb=$SIZE_MB http=\"$HTTP_NAME\" http_mbps=$HTTP shoal_mbps=$SHOAL_RATE shoal_inner_mbps=$INNER sendme_mbps=${SENDME_RATE:-n/a} sendme_inner_mbps=${SENDME_INNER:-n/a} shoal/http=$(ratio "$SHOAL_RATE" "$HTTP")${SENDME_RATE:+ shoal/sendme=$(ratio "$SHOAL_RATE" "$SENDME_RATE")}"
