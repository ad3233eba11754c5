//! Open stage: a pack becomes a runnable model.
//!
//! In: a `.flashpack` path. Out: the normalized config, the dense tensors as MLX arrays (decoded
//! with the pack's codecs, resident for the whole run), the tokenizer and the chat template.
//! Experts are not touched here: they stream through [`crate::run::experts::ExpertCache`].
//! Invariant: every dense tensor handed to the model came from a directory entry whose bounds
//! `Pack::open` checked; with `verify` (the runtime's default), its blake3 too.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::arch::ModelConfig;
use crate::codec::{CodecId, Decoder};
use crate::format::{DType, Pack, PackError};
use crate::mlx::{Array, Dtype};
use crate::model::{Quant, Weights};
use crate::run::experts::damaged_hint;

/// Why a pack cannot be run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    #[error(transparent)]
    Pack(#[from] PackError),
    #[error("pack metadata: {what}; the pack was written by an incompatible tool: re-convert it")]
    Metadata { what: String },
    #[error("tensor {name}: {what}")]
    Tensor { name: String, what: String },
    #[error("tensor {name} of {} is damaged: its checksum does not match; {}", .path.display(), damaged_hint(.path))]
    TensorChecksum { path: PathBuf, name: String },
    /// Only reachable with verification off (or a writer bug): the codec's reason is the source.
    #[error("tensor {name} of {} does not decode, so the pack is damaged ({})", .path.display(), damaged_hint(.path))]
    TensorDecode {
        path: PathBuf,
        name: String,
        #[source]
        source: crate::codec::CodecError,
    },
    #[error(transparent)]
    Mlx(#[from] crate::mlx::Error),
    #[error("the pack has no tokenizer: it cannot take text prompts (re-convert from a folder with tokenizer.json)")]
    NoTokenizer,
    /// The source's tokenizer was tiktoken's (Kimi K2 / K2.5), which flashpack does not read.
    #[error(
        "the pack has no tokenizer: its source's is a tiktoken tokenizer ({class}, \
         tiktoken.model), which flashpack does not read (docs/decisions/0022-tiktoken-tokenizers.md); \
         put a tokenizer.json converted from tiktoken.model beside the source's config.json and \
         convert again"
    )]
    TiktokenTokenizer { class: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
}

/// Dense tensors of a pack, decoded into MLX arrays, by mlx-lm name.
pub struct PackWeights {
    tensors: BTreeMap<String, Array>,
    quant: BTreeMap<String, Quant>,
    pub bytes: u64,
}

/// The MLX element type of a pack dtype (formats/flashpack-v1.md §7.1).
pub(crate) fn mlx_dtype(d: DType) -> Dtype {
    match d {
        DType::F32 => Dtype::F32,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
        DType::U32 => Dtype::U32,
        DType::I32 => Dtype::I32,
        DType::U8 => Dtype::U8,
    }
}

impl PackWeights {
    /// Decodes every dense tensor; with `verify`, checks each one's blake3 first (they stay
    /// resident for the whole run, so this one pass covers every dense byte the model uses).
    pub fn load(pack: &Pack, verify: bool) -> Result<PackWeights, OpenError> {
        PackWeights::load_where(pack, verify, |_| true)
    }

