#!/usr/bin/env python3
"""The input ids transformers' processor (AutoProcessor) builds for one image and a text prompt, for
tests/verify_prompt.rs. With a chat template: `apply_chat_template([user: image + text],
add_generation_prompt=True, tokenize=True)`; without one (PaliGemma): `processor(text=..., images=...)`.

    python tests/py/processor_ids.py --model DIR --text "Describe the image."     # prints a JSON list
"""

import argparse
import json
import warnings

import numpy as np
from PIL import Image
from transformers import AutoProcessor


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--text", required=True)
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    proc = AutoProcessor.from_pretrained(a.model)
    img = Image.fromarray(np.zeros((72, 96, 3), np.uint8))
    if proc.chat_template:
        msgs = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": a.text}]}]
        out = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="np")
    else:
        out = proc(text=a.text, images=img, return_tensors="np")
    print(json.dumps([int(i) for i in out["input_ids"][0]]))


if __name__ == "__main__":
    main()
