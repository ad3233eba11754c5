//! Qwen3-Next (Qwen3-Next-80B-A3B, Qwen3-Coder-Next): its table entry (config fields, tensor
//! names, router, sanitize rules, expert layouts).
//!
//! In: a `config.json` with `model_type: "qwen3_next"`. Out: a [`ModelConfig`] with Gated
//! DeltaNet linear attention ([`LinearAttention`], fused `in_proj_qkvz` / `in_proj_ba`) in every
//! layer but each `full_attention_interval`-th, which is gated full attention (`q_proj` twice as
//! wide, its second half the output gate; per-head q/k RMSNorm; RoPE on the first
//! `partial_rotary_factor` of each head), softmax top-k routing, and a sigmoid-gated shared
//! expert. The RMSNorm weights of a Hugging Face checkpoint are stored offset by one
//! (`1 + w`); the loader adds the one, as mlx-lm's `sanitize` does (convert/load/derived.rs).
//! Tensors: `model.layers.L.linear_attn.{in_proj_qkvz,in_proj_ba,conv1d,dt_bias,A_log,norm,
//! out_proj}` or `model.layers.L.self_attn.{q,k,v,o}_proj`, `q_norm`, `k_norm`; experts
//! `mlp.experts.N.{gate,up,down}_proj.weight`, router `mlp.gate.weight`, shared expert
//! `mlp.shared_expert.*` and `mlp.shared_expert_gate.weight`. The multi-token-prediction
//! module (`mtp.*`) is not part of the model (the loader drops it).
//!
//! Forward pass (mlx-lm 0.32.2 `mlx_lm/models/qwen3_next.py`): Gated DeltaNet linear attention
//! (model/gated_delta.rs, with its convolution and recurrent state in the layer's cache) in every
//! layer but each `full_attention_interval`-th, which is the gated full attention of
//! model/attention.rs (`q_proj` also gives a sigmoid output gate; per-head q/k norm; partial
//! rotary). MoE (`Qwen3NextSparseMoeBlock`): softmax over all experts, top-k by
//! `argpartition(gates, kth=-k)[..., -k:]`, optional renormalisation, the weighted sum left in the
//! scores' dtype (no cast), then the shared expert scaled by `sigmoid(shared_expert_gate(x))`
//! (model/moe.rs). Sanitize: the norms' offset by one is undone at conversion
//! ([`Derive::NormsPlusOne`]).

use super::{
    Arch, ArchDef, ArchError, Defaults, DeltaProjections, Derive, Fields, LinearAttention,
    ModelConfig, QkNorm, RouterDef, Sanitize, SharedExpert, SharedNames, TensorNames, TopKOrder,
};
use serde_json::Value;

pub(super) const DEF: ArchDef = ArchDef {
    model_type: "qwen3_next",
    upstream: &[
        "https://github.com/huggingface/transformers/blob/main/src/transformers/models/qwen3_next/modeling_qwen3_next.py",
        "https://github.com/ml-explore/mlx-lm/blob/main/mlx_lm/models/qwen3_next.py",
    ],
    parse,
    names: NAMES,
    router: ROUTER,
    // y = (y * scores[..., None]).sum(axis=-2): no cast
    sanitize: SANITIZE,
    ..ArchDef::DEFAULT
};

/// Shared with Qwen3.5:
/// gates = mx.softmax(gates, axis=-1, precise=True)
/// inds = mx.argpartition(gates, kth=-k, axis=-1)[..., -k:]
/// scores = mx.take_along_axis(gates, inds, axis=-1)
/// if self.norm_topk_prob: scores = scores / scores.sum(axis=-1, keepdims=True)
pub(super) const ROUTER: RouterDef = RouterDef::config(TopKOrder::LastOf);

/// Shared with Qwen3.5: `weights[k] = v + 1.0` for these norms in a Hugging Face checkpoint
/// (qwen3_next.py / qwen3_5.py `sanitize`); not the gated norm of the linear attention,
/// `linear_attn.norm`.
pub(super) const SANITIZE: Sanitize = Sanitize {
    derive: &[Derive::NormsPlusOne(&[
        ".input_layernorm.weight",
        ".post_attention_layernorm.weight",
        "model.norm.weight",
        ".q_norm.weight",
        ".k_norm.weight",
    ])],
    ..Sanitize::NONE
};

