#!/usr/bin/env python3
"""DeepSeek-V3 (MLA), GLM-4.5 and gpt-oss on the GPU: flashpack against mlx-lm on the same codes.

Runs where `flashpack` and `make_fixture` are on PATH and `python3 -m mlx_lm` works on the GPU
(scripts/bench_gpu.sh sets that up on the device's H200: `bash scripts/bench_gpu.sh archs`).
For each architecture: a synthetic model of one shape (hidden 2048, 8 layers of which the first is
dense, 64 experts top-8 of width 768, 16 heads of 128; DeepSeek-V3 with MLA, 4 expert groups of
which 2 are chosen; GLM-4.5 with 4 KV heads, half-rotary heads, q/k/v biases, q/k norm; gpt-oss with
4 KV heads, sinks, a window of 128 on every other layer and MXFP4 experts, which mlx-lm keeps),
`mlx_lm convert -q` (4-bit, group 64), `flashpack convert` of that folder, then greedy runs
interleaved by repetition: mlx-lm generate and flashpack all resident. Prints one table (decode
tok/s, the ratio, whether the generated text is the same and how far it agrees) and writes `archs.json` into --out.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gpu import PROMPT, decode_stats, med, run_flashpack, run_mlx, sh  # noqa: E402

SHAPE = ["--hidden", "2048", "--layers", "8", "--experts", "64", "--top-k", "8",
         "--moe-intermediate", "768", "--heads", "16", "--head-dim", "128", "--vocab", "8192"]
KV_HEADS = {"deepseek_v3": "16", "glm4_moe": "4", "gpt_oss": "4"}
EXTRA = {"gpt_oss": ["--sliding-window", "128"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/root/fparch")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--tokenizer-from", required=True)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--archs", default="deepseek_v3,glm4_moe,gpt_oss")
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    prompt_file = os.path.join(a.work, "prompt.txt")
    with open(prompt_file, "w") as f:
        f.write(PROMPT)
    rows = {}
    for arch in a.archs.split(","):
        hf, q = os.path.join(a.work, arch), os.path.join(a.work, arch + "-q4")
        pack = os.path.join(a.work, arch + ".flashpack")
        if not os.path.exists(pack):
            sh(["make_fixture", "--arch", arch, "--out", hf, "--kv-heads", KV_HEADS[arch],
                "--tokenizer-from", a.tokenizer_from] + SHAPE + EXTRA.get(arch, []))
            sh([sys.executable, "-m", "mlx_lm", "convert", "--hf-path", hf, "--mlx-path", q, "-q",
                "--q-bits", "4", "--q-group-size", "64"])
            sh(["flashpack", "convert", q, "-o", pack, "--quiet"])
        mlx, fp = [], []
        for _ in range(a.reps):
            mlx.append(run_mlx(q, prompt_file, a.max_tokens, a.work))
            fp.append(run_flashpack(pack, [], PROMPT, a.max_tokens))
        errors = [r["error"] for r in mlx + fp if "error" in r]
        if errors:
            rows[arch] = {"error": errors[0]}
            continue
        m_tps = med([r["decode_tps"] for r in mlx])
        f_tps = med([decode_stats(r)["tps"] for r in fp])
        a_text, b_text = fp[-1]["text"].strip(), mlx[-1]["text"].strip()
        common = next((i for i, (x, y) in enumerate(zip(a_text, b_text)) if x != y),
                      min(len(a_text), len(b_text)))
        rows[arch] = {"mlx_lm_decode_tps": m_tps, "flashpack_decode_tps": f_tps,
                      "ratio": f_tps / m_tps, "same_text": a_text == b_text,
                      "common_prefix_chars": common, "chars": len(b_text),
                      "mlx_lm_text": mlx[-1]["text"][:200], "flashpack_text": fp[-1]["text"][:200]}
    with open(os.path.join(a.out, "archs.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print("| model | mlx-lm decode tok/s | flashpack decode tok/s | ratio | same text (common prefix) |")
    print("|---|---:|---:|---:|---|")
    for arch, r in rows.items():
        if "error" in r:
            print(f"| {arch} | error: {r['error'][-300:]} | | | |")
        else:
            print(f"| {arch} | {r['mlx_lm_decode_tps']:.1f} | {r['flashpack_decode_tps']:.1f} | "
                  f"{r['ratio']:.2f}x | {r['same_text']} ({r['common_prefix_chars']}/{r['chars']}) |")


if __name__ == "__main__":
    main()
