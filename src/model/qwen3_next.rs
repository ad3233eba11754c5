//! Qwen3-Next forward-pass details, mirroring mlx-lm 0.32.2 `mlx_lm/models/qwen3_next.py`
//! (https://github.com/ml-explore/mlx-lm/blob/main/mlx_lm/models/qwen3_next.py).
//!
//! Layers: Gated DeltaNet linear attention (`gated_delta.rs`, with its convolution and
//! recurrent state in the layer's cache) in every layer but each `full_attention_interval`-th,
//! which is the gated full attention of `attention.rs` (`q_proj` also gives a sigmoid output
//! gate; per-head q/k norm; partial rotary). MoE (`Qwen3NextSparseMoeBlock`): softmax over all
//! experts, top-k by `argpartition(gates, kth=-k)[..., -k:]`, optional renormalisation, the
//! weighted sum left in the scores' dtype (no cast), then the shared expert scaled by
//! `sigmoid(shared_expert_gate(x))` (`moe.rs`). The norms' offset by one is undone at load.

use super::router::{RouterSpec, TopKOrder};
use super::Spec;
use crate::arch::ModelConfig;

pub(super) const SPEC: Spec = Spec {
    router,
    // y = (y * scores[..., None]).sum(axis=-2)
    cast_moe_output: false,
};

pub(super) fn router(cfg: &ModelConfig) -> RouterSpec {
    // gates = mx.softmax(gates, axis=-1, precise=True)
    // inds = mx.argpartition(gates, kth=-k, axis=-1)[..., -k:]
    // scores = mx.take_along_axis(gates, inds, axis=-1)
    // if self.norm_topk_prob: scores = scores / scores.sum(axis=-1, keepdims=True)
    RouterSpec::from_config(cfg, TopKOrder::LastOf)
}
