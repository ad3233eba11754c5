//! Supported Mixture-of-Experts architectures: config parsing and tensor names.
//!
//! In: a Hugging Face `config.json` (as a `serde_json::Value`) and tensor names from safetensors.
//! Out: a normalized [`ModelConfig`] (stored in the pack metadata) and, per tensor name, a
//! [`TensorRole`] saying whether it is an expert projection (and which), a router, a tensor that
//! must stay full precision, or a dense tensor quantized by policy.
//! Invariant: every architecture-specific detail lives in one file per architecture
//! (`qwen3_moe.rs`, `mixtral.rs`, `olmoe.rs`, `qwen2_moe.rs`, `deepseek_v3.rs`, `glm4_moe.rs`,
//! `qwen3_next.rs`, `qwen3_5_moe.rs`, `gpt_oss.rs`);
//! this file only holds what they share. Both config dialects are accepted: transformers 5.x (`rope_parameters`,
//! `num_local_experts`) and legacy (top-level `rope_theta` / `rope_scaling`, `num_experts`).

mod deepseek_v3;
mod glm4_moe;
mod gpt_oss;
mod mixtral;
mod olmoe;
mod qwen2_moe;
mod qwen3_5_moe;
mod qwen3_moe;
mod qwen3_next;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::Path;

/// Architectures whose experts flashpack can pack and run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Arch {
    Qwen3Moe,
    Mixtral,
    Olmoe,
    Qwen2Moe,
    DeepseekV3,
    Glm4Moe,
    Qwen3Next,
    #[serde(rename = "qwen3_5_moe")]
    Qwen35Moe,
    GptOss,
}

/// `model_type`s that are recognised but not supported yet; named in the error so users know
/// the gap is known rather than a typo.
pub const PLANNED_MODEL_TYPES: &[&str] = &["qwen3_vl_moe", "llama4", "minimax_m2"];

/// Other `model_type`s that are one of the supported architectures under another name (as
/// mlx-lm's `MODEL_REMAPPING` maps them).
pub const MODEL_TYPE_ALIASES: &[(&str, Arch)] = &[("kimi_k2", Arch::DeepseekV3)];

impl Arch {
    /// Every supported architecture, in the order shown to users.
    pub const ALL: &'static [Arch] = &[
        Arch::Qwen3Moe,
        Arch::Mixtral,
        Arch::Olmoe,
        Arch::Qwen2Moe,
        Arch::DeepseekV3,
        Arch::Glm4Moe,
        Arch::Qwen3Next,
        Arch::Qwen35Moe,
        Arch::GptOss,
    ];

    /// The Hugging Face `model_type` string.
    pub fn model_type(self) -> &'static str {
        match self {
            Arch::Qwen3Moe => "qwen3_moe",
            Arch::Mixtral => "mixtral",
            Arch::Olmoe => "olmoe",
            Arch::Qwen2Moe => "qwen2_moe",
            Arch::DeepseekV3 => "deepseek_v3",
            Arch::Glm4Moe => "glm4_moe",
            Arch::Qwen3Next => "qwen3_next",
            Arch::Qwen35Moe => "qwen3_5_moe",
            Arch::GptOss => "gpt_oss",
        }
    }

    /// Looks up an architecture by `model_type`.
    pub fn from_model_type(model_type: &str) -> Result<Arch, ArchError> {
        Arch::ALL
            .iter()
            .copied()
            .find(|a| a.model_type() == model_type)
            .or_else(|| {
                MODEL_TYPE_ALIASES
                    .iter()
                    .find(|(alias, _)| *alias == model_type)
                    .map(|&(_, a)| a)
            })
            .ok_or_else(|| ArchError::Unsupported {
                model_type: model_type.to_string(),
                supported: supported_list(),
                planned: PLANNED_MODEL_TYPES.join(", "),
            })
    }

    /// The upstream modelling files this architecture's names and config mirror.
    pub fn upstream(self) -> &'static [&'static str] {
        match self {
            Arch::Qwen3Moe => qwen3_moe::UPSTREAM,
            Arch::Mixtral => mixtral::UPSTREAM,
            Arch::Olmoe => olmoe::UPSTREAM,
            Arch::Qwen2Moe => qwen2_moe::UPSTREAM,
            Arch::DeepseekV3 => deepseek_v3::UPSTREAM,
            Arch::Glm4Moe => glm4_moe::UPSTREAM,
            Arch::Qwen3Next => qwen3_next::UPSTREAM,
            Arch::Qwen35Moe => qwen3_5_moe::UPSTREAM,
            Arch::GptOss => gpt_oss::UPSTREAM,
        }
    }

    /// How this architecture names its MoE tensors.
    pub fn names(self) -> &'static TensorNames {
        match self {
            Arch::Qwen3Moe => &qwen3_moe::NAMES,
            Arch::Mixtral => &mixtral::NAMES,
            Arch::Olmoe => &olmoe::NAMES,
            Arch::Qwen2Moe => &qwen2_moe::NAMES,
            Arch::DeepseekV3 => &deepseek_v3::NAMES,
            Arch::Glm4Moe => &glm4_moe::NAMES,
            Arch::Qwen3Next => &qwen3_next::NAMES,
            Arch::Qwen35Moe => &qwen3_5_moe::NAMES,
            Arch::GptOss => &gpt_oss::NAMES,
        }
    }

    /// The name a source tensor goes by in a pack (mlx-lm's), or `None` for a tensor that is not
    /// part of the text model. Qwen3.5's multimodal checkpoints hold the language model under
    /// `model.language_model.*` beside a vision tower (`model.visual.*`), and mlx-lm's folders
    /// under `language_model.*` (mlx-lm qwen3_5_moe.py `sanitize`); every other name, and every
    /// name of the other architectures, is its own.
    pub fn text_model_name(self, name: &str) -> Option<std::borrow::Cow<'_, str>> {
        use std::borrow::Cow;
        if self != Arch::Qwen35Moe {
            return Some(Cow::Borrowed(name));
        }
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

    /// What the tensor called `name` is (see [`TensorNames::classify`]).
    pub fn classify(self, name: &str) -> TensorRole {
        self.names().classify(name)
    }
}

fn supported_list() -> String {
    Arch::ALL
        .iter()
        .map(|a| a.model_type())
        .collect::<Vec<_>>()
        .join(", ")
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.model_type())
    }
}

