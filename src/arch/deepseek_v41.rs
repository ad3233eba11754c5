//! DeepSeek-V4.1 (`deepseek_v41`, also `deepseek_v41_text`): its table entry (config fields,
//! tensor names, router, sanitize rules).
//!
//! In: a `config.json` with `model_type: "deepseek_v41"` (or its `text_config`). Out: a
//! [`ModelConfig`] with [`HyperConnections`] (`hc_mult` streams), [`CompressedAttention`] (one
//! shared key/value head of `head_dim`, the sliding window, `compress_ratios`, the KV and index
//! source layers, the indexer's heads and `index_topk`, the grouped low-rank output), every layer
//! sparse, one shared expert as wide as a routed one, the `sqrtsoftplus` router with a
//! selection bias, and the f32 clamped SwiGLU (`swiglu_limit`).
//!
//! Tensor names: upstream's (`embed.weight`, `layers.L.attn.wq_a.weight`,
//! `layers.L.attn.compressor.wkv.weight`, `layers.L.hc_attn_fn`, `layers.L.ffn.experts.N.w1.weight`,
//! `layers.L.ffn.gate.bias`, `head.weight`, ...) are renamed to mlx-lm's
//! (`model.layers.L.self_attn.q_a_proj.weight`, `...attn_hc.fn`, `...mlp.gate.e_score_correction_bias`,
//! `lm_head.weight`: [`rename`], the renames of mlx-lm's `_rename`), so a pack holds mlx-lm's names;
//! an mlx-lm folder's `model.*` names are kept. The vision modules, the engram tables and the
//! image router bias (`bias_vl`) are not part of the text model; `mtp.*` is dropped with the MTP
//! layers. `wo_a` is stored as upstream's `[o_groups * o_lora_rank, in]` or mlx-lm's
//! `[o_groups, o_lora_rank, in]`: the model reads either.
//!
//! Forward pass (mlx-lm 0.32.2 `mlx_lm/models/deepseek_v41.py`): model/deepseek_v41.rs, chosen by
//! `ModelConfig::hyper_connections`; the MoE block is the shared one (router: `Router.__call__`,
//! `x.astype(f32) @ weight.T`, `sqrt(softplus)`, top-k of the biased scores by
//! `argpartition(-biased, k-1)[..., :k]`, weights renormalized when `top_k > 1` and times
//! `routed_scaling_factor`; experts and shared expert with `DeepseekV41SwiGLU`; their sum in f32,
//! cast to the input's type after the shared expert is added).
//!
//! Prompt format: DeepSeek-V4's `encoding/encoding_dsv4.py` (`encode_messages`) writes chat mode
//! as DeepSeek-V3.2's does (`<｜begin▁of▁sentence｜>{system}<｜User｜>{text}<｜Assistant｜></think>`,
//! an answer closed by `<｜end▁of▁sentence｜>`), so a repository without a Jinja template gets
//! V3.2's built-in one ([`super::deepseek_v32::CHAT_TEMPLATE`]); a pack's own template wins.

use super::{
    Arch, ArchDef, ArchError, CandidateBlocks, CompressedAttention, Defaults, Fields, HyperConnections,
    ModelConfig, QkNorm, RouterConfig, RouterDef, Sanitize, Scoring, SharedExpert, SharedNames,
    TensorNames, TopKOrder,
};
use serde_json::Value;
use std::borrow::Cow;

pub(super) const DEF: ArchDef = ArchDef {
    model_type: "deepseek_v41",
    // MODEL_REMAPPING = {"deepseek_v41_text": "deepseek_v41", ...}  (mlx-lm utils.py)
    aliases: &["deepseek_v41_text"],
    upstream: &["https://github.com/ml-explore/mlx-lm/blob/main/mlx_lm/models/deepseek_v41.py"],
    parse,
    names: TensorNames {
        expert_projs: ["w1", "w3", "w2"],
        stacked_module: "experts.switch_mlp",
        shared: Some(SharedNames {
            mlp: "shared_experts",
            gate: "",
        }),
        ..TensorNames::DEFAULT
    },
    // if self.norm_topk_prob and self.top_k > 1: weights = weights / (sum + 1e-20)
    router: RouterDef {
        scoring: Some(Scoring::SqrtSoftplus),
        renormalize_top1: false,
        f32_input: true,
        ..RouterDef::config(TopKOrder::FirstOfNegated)
    },
    // The f32 sum is cast after the shared expert is added (model/moe.rs, by the config's
    // `f32_swiglu_limit`), not here.
    cast_moe_output: false,
    sanitize: Sanitize {
        rename,
        ..Sanitize::NONE
    },
    chat_template: Some(super::deepseek_v32::CHAT_TEMPLATE),
    ..ArchDef::DEFAULT
};

