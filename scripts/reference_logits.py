#!/usr/bin/env python3
"""Reference logits for `vlm-convert verify --reference FILE`, computed with transformers (PyTorch, float32)
from the ORIGINAL checkpoint (a Hugging Face model directory, before conversion).

    python scripts/reference_logits.py --model ./Qwen2-VL-2B-Instruct --out ref.safetensors
    python scripts/reference_logits.py --model DIR --out ref.safetensors --prompt "Hello" --prompt "2+2=" \
        --new-tokens 8
    python scripts/reference_logits.py --model DIR --out ref.safetensors --ids 1,2,3 --ids 4,5,6
    python scripts/reference_logits.py --model DIR --out ref.image.safetensors --image photo.png \
        --prompt "Describe the image."

Needs torch and transformers (the reference environment: ../shared/reference-env/requirements-reference.txt).

Prompts are text prompts tokenized by the checkpoint's own tokenizer (no chat template, no special
tokens added), or explicit token ids. Each prompt's logits are those of the language model on a
text-only prompt, every position; the greedy continuation is computed by re-running the whole sequence
and taking the argmax of the last position (no KV cache, no sampling, no stop tokens), which is exactly
what vlm-convert's own greedy check does, so both sides can be compared token by token.

With --image, each --prompt (default "Describe the image.") is an image prompt built by the checkpoint's
own processor (AutoProcessor: `apply_chat_template` with the image and the text, add_generation_prompt,
tokenized; without a chat template, `processor(text=..., images=...)`), and the forward gets every tensor
the processor returns (pixel_values, token_type_ids, ...). The file also holds `pixel_values` (F32, the
processor's output for the image) and the metadata `image` (the file name).

File format (safetensors; `vlm-convert verify` validates all of it):
  input_ids      I64 [P, T]      prompts, right-padded with 0 to the longest
  lengths        I64 [P]         real length of each prompt
  logits         F32 [P, T, V]   float32 logits; rows past a prompt's length are 0
  generated_ids  I64 [P, N]      (optional) greedy continuation, N new tokens per prompt
  __metadata__: format = "vlm-convert-reference/1", source (the --model argument or --source),
                producer (library versions and dtype), model_class, prompts (JSON list of the prompt texts,
                or null entries for id prompts)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

FORMAT = "vlm-convert-reference/1"

DEFAULT_PROMPTS = [
    "The capital of France is",
    "def add(a, b):",
    "Once upon a time",
]


def excluded_ids(config) -> set[int]:
    """Token ids a text-only forward must not contain: image/video placeholders make transformers'
    VLM classes look for pixel values."""
    out = set()
    for cfg in (config, getattr(config, "text_config", None)):
        if cfg is None:
            continue
        for key in ("image_token_id", "image_token_index", "video_token_id", "video_token_index",
                    "vision_start_token_id", "vision_end_token_id", "vision_token_id", "boi_token_index",
                    "eoi_token_index", "image_token_id"):
            v = getattr(cfg, key, None)
            if isinstance(v, int):
                out.add(v)
    return out


def load_model(model_dir: str):
    import torch
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    model = None
    errors = []
    for auto in ("AutoModelForImageTextToText", "AutoModelForVision2Seq", "AutoModelForCausalLM"):
        cls = getattr(transformers, auto, None)
        if cls is None:
            continue
        try:
            model = cls.from_pretrained(model_dir, dtype=torch.float32)
            break
        except (ValueError, KeyError) as e:  # this auto class does not cover the architecture
            errors.append(f"{auto}: {e}")
    if model is None:
        raise SystemExit(f"error: transformers cannot load {model_dir}:\n  " + "\n  ".join(errors))
    model.eval()
    return config, model


def forward_logits(model, ids: list[int]):
    import torch

    with torch.no_grad():
        x = torch.tensor([ids], dtype=torch.long)
        out = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False)
    return out.logits[0].to(torch.float32)


def image_inputs(model_dir: str, image_path: str, text: str):
    """The processor's tensors (torch) for one image prompt."""
    import warnings

    from PIL import Image
    from transformers import AutoProcessor

    warnings.filterwarnings("ignore")
    proc = AutoProcessor.from_pretrained(model_dir)
    img = Image.open(image_path)
    img.load()
    if proc.chat_template:
        msgs = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": text}]}]
        out = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                       return_tensors="pt")
    else:
        out = proc(text=text, images=img, return_tensors="pt")
    return dict(out)


