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
use crate::model::{switch_glu, ComputeError, ExpertPool, ExpertStore, PoolRoute, Routing};
use crate::run::experts::{ExpertCache, ExpertError, StoreStats};

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
    /// Predictions not acted on because the running accuracy was below the gate.
    pub prefetch_gated: u64,
    /// Time spent waiting for the device to produce each layer's routing (compute up to the
    /// router, plus the host round trip).
    pub eval_wait_ms: f64,
    /// Routed entries dropped by `--skip-uncached` (not resident, weight below the threshold).
    pub skipped: u64,
    pub routed: u64,
    /// Per rank of a guess (0: a token's heaviest predicted expert): guessed experts that were
    /// not resident (would-be prefetch reads), and how many of them the router then picked.
    pub rank_reads: Vec<u64>,
    pub rank_reads_correct: Vec<u64>,
    /// Prefetch turned off for want of room (see `StreamingExperts::working_set`).
    pub prefetch_no_room: bool,
    /// Guesses not evaluated at all: the gate was shut (or there was no room) and they were not
    /// a probe (see `StreamingExperts::predict`).
    pub guesses_skipped: u64,
    /// Layers routed ahead (`FLASHPACK_AHEAD`) whose result stood, and those routed again.
    pub ahead_confirmed: u64,
    pub ahead_redone: u64,
}

/// Experts streamed from a pack through a budgeted cache.
pub struct StreamingExperts<'p> {
    pack: &'p Pack,
    cache: ExpertCache,
    pools: Vec<ExpertPool>,
    num_experts: usize,
    prefetch: bool,
    eager: bool,
    /// Drop non-resident experts whose routing weight is below this.
    skip_below: Option<f32>,
    /// The next sparse layer's guessed routing (layer, ids, weights), lazy.
    prediction: Option<(usize, Array, Array)>,
    /// The last guess, scored when its layer routes: every guessed expert, and the guesses
    /// that were not resident (what a prefetch would read) with their rank.
    last_prediction: Option<Guess>,
    /// Per rank of a guess (0: the token's heaviest predicted expert), the running share of
    /// would-be reads (guessed experts not resident) that the router then picked. A rank is
    /// prefetched only while its precision is at least [`PREFETCH_MIN_PRECISION`].
    precision: Vec<f64>,
    /// Whether the pools can hold one token's experts in every sparse layer plus one more
    /// layer's: below that, a prefetch evicts what the token itself still needs.
    room: bool,
    /// Guesses offered so far (see [`PREDICTION_PROBE`]).
    guesses: u64,
    /// Sparse layers and experts per token, for `room` ([`Self::working_set`]) after a resize.
    working: (usize, usize),
    /// `FLASHPACK_TRACE=FILE`: one line of timings per routed layer (profiling; off by default).
    trace: Option<Trace>,
    /// Whether decode runs ahead of the routing checks (`ExpertStore::runs_ahead`).
    ahead_enabled: bool,
    /// Whether `route_scored` answers ahead now (`ExpertStore::set_ahead`).
    ahead: bool,
    /// Per sparse layer routed ahead: the device-side table it is routed through.
    tables: std::collections::BTreeMap<usize, AheadTable>,
    /// Layers routed ahead and not confirmed yet: their routing, and the store's load count
    /// when they were routed (a load since may have moved any expert).
    unconfirmed: std::collections::BTreeMap<usize, (Array, u64)>,
    pub stats: StreamStats,
}

/// A layer's router expert -> slot table on the device, for routing ahead: written in place
/// whenever the layer is routed the usual way (where its experts are is then known), read by
/// the device when a later call routes the layer ahead. `written` mirrors it on the host
/// (`u32::MAX`: never written); a layer routed ahead stands only if each of its experts is
/// resident at the slot `written` names and nothing was loaded since it was routed.
struct AheadTable {
    pool: usize,
    slots: Array,
    written: Vec<u32>,
}

/// Per-route timings, one CSV line per routed layer, for profiling the streaming path on a
/// machine where only files come back (the GPU device). Columns: layer, routed entries, host
/// time since the previous route ended (building this layer's graph), the routing's eval wait,
/// (including the previous layer's slot arrays), misses loaded, the load's wall time, slot-table
/// time, the rest of the stall (guesses, prefetch), and the load steps' thread times (read,
/// verify, decode, scatter), all in microseconds.
struct Trace {
    out: std::io::BufWriter<std::fs::File>,
    last_end: Option<Instant>,
}

impl Trace {
    fn open() -> Option<Trace> {
        let path = std::env::var_os("FLASHPACK_TRACE")?;
        // A diagnostic: one that cannot be written is said once and the run goes on untraced.
        let said = |e: std::io::Error| {
            eprintln!(
                "warning: FLASHPACK_TRACE={}: {e}; running without the trace",
                std::path::Path::new(&path).display()
            );
        };
        let mut out = std::io::BufWriter::new(std::fs::File::create(&path).map_err(said).ok()?);
        use std::io::Write;
        writeln!(
            out,
            "layer,entries,host_us,eval_us,misses,load_us,table_us,other_us,read_us,verify_us,decode_us,scatter_us,ahead"
        )
        .map_err(said)
        .ok()?;
        Some(Trace {
            out,
            last_end: None,
        })
    }
}

