#!/usr/bin/env python3
"""Golden logits from mlx-lm for the Rust forward pass (src/model) to match.

In: a Hugging Face MoE folder (or, with --all, the tiny random checkpoints of scripts/tiny_moe.py for
every architecture and the trained fixtures/qwen3moe-tiny). Out: a folder with mlx-lm's quantized
weights (`mlx_lm convert -q --q-bits B --q-group-size 64`; a gpt_oss source's MXFP4 experts keep their
codes, the rest is quantized at B bits and the router at 8), its config.json, and golden.safetensors:
  prompt          [L] int32     token ids fed as one prefill
  decode_tokens   [S] int32     ids fed one at a time through the KV cache after the prefill
  prefill_logits  [L, V]        logits of every prefill position (model dtype)
  decode_logits   [S, V]        logits of each decode step
For a trained model (--greedy N, --text) the decode tokens are mlx-lm's greedy continuation and only
the top-32 logits per step are kept (`top_values` / `top_indices`, [1 + N, 32]); weights are not copied
(the Rust test quantizes the bf16 checkpoint itself, as mlx-lm does).
Invariant: same inputs and versions -> same file; versions are recorded in the metadata.

    python scripts/golden_logits.py --all                 # regenerate fixtures/golden/*
    python scripts/golden_logits.py --all --arch glm4_moe # one architecture's
    python scripts/golden_logits.py --hf DIR --bits 4 --out OUT
"""
import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_moe  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "fixtures/golden"
PROMPT_LEN = 40  # x top-2 = 80 routed pairs >= 64: exercises mlx-lm's sorted gather path in prefill
# gpt_oss's window is 8 (tiny_moe.py): the prompt fills its rotating cache five times over, and every
# decode step overwrites the oldest entry.
DECODE_STEPS = 8
TOP = 32


def convert(hf, out, bits, recipe=None):
    cmd = [sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(hf), "--mlx-path", str(out),
           "-q", "--q-bits", str(bits), "--q-group-size", "64"]
    if recipe:
        # Bits per module by layer position (v_proj / down_proj / lm_head get more).
        cmd += ["--quant-predicate", recipe]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def run(model, prompt, decode=None, greedy=0):
    """Prefill `prompt`, then feed `decode` (or the greedy choice, `greedy` times) one by one."""
    cache = make_prompt_cache(model)
    logits = model(mx.array(prompt, dtype=mx.int32)[None], cache=cache)[0]
    mx.eval(logits)
    prefill = logits
    steps, fed = [], []
    nxt = decode if decode is not None else [None] * greedy
    for t in nxt:
        if t is None:
            t = int(mx.argmax(logits[-1]).item())
        fed.append(t)
        logits = model(mx.array([[t]], dtype=mx.int32), cache=cache)[0]
        mx.eval(logits)
        steps.append(logits[-1])
    return prefill, mx.stack(steps), fed


def metadata(extra):
    meta = {"mlx": mx.__version__, "mlx_lm": mlx_lm.__version__,
            "script": "scripts/golden_logits.py"}
    meta.update({k: str(v) for k, v in extra.items()})
    return meta


def golden_random(hf, out, bits, seed=0, recipe=None):
    """Full logits for a random tiny checkpoint; copies mlx-lm's weights next to them."""
    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        q = Path(tmp) / "q"
        convert(hf, q, bits, recipe)
        model, _ = mlx_lm.load(str(q))
        config = json.loads((q / "config.json").read_text())
        vocab = config.get("text_config", config)["vocab_size"]
        rng = np.random.default_rng(seed)
        prompt = rng.integers(0, vocab, PROMPT_LEN).tolist()
        decode = rng.integers(0, vocab, DECODE_STEPS).tolist()
        prefill, steps, _ = run(model, prompt, decode=decode)
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        for name in ["model.safetensors", "config.json"]:
            shutil.copy(q / name, out / name)
    mx.save_safetensors(str(out / "golden.safetensors"), {
        "prompt": mx.array(prompt, dtype=mx.int32),
        "decode_tokens": mx.array(decode, dtype=mx.int32),
        "prefill_logits": prefill,
        "decode_logits": steps,
    }, metadata=metadata({"bits": bits, "group_size": 64, "recipe": recipe or "uniform",
                          "source": "scripts/tiny_moe.py"}))
    print(f"{out}: prefill {tuple(prefill.shape)}, decode {tuple(steps.shape)}")


def golden_trained(hf, out, bits, text, greedy):
    """Top-32 logits and greedy ids for a trained checkpoint (weights not copied)."""
    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        q = Path(tmp) / "q"
        convert(hf, q, bits)
        model, tok = mlx_lm.load(str(q))
        prompt = tok.encode(text)
        prefill, steps, fed = run(model, prompt, greedy=greedy)
    rows = mx.concatenate([prefill[-1:], steps]).astype(mx.float32)
    # Ties at the 32nd place are harmless: the Rust test compares values at these indices.
    idx = mx.argsort(-rows, axis=-1)[:, :TOP].astype(mx.int32)
    vals = mx.take_along_axis(rows, idx, axis=-1)
    continuation = tok.decode(fed)
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "golden.safetensors"), {
        "prompt": mx.array(prompt, dtype=mx.int32),
        "greedy_tokens": mx.array(fed, dtype=mx.int32),
        "top_indices": idx,
        "top_values": vals,
    }, metadata=metadata({"bits": bits, "group_size": 64, "text": text,
                          "continuation": continuation, "source": str(hf)}))
    print(f"{out}: {text!r} -> {continuation!r}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--all", action="store_true", help="regenerate fixtures/golden/*")
    ap.add_argument("--arch", action="append", choices=sorted(tiny_moe.CONFIGS),
                    help="with --all: only these architectures (repeatable); the trained model's "
                         "golden only when none is given")
    ap.add_argument("--hf", help="Hugging Face folder")
    ap.add_argument("--out")
    ap.add_argument("--bits", type=int, default=4, choices=[2, 3, 4, 6, 8])
    ap.add_argument("--text", help="prompt text: trained-model mode (greedy continuation)")
    ap.add_argument("--greedy", type=int, default=16)
    ap.add_argument("--quant-predicate", choices=["mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6"])
    args = ap.parse_args()
    if args.all:
        with tempfile.TemporaryDirectory() as tmp:
            for arch in sorted(args.arch or tiny_moe.CONFIGS):
                hf = tiny_moe.write(arch, Path(tmp) / arch, seed=0)
                for bits in (4, 2):
                    golden_random(hf, GOLDEN / f"{arch}-q{bits}", bits)
                # Different bits per module and per layer (2/6 and 3/4, experts included).
                recipe = {"qwen3_moe": "mixed_2_6", "mixtral": "mixed_3_4"}.get(arch)
                if recipe:
                    golden_random(hf, GOLDEN / f"{arch}-{recipe}", 4, recipe=recipe)
        if not args.arch:
            golden_trained(ROOT / "fixtures/qwen3moe-tiny", GOLDEN / "qwen3moe-tiny-q4", 4,
                           "The history of", 16)
        return
    if not (args.hf and args.out):
        ap.error("--hf and --out are required without --all")
    if args.text:
        golden_trained(args.hf, args.out, args.bits, args.text, args.greedy)
    else:
        golden_random(args.hf, args.out, args.bits, recipe=args.quant_predicate)


if __name__ == "__main__":
    main()
