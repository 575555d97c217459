#!/usr/bin/env python3
"""The input ids transformers' processor (AutoProcessor) builds for one image and a text prompt, for
tests/verify_prompt.rs. With a chat template: `apply_chat_template([user: image + text],
add_generation_prompt=True, tokenize=True)`; without one (PaliGemma): `processor(text=..., images=...)`.

    python tests/py/processor_ids.py --model DIR --text "Describe the image."     # prints a JSON list
"""

import argparse
import json
import warnings
from pathlib import Path

import numpy as np
from PIL import Image
from transformers import AutoProcessor


def without_video(model: str):
    """The processor without its video processor. Qwen-VL processors carry one that needs torchvision
    (absent from the CI venv); image prompts never use it. The processor class (and so its own image
    token expansion) is the checkpoint's; only the constructor's type check of the missing part is
    bypassed."""
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.processing_utils import ProcessorMixin

    pre = json.loads(Path(model, "preprocessor_config.json").read_text())
    cls = getattr(transformers, pre["processor_class"])
    template = None
    ct = Path(model, "chat_template.json")
    if ct.exists():
        template = json.loads(ct.read_text())["chat_template"]
    elif Path(model, "chat_template.jinja").exists():
        template = Path(model, "chat_template.jinja").read_text()
    ProcessorMixin.check_argument_for_proper_class = lambda self, name, arg: arg
    return cls(
        image_processor=AutoImageProcessor.from_pretrained(model),
        tokenizer=AutoTokenizer.from_pretrained(model),
        video_processor=None,
        chat_template=template,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--text", required=True)
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    try:
        proc = AutoProcessor.from_pretrained(a.model)
    except ImportError:
        proc = without_video(a.model)
    img = Image.fromarray(np.zeros((72, 96, 3), np.uint8))
    if proc.chat_template:
        msgs = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": a.text}]}]
        out = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="np")
    else:
        out = proc(text=a.text, images=img, return_tensors="np")
    print(json.dumps([int(i) for i in out["input_ids"][0]]))


if __name__ == "__main__":
    main()
