//! The run pipeline: open -> read/decode -> cache -> compute -> sample.
//! See docs/architecture.md.

pub mod cache;
pub mod read;
