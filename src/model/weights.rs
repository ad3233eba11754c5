//! Where the forward pass gets its dense tensors: the [`Weights`] trait and an implementation over
//! an mlx-lm folder (what `mlx_lm convert` writes), used by the golden tests and for debugging.
//!
//! In: tensor names as mlx-lm spells them (`model.layers.0.self_attn.q_proj.weight`, plus
//! `.scales` / `.biases` when quantized). Out: lazy MLX arrays and, for quantized modules, their
//! group size and bits. Invariant: a module is quantized exactly when `<module>.scales` exists.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::ComputeError;
use crate::arch::ModelConfig;
use crate::mlx::{self, Array};
use crate::quant_mode::MlxQuantization;

/// MLX quantization parameters of one module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quant {
    pub group_size: i32,
    pub bits: i32,
    pub mode: mlx::QuantMode,
}

/// A source of dense (non-expert) tensors by mlx-lm name.
pub trait Weights {
    /// The tensor called `name`, if present.
    fn get(&self, name: &str) -> Option<Array>;
    /// Group size and bits of the quantized module `module` (the name without `.weight`).
    fn quantization(&self, module: &str) -> Option<Quant>;
}

/// The tensors of an mlx-lm folder with the `quantization` block of its config.json
/// (a default plus per-module overrides such as the 8-bit routers).
#[derive(Debug, Default)]
pub struct MlxLmWeights {
    pub tensors: BTreeMap<String, Array>,
    pub default_quant: Option<Quant>,
    pub module_quant: BTreeMap<String, Quant>,
}

impl Weights for MlxLmWeights {
    fn get(&self, name: &str) -> Option<Array> {
        self.tensors.get(name).cloned()
    }

    fn quantization(&self, module: &str) -> Option<Quant> {
        self.module_quant
            .get(module)
            .copied()
            .or(self.default_quant)
    }
}

impl MlxLmWeights {
    /// Read `dir/config.json` and every `dir/*.safetensors` (lazily, through MLX's loader).
    pub fn open(dir: &Path) -> Result<(ModelConfig, MlxLmWeights), ComputeError> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|source| ComputeError::Io {
            path: config_path.clone(),
            source,
        })?;
        let json: Value =
            serde_json::from_str(&text).map_err(|source| ComputeError::BadConfig {
                path: config_path.clone(),
                what: source.to_string(),
            })?;
        let cfg = ModelConfig::from_json(&json)?;
        let mut weights = MlxLmWeights::default();
        weights.read_quantization(&json, &config_path)?;
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|source| ComputeError::Io {
                path: dir.to_path_buf(),
                source,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        for f in files {
            // Under the names the model reads (Qwen3.5's `language_model.*` is `model.*`).
            for (name, a) in mlx::load_safetensors(&f)? {
                if let Some(n) = cfg.arch.text_model_name(&name) {
                    weights.tensors.insert(n.into_owned(), a);
                }
            }
        }
        weights.module_quant = std::mem::take(&mut weights.module_quant)
            .into_iter()
            .filter_map(|(k, q)| Some((cfg.arch.text_model_name(&k)?.into_owned(), q)))
            .collect();
        Ok((cfg, weights))
    }

    /// `"quantization": {"group_size": 64, "bits": 4, "mode": "affine", "<module>": {...}}`,
    /// read by the one parser of it ([`MlxQuantization`], shared with convert's loader).
    fn read_quantization(&mut self, config: &Value, path: &Path) -> Result<(), ComputeError> {
        let q = MlxQuantization::from_config(config).map_err(|e| ComputeError::BadConfig {
            path: path.to_path_buf(),
            what: format!("quantization: {e}"),
        })?;
        let Some(q) = q else { return Ok(()) };
        let quant = |(bits, group_size, mode): (u8, usize, mlx::QuantMode)| Quant {
            group_size: group_size as i32,
            bits: bits.into(),
            mode,
        };
        self.default_quant = Some(quant((q.bits, q.group_size, q.default_mode())));
        for (module, setting) in &q.overrides {
            // A module left unquantized has no scales, so nothing asks for its setting.
            if let Some(s) = setting {
                self.module_quant.insert(module.clone(), quant(*s));
            }
        }
        Ok(())
    }
}