/// What the trace needs from the cache's counters before and after a route.
#[derive(Clone, Copy, Default)]
struct TracePoint {
    misses: u64,
    load_ms: f64,
    table_ms: f64,
    steps: [f64; 4],
}

impl TracePoint {
    fn of(cache: &ExpertCache) -> TracePoint {
        let s = cache.stats_ref();
        let t = crate::run::experts::load_times();
        TracePoint {
            misses: s.misses_per_layer.values().sum(),
            load_ms: s.read_decode_ms,
            table_ms: s.table_ms,
            steps: [t.read, t.verify, t.decode, t.scatter],
        }
    }
}

/// A guess of one layer's routing, kept until that layer routes.
struct Guess {
    layer: usize,
    experts: Vec<u32>,
    reads: Vec<(u32, usize)>,
    /// For each of `reads`: how many of the guess's entries name it.
    votes: Vec<usize>,
}

/// A prompt chunk reads the next layer's guessed experts while this layer computes, but only
/// those the guess names for at least 1/`CHUNK_VOTE_DIVISOR` of an expert's average share of
/// the chunk's entries: a guess over many tokens names nearly every expert somewhere, and on
/// the GPU table (8 layers, 1,871-token prompt, 50%) reading every guessed one read 1.28x the
/// bytes the chunk needed and came later to its first token than not reading ahead at all.
/// `FLASHPACK_CHUNK_VOTES` sets the divisor (0: no reading ahead within a chunk).
pub const CHUNK_VOTE_DIVISOR: usize = 4;

/// Most sparse layers a prompt chunk reads before its first routing (`begin_pass`). On the GPU
/// table (8 layers of Qwen3-30B-A3B's shape, 1,871-token prompt, 50%), the first routing waits
/// 0.6-1.0 s (the first attention over the prompt, and a process's first kernels): one layer
/// read in that time took the first token from 1.68-1.81x of resident's time to 1.55x; three
/// layers were no better (1.52-1.73x), since reading them slowed that first wait by a quarter,
/// and they read each layer's unused experts too. docs/decisions/0025-prompt-reads.md.
pub const PASS_AHEAD_LAYERS: usize = 1;

fn pass_ahead_layers() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| crate::env::number("FLASHPACK_PASS_AHEAD").unwrap_or(PASS_AHEAD_LAYERS))
}

fn chunk_vote_divisor() -> usize {
    static D: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *D.get_or_init(|| crate::env::number("FLASHPACK_CHUNK_VOTES").unwrap_or(CHUNK_VOTE_DIVISOR))
}

/// A prefetched read that the router does not then use costs its bytes and delays the next
/// demand read (a load joins the prefetch in flight first). Only ranks whose would-be reads were
/// right at least this often are read ahead: on the bundled trained model that is the heaviest
/// guess (94-95% right) and, at 25%, the second (90%); the others are 13-71% right. Wasted
/// reads stay near 1.05x the needed bytes (issue 25), where gating on the overall accuracy
/// (80%) read up to 1.9x at a tight budget on the GPU table.
pub const PREFETCH_MIN_PRECISION: f64 = 0.9;

/// While no rank's precision reaches [`PREFETCH_MIN_PRECISION`], one guess in this many is
/// evaluated and scored (a probe), the others are dropped unevaluated.
pub const PREDICTION_PROBE: u64 = 8;

/// Weight of the newest observation in a rank's running precision.
const PRECISION_WEIGHT: f64 = 0.05;

