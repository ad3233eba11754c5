//! GLM-4.5 / 4.6 / 4.7 (`glm4_moe`): its table entry (config fields, tensor names, router,
//! sanitize rules, expert layouts).
//!
//! In: a `config.json` with `model_type: "glm4_moe"`. Out: a [`ModelConfig`] with grouped-query
//! attention whose q/k/v carry a bias (`attention_bias`), optional per-head q/k RMSNorm
//! (`use_qk_norm`), RoPE on the first `partial_rotary_factor` of each head, DeepSeek-V3's
//! sigmoid router (selection bias, groups, scaling), `n_shared_experts` ungated shared experts,
//! and the first `first_k_dense_replace` layers dense (mlx-lm's glm4_moe.py reads no
//! `moe_layer_freq`). The multi-token-prediction layer (`num_nextn_predict_layers`) past
//! `num_hidden_layers` is not part of the model (the loader drops it).
//! Tensor names are DeepSeek-V3's for the MoE block; attention is `q_proj`, `k_proj`, `v_proj`
//! (with `.bias`), `o_proj`, `q_norm`, `k_norm`.
//!
//! Forward pass (mlx-lm 0.32.2 `mlx_lm/models/glm4_moe.py`): grouped-query attention with q/k/v
//! biases, per-head q/k RMSNorm when `use_qk_norm`, and `nn.RoPE(int(head_dim *
//! partial_rotary_factor))` (the shared block in model/attention.rs). MoE: DeepSeek-V3's
//! `group_expert_select` and shared experts, the weighted sum cast back to the activations' dtype.

use super::{
    deepseek_v3, Arch, ArchDef, ArchError, Defaults, Fields, ModelConfig, QkNorm, SharedExpert,
};
use serde_json::Value;

pub(super) const DEF: ArchDef = ArchDef {
    model_type: "glm4_moe",
    upstream: &[
        "https://github.com/huggingface/transformers/blob/main/src/transformers/models/glm4_moe/modeling_glm4_moe.py",
        "https://github.com/ml-explore/mlx-lm/blob/main/mlx_lm/models/glm4_moe.py",
    ],
    parse,
    // DeepSeek-V3's MoE block names (`mlp.gate`, `mlp.experts.N`, `mlp.shared_experts`).
    names: deepseek_v3::NAMES,
    router: deepseek_v3::ROUTER,
    // y = (y * scores[..., None]).sum(axis=-2).astype(y.dtype)
    cast_moe_output: true,
    ..ArchDef::DEFAULT
};


pub(super) fn parse(v: &Value) -> Result<ModelConfig, ArchError> {
    let f = Fields::new(v, Arch::Glm4Moe);
    // Defaults of transformers' Glm4MoeConfig where a config may omit a field.
    let d = Defaults {
        rope_theta: 10_000.0,
        rms_norm_eps: 1e-5,
        norm_topk_prob: true,
        attention_bias: false,
        qk_norm: QkNorm::None,
    };
    let mut cfg = f.common(&d)?;
    cfg.moe_intermediate_size = f.usize_req(&["moe_intermediate_size"])?;
    // self.q_norm = nn.RMSNorm(head_dim, eps) when use_qk_norm, applied per head.
    if f.bool_or("use_qk_norm", false)? {
        cfg.qk_norm = QkNorm::PerHead;
    }
    cfg.partial_rotary_factor = f.f64_opt("partial_rotary_factor")?.unwrap_or(0.5);
    cfg.router = deepseek_v3::router(&f)?;
    cfg.shared_expert = SharedExpert::experts(
        f.usize_any(&["n_shared_experts"])?.unwrap_or(1),
        cfg.moe_intermediate_size,
    );
    cfg.first_k_dense_replace = f.usize_any(&["first_k_dense_replace"])?.unwrap_or(1);
    Ok(cfg)
}
