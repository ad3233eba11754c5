//! How a source is already quantized, read from its `config.json`: mlx-lm's `quantization`
//! block (one parser, [`MlxQuantization`]; checked per module by [`quant_params`]), an FP8
//! checkpoint's weight block size (`quantization_config`, [`fp8_block_size`]) and a
//! compressed-tensors `pack-quantized` checkpoint's integer groups ([`packed_int`]).

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

/// The integer groups of a compressed-tensors `pack-quantized` checkpoint (Kimi K2 Thinking and
/// K2.5 ship their experts so: INT4, symmetric, group size 32), read from `quantization_config`
/// (at the top level, or in a multimodal config's `text_config`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PackedInt {
    pub bits: usize,
    pub group_size: usize,
}

/// [`PackedInt`] from `quantization_config` with `quant_method` `"compressed-tensors"`: `None` for
/// any other checkpoint. Every config group's `weights` must be what the loader dequantizes:
/// `type` `"int"`, `symmetric`, `strategy` `"group"` with a `group_size`, `num_bits` 2, 4 or 8,
/// no activation ordering, one setting for all groups; anything else is refused, naming the
/// field, before a tensor is read.
pub(super) fn packed_int(config: &Value) -> Result<Option<PackedInt>, LoadError> {
    let q = match config.get("quantization_config") {
        Some(q) => q,
        None => match config
            .get("text_config")
            .and_then(|t| t.get("quantization_config"))
        {
            Some(q) => q,
            None => return Ok(None),
        },
    };
    if q.get("quant_method").and_then(Value::as_str) != Some("compressed-tensors") {
        return Ok(None);
    }
    let bad = |detail: String| LoadError::MlxQuantization {
        detail: format!(
            "compressed-tensors: {detail}; flashpack reads symmetric integer groups in the \
             pack-quantized format (as Kimi K2 Thinking and K2.5 ship them): convert from the \
             bf16 checkpoint instead"
        ),
    };
    let format = q.get("format").and_then(Value::as_str).unwrap_or("");
    if format != "pack-quantized" {
        return Err(bad(format!("format {format:?} is not read")));
    }
    let groups = q
        .get("config_groups")
        .and_then(Value::as_object)
        .filter(|g| !g.is_empty())
        .ok_or_else(|| bad("config_groups is missing or empty".into()))?;
    let mut found: Option<PackedInt> = None;
    for (name, group) in groups {
        let w = group
            .get("weights")
            .filter(|w| !w.is_null())
            .ok_or_else(|| bad(format!("config group {name} quantizes no weights")))?;
        let field = |f: &str| w.get(f).cloned().unwrap_or(Value::Null);
        let want = |f: &str, ok: bool, expected: &str| -> Result<(), LoadError> {
            if ok {
                Ok(())
            } else {
                Err(bad(format!(
                    "config group {name} has weights.{f} = {}, not {expected}",
                    field(f)
                )))
            }
        };
        want("type", field("type") == "int", "\"int\"")?;
        want(
            "symmetric",
            field("symmetric") == true,
            "true (zero points are not read)",
        )?;
        want("strategy", field("strategy") == "group", "\"group\"")?;
        let actorder = field("actorder");
        want(
            "actorder",
            actorder.is_null() || actorder == false,
            "null (activation order, g_idx, is not read)",
        )?;
        let bits = field("num_bits").as_u64().unwrap_or(0) as usize;
        want("num_bits", matches!(bits, 2 | 4 | 8), "2, 4 or 8")?;
        let group_size = field("group_size").as_u64().unwrap_or(0) as usize;
        want("group_size", group_size > 0, "a positive integer")?;
        let this = PackedInt { bits, group_size };
        match found {
            Some(other) if other != this => {
                return Err(bad(format!(
                    "config groups differ ({other:?} and {this:?} in {name})"
                )))
            }
            _ => found = Some(this),
        }
    }
    Ok(found)
}
