//! Qwen2-MoE: its table entry (config fields, tensor names, router,
//! sanitize rules, expert layouts).
//!
//! In: a `config.json` with `model_type: "qwen2_moe"`. Out: a [`ModelConfig`] with q/k/v biases,
//! no q/k norm, and a sigmoid-gated shared expert in every sparse layer.
//! Experts on disk: `model.layers.L.mlp.experts.N.{gate,up,down}_proj.weight`; router
//! `mlp.gate.weight` [E, H]; shared expert `mlp.shared_expert.{gate,up,down}_proj.weight`
//! (dense policy) and its gate `mlp.shared_expert_gate.weight` [1, H] (full precision).
//!
//! Forward pass (mlx-lm 0.32.2 `mlx_lm/models/qwen2_moe.py`): q/k/v biases (o_proj has none), no
//! q/k norm. MoE (`Qwen2MoeSparseMoeBlock`): softmax over all experts, top-k by
//! `argpartition(-gates, kth=k-1)[..., :k]`, then a shared expert every token goes through, scaled
//! by `sigmoid(shared_expert_gate(x))` (the shared block in model/moe.rs, loaded from
//! `ModelConfig::shared_expert`, `gated: true`). Where mlx-lm and transformers differ we follow
//! the config as transformers does: mlx-lm ignores `norm_topk_prob`, `decoder_sparse_step` and
//! `mlp_only_layers` for this architecture; released Qwen2-MoE checkpoints set them so that both
//! agree (false, 1, []).

use super::{
    Arch, ArchDef, ArchError, Defaults, Fields, ModelConfig, QkNorm, RouterDef, SharedExpert,
    SharedNames, TensorNames, TopKOrder,
};
use serde_json::Value;

pub(super) const DEF: ArchDef = ArchDef {
    model_type: "qwen2_moe",
    upstream: &[
            "https://github.com/huggingface/transformers/blob/main/src/transformers/models/qwen2_moe/modeling_qwen2_moe.py",
        "https://github.com/ml-explore/mlx-lm/blob/main/mlx_lm/models/qwen2_moe.py",
    ],
    parse,
    names: TensorNames {
        // mx.sigmoid(self.shared_expert_gate(x)) * shared_expert_output  (mlx-lm qwen2_moe.py):
        // a one-row gate that scales a whole branch; quantizing it buys nothing.
        keep_full: &["shared_expert_gate"],
        shared: Some(SharedNames {
            mlp: "shared_expert",
            gate: "shared_expert_gate",
        }),
        ..TensorNames::DEFAULT
    },
    // gates = mx.softmax(gates, axis=-1, precise=True)
    // inds = mx.stop_gradient(mx.argpartition(-gates, kth=k - 1, axis=-1)[..., :k])
    // scores = mx.take_along_axis(gates, inds, axis=-1)
    router: RouterDef::config(TopKOrder::FirstOfNegated),
    ..ArchDef::DEFAULT
};


pub(super) fn parse(v: &Value) -> Result<ModelConfig, ArchError> {
    let f = Fields::new(v, Arch::Qwen2Moe);
    // Defaults of transformers' Qwen2MoeConfig; q/k/v always carry a bias
    // (nn.Linear(dim, n_heads * head_dim, bias=True) in mlx-lm qwen2_moe.py).
    let d = Defaults {
        rope_theta: 1_000_000.0,
        rms_norm_eps: 1e-6,
        norm_topk_prob: false,
        attention_bias: true,
        qk_norm: QkNorm::None,
    };
    let mut cfg = f.common(&d)?;
    cfg.attention_bias = f.bool_or("qkv_bias", true)?;
    cfg.moe_intermediate_size = f.usize_req(&["moe_intermediate_size"])?;
    let shared = f.usize_req(&["shared_expert_intermediate_size"])?;
    cfg.shared_expert = (shared > 0).then_some(SharedExpert {
        intermediate_size: shared,
        gated: true,
    });
    Ok(cfg)
}
