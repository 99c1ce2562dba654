#!/usr/bin/env bash
# Fetches llama.cpp's vocabulary-only GGUFs and their tokenizer test vectors
# (models/ggml-vocab-*.gguf, .gguf.inp, .gguf.out) from the PyPI sdist of
# llama-cpp-python (LCP_VERSION, default 0.3.36, which vendors llama.cpp) into
# $SHOAL_VOCAB_DIR (default ~/.cache/shoal/vocab) and prints that directory.
# The sdist is cached (~/.cache/shoal/sdist); when scripts/build-llama-cpp.sh
# already unpacked the same version, its tree is used and nothing is fetched.
# Used by tests/it/inference_tokenizer.rs (llama_cpp_vocab_vectors).
set -euo pipefail
LCP_VERSION=${LCP_VERSION:-0.3.36}
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/shoal
DIR=${SHOAL_VOCAB_DIR:-$CACHE/vocab}
log() { echo "fetch-vocabs: $*" >&2; }

if compgen -G "$DIR/ggml-vocab-*.gguf.inp" >/dev/null && [[ -f $DIR/.version ]] \
    && [[ $(cat "$DIR/.version") == "$LCP_VERSION" ]]; then
    echo "$DIR"
    exit 0
fi
mkdir -p "$DIR"
tools_models=$CACHE/tools/llama.cpp-$LCP_VERSION/src/models
if compgen -G "$tools_models/ggml-vocab-*.gguf" >/dev/null; then
    log "copying from $tools_models"
    cp "$tools_models"/ggml-vocab-*.gguf* "$DIR"/
else
    sdist_dir=$CACHE/sdist
    sdist=$sdist_dir/llama_cpp_python-$LCP_VERSION.tar.gz
    if [[ ! -f $sdist ]]; then
        mkdir -p "$sdist_dir"
        log "fetching the llama-cpp-python $LCP_VERSION sdist (pip download)"
        python3 -m pip download --quiet --no-deps --no-binary llama-cpp-python \
            "llama-cpp-python==$LCP_VERSION" -d "$sdist_dir" >&2
    fi
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    tar xzf "$sdist" -C "$work" --wildcards \
        "llama_cpp_python-$LCP_VERSION/vendor/llama.cpp/models/ggml-vocab-*"
    cp "$work/llama_cpp_python-$LCP_VERSION"/vendor/llama.cpp/models/ggml-vocab-*.gguf* "$DIR"/
fi
echo "$LCP_VERSION" >"$DIR/.version"
log "$(ls "$DIR"/ggml-vocab-*.gguf | wc -l) vocabularies in $DIR"
echo "$DIR"
