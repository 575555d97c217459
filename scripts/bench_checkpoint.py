#!/usr/bin/env python3
"""Writes a random-weight checkpoint shaped like Qwen/Qwen2-VL-2B-Instruct, for scripts/bench.

    python3 scripts/bench_checkpoint.py OUT_DIR [--layers 28] [--vision-depth 32] [--seed 0]

- config.json in the Hub spelling of Qwen/Qwen2-VL-2B-Instruct (flat text fields, mrope rope_scaling,
  vision_config with depth/embed_dim/...), with num_hidden_layers / vision depth from the flags;
- Hub tensor names (`model.*`, `visual.*`; no `lm_head`: the head is tied), bf16, random normal * 0.02
  (norm weights around 1), every tensor seeded from (seed, its name) so any shard can be remade alone;
- shards the way transformers' save_pretrained makes them on the Hub (parameters in model order,
  visual tower first, a new shard when the next tensor would pass 4 GB) with
  `model.safetensors.index.json`;
- tokenizer / processor / chat-template files copied from fixtures/models/qwen2_vl.

Only what is missing is written: an existing shard of the right size is kept, so rerunning is free.
Needs only numpy (any version with numpy.random.Generator). Memory: one 32 MiB chunk at a time.
"""

import argparse
import hashlib
import json
import os
import shutil
import struct
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "fixtures" / "models" / "qwen2_vl"
COPIED = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.json",
    "preprocessor_config.json",
]
MAX_SHARD = 4_000_000_000  # bytes; what makes the Hub's Qwen2-VL-2B two shards (3.99 GB + 0.43 GB)
CHUNK = 16 << 20  # elements per generated chunk


def config(layers, depth):
    """config.json of Qwen/Qwen2-VL-2B-Instruct, in its Hub spelling."""
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "vision_token_id": 151654,
        "image_token_id": 151655,
        "video_token_id": 151656,
        "hidden_act": "silu",
        "hidden_size": 1536,
        "initializer_range": 0.02,
        "intermediate_size": 8960,
        "max_position_embeddings": 32768,
        "max_window_layers": layers,
        "model_type": "qwen2_vl",
        "num_attention_heads": 12,
        "num_hidden_layers": layers,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.41.2",
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": {
            "depth": depth,
            "embed_dim": 1280,
            "mlp_ratio": 4,
            "num_heads": 16,
            "in_chans": 3,
            "hidden_size": 1536,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "temporal_patch_size": 2,
        },
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "vocab_size": 151936,
    }


def tensors(cfg):
    """(name, shape) in the order of Qwen2VLForConditionalGeneration.state_dict()."""
    v = cfg["vision_config"]
    e, c, p, t = v["embed_dim"], v["in_chans"], v["patch_size"], v["temporal_patch_size"]
    m = e * v["mlp_ratio"]
    merged = e * v["spatial_merge_size"] ** 2
    out = [("visual.patch_embed.proj.weight", (e, c, t, p, p))]
    for i in range(v["depth"]):
        b = f"visual.blocks.{i}."
        out += [
            (b + "norm1.weight", (e,)),
            (b + "norm1.bias", (e,)),
            (b + "norm2.weight", (e,)),
            (b + "norm2.bias", (e,)),
            (b + "attn.qkv.weight", (3 * e, e)),
            (b + "attn.qkv.bias", (3 * e,)),
            (b + "attn.proj.weight", (e, e)),
            (b + "attn.proj.bias", (e,)),
            (b + "mlp.fc1.weight", (m, e)),
            (b + "mlp.fc1.bias", (m,)),
            (b + "mlp.fc2.weight", (e, m)),
            (b + "mlp.fc2.bias", (e,)),
        ]
    out += [
        ("visual.merger.ln_q.weight", (e,)),
        ("visual.merger.ln_q.bias", (e,)),
        ("visual.merger.mlp.0.weight", (merged, merged)),
        ("visual.merger.mlp.0.bias", (merged,)),
        ("visual.merger.mlp.2.weight", (v["hidden_size"], merged)),
        ("visual.merger.mlp.2.bias", (v["hidden_size"],)),
    ]
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    hd = h // cfg["num_attention_heads"]
    kv = hd * cfg["num_key_value_heads"]
    out.append(("model.embed_tokens.weight", (cfg["vocab_size"], h)))
    for i in range(cfg["num_hidden_layers"]):
        b = f"model.layers.{i}."
        out += [
            (b + "self_attn.q_proj.weight", (h, h)),
            (b + "self_attn.q_proj.bias", (h,)),
            (b + "self_attn.k_proj.weight", (kv, h)),
            (b + "self_attn.k_proj.bias", (kv,)),
            (b + "self_attn.v_proj.weight", (kv, h)),
            (b + "self_attn.v_proj.bias", (kv,)),
            (b + "self_attn.o_proj.weight", (h, h)),
            (b + "mlp.gate_proj.weight", (inter, h)),
            (b + "mlp.up_proj.weight", (inter, h)),
            (b + "mlp.down_proj.weight", (h, inter)),
            (b + "input_layernorm.weight", (h,)),
            (b + "post_attention_layernorm.weight", (h,)),
        ]
    out.append(("model.norm.weight", (h,)))
    return out


