//! GLM-4.5 forward-pass details, mirroring mlx-lm 0.32.2 `mlx_lm/models/glm4_moe.py`
//! (https://github.com/ml-explore/mlx-lm/blob/main/mlx_lm/models/glm4_moe.py).
//!
//! Attention: grouped-query with q/k/v biases, per-head q/k RMSNorm when `use_qk_norm`, and
//! `nn.RoPE(int(head_dim * partial_rotary_factor))` (the shared block in `attention.rs`). MoE:
//! DeepSeek-V3's `group_expert_select` and shared experts, the weighted sum cast back to the
//! activations' dtype.

use super::router::{RouterSpec, TopKOrder};
use super::Spec;
use crate::arch::ModelConfig;

pub(super) const SPEC: Spec = Spec {
    router,
    // y = (y * scores[..., None]).sum(axis=-2).astype(y.dtype)
    cast_moe_output: true,
};

fn router(cfg: &ModelConfig) -> RouterSpec {
    // inds = mx.argpartition(-scores, kth=k - 1, axis=-1)[..., :k]
    // if top_k > 1 and norm_topk_prob: scores = scores / scores.sum(-1, keepdims=True)
    RouterSpec {
        renormalize: cfg.norm_topk_prob && cfg.num_experts_per_tok > 1,
        ..RouterSpec::from_config(cfg, TopKOrder::FirstOfNegated)
    }
}
