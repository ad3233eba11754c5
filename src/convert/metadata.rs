//! The metadata's `quantization` record: what the pack really holds.

use super::quantize::ExpertQuant;
use crate::format::{ProjBits, QuantMode};
use serde_json::{json, Value};

/// What the pack really holds (for the metadata's `quantization` record): experts' bits and
/// group sizes as stored, and the quantized dense tensors' bits.
pub(super) struct StoredQuantization {
    /// Experts whose source codes were requantized (other bits or group size).
    pub(super) requantized_experts: usize,
    /// Bits of each stored expert (`[layer][expert]`, 0 for experts not stored); the largest of
    /// its projections.
    expert_bits: Vec<Vec<u8>>,
    /// Bits of each stored expert's gate, up and down projections (`[layer][expert]`).
    projection_bits: Vec<Vec<[u8; 3]>>,
    expert_groups: Vec<usize>,
    expert_modes: Vec<QuantMode>,
    dense_bits: Vec<u8>,
    dense_groups: Vec<usize>,
    dense_modes: Vec<QuantMode>,
}

impl StoredQuantization {
    pub(super) fn of(
        c: &crate::arch::ModelConfig,
        experts: &[(usize, usize, ExpertQuant, bool)],
        dense: &[(u8, usize, QuantMode)],
    ) -> StoredQuantization {
        let mut expert_bits = vec![vec![0u8; c.num_experts]; c.num_hidden_layers];
        let mut projection_bits = vec![vec![[0u8; 3]; c.num_experts]; c.num_hidden_layers];
        let mut expert_groups = Vec::new();
        let mut expert_modes = Vec::new();
        let requantized_experts = experts.iter().filter(|x| x.3).count();
        for &(l, e, q, _) in experts {
            if let Some(b) = expert_bits.get_mut(l).and_then(|r| r.get_mut(e)) {
                *b = q.bits.max();
            }
            if let Some(b) = projection_bits.get_mut(l).and_then(|r| r.get_mut(e)) {
                *b = q.bits.0;
            }
            expert_groups.push(q.group_size);
            expert_modes.push(q.mode);
        }
        StoredQuantization {
            requantized_experts,
            expert_bits,
            projection_bits,
            expert_groups,
            expert_modes,
            dense_bits: dense.iter().map(|d| d.0).collect(),
            dense_groups: dense.iter().map(|d| d.1).collect(),
            dense_modes: dense.iter().map(|d| d.2).collect(),
        }
    }

    /// The most common value, and whether there are others.
    fn mode<T: Copy + Ord>(values: impl Iterator<Item = T>) -> Option<(T, bool)> {
        let mut counts: std::collections::BTreeMap<T, usize> = Default::default();
        for v in values {
            *counts.entry(v).or_default() += 1;
        }
        let (&most, _) = counts
            .iter()
            .max_by_key(|&(&v, &n)| (n, std::cmp::Reverse(v)))?;
        Some((most, counts.len() > 1))
    }

    /// Sets `expert_bits`, `dense_bits` and `group_size` to what is stored (the most common
    /// value where several occur), `expert_plan` when experts differ, `expert_projection_bits`
    /// when an expert's projections differ, and `mixed` when any of them varies.
    pub(super) fn record(&self, q: &mut Value) {
        let experts = Self::mode(
            self.expert_bits
                .iter()
                .flatten()
                .copied()
                .filter(|&b| b > 0),
        );
        let dense = Self::mode(self.dense_bits.iter().copied());
        let groups = Self::mode(self.expert_groups.iter().chain(&self.dense_groups).copied());
        let mut mixed = false;
        if let Some((b, more)) = experts {
            q["expert_bits"] = b.into();
            if more {
                q["expert_plan"] = json!(self.expert_bits);
                mixed = true;
            }
        }
        if self
            .projection_bits
            .iter()
            .flatten()
            .any(|b| !ProjBits(*b).is_uniform())
        {
            q["expert_projection_bits"] = json!(self.projection_bits);
            mixed = true;
        }
        match dense {
            Some((b, more)) => {
                q["dense_bits"] = b.into();
                mixed |= more;
            }
            None => q["dense_bits"] = 16.into(),
        }
        if let Some((g, more)) = groups {
            q["group_size"] = g.into();
            mixed |= more;
        }
        // The experts' mode (most of the bytes), else the dense tensors'.
        let modes = Self::mode(self.expert_modes.iter().copied())
            .or_else(|| Self::mode(self.dense_modes.iter().copied()));
        if let Some((m, more)) = modes {
            q["mode"] = m.name().into();
            mixed |= more
                || self
                    .dense_modes
                    .iter()
                    .chain(&self.expert_modes)
                    .any(|&x| x != m);
        }
        if mixed {
            q["mixed"] = true.into();
        }
    }
}
