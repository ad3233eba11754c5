//! The engine under memory pressure: between forward passes (and between a server's requests)
//! it polls its [`PressureWatch`] and resizes the expert cache to the verdict.
//!
//! In: the watch, the engine's stores. Out: a cache of the new size; an all-resident engine
//! that shrinks routes through the streaming store from then on (its device-side tables name
//! slots that are gone), and gets its resident store back once it has grown back to every
//! expert. Invariant: a resize runs only after `mlx::synchronize` (a decode step scheduled with
//! `async_eval` may still read the pools) and after a background load is joined, between two
//! forward passes, so every token is the one a cache of either size gives; a resize that
//! fails (MLX out of memory) is said and the answer goes on at the size the cache has.

use crate::mlx;
use crate::model::{ComputeError, ResidentExperts};
use crate::progress::Progress;
use crate::run::pressure::{PressureWatch, Sample};
use crate::run::stream::{resident_store, StreamingExperts};
use crate::units::{self, Style};

/// What the engine's stores are, for a resize.
#[derive(Clone, Debug)]
pub(super) struct Layout {
    /// Built with every expert resident: the device-routed store comes back once every expert
    /// is resident again.
    pub all_resident: bool,
    /// Whether the streaming store prefetches once it serves (`EngineOptions::prefetch`).
    pub prefetch: bool,
    pub sparse_layers: Vec<usize>,
    pub num_experts: usize,
}

/// The engine's stores, borrowed for a resize.
pub(super) struct Stores<'a, 'p> {
    pub experts: &'a mut StreamingExperts<'p>,
    pub resident: &'a mut Option<ResidentExperts>,
    /// The engine's `streaming` (reports).
    pub streaming: &'a mut bool,
}

/// Polls `watch` and applies its verdict to `stores`.
pub(super) fn relieve(
    watch: &mut PressureWatch,
    stores: Stores<'_, '_>,
    layout: &Layout,
    progress: &dyn Progress,
) -> Result<(), ComputeError> {
    let Stores {
        experts,
        resident,
        streaming,
    } = stores;
    let before = experts.bounds();
    let Some((verdict, warning)) = watch.poll(before) else {
        return Ok(());
    };
    if let Some(w) = warning {
        progress.warn(&w);
    }
    if verdict.target == before.bytes {
        return Ok(());
    }
    let started = std::time::Instant::now();
    // The last step may still be computing on the pools (greedy decoding schedules it ahead).
    mlx::synchronize()?;
    let sample = Sample::now();
    if resident.take().is_some() {
        *streaming = true;
        experts.set_prefetch(layout.prefetch);
    }
    let done = match experts.resize(verdict.target) {
        Ok(done) => done,
        Err(e) => {
            let now = experts.bounds();
            watch.set_bounds(now);
            progress.warn(&format!(
                "memory pressure: the expert cache could not be resized to {} ({e}); it stays at {}",
                units::bytes(verdict.target, Style::RUN),
                units::bytes(now.bytes, Style::RUN)
            ));
            return Ok(());
        }
    };
    if layout.all_resident && done.to_bytes == before.max_bytes {
        experts.warm_all()?;
        if experts.cache().is_whole() {
            *resident = resident_store(experts.cache(), &layout.sparse_layers, layout.num_experts)?;
            if resident.is_some() {
                *streaming = false;
                experts.set_prefetch(false);
            }
        }
    }
    watch.resized(&verdict, &done, experts.bounds(), sample, started);
    Ok(())
}
