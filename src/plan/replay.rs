//! Replay stage of `flashpack plan`: the pack's routing trace through the runtime's own expert
//! cache -> what one budget hits and reads per decoded token.
//!
//! In: [`Facts`] (pools, stored experts, merge map, profile shares), the slots each pool gets
//! under the budget, and the profile's [`RoutingTrace`] (the top-k ids of every calibration
//! token, in text order). Out: a [`Replayed`]: hit rate, misses, bytes read and layers with a
//! miss per token. Pure: no I/O, no MLX.
//! How: the trace's tokens are decode steps. Each one asks every sparse layer, in order, for its
//! `k` routed experts (router ids through the merge map), as the streaming store does: the
//! pools' [`SlotTable`]s with the runtime's policy (`ProfileWeighted` over the profile's shares,
//! its half-life, one clock for every pool), a group per layer, resident experts asked first.
//! The first quarter of the tokens warms the cache and is not counted.
//! Why: a static model (the most-used experts resident) misses both ways. Consecutive tokens
//! route alike, so a cache of recently used experts hits more than the profile's shares say;
//! and a cache barely larger than a token's experts churns, evicting the hot ones, so it hits
//! less (docs/decisions/0032-plan-speed-model.md). The trace has both.
//! Invariant: the replay is deterministic; its work is bounded ([`MAX_WORK`]): a model whose
//! table scans would pass it replays fewer tokens (at least [`MIN_TOKENS`]).

use std::collections::HashMap;

use super::model::Facts;
use crate::format::RoutingTrace;
use crate::run::cache::{ExpertKey, Lookup, ProfileWeighted, SlotTable, PROFILE_HALF_LIFE};

/// Table work one replay may do (requests times slots scanned).
const MAX_WORK: f64 = 2e8;
/// Fewest tokens replayed, whatever the work.
const MIN_TOKENS: usize = 64;

/// One budget's replayed decode.
#[derive(Clone, Debug, PartialEq)]
pub struct Replayed {
    /// Tokens counted (after the warm-up).
    pub tokens: usize,
    pub hit_rate: f64,
    pub misses_per_token: f64,
    pub bytes_read_per_token: f64,
    pub layers_missing_per_token: f64,
}

/// The trace through pools of `slots` slots (one per [`Facts::pools`] entry). `None` when the
/// trace has too few tokens or names no stored expert of the pack.
pub fn replay(facts: &Facts, slots: &[u32], trace: &RoutingTrace) -> Option<Replayed> {
    let k = trace.k;
    let layers: Vec<(usize, &Vec<u32>)> = trace
        .layers
        .iter()
        .filter(|(l, _)| facts.experts.keys().any(|(el, _)| el == *l))
        .map(|(l, ids)| (*l, ids))
        .collect();
    if layers.is_empty() || trace.tokens < 4 {
        return None;
    }
    let total_slots: u32 = slots.iter().sum();
    let per_token = (layers.len() * k) as f64 * (total_slots.max(1) as f64);
    let tokens = trace
        .tokens
        .min(((MAX_WORK / per_token) as usize).max(MIN_TOKENS));
    let warm = tokens / 4;
    // The runtime's prior: each router expert's share of its layer's routing mass.
    let mut prior: HashMap<ExpertKey, f64> = HashMap::new();
    for (l, shares) in facts.profile.iter().flatten() {
        for (e, s) in shares.iter().enumerate() {
            prior.insert(key(*l, e), *s);
        }
    }
    let depth = facts.experts.keys().map(|(l, _)| *l).max().unwrap_or(0) as u32 + 1;
    let mut tables: Vec<SlotTable> = slots
        .iter()
        .map(|&n| {
            SlotTable::new(
                n,
                Box::new(ProfileWeighted::new(
                    prior.clone(),
                    depth,
                    PROFILE_HALF_LIFE,
                )),
            )
        })
        .collect();
    let mut clock = 0u64;
    let (mut hits, mut misses, mut bytes, mut missing_layers) = (0u64, 0u64, 0.0, 0u64);
    for t in 0..tokens {
        let counted = t >= warm;
        for &(l, ids) in &layers {
            for table in &mut tables {
                table.begin_group();
            }
            let mut wanted: Vec<(usize, ExpertKey)> = Vec::with_capacity(k);
            for &e in &ids[t * k..(t + 1) * k] {
                let stored = facts.stored(l, e as usize);
                let pool = *facts.experts.get(&(l, stored))?;
                wanted.push((pool, key(l, stored)));
            }
            // Resident experts are asked first, as the store asks them.
            wanted.sort_by_key(|(p, key)| !tables[*p].contains(*key));
            let mut missed = false;
            for (pool, key) in wanted {
                let table = &mut tables[pool];
                table.advance_clock(clock);
                let lookup = table.request(key).ok()?;
                clock = table.clock();
                if !counted {
                    continue;
                }
                match lookup {
                    Lookup::Hit(_) => hits += 1,
                    Lookup::Miss { .. } => {
                        misses += 1;
                        bytes += facts.pools[pool].read_bytes as f64;
                        missed = true;
                    }
                }
            }
            missing_layers += missed as u64;
        }
    }
    let n = (tokens - warm).max(1) as f64;
    Some(Replayed {
        tokens: tokens - warm,
        hit_rate: if hits + misses > 0 {
            hits as f64 / (hits + misses) as f64
        } else {
            1.0
        },
        misses_per_token: misses as f64 / n,
        bytes_read_per_token: bytes / n,
        layers_missing_per_token: missing_layers as f64 / n,
    })
}

