//! gpt-oss (20B / 120B): its table entry (config fields, tensor names, router,
//! sanitize rules, expert layouts).
//!
//! In: a `config.json` with `model_type: "gpt_oss"`. Out: a [`ModelConfig`] where every layer
//! is sparse, the expert width is `intermediate_size`, q/k/v/o carry biases, each head has a
//! learned attention sink (`self_attn.sinks`), layers alternate sliding-window (`sliding_window`,
//! 128) and full attention as `layer_types` says, RoPE is YaRN, and the experts are clamped
//! SwiGLU (`swiglu_limit`, alpha 1.702, `up + 1`) with a bias on each projection. The router is
//! a linear layer with a bias; the top-k logits are chosen first, then softmaxed (mlx-lm
//! gpt_oss.py `MLPBlock`), so the k weights always sum to one.
//! Experts on disk (Hugging Face, MXFP4): `model.layers.L.mlp.experts.gate_up_proj_blocks`
//! `[E, 2I, H/32, 16]` u8 and `gate_up_proj_scales` `[E, 2I, H/32]` u8 (E8M0), gate and up rows
//! interleaved (gate the even rows); `gate_up_proj_bias` `[E, 2I]` (interleaved the same way);
//! `down_proj_blocks` `[E, H, I/32, 16]`, `down_proj_scales`, `down_proj_bias` `[E, H]`.
//! mlx-lm's folders: `mlp.experts.{gate,up,down}_proj.{weight,scales,bias}` stacked `[E, ..]`.
//! Router: `mlp.router.weight` `[E, H]` and `mlp.router.bias` `[E]`.
//!
//! Forward pass (mlx-lm 0.32.2 `mlx_lm/models/gpt_oss.py`). Attention (`AttentionBlock`): q/k/v/o
//! with biases, YaRN RoPE, a learned sink per head passed to `scaled_dot_product_attention(...,
//! sinks=self.sinks)`, and a window of `sliding_window` positions on the layers `layer_types` marks
//! `sliding_attention` (a rotating KV cache there). MoE (`MLPBlock`): `router` is a linear layer
//! with a bias; `mlx_topk` takes `argpartition(g, kth=-k)[..., -k:]` of the logits, then
//! `softmax(precise=True)` over the k chosen; experts are `SwitchGLU(..., activation=SwigluOAI(),
//! bias=True)`: each projection's output gets its expert's bias, and the activation is the clamped
//! SwiGLU (model/moe.rs); the weighted sum is left in the scores' dtype.

use super::{
    Arch, ArchDef, ArchError, ClampedSwiglu, Defaults, ExpertLayout, Fields, ModelConfig, QkNorm,
    RouterDef, Scoring, SlidingWindow, TensorNames, TopKOrder,
};
use serde_json::Value;

pub(super) const DEF: ArchDef = ArchDef {
    model_type: "gpt_oss",
    upstream: &[
        "https://github.com/huggingface/transformers/blob/main/src/transformers/models/gpt_oss/modeling_gpt_oss.py",
        "https://github.com/ml-explore/mlx-lm/blob/main/mlx_lm/models/gpt_oss.py",
    ],
    parse,
    names: TensorNames {
        // mlx-lm stacks them under `experts` (`SwitchGLU` named `experts` in `MLPBlock`).
        stacked_module: "experts",
        router: "router",
        ..TensorNames::DEFAULT
    },
    // partitioned_indices = mx.argpartition(a, kth=-k, axis=axis); [..., -k:]
    // expert_weights = mx.softmax(experts, axis=-1, precise=True)
    router: RouterDef {
        scoring: Some(Scoring::SoftmaxOfChosen),
        ..RouterDef::config(TopKOrder::LastOf)
    },
    // y = x.sum(axis=-2), no cast
    cast_moe_output: false,
    // OpenAI's MXFP4 release, mlx-lm's conversion of it, or transformers' float layout (its
    // bf16 re-export and every fine-tune it saves).
    expert_layouts: &[
        ExpertLayout::MxBlocks,
        ExpertLayout::Stacked,
        ExpertLayout::FusedColumns,
    ],
    fused_layout: ExpertLayout::FusedColumns,
    ..ArchDef::DEFAULT
};

/// `SwigluOAI(alpha=1.702, limit=7.0)` (mlx-lm models/activations.py).
pub(super) const SWIGLU_ALPHA: f64 = 1.702;

pub(super) fn parse(v: &Value) -> Result<ModelConfig, ArchError> {
    let f = Fields::new(v, Arch::GptOss);
    // Defaults of mlx-lm's gpt_oss ModelArgs where a config may omit a field.
    let d = Defaults {
        rope_theta: 150_000.0,
        rms_norm_eps: 1e-5,
        norm_topk_prob: true,
        attention_bias: true,
        qk_norm: QkNorm::None,
    };
    let mut cfg = f.common(&d)?;
    // expert_weights = mx.softmax(experts, axis=-1, precise=True): top-k logits, then softmax.
    cfg.norm_topk_prob = true;
    cfg.moe_intermediate_size = cfg.intermediate_size;
    cfg.decoder_sparse_step = 1;
    cfg.mlp_only_layers.clear();
    // nn.Linear(..., bias=True) for q, k, v and o whatever the config says.
    cfg.attention_bias = true;
    cfg.attention_sinks = true;
    cfg.expert_bias = true;
    cfg.clamped_swiglu = Some(ClampedSwiglu {
        alpha: SWIGLU_ALPHA,
        limit: f.f64_opt("swiglu_limit")?.unwrap_or(7.0),
    });
    let size = f.usize_any(&["sliding_window"])?.unwrap_or(128);
    let n = cfg.num_hidden_layers;
    // layer_types or ["sliding_attention", "full_attention"] * (num_hidden_layers // 2)
    let types: Vec<&str> = match f.layer_types(n)? {
        Some(t) => t,
        None => (0..n)
            .map(|l| {
                if l % 2 == 0 {
                    "sliding_attention"
                } else {
                    "full_attention"
                }
            })
            .collect(),
    };
    let mut layers = Vec::new();
    for (l, t) in types.iter().enumerate() {
        match *t {
            "sliding_attention" => layers.push(l),
            "full_attention" => {}
            other => {
                return Err(ArchError::BadField {
                    field: "layer_types",
                    found: format!("{other:?}"),
                    expected: "\"sliding_attention\" or \"full_attention\"",
                })
            }
        }
    }
    cfg.sliding_window = Some(SlidingWindow { size, layers });
    Ok(cfg)
}
