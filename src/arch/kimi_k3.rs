//! Kimi-K3 (`kimi_k3`): its table entry (config fields, tensor names, router, sanitize rules,
//! expert layouts).
//!
//! In: a `config.json` with `model_type: "kimi_k3"`, the text model's fields at the top level or
//! under `text_config` (mlx-lm's `ModelArgs.from_dict` reads both). Out: a [`ModelConfig`] with
//! Kimi Delta Attention ([`LinearAttention`] with [`DeltaProjections::Kda`]) in the layers
//! `linear_attn_config.kda_layers` lists (1-based) and multi-head latent attention ([`Mla`],
//! without RoPE, optionally gated) in the others; the sigmoid router with its
//! `e_score_correction_bias`, `num_expert_group` / `topk_group` groups and
//! `routed_scaling_factor`; `num_shared_experts` ungated shared experts; the first
//! `first_k_dense_replace` layers dense (then every `moe_layer_freq`-th sparse); SiTU ([`Situ`])
//! in every MLP and expert; attention residuals when `attn_res_block_size` is set.
//! Tensors, upstream: `model.layers.L.self_attn.{q,k,v}_proj`, `{q,k,v}_conv1d` (`[P, 1, K]`),
//! `f_a_proj`, `f_b_proj`, `b_proj`, `g_a_proj`, `g_b_proj` (or `g_proj`), `A_log`
//! (`[1, 1, heads, 1]`), `dt_bias`, `o_norm`, `o_proj` on a KDA layer; MLA's `q_a_proj`,
//! `q_a_layernorm`, `q_b_proj` (or `q_proj`), `kv_a_proj_with_mqa`, `kv_a_layernorm`,
//! `kv_b_proj`, `o_proj` and `g_proj` on the others; `block_sparse_moe.gate.weight` and its
//! `e_score_correction_bias` (on the gate or on the block), experts
//! `block_sparse_moe.experts.N.{w1,w3,w2}.weight` (gate, up, down), shared experts
//! `block_sparse_moe.shared_experts.{gate,up,down}_proj`; a dense layer's `mlp.*`;
//! `self_attention_res.{proj,norm}_weight`, `mlp_res.*` per layer and `model.output_attn_res.*`;
//! everything under `language_model.` in the multimodal layout, beside a vision tower.
//! A pack holds mlx-lm's names ([`text_model_name`] and the [`Derive`] rules): `mlp` for
//! `block_sparse_moe`, the bias under the gate, `self_attention_res_proj.weight`, the joined
//! `qkv_proj` and `qkv_conv.conv.weight`, 1-D `A_log` and `dt_bias`, `kv_b_proj` split into
//! `embed_q` and `unembed_out`.
//!
//! Forward pass (mlx-lm 0.32.2 `mlx_lm/models/kimi_k3.py`, CPU path): KDA (`KimiK3DeltaAttention`:
//! `qkv_conv(qkv_proj(x))`, `normalize_qk`, the per-channel decay of `compute_g` or
//! `compute_lower_bound_g`, `gated_delta_ops` with a vector gate, `o_norm(out) * sigmoid(gate)`;
//! model/gated_delta.rs), MLA without RoPE (`KimiK3MLAAttention`, model/mla.rs), the MoE
//! (`KimiK3SparseMoE`: `_group_expert_select`, `SwitchGLU` with SiTU, `(y * weights).sum(-2)` in
//! the weights' type (the input's), plus the shared experts; model/moe.rs and model/router.rs),
//! and the decoder layer's attention residuals (`ResidualBlocks`, `_attn_res_combine`;
//! model/attn_res.rs). With `routed_expert_hidden_size` the experts work on
//! `routed_expert_down_proj(x)` and their sum goes back through `routed_expert_norm` (with
//! `latent_moe_use_norm`) and `routed_expert_up_proj` ([`LatentMoe`], model/moe.rs).

