//! OLMoE: its table entry (config fields, tensor names, router,
//! sanitize rules, expert layouts).
//!
//! In: a `config.json` with `model_type: "olmoe"`. Out: a [`ModelConfig`] where every layer is
//! sparse, the expert width is `intermediate_size`, and q/k RMSNorm spans the full projected
//! width (`heads * head_dim`), not one head.
//! Experts on disk: `model.layers.L.mlp.experts.N.{gate,up,down}_proj.weight`; router
//! `model.layers.L.mlp.gate.weight` [E, H].
//!
//! Forward pass (mlx-lm 0.32.2 `mlx_lm/models/olmoe.py`): q/k RMSNorm over the full projected
//! width (`nn.RMSNorm(n_heads * head_dim)`), applied before the head reshape; biases when the
//! checkpoint has them (`attention_bias`). MoE (`OlmoeSparseMoeBlock.__call__`): softmax over all
//! experts, top-k by `argpartition(-weights, kth=k-1)[..., :k]`, renormalized only with
//! `norm_topk_prob`. mlx-lm flattens tokens to `[B*L, H]` around the block; per-token results are
//! the same.

use super::{
    Arch, ArchDef, ArchError, Defaults, Fields, ModelConfig, QkNorm, RouterDef, TensorNames,
    TopKOrder,
};
use serde_json::Value;

pub(super) const DEF: ArchDef = ArchDef {
    model_type: "olmoe",
    upstream: &[
            "https://github.com/huggingface/transformers/blob/main/src/transformers/models/olmoe/modeling_olmoe.py",
        "https://github.com/ml-explore/mlx-lm/blob/main/mlx_lm/models/olmoe.py",
    ],
    parse,
    names: TensorNames::DEFAULT,
    // routing_weights = mx.softmax(router_logits, axis=1, precise=True)
    // indices = mx.argpartition(-routing_weights, kth=k - 1, axis=-1)[..., :k]
    // scores = mx.take_along_axis(routing_weights, indices, axis=-1)
    // if self.norm_topk_prob: scores = scores / scores.sum(axis=-1, keepdims=True)
    router: RouterDef::config(TopKOrder::FirstOfNegated),
    ..ArchDef::DEFAULT
};


pub(super) fn parse(v: &Value) -> Result<ModelConfig, ArchError> {
    let f = Fields::new(v, Arch::Olmoe);
    // Defaults of transformers' OlmoeConfig.
    let d = Defaults {
        rope_theta: 10_000.0,
        rms_norm_eps: 1e-5,
        norm_topk_prob: false,
        attention_bias: false,
        // self.q_norm = nn.RMSNorm(n_heads * head_dim, args.rms_norm_eps)  (mlx-lm olmoe.py)
        qk_norm: QkNorm::FullWidth,
    };
    let mut cfg = f.common(&d)?;
    // OLMoE's experts are intermediate_size wide (SwitchGLU(hidden, intermediate_size, E)).
    cfg.moe_intermediate_size = cfg.intermediate_size;
    cfg.decoder_sparse_step = 1;
    cfg.mlp_only_layers.clear();
    cfg.clip_qkv = f.f64_opt("clip_qkv")?;
    Ok(cfg)
}