impl<'p> StreamingExperts<'p> {
    pub fn new(
        pack: &'p Pack,
        cache: ExpertCache,
        num_experts: usize,
        prefetch: bool,
    ) -> StreamingExperts<'p> {
        let pools = (0..cache.pool_count())
            .map(|i| cache.expert_pool(i))
            .collect();
        StreamingExperts {
            pack,
            cache,
            pools,
            num_experts,
            prefetch,
            eager: std::env::var_os("FLASHPACK_NO_EAGER").is_none(),
            skip_below: None,
            prediction: None,
            last_prediction: None,
            // Closed until predictions have proven themselves.
            precision: Vec::new(),
            room: true,
            guesses: 0,
            working: (0, 0),
            trace: Trace::open(),
            ahead_enabled: std::env::var("FLASHPACK_AHEAD").is_ok_and(|v| v != "0"),
            ahead: false,
            tables: Default::default(),
            unconfirmed: Default::default(),
            stats: StreamStats::default(),
        }
    }

    /// Turns prefetch off when the pools cannot hold a token's working set (`k` experts in each
    /// of `sparse_layers` layers) plus one more layer's: a prefetch would then evict experts
    /// that the same token needs a few layers later (measured: 1.9x the bytes at 25% of a
    /// 48-layer model).
    /// With several pools (long models), each must hold the working set of its own layers.
    pub fn working_set(mut self, sparse_layers: usize, k: usize) -> Self {
        self.working = (sparse_layers, k);
        self.measure_room();
        self
    }

    /// Whether the pools have room to prefetch (see [`Self::working_set`]), as they are now.
    fn measure_room(&mut self) {
        let (sparse_layers, k) = self.working;
        self.room = self.pools.iter().enumerate().all(|(i, _)| {
            self.cache.capacity(i) >= (self.cache.pool_layers(i).min(sparse_layers) + 1) * k
        });
        self.stats.prefetch_no_room = self.prefetch && !self.room;
    }

    /// Turns prefetch on or off (an all-resident engine that starts streaming under memory
    /// pressure turns it on).
    pub fn set_prefetch(&mut self, on: bool) {
        self.prefetch = on;
        self.measure_room();
    }

    /// The experts one token needs in one layer: the floor of a resize. With
    /// `--skip-uncached` a prompt chunk's layer is not loaded in groups, so there it is every
    /// expert of a layer.
    pub fn floor_experts(&self) -> usize {
        if self.skip_below.is_some() {
            self.num_experts
        } else {
            self.working.1.max(1)
        }
    }

    /// The cache's size and the bounds a resize keeps to.
    pub fn bounds(&self) -> crate::run::experts::CacheBounds {
        self.cache.bounds(self.floor_experts())
    }

    /// Resizes the cache to an expert budget of `bytes` (memory pressure): the forward pass's
    /// handles to the pools are dropped first so the old arrays are freed as they are replaced,
    /// and the tables of layers routed ahead are forgotten (their slots moved). Between forward
    /// passes only, with nothing scheduled still reading the pools (`mlx::synchronize`).
    pub fn resize(&mut self, bytes: u64) -> Result<crate::run::experts::Resize, ExpertError> {
        self.pools.clear();
        self.tables.clear();
        self.unconfirmed.clear();
        let floor = self.floor_experts();
        let done = self.cache.resize(bytes, floor);
        self.pools = (0..self.cache.pool_count())
            .map(|i| self.cache.expert_pool(i))
            .collect();
        self.measure_room();
        done
    }

    /// Whether decode runs ahead of the routing checks (see `ExpertStore::runs_ahead`; off by
    /// default, `FLASHPACK_AHEAD=1` turns it on).
    pub fn run_ahead(mut self, on: bool) -> Self {
        self.ahead_enabled = on;
        self
    }

    /// Skip (and renormalize around) non-resident experts whose routing weight is below
    /// `threshold` instead of loading them. Off by default.
    pub fn skip_uncached(mut self, threshold: Option<f32>) -> Self {
        self.skip_below = threshold;
        self
    }

    pub fn cache(&self) -> &ExpertCache {
        &self.cache
    }

    /// Loads every stored expert that is not resident (an all-resident engine grown back to
    /// its whole cache after memory pressure).
    pub fn warm_all(&mut self) -> Result<(), ExpertError> {
        self.cache.warm_all(self.pack)
    }

    pub fn cache_mut(&mut self) -> &mut ExpertCache {
        &mut self.cache
    }

    pub fn cache_stats(&self) -> StoreStats {
        self.cache.stats()
    }

    /// Whether `entries` routed entries are a chunk of many tokens (a prompt: on average 4 or
    /// more per expert), which uses nearly every expert its guess names.
    fn is_chunk(&self, entries: usize) -> bool {
        entries >= 4 * self.num_experts
    }

    /// Tells the cache where a chunk of `entries` routed entries has reached (`layer`), or that
    /// this is no chunk: a chunk evicts the experts of the layers it passed first.
    fn pass_at(&mut self, layer: usize, entries: usize) {
        let chunk = self.is_chunk(entries);
        self.cache.set_passed(chunk.then_some(layer as u32));
    }

    /// Fewest slots of any pool: bounds how many distinct experts one call may need. The
    /// tables' counts: after a resize that could not reallocate every array, an array may be
    /// larger than its table.
    pub fn min_slots(&self) -> usize {
        (0..self.pools.len())
            .map(|i| self.cache.capacity(i))
            .min()
            .unwrap_or(0)
    }
}

fn unique(ids: &[u32]) -> Vec<u32> {
    let mut u = ids.to_vec();
    u.sort_unstable();
    u.dedup();
    u
}