use super::{
    kimi_k25, qwen3_next, Arch, ArchDef, ArchError, Defaults, DeltaProjections,
    Derive, Fields, LatentMoe, LinearAttention, Mla, ModelConfig, QkNorm, Rope, RouterConfig, RouterDef, Sanitize,
    Scoring, SharedExpert, SharedNames, Situ, TensorNames, TopKOrder,
};
use serde_json::Value;
use std::borrow::Cow;

pub(super) const DEF: ArchDef = ArchDef {
    model_type: "kimi_k3",
    upstream: &[
        "https://github.com/ml-explore/mlx-lm/blob/main/mlx_lm/models/kimi_k3.py",
        "https://github.com/ml-explore/mlx-lm/blob/main/mlx_lm/models/kimi_linear.py",
        "https://github.com/ml-explore/mlx-lm/blob/main/mlx_lm/models/gated_delta.py",
    ],
    parse,
    names: TensorNames {
        expert_projs: ["w1", "w3", "w2"],
        // self.shared_experts = KimiK3MLP(args, intermediate_size=shared_hidden), ungated
        shared: Some(SharedNames {
            mlp: "shared_experts",
            gate: "",
        }),
        // quant_predicate: if path.endswith("res_proj"): return False
        keep_full_modules: &[
            "self_attention_res_proj",
            "mlp_res_proj",
            "output_attn_res_proj",
        ],
        ..TensorNames::DEFAULT
    },
    // _group_expert_select: sigmoid in f32, + bias, groups by their two best, then
    // inds = mx.argpartition(-scores, kth=top_k - 1, axis=-1)[..., :top_k]
    // if top_k > 1 and renormalize: scores / (scores.sum(-1, keepdims=True) + 1e-20)
    // return inds, (scores * routed_scaling_factor).astype(in_type)
    // The 1e-20 changes no f32 sum of sigmoids above 1e-13 (as MiniMax's, minimax.rs).
    router: RouterDef {
        scoring: Some(Scoring::Sigmoid),
        renormalize_top1: false,
        weights_in_input_dtype: true,
        ..RouterDef::config(TopKOrder::FirstOfNegated)
    },
    // y = (y * weights[..., None]).sum(axis=-2): weights already in the input's type, no cast.
    cast_moe_output: false,
    sanitize: Sanitize {
        rename: text_model_name,
        derive: &[
            Derive::SplitKvB,
            Derive::Concat {
                parts: &[".q_proj.weight", ".k_proj.weight", ".v_proj.weight"],
                into: ".qkv_proj.weight",
                conv: false,
            },
            Derive::Concat {
                parts: &[".q_conv1d.weight", ".k_conv1d.weight", ".v_conv1d.weight"],
                into: ".qkv_conv.conv.weight",
                conv: true,
            },
            Derive::Flatten {
                suffixes: &[".A_log", ".dt_bias"],
                per_head: &[".A_log"],
            },
        ],
    },
    ..ArchDef::DEFAULT
};

/// The residual modules' upstream parameter names and mlx-lm's (`res_renames`).
const RESIDUALS: [&str; 3] = ["self_attention_res", "mlp_res", "output_attn_res"];

/// mlx-lm's `sanitize` renames: the multimodal wrapper and its vision tower (Kimi K2.5's rule),
/// `block_sparse_moe` -> `mlp`, the router's selection bias under the gate (where upstream may
/// also put it, and where the shared router reads it), and the attention residuals'
/// `<src>.proj_weight` / `<src>.norm_weight` -> `<src>_proj.weight` / `<src>_norm.weight`.
fn text_model_name(name: &str) -> Option<Cow<'_, str>> {
    let name = kimi_k25::text_model_name(name)?;
    let mut out: Option<String> = None;
    let cur = |out: &Option<String>| out.clone().unwrap_or_else(|| name.to_string());
    if name.contains(".block_sparse_moe.") {
        out = Some(cur(&out).replace(".block_sparse_moe.", ".mlp."));
    }
    if let Some(block) = cur(&out).strip_suffix(".mlp.e_score_correction_bias") {
        out = Some(format!("{block}.mlp.gate.e_score_correction_bias"));
    }
    for src in RESIDUALS {
        for (from, to) in [("proj", "_proj"), ("norm", "_norm")] {
            let tail = format!(".{src}.{from}_weight");
            if let Some(module) = cur(&out).strip_suffix(&tail) {
                out = Some(format!("{module}.{src}{to}.weight"));
            }
        }
    }
    Some(match out {
        Some(s) => Cow::Owned(s),
        None => name,
    })
}

