#!/usr/bin/env python3
"""What a pack of the largest open MoE models needs at a given memory budget, from their shapes alone.

No download: the shapes are those of the models' published config.json (or pass --config FILE).
For each model: parameters by kind; pack sizes at 4-bit affine (group 64, bf16 scales and biases: 4.5 bits
per weight) with every expert at 4 bits, and with the coldest experts at 2 bits; the KV cache per token
(MLA's compressed latent for deepseek_v3 / kimi_k2 and kimi_k3's MLA layers, GQA keys and values otherwise;
kimi_k3's Kimi Delta Attention layers hold a fixed-size state instead); and, for budgets of common
machines, how much of the experts stays resident and how many expert bytes a token reads from disk when
routing is uniform (hit rate = resident share; real routing is skewed, so real hit rates are higher).

  python3 scripts/memory_table.py [--context 8192] [--disk-gbs 5] [--config FILE ...]
"""
import argparse
import json

MODELS = {
    # https://huggingface.co/deepseek-ai/DeepSeek-V3/blob/main/config.json
    "DeepSeek-V3 / R1": dict(model_type="deepseek_v3", hidden_size=7168, num_hidden_layers=61,
                             intermediate_size=18432, moe_intermediate_size=2048, n_routed_experts=256,
                             n_shared_experts=1, num_experts_per_tok=8, first_k_dense_replace=3,
                             num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512,
                             qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, vocab_size=129280,
                             tie_word_embeddings=False),
    # https://huggingface.co/moonshotai/Kimi-K2-Instruct/blob/main/config.json
    "Kimi K2": dict(model_type="kimi_k2", hidden_size=7168, num_hidden_layers=61, intermediate_size=18432,
                    moe_intermediate_size=2048, n_routed_experts=384, n_shared_experts=1,
                    num_experts_per_tok=8, first_k_dense_replace=1, num_attention_heads=64, q_lora_rank=1536,
                    kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                    vocab_size=163840, tie_word_embeddings=False),
    # https://huggingface.co/zai-org/GLM-4.5/blob/main/config.json (the MTP layer is dropped)
    "GLM-4.5": dict(model_type="glm4_moe", hidden_size=5120, num_hidden_layers=92, intermediate_size=12288,
                    moe_intermediate_size=1536, n_routed_experts=160, n_shared_experts=1,
                    num_experts_per_tok=8, first_k_dense_replace=3, num_attention_heads=96,
                    num_key_value_heads=8, head_dim=128, vocab_size=151552, tie_word_embeddings=False),
    # https://huggingface.co/MiniMaxAI/MiniMax-M2/blob/main/config.json (every layer sparse, no shared expert)
    "MiniMax-M2": dict(model_type="minimax", hidden_size=3072, num_hidden_layers=62, intermediate_size=1536,
                       moe_intermediate_size=1536, n_routed_experts=256, n_shared_experts=0,
                       num_experts_per_tok=8, first_k_dense_replace=0, num_attention_heads=48,
                       num_key_value_heads=8, head_dim=128, vocab_size=200064, tie_word_embeddings=False),
    # google/gemma-4-26b-a4b's text model (Gemma4TextConfig; 25.2 B parameters, 3.8 B active): 25 sliding
    # layers (window 1,024) of 8 KV heads of 256 and 5 full-attention layers of 2 KV heads of 512 whose
    # values are their keys; a dense GeGLU MLP of 2,112 beside 128 experts of 704 in every layer, tied head.
    "Gemma 4 26B-A4B": dict(model_type="gemma4_text", hidden_size=2816, num_hidden_layers=30,
                            intermediate_size=2112, moe_intermediate_size=704, n_routed_experts=128,
                            n_shared_experts=0, num_experts_per_tok=8, first_k_dense_replace=0,
                            num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                            global_layers=5, global_head_dim=512, num_global_key_value_heads=2,
                            sliding_window=1024, dense_mlp_beside_experts=True, vocab_size=262144,
                            tie_word_embeddings=True),
}