impl ExpertStore for StreamingExperts<'_> {
    fn eager(&self) -> bool {
        self.eager
    }

    fn wants_prediction(&self) -> bool {
        self.prefetch
    }

    /// A prompt chunk (on average 4 or more routed entries per expert) uses nearly every expert
    /// of every layer. The first sparse layers' experts are read while the device computes up
    /// to the first routing (the embedding and the first attention: the longest wait of a
    /// chunk, and of a process's first prompt most of all), instead of one layer at a time
    /// after it: as many whole layers as fit beside one more layer's experts (the first
    /// routing's own misses), at most [`PASS_AHEAD_LAYERS`]. Later layers are read one layer
    /// ahead by the guesses (`route_inner`).
    fn begin_pass(&mut self, first: usize, entries: usize) -> Result<(), ComputeError> {
        if !self.prefetch || self.skip_below.is_some() || !self.is_chunk(entries) {
            return Ok(());
        }
        // Whole layers beside one more: below two, the chunk's layers are computed in groups
        // of experts (`mix_in_groups`) or its first routing would evict these again.
        let layers = (self.min_slots() / self.num_experts.max(1)).saturating_sub(1);
        // Not the last sparse layer: a prompt chunk skips its experts (only the last prompt
        // position, which runs alone, needs them).
        let mut ahead = self.cache.sparse_layers_from(first as u32);
        ahead.pop();
        ahead.truncate(layers.min(pass_ahead_layers()));
        let wanted: Vec<(u32, Vec<u32>)> = ahead
            .into_iter()
            .map(|layer| {
                let reads = (0..self.num_experts as u32)
                    .filter(|&e| !self.cache.is_resident(layer, e))
                    .collect();
                (layer, reads)
            })
            .collect();
        if wanted.iter().all(|(_, r)| r.is_empty()) {
            return Ok(());
        }
        self.cache.set_passed(None);
        self.cache.prefetch_layers(self.pack, &wanted)?;
        Ok(())
    }

    fn runs_ahead(&self, tokens: usize) -> bool {
        // Decode steps (a few positions): a prompt chunk needs most experts of every layer,
        // and would be computed again at nearly every layer.
        self.ahead_enabled && self.skip_below.is_none() && tokens <= AHEAD_MAX_TOKENS
    }

    fn set_ahead(&mut self, on: bool) {
        if on {
            // A prefetch still writing slots would make a layer read one while it changes
            // (and count as loaded only once joined, after the layer's check).
            self.cache.settle();
        } else {
            self.unconfirmed.clear();
        }
        self.ahead = on;
    }

    fn confirm(&mut self, layer: usize) -> Result<bool, ComputeError> {
        let Some((indices, loads)) = self.unconfirmed.remove(&layer) else {
            return Ok(true);
        };
        let waited = Instant::now();
        // (Reading it waits for the device: the layer was scheduled with `async_eval`.)
        let ids = indices.to_vec::<u32>()?;
        self.stats.eval_wait_ms += waited.elapsed().as_secs_f64() * 1e3;
        let started = Instant::now();
        let wanted = unique(&ids);
        let table = &self.tables[&layer];
        let stands = self.cache.stats_ref().experts_loaded == loads
            && wanted.iter().all(|&e| {
                (e as usize) < self.num_experts
                    && self.cache.resident_slot(layer as u32, e)
                        == Some((table.pool, table.written[e as usize]))
            });
        if stands {
            // Everything is in place: the usual bookkeeping (recency, hit counts), no load.
            self.pass_at(layer, ids.len());
            self.cache.prepare(self.pack, layer as u32, &wanted)?;
            self.stats.routes += 1;
            self.stats.ahead_confirmed += 1;
        } else {
            self.stats.ahead_redone += 1;
        }
        self.stats.stall_ms += started.elapsed().as_secs_f64() * 1e3;
        if let Some(t) = self.trace.as_mut() {
            // Column `ahead`: 1 a layer routed ahead that stood, 2 one routed again.
            let end = Instant::now();
            let host = t.last_end.map_or(0, |e| (waited - e).as_micros() as i64);
            use std::io::Write;
            let _ = writeln!(
                t.out,
                "{layer},{},{host},{},0,0,0,{},0,0,0,0,{}",
                ids.len(),
                (started - waited).as_micros(),
                (end - started).as_micros(),
                if stands { 1 } else { 2 }
            );
            t.last_end = Some(end);
        }
        Ok(stands)
    }

    /// A guess costs the host its graph (the next router on this layer's input, a few graph
    /// nodes) whether or not it is then used, so the decision comes before it is built. It is
    /// built for a chunk of many tokens (which reads its well-named experts); while some rank's
    /// precision opens the gate and the pools have room; and every PREDICTION_PROBE-th time
    /// otherwise, so the precision can still rise and be reported. Building every guess and
    /// dropping 7 in 8 unevaluated (the shut gate, before) cost 3.5 ms of host per token at 48
    /// layers and made prefetch 16% slower than `--no-prefetch` there (docs/benchmarks.md,
    /// fifth session).
    fn wants_guess(&mut self, _layer: usize, entries: usize) -> bool {
        if !self.prefetch {
            return false;
        }
        if self.is_chunk(entries) {
            return true;
        }
        let open = self.precision.iter().any(|&p| p >= PREFETCH_MIN_PRECISION);
        self.guesses += 1;
        let probe = self.guesses % PREDICTION_PROBE == 1;
        if probe || (open && self.room) {
            true
        } else {
            self.stats.prefetch_gated += 1;
            self.stats.guesses_skipped += 1;
            false
        }
    }

    fn predict(&mut self, layer: usize, guess: &Routing) -> Result<(), ComputeError> {
        // Kept lazy, evaluated with the layer's routing (`route_inner`).
        self.prediction = Some((layer, guess.indices.clone(), guess.scores.clone()));
        Ok(())
    }

    fn route(&mut self, layer: usize, indices: &Array) -> Result<Vec<PoolRoute<'_>>, ComputeError> {
        Ok(self.route_inner(layer, indices, None)?.0)
    }

    fn mix(
        &mut self,
        layer: usize,
        x: &Array,
        routing: &Routing,
    ) -> Result<Option<Array>, ComputeError> {
        // Only a call whose distinct experts cannot all be resident at once needs grouping.
        if self.skip_below.is_some() || self.min_slots() >= self.num_experts {
            return Ok(None);
        }
        let shape = routing.indices.shape();
        if shape.iter().product::<usize>() <= self.min_slots() {
            return Ok(None);
        }
        let waited = Instant::now();
        mlx::eval(&[&routing.indices])?;
        self.stats.eval_wait_ms += waited.elapsed().as_secs_f64() * 1e3;
        let ids = routing.indices.to_vec::<u32>()?;
        if let Some(&bad) = ids.iter().find(|&&e| e as usize >= self.num_experts) {
            return Err(ComputeError::BadPlacement {
                expert: bad as usize,
                what: format!(
                    "router output of layer {layer} (only {} experts)",
                    self.num_experts
                ),
            });
        }
        let groups = self.cache.fitting_groups(layer as u32, &unique(&ids));
        if groups.len() <= 1 {
            return Ok(None);
        }
        // A prediction made for this call's layer is moot: the groups load what is needed.
        self.prediction = None;
        Ok(Some(self.mix_in_groups(layer, x, routing, &ids, groups)?))
    }

    fn route_scored(
        &mut self,
        layer: usize,
        routing: &Routing,
    ) -> Result<(Vec<PoolRoute<'_>>, Option<Array>), ComputeError> {
        if self.ahead {
            if let Some(pool) = self.cache.layer_pool(layer as u32) {
                return Ok((self.route_ahead(layer, pool, &routing.indices)?, None));
            }
        }
        if self.skip_below.is_none() {
            return Ok((self.route(layer, &routing.indices)?, None));
        }
        self.route_inner(layer, &routing.indices, Some(&routing.scores))
    }
}

