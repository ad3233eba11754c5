//! The run pipeline: open -> read/decode -> cache -> compute -> sample.
//!
//! `compute` is the forward pass on MLX (weights in, logits out); `sample` turns logits into the
//! next token. The stages before them feed `compute` through its `Weights` and `ExpertStore`
//! traits, so the model never knows whether experts come from a pack, a cache or memory.

pub mod compute;
pub mod sample;
