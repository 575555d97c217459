#!/usr/bin/env python3
"""Print, as JSON, what `mx.dequantize` (CPU) makes of an MLX-quantized model directory:
{tensor name: [dtype, shape, sha256 of the bytes]} for every tensor of the float model, where each
quantized module `m` (with `m.scales`) becomes `m.weight` = mx.dequantize(m.weight, m.scales,
m.biases, group_size, bits, mode[, dtype]) with its settings from config.json's `quantization`
(the per-module entry, else the top level), and every other tensor is copied.

    python tests/py/dequantize_digests.py MODEL_DIR [--dtype float32|float16|bfloat16]
"""

import argparse
import hashlib
import json
from pathlib import Path

import mlx.core as mx
import numpy as np

NAMES = {mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16", mx.uint32: "U32", mx.uint8: "U8",
         mx.int32: "I32", mx.int64: "I64"}


def raw(a):
    a = mx.contiguous(a)
    if a.dtype == mx.bfloat16:
        return np.array(a.view(mx.uint16)).tobytes()
    return np.array(a).tobytes()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir", type=Path)
    ap.add_argument("--dtype")
    a = ap.parse_args()
    cfg = json.loads((a.dir / "config.json").read_text())
    q = cfg.get("quantization") or cfg.get("quantization_config") or {}
    tensors = {}
    for f in sorted(a.dir.glob("*.safetensors")):
        tensors.update(mx.load(str(f)))
    out = {}
    dtype = getattr(mx, a.dtype) if a.dtype else None
    for name, t in tensors.items():
        if name.endswith(".scales") or name.endswith(".biases"):
            continue
        m = name[: -len(".weight")] if name.endswith(".weight") else None
        if m is not None and f"{m}.scales" in tensors:
            e = q.get(m) if isinstance(q.get(m), dict) else {}
            mode = e.get("mode", q.get("mode", "affine"))
            kw = dict(group_size=e.get("group_size", q.get("group_size")), bits=e.get("bits", q.get("bits")),
                      mode=mode, stream=mx.cpu)
            if dtype is not None:
                kw["dtype"] = dtype
            t = mx.dequantize(t, tensors[f"{m}.scales"], tensors.get(f"{m}.biases"), **kw)
            if dtype is None and mode == "affine":
                t = t.astype(tensors[f"{m}.scales"].dtype)
        elif dtype is not None and mx.issubdtype(t.dtype, mx.floating):
            t = t.astype(dtype)
        mx.eval(t)
        out[name] = [NAMES[t.dtype], list(t.shape), hashlib.sha256(raw(t)).hexdigest()]
    print(json.dumps(out, sort_keys=True))


if __name__ == "__main__":
    main()
