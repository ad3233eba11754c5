//! DeepSeek-V3 / R1 and Kimi-K2 (`model_type` `kimi_k2`, the same network): its table entry
//! (config fields, tensor names, router, sanitize rules, expert layouts).
//!
//! In: a `config.json` with `model_type: "deepseek_v3"` or `"kimi_k2"`. Out: a [`ModelConfig`]
//! with multi-head latent attention ([`Mla`]), YaRN RoPE on the rotary part (interleaved pairs,
//! as mlx-lm's `traditional=True`), the sigmoid router with `e_score_correction_bias` for
//! selection, `n_group` / `topk_group` groups, `routed_scaling_factor`, `n_shared_experts`
//! ungated shared experts, and the first `first_k_dense_replace` layers dense (then every
//! `moe_layer_freq`-th). Multi-token-prediction layers past `num_hidden_layers` are not part of
//! the model (the loader drops them).
//! Experts on disk: `model.layers.L.mlp.experts.N.{gate,up,down}_proj.weight`; router
//! `mlp.gate.weight` [E, H] and `mlp.gate.e_score_correction_bias` [E]; shared experts
//! `mlp.shared_experts.{gate,up,down}_proj.weight`. Attention: `self_attn.q_proj` (or
//! `q_a_proj`, `q_a_layernorm`, `q_b_proj`), `kv_a_proj_with_mqa`, `kv_a_layernorm`,
//! `kv_b_proj` (mlx-lm splits it into `embed_q` and `unembed_out`), `o_proj`.
//!
//! Forward pass (mlx-lm 0.32.2 `mlx_lm/models/deepseek_v3.py`): multi-head latent attention
//! (model/mla.rs, chosen by `ModelConfig::mla`), YaRN RoPE on the rotary part. MoE
//! (`DeepseekV3MoE`): `group_expert_select` (sigmoid in f32, selection bias, group-limited top-k,
//! renormalisation, `routed_scaling_factor`), the weighted sum cast back to the activations' dtype,
//! plus the ungated shared experts. Dense first layers use the same SwiGLU MLP. Sanitize: mlx-lm
//! splits `kv_b_proj` per head into `embed_q` and `unembed_out` ([`Derive::SplitKvB`]).

use super::{
    Arch, ArchDef, ArchError, Defaults, Derive, Fields, Mla, ModelConfig, QkNorm, RouterConfig,
    RouterDef, Sanitize, Scoring, SharedExpert, SharedNames, TensorNames, TopKOrder,
};
use serde_json::Value;

pub(super) const DEF: ArchDef = ArchDef {
    model_type: "deepseek_v3",
    // MODEL_REMAPPING = {"kimi_k2": "deepseek_v3", ...}  (mlx-lm utils.py)
    aliases: &["kimi_k2"],
    upstream: &[
        "https://huggingface.co/deepseek-ai/DeepSeek-V3/blob/main/modeling_deepseek.py",
        "https://github.com/ml-explore/mlx-lm/blob/main/mlx_lm/models/deepseek_v3.py",
    ],
    parse,
    ..DEF_BODY
};

/// What the entries built on DeepSeek-V3's model share (Kimi K2.5, DeepSeek-V3.2, GLM-5): its
/// names, router, cast and sanitize rules; each writes its own `model_type`, `upstream` and
/// `parse`.
pub(super) const DEF_BODY: ArchDef = ArchDef {
    names: NAMES,
    router: ROUTER,
    // y = (y * scores[..., None]).sum(axis=-2).astype(y.dtype)
    cast_moe_output: true,
    sanitize: Sanitize {
        derive: &[Derive::SplitKvB],
        ..Sanitize::NONE
    },
    ..ArchDef::DEFAULT
};

/// `group_expert_select`, shared with GLM-4.5:
/// inds = mx.argpartition(-scores, kth=k - 1, axis=-1)[..., :k]
/// if top_k > 1 and norm_topk_prob: scores = scores / scores.sum(-1, keepdims=True)
pub(super) const ROUTER: RouterDef = RouterDef {
    renormalize_top1: false,
    ..RouterDef::config(TopKOrder::FirstOfNegated)
};