/// mlx-lm's `_DROP_PREFIXES` other than `mtp.` (dropped with the MTP layers).
const NOT_TEXT: &[&str] = &["vision.", "aligner.", "image_"];

/// Upstream's name -> mlx-lm's (`_rename` of deepseek_v41.py); `None` for what the text model
/// does not hold. A name already in mlx-lm's form (`model.*`, `lm_head.*`) is its own.
fn rename(name: &str) -> Option<Cow<'_, str>> {
    // (A quantization override names a module: `lm_head` too.)
    if name.starts_with("model.")
        || name == "lm_head"
        || name.starts_with("lm_head.")
        || name.starts_with("mtp.")
    {
        return Some(Cow::Borrowed(name));
    }
    if NOT_TEXT.iter().any(|p| name.starts_with(p))
        || name.contains(".engram.")
        || name.ends_with(".gate.bias_vl")
    {
        return None;
    }
    match name {
        "head.weight" => return Some(Cow::Borrowed("lm_head.weight")),
        "embed.weight" => return Some(Cow::Borrowed("model.embed_tokens.weight")),
        _ => {}
    }
    let mut key = format!("model.{name}");
    for (from, to) in [
        (".attn.", ".self_attn."),
        (".ffn.", ".mlp."),
        (".attn_norm.", ".input_layernorm."),
        (".ffn_norm.", ".post_attention_layernorm."),
        (".hc_attn_", ".attn_hc."),
        (".hc_ffn_", ".ffn_hc."),
        (".attn_sink", ".sinks"),
        (".wq_a.", ".q_a_proj."),
        (".wq_b.", ".q_b_proj."),
        (".wkv.", ".kv_proj."),
        (".wgate.", ".gate_proj."),
        (".wo_a.", ".o_a_proj."),
        (".wo_b.", ".o_b_proj."),
        (".q_norm.", ".q_a_norm."),
        (".compressor.norm.", ".compressor.kv_norm."),
        (".indexer.wk.", ".indexer.k_proj."),
        (".gate.bias", ".gate.e_score_correction_bias"),
        (".shared_experts.w1.", ".shared_experts.gate_proj."),
        (".shared_experts.w2.", ".shared_experts.down_proj."),
        (".shared_experts.w3.", ".shared_experts.up_proj."),
    ] {
        if key.contains(from) {
            key = key.replace(from, to);
        }
    }
    Some(Cow::Owned(key))
}

