#!/usr/bin/env python3
"""transformers' Idefics3 / SmolVLM processor (PIL image processor, no torch) on one image and a text,
for tests/vision_idefics.rs: the chat-template prompt ids with the image expanded into its tiles, and
the processor's pixel values.

    python tests/py/idefics_processor.py --model DIR --image FILE --text "Describe the image." --out OUT.safetensors

OUT holds `input_ids` (int64 [n]), `pixel_values` (float32 [1, tiles, 3, H, W]) and
`pixel_attention_mask` (int64 [1, tiles, H, W]); the ids are also printed as a JSON list.

SmolVLM's processor refuses to start without `num2words` (used only to spell video frame counts) and
wants a video processor (torchvision, absent from the CI venv); image prompts use neither, so the
processor is built with a stand-in for both. Its image-token expansion is the class's own.
"""

import argparse
import json
import types
import warnings
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors.numpy import save_file


def processor(model: str):
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.models.smolvlm import processing_smolvlm
    from transformers.processing_utils import ProcessorMixin

    pre = json.loads(Path(model, "preprocessor_config.json").read_text())
    cls = getattr(transformers, pre["processor_class"])
    extra = json.loads(Path(model, "processor_config.json").read_text())
    template = json.loads(Path(model, "chat_template.json").read_text())["chat_template"]
    kw = {"image_seq_len": extra.get("image_seq_len", 169), "chat_template": template}
    if cls.__name__ == "SmolVLMProcessor":
        processing_smolvlm.num2words = lambda n: str(n)
        ProcessorMixin.check_argument_for_proper_class = lambda self, name, arg: arg
        kw["video_processor"] = types.SimpleNamespace(num_frames=None, fps=None)
    return cls(
        image_processor=AutoImageProcessor.from_pretrained(model),
        tokenizer=AutoTokenizer.from_pretrained(model),
        **kw,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    proc = processor(a.model)
    img = Image.open(a.image)
    img.load()
    msgs = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": a.text}]}]
    out = proc.apply_chat_template(
        msgs, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="np"
    )
    ids = [int(i) for i in out["input_ids"][0]]
    save_file(
        {
            "input_ids": np.array(ids, dtype=np.int64),
            "pixel_values": np.ascontiguousarray(out["pixel_values"], dtype=np.float32),
            "pixel_attention_mask": np.ascontiguousarray(out["pixel_attention_mask"], dtype=np.int64),
        },
        a.out,
    )
    print(type(proc.image_processor).__name__, out["pixel_values"].shape)
    print(json.dumps(ids))


if __name__ == "__main__":
    main()
