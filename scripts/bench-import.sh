#!/usr/bin/env bash
# Benchmarks `shoal import` of the demo model from the three layouts it reads:
# a plain directory (copied, or reflinked where the filesystem can), a Hugging
# Face cache and an Ollama store (blobs hard-linked on the same filesystem).
# Anchor, measured in the same run: a durable copy of the same file with dd.
# Prints a Markdown table for docs/benchmarks.md. Bounded: a few runs.
#
# usage: scripts/bench-import.sh [--runs N]
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=3
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) RUNS="$2"; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
cargo build --release -p shoal-node >&2
SHOAL="$PWD/target/release/shoal"
MODEL="$(scripts/fetch-model.sh)"
WORK="${SHOAL_BENCH_DIR:-$(mktemp -d -p /var/tmp shoal-bench-import.XXXXXX)}"
trap 'rm -rf "$WORK"' EXIT
python3 - "$SHOAL" "$MODEL" "$WORK" "$RUNS" <<'PY'
import hashlib, json, os, shutil, statistics, subprocess, sys, time
shoal, model, work, runs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

def t(cmd):
    s = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - s

def layout(kind):
    root = os.path.join(work, kind)
    shutil.rmtree(root, ignore_errors=True)
    if kind == "directory":
        os.makedirs(root)
        shutil.copyfile(model, os.path.join(root, "SmolLM2-135M-Instruct.Q4_1.gguf"))
        return root
    if kind == "huggingface":
        repo = os.path.join(root, "models--HuggingFaceTB--SmolLM2-135M-Instruct-GGUF")
        os.makedirs(os.path.join(repo, "blobs"))
        os.makedirs(os.path.join(repo, "snapshots", "main"))
        shutil.copyfile(model, os.path.join(repo, "blobs", "b1"))
        os.symlink("../../blobs/b1", os.path.join(repo, "snapshots", "main", "SmolLM2-135M-Instruct-Q4_1.gguf"))
        return root
    digest = hashlib.sha256(open(model, "rb").read()).hexdigest()
    os.makedirs(os.path.join(root, "blobs"))
    os.makedirs(os.path.join(root, "manifests", "registry.ollama.ai", "library", "smollm2"))
    shutil.copyfile(model, os.path.join(root, "blobs", f"sha256-{digest}"))
    with open(os.path.join(root, "manifests", "registry.ollama.ai", "library", "smollm2", "135m"), "w") as f:
        json.dump({"schemaVersion": 2, "layers": [{"mediaType": "application/vnd.ollama.image.model",
                   "digest": f"sha256:{digest}", "size": os.path.getsize(model)}]}, f)
    return root

def extra_bytes(store):
    # Bytes the store allocated for itself: objects not shared with a source inode.
    n = 0
    d = os.path.join(store, "objects")
    for e in os.listdir(d):
        st = os.stat(os.path.join(d, e))
        if st.st_nlink == 1:
            n += st.st_blocks * 512
    return n

size = os.path.getsize(model)
print(f"demo model: {size / 2**20:.1f} MiB; {runs} runs, medians")
print()
print("| layout | shoal import s | dd fdatasync s (anchor) | ratio import/dd | new bytes on disk |")
print("|---|---|---|---|---|")
for kind in ("directory", "huggingface", "ollama"):
    src = layout(kind)
    imp, dd, extra = [], [], 0
    for i in range(runs):
        cp = os.path.join(work, "copy")
        dd.append(t(["dd", f"if={model}", f"of={cp}", "bs=1M", "conv=fdatasync"]))
        os.remove(cp)
        store = os.path.join(work, f"store-{kind}-{i}")
        subprocess.run([shoal, "--data-dir", store, "ls"], check=True, stdout=subprocess.DEVNULL)
        imp.append(t([shoal, "--data-dir", store, "import", src]))
        extra = extra_bytes(store)
        shutil.rmtree(store)
    m = statistics.median
    print(f"| {kind} | {m(imp):.3f} | {m(dd):.3f} | {m(imp)/m(dd):.2f} | {extra / 2**20:.1f} MiB |")
PY
