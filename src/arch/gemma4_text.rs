//! Gemma 4 with experts (`gemma4_text`, e.g. gemma-4-26b-a4b; also its multimodal wrapper
//! `gemma4`): its table entry (config fields, tensor names, router, sanitize rules, expert
//! layouts).
//!
//! In: a `config.json` with `model_type: "gemma4_text"`, or `"gemma4"` with the text model's
//! fields under `text_config` (mlx-lm's `gemma4.py` wrapper: the top-level `vocab_size`, 262,144
//! when absent, wins over the text model's). Out: a [`ModelConfig`] with [`Gemma4`] set: layers
//! of sliding-window attention (`sliding_window`, `head_dim`, `num_key_value_heads`,
//! `rope_parameters.sliding_attention`) and of full attention (`global_head_dim`,
//! `num_global_key_value_heads` with `attention_k_eq_v`, `rope_parameters.full_attention`,
//! "proportional"), as `layer_types` says (else mlx-lm's default, `sliding_window_pattern` 5: four
//! sliding layers, then one full); every layer sparse, with experts of `moe_intermediate_size`
//! beside a dense MLP of `intermediate_size`; `top_k_experts` of `num_experts`. Dense Gemma 4
//! (`enable_moe_block` false), per-layer input embeddings (`hidden_size_per_layer_input`, the
//! 2B/4B models) and KV sharing between layers (`num_kv_shared_layers`) are refused: none is a
//! MoE model.
//! Tensor names (Hugging Face, transformers' `Gemma4ForConditionalGeneration`):
//! `model.language_model.layers.L.*` (text-only `Gemma4ForCausalLM`: `model.layers.L.*`);
//! experts fused, `experts.gate_up_proj` `[E, 2I, H]` (gate rows first) and `experts.down_proj`
//! `[E, H, I]`; router `router.proj.weight` `[E, H]`, `router.scale` `[H]`,
//! `router.per_expert_scale` `[E]`; vision and audio towers beside it (dropped). mlx-lm's folders:
//! `language_model.model.*` (or `model.*`), experts stacked under `experts.switch_glu`. A pack
//! holds the text model under `model.*` with the router and experts under one block `moe`
//! ([`text_model_name`]: `moe.router.{weight,scale,per_expert_scale}`, `moe.experts.*`,
//! `moe.switch_glu.*`), where the shared blocks read them.
//!
//! Forward pass (mlx-lm 0.32.2 `mlx_lm/models/gemma4_text.py`): embeddings times
//! `hidden_size**0.5` (in their dtype); per layer `h += post_attention_layernorm(attn(
//! input_layernorm(h)))`, with q/k RMSNorm per head, values RMS-normed per head without a weight,
//! attention scale 1, and on full-attention layers the values taken from `k_proj` before
//! `k_norm` when `attention_k_eq_v`; then `h += post_feedforward_layernorm(
//! post_feedforward_layernorm_1(mlp(pre_feedforward_layernorm(h))) + post_feedforward_layernorm_2(
//! experts(pre_feedforward_layernorm_2(h))))` with GeGLU (`gelu_approx(gate) * up`) in both, and
//! `h *= layer_scalar`. Router (`Router.__call__`) on `h` itself: `rms_norm(h, scale *
//! hidden_size**-0.5)`, `proj`, `argpartition(scores, kth=-k)[..., -k:]`, softmax of the k chosen
//! logits (not precise), times `per_expert_scale[indices]`; `(w * y).sum(-2)` with no cast. The
//! final norm, the tied head (`embed_tokens.as_linear`), and `tanh(logits / c) * c` with
//! `c = final_logit_softcapping`. Sliding layers keep a rotating cache of `sliding_window`
//! positions (`RotatingKVCache(max_size=sliding_window, keep=0)`).

use super::{
    Arch, ArchDef, ArchError, Defaults, ExpertLayout, Fields, Gemma4, ModelConfig, QkNorm, Rope,
    RouterDef, Sanitize, Scoring, SlidingWindow, TensorNames, TopKOrder,
};
use serde_json::{json, Map, Value};
use std::borrow::Cow;

