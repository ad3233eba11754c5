//! Qwen3-MoE: its table entry (config fields, tensor names, router,
//! sanitize rules, expert layouts).
//!
//! In: a `config.json` with `model_type: "qwen3_moe"`. Out: a [`ModelConfig`] with per-head q/k
//! RMSNorm, no shared expert, sparse layers chosen by `decoder_sparse_step` / `mlp_only_layers`.
//! Experts on disk: `model.layers.L.mlp.experts.N.{gate,up,down}_proj.weight`; router
//! `model.layers.L.mlp.gate.weight` [E, H].
//!
//! Forward pass (mlx-lm 0.32.2 `mlx_lm/models/qwen3_moe.py`): per-head q/k RMSNorm before RoPE
//! (`Attention.__call__`), no biases. MoE (`Qwen3MoeSparseMoeBlock.__call__`): softmax over all
//! experts, top-k by `argpartition(gates, kth=-k)[..., -k:]`, optional renormalization
//! (`norm_topk_prob`), the weighted sum cast back to the activations' dtype. Layers outside
//! `decoder_sparse_step` / `mlp_only_layers` use a dense SwiGLU MLP of `intermediate_size`.

use super::{
    Arch, ArchDef, ArchError, Defaults, Fields, ModelConfig, QkNorm, RouterDef, TensorNames,
    TopKOrder,
};
use serde_json::Value;

pub(super) const DEF: ArchDef = ArchDef {
    model_type: "qwen3_moe",
    upstream: &[
            "https://github.com/huggingface/transformers/blob/main/src/transformers/models/qwen3_moe/modeling_qwen3_moe.py",
        "https://github.com/ml-explore/mlx-lm/blob/main/mlx_lm/models/qwen3_moe.py",
    ],
    parse,
    names: TensorNames::DEFAULT,
    // gates = mx.softmax(gates, axis=-1, precise=True)
    // inds = mx.argpartition(gates, kth=-k, axis=-1)[..., -k:]
    // scores = mx.take_along_axis(gates, inds, axis=-1)
    // if self.norm_topk_prob: scores /= mx.sum(scores, axis=-1, keepdims=True)
    router: RouterDef::config(TopKOrder::LastOf),
    // y = (y * scores[..., None]).sum(axis=-2).astype(y.dtype)
    cast_moe_output: true,
    ..ArchDef::DEFAULT
};


pub(super) fn parse(v: &Value) -> Result<ModelConfig, ArchError> {
    let f = Fields::new(v, Arch::Qwen3Moe);
    // Defaults of transformers' Qwen3MoeConfig.
    let d = Defaults {
        rope_theta: 10_000.0,
        rms_norm_eps: 1e-6,
        norm_topk_prob: false,
        attention_bias: false,
        // self.q_norm = Qwen3MoeRMSNorm(self.head_dim, ...)  (modeling_qwen3_moe.py)
        qk_norm: QkNorm::PerHead,
    };
    let mut cfg = f.common(&d)?;
    // Qwen3-MoE names the expert width moe_intermediate_size; it is required.
    cfg.moe_intermediate_size = f.usize_req(&["moe_intermediate_size"])?;
    Ok(cfg)
}