/// Errors reading a model's `config.json`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ArchError {
    #[error(
        "model_type {model_type:?} is not supported; supported: {supported} (planned: {planned})"
    )]
    Unsupported {
        model_type: String,
        supported: String,
        planned: String,
    },
    #[error("config.json has no {field:?}; it is required for {arch}")]
    MissingField {
        field: &'static str,
        arch: &'static str,
    },
    #[error("config.json field {field:?} is {found}; expected {expected}")]
    BadField {
        field: &'static str,
        found: String,
        expected: &'static str,
    },
    #[error("config.json is inconsistent: {what}")]
    Inconsistent { what: String },
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not valid JSON: {source}")]
    Json {
        path: String,
        source: serde_json::Error,
    },
}

/// Which q/k normalisation the attention applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QkNorm {
    /// No q/k norm (Mixtral, Qwen2-MoE).
    None,
    /// RMSNorm over each head's `head_dim` values (Qwen3-MoE).
    PerHead,
    /// RMSNorm over the full projected width, `heads * head_dim` (OLMoE).
    FullWidth,
}

/// Rotary position embedding settings, normalized from either dialect.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rope {
    pub theta: f64,
    /// MLX's `traditional` flag (interleaved pairs); false for every supported checkpoint
    /// unless the config says otherwise (`rope_traditional`, mlx-lm's key).
    pub traditional: bool,
    /// `rope_type` (5.x) or `rope_scaling.type` (legacy); "default" when unscaled.
    pub rope_type: String,
    /// The remaining scaling parameters as written (factor, original_max_position_embeddings,
    /// ...), `None` when unscaled. Kept verbatim so a runtime can refuse what it cannot do.
    pub scaling: Option<Value>,
}

/// How a router turns its logits into expert scores (`scoring_func` in DeepSeek-V3 / GLM-4.5
/// configs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scoring {
    /// `softmax(logits)` over all experts (every architecture before DeepSeek-V3).
    #[default]
    Softmax,
    /// `sigmoid(logits)` per expert, in f32.
    Sigmoid,
}

/// Routing beyond softmax top-k with optional renormalisation (`norm_topk_prob`), as DeepSeek-V3
/// and GLM-4.5 configure it. The default (softmax, no selection bias, one group, factor 1) is what
/// the other architectures do; a pack's `model` record holds it only when it differs, so packs
/// written before it existed read as the default.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RouterConfig {
    pub scoring: Scoring,
    /// The router has an `e_score_correction_bias` `[E]` (`topk_method: "noaux_tc"`): added to
    /// the scores to choose experts, never to weight them.
    pub selection_bias: bool,
    /// `n_group`: experts fall into this many equal groups, in id order; 1 = no groups.
    pub n_group: usize,
    /// `topk_group`: only the best groups (by the sum of their two best scores) may be chosen.
    pub topk_group: usize,
    /// `routed_scaling_factor`: the routed weights are multiplied by it, after renormalisation.
    pub routed_scaling_factor: f64,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            scoring: Scoring::Softmax,
            selection_bias: false,
            n_group: 1,
            topk_group: 1,
            routed_scaling_factor: 1.0,
        }
    }
}

impl RouterConfig {
    pub fn is_default(&self) -> bool {
        *self == RouterConfig::default()
    }
}

/// The shared expert(s) every token goes through, besides the routed ones. N shared experts
/// (DeepSeek-V3's `n_shared_experts`, GLM-4.5's) are one SwiGLU MLP N times as wide as a routed
/// expert, which is how both checkpoints store them ([`SharedExpert::experts`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SharedExpert {
    /// The MLP's width: Qwen2-MoE's `shared_expert_intermediate_size`, or N * moe_intermediate_size.
    pub intermediate_size: usize,
    /// Whether its output is scaled by `sigmoid(shared_expert_gate(x))`.
    pub gated: bool,
}

impl SharedExpert {
    /// `n` shared experts of `width` each (`n_shared_experts`, `moe_intermediate_size`), ungated;
    /// `None` for none.
    pub fn experts(n: usize, width: usize) -> Option<SharedExpert> {
        (n > 0).then_some(SharedExpert {
            intermediate_size: n * width,
            gated: false,
        })
    }
}

/// Multi-head latent attention (DeepSeek-V2/V3, Kimi-K2): keys and values come from one
/// compressed latent per token (`kv_lora_rank` wide) plus a `qk_rope_head_dim`-wide rotary key
/// shared by every head; that pair is all the KV cache holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Mla {
    /// Queries through a low-rank bottleneck (`q_a_proj`, norm, `q_b_proj`) this wide, or a
    /// plain `q_proj` when `None`.
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    /// Per-head query/key width without RoPE.
    pub qk_nope_head_dim: usize,
    /// Per-head query/key width with RoPE (the key part is shared by all heads).
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
}

/// How a Gated DeltaNet layer names its input projections.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeltaProjections {
    /// Qwen3-Next: `in_proj_qkvz` and `in_proj_ba`, grouped per key head.
    Qkvz,
    /// Qwen3.5: `in_proj_qkv`, `in_proj_z`, `in_proj_b`, `in_proj_a`, each contiguous.
    Split,
}

/// Gated DeltaNet linear attention (Qwen3-Next, Qwen3.5): every layer but each
/// `full_attention_interval`-th keeps, instead of a KV cache, a convolution state (the last
/// `conv_kernel_dim - 1` inputs of a depthwise causal convolution) and a recurrent state
/// `[value_heads, value_head_dim, key_head_dim]`, both of a fixed size whatever the context.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LinearAttention {
    /// Layers `L` with `(L + 1) % full_attention_interval == 0` use full attention.
    pub full_attention_interval: usize,
    pub num_key_heads: usize,
    pub num_value_heads: usize,
    pub key_head_dim: usize,
    pub value_head_dim: usize,
    /// `linear_conv_kernel_dim`: the convolution's width.
    pub conv_kernel_dim: usize,
    pub projections: DeltaProjections,
}

impl LinearAttention {
    /// Channels of the convolution: queries, keys and values (`key_dim * 2 + value_dim`).
    pub fn conv_dim(&self) -> usize {
        2 * self.num_key_heads * self.key_head_dim + self.num_value_heads * self.value_head_dim
    }

