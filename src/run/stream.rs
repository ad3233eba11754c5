//! Cache stage, the model-facing part: the forward pass's [`ExpertStore`] over an
//! [`ExpertCache`].
//!
//! In: the router's lazy top-k indices of one layer (and, when prefetch is on, a guess of the
//! next layer's). Out: pools and per-entry slots for `gather_qmm`. This is the one sync point per
//! sparse layer: the indices are evaluated so the host knows which experts to make resident.
//! Invariant: slots handed out were filled by this call's `prepare` (or a joined prefetch).

use std::time::Instant;

use crate::format::Pack;
use crate::mlx::{self, Array, Dtype};
use crate::run::compute::{ComputeError, ExpertPool, ExpertStore, PoolRoute};
use crate::run::experts::{ExpertCache, StoreStats};

/// Prediction and stall counters.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct StreamStats {
    /// Distinct experts predicted for a layer, and how many of them the router then picked.
    pub predicted: u64,
    pub predicted_correct: u64,
    /// Time the forward pass waited for experts to be resident (reads, decodes, joined
    /// prefetches), after the router's indices were known.
    pub stall_ms: f64,
    pub routes: u64,
}

/// Experts streamed from a pack through a budgeted cache.
pub struct StreamingExperts<'p> {
    pack: &'p Pack,
    cache: ExpertCache,
    pools: Vec<ExpertPool>,
    num_experts: usize,
    prefetch: bool,
    prediction: Option<(usize, Array)>,
    last_prediction: Option<(usize, Vec<u32>)>,
    pub stats: StreamStats,
}

impl<'p> StreamingExperts<'p> {
    pub fn new(
        pack: &'p Pack,
        cache: ExpertCache,
        num_experts: usize,
        prefetch: bool,
    ) -> StreamingExperts<'p> {
        let pools = (0..cache.pool_count())
            .map(|i| {
                let [gate, up, down] = cache.matrices(i);
                ExpertPool { gate, up, down }
            })
            .collect();
        StreamingExperts {
            pack,
            cache,
            pools,
            num_experts,
            prefetch,
            prediction: None,
            last_prediction: None,
            stats: StreamStats::default(),
        }
    }

    pub fn cache(&self) -> &ExpertCache {
        &self.cache
    }

    pub fn cache_mut(&mut self) -> &mut ExpertCache {
        &mut self.cache
    }

    pub fn cache_stats(&self) -> StoreStats {
        self.cache.stats()
    }

    /// Fewest slots of any pool: bounds how many distinct experts one call may need.
    pub fn min_slots(&self) -> usize {
        self.pools.iter().map(ExpertPool::slots).min().unwrap_or(0)
    }
}

fn unique(ids: &[u32]) -> Vec<u32> {
    let mut u = ids.to_vec();
    u.sort_unstable();
    u.dedup();
    u
}

impl ExpertStore for StreamingExperts<'_> {
    fn wants_prediction(&self) -> bool {
        self.prefetch
    }

    fn predict(&mut self, layer: usize, indices: &Array) -> Result<(), ComputeError> {
        self.prediction = Some((layer, indices.clone()));
        Ok(())
    }

    fn route(&mut self, layer: usize, indices: &Array) -> Result<Vec<PoolRoute<'_>>, ComputeError> {
        let prediction = self.prediction.take();
        match &prediction {
            Some((_, p)) => mlx::eval(&[indices, p])?,
            None => indices.eval()?,
        }
        // From here on the forward pass waits for experts, not for compute.
        let started = Instant::now();
        let wanted = unique(&indices.to_vec::<u32>()?);
        if let Some(&bad) = wanted.iter().find(|&&e| e as usize >= self.num_experts) {
            return Err(ComputeError::BadPlacement {
                expert: bad as usize,
                what: format!(
                    "router output of layer {layer} (only {} experts)",
                    self.num_experts
                ),
            });
        }
        if let Some((l, guessed)) = self.last_prediction.take() {
            if l == layer {
                self.stats.predicted += guessed.len() as u64;
                self.stats.predicted_correct += guessed
                    .iter()
                    .filter(|e| wanted.binary_search(e).is_ok())
                    .count() as u64;
            }
        }
        let placement = self.cache.prepare(self.pack, layer as u32, &wanted)?;
        if let Some((next, p)) = prediction {
            let guessed: Vec<u32> = unique(&p.to_vec::<u32>()?)
                .into_iter()
                .filter(|&e| (e as usize) < self.num_experts)
                .collect();
            self.cache.prefetch(self.pack, next as u32, &guessed)?;
            self.last_prediction = Some((next, guessed));
        }
        self.stats.stall_ms += started.elapsed().as_secs_f64() * 1e3;
        self.stats.routes += 1;

        let n = self.num_experts;
        let mut tables: Vec<Option<(Vec<u32>, Vec<u8>)>> = vec![None; self.pools.len()];
        for (&e, &(pool, slot)) in wanted.iter().zip(&placement) {
            let (slots, holds) = tables[pool].get_or_insert_with(|| (vec![0; n], vec![0; n]));
            slots[e as usize] = slot;
            holds[e as usize] = 1;
        }
        let used = tables.iter().filter(|t| t.is_some()).count();
        let mut routes = Vec::with_capacity(used);
        for (pool, table) in tables.into_iter().enumerate() {
            let Some((slots, holds)) = table else {
                continue;
            };
            let slots = Array::from_slice(&slots, &[n])?.take(indices, 0)?;
            let serves = if used > 1 {
                Some(
                    Array::from_slice(&holds, &[n])?
                        .astype(Dtype::Bool)?
                        .take(indices, 0)?,
                )
            } else {
                None
            };
            routes.push(PoolRoute {
                pool: &self.pools[pool],
                slots,
                serves,
            });
        }
        Ok(routes)
    }
}
