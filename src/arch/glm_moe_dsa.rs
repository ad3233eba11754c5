//! GLM-5 (`glm_moe_dsa`): its table entry (config fields, tensor names, router, sanitize rules,
//! expert layouts).
//!
//! In: a `config.json` with `model_type: "glm_moe_dsa"`. Out: DeepSeek-V3.2's [`ModelConfig`]
//! (`deepseek_v32.rs`: MLA with DeepSeek Sparse Attention's indexer, the grouped sigmoid router,
//! shared experts, dense first layers), read from GLM's config fields: RoPE from
//! `rope_parameters` (mlx-lm's `__post_init__`: `rope_scaling = rope_parameters`,
//! `rope_theta = rope_parameters["rope_theta"]`; a legacy `rope_theta` is read too), and
//! `indexer_rope_interleave` True unless written. Tensor names are DeepSeek-V3.2's.
//!
//! Forward pass (mlx-lm 0.32.2 `mlx_lm/models/glm_moe_dsa.py`): `class Model(DSV32Model)`, the
//! model of deepseek_v32.py unchanged.

use super::{deepseek_v3, deepseek_v32, Arch, ArchDef, ArchError, ModelConfig};
use serde_json::Value;

pub(super) const DEF: ArchDef = ArchDef {
    model_type: "glm_moe_dsa",
    upstream: &[
        "https://huggingface.co/zai-org/GLM-5/blob/main/config.json",
        "https://github.com/ml-explore/mlx-lm/blob/main/mlx_lm/models/glm_moe_dsa.py",
        "https://github.com/ml-explore/mlx-lm/blob/main/mlx_lm/models/deepseek_v32.py",
    ],
    parse,
    ..deepseek_v3::DEF_BODY
};

fn parse(v: &Value) -> Result<ModelConfig, ArchError> {
    // rope_scaling = rope_parameters; rope_theta = rope_parameters["rope_theta"]: the shared
    // reader takes rope_parameters first (and, unlike mlx-lm, a legacy rope_theta without it).
    // indexer_rope_interleave: bool = True
    deepseek_v32::parse_as(v, Arch::GlmMoeDsa, true)
}
