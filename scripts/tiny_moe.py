#!/usr/bin/env python3
"""Write a tiny random Hugging Face MoE checkpoint (config.json + model.safetensors + tokenizer).

In: an architecture name and a seed. Out: a folder that `mlx_lm convert` accepts, with tensors under
the Hugging Face names of that architecture (see ../shared/REFERENCE.md, "Tensor names on disk").
Invariant: same (arch, seed) -> same bytes. Widths are multiples of 64 so mlx-lm quantizes every
linear layer at group size 64 (DeepSeek-V3's rotary width, 32, is only ever an output width). Weights are bf16 like real checkpoints; the scale (1/sqrt(fan_in),
norms near 1) keeps activations O(1) so routing and logits are not degenerate.

Used by scripts/golden_logits.py; usable alone:
    python scripts/tiny_moe.py qwen3_moe /tmp/tiny-qwen3 --seed 0
"""
import argparse
import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json"]

HIDDEN = 128
LAYERS = 2
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 32
EXPERTS = 4
EXPERT_WIDTH = 64
VOCAB = 256

# DeepSeek-V3 and GLM-4.5: odd widths (hidden 192, 3 heads), 3 layers of which the first is dense,
# 8 experts top-3 (DeepSeek-V3 in 4 groups of which 2 are chosen), one shared expert, no BOS, and a
# non-default RoPE (DeepSeek-V3: YaRN with mscale; GLM-4.5: half-rotary heads, theta 50,000).
DS_HIDDEN = 192
DS_HEADS = 3
DS_LAYERS = 3
DS_EXPERTS = 8
DEEPSEEK_MOE = {
    "intermediate_size": 320,
    "moe_intermediate_size": EXPERT_WIDTH,
    "n_routed_experts": DS_EXPERTS,
    "num_experts_per_tok": 3,
    "n_shared_experts": 1,
    "routed_scaling_factor": 2.5,
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "norm_topk_prob": True,
    "first_k_dense_replace": 1,
    "num_nextn_predict_layers": 0,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}

# Qwen3-Next and Qwen3.5 MoE: 4 layers of which the last has full attention (the released
# pattern), Gated DeltaNet with 2 key and 4 value heads of 32 and a convolution of 4, gated full
# attention rotating a quarter of each head, a sigmoid-gated shared expert, norms stored offset by
# one (drawn around 0), a multi-token-prediction tensor (dropped), no BOS. Qwen3.5 in its
# multimodal layout: text_config, model.language_model.* names, fused experts, a vision tensor.
HYBRID_LAYERS = 4
HYBRID = {
    "intermediate_size": 256,
    "moe_intermediate_size": EXPERT_WIDTH,
    "shared_expert_intermediate_size": 128,
    "num_experts": EXPERTS,
    "num_experts_per_tok": 2,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "head_dim": HEAD_DIM,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "partial_rotary_factor": 0.25,
    "full_attention_interval": 4,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 32,
    "linear_value_head_dim": 32,
    "linear_conv_kernel_dim": 4,
    "num_hidden_layers": HYBRID_LAYERS,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
    "bos_token_id": None,
}

# gpt-oss: odd widths (hidden 192, 3 heads of 64 over 1 KV head), 3 layers alternating sliding
# (window 8, shorter than the golden prompt) and full attention, 8 experts of width 128 top-3 in the
# upstream MXFP4 layout (random FP4 codes and E8M0 exponents GPT_OSS_EXPONENTS, which push some
# gate/up pre-activations past swiglu_limit), YaRN (factor 4 over 16 positions), attention sinks,
# biases everywhere. The width is a multiple of 32 (MXFP4 blocks), hidden of 64 (mlx-lm's 4-bit
# g64 quantization of the other tensors).
# E8M0 exponents, drawn from [lo, hi): gate/up scales 2^-7 .. 2^-3 (about 1% of pre-activations past
# the limit of 7), down 2^-11 .. 2^-7 (the experts' output of the order of the residual, so that
# attention still moves the logits).
GPT_OSS_EXPONENTS = {"gate_up_proj": (120, 125), "down_proj": (116, 121)}
GPT_OSS = {
    "architectures": ["GptOssForCausalLM"],
    "hidden_size": DS_HIDDEN,
    "num_hidden_layers": 3,
    "num_attention_heads": DS_HEADS,
    "num_key_value_heads": 1,
    "head_dim": 64,
    "intermediate_size": 128,
    "num_local_experts": DS_EXPERTS,
    "num_experts_per_tok": 3,
    "experts_per_token": 3,
    "sliding_window": 8,
    "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
    "rope_theta": 150000.0,
    "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
                     "original_max_position_embeddings": 16, "truncate": False},
    "swiglu_limit": 7.0,
    "attention_bias": True,
    "rms_norm_eps": 1e-5,
    # factor x original_max_position_embeddings, as upstream (131072 = 32 x 4096).
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": None,
    "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]},
}

