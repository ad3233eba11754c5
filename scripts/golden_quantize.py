#!/usr/bin/env python3
"""Golden files for flashpack's MLX affine quantization (src/convert/quantize).

Writes one safetensors file per input dtype (bf16, f16, f32) into OUT (default
fixtures/golden/quantize/). Each file holds, for every case, the input `CASE.w` [rows, cols]
and what `mx.quantize` returns for bits 2/4/8 and group sizes 32/64/128:
`CASE.b{bits}g{gs}.wq` (U32 codes), `.scales` and `.biases` (input dtype).

Cases: seeded random rows of varied magnitude, edge rows (zeros, constants, huge, tiny,
negative-only, positive-only, exact ties, symmetric ranges, one outlier) and rows of the
trained model fixtures/qwen3moe-tiny (an expert's gate and down projections).

Usage: python scripts/golden_quantize.py [--out DIR] [--seed N]
"""
import argparse
import json
import os
import struct

import mlx.core as mx
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = {"bf16": mx.bfloat16, "f16": mx.float16, "f32": mx.float32}
ST_NAMES = {mx.bfloat16: "BF16", mx.float16: "F16", mx.float32: "F32", mx.uint32: "U32"}
BITS = [2, 4, 8]
GROUPS = [32, 64, 128]


def random_case(rng, rows=8, cols=256):
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    return x * rng.uniform(1e-3, 3.0, (rows, 1)).astype(np.float32)


def edge_case(dtype_name, cols=256):
    huge = 3.0e4 if dtype_name == "f16" else 1.0e30
    rng = np.random.default_rng(7)
    u = rng.uniform(0.0, 1.0, cols).astype(np.float32)
    rows = [
        np.zeros(cols),                      # all zero: q0 == 0, bias 0, scale eps
        np.full(cols, 1.5),                  # constant positive
        np.full(cols, -0.75),                # constant negative
        u * huge - huge / 2,                 # huge magnitudes
        (u - 0.5) * 1e-6,                    # tiny: range below eps * n_bins
        (u - 0.5) * 1e-9,                    # below eps / 2: q0 rounds to 0
        -u - 0.1,                            # negative only
        u + 0.1,                             # positive only
        np.arange(cols) % 32 * 0.25,         # ramp: exact half steps test round-half-even
        np.tile([-1.0, 1.0], cols // 2),     # |min| == |max|: edge is w_max
        np.where(np.arange(cols) == 5, 40.0, u - 0.5),  # one outlier per row
        np.where(np.arange(cols) % 64 == 0, -3.0, u),   # a negative outlier in every group
    ]
    return np.stack(rows).astype(np.float32)


def real_cases():
    path = os.path.join(ROOT, "fixtures/qwen3moe-tiny")
    index = json.load(open(os.path.join(path, "model.safetensors.index.json")))["weight_map"]
    out = {}
    for case, name, rows in [
        ("real_gate", "model.layers.0.mlp.experts.0.gate_proj.weight", slice(0, 8)),
        ("real_down", "model.layers.5.mlp.experts.3.down_proj.weight", slice(100, 108)),
    ]:
        t = mx.load(os.path.join(path, index[name]))[name]
        out[case] = np.array(t[rows].astype(mx.float32))
    return out


def save_safetensors(path, tensors):
    """Minimal safetensors writer (keeps the script free of extra packages)."""
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        a = tensors[name]
        mx.eval(a)
        raw = bytes(memoryview(a.view(mx.uint16) if a.dtype in (mx.bfloat16,) else a))
        header[name] = {
            "dtype": ST_NAMES[a.dtype],
            "shape": list(a.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        blobs.append(raw)
        offset += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "fixtures/golden/quantize"))
    ap.add_argument("--seed", type=int, default=20261126)
    ap.add_argument("--bits", default=",".join(map(str, BITS)),
                    help="comma list of bit widths (the committed files: 2,4,8)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    mx.set_default_device(mx.cpu)
    rng = np.random.default_rng(args.seed)
    shared = {"random": random_case(rng), **real_cases()}
    total = 0
    for dname, dtype in DTYPES.items():
        cases = dict(shared, edge=edge_case(dname))
        tensors = {}
        for case, x in cases.items():
            w = mx.array(x).astype(dtype)
            tensors[f"{case}.w"] = w
            for bits in [int(b) for b in args.bits.split(",")]:
                for gs in GROUPS:
                    if w.shape[-1] % gs:
                        continue
                    wq, scales, biases = mx.quantize(w, group_size=gs, bits=bits)
                    key = f"{case}.b{bits}g{gs}"
                    tensors[f"{key}.wq"] = wq
                    tensors[f"{key}.scales"] = scales
                    tensors[f"{key}.biases"] = biases
        path = os.path.join(args.out, f"golden_{dname}.safetensors")
        save_safetensors(path, tensors)
        total += os.path.getsize(path)
        print(f"wrote {path} ({len(tensors)} tensors)")
    print(f"total {total} bytes")


if __name__ == "__main__":
    main()
