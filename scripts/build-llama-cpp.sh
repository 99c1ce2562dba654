#!/usr/bin/env bash
# Builds llama.cpp's CPU tools from the tree vendored in the PyPI sdist of
# llama-cpp-python (LCP_VERSION, default 0.3.36) and caches them under
# ~/.cache/shoal/tools/llama.cpp-<version>/: bin/ (llama-server, llama-bench,
# llama-perplexity, llama-tokenize, llama-simple, llama-quantize), and src/ +
# build/ (headers and static libraries, for scripts that link libllama, like
# scripts/fixtures/llama-logits.cpp). Prints the tools directory.
#
# Release, GGML_NATIVE, CPU only, no curl/openssl, no web UI, static, -j2.
# When run as root the configure and build run in a network namespace with
# no network. ~12 min on 2 cores; reused once built.
set -euo pipefail
LCP_VERSION=${LCP_VERSION:-0.3.36}
TOOLS=${XDG_CACHE_HOME:-$HOME/.cache}/shoal/tools/llama.cpp-$LCP_VERSION
TARGETS=(llama-server llama-bench llama-perplexity llama-tokenize llama-simple llama-quantize)
log() { echo "build-llama-cpp: $*" >&2; }

have_all() {
    for t in "${TARGETS[@]}"; do [[ -x $TOOLS/bin/$t ]] || return 1; done
    [[ -f $TOOLS/build/src/libllama.a ]]
}
if have_all; then echo "$TOOLS"; exit 0; fi

if ! command -v cmake >/dev/null; then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        log "installing cmake (apt)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake >&2
    else
        log "installing cmake (pip --user)"
        python3 -m pip install --user cmake >&2
        export PATH=$HOME/.local/bin:$PATH
    fi
fi
mkdir -p "$TOOLS"
if [[ ! -f $TOOLS/src/CMakeLists.txt ]]; then
    work=$(mktemp -d)
    log "fetching the llama-cpp-python $LCP_VERSION sdist (pip download)"
    python3 -m pip download --quiet --no-deps --no-binary llama-cpp-python \
        "llama-cpp-python==$LCP_VERSION" -d "$work" >&2
    tar xzf "$work"/llama_cpp_python-"$LCP_VERSION".tar.gz -C "$work"
    rm -rf "$TOOLS/src"
    mv "$work/llama_cpp_python-$LCP_VERSION/vendor/llama.cpp" "$TOOLS/src"
    rm -rf "$work"
fi
flags=(-DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF
    -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF -DGGML_CUDA=OFF -DGGML_VULKAN=OFF
    -DGGML_METAL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=ON
    -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_UI=OFF
    -DLLAMA_USE_PREBUILT_UI=OFF -DGGML_OPENMP=OFF)
nonet=()
if [[ $(id -u) -eq 0 ]] && unshare -n true 2>/dev/null; then nonet=(unshare -n); fi
log "building ${TARGETS[*]} (log: $TOOLS/build.log)"
{
    "${nonet[@]}" cmake -S "$TOOLS/src" -B "$TOOLS/build" "${flags[@]}"
    "${nonet[@]}" cmake --build "$TOOLS/build" --target "${TARGETS[@]}" -j"${JOBS:-2}"
} >"$TOOLS/build.log" 2>&1 || { log "build failed, see $TOOLS/build.log"; exit 1; }
mkdir -p "$TOOLS/bin"
for t in "${TARGETS[@]}"; do cp "$TOOLS/build/bin/$t" "$TOOLS/bin/$t.tmp" && mv "$TOOLS/bin/$t.tmp" "$TOOLS/bin/$t"; done
{
    echo "llama-cpp-python $LCP_VERSION sdist, vendor/llama.cpp"
    echo "built $(date -u '+%Y-%m-%d %H:%M UTC') with: cmake ${flags[*]}; --target ${TARGETS[*]}"
    "$TOOLS/bin/llama-server" --version 2>&1 | grep -i -E "version|built" || true
} >"$TOOLS/BUILD.txt"
log "built into $TOOLS/bin"
echo "$TOOLS"
