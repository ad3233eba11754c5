//! MLX's quantization modes, as plain data: what both the file format (formats/flashpack-v1.md
//! §7.3) and the MLX binding name; and mlx-lm's `quantization` block of a config.json
//! ([`MlxQuantization`]), read by one parser for convert's loader and the model's mlx-lm
//! weights. A leaf: it imports nothing of the crate, so `mlx` and `format` both use it without
//! importing each other.

use std::collections::BTreeMap;

use serde_json::Value;

/// Quantization modes, formats/flashpack-v1.md §7.3: MLX's `mode` argument.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum QuantMode {
    /// `scale * q + bias` per group; any bits a pack accepts (`format::valid_bits`), scales and biases in a float type.
    #[default]
    Affine = 0,
    /// OCP microscaling: 4-bit E2M1 codes, one E8M0 (power of two) u8 scale per 32 values, no
    /// biases.
    Mxfp4 = 1,
    /// 8-bit E4M3 codes, one E8M0 u8 scale per 32 values, no biases.
    Mxfp8 = 2,
    /// NVIDIA's FP4: 4-bit E2M1 codes, one E4M3 u8 scale per 16 values, no biases (without
    /// the optional per-tensor `global_scale`).
    Nvfp4 = 3,
}

impl QuantMode {
    pub fn from_code(code: u8) -> Option<QuantMode> {
        Some(match code {
            0 => QuantMode::Affine,
            1 => QuantMode::Mxfp4,
            2 => QuantMode::Mxfp8,
            3 => QuantMode::Nvfp4,
            _ => return None,
        })
    }

    /// MLX's name for the mode.
    pub fn name(self) -> &'static str {
        match self {
            QuantMode::Affine => "affine",
            QuantMode::Mxfp4 => "mxfp4",
            QuantMode::Mxfp8 => "mxfp8",
            QuantMode::Nvfp4 => "nvfp4",
        }
    }

    pub fn from_name(name: &str) -> Option<QuantMode> {
        [
            QuantMode::Affine,
            QuantMode::Mxfp4,
            QuantMode::Mxfp8,
            QuantMode::Nvfp4,
        ]
        .into_iter()
        .find(|m| m.name() == name)
    }

    /// Whether the mode has a bias per group (only affine).
    pub fn has_biases(self) -> bool {
        self == QuantMode::Affine
    }

    /// The bits and group size a microscaling mode fixes; `None` for affine.
    pub fn fixed(self) -> Option<(u8, u32)> {
        match self {
            QuantMode::Affine => None,
            QuantMode::Mxfp4 => Some((4, 32)),
            QuantMode::Mxfp8 => Some((8, 32)),
            QuantMode::Nvfp4 => Some((4, 16)),
        }
    }

    /// Scale-like arrays per quantized matrix: scales and biases (2), or scales alone (1).
    pub fn aux_arrays(self) -> u64 {
        if self.has_biases() {
            2
        } else {
            1
        }
    }
}

/// mlx-lm's `quantization` block of a config.json: the model's bits, group size and mode, and
/// the modules quantized otherwise (`"model.layers.0.mlp.gate": {"bits": 8, "group_size": 64}`)
/// or not at all (`false`). The one parser of it: convert's loader keeps the source's codes by
/// it, and `model::MlxLmWeights` runs an mlx-lm folder by it. Its serialized form is the pack
/// metadata's `provenance.source_quantization`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MlxQuantization {
    pub group_size: usize,
    pub bits: u8,
    pub mode: String,
    /// Per-module settings keyed by module path (`model.layers.0.mlp.gate`): bits, group size
    /// and mode, or `None` when the module was left unquantized.
    pub overrides: BTreeMap<String, Option<(u8, usize, QuantMode)>>,
}

/// A `quantization` block that cannot be read; the detail names the key and says why.
#[derive(Debug, thiserror::Error)]
#[error("{detail}")]
pub struct MlxQuantizationError {
    pub detail: String,
}

impl MlxQuantization {
    /// Reads `config["quantization"]` (absent or null: `None`) as mlx-lm's `load_model` hands it
    /// to MLX: the model's `group_size` and `bits` must be there (mlx-lm indexes them), a null one
    /// and a module's missing or null one is its mode's default, and a module's missing mode is
    /// affine, as `nn.Module.to_quantized(group_size=None, bits=None, mode="affine")` takes them
    /// (mlx/nn/layers/quantized.py `_defaults_for_mode`: affine 64 and 4 bits, mxfp4 32 and 4,
    /// mxfp8 32 and 8, nvfp4 16 and 4).
    pub fn from_config(config: &Value) -> Result<Option<MlxQuantization>, MlxQuantizationError> {
        let Some(q) = config.get("quantization").filter(|q| !q.is_null()) else {
            return Ok(None);
        };
        let bad = |detail: String| MlxQuantizationError { detail };
        let obj = q
            .as_object()
            .ok_or_else(|| bad(format!("{q} is not an object")))?;
        let parse_mode = |m: &str, whose: &str| {
            QuantMode::from_name(m).ok_or_else(|| {
                bad(format!(
                    "{whose}mode {m:?} is not supported (affine, mxfp4, mxfp8 and nvfp4 are); \
                     convert from the float checkpoint"
                ))
            })
        };
        // A present number, or for null the mode's default; `None` when absent or not a number.
        let num = |o: &serde_json::Map<String, Value>, k: &str, default: u64| match o.get(k) {
            Some(Value::Null) => Some(default),
            v => v.and_then(Value::as_u64),
        };
        let mode_name = obj.get("mode").and_then(Value::as_str).unwrap_or("affine");
        let default_mode = parse_mode(mode_name, "")?;
        let (db, dg) = default_mode.defaults();
        let group_size = num(obj, "group_size", dg).ok_or_else(|| bad("no group_size".into()))?;
        let bits = num(obj, "bits", db).ok_or_else(|| bad("no bits".into()))?;
        let mut overrides = BTreeMap::new();
        for (k, val) in obj {
            let setting = match val {
                Value::Bool(false) => None,
                Value::Bool(true) => Some((bits as u8, group_size as usize, default_mode)),
                Value::Object(o) => {
                    // mlx-lm writes a module's own settings whole; a missing mode is affine
                    // (its quantize default), as for the 8-bit routers of an mxfp4 model.
                    let m = o.get("mode").and_then(Value::as_str).unwrap_or("affine");
                    let m = parse_mode(m, &format!("module {k}: "))?;
                    // mlx-lm writes `group_size: null` in mixed recipes over an mxfp4 model.
                    let (db, dg) = m.defaults();
                    let b = num(o, "bits", db).unwrap_or(db);
                    let g = num(o, "group_size", dg).unwrap_or(dg);
                    Some((b as u8, g as usize, m))
                }
                _ => continue, // group_size, bits, mode
            };
            overrides.insert(k.clone(), setting);
        }
        Ok(Some(MlxQuantization {
            group_size: group_size as usize,
            bits: bits as u8,
            mode: mode_name.to_string(),
            overrides,
        }))
    }

