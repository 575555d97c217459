#!/usr/bin/env python3
"""Golden files for `src/quant.rs` (MLX affine quantization, CPU kernel semantics).

Rerun (from the crate root; needs mlx 0.32.x with the CPU backend, numpy):

    /work/venvs/mlx/bin/python scripts/golden_quant.py

It rewrites `fixtures/golden/quant/quant_{f32,f16,bf16}.safetensors`. Output is deterministic (fixed seed,
CPU stream), so a rerun with the same MLX version gives identical bytes; `tests/quant_golden.rs` compares
our quantizer against these files byte for byte.

Each file holds, for its dtype DT (f32, f16 or bf16):
  w.DT                       input matrix [10, 384] (crafted edge-case rows, see `make_matrix`)
  q.DT.bB.gG.weight          mx.quantize(w, group_size=G, bits=B, stream=mx.cpu)[0]  (U32)
  q.DT.bB.gG.scales          ...[1]  (dtype DT)
  q.DT.bB.gG.biases          ...[2]  (dtype DT)
  dq.DT.bB.gG                mx.dequantize(weight, scales, biases, G, B, stream=mx.cpu)  (dtype DT)
  dq32.DT.bB.gG              same with dtype=mx.float32 (only for DT f16 / bf16)
for every B in {2, 3, 4, 5, 6, 8} and G in {32, 64, 128}.
"""

import os

import mlx.core as mx
import numpy as np

BITS = [2, 3, 4, 5, 6, 8]
GROUPS = [32, 64, 128]
DTYPES = {"f32": mx.float32, "f16": mx.float16, "bf16": mx.bfloat16}
ROWS, COLS = 10, 384
SEG = 128  # crafted segments span 128 columns so they are edge cases for every group size


def with_extremes(rng, seg, lo, hi):
    """Puts `lo` and `hi` at random positions of every 32-column chunk of `seg` (in place)."""
    for c in range(0, seg.size, 32):
        i, j = rng.choice(32, size=2, replace=False)
        seg[c + i] = lo
        seg[c + j] = hi
    return seg


def make_matrix(rng):
    w = np.zeros((ROWS, COLS), dtype=np.float32)
    s = [slice(0, SEG), slice(SEG, 2 * SEG), slice(2 * SEG, 3 * SEG)]

    # Row 0: typical weights.
    w[0] = rng.normal(0.0, 0.02, COLS)

    # Row 1: all-zero groups, a positive constant, a negative constant.
    w[1, s[0]] = 0.0
    w[1, s[1]] = 0.5
    w[1, s[2]] = -3.0

    # Row 2: |min| == |max| (multiples of 1/64, so exact in bf16), a tiny range (eps clamp), a tiny constant.
    w[2, s[0]] = with_extremes(rng, np.round(rng.uniform(-1, 1, SEG) * 64) / 64, -1.0, 1.0)
    w[2, s[1]] = rng.uniform(-5e-7, 5e-7, SEG)
    w[2, s[2]] = 1e-7

    # Row 3: half-integer grids, which put (x - bias) / scale exactly on .5 ties.
    w[3, s[0]] = with_extremes(rng, rng.integers(0, 31, SEG) / 2.0, 0.0, 15.0)
    w[3, s[1]] = with_extremes(rng, rng.integers(-8, 8, SEG).astype(np.float64), -8.0, 7.0)
    w[3, s[2]] = with_extremes(rng, rng.integers(-15, 16, SEG) / 2.0, -7.5, 7.5)

    # Row 4: large magnitudes (still inside f16's range; dequantizing in f16 may overflow to inf).
    w[4] = np.clip(rng.normal(0.0, 1e4, COLS), -6e4, 6e4)
    w[4, s[2]] = with_extremes(rng, w[4, s[2]], -6e4, 6e4)

    # Row 5: all-positive groups with a large offset, all-negative ones, small values with one outlier per 32.
    w[5, s[0]] = 5.0 + rng.uniform(0, 1, SEG)
    w[5, s[1]] = -(100.0 + rng.uniform(0, 0.01, SEG))
    seg = rng.normal(0.0, 0.01, SEG)
    for c in range(0, SEG, 32):
        seg[c + rng.integers(32)] = 1.0 if (c // 32) % 2 == 0 else -1.0
    w[5, s[2]] = seg

    # Row 6: every 32-chunk its own scale and offset.
    for c in range(0, COLS, 32):
        scale = np.exp(rng.uniform(-10, 5))
        offset = rng.choice([0.0, 0.0, rng.normal(0, 3 * scale)])
        w[6, c : c + 32] = rng.normal(offset, scale, 32)

    # Row 7: uniform, then values in f16's subnormal range, then a mix of both.
    w[7, s[0]] = rng.uniform(-1, 1, SEG)
    w[7, s[1]] = rng.normal(0.0, 1e-6, SEG)
    w[7, s[2]] = rng.normal(0.0, 1e-6, SEG) + (rng.uniform(0, 1, SEG) < 0.1) * 3e-5

    # Rows 8 and 9: min/max pairs whose edge / scale is an exact .5 tie with an even integer part
    # (q0 = rint(-2.5) = -2 for 2 bits, rint(-12.5) = -12 for 4 bits, ...), one row with |min| > |max|,
    # the other mirrored.
    for c, (lo, hi) in enumerate([(-5.0, 1.0), (-9.0, 5.0), (-33.0, 29.0)]):
        seg = np.round(rng.uniform(lo, hi, SEG) * 4) / 4
        w[8, s[c]] = with_extremes(rng, seg, lo, hi)
    w[9] = -w[8]
    return w


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    out_dir = os.path.join(here, "..", "fixtures", "golden", "quant")
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(20240607)
    base = mx.array(make_matrix(rng))
    for name, dt in DTYPES.items():
        w = base.astype(dt, stream=mx.cpu)
        tensors = {f"w.{name}": w}
        for b in BITS:
            for g in GROUPS:
                q, sc, bi = mx.quantize(w, group_size=g, bits=b, stream=mx.cpu)
                key = f"{name}.b{b}.g{g}"
                tensors[f"q.{key}.weight"] = q
                tensors[f"q.{key}.scales"] = sc
                tensors[f"q.{key}.biases"] = bi
                tensors[f"dq.{key}"] = mx.dequantize(q, sc, bi, group_size=g, bits=b, stream=mx.cpu)
                if dt != mx.float32:
                    tensors[f"dq32.{key}"] = mx.dequantize(
                        q, sc, bi, group_size=g, bits=b, dtype=mx.float32, stream=mx.cpu
                    )
        mx.eval(tensors)
        path = os.path.join(out_dir, f"quant_{name}.safetensors")
        mx.save_safetensors(path, tensors, metadata={"generator": "scripts/golden_quant.py", "mlx": mx.__version__})
        print(path, os.path.getsize(path))


if __name__ == "__main__":
    main()
