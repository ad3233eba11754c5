//! flashpack: pack Mixture-of-Experts checkpoints into page-aligned, checksummed `.flashpack`
//! files and run them with experts streamed from disk.
//!
//! Two pipelines, each a folder of stages (see docs/architecture.md):
//! - convert: load -> profile -> merge -> quantize -> encode -> layout -> write
//! - run: open -> read/decode -> cache -> compute -> sample
//!
//! Both run the forward pass in `model` (profile runs the source through it, run the pack);
//! neither imports the other. `eval` sits above both: it compares a pack with its source.
//! `serve` (the OpenAI-compatible server) sits above run: it queues requests for run's engine.
//! `format` is the spec in code (formats/flashpack-v1.md), shared by writer and reader.
//! `codec` holds pure byte codecs. `mapped` is the one place that maps files.

#![deny(clippy::undocumented_unsafe_blocks)]

// Test scaffolding shared with the integration tests (tests/common/) names the crate
// `flashpack`, as they do.
#[cfg(test)]
extern crate self as flashpack;

pub mod arch;
pub mod checkpoint;
pub mod codec;
pub mod convert;
pub mod env;
pub mod eval;
pub mod format;
pub mod hub;
pub mod inspect;
pub mod mapped;
pub mod memory;
pub mod mlx;
pub mod model;
pub mod plan;
pub mod progress;
pub mod quant_mode;
pub mod run;
pub mod serve;
pub mod units;
