#!/usr/bin/env python3
"""What mlx-lm's own quantized KV cache costs on a model, to set beside `flashpack eval --kv-bits`.

In: an mlx-lm folder (e.g. `mlx_lm convert --hf-path fixtures/qwen3moe-tiny -q --q-bits 4 --q-group-size 64
--mlx-path /tmp/mlx-q4`) and a text. Out, per width: perplexity with `QuantizedKVCache(64, bits)` from the
first token (flashpack's choice; mlx-lm's generate would wait for `quantized_kv_start`), the bf16 cache's
perplexity, mean KL(bf16 cache || quantized cache) and top-1 agreement, over the same non-overlapping windows
of 512 tokens that `flashpack eval` scores. With --variants, the same 8-bit codes read two other ways
(dequantized through `mx.fast.scaled_dot_product_attention`, and mlx-lm's function in float32), to tell the
codes' error from the arithmetic's (docs/decisions/0031-quantized-kv-cache.md).

    python scripts/kv_cache_mlx_lm.py /tmp/mlx-q4 fixtures/eval/prose.txt [--variants]
"""
import argparse

import mlx.core as mx
import mlx_lm.models.base as base
import numpy as np
from mlx_lm import load
from mlx_lm.models.cache import QuantizedKVCache, make_prompt_cache

WINDOW = 512


def log_softmax(x):
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def logits(model, ids, bits):
    out = []
    for s in range(0, len(ids), WINDOW):
        w = ids[s : s + WINDOW]
        if len(w) < 2:
            continue
        if bits is None:
            cache = make_prompt_cache(model)
        else:
            cache = [QuantizedKVCache(group_size=64, bits=bits) for _ in model.layers]
        lg = model(mx.array(w)[None], cache=cache).astype(mx.float32)
        out.append((np.array(lg[0, :-1]), np.array(w[1:])))
    return out


def compare(base_run, run):
    nll = nll_base = kl = agree = n = 0.0
    for (b, t), (q, _) in zip(base_run, run):
        lb, lq = log_softmax(b), log_softmax(q)
        rows = np.arange(len(t))
        nll += -lq[rows, t].sum()
        nll_base += -lb[rows, t].sum()
        kl += (np.exp(lb) * (lb - lq)).sum()
        agree += (lb.argmax(-1) == lq.argmax(-1)).sum()
        n += len(t)
    return np.exp(nll / n), np.exp(nll_base / n), kl / n, agree / n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("text")
    ap.add_argument("--variants", action="store_true")
    a = ap.parse_args()
    model, tok = load(a.model)
    ids = tok.encode(open(a.text).read(), add_special_tokens=False)
    plain = logits(model, ids, None)
    for bits in (8, 4):
        ppl, ppl_base, kl, top1 = compare(plain, logits(model, ids, bits))
        print(f"{bits}-bit: ppl {ppl:.4f} (bf16 cache {ppl_base:.4f}), KL {kl:.5f}, top-1 {top1:.2%}")
    if not a.variants:
        return
    original = base.quantized_scaled_dot_product_attention

    def dequantized(q, qk, qv, scale, mask, group_size=64, bits=8):
        k = mx.dequantize(*qk, group_size=group_size, bits=bits)
        v = mx.dequantize(*qv, group_size=group_size, bits=bits)
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)

    def in_f32(q, qk, qv, scale, mask, group_size=64, bits=8):
        f = lambda t: tuple(x if x.dtype == mx.uint32 else x.astype(mx.float32) for x in t)
        out = original(q.astype(mx.float32), f(qk), f(qv), scale, mask, group_size, bits)
        return out.astype(q.dtype)

    for name, fn in [("dequantized + fused attention", dequantized), ("float32", in_f32)]:
        base.quantized_scaled_dot_product_attention = fn
        _, _, kl, top1 = compare(plain, logits(model, ids, 8))
        print(f"8-bit codes, {name}: KL {kl:.5f}, top-1 {top1:.2%}")
    base.quantized_scaled_dot_product_attention = original


if __name__ == "__main__":
    main()
