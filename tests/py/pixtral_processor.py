#!/usr/bin/env python3
"""transformers' PixtralProcessor (Mistral 3) on one image and a text, for tests/vision_pixtral.rs, in the
CI venv (no torch).

    python tests/py/pixtral_processor.py --model DIR --image FILE --text "Describe the image." --out OUT.safetensors

transformers 5 marks PixtralProcessor as needing torch and torchvision, and its module imports the
torchvision image processor's module only for `get_resize_output_image_size`. Here that module is
replaced by the PIL processor's module (which defines the same function), and the processor class is
imported from its own module, so the processor's own code (its image token expansion, `patch_size *
spatial_merge_size` handed to the image processor) runs over `PixtralImageProcessorPil`, the image
processor `AutoImageProcessor` picks without torchvision.

OUT: `pixel_values` (float32 [1, 3, H, W]), `image_sizes` (int64 [1, 2]), `input_ids` (int64 [n]), `rgb`
(uint8 [h, w, 3], the image as PIL decodes it after transformers' RGB conversion).
"""

import argparse
import json
import sys
import types
import warnings
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors.numpy import save_file


def processor(model: str):
    from transformers.models.pixtral import image_processing_pil_pixtral as pil

    name = "transformers.models.pixtral.image_processing_pixtral"
    stub = types.ModuleType(name)
    stub.get_resize_output_image_size = pil.get_resize_output_image_size
    sys.modules[name] = stub
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.models.pixtral.processing_pixtral import PixtralProcessor

    kwargs = {}
    pc = Path(model, "processor_config.json")
    if pc.exists():
        cfg = json.loads(pc.read_text())
        for k in ("patch_size", "spatial_merge_size", "image_token", "image_break_token", "image_end_token"):
            if k in cfg:
                kwargs[k] = cfg[k]
    template = None
    if Path(model, "chat_template.jinja").exists():
        template = Path(model, "chat_template.jinja").read_text()
    elif Path(model, "chat_template.json").exists():
        template = json.loads(Path(model, "chat_template.json").read_text())["chat_template"]
    return PixtralProcessor(
        image_processor=AutoImageProcessor.from_pretrained(model),
        tokenizer=AutoTokenizer.from_pretrained(model),
        chat_template=template,
        **kwargs,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    from transformers.image_transforms import convert_to_rgb

    proc = processor(a.model)
    img = Image.open(a.image)
    img.load()
    msgs = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": a.text}]}]
    out = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                   return_tensors="np")
    rgb = np.ascontiguousarray(convert_to_rgb(img, return_numpy=True))
    save_file({
        "pixel_values": np.ascontiguousarray(out["pixel_values"], dtype=np.float32),
        "image_sizes": np.asarray(out["image_sizes"], dtype=np.int64).reshape(-1, 2),
        "input_ids": np.asarray(out["input_ids"][0], dtype=np.int64),
        "rgb": rgb,
    }, a.out)
    print(type(proc.image_processor).__name__, out["pixel_values"].shape, list(out["image_sizes"][0]))


if __name__ == "__main__":
    main()
