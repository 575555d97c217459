#!/usr/bin/env python3
"""Makes fixtures/golden/reference/<arch>.image.safetensors for Idefics3 / SmolVLM (reference venv, with
torch): scripts/reference_logits.py run with the image processor's PIL backend, then the file rewritten
without `pixel_values`.

    /work/venvs/ref/bin/python tests/py/idefics_reference.py --model fixtures/models/smolvlm \
        --out fixtures/golden/reference/smolvlm.image.safetensors \
        --image fixtures/images/synthetic.png --new-tokens 4

Why: with torch installed transformers picks the torchvision image processor, which resizes a level of
255 differently from the PIL one the CI venv runs (and vlm-convert matches exactly, tests/vision_idefics.rs).
With the PIL backend the pixels are the CI venv's, so storing them is redundant; leaving them out keeps
SmolVLM's 13 tiles of 64x64 (640 KB of float32) out of the fixtures budget. The metadata `pixel_values`
records where they came from.
"""

import runpy
import sys
from pathlib import Path


def main() -> None:
    import transformers
    from safetensors import safe_open
    from safetensors.numpy import save_file

    orig = transformers.AutoImageProcessor.from_pretrained.__func__
    transformers.AutoImageProcessor.from_pretrained = classmethod(
        lambda cls, *a, **k: orig(cls, *a, **{"backend": "pil", **k})
    )
    out = sys.argv[sys.argv.index("--out") + 1]
    script = Path(__file__).resolve().parents[2] / "scripts" / "reference_logits.py"
    sys.argv = [str(script)] + sys.argv[1:]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:
        if e.code:
            raise
    with safe_open(out, framework="np") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "pixel_values"}
    meta["pixel_values"] = "not stored: transformers' PIL image processor (AutoImageProcessor backend=pil)"
    save_file(tensors, out, metadata=meta)
    print(f"{out}: {sorted(tensors)}", file=sys.stderr)


if __name__ == "__main__":
    main()
