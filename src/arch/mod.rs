//! Supported Mixture-of-Experts architectures: the table, config parsing and tensor names.
//!
//! In: a Hugging Face `config.json` (as a `serde_json::Value`) and tensor names from safetensors.
//! Out: a normalized [`ModelConfig`] (stored in the pack metadata) and, per tensor name, a
//! [`TensorRole`] saying whether it is an expert projection (and which), a router, a tensor that
//! must stay full precision, or a dense tensor quantized by policy.
//! Invariant: every architecture-specific fact lives in one file per architecture (`<name>.rs`,
//! listed once, in `architectures!` below), as its table entry ([`ArchDef`], `def.rs`):
//! model_type, upstream files, config parser, tensor names, sanitize rules, router and expert
//! layouts. This file holds the table (one line per architecture in `architectures!`, which
//! makes [`Arch`], its module and its entry), parsing a config by its `model_type`, and
//! `ArchError`; what the entries share is split by idea: `config.rs` the normalized
//! [`ModelConfig`] and its records; `router.rs` the router (config, architecture rules, the spec
//! the model runs); `fields.rs` the config field reader; `names.rs` tensor naming; `kv.rs` which layers
//! `--kv-bits` quantizes and the KV bytes per token that follow. Both config
//! dialects are accepted: transformers 5.x (`rope_parameters`, `num_local_experts`) and legacy
//! (top-level `rope_theta` / `rope_scaling`, `num_experts`).

mod config;
mod def;
mod fields;
mod kv;
mod names;
mod router;

pub use config::{
    CandidateBlocks, ClampedSwiglu, CompressedAttention, DeltaProjections, Gemma4,
    HyperConnections, Indexer, LatentMoe, LinearAttention, Mla, ModelConfig, QkNorm, Rope,
    SharedExpert, Situ, SlidingWindow,
};
pub use def::{same_name, ArchDef, Derive, Sanitize};
pub(crate) use fields::{Defaults, Fields};
pub use kv::{kv_group_for, quantized_vector_bytes, KvBits, KvKept, KV_GROUP_SIZE};
pub use names::{ExpertLayout, Part, Proj, SharedNames, TensorNames, TensorRole};
pub use router::{ExpertGroups, RouterConfig, RouterDef, RouterSpec, Scoring, TopKOrder};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;
use std::path::Path;

/// The table: one line per architecture, `Variant => module`, in the order shown to users. The
/// module (`arch/<module>.rs`) defines `pub(super) const DEF: ArchDef`; this makes the
/// [`Arch`] variant, declares the module, and lists the entry in [`Arch::ALL`] and
/// [`Arch::def`]. A pack names its architecture by `model_type`, so the order may change.
macro_rules! architectures {
    ($($(#[$doc:meta])* $variant:ident => $module:ident,)*) => {
        $(mod $module;)*

        /// Architectures whose experts flashpack can pack and run: a handle on the table's
        /// entry ([`Arch::def`]), written in a pack as its `model_type`.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum Arch {
            $($(#[$doc])* $variant,)*
        }

        impl Arch {
            /// Every supported architecture, in the order shown to users.
            pub const ALL: &'static [Arch] = &[$(Arch::$variant,)*];

            /// Its table entry: everything flashpack knows about it.
            pub fn def(self) -> &'static ArchDef {
                match self {
                    $(Arch::$variant => &$module::DEF,)*
                }
            }
        }

        /// The `model_type` of each entry, in table order (for serde's error message).
        const MODEL_TYPES: &[&str] = &[$($module::DEF.model_type,)*];
    };
}

architectures! {
    Qwen3Moe => qwen3_moe,
    Mixtral => mixtral,
    Olmoe => olmoe,
    Qwen2Moe => qwen2_moe,
    /// Also Kimi-K2 (`kimi_k2`).
    DeepseekV3 => deepseek_v3,
    Glm4Moe => glm4_moe,
    Qwen3Next => qwen3_next,
    Qwen35Moe => qwen3_5_moe,
    GptOss => gpt_oss,
    /// Kimi K2.5 / K2.6: DeepSeek-V3's text model in a multimodal wrapper.
    KimiK25 => kimi_k25,
    /// DeepSeek-V3.2: MLA with DeepSeek Sparse Attention's indexer.
    DeepseekV32 => deepseek_v32,
    /// GLM-5: DeepSeek-V3.2's model with GLM's config fields.
    GlmMoeDsa => glm_moe_dsa,
    /// MiniMax-M2 (`minimax_m2`).
    Minimax => minimax,
    /// Gemma 4 with experts (gemma-4-26b-a4b; also its multimodal `gemma4`).
    Gemma4Text => gemma4_text,
    /// DeepSeek-V4.1: hyper-connections, windowed and compressed attention with an indexer.
    DeepseekV41 => deepseek_v41,
    /// Kimi-K3: Kimi Delta Attention and MLA layers, attention residuals, SiTU.
    KimiK3 => kimi_k3,
}

/// `layer_types`, where a config gives it, is the truth about each layer's attention: every
/// layer must run the type it names (an architecture that reads it has set its config from
/// it; one that does not must find only the type it runs), else the pack would compute
/// another model than the checkpoint's.
fn layer_types_agree(v: &Value, cfg: &ModelConfig) -> Result<(), ArchError> {
    let text = v.get("text_config").filter(|t| t.is_object()).unwrap_or(v);
    let Some(types) = fields::Fields::new(text, cfg.arch).layer_types(cfg.num_hidden_layers)?
    else {
        return Ok(());
    };
    for (l, &t) in types.iter().enumerate() {
        let runs = if cfg.is_linear_layer(l) {
            "linear_attention"
        } else if cfg
            .sliding_window
            .as_ref()
            .is_some_and(|w| w.layers.contains(&l))
        {
            "sliding_attention"
        } else {
            "full_attention"
        };
        if t != runs {
            return Err(ArchError::Inconsistent {
                what: format!(
                    "layer_types marks layer {l} as {t:?}, but flashpack runs {} layer {l} as \
                     {runs:?}: it does not support this layer pattern for this model type",
                    cfg.arch.model_type()
                ),
            });
        }
    }
    Ok(())
}

/// `model_type`s that are recognised but not supported yet; named in the error so users know
/// the gap is known rather than a typo.
pub const PLANNED_MODEL_TYPES: &[&str] = &["qwen3_vl_moe", "llama4"];

impl Arch {
    /// The Hugging Face `model_type` string.
    pub fn model_type(self) -> &'static str {
        self.def().model_type
    }

    /// Looks up an architecture by `model_type`, or one of its aliases.
    pub fn from_model_type(model_type: &str) -> Result<Arch, ArchError> {
        let by_name = |a: &&Arch| a.model_type() == model_type;
        let by_alias = |a: &&Arch| a.def().aliases.contains(&model_type);
        Arch::ALL
            .iter()
            .find(by_name)
            .or_else(|| Arch::ALL.iter().find(by_alias))
            .copied()
            .ok_or_else(|| ArchError::Unsupported {
                model_type: model_type.to_string(),
                supported: supported_list(),
                planned: PLANNED_MODEL_TYPES.join(", "),
            })
    }

    /// The upstream modelling files this architecture's names and config mirror.
    pub fn upstream(self) -> &'static [&'static str] {
        self.def().upstream
    }

    /// How this architecture names its MoE tensors.
    pub fn names(self) -> &'static TensorNames {
        &self.def().names
    }

    /// The name a source tensor goes by in a pack (mlx-lm's), or `None` for a tensor that is not
    /// part of the text model ([`Sanitize::rename`]: Qwen3.5's multimodal checkpoints hold the
    /// language model under `model.language_model.*` beside a vision tower).
    pub fn text_model_name(self, name: &str) -> Option<std::borrow::Cow<'_, str>> {
        (self.def().sanitize.rename)(name)
    }

    /// What the tensor called `name` is (see [`TensorNames::classify`]).
    pub fn classify(self, name: &str) -> TensorRole {
        self.names().classify(name)
    }
}

