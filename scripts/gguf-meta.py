#!/usr/bin/env python3
"""Copies a GGUF file with one string metadata value set (or added).

usage: gguf-meta.py IN OUT KEY VALUE

The tensor data is copied unchanged: tensor offsets are relative to the
data section, which starts at the next alignment boundary after the new
header. Used by scripts/soak.py to make hostile or distinct variants of the
demo model (a chat template that never ends, a second artifact id).
"""
import shutil
import struct
import sys

STRING = 8
ARRAY = 9
FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def read_exact(f, n):
    b = f.read(n)
    if len(b) != n:
        raise SystemExit("truncated GGUF")
    return b


def read_str(f):
    (n,) = struct.unpack("<Q", read_exact(f, 8))
    return read_exact(f, n)


def read_value(f, t):
    """Returns the raw bytes of a value of type t."""
    if t in FIXED:
        return read_exact(f, FIXED[t])
    if t == STRING:
        s = read_str(f)
        return struct.pack("<Q", len(s)) + s
    if t == ARRAY:
        head = read_exact(f, 12)
        et, n = struct.unpack("<IQ", head)
        parts = [head]
        for _ in range(n):
            parts.append(read_value(f, et))
        return b"".join(parts)
    raise SystemExit(f"unknown GGUF value type {t}")


def main():
    if len(sys.argv) != 5:
        raise SystemExit(__doc__)
    src, dst, key, value = sys.argv[1:]
    with open(src, "rb") as f:
        if read_exact(f, 4) != b"GGUF":
            raise SystemExit("not a GGUF file")
        version, n_tensors, n_kv = struct.unpack("<IQQ", read_exact(f, 20))
        kvs = []
        align = 32
        for _ in range(n_kv):
            k = read_str(f)
            (t,) = struct.unpack("<I", read_exact(f, 4))
            raw = read_value(f, t)
            if k == b"general.alignment" and t == 4:
                (align,) = struct.unpack("<I", raw)
            kvs.append((k, t, raw))
        tensors = []
        for _ in range(n_tensors):
            name = read_str(f)
            (nd,) = struct.unpack("<I", read_exact(f, 4))
            rest = read_exact(f, 8 * nd + 4 + 8)
            tensors.append(struct.pack("<Q", len(name)) + name + struct.pack("<I", nd) + rest)
        data_start = f.tell() + (-f.tell()) % align
        v = value.encode()
        new_raw = struct.pack("<Q", len(v)) + v
        kb = key.encode()
        out = [(k, t, raw) for (k, t, raw) in kvs if k != kb]
        out.append((kb, STRING, new_raw))
        hdr = b"GGUF" + struct.pack("<IQQ", version, n_tensors, len(out))
        for k, t, raw in out:
            hdr += struct.pack("<Q", len(k)) + k + struct.pack("<I", t) + raw
        hdr += b"".join(tensors)
        hdr += b"\0" * ((-len(hdr)) % align)
        f.seek(data_start)
        with open(dst, "wb") as o:
            o.write(hdr)
            shutil.copyfileobj(f, o, 1 << 20)


if __name__ == "__main__":
    main()