fn parse(v: &Value) -> Result<ModelConfig, ArchError> {
    // ModelArgs.from_dict: without text_config, the config is the text model's.
    let text = match v.get("text_config") {
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
        _ => v.clone(),
    };
    parse_text(&Fields::new(&text, Arch::KimiK3), &text)
}

/// The text model's fields (mlx-lm's `TextArgs`, with its defaults where a config may omit one).
fn parse_text(f: &Fields<'_>, text: &Value) -> Result<ModelConfig, ArchError> {
    let must_be = |field: &'static str, want: &str, expected: &'static str| {
        let found = f.str_or(field, want)?;
        if found != want {
            return Err(ArchError::BadField {
                field,
                found: format!("{found:?}"),
                expected,
            });
        }
        Ok(())
    };
    // TextArgs.__post_init__ refuses any other activation or router.
    must_be("hidden_act", "situ", "\"situ\" (the only activation Kimi-K3 has)")?;
    must_be(
        "moe_router_activation_func",
        "sigmoid",
        "\"sigmoid\" (the only router Kimi-K3 has)",
    )?;
    if !f.bool_or("mla_use_nope", true)? {
        return Err(ArchError::BadField {
            field: "mla_use_nope",
            found: "false".into(),
            expected: "true (mlx-lm runs MLA without RoPE only)",
        });
    }
    let d = Defaults {
        // No RoPE anywhere: never used.
        rope_theta: 10_000.0,
        rms_norm_eps: 1e-5,
        norm_topk_prob: true,
        attention_bias: false,
        qk_norm: QkNorm::None,
    };
    let mut cfg = f.common(&d)?;
    // No RoPE anywhere (mla_use_nope): whatever rope fields the config has change nothing, not
    // even MLA's scale (q_head_dim**-0.5).
    cfg.rope = Rope {
        theta: d.rope_theta,
        traditional: false,
        rope_type: "default".into(),
        scaling: None,
    };
    cfg.norm_topk_prob = f.bool_or("moe_renormalize", true)?;
    cfg.moe_intermediate_size = f.usize_req(&["moe_intermediate_size"])?;
    if !f.has("q_lora_rank") {
        return Err(ArchError::MissingField {
            field: "q_lora_rank",
            arch: "kimi_k3",
        });
    }
    let mla = Mla {
        q_lora_rank: f.usize_any(&["q_lora_rank"])?,
        kv_lora_rank: f.usize_req(&["kv_lora_rank"])?,
        qk_nope_head_dim: f.usize_req(&["qk_nope_head_dim"])?,
        qk_rope_head_dim: f.usize_req(&["qk_rope_head_dim"])?,
        v_head_dim: f.usize_req(&["v_head_dim"])?,
        no_rope: true,
        output_gate: f.bool_or("mla_use_output_gate", false)?,
    };
    // self.q_head_dim = qk_nope_head_dim + qk_rope_head_dim; every head is a query head.
    cfg.head_dim = mla.qk_nope_head_dim + mla.qk_rope_head_dim;
    cfg.num_key_value_heads = cfg.num_attention_heads;
    cfg.mla = Some(mla);
    cfg.router = RouterConfig {
        scoring: Scoring::Sigmoid,
        // self.e_score_correction_bias = mx.zeros((experts,)): always there.
        selection_bias: true,
        n_group: f.usize_any(&["num_expert_group"])?.unwrap_or(1),
        topk_group: f.usize_any(&["topk_group"])?.unwrap_or(1),
        routed_scaling_factor: f.f64_opt("routed_scaling_factor")?.unwrap_or(1.0),
    };
    // shared_hidden = moe_intermediate_size * num_shared_experts
    cfg.shared_expert = SharedExpert::experts(
        f.usize_any(&["num_shared_experts"])?.unwrap_or(0),
        cfg.moe_intermediate_size,
    );
    cfg.decoder_sparse_step = 1;
    cfg.mlp_only_layers.clear();
    cfg.first_k_dense_replace = f.usize_any(&["first_k_dense_replace"])?.unwrap_or(0);
    cfg.moe_layer_freq = f.usize_any(&["moe_layer_freq"])?.unwrap_or(1);
    // self.beta = args.activation_situ_beta or 1.0
    let beta = f
        .f64_opt("activation_situ_beta")?
        .filter(|&b| b != 0.0)
        .unwrap_or(1.0);
    cfg.situ = Some(Situ {
        beta,
        linear_beta: f.f64_opt("activation_situ_linear_beta")?,
    });
    cfg.attn_res_block_size = f.usize_any(&["attn_res_block_size"])?;
    // self.latent_size = args.routed_expert_hidden_size; the norm only with latent_moe_use_norm
    cfg.latent_moe = f
        .usize_any(&["routed_expert_hidden_size"])?
        .map(|hidden_size| -> Result<LatentMoe, ArchError> {
            Ok(LatentMoe {
                hidden_size,
                norm: f.bool_or("latent_moe_use_norm", false)?,
            })
        })
        .transpose()?;
    cfg.linear_attention = linear_attention(text, cfg.num_hidden_layers)?;
    Ok(cfg)
}

