//! The refusals of a conversion: a destination it must not write (before any work), a
//! tokenizer.json the runtime could not load, non-finite values in the source (as each tensor is
//! read). Also the note on dropped multi-token-prediction layers.

use super::load::{self, Checkpoint};
use super::{quantize, tensor, write, ConvertError};
use crate::progress::Progress;
use std::path::PathBuf;

/// A `tokenizer.json` that is present must be one the runtime can load: found now, not when
/// `run` first needs it. A source without one converts, with a warning: its pack takes token
/// ids only. A dangling link or a link loop in its place is an error, not a missing file.
pub(super) fn check_tokenizer(
    ck: &Checkpoint,
    progress: &dyn Progress,
) -> Result<(), ConvertError> {
    // A template transformers could not use is refused now, not after the experts.
    write::chat_template(ck)?;
    let path = ck.root().join("tokenizer.json");
    if !write::optional_file(&path)? {
        if let Some(why) = tiktoken_source(ck) {
            progress.warn(&format!(
                "{} has no tokenizer.json but {why}, which flashpack does not read \
                 (docs/decisions/0022-tiktoken-tokenizers.md): the pack will take token ids \
                 only, and `flashpack run`, `chat` and `serve` will refuse text. To chat with \
                 it, put a tokenizer.json converted from tiktoken.model beside config.json \
                 (transformers' TikTokenConverter with the pat_str of the repository's \
                 tokenization_*.py and the special tokens of tokenizer_config.json) and \
                 convert again",
                ck.root().display()
            ));
            return Ok(());
        }
        progress.warn(&format!(
            "{} has no tokenizer.json: the pack will take token ids only, and `flashpack run \
             --prompt` will refuse it; copy the model's tokenizer.json into the folder and \
             convert again to run text prompts",
            ck.root().display()
        ));
        return Ok(());
    }
    let text = std::fs::read_to_string(&path).map_err(|source| ConvertError::Io {
        path: path.display().to_string(),
        source,
    })?;
    text.parse::<tokenizers::Tokenizer>()
        .map(|_| ())
        .map_err(|e| ConvertError::Tokenizer {
            what: format!(
                "{} is not a tokenizer that can be loaded; replace it with the model's own \
                 tokenizer.json",
                path.display()
            ),
            source: Some(e),
        })
}

/// Whether the source's tokenizer is tiktoken's (Kimi K2 / K2.5 ship `tiktoken.model` and
/// `tokenization_kimi.py`, `tokenizer_class: "TikTokenTokenizer"`, and no tokenizer.json): what
/// says so, for the warning. A Hub snapshot holds only the files conversion reads, so the
/// class in tokenizer_config.json counts as much as the file.
fn tiktoken_source(ck: &Checkpoint) -> Option<String> {
    if ck.root().join("tiktoken.model").is_file() {
        return Some("it ships a tiktoken tokenizer (tiktoken.model)".into());
    }
    let text = std::fs::read_to_string(ck.root().join("tokenizer_config.json")).ok()?;
    let config: serde_json::Value = serde_json::from_str(&text).ok()?;
    let class = config.get("tokenizer_class")?.as_str()?;
    class.contains("TikToken").then(|| {
        format!("its tokenizer_config.json names a tiktoken tokenizer ({class}, read from tiktoken.model)")
    })
}

/// Says once what the loader left out of a checkpoint: multi-token-prediction layers, a
/// vision tower, and the shards holding nothing else.
pub(super) fn note_dropped_mtp(ck: &Checkpoint, progress: &dyn Progress) {
    let d = ck.dropped_mtp();
    let mut parts = Vec::new();
    if d.tensors > 0 {
        parts.push(format!(
            "{} tensor(s) of the multi-token-prediction layer(s) {}..={} \
             (num_nextn_predict_layers in config.json)",
            d.tensors,
            d.layers.start,
            d.layers.end.saturating_sub(1),
        ));
    }
    if d.other_tensors > 0 {
        parts.push(format!(
            "{} tensor(s) of no text model (vision tower and projector)",
            d.other_tensors
        ));
    }
    if parts.is_empty() {
        return;
    }
    let skipped = match d.skipped_shards.len() {
        0 => String::new(),
        n => format!(
            "; {n} shard(s) holding only them were not read ({})",
            d.skipped_shards.join(", ")
        ),
    };
    progress.note(&format!(
        "dropped {}, as mlx-lm does: the pack holds the text model's {} decoder layers{skipped}",
        parts.join(" and "),
        ck.config.num_hidden_layers
    ));
}