    /// Bytes of one layer's state: the convolution's last inputs in the activations' dtype
    /// (bf16, 2 bytes) and the recurrent state in f32 (mlx-lm's `gated_delta_update`).
    pub fn state_bytes_per_layer(&self) -> u64 {
        let conv = (self.conv_kernel_dim.saturating_sub(1) * self.conv_dim()) as u64 * 2;
        let recurrent = (self.num_value_heads * self.value_head_dim * self.key_head_dim) as u64 * 4;
        conv + recurrent
    }
}

/// Sliding-window attention (gpt-oss): the listed layers attend to the last `size` positions
/// only (the query's own included) and keep a rotating KV cache of that many positions; the
/// others attend to everything.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SlidingWindow {
    pub size: usize,
    /// Layers of `layer_types` `"sliding_attention"`, ascending.
    pub layers: Vec<usize>,
}

/// gpt-oss's expert activation (mlx-lm `swiglu_oai`): with `g = min(gate, limit)` and
/// `u = clip(up, -limit, limit)`, `(u + 1) * g * sigmoid(alpha * g)`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClampedSwiglu {
    pub alpha: f64,
    pub limit: f64,
}

/// A model's configuration, normalized across architectures and config dialects.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub arch: Arch,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    /// Width of the dense MLP (layers that are not sparse). For Mixtral and OLMoE, whose every
    /// layer is sparse, this equals `moe_intermediate_size`.
    pub intermediate_size: usize,
    /// Width of one routed expert (rows of its gate/up projections).
    pub moe_intermediate_size: usize,
    pub num_experts: usize,
    pub num_experts_per_tok: usize,
    /// Whether the top-k routing weights are renormalised to sum to 1.
    pub norm_topk_prob: bool,
    /// Scoring, selection bias, expert groups and scaling of the router (default: softmax only).
    #[serde(default, skip_serializing_if = "RouterConfig::is_default")]
    pub router: RouterConfig,
    pub rms_norm_eps: f64,
    pub rope: Rope,
    pub max_position_embeddings: Option<usize>,
    pub tie_word_embeddings: bool,
    /// Whether q/k/v projections carry a bias.
    pub attention_bias: bool,
    pub qk_norm: QkNorm,
    /// The rotated share of each head (GLM-4.5's `partial_rotary_factor`): RoPE turns the
    /// first `int(head_dim * factor)` values. Written to a pack only when not 1.
    #[serde(default = "one_f64", skip_serializing_if = "is_one_f64")]
    pub partial_rotary_factor: f64,
    /// Multi-head latent attention instead of grouped-query attention (DeepSeek-V3); then
    /// `head_dim` is the query/key width `qk_nope_head_dim + qk_rope_head_dim`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mla: Option<Mla>,
    /// Gated DeltaNet linear attention in all layers but every `full_attention_interval`-th
    /// (Qwen3-Next, Qwen3.5). Written to a pack only when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub linear_attention: Option<LinearAttention>,
    /// Full attention's output is scaled by `sigmoid(gate)`, the gate being the second half of
    /// each head's `q_proj` rows (Qwen3-Next, Qwen3.5). Written to a pack only when true.
    #[serde(default, skip_serializing_if = "is_false")]
    pub attn_output_gate: bool,
    /// Sliding-window layers (gpt-oss). Written to a pack only when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<SlidingWindow>,
    /// Each attention head has a learned sink logit (`self_attn.sinks` `[heads]`) that joins
    /// the softmax without a value (gpt-oss). Written to a pack only when true.
    #[serde(default, skip_serializing_if = "is_false")]
    pub attention_sinks: bool,
    /// Routed experts add a bias to each projection's output (gpt-oss), stored with the expert
    /// (formats/flashpack-v1.md §6.4). Written to a pack only when true.
    #[serde(default, skip_serializing_if = "is_false")]
    pub expert_bias: bool,
    /// The routed experts' activation is gpt-oss's clamped SwiGLU instead of SwiGLU. Written
    /// to a pack only when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clamped_swiglu: Option<ClampedSwiglu>,
    /// OLMoE's clamp of q/k/v activations, when set.
    pub clip_qkv: Option<f64>,
    pub shared_expert: Option<SharedExpert>,
    /// With `mlp_only_layers`, `first_k_dense_replace` and `moe_layer_freq`: which layers have
    /// routed experts ([`ModelConfig::is_sparse_layer`]).
    pub decoder_sparse_step: usize,
    pub mlp_only_layers: Vec<usize>,
    /// The first this-many layers are dense (DeepSeek-V3, GLM-4.5); 0 = none. Written to a pack
    /// only when not 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub first_k_dense_replace: usize,
    /// Only layers `L % moe_layer_freq == 0` are sparse (DeepSeek-V3); 1 = every layer. Written
    /// to a pack only when not 1.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub moe_layer_freq: usize,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    /// Parses a `config.json` value of any supported architecture and either dialect.
    pub fn from_json(v: &Value) -> Result<ModelConfig, ArchError> {
        let model_type =
            v.get("model_type")
                .and_then(Value::as_str)
                .ok_or(ArchError::MissingField {
                    field: "model_type",
                    arch: "any architecture",
                })?;
        let arch = Arch::from_model_type(model_type)?;
        let cfg = match arch {
            Arch::Qwen3Moe => qwen3_moe::parse(v)?,
            Arch::Mixtral => mixtral::parse(v)?,
            Arch::Olmoe => olmoe::parse(v)?,
            Arch::Qwen2Moe => qwen2_moe::parse(v)?,
            Arch::DeepseekV3 => deepseek_v3::parse(v)?,
            Arch::Glm4Moe => glm4_moe::parse(v)?,
            Arch::Qwen3Next => qwen3_next::parse(v)?,
            Arch::Qwen35Moe => qwen3_5_moe::parse(v)?,
            Arch::GptOss => gpt_oss::parse(v)?,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads and parses `path` (a `config.json`).
    pub fn from_file(path: &Path) -> Result<ModelConfig, ArchError> {
        let text = std::fs::read_to_string(path).map_err(|source| ArchError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let v: Value = serde_json::from_str(&text).map_err(|source| ArchError::Json {
            path: path.display().to_string(),
            source,
        })?;
        ModelConfig::from_json(&v)
    }

    /// Whether layer `layer` has routed experts: the one place the dense/MoE layout is decided,
    /// from every knob the supported configs use (each is a no-op at its default):
    /// - `(L + 1) % decoder_sparse_step == 0` and L not in `mlp_only_layers` (transformers'
    ///   Qwen2MoeDecoderLayer / Qwen3MoeDecoderLayer);
    /// - `L >= first_k_dense_replace` and `L % moe_layer_freq == 0` (DeepseekV3DecoderLayer;
    ///   mlx-lm deepseek_v3.py and glm4_moe.py).
    pub fn is_sparse_layer(&self, layer: usize) -> bool {
        self.num_experts > 0
            && !self.mlp_only_layers.contains(&layer)
            && (layer + 1) % self.decoder_sparse_step.max(1) == 0
            && layer >= self.first_k_dense_replace
            && layer % self.moe_layer_freq.max(1) == 0
    }

    /// How many of each head's query/key values RoPE rotates: `qk_rope_head_dim` under MLA,
    /// else `int(head_dim * partial_rotary_factor)` (mlx-lm glm4_moe.py's `nn.RoPE` dims).
    pub fn rope_dims(&self) -> usize {
        match &self.mla {
            Some(m) => m.qk_rope_head_dim,
            None => (self.head_dim as f64 * self.partial_rotary_factor) as usize,
        }
    }

    /// Values the KV cache holds per token, over the layers whose cache grows with the
    /// context: keys and values of every KV head, or under MLA the latent and the rotary key
    /// (`kv_lora_rank + qk_rope_head_dim`), which is what makes DeepSeek-V3's cache ~57x smaller
    /// than its 128 heads would need. Layers of linear attention hold no KV cache (their state is
    /// [`ModelConfig::recurrent_state_bytes`]); sliding-window layers hold a bounded one
    /// ([`ModelConfig::window_kv_values`]).
    pub fn kv_values_per_token(&self) -> u64 {
        let windowed = self.sliding_window.as_ref().map_or(0, |w| w.layers.len());
        ((self.full_attention_layers() - windowed) * self.kv_values_per_layer()) as u64
    }

    /// Values one softmax-attention layer caches per position.
    fn kv_values_per_layer(&self) -> usize {
        match &self.mla {
            Some(m) => m.kv_lora_rank + m.qk_rope_head_dim,
            None => 2 * self.num_key_value_heads * self.head_dim,
        }
    }

    /// Values the sliding-window layers' caches hold at most over a sequence of `positions`
    /// prefilled in calls of at most `chunk` tokens; 0 without sliding-window layers. A layer
    /// keeps its last `size - 1` positions and appends a call's tokens (mlx-lm's
    /// `RotatingKVCache`, `model/rotating.rs`), so it holds at most `size - 1 + chunk`
    /// positions, and `size` while decoding.
    pub fn window_kv_values(&self, positions: u64, chunk: u64) -> u64 {
        let Some(w) = &self.sliding_window else {
            return 0;
        };
        let held = positions.min(w.size as u64 - 1 + chunk.max(1));
        w.layers.len() as u64 * self.kv_values_per_layer() as u64 * held
    }

    /// Values the whole KV cache holds at most for a sequence of `positions` prefilled in calls
    /// of at most `chunk` tokens: what a run's budget sets aside (in bf16, twice this in bytes).
    pub fn kv_values(&self, positions: u64, chunk: u64) -> u64 {
        self.kv_values_per_token() * positions + self.window_kv_values(positions, chunk)
    }

    /// Whether layer `layer` uses linear attention (mlx-lm qwen3_next.py:
    /// `self.is_linear = (layer_idx + 1) % args.full_attention_interval != 0`).
    pub fn is_linear_layer(&self, layer: usize) -> bool {
        self.linear_attention
            .as_ref()
            .is_some_and(|la| (layer + 1) % la.full_attention_interval.max(1) != 0)
    }

    /// Layers with full (softmax) attention and so a KV cache.
    pub fn full_attention_layers(&self) -> usize {
        (0..self.num_hidden_layers)
            .filter(|&l| !self.is_linear_layer(l))
            .count()
    }

    /// Bytes of the fixed-size state of the linear-attention layers (convolution and recurrent
    /// state), whatever the context length; 0 without linear attention.
    pub fn recurrent_state_bytes(&self) -> u64 {
        let Some(la) = &self.linear_attention else {
            return 0;
        };
        let linear = (self.num_hidden_layers - self.full_attention_layers()) as u64;
        linear * la.state_bytes_per_layer()
    }

    /// The window of layer `layer` when it is a sliding-window layer.
    pub fn window_of(&self, layer: usize) -> Option<usize> {
        self.sliding_window
            .as_ref()
            .filter(|w| w.layers.contains(&layer))
            .map(|w| w.size)
    }

    /// The sparse layers, ascending.
    pub fn sparse_layers(&self) -> Vec<usize> {
        (0..self.num_hidden_layers)
            .filter(|&l| self.is_sparse_layer(l))
            .collect()
    }

    /// The rules every normalized config keeps, whatever its source (formats/flashpack-v1.md
    /// §4.1, key `model`): positive sizes, a top-k within the experts, heads that group, and a
    /// norm epsilon and RoPE base that are positive and finite (0 or a negative value gives NaN
    /// logits). The first broken rule is returned as `BadField` naming the field, or
    /// `Inconsistent` for a rule between two fields.
    pub fn validate(&self) -> Result<(), ArchError> {
        let bad = |field: &'static str, found: String, expected: &'static str| {
            Err(ArchError::BadField {
                field,
                found,
                expected,
            })
        };
        let positive = [
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
            ("intermediate_size", self.intermediate_size),
            ("moe_intermediate_size", self.moe_intermediate_size),
            ("num_experts", self.num_experts),
            ("decoder_sparse_step", self.decoder_sparse_step),
            ("moe_layer_freq", self.moe_layer_freq),
        ];
        for (field, v) in positive {
            if v == 0 {
                return bad(field, "0".into(), "at least 1");
            }
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return Err(ArchError::Inconsistent {
                what: format!(
                    "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                    self.num_attention_heads, self.num_key_value_heads
                ),
            });
        }
        if self.num_experts_per_tok == 0 || self.num_experts_per_tok > self.num_experts {
            return Err(ArchError::Inconsistent {
                what: format!(
                    "num_experts_per_tok {} must be in 1..={} (num_experts)",
                    self.num_experts_per_tok, self.num_experts
                ),
            });
        }
        let positive_finite = |x: f64| x.is_finite() && x > 0.0;
        if !positive_finite(self.rms_norm_eps) {
            return bad(
                "rms_norm_eps",
                self.rms_norm_eps.to_string(),
                "a positive finite number (0 or less gives NaN logits)",
            );
        }
        if !positive_finite(self.rope.theta) {
            return bad(
                "rope_theta",
                self.rope.theta.to_string(),
                "a positive finite number (0 or less gives NaN logits)",
            );
        }
        if let Some(c) = self.clip_qkv {
            if !positive_finite(c) {
                return bad("clip_qkv", c.to_string(), "a positive finite number");
            }
        }
        let r = &self.router;
        // A group is scored by its two best experts, so a grouped router needs groups of 2 or more.
        let groups_ok = r.n_group == 1
            || (r.n_group > 1
                && self.num_experts % r.n_group == 0
                && self.num_experts / r.n_group >= 2);
        if !groups_ok {
            return Err(ArchError::Inconsistent {
                what: format!(
                    "n_group {} must split num_experts {} into equal groups of at least 2",
                    r.n_group, self.num_experts
                ),
            });
        }
        if r.topk_group == 0 || r.topk_group > r.n_group {
            return Err(ArchError::Inconsistent {
                what: format!(
                    "topk_group {} must be in 1..={} (n_group)",
                    r.topk_group, r.n_group
                ),
            });
        }
        let choosable = r.topk_group * (self.num_experts / r.n_group);
        if self.num_experts_per_tok > choosable {
            return Err(ArchError::Inconsistent {
                what: format!(
                    "num_experts_per_tok {} is more than the {choosable} experts of topk_group {} groups",
                    self.num_experts_per_tok, r.topk_group
                ),
            });
        }
        if !positive_finite(r.routed_scaling_factor) {
            return bad(
                "routed_scaling_factor",
                r.routed_scaling_factor.to_string(),
                "a positive finite number",
            );
        }
        let f = self.partial_rotary_factor;
        if !(f.is_finite() && f > 0.0 && f <= 1.0) {
            return bad("partial_rotary_factor", f.to_string(), "a number in (0, 1]");
        }
        let rope = self.rope_dims();
        if rope < 2 || rope % 2 != 0 {
            return Err(ArchError::Inconsistent {
                what: format!(
                    "RoPE would rotate {rope} values per head (head_dim {} x partial_rotary_factor {f}); it needs an even number of at least 2",
                    self.head_dim
                ),
            });
        }
        if let Some(m) = &self.mla {
            let sizes = [
                ("kv_lora_rank", m.kv_lora_rank),
                ("qk_nope_head_dim", m.qk_nope_head_dim),
                ("qk_rope_head_dim", m.qk_rope_head_dim),
                ("v_head_dim", m.v_head_dim),
                ("q_lora_rank", m.q_lora_rank.unwrap_or(1)),
            ];
            for (field, v) in sizes {
                if v == 0 {
                    return bad(field, "0".into(), "at least 1");
                }
            }
        }
        if let Some(la) = &self.linear_attention {
            let sizes = [
                ("full_attention_interval", la.full_attention_interval),
                ("linear_num_key_heads", la.num_key_heads),
                ("linear_num_value_heads", la.num_value_heads),
                ("linear_key_head_dim", la.key_head_dim),
                ("linear_value_head_dim", la.value_head_dim),
            ];
            for (field, v) in sizes {
                if v == 0 {
                    return bad(field, "0".into(), "at least 1");
                }
            }
            // n_keep = conv_kernel_size - 1 must be at least 1: conv_input[:, -0:] would keep
            // every input instead of none.
            if la.conv_kernel_dim < 2 {
                return bad(
                    "linear_conv_kernel_dim",
                    la.conv_kernel_dim.to_string(),
                    "at least 2",
                );
            }
            if la.num_value_heads % la.num_key_heads != 0 {
                return Err(ArchError::Inconsistent {
                    what: format!(
                        "linear_num_value_heads {} is not a multiple of linear_num_key_heads {}",
                        la.num_value_heads, la.num_key_heads
                    ),
                });
            }
        }
        if let Some(w) = &self.sliding_window {
            if w.size == 0 {
                return bad("sliding_window", "0".into(), "at least 1");
            }
            if let Some(&l) = w.layers.iter().find(|&&l| l >= self.num_hidden_layers) {
                return Err(ArchError::Inconsistent {
                    what: format!(
                        "sliding-window layer {l} is past num_hidden_layers {}",
                        self.num_hidden_layers
                    ),
                });
            }
        }
        if let Some(c) = &self.clamped_swiglu {
            if !positive_finite(c.limit) || !positive_finite(c.alpha) {
                return bad(
                    "swiglu_limit",
                    c.limit.to_string(),
                    "a positive finite number",
                );
            }
        }
        if let Some(s) = &self.shared_expert {
            if s.intermediate_size == 0 {
                return bad(
                    "shared_expert_intermediate_size",
                    "0".into(),
                    "at least 1 when there is a shared expert",
                );
            }
        }
        Ok(())
    }
}

fn one_f64() -> f64 {
    1.0
}

fn is_one_f64(x: &f64) -> bool {
    *x == 1.0
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

fn is_one(n: &usize) -> bool {
    *n == 1
}

fn one() -> usize {
    1
}

// ---- config field helpers shared by the per-architecture parsers ----

/// Reads a field from a config, knowing which architecture asks (for error messages).
pub(crate) struct Fields<'a> {
    v: &'a Value,
    arch: Arch,
}

impl<'a> Fields<'a> {
    pub(crate) fn new(v: &'a Value, arch: Arch) -> Self {
        Fields { v, arch }
    }

    fn raw(&self, key: &str) -> Option<&'a Value> {
        self.v.get(key).filter(|x| !x.is_null())
    }

    /// The first of `keys` present (dialect aliases), as a usize.
    pub(crate) fn usize_any(&self, keys: &[&'static str]) -> Result<Option<usize>, ArchError> {
        for &k in keys {
            if let Some(x) = self.raw(k) {
                return x
                    .as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .map(Some)
                    .ok_or_else(|| ArchError::BadField {
                        field: k,
                        found: x.to_string(),
                        expected: "a non-negative integer",
                    });
            }
        }
        Ok(None)
    }

    pub(crate) fn usize_req(&self, keys: &[&'static str]) -> Result<usize, ArchError> {
        self.usize_any(keys)?.ok_or(ArchError::MissingField {
            field: keys[0],
            arch: self.arch.model_type(),
        })
    }

    pub(crate) fn f64_opt(&self, key: &'static str) -> Result<Option<f64>, ArchError> {
        match self.raw(key) {
            None => Ok(None),
            Some(x) => x.as_f64().map(Some).ok_or_else(|| ArchError::BadField {
                field: key,
                found: x.to_string(),
                expected: "a number",
            }),
        }
    }

    /// Whether the config has `key` at all (`null` included).
    pub(crate) fn has(&self, key: &str) -> bool {
        self.v.get(key).is_some()
    }

    pub(crate) fn str_or(&self, key: &'static str, default: &'a str) -> Result<&'a str, ArchError> {
        match self.raw(key) {
            None => Ok(default),
            Some(x) => x.as_str().ok_or_else(|| ArchError::BadField {
                field: key,
                found: x.to_string(),
                expected: "a string",
            }),
        }
    }

    pub(crate) fn bool_or(&self, key: &'static str, default: bool) -> Result<bool, ArchError> {
        match self.raw(key) {
            None => Ok(default),
            Some(x) => x.as_bool().ok_or_else(|| ArchError::BadField {
                field: key,
                found: x.to_string(),
                expected: "true or false",
            }),
        }
    }

    pub(crate) fn usize_list(&self, key: &'static str) -> Result<Vec<usize>, ArchError> {
        let bad = |x: &Value| ArchError::BadField {
            field: key,
            found: x.to_string(),
            expected: "a list of layer indices",
        };
        match self.raw(key) {
            None => Ok(Vec::new()),
            Some(x) => x
                .as_array()
                .ok_or_else(|| bad(x))?
                .iter()
                .map(|e| {
                    e.as_u64()
                        .and_then(|n| usize::try_from(n).ok())
                        .ok_or_else(|| bad(x))
                })
                .collect(),
        }
    }

    /// A token id field that may be absent, an integer, or a list of integers.
    pub(crate) fn token_ids(&self, key: &'static str) -> Result<Vec<u32>, ArchError> {
        let bad = |x: &Value| ArchError::BadField {
            field: key,
            found: x.to_string(),
            expected: "a token id or a list of token ids",
        };
        let one = |x: &Value| {
            x.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| bad(x))
        };
        match self.raw(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(a)) => a.iter().map(one).collect(),
            Some(x) => Ok(vec![one(x)?]),
        }
    }

    /// Rope settings from either dialect: 5.x `rope_parameters: {rope_theta, rope_type, ...}`
    /// wins over legacy top-level `rope_theta` / `rope_scaling`.
    pub(crate) fn rope(&self, default_theta: f64) -> Result<Rope, ArchError> {
        let traditional = self.bool_or("rope_traditional", false)?;
        let legacy_theta = self.f64_opt("rope_theta")?;
        let (theta, scaling_dict) = match self.raw("rope_parameters") {
            Some(Value::Object(p)) => {
                let theta = match p.get("rope_theta") {
                    Some(t) => Some(t.as_f64().ok_or_else(|| ArchError::BadField {
                        field: "rope_parameters.rope_theta",
                        found: t.to_string(),
                        expected: "a number",
                    })?),
                    None => legacy_theta,
                };
                (theta, Some(p.clone()))
            }
            Some(x) => {
                return Err(ArchError::BadField {
                    field: "rope_parameters",
                    found: x.to_string(),
                    expected: "an object",
                })
            }
            None => match self.raw("rope_scaling") {
                Some(Value::Object(s)) => (legacy_theta, Some(s.clone())),
                Some(x) => {
                    return Err(ArchError::BadField {
                        field: "rope_scaling",
                        found: x.to_string(),
                        expected: "an object or null",
                    })
                }
                None => (legacy_theta, None),
            },
        };
        let mut rope_type = "default".to_string();
        let mut scaling = None;
        if let Some(mut d) = scaling_dict {
            d.remove("rope_theta");
            for key in ["rope_type", "type"] {
                if let Some(t) = d.remove(key) {
                    if let Some(s) = t.as_str() {
                        rope_type = s.to_string();
                    }
                }
            }
            if rope_type != "default" || !d.is_empty() {
                scaling = Some(Value::Object(d));
            }
        }
        Ok(Rope {
            theta: theta.unwrap_or(default_theta),
            traditional,
            rope_type,
            scaling,
        })
    }

    /// The fields every supported architecture shares, with per-architecture defaults.
    pub(crate) fn common(&self, d: &Defaults) -> Result<ModelConfig, ArchError> {
        let hidden_size = self.usize_req(&["hidden_size"])?;
        let num_attention_heads = self.usize_req(&["num_attention_heads"])?;
        if num_attention_heads == 0 {
            return Err(ArchError::BadField {
                field: "num_attention_heads",
                found: "0".into(),
                expected: "at least 1",
            });
        }
        let num_key_value_heads = self
            .usize_any(&["num_key_value_heads"])?
            .unwrap_or(num_attention_heads);
        let head_dim = self
            .usize_any(&["head_dim"])?
            .unwrap_or(hidden_size / num_attention_heads);
        let intermediate_size = self.usize_req(&["intermediate_size"])?;
        let moe_intermediate_size = self
            .usize_any(&["moe_intermediate_size"])?
            .unwrap_or(intermediate_size);
        Ok(ModelConfig {
            arch: self.arch,
            hidden_size,
            num_hidden_layers: self.usize_req(&["num_hidden_layers"])?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size: self.usize_req(&["vocab_size"])?,
            intermediate_size,
            moe_intermediate_size,
            // 5.x writes num_local_experts for Qwen3-MoE and Mixtral, legacy configs num_experts.
            // DeepSeek-V3 and GLM-4.5 call it n_routed_experts.
            num_experts: self.usize_req(&[
                "num_local_experts",
                "num_experts",
                "n_routed_experts",
            ])?,
            num_experts_per_tok: self.usize_req(&["num_experts_per_tok"])?,
            norm_topk_prob: self.bool_or("norm_topk_prob", d.norm_topk_prob)?,
            router: RouterConfig::default(),
            rms_norm_eps: self.f64_opt("rms_norm_eps")?.unwrap_or(d.rms_norm_eps),
            rope: self.rope(d.rope_theta)?,
            max_position_embeddings: self.usize_any(&["max_position_embeddings"])?,
            tie_word_embeddings: self.bool_or("tie_word_embeddings", false)?,
            attention_bias: self.bool_or("attention_bias", d.attention_bias)?,
            qk_norm: d.qk_norm,
            partial_rotary_factor: 1.0,
            mla: None,
            linear_attention: None,
            attn_output_gate: false,
            sliding_window: None,
            attention_sinks: false,
            expert_bias: false,
            clamped_swiglu: None,
            clip_qkv: None,
            shared_expert: None,
            decoder_sparse_step: self.usize_any(&["decoder_sparse_step"])?.unwrap_or(1),
            mlp_only_layers: self.usize_list("mlp_only_layers")?,
            first_k_dense_replace: 0,
            moe_layer_freq: 1,
            bos_token_id: self.token_ids("bos_token_id")?.first().copied(),
            eos_token_ids: self.token_ids("eos_token_id")?,
        })
    }
}