    /// The quantization mode of the whole model (the default of its modules).
    pub fn default_mode(&self) -> QuantMode {
        QuantMode::from_name(&self.mode).unwrap_or_default()
    }

    /// Bits, group size and mode of the module `module` (its path without `.weight`): its own
    /// setting, else the model's. A module left unquantized (`false`) gets the model's too: it
    /// has no scales, so nothing asks.
    pub fn setting(&self, module: &str) -> (u8, usize, QuantMode) {
        match self.overrides.get(module) {
            Some(Some(s)) => *s,
            Some(None) | None => (self.bits, self.group_size, self.default_mode()),
        }
    }
}

impl QuantMode {
    /// The bits and group size MLX gives the mode when none are named (`_defaults_for_mode` in
    /// mlx/nn/layers/quantized.py).
    pub fn defaults(self) -> (u64, u64) {
        self.fixed().map_or((4, 64), |(b, g)| (b as u64, g as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(q: Value) -> MlxQuantization {
        MlxQuantization::from_config(&json!({ "quantization": q }))
            .unwrap()
            .unwrap()
    }

    /// A null group size (or bits) is the mode's default, as MLX's `to_quantized` takes
    /// `group_size=None`: 64 for affine, 32 for mxfp4 and mxfp8; never the model's group size.
    /// (mlx-lm writes `"group_size": null` for the 8-bit affine routers of a mixed recipe over an
    /// mxfp4 model, whose own group size is 32.)
    #[test]
    fn a_null_group_size_is_the_modes_default_as_in_mlx() {
        let q = parse(json!({
            "group_size": 32, "bits": 4, "mode": "mxfp4",
            "model.layers.0.mlp.gate": {"bits": 8, "group_size": null},
            "model.layers.0.mlp.shared_expert_gate": {"bits": 8, "group_size": null, "mode": "mxfp8"},
            "model.layers.0.self_attn.q_proj": {"bits": null, "group_size": null, "mode": "mxfp4"},
            "model.embed_tokens": {"bits": 6},
            "lm_head": false,
        }));
        assert_eq!(
            q.setting("model.layers.0.mlp.gate"),
            (8, 64, QuantMode::Affine)
        );
        assert_eq!(
            q.setting("model.layers.0.mlp.shared_expert_gate"),
            (8, 32, QuantMode::Mxfp8)
        );
        assert_eq!(
            q.setting("model.layers.0.self_attn.q_proj"),
            (4, 32, QuantMode::Mxfp4)
        );
        assert_eq!(q.setting("model.embed_tokens"), (6, 64, QuantMode::Affine));
        assert_eq!(q.overrides["lm_head"], None);
        assert_eq!(
            q.setting("model.layers.1.mlp.gate"),
            (4, 32, QuantMode::Mxfp4)
        );
        // The model's own null group size: its mode's default too.
        let q = parse(json!({"group_size": null, "bits": 3}));
        assert_eq!(q.setting("anything"), (3, 64, QuantMode::Affine));
    }

    #[test]
    fn the_models_group_size_and_bits_are_required() {
        for q in [
            json!({"bits": 4}),
            json!({"group_size": 64}),
            json!([4, 64]),
        ] {
            let e = MlxQuantization::from_config(&json!({ "quantization": q })).unwrap_err();
            assert!(!e.detail.is_empty());
        }
        let e = MlxQuantization::from_config(&json!({"quantization": {"group_size": 64,
            "bits": 4, "mode": "fp4x"}}))
        .unwrap_err();
        assert!(e.detail.contains("fp4x"), "{e}");
        // nvfp4 with null sizes takes its own: 4 bits in groups of 16.
        let q = parse(json!({"group_size": null, "bits": null, "mode": "nvfp4"}));
        assert_eq!(
            (q.bits, q.group_size, q.default_mode()),
            (4, 16, QuantMode::Nvfp4)
        );
        assert_eq!(MlxQuantization::from_config(&json!({})).unwrap(), None);
        assert_eq!(
            MlxQuantization::from_config(&json!({"quantization": null})).unwrap(),
            None
        );
    }
}
