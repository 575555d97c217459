#!/usr/bin/env python3
"""mlx-vlm's Qwen vision tower (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) on a converted MLX directory, for the
Rust tests of `vlm_convert::verify::QwenVision` (tests/qwen_vision.rs).

    python tests/py/qwen_vision.py --model OUT_DIR --out cases.safetensors

Builds a few inputs with the checkpoint's own transformers image processor (Qwen2VLImageProcessor, the
PIL/numpy one: no torch) from synthetic images, plus one random two-frame grid, then runs
`model.vision_tower(pixel_values.astype(patch_embed dtype), grid_thw)` exactly as the model's
`get_input_embeddings` does, once as loaded (native) and once with every parameter upcast to float32
(fixtures/mlx_forward.py --upcast).

Output tensors, per case i:
  case{i}.pixel_values      float32 [N, C*T*P*P]
  case{i}.grid_thw          int32   [images, 3]
  case{i}.features          float32 [N / merge^2, out]       (native forward, cast to float32)
  case{i}.features.f32      float32                          (upcast forward)
  case{i}.deepstack.{j}     float32 (Qwen3-VL: deepstack merger j, native), and `.f32`
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "fixtures"))


def synthetic(h: int, w: int, seed: int):
    """A deterministic RGB image: gradients plus a few blocks of colour (no randomness in the pixels'
    layout beyond the seed, so the resize sees edges)."""
    from PIL import Image

    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)), ((x + y) * 7 + seed * 40) % 256], -1)
    rng = np.random.default_rng(seed)
    for _ in range(4):
        y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
        img[y0 : y0 + h // 4, x0 : x0 + w // 4] = rng.integers(0, 256, 3)
    return Image.fromarray(img.astype(np.uint8))


def cases(model_dir: Path):
    from transformers import AutoImageProcessor

    proc = AutoImageProcessor.from_pretrained(str(model_dir))
    patch = proc.patch_size * proc.patch_size * proc.temporal_patch_size * 3
    out = []
    # 1. one small image, the checkpoint's own settings
    r = proc(images=[synthetic(40, 56, 1)], return_tensors="np")
    out.append((r["pixel_values"], r["image_grid_thw"]))
    # 2. two images of different sizes, a larger pixel budget: grids large enough for several
    #    Qwen2.5-VL attention windows (with padding) and fractional Qwen3-VL position interpolation
    big = {"shortest_edge": 1024, "longest_edge": 160 * 160}
    r = proc(images=[synthetic(150, 230, 2), synthetic(90, 70, 3)], size=big, return_tensors="np")
    out.append((r["pixel_values"], r["image_grid_thw"]))
    # 3. a two-frame grid (video-like), random values
    m = proc.merge_size
    grid = np.array([[2, 2 * m, 3 * m]])
    n = int(grid.prod())
    pv = np.random.default_rng(7).standard_normal((n, patch)).astype(np.float32)
    out.append((pv, grid))
    return out


def run_tower(model, pv, grid):
    import mlx.core as mx

    vt = model.vision_tower
    dtype = vt.patch_embed.proj.weight.dtype
    res = vt(mx.array(pv).astype(dtype), mx.array(grid.astype(np.int32)))
    if isinstance(res, tuple):
        feats, deep = res[0], list(res[1])
    else:
        feats, deep = res, []
    feats = feats.astype(mx.float32)
    deep = [d.astype(mx.float32) for d in deep]
    mx.eval(feats, *deep)
    return feats, deep


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import mlx.core as mx
    from mlx_vlm.utils import load_model

    from mlx_forward import _upcast

    model_dir = Path(args.model)
    inputs = cases(model_dir)
    tensors = {}
    for i, (pv, grid) in enumerate(inputs):
        tensors[f"case{i}.pixel_values"] = mx.array(pv.astype(np.float32))
        tensors[f"case{i}.grid_thw"] = mx.array(grid.astype(np.int32))
    for suffix, upcast in (("", False), (".f32", True)):
        model = load_model(model_dir)
        if upcast:
            _upcast(model)
        for i, (pv, grid) in enumerate(inputs):
            feats, deep = run_tower(model, pv, grid)
            tensors[f"case{i}.features{suffix}"] = feats
            for j, d in enumerate(deep):
                tensors[f"case{i}.deepstack.{j}{suffix}"] = d
    mx.save_safetensors(args.out, tensors, metadata={"format": "mlx"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
