#!/usr/bin/env bash
# A Pi's speed cannot be timed on x86-64 (emulation is not a Pi), but the work per token can be counted:
# this builds shoal's inference bench and llama.cpp's llama-bench for aarch64 (llama.cpp for a
# Raspberry Pi 5's Cortex-A76: armv8.2-a+dotprod+fp16), runs both under qemu-aarch64 with a TCG plugin
# that counts executed guest instructions (scripts/qemu-insn/insncount.c, built against the
# qemu-plugin.h of Debian's qemu source package), single-threaded, and prints instructions per prompt
# token and per generated token, shoal / llama.cpp. Lower is better; it is a proxy (memory stalls
# and instruction costs differ on silicon), the real figures come from docs/benchmarks.md's Pi procedure.
#
#   scripts/bench-aarch64-insn.sh [--model demo|gemma3|PATH] [--cpu max|cortex-a53]
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL_ARG=demo; CPU=max
while [ $# -gt 0 ]; do
  case "$1" in
    --model) MODEL_ARG="$2"; shift 2;;
    --cpu) CPU="$2"; shift 2;;
    *) echo "unknown option $1" >&2; exit 2;;
  esac
done
case "$MODEL_ARG" in
  demo) MODEL="${SHOAL_TEST_MODEL:-$(scripts/fetch-model.sh)}";;
  gemma3) MODEL="${SHOAL_GEMMA3_MODEL:-$(scripts/fetch-gemma3.sh)}";;
  *) MODEL="$MODEL_ARG";;
esac
T=aarch64-unknown-linux-gnu
SYSROOT=/usr/aarch64-linux-gnu
CACHE="$HOME/.cache/shoal/tools"
log() { echo "bench-aarch64-insn: $*" >&2; }

need=()
command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 || need+=(g++-aarch64-linux-gnu)
command -v qemu-aarch64 >/dev/null 2>&1 || need+=(qemu-user)
command -v cmake >/dev/null 2>&1 || need+=(cmake)
pkg-config --exists glib-2.0 2>/dev/null || need+=(libglib2.0-dev pkg-config)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
rustup target list --installed 2>/dev/null | grep -qx "$T" || rustup target add "$T"

# 1. The plugin, against the header of the installed qemu's own source package.
QV=$(dpkg-query -W -f='${source:Version}' qemu-user)
PLUG="$CACHE/qemu-insn-$QV/libinsncount.so"
if [ ! -f "$PLUG" ]; then
  d="$CACHE/qemu-insn-$QV"; mkdir -p "$d/apt/sources.list.d" "$d/apt/lists/partial"
  cat >"$d/apt/sources.list.d/src.sources" <<EOF
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: $(. /etc/os-release; echo "$VERSION_CODENAME")
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  apt_src=(-o "Dir::Etc::SourceParts=$d/apt/sources.list.d" -o Dir::Etc::SourceList=/dev/null
           -o "Dir::State::Lists=$d/apt/lists")
  log "fetching qemu $QV's source package for qemu-plugin.h"
  apt-get "${apt_src[@]}" update -qq
  (cd "$d" && apt-get "${apt_src[@]}" source --download-only "qemu=$QV" >/dev/null 2>&1)
  tar -xJf "$d"/qemu_*.orig.tar.xz -C "$d" --wildcards '*/include/qemu/qemu-plugin.h'
  hdr=$(dirname "$(find "$d" -name qemu-plugin.h | head -1)")
  gcc -shared -fPIC -O2 -I "$hdr" $(pkg-config --cflags glib-2.0) \
    -o "$PLUG" scripts/qemu-insn/insncount.c
fi

# 2. llama.cpp's llama-bench for aarch64, from the same sdist as the x86 anchor.
X86_TOOLS="$(scripts/build-llama-cpp.sh)"
LB="$CACHE/llama-aarch64/bin/llama-bench"
if [ ! -x "$LB" ]; then
  log "cross-building llama.cpp's llama-bench for aarch64 (armv8.2-a+dotprod+fp16; ~10 min once)"
  B="$CACHE/llama-aarch64/build"; mkdir -p "$B" "$(dirname "$LB")"
  cmake -S "$X86_TOOLS/src" -B "$B" -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_SYSTEM_NAME=Linux -DCMAKE_SYSTEM_PROCESSOR=aarch64 \
    -DCMAKE_C_COMPILER=aarch64-linux-gnu-gcc -DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++ \
    -DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16 -DGGML_OPENMP=OFF \
    -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=ON \
    >"$CACHE/llama-aarch64/build.log" 2>&1
  cmake --build "$B" --target llama-bench -j"${JOBS:-2}" >>"$CACHE/llama-aarch64/build.log" 2>&1 ||
    { log "build failed: $CACHE/llama-aarch64/build.log"; exit 1; }
  cp "$B/bin/llama-bench" "$LB"
fi

# 3. shoal's inference bench for aarch64.
cargo bench --no-run --target "$T" --bench inference >&2 2>/dev/null ||
  cargo bench --no-run --target "$T" --bench inference >&2
SB="$(ls -t target/$T/release/deps/inference-* | grep -v '\.d$' | head -1)"

# Runs a command under qemu with the counter; prints the instruction count.
count() {
  QEMU_CPU=$CPU qemu-aarch64 -L "$SYSROOT" -plugin "$PLUG" -d plugin "$@" 2>&1 >/dev/null |
    sed -n 's/^insns: //p' | tail -1
}
shoal_run() { count "$SB" --model "$MODEL" --threads 1 --pp "$1" --tg "$2" --reps 1; }
llama_run() { count "$LB" -m "$MODEL" -t 1 -p "$1" -n "$2" -r 1 --no-warmup; }

P1=16; P2=48; G1=4; G2=20
log "model $MODEL, qemu-aarch64 -cpu $CPU, 1 thread"
for impl in shoal llama; do
  a=$(${impl}_run $P1 $G1); b=$(${impl}_run $P2 $G1); c=$(${impl}_run $P1 $G2)
  pp=$(( (b - a) / (P2 - P1) )); tg=$(( (c - a) / (G2 - G1) ))
  echo "{\"impl\":\"$impl\",\"cpu\":\"$CPU\",\"model\":\"$(basename "$MODEL")\",\"insns_per_prompt_token\":$pp,\"insns_per_gen_token\":$tg}"
  eval "${impl}_pp=$pp ${impl}_tg=$tg"
done
python3 -c "import sys; s_pp,s_tg,l_pp,l_tg=map(int,sys.argv[1:]); print(f'instructions per prompt token: shoal {s_pp/1e6:.1f} M / llama.cpp {l_pp/1e6:.1f} M = {s_pp/l_pp:.2f}x; per generated token: shoal {s_tg/1e6:.1f} M / llama.cpp {l_tg/1e6:.1f} M = {s_tg/l_tg:.2f}x (lower is better)')" \
  "$shoal_pp" "$shoal_tg" "$llama_pp" "$llama_tg"
