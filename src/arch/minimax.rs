//! MiniMax-M2 (`minimax`, also `minimax_m2`): its table entry (config fields, tensor names,
//! router, sanitize rules, expert layouts).
//!
//! In: a `config.json` with `model_type: "minimax"` or `"minimax_m2"`. Out: a [`ModelConfig`]
//! where every layer is sparse, the expert width is `intermediate_size`, q/k RMSNorm spans the
//! full projected width (`use_qk_norm`), and RoPE rotates the first `rotary_dim` values of each
//! head.
//! Experts on disk: `model.layers.L.block_sparse_moe.experts.N.w1/w3.weight` (gate/up, [I, H])
//! and `w2.weight` (down, [H, I]), or mlx-lm's `block_sparse_moe.switch_mlp`; router
//! `block_sparse_moe.gate.weight` [E, H] and its selection bias
//! `block_sparse_moe.e_score_correction_bias` [E] (on the block, not the gate: a pack stores it
//! as `block_sparse_moe.gate.e_score_correction_bias`, where the shared router reads it). The
//! upstream checkpoint is FP8 with 128x128 block scales (read as any FP8 source).
//!
//! Forward pass (mlx-lm 0.32.2 `mlx_lm/models/minimax.py`): `q_norm` / `k_norm` over
//! `heads * head_dim` before the head reshape, `nn.RoPE(rotary_dim, traditional=False)`, no
//! biases. MoE (`MiniMaxSparseMoeBlock.__call__`): `gates = self.gate(x.astype(mx.float32))`,
//! `scores = mx.sigmoid(gates)`, experts chosen by `argpartition(-(scores + bias), kth=k-1)`,
//! weighted by their unbiased scores over their sum (`+ 1e-20`, which changes no f32 sum of
//! sigmoids above 1e-13), cast to the input's type; `(y * scores[..., None]).sum(-2)` with no
//! cast. `shared_intermediate_size` is read by mlx-lm's ModelArgs and used by nothing: no shared
//! expert.

use super::{
    Arch, ArchDef, ArchError, Defaults, Fields, ModelConfig, QkNorm, RouterConfig, RouterDef,
    Sanitize, Scoring, TensorNames, TopKOrder,
};
use serde_json::Value;
use std::borrow::Cow;

pub(super) const DEF: ArchDef = ArchDef {
    model_type: "minimax",
    aliases: &["minimax_m2"],
    upstream: &[
        "https://huggingface.co/MiniMaxAI/MiniMax-M2/blob/main/modeling_minimax_m2.py",
        "https://github.com/ml-explore/mlx-lm/blob/main/mlx_lm/models/minimax.py",
    ],
    parse,
    names: TensorNames {
        // transformers 5.x renames the block `mlp` in memory, as for Mixtral.
        moe_blocks: &["block_sparse_moe", "mlp"],
        expert_projs: ["w1", "w3", "w2"],
        ..TensorNames::DEFAULT
    },
    // gates = self.gate(x.astype(mx.float32)); scores = mx.sigmoid(gates)
    // inds = mx.argpartition(-(scores + bias), kth=k - 1, axis=-1)[..., :k]
    // scores = take(orig_scores) / (sum + 1e-20); scores = scores.astype(x.dtype)
    router: RouterDef {
        scoring: Some(Scoring::Sigmoid),
        f32_input: true,
        weights_in_input_dtype: true,
        ..RouterDef::config(TopKOrder::FirstOfNegated)
    },
    // y = (y * scores[..., None]).sum(axis=-2): already in the input's type.
    cast_moe_output: false,
    sanitize: Sanitize {
        rename: bias_under_the_gate,
        ..Sanitize::NONE
    },
    ..ArchDef::DEFAULT
};

/// The block's `e_score_correction_bias` moves under its gate, where the shared router reads a
/// selection bias; every other name is its own.
fn bias_under_the_gate(name: &str) -> Option<Cow<'_, str>> {
    for block in ["block_sparse_moe", "mlp"] {
        if let Some(layer) = name.strip_suffix(&format!(".{block}.e_score_correction_bias")) {
            return Some(Cow::Owned(format!(
                "{layer}.{block}.gate.e_score_correction_bias"
            )));
        }
    }
    Some(Cow::Borrowed(name))
}

pub(super) fn parse(v: &Value) -> Result<ModelConfig, ArchError> {
    let f = Fields::new(v, Arch::Minimax);
    // Defaults of mlx-lm's ModelArgs (minimax.py) where a config may omit a field.
    let d = Defaults {
        rope_theta: 10_000.0,
        rms_norm_eps: 1e-6,
        norm_topk_prob: true,
        attention_bias: false,
        qk_norm: QkNorm::FullWidth,
    };
    let mut cfg = f.common(&d)?;
    if !f.bool_or("use_qk_norm", true)? {
        cfg.qk_norm = QkNorm::None;
    }
    // SwitchGLU(hidden_size, intermediate_size, num_local_experts) in every layer.
    cfg.moe_intermediate_size = cfg.intermediate_size;
    cfg.decoder_sparse_step = 1;
    cfg.mlp_only_layers.clear();
    // The weights are always renormalised; the bias is always there.
    cfg.norm_topk_prob = true;
    cfg.router = RouterConfig {
        scoring: Scoring::Sigmoid,
        selection_bias: true,
        ..RouterConfig::default()
    };
    // self.rope = nn.RoPE(args.rotary_dim, ...)
    let rotary = f.usize_req(&["rotary_dim"])?;
    if rotary == 0 || rotary > cfg.head_dim {
        return Err(ArchError::BadField {
            field: "rotary_dim",
            found: rotary.to_string(),
            expected: "between 1 and head_dim",
        });
    }
    cfg.partial_rotary_factor = rotary as f64 / cfg.head_dim as f64;
    if cfg.rope_dims() != rotary {
        return Err(ArchError::Inconsistent {
            what: format!(
                "rotary_dim {rotary} over head_dim {} does not round-trip as a factor",
                cfg.head_dim
            ),
        });
    }
    Ok(cfg)
}
