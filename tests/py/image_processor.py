#!/usr/bin/env python3
"""transformers' image processor (AutoImageProcessor, as it runs without torch: the PIL/numpy backend) on
one image file, for tests/image_preprocess.rs.

    python tests/py/image_processor.py --model DIR --image FILE --out OUT.safetensors

OUT holds `pixel_values` (float32, [1, 3, H, W]) and `rgb` (uint8, [h, w, 3]: the image as PIL decodes
it, after transformers' RGB conversion), so a test can tell decoding differences from preprocessing ones.
"""

import argparse

import numpy as np
from PIL import Image
from safetensors.numpy import save_file
from transformers import AutoImageProcessor
from transformers.image_transforms import convert_to_rgb


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    proc = AutoImageProcessor.from_pretrained(a.model)
    img = Image.open(a.image)
    img.load()
    px = proc(images=img, return_tensors="np")["pixel_values"]
    rgb = np.ascontiguousarray(convert_to_rgb(img, return_numpy=True))
    save_file({"pixel_values": np.ascontiguousarray(px, dtype=np.float32), "rgb": rgb}, a.out)
    print(type(proc).__name__, px.shape)


if __name__ == "__main__":
    main()
