#!/usr/bin/env python3
"""Verify-step benchmark: `vlm-convert verify` against the same forward in mlx-vlm (Python), side by side.

    /work/venvs/mlx/bin/python scripts/bench_verify.py [--model fixtures/models/paligemma] [--bits 4]
        [--reps 5] [--new-tokens 8] [--bin target/release/vlm-convert]

Needs the CI venv (mlx + mlx-vlm). Steps:
1. Converts --model with vlm-convert (--q-bits, default 4) into a temp dir, and saves a reference with
   `vlm-convert verify --against MODEL --save-reference` (3 built-in prompts, --new-tokens greedy tokens).
2. Alternating, --reps times each:
   - ours: `vlm-convert verify --mlx-path OUT --reference REF --json`: loads the converted model, runs
     every prompt and the greedy continuation (KV-cached; PaliGemma re-runs the sequence), compares;
   - mlx-vlm: a Python process that imports mlx_vlm, loads the same directory with
     `mlx_vlm.utils.load_model` and runs the same prompts and greedy steps with mlx-vlm's language model
     and its KV cache as `generate` does (whole-sequence re-runs for PaliGemma, as ours): the same work.
   Both are timed as whole processes (what a CI job pays) and, for mlx-vlm, also without its imports.
3. Prints medians and the ratios.
The default model is the largest fixture (PaliGemma, float32 source). Any converted-size checkpoint works,
e.g. the Qwen2-VL-2B-shaped one scripts/bench generates under target/bench/.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MLX_SIDE = r"""
import sys, time, json
t0 = time.perf_counter()
import mlx.core as mx
from mlx_vlm.utils import load_model
from mlx_vlm.models import cache as cache_mod
from pathlib import Path
t1 = time.perf_counter()
model = load_model(Path(sys.argv[1]))
prompts = json.loads(sys.argv[2]); new_tokens = int(sys.argv[3])
lm = model.language_model

def logits(ids):
    for attr in ("_position_ids", "_rope_deltas"):
        if hasattr(lm, attr):
            setattr(lm, attr, None)
    x = mx.array([ids], dtype=mx.int32)
    emb = model.get_input_embeddings(x, None, mask=None)
    extras = {k: v for k, v in emb.to_dict().items() if k != "inputs_embeds" and v is not None}
    out = lm(x, inputs_embeds=emb.inputs_embeds, cache=cache_mod.make_prompt_cache(lm), **extras)
    out = out.logits if hasattr(out, "logits") else out
    out = out[0].astype(mx.float32)
    mx.eval(out)
    return out

def step(tok, cache):
    x = mx.array([[tok]], dtype=mx.int32)
    emb = model.get_input_embeddings(x, None, mask=None)
    out = lm(x, inputs_embeds=emb.inputs_embeds, cache=cache)
    out = out.logits if hasattr(out, "logits") else out
    out = out[0, -1].astype(mx.float32)
    mx.eval(out)
    return out

# As vlm-convert: KV-cached decoding (mlx-vlm's generate), except for prefix-LM models (PaliGemma),
# where both re-run the whole sequence per token.
cached = model.config.model_type != "paligemma"
conts = []
for ids in prompts:
    seq = list(ids)
    for attr in ("_position_ids", "_rope_deltas"):
        if hasattr(lm, attr):
            setattr(lm, attr, None)
    x = mx.array([seq], dtype=mx.int32)
    emb = model.get_input_embeddings(x, None, mask=None)
    extras = {k: v for k, v in emb.to_dict().items() if k != "inputs_embeds" and v is not None}
    cache = cache_mod.make_prompt_cache(lm)
    out = lm(x, inputs_embeds=emb.inputs_embeds, cache=cache, **extras)
    out = out.logits if hasattr(out, "logits") else out
    last = out[0, -1].astype(mx.float32)
    cont = []
    for s in range(new_tokens):
        t = int(mx.argmax(last).item())
        cont.append(t); seq.append(t)
        if s + 1 < new_tokens:
            last = step(t, cache) if cached else logits(seq)[-1]
    conts.append(cont)
t2 = time.perf_counter()
print(json.dumps({"imports": t1 - t0, "work": t2 - t1, "continuations": conts}))
"""


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "fixtures/models/paligemma"))
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--bin", default=str(ROOT / "target/release/vlm-convert"))
    args = ap.parse_args()
    if not Path(args.bin).exists():
        run(["cargo", "build", "--release", "--quiet"], cwd=ROOT)

    with tempfile.TemporaryDirectory() as d:
        out, ref = Path(d) / "out", Path(d) / "ref.safetensors"
        run([args.bin, "--hf-path", args.model, "--mlx-path", str(out), "--q-bits", str(args.bits), "--quiet"])
        rep = json.loads(run([args.bin, "verify", "--mlx-path", str(out), "--against", args.model, "--json",
                              "--new-tokens", str(args.new_tokens), "--save-reference", str(ref)]).stdout)
        prompts = [p["tokens"] for p in rep["quality"]["prompts"]]
        # The prompts themselves: read them back from the saved reference through our own verify report.
        import mlx.core as mx
        r = mx.load(str(ref))
        ids = r["input_ids"].tolist()
        lengths = r["lengths"].tolist()
        prompt_ids = [row[:n] for row, n in zip(ids, lengths)]
        assert [len(p) for p in prompt_ids] == prompts

        ours, theirs, theirs_work = [], [], []
        for i in range(args.reps):
            t = time.perf_counter()
            v = json.loads(run([args.bin, "verify", "--mlx-path", str(out), "--reference", str(ref), "--json"]).stdout)
            ours.append(time.perf_counter() - t)
            assert v["passed"], v
            t = time.perf_counter()
            m = json.loads(run([sys.executable, "-c", MLX_SIDE, str(out), json.dumps(prompt_ids),
                                str(args.new_tokens)]).stdout)
            theirs.append(time.perf_counter() - t)
            theirs_work.append(m["work"])
            ours_conts = [p["converted_continuation"] for p in v["quality"]["prompts"]]
            assert ours_conts == m["continuations"], (ours_conts, m["continuations"])
            print(f"rep {i + 1}: vlm-convert verify {ours[-1]:.3f}s, mlx-vlm {theirs[-1]:.3f}s "
                  f"(load + forward {m['work']:.3f}s, imports {m['imports']:.3f}s)", flush=True)

    o, t, w = statistics.median(ours), statistics.median(theirs), statistics.median(theirs_work)
    print()
    print(f"model {args.model}, {args.bits}-bit, {len(prompt_ids)} prompts of {prompts} tokens, "
          f"{args.new_tokens} greedy tokens each, {args.reps} reps (median)")
    print("| tool | wall | ratio |")
    print("|---|---|---|")
    print(f"| vlm-convert verify (whole process, incl. comparison) | {o:.3f} s | 1.00 |")
    print(f"| mlx-vlm, whole process | {t:.3f} s | {t / o:.2f}x slower |")
    print(f"| mlx-vlm, load + forward only (imports excluded) | {w:.3f} s | {w / o:.2f}x |")
    print("greedy continuations identical on every rep")


if __name__ == "__main__":
    sys.exit(main())
