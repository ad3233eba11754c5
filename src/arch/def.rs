//! One architecture's entry in the table: every fact flashpack keeps about it, as data and a
//! few functions, so that an architecture is one file (`arch/<name>.rs`, defining a `DEF`) plus
//! one registration line in `arch/mod.rs`.
//!
//! In: nothing; each architecture file fills in an [`ArchDef`], writing only what differs from
//! [`ArchDef::DEFAULT`]. Out: what the pipelines ask of an architecture through
//! [`super::Arch::def`]: the config parser (arch), the tensor names and the sanitize rules
//! (convert's loader, the runtime's mlx-lm reader), the router and the MoE block (model).
//! Invariant: nothing outside `arch/` matches on an architecture; a shared block (convert's
//! derived tensors, model's router) is chosen by data here, never by the architecture's name.

use super::{ArchError, ExpertLayout, ModelConfig, RouterDef, TensorNames, TopKOrder};
use serde_json::Value;
use std::borrow::Cow;

/// What flashpack knows about one architecture.
#[derive(Debug)]
pub struct ArchDef {
    /// The Hugging Face `model_type` string, also the architecture's name in a pack.
    pub model_type: &'static str,
    /// Other `model_type`s that are this architecture under another name (as mlx-lm's
    /// `MODEL_REMAPPING` maps them).
    pub aliases: &'static [&'static str],
    /// The upstream modelling files its names, config and forward pass mirror.
    pub upstream: &'static [&'static str],
    /// config.json (either dialect) -> the normalized config, before
    /// [`ModelConfig::validate`].
    pub parse: fn(&Value) -> Result<ModelConfig, ArchError>,
    /// How it names its MoE tensors.
    pub names: TensorNames,
    /// How its router scores and picks, beyond what the config says.
    pub router: RouterDef,
    /// The weighted sum of the experts is cast back to the activations' dtype
    /// (`.astype(y.dtype)` in its mlx-lm MoE block).
    pub cast_moe_output: bool,
    /// mlx-lm's `sanitize` for it: names and tensors a pack holds otherwise than the source.
    pub sanitize: Sanitize,
    /// The expert layouts the loader reads for it; a layer stored otherwise is refused.
    pub expert_layouts: &'static [ExpertLayout],
    /// Why, in the refusal of a layout not in `expert_layouts`, and what to convert instead.
    pub layout_refusal: Option<&'static str>,
    /// What transformers' fused `experts.gate_up_proj` and `experts.down_proj` hold for it:
    /// [`ExpertLayout::Fused`] (`[E, 2I, H]`, gate rows first), or gpt-oss's
    /// [`ExpertLayout::FusedColumns`].
    pub fused_layout: ExpertLayout,
    /// The prompt format chat and serve use when a pack carries no chat template: a Jinja
    /// template written here from the format upstream documents, for a model whose repository
    /// ships none (DeepSeek-V3.2's Python `encoding` module). A pack's own template wins.
    pub chat_template: Option<&'static str>,
}

/// The part of mlx-lm's `sanitize` a conversion applies: source names a pack renames or
/// leaves out, and tensors computed from a source tensor.
#[derive(Debug)]
pub struct Sanitize {
    /// A source tensor's name in a pack, or `None` for a tensor of no text model (a vision
    /// tower). Applied to every tensor name and quantization override a source lists.
    pub rename: fn(&str) -> Option<Cow<'_, str>>,
    /// The tensors computed at conversion (convert/load/derived.rs).
    pub derive: &'static [Derive],
}

/// A tensor rule of mlx-lm's `sanitize`, which the loader's shared block applies
/// (convert/load/derived.rs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Derive {
    /// Multi-head latent attention's `self_attn.kv_b_proj.weight` split per head into
    /// `embed_q` and `unembed_out` (DeepSeek-V3; needs [`ModelConfig::mla`]).
    SplitKvB,
    /// Norm weights ending in one of these suffixes, which Hugging Face checkpoints store offset
    /// by one, get the one added (`weights[k] = v + 1.0`; Qwen3-Next, Qwen3.5). mlx-lm folders
    /// already hold the sums: the loader tells them apart by the convolution weights' layout.
    NormsPlusOne(&'static [&'static str]),
    /// A module's weights stored apart, joined along the first axis into one weight of the same
    /// module (Kimi-K3's `self_attn.{q,k,v}_proj.weight` -> `self_attn.qkv_proj.weight`, as
    /// mlx-lm's `sanitize` concatenates them): `parts` and `into` are name suffixes after the
    /// module; a module holding every part gets `into`, and its parts are not kept. With
    /// `conv`, each part is a Hugging Face depthwise convolution `[C, 1, K]` and the result is
    /// mlx.nn.Conv1d's `[C, K, 1]` (mlx-lm's `w.moveaxis(2, 1)`: the same values in the same
    /// order).
    Concat {
        parts: &'static [&'static str],
        into: &'static str,
        conv: bool,
    },
    /// Tensors ending in one of these suffixes stored with more than one axis (Kimi's
    /// `A_log` `[1, 1, heads, 1]`, `dt_bias`) become 1-D (`mx.reshape(w, (-1,))`); those ending
    /// in a `per_head` suffix keep only their first linear-attention heads' values (mlx-lm's
    /// `weights[a_log_key][:num_heads]`).
    Flatten {
        suffixes: &'static [&'static str],
        per_head: &'static [&'static str],
    },
}

/// A name as it is: the rename of every architecture whose pack names are its source's.
pub fn same_name(name: &str) -> Option<Cow<'_, str>> {
    Some(Cow::Borrowed(name))
}

/// The default's parser: an entry that forgot its own is refused, never silently parsed.
fn no_parser(_: &Value) -> Result<ModelConfig, ArchError> {
    Err(ArchError::Inconsistent {
        what: "this architecture's table entry has no config parser".into(),
    })
}

impl Sanitize {
    /// Nothing renamed, nothing derived.
    pub const NONE: Sanitize = Sanitize {
        rename: same_name,
        derive: &[],
    };
}

impl ArchDef {
    /// What an entry leaves out: default tensor names, a softmax router of the config's
    /// spelling `argpartition(-x, kth=k-1)[..., :k]`, no cast of the MoE output, nothing
    /// sanitized, experts per expert (Hugging Face), fused (transformers 5.x) or stacked (mlx-lm).
    /// `model_type`, `upstream` and `parse` have no meaningful default: every entry writes them.
    pub const DEFAULT: ArchDef = ArchDef {
        model_type: "",
        aliases: &[],
        upstream: &[],
        parse: no_parser,
        names: TensorNames::DEFAULT,
        router: RouterDef::config(TopKOrder::FirstOfNegated),
        cast_moe_output: false,
        sanitize: Sanitize::NONE,
        expert_layouts: &[
            ExpertLayout::PerExpert,
            ExpertLayout::Fused,
            ExpertLayout::Stacked,
        ],
        layout_refusal: None,
        fused_layout: ExpertLayout::Fused,
        chat_template: None,
    };
}
