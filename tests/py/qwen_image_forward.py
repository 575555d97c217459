#!/usr/bin/env python3
"""mlx-vlm's image-prompt forward of a Qwen2-VL-family model on a converted directory, for
tests/qwen_vision.rs (CI venv: mlx + mlx-vlm, no torch).

    python tests/py/qwen_image_forward.py --model DIR --inputs IN.safetensors --out OUT.safetensors [--upcast]

IN holds `input_ids` (int32 [n]), `pixel_values` (float32 [N, C*T*P*P]) and `grid_thw` (int32 [k, 3]).
The forward is the one mlx-vlm's generate runs on a prompt: `model.get_input_embeddings(input_ids,
pixel_values, image_grid_thw=grid, mask=ones)` (vision tower, features merged at the image tokens,
M-RoPE positions from `get_rope_index`), then the language model on those embeddings with the extras
it returns, all positions kept (as fixtures/mlx_forward.py does for text). --upcast runs in float32.

OUT: `logits` [n, vocab], `inputs_embeds` [n, D] (float32), `position_ids` (int32 [3, n]).
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
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--upcast", action="store_true")
    a = ap.parse_args()

    from mlx_vlm.models import cache as cache_mod
    from mlx_vlm.utils import load_model

    model = load_model(Path(a.model))
    if a.upcast:
        _upcast(model)
    inp = mx.load(a.inputs)
    ids = inp["input_ids"]
    input_ids = ids.reshape(1, -1).astype(mx.int32)
    lm = model.language_model
    for attr in ("_position_ids", "_rope_deltas"):
        if hasattr(lm, attr):
            setattr(lm, attr, None)
    emb = model.get_input_embeddings(
        input_ids,
        inp["pixel_values"],
        image_grid_thw=inp["grid_thw"],
        mask=mx.ones(input_ids.shape, dtype=mx.int32),
    )
    embeds = emb.inputs_embeds[0].astype(mx.float32)
    mx.eval(embeds)
    extras = {k: v for k, v in emb.to_dict().items() if k != "inputs_embeds" and v is not None}
    out = lm(input_ids, inputs_embeds=emb.inputs_embeds, cache=cache_mod.make_prompt_cache(lm), **extras)
    logits = out.logits if hasattr(out, "logits") else out
    res = {
        "logits": logits[0].astype(mx.float32),
        "inputs_embeds": embeds,
        "position_ids": extras["position_ids"][:, 0, :].astype(mx.int32),
    }
    mx.eval(res)
    mx.save_safetensors(a.out, res, metadata={"format": "mlx"})


if __name__ == "__main__":
    main()