def image_forward(model, inputs: dict, ids: list[int]):
    """Logits of the image prompt extended to `ids` (the processor's extra per-token tensors are
    extended with zeros: generated tokens are text)."""
    import torch

    n0 = inputs["input_ids"].shape[1]
    kw = {}
    for k, v in inputs.items():
        if k in ("input_ids", "attention_mask", "labels"):
            continue
        if k in ("token_type_ids", "mm_token_type_ids") and v.shape[1] == n0 and len(ids) > n0:
            v = torch.cat([v, torch.zeros((1, len(ids) - n0), dtype=v.dtype)], dim=1)
        if torch.is_floating_point(v):
            v = v.to(torch.float32)
        kw[k] = v
    with torch.no_grad():
        x = torch.tensor([ids], dtype=torch.long)
        out = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False, **kw)
    return out.logits[0].to(torch.float32)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="the original checkpoint directory (Hugging Face layout)")
    ap.add_argument("--out", required=True, help="output safetensors file")
    ap.add_argument("--prompt", action="append", default=[], help="a text prompt (repeatable)")
    ap.add_argument("--ids", action="append", default=[], help="a prompt as comma-separated token ids (repeatable)")
    ap.add_argument("--new-tokens", type=int, default=8, help="greedy tokens per prompt (0: none; default 8)")
    ap.add_argument("--source", help="source name recorded in the metadata (default: --model)")
    ap.add_argument("--image", help="make image prompts with this image (PNG/JPEG)")
    args = ap.parse_args()
    if args.image and args.ids:
        raise SystemExit("error: --image takes --prompt texts, not --ids")

    import torch
    import transformers
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    config, model = load_model(args.model)
    vocab = model.get_output_embeddings().weight.shape[0]
    skip = excluded_ids(config)

    prompts: list[tuple[str | None, list[int]]] = []
    inputs: list[dict | None] = []
    if args.image:
        for text in args.prompt or ["Describe the image."]:
            inp = image_inputs(args.model, args.image, text)
            prompts.append((text, [int(t) for t in inp["input_ids"][0]]))
            inputs.append(inp)
        skip = set()
    for text in [] if args.image else args.prompt or ([] if args.ids else DEFAULT_PROMPTS):
        tok = AutoTokenizer.from_pretrained(args.model)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        prompts.append((text, ids))
    for s in args.ids:
        prompts.append((None, [int(t) for t in s.split(",") if t.strip()]))
    for text, ids in prompts:
        if not ids:
            raise SystemExit(f"error: prompt {text!r} is empty after tokenization")
        bad = [t for t in ids if t < 0 or t >= vocab or t in skip]
        if bad:
            raise SystemExit(f"error: prompt {text or ids!r} has token ids {bad} that are out of range "
                             f"(vocab {vocab}) or image/video placeholders")

    P, T, N = len(prompts), max(len(ids) for _, ids in prompts), args.new_tokens
    input_ids = torch.zeros((P, T), dtype=torch.int64)
    lengths = torch.zeros((P,), dtype=torch.int64)
    logits = torch.zeros((P, T, vocab), dtype=torch.float32)
    generated = torch.zeros((P, N), dtype=torch.int64)
    for p, (_, ids) in enumerate(prompts):
        n = len(ids)
        input_ids[p, :n] = torch.tensor(ids)
        lengths[p] = n
        inp = inputs[p] if p < len(inputs) else None

        def fwd(seq):
            return forward_logits(model, seq) if inp is None else image_forward(model, inp, seq)

        logits[p, :n] = fwd(ids)
        seq = list(ids)
        for j in range(N):
            nxt = int(torch.argmax(fwd(seq)[-1]).item())
            generated[p, j] = nxt
            seq.append(nxt)

    tensors = {"input_ids": input_ids, "lengths": lengths, "logits": logits}
    if N > 0:
        tensors["generated_ids"] = generated
    if args.image:
        tensors["pixel_values"] = inputs[0]["pixel_values"].to(torch.float32)
        if "image_grid_thw" in inputs[0]:
            tensors["image_grid_thw"] = inputs[0]["image_grid_thw"].to(torch.int64)
    metadata = {
        "format": FORMAT,
        "source": args.source or args.model,
        "producer": f"scripts/reference_logits.py; transformers {transformers.__version__}, "
                    f"torch {torch.__version__}, float32",
        "model_class": type(model).__name__,
        "prompts": json.dumps([t for t, _ in prompts]),
    }
    if args.image:
        metadata["image"] = Path(args.image).name
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, args.out, metadata=metadata)
    print(f"{args.out}: {P} prompts, up to {T} tokens, vocab {vocab}, {N} new tokens ({type(model).__name__})",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