pub(super) const NAMES: TensorNames = TensorNames {
    shared: Some(SharedNames {
        mlp: "shared_experts",
        gate: "",
    }),
    ..TensorNames::DEFAULT
};

pub(super) fn parse(v: &Value) -> Result<ModelConfig, ArchError> {
    parse_as(v, Arch::DeepseekV3)
}

/// DeepSeek-V3's fields, for `arch` (GLM-4.5 shares the router and layer layout).
pub(super) fn router(f: &Fields<'_>) -> Result<RouterConfig, ArchError> {
    // mlx-lm's MoEGate asserts topk_method == "noaux_tc" and always scores with a sigmoid.
    let method = f.str_or("topk_method", "noaux_tc")?;
    if method != "noaux_tc" {
        return Err(ArchError::BadField {
            field: "topk_method",
            found: format!("{method:?}"),
            expected: "\"noaux_tc\" (the only router DeepSeek-V3 and GLM-4.5 ship)",
        });
    }
    let scoring = f.str_or("scoring_func", "sigmoid")?;
    if scoring != "sigmoid" {
        return Err(ArchError::BadField {
            field: "scoring_func",
            found: format!("{scoring:?}"),
            expected: "\"sigmoid\"",
        });
    }
    Ok(RouterConfig {
        scoring: Scoring::Sigmoid,
        selection_bias: true,
        n_group: f.usize_any(&["n_group"])?.unwrap_or(1),
        topk_group: f.usize_any(&["topk_group"])?.unwrap_or(1),
        routed_scaling_factor: f.f64_opt("routed_scaling_factor")?.unwrap_or(1.0),
    })
}

pub(super) fn parse_as(v: &Value, arch: Arch) -> Result<ModelConfig, ArchError> {
    let f = Fields::new(v, arch);
    // Defaults of mlx-lm's deepseek_v3 ModelArgs where a config may omit a field.
    let d = Defaults {
        rope_theta: 10_000.0,
        rms_norm_eps: 1e-6,
        norm_topk_prob: true,
        attention_bias: false,
        qk_norm: QkNorm::None,
    };
    let mut cfg = f.common(&d)?;
    cfg.moe_intermediate_size = f.usize_req(&["moe_intermediate_size"])?;
    // q_lora_rank: a number, or null for a plain q_proj (DeepSeek-V2-Lite style); it must be
    // written either way, since the two read different tensors.
    if !f.has("q_lora_rank") {
        return Err(ArchError::MissingField {
            field: "q_lora_rank",
            arch: arch.model_type(),
        });
    }
    let mla = Mla {
        q_lora_rank: f.usize_any(&["q_lora_rank"])?,
        kv_lora_rank: f.usize_req(&["kv_lora_rank"])?,
        qk_nope_head_dim: f.usize_req(&["qk_nope_head_dim"])?,
        qk_rope_head_dim: f.usize_req(&["qk_rope_head_dim"])?,
        v_head_dim: f.usize_req(&["v_head_dim"])?,
        no_rope: false,
        output_gate: false,
    };
    // self.q_head_dim = qk_nope_head_dim + qk_rope_head_dim; every head is a query head.
    cfg.head_dim = mla.qk_nope_head_dim + mla.qk_rope_head_dim;
    cfg.num_key_value_heads = cfg.num_attention_heads;
    cfg.mla = Some(mla);
    // self.rope = initialize_rope(qk_rope_head_dim, traditional=True, ...)
    cfg.rope.traditional = true;
    cfg.router = router(&f)?;
    cfg.shared_expert = SharedExpert::experts(
        f.usize_any(&["n_shared_experts"])?.unwrap_or(0),
        cfg.moe_intermediate_size,
    );
    cfg.first_k_dense_replace = f.usize_any(&["first_k_dense_replace"])?.unwrap_or(0);
    cfg.moe_layer_freq = f.usize_any(&["moe_layer_freq"])?.unwrap_or(1);
    Ok(cfg)
}
