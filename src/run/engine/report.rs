//! What the engine measures. In: a finished [`Completion`] and the engine that produced it.
//! Out: [`RunReport`] ([`Engine::report`]; `flashpack run` prints it, `--json` serializes it).
//! Invariant: every rate is over a count of at least one, except the read rate, unknown (`None`)
//! without timed reads. Also a decode step of several sequences at once ([`Engine::batch_step_ms`],
//! what `flashpack bench serve` times).

use std::collections::BTreeMap;
use std::time::Instant;

use super::{Completion, CpuSeconds, Engine, EngineError, EngineSizes, PhaseSnapshot};
use crate::memory::peak_rss;
use crate::mlx::Array;
use crate::model::{ComputeError, ExpertStore};
use crate::run::experts::{PolicyKind, StoreStats};
use crate::run::generate::GenerateStats;
use crate::run::pressure::PressureStatus;
use crate::run::read::IoMode;
use crate::run::stream::StreamStats;

/// One completion and the engine's state after it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RunReport {
    pub generation: GenerateStats,
    /// The generated token ids, in order (the text is their decoding).
    pub token_ids: Vec<u32>,
    pub peak_rss_bytes: u64,
    /// MLX's allocator: live array bytes at the end and at most (device memory on a GPU).
    pub mlx_active_bytes: usize,
    pub mlx_peak_bytes: usize,
    /// How the memory was divided (its fields sit at the top level of the object).
    #[serde(flatten)]
    pub sizes: EngineSizes,
    pub expert_cache: StoreStats,
    pub stream: StreamStats,
    pub derived: Derived,
    /// Counters as they stood when the first token came out (end of prefill): subtract them
    /// for the decode phase alone.
    pub at_first_token: Option<PhaseSnapshot>,
    pub cpu_s: CpuSeconds,
    pub io: IoMode,
    pub policy: PolicyKind,
    /// The memory-pressure watch's readings and resizes (`None`: not watched).
    pub pressure: Option<PressureStatus>,
}

/// Rates derived from the expert cache's and the stream's counters.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Derived {
    /// Of the experts the router asked for, the share already resident.
    pub hit_rate: f64,
    pub hit_rate_per_layer: BTreeMap<u32, f64>,
    /// Of the loads the router needed, the share prefetch had already done.
    pub misses_hidden_by_prefetch: f64,
    /// Of the experts predicted for prefetch, the share the router then picked.
    pub prefetch_accuracy: f64,
    /// Per prompt or generated token.
    pub stall_ms_per_token: f64,
    pub bytes_read_per_token: f64,
    /// A rate over no timed reads is unknown (`None`), not bytes over a clamped 0 ms.
    pub read_decode_gb_per_s: Option<f64>,
}

impl Engine<'_> {
    /// The report on `done`, the completion this engine has just produced, with the engine's
    /// counters since it was built.
    pub fn report(&self, done: &Completion) -> RunReport {
        let cache = self.cache_stats();
        let stream = self.stream_stats().clone();
        let hits: u64 = cache.hits_per_layer.values().sum();
        let misses: u64 = cache.misses_per_layer.values().sum();
        let hit_rate_per_layer = cache
            .hits_per_layer
            .keys()
            .chain(cache.misses_per_layer.keys())
            .map(|l| {
                let h = cache.hits_per_layer.get(l).copied().unwrap_or(0);
                let m = cache.misses_per_layer.get(l).copied().unwrap_or(0);
                (*l, h as f64 / (h + m).max(1) as f64)
            })
            .collect();
        let tokens = (done.stats.prompt_tokens + done.stats.generated_tokens).max(1) as f64;
        let derived = Derived {
            hit_rate: hits as f64 / (hits + misses).max(1) as f64,
            hit_rate_per_layer,
            misses_hidden_by_prefetch: cache.prefetch_used as f64
                / (cache.prefetch_used + misses).max(1) as f64,
            prefetch_accuracy: stream.predicted_correct as f64 / stream.predicted.max(1) as f64,
            stall_ms_per_token: stream.stall_ms / tokens,
            bytes_read_per_token: cache.bytes_read as f64 / tokens,
            read_decode_gb_per_s: (cache.bytes_read > 0 && cache.read_decode_ms > 0.0)
                .then(|| cache.bytes_read as f64 / 1e6 / cache.read_decode_ms),
        };
        RunReport {
            generation: done.stats.clone(),
            token_ids: done.tokens.clone(),
            peak_rss_bytes: peak_rss(),
            mlx_active_bytes: crate::mlx::active_memory(),
            mlx_peak_bytes: crate::mlx::peak_memory(),
            sizes: self.sizes,
            expert_cache: cache,
            stream,
            derived,
            at_first_token: done.at_first_token.clone(),
            cpu_s: done.cpu_s,
            io: self.io,
            policy: self.policy,
            pressure: self.pressure_status(),
        }
    }

    /// Milliseconds per greedy decode step of `batch` sequences at once (`[batch, 1]` through
    /// the model), over `steps` steps after a 64-token prefill of each, through this engine's
    /// model and expert store: what a batched server could gain
    /// (docs/decisions/0009-serve-queue-no-batching.md). The steps are pipelined as `run`'s
    /// greedy decoding is (step `t + 1` built and scheduled before the host waits for step `t`),
    /// so one sequence is timed as `run` decodes it. The sequences have their own KV cache;
    /// the engine's is left as it was.
    pub fn batch_step_ms(&mut self, batch: usize, steps: usize) -> Result<f64, EngineError> {
        let store: &mut dyn ExpertStore = match self.resident.as_mut() {
            Some(r) => r,
            None => &mut self.experts,
        };
        let model = &self.model;
        let mut time = || -> Result<f64, ComputeError> {
            let mut kv = model.new_cache();
            let prompt: Vec<u32> = (0..64 * batch as u32).map(|i| 10 + i % 64).collect();
            model.prefill(&Array::from_slice(&prompt, &[batch, 64])?, &mut kv, store)?;
            let first = Array::from_slice(&vec![11u32; batch], &[batch, 1])?;
            let mut y = model.forward(&first, &mut kv, store)?.argmax(-1)?;
            crate::mlx::eval(&[&y])?;
            let started = Instant::now();
            for _ in 0..steps {
                let next = model.forward(&y, &mut kv, store)?.argmax(-1)?;
                crate::mlx::async_eval(&[&next])?;
                crate::mlx::eval(&[&y])?;
                y = next;
            }
            crate::mlx::eval(&[&y])?;
            Ok(started.elapsed().as_secs_f64() * 1e3 / steps.max(1) as f64)
        };
        Ok(time()?)
    }
}