/// Positions of a call up to which decode runs ahead (a decode step, or a few).
const AHEAD_MAX_TOKENS: usize = 8;

impl StreamingExperts<'_> {
    /// Routes `layer` ahead: each entry through the layer's device-side table, without waiting
    /// for the routing; `confirm` decides later whether the result stands.
    fn route_ahead(
        &mut self,
        layer: usize,
        pool: usize,
        indices: &Array,
    ) -> Result<Vec<PoolRoute<'_>>, ComputeError> {
        self.make_table(layer, pool)?;
        let loads = self.cache.stats_ref().experts_loaded;
        self.unconfirmed.insert(layer, (indices.clone(), loads));
        let t = &self.tables[&layer];
        Ok(vec![PoolRoute {
            pool: &self.pools[t.pool],
            slots: t.slots.take(indices, 0)?,
            serves: None,
        }])
    }

    /// Makes `layer`'s table if it has none: where each of its experts is resident now.
    fn make_table(&mut self, layer: usize, pool: usize) -> Result<(), ComputeError> {
        if self.tables.contains_key(&layer) {
            return Ok(());
        }
        let written: Vec<u32> = (0..self.num_experts as u32)
            .map(|e| match self.cache.resident_slot(layer as u32, e) {
                Some((p, slot)) if p == pool => slot,
                _ => u32::MAX,
            })
            .collect();
        let values: Vec<u32> = written
            .iter()
            .map(|&s| if s == u32::MAX { 0 } else { s })
            .collect();
        let table = AheadTable {
            pool,
            slots: Array::from_slice(&values, &[self.num_experts])?,
            written,
        };
        self.tables.insert(layer, table);
        Ok(())
    }

    /// After `layer` was routed the usual way: its table learns where the experts it used are.
    fn learn(
        &mut self,
        layer: usize,
        wanted: &[u32],
        placement: &[(usize, u32)],
    ) -> Result<(), ComputeError> {
        let Some(pool) = self.cache.layer_pool(layer as u32) else {
            return Ok(());
        };
        self.make_table(layer, pool)?;
        let t = self.tables.get_mut(&layer).expect("made above");
        let stale: Vec<(usize, u32)> = wanted
            .iter()
            .zip(placement)
            .filter(|&(&e, &(p, slot))| p == t.pool && t.written[e as usize] != slot)
            .map(|(&e, &(_, slot))| (e as usize, slot))
            .collect();
        if stale.is_empty() {
            return Ok(());
        }
        // SAFETY: the table was made by `from_slice` (evaluated, contiguous, owning its
        // elements). A computation scheduled earlier may read it while it is written; its
        // result stands only if nothing was loaded since it was scheduled (`confirm`), and a
        // table is written only after a usual route, whose loads make every such result fail.
        let bytes = unsafe { t.slots.data_mut()? };
        for (e, slot) in stale {
            let at = e * 4;
            // SAFETY: `at + 4 <= bytes.len()` (`e < num_experts`, four bytes each); a volatile
            // write, as the device or MLX's CPU stream may read the table at the same time.
            unsafe {
                std::ptr::write_volatile(
                    bytes[at..at + 4].as_mut_ptr().cast::<[u8; 4]>(),
                    slot.to_le_bytes(),
                )
            };
            t.written[e] = slot;
        }
        Ok(())
    }
}

