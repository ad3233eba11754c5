//! Qwen2-MoE forward-pass details, mirroring mlx-lm 0.32.2 `mlx_lm/models/qwen2_moe.py`
//! (https://github.com/ml-explore/mlx-lm/blob/main/mlx_lm/models/qwen2_moe.py).
//!
//! Attention: q/k/v biases (o_proj has none), no q/k norm. MoE (`Qwen2MoeSparseMoeBlock`):
//! softmax over all experts, top-k by `argpartition(-gates, kth=k-1)[..., :k]`, then a shared
//! expert every token goes through, scaled by `sigmoid(shared_expert_gate(x))` (the shared
//! block in `moe.rs`, loaded from `ModelConfig::shared_expert`, `gated: true`).
//! Where mlx-lm and transformers differ we follow the config as transformers does:
//! mlx-lm ignores `norm_topk_prob`, `decoder_sparse_step` and `mlp_only_layers` for this
//! architecture; released Qwen2-MoE checkpoints set them so that both agree (false, 1, []).

use super::router::{RouterSpec, TopKOrder};
use super::Spec;
use crate::arch::ModelConfig;

pub(super) const SPEC: Spec = Spec {
    router,
    cast_moe_output: false,
};

fn router(cfg: &ModelConfig) -> RouterSpec {
    // gates = mx.softmax(gates, axis=-1, precise=True)
    // inds = mx.stop_gradient(mx.argpartition(-gates, kth=k - 1, axis=-1)[..., :k])
    // scores = mx.take_along_axis(gates, inds, axis=-1)
    RouterSpec::from_config(cfg, TopKOrder::FirstOfNegated)
}
