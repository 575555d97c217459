#!/usr/bin/env python3
"""Golden values for the MLX binding (`src/mlx/`, tested by `tests/mlx_binding.rs`).

Rerun (from the crate root; needs mlx 0.32.4 with the CPU backend, numpy):

    /work/venvs/mlx/bin/python scripts/golden_mlx_ops.py

It rewrites `fixtures/golden/mlx_ops/mlx_ops.safetensors`: small fixed inputs and what Python MLX computes
from them on the CPU stream. Deterministic (fixed seed), so a rerun with the same MLX gives identical
bytes. The Rust test feeds the stored inputs through the binding and compares outputs byte for byte.

Keys (`in.*` are inputs, everything else an output; shapes are in the file):
  in.w.bf16 [8, 128], in.x.bf16 [3, 128]
  q.bB.weight / q.bB.scales / q.bB.biases   mx.quantize(w, group_size=64, bits=B) for B in 4, 8
  dq.bB                                     mx.dequantize(...) (bf16)
  dq32.bB                                   mx.dequantize(..., dtype=mx.float32)
  qmm.bB                                    mx.quantized_matmul(x, *q.bB, transpose=True, group_size=64, bits=B)
  in.n.DT [2, 3, 64], in.nw.DT [64], in.nb.DT [64]  for DT in f32, bf16
  rms.DT                                    mx.fast.rms_norm(n, nw, 1e-5)
  ln.DT                                     mx.fast.layer_norm(n, nw, nb, 1e-5)
  in.r.DT [1, 2, 5, 16], in.freqs [8]
  rope.DT / rope_trad.DT / rope_half.DT / rope_freqs.DT   see ROPE below
  in.q.DT [1, 4, 5, 16], in.k.DT / in.v.DT [1, 2, 5, 16], in.mask [5, 5] (additive, f32), in.q2.DT [1, 4, 2, 16]
  sdpa.DT / sdpa_causal.DT / sdpa_mask.DT / sdpa_causal_short.DT
  in.a.DT [4, 16]
  gelu.DT / gelu_approx.DT / silu.DT        mlx.nn.gelu / gelu_approx / silu (compiled functions)
  softmax.DT / softmax_precise.DT / log_softmax.DT   over the last axis
"""

import os

import mlx.core as mx
import mlx.nn as nn
import numpy as np

OUT = os.path.join(os.path.dirname(__file__), "..", "fixtures", "golden", "mlx_ops", "mlx_ops.safetensors")
DTYPES = {"f32": mx.float32, "bf16": mx.bfloat16}
GROUP = 64

# (key suffix, dims, traditional, base, scale, offset, with freqs)
ROPE = [
    ("rope", 16, False, 10000.0, 1.0, 3, False),
    ("rope_trad", 16, True, 10000.0, 1.0, 0, False),
    ("rope_half", 8, False, 500000.0, 0.5, 7, False),
    ("rope_freqs", 16, False, None, 1.0, 2, True),
]


