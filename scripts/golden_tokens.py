#!/usr/bin/env python3
"""Greedy goldens of mlx-lm on mlx-lm conversions of the bundled trained model (issue 13).

For each bit width, `mlx_lm convert -q --q-bits B --q-group-size 64 fixtures/qwen3moe-tiny`, then
20 greedy tokens for each prompt with mlx-lm's KV cache, and at every step the gap between the top-2
log-probabilities. A prompt whose smallest gap is below 0.06 can be decided by bf16 rounding, so
tests compare only the others. Writes fixtures/golden/tokens-qwen3moe-tiny.json:
{"q{B}": [{"prompt", "ids", "text", "min_gap"}, ...], ...}.

  python3 scripts/golden_tokens.py [--out FILE]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BITS = [2, 3, 4, 6, 8]
PROMPTS = ["The history of", "Once upon a time", "def fibonacci(n):", "The capital of France is",
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
        for bits in BITS:
            folder = os.path.join(tmp, f"q{bits}")
            subprocess.run([sys.executable, "-m", "mlx_lm", "convert", "--hf-path", src,
                            "--mlx-path", folder, "-q", "--q-bits", str(bits),
                            "--q-group-size", "64"], check=True, capture_output=True)
            goldens[f"q{bits}"] = greedy(folder)
            print(f"q{bits}: min gaps {[g['min_gap'] for g in goldens[f'q{bits}']]}", file=sys.stderr)
    with open(a.out, "w") as f:
        json.dump(goldens, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