fn key(layer: usize, expert: usize) -> ExpertKey {
    ExpertKey {
        layer: layer as u32,
        expert: expert as u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::model::Pool;
    use std::collections::BTreeMap;

    /// Two sparse layers of 8 experts, one pool, no profile.
    fn facts() -> Facts {
        let cfg = crate::arch::ModelConfig::from_json(&serde_json::json!({
            "model_type": "qwen3_moe", "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
            "vocab_size": 32, "intermediate_size": 128, "moe_intermediate_size": 32,
            "num_experts": 8, "num_experts_per_tok": 2, "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0
        }))
        .expect("config");
        let experts: BTreeMap<(usize, usize), usize> = (0..2)
            .flat_map(|l| (0..8).map(move |e| ((l, e), 0)))
            .collect();
        Facts {
            cfg,
            dense: Vec::new(),
            dense_bytes: 0,
            pools: vec![Pool {
                bits: crate::format::ProjBits::uniform(4),
                group_size: 64,
                mode: crate::format::QuantMode::Affine,
                scale_dtype: crate::mlx::Dtype::BF16,
                stored: 16,
                resident_bytes: 1000,
                read_bytes: 4096,
            }],
            experts,
            profile: None,
            merge_map: None,
            trace: None,
            file_bytes: 0,
        }
    }

    fn trace(tokens: &[[u32; 2]]) -> RoutingTrace {
        let ids: Vec<u32> = tokens.iter().flatten().copied().collect();
        RoutingTrace {
            k: 2,
            tokens: tokens.len(),
            layers: [(0, ids.clone()), (1, ids)].into_iter().collect(),
        }
    }

    #[test]
    fn a_repeated_routing_hits_once_warm() {
        let t = trace(&[[1, 2]; 40]);
        let r = replay(&facts(), &[4], &t).expect("replayed");
        assert_eq!(r.tokens, 30);
        assert_eq!(r.hit_rate, 1.0);
        assert_eq!(r.bytes_read_per_token, 0.0);
    }

    #[test]
    fn a_cycle_longer_than_the_cache_misses_and_counts_its_bytes() {
        // Four experts a layer in turn, through 4 slots for both layers: a recency cache holds
        // the other layer's last pair, never the one this layer needs next.
        let t = trace(&[[0, 1], [2, 3]].repeat(20));
        let small = replay(&facts(), &[4], &t).expect("replayed");
        assert_eq!(small.hit_rate, 0.0);
        assert_eq!(small.misses_per_token, 4.0);
        assert_eq!(small.bytes_read_per_token, 4.0 * 4096.0);
        assert_eq!(small.layers_missing_per_token, 2.0);
        // With a slot for each of the 8 experts used, every request hits once warm.
        let big = replay(&facts(), &[8], &t).expect("replayed");
        assert_eq!(big.hit_rate, 1.0);
    }

    #[test]
    fn a_merged_expert_is_asked_for_as_its_stored_one() {
        let mut f = facts();
        // Router expert 5 of each layer is computed by stored expert 1.
        f.merge_map = Some(vec![vec![0, 1, 2, 3, 4, 1, 6, 7]; 2]);
        f.experts.retain(|&(_, e), _| e != 5);
        let t = trace(&[[1, 2], [5, 2]].repeat(10));
        let r = replay(&f, &[4], &t).expect("replayed");
        assert_eq!(r.hit_rate, 1.0);
    }

    #[test]
    fn too_short_a_trace_is_not_replayed() {
        assert!(replay(&facts(), &[4], &trace(&[[1, 2]; 3])).is_none());
    }
}