/// Per-architecture defaults for fields a config may omit (transformers' config classes).
pub(crate) struct Defaults {
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    pub norm_topk_prob: bool,
    pub attention_bias: bool,
    pub qk_norm: QkNorm,
}

// ---- tensor names ----

/// One of an expert's three projections (SwiGLU: down(silu(gate(x)) * up(x))).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Proj {
    /// [I, H]
    Gate,
    /// [I, H]
    Up,
    /// [H, I]
    Down,
}

impl Proj {
    pub const ALL: [Proj; 3] = [Proj::Gate, Proj::Up, Proj::Down];

    /// The mlx-lm `switch_mlp` name (`gate_proj`, `up_proj`, `down_proj`).
    pub fn mlx_name(self) -> &'static str {
        match self {
            Proj::Gate => "gate_proj",
            Proj::Up => "up_proj",
            Proj::Down => "down_proj",
        }
    }
}

/// Which tensor of an (optionally MLX-quantized) linear layer a name refers to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Part {
    /// `.weight`: float weights, or U32 codes in an MLX-quantized checkpoint.
    Weight,
    /// `.scales` of an MLX-quantized layer.
    Scales,
    /// `.biases` of an MLX-quantized layer (the affine offsets, not a linear bias).
    Biases,
}

impl Part {
    fn from_suffix(s: &str) -> Option<Part> {
        match s {
            "weight" => Some(Part::Weight),
            "scales" => Some(Part::Scales),
            "biases" => Some(Part::Biases),
            _ => None,
        }
    }