BITS4 = 4 + 2 * 16 / 64   # codes + bf16 scale and bias per group of 64
BITS2 = 2 + 2 * 16 / 64
BUDGETS_GB = [32, 64, 96, 128, 192, 256, 512]


def kimi_k3(c):
    """A Kimi-K3 config.json (flat or under text_config) in this script's keys: KDA layers beside MLA ones."""
    t = dict(c.get("text_config") or c)
    t["n_routed_experts"] = t.get("num_experts") or 0
    t["n_shared_experts"] = t.get("num_shared_experts", 0)
    t["num_experts_per_tok"] = t.get("num_experts_per_token", 16)
    t.setdefault("first_k_dense_replace", 0)
    t.setdefault("tie_word_embeddings", False)
    return t


def kda_layer(c):
    """Kimi Delta Attention: (weights of one layer, bytes of its state at any context)."""
    h, la = c["hidden_size"], c["linear_attn_config"]
    nh, d, k = la["num_heads"], la["head_dim"], la["short_conv_kernel_size"]
    p = nh * d
    gate = h * p if la.get("use_full_rank_gate") else h * d + d * p
    # qkv_proj, its depthwise conv, f_a/f_b (the decay), b_proj, the output gate, o_proj
    weights = 3 * p * h + 3 * p * k + h * d + d * p + h * nh + gate + p * h
    # the convolution's last k - 1 inputs in bf16, the recurrent state [heads, d, d] in f32
    state = (k - 1) * 3 * p * 2 + nh * d * d * 4
    return weights, state


