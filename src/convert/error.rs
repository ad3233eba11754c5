//! Errors of a conversion, by stage.

use crate::codec::CodecError;
use crate::convert::load::LoadError;
use crate::convert::quantize::QuantError;
use crate::format::PackError;
use std::path::PathBuf;

/// Errors of a conversion, by stage.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConvertError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Quant(#[from] QuantError),
    #[error("encoding: {0}")]
    Codec(#[from] CodecError),
    #[error(transparent)]
    Pack(#[from] PackError),
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "{tensor} has a non-finite value ({value}) at {at}; the checkpoint is damaged or was \
         saved from a diverged run: convert a checkpoint whose weights are all finite"
    )]
    NonFinite {
        tensor: String,
        at: String,
        value: f32,
    },
    /// An option out of its range, or options that do not go together.
    #[error("{option} {value}: {why}")]
    BadOption {
        option: &'static str,
        value: String,
        why: String,
    },
    /// A tokenizer that cannot be loaded, or that cannot encode the calibration text.
    #[error("{what}")]
    Tokenizer {
        what: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// A JSON file of the source that does not parse.
    #[error("{path} is not valid JSON; replace it with the model's own file")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// Running the model failed (profiling, the quality report).
    #[error("{stage} failed")]
    Compute {
        stage: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Calibration text that cannot profile the model.
    #[error("calibration: {what}")]
    Calibration { what: String },
    /// config.json and the tensors disagree in a way only the model's own loader sees: a
    /// tensor the config implies is missing or has another shape, or a tensor is never read.
    #[error(
        "config.json does not describe these weights: {detail}; use the config.json that came \
         with them (nothing was written)"
    )]
    ConfigDoesNotFit { detail: String },
    /// Something in the source that the format cannot hold.
    #[error("{what}")]
    Unrepresentable { what: String },
    /// A broken invariant of the pipeline: a bug.
    #[error("internal error: {what}; please report it")]
    Internal { what: String },
    #[error("cannot write the pack to {path}: {why}")]
    Destination { path: PathBuf, why: String },
}
