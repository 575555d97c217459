#!/usr/bin/env python3
"""mlx-vlm's image-prompt forward on a converted directory, for tests/verify_vision.rs (CI venv: mlx +
mlx-vlm, no torch).

    python tests/py/mlx_vlm_image.py --model DIR --pixels PX.safetensors --ids 1,2,300,... --out OUT.safetensors [--upcast]

PX holds `pixel_values` (float32 [1, 3, H, W]). The forward is the one mlx-vlm's generate runs:
`model.get_input_embeddings(input_ids, pixel_values, mask=ones)` (the image features are captured where
the model merges them: `_merge_input_ids_with_image_features` / `_prepare_inputs_for_multimodal` /
`prepare_inputs_for_multimodal`), then the language model on those embeddings with the extras
`get_input_embeddings` returns, all positions kept (as fixtures/mlx_forward.py does for text).
--upcast runs in float32 as fixtures/mlx_forward.py --upcast does. --image-sizes H,W passes
`image_sizes=[(H, W)]` to `get_input_embeddings` (Mistral 3 / Pixtral: the image's size before padding).

OUT: `image_features` [T, D], `inputs_embeds` [n, D], `logits` [n, vocab], all float32.
"""

import argparse
import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "fixtures"))
from mlx_forward import _upcast  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--pixels", required=True)
    ap.add_argument("--ids", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--upcast", action="store_true")
    ap.add_argument("--image-sizes", help="H,W of the image (models that take image_sizes)")
    a = ap.parse_args()

    from mlx_vlm.models import cache as cache_mod
    from mlx_vlm.utils import load_model

    model = load_model(Path(a.model))
    if a.upcast:
        _upcast(model)
    captured = {}
    for name, pos in (
        ("_merge_input_ids_with_image_features", 0),
        ("_prepare_inputs_for_multimodal", 0),
        ("prepare_inputs_for_multimodal", 3),
        ("merge_input_ids_with_image_features", 1),
    ):
        fn = getattr(model, name, None)
        if fn is None:
            continue

        def wrap(*args, _fn=fn, _pos=pos, **kw):
            captured["image_features"] = args[_pos]
            return _fn(*args, **kw)

        setattr(model, name, wrap)
        break
    ids = [int(x) for x in a.ids.split(",") if x.strip()]
    input_ids = mx.array([ids], dtype=mx.int32)
    px = mx.load(a.pixels)["pixel_values"]
    lm = model.language_model
    kw = {}
    if a.image_sizes:
        kw["image_sizes"] = [tuple(int(x) for x in a.image_sizes.split(","))]
    emb = model.get_input_embeddings(input_ids, px, mask=mx.ones((1, len(ids)), dtype=mx.int32), **kw)
    # Recorded before the language model runs: Gemma's `h *= scale` rescales the caller's array in place.
    embeds = emb.inputs_embeds[0].astype(mx.float32)
    mx.eval(embeds)
    extras = {k: v for k, v in emb.to_dict().items() if k != "inputs_embeds" and v is not None}
    out = lm(input_ids, inputs_embeds=emb.inputs_embeds, cache=cache_mod.make_prompt_cache(lm), **extras)
    logits = out.logits if hasattr(out, "logits") else out
    feats = captured["image_features"]
    res = {
        "image_features": feats.reshape(-1, feats.shape[-1]).astype(mx.float32),
        "inputs_embeds": embeds,
        "logits": logits[0].astype(mx.float32),
    }
    mx.eval(res)
    mx.save_safetensors(a.out, res, metadata={"format": "mlx"})
    print({k: (v.shape, v.dtype) for k, v in res.items()}, "extras:", list(extras))


if __name__ == "__main__":
    main()
