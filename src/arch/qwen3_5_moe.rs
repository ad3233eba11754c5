//! Qwen3.5 / Qwen3.6 MoE (`qwen3_5_moe`: Qwen3.5-397B-A17B, Qwen3.6-35B-A3B): its table entry
//! (config fields, tensor names, router, sanitize rules, expert layouts).
//!
//! In: a `config.json` with `model_type: "qwen3_5_moe"`, either multimodal (the text model's
//! fields under `text_config`, beside a `vision_config`) or text-only (the same fields at the
//! top level), as mlx-lm's `ModelArgs.from_dict` accepts both. Out: Qwen3-Next's model
//! (`qwen3_next.rs`: Gated DeltaNet linear attention, gated full attention with partial
//! rotary, a sigmoid-gated shared expert, norms stored offset by one in Hugging Face
//! checkpoints) with the linear attention's projections split (`in_proj_qkv`, `in_proj_z`,
//! `in_proj_b`, `in_proj_a`), every layer sparse, and RoPE settings under `rope_parameters`.
//! Tensor names: the multimodal checkpoints hold the text model under
//! `model.language_model.*` and a vision tower under `model.visual.*` (dropped); mlx-lm's
//! folders hold it under `language_model.*` ([`text_model_name`]). Experts are
//! fused (`mlp.experts.gate_up_proj` `[E, 2I, H]`, `mlp.experts.down_proj` `[E, H, I]`) or
//! mlx-lm's stacked `switch_mlp`. The multi-token-prediction module (`mtp.*`) is dropped.
//!
//! Forward pass (mlx-lm 0.32.2 `mlx_lm/models/qwen3_5.py`, the text model `qwen3_5_moe.py`
//! wraps): Qwen3-Next's attention, gated norm and sparse block (`qwen3_next.rs`): only the linear
//! attention's input projections differ (`in_proj_qkv`, `in_proj_z`, `in_proj_b`, `in_proj_a`,
//! model/gated_delta.rs), and every layer is sparse. `SparseMoeBlock` is
//! `Qwen3NextSparseMoeBlock`: `y = (y * scores[..., None]).sum(axis=-2)`, no cast.

use super::{qwen3_next, Arch, ArchDef, ArchError, DeltaProjections, Fields, ModelConfig, Sanitize};
use serde_json::Value;
use std::borrow::Cow;

pub(super) const DEF: ArchDef = ArchDef {
    model_type: "qwen3_5_moe",
    upstream: &[
        "https://github.com/huggingface/transformers/blob/main/src/transformers/models/qwen3_5_moe/modeling_qwen3_5_moe.py",
        "https://github.com/ml-explore/mlx-lm/blob/main/mlx_lm/models/qwen3_5_moe.py",
        "https://github.com/ml-explore/mlx-lm/blob/main/mlx_lm/models/qwen3_5.py",
    ],
    parse,
    names: qwen3_next::NAMES,
    router: qwen3_next::ROUTER,
    sanitize: Sanitize {
        rename: text_model_name,
        ..qwen3_next::SANITIZE
    },
    ..ArchDef::DEFAULT
};

/// Multimodal checkpoints hold the language model under `model.language_model.*` beside a
/// vision tower (`model.visual.*`), and mlx-lm's folders under `language_model.*` (mlx-lm
/// qwen3_5_moe.py `sanitize`); every other name is its own.
fn text_model_name(name: &str) -> Option<Cow<'_, str>> {
    // if key.startswith("vision_tower") or key.startswith("model.visual"): continue
    if name.starts_with("vision_tower") || name.starts_with("model.visual") {
        return None;
    }
    if let Some(rest) = name.strip_prefix("model.language_model.") {
        return Some(Cow::Owned(format!("model.{rest}")));
    }
    if let Some(rest) = name.strip_prefix("language_model.") {
        return Some(Cow::Owned(rest.to_string()));
    }
    Some(Cow::Borrowed(name))
}

pub(super) fn parse(v: &Value) -> Result<ModelConfig, ArchError> {
    // if "text_config" not in params: text_config = params
    let text = match v.get("text_config") {
        None | Some(Value::Null) => v.clone(),
        Some(Value::Object(t)) => {
            let mut t = t.clone();
            // Token ids are often written at the top level only.
            for key in ["bos_token_id", "eos_token_id"] {
                if !t.contains_key(key) {
                    if let Some(x) = v.get(key) {
                        t.insert(key.into(), x.clone());
                    }
                }
            }
            Value::Object(t)
        }
        Some(x) => {
            return Err(ArchError::BadField {
                field: "text_config",
                found: x.to_string(),
                expected: "an object holding the text model's fields",
            })
        }
    };
    let mut text = text;
    if let Value::Object(t) = &mut text {
        // Every layer is sparse (mlx-lm qwen3_5.py: `if args.num_experts > 0: SparseMoeBlock`),
        // so the dense width is unused; configs may leave it out.
        if !t.contains_key("intermediate_size") {
            if let Some(m) = t.get("moe_intermediate_size").cloned() {
                t.insert("intermediate_size".into(), m);
            }
        }
        // TextModelArgs.__post_init__: partial_rotary_factor and rope_theta come from
        // rope_parameters (defaults 0.25 and 100000).
        if let Some(Value::Object(p)) = t.get("rope_parameters").cloned() {
            if let Some(f) = p.get("partial_rotary_factor") {
                t.insert("partial_rotary_factor".into(), f.clone());
            }
        }
        t.entry("partial_rotary_factor").or_insert(0.25.into());
    }
    let f = Fields::new(&text, Arch::Qwen35Moe);
    let mut cfg = qwen3_next::parse_text(&f, DeltaProjections::Split)?;
    cfg.arch = Arch::Qwen35Moe;
    let theta_given = f.has("rope_theta")
        || text
            .get("rope_parameters")
            .is_some_and(|p| p.get("rope_theta").is_some());
    if !theta_given {
        // rope_parameters' default: {"rope_theta": 100000, ...}
        cfg.rope.theta = 100_000.0;
    }
    // TextModelArgs: norm_topk_prob = True; decoder_sparse_step and mlp_only_layers unread.
    cfg.norm_topk_prob = f.bool_or("norm_topk_prob", true)?;
    cfg.decoder_sparse_step = 1;
    cfg.mlp_only_layers = Vec::new();
    Ok(cfg)
}
