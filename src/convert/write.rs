//! Write stage: metadata and the hand-off of encoded parts to the format's [`PackWriter`].
//!
//! In: the checkpoint (config, tokenizer files, provenance), the conversion options, encoded
//! dense tensors (sorted by name) and encoded segments (sorted by layer, expert, segment).
//! Out: the pack at the destination, via the writer's temp-file-fsync-rename.
//! Invariants: the metadata holds no clock time and no host detail, and its keys are sorted by
//! the writer, so the same input and options give the same bytes. Layout (offsets, padding,
//! page alignment) is planned by `format::layout::Planner` inside the writer.

use super::encode::EncodedSegment;
use super::load::{Checkpoint, Provenance};
use super::quantize::DenseOut;
use super::tensor::{Dtype, FloatDtype};
use super::{ConvertError, ConvertOptions};
use crate::codec::CodecId;
use crate::format::{DType, ExpertSegmentDesc, PackWriter, TensorDesc};
use serde_json::{json, Value};

/// The pack's dtype code for a source dtype, or an error naming the tensor.
pub fn pack_dtype(name: &str, d: Dtype) -> Result<DType, ConvertError> {
    Ok(match d {
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::Bf16 => DType::BF16,
        Dtype::U32 => DType::U32,
        Dtype::I32 => DType::I32,
        Dtype::U8 => DType::U8,
        other => {
            return Err(ConvertError::Unrepresentable {
                what: format!(
                    "tensor {name} is {other}; packs store F32, F16, BF16, U32, I32 or U8"
                ),
            })
        }
    })
}

pub(super) fn scale_dtype(d: FloatDtype) -> DType {
    match d {
        FloatDtype::F32 => DType::F32,
        FloatDtype::F16 => DType::F16,
        FloatDtype::Bf16 => DType::BF16,
    }
}

/// Adds one encoded dense tensor.
pub fn add_tensor(
    w: &mut PackWriter,
    t: &DenseOut<'_>,
    stored: &[u8],
    codec: CodecId,
) -> Result<(), ConvertError> {
    w.add_tensor(
        TensorDesc {
            name: t.name.clone(),
            dtype: pack_dtype(&t.name, t.dtype)?,
            shape: t.shape.iter().map(|&d| d as u64).collect(),
            bits: t.bits,
            group_size: t.group_size as u32,
            mode: t.mode,
            codec: codec.into(),
        },
        stored,
    )?;
    Ok(())
}

/// Adds one encoded expert segment.
pub fn add_segment(w: &mut PackWriter, s: &EncodedSegment) -> Result<(), ConvertError> {
    let n = |v: usize, what: &str| {
        u32::try_from(v).map_err(|_| ConvertError::Unrepresentable {
            what: format!("{what} {v} does not fit the format's 32-bit field"),
        })
    };
    let n16 = |v: usize, what: &str| {
        u16::try_from(v).map_err(|_| ConvertError::Unrepresentable {
            what: format!("{what} {v} does not fit the format's 16-bit field"),
        })
    };
    w.add_expert_segment(
        ExpertSegmentDesc {
            layer: n(s.layer, "layer")?,
            expert: n(s.expert, "expert")?,
            segment: n16(s.segment, "segment")?,
            segment_count: n16(s.segment_count, "segment count")?,
            row_start: n(s.row_start, "row")?,
            row_count: n(s.row_count, "rows")?,
            bits: s.bits,
            group_size: n(s.group_size, "group size")?,
            // mxfp4/mxfp8 scales are E8M0 bytes, nvfp4's E4M3.
            scale_dtype: if s.mode.has_biases() {
                scale_dtype(s.scale_dtype)
            } else {
                DType::U8
            },
            mode: s.mode,
            bias_dtype: s.bias_dtype.map(scale_dtype),
            weight_codec: s.weight_codec.into(),
            aux_codec: s.aux_codec.into(),
        },
        &s.weights,
        &s.aux,
    )?;
    Ok(())
}

/// A JSON file of the checkpoint folder, or null when absent.
/// Whether the optional source file `path` is there: `false` when nothing has that name; an
/// error when something does but cannot be read as a file (a dangling link, a link loop, a
/// folder), since converting without it would silently drop what it holds.
pub(crate) fn optional_file(path: &std::path::Path) -> Result<bool, ConvertError> {
    let io = |source| ConvertError::Io {
        path: path.display().to_string(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io(e)),
        Ok(_) => {}
    }
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(true),
        Ok(_) => Err(io(std::io::Error::other(
            "it is not a regular file; remove it or put the model's file there",
        ))),
        Err(e) => Err(io(std::io::Error::new(
            e.kind(),
            format!("it is a link that leads nowhere ({e}); fix or remove the link"),
        ))),
    }
}