# Config fields per architecture. Legacy keys (rope_theta, num_experts) are what mlx-lm 0.32.2 reads;
# qwen3_moe also carries the transformers 5.x spelling, as fixtures/qwen3moe-tiny does.
CONFIGS = {
    "qwen3_moe": {
        "architectures": ["Qwen3MoeForCausalLM"],
        "intermediate_size": 256,
        "moe_intermediate_size": EXPERT_WIDTH,
        "num_experts": EXPERTS,
        "num_local_experts": EXPERTS,
        "num_experts_per_tok": 2,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "head_dim": HEAD_DIM,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
    },
    "mixtral": {
        "architectures": ["MixtralForCausalLM"],
        "intermediate_size": EXPERT_WIDTH,
        "num_local_experts": EXPERTS,
        "num_experts_per_tok": 2,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
    },
    "olmoe": {
        "architectures": ["OlmoeForCausalLM"],
        "intermediate_size": EXPERT_WIDTH,
        "num_experts": EXPERTS,
        "num_experts_per_tok": 2,
        "norm_topk_prob": False,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
    },
    "qwen2_moe": {
        "architectures": ["Qwen2MoeForCausalLM"],
        "intermediate_size": 256,
        "moe_intermediate_size": EXPERT_WIDTH,
        "shared_expert_intermediate_size": 128,
        "num_experts": EXPERTS,
        "num_experts_per_tok": 2,
        "norm_topk_prob": False,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
    },
    "deepseek_v3": {
        **DEEPSEEK_MOE,
        "architectures": ["DeepseekV3ForCausalLM"],
        "hidden_size": DS_HIDDEN,
        "num_hidden_layers": DS_LAYERS,
        "num_attention_heads": DS_HEADS,
        "num_key_value_heads": DS_HEADS,
        "q_lora_rank": 128,
        "kv_lora_rank": 128,
        "qk_nope_head_dim": 64,
        "qk_rope_head_dim": 32,
        "v_head_dim": 64,
        "n_group": 4,
        "topk_group": 2,
        "moe_layer_freq": 1,
        "attention_bias": False,
        "rope_theta": 10000.0,
        "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                         "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8},
        "bos_token_id": None,
    },
    "glm4_moe": {
        **DEEPSEEK_MOE,
        "architectures": ["Glm4MoeForCausalLM"],
        "hidden_size": DS_HIDDEN,
        "num_hidden_layers": DS_LAYERS,
        "num_attention_heads": DS_HEADS,
        "num_key_value_heads": 1,
        "head_dim": 64,
        "partial_rotary_factor": 0.5,
        "use_qk_norm": True,
        "attention_bias": True,
        "n_group": 1,
        "topk_group": 1,
        "routed_scaling_factor": 1.5,
        "rope_theta": 50000.0,
        "rope_scaling": None,
        "bos_token_id": None,
    },
    "qwen3_next": {**HYBRID, "architectures": ["Qwen3NextForCausalLM"]},
    "qwen3_5_moe": {
        **HYBRID,
        "architectures": ["Qwen3_5MoeForConditionalGeneration"],
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                            "partial_rotary_factor": 0.25, "mrope_section": [2, 1, 1]},
    },
    "gpt_oss": GPT_OSS,
}

