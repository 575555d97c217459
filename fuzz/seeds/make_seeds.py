#!/usr/bin/env python3
"""Rebuilds the seed corpora under fuzz/seeds/<target>/ from the repository's real files.

safetensors_header: small but valid safetensors files whose headers are the fixtures' own (same dtypes,
names, `__metadata__`), cut down to their few smallest tensors and re-laid out contiguously, plus one
fixture header kept verbatim but without its data (a realistic "truncated download").
recipe: every recipes/*.toml verbatim.
index: the fixtures' model.safetensors.index.json files, plus one index that matches the tiny shards the
index target writes (see fuzz/entry.rs).

Run from anywhere: python3 fuzz/seeds/make_seeds.py
"""
import glob
import json
import os
import shutil
import struct

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEEDS = os.path.join(ROOT, "fuzz", "seeds")
SIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def read_header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), n


def write_safetensors(path, meta, tensors):
    """tensors: list of (name, dtype, shape); data bytes are a deterministic pattern."""
    header = {}
    if meta:
        header["__metadata__"] = meta
    off = 0
    for name, dtype, shape in tensors:
        nb = SIZE[dtype]
        for d in shape:
            nb *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + nb]}
        off += nb
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + bytes(i % 251 for i in range(off)))


def main():
    for t in ("safetensors_header", "recipe", "index"):
        shutil.rmtree(os.path.join(SEEDS, t), ignore_errors=True)
        os.makedirs(os.path.join(SEEDS, t))

    out = os.path.join(SEEDS, "safetensors_header")
    fixtures = sorted(glob.glob(os.path.join(ROOT, "fixtures", "models", "*", "*.safetensors")))
    for path in fixtures:
        header, _ = read_header(path)
        meta = header.pop("__metadata__", None)
        entries = []
        for name, e in header.items():
            nb = e["data_offsets"][1] - e["data_offsets"][0]
            if e["dtype"] in SIZE and nb <= 256:
                entries.append((nb, name, e["dtype"], e["shape"]))
        entries.sort()
        model = os.path.basename(os.path.dirname(path))
        stem = os.path.basename(path).replace(".safetensors", "")
        write_safetensors(
            os.path.join(out, f"{model}-{stem}.safetensors"),
            meta,
            [(n, d, s) for _, n, d, s in entries[:4]],
        )
    # One real header verbatim, data section missing.
    real = os.path.join(ROOT, "fixtures", "models", "mistral3", "model-00001-of-00003.safetensors")
    _, n = read_header(real)
    with open(real, "rb") as f, open(os.path.join(out, "mistral3-header-only.bin"), "wb") as g:
        g.write(f.read(8 + n))
    # Edge shapes: scalar, zero-sized, empty file, metadata only.
    write_safetensors(os.path.join(out, "edge-shapes.safetensors"), {"format": "pt"},
                      [("scalar", "F32", []), ("empty", "BF16", [0, 3]), ("b", "BOOL", [3])])
    write_safetensors(os.path.join(out, "empty.safetensors"), None, [])

    out = os.path.join(SEEDS, "recipe")
    for path in sorted(glob.glob(os.path.join(ROOT, "recipes", "*.toml"))):
        shutil.copy(path, out)

    out = os.path.join(SEEDS, "index")
    for path in sorted(glob.glob(os.path.join(ROOT, "fixtures", "models", "*", "model.safetensors.index.json"))):
        shutil.copy(path, os.path.join(out, os.path.basename(os.path.dirname(path)) + ".index.json"))
    with open(os.path.join(out, "tiny.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 28}, "weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00001-of-00002.safetensors",
            "c": "model-00002-of-00002.safetensors",
        }}, f, indent=2)


if __name__ == "__main__":
    main()