def nbytes(shape):
    n = 2
    for d in shape:
        n *= d
    return n


def shard(tensors):
    """Lists of (name, shape), split like transformers' save_pretrained(max_shard_size='4GB')."""
    shards, cur, size = [], [], 0
    for name, shape in tensors:
        b = nbytes(shape)
        if cur and size + b > MAX_SHARD:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += b
    shards.append(cur)
    return shards


def header(entries):
    """safetensors header bytes (length prefix included) for bf16 tensors written in name order."""
    meta, off = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in sorted(entries):
        b = nbytes(shape)
        meta[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + b]}
        off += b
    text = json.dumps(meta, separators=(",", ":")).encode()
    text += b" " * (-(len(text) + 8) % 8)
    return struct.pack("<Q", len(text)) + text, off


def write_tensor(f, name, shape, seed):
    """Seeded random bf16 values: normal * 0.02 for weights and biases, 1 + normal * 0.02 for norms."""
    digest = hashlib.sha256(name.encode()).digest()
    rng = np.random.Generator(np.random.PCG64([seed, int.from_bytes(digest[:8], "little")]))
    n = nbytes(shape) // 2
    norm = len(shape) == 1 and ("norm" in name or "ln_q" in name) and name.endswith(".weight")
    buf = np.empty(min(n, CHUNK), dtype=np.float32)
    while n:
        k = min(n, CHUNK)
        x = buf[:k]
        rng.standard_normal(out=x, dtype=np.float32)
        x *= 0.02
        if norm:
            x += 1.0
        # Round to nearest even bf16 (all values finite).
        u = x.view(np.uint32)
        u += 0x7FFF + ((u >> 16) & 1)
        f.write((u >> 16).astype("<u2").tobytes())
        n -= k


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=28, help="text decoder layers (Qwen2-VL-2B: 28)")
    ap.add_argument("--vision-depth", type=int, default=32, help="vision blocks (Qwen2-VL-2B: 32)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    cfg = config(a.layers, a.vision_depth)
    all_tensors = tensors(cfg)
    shards = shard(all_tensors)
    n = len(shards)
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    # A different layout (flags changed) under the same directory: start over.
    stamp = json.dumps({"layers": a.layers, "depth": a.vision_depth, "seed": a.seed, "v": 1})
    stamp_file = out.parent / (out.name + ".stamp")
    if stamp_file.exists() and stamp_file.read_text() != stamp:
        for p in out.iterdir():
            if p.is_file():
                p.unlink()
    total = 0
    weight_map = {}
    for fname, entries in zip(names, shards):
        head, data = header(entries)
        total += data
        for name, _ in entries:
            weight_map[name] = fname
        path = out / fname
        if path.exists() and path.stat().st_size == len(head) + data:
            continue
        t0 = time.time()
        tmp = path.with_suffix(".partial")
        with open(tmp, "wb") as f:
            f.write(head)
            for name, shape in sorted(entries):
                write_tensor(f, name, shape, a.seed)
        os.replace(tmp, path)
        print(f"bench_checkpoint: wrote {path} ({(len(head) + data) / 1e9:.2f} GB, {time.time() - t0:.0f} s)",
              file=sys.stderr)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gen = {"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True,
           "eos_token_id": [151645, 151643], "repetition_penalty": 1.0, "temperature": 0.01,
           "top_p": 0.001, "top_k": 1, "transformers_version": "4.41.2"}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    for name in COPIED:
        shutil.copyfile(FIXTURE / name, out / name)
    stamp_file.write_text(stamp)
    params = total // 2
    print(f"bench_checkpoint: {out}: {params / 1e9:.2f} B parameters, {total / 1e9:.2f} GB bf16 in {n} shards",
          file=sys.stderr)


if __name__ == "__main__":
    main()
