//! Mixtral: its table entry (config fields, tensor names, router,
//! sanitize rules, expert layouts).
//!
//! In: a `config.json` with `model_type: "mixtral"`. Out: a [`ModelConfig`] where every layer
//! is sparse, the expert width is `intermediate_size`, and top-k weights are always
//! renormalised (Mixtral takes the softmax over the selected logits).
//! Experts on disk: `model.layers.L.block_sparse_moe.experts.N.w1/w3.weight` (gate/up, [I, H])
//! and `w2.weight` (down, [H, I]); router `block_sparse_moe.gate.weight` [E, H]. transformers 5.x
//! renames the block to `mlp` in memory (`mlp.experts.gate_up_proj`), which is accepted too.
//!
//! Forward pass (mlx-lm 0.32.2 `mlx_lm/models/mixtral.py`): no q/k norm, no biases. MoE
//! (`MixtralSparseMoeBlock.__call__`): top-k on the raw router logits, then softmax over the k
//! chosen (so the weights always sum to 1); experts are `block_sparse_moe.switch_mlp` (w1 = gate,
//! w3 = up, w2 = down).

use super::{
    Arch, ArchDef, ArchError, Defaults, Fields, ModelConfig, QkNorm, RouterDef, Scoring,
    TensorNames, TopKOrder,
};
use serde_json::Value;

pub(super) const DEF: ArchDef = ArchDef {
    model_type: "mixtral",
    upstream: &[
            "https://github.com/huggingface/transformers/blob/main/src/transformers/models/mixtral/modeling_mixtral.py",
        "https://github.com/ml-explore/mlx-lm/blob/main/mlx_lm/models/mixtral.py",
    ],
    parse,
    names: TensorNames {
        // WeightRenaming(".block_sparse_moe.", ".mlp.")  (transformers conversion_mapping.py)
        moe_blocks: &["block_sparse_moe", "mlp"],
        expert_projs: ["w1", "w3", "w2"],
        ..TensorNames::DEFAULT
    },
    // inds = mx.argpartition(-gates, kth=k - 1, axis=-1)[..., :k]
    // scores = mx.take_along_axis(gates, inds, axis=-1)
    // scores = mx.softmax(scores, axis=-1, precise=True)
    router: RouterDef {
        scoring: Some(Scoring::SoftmaxOfChosen),
        ..RouterDef::config(TopKOrder::FirstOfNegated)
    },
    ..ArchDef::DEFAULT
};


pub(super) fn parse(v: &Value) -> Result<ModelConfig, ArchError> {
    let f = Fields::new(v, Arch::Mixtral);
    // Defaults of transformers' MixtralConfig (default_theta = 1000000.0).
    let d = Defaults {
        rope_theta: 1_000_000.0,
        rms_norm_eps: 1e-5,
        norm_topk_prob: true,
        attention_bias: false,
        qk_norm: QkNorm::None,
    };
    let mut cfg = f.common(&d)?;
    // scores = mx.softmax(mx.take_along_axis(gates, inds, axis=-1))  (mlx-lm mixtral.py):
    // the selected weights always sum to one, whatever the config says.
    cfg.norm_topk_prob = true;
    cfg.moe_intermediate_size = cfg.intermediate_size;
    // Mixtral has no dense layers; ignore stray sparse-step keys.
    cfg.decoder_sparse_step = 1;
    cfg.mlp_only_layers.clear();
    Ok(cfg)
}
