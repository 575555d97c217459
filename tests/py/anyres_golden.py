#!/usr/bin/env python3
"""scripts/reference_logits.py with transformers' PIL image processor (reference venv, torch installed).

    python tests/py/anyres_golden.py --model fixtures/models/llava_onevision \
        --out fixtures/golden/reference/llava_onevision.image.safetensors \
        --image fixtures/images/synthetic.png --new-tokens 4 [--drop-pixels]

With torch installed, AutoProcessor picks the torchvision image processors, which resize differently from
PIL (and so from ours and from the CI venv's processor). For any-res models the resized tiles feed
every image token, so the golden is made from the PIL processor's pixels instead; the model forward is
unchanged. --drop-pixels leaves `pixel_values` out of the file (the golden size budget; the tests check
our pixels against the PIL processor directly).
"""

import runpy
import sys
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoImageProcessor

_orig = AutoImageProcessor.from_pretrained.__func__


def _pil(cls, *args, **kwargs):
    kwargs.setdefault("backend", "pil")
    return _orig(cls, *args, **kwargs)


AutoImageProcessor.from_pretrained = classmethod(_pil)

drop = "--drop-pixels" in sys.argv
if drop:
    sys.argv.remove("--drop-pixels")
out = sys.argv[sys.argv.index("--out") + 1]
script = Path(__file__).resolve().parents[2] / "scripts" / "reference_logits.py"
sys.argv[0] = str(script)
try:
    runpy.run_path(str(script), run_name="__main__")
except SystemExit as e:
    if e.code:
        raise
if drop:
    with safe_open(out, "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "pixel_values"}
    save_file(tensors, out, metadata=meta)
