#!/usr/bin/env python3
"""Load converted MLX model directories with mlx-vlm (`mlx_vlm.utils.load_model`, strict) and greedily
generate a few tokens from fixed token ids, the way mlx-vlm's text-only generate runs the language
model (see fixtures/mlx_forward.py). Prints JSON {dir: {"tokens": [...], "finite": bool} or
{"error": "..."}}.

    python tests/py/generate.py --ids 1,2,3 --steps 4 DIR [DIR ...]
"""

import argparse
import json
import math
from pathlib import Path


def generate(model_dir, ids, steps):
    import mlx.core as mx
    from mlx_vlm.models import cache as cache_mod
    from mlx_vlm.utils import load_model

    model = load_model(Path(model_dir))
    lm = model.language_model
    out, finite = [], True
    for _ in range(steps):
        for attr in ("_position_ids", "_rope_deltas"):
            if hasattr(lm, attr):
                setattr(lm, attr, None)
        x = mx.array([ids + out], dtype=mx.int32)
        emb = model.get_input_embeddings(x, None, mask=None)
        extras = {k: v for k, v in emb.to_dict().items() if k != "inputs_embeds" and v is not None}
        res = lm(x, inputs_embeds=emb.inputs_embeds, cache=cache_mod.make_prompt_cache(lm), **extras)
        logits = (res.logits if hasattr(res, "logits") else res)[0, -1].astype(mx.float32)
        finite = finite and bool(mx.all(mx.isfinite(logits)).item())
        out.append(int(mx.argmax(logits).item()))
    return {"tokens": out, "finite": finite}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ids", required=True)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("dirs", nargs="+")
    a = ap.parse_args()
    ids = [int(i) for i in a.ids.split(",")]
    res = {}
    for d in a.dirs:
        try:
            res[d] = generate(d, ids, a.steps)
        except Exception as e:  # reported per directory
            res[d] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    print(json.dumps(res))


if __name__ == "__main__":
    main()
