//! config.json against the tensors: every count and size the conversion sizes anything from is
//! compared with the safetensors headers first (issue 14).
//!
//! In: the parsed [`crate::arch::ModelConfig`] (already checked on its own: positive sizes,
//! finite positive epsilon and RoPE base) and the checkpoint's tensor index (names, dtypes and
//! shapes, read before any weight). Out: `Ok`, or [`LoadError::ConfigContradictsTensors`] naming
//! the field, its value and what the tensors hold.
//! Invariant: runs before anything is allocated from a config number, so a `num_hidden_layers`
//! of 10^12 is an error, not an allocation. The tensors are those left once the MTP layers
//! (`num_nextn_predict_layers`) were dropped, so layers are counted against `num_hidden_layers`
//! alone.

use std::collections::BTreeMap;

use super::safetensors::layer_of;
use super::{Checkpoint, LoadError};
use crate::arch::TensorRole;

impl Checkpoint {
    pub(super) fn check_config_against_tensors(&self) -> Result<(), LoadError> {
        let c = &self.config;
        let mismatch = |field: &'static str, value: String, tensors: String| {
            Err(LoadError::ConfigContradictsTensors {
                field,
                value,
                tensors,
            })
        };
        // Layers and experts per layer, as the tensor names and the stacked shapes say.
        let mut layers = 0usize;
        let mut experts: BTreeMap<usize, (usize, &str)> = BTreeMap::new();
        for (name, entry) in &self.tensors {
            if let Some(l) = layer_of(name) {
                layers = layers.max(l.saturating_add(1));
            }
            let (layer, count) = match c.arch.classify(name) {
                TensorRole::Expert { layer, expert, .. } => (layer, expert.saturating_add(1)),
                TensorRole::FusedGateUp { layer }
                | TensorRole::FusedDown { layer }
                | TensorRole::Stacked { layer, .. }
                | TensorRole::MxBlocks { layer, .. }
                | TensorRole::ExpertBias { layer, .. } => {
                    (layer, entry.info.shape.first().copied().unwrap_or(0))
                }
                _ => continue,
            };
            let seen = experts.entry(layer).or_insert((0, name));
            if count > seen.0 {
                *seen = (count, name);
            }
        }
        if c.num_hidden_layers != layers {
            let mut held = if layers == 0 {
                "the checkpoint has no model.layers.* tensors".to_string()
            } else {
                format!(
                    "the tensors hold layers 0..={} ({layers} layers)",
                    layers - 1
                )
            };
            let mtp = &self.dropped_mtp.layers;
            if !mtp.is_empty() {
                held.push_str(&format!(
                    " besides the multi-token-prediction layers {}..={} \
                     (num_nextn_predict_layers), which are dropped",
                    mtp.start,
                    mtp.end - 1
                ));
            }
            return mismatch("num_hidden_layers", c.num_hidden_layers.to_string(), held);
        }
        for (&layer, &(count, tensor)) in &experts {
            if count != c.num_experts {
                return mismatch(
                    "num_experts",
                    c.num_experts.to_string(),
                    format!("layer {layer} holds {count} experts ({tensor})"),
                );
            }
        }
        let rows = |name: &str| self.get(name).map(|t| (t.shape.to_vec(), t.dtype.float()));
        for name in ["model.embed_tokens.weight", "lm_head.weight"] {
            let Some((shape, float)) = rows(name) else {
                continue;
            };
            if shape.first() != Some(&c.vocab_size) {
                return mismatch(
                    "vocab_size",
                    c.vocab_size.to_string(),
                    format!("{name} has shape {shape:?}"),
                );
            }
            if float.is_some() && shape.get(1) != Some(&c.hidden_size) {
                return mismatch(
                    "hidden_size",
                    c.hidden_size.to_string(),
                    format!("{name} has shape {shape:?}"),
                );
            }
        }
        // Attention widths from the first layer of full attention (every supported architecture
        // names them so); Qwen3-Next's q_proj also holds the output gate. Gemma 4's
        // full-attention layers have widths of their own: a sliding layer's are these.
        let first = (0..c.num_hidden_layers)
            .find(|&l| !c.is_linear_layer(l) && (c.gemma4.is_none() || c.window_of(l).is_some()))
            .unwrap_or(0);
        let q = format!("model.layers.{first}.self_attn.q_proj.weight");
        let k = format!("model.layers.{first}.self_attn.k_proj.weight");
        let gate = if c.attn_output_gate { 2 } else { 1 };
        for (name, heads, per_head, field) in [
            (
                &q,
                c.num_attention_heads,
                gate,
                "num_attention_heads x head_dim",
            ),
            (
                &k,
                c.num_key_value_heads,
                1,
                "num_key_value_heads x head_dim",
            ),
        ] {
            let Some((shape, float)) = rows(name) else {
                continue;
            };
            let want = heads
                .checked_mul(c.head_dim)
                .and_then(|n| n.checked_mul(per_head));
            if shape.first().copied() != want {
                return mismatch(
                    field,
                    format!("{heads} x {}", c.head_dim),
                    format!("{name} has shape {shape:?}"),
                );
            }
            if float.is_some() && shape.get(1) != Some(&c.hidden_size) {
                return mismatch(
                    "hidden_size",
                    c.hidden_size.to_string(),
                    format!("{name} has shape {shape:?}"),
                );
            }
        }
        Ok(())
    }
}