    /// [`PackWeights::load`] of the tensors `keep` names alone: a pipeline stage reads (and
    /// checks) only its layers' tensors' bytes of the mapped pack.
    pub fn load_where(
        pack: &Pack,
        verify: bool,
        keep: impl Fn(&str) -> bool,
    ) -> Result<PackWeights, OpenError> {
        let mut decoder = Decoder::new();
        let mut buf = Vec::new();
        let mut tensors = BTreeMap::new();
        let mut quant = BTreeMap::new();
        let mut bytes = 0;
        let path = pack.path().map(Path::to_path_buf).unwrap_or_default();
        for t in pack.tensors().iter().filter(|t| keep(&t.name)) {
            if verify && pack.check_tensor(t).is_err() {
                return Err(OpenError::TensorChecksum {
                    path,
                    name: t.name.clone(),
                });
            }
            let stored = pack.tensor_stored(t);
            let decode_err = |source| OpenError::TensorDecode {
                path: path.clone(),
                name: t.name.clone(),
                source,
            };
            let codec = CodecId::try_from(t.codec).map_err(decode_err)?;
            let data: &[u8] = if codec == CodecId::Raw {
                stored
            } else {
                buf.resize(t.decoded_len as usize, 0);
                decoder
                    .decode_into(codec, stored, &mut buf)
                    .map_err(decode_err)?;
                &buf
            };
            let shape: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
            let array = Array::from_bytes(data, &shape, mlx_dtype(t.dtype))?;
            // The array holds its own copy: the mapped pages need not stay in this process's
            // resident set beside it (they would count twice in its peak).
            pack.release_tensor(t);
            bytes += t.decoded_len;
            if t.bits > 0 {
                if let Some(module) = t.name.strip_suffix(".weight") {
                    quant.insert(
                        module.to_string(),
                        Quant {
                            group_size: t.group_size as i32,
                            bits: t.bits as i32,
                            mode: t.mode,
                        },
                    );
                }
            }
            tensors.insert(t.name.clone(), array);
        }
        Ok(PackWeights {
            tensors,
            quant,
            bytes,
        })
    }
}

impl Weights for PackWeights {
    fn get(&self, name: &str) -> Option<Array> {
        self.tensors.get(name).cloned()
    }

    fn quantization(&self, module: &str) -> Option<Quant> {
        self.quant.get(module).copied()
    }
}

/// The normalized model config a pack carries (metadata key `model`, checked at open).
pub fn model_config(pack: &Pack) -> Result<ModelConfig, OpenError> {
    Ok(pack.meta().model.clone())
}

/// The tokenizer a pack carries (metadata key `tokenizer`).
pub fn tokenizer(pack: &Pack) -> Result<tokenizers::Tokenizer, OpenError> {
    let Some(tok) = pack.meta().tokenizer() else {
        let class = pack
            .metadata()
            .get("tokenizer_config")
            .and_then(|c| c.get("tokenizer_class"))
            .and_then(serde_json::Value::as_str)
            .filter(|c| c.contains("TikToken"));
        return Err(match class {
            Some(class) => OpenError::TiktokenTokenizer {
                class: class.to_string(),
            },
            None => OpenError::NoTokenizer,
        });
    };
    let text = serde_json::to_string(tok).map_err(|e| OpenError::Tokenizer(e.to_string()))?;
    text.parse::<tokenizers::Tokenizer>()
        .map_err(|e| OpenError::Tokenizer(e.to_string()))
}

/// The chat template: metadata `chat_template`, else `tokenizer_config.chat_template`, else
/// the architecture's built-in format (`ArchDef::chat_template`: DeepSeek-V3.2, whose repository
/// ships its prompt format as Python code, not as a template).
pub fn chat_template(pack: &Pack) -> Option<String> {
    pack.meta()
        .chat_template()
        .or_else(|| {
            crate::arch::Arch::from_model_type(&pack.meta().architecture)
                .ok()?
                .def()
                .chat_template
        })
        .map(str::to_string)
}

/// Opens a pack from a path: the file, its config and dense weights.
pub fn open(path: &Path, verify: bool) -> Result<(Pack, ModelConfig, PackWeights), OpenError> {
    let pack = Pack::open(path)?;
    let cfg = model_config(&pack)?;
    let weights = PackWeights::load(&pack, verify)?;
    Ok((pack, cfg, weights))
}

/// [`open`] for one stage of a pipeline: the tensors of `layers` alone (and the embedding or
/// the head where the stage holds the first or the last layer, `pipeline::stage_tensor`).
pub fn open_stage(
    path: &Path,
    verify: bool,
    layers: &std::ops::Range<usize>,
) -> Result<(Pack, ModelConfig, PackWeights), OpenError> {
    let pack = Pack::open(path)?;
    let cfg = model_config(&pack)?;
    let n = cfg.num_hidden_layers;
    let weights = PackWeights::load_where(&pack, verify, |name| {
        crate::run::pipeline::stage_tensor(name, layers, n, cfg.tie_word_embeddings)
    })?;
    Ok((pack, cfg, weights))
}
