//! Mixtral forward-pass details, mirroring mlx-lm 0.32.2 `mlx_lm/models/mixtral.py`
//! (https://github.com/ml-explore/mlx-lm/blob/main/mlx_lm/models/mixtral.py).
//!
//! Attention: no q/k norm, no biases. MoE (`MixtralSparseMoeBlock.__call__`): top-k on the raw
//! router logits, then softmax over the k chosen (so the weights always sum to 1); experts are
//! `block_sparse_moe.switch_mlp` (w1 = gate, w3 = up, w2 = down).

use super::router::{RouterScoring, RouterSpec, TopKOrder};
use super::Spec;
use crate::arch::ModelConfig;

pub(super) const SPEC: Spec = Spec {
    router,
    cast_moe_output: false,
};

fn router(cfg: &ModelConfig) -> RouterSpec {
    // inds = mx.argpartition(-gates, kth=k - 1, axis=-1)[..., :k]
    // scores = mx.take_along_axis(gates, inds, axis=-1)
    // scores = mx.softmax(scores, axis=-1, precise=True)
    RouterSpec {
        scoring: RouterScoring::SoftmaxOfChosen,
        // The softmax over the chosen already sums to one (arch/mixtral.rs sets norm_topk_prob).
        renormalize: false,
        ..RouterSpec::from_config(cfg, TopKOrder::FirstOfNegated)
    }
}
