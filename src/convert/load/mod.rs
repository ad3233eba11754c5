//! Load stage: a Hugging Face checkpoint folder, mapped and indexed, nothing copied.
//!
//! In: a [`SourceSpec`] (a local folder, or `org/model[@rev]` that a [`Resolver`] turns into a
//! folder) holding `config.json` and either `model.safetensors` or shards listed by
//! `model.safetensors.index.json`; weights in bf16/f16/f32, or MLX-quantized (U32 codes with
//! scales and biases, `quantization` in `config.json`).
//! Out: a [`Checkpoint`]: the normalized [`ModelConfig`], every tensor's dtype, shape and bytes
//! (borrowed from the mapped shards), each expert's projections whatever the layout
//! (per-expert, transformers 5.x fused, mlx-lm stacked), and the [`Provenance`] of the source.
//! The multi-token-prediction layers some checkpoints carry after their own
//! (`num_nextn_predict_layers`, [`safetensors::MtpLayers`]) are left out here, as mlx-lm leaves
//! them out: no later stage sees them, and a shard holding nothing else is not opened.
//! Invariant: every tensor range was checked against its file's length at open, and every
//! tensor the index names was found in its shard; later stages only slice checked ranges.
//! Files, by idea: this one the [`Checkpoint`] and its tensors; `open.rs` opening a folder
//! (config, shards, headers, the sanitize renames); `experts.rs` experts in every layout;
//! `dense.rs` every other tensor; `derived.rs` tensors computed as mlx-lm's `sanitize` does;
//! `check.rs` the config against the tensors; `quantization.rs` how the source is already
//! quantized (mlx-lm, FP8); `provenance.rs` the source's fingerprint; `safetensors.rs` headers;
//! `error.rs` [`LoadError`].

mod check;
mod dense;
pub mod derived;
mod error;
mod experts;
mod open;
mod provenance;
mod quantization;
pub mod safetensors;

pub use crate::arch::ExpertLayout;
pub use dense::{DenseTensor, TensorData};
pub use error::LoadError;
pub use provenance::{Provenance, SourceFile};
pub use quantization::{quant_params, PackedInt};

use crate::arch::ModelConfig;
use crate::convert::tensor::Dtype;
pub use crate::quant_mode::MlxQuantization;
use error::io_err;
use open::{Entry, Shard};
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use safetensors::TensorInfo;
// Where a checkpoint is: neutral ground shared with the Hub client (docs/architecture.md).
pub use crate::checkpoint::{LocalResolver, ResolveError, Resolver, SourceSpec};

/// What the loader left out of a checkpoint: its multi-token-prediction layers
/// ([`safetensors::MtpLayers`]), and the modules of no text model (a vision tower,
/// [`safetensors::TensorFilter`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DroppedMtp {
    /// The layers dropped (`num_hidden_layers ..`); empty when config.json names none.
    pub layers: std::ops::Range<usize>,
    /// Tensors of those layers left out: those in the shards read, and those the index lists
    /// for the shards skipped.
    pub tensors: usize,
    /// Tensors of no text model left out (a vision tower and projector), counted as
    /// `tensors` is.
    pub other_tensors: usize,
    /// Shards the index lists only for tensors left out (of MTP layers or of no text model):
    /// never opened, so they may be absent.
    pub skipped_shards: Vec<String>,
}

/// An opened checkpoint: config, index of tensors, mapped shards.
pub struct Checkpoint {
    root: PathBuf,
    /// `config.json` as written.
    pub raw_config: Value,
    pub config: ModelConfig,
    /// MLX quantization of the source, if it is an mlx-lm quantized folder.
    pub mlx_quantization: Option<MlxQuantization>,
    /// Block size (rows, columns) of an FP8 checkpoint's weight scales
    /// (`quantization_config.quant_method = "fp8"`, as DeepSeek-V3 and Qwen3 FP8 ship).
    pub fp8_block: Option<[usize; 2]>,
    /// Bits and group size of a compressed-tensors `pack-quantized` checkpoint's integer codes
    /// (`quantization_config.quant_method = "compressed-tensors"`, as Kimi K2 Thinking and K2.5
    /// ship their experts), read as the floats they stand for.
    pub packed_int: Option<quantization::PackedInt>,
    /// The unpacked column count of each packed weight (its `weight_shape`), by the name it is
    /// read under (`W.weight`).
    packed_cols: BTreeMap<String, usize>,
    shards: Vec<Shard>,
    tensors: BTreeMap<String, Entry>,
    index: experts::ExpertIndex,
    /// The Hub repository and commit this folder is a snapshot of, when it came from the Hub.
    origin: Option<(String, Option<String>)>,
    dropped_mtp: DroppedMtp,
}

/// A borrowed tensor.
#[derive(Clone, Copy, Debug)]
pub struct TensorRef<'a> {
    pub name: &'a str,
    pub dtype: Dtype,
    pub shape: &'a [usize],
    pub data: &'a [u8],
}

impl Checkpoint {
    /// The checkpoint folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The multi-token-prediction layers left out at open, and what of them.
    pub fn dropped_mtp(&self) -> &DroppedMtp {
        &self.dropped_mtp
    }

    /// Tensor names, sorted.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Number of tensors.
    pub fn tensor_count(&self) -> usize {
        self.tensors.len()
    }

    /// The tensor called `name`, if present.
    pub fn get(&self, name: &str) -> Option<TensorRef<'_>> {
        let e = self.tensors.get(name)?;
        Some(TensorRef {
            name: &e.info.name,
            dtype: e.info.dtype,
            shape: &e.info.shape,
            data: &self.shards[e.shard].bytes[e.info.range.clone()],
        })
    }

    /// The tensor called `name`, or an error naming it.
    pub fn tensor(&self, name: &str) -> Result<TensorRef<'_>, LoadError> {
        self.get(name).ok_or_else(|| LoadError::MissingTensor {
            tensor: name.to_string(),
            hint: String::new(),
        })
    }

    /// Drops the pages behind `bytes` (a slice of a tensor of this checkpoint) from this
    /// process's resident set; they stay in the page cache. A slice that is not from a shard
    /// is ignored.
    pub fn release(&self, bytes: &[u8]) {
        let p = bytes.as_ptr() as usize;
        for s in &self.shards {
            let base = s.bytes.as_ptr() as usize;
            if p >= base && p + bytes.len() <= base + s.bytes.len() {
                s.bytes.release(p - base, bytes.len());
                return;
            }
        }
    }

    /// Bytes of all weight files (the "source size" of a conversion).
    pub fn weight_bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.bytes.len() as u64).sum()
    }
}

#[cfg(test)]
mod mtp_tests;
#[cfg(test)]
mod tests;
