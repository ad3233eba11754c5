//! The run pipeline: open -> read/decode -> cache -> compute -> sample. See docs/architecture.md.
//!
//! The compute stage is the forward pass in [`crate::model`] (weights in, logits out); `sample`
//! turns logits into the next token. The stages before it feed the model through its `Weights`
//! and `ExpertStore` traits, so the model never knows whether experts come from a pack, a cache
//! or memory. Nothing here imports `crate::convert`.

pub mod bench_io;
pub mod budget;
pub mod cache;
pub mod engine;
pub mod experts;
pub mod generate;
pub mod harmony;
pub mod lanes;
pub mod open;
pub mod part_hash;
pub mod pipeline;
pub mod pressure;
pub mod prompt_cache;
pub mod read;
pub mod sample;
pub mod stream;
pub mod template;
pub mod text;