    pub fn suffix(self) -> &'static str {
        match self {
            Part::Weight => "weight",
            Part::Scales => "scales",
            Part::Biases => "biases",
        }
    }
}

/// What a tensor is, as far as packing is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TensorRole {
    /// One expert's projection, per-expert layout (`...experts.N.gate_proj.weight`).
    Expert {
        layer: usize,
        expert: usize,
        proj: Proj,
        part: Part,
    },
    /// transformers 5.x in-memory fused `experts.gate_up_proj` [E, 2I, H] (gate rows first).
    FusedGateUp { layer: usize },
    /// transformers 5.x in-memory fused `experts.down_proj` [E, H, I].
    FusedDown { layer: usize },
    /// mlx-lm stacked `switch_mlp.{gate,up,down}_proj.{weight,scales,biases}` [E, out, ...].
    Stacked {
        layer: usize,
        proj: Proj,
        part: Part,
    },
    /// Biases of the routed experts' projections, stacked `[E, out]`: mlx-lm's
    /// `experts.{gate,up,down}_proj.bias` (`proj` set), or gpt-oss's upstream
    /// `experts.gate_up_proj_bias` `[E, 2I]` with gate and up interleaved (`proj` `None`) and
    /// `experts.down_proj_bias` (`Some(Down)`).
    ExpertBias { layer: usize, proj: Option<Proj> },
    /// gpt-oss's upstream MXFP4 experts: `experts.gate_up_proj_blocks` / `_scales` (`proj`
    /// `None`: gate and up rows interleaved, `[E, 2I, H/32, 16]` u8 codes and `[E, 2I, H/32]`
    /// E8M0 scales) and `experts.down_proj_blocks` / `_scales` (`Some(Down)`); `part` is
    /// `Weight` for the blocks.
    MxBlocks {
        layer: usize,
        proj: Option<Proj>,
        part: Part,
    },
    /// The router `[E, H]`: kept at full precision (routing decisions are sensitive to it).
    Router { layer: usize },
    /// Norm weights, linear biases, gates of shared experts: small and precision-critical.
    KeepFull,
    /// Everything else (embeddings, attention, dense MLPs, shared experts, lm_head):
    /// quantized or kept by the dense policy.
    Dense,
}

