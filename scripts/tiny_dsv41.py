#!/usr/bin/env python3
"""Write a tiny random DeepSeek-V4.1 checkpoint in the upstream layout (config.json +
model.safetensors + tokenizer).

In: an output folder and a seed (and `--index-topk`). Out: a folder that `mlx_lm convert` and
`flashpack convert` accept, under the upstream names (`embed.weight`, `layers.L.attn.wq_a.weight`,
`layers.L.hc_attn_fn`, `layers.L.ffn.experts.N.w1.weight`, `head.weight`, ...), which mlx-lm's
`deepseek_v41.py` `sanitize` renames. Invariant: same seed -> same bytes.

Shapes (odd on purpose): hidden 192, 4 layers, 4 heads of 64 (16 rotated) in 2 output groups of
rank 64, query rank 64, 2 hyper-connection streams, a sliding window of 8 (shorter than the
40-token golden prompt), compression ratios [0, 4, 4, 4] with layer 1 the only KV source (its
compressor pools 4 tokens into one latent), layers 1 and 2 indexers (3 heads of 64) that keep 3 of
the compressed entries (`index_topk` 3, fewer than the prompt's 10: positions are dropped), layer 3
reusing layer 2's choice; 4 experts of width 64, top-2, `sqrtsoftplus` scoring with a selection
bias, one shared expert, clamped SwiGLU (limit 1). No `rope_scaling`: transformers 5.25's
AutoTokenizer cannot read a config of an unknown `model_type` that has one (mlx-lm's load fails). Hyper-connection
parameters, sinks, the router's bias and the compressor are f32 (what the reference keeps in f32),
the rest bf16. One `mtp.*` tensor, which every loader drops.

    python scripts/tiny_dsv41.py /tmp/tiny-dsv41 --seed 0
    python scripts/tiny_dsv41.py fixtures/golden/deepseek_v41-yarn-candidates-q2 --yarn-golden 2
"""
import argparse
import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent

CONFIG = {
    "architectures": ["DeepseekV41ForCausalLM"],
    "model_type": "deepseek_v41",
    "vocab_size": 256,
    "hidden_size": 192,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "head_dim": 64,
    "q_lora_rank": 64,
    "qk_rope_head_dim": 16,
    "o_groups": 2,
    "o_lora_rank": 64,
    "moe_intermediate_size": 64,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "scoring_func": "sqrtsoftplus",
    "gate_temp": 1.0,
    "norm_topk_prob": True,
    "routed_scaling_factor": 1.5,
    "swiglu_limit": 1.0,
    "rms_norm_eps": 1e-6,
    "sliding_window": 8,
    "compress_ratios": [0, 4, 4, 4],
    "kv_source_layer_ids": [1],
    "index_source_layer_ids": [1, 2],
    "compress_rope_theta": 160000.0,
    "candidate_source_layer_id": -1,
    "index_n_heads": 3,
    "index_head_dim": 64,
    "index_topk": 3,
    "rope_theta": 10000.0,
    "max_position_embeddings": 64,
    "hc_mult": 2,
    "hc_sinkhorn_iters": 20,
    "hc_eps": 1e-6,
    "num_nextn_predict_layers": 1,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "eos_token_id": 1,
}