fn json_file(ck: &Checkpoint, name: &str) -> Result<Value, ConvertError> {
    let path = ck.root().join(name);
    if !optional_file(&path)? {
        return Ok(Value::Null);
    }
    let text = std::fs::read_to_string(&path).map_err(|source| ConvertError::Io {
        path: path.display().to_string(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| ConvertError::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// The source's chat template, where transformers finds it (`PreTrainedTokenizerBase.
/// from_pretrained`, 4.43 and later): `chat_template.jinja` first (it overrides the config's),
/// else `tokenizer_config.json`'s `chat_template`, a string or a list of named templates
/// (`[{"name": ..., "template": ...}]`, of which `apply_chat_template` uses `default`), else a
/// processor's `chat_template.json` (`{"chat_template": ...}`, multimodal repositories).
/// `None` when there is none: chat and serve then use the architecture's built-in format, if
/// it has one (`ArchDef::chat_template`), or a plain transcript. A template in a shape
/// transformers could not use either is refused, naming what to do.
pub(crate) fn chat_template(ck: &Checkpoint) -> Result<Option<String>, ConvertError> {
    let jinja = ck.root().join("chat_template.jinja");
    if optional_file(&jinja)? {
        return std::fs::read_to_string(&jinja)
            .map(Some)
            .map_err(|source| ConvertError::Io {
                path: jinja.display().to_string(),
                source,
            });
    }
    for file in ["tokenizer_config.json", "chat_template.json"] {
        let bad = |why: String| ConvertError::Tokenizer {
            what: format!(
                "{}'s chat_template {why}; write the template the model should chat with to \
                 chat_template.jinja beside config.json (it takes precedence) and convert again",
                ck.root().join(file).display()
            ),
            source: None,
        };
        match json_file(ck, file)?.get("chat_template") {
            None | Some(Value::Null) => {}
            Some(Value::String(t)) => return Ok(Some(t.clone())),
            Some(Value::Array(named)) => {
                let mut names = Vec::new();
                for entry in named {
                    let name = entry.get("name").and_then(Value::as_str);
                    let template = entry.get("template").and_then(Value::as_str);
                    let (Some(name), Some(template)) = (name, template) else {
                        return Err(bad(format!(
                            "is a list whose entry {entry} is not {{\"name\": ..., \"template\": ...}}"
                        )));
                    };
                    if name == "default" {
                        return Ok(Some(template.to_string()));
                    }
                    names.push(name);
                }
                return Err(bad(format!(
                    "lists named templates ({}) but none named \"default\", the one \
                     transformers chats with",
                    names.join(", ")
                )));
            }
            Some(other) => {
                return Err(bad(format!(
                    "is neither a string nor a list of named templates ({other})"
                )))
            }
        }
    }
    Ok(None)
}

/// The pack metadata (formats/flashpack-v1.md §4).
pub fn metadata(
    ck: &Checkpoint,
    provenance: &Provenance,
    opts: &ConvertOptions,
) -> Result<Value, ConvertError> {
    let tokenizer_config = json_file(ck, "tokenizer_config.json")?;
    let chat_template = chat_template(ck)?.map_or(Value::Null, Value::String);
    let mut m = json!({
        "format": "flashpack",
        "architecture": ck.config.arch.model_type(),
        "config": ck.raw_config,
        "model": serde_json::to_value(&ck.config).map_err(|e| ConvertError::Internal {
            what: format!("the model config does not serialise: {e}"),
        })?,
        "quantization": {
            "group_size": opts.group_size,
            "expert_bits": opts.expert_bits,
            "dense_bits": opts.dense_bits,
            "mode": "affine",
            "segments_per_expert": opts.segments,
        },
        "provenance": {
            "source": provenance.source,
            "revision": provenance.revision,
            "files": provenance.files,
            "tool": "flashpack",
            "tool_version": env!("CARGO_PKG_VERSION"),
            "options": opts.describe(),
            "source_quantization": ck.mlx_quantization,
        },
        "tokenizer": json_file(ck, "tokenizer.json")?,
        "tokenizer_config": tokenizer_config,
    });
    if !chat_template.is_null() {
        m["chat_template"] = chat_template;
    }
    let generation = json_file(ck, "generation_config.json")?;
    if !generation.is_null() {
        m["generation_config"] = generation;
    }
    Ok(m)
}