fn parse(v: &Value) -> Result<ModelConfig, ArchError> {
    // ModelArgs.from_dict: a multimodal config's text model is its `text_config`.
    let text = v.get("text_config").filter(|t| t.is_object()).unwrap_or(v);
    // `common` reads a dense width; every layer of V4.1 is sparse, so it is the experts'.
    let mut with = text.clone();
    if let Value::Object(m) = &mut with {
        if !m.contains_key("intermediate_size") {
            if let Some(w) = m.get("moe_intermediate_size").cloned() {
                m.insert("intermediate_size".into(), w);
            }
        }
    }
    let f = Fields::new(&with, Arch::DeepseekV41);
    // Defaults of mlx-lm's deepseek_v41 ModelArgs where a config may omit a field.
    let d = Defaults {
        rope_theta: 10_000.0,
        rms_norm_eps: 1e-20,
        norm_topk_prob: true,
        attention_bias: false,
        qk_norm: QkNorm::None,
    };
    let mut cfg = f.common(&d)?;
    if f.has("engram_layer_ids") && !f.usize_list("engram_layer_ids")?.is_empty() {
        return Err(ArchError::BadField {
            field: "engram_layer_ids",
            found: format!("{:?}", f.usize_list("engram_layer_ids")?),
            expected: "none: engram memory is not implemented (nor in mlx-lm)",
        });
    }
    cfg.moe_intermediate_size = f.usize_any(&["moe_intermediate_size"])?.unwrap_or(2304);
    cfg.intermediate_size = cfg.moe_intermediate_size;
    cfg.head_dim = f.usize_any(&["head_dim"])?.unwrap_or(512);
    // One key/value head shared by every query head.
    cfg.num_key_value_heads = 1;
    cfg.decoder_sparse_step = 1;
    cfg.mlp_only_layers.clear();
    cfg.rope.traditional = true;
    let scoring = f.str_or("scoring_func", "sqrtsoftplus")?;
    if scoring != "sqrtsoftplus" {
        return Err(ArchError::BadField {
            field: "scoring_func",
            found: format!("{scoring:?}"),
            expected: "\"sqrtsoftplus\" (the scoring DeepSeek-V4.1 ships)",
        });
    }
    let temp = f.f64_opt("gate_temp")?.unwrap_or(1.0);
    if temp != 1.0 {
        return Err(ArchError::BadField {
            field: "gate_temp",
            found: temp.to_string(),
            expected: "1.0 (another router temperature is not implemented yet)",
        });
    }
    cfg.router = RouterConfig {
        scoring: Scoring::SqrtSoftplus,
        selection_bias: true,
        n_group: 1,
        topk_group: 1,
        routed_scaling_factor: f.f64_opt("routed_scaling_factor")?.unwrap_or(1.5),
    };
    // SharedMLP(args): one shared expert of moe_intermediate_size.
    cfg.shared_expert = SharedExpert::experts(1, cfg.moe_intermediate_size);
    cfg.f32_swiglu_limit = Some(f.f64_opt("swiglu_limit")?.unwrap_or(10.0));
    cfg.hyper_connections = Some(HyperConnections {
        mult: f.usize_any(&["hc_mult"])?.unwrap_or(4),
        sinkhorn_iters: f.usize_any(&["hc_sinkhorn_iters"])?.unwrap_or(20),
        eps: f.f64_opt("hc_eps")?.unwrap_or(1e-6),
    });
    let candidate = match with.get("candidate_source_layer_id") {
        None | Some(Value::Null) => -1,
        Some(x) => x.as_i64().ok_or_else(|| ArchError::BadField {
            field: "candidate_source_layer_id",
            found: x.to_string(),
            expected: "an integer layer index, or -1 for none",
        })?,
    };
    let topk_blocks = f.usize_any(&["candidate_topk_blocks"])?.unwrap_or(2048);
    // `is_candidate_source and candidate_topk_blocks > 0`: off for -1, a layer past the model
    // or no blocks, as in mlx-lm.
    let candidates = usize::try_from(candidate)
        .ok()
        .filter(|&l| l < cfg.num_hidden_layers && topk_blocks > 0)
        .map(|source_layer| -> Result<CandidateBlocks, ArchError> {
            Ok(CandidateBlocks {
                source_layer,
                topk_blocks,
                block_size: f.usize_any(&["candidate_block_size"])?.unwrap_or(8),
            })
        })
        .transpose()?;
    let layers = cfg.num_hidden_layers;
    // An id past the layers matches no layer (mlx-lm's `layer_id in ...`).
    let below = |ids: Vec<usize>| ids.into_iter().filter(|&l| l < layers).collect();
    let c = CompressedAttention {
        q_lora_rank: f.usize_any(&["q_lora_rank"])?.unwrap_or(1280),
        rope_dim: f.usize_any(&["qk_rope_head_dim"])?.unwrap_or(64),
        o_groups: f.usize_any(&["o_groups"])?.unwrap_or(8),
        o_lora_rank: f.usize_any(&["o_lora_rank"])?.unwrap_or(1024),
        sliding_window: f.usize_any(&["sliding_window"])?.unwrap_or(128),
        compress_ratios: f.usize_list("compress_ratios")?,
        kv_source_layers: below(f.usize_list("kv_source_layer_ids")?),
        index_source_layers: below(f.usize_list("index_source_layer_ids")?),
        compress_rope_theta: f.f64_opt("compress_rope_theta")?.unwrap_or(160_000.0),
        index_n_heads: f.usize_any(&["index_n_heads"])?.unwrap_or(32),
        index_head_dim: f.usize_any(&["index_head_dim"])?.unwrap_or(128),
        index_topk: f.usize_any(&["index_topk"])?.unwrap_or(512),
        candidates,
    };
    // A layer with a ratio above 1 pools groups of that many positions; a source layer must
    // have a ratio to be one (mlx-lm builds `Compressor(args, layer)` from its ratio).
    if let Some(&l) = c.kv_source_layers.iter().find(|&&l| c.ratio(l) == 0) {
        return Err(ArchError::Inconsistent {
            what: format!("kv_source_layer_ids lists layer {l}, whose compress_ratios entry is 0"),
        });
    }
    cfg.compressed_attention = Some(c);
    cfg.max_position_embeddings = Some(
        f.usize_any(&["max_position_embeddings"])?
            .unwrap_or(1_048_576),
    );
    Ok(cfg)
}
