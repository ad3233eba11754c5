#!/usr/bin/env python3
"""Decode speed of `flashpack run` against `mlx_lm generate` on Qwen3-Next / Qwen3.5 MoE (issue 17) and
gpt-oss (issue 18).

In: the flashpack binary and mlx-lm. Out: a Markdown table on stdout (decode and prefill tok/s of each
tool, median and range over the repetitions, and the ratio of the medians) and the raw numbers as JSON in
WORK/results-hybrid-<arch>.json. A random checkpoint of the architecture (scripts/tiny_moe.py's tensors
at the sizes below) is converted by `mlx_lm convert -q` (4-bit, group 64; gpt-oss's experts stay the
MXFP4 codes of its upstream layout), and that folder by `flashpack convert` (its codes kept), so both
tools run the same codes with every expert resident. Runs
alternate (flashpack, mlx-lm, flashpack, ...) so that load from other processes hits both alike. Greedy
decoding of a fixed prompt; times are never asserted on.

  python scripts/bench_hybrid.py --arch qwen3_next --reps 5
  python scripts/bench_hybrid.py --arch gpt_oss --reps 5
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_moe  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PROMPT = (REPO / "fixtures/eval/prose.txt").read_text()[:600]

# A small model of the released shape: 8 layers (full attention every 4th), 8 heads / 2 KV heads of
# 128, linear attention with 4 key and 8 value heads of 128, 32 experts of 256 top-4, a shared
# expert of 512.
SIZES = dict(HIDDEN=1024, HEADS=8, KV_HEADS=2, HEAD_DIM=128, EXPERTS=32, EXPERT_WIDTH=256, VOCAB=8192)
CONFIG = {
    "num_hidden_layers": 8, "hidden_size": 1024, "num_attention_heads": 8, "num_key_value_heads": 2,
    "head_dim": 128, "num_experts": 32, "num_experts_per_tok": 4, "moe_intermediate_size": 256,
    "shared_expert_intermediate_size": 512, "linear_num_key_heads": 4, "linear_num_value_heads": 8,
    "linear_key_head_dim": 128, "linear_value_head_dim": 128, "vocab_size": 8192,
}


# gpt-oss-20b's layout at a twelfth of its expert bytes: 8 layers alternating a window of 128 (the
# released one) and full attention, 16 heads / 4 KV heads of 64, 32 experts of 512 top-4 (MXFP4).
GPT_OSS_CONFIG = {
    "num_hidden_layers": 8, "hidden_size": 1024, "num_attention_heads": 16, "num_key_value_heads": 4,
    "head_dim": 64, "num_local_experts": 32, "num_experts_per_tok": 4, "experts_per_token": 4,
    "intermediate_size": 512, "vocab_size": 8192, "sliding_window": 128,
    "layer_types": ["sliding_attention", "full_attention"] * 4,
    "max_position_embeddings": 4096,
    "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                     "original_max_position_embeddings": 128, "truncate": False},
}


def write_checkpoint(arch, out):
    for k, v in SIZES.items():
        setattr(tiny_moe, k, v)
    cfg = tiny_moe.config_for(arch)
    text = cfg.get("text_config", cfg)
    text.update(GPT_OSS_CONFIG if arch == "gpt_oss" else CONFIG)
    rng = np.random.default_rng([0, tiny_moe.SEED_INDEX[arch]])
    tensors = tiny_moe.tensors_for(arch, cfg, rng)
    out.mkdir(parents=True, exist_ok=True)
    # Floats as bf16; gpt-oss's MXFP4 blocks and scales stay bytes.
    arrays = {k: mx.array(v) if v.dtype == np.uint8 else mx.array(v.astype(np.float32)).astype(mx.bfloat16)
              for k, v in tensors.items()}
    mx.save_safetensors(str(out / "model.safetensors"), arrays, metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    for name in tiny_moe.TOKENIZER_FILES:
        (out / name).write_bytes((REPO / "fixtures/qwen3moe-tiny" / name).read_bytes())


def run(cmd):
    p = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return p.stdout + p.stderr


def flashpack_run(binary, pack, tokens):
    out = run([binary, "run", str(pack), "--prompt", PROMPT, "--max-tokens", str(tokens), "--json"])
    report = json.loads(out.strip().splitlines()[-1])["generation"]
    return report["decode_tokens_per_s"], report["prefill_tokens_per_s"]


def mlx_lm_run(folder, tokens):
    out = run([sys.executable, "-m", "mlx_lm", "generate", "--model", str(folder), "--prompt", PROMPT,
               "--max-tokens", str(tokens), "--ignore-chat-template", "--temp", "0"])
    prefill = float(re.search(r"Prompt: \d+ tokens, ([\d.]+) tokens-per-sec", out).group(1))
    decode = float(re.search(r"Generation: \d+ tokens, ([\d.]+) tokens-per-sec", out).group(1))
    return decode, prefill


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="qwen3_next", choices=["qwen3_next", "qwen3_5_moe", "gpt_oss"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    target = os.environ.get("CARGO_TARGET_DIR", str(REPO / "target"))
    ap.add_argument("--flashpack", default=str(Path(target) / "release/flashpack"))
    ap.add_argument("--work", default=None)
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="flashpack-hybrid-"))
    hf, mlx_dir, pack = work / "hf", work / "mlx", work / "model.flashpack"
    if not hf.exists():
        write_checkpoint(args.arch, hf)
    if not mlx_dir.exists():
        run([sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(hf), "--mlx-path", str(mlx_dir),
             "-q", "--q-bits", "4", "--q-group-size", "64"])
    if not pack.exists():
        run([args.flashpack, "convert", str(mlx_dir), "-o", str(pack), "--quiet"])
    rows = {"flashpack": [], "mlx-lm": []}
    for _ in range(args.reps):
        rows["flashpack"].append(flashpack_run(args.flashpack, pack, args.tokens))
        rows["mlx-lm"].append(mlx_lm_run(mlx_dir, args.tokens))
    (work / f"results-hybrid-{args.arch}.json").write_text(json.dumps(rows, indent=2))
    print(f"| {args.arch} ({args.tokens} tokens, {args.reps} runs) | decode tok/s | prefill tok/s |")
    print("|---|---|---|")
    med = {}
    for tool, r in rows.items():
        d = [x[0] for x in r]
        p = [x[1] for x in r]
        med[tool] = statistics.median(d)
        print(f"| {tool} | {med[tool]:.2f} ({min(d):.2f}-{max(d):.2f}) | "
              f"{statistics.median(p):.1f} ({min(p):.1f}-{max(p):.1f}) |")
    print(f"\ndecode ratio flashpack / mlx-lm: {med['flashpack'] / med['mlx-lm']:.3f}")


if __name__ == "__main__":
    main()
