#!/usr/bin/env python3
"""Any-res (LLaVA-NeXT, LLaVA-OneVision) references for tests/vision_anyres.rs, in the CI venv (mlx, mlx-vlm,
transformers without torch).

    python tests/py/anyres_mlx_vlm.py processor --model DIR --image FILE --text TEXT --out OUT.safetensors
    python tests/py/anyres_mlx_vlm.py forward --model DIR --pixels PX.safetensors --image-size H,W \
        --ids 1,2,300,... --out OUT.safetensors [--upcast]

processor: transformers' processor (PIL image processor; the video processor, which needs torchvision, left
out as tests/py/processor_ids.py does) on one image and a user text through the chat template. OUT:
`pixel_values` F32 [tiles, 3, H, W], `image_sizes` I64 [2], `input_ids` I64 [n].

forward: mlx-vlm's forward of a converted directory on PX's `pixel_values` [tiles, 3, H, W] and the ids.
- llava_onevision: the model's own `get_input_embeddings` (pixel values [1, tiles, ...], `image_sizes`); the
  image features are captured where `_scatter_features` merges them.
- llava_next: mlx-vlm 0.7.10's `get_input_embeddings` does not pack the tiles (it inserts one whole tile per
  image token, so the embeddings no longer line up with the processor's ids). The reference is therefore
  mlx-vlm's own pieces put together as transformers' LLaVA-NeXT does: its CLIP tower and projector on all
  tiles, `pack_image_features` of mlx-vlm's OneVision (unpad, `image_newline` per row, base tile first) with
  the downsampling off (LLaVA-NeXT has none), OneVision's `_scatter_features`, its language model.
OUT: `image_features` [T, D], `inputs_embeds` [n, D], `logits` [n, vocab], all F32. --upcast runs in float32
as fixtures/mlx_forward.py --upcast does.
"""

import argparse
import json
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[2]


def without_video(model: str):
    """The checkpoint's processor class without its video processor (LLaVA-OneVision's needs torchvision),
    with processor_config.json's settings (`num_image_tokens`, `vision_feature_select_strategy`, ...: the
    image-token count depends on them)."""

    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.processing_utils import ProcessorMixin

    pre = json.loads(Path(model, "preprocessor_config.json").read_text())
    cls = getattr(transformers, pre["processor_class"])
    kwargs = {}
    pc = Path(model, "processor_config.json")
    if pc.exists():
        kwargs = {k: v for k, v in json.loads(pc.read_text()).items() if k != "processor_class"}
    ct = Path(model, "chat_template.json")
    if ct.exists():
        kwargs["chat_template"] = json.loads(ct.read_text())["chat_template"]
    ProcessorMixin.check_argument_for_proper_class = lambda self, name, arg: arg
    return cls(image_processor=AutoImageProcessor.from_pretrained(model), tokenizer=AutoTokenizer.from_pretrained(model),
               video_processor=None, **kwargs)


def processor(a) -> None:
    import numpy as np
    from PIL import Image
    from safetensors.numpy import save_file
    from transformers import AutoProcessor

    warnings.filterwarnings("ignore")
    try:
        proc = AutoProcessor.from_pretrained(a.model)
    except ImportError:
        proc = without_video(a.model)
    img = Image.open(a.image)
    img.load()
    msgs = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": a.text}]}]
    out = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                   return_tensors="np")
    px = np.asarray(out["pixel_values"], dtype=np.float32)[0]
    save_file({
        "pixel_values": np.ascontiguousarray(px),
        "image_sizes": np.asarray(out["image_sizes"], dtype=np.int64).reshape(-1)[:2].copy(),
        "input_ids": np.asarray(out["input_ids"], dtype=np.int64)[0].copy(),
    }, a.out)
    print(type(proc.image_processor).__name__, px.shape, list(out["image_sizes"][0]))


def forward(a) -> None:
    import mlx.core as mx

    sys.path.insert(0, str(ROOT / "fixtures"))
    from mlx_forward import _upcast
    from mlx_vlm.models import cache as cache_mod
    from mlx_vlm.models.llava_onevision.llava_onevision import Model as OneVision
    from mlx_vlm.utils import load_model

    model = load_model(Path(a.model))
    if a.upcast:
        _upcast(model)
    ids = [int(x) for x in a.ids.split(",") if x.strip()]
    input_ids = mx.array([ids], dtype=mx.int32)
    px = mx.load(a.pixels)["pixel_values"]
    size = [int(x) for x in a.image_size.split(",")]
    cfg = model.config
    captured = {}
    if cfg.model_type == "llava_onevision":
        fn = model._scatter_features

        def wrap(*args, **kw):
            captured["image_features"] = args[2]
            return fn(*args, **kw)

        model._scatter_features = wrap
        embeds = model.get_input_embeddings(input_ids, px[None], image_sizes=mx.array([size])).inputs_embeds
    elif cfg.model_type == "llava_next":
        *_, states = model.vision_tower(px.transpose(0, 2, 3, 1), output_hidden_states=True)
        sel = states[cfg.vision_feature_layer]
        if cfg.vision_feature_select_strategy == "default":
            sel = sel[:, 1:]
        feats = model.multi_modal_projector(sel)
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size
        # mlx-vlm's LLaVA-NeXT config does not keep the pinpoints: read them from config.json.
        pinpoints = json.loads(Path(a.model, "config.json").read_text())["image_grid_pinpoints"]
        stand_in = SimpleNamespace(
            config=SimpleNamespace(image_grid_pinpoints=pinpoints, vision_config=cfg.vision_config),
            patches_per_side=side,
            max_num_patches=10**9,
            image_newline=model.image_newline,
        )
        packed = OneVision.pack_image_features(stand_in, [feats], [size])[0]
        captured["image_features"] = packed
        tok = model.language_model.model.embed_tokens(input_ids)
        embeds = OneVision._scatter_features(None, tok, input_ids, packed, cfg.image_token_index, "Image")
    else:
        raise SystemExit(f"not an any-res model: {cfg.model_type}")
    lm = model.language_model
    flat = embeds[0].astype(mx.float32)
    mx.eval(flat)
    out = lm(input_ids, inputs_embeds=embeds, cache=cache_mod.make_prompt_cache(lm))
    logits = out.logits if hasattr(out, "logits") else out
    feats = captured["image_features"]
    res = {
        "image_features": feats.reshape(-1, feats.shape[-1]).astype(mx.float32),
        "inputs_embeds": flat,
        "logits": logits[0].astype(mx.float32),
    }
    mx.eval(res)
    mx.save_safetensors(a.out, res, metadata={"format": "mlx"})
    print({k: (v.shape, v.dtype) for k, v in res.items()})


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("processor")
    p.add_argument("--model", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--text", required=True)
    p.add_argument("--out", required=True)
    f = sub.add_parser("forward")
    f.add_argument("--model", required=True)
    f.add_argument("--pixels", required=True)
    f.add_argument("--image-size", required=True)
    f.add_argument("--ids", required=True)
    f.add_argument("--out", required=True)
    f.add_argument("--upcast", action="store_true")
    a = ap.parse_args()
    processor(a) if a.cmd == "processor" else forward(a)


if __name__ == "__main__":
    main()