/// Written as the `model_type` (what serde's `snake_case` wrote when `Arch` was a plain enum,
/// so packs read the same either way).
impl Serialize for Arch {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.model_type())
    }
}

impl<'de> Deserialize<'de> for Arch {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Arch, D::Error> {
        let name = std::borrow::Cow::<'de, str>::deserialize(d)?;
        Arch::ALL
            .iter()
            .copied()
            .find(|a| a.model_type() == name)
            .ok_or_else(|| serde::de::Error::unknown_variant(&name, MODEL_TYPES))
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

/// Normalized fields that config.json spells several ways (dialects and architectures), with
/// the keys they are read from: an error names the key the file has.
const FIELD_ALIASES: &[(&str, &[&str])] = &[
    (
        "num_experts",
        &["num_local_experts", "num_experts", "n_routed_experts"],
    ),
    (
        "shared_expert_intermediate_size",
        &["shared_expert_intermediate_size", "n_shared_experts"],
    ),
];

impl ModelConfig {
    /// Parses a `config.json` value of any supported architecture and either dialect.
    pub fn from_json(v: &Value) -> Result<ModelConfig, ArchError> {
        let model_type = match v.get("model_type") {
            None | Some(Value::Null) => {
                return Err(ArchError::MissingField {
                    field: "model_type",
                    arch: "any architecture",
                })
            }
            Some(t) => t.as_str().ok_or_else(|| ArchError::BadField {
                field: "model_type",
                found: t.to_string(),
                expected: "a string naming the architecture, such as \"qwen3_moe\"",
            })?,
        };
        let arch = Arch::from_model_type(model_type)?;
        let cfg = (arch.def().parse)(v)?;
        cfg.validate().map_err(|e| match e {
            // Name the key the config.json has, where the normalized field has aliases.
            ArchError::BadField {
                field,
                found,
                expected,
            } => ArchError::BadField {
                field: FIELD_ALIASES
                    .iter()
                    .find(|(f, _)| *f == field)
                    .and_then(|(_, keys)| {
                        let text = v.get("text_config").unwrap_or(v);
                        keys.iter().find(|k| text.get(**k).is_some()).copied()
                    })
                    .unwrap_or(field),
                found,
                expected,
            },
            other => other,
        })?;
        layer_types_agree(v, &cfg)?;
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
}

#[cfg(test)]
mod tests;