# Seeds per architecture: the first four keep the indices they had when they were the only ones,
# so adding an architecture leaves their goldens byte-identical.
SEED_INDEX = {"mixtral": 0, "olmoe": 1, "qwen2_moe": 2, "qwen3_moe": 3, "deepseek_v3": 4,
              "glm4_moe": 5, "qwen3_next": 6, "qwen3_5_moe": 7, "gpt_oss": 8}


def config_for(arch):
    cfg = {
        "model_type": arch,
        "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "vocab_size": VOCAB,
        "hidden_act": "silu",
        "bos_token_id": 0,
        "eos_token_id": 0,
    }
    cfg.update(CONFIGS[arch])
    cfg = {k: v for k, v in cfg.items() if v is not None or k == "rope_scaling" or k == "q_lora_rank"}
    if arch == "qwen3_5_moe":
        # Qwen3_5MoeConfig: the text model under text_config, beside a vision config.
        text = dict(cfg, model_type="qwen3_5_moe_text")
        return {"model_type": arch, "architectures": cfg["architectures"], "text_config": text,
                "vision_config": {"depth": 1}, "tie_word_embeddings": False, "eos_token_id": 0}
    return cfg


def hybrid_tensors(arch, cfg, rng, linear, norm):
    """Qwen3-Next (fused in_proj_qkvz / in_proj_ba, per-expert experts) and Qwen3.5 MoE (split
    projections, fused experts, multimodal names)."""
    if "text_config" in cfg:
        cfg = cfg["text_config"]
    h, e, w = HIDDEN, EXPERTS, EXPERT_WIDTH
    nk, nv = cfg["linear_num_key_heads"], cfg["linear_num_value_heads"]
    kd, vd = nk * cfg["linear_key_head_dim"], nv * cfg["linear_value_head_dim"]
    conv, k = 2 * kd + vd, cfg["linear_conv_kernel_dim"]
    q_out, kv_out = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM

    def offset_norm(dim):  # stored as w, used as 1 + w
        return 0.1 * rng.standard_normal((dim,))

    t = {"model.embed_tokens.weight": rng.standard_normal((VOCAB, h))}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        t[f"{p}.input_layernorm.weight"] = offset_norm(h)
        t[f"{p}.post_attention_layernorm.weight"] = offset_norm(h)
        if (layer + 1) % cfg["full_attention_interval"] != 0:
            a = f"{p}.linear_attn"
            if arch == "qwen3_next":
                t[f"{a}.in_proj_qkvz.weight"] = linear(2 * kd + 2 * vd, h)
                t[f"{a}.in_proj_ba.weight"] = linear(2 * nv, h)
            else:
                t[f"{a}.in_proj_qkv.weight"] = linear(conv, h)
                t[f"{a}.in_proj_z.weight"] = linear(vd, h)
                t[f"{a}.in_proj_b.weight"] = linear(nv, h)
                t[f"{a}.in_proj_a.weight"] = linear(nv, h)
            t[f"{a}.conv1d.weight"] = rng.standard_normal((conv, 1, k)) / np.sqrt(k)
            t[f"{a}.dt_bias"] = norm(nv)
            t[f"{a}.A_log"] = 0.1 * rng.standard_normal((nv,))
            t[f"{a}.norm.weight"] = norm(cfg["linear_value_head_dim"])
            t[f"{a}.out_proj.weight"] = linear(h, vd)
        else:
            a = f"{p}.self_attn"
            t[f"{a}.q_proj.weight"] = linear(2 * q_out, h)
            t[f"{a}.k_proj.weight"] = linear(kv_out, h)
            t[f"{a}.v_proj.weight"] = linear(kv_out, h)
            t[f"{a}.o_proj.weight"] = linear(h, q_out)
            t[f"{a}.q_norm.weight"] = offset_norm(HEAD_DIM)
            t[f"{a}.k_norm.weight"] = offset_norm(HEAD_DIM)
        m = f"{p}.mlp"
        t[f"{m}.gate.weight"] = linear(e, h)
        if arch == "qwen3_next":
            for x in range(e):
                t[f"{m}.experts.{x}.gate_proj.weight"] = linear(w, h)
                t[f"{m}.experts.{x}.up_proj.weight"] = linear(w, h)
                t[f"{m}.experts.{x}.down_proj.weight"] = linear(h, w)
        else:
            t[f"{m}.experts.gate_up_proj"] = np.stack(
                [np.concatenate([linear(w, h), linear(w, h)]) for _ in range(e)])
            t[f"{m}.experts.down_proj"] = np.stack([linear(h, w) for _ in range(e)])
        s = cfg["shared_expert_intermediate_size"]
        t[f"{m}.shared_expert.gate_proj.weight"] = linear(s, h)
        t[f"{m}.shared_expert.up_proj.weight"] = linear(s, h)
        t[f"{m}.shared_expert.down_proj.weight"] = linear(h, s)
        t[f"{m}.shared_expert_gate.weight"] = linear(1, h)
    t["model.norm.weight"] = offset_norm(h)
    t["lm_head.weight"] = linear(VOCAB, h)
    t["mtp.fc.weight"] = linear(h, 2 * h)
    if arch == "qwen3_5_moe":
        t = {("model.language_model." + n[len("model."):] if n.startswith("model.") else n): v
             for n, v in t.items()}
        t["model.visual.merger.mlp.0.weight"] = linear(h, h)
    return t


