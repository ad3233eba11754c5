//! The load stage's errors ([`LoadError`]): each names the file or tensor and the numbers
//! involved, and says how to fix it where it can.

use super::ResolveError;
use crate::arch::ArchError;
use crate::convert::quantize::QuantError;
use crate::convert::tensor::Dtype;
use std::path::Path;

/// Errors of the load stage. Each names the file or tensor and the numbers involved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("config.json asks for what flashpack cannot run: {detail}; nothing was converted")]
    Unsupported { detail: String },
    #[error("{path} is not a folder; pass the folder that holds config.json and the safetensors")]
    NotAFolder { path: String },
    #[error(
        "{dir} has neither model.safetensors nor model.safetensors.index.json; \
         is it a Hugging Face checkpoint folder?"
    )]
    NoWeights { dir: String },
    #[error(
        "shard {shard} is listed by {index} for {tensors} tensor(s) but is missing; \
         download it again (every shard holding a tensor of the model's own layers is needed)"
    )]
    MissingShard {
        shard: String,
        index: String,
        tensors: usize,
    },
    #[error("{path} is truncated: {needed} bytes needed, file has {file_len}; download it again")]
    Truncated {
        path: String,
        needed: u64,
        file_len: u64,
    },
    #[error("{path}: bad safetensors header: {detail}")]
    BadHeader { path: String, detail: String },
    #[error(
        "{path}: tensor {tensor} spans bytes {begin}..{end} of a {data_len}-byte data section \
         (file truncated or corrupt; download it again)"
    )]
    TensorOutOfBounds {
        path: String,
        tensor: String,
        begin: u64,
        end: u64,
        data_len: u64,
    },
    #[error(
        "{path}: tensor {tensor} is {dtype} {shape:?} = {expected} bytes but its offsets \
         span {found}"
    )]
    SizeMismatch {
        path: String,
        tensor: String,
        dtype: Dtype,
        shape: Vec<usize>,
        expected: u64,
        found: u64,
    },
    #[error(
        "{path}: the header names tensor {tensor} twice; readers disagree on which entry counts \
         (the safetensors crate keeps the last, others the first), so the file is refused: \
         export it again"
    )]
    DuplicateName { path: String, tensor: String },
    #[error(
        "{path}: tensors {first} and {second} share bytes {begin}..{end} of the data section; \
         each tensor must have bytes of its own (the file is corrupt: download or export it again)"
    )]
    TensorsOverlap {
        path: String,
        first: String,
        second: String,
        begin: u64,
        end: u64,
    },
    #[error(
        "{path}: tensor {tensor} is {dtype}, a safetensors dtype flashpack does not read \
         (it reads BOOL, U8, I8, F8_E4M3, F8_E5M2, I16, U16, F16, BF16, I32, U32, F32, F64, I64, U64)"
    )]
    UnsupportedDtype {
        path: String,
        tensor: String,
        dtype: String,
    },
    #[error("{index} maps tensor {tensor} to {shard}, which does not contain it")]
    TensorNotInShard {
        tensor: String,
        shard: String,
        index: String,
    },
    #[error("tensor {tensor} appears in both {first} and {second}")]
    DuplicateTensor {
        tensor: String,
        first: String,
        second: String,
    },
    #[error("tensor {tensor} is missing{hint}")]
    MissingTensor { tensor: String, hint: String },
    #[error("tensor {tensor} has shape {found:?}; expected {expected:?} ({why})")]
    Shape {
        tensor: String,
        expected: Vec<usize>,
        found: Vec<usize>,
        why: String,
    },
    #[error("tensor {tensor} is {found}; expected {expected}")]
    Dtype {
        tensor: String,
        found: Dtype,
        expected: &'static str,
    },
    #[error("layer {layer}: {detail}")]
    Experts { layer: usize, detail: String },
    #[error("config.json quantization: {detail}")]
    MlxQuantization { detail: String },
    #[error(
        "config.json says {field} = {value}, but {tensors}; the config does not describe these \
         weights: use the config.json that came with them"
    )]
    ConfigContradictsTensors {
        field: &'static str,
        value: String,
        tensors: String,
    },
    #[error("{path} is a link that leads nowhere (a missing target or a loop): {source}; pass the checkpoint folder itself")]
    BrokenLink {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "there is no local folder {repo}, so it was taken for the Hugging Face Hub repository \
         {repo}{}, which could not be fetched (check the path, or the repository name and your \
         network): {source}",
        revision.as_ref().map(|r| format!("@{r}")).unwrap_or_default()
    )]
    NotLocalNorHub {
        repo: String,
        revision: Option<String>,
        #[source]
        source: Box<LoadError>,
    },
    #[error("cancelled")]
    Cancelled,
    #[error(transparent)]
    Arch(#[from] ArchError),
    #[error(transparent)]
    Quant(#[from] QuantError),
}

/// An I/O error on `path`.
pub(super) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> LoadError + '_ {
    move |source| LoadError::Io {
        path: path.display().to_string(),
        source,
    }
}
