//! The router, described once: what a config says ([`RouterConfig`], stored in a pack), what
//! an architecture fixes ([`RouterDef`], in its table entry), and the two combined
//! ([`RouterSpec`], by [`RouterSpec::of`], the one place they meet). `model/router.rs` runs a
//! `RouterSpec` on MLX; nothing else decides how an architecture routes.

use super::ModelConfig;
use serde::{Deserialize, Serialize};

/// How a router turns its logits into expert weights.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scoring {
    /// `softmax(logits)` over all experts, then top-k of the probabilities (every architecture
    /// before DeepSeek-V3).
    #[default]
    Softmax,
    /// `sigmoid(logits)` per expert, in f32 (`scoring_func` in DeepSeek-V3 / GLM-4.5 configs).
    Sigmoid,
    /// `sqrt(softplus(logits))` per expert, in f32 (DeepSeek-V4.1's `sqrtsoftplus`).
    SqrtSoftplus,
    /// Top-k of the raw logits, then softmax over the k chosen (Mixtral, gpt-oss): softmax with
    /// renormalisation, computed the way their mlx-lm models do (so bit-identical to them).
    /// Never read from a config: an architecture's [`RouterDef::scoring`] sets it.
    SoftmaxOfChosen,
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

/// Which `argpartition` spelling picks the top k. Both pick the same set; the order of the k
/// entries decides the order of the weighted sum, so each architecture keeps its model's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopKOrder {
    /// `argpartition(-x, kth=k-1)[..., :k]` (mixtral.py, olmoe.py, qwen2_moe.py, deepseek_v3.py).
    FirstOfNegated,
    /// `argpartition(x, kth=-k)[..., -k:]` (qwen3_moe.py).
    LastOf,
}

/// What an architecture fixes about its router whatever the config says: plain data in its
/// table entry ([`super::ArchDef::router`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouterDef {
    pub order: TopKOrder,
    /// The scoring whatever the config's; `None`: the config's ([`RouterConfig::scoring`]).
    pub scoring: Option<Scoring>,
    /// `norm_topk_prob` renormalises a top-1 choice too; false where the model writes
    /// `if top_k > 1 and norm_topk_prob` (DeepSeek-V3's `group_expert_select`).
    pub renormalize_top1: bool,
    /// The router's linear layer runs on the input cast to f32 (MiniMax:
    /// `self.gate(x.astype(mx.float32))`).
    pub f32_input: bool,
    /// The weights are cast to the input's type before they weight the experts (MiniMax:
    /// `scores.astype(x.dtype)`).
    pub weights_in_input_dtype: bool,
    /// The router normalizes its input first, with its own weight `<router>.scale` `[H]` times
    /// `hidden_size^-0.5` (Gemma 4: `mx.fast.rms_norm(x, self.scale * self._root_size, eps)`).
    pub input_norm: bool,
    /// Each chosen expert's weight is multiplied by its `<router>.per_expert_scale` `[E]`
    /// (Gemma 4), last.
    pub per_expert_scale: bool,
    /// Softmax in f32 whatever the logits' type (`precise=True`); false where the model calls
    /// `mx.softmax(x, axis=-1)` (Gemma 4).
    pub precise_softmax: bool,
}

impl RouterDef {
    /// Softmax or sigmoid as the config says, `norm_topk_prob` as it says, top-k by `order`.
    pub const fn config(order: TopKOrder) -> RouterDef {
        RouterDef {
            order,
            scoring: None,
            renormalize_top1: true,
            f32_input: false,
            weights_in_input_dtype: false,
            input_norm: false,
            per_expert_scale: false,
            precise_softmax: true,
        }
    }
}

/// Limit the choice to the best groups of experts (DeepSeek-V3's `n_group` / `topk_group`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpertGroups {
    pub n_group: usize,
    pub topk_group: usize,
}

/// How a router turns logits into a routing: plain data, the config's router under its
/// architecture's rules ([`RouterSpec::of`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RouterSpec {
    pub scoring: Scoring,
    pub order: TopKOrder,
    pub top_k: usize,
    /// Renormalise the k weights to sum to 1 (never with [`Scoring::SoftmaxOfChosen`], whose
    /// weights already do).
    pub renormalize: bool,
    /// Add `<router>.e_score_correction_bias` to the scores when choosing (not to the weights).
    pub selection_bias: bool,
    pub groups: Option<ExpertGroups>,
    /// Multiply the weights by this (`routed_scaling_factor`); `None` for 1.
    pub scaling: Option<f64>,
    /// [`RouterDef::f32_input`].
    pub f32_input: bool,
    /// [`RouterDef::weights_in_input_dtype`].
    pub weights_in_input_dtype: bool,
    /// [`RouterDef::input_norm`], with the norm's epsilon (`rms_norm_eps`) when set.
    pub input_norm: Option<f64>,
    /// [`RouterDef::per_expert_scale`].
    pub per_expert_scale: bool,
    /// [`RouterDef::precise_softmax`].
    pub precise_softmax: bool,
}

impl RouterSpec {
    /// `cfg`'s router: its architecture's [`RouterDef`] over the config's [`RouterConfig`],
    /// `norm_topk_prob` and `num_experts_per_tok`; groups when `n_group > 1`, scaling when the
    /// factor is not 1.
    pub fn of(cfg: &ModelConfig) -> RouterSpec {
        let def = cfg.arch.def().router;
        let r = &cfg.router;
        let scoring = def.scoring.unwrap_or(r.scoring);
        let top_k = cfg.num_experts_per_tok;
        RouterSpec {
            scoring,
            order: def.order,
            top_k,
            renormalize: scoring != Scoring::SoftmaxOfChosen
                && cfg.norm_topk_prob
                && (def.renormalize_top1 || top_k > 1),
            selection_bias: r.selection_bias,
            groups: (r.n_group > 1).then_some(ExpertGroups {
                n_group: r.n_group,
                topk_group: r.topk_group,
            }),
            scaling: (r.routed_scaling_factor != 1.0).then_some(r.routed_scaling_factor),
            f32_input: def.f32_input,
            weights_in_input_dtype: def.weights_in_input_dtype,
            input_norm: def.input_norm.then_some(cfg.rms_norm_eps),
            per_expert_scale: def.per_expert_scale,
            precise_softmax: def.precise_softmax,
        }
    }
}
