#!/usr/bin/env python3
"""How well MXFP4 expert codes entropy-code: the trained fixtures/qwen3moe-tiny quantized to MXFP4 by
mlx-lm (`mlx_lm convert -q --q-mode mxfp4`, what a gpt-oss checkpoint's experts are), then converted by
flashpack keeping those codes, with the default codec choice (auto: Huffman per segment part when it wins)
and with `--codec raw`.

In: a bf16 Hugging Face MoE folder (default fixtures/qwen3moe-tiny) and a built flashpack binary.
Out: a table on stdout: the empirical entropy of the experts' 4-bit codes and E8M0 scales (bits per symbol),
and the expert bytes flashpack stores with auto codecs against raw. Invariant: reads only; temporary files
go to a temporary folder.

    python3 scripts/mxfp4_entropy.py [--hf fixtures/qwen3moe-tiny] [--bin target/release/flashpack]
"""
import argparse
import json
import math
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import mlx.core as mx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def entropy(counts):
    n = sum(counts.values())
    return -sum(c / n * math.log2(c / n) for c in counts.values() if c)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf", default=str(ROOT / "fixtures/qwen3moe-tiny"))
    ap.add_argument("--bin", default=str(ROOT / "target/release/flashpack"))
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        mlx_dir = tmp / "mxfp4"
        subprocess.run([sys.executable, "-m", "mlx_lm", "convert", "--hf-path", a.hf, "--mlx-path",
                        str(mlx_dir), "-q", "--q-mode", "mxfp4"], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        codes, scales = Counter(), Counter()
        for f in sorted(mlx_dir.glob("*.safetensors")):
            for name, t in mx.load(str(f)).items():
                if "switch_mlp" not in name:
                    continue
                b = np.array(t).view(np.uint8).ravel()
                if name.endswith(".weight"):
                    codes.update((b & 0x0F).tolist())
                    codes.update((b >> 4).tolist())
                elif name.endswith(".scales"):
                    scales.update(b.tolist())
        sizes = {}
        for codec in ["auto", "raw"]:
            pack = tmp / f"{codec}.flashpack"
            subprocess.run([a.bin, "convert", str(mlx_dir), "-o", str(pack), "--codec", codec, "--quiet"],
                           check=True)
            info = json.loads(subprocess.run([a.bin, "inspect", str(pack), "--json"], check=True,
                                             capture_output=True, text=True).stdout)
            sizes[codec] = (info["experts"]["bytes"], info["codecs"])
    hc, hs = entropy(codes), entropy(scales)
    print(f"source: {a.hf}, experts as MXFP4 (mlx {mx.__version__}, mode mxfp4, groups of 32)")
    print(f"4-bit codes: {sum(codes.values())} symbols, entropy {hc:.3f} bits/code "
          f"(raw 4; the bound on what any per-symbol code saves: {100 * (1 - hc / 4):.1f}%)")
    print(f"E8M0 scales: {sum(scales.values())} symbols, entropy {hs:.3f} bits/scale (raw 8)")
    auto, raw = sizes["auto"][0], sizes["raw"][0]
    print(f"expert bytes: auto {auto}  raw {raw}  ratio {auto / raw:.4f}")
    print(f"codecs (auto): {json.dumps(sizes['auto'][1])}")


if __name__ == "__main__":
    main()
