//! The convert pipeline: Hugging Face checkpoint -> `.flashpack`.
//!
//! Stages, in order, one file each: load -> profile -> merge -> quantize -> encode -> layout
//! -> write. `tensor` holds the element types and views the stages share; `fixtures` makes
//! small seeded checkpoints for tests and benchmarks.

pub mod load;
pub mod quantize;

pub mod fixtures;
pub mod tensor;
