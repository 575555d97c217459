#!/usr/bin/env python3
"""Measure what `vlm-convert verify` sees on correct conversions, per bit width: the data behind the default
thresholds (src/verify/report.rs, `Thresholds::for_bits`).

    python3 scripts/verify_thresholds.py [--bin target/debug/vlm-convert] [--bits none,8,6,5,4,3,2]

For every fixture and bit width: convert, then `verify --against` the fixture, and collect the structure
level's max |logit diff| and the quality level's per-prompt mean KL, top-1 and top-5. Prints one row per
conversion and the worst case per bit width (largest KL, smallest top-1/top-5, largest structure diff).
Standard library only.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=str(ROOT / "target/debug/vlm-convert"))
    ap.add_argument("--bits", default="none,8,6,5,4,3,2")
    args = ap.parse_args()
    fixtures = sorted(p.name for p in (ROOT / "fixtures/models").iterdir() if p.is_dir())
    worst = {}
    with tempfile.TemporaryDirectory() as d:
        for b in args.bits.split(","):
            bits = None if b == "none" else int(b)
            for name in fixtures:
                src = ROOT / "fixtures/models" / name
                out = Path(d) / f"{name}-{b}"
                cmd = [args.bin, "--hf-path", str(src), "--mlx-path", str(out), "--quiet"]
                if bits:
                    cmd += ["--q-bits", str(bits)]
                subprocess.run(cmd, check=True)
                r = subprocess.run([args.bin, "verify", "--mlx-path", str(out), "--against", str(src), "--json"],
                                   capture_output=True, text=True)
                if r.returncode not in (0, 1):
                    print(f"{name} {b}: verify could not run: {r.stderr.strip()}", file=sys.stderr)
                    return 1
                rep = json.loads(r.stdout)
                s = max(p["max_abs_diff"] for p in rep["structure"]["prompts"])
                q = rep["quality"]["prompts"]
                row = (s, max(p["mean_kl"] for p in q), min(p["top1"] for p in q), min(p["top5"] for p in q))
                print(f"{name:16} {b:>4}  structure {row[0]:.3e}  mean KL {row[1]:.3e}  top-1 {row[2]:.3f}  "
                      f"top-5 {row[3]:.3f}  {'PASS' if rep['passed'] else 'FAIL'}", flush=True)
                w = worst.get(b, (0.0, 0.0, 1.0, 1.0))
                worst[b] = (max(w[0], row[0]), max(w[1], row[1]), min(w[2], row[2]), min(w[3], row[3]))
    print("\n| bits | structure max diff | max mean KL | min top-1 | min top-5 |")
    print("|---|---|---|---|---|")
    for b, w in worst.items():
        print(f"| {b} | {w[0]:.1e} | {w[1]:.2e} | {w[2]:.3f} | {w[3]:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
