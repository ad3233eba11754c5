#!/usr/bin/env python3
"""Trace-driven simulation: does caching only the first of N row segments of more experts
(issue 6, "vertical split") read fewer bytes than caching whole experts, at the same memory?

In: fixtures/qwen3moe-tiny (the trained MoE, real skewed routing) and fixtures/eval/*.txt. The
router's top-k of every token and layer are recorded with mlx-lm (one causal forward pass per
text gives the same routing as token-by-token decoding). Out: a Markdown table on stdout.

Policies, each at the same byte budget B (a share of all experts' bytes), replaying the decode
order (token by token, layer by layer, the k experts of a layer together):
- full: LRU over whole experts (B / S slots).
- split N, head share h: LRU over whole experts with (1 - h) B, plus an LRU store of first
  segments (S / N each) with h B. An expert evicted from the whole-expert slots keeps its first
  segment there; a miss whose first segment is stored reads only the other N - 1 segments.
Bytes read per token count whole segments (compression and page alignment left out: they scale
both policies alike).

  python scripts/sim_vertical_split.py
"""

import json
from collections import OrderedDict
from pathlib import Path

import mlx.core as mx
from mlx_lm import load

REPO = Path(__file__).resolve().parent.parent


def trace(texts):
    model, tok = load(str(REPO / "fixtures" / "qwen3moe-tiny"))
    model.set_dtype(mx.float32)  # MLX's CPU gather_mm takes float32 only
    layers = model.model.layers
    rec = {}

    def wrap(block, li):
        gate, k = block.gate, block.top_k

        def routed(x):
            g = mx.softmax(gate(x).astype(mx.float32), axis=-1)
            inds = mx.argpartition(g, kth=-k, axis=-1)[..., -k:]
            rec.setdefault(li, []).append(inds.reshape(-1, k))
            return orig(x)

        orig = block.__call__
        return routed

    for li, layer in enumerate(layers):
        blk = layer.mlp
        blk.__class__ = type("Rec" + blk.__class__.__name__, (blk.__class__,),
                             {"__call__": (lambda f: lambda self, x: f(x))(wrap(blk, li))})
    seq = []
    for t in texts:
        rec.clear()
        ids = tok.encode(t)[:1024]
        model(mx.array(ids)[None])
        per_layer = [mx.concatenate(rec[li], axis=0).tolist() for li in range(len(layers))]
        for p in range(len(ids)):
            seq.append([per_layer[li][p] for li in range(len(layers))])
    return seq, len(layers), model.args.num_experts


class Lru:
    def __init__(self, cap):
        self.cap, self.d = cap, OrderedDict()

    def hit(self, k):
        if k in self.d:
            self.d.move_to_end(k)
            return True
        return False

    def put(self, k):
        """Inserts k; returns the evicted key or None."""
        self.d[k] = True
        self.d.move_to_end(k)
        if len(self.d) > self.cap:
            return self.d.popitem(last=False)[0]
        return None

    def pop(self, k):
        self.d.pop(k, None)


def simulate(seq, total_experts, share, n_seg, head_share):
    """Bytes read per token in units of one expert, and experts with something resident."""
    budget = share * total_experts  # in experts
    full = Lru(max(1, int(budget * (1 - head_share))))
    heads = Lru(int(budget * head_share * n_seg)) if n_seg > 1 and head_share > 0 else None
    read = 0.0
    for tok in seq:
        for li, experts in enumerate(tok):
            for e in experts:
                key = (li, e)
                if full.hit(key):
                    continue
                if heads is not None and heads.hit(key):
                    read += (n_seg - 1) / n_seg
                    heads.pop(key)
                else:
                    read += 1.0
                gone = full.put(key)
                if gone is not None and heads is not None and heads.cap > 0:
                    heads.put(gone)
    covered = len(full.d) + (len(heads.d) if heads else 0)
    return read / len(seq), covered


def main():
    texts = [(REPO / "fixtures" / "eval" / f"{n}.txt").read_text() for n in ("prose", "code")]
    seq, layers, experts = trace(texts)
    total = layers * experts
    print(f"{len(seq)} tokens, {layers} layers x {experts} experts, top-k {len(seq[0][0])}\n")
    print("| budget (share of expert bytes) | policy | experts read per token | vs whole experts "
          "| experts with something resident |")
    print("|---|---|---:|---:|---:|")
    for share in (0.25, 0.5):
        base, cov = simulate(seq, total, share, 1, 0.0)
        print(f"| {share:.0%} | whole experts (LRU) | {base:.3f} | 1.00 | {cov} |")
        for n_seg in (2, 4, 8):
            for h in (0.1, 0.25, 0.5):
                r, cov = simulate(seq, total, share, n_seg, h)
                print(f"| {share:.0%} | {n_seg} segments, {h:.0%} of the budget for first "
                      f"segments | {r:.3f} | {r / base:.2f} | {cov} |")


if __name__ == "__main__":
    main()
