#!/usr/bin/env python3
"""Greedy goldens of mlx-lm on mlx-lm conversions of the bundled trained model (issue 13).

For each bit width, `mlx_lm convert -q --q-bits B --q-group-size 64 fixtures/qwen3moe-tiny` (and for
mlx-lm's mixed recipes, `--quant-predicate mixed_2_6` / `mixed_3_4`, group 64, and its microscaling modes,
`--q-mode mxfp4` / `mxfp8`), then
20 greedy tokens for each prompt with mlx-lm's KV cache, and at every step the gap between the top-2
log-probabilities. A prompt whose smallest gap is below 0.06 can be decided by bf16 rounding, so
tests compare only the others. Writes fixtures/golden/tokens-qwen3moe-tiny.json:
{"q{B}" or recipe: [{"prompt", "ids", "text", "min_gap"}, ...], ...}.

  python3 scripts/golden_tokens.py [--out FILE]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = {f"q{b}": ["--q-bits", str(b), "--q-group-size", "64"] for b in [2, 3, 4, 6, 8]}
RECIPES.update({r: ["--quant-predicate", r] for r in ["mixed_2_6", "mixed_3_4"]})
RECIPES.update({m: ["--q-mode", m] for m in ["mxfp4", "mxfp8"]})
RECIPES["q4-g128"] = ["--q-bits", "4", "--q-group-size", "128"]
PROMPTS = ["The history of", "Once upon a time", "def fibonacci(n):", "The capital of France is",
           "The best way to learn", "Water is made of", "import numpy as np", "My favourite food is",
           "In 1905, Albert Einstein"]
STEPS = 20


def greedy(folder):
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache
    model, tok = load(folder)
    out = []
    for prompt in PROMPTS:
        cache = make_prompt_cache(model)
        x = mx.array([tok.encode(prompt, add_special_tokens=False)])
        ids, gaps = [], []
        for _ in range(STEPS):
            logits = model(x, cache=cache)[0, -1].astype(mx.float32)
            lp = logits - mx.logsumexp(logits)
            best = int(mx.argmax(lp))
            second = float(mx.max(mx.where(mx.arange(lp.shape[0]) == best, -mx.inf, lp)))
            gaps.append(float(lp[best]) - second)
            ids.append(best)
            x = mx.array([[best]])
        out.append({"prompt": prompt, "ids": ids, "text": tok.decode(ids),
                    "min_gap": round(min(gaps), 4)})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "fixtures/golden/tokens-qwen3moe-tiny.json"))
    a = ap.parse_args()
    src = os.path.join(ROOT, "fixtures/qwen3moe-tiny")
    goldens = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, args in RECIPES.items():
            folder = os.path.join(tmp, name)
            subprocess.run([sys.executable, "-m", "mlx_lm", "convert", "--hf-path", src,
                            "--mlx-path", folder, "-q", *args], check=True, capture_output=True)
            goldens[name] = greedy(folder)
            print(f"{name}: min gaps {[g['min_gap'] for g in goldens[name]]}", file=sys.stderr)
    with open(a.out, "w") as f:
        json.dump(goldens, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
