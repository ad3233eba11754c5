//! Qwen3-MoE forward-pass details, mirroring mlx-lm 0.32.2 `mlx_lm/models/qwen3_moe.py`
//! (https://github.com/ml-explore/mlx-lm/blob/main/mlx_lm/models/qwen3_moe.py).
//!
//! Attention: per-head q/k RMSNorm before RoPE (`Attention.__call__`), no biases.
//! MoE (`Qwen3MoeSparseMoeBlock.__call__`): softmax over all experts, top-k by
//! `argpartition(gates, kth=-k)[..., -k:]`, optional renormalization (`norm_topk_prob`), the
//! weighted sum cast back to the activations' dtype. Layers outside `decoder_sparse_step` /
//! `mlp_only_layers` use a dense SwiGLU MLP of `intermediate_size`.

use super::router::{RouterSpec, TopKOrder};
use super::Spec;
use crate::arch::ModelConfig;

pub(super) const SPEC: Spec = Spec {
    router,
    cast_moe_output: true,
};

fn router(cfg: &ModelConfig) -> RouterSpec {
    // gates = mx.softmax(gates, axis=-1, precise=True)
    // inds = mx.argpartition(gates, kth=-k, axis=-1)[..., -k:]
    // scores = mx.take_along_axis(gates, inds, axis=-1)
    // if self.norm_topk_prob: scores /= mx.sum(scores, axis=-1, keepdims=True)
    RouterSpec::from_config(cfg, TopKOrder::LastOf)
}
