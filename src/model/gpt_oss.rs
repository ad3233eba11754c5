//! gpt-oss forward-pass details, mirroring mlx-lm 0.32.2 `mlx_lm/models/gpt_oss.py`
//! (https://github.com/ml-explore/mlx-lm/blob/main/mlx_lm/models/gpt_oss.py).
//!
//! Attention (`AttentionBlock`): q/k/v/o with biases, YaRN RoPE, a learned sink per head passed
//! to `scaled_dot_product_attention(..., sinks=self.sinks)`, and a window of `sliding_window`
//! positions on the layers `layer_types` marks `sliding_attention` (a rotating KV cache there).
//! MoE (`MLPBlock`): `router` is a linear layer with a bias; `mlx_topk` takes
//! `argpartition(g, kth=-k)[..., -k:]` of the logits, then `softmax(precise=True)` over the k
//! chosen; experts are `SwitchGLU(..., activation=SwigluOAI(), bias=True)`: each projection's
//! output gets its expert's bias, and the activation is the clamped SwiGLU (`moe.rs`); the
//! weighted sum is left in the scores' dtype.

use super::router::{RouterScoring, RouterSpec, TopKOrder};
use super::Spec;
use crate::arch::ModelConfig;

pub(super) const SPEC: Spec = Spec {
    router,
    // y = x.sum(axis=-2), no cast
    cast_moe_output: false,
};

fn router(cfg: &ModelConfig) -> RouterSpec {
    // partitioned_indices = mx.argpartition(a, kth=-k, axis=axis); [..., -k:]
    // expert_weights = mx.softmax(experts, axis=-1, precise=True)
    RouterSpec {
        scoring: RouterScoring::SoftmaxOfChosen,
        renormalize: false,
        ..RouterSpec::from_config(cfg, TopKOrder::LastOf)
    }
}