/// Refuses a destination the conversion must not write: one ending in a slash (a folder, not a
/// file name), one in a folder that does not exist, an existing file that is not a regular file
/// (a device or a pipe, which renaming over would replace), or any file the conversion reads
/// (`inputs`), through whatever links. Checked before any work, so a bad `-o` costs nothing.
pub fn check_destination(dest: &std::path::Path, inputs: &[PathBuf]) -> Result<(), ConvertError> {
    let bad = |why: String| ConvertError::Destination {
        path: dest.to_path_buf(),
        why,
    };
    let text = dest.as_os_str().to_string_lossy();
    if text.ends_with('/') || text.ends_with(std::path::MAIN_SEPARATOR) {
        return Err(bad(
            "it ends with a slash; give a file name such as DIR/model.flashpack".into(),
        ));
    }
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !parent.is_dir() {
        return Err(bad(format!(
            "the folder {} does not exist; create it first",
            parent.display()
        )));
    }
    if let Ok(meta) = std::fs::metadata(dest) {
        if !meta.is_file() && !meta.is_dir() {
            return Err(bad(
                "it exists and is not a regular file (a device, pipe or socket); \
                 writing the pack would replace it"
                    .into(),
            ));
        }
        if let Ok(target) = std::fs::canonicalize(dest) {
            let read = inputs
                .iter()
                .filter_map(|p| std::fs::canonicalize(p).ok())
                .any(|p| p == target);
            if read {
                return Err(bad(format!(
                    "it is a file of the source ({}), which the conversion reads; write the \
                     pack elsewhere",
                    target.display()
                )));
            }
        }
    }
    Ok(())
}

/// Refuses NaN and infinity in float values (weights, or the scales and biases of MLX codes),
/// naming the tensor and the first bad element: quantizing them would give NaN logits at run.
fn check_finite(
    tensor: impl FnOnce() -> String,
    dtype: tensor::FloatDtype,
    bytes: &[u8],
    cols: usize,
) -> Result<(), ConvertError> {
    match dtype.first_non_finite(bytes) {
        None => Ok(()),
        Some((i, value)) => Err(ConvertError::NonFinite {
            tensor: tensor(),
            at: match i.checked_div(cols) {
                Some(row) => format!("row {row}, column {} (element {i})", i % cols),
                None => format!("element {i}"),
            },
            value,
        }),
    }
}

fn check_finite_quantized(
    tensor: &dyn Fn(&str) -> String,
    q: &quantize::QuantizedView<'_>,
) -> Result<(), ConvertError> {
    let groups = q.cols / q.params.group_size.max(1);
    if !q.params.has_biases() {
        // mxfp4/mxfp8: u8 E8M0 scales, whose only non-finite value is 255 (NaN); nvfp4: E4M3
        // scales, NaN at S.1111.111.
        let nan = |e: u8| match q.params.mode {
            crate::format::QuantMode::Nvfp4 => e & 0x7f == 0x7f,
            _ => e == 255,
        };
        return match q.scales.iter().position(|&e| nan(e)) {
            None => Ok(()),
            Some(i) => Err(ConvertError::NonFinite {
                tensor: tensor("scales"),
                at: format!(
                    "row {}, group {} (element {i})",
                    i / groups.max(1),
                    i % groups.max(1)
                ),
                value: f32::NAN,
            }),
        };
    }
    check_finite(|| tensor("scales"), q.scale_dtype, q.scales, groups)?;
    check_finite(|| tensor("biases"), q.scale_dtype, q.biases, groups)
}

/// [`check_finite`] of a float or FP8 matrix.
fn check_finite_matrix(
    tensor: impl FnOnce() -> String,
    m: &tensor::MatrixView<'_>,
) -> Result<(), ConvertError> {
    match m.first_non_finite() {
        None => Ok(()),
        Some((row, col, value)) => Err(ConvertError::NonFinite {
            tensor: tensor(),
            at: format!("row {row}, column {col}"),
            value,
        }),
    }
}

pub(super) fn check_finite_dense(t: &load::DenseTensor<'_>) -> Result<(), ConvertError> {
    match &t.data {
        load::TensorData::Float {
            dtype,
            shape,
            bytes,
        } => {
            let cols = if shape.len() >= 2 {
                shape[shape.len() - 1]
            } else {
                0
            };
            check_finite(|| t.name.clone(), *dtype, bytes, cols)
        }
        load::TensorData::Quantized(q) => {
            let module = t.name.strip_suffix(".weight").unwrap_or(&t.name);
            check_finite_quantized(&|part| format!("{module}.{part}"), q)
        }
        load::TensorData::Fp8(m) => check_finite_matrix(|| t.name.clone(), m),
        load::TensorData::Derived(ref d) => d
            .sources()
            .iter()
            .try_for_each(|m| check_finite_matrix(|| t.name.clone(), m)),
        load::TensorData::Other { .. } => Ok(()),
    }
}

pub(super) fn check_finite_expert(
    ck: &Checkpoint,
    x: &quantize::ExpertProjections<'_>,
    l: usize,
    e: usize,
) -> Result<(), ConvertError> {
    let names = ck.config.arch.names();
    for (proj, p) in crate::arch::Proj::ALL
        .into_iter()
        .zip([&x.gate, &x.up, &x.down])
    {
        let name = |part: &str| {
            format!(
                "layer {l} expert {e} {} ({})",
                proj.mlx_name(),
                names.expert(l, e, proj, crate::arch::Part::Weight)
            )
            .replace(".weight)", &format!(".{part})"))
        };
        match p {
            quantize::ProjSource::Float(m) => check_finite_matrix(|| name("weight"), m)?,
            quantize::ProjSource::Quantized(q)
            | quantize::ProjSource::Interleaved { all: q, .. } => check_finite_quantized(&name, q)?,
        }
    }
    Ok(())
}