pub(super) const DEF: ArchDef = ArchDef {
    model_type: "gemma4_text",
    aliases: &["gemma4"],
    upstream: &[
        "https://github.com/huggingface/transformers/blob/main/src/transformers/models/gemma4/modeling_gemma4.py",
        "https://github.com/ml-explore/mlx-lm/blob/main/mlx_lm/models/gemma4_text.py",
        "https://github.com/ml-explore/mlx-lm/blob/main/mlx_lm/models/gemma4.py",
    ],
    parse,
    names: TensorNames {
        moe_blocks: &["moe"],
        stacked_module: "switch_glu",
        router: "router",
        ..TensorNames::DEFAULT
    },
    // top_k_indices = mx.argpartition(expert_scores, kth=-k, axis=-1)[..., -k:]
    // top_k_weights = mx.softmax(take_along_axis(expert_scores, top_k_indices), axis=-1)
    // top_k_weights = top_k_weights * self.per_expert_scale[top_k_indices]
    router: RouterDef {
        scoring: Some(Scoring::SoftmaxOfChosen),
        input_norm: true,
        per_expert_scale: true,
        precise_softmax: false,
        ..RouterDef::config(TopKOrder::LastOf)
    },
    // (w * y).sum(-2), no cast
    cast_moe_output: false,
    sanitize: Sanitize {
        rename: text_model_name,
        ..Sanitize::NONE
    },
    // transformers' fused experts (what Google ships) or mlx-lm's stacked ones.
    expert_layouts: &[ExpertLayout::Fused, ExpertLayout::Stacked],
    ..ArchDef::DEFAULT
};

/// Module prefixes of the multimodal checkpoints that are not the text model (mlx-lm
/// gemma4.py `sanitize`, after `model.` is removed).
const NOT_TEXT: &[&str] = &[
    "vision_tower",
    "multi_modal_projector",
    "audio_tower",
    "embed_audio",
    "embed_vision",
    "vision_embedder",
];

/// A source tensor's (or module's) name in a pack: `None` for the vision and audio modules and
/// for what mlx-lm's `sanitize` drops (`self_attn.rotary_emb`, the clipping bounds
/// `input_max` / `input_min` / `output_max` / `output_min`); the text model under `model.*`
/// (from `model.language_model.*` or mlx-lm's `language_model.model.*`); a layer's router and
/// experts under its `moe` block.
pub(super) fn text_model_name(name: &str) -> Option<Cow<'_, str>> {
    let bare = name.strip_prefix("model.").unwrap_or(name);
    if NOT_TEXT.iter().any(|p| bare.starts_with(p)) {
        return None;
    }
    const DROPPED: &[&str] = &[
        "self_attn.rotary_emb",
        "input_max",
        "input_min",
        "output_max",
        "output_min",
    ];
    if DROPPED.iter().any(|d| name.contains(d)) {
        return None;
    }
    let text: Cow<'_, str> = if let Some(rest) = name.strip_prefix("model.language_model.") {
        Cow::Owned(format!("model.{rest}"))
    } else if let Some(rest) = name.strip_prefix("language_model.model.") {
        Cow::Owned(format!("model.{rest}"))
    } else if let Some(rest) = name.strip_prefix("language_model.") {
        Cow::Owned(rest.to_string())
    } else {
        Cow::Borrowed(name)
    };
    Some(match under_the_moe_block(&text) {
        Some(moved) => Cow::Owned(moved),
        None => text,
    })
}

/// `model.layers.L.router.proj[.part]` -> `model.layers.L.moe.router[.part]`,
/// `model.layers.L.router.X` -> `model.layers.L.moe.router.X`,
/// `model.layers.L.experts.switch_glu.X` -> `model.layers.L.moe.switch_glu.X`,
/// `model.layers.L.experts.X` -> `model.layers.L.moe.experts.X`; `None` for any other name.
fn under_the_moe_block(name: &str) -> Option<String> {
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, tail) = rest.split_once('.')?;
    layer.parse::<usize>().ok()?;
    let p = format!("model.layers.{layer}.moe");
    if let Some(r) = tail.strip_prefix("router.") {
        if r == "proj" {
            return Some(format!("{p}.router"));
        }
        if let Some(part) = r.strip_prefix("proj.") {
            return Some(format!("{p}.router.{part}"));
        }
        return Some(format!("{p}.router.{r}"));
    }
    if let Some(r) = tail.strip_prefix("experts.switch_glu.") {
        return Some(format!("{p}.switch_glu.{r}"));
    }
    if let Some(r) = tail.strip_prefix("experts.") {
        return Some(format!("{p}.experts.{r}"));
    }
    None
}

