#!/usr/bin/env bash
# Benchmarks `shoal add` against the plain work it cannot avoid (b3sum, then a
# durable copy with dd), and measures cross-version dedupe. Prints a Markdown
# table for docs/benchmarks.md. Bounded: a few runs per file.
#
# usage: scripts/bench-store.sh [--big-mib N] [--runs N]
set -euo pipefail
cd "$(dirname "$0")/.."
BIG_MIB=1024
RUNS=3
while [ $# -gt 0 ]; do
  case "$1" in
    --big-mib) BIG_MIB="$2"; shift 2 ;;
    --runs) RUNS="$2"; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
command -v b3sum >/dev/null 2>&1 || cargo install --quiet b3sum >&2
cargo build --release -p shoal-node >&2
SHOAL="$PWD/target/release/shoal"
MODEL="$(scripts/fetch-model.sh)"
WORK="${SHOAL_BENCH_DIR:-$(mktemp -d -p /var/tmp shoal-bench.XXXXXX)}"
trap 'rm -rf "$WORK"' EXIT
BIG="$WORK/big.gguf"
python3 scripts/gen-gguf.py "$BIG" "$BIG_MIB" >&2
python3 - "$SHOAL" "$MODEL" "$BIG" "$WORK" "$RUNS" <<'PY'
import json, os, shutil, statistics, subprocess, sys, time
shoal, model, big, work, runs = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])

def t(cmd, **kw):
    s = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)
    return time.perf_counter() - s

def warm(f):
    with open(f, "rb") as fh:
        while fh.read(8 << 20):
            pass

print("| file | size | b3sum s | dd fdatasync s | b3sum+dd s | shoal add s | ratio add/(b3sum+dd) | add --reflink s |")
print("|---|---|---|---|---|---|---|---|")
for f in (model, big):
    warm(f)
    b3, dd, add, rl = [], [], [], []
    for i in range(runs):
        b3.append(t(["b3sum", "--no-names", f]))
        cp = os.path.join(work, "copy")
        dd.append(t(["dd", f"if={f}", f"of={cp}", "bs=1M", "conv=fdatasync"]))
        os.remove(cp)
        d = os.path.join(work, f"store{i}")
        # The store exists already (creating one is a one-time cost of ~0.1-0.5 s of fsyncs).
        subprocess.run([shoal, "--data-dir", d, "ls"], check=True, stdout=subprocess.DEVNULL)
        add.append(t([shoal, "--data-dir", d, "add", f]))
        shutil.rmtree(d)
        d = os.path.join(work, f"rstore{i}")
        subprocess.run([shoal, "--data-dir", d, "ls"], check=True, stdout=subprocess.DEVNULL)
        rl.append(t([shoal, "--data-dir", d, "add", "--reflink", f]))
        shutil.rmtree(d)
    m = statistics.median
    base = m(b3) + m(dd)
    size = os.path.getsize(f)
    print(f"| {os.path.basename(f)} | {size/2**20:.0f} MiB | {m(b3):.3f} | {m(dd):.3f} | {base:.3f} | {m(add):.3f} | **{m(add)/base:.2f}x** | {m(rl):.3f} |")

# Reflink support on this filesystem.
probe = os.path.join(work, "reflink-probe")
with open(probe, "wb") as fh:
    fh.write(b"x" * 4096)
r = subprocess.run(["cp", "--reflink=always", probe, probe + ".2"], stderr=subprocess.DEVNULL)
print()
print(f"reflink on {work}: {'supported' if r.returncode == 0 else 'NOT supported (the --reflink path falls back to a copy)'}")

# Dedupe across versions: v2 changes the bytes of three tensors.
d = os.path.join(work, "dedupe")
env = dict(os.environ, SHOAL_DATA_DIR=d)
subprocess.run([shoal, "add", model], check=True, stdout=subprocess.DEVNULL, env=env)
show = lambda ref: json.loads(subprocess.run([shoal, "show", "--json", ref], check=True, capture_output=True, env=env).stdout)
v1id = subprocess.run([shoal, "ls", "--json"], check=True, capture_output=True, env=env)
v1 = show(json.loads(v1id.stdout)[0]["id"])
names = ["blk.0.attn_q.weight", "blk.10.ffn_up.weight", "blk.29.ffn_down.weight"]
v2path = os.path.join(work, "v2.gguf")
shutil.copy(model, v2path)
changed = [t_ for t_ in v1["tensors"] if t_["name"] in names]
with open(v2path, "r+b") as fh:
    for t_ in changed:
        fh.seek(t_["offset"] + t_["size"] // 2)
        b = fh.read(64)
        fh.seek(t_["offset"] + t_["size"] // 2)
        fh.write(bytes((x + 1) % 256 for x in b))
out = subprocess.run([shoal, "add", v2path], check=True, capture_output=True, env=env)
v2 = show(out.stdout.decode().strip())
h1 = {c["blake3"] for c in v1["chunks"]}
shared = sum(c["len"] for c in v2["chunks"] if c["blake3"] in h1)
unchanged = sum(t_["size"] for t_ in v2["tensors"] if t_["name"] not in names)
unchanged_shared = 0
for t_ in v2["tensors"]:
    if t_["name"] in names:
        continue
    cs = v2["chunks"][t_["first_chunk"]: t_["first_chunk"] + t_["chunk_count"]]
    if all(c["blake3"] in h1 for c in cs):
        unchanged_shared += t_["size"]
print()
print("| dedupe v1 -> v2 (3 tensors changed) | bytes |")
print("|---|---|")
print(f"| v2 size | {v2['size']} |")
print(f"| bytes of unchanged tensors | {unchanged} |")
print(f"| unchanged-tensor bytes in shared chunks | {unchanged_shared} (**{100*unchanged_shared/unchanged:.2f}%**) |")
print(f"| all shared chunk bytes (incl. header) | {shared} ({100*shared/v2['size']:.2f}% of v2) |")
print(f"| bytes a node holding v1 must fetch for v2 | {v2['size']-shared} |")
PY