impl StreamingExperts<'_> {
    /// Evaluates the routing (and any pending prediction), makes the needed experts resident,
    /// starts the prefetch of the predicted ones, and builds the slot tables.
    fn route_inner(
        &mut self,
        layer: usize,
        indices: &Array,
        scores: Option<&Array>,
    ) -> Result<(Vec<PoolRoute<'_>>, Option<Array>), ComputeError> {
        let entered = Instant::now();
        let before = self.trace.as_ref().map(|_| TracePoint::of(&self.cache));
        let prediction = self.prediction.take();
        let mut to_eval = vec![indices];
        to_eval.extend(scores);
        if let Some((_, p, w)) = &prediction {
            to_eval.push(p);
            to_eval.push(w);
        }
        let waited = Instant::now();
        mlx::eval(&to_eval)?;
        self.stats.eval_wait_ms += waited.elapsed().as_secs_f64() * 1e3;
        // From here on the forward pass waits for experts, not for compute.
        let started = Instant::now();
        let ids = indices.to_vec::<u32>()?;
        if let Some(&bad) = ids.iter().find(|&&e| e as usize >= self.num_experts) {
            return Err(ComputeError::BadPlacement {
                expert: bad as usize,
                what: format!(
                    "router output of layer {layer} (only {} experts)",
                    self.num_experts
                ),
            });
        }
        let (needed, new_scores) = match (scores, self.skip_below) {
            (Some(s), Some(threshold)) => {
                let (needed, kept) =
                    self.skip(layer, &ids, &s.to_vec_f32()?, threshold, indices)?;
                (needed, Some(kept.astype(s.dtype())?))
            }
            _ => (ids.clone(), None),
        };
        let wanted = unique(&needed);
        if let Some(g) = self.last_prediction.take() {
            if g.layer == layer {
                self.score(&g, &wanted);
            }
        }
        self.pass_at(layer, ids.len());
        let placement = self.cache.prepare(self.pack, layer as u32, &wanted)?;
        if let Some((next, p, w)) = prediction {
            let guess = self.guess(next, &p.to_vec::<u32>()?, &w.to_vec_f32()?, p.dim(-1))?;
            // A chunk of many tokens (a prompt; on average 4 routed entries per expert or
            // more) uses nearly every expert its guess names: the whole guess is read while
            // this layer computes, if both layers' experts fit (time to first token).
            let chunk = self.is_chunk(ids.len());
            let div = chunk_vote_divisor();
            let reads: Vec<u32> = guess
                .reads
                .iter()
                .zip(&guess.votes)
                .filter(|&(&(_, rank), &votes)| {
                    if chunk {
                        div > 0 && votes * self.num_experts * div >= ids.len()
                    } else {
                        self.precision.get(rank).copied().unwrap_or(0.0) >= PREFETCH_MIN_PRECISION
                    }
                })
                .map(|(&(e, _), _)| e)
                .collect();
            let room = if chunk {
                self.min_slots() >= wanted.len() + reads.len()
            } else {
                self.room
            };
            if !reads.is_empty() && room {
                self.cache.prefetch(self.pack, next as u32, &reads)?;
            } else if !guess.reads.is_empty() {
                self.stats.prefetch_gated += 1;
            }
            self.last_prediction = Some(guess);
        }
        let stalled = started.elapsed();
        self.stats.stall_ms += stalled.as_secs_f64() * 1e3;
        self.stats.routes += 1;

        if let (Some(t), Some(b)) = (self.trace.as_mut(), before) {
            let a = TracePoint::of(&self.cache);
            let end = Instant::now();
            let us = |ms: f64| (ms * 1e3).round() as i64;
            let load = us(a.load_ms - b.load_ms);
            let table = us(a.table_ms - b.table_ms);
            let host = t.last_end.map_or(0, |e| (entered - e).as_micros() as i64);
            use std::io::Write;
            let _ = writeln!(
                t.out,
                "{layer},{},{host},{},{},{load},{table},{},{},{},{},{},0",
                ids.len(),
                (started - entered).as_micros(),
                a.misses - b.misses,
                stalled.as_micros() as i64 - load - table,
                us(a.steps[0] - b.steps[0]),
                us(a.steps[1] - b.steps[1]),
                us(a.steps[2] - b.steps[2]),
                us(a.steps[3] - b.steps[3]),
            );
            t.last_end = Some(end);
        }
        if self.ahead_enabled {
            self.learn(layer, &wanted, &placement)?;
        }
        let routes = self.routes(&wanted, &placement, &ids, indices, false)?;
        Ok((routes, new_scores))
    }

    /// The guessed experts of `layer` from the guess's ids and weights (`[.., k]`), each with
    /// its best rank in a token (0: heaviest), and those not resident: the would-be reads.
    fn guess(
        &self,
        layer: usize,
        ids: &[u32],
        weights: &[f32],
        k: Option<usize>,
    ) -> Result<Guess, ComputeError> {
        let k = k.unwrap_or(1).max(1);
        // Per guessed expert: its best rank in a token, and how many entries name it.
        let mut best: std::collections::BTreeMap<u32, (usize, usize)> = Default::default();
        for (row, w) in ids.chunks(k).zip(weights.chunks(k)) {
            let mut order: Vec<usize> = (0..row.len()).collect();
            order.sort_by(|&a, &b| w[b].total_cmp(&w[a]).then(a.cmp(&b)));
            for (rank, &j) in order.iter().enumerate() {
                let e = row[j];
                if (e as usize) < self.num_experts {
                    let r = best.entry(e).or_insert((rank, 0));
                    r.0 = r.0.min(rank);
                    r.1 += 1;
                }
            }
        }
        let experts: Vec<u32> = best.keys().copied().collect();
        let (reads, votes) = best
            .into_iter()
            .filter(|&(e, _)| !self.cache.is_resident(layer as u32, e))
            .map(|(e, (rank, votes))| ((e, rank), votes))
            .unzip();
        Ok(Guess {
            layer,
            experts,
            reads,
            votes,
        })
    }

    /// Scores a guess against what the router picked (`wanted`, sorted).
    fn score(&mut self, g: &Guess, wanted: &[u32]) {
        let hit = |e: &u32| wanted.binary_search(e).is_ok();
        self.stats.predicted += g.experts.len() as u64;
        self.stats.predicted_correct += g.experts.iter().filter(|e| hit(e)).count() as u64;
        for &(e, rank) in &g.reads {
            if self.precision.len() <= rank {
                self.precision.resize(rank + 1, 0.0);
                self.stats.rank_reads.resize(rank + 1, 0);
                self.stats.rank_reads_correct.resize(rank + 1, 0);
            }
            self.stats.rank_reads[rank] += 1;
            self.stats.rank_reads_correct[rank] += hit(&e) as u64;
            let p = &mut self.precision[rank];
            *p += PRECISION_WEIGHT * (if hit(&e) { 1.0 } else { 0.0 } - *p);
        }
    }

    /// Slot arrays for router `indices` (whose values the host holds as `ids`): `wanted[i]`
    /// is at `placement[i]`. Each entry's slot is looked up here, on the host, and goes to the
    /// device as one small array shaped like `indices` (no device-side table and gather). With
    /// `always_mask`, or when several pools serve, each route says which entries it serves;
    /// entries of experts outside `wanted` point at slot 0 and are served by no route.
    fn routes(
        &self,
        wanted: &[u32],
        placement: &[(usize, u32)],
        ids: &[u32],
        indices: &Array,
        always_mask: bool,
    ) -> Result<Vec<PoolRoute<'_>>, ComputeError> {
        let shape = indices.shape();
        let at = |e: u32| wanted.binary_search(&e).ok().map(|i| placement[i]);
        let mut used: Vec<usize> = placement.iter().map(|&(p, _)| p).collect();
        used.sort_unstable();
        used.dedup();
        let mut routes = Vec::with_capacity(used.len());
        for &pool in &used {
            let mut slots = vec![0u32; ids.len()];
            let mut holds = vec![0u8; ids.len()];
            for (i, &e) in ids.iter().enumerate() {
                if let Some((p, slot)) = at(e) {
                    if p == pool {
                        slots[i] = slot;
                        holds[i] = 1;
                    }
                }
            }
            let serves = if used.len() > 1 || always_mask {
                Some(Array::from_slice(&holds, &shape)?.astype(Dtype::Bool)?)
            } else {
                None
            };
            routes.push(PoolRoute {
                pool: &self.pools[pool],
                slots: Array::from_slice(&slots, &shape)?,
                serves,
            });
        }
        Ok(routes)
    }

    /// A layer whose routed experts do not fit the pools at once (a long prefill chunk under a
    /// small budget): experts are made resident group by group, each group's entries computed
    /// and evaluated before the next group reuses the slots. Every expert is read at most once
    /// per call. Each routed entry's output is the one the single-pass path computes, and the
    /// weighted sum over `k` is the same, so results do not depend on the grouping.
    fn mix_in_groups(
        &mut self,
        layer: usize,
        x: &Array,
        routing: &Routing,
        ids: &[u32],
        groups: Vec<Vec<u32>>,
    ) -> Result<Array, ComputeError> {
        let mut y: Option<Array> = None;
        for group in groups {
            let started = Instant::now();
            let wanted = unique(&group);
            self.pass_at(layer, ids.len());
            let placement = self.cache.prepare(self.pack, layer as u32, &wanted)?;
            self.stats.stall_ms += started.elapsed().as_secs_f64() * 1e3;
            self.stats.routes += 1;
            let routes = self.routes(&wanted, &placement, ids, &routing.indices, true)?;
            let mut acc = y.take();
            for r in routes {
                let part = switch_glu(x, r.pool, &r.slots)?;
                let serves = r.serves.expect("masked").expand_dims(-1)?;
                acc = Some(match acc {
                    None => serves.select(&part, &part.mul(&Array::scalar(0.0, part.dtype())?)?)?,
                    Some(a) => serves.select(&part, &a)?,
                });
            }
            let a = acc.ok_or(ComputeError::NoExperts { layer })?;
            // The next group may overwrite these slots: compute this group's entries now.
            mlx::eval(&[&a])?;
            y = Some(a);
        }
        let y = y.ok_or(ComputeError::NoExperts { layer })?;
        // y = (y * scores[..., None]).sum(axis=-2), as the single-pass path.
        Ok(y.mul(&routing.scores.expand_dims(-1)?)?.sum(-2, false)?)
    }

    /// `--skip-uncached`: which entries to keep, and the renormalized scores. An entry is dropped
    /// when its expert is not resident and its weight is below `threshold`; a token keeps at
    /// least its heaviest entry.
    fn skip(
        &mut self,
        layer: usize,
        ids: &[u32],
        scores: &[f32],
        threshold: f32,
        indices: &Array,
    ) -> Result<(Vec<u32>, Array), ComputeError> {
        let k = indices.dim(-1).unwrap_or(1).max(1);
        let mut kept_ids = Vec::with_capacity(ids.len());
        let mut new = vec![0f32; scores.len()];
        for (row_ids, (row_scores, row_new)) in
            ids.chunks(k).zip(scores.chunks(k).zip(new.chunks_mut(k)))
        {
            let heaviest = (0..row_ids.len())
                .max_by(|&a, &b| row_scores[a].total_cmp(&row_scores[b]))
                .unwrap_or(0);
            let keep: Vec<bool> = (0..row_ids.len())
                .map(|j| {
                    j == heaviest
                        || row_scores[j] >= threshold
                        || self.cache.is_resident(layer as u32, row_ids[j])
                })
                .collect();
            let total: f32 = (0..row_ids.len())
                .filter(|&j| keep[j])
                .map(|j| row_scores[j])
                .sum();
            for j in 0..row_ids.len() {
                self.stats.routed += 1;
                if keep[j] {
                    row_new[j] = row_scores[j] / total.max(f32::MIN_POSITIVE);
                    kept_ids.push(row_ids[j]);
                } else {
                    self.stats.skipped += 1;
                }
            }
        }
        let shape = indices.shape();
        Ok((kept_ids, Array::from_slice(&new, &shape)?))
    }
}

