//! Supported Mixture-of-Experts architectures: config parsing and tensor names.
//!
//! In: a Hugging Face `config.json` (as a `serde_json::Value`) and tensor names from safetensors.
//! Out: a normalized [`ModelConfig`] (stored in the pack metadata) and, per tensor name, a
//! [`TensorRole`] saying whether it is an expert projection (and which), a router, a tensor that
//! must stay full precision, or a dense tensor quantized by policy.
//! Invariant: every architecture-specific detail lives in one file per architecture
//! (`qwen3_moe.rs`, `mixtral.rs`, `olmoe.rs`, `qwen2_moe.rs`, `deepseek_v3.rs`, `glm4_moe.rs`,
//! `qwen3_next.rs`, `qwen3_5_moe.rs`, `gpt_oss.rs`);
//! what they share is split by idea: this file holds the list (`Arch`, its per-architecture
//! `match`es, parsing a config by its `model_type`) and `ArchError`; `config.rs` the normalized
//! [`ModelConfig`] and its records; `fields.rs` the config field reader; `names.rs` tensor
//! naming. Both config dialects are accepted: transformers 5.x (`rope_parameters`,
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

mod config;
mod fields;
mod names;

pub use config::{
    ClampedSwiglu, DeltaProjections, LinearAttention, Mla, ModelConfig, QkNorm, Rope, RouterConfig,
    Scoring, SharedExpert, SlidingWindow,
};
pub(crate) use fields::{Defaults, Fields};
pub use names::{Part, Proj, SharedNames, TensorNames, TensorRole};

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