/// How one architecture names its MoE tensors. Names are
/// `model.layers.{L}.{block}.{rest}` with `block` one of `moe_blocks`.
#[derive(Debug)]
pub struct TensorNames {
    /// Module names of the sparse block: on-disk first, then aliases (Mixtral's on-disk
    /// `block_sparse_moe` is `mlp` in transformers 5.x memory).
    pub moe_blocks: &'static [&'static str],
    /// Per-expert projection names for gate, up, down.
    pub expert_projs: [&'static str; 3],
    /// The module under the block holding mlx-lm's stacked experts: `switch_mlp`, or gpt-oss's
    /// `experts`.
    pub stacked_module: &'static str,
    /// Router module under the block (`gate`).
    pub router: &'static str,
    /// Modules under the block that stay full precision besides the router
    /// (Qwen2-MoE's `shared_expert_gate`).
    pub keep_full: &'static [&'static str],
    /// The always-on expert(s) under the block, for an architecture that has them.
    pub shared: Option<SharedNames>,
}

/// Module names of a block's shared expert(s): Qwen2-MoE `shared_expert` with its gate
/// `shared_expert_gate`; DeepSeek-V3 and GLM-4.5 `shared_experts`, ungated.
#[derive(Debug)]
pub struct SharedNames {
    /// The SwiGLU MLP (`gate_proj`, `up_proj`, `down_proj` under it).
    pub mlp: &'static str,
    /// The `[1, H]` gate whose sigmoid scales the MLP's output, used when the config's
    /// [`SharedExpert::gated`] says so.
    pub gate: &'static str,
}

