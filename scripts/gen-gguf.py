#!/usr/bin/env python3
"""Writes a synthetic GGUF v3 file of about SIZE bytes (for benchmarks).

usage: gen-gguf.py OUT SIZE_MIB [--tensor-mib N] [--seed S]
Tensors are I8 vectors of pseudo-random bytes, N MiB each (default 48), plus a few tiny ones.
"""
import argparse, os, random, struct

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("size_mib", type=int)
ap.add_argument("--tensor-mib", type=int, default=48)
ap.add_argument("--seed", type=int, default=1)
a = ap.parse_args()

ALIGN = 32
def s(x):
    b = x.encode()
    return struct.pack("<Q", len(b)) + b

sizes = []
left = a.size_mib << 20
while left > 0:
    n = min(a.tensor_mib << 20, left)
    sizes.append(n)
    left -= n
sizes += [2304] * 4  # norm-sized tensors
meta = [("general.architecture", 8, s("llama")), ("general.name", 8, s("synthetic"))]
hdr = b"GGUF" + struct.pack("<IQQ", 3, len(sizes), len(meta))
for k, t, v in meta:
    hdr += s(k) + struct.pack("<I", t) + v
off = 0
for i, n in enumerate(sizes):
    hdr += s(f"blk.{i}.weight") + struct.pack("<I", 1) + struct.pack("<Q", n) + struct.pack("<I", 24) + struct.pack("<Q", off)
    off = (off + n + ALIGN - 1) // ALIGN * ALIGN
hdr += b"\0" * ((-len(hdr)) % ALIGN)
rng = random.Random(a.seed)
with open(a.out, "wb") as f:
    f.write(hdr)
    for n in sizes:
        block = rng.randbytes(1 << 20)
        done = 0
        while done < n:
            k = min(1 << 20, n - done)
            # vary each MiB cheaply so chunks are distinct
            f.write(struct.pack("<Q", rng.getrandbits(64)) + block[8:k] if k >= 8 else block[:k])
            done += k
        f.write(b"\0" * ((-n) % ALIGN))
