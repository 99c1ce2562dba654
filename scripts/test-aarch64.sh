#!/usr/bin/env bash
# The Pi's build, tested on this x86-64 machine under emulation (correctness only, never timing):
#  1. cross-builds shoal for aarch64-unknown-linux-gnu (Debian's gcc-aarch64-linux-gnu links it);
#  2. runs the kernel and inference unit tests under qemu-aarch64, once on a CPU model with dotprod
#     (`-cpu max`: the NEON+dotprod kernels and, by `Isa::available()`, every slower one) and once
#     without (`-cpu cortex-a53`: plain NEON and scalar);
#     including the demo model's greedy continuations against the llama.cpp reference every x86 ISA is
#     held to (src/inference/model/parity.rs);
#  3. runs the aarch64 `shoal generate` on both CPU models beside the x86 one.
#
#   scripts/test-aarch64.sh
set -euo pipefail
cd "$(dirname "$0")/.."
T=aarch64-unknown-linux-gnu
SYSROOT=/usr/aarch64-linux-gnu

need=()
command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || need+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
command -v qemu-aarch64 >/dev/null 2>&1 || need+=(qemu-user)
if [ ${#need[@]} -gt 0 ]; then
  sudo=(); [ "$(id -u)" = 0 ] || sudo=(sudo)
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${need[@]}" >/dev/null
fi
rustup target list --installed 2>/dev/null | grep -qx "$T" || rustup target add "$T"

start=$(date +%s)
cargo build --release --target "$T" -p shoal-node --bin shoal
echo "aarch64: binary built in $(( $(date +%s) - start )) s: target/$T/release/shoal" >&2

# Unit tests of the inference layer: the kernels against the scalar reference on random blocks, on
# every ISA the emulated CPU has (`Isa::available()`), and the demo model's greedy continuations against
# llama.cpp's (`inference::model::parity`: the same reference the x86 build is held to, so the Pi's
# greedy output is the x86 one but for near-ties), plus tokenizer, sampler, KV and loading tests.
# The runner in .cargo/config.toml is qemu-aarch64; QEMU_CPU picks the CPU model.
SHOAL_TEST_MODEL="${SHOAL_TEST_MODEL:-$(scripts/fetch-model.sh)}"
export SHOAL_TEST_MODEL
for cpu in max cortex-a53; do
  t0=$(date +%s)
  echo "aarch64: unit tests under qemu-aarch64 -cpu $cpu" >&2
  QEMU_CPU=$cpu cargo test --release --target "$T" --lib inference::
  echo "aarch64 (-cpu $cpu): unit tests passed in $(( $(date +%s) - t0 )) s" >&2
done

# The binary a Pi installs runs: a short greedy generation on each CPU model, shown beside x86's.
[ -x target/release/shoal ] || cargo build --release -p shoal-node --bin shoal
PROMPT="The capital of France is"
gen() { "$@" generate --model "$SHOAL_TEST_MODEL" --threads 2 --max-tokens 12 --prompt "$PROMPT"; }
echo "x86-64: $(gen target/release/shoal | tr '\n' ' ')" >&2
for cpu in max cortex-a53; do
  got="$(QEMU_CPU=$cpu gen qemu-aarch64 -L "$SYSROOT" "target/$T/release/shoal")"
  [ -n "$got" ] || { echo "aarch64 (-cpu $cpu): generated nothing" >&2; exit 1; }
  echo "aarch64 (-cpu $cpu): $(printf '%s' "$got" | tr '\n' ' ')" >&2
done
echo "aarch64: all checks passed in $(( $(date +%s) - start )) s" >&2