/// The full-attention layers' `(head_dim, num_key_value_heads)` from transformers'
/// `per_layer_config` (`None` when it lists no layer): each listed layer must be a full-attention
/// one, and every full-attention layer must have the same widths (`base` for one not listed).
fn per_layer_widths(
    p: &Value,
    types: &[&str],
    base: (usize, usize),
) -> Result<Option<(usize, usize)>, ArchError> {
    let bad = |found: String| ArchError::BadField {
        field: "per_layer_config",
        found,
        expected: "an object of full-attention layers' head_dim and num_key_value_heads",
    };
    let o = p.as_object().ok_or_else(|| bad(p.to_string()))?;
    let mut listed = std::collections::BTreeMap::new();
    for (key, entry) in o {
        let l: usize = key.parse().map_err(|_| bad(format!("layer {key:?}")))?;
        if types.get(l) != Some(&"full_attention") {
            return Err(ArchError::Inconsistent {
                what: format!(
                    "per_layer_config lists layer {l}, which layer_types does not mark as \
                     full attention: only full-attention layers may have widths of their own"
                ),
            });
        }
        let width = |k: &str, default: usize| -> Result<usize, ArchError> {
            match entry.get(k) {
                None | Some(Value::Null) => Ok(default),
                Some(v) => v
                    .as_u64()
                    .map(|n| n as usize)
                    .ok_or_else(|| bad(format!("layer {l}: {k} {v}"))),
            }
        };
        listed.insert(
            l,
            (
                width("head_dim", base.0)?,
                width("num_key_value_heads", base.1)?,
            ),
        );
    }
    let Some(&first) = listed.values().next() else {
        return Ok(None);
    };
    for (l, t) in types.iter().enumerate() {
        let w = listed.get(&l).copied().unwrap_or(base);
        if *t == "full_attention" && w != first {
            return Err(ArchError::Inconsistent {
                what: format!(
                    "per_layer_config gives full-attention layers different widths ({first:?} and \
                     {w:?} as (head_dim, num_key_value_heads) at layer {l}); flashpack runs one \
                     geometry for them all"
                ),
            });
        }
    }
    Ok(Some(first))
}

/// Defaults of mlx-lm's `gemma4_text.ModelArgs` where a config may omit a field.
const SLIDING_WINDOW_PATTERN: usize = 5;

