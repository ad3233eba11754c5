#!/usr/bin/env python3
"""Writes a large generated MoE (mlx-lm 4-bit folder) for the runtime benchmark.

In: a small mlx-lm folder of the same architecture that holds the dense part (attention,
embeddings, norms), made by the fixture generator and `mlx_lm convert`. Out: an mlx-lm folder
with the template's dense tensors and, per layer, `--experts` new experts (gate/up/down at 4
bits, router at 8 bits, group 64, as `mlx_lm convert -q` writes them), one shard per layer, so
that `flashpack convert` packs it without ever holding a 30 GB bf16 checkpoint on disk.
Invariant: same arguments, same bytes (each expert draws from its own seeded generator).

Weights are Gaussian with std 1/sqrt(fan_in), like the fixture generator's, drawn through a
65536-entry inverse-CDF table (fast; the 4-bit codes do not resolve finer steps), then
quantized with `mx.quantize` from bf16 (what mlx_lm convert does). Routing of such a model is
near uniform, unlike a trained one: that is the hard case for a cache.

  make_fixture --arch qwen3_moe --out T_HF --hidden 2048 --layers 4 --experts 4 --top-k 2 \\
      --moe-intermediate 4096 --heads 8 --kv-heads 2 --head-dim 128 --vocab 8192 \\
      --tokenizer-from fixtures/qwen3moe-tiny
  python -m mlx_lm convert --hf-path T_HF --mlx-path T_MLX -q --q-bits 4 --q-group-size 64
  python scripts/make_large_moe.py --template T_MLX --out BIG_MLX --experts 168
"""

import argparse
import json
import math
import shutil
import statistics
import time
from pathlib import Path

import mlx.core as mx
import numpy as np


def gaussian_table():
    nd = statistics.NormalDist()
    return np.array([nd.inv_cdf((i + 0.5) / 65536) for i in range(65536)], dtype=np.float32)


def quantized(rng, table, shape, bits):
    """Gaussian [.., out, in] with std 1/sqrt(in), quantized (affine, group 64) from bf16."""
    n = math.prod(shape)
    w = table[rng.integers(0, 65536, size=n, dtype=np.uint16)].reshape(shape)
    w *= 1.0 / math.sqrt(shape[-1])
    wq, s, b = mx.quantize(mx.array(w).astype(mx.bfloat16), group_size=64, bits=bits)
    mx.eval(wq, s, b)
    return wq, s, b


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--template", required=True, help="small mlx-lm folder (dense part)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--experts", type=int, required=True, help="experts per layer")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    tpl, out = Path(a.template), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((tpl / "config.json").read_text())
    hidden, inter = cfg["hidden_size"], cfg["moe_intermediate_size"]
    layers, E = cfg["num_hidden_layers"], a.experts
    for f in ["tokenizer.json", "tokenizer_config.json"]:
        shutil.copy(tpl / f, out / f)

    dense = {}
    index = json.loads((tpl / "model.safetensors.index.json").read_text())
    for shard in sorted(set(index["weight_map"].values())):
        for k, v in mx.load(str(tpl / shard)).items():
            if ".mlp.gate." not in k and ".switch_mlp." not in k:
                dense[k] = v
    weight_map = {k: "model-dense.safetensors" for k in dense}
    mx.save_safetensors(str(out / "model-dense.safetensors"), dense, metadata={"format": "mlx"})

    table = gaussian_table()
    t0 = time.time()
    for layer in range(layers):
        tensors = {}
        rng = np.random.default_rng([a.seed, layer, 1 << 20])
        p = f"model.layers.{layer}.mlp"
        wq, s, b = quantized(rng, table, (E, hidden), 8)
        tensors.update({f"{p}.gate.weight": wq, f"{p}.gate.scales": s, f"{p}.gate.biases": b})
        parts = {"gate_proj": [], "up_proj": [], "down_proj": []}
        for e in range(E):
            rng = np.random.default_rng([a.seed, layer, e])
            for proj, shape in [("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)),
                                ("down_proj", (hidden, inter))]:
                parts[proj].append(quantized(rng, table, shape, 4))
        for proj, qs in parts.items():
            for i, suffix in enumerate(["weight", "scales", "biases"]):
                tensors[f"{p}.switch_mlp.{proj}.{suffix}"] = mx.stack([q[i] for q in qs])
        shard = f"model-layer-{layer:03d}.safetensors"
        mx.save_safetensors(str(out / shard), tensors, metadata={"format": "mlx"})
        weight_map.update({k: shard for k in tensors})
        del tensors, parts
        print(f"layer {layer}: {E} experts written ({time.time() - t0:.0f} s)", flush=True)

    cfg["num_experts"] = E
    cfg["num_local_experts"] = E
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    total = sum((out / f).stat().st_size for f in set(weight_map.values()))
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
        indent=2))
    print(f"wrote {out}: {total / 1e9:.2f} GB, {layers} layers x {E} experts")


if __name__ == "__main__":
    main()
