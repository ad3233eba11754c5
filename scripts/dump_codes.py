#!/usr/bin/env python3
"""Write MLX-packed quantization codes of a checkpoint's tensors to a raw file for the codec bench.

In: safetensors files or folders. Out: one file of little-endian u32 words (the `weight` that
mx.quantize returns, flattened, tensors in file then name order), readable with
`flashpack bench codecs --codes FILE --bits N`. Only 2-D float tensors whose last dimension is a
multiple of the group size are used; each is upcast to float32 first, as the Rust bench does.

Example:
  python3 scripts/dump_codes.py fixtures/qwen3moe-tiny --contains experts --bits 4 -o /tmp/q4.bin
"""
import argparse
import glob
import os

import mlx.core as mx
import numpy as np


def files_of(path):
    if os.path.isdir(path):
        return sorted(glob.glob(os.path.join(path, "*.safetensors")))
    return [path]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--contains", default=None, help="only tensors whose name contains this")
    ap.add_argument("--bits", type=int, default=4, choices=[2, 4, 8])
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--aux-out", default=None, help="also write scales then biases (per tensor) as bf16")
    a = ap.parse_args()
    n = 0
    with open(a.out, "wb") as f, (open(a.aux_out, "wb") if a.aux_out else open(os.devnull, "wb")) as g:
        for path in a.paths:
            for fn in files_of(path):
                tensors = mx.load(fn)
                for name in sorted(tensors):
                    w = tensors[name]
                    if a.contains and a.contains not in name:
                        continue
                    if w.ndim != 2 or w.shape[-1] % a.group_size != 0 or not mx.issubdtype(w.dtype, mx.floating):
                        continue
                    q, s, b = mx.quantize(w.astype(mx.float32), group_size=a.group_size, bits=a.bits)
                    f.write(np.array(q).astype("<u4").tobytes())
                    for t in (s, b):
                        g.write(np.array(t.astype(mx.bfloat16).view(mx.uint16)).astype("<u2").tobytes())
                    n += 1
    print(f"{n} tensors -> {a.out}")


if __name__ == "__main__":
    main()