pub(super) fn parse(v: &Value) -> Result<ModelConfig, ArchError> {
    let mut text = match v.get("text_config") {
        None | Some(Value::Null) => match v.as_object() {
            Some(o) => o.clone(),
            None => Map::new(),
        },
        Some(Value::Object(t)) => {
            let mut t = t.clone();
            // gemma4.py: text_config["vocab_size"] = self.vocab_size (262144 by default), and
            // the heads' defaults 8 and 1.
            let vocab = v.get("vocab_size").cloned().unwrap_or(json!(262_144));
            t.insert("vocab_size".into(), vocab);
            t.entry("num_attention_heads").or_insert(json!(8));
            t.entry("num_key_value_heads").or_insert(json!(1));
            // Token ids are often written at the top level only.
            for key in ["bos_token_id", "eos_token_id"] {
                if !t.contains_key(key) {
                    if let Some(x) = v.get(key) {
                        t.insert(key.into(), x.clone());
                    }
                }
            }
            t
        }
        Some(x) => {
            return Err(ArchError::BadField {
                field: "text_config",
                found: x.to_string(),
                expected: "an object holding the text model's fields",
            })
        }
    };
    let raw = Value::Object(text.clone());
    let g = Fields::new(&raw, Arch::Gemma4Text);
    if !g.bool_or("enable_moe_block", false)? {
        return Err(ArchError::Inconsistent {
            what: "enable_moe_block is false: a dense Gemma 4 has no experts to pack".into(),
        });
    }
    for (field, default) in [
        ("hidden_size_per_layer_input", 256),
        ("num_kv_shared_layers", 20),
    ] {
        let n = g.usize_any(&[field])?.unwrap_or(default);
        if n != 0 {
            return Err(ArchError::BadField {
                field,
                found: n.to_string(),
                expected: "0 (per-layer inputs and KV shared between layers, which only the \
                           dense Gemma 4 models use, are not supported)",
            });
        }
    }
    // ModelArgs defaults: the hidden size 1536, 35 layers, 8 heads of 256 over 1 KV head, the
    // vocabulary of 262144.
    for (key, default) in [
        ("hidden_size", json!(1536)),
        ("num_hidden_layers", json!(35)),
        ("intermediate_size", json!(6144)),
        ("num_attention_heads", json!(8)),
        ("num_key_value_heads", json!(1)),
        ("head_dim", json!(256)),
        ("vocab_size", json!(262_144)),
    ] {
        text.entry(key).or_insert(default);
    }
    // The common reader's names: top_k_experts is the top-k.
    if let Some(k) = text.get("top_k_experts").cloned() {
        text.insert("num_experts_per_tok".into(), k);
    }
    // rope_parameters holds one record per layer type; the sliding layers' is the model's
    // RoPE, the full-attention layers' the Gemma4 record's.
    let by_type = match text.remove("rope_parameters") {
        None | Some(Value::Null) => json!({
            "full_attention": {"partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0,
                               "rope_type": "proportional"},
            "sliding_attention": {"partial_rotary_factor": 1.0, "rope_theta": 10_000.0,
                                  "rope_type": "default"},
        }),
        Some(Value::Object(p)) => Value::Object(p),
        Some(x) => {
            return Err(ArchError::BadField {
                field: "rope_parameters",
                found: x.to_string(),
                expected: "an object with a record per layer type",
            })
        }
    };
    // rope_params = config.rope_parameters.get(layer_key, {}); rope_theta defaults to 10000
    let rope_of = |key: &str| -> Result<Rope, ArchError> {
        let mut p = by_type.get(key).cloned().unwrap_or(json!({}));
        if !p.is_object() {
            return Err(ArchError::BadField {
                field: "rope_parameters",
                found: p.to_string(),
                expected: "a record per layer type",
            });
        }
        // mlx-lm's default (initialize_rope's) for a record without one.
        if p.get("rope_type").is_none() && p.get("type").is_none() {
            p["rope_type"] = json!("default");
        }
        let mut holder = Map::new();
        holder.insert("rope_parameters".into(), p);
        if let Some(t) = raw.get("rope_traditional") {
            holder.insert("rope_traditional".into(), t.clone());
        }
        Fields::new(&Value::Object(holder), Arch::Gemma4Text).rope(10_000.0)
    };
    let sliding_rope = rope_of("sliding_attention")?;
    let global_rope = rope_of("full_attention")?;
    let text = Value::Object(text);
    let f = Fields::new(&text, Arch::Gemma4Text);
    let d = Defaults {
        rope_theta: 10_000.0,
        rms_norm_eps: 1e-6,
        norm_topk_prob: true,
        attention_bias: false,
        qk_norm: QkNorm::PerHead,
    };
    let mut cfg = f.common(&d)?;
    cfg.rope = sliding_rope;
    // The wrapper's own `eos_token_id` (mlx-lm's load gives the tokenizer the top-level ids;
    // Gemma 4 ends a turn with `<turn|>` there) joins the text model's.
    if v.get("text_config").is_some_and(|t| t.is_object()) {
        for id in Fields::new(v, Arch::Gemma4Text).token_ids("eos_token_id")? {
            if !cfg.eos_token_ids.contains(&id) {
                cfg.eos_token_ids.push(id);
            }
        }
    }
    cfg.tie_word_embeddings = f.bool_or("tie_word_embeddings", true)?;
    cfg.attention_bias = false;
    cfg.decoder_sparse_step = 1;
    cfg.mlp_only_layers.clear();
    cfg.moe_intermediate_size = f.usize_req(&["moe_intermediate_size"])?;
    let n = cfg.num_hidden_layers;
    let types: Vec<&str> = match f.layer_types(n)? {
        Some(t) => t,
        // pattern = ["sliding_attention"] * (sliding_window_pattern - 1) + ["full_attention"]
        None => {
            let pattern = f
                .usize_any(&["sliding_window_pattern"])?
                .unwrap_or(SLIDING_WINDOW_PATTERN)
                .max(1);
            (0..n)
                .map(|l| {
                    if l % pattern == pattern - 1 {
                        "full_attention"
                    } else {
                        "sliding_attention"
                    }
                })
                .collect()
        }
    };
    let k_eq_v = f.bool_or("attention_k_eq_v", false)?;
    // self.n_kv_heads = num_global_key_value_heads if use_k_eq_v (and given), else
    // num_key_value_heads
    let global_kv_heads = match (k_eq_v, f.usize_any(&["num_global_key_value_heads"])?) {
        (true, Some(n)) => n,
        _ => cfg.num_key_value_heads,
    };
    // config.global_head_dim if set (and not 0), else head_dim; 512 when the key is absent
    let global_head_dim = match f.usize_any(&["global_head_dim"])? {
        Some(n) if n > 0 => n,
        _ if f.has("global_head_dim") => cfg.head_dim,
        _ => 512,
    };
    // transformers 5.x writes the full-attention layers' widths as `per_layer_config`
    // (`{"L": {"head_dim": .., "num_key_value_heads": ..}}`) instead of `global_head_dim` and
    // `num_global_key_value_heads`: where it is present it is the truth (mlx-lm 0.32.2 reads only
    // the two keys).
    let (global_head_dim, global_kv_heads) = match text.get("per_layer_config") {
        None | Some(Value::Null) => (global_head_dim, global_kv_heads),
        Some(p) => per_layer_widths(p, &types, (cfg.head_dim, cfg.num_key_value_heads))?
            .unwrap_or((global_head_dim, global_kv_heads)),
    };
    let final_logit_softcapping = match text.get("final_logit_softcapping") {
        None => Some(30.0),
        Some(Value::Null) => None,
        Some(_) => f.f64_opt("final_logit_softcapping")?,
    };
    cfg.gemma4 = Some(Gemma4 {
        global_head_dim,
        global_kv_heads,
        k_eq_v,
        global_rope,
        final_logit_softcapping,
    });
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
    let size = f.usize_any(&["sliding_window"])?.unwrap_or(512);
    cfg.sliding_window = Some(SlidingWindow { size, layers });
    Ok(cfg)
}
