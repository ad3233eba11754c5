//! Qwen3.5 / Qwen3.6 MoE forward-pass details, mirroring mlx-lm 0.32.2
//! `mlx_lm/models/qwen3_5.py` (the text model `qwen3_5_moe.py` wraps), which reuses
//! Qwen3-Next's attention, gated norm and sparse block (`qwen3_next.rs`): only the linear
//! attention's input projections differ (`in_proj_qkv`, `in_proj_z`, `in_proj_b`, `in_proj_a`,
//! `gated_delta.rs`), and every layer is sparse.

use super::Spec;

pub(super) const SPEC: Spec = Spec {
    router: super::qwen3_next::router,
    // SparseMoeBlock is Qwen3NextSparseMoeBlock: y = (y * scores[..., None]).sum(axis=-2)
    cast_moe_output: false,
};
