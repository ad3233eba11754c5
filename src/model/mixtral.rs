//! Mixtral forward-pass details, mirroring mlx-lm 0.32.2 `mlx_lm/models/mixtral.py`
//! (https://github.com/ml-explore/mlx-lm/blob/main/mlx_lm/models/mixtral.py).
//!
//! Attention: no q/k norm, no biases. MoE (`MixtralSparseMoeBlock.__call__`): top-k on the raw
//! router logits, then softmax over the k chosen (so the weights always sum to 1); experts are
//! `block_sparse_moe.switch_mlp` (w1 = gate, w3 = up, w2 = down).

use super::moe::{first_k, Routing};
use super::{no_shared, ComputeError, Spec};
use crate::mlx::Array;

pub(super) const SPEC: Spec = Spec {
    route,
    cast_moe_output: false,
    add_shared: no_shared,
};

fn route(logits: &Array, k: usize, _norm_topk_prob: bool) -> Result<Routing, ComputeError> {
    let k = k as i32;
    // inds = mx.argpartition(-gates, kth=k - 1, axis=-1)[..., :k]
    let indices = first_k(&logits.neg()?.argpartition(k - 1, -1)?, k)?;
    // scores = mx.take_along_axis(gates, inds, axis=-1)
    // scores = mx.softmax(scores, axis=-1, precise=True)
    let scores = logits.take_along_axis(&indices, -1)?.softmax(-1, true)?;
    Ok(Routing { indices, scores })
}