def deepseek_tensors(arch, cfg, rng, linear, norm, bias):
    """DeepSeek-V3 (MLA) and GLM-4.5 (GQA with biases and q/k norm); shared MoE block."""
    h, heads, e, w = cfg["hidden_size"], cfg["num_attention_heads"], cfg["n_routed_experts"], EXPERT_WIDTH
    t = {"model.embed_tokens.weight": rng.standard_normal((VOCAB, h))}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        t[f"{p}.input_layernorm.weight"] = norm(h)
        t[f"{p}.post_attention_layernorm.weight"] = norm(h)
        a = f"{p}.self_attn"
        if arch == "deepseek_v3":
            nope, rope, v, lora = (cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"],
                                   cfg["kv_lora_rank"])
            r = cfg["q_lora_rank"]
            t[f"{a}.q_a_proj.weight"] = linear(r, h)
            t[f"{a}.q_a_layernorm.weight"] = norm(r)
            t[f"{a}.q_b_proj.weight"] = linear(heads * (nope + rope), r)
            t[f"{a}.kv_a_proj_with_mqa.weight"] = linear(lora + rope, h)
            t[f"{a}.kv_a_layernorm.weight"] = norm(lora)
            t[f"{a}.kv_b_proj.weight"] = linear(heads * (nope + v), lora)
            t[f"{a}.o_proj.weight"] = linear(h, heads * v)
        else:
            d, kv = cfg["head_dim"], cfg["num_key_value_heads"]
            for n, out in [("q_proj", heads * d), ("k_proj", kv * d), ("v_proj", kv * d)]:
                t[f"{a}.{n}.weight"] = linear(out, h)
                t[f"{a}.{n}.bias"] = bias(out)
            t[f"{a}.o_proj.weight"] = linear(h, heads * d)
            t[f"{a}.q_norm.weight"] = norm(d)
            t[f"{a}.k_norm.weight"] = norm(d)
        m = f"{p}.mlp"
        if layer < cfg["first_k_dense_replace"]:
            i = cfg["intermediate_size"]
            t[f"{m}.gate_proj.weight"] = linear(i, h)
            t[f"{m}.up_proj.weight"] = linear(i, h)
            t[f"{m}.down_proj.weight"] = linear(h, i)
            continue
        t[f"{m}.gate.weight"] = linear(e, h)
        # float32 on disk, as DeepSeek ships it (write() keeps it so).
        t[f"{m}.gate.e_score_correction_bias"] = bias(e)
        for x in range(e):
            t[f"{m}.experts.{x}.gate_proj.weight"] = linear(w, h)
            t[f"{m}.experts.{x}.up_proj.weight"] = linear(w, h)
            t[f"{m}.experts.{x}.down_proj.weight"] = linear(h, w)
        s = w * cfg["n_shared_experts"]
        t[f"{m}.shared_experts.gate_proj.weight"] = linear(s, h)
        t[f"{m}.shared_experts.up_proj.weight"] = linear(s, h)
        t[f"{m}.shared_experts.down_proj.weight"] = linear(h, s)
    t["model.norm.weight"] = norm(h)
    t["lm_head.weight"] = linear(VOCAB, h)
    return t