pub(super) const NAMES: TensorNames = TensorNames {
    // mx.sigmoid(self.shared_expert_gate(x)) * shared_y: a one-row gate, kept full.
    keep_full: &["shared_expert_gate"],
    shared: Some(SharedNames {
        mlp: "shared_expert",
        gate: "shared_expert_gate",
    }),
    ..TensorNames::DEFAULT
};

pub(super) fn parse(v: &Value) -> Result<ModelConfig, ArchError> {
    parse_text(&Fields::new(v, Arch::Qwen3Next), DeltaProjections::Qkvz)
}

/// The text model's fields, shared with Qwen3.5 (`qwen3_5_moe.rs`), which reads them from its
/// `text_config` and names its projections apart.
pub(super) fn parse_text(
    f: &Fields<'_>,
    projections: DeltaProjections,
) -> Result<ModelConfig, ArchError> {
    // Defaults of mlx-lm's ModelArgs (qwen3_next.py) where a config may omit a field;
    // mlx-lm's qwen3_5.py defaults norm_topk_prob to true (set by the caller).
    let d = Defaults {
        rope_theta: 10_000.0,
        rms_norm_eps: 1e-6,
        norm_topk_prob: false,
        attention_bias: false,
        // self.q_norm = nn.RMSNorm(self.head_dim, eps=args.rms_norm_eps), per head
        qk_norm: QkNorm::PerHead,
    };
    let mut cfg = f.common(&d)?;
    cfg.moe_intermediate_size = f.usize_req(&["moe_intermediate_size"])?;
    let shared = f.usize_req(&["shared_expert_intermediate_size"])?;
    // self.shared_expert = Qwen3NextMLP(dim, shared_expert_intermediate_size) with its gate.
    cfg.shared_expert = (shared > 0).then_some(SharedExpert {
        intermediate_size: shared,
        gated: true,
    });
    cfg.partial_rotary_factor = f.f64_opt("partial_rotary_factor")?.unwrap_or(0.25);
    cfg.attn_output_gate = true;
    // layer_types, where given, says which layers are full attention (transformers 5 writes
    // it and no full_attention_interval); else every full_attention_interval-th layer.
    let (full_attention_interval, full_attention_layers) =
        match f.layer_types(cfg.num_hidden_layers)? {
            Some(types) => full_attention_from(&types)?,
            None => (
                f.usize_any(&["full_attention_interval"])?.unwrap_or(4),
                None,
            ),
        };
    cfg.linear_attention = Some(LinearAttention {
        full_attention_interval,
        full_attention_layers,
        num_key_heads: f.usize_req(&["linear_num_key_heads"])?,
        num_value_heads: f.usize_req(&["linear_num_value_heads"])?,
        key_head_dim: f.usize_req(&["linear_key_head_dim"])?,
        value_head_dim: f.usize_req(&["linear_value_head_dim"])?,
        conv_kernel_dim: f.usize_req(&["linear_conv_kernel_dim"])?,
        projections,
        gate_lower_bound: None,
        full_rank_gate: false,
    });
    Ok(cfg)
}

/// The full-attention layers `layer_types` names (each entry `"linear_attention"` or
/// `"full_attention"`): as an interval when every `n`-th layer and only those are full
/// attention (what mlx-lm's `full_attention_interval` can say), else as a list with interval 0.
pub(super) fn full_attention_from(types: &[&str]) -> Result<(usize, Option<Vec<usize>>), ArchError> {
    let mut full = Vec::new();
    for (l, t) in types.iter().enumerate() {
        match *t {
            "full_attention" => full.push(l),
            "linear_attention" => {}
            other => {
                return Err(ArchError::BadField {
                    field: "layer_types",
                    found: format!("{other:?} (layer {l})"),
                    expected: "\"linear_attention\" or \"full_attention\"",
                })
            }
        }
    }
    let n = full.first().map_or(0, |&l| l + 1);
    let periodic = n > 0 && (0..types.len()).all(|l| ((l + 1) % n == 0) == full.contains(&l));
    Ok(if periodic { (n, None) } else { (0, Some(full)) })
}
