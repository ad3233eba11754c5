//! The normalized model configuration every architecture maps its config.json onto
//! ([`ModelConfig`], stored in a pack's metadata), with its router, shared-expert, attention and
//! layer-layout records, and the sizes the budget and `inspect` read from it.

use super::{Arch, ArchError, RouterConfig};
use serde::{Deserialize, Serialize};
use serde_json::Value;

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
            // Saturating: an absurd `n` is then refused by `validate` as too wide.
            intermediate_size: n.saturating_mul(width),
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
    /// The `qk_rope_head_dim` part is not rotated (Kimi-K3's `mla_use_nope`): it is scored as
    /// it is. Written to a pack only when true.
    #[serde(default, skip_serializing_if = "is_false")]
    pub no_rope: bool,
    /// The heads' output is scaled by `sigmoid(g_proj(x))` before `o_proj` (Kimi-K3's
    /// `mla_use_output_gate`). Written to a pack only when true.
    #[serde(default, skip_serializing_if = "is_false")]
    pub output_gate: bool,
}

/// DeepSeek Sparse Attention's lightning indexer (DeepSeek-V3.2, GLM-5), on top of [`Mla`]:
/// per query, `n_heads` small heads score every cached position (ReLU of a dot product with one
/// shared, layer-normed, partly rotated key per position, weighted per head), and the query
/// attends to the `topk` best only. The indexer caches its key: `head_dim` values per token.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Indexer {
    /// `index_n_heads`.
    pub n_heads: usize,
    /// `index_head_dim`: the width of a query head and of the cached key.
    pub head_dim: usize,
    /// `index_topk`: positions each query keeps once the context is longer.
    pub topk: usize,
    /// MLX's `traditional` flag of the indexer's RoPE (`indexer_rope_interleave`).
    pub rope_traditional: bool,
}

/// How a Gated DeltaNet layer names its input projections.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeltaProjections {
    /// Qwen3-Next: `in_proj_qkvz` and `in_proj_ba`, grouped per key head.
    Qkvz,
    /// Qwen3.5: `in_proj_qkv`, `in_proj_z`, `in_proj_b`, `in_proj_a`, each contiguous.
    Split,
    /// Kimi Delta Attention (Kimi-K3, under `self_attn`): `qkv_proj` and its own convolution
    /// `qkv_conv`, a per-channel decay from `f_a_proj` / `f_b_proj`, `b_proj`, and an output
    /// gate from `g_a_proj` / `g_b_proj` (or `g_proj`) on `o_norm`.
    Kda,
}

/// Gated DeltaNet linear attention (Qwen3-Next, Qwen3.5): every layer but each
/// `full_attention_interval`-th keeps, instead of a KV cache, a convolution state (the last
/// `conv_kernel_dim - 1` inputs of a depthwise causal convolution) and a recurrent state
/// `[value_heads, value_head_dim, key_head_dim]`, both of a fixed size whatever the context.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LinearAttention {
    /// Layers `L` with `(L + 1) % full_attention_interval == 0` use full attention, unless
    /// `full_attention_layers` lists them.
    pub full_attention_interval: usize,
    /// The full-attention layers, ascending, when `layer_types` gives a pattern that no
    /// interval describes. The interval is then 0, which a binary without this field refuses
    /// ("at least 1") instead of running the wrong layers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full_attention_layers: Option<Vec<usize>>,
    pub num_key_heads: usize,
    pub num_value_heads: usize,
    pub key_head_dim: usize,
    pub value_head_dim: usize,
    /// `linear_conv_kernel_dim`: the convolution's width.
    pub conv_kernel_dim: usize,
    pub projections: DeltaProjections,
    /// Kimi Delta Attention's `gate_lower_bound`: the decay is
    /// `exp(lower_bound * sigmoid(exp(A_log) * (a + dt_bias)))` instead of
    /// `exp(-exp(A_log) * softplus(a + dt_bias))`. Written to a pack only when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate_lower_bound: Option<f64>,
    /// Kimi Delta Attention's output gate is one full-rank `g_proj` instead of `g_a_proj` then
    /// `g_b_proj` (`use_full_rank_gate`). Written to a pack only when true.
    #[serde(default, skip_serializing_if = "is_false")]
    pub full_rank_gate: bool,
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

