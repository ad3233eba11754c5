//! Qwen3-MoE: config fields and tensor names.
//!
//! In: a `config.json` with `model_type: "qwen3_moe"`. Out: a [`ModelConfig`] with per-head q/k
//! RMSNorm, no shared expert, sparse layers chosen by `decoder_sparse_step` / `mlp_only_layers`.
//! Experts on disk: `model.layers.L.mlp.experts.N.{gate,up,down}_proj.weight`; router
//! `model.layers.L.mlp.gate.weight` [E, H].

use super::{Arch, ArchError, Defaults, Fields, ModelConfig, QkNorm, TensorNames};
use serde_json::Value;

pub(super) const UPSTREAM: &[&str] = &[
    "https://github.com/huggingface/transformers/blob/main/src/transformers/models/qwen3_moe/modeling_qwen3_moe.py",
    "https://github.com/ml-explore/mlx-lm/blob/main/mlx_lm/models/qwen3_moe.py",
];

pub(super) const NAMES: TensorNames = TensorNames::DEFAULT;

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