/// Whether [`resident_store`] gives a layer in one run of a larger pool a view of its own rows
/// (the default). `FLASHPACK_POOL_VIEWS=0` routes it through the whole pool with a slot table,
/// as before: the benchmarks' baseline.
fn pool_views() -> bool {
    crate::env::number::<u64>("FLASHPACK_POOL_VIEWS").is_none_or(|v| v != 0)
}

/// The forward pass's store when every expert is resident: per sparse layer, a device-side
/// table from router expert to (pool, slot), so routing never leaves the device and a forward
/// pass needs no host round trip. `None` if some expert of `layers` is not resident.
pub fn resident_store(
    cache: &ExpertCache,
    layers: &[usize],
    num_experts: usize,
) -> Result<Option<crate::model::ResidentExperts>, ComputeError> {
    use crate::model::{LayerExperts, ResidentExperts};
    let mut store = ResidentExperts::default();
    for &layer in layers {
        let Some(placement) = cache.placement(layer as u32, num_experts) else {
            return Ok(None);
        };
        // Only the pools this layer uses, renumbered in order of first use.
        let mut used: Vec<usize> = placement.iter().map(|&(p, _)| p).collect();
        used.sort_unstable();
        used.dedup();
        let local: Vec<(usize, u32)> = placement
            .iter()
            .map(|&(p, s)| (used.binary_search(&p).unwrap_or(0), s))
            .collect();
        let pools: Vec<ExpertPool> = used.iter().map(|&p| cache.expert_pool(p)).collect();
        // One pool holding the layer's experts in order, in one run of its slots (what warming
        // every expert with no budget leaves): the layer computes on a view of that run, routed
        // by expert id, with no table lookup and no other layer's bytes as input.
        let base = local.first().map_or(0, |&(_, s)| s as usize);
        let one_run = pools.len() == 1
            && base + num_experts <= pools[0].slots()
            && local
                .iter()
                .enumerate()
                .all(|(e, &(_, s))| s as usize == base + e);
        let experts = if one_run && pool_views() {
            let pool = pools.into_iter().next().expect("one pool");
            if base == 0 && pool.slots() == num_experts {
                LayerExperts::resident(pool)
            } else {
                LayerExperts::resident(pool.slots_view(base, num_experts)?)
            }
        } else {
            LayerExperts::placed(pools, &local)?
        };
        store.layers.insert(layer, experts);
    }
    Ok(Some(store))
}