def mxfp4(rng, experts, rows, cols, exponents):
    """Random MXFP4 weights in gpt-oss's on-disk layout: `blocks` [E, rows, cols/32, 16] uint8,
    two E2M1 codes a byte (the first in the low nibble), and `scales` [E, rows, cols/32] uint8,
    E8M0 exponents (127 is 1.0). The codes are the weights: nothing is rounded."""
    blocks = rng.integers(0, 256, (experts, rows, cols // 32, 16), dtype=np.uint8)
    scales = rng.integers(*exponents, (experts, rows, cols // 32), dtype=np.uint8)
    return blocks, scales


def gpt_oss_tensors(cfg, rng, linear, norm, bias):
    """gpt-oss as openai/gpt-oss-* ships it: bf16 attention (q/k/v/o with biases, a sink logit per
    head), a router with a bias, and MXFP4 experts with gate and up interleaved by row (gate the
    even rows), their biases interleaved the same way."""
    h, heads, kv, d = (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
                       cfg["head_dim"])
    e, w = cfg["num_local_experts"], cfg["intermediate_size"]
    t = {"model.embed_tokens.weight": rng.standard_normal((VOCAB, h))}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        t[f"{p}.input_layernorm.weight"] = norm(h)
        t[f"{p}.post_attention_layernorm.weight"] = norm(h)
        a = f"{p}.self_attn"
        for n, out, fan_in in [("q_proj", heads * d, h), ("k_proj", kv * d, h),
                               ("v_proj", kv * d, h), ("o_proj", h, heads * d)]:
            t[f"{a}.{n}.weight"] = linear(out, fan_in)
            t[f"{a}.{n}.bias"] = bias(out)
        t[f"{a}.sinks"] = rng.standard_normal((heads,))
        m = f"{p}.mlp"
        t[f"{m}.router.weight"] = linear(e, h)
        t[f"{m}.router.bias"] = bias(e)
        x = f"{m}.experts"
        t[f"{x}.gate_up_proj_blocks"], t[f"{x}.gate_up_proj_scales"] = mxfp4(
            rng, e, 2 * w, h, GPT_OSS_EXPONENTS["gate_up_proj"])
        t[f"{x}.gate_up_proj_bias"] = 0.5 * rng.standard_normal((e, 2 * w))
        t[f"{x}.down_proj_blocks"], t[f"{x}.down_proj_scales"] = mxfp4(
            rng, e, h, w, GPT_OSS_EXPONENTS["down_proj"])
        t[f"{x}.down_proj_bias"] = 0.5 * rng.standard_normal((e, h))
    t["model.norm.weight"] = norm(h)
    t["lm_head.weight"] = linear(VOCAB, h)
    return t


def tensors_for(arch, cfg, rng):
    def linear(out_dim, in_dim):
        return rng.standard_normal((out_dim, in_dim)) / np.sqrt(in_dim)

    def norm(dim):
        return 1.0 + 0.1 * rng.standard_normal((dim,))

    def bias(dim):
        return 0.1 * rng.standard_normal((dim,))

    if arch in ("deepseek_v3", "glm4_moe"):
        return deepseek_tensors(arch, cfg, rng, linear, norm, bias)
    if arch in ("qwen3_next", "qwen3_5_moe"):
        return hybrid_tensors(arch, cfg, rng, linear, norm)
    if arch == "gpt_oss":
        return gpt_oss_tensors(cfg, rng, linear, norm, bias)
    t = {"model.embed_tokens.weight": rng.standard_normal((VOCAB, HIDDEN))}
    q_out, kv_out = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    moe = "block_sparse_moe" if arch == "mixtral" else "mlp"
    for layer in range(LAYERS):
        p = f"model.layers.{layer}"
        t[f"{p}.input_layernorm.weight"] = norm(HIDDEN)
        t[f"{p}.post_attention_layernorm.weight"] = norm(HIDDEN)
        a = f"{p}.self_attn"
        t[f"{a}.q_proj.weight"] = linear(q_out, HIDDEN)
        t[f"{a}.k_proj.weight"] = linear(kv_out, HIDDEN)
        t[f"{a}.v_proj.weight"] = linear(kv_out, HIDDEN)
        t[f"{a}.o_proj.weight"] = linear(HIDDEN, q_out)
        if arch == "qwen3_moe":
            t[f"{a}.q_norm.weight"] = norm(HEAD_DIM)
            t[f"{a}.k_norm.weight"] = norm(HEAD_DIM)
        if arch == "olmoe":
            # OLMoE normalizes the whole projection, not each head.
            t[f"{a}.q_norm.weight"] = norm(q_out)
            t[f"{a}.k_norm.weight"] = norm(kv_out)
        if arch == "qwen2_moe":
            for n, d in [("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)]:
                t[f"{a}.{n}.bias"] = bias(d)
        m = f"{p}.{moe}"
        t[f"{m}.gate.weight"] = linear(EXPERTS, HIDDEN)
        for e in range(EXPERTS):
            x = f"{m}.experts.{e}"
            if arch == "mixtral":
                t[f"{x}.w1.weight"] = linear(EXPERT_WIDTH, HIDDEN)
                t[f"{x}.w3.weight"] = linear(EXPERT_WIDTH, HIDDEN)
                t[f"{x}.w2.weight"] = linear(HIDDEN, EXPERT_WIDTH)
            else:
                t[f"{x}.gate_proj.weight"] = linear(EXPERT_WIDTH, HIDDEN)
                t[f"{x}.up_proj.weight"] = linear(EXPERT_WIDTH, HIDDEN)
                t[f"{x}.down_proj.weight"] = linear(HIDDEN, EXPERT_WIDTH)
        if arch == "qwen2_moe":
            width = cfg["shared_expert_intermediate_size"]
            s = f"{m}.shared_expert"
            t[f"{s}.gate_proj.weight"] = linear(width, HIDDEN)
            t[f"{s}.up_proj.weight"] = linear(width, HIDDEN)
            t[f"{s}.down_proj.weight"] = linear(HIDDEN, width)
            t[f"{m}.shared_expert_gate.weight"] = linear(1, HIDDEN)
    t["model.norm.weight"] = norm(HIDDEN)
    t["lm_head.weight"] = linear(VOCAB, HIDDEN)
    return t


def write(arch, out, seed):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = config_for(arch)
    rng = np.random.default_rng([seed, SEED_INDEX[arch]])
    tensors = tensors_for(arch, cfg, rng)
    # MXFP4 blocks and scales (gpt-oss) are written as drawn, uint8.
    arrays = {k: mx.array(v if v.dtype == np.uint8 else v.astype(np.float32))
              for k, v in tensors.items()}
    arrays = {k: v if k.endswith("e_score_correction_bias") or v.dtype == mx.uint8
              else v.astype(mx.bfloat16) for k, v in arrays.items()}
    mx.save_safetensors(str(out / "model.safetensors"), arrays, metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    # mlx_lm convert insists on a tokenizer; any will do, the ids we feed stay below VOCAB.
    for name in TOKENIZER_FILES:
        shutil.copy(ROOT / "fixtures/qwen3moe-tiny" / name, out / name)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("arch", choices=sorted(CONFIGS))
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(write(args.arch, args.out, args.seed))


if __name__ == "__main__":
    main()
