//! How a source is already quantized, read from its `config.json`: mlx-lm's `quantization`
//! block (one parser, [`MlxQuantization`]; checked per module by [`quant_params`]) and an FP8
//! checkpoint's weight block size (`quantization_config`, [`fp8_block_size`]).

use super::LoadError;
use crate::convert::quantize::QuantParams;
use crate::quant_mode::MlxQuantization;
use serde_json::Value;

/// Bits, group size and mode of the quantized module `module` (its path without `.weight`) of
/// an mlx-lm source, checked as the loader needs them.
pub fn quant_params(q: &MlxQuantization, module: &str) -> Result<QuantParams, LoadError> {
    let (bits, gs, mode) = q.setting(module);
    QuantParams::with_mode(bits, gs, mode).map_err(|e| LoadError::MlxQuantization {
        detail: format!("module {module}: {e}"),
    })
}

/// The weight block size of an FP8 checkpoint: `quantization_config` with `quant_method`
/// `"fp8"`, `fmt` `"e4m3"` (the default) and `weight_block_size` (default 128 x 128). `None`
/// for any other checkpoint.
pub(super) fn fp8_block_size(config: &Value) -> Result<Option<[usize; 2]>, LoadError> {
    let Some(q) = config.get("quantization_config") else {
        return Ok(None);
    };
    if q.get("quant_method").and_then(Value::as_str) != Some("fp8") {
        return Ok(None);
    }
    let bad = |detail: String| LoadError::MlxQuantization { detail };
    if let Some(fmt) = q.get("fmt").and_then(Value::as_str) {
        if fmt != "e4m3" {
            return Err(bad(format!(
                "FP8 format {fmt:?} is not supported (e4m3 is); convert from the bf16 checkpoint"
            )));
        }
    }
    match q.get("weight_block_size") {
        None | Some(Value::Null) => Ok(Some([128, 128])),
        Some(v) => {
            let dims: Option<Vec<usize>> = v.as_array().map(|a| {
                a.iter()
                    .filter_map(|d| d.as_u64().map(|d| d as usize))
                    .filter(|&d| d > 0)
                    .collect()
            });
            match dims.as_deref() {
                Some(&[r, c]) => Ok(Some([r, c])),
                _ => Err(bad(format!(
                    "FP8 weight_block_size {v} is not two positive integers"
                ))),
            }
        }
    }
}
