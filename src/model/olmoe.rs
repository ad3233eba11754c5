//! OLMoE forward-pass details, mirroring mlx-lm 0.32.2 `mlx_lm/models/olmoe.py`
//! (https://github.com/ml-explore/mlx-lm/blob/main/mlx_lm/models/olmoe.py).
//!
//! Attention: q/k RMSNorm over the full projected width (`nn.RMSNorm(n_heads * head_dim)`),
//! applied before the head reshape; biases when the checkpoint has them (`attention_bias`).
//! MoE (`OlmoeSparseMoeBlock.__call__`): softmax over all experts, top-k by
//! `argpartition(-weights, kth=k-1)[..., :k]`, renormalized only with `norm_topk_prob`.
//! mlx-lm flattens tokens to `[B*L, H]` around the block; per-token results are the same.

use super::router::{RouterSpec, TopKOrder};
use super::Spec;
use crate::arch::ModelConfig;

pub(super) const SPEC: Spec = Spec {
    router,
    cast_moe_output: false,
};

fn router(cfg: &ModelConfig) -> RouterSpec {
    // routing_weights = mx.softmax(router_logits, axis=1, precise=True)
    // indices = mx.argpartition(-routing_weights, kth=k - 1, axis=-1)[..., :k]
    // scores = mx.take_along_axis(routing_weights, indices, axis=-1)
    // if self.norm_topk_prob: scores = scores / scores.sum(axis=-1, keepdims=True)
    RouterSpec::from_config(cfg, TopKOrder::FirstOfNegated)
}
