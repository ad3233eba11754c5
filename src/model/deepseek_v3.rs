//! DeepSeek-V3 / Kimi-K2 forward-pass details, mirroring mlx-lm 0.32.2
//! `mlx_lm/models/deepseek_v3.py` (https://github.com/ml-explore/mlx-lm/blob/main/mlx_lm/models/deepseek_v3.py).
//!
//! Attention: multi-head latent attention (`mla.rs`, chosen by `ModelConfig::mla`), YaRN RoPE
//! on the rotary part. MoE (`DeepseekV3MoE`): `group_expert_select` (sigmoid in f32, selection
//! bias, group-limited top-k, renormalisation, `routed_scaling_factor`), the weighted sum cast
//! back to the activations' dtype, plus the ungated shared experts. Dense first layers use the
//! same SwiGLU MLP.

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