/// The dense tensors the pack will hold against the model the runtime builds from config.json:
/// the runtime's own loader ([`crate::model::Model::load`]) is run over their names, shapes and
/// quantization (lazy zeros, nothing computed), so every tensor the config implies must exist
/// with its shape, and every tensor present must be one the model reads (issue 33). Tensors
/// that are dropped on purpose (multi-token prediction, vision towers) never get here. One rule
/// for every architecture: a new one is checked by its own loader. Runs after the dense tensors
/// are planned and before any expert is converted (the hours of a large model).
pub(super) fn check_dense_against_model(
    c: &crate::arch::ModelConfig,
    raw_config: &serde_json::Value,
    planned: &[quantize::DenseOut<'_>],
) -> Result<(), ConvertError> {
    use crate::mlx::{Array, Dtype};
    use crate::model::{Quant, Weights};
    use std::cell::RefCell;
    use std::collections::{BTreeMap, BTreeSet};

    struct Planned<'p> {
        tensors: BTreeMap<&'p str, &'p quantize::DenseOut<'p>>,
        asked: RefCell<BTreeSet<String>>,
    }
    impl Weights for Planned<'_> {
        fn get(&self, name: &str) -> Option<Array> {
            self.asked.borrow_mut().insert(name.to_string());
            let t = self.tensors.get(name)?;
            let dtype = match t.dtype {
                tensor::Dtype::F32 => Dtype::F32,
                tensor::Dtype::F16 => Dtype::F16,
                tensor::Dtype::Bf16 => Dtype::BF16,
                tensor::Dtype::U32 => Dtype::U32,
                tensor::Dtype::I32 => Dtype::I32,
                tensor::Dtype::U8 => Dtype::U8,
                _ => return None,
            };
            Array::zeros(&t.shape, dtype).ok()
        }
        fn quantization(&self, module: &str) -> Option<Quant> {
            let t = self.tensors.get(format!("{module}.weight").as_str())?;
            (t.bits > 0).then_some(Quant {
                group_size: t.group_size as i32,
                bits: t.bits as i32,
                mode: t.mode,
            })
        }
    }
    // One tensor may shadow another: `planned` is checked for duplicates before this.
    let w = Planned {
        tensors: planned.iter().map(|t| (t.name.as_str(), t)).collect(),
        asked: RefCell::new(BTreeSet::new()),
    };
    crate::model::Model::load(c, &w).map_err(|e| {
        let fields = match &e {
            crate::model::ComputeError::BadShape {
                found, expected, ..
            } => {
                let wrong: Vec<usize> = expected
                    .iter()
                    .enumerate()
                    .filter(|&(i, d)| found.get(i) != Some(d))
                    .map(|(_, &d)| d)
                    .collect();
                fields_with_values(raw_config, &wrong)
            }
            _ => Vec::new(),
        };
        let from = match fields.as_slice() {
            [] => String::new(),
            f => format!(" (the expected size comes from {})", f.join(", ")),
        };
        ConvertError::ConfigDoesNotFit {
            detail: format!("the model config.json describes cannot be built from them: {e}{from}"),
        }
    })?;
    let asked = w.asked.into_inner();
    let unused: Vec<&str> = planned
        .iter()
        .map(|t| t.name.as_str())
        .filter(|n| !asked.contains(*n))
        .collect();
    if let Some(first) = unused.first() {
        let more = match unused.len() {
            1 => String::new(),
            n => format!(
                " and {} more ({})",
                n - 1,
                unused[1..]
                    .iter()
                    .take(4)
                    .copied()
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        return Err(ConvertError::ConfigDoesNotFit {
            detail: format!(
                "the checkpoint holds {first}{more}, which the model config.json describes never \
                 reads (a field such as n_shared_experts, use_qk_norm or \
                 shared_expert_intermediate_size turns that module off); converting would drop \
                 weights and change the model's output"
            ),
        });
    }
    Ok(())
}

/// The integer fields of `config` (nested objects too, as `a.b`) whose value is one of
/// `values`: which fields a size the model expected came from, to name them in an error.
fn fields_with_values(config: &serde_json::Value, values: &[usize]) -> Vec<String> {
    fn walk(v: &serde_json::Value, path: &str, values: &[usize], out: &mut Vec<String>) {
        let Some(map) = v.as_object() else {
            return;
        };
        for (k, x) in map {
            let p = if path.is_empty() {
                k.clone()
            } else {
                format!("{path}.{k}")
            };
            match x {
                serde_json::Value::Object(_) => walk(x, &p, values, out),
                _ => {
                    let n = x.as_u64().and_then(|n| usize::try_from(n).ok());
                    if n.is_some_and(|n| n > 1 && values.contains(&n)) {
                        out.push(format!("{p} = {x}"));
                    }
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(config, "", values, &mut out);
    out
}
