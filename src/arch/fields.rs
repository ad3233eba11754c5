//! Reading config.json fields for the per-architecture parsers: both dialects (transformers 5.x
//! and legacy), with the architecture named in errors.

use super::{Arch, ArchError, ModelConfig, QkNorm, Rope, RouterConfig};
use serde_json::Value;

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

    /// `layer_types` (transformers' name for each layer's attention), when the config has it:
    /// one string per layer, at least `layers` of them (those past `layers` are ignored).
    pub(crate) fn layer_types(&self, layers: usize) -> Result<Option<Vec<&'a str>>, ArchError> {
        let Some(x) = self.raw("layer_types") else {
            return Ok(None);
        };
        let bad = || ArchError::BadField {
            field: "layer_types",
            found: x.to_string(),
            expected: "a list of layer types such as \"full_attention\"",
        };
        let types = x
            .as_array()
            .ok_or_else(bad)?
            .iter()
            .map(|t| t.as_str().ok_or_else(bad))
            .collect::<Result<Vec<_>, _>>()?;
        if types.len() < layers {
            return Err(ArchError::Inconsistent {
                what: format!(
                    "layer_types lists {} layers, num_hidden_layers is {layers}",
                    types.len()
                ),
            });
        }
        Ok(Some(types.into_iter().take(layers).collect()))
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
            // Kimi-K3 spells it num_experts_per_token.
            num_experts_per_tok: self
                .usize_req(&["num_experts_per_tok", "num_experts_per_token"])?,
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
            indexer: None,
            linear_attention: None,
            attn_output_gate: false,
            sliding_window: None,
            attention_sinks: false,
            expert_bias: false,
            clamped_swiglu: None,
            gemma4: None,
            f32_swiglu_limit: None,
            hyper_connections: None,
            compressed_attention: None,
            situ: None,
            attn_res_block_size: None,
            latent_moe: None,
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
