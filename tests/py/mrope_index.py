#!/usr/bin/env python3
"""mlx-vlm's M-RoPE positions (`LanguageModel.get_rope_index`) for Qwen2-VL, Qwen2.5-VL and Qwen3-VL
prompts holding images, for tests/qwen_vision.rs.

    echo '{"cases": [{"ids": [...], "grids": [[1, 4, 8]]}], "merge": 2, "image_token_id": 297,
           "video_token_id": 298, "vision_start_token_id": 294}' | python tests/py/mrope_index.py

Prints JSON {"<arch>": [{"positions": [3][n] lists, "delta": rope delta} per case], ...}. The method only reads
`self.config`, so it runs on a stand-in object: no model is loaded.
"""

import json
import sys
from types import SimpleNamespace


def main() -> int:
    import mlx.core as mx
    from mlx_vlm.models.qwen2_5_vl import language as qwen2_5_vl
    from mlx_vlm.models.qwen2_vl import language as qwen2_vl
    from mlx_vlm.models.qwen3_vl import language as qwen3_vl

    req = json.load(sys.stdin)
    config = SimpleNamespace(
        vision_config=SimpleNamespace(spatial_merge_size=req["merge"]),
        image_token_id=req["image_token_id"],
        video_token_id=req["video_token_id"],
        vision_start_token_id=req["vision_start_token_id"],
    )
    me = SimpleNamespace(config=config)
    out = {}
    for name, mod in (("qwen2_vl", qwen2_vl), ("qwen2_5_vl", qwen2_5_vl), ("qwen3_vl", qwen3_vl)):
        res = []
        for case in req["cases"]:
            ids = mx.array([case["ids"]], dtype=mx.int32)
            grids = mx.array(case["grids"], dtype=mx.int32) if case["grids"] else None
            pos, delta = mod.LanguageModel.get_rope_index(me, ids, grids)
            if pos.ndim == 2:  # text only: [B, L], the same position on every axis
                pos = mx.broadcast_to(pos[None], (3,) + pos.shape)
            res.append({"positions": pos[:, 0, :].tolist(), "delta": int(delta.reshape(-1)[0].item())})
        out[name] = res
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