/// `linear_attn_config`: the KDA layers (`kda_layers`, 1-based: `(layer_idx + 1) in
/// kda_layers`) and their heads, head width, convolution, gate and lower bound. `None` when no
/// layer is one.
fn linear_attention(text: &Value, layers: usize) -> Result<Option<LinearAttention>, ArchError> {
    let Some(la) = text.get("linear_attn_config").filter(|x| !x.is_null()) else {
        return Err(ArchError::MissingField {
            field: "linear_attn_config",
            arch: "kimi_k3",
        });
    };
    if !la.is_object() {
        return Err(ArchError::BadField {
            field: "linear_attn_config",
            found: la.to_string(),
            expected: "an object with kda_layers, num_heads, head_dim and short_conv_kernel_size",
        });
    }
    let f = Fields::new(la, Arch::KimiK3);
    let kda = f.usize_list("kda_layers")?;
    if let Some(&bad) = kda.iter().find(|&&n| n == 0 || n > layers) {
        return Err(ArchError::BadField {
            field: "kda_layers",
            found: bad.to_string(),
            expected: "1-based layer numbers from 1 to num_hidden_layers",
        });
    }
    if kda.is_empty() {
        return Ok(None);
    }
    let types: Vec<&str> = (0..layers)
        .map(|l| {
            if kda.contains(&(l + 1)) {
                "linear_attention"
            } else {
                "full_attention"
            }
        })
        .collect();
    let (full_attention_interval, full_attention_layers) =
        qwen3_next::full_attention_from(&types)?;
    let heads = f.usize_req(&["num_heads"])?;
    let head_dim = f.usize_req(&["head_dim"])?;
    Ok(Some(LinearAttention {
        full_attention_interval,
        full_attention_layers,
        num_key_heads: heads,
        num_value_heads: heads,
        key_head_dim: head_dim,
        value_head_dim: head_dim,
        conv_kernel_dim: f.usize_req(&["short_conv_kernel_size"])?,
        projections: DeltaProjections::Kda,
        gate_lower_bound: f.f64_opt("gate_lower_bound")?,
        full_rank_gate: f.bool_or("use_full_rank_gate", false)?,
    }))
}
