//! Kimi K2.5 / K2.6 (`kimi_k25`): its table entry (config fields, tensor names, router,
//! sanitize rules, expert layouts).
//!
//! In: a `config.json` with `model_type: "kimi_k25"`: a multimodal wrapper whose `text_config`
//! is a DeepSeek-V3 (Kimi-K2) config, beside a `vision_config`. Out: DeepSeek-V3's
//! [`ModelConfig`] (`deepseek_v3.rs`) read from `text_config`. Tensor names: the checkpoints
//! and mlx-lm's folders alike hold the text model under `language_model.` (`language_model.model.*`,
//! `language_model.lm_head.*`), read as `model.*` and `lm_head.*`; the vision tower and projector
//! (`vision_tower.*`, `vision_model.*`, `multi_modal_projector.*`, `mm_projector.*`) are dropped
//! ([`text_model_name`]).
//!
//! Forward pass (mlx-lm 0.32.2 `mlx_lm/models/kimi_k25.py`): `LanguageModel` is
//! `DeepseekV3Model` plus an `lm_head`, so the network is deepseek_v3.py's; `sanitize` drops
//! the vision modules and applies DeepSeek-V3's sanitize to `language_model` (`kv_b_proj`
//! split, experts stacked, MTP layers dropped).

use super::{deepseek_v3, Arch, ArchDef, ArchError, ModelConfig, Sanitize};
use serde_json::Value;
use std::borrow::Cow;

pub(super) const DEF: ArchDef = ArchDef {
    model_type: "kimi_k25",
    upstream: &[
        "https://huggingface.co/moonshotai/Kimi-K2.5/blob/main/config.json",
        "https://github.com/ml-explore/mlx-lm/blob/main/mlx_lm/models/kimi_k25.py",
        "https://github.com/ml-explore/mlx-lm/blob/main/mlx_lm/models/deepseek_v3.py",
    ],
    parse,
    sanitize: Sanitize {
        rename: text_model_name,
        ..deepseek_v3::DEF_BODY.sanitize
    },
    ..deepseek_v3::DEF_BODY
};

/// The multimodal modules mlx-lm's `sanitize` drops:
/// weights.pop("vision_tower"); ...("vision_model"); ...("multi_modal_projector"); ...("mm_projector")
const VISION: [&str; 4] = [
    "vision_tower.",
    "vision_model.",
    "multi_modal_projector.",
    "mm_projector.",
];

/// `language_model.X` is the text model's `X`; the vision modules are no part of it.
pub(super) fn text_model_name(name: &str) -> Option<Cow<'_, str>> {
    if VISION.iter().any(|v| name.starts_with(v)) {
        return None;
    }
    Some(match name.strip_prefix("language_model.") {
        Some(rest) => Cow::Borrowed(rest),
        None => Cow::Borrowed(name),
    })
}

fn parse(v: &Value) -> Result<ModelConfig, ArchError> {
    // text_config: Union[TextConfig, dict]  (TextConfig = deepseek_v3's ModelArgs)
    let Some(Value::Object(t)) = v.get("text_config") else {
        return Err(ArchError::MissingField {
            field: "text_config",
            arch: "kimi_k25",
        });
    };
    let mut t = t.clone();
    // Token ids are often written at the top level only.
    for key in ["bos_token_id", "eos_token_id"] {
        if !t.contains_key(key) {
            if let Some(x) = v.get(key) {
                t.insert(key.into(), x.clone());
            }
        }
    }
    deepseek_v3::parse_as(&Value::Object(t), Arch::KimiK25)
}