impl TensorNames {
    /// The names most architectures use (Qwen3-MoE's): `mlp` with per-expert `gate_proj`,
    /// `up_proj`, `down_proj`, mlx-lm's `switch_mlp`, router `gate`, nothing else kept full, no
    /// shared expert. An architecture writes only where it differs
    /// (`TensorNames { router: "router", ..TensorNames::DEFAULT }`), so a new field with a default
    /// here touches no architecture that does not use it.
    pub const DEFAULT: TensorNames = TensorNames {
        moe_blocks: &["mlp"],
        expert_projs: ["gate_proj", "up_proj", "down_proj"],
        stacked_module: "switch_mlp",
        router: "gate",
        keep_full: &[],
        shared: None,
    };

    /// The on-disk per-expert name of expert `expert`'s `proj` in layer `layer`.
    pub fn expert(&self, layer: usize, expert: usize, proj: Proj, part: Part) -> String {
        format!(
            "model.layers.{layer}.{}.experts.{expert}.{}.{}",
            self.moe_blocks[0],
            self.expert_projs[proj as usize],
            part.suffix()
        )
    }

    /// The on-disk router weight name of layer `layer`.
    pub fn router(&self, layer: usize) -> String {
        format!(
            "model.layers.{layer}.{}.{}.weight",
            self.moe_blocks[0], self.router
        )
    }