/// Gemma 4's decoder (`gemma4_text`, mlx-lm 0.32.2 gemma4_text.py), beyond the sliding-window
/// layout ([`ModelConfig::sliding_window`]) and the sliding layers' attention (`head_dim`,
/// `num_key_value_heads`, [`ModelConfig::rope`]): the full-attention layers' own geometry and
/// RoPE, and the final logit soft cap. Where set, the model also scales the embeddings by
/// `sqrt(hidden_size)`, attends with scale 1, normalizes values per head without a weight, wraps
/// attention and feed-forward in their own norms ("sandwich" norms), runs a dense GeGLU MLP beside
/// GeGLU experts in a sparse layer, and multiplies each layer's output by its `layer_scalar`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Gemma4 {
    /// The full-attention layers' head width (`global_head_dim`).
    pub global_head_dim: usize,
    /// The full-attention layers' KV heads (`num_global_key_value_heads` when keys are values,
    /// else `num_key_value_heads`).
    pub global_kv_heads: usize,
    /// The full-attention layers' values are their keys before `k_norm` (`attention_k_eq_v`):
    /// they have no `v_proj`.
    pub k_eq_v: bool,
    /// The full-attention layers' RoPE (`rope_parameters.full_attention`; "proportional"
    /// rotates the first `partial_rotary_factor` of each half-head pair).
    pub global_rope: Rope,
    /// `final_logit_softcapping`: logits become `tanh(logits / c) * c`.
    pub final_logit_softcapping: Option<f64>,
}

impl Gemma4 {
    /// The `partial_rotary_factor` of the full-attention layers' RoPE (1 when not given).
    pub fn global_rotary_factor(&self) -> f64 {
        self.global_rope
            .scaling
            .as_ref()
            .and_then(|s| s.get("partial_rotary_factor"))
            .and_then(|f| f.as_f64())
            .unwrap_or(1.0)
    }
}
/// Kimi-K3's activation, SiTU (mlx-lm kimi_k3.py `_situ`), of the dense MLPs, the shared
/// experts and the routed experts: in f32, `beta * tanh(gate / beta) * sigmoid(gate)` times the
/// up projection (itself `linear_beta * tanh(up / linear_beta)` when `linear_beta` is set),
/// cast back to the input's type.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Situ {
    /// `activation_situ_beta` (1 when the config has none).
    pub beta: f64,
    /// `activation_situ_linear_beta`. Written to a pack only when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub linear_beta: Option<f64>,
}

/// Kimi-K3's latent MoE (`routed_expert_hidden_size`): the routed experts work on
/// `routed_expert_down_proj(x)`, `hidden_size` values wide, and their weighted sum is brought
/// back by `routed_expert_up_proj` (after `routed_expert_norm` when `norm`); the router and the
/// shared experts see `x` itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatentMoe {
    /// `routed_expert_hidden_size`: the experts' input and output width.
    pub hidden_size: usize,
    /// `latent_moe_use_norm`. Written to a pack only when true.
    #[serde(default, skip_serializing_if = "is_false")]
    pub norm: bool,
}

/// DeepSeek-V4.1's residual: `mult` parallel streams of the hidden state instead of one, mixed
/// before and after each attention and feed-forward by weights computed from the streams
/// themselves (`hc_attn_*` / `hc_ffn_*`: a sigmoid "pre" collapse, a "post" expansion and a
/// doubly stochastic "comb" mix normalized by `sinkhorn_iters` Sinkhorn steps).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HyperConnections {
    /// `hc_mult`: the number of streams.
    pub mult: usize,
    /// `hc_sinkhorn_iters`.
    pub sinkhorn_iters: usize,
    /// `hc_eps`.
    pub eps: f64,
}

