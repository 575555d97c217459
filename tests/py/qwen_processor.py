#!/usr/bin/env python3
"""transformers' Qwen2-VL image processor (AutoImageProcessor without torch: the PIL/numpy backend) on
image files, for tests/qwen_vision.rs.

    python tests/py/qwen_processor.py --model DIR --out OUT.safetensors [--max-pixels N] IMG [IMG ...]

OUT holds, per image i (each processed alone): `image{i}.pixel_values` (float32 [N, C*T*P*P]) and
`image{i}.grid_thw` (int32 [3]); and for all images in one call: `all.pixel_values`, `all.grid_thw`.
--max-pixels overrides `size.longest_edge` (the processor's `size=` call argument).
"""

import argparse

import numpy as np
from PIL import Image
from safetensors.numpy import save_file
from transformers import AutoImageProcessor


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-pixels", type=int)
    ap.add_argument("images", nargs="+")
    a = ap.parse_args()
    proc = AutoImageProcessor.from_pretrained(a.model)
    kwargs = {}
    if a.max_pixels:
        kwargs["size"] = {"shortest_edge": proc.size["shortest_edge"], "longest_edge": a.max_pixels}
    imgs = []
    for p in a.images:
        img = Image.open(p)
        img.load()
        imgs.append(img)
    out = {}
    for i, img in enumerate(imgs):
        r = proc(images=[img], return_tensors="np", **kwargs)
        out[f"image{i}.pixel_values"] = np.ascontiguousarray(r["pixel_values"], dtype=np.float32)
        out[f"image{i}.grid_thw"] = np.ascontiguousarray(r["image_grid_thw"][0], dtype=np.int32)
    r = proc(images=imgs, return_tensors="np", **kwargs)
    out["all.pixel_values"] = np.ascontiguousarray(r["pixel_values"], dtype=np.float32)
    out["all.grid_thw"] = np.ascontiguousarray(r["image_grid_thw"], dtype=np.int32)
    save_file(out, a.out)


if __name__ == "__main__":
    main()
