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

It also writes `fixtures/golden/quant/quant_fp_{f32,f16,bf16}.safetensors` for the floating-point modes:
  w.DT                       input matrix [16, 384] (`make_fp_matrix`: E2M1/E4M3 ties, log2 ties of the
                             E8M0 scale, zeros, f16/f32 subnormals, huge values; NaN/inf-free in DT)
  fq.DT.MODE.weight          mx.quantize(w, mode=MODE, stream=mx.cpu)[0]  (U32)
  fq.DT.MODE.scales          ...[1]  (U8)
  fdq.DT.MODE                mx.dequantize(weight, scales, mode=MODE, stream=mx.cpu)  (default: bf16)
  fdq32.DT.MODE / fdq16.DT.MODE   the same with dtype=mx.float32 / mx.float16
for MODE in {mxfp4, nvfp4, mxfp8} (their default bits and group sizes).
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


FP_MODES = ["mxfp4", "nvfp4", "mxfp8"]
FP_ROWS = 16
E2M1_TIES = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]


def make_fp_matrix(rng, dt_name):
    """Edge cases for the fp modes; every 16-column chunk is a group of nvfp4, every 32 of the mx modes."""
    w = np.zeros((FP_ROWS, COLS), dtype=np.float64)
    # Row 0: typical weights.
    w[0] = rng.normal(0.0, 0.02, COLS)
    # Rows 1-2: E2M1 ties. amax = 6 * 2^e exactly (so the mx scale is exactly 2^e and the nvfp4 scale
    # decodes exactly), the other elements at the midpoints between E2M1 values, both signs.
    for r, sign in ((1, 1.0), (2, -1.0)):
        for c in range(0, COLS, 16):
            e = int(rng.integers(-8, 4))
            vals = rng.choice(E2M1_TIES + [0.1, -0.1, 0.0, 4.9, 5.1], size=16) * rng.choice([1, -1], size=16)
            vals[int(rng.integers(16))] = 6.0 * sign
            w[r, c : c + 16] = vals * 2.0**e
    # Row 3: E4M3 ties for mxfp8: amax = 448 * 2^e, others at the midpoints of neighbouring E4M3 values.
    for c in range(0, COLS, 32):
        e = int(rng.integers(-10, 6))
        exps = rng.integers(-9, 8, size=32)
        mant = rng.integers(0, 8, size=32)
        vals = (1.0 + (mant + 0.5) / 8.0) * 2.0**exps.astype(np.float64)
        vals[:4] = [2.0**-10, 3 * 2.0**-10, 2.0**-7 * 1.0625, 460.0]  # subnormal ties, a normal tie, saturation
        vals *= rng.choice([1, -1], size=32)
        vals[int(rng.integers(4, 32))] = 448.0
        w[3, c : c + 32] = vals * 2.0**e
    # Row 4: zeros: a whole zero group, a group with one nonzero, groups of -0 and tiny negatives.
    w[4, 32:64] = 0.0
    w[4, 64 + 5] = 1e-3
    w[4, 96:128] = -0.0
    w[4, 128:160] = -rng.uniform(0, 1e-3, 32)
    w[4, 160:] = rng.normal(0, 1, COLS - 160)
    # Row 5: amax / 6 next to sqrt(2) * 2^n, where log2 is close to a .5 tie of the E8M0 rounding.
    for c in range(0, COLS, 16):
        n = int(rng.integers(-20, 10))
        amax = 6.0 * np.sqrt(2.0) * 2.0**n * (1.0 + rng.choice([-1, 1]) * 10.0 ** rng.uniform(-8, -2))
        vals = rng.uniform(-amax, amax, 16)
        vals[int(rng.integers(16))] = amax * rng.choice([1, -1])
        w[5, c : c + 16] = vals
    # Row 6: f16 subnormals (2^-24 .. 2^-14) and amax / 6 below f16's range.
    w[6] = rng.normal(0, 2e-6, COLS)
    w[6, ::7] = 2.0**-24 * rng.integers(1, 8, len(w[6, ::7]))
    # Row 7: f32/bf16 subnormals (scale bytes wrap), then f32 values around 1e-38.
    w[7, :128] = rng.normal(0, 1e-40, 128)
    w[7, 128:256] = rng.normal(0, 1e-38, 128)
    w[7, 256:] = rng.normal(0, 1e-30, 128)
    # Row 8: huge values (clipped to each dtype's range below), mixed with small ones.
    w[8] = rng.normal(0, 1e30, COLS)
    w[8, ::3] = rng.normal(0, 1.0, len(w[8, ::3]))
    w[8, 200] = 3.3e38
    # Row 9: f16-large values.
    w[9] = rng.normal(0, 2e4, COLS)
    w[9, 10] = 65504.0
    # Row 10: amax / maxval just above (or at) a power of two: the E8M0 exponent is an exact ceiling.
    for c in range(0, COLS, 16):
        maxval = 6.0 if (c // 16) % 2 == 0 else 448.0
        m = int(rng.choice([5, 7, 8, 10, 11, 20, 23]))
        amax = maxval * 2.0 ** int(rng.integers(-30, 10)) * (1.0 + 2.0**-m)
        vals = rng.uniform(-amax, amax, 16)
        vals[int(rng.integers(16))] = amax
        w[10, c : c + 16] = vals
    # Row 11: nvfp4 with a saturated scale (448): elements of 2^23 .. 2^30 times it, where the f32
    # distances to the E2M1 table round to equal values.
    for c in range(0, COLS, 16):
        vals = 448.0 * 2.0 ** rng.uniform(20, 31, 16) * rng.choice([1, -1], 16)
        vals[int(rng.integers(16))] = 448.0 * 6.0 * 1000.0
        w[11, c : c + 16] = vals
    # Rows 12-15: weights of many magnitudes, with outliers.
    for r in range(12, FP_ROWS):
        for c in range(0, COLS, 16):
            w[r, c : c + 16] = rng.normal(rng.normal(0, 1), np.exp(rng.uniform(-12, 6)), 16)
        w[r, int(rng.integers(COLS))] *= 50
    limit = {"f32": 3.4e38, "bf16": 3.38e38, "f16": 65504.0}[dt_name]
    return np.clip(w, -limit, limit).astype(np.float32)


def fp_goldens(out_dir):
    for name, dt in DTYPES.items():
        rng = np.random.default_rng(20250101)
        w = mx.array(make_fp_matrix(rng, name)).astype(dt, stream=mx.cpu)
        assert not mx.any(mx.isnan(w) | mx.isinf(w)).item(), name
        tensors = {f"w.{name}": w}
        for mode in FP_MODES:
            q, sc = mx.quantize(w, mode=mode, stream=mx.cpu)
            key = f"{name}.{mode}"
            tensors[f"fq.{key}.weight"] = q
            tensors[f"fq.{key}.scales"] = sc
            tensors[f"fdq.{key}"] = mx.dequantize(q, sc, mode=mode, stream=mx.cpu)
            tensors[f"fdq32.{key}"] = mx.dequantize(q, sc, mode=mode, dtype=mx.float32, stream=mx.cpu)
            tensors[f"fdq16.{key}"] = mx.dequantize(q, sc, mode=mode, dtype=mx.float16, stream=mx.cpu)
        mx.eval(tensors)
        path = os.path.join(out_dir, f"quant_fp_{name}.safetensors")
        mx.save_safetensors(path, tensors, metadata={"generator": "scripts/golden_quant.py", "mlx": mx.__version__})
        print(path, os.path.getsize(path))


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
    fp_goldens(out_dir)


if __name__ == "__main__":
    main()