/// DeepSeek-V4.1's attention: one shared key/value head (`head_dim` wide, its last
/// `rope_dim` values rotated) attended over a sliding window of the last `sliding_window`
/// positions plus, in layers with a compression ratio, latents that pool each `ratio`
/// positions (a `Compressor` in the KV source layers), of which an indexer picks the `index_topk`
/// best per query; queries through a `q_lora_rank` bottleneck, a sink logit per head, and a
/// grouped low-rank output (`o_groups` groups of heads, each to `o_lora_rank` values).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CompressedAttention {
    pub q_lora_rank: usize,
    /// `qk_rope_head_dim`: the rotated tail of each head.
    pub rope_dim: usize,
    pub o_groups: usize,
    pub o_lora_rank: usize,
    pub sliding_window: usize,
    /// `compress_ratios`, one per layer (0: the window only); missing layers are 0.
    pub compress_ratios: Vec<usize>,
    /// `kv_source_layer_ids`: layers with a `Compressor`, whose latents later layers share.
    pub kv_source_layers: Vec<usize>,
    /// `index_source_layer_ids`: layers with an indexer, whose choice later layers share.
    pub index_source_layers: Vec<usize>,
    /// `compress_rope_theta`: the RoPE base of the layers with a compression ratio.
    pub compress_rope_theta: f64,
    pub index_n_heads: usize,
    pub index_head_dim: usize,
    pub index_topk: usize,
    /// `candidate_source_layer_id` (with `candidate_topk_blocks > 0`): this layer's indexer also
    /// picks, per query, its best `candidate_topk_blocks` blocks of `candidate_block_size`
    /// latents (the newest always), and later indexers choose within them. Written to a pack
    /// only when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidates: Option<CandidateBlocks>,
}

/// DeepSeek-V4.1's candidate blocks (see [`CompressedAttention::candidates`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CandidateBlocks {
    /// `candidate_source_layer_id`.
    pub source_layer: usize,
    /// `candidate_topk_blocks`.
    pub topk_blocks: usize,
    /// `candidate_block_size`.
    pub block_size: usize,
}

impl CompressedAttention {
    /// Layer `l`'s compression ratio (0: the window only).
    pub fn ratio(&self, l: usize) -> usize {
        self.compress_ratios.get(l).copied().unwrap_or(0)
    }

    pub fn is_kv_source(&self, l: usize) -> bool {
        self.kv_source_layers.contains(&l)
    }

    pub fn is_index_source(&self, l: usize) -> bool {
        self.index_source_layers.contains(&l)
    }

    /// Layer `l`'s values per closed group, when it is a KV source with a ratio: its latent
    /// (`head_dim`) and, where it is also an index source, its index key (`index_head_dim`).
    fn group_values(&self, l: usize, head_dim: usize) -> Option<(u64, u64)> {
        let ratio = self.ratio(l) as u64;
        if ratio == 0 || !self.is_kv_source(l) {
            return None;
        }
        let index = if self.is_index_source(l) {
            self.index_head_dim
        } else {
            0
        };
        Some(((head_dim + index) as u64, ratio))
    }

    /// Values the compressed caches hold after `positions` tokens: per KV source layer with a
    /// ratio, one latent (`head_dim`) per `ratio` positions, plus an index key
    /// (`index_head_dim`) where it is also an index source; the open group's rows (`ratio - 1`
    /// at most, key and gate, f32: counted as two values each) besides.
    pub fn compressed_values(&self, head_dim: usize, positions: u64) -> u64 {
        self.kv_source_layers
            .iter()
            .filter_map(|&l| self.group_values(l, head_dim))
            .map(|(per_group, ratio)| {
                let pending = if ratio > 1 {
                    (ratio - 1).min(positions) * 2 * head_dim as u64 * 2
                } else {
                    0
                };
                positions / ratio * per_group + pending
            })
            .sum()
    }