def params(c):
    if c.get("model_type") == "kimi_k3":
        c = kimi_k3(c)
    h, L = c["hidden_size"], c["num_hidden_layers"]
    state = 0
    if c.get("linear_attn_config"):
        # Kimi-K3: KDA on the 1-based kda_layers, MLA without RoPE (and optionally gated) on the others;
        # only the MLA layers' latent and key grow with the context. The attention residuals' weights
        # (two [H] vectors per mix) are too small to show.
        kda = len(c["linear_attn_config"]["kda_layers"])
        nh = c["num_attention_heads"]
        qk = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
        q = (h * c["q_lora_rank"] + c["q_lora_rank"] * nh * qk) if c.get("q_lora_rank") else h * nh * qk
        kv = h * (c["kv_lora_rank"] + c["qk_rope_head_dim"]) \
            + c["kv_lora_rank"] * nh * (c["qk_nope_head_dim"] + c["v_head_dim"])
        gate = h * nh * c["v_head_dim"] if c.get("mla_use_output_gate") else 0
        mla = q + kv + gate + nh * c["v_head_dim"] * h
        kda_weights, kda_state = kda_layer(c)
        attn = ((L - kda) * mla + kda * kda_weights) / L
        kv_per_token = (L - kda) * (c["kv_lora_rank"] + c["qk_rope_head_dim"]) * 2
        state = kda * kda_state
    elif c.get("kv_lora_rank"):
        nh = c["num_attention_heads"]
        qk = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
        q = (h * c["q_lora_rank"] + c["q_lora_rank"] * nh * qk) if c.get("q_lora_rank") else h * nh * qk
        kv = h * (c["kv_lora_rank"] + c["qk_rope_head_dim"]) \
            + c["kv_lora_rank"] * nh * (c["qk_nope_head_dim"] + c["v_head_dim"])
        attn = q + kv + nh * c["v_head_dim"] * h
        kv_per_token = L * (c["kv_lora_rank"] + c["qk_rope_head_dim"]) * 2
    elif c.get("global_layers"):
        # Gemma 4: sliding layers with q/k/v/o; full layers of their own head width with keys as values
        # (no v_proj). Only the full layers' cache grows with the context.
        nh, nkv, d = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
        g, gkv, gd = c["global_layers"], c["num_global_key_value_heads"], c["global_head_dim"]
        sliding = h * nh * d + 2 * h * nkv * d + nh * d * h
        full = h * nh * gd + h * gkv * gd + nh * gd * h
        attn = ((L - g) * sliding + g * full) / L
        kv_per_token = g * 2 * gkv * gd * 2
    else:
        nh, nkv, d = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
        attn = h * nh * d + 2 * h * nkv * d + nh * d * h
        kv_per_token = L * 2 * nkv * d * 2
    dense_layers = L if c.get("dense_mlp_beside_experts") else c["first_k_dense_replace"]
    moe_layers = L - c["first_k_dense_replace"]
    # Kimi-K3's latent MoE: experts on routed_expert_hidden_size values, beside a down and an up
    # projection per MoE layer (counted with the routers, resident).
    latent = c.get("routed_expert_hidden_size") or 0
    expert = 3 * (latent or h) * c["moe_intermediate_size"]
    out = {
        "attention": L * attn,
        "dense MLPs": dense_layers * 3 * h * c["intermediate_size"],
        "shared experts": moe_layers * c["n_shared_experts"] * expert,
        "routers": moe_layers * (c["n_routed_experts"] * h + 2 * latent * h),
        "embeddings + head": (1 if c["tie_word_embeddings"] else 2) * c["vocab_size"] * h,
        "routed experts": moe_layers * c["n_routed_experts"] * expert,
    }
    return out, expert, moe_layers, kv_per_token, state


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--disk-gbs", type=float, default=5.0, help="SSD read speed, GB/s")
    ap.add_argument("--config", nargs="*", default=[])
    a = ap.parse_args()
    models = dict(MODELS)
    for f in a.config:
        models[f] = json.load(open(f))
    for name, c in models.items():
        if c.get("model_type") == "kimi_k3":
            c = kimi_k3(c)
        p, expert, moe_layers, kv_tok, state = params(c)
        dense = sum(v for k, v in p.items() if k != "routed experts")
        experts = p["routed experts"]
        dense_gb = dense * BITS4 / 8 / 1e9
        experts_gb = experts * BITS4 / 8 / 1e9
        expert_mb = expert * BITS4 / 8 / 1e6
        kv_gb = kv_tok * a.context / 1e9
        k = c["num_experts_per_tok"]
        print(f"\n### {name} ({c['model_type']})\n")
        print("| part | parameters | 4-bit (4.5 bits/weight) |\n|---|---:|---:|")
        for part, n in p.items():
            print(f"| {part} | {n / 1e9:.2f} B | {n * BITS4 / 8 / 1e9:.1f} GB |")
        print(f"| **total** | {(dense + experts) / 1e9:.1f} B | {dense_gb + experts_gb:.1f} GB |")
        print(f"\nOne routed expert: {expert / 1e6:.1f} M weights, {expert_mb:.1f} MB at 4 bits; "
              f"{k} per token in each of {moe_layers} MoE layers = {k * moe_layers} expert reads per token "
              f"when nothing is cached ({k * moe_layers * expert_mb / 1e3:.1f} GB). KV cache: "
              f"{kv_tok / 1e3:.1f} KB per token, {kv_gb:.2f} GB at {a.context} tokens"
              + (f", plus {state / 1e6:.1f} MB of linear-attention state at any context. " if state else ". ")
              + "With the coldest half of the experts at 2 bits the experts take "
              + f"{experts * (BITS4 + BITS2) / 2 / 8 / 1e9:.0f} GB.\n")
        print(f"| --mem-budget | experts resident | share | expert GB read per token at that hit rate "
              f"| tokens/s bound at {a.disk_gbs:g} GB/s |\n|---:|---:|---:|---:|---:|")
        for b in BUDGETS_GB:
            room = b - dense_gb - kv_gb - state / 1e9
            if room <= k * moe_layers * expert_mb / 1e3 / moe_layers:
                print(f"| {b} GB | does not fit (dense {dense_gb:.1f} GB + KV {kv_gb:.2f} GB) | | | |")
                continue
            share = min(room / experts_gb, 1.0)
            read = (1 - share) * k * moe_layers * expert_mb / 1e3
            bound = "memory-bound" if read == 0 else f"{a.disk_gbs / read:.2f}"
            print(f"| {b} GB | {room:.0f} GB | {share:.0%} | {read:.2f} | {bound} |")


if __name__ == "__main__":
    main()