    /// The mlx-lm stacked name (`model.layers.L.{block}.switch_mlp.gate_proj.weight`).
    pub fn stacked(&self, layer: usize, proj: Proj, part: Part) -> String {
        format!("{}.{}", self.stacked_module(layer, proj), part.suffix())
    }

    /// The mlx-lm stacked module (`model.layers.L.{block}.switch_mlp.gate_proj`); its linear
    /// bias, when the experts have one, is `<module>.bias`.
    pub fn stacked_module(&self, layer: usize, proj: Proj) -> String {
        format!(
            "model.layers.{layer}.{}.{}.{}",
            self.moe_blocks[0],
            self.stacked_module,
            proj.mlx_name(),
        )
    }

    /// Classifies one tensor name.
    pub fn classify(&self, name: &str) -> TensorRole {
        let Some((layer, block_rest)) = split_layer(name) else {
            return if is_keep_full_leaf(name) {
                TensorRole::KeepFull
            } else {
                TensorRole::Dense
            };
        };
        let Some(rest) = self
            .moe_blocks
            .iter()
            .find_map(|b| block_rest.strip_prefix(b).and_then(|r| r.strip_prefix('.')))
        else {
            return if is_keep_full_leaf(block_rest) {
                TensorRole::KeepFull
            } else {
                TensorRole::Dense
            };
        };
        if rest == format!("{}.weight", self.router) {
            return TensorRole::Router { layer };
        }
        if self
            .keep_full
            .iter()
            .any(|k| rest.starts_with(k) && rest[k.len()..].starts_with('.'))
        {
            return TensorRole::KeepFull;
        }
        if rest == "experts.gate_up_proj" {
            return TensorRole::FusedGateUp { layer };
        }
        if rest == "experts.down_proj" {
            return TensorRole::FusedDown { layer };
        }
        // gpt-oss upstream: experts.{gate_up,down}_proj_{blocks,scales,bias}
        for (fused, proj) in [("gate_up_proj", None), ("down_proj", Some(Proj::Down))] {
            if let Some(tail) = rest
                .strip_prefix("experts.")
                .and_then(|r| r.strip_prefix(fused))
                .and_then(|r| r.strip_prefix('_'))
            {
                match tail {
                    "blocks" | "scales" => {
                        let part = if tail == "blocks" {
                            Part::Weight
                        } else {
                            Part::Scales
                        };
                        return TensorRole::MxBlocks { layer, proj, part };
                    }
                    "bias" => return TensorRole::ExpertBias { layer, proj },
                    _ => {}
                }
            }
        }
        if let Some(r) = rest.strip_prefix("experts.") {
            if let Some((n, tail)) = r.split_once('.') {
                if let (Ok(expert), Some((pname, suffix))) = (n.parse(), tail.split_once('.')) {
                    let proj = self.expert_projs.iter().position(|p| *p == pname);
                    if let (Some(p), Some(part)) = (proj, Part::from_suffix(suffix)) {
                        return TensorRole::Expert {
                            layer,
                            expert,
                            proj: Proj::ALL[p],
                            part,
                        };
                    }
                }
            }
        }
        if let Some(r) = rest
            .strip_prefix(self.stacked_module)
            .and_then(|r| r.strip_prefix('.'))
        {
            if let Some((pname, suffix)) = r.split_once('.') {
                let proj = Proj::ALL.iter().find(|p| p.mlx_name() == pname);
                if let Some(&proj) = proj {
                    if suffix == "bias" {
                        return TensorRole::ExpertBias {
                            layer,
                            proj: Some(proj),
                        };
                    }
                    if let Some(part) = Part::from_suffix(suffix) {
                        return TensorRole::Stacked { layer, proj, part };
                    }
                }
            }
        }
        if is_keep_full_leaf(rest) {
            TensorRole::KeepFull
        } else {
            TensorRole::Dense
        }
    }
}

/// `model.layers.{L}.{rest}` -> (L, rest).
fn split_layer(name: &str) -> Option<(usize, &str)> {
    let r = name.strip_prefix("model.layers.")?;
    let (l, rest) = r.split_once('.')?;
    Some((l.parse().ok()?, rest))
}

/// Norm weights and linear biases stay full precision whatever the policy.
fn is_keep_full_leaf(name: &str) -> bool {
    name.ends_with(".bias")
        || name
            .rsplit('.')
            .nth(1)
            .is_some_and(|module| module.contains("norm"))
        || name.ends_with("e_score_correction_bias")
}

#[cfg(test)]
mod tests;