    /// What grows per token: each KV source's group values over its ratio, rounded up.
    pub fn values_per_token(&self, head_dim: usize) -> u64 {
        self.kv_source_layers
            .iter()
            .filter_map(|&l| self.group_values(l, head_dim))
            .map(|(per_group, ratio)| per_group.div_ceil(ratio))
            .sum()
    }
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
    /// DeepSeek Sparse Attention's indexer on top of `mla` (DeepSeek-V3.2, GLM-5). Written to a
    /// pack only when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub indexer: Option<Indexer>,
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
    /// Gemma 4's decoder ([`Gemma4`]). Written to a pack only when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gemma4: Option<Gemma4>,
    /// DeepSeek-V4.1's expert activation, in f32: `silu(min(gate, limit)) * clip(up, -limit,
    /// limit)` (no clamp when the limit is 0), for routed and shared experts. Written to a pack
    /// only when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub f32_swiglu_limit: Option<f64>,
    /// DeepSeek-V4.1's hyper-connections. Written to a pack only when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hyper_connections: Option<HyperConnections>,
    /// DeepSeek-V4.1's windowed and compressed attention (then `head_dim` is the shared key
    /// and value head's width). Written to a pack only when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compressed_attention: Option<CompressedAttention>,
    /// Kimi-K3's SiTU activation of every MLP and expert instead of SwiGLU. Written to a pack
    /// only when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub situ: Option<Situ>,
    /// Kimi-K3's attention residuals (`attn_res_block_size`): layers are grouped in blocks of
    /// this many, and each attention, feed-forward and the final norm read a softmax-weighted
    /// mix of the blocks' starting states and the current block's partial sum instead of the
    /// plain residual stream. Written to a pack only when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attn_res_block_size: Option<usize>,
    /// Kimi-K3's latent MoE ([`LatentMoe`]): the routed experts' width is its `hidden_size`.
    /// Written to a pack only when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latent_moe: Option<LatentMoe>,
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
        if let Some(c) = &self.compressed_attention {
            return c.rope_dim;
        }
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
        if let Some(c) = &self.compressed_attention {
            // What grows with the context: the compressed caches (the windows are bounded).
            return c.values_per_token(self.head_dim);
        }
        (0..self.num_hidden_layers)
            .filter(|&l| !self.is_linear_layer(l) && self.window_of(l).is_none())
            .map(|l| self.kv_values_of_layer(l) as u64)
            .sum()
    }

    /// Values softmax-attention layer `layer` caches per position: Gemma 4's full-attention
    /// layers have their own head width and KV heads (keys and values both cached, also where
    /// the values are the keys), every other layer [`ModelConfig::kv_values_per_layer`]'s.
    fn kv_values_of_layer(&self, layer: usize) -> usize {
        match (&self.gemma4, self.window_of(layer)) {
            (Some(g), None) => 2 * g.global_kv_heads * g.global_head_dim,
            _ => self.kv_values_per_layer(),
        }
    }

    /// Values one softmax-attention layer caches per position; under DSA the indexer's key
    /// besides MLA's latent and rotary key (mlx-lm's `CacheList(KVCache(), KVCache())`; mlx-lm
    /// also keeps an equal array of zeros as the indexer's "values", which flashpack does not).
    fn kv_values_per_layer(&self) -> usize {
        let index = self.indexer.as_ref().map_or(0, |i| i.head_dim);
        match &self.mla {
            Some(m) => m.kv_lora_rank + m.qk_rope_head_dim + index,
            None => 2 * self.num_key_value_heads * self.head_dim,
        }
    }

    /// Values the sliding-window layers' caches hold at most over a sequence of `positions`
    /// prefilled in calls of at most `chunk` tokens; 0 without sliding-window layers. A layer
    /// keeps its last `size - 1` positions and appends a call's tokens (mlx-lm's
    /// `RotatingKVCache`, `model/rotating.rs`), so it holds at most `size - 1 + chunk`
    /// positions, and `size` while decoding.
    pub fn window_kv_values(&self, positions: u64, chunk: u64) -> u64 {
        if let Some(c) = &self.compressed_attention {
            // Every layer's window: one key of `head_dim` per row (mlx-lm's `LayerCache`
            // keeps the last `sliding_window` rows and appends a call's before trimming).
            let held = positions.min(c.sliding_window as u64 + chunk.max(1));
            return self.num_hidden_layers as u64 * self.head_dim as u64 * held;
        }
        let Some(w) = &self.sliding_window else {
            return 0;
        };
        let held = positions.min(w.size as u64 - 1 + chunk.max(1));
        let per_position: u64 = w
            .layers
            .iter()
            .map(|&l| self.kv_values_of_layer(l) as u64)
            .sum();
        per_position * held
    }

    /// Values the whole KV cache holds at most for a sequence of `positions` prefilled in calls
    /// of at most `chunk` tokens: what a run's budget sets aside (in bf16, twice this in bytes).
    pub fn kv_values(&self, positions: u64, chunk: u64) -> u64 {
        if let Some(c) = &self.compressed_attention {
            return self.compressed_kv_values(c, positions, chunk);
        }
        self.kv_values_per_token() * positions + self.window_kv_values(positions, chunk)
    }

    /// [`ModelConfig::kv_values`] under DeepSeek-V4.1's attention: every layer's window (the
    /// last `sliding_window` positions of one `head_dim`-wide key, plus a call's new rows while
    /// it runs) and the compressed latents and index keys of the KV source layers.
    fn compressed_kv_values(&self, c: &CompressedAttention, positions: u64, chunk: u64) -> u64 {
        self.window_kv_values(positions, chunk) + c.compressed_values(self.head_dim, positions)
    }

    /// Whether layer `layer` uses linear attention (mlx-lm qwen3_next.py:
    /// `self.is_linear = (layer_idx + 1) % args.full_attention_interval != 0`, or the layers
    /// `layer_types` lists).
    pub fn is_linear_layer(&self, layer: usize) -> bool {
        self.linear_attention
            .as_ref()
            .is_some_and(|la| match &la.full_attention_layers {
                Some(full) => full.binary_search(&layer).is_err(),
                None => (layer + 1) % la.full_attention_interval.max(1) != 0,
            })
    }

    /// The routed experts' input and output width: the model's `hidden_size`, or under Kimi-K3's
    /// latent MoE its `routed_expert_hidden_size`.
    pub fn expert_hidden_size(&self) -> usize {
        self.latent_moe.map_or(self.hidden_size, |l| l.hidden_size)
    }

    /// Values Kimi-K3's attention residuals keep per position of one forward call (nothing
    /// between calls): the starting state of each block of `attn_res_block_size` layers,
    /// `hidden_size` values each; 0 without attention residuals.
    pub fn attn_res_values_per_token(&self) -> u64 {
        self.attn_res_block_size.map_or(0, |size| {
            (self.num_hidden_layers.div_ceil(size.max(1)) * self.hidden_size) as u64
        })
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
        // MLX's shapes are 32-bit: a size past i32::MAX cannot be a tensor dimension.
        let max = i32::MAX as usize;
        for (field, v) in positive {
            if v == 0 {
                return bad(field, "0".into(), "at least 1");
            }
            if v > max {
                return bad(field, v.to_string(), "at most 2147483647 (i32::MAX)");
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
        // The runtime computes in f32: 1e39 is finite as f64 but infinite as f32, and 1e-50
        // rounds to 0.
        let positive_finite = |x: f64| {
            let f = x as f32;
            x.is_finite() && x > 0.0 && f.is_finite() && f > 0.0
        };
        if self.max_position_embeddings == Some(0) {
            return bad(
                "max_position_embeddings",
                "0".into(),
                "at least 1 (or absent for no limit)",
            );
        }
        if !positive_finite(self.rms_norm_eps) {
            return bad(
                "rms_norm_eps",
                self.rms_norm_eps.to_string(),
                "a positive finite number, also as f32 (0 or less gives NaN logits)",
            );
        }
        if !positive_finite(self.rope.theta) {
            return bad(
                "rope_theta",
                self.rope.theta.to_string(),
                "a positive finite number, also as f32 (0 or less gives NaN logits)",
            );
        }
        if let Some(c) = self.clip_qkv {
            if !positive_finite(c) {
                return bad(
                    "clip_qkv",
                    c.to_string(),
                    "a positive finite number, also as f32",
                );
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
                "a positive finite number, also as f32",
            );
        }
        let f = self.partial_rotary_factor;
        if !(f.is_finite() && f > 0.0 && f <= 1.0) {
            return bad("partial_rotary_factor", f.to_string(), "a number in (0, 1]");
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
                if v > max {
                    return bad(field, v.to_string(), "at most 2147483647 (i32::MAX)");
                }
            }
        }
        let rope = self.rope_dims();
        if rope < 2 || rope % 2 != 0 {
            let from = match &self.mla {
                Some(m) => format!("qk_rope_head_dim {}", m.qk_rope_head_dim),
                None => format!("head_dim {} x partial_rotary_factor {f}", self.head_dim),
            };
            return Err(ArchError::Inconsistent {
                what: format!(
                    "RoPE would rotate {rope} values per head ({from}); it needs an even number of at least 2"
                ),
            });
        }
        if let Some(la) = &self.linear_attention {
            if let Some(full) = &la.full_attention_layers {
                if let Some(&l) = full
                    .iter()
                    .find(|&&l| l >= self.num_hidden_layers)
                    .or_else(|| full.windows(2).find(|w| w[0] >= w[1]).map(|w| &w[1]))
                {
                    return bad(
                        "layer_types",
                        format!("full attention at layer {l}"),
                        "ascending layers below num_hidden_layers",
                    );
                }
            }
            let interval = match la.full_attention_layers {
                // Set to 0 with a list, on purpose (see the field).
                Some(_) => 1,
                None => la.full_attention_interval,
            };
            let sizes = [
                ("full_attention_interval", interval),
                ("linear_num_key_heads", la.num_key_heads),
                ("linear_num_value_heads", la.num_value_heads),
                ("linear_key_head_dim", la.key_head_dim),
                ("linear_value_head_dim", la.value_head_dim),
            ];
            for (field, v) in sizes {
                if v == 0 {
                    return bad(field, "0".into(), "at least 1");
                }
                if v > max {
                    return bad(field, v.to_string(), "at most 2147483647 (i32::MAX)");
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
        if let Some(b) = self
            .linear_attention
            .as_ref()
            .and_then(|la| la.gate_lower_bound)
        {
            if !(b.is_finite() && (b as f32).is_finite()) {
                return bad(
                    "gate_lower_bound",
                    b.to_string(),
                    "a finite number, also as f32",
                );
            }
        }
        if let Some(s) = &self.situ {
            if !positive_finite(s.beta) {
                return bad(
                    "activation_situ_beta",
                    s.beta.to_string(),
                    "a positive finite number, also as f32",
                );
            }
            if let Some(lb) = s.linear_beta.filter(|&lb| !positive_finite(lb)) {
                return bad(
                    "activation_situ_linear_beta",
                    lb.to_string(),
                    "a positive finite number, also as f32 (or null)",
                );
            }
        }
        if let Some(l) = &self.latent_moe {
            if l.hidden_size == 0 || l.hidden_size > max {
                return bad(
                    "routed_expert_hidden_size",
                    l.hidden_size.to_string(),
                    "at least 1 and at most 2147483647 (i32::MAX)",
                );
            }
        }
        if let Some(n) = self.attn_res_block_size {
            if n == 0 || n > max {
                return bad(
                    "attn_res_block_size",
                    n.to_string(),
                    "at least 1 (or null for plain residuals)",
                );
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
        if let Some(g) = &self.gemma4 {
            for (field, v) in [
                ("global_head_dim", g.global_head_dim),
                ("num_global_key_value_heads", g.global_kv_heads),
            ] {
                if v == 0 {
                    return bad(field, "0".into(), "at least 1");
                }
                if v > max {
                    return bad(field, v.to_string(), "at most 2147483647 (i32::MAX)");
                }
            }
            if self.num_attention_heads % g.global_kv_heads != 0 {
                return Err(ArchError::Inconsistent {
                    what: format!(
                        "num_attention_heads {} is not a multiple of the full-attention layers' \
                         {} KV heads",
                        self.num_attention_heads, g.global_kv_heads
                    ),
                });
            }
            let f = g.global_rotary_factor();
            let rotated = (g.global_head_dim as f64 * f) as usize;
            if !(f.is_finite() && f > 0.0 && f <= 1.0) || rotated < 2 || rotated % 2 != 0 {
                return bad(
                    "rope_parameters.full_attention.partial_rotary_factor",
                    f.to_string(),
                    "a factor in (0, 1] that rotates an even number of at least 2 values",
                );
            }
            if let Some(c) = g.final_logit_softcapping {
                if !positive_finite(c) {
                    return bad(
                        "final_logit_softcapping",
                        c.to_string(),
                        "a positive finite number, also as f32 (or null)",
                    );
                }
            }
        }
        if let Some(c) = &self.compressed_attention {
            let sizes = [
                ("q_lora_rank", c.q_lora_rank),
                ("o_groups", c.o_groups),
                ("o_lora_rank", c.o_lora_rank),
                ("sliding_window", c.sliding_window),
                ("index_n_heads", c.index_n_heads),
                ("index_head_dim", c.index_head_dim),
                ("index_topk", c.index_topk),
            ];
            for (field, v) in sizes {
                if v == 0 {
                    return bad(field, "0".into(), "at least 1");
                }
                if v > max {
                    return bad(field, v.to_string(), "at most 2147483647 (i32::MAX)");
                }
            }
            if (self.num_attention_heads * self.head_dim) % c.o_groups != 0 {
                return Err(ArchError::Inconsistent {
                    what: format!(
                        "o_groups {} does not divide the {} heads of {} values",
                        c.o_groups, self.num_attention_heads, self.head_dim
                    ),
                });
            }
            if c.rope_dim > self.head_dim || c.rope_dim > c.index_head_dim {
                return Err(ArchError::Inconsistent {
                    what: format!(
                        "qk_rope_head_dim {} is wider than head_dim {} or index_head_dim {}",
                        c.rope_dim, self.head_dim, c.index_head_dim
                    ),
                });
            }
        }
        if let Some(b) = self
            .compressed_attention
            .as_ref()
            .and_then(|c| c.candidates.as_ref())
        {
            if b.block_size == 0 || b.block_size > max || b.topk_blocks > max {
                return bad(
                    "candidate_block_size",
                    b.block_size.to_string(),
                    "at least 1, and sizes at most 2147483647 (i32::MAX)",
                );
            }
        }
        if let Some(h) = &self.hyper_connections {
            if h.mult == 0 || h.mult > 64 {
                return bad("hc_mult", h.mult.to_string(), "between 1 and 64");
            }
            if !(h.eps.is_finite() && h.eps >= 0.0) {
                return bad("hc_eps", h.eps.to_string(), "a finite number, 0 or more");
            }
        }
        if let Some(limit) = self.f32_swiglu_limit {
            if !(limit.is_finite() && limit >= 0.0 && (limit as f32).is_finite()) {
                return bad(
                    "swiglu_limit",
                    limit.to_string(),
                    "a finite number, 0 or more, also as f32",
                );
            }
        }
        if let Some(c) = &self.clamped_swiglu {
            if !positive_finite(c.limit) || !positive_finite(c.alpha) {
                return bad(
                    "swiglu_limit",
                    c.limit.to_string(),
                    "a positive finite number, also as f32",
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
            if s.intermediate_size > max {
                return bad(
                    "shared_expert_intermediate_size",
                    s.intermediate_size.to_string(),
                    "at most 2147483647 (i32::MAX) in all (n_shared_experts x moe_intermediate_size)",
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