def write(out, seed=0, index_topk=None, candidates=None):
    cfg = dict(CONFIG)
    if index_topk is not None:
        cfg["index_topk"] = index_topk
    if candidates is not None:
        cfg["candidate_source_layer_id"], cfg["candidate_topk_blocks"], cfg["candidate_block_size"] = candidates
    rng = np.random.default_rng(seed)
    h, heads, d = cfg["hidden_size"], cfg["num_attention_heads"], cfg["head_dim"]
    qr, groups, orank = cfg["q_lora_rank"], cfg["o_groups"], cfg["o_lora_rank"]
    hc, inter, experts = cfg["hc_mult"], cfg["moe_intermediate_size"], cfg["n_routed_experts"]
    ih, id_ = cfg["index_n_heads"], cfg["index_head_dim"]
    t = {}

    def bf16(a):
        return mx.array(a.astype(np.float32)).astype(mx.bfloat16)

    def f32(a):
        return mx.array(a.astype(np.float32))

    def linear(o, i, dt=bf16):
        return dt(rng.standard_normal((o, i)) / np.sqrt(i))

    def norm(n, dt=bf16):
        return dt(1.0 + 0.1 * rng.standard_normal(n))

    t["embed.weight"] = bf16(rng.standard_normal((cfg["vocab_size"], h)))
    for l in range(cfg["num_hidden_layers"]):
        p = f"layers.{l}"
        ratio = cfg["compress_ratios"][l]
        a = f"{p}.attn"
        t[f"{a}.wq_a.weight"] = linear(qr, h)
        t[f"{a}.q_norm.weight"] = norm(qr)
        t[f"{a}.wq_b.weight"] = linear(heads * d, qr)
        t[f"{a}.wkv.weight"] = linear(d, h)
        t[f"{a}.kv_norm.weight"] = norm(d)
        t[f"{a}.wo_a.weight"] = linear(groups * orank, heads * d // groups)
        t[f"{a}.wo_b.weight"] = linear(h, groups * orank)
        t[f"{a}.attn_sink"] = f32(rng.standard_normal(heads))
        if l in cfg["kv_source_layer_ids"]:
            t[f"{a}.compressor.wkv.weight"] = linear(d, h, f32)
            if ratio > 1:
                t[f"{a}.compressor.wgate.weight"] = linear(d, h, f32)
            t[f"{a}.compressor.norm.weight"] = norm(d, f32)
        if l in cfg["index_source_layer_ids"]:
            t[f"{a}.indexer.wq_b.weight"] = linear(ih * id_, qr)
            t[f"{a}.indexer.weights_proj.weight"] = linear(ih, h)
            if l in cfg["kv_source_layer_ids"]:
                t[f"{a}.indexer.wk.weight"] = linear(id_, d)
                t[f"{a}.indexer.k_norm.weight"] = norm(id_)
        t[f"{p}.attn_norm.weight"] = norm(h)
        t[f"{p}.ffn_norm.weight"] = norm(h)
        mix = (2 + hc) * hc
        for kind in ["attn", "ffn"]:
            t[f"{p}.hc_{kind}_fn"] = f32(rng.standard_normal((mix, hc * h)) / np.sqrt(hc * h))
            t[f"{p}.hc_{kind}_base"] = f32(0.5 * rng.standard_normal(mix))
            t[f"{p}.hc_{kind}_scale"] = f32(1.0 + 0.2 * rng.standard_normal(3))
        f = f"{p}.ffn"
        t[f"{f}.gate.weight"] = linear(experts, h)
        t[f"{f}.gate.bias"] = f32(0.1 * rng.standard_normal(experts))
        for e in range(experts):
            t[f"{f}.experts.{e}.w1.weight"] = linear(inter, h)
            t[f"{f}.experts.{e}.w3.weight"] = linear(inter, h)
            t[f"{f}.experts.{e}.w2.weight"] = linear(h, inter)
        t[f"{f}.shared_experts.w1.weight"] = linear(inter, h)
        t[f"{f}.shared_experts.w3.weight"] = linear(inter, h)
        t[f"{f}.shared_experts.w2.weight"] = linear(h, inter)
    t["norm.weight"] = norm(h)
    t["head.weight"] = linear(cfg["vocab_size"], h)
    # A multi-token-prediction module: dropped by mlx-lm's sanitize and by flashpack's loader.
    t["mtp.0.e_proj.weight"] = linear(h, h)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "model.safetensors"), t, metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tok = ROOT / "fixtures" / "qwen3moe-tiny"
    for name in ["tokenizer.json", "tokenizer_config.json"]:
        if (tok / name).exists():
            shutil.copy(tok / name, out / name)
    return out


# YaRN on the compressed layers (what V4.1's configs ask for): factor 4 over 16 original positions.
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32,
        "beta_slow": 1}


# Candidate blocks: layer 1's indexer picks, per query, its best 2 blocks of 2 latents (the
# newest always one of them); layer 2's indexer chooses its 3 within them.
CANDIDATES = (1, 2, 2)


def golden_yarn(out, bits):
    """The checkpoint with `rope_scaling` = YARN and the CANDIDATES blocks, quantized and run by
    mlx-lm without its
    tokenizer (transformers cannot load it for this config): `load_model`, the dtype cast and
    `quantize_model` of `mlx_lm convert -q --q-bits BITS --q-group-size 64`, then the golden
    logits of scripts/golden_logits.py (the same prompt and decode tokens)."""
    import tempfile

    import mlx.nn as nn
    from mlx.utils import tree_map_with_path
    from mlx_lm.utils import load_model, quantize_model, save_config, save_model

    import golden_logits

    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        hf = write(Path(tmp) / "hf", 0, candidates=CANDIDATES)
        cfg = json.loads((hf / "config.json").read_text())
        cfg["rope_scaling"] = YARN
        (hf / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        model, config = load_model(hf, lazy=True)
        keep = getattr(model, "cast_predicate", lambda _: True)
        model.update(tree_map_with_path(
            lambda k, v: v.astype(mx.bfloat16)
            if keep(k) and mx.issubdtype(v.dtype, mx.floating) else v,
            model.parameters()))
        model, config = quantize_model(model, config, 64, bits)
        q = Path(tmp) / "q"
        save_model(q, model)
        save_config(config, q / "config.json")
        model, _ = load_model(q)
        rng = np.random.default_rng(0)
        prompt = rng.integers(0, cfg["vocab_size"], golden_logits.PROMPT_LEN).tolist()
        decode = rng.integers(0, cfg["vocab_size"], golden_logits.DECODE_STEPS).tolist()
        prefill, steps, _ = golden_logits.run(model, prompt, decode=decode)
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
    }, metadata=golden_logits.metadata({"bits": bits, "group_size": 64, "recipe": "uniform",
                                        "source": "scripts/tiny_dsv41.py --yarn-golden (YaRN, candidate blocks)"}))
    print(f"{out}: prefill {tuple(prefill.shape)}, decode {tuple(steps.shape)}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--index-topk", type=int)
    ap.add_argument("--yarn-golden", type=int, metavar="BITS",
                    help="write OUT as a golden folder of the YaRN and candidate-blocks variant")
    args = ap.parse_args()
    if args.yarn_golden:
        import sys

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        golden_yarn(args.out, args.yarn_golden)
        return
    print(write(args.out, args.seed, args.index_topk))


if __name__ == "__main__":
    main()