def main():
    mx.set_default_device(mx.cpu)
    rng = np.random.default_rng(20260614)
    out = {}

    def normal(shape, std=1.0):
        return rng.normal(0.0, std, shape).astype(np.float32)

    # Quantization (bf16 weights, as converted checkpoints have them).
    w32 = normal((8, 128), 0.05)
    w32[1, :64] = 0.0  # an all-zero group
    w32[2] = np.round(rng.uniform(-1, 1, 128) * 8) / 8  # half-level ties
    w = mx.array(w32).astype(mx.bfloat16)
    x = mx.array(normal((3, 128))).astype(mx.bfloat16)
    out["in.w.bf16"] = w
    out["in.x.bf16"] = x
    for bits in (4, 8):
        qw, qs, qb = mx.quantize(w, group_size=GROUP, bits=bits, stream=mx.cpu)
        out[f"q.b{bits}.weight"] = qw
        out[f"q.b{bits}.scales"] = qs
        out[f"q.b{bits}.biases"] = qb
        out[f"dq.b{bits}"] = mx.dequantize(qw, qs, qb, group_size=GROUP, bits=bits, stream=mx.cpu)
        out[f"dq32.b{bits}"] = mx.dequantize(
            qw, qs, qb, group_size=GROUP, bits=bits, dtype=mx.float32, stream=mx.cpu
        )
        out[f"qmm.b{bits}"] = mx.quantized_matmul(
            x, qw, qs, qb, transpose=True, group_size=GROUP, bits=bits, stream=mx.cpu
        )

    n32, nw32, nb32 = normal((2, 3, 64), 2.0), 1.0 + normal((64,), 0.1), normal((64,), 0.1)
    r32 = normal((1, 2, 5, 16))
    freqs = mx.array((1.0 / (10000.0 ** (np.arange(0, 16, 2) / 16.0)) * 0.25).astype(np.float32))
    out["in.freqs"] = freqs
    q32, k32, v32 = normal((1, 4, 5, 16)), normal((1, 2, 5, 16)), normal((1, 2, 5, 16))
    q2_32 = normal((1, 4, 2, 16))
    mask = mx.array(np.where(rng.uniform(size=(5, 5)) < 0.3, -1e9, normal((5, 5), 0.5)).astype(np.float32))
    out["in.mask"] = mask
    a32 = normal((4, 16), 3.0)

    for name, dt in DTYPES.items():
        n, nw, nb = (mx.array(v).astype(dt) for v in (n32, nw32, nb32))
        out[f"in.n.{name}"], out[f"in.nw.{name}"], out[f"in.nb.{name}"] = n, nw, nb
        out[f"rms.{name}"] = mx.fast.rms_norm(n, nw, 1e-5)
        out[f"ln.{name}"] = mx.fast.layer_norm(n, nw, nb, 1e-5)

        r = mx.array(r32).astype(dt)
        out[f"in.r.{name}"] = r
        for key, dims, trad, base, scale, offset, with_freqs in ROPE:
            out[f"{key}.{name}"] = mx.fast.rope(
                r,
                dims,
                traditional=trad,
                base=base,
                scale=scale,
                offset=offset,
                freqs=freqs if with_freqs else None,
            )

        q, k, v, q2 = (mx.array(t).astype(dt) for t in (q32, k32, v32, q2_32))
        out[f"in.q.{name}"], out[f"in.k.{name}"], out[f"in.v.{name}"], out[f"in.q2.{name}"] = q, k, v, q2
        sdpa = mx.fast.scaled_dot_product_attention
        out[f"sdpa.{name}"] = sdpa(q, k, v, scale=0.25)
        out[f"sdpa_causal.{name}"] = sdpa(q, k, v, scale=0.25, mask="causal")
        out[f"sdpa_mask.{name}"] = sdpa(q, k, v, scale=0.25, mask=mask.astype(dt))
        out[f"sdpa_causal_short.{name}"] = sdpa(q2, k, v, scale=0.25, mask="causal")

        a = mx.array(a32).astype(dt)
        out[f"in.a.{name}"] = a
        out[f"gelu.{name}"] = nn.gelu(a)
        out[f"gelu_approx.{name}"] = nn.gelu_approx(a)
        out[f"silu.{name}"] = nn.silu(a)
        out[f"softmax.{name}"] = mx.softmax(a, axis=-1)
        out[f"softmax_precise.{name}"] = mx.softmax(a, axis=-1, precise=True)
        out[f"log_softmax.{name}"] = nn.log_softmax(a, axis=-1)

    mx.eval(out)
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    mx.save_safetensors(OUT, out, metadata={"generator": "scripts/golden_mlx_ops.py", "mlx": mx.__version__})
    print(f"wrote {len(out)} tensors to {os.path.normpath(OUT)}")


if __name__ == "__main__":
    main()
