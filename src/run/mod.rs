//! The run pipeline: open -> read/decode -> cache -> compute -> sample. See docs/architecture.md.
//!
//! `compute` is the forward pass on MLX (weights in, logits out); `sample` turns logits into the
//! next token. The stages before them feed `compute` through its `Weights` and `ExpertStore`
//! traits, so the model never knows whether experts come from a pack, a cache or memory.

pub mod budget;
pub mod cache;
pub mod compute;
pub mod eval;
pub mod experts;
pub mod generate;
pub mod open;
pub mod read;
pub mod sample;
pub mod source;
pub mod stream;
