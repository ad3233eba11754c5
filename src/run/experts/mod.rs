//! Read/decode and cache stages, the memory part: expert weights in MLX slot pools.
//!
//! In: a [`Pack`] and the experts the router picked for one layer. Out: MLX quantized matrices
//! (stacked `[slots, out, in*bits/32]`, what `gather_qmm` takes) holding those experts, and the
//! slot of each one. Misses are read (pread or mmap), optionally checksummed, decoded with the
//! pack's codecs and written into their slots in place, several experts in parallel.
//! Invariants: resident expert bytes never exceed the slot pools sized at construction; a slot
//! is written only between evaluations (the forward pass evaluates a layer before asking for the
//! next one's experts); a segment whose checksum or decode fails is never used.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;

mod huffman;
mod resize;

pub use resize::{CacheBounds, Resize};

use super::cache::{
    CacheError, EvictionPolicy, ExpertKey, Lfu, Lookup, Lru, ProfileWeighted, SlotTable,
    PROFILE_HALF_LIFE,
};
use super::read::{IoMode, ReadError, SegmentReader};
use crate::codec::{CodecId, Decoder};
use crate::format::{DType, ExpertEntry, Pack, PackError, ProjBits, QuantMode};
use crate::mlx::{self, Array, Dtype, QuantizedMatrix};
use crate::model::{ExpertAct, ExpertBias, ExpertPool};
use crate::run::open::mlx_dtype;

/// Why experts could not be made resident.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExpertError {
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error(transparent)]
    Pack(#[from] PackError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Mlx(#[from] mlx::Error),
    /// The segment's stored bytes do not match its directory checksum.
    #[error("expert segment (layer {layer}, expert {expert}, segment {segment}) of {} is damaged: its checksum does not match; {}", .path.display(), damaged_hint(.path))]
    Checksum {
        path: PathBuf,
        layer: u32,
        expert: u32,
        segment: u16,
    },
    /// The segment's stored bytes do not decode (only reachable with verification off, or a
    /// writer bug: a segment whose checksum matched decodes). The codec's reason is the source.
    #[error("expert segment (layer {layer}, expert {expert}, segment {segment}) of {} does not decode, so the pack is damaged ({})", .path.display(), damaged_hint(.path))]
    Decode {
        path: PathBuf,
        layer: u32,
        expert: u32,
        segment: u16,
        #[source]
        source: crate::codec::CodecError,
    },
    #[error("layer {layer} expert {expert} is not stored in the pack (the merge map or router points past the expert directory)")]
    Missing { layer: u32, expert: u32 },
    #[error("pack is not usable by the runtime: {reason}")]
    Unsupported { reason: String },
}

/// The streaming store answers the forward pass with the cache's own error as the cause.
impl From<ExpertError> for crate::model::ComputeError {
    fn from(e: ExpertError) -> Self {
        crate::model::ComputeError::Store(Box::new(e))
    }
}

/// What to do about a damaged pack, for messages: `flashpack verify` lists every damaged part.
pub(crate) fn damaged_hint(path: &Path) -> String {
    let name = if path.as_os_str().is_empty() {
        "PACK".to_string()
    } else {
        path.display().to_string()
    };
    format!("run `flashpack verify {name}` to list every damaged part, then re-download or re-convert the pack")
}

/// Which eviction policy the cache uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyKind {
    Lru,
    Lfu,
    Profile,
}

impl std::str::FromStr for PolicyKind {
    type Err = String;
    fn from_str(s: &str) -> Result<PolicyKind, String> {
        match s {
            "lru" => Ok(PolicyKind::Lru),
            "lfu" => Ok(PolicyKind::Lfu),
            "profile" => Ok(PolicyKind::Profile),
            _ => Err(format!(
                "unknown cache policy {s:?}: use lru, lfu or profile"
            )),
        }
    }
}

/// How the store reads and caches.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Bytes the expert pools may use; `None` holds every stored expert.
    pub budget_bytes: Option<u64>,
    pub io: IoMode,
    pub queue_depth: usize,
    pub policy: PolicyKind,
    /// Check each segment's blake3 when it is read (on by default: a flipped byte must end the
    /// run with an error, not change the text; `run --no-verify` turns it off).
    pub verify: bool,
    /// No caching at all: every use reads and decodes again (the naive baseline of benchmarks).
    pub naive: bool,
    /// Most quantized weights (slots x rows x columns) one pool array may hold; more experts of
    /// one precision go into several pools, split between layers ([`MAX_POOL_ELEMENTS`]).
    pub max_pool_elements: u64,
}

/// Default of [`StoreOptions::max_pool_elements`]: MLX's CUDA `gather_qmm` (the tensor-core
/// kernel decode and prefill use) offsets the expert batch in 32-bit element counts, so an
/// expert at a slot past 2^32 weights of its pool reads another slot's codes (measured: a
/// 48-layer pool of 768 x 2048 experts gave other tokens from slot 2731 on, decision 0020).
/// Kept under 2^31 for every backend.
pub const MAX_POOL_ELEMENTS: u64 = (1 << 31) - 1;

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            budget_bytes: None,
            io: IoMode::Pread,
            queue_depth: 8,
            policy: PolicyKind::Profile,
            verify: true,
            naive: false,
            max_pool_elements: MAX_POOL_ELEMENTS,
        }
    }
}

/// The shape every expert of one pool shares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct PoolShape {
    bits: ProjBits,
    group_size: u32,
    scale_dtype: DType,
    mode: QuantMode,
    /// The experts' projection biases' type, when they have them (gpt-oss).
    bias_dtype: Option<DType>,
}

/// Arrays of a pool: codes, scales and quantization biases of gate, up and down, then the
/// gate, up and down expert biases.
const SLOT_ARRAYS: usize = 12;

/// One stack of slots: gate, up and down, each as packed words, scales and biases.
struct Pool {
    shape: PoolShape,
    /// gate_w, gate_s, gate_b, up_w, up_s, up_b, down_w, down_s, down_b, then the expert
    /// biases gate_bias, up_bias, down_bias; the quantization biases are `None` for
    /// mxfp4/mxfp8, which have none, and the expert biases for experts without.
    arrays: Vec<Option<Array>>,
    table: SlotTable,
    hidden: usize,
    inter: usize,
}

impl Pool {
    /// Bytes one slot takes in each of the nine arrays.
    /// Bytes one resident expert of `shape` takes (all of [`Pool::slot_bytes`]).
    fn expert_bytes(shape: PoolShape, hidden: usize, inter: usize) -> u64 {
        Pool::slot_bytes(shape, hidden, inter).iter().sum::<usize>() as u64
    }

    fn slot_bytes(shape: PoolShape, hidden: usize, inter: usize) -> [usize; SLOT_ARRAYS] {
        let w = |p: usize| inter * hidden * shape.bits.get(p) as usize / 8;
        let g = shape.group_size as usize;
        let ss = shape.scale_dtype.size() as usize;
        let s = inter * (hidden / g) * ss;
        let d = hidden * (inter / g) * ss;
        let (sb, db) = if shape.mode.has_biases() {
            (s, d)
        } else {
            (0, 0)
        };
        let bs = shape.bias_dtype.map_or(0, |t| t.size() as usize);
        [
            w(0),
            s,
            sb,
            w(1),
            s,
            sb,
            w(2),
            d,
            db,
            inter * bs,
            inter * bs,
            hidden * bs,
        ]
    }

    fn new(
        shape: PoolShape,
        slots: u32,
        hidden: usize,
        inter: usize,
        policy: Box<dyn EvictionPolicy>,
    ) -> mlx::Result<Pool> {
        let g = shape.group_size as usize;
        let n = slots as usize;
        let sd = mlx_dtype(shape.scale_dtype);
        let proj_in = |rows: usize, cols: usize, p: usize| -> mlx::Result<[Option<Array>; 3]> {
            let b = shape.bits.get(p) as usize;
            Ok([
                Some(Array::host_buffer(&[n, rows, cols * b / 32], Dtype::U32)?),
                Some(Array::host_buffer(&[n, rows, cols / g], sd)?),
                if shape.mode.has_biases() {
                    Some(Array::host_buffer(&[n, rows, cols / g], sd)?)
                } else {
                    None
                },
            ])
        };
        let mut arrays = Vec::with_capacity(SLOT_ARRAYS);
        arrays.extend(proj_in(inter, hidden, 0)?);
        arrays.extend(proj_in(inter, hidden, 1)?);
        arrays.extend(proj_in(hidden, inter, 2)?);
        for out in [inter, inter, hidden] {
            arrays.push(match shape.bias_dtype {
                Some(t) => Some(Array::host_buffer(&[n, out], mlx_dtype(t))?),
                None => None,
            });
        }
        Ok(Pool {
            shape,
            arrays,
            table: SlotTable::new(slots, policy),
            hidden,
            inter,
        })
    }

    /// The expert biases, for experts that have them.
    fn bias(&self) -> Option<ExpertBias> {
        match (&self.arrays[9], &self.arrays[10], &self.arrays[11]) {
            (Some(g), Some(u), Some(d)) => Some(ExpertBias {
                gate: g.clone(),
                up: u.clone(),
                down: d.clone(),
            }),
            _ => None,
        }
    }

    fn matrix(&self, proj: usize) -> QuantizedMatrix {
        QuantizedMatrix {
            weight: self.arrays[3 * proj].clone().expect("codes"),
            scales: self.arrays[3 * proj + 1].clone().expect("scales"),
            biases: self.arrays[3 * proj + 2].clone(),
            group_size: self.shape.group_size as i32,
            bits: self.shape.bits.get(proj) as i32,
            mode: self.shape.mode,
        }
    }
}

/// One slot pool as sized (see [`ExpertCache::pool_sizes`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolSize {
    pub bits: ProjBits,
    pub slots: u32,
    /// Stored experts (all layers) of this precision.
    pub stored: u32,
    /// Bytes one resident expert takes.
    pub slot_bytes: u64,
}

/// Per-layer hit and miss counts and timings.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct StoreStats {
    pub hits_per_layer: BTreeMap<u32, u64>,
    pub misses_per_layer: BTreeMap<u32, u64>,
    pub bytes_read: u64,
    pub read_decode_ms: f64,
    pub experts_loaded: u64,
    pub slots: u32,
    pub resident_bytes: u64,
    /// Experts predicted for prefetch, loaded by prefetch, and later asked for by the router.
    pub prefetch_issued: u64,
    pub prefetch_loaded: u64,
    pub prefetch_used: u64,
    pub prefetch_wait_ms: f64,
    /// Time spent finding slots (lookups, victims) for the experts asked for.
    pub table_ms: f64,
    /// Time spent in each step of a load, summed over the threads that ran it.
    pub thread_ms: LoadTimes,
}

/// Milliseconds of each load step, summed over threads (so they can exceed wall time).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct LoadTimes {
    pub read: f64,
    pub verify: f64,
    pub decode: f64,
    /// Copying decoded rows into the slot pools (MLX memory).
    pub scatter: f64,
}

/// Nanoseconds per load step, process-wide (loads run on pool threads).
static STEP_NS: [std::sync::atomic::AtomicU64; 4] = [
    std::sync::atomic::AtomicU64::new(0),
    std::sync::atomic::AtomicU64::new(0),
    std::sync::atomic::AtomicU64::new(0),
    std::sync::atomic::AtomicU64::new(0),
];

fn step_done(step: usize, since: Instant) -> Instant {
    let now = Instant::now();
    STEP_NS[step].fetch_add(
        (now - since).as_nanos() as u64,
        std::sync::atomic::Ordering::Relaxed,
    );
    now
}

pub(crate) fn load_times() -> LoadTimes {
    let ms = |i: usize| STEP_NS[i].load(std::sync::atomic::Ordering::Relaxed) as f64 / 1e6;
    LoadTimes {
        read: ms(0),
        verify: ms(1),
        decode: ms(2),
        scatter: ms(3),
    }
}

/// A background load in flight: the keys it fills, its thread, when it started.
type Prefetch = (
    Vec<(usize, ExpertKey)>,
    std::thread::JoinHandle<Result<(), ExpertError>>,
    Instant,
);

/// Per-thread decode state: decoder, stored bytes, decoded weights, decoded scales and biases.
type Scratch = (Decoder, Vec<u8>, Vec<u8>, Vec<u8>);

/// The experts of a pack, resident in slot pools.
pub struct ExpertCache {
    /// The experts' activation (every pool's).
    act: ExpertAct,
    pools: Vec<Pool>,
    /// For each (layer, stored expert): pool index.
    pool_of: BTreeMap<(u32, u32), usize>,
    merge_map: Option<Vec<Vec<u32>>>,
    reader: std::sync::Arc<SegmentReader>,
    verify: bool,
    naive: bool,
    hidden: usize,
    inter: usize,
    stats: StoreStats,
    pending: Option<Prefetch>,
    /// Experts loaded by prefetch and not yet asked for.
    prefetched: std::collections::HashSet<ExpertKey>,
    /// Whether slots are written by device copies (`mlx::upload_available`).
    upload: bool,
    /// The logical clock every pool's table shares (see `SlotTable::advance_clock`).
    clock: u64,
    /// Each pool's slots as sized at construction: the most a resize gives it back
    /// (`--mem-budget` stays the upper bound, `resize.rs`).
    max_slots: Vec<u32>,
}

/// Decode scratches not in use. A load takes one (or makes one) and puts it back; none is ever
/// dropped, because on CUDA their buffers are page-locked (`sized`), and freeing page-locked
/// memory while the driver still has it registered lets a later copy read stale pages. There
/// are at most as many as loads ever ran at once (the I/O threads plus nested decode tasks).
static SCRATCH: std::sync::Mutex<Vec<Scratch>> = std::sync::Mutex::new(Vec::new());

/// The stored id computing router expert `e` of `layer` (formats/flashpack-v1.md §4.3).
fn stored_expert(merge_map: &Option<Vec<Vec<u32>>>, layer: u32, e: u32) -> u32 {
    merge_map
        .as_ref()
        .and_then(|m| m.get(layer as usize))
        .and_then(|l| l.get(e as usize))
        .copied()
        .unwrap_or(e)
}

impl ExpertCache {
    /// Sizes the pools from the budget and the pack's experts. With no budget, every stored
    /// expert gets a slot (all resident).
    pub fn new(pack: &Pack, opts: &StoreOptions) -> Result<ExpertCache, ExpertError> {
        ExpertCache::of_layers(pack, opts, None)
    }

    /// [`ExpertCache::new`] over the experts of `layers` alone (all with `None`): a pipeline
    /// stage's share (docs/decisions/0034-pipeline-ranks.md). No other layer's expert is
    /// sized, read or counted.
    pub fn of_layers(
        pack: &Pack,
        opts: &StoreOptions,
        layers: Option<std::ops::Range<u32>>,
    ) -> Result<ExpertCache, ExpertError> {
        let hidden = pack.hidden_size() as usize;
        let inter = pack.intermediate_size() as usize;
        let mut by_shape: BTreeMap<PoolShape, Vec<(u32, u32)>> = BTreeMap::new();
        for e in pack
            .experts()
            .iter()
            .filter(|e| e.segment == 0 && layers.as_ref().is_none_or(|r| r.contains(&e.layer)))
        {
            let shape = PoolShape {
                bits: e.bits,
                group_size: e.group_size,
                scale_dtype: e.scale_dtype,
                mode: e.mode,
                bias_dtype: e.bias_dtype,
            };
            if !e.bits.0.iter().all(|b| matches!(b, 2 | 3 | 4 | 5 | 6 | 8)) {
                return Err(ExpertError::Unsupported {
                    reason: format!(
                        "{}-bit experts (MLX's gather_qmm takes 2, 3, 4, 5, 6 or 8 bits)",
                        e.bits
                    ),
                });
            }
            by_shape.entry(shape).or_default().push((e.layer, e.expert));
        }
        let cap = pool_capacity(opts.max_pool_elements, hidden, inter);
        // One pool per precision and group of whole layers that fits `cap`.
        let mut plan: Vec<(PoolShape, Vec<(u32, u32)>)> = Vec::new();
        for (shape, mut keys) in by_shape {
            keys.sort_unstable();
            for chunk in split_by_layer(&keys, cap) {
                plan.push((shape, chunk));
            }
        }
        let slots = crate::run::budget::pool_slots(
            opts.budget_bytes,
            &plan
                .iter()
                .map(|(s, keys)| (keys.len() as u32, Pool::expert_bytes(*s, hidden, inter)))
                .collect::<Vec<_>>(),
        );
        let layers = pack.experts().last().map_or(1, |e| e.layer + 1);
        let prior = profile_prior(pack.meta());
        let mut pools = Vec::new();
        let mut pool_of = BTreeMap::new();
        for ((shape, keys), &slots) in plan.iter().zip(&slots) {
            let policy: Box<dyn EvictionPolicy> = match opts.policy {
                PolicyKind::Lru => Box::new(Lru::default()),
                PolicyKind::Lfu => Box::new(Lfu::new(PROFILE_HALF_LIFE)),
                PolicyKind::Profile => Box::new(ProfileWeighted::new(
                    prior.clone(),
                    layers,
                    PROFILE_HALF_LIFE,
                )),
            };
            for &k in keys {
                pool_of.insert(k, pools.len());
            }
            pools.push(Pool::new(*shape, slots, hidden, inter, policy)?);
        }
        let merge_map = pack.meta().merge_map.clone();
        let reader = std::sync::Arc::new(SegmentReader::new(pack, opts.io, opts.queue_depth)?);
        let mut stats = StoreStats::default();
        for p in &pools {
            stats.slots += p.table.capacity();
            stats.resident_bytes += p.table.capacity() as u64
                * Pool::slot_bytes(p.shape, hidden, inter)
                    .iter()
                    .sum::<usize>() as u64;
        }
        let max_slots = pools.iter().map(|p| p.table.capacity()).collect();
        Ok(ExpertCache {
            act: ExpertAct::of(&pack.meta().model),
            max_slots,
            pools,
            pool_of,
            merge_map,
            reader,
            verify: opts.verify,
            naive: opts.naive,
            hidden,
            inter,
            stats,
            pending: None,
            prefetched: Default::default(),
            upload: mlx::upload_available(),
            clock: 0,
        })
    }

    /// Sets the part size of the reader's pipelined loads (`bench io` compares sizes; 0: off).
    /// Returns `false` (changing nothing) while a background load shares the reader.
    pub fn set_read_split(&mut self, bytes: usize) -> bool {
        match std::sync::Arc::get_mut(&mut self.reader) {
            Some(r) => {
                r.set_split(bytes);
                true
            }
            None => false,
        }
    }

    /// Sets the part size of lone Huffman-coded misses read as they decode (0: read whole,
    /// then decoded). Returns `false` (changing nothing) while a background load shares the
    /// reader.
    pub fn set_huffman_part(&mut self, bytes: usize) -> bool {
        match std::sync::Arc::get_mut(&mut self.reader) {
            Some(r) => {
                r.set_huffman_part(bytes);
                true
            }
            None => false,
        }
    }

    /// Bytes the pools would take with every stored expert resident (what `budget_bytes: None`
    /// allocates); budgets given as a share of the experts are shares of this.
    pub fn all_resident_bytes(pack: &Pack) -> u64 {
        ExpertCache::resident_bytes_of(pack, None)
    }

    /// [`ExpertCache::all_resident_bytes`] of the experts of `layers` alone.
    pub fn resident_bytes_of(pack: &Pack, layers: Option<std::ops::Range<u32>>) -> u64 {
        let (hidden, inter) = (
            pack.hidden_size() as usize,
            pack.intermediate_size() as usize,
        );
        pack.experts()
            .iter()
            .filter(|e| e.segment == 0 && layers.as_ref().is_none_or(|r| r.contains(&e.layer)))
            .map(|e| {
                let shape = PoolShape {
                    bits: e.bits,
                    group_size: e.group_size,
                    scale_dtype: e.scale_dtype,
                    mode: e.mode,
                    bias_dtype: e.bias_dtype,
                };
                Pool::slot_bytes(shape, hidden, inter).iter().sum::<usize>() as u64
            })
            .sum()
    }

    /// The counters as they stand, without the per-step thread times ([`load_times`]).
    pub fn stats_ref(&self) -> &StoreStats {
        &self.stats
    }

    pub fn stats(&self) -> StoreStats {
        let mut s = self.stats.clone();
        s.bytes_read = self.reader.bytes_read();
        s.thread_ms = load_times();
        s
    }

    /// Each pool as sized: its precision, slots, stored experts and bytes per slot (for
    /// messages about a budget that holds too few experts).
    pub fn pool_sizes(&self) -> Vec<PoolSize> {
        self.pools
            .iter()
            .enumerate()
            .map(|(i, p)| PoolSize {
                bits: p.shape.bits,
                slots: p.table.capacity(),
                stored: self.pool_of.values().filter(|&&x| x == i).count() as u32,
                slot_bytes: Pool::slot_bytes(p.shape, p.hidden, p.inter)
                    .iter()
                    .sum::<usize>() as u64,
            })
            .collect()
    }

    /// Number of pools (one per expert precision and run of layers, see
    /// [`StoreOptions::max_pool_elements`]).
    pub fn pool_count(&self) -> usize {
        self.pools.len()
    }

    /// `f` on pool `pool`'s slot table, on the clock every table shares.
    fn on_table<R>(&mut self, pool: usize, f: impl FnOnce(&mut SlotTable) -> R) -> R {
        let table = &mut self.pools[pool].table;
        table.advance_clock(self.clock);
        let r = f(table);
        self.clock = table.clock();
        r
    }

    /// A prompt chunk has reached `layer` (`None`: not in a chunk): every pool then evicts the
    /// experts of the layers the chunk has passed before those of the layers ahead
    /// ([`SlotTable::set_passed`]).
    pub fn set_passed(&mut self, layer: Option<u32>) {
        for p in &mut self.pools {
            p.table.set_passed(layer);
        }
    }

    /// Distinct layers whose experts pool `pool` holds.
    pub fn pool_layers(&self, pool: usize) -> usize {
        let mut layers: Vec<u32> = self
            .pool_of
            .iter()
            .filter(|&(_, &p)| p == pool)
            .map(|(&(layer, _), _)| layer)
            .collect();
        layers.dedup();
        layers.len()
    }

    /// Whether router expert `e` of `layer` is resident (or being prefetched, which the next
    /// `prepare` joins without a new read); a lookup without side effects.
    pub fn is_resident(&self, layer: u32, e: u32) -> bool {
        self.is_stored_resident(layer, stored_expert(&self.merge_map, layer, e))
    }

    /// Whether stored expert `stored` of `layer` holds a slot.
    fn is_stored_resident(&self, layer: u32, stored: u32) -> bool {
        let key = ExpertKey {
            layer,
            expert: stored,
        };
        self.pool_of
            .get(&(layer, stored))
            .is_some_and(|&p| self.pools[p].table.contains(key))
    }

    /// Where router expert `e` of `layer` is resident now: (pool, slot).
    pub fn resident_slot(&self, layer: u32, e: u32) -> Option<(usize, u32)> {
        let stored = stored_expert(&self.merge_map, layer, e);
        let pool = *self.pool_of.get(&(layer, stored))?;
        let slot = self.pools[pool].table.slot_of(ExpertKey {
            layer,
            expert: stored,
        })?;
        Some((pool, slot))
    }

    /// The one pool that holds every stored expert of `layer`, if one does.
    pub fn layer_pool(&self, layer: u32) -> Option<usize> {
        let mut pools = self
            .pool_of
            .range((layer, 0)..=(layer, u32::MAX))
            .map(|(_, &p)| p);
        let first = pools.next()?;
        pools.all(|p| p == first).then_some(first)
    }

    /// The layers with experts, from `first` on, in order.
    pub fn sparse_layers_from(&self, first: u32) -> Vec<u32> {
        let mut layers: Vec<u32> = self
            .pool_of
            .range((first, 0)..)
            .map(|(&(layer, _), _)| layer)
            .collect();
        layers.dedup();
        layers
    }

    /// Where each router expert `0..num_experts` of `layer` is resident: its (pool, slot), or
    /// `None` if any of them is not resident (after [`Self::warm_all`] with no budget, all are).
    pub fn placement(&self, layer: u32, num_experts: usize) -> Option<Vec<(usize, u32)>> {
        (0..num_experts as u32)
            .map(|e| self.resident_slot(layer, e))
            .collect()
    }

    /// Splits router experts `wanted` of `layer` into groups that each fit the pools at once
    /// (per pool, no more distinct stored experts than it has slots), resident ones first so the
    /// first group evicts nothing it could use. One group when they all fit.
    pub fn fitting_groups(&self, layer: u32, wanted: &[u32]) -> Vec<Vec<u32>> {
        let mut order: Vec<u32> = wanted.to_vec();
        order.sort_by_key(|&e| (!self.is_resident(layer, e), e));
        let mut groups: Vec<Vec<u32>> = Vec::new();
        let mut counts: Vec<std::collections::BTreeSet<u32>> =
            vec![Default::default(); self.pools.len()];
        let mut current: Vec<u32> = Vec::new();
        for e in order {
            let stored = stored_expert(&self.merge_map, layer, e);
            let Some(&pool) = self.pool_of.get(&(layer, stored)) else {
                current.push(e); // `prepare` reports it as missing
                continue;
            };
            let cap = self.pools[pool].table.capacity() as usize;
            if !counts[pool].contains(&stored) && counts[pool].len() >= cap && !current.is_empty() {
                groups.push(std::mem::take(&mut current));
                counts.iter_mut().for_each(|c| c.clear());
            }
            counts[pool].insert(stored);
            current.push(e);
        }
        if !current.is_empty() || groups.is_empty() {
            groups.push(current);
        }
        groups
    }

    /// gate, up and down of pool `pool`, for `gather_qmm`.
    pub fn matrices(&self, pool: usize) -> [QuantizedMatrix; 3] {
        let p = &self.pools[pool];
        [p.matrix(0), p.matrix(1), p.matrix(2)]
    }

    /// Pool `pool` as the forward pass takes it: the three stacks, the expert biases and the
    /// experts' activation.
    pub fn expert_pool(&self, pool: usize) -> ExpertPool {
        let [gate, up, down] = self.matrices(pool);
        ExpertPool {
            gate,
            up,
            down,
            bias: self.pools[pool].bias(),
            act: self.act,
        }
    }

    /// Makes the router's chosen experts of `layer` resident. Returns, for each entry of
    /// `router_experts`, its (pool, slot).
    pub fn prepare(
        &mut self,
        pack: &Pack,
        layer: u32,
        router_experts: &[u32],
    ) -> Result<Vec<(usize, u32)>, ExpertError> {
        let stored: Vec<u32> = router_experts
            .iter()
            .map(|&e| stored_expert(&self.merge_map, layer, e))
            .collect();
        self.prepare_stored(pack, layer, &stored)
    }

    /// [`Self::prepare`] for stored expert ids (no merge map applied): what `bench io` loads.
    pub fn prepare_stored(
        &mut self,
        pack: &Pack,
        layer: u32,
        stored: &[u32],
    ) -> Result<Vec<(usize, u32)>, ExpertError> {
        self.join_prefetch()?;
        for p in &mut self.pools {
            if self.naive {
                p.table.clear();
            }
            p.table.begin_group();
        }
        self.prepare_stored_ids(pack, layer, stored)
    }

    fn prepare_stored_ids(
        &mut self,
        pack: &Pack,
        layer: u32,
        stored_ids: &[u32],
    ) -> Result<Vec<(usize, u32)>, ExpertError> {
        let table_started = Instant::now();
        let mut out = vec![(0usize, 0u32); stored_ids.len()];
        let mut misses: Vec<(usize, u32, u32)> = Vec::new(); // pool, slot, stored expert
                                                             // Resident experts are asked for first: asking marks them in use, so a miss of this
                                                             // group can never evict one of them (which would be read again a moment later).
        let mut order: Vec<usize> = (0..stored_ids.len()).collect();
        order.sort_by_key(|&i| !self.is_stored_resident(layer, stored_ids[i]));
        for i in order {
            let stored = stored_ids[i];
            let pool = *self
                .pool_of
                .get(&(layer, stored))
                .ok_or(ExpertError::Missing {
                    layer,
                    expert: stored,
                })?;
            let key = ExpertKey {
                layer,
                expert: stored,
            };
            let slot = match self.on_table(pool, |t| t.request(key))? {
                Lookup::Hit(slot) => {
                    *self.stats.hits_per_layer.entry(layer).or_default() += 1;
                    if self.prefetched.remove(&key) {
                        self.stats.prefetch_used += 1;
                    }
                    slot
                }
                Lookup::Miss { slot, .. } => {
                    *self.stats.misses_per_layer.entry(layer).or_default() += 1;
                    self.prefetched.remove(&key);
                    misses.push((pool, slot, stored));
                    slot
                }
            };
            out[i] = (pool, slot);
        }
        self.stats.table_ms += table_started.elapsed().as_secs_f64() * 1e3;
        if !misses.is_empty() {
            let started = Instant::now();
            let result = self.load(pack, layer, &misses);
            self.stats.read_decode_ms += started.elapsed().as_secs_f64() * 1e3;
            if let Err(e) = result {
                for &(pool, _, stored) in &misses {
                    self.pools[pool].table.remove(ExpertKey {
                        layer,
                        expert: stored,
                    });
                }
                return Err(e);
            }
            self.stats.experts_loaded += misses.len() as u64;
        }
        Ok(out)
    }

    /// Loads every stored expert (all-resident mode, or a warm start up to capacity).
    pub fn warm_all(&mut self, pack: &Pack) -> Result<(), ExpertError> {
        let keys: Vec<(u32, u32)> = self.pool_of.keys().copied().collect();
        let mut by_layer: BTreeMap<u32, Vec<(usize, u32, u32)>> = BTreeMap::new();
        for (layer, expert) in keys {
            let pool = self.pool_of[&(layer, expert)];
            if let Some(Lookup::Miss { slot, .. }) = self.pools[pool]
                .table
                .insert_unrequested(ExpertKey { layer, expert })
            {
                by_layer
                    .entry(layer)
                    .or_default()
                    .push((pool, slot, expert));
            }
        }
        for (layer, misses) in by_layer {
            self.load(pack, layer, &misses)?;
            self.stats.experts_loaded += misses.len() as u64;
        }
        Ok(())
    }

    fn load_ctx(&self) -> LoadCtx {
        LoadCtx {
            verify: self.verify,
            hidden: self.hidden,
            inter: self.inter,
            upload: self.upload,
            pipeline: 0,
        }
    }

    /// Reads, checks, decodes and writes experts into their slots, in parallel, now.
    fn load(
        &mut self,
        pack: &Pack,
        layer: u32,
        misses: &[(usize, u32, u32)],
    ) -> Result<(), ExpertError> {
        let jobs = self.jobs(pack, layer, misses)?;
        run_jobs(&self.reader, self.load_ctx(), jobs)
    }

    /// One job per miss: its segments and its slot's nine destinations.
    fn jobs(
        &mut self,
        pack: &Pack,
        layer: u32,
        misses: &[(usize, u32, u32)],
    ) -> Result<Vec<Job>, ExpertError> {
        let mut bases = Vec::with_capacity(self.pools.len());
        for p in &mut self.pools {
            let sizes = Pool::slot_bytes(p.shape, p.hidden, p.inter);
            let mut arrays = [(0usize, 0usize); SLOT_ARRAYS];
            for (i, (a, size)) in p.arrays.iter_mut().zip(sizes).enumerate() {
                let Some(a) = a else { continue }; // no biases: nothing is written there
                                                   // SAFETY: only the address is taken here; writes happen in `run_jobs`, into
                                                   // slots the SlotTable just assigned to the missing experts, which no pending
                                                   // evaluation reads (see the module invariants).
                let bytes = unsafe { a.data_mut()? };
                arrays[i] = (bytes.as_mut_ptr() as usize, size);
            }
            bases.push(arrays);
        }
        let mut jobs = Vec::with_capacity(misses.len());
        for &(pool, slot, stored) in misses {
            let segments = pack.expert_segments(layer, stored);
            if segments.is_empty() {
                return Err(ExpertError::Missing {
                    layer,
                    expert: stored,
                });
            }
            let dst = bases[pool].map(|(base, size)| (base + slot as usize * size, size));
            jobs.push(Job {
                segments: segments.to_vec(),
                dst,
            });
        }
        Ok(jobs)
    }

    /// Starts loading `experts` of `layer` in the background (a prediction of what the router
    /// will pick). Non-resident ones get slots now, evicting only experts not in use; the load
    /// is joined by the next [`Self::prepare`], before any slot memory is touched again.
    pub fn prefetch(
        &mut self,
        pack: &Pack,
        layer: u32,
        router_experts: &[u32],
    ) -> Result<(), ExpertError> {
        self.prefetch_layers(pack, &[(layer, router_experts.to_vec())])
    }

    /// [`Self::prefetch`] of several layers' experts in one background load (a prompt's first
    /// layers, read while the device computes up to the first routing). The insertions are one
    /// batch: none evicts another.
    pub fn prefetch_layers(
        &mut self,
        pack: &Pack,
        wanted: &[(u32, Vec<u32>)],
    ) -> Result<(), ExpertError> {
        self.join_prefetch()?;
        let mut jobs = Vec::new();
        let mut keys: Vec<(usize, ExpertKey)> = Vec::new();
        for (layer, router_experts) in wanted {
            let layer = *layer;
            self.stats.prefetch_issued += router_experts.len() as u64;
            let mut misses = Vec::new();
            for &e in router_experts {
                let stored = stored_expert(&self.merge_map, layer, e);
                let Some(&pool) = self.pool_of.get(&(layer, stored)) else {
                    continue;
                };
                let key = ExpertKey {
                    layer,
                    expert: stored,
                };
                if let Some(Lookup::Miss { slot, .. }) =
                    self.on_table(pool, |t| t.insert_unrequested(key))
                {
                    misses.push((pool, slot, stored));
                }
            }
            jobs.extend(self.jobs(pack, layer, &misses)?);
            keys.extend(
                misses
                    .iter()
                    .map(|&(pool, _, expert)| (pool, ExpertKey { layer, expert })),
            );
        }
        if jobs.is_empty() {
            return Ok(());
        }
        let reader = self.reader.clone();
        let ctx = self.load_ctx();
        let handle = std::thread::Builder::new()
            .name("flashpack-prefetch".into())
            .spawn(move || run_jobs(&reader, ctx, jobs))
            .map_err(|e| ExpertError::Unsupported {
                reason: format!("cannot start a prefetch thread: {e}"),
            })?;
        self.pending = Some((keys, handle, Instant::now()));
        Ok(())
    }

    /// Waits for a background load, if one runs (its experts then count as loaded).
    pub fn settle(&mut self) {
        // A failed prefetch only drops its experts; nothing to report here.
        let _ = self.join_prefetch();
    }

    /// Waits for the background load, if any; drops experts whose load failed.
    fn join_prefetch(&mut self) -> Result<(), ExpertError> {
        let Some((keys, handle, started)) = self.pending.take() else {
            return Ok(());
        };
        let wait = Instant::now();
        let result = handle.join().unwrap_or_else(|_| {
            Err(ExpertError::Unsupported {
                reason: "the prefetch thread panicked".into(),
            })
        });
        self.stats.prefetch_wait_ms += wait.elapsed().as_secs_f64() * 1e3;
        self.stats.read_decode_ms += started.elapsed().as_secs_f64() * 1e3;
        match result {
            Ok(()) => {
                self.stats.experts_loaded += keys.len() as u64;
                self.stats.prefetch_loaded += keys.len() as u64;
                self.prefetched.extend(keys.iter().map(|(_, k)| *k));
                Ok(())
            }
            Err(e) => {
                // A prediction that failed to load is dropped; the demand path will report the
                // error if the expert is really needed.
                for (pool, key) in keys {
                    self.pools[pool].table.remove(key);
                }
                let _ = e;
                Ok(())
            }
        }
    }
}

/// Where one expert goes: its segments and the (address, length) of its slot in the nine arrays.
struct Job {
    segments: Vec<ExpertEntry>,
    dst: [(usize, usize); SLOT_ARRAYS],
}

/// How a load writes and checks: what every segment task of one batch shares.
#[derive(Clone, Copy)]
struct LoadCtx {
    verify: bool,
    hidden: usize,
    inter: usize,
    /// MLX on CUDA: whole-expert segments go from the decode buffers to the slot in one copy
    /// per array (`mlx::upload`), the slot's pages never visiting the host.
    upload: bool,
    /// Part size (bytes) of a pipelined load, for a batch small enough to leave I/O threads
    /// free (`load_segment_pipelined`); 0: read each segment in one request, then decode.
    pipeline: usize,
}

/// Reads in flight for one pipelined segment.
const PIPELINE_LANES: usize = 4;

fn run_jobs(reader: &SegmentReader, ctx: LoadCtx, jobs: Vec<Job>) -> Result<(), ExpertError> {
    // One task per segment, not per expert: a lone miss split into row segments is read and
    // decoded on as many cores as it has segments.
    let tasks: Vec<(&Job, &ExpertEntry)> = jobs
        .iter()
        .flat_map(|job| job.segments.iter().map(move |e| (job, e)))
        .collect();
    // MLX on CUDA, for experts stored in several row segments (written row by row on the
    // host): the slots are managed memory; bring their pages to the host in one move before
    // writing, and to the GPU in one move after (a no-op on other backends).
    let ranges: Vec<(usize, usize)> = jobs
        .iter()
        .filter(|j| !(ctx.upload && j.segments.len() == 1))
        .flat_map(|j| j.dst)
        .collect();
    // On the reader's I/O threads (queue depth), not the global pool (one per core): each
    // task reads and then decodes, so as many reads are in flight as the queue depth allows
    // even on two cores, and a segment is decoded as soon as its own read is done. The page
    // moves run there too: CUDA calls stay on those long-lived threads, each with its own
    // stream, made once.
    // A lone miss (or a few) leaves I/O threads idle: a raw one is read in parts, its checksum
    // fed as they arrive. A larger batch keeps the queue full with whole segments.
    let ctx = LoadCtx {
        pipeline: if tasks.len() * PIPELINE_LANES <= reader.threads() {
            reader.split()
        } else {
            0
        },
        ..ctx
    };
    reader.install(|| {
        let hinted = !ranges.is_empty() && mlx::unified_prefetch(&ranges, false);
        let done = tasks
            .into_par_iter()
            .try_for_each(|(job, e)| load_segment(reader, e, ctx, &job.dst));
        if hinted {
            mlx::unified_prefetch(&ranges, true);
        }
        done
    })?;
    Ok(())
}

impl Drop for ExpertCache {
    fn drop(&mut self) {
        let _ = self.join_prefetch();
    }
}

/// Reads one segment and scatters its decoded rows into the nine slot chunks.
fn load_segment(
    reader: &SegmentReader,
    e: &ExpertEntry,
    ctx: LoadCtx,
    dst: &[(usize, usize); SLOT_ARRAYS],
) -> Result<(), ExpertError> {
    // A scratch of its own for the duration: the parallel decode below lets this thread run
    // other rayon tasks (other segments) while it waits, and those take another one.
    let taken = SCRATCH.lock().unwrap_or_else(|p| p.into_inner()).pop();
    let mut scratch: Scratch = taken.unwrap_or_default();
    let result = load_segment_with(&mut scratch, reader, e, ctx, dst);
    SCRATCH
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(scratch);
    result
}

fn load_segment_with(
    scratch: &mut Scratch,
    reader: &SegmentReader,
    e: &ExpertEntry,
    ctx: LoadCtx,
    dst: &[(usize, usize); SLOT_ARRAYS],
) -> Result<(), ExpertError> {
    let LoadCtx {
        verify,
        inter,
        upload,
        pipeline,
        ..
    } = ctx;
    let whole = e.row_start == 0 && e.row_count as usize == inter;
    if pipeline > 0 {
        let codecs = (
            CodecId::try_from(e.weight_codec),
            CodecId::try_from(e.aux_codec),
        );
        match codecs {
            (Ok(CodecId::Raw), Ok(aux_codec)) => {
                return load_segment_pipelined(scratch, reader, e, ctx, dst, aux_codec);
            }
            (Ok(CodecId::Huffman), Ok(aux_codec)) if reader.huffman_part() > 0 => {
                return huffman::load(scratch, reader, e, ctx, dst, aux_codec);
            }
            _ => {}
        }
    }
    let (decoder, stored, weights, aux) = scratch;
    // CUDA: whole-expert segments are copied to the device from these buffers (the read
    // buffer too, for raw segments), so they are page-locked.
    let pin = upload && whole;
    sized(stored, e.stored_len as usize + 3 * 4096, pin);
    let t = Instant::now();
    let stored = reader.read_into(e, stored)?;
    step_done(0, t);
    let decode_err = |source| decode_error(reader, e, source);
    let codec = |id: u8| CodecId::try_from(id).map_err(decode_err);
    let (weight_codec, aux_codec) = (codec(e.weight_codec)?, codec(e.aux_codec)?);
    let (ws, auxs) = stored.split_at(e.weights_stored_len as usize);
    // The checksum and the decode run side by side: the decode writes only this thread's
    // buffers, and nothing reaches the slot before the checksum has matched. Raw parts are not
    // copied at all: the slot is written from the read buffer.
    let hash = || {
        if !verify {
            return true;
        }
        let t = Instant::now();
        let digest = if stored.len() >= 1 << 20 && cores() >= 4 {
            blake3::Hasher::new().update_rayon(stored).finalize()
        } else {
            blake3::hash(stored)
        };
        step_done(1, t);
        digest.as_bytes() == &e.blake3
    };
    let decode = || -> Result<(), ExpertError> {
        let t = Instant::now();
        if weight_codec != CodecId::Raw {
            sized(weights, e.weights_decoded_len as usize, pin);
            decoder
                .decode_into_parallel(weight_codec, ws, weights)
                .map_err(decode_err)?;
        }
        if aux_codec != CodecId::Raw {
            sized(aux, e.aux_decoded_len() as usize, pin);
            decoder
                .decode_into(aux_codec, auxs, aux)
                .map_err(decode_err)?;
        }
        step_done(2, t);
        Ok(())
    };
    let (matched, decoded) = rayon::join(hash, decode);
    if !matched {
        return Err(ExpertError::Checksum {
            path: reader.path().to_path_buf(),
            layer: e.layer,
            expert: e.expert,
            segment: e.segment,
        });
    }
    decoded?;
    let weights: &[u8] = if weight_codec == CodecId::Raw {
        ws
    } else {
        weights
    };
    let aux: &[u8] = if aux_codec == CodecId::Raw { auxs } else { aux };
    finish_segment(reader, e, ctx, weights, aux, dst, None)
}

/// A segment of `reader`'s pack that did not decode.
fn decode_error(
    reader: &SegmentReader,
    e: &ExpertEntry,
    source: crate::codec::CodecError,
) -> ExpertError {
    ExpertError::Decode {
        path: reader.path().to_path_buf(),
        layer: e.layer,
        expert: e.expert,
        segment: e.segment,
        source,
    }
}

/// Writes a checked, decoded segment into its slot: one device copy per array for a
/// whole-expert segment on CUDA, else a scatter of its rows.
/// `sent`: pieces the load already copied into the slot as their bytes arrived (CUDA, a
/// whole raw expert: see `load_segment_pipelined`); only the others are copied here.
fn finish_segment(
    reader: &SegmentReader,
    e: &ExpertEntry,
    ctx: LoadCtx,
    weights: &[u8],
    aux: &[u8],
    dst: &[(usize, usize); SLOT_ARRAYS],
    sent: Option<&dyn Fn(&Piece) -> bool>,
) -> Result<(), ExpertError> {
    let LoadCtx {
        hidden,
        inter,
        upload,
        ..
    } = ctx;
    let t = Instant::now();
    for (got, want) in [
        (weights.len(), e.weights_decoded_len as usize),
        (aux.len(), e.aux_decoded_len() as usize),
    ] {
        if got != want {
            let source = crate::codec::CodecError::LengthMismatch {
                expected: want,
                got,
            };
            return Err(decode_error(reader, e, source));
        }
    }
    let whole = e.row_start == 0 && e.row_count as usize == inter;
    if upload && whole {
        let mut ranges = whole_expert_ranges(e, hidden, inter, weights, aux, dst);
        if let Some(sent) = sent {
            let pieces = whole_expert_pieces(e, hidden, inter);
            let mut i = 0;
            ranges.retain(|_| {
                i += 1;
                !sent(&pieces[i - 1])
            });
            if ranges.is_empty() {
                step_done(3, t);
                return Ok(());
            }
        }
        // SAFETY: the sources are this thread's buffers, alive for the call; the destinations
        // are the slot's own parts (inside the pool arrays, one job per slot), which no pending
        // evaluation reads (module invariants).
        if !unsafe { mlx::upload(&ranges)? } {
            scatter(e, hidden, inter, weights, aux, dst);
        }
    } else {
        scatter(e, hidden, inter, weights, aux, dst);
    }
    step_done(3, t);
    Ok(())
}

/// [`load_segment_with`] for a lone miss of a raw-stored expert (`--codec auto` stores experts
/// raw, docs/decisions/0014-raw-experts.md): the segment is read in parts, in order, several in
/// flight ([`SegmentReader::read_parts`]), and the checksum advances as the parts arrive, so
/// the load ends about one part's hash after the read instead of a whole segment's. On CUDA a
/// whole expert's raw pieces are copied into the slot as they arrive (the slot is freed unused
/// if the checksum then fails); elsewhere nothing reaches the slot before the checksum matched.
/// (Huffman-coded experts take `huffman::load`: read in this order, their streams could only
/// be decoded one at a time, several times slower than in lock step, decision 0014.)
fn load_segment_pipelined(
    scratch: &mut Scratch,
    reader: &SegmentReader,
    e: &ExpertEntry,
    ctx: LoadCtx,
    dst: &[(usize, usize); SLOT_ARRAYS],
    aux_codec: CodecId,
) -> Result<(), ExpertError> {
    let whole = e.row_start == 0 && e.row_count as usize == ctx.inter;
    let pin = ctx.upload && whole;
    let (decoder, stored, _, aux) = scratch;
    sized(stored, e.stored_len as usize + 3 * 4096, pin);
    let (len, wlen) = (e.stored_len as usize, e.weights_stored_len as usize);
    if aux_codec != CodecId::Raw {
        sized(aux, e.aux_decoded_len() as usize, pin);
    }
    // CUDA, a whole expert: each piece stored raw goes to its slot array as its bytes arrive
    // (one copy per arrived run and array), so the upload ends with the read instead of one
    // whole expert's copy after it (0.53 ms of a 2.1 ms load on the H100 machine, decision
    // 0021). Until the checksum below matches, the slot holds unchecked bytes; no evaluation
    // reads it before this load returns, and a failed load's slot is freed first
    // (`prepare_stored_ids`, `join_prefetch`), so a damaged segment is still never used.
    let raw_aux = aux_codec == CodecId::Raw;
    let early: Vec<(Piece, usize)> = if ctx.upload && whole && upload_parts() {
        whole_expert_pieces(e, ctx.hidden, ctx.inter)
            .into_iter()
            .filter(|p| !p.aux || raw_aux)
            .map(|p| (p, if p.aux { wlen + p.at } else { p.at }))
            .collect()
    } else {
        Vec::new()
    };
    // Ok(false): the copies are not available (the slot is then written after the checksum).
    let sent = std::sync::Mutex::new(Ok::<bool, ExpertError>(!early.is_empty()));
    let send = |from: usize, to: usize, bytes: &[u8]| {
        let copies: Vec<(usize, usize, usize)> = early
            .iter()
            .filter_map(|&(p, at)| {
                let (lo, hi) = (from.max(at), to.min(at + p.len));
                (lo < hi).then(|| {
                    (
                        dst[p.arr].0 + (lo - at),
                        bytes.as_ptr() as usize + lo,
                        hi - lo,
                    )
                })
            })
            .collect();
        let mut state = sent.lock().unwrap_or_else(|p| p.into_inner());
        if copies.is_empty() || !matches!(*state, Ok(true)) {
            return;
        }
        drop(state);
        let t = Instant::now();
        // SAFETY: `bytes[from..to]` has arrived and is never written again; the destinations
        // lie inside this job's slot (one job per slot), which no pending evaluation reads.
        let r = unsafe { mlx::upload(&copies) };
        step_done(3, t);
        state = sent.lock().unwrap_or_else(|p| p.into_inner());
        match r {
            Ok(true) => {}
            Ok(false) => *state = Ok(false),
            Err(err) => *state = Err(err.into()),
        }
    };
    // The checksum is fed in byte order: a range that arrives before the one in front of it
    // waits in `pending`, and whoever completes the run hashes it.
    let hash = std::sync::Mutex::new((blake3::Hasher::new(), 0usize, Vec::<(usize, usize)>::new()));
    let arrived = |from: usize, to: usize, bytes: &[u8]| {
        if !early.is_empty() {
            send(from, to, bytes);
        }
        if !ctx.verify {
            return;
        }
        let t = Instant::now();
        let mut h = hash.lock().unwrap_or_else(|p| p.into_inner());
        let (hasher, done, pending) = &mut *h;
        pending.push((from, to));
        while let Some(i) = pending.iter().position(|&(a, _)| a == *done) {
            let (a, b) = pending.swap_remove(i);
            // SAFETY: every range reported so far has arrived and is never written again;
            // `bytes` starts at the segment's first byte in every call, and `a..b` lies inside
            // the segment.
            let run = unsafe { std::slice::from_raw_parts(bytes.as_ptr().add(a), b - a) };
            hasher.update(run);
            *done = b;
        }
        step_done(1, t);
    };
    let t = Instant::now();
    let range = reader.read_parts(e, stored, ctx.pipeline, PIPELINE_LANES, &arrived)?;
    step_done(0, t);
    if ctx.verify {
        let (hasher, done, _) = &*hash.lock().unwrap_or_else(|p| p.into_inner());
        if *done != len || hasher.finalize().as_bytes() != &e.blake3 {
            return Err(ExpertError::Checksum {
                path: reader.path().to_path_buf(),
                layer: e.layer,
                expert: e.expert,
                segment: e.segment,
            });
        }
    }
    let stored = &stored[range];
    let (ws, auxs) = stored.split_at(wlen);
    let aux: &[u8] = if aux_codec == CodecId::Raw {
        auxs
    } else {
        let t = Instant::now();
        decoder
            .decode_into(aux_codec, auxs, aux)
            .map_err(|source| decode_error(reader, e, source))?;
        step_done(2, t);
        aux
    };
    let sent = sent.into_inner().unwrap_or_else(|p| p.into_inner())?;
    let in_slot = |p: &Piece| sent && (!p.aux || raw_aux);
    finish_segment(reader, e, ctx, ws, aux, dst, Some(&in_slot))
}

/// Whether whole raw experts are copied to the GPU part by part as they arrive
/// (`FLASHPACK_UPLOAD_PARTS=0`: after the whole read, for A/B runs).
fn upload_parts() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("FLASHPACK_UPLOAD_PARTS").map_or(true, |v| v != "0"))
}

use crate::env::cores;

/// Resizes a decode buffer to `len`. With `pin` (CUDA uploads), the buffer is page-locked once
/// so uploads from it run at the bus's speed; growing it past its pinned capacity moves to a
/// new pinned buffer and leaks the old one (a thread's buffers only grow to the largest
/// expert, so this happens a few times per thread, ever).
fn sized(buf: &mut Vec<u8>, len: usize, pin: bool) {
    if pin && len > buf.capacity() {
        let cap = len.next_power_of_two().max(1 << 20);
        let mut fresh: Vec<u8> = Vec::with_capacity(cap);
        // SAFETY: `fresh` owns `cap` bytes; it is never freed while pinned (the buffer is leaked
        // rather than dropped when it is replaced, below).
        unsafe { mlx::pin_host(fresh.as_mut_ptr(), cap) };
        let old = std::mem::replace(buf, fresh);
        if old.capacity() > 0 {
            // A buffer that may be page-locked must not go back to the allocator.
            std::mem::forget(old);
        }
    }
    buf.resize(len, 0);
}

/// One array's bytes of a whole-expert segment: slot array `arr`, found at `at..at + len` of the
/// segment's decoded weights (`aux: false`) or decoded scales, biases and expert biases
/// (`aux: true`).
#[derive(Clone, Copy, Debug)]
struct Piece {
    arr: usize,
    aux: bool,
    at: usize,
    len: usize,
}

/// A whole-expert segment (one segment holds every row): its decoded parts are laid out as
/// the slot's arrays are, so each array is one contiguous piece of them.
fn whole_expert_pieces(e: &ExpertEntry, hidden: usize, inter: usize) -> Vec<Piece> {
    let bits = |p: usize| e.bits.get(p) as usize;
    let g = e.group_size as usize;
    let ss = e.scale_dtype.size() as usize;
    let gate_w = inter * hidden * bits(0) / 8;
    let up_w = inter * hidden * bits(1) / 8;
    let down_w = hidden * inter * bits(2) / 8;
    let up_gate_s = inter * (hidden / g) * ss;
    let down_s = hidden * (inter / g) * ss;
    let mut out = Vec::with_capacity(SLOT_ARRAYS);
    let w = |arr, at, len| Piece {
        arr,
        aux: false,
        at,
        len,
    };
    out.extend([
        w(0, 0, gate_w),
        w(3, gate_w, up_w),
        w(6, gate_w + up_w, down_w),
    ]);
    let up_gate_aux: &[usize] = if e.mode.has_biases() {
        &[1, 2, 4, 5]
    } else {
        &[1, 4]
    };
    let down_aux: &[usize] = if e.mode.has_biases() { &[7, 8] } else { &[7] };
    let mut at = 0;
    let mut aux = |arr: usize, len: usize| {
        out.push(Piece {
            arr,
            aux: true,
            at,
            len,
        });
        at += len;
    };
    for &arr in up_gate_aux {
        aux(arr, up_gate_s);
    }
    for &arr in down_aux {
        aux(arr, down_s);
    }
    if let Some(t) = e.bias_dtype {
        let bs = t.size() as usize;
        for (arr, n) in [(9, inter), (10, inter), (11, hidden)] {
            aux(arr, n * bs);
        }
    }
    out
}

/// [`whole_expert_pieces`] as (dst, src, len) copies from the decoded `weights` and `aux`.
fn whole_expert_ranges(
    e: &ExpertEntry,
    hidden: usize,
    inter: usize,
    weights: &[u8],
    aux: &[u8],
    dst: &[(usize, usize); SLOT_ARRAYS],
) -> Vec<(usize, usize, usize)> {
    whole_expert_pieces(e, hidden, inter)
        .into_iter()
        .map(|p| {
            let (base, size) = dst[p.arr];
            let src = if p.aux { aux } else { weights };
            assert!(
                p.len == size && p.at + p.len <= src.len(),
                "a whole segment fills its slot"
            );
            (base, src.as_ptr() as usize + p.at, p.len)
        })
        .collect()
}

/// Copies a decoded segment (formats/flashpack-v1.md §6.2) into the slot's nine arrays, given
/// as (address, length) of the slot's part of each.
fn scatter(
    e: &ExpertEntry,
    hidden: usize,
    inter: usize,
    weights: &[u8],
    aux: &[u8],
    dst: &[(usize, usize); SLOT_ARRAYS],
) {
    // Writes `src` at byte `at` of destination array `arr`.
    let put = |arr: usize, at: usize, src: &[u8]| {
        let (base, len) = dst[arr];
        assert!(at + src.len() <= len, "segment rows lie inside the slot");
        // SAFETY: the range is inside the slot (checked above). Each slot belongs to one job
        // (SlotTable gives a slot to one key at a time) and each segment of a job covers its own
        // rows (gate/up) and columns (down), so no two threads write the same bytes, and no
        // pending evaluation reads this slot (module invariants). The pool arrays outlive the
        // load: the store joins background loads before it drops or touches the pools again.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), (base as *mut u8).add(at), src.len())
        };
    };
    let (r0, r) = (e.row_start as usize, e.row_count as usize);
    let bits = |p: usize| e.bits.get(p) as usize;
    let g = e.group_size as usize;
    let ss = e.scale_dtype.size() as usize;
    // gate and up: rows r0..r0+r of [inter, hidden*bits/32] words -> contiguous.
    let (gate_w, up_w) = (hidden * bits(0) / 8, hidden * bits(1) / 8);
    let row_s = hidden / g * ss;
    let (gw, rest) = weights.split_at(r * gate_w);
    let (uw, dw) = rest.split_at(r * up_w);
    put(0, r0 * gate_w, gw);
    put(3, r0 * up_w, uw);
    // AUX: scales then biases of each projection; mxfp4/mxfp8 have scales only.
    let has_biases = e.mode.has_biases();
    let (up_gate_aux, down_aux): (&[usize], &[usize]) = if has_biases {
        (&[1, 2, 4, 5], &[7, 8])
    } else {
        (&[1, 4], &[7])
    };
    let mut at = 0;
    for &arr in up_gate_aux {
        put(arr, r0 * row_s, &aux[at..at + r * row_s]);
        at += r * row_s;
    }
    // down: columns r0..r0+r of each of `hidden` rows.
    let full_w = inter * bits(2) / 8;
    let seg_w = r * bits(2) / 8;
    let col_w = r0 * bits(2) / 8;
    for h in 0..hidden {
        put(6, h * full_w + col_w, &dw[h * seg_w..(h + 1) * seg_w]);
    }
    let full_s = inter / g * ss;
    let seg_s = r / g * ss;
    let col_s = r0 / g * ss;
    for &arr in down_aux {
        for h in 0..hidden {
            put(
                arr,
                h * full_s + col_s,
                &aux[at + h * seg_s..at + (h + 1) * seg_s],
            );
        }
        at += hidden * seg_s;
    }
    // Expert biases (§6.4): gate and up of these rows, then (segment 0) down's.
    if let Some(t) = e.bias_dtype {
        let bs = t.size() as usize;
        for arr in [9, 10] {
            put(arr, r0 * bs, &aux[at..at + r * bs]);
            at += r * bs;
        }
        if e.segment == 0 {
            put(11, 0, &aux[at..at + hidden * bs]);
        }
    }
}

/// Slots one pool may have so that each of its arrays holds at most `max_elements` weights
/// (every projection of an expert has `hidden * inter` of them); at least one.
fn pool_capacity(max_elements: u64, hidden: usize, inter: usize) -> usize {
    (max_elements / (hidden as u64 * inter as u64).max(1)).max(1) as usize
}

/// Splits `keys` (sorted (layer, expert) pairs) into pools of at most `cap` experts: whole
/// layers where a layer fits, so that a layer's experts share one pool (one `gather_qmm` per
/// projection), dealt round-robin so each pool spans the model's depth; a layer larger than
/// `cap` alone is cut into the fewest pieces of equal size.
fn split_by_layer(keys: &[(u32, u32)], cap: usize) -> Vec<Vec<(u32, u32)>> {
    let cap = cap.max(1);
    let mut out: Vec<Vec<(u32, u32)>> = Vec::new();
    type Layer<'a> = &'a [(u32, u32)];
    let layers: Vec<Layer> = keys.chunk_by(|a, b| a.0 == b.0).collect();
    let (big, small): (Vec<Layer>, Vec<Layer>) = layers.into_iter().partition(|l| l.len() > cap);
    for layer in big {
        let size = layer.len().div_ceil(layer.len().div_ceil(cap));
        out.extend(layer.chunks(size).map(<[_]>::to_vec));
    }
    // Whole layers, dealt round-robin over the fewest pools that hold them: each pool then spans
    // the model's whole depth, so the layers that share a pool's slots are far apart.
    let total: usize = small.iter().map(|l| l.len()).sum();
    let mut n = total.div_ceil(cap).max(1);
    'deal: loop {
        let mut pools: Vec<Vec<(u32, u32)>> = vec![Vec::new(); n];
        for (i, layer) in small.iter().enumerate() {
            let Some(p) = (0..n)
                .map(|j| (i + j) % n)
                .find(|&p| pools[p].len() + layer.len() <= cap)
            else {
                n += 1;
                continue 'deal;
            };
            pools[p].extend_from_slice(layer);
        }
        out.extend(pools.into_iter().filter(|p| !p.is_empty()));
        break;
    }
    out
}

/// Routing-mass shares per (layer, expert) from the pack's profile, when it has one.
fn profile_prior(meta: &crate::format::Metadata) -> std::collections::HashMap<ExpertKey, f64> {
    let mut prior = std::collections::HashMap::new();
    for (layer, mass) in meta.profile_mass().into_iter().enumerate() {
        let Some(mass) = mass else { continue };
        let total: f64 = mass.iter().sum();
        for (expert, m) in mass.into_iter().enumerate() {
            prior.insert(
                ExpertKey {
                    layer: layer as u32,
                    expert: expert as u32,
                },
                m / total.max(f64::MIN_POSITIVE),
            );
        }
    }
    prior
}

#[cfg(test)]
mod pool_split_tests {
    use super::*;

    fn keys(layers: u32, experts: u32) -> Vec<(u32, u32)> {
        (0..layers)
            .flat_map(|l| (0..experts).map(move |e| (l, e)))
            .collect()
    }

    #[test]
    fn whole_layers_share_a_pool_up_to_the_cap() {
        // Qwen3-30B-A3B: 48 layers of 128 experts of 768 x 2048 weights.
        let cap = pool_capacity(MAX_POOL_ELEMENTS, 2048, 768);
        assert_eq!(cap, 1365);
        let pools = split_by_layer(&keys(48, 128), cap);
        assert!(pools.iter().all(|p| p.len() <= cap));
        assert_eq!(pools.len(), 5);
        assert!(pools.iter().all(|p| p.len() % 128 == 0), "no layer is cut");
        // Layers are dealt round-robin: pool p holds layers p, p + 5, p + 10, ...
        for (p, pool) in pools.iter().enumerate() {
            assert!(
                pool.iter().all(|&(layer, _)| layer as usize % 5 == p),
                "pool {p}"
            );
        }
        let mut all = pools.concat();
        all.sort_unstable();
        assert_eq!(all, keys(48, 128), "every expert once");
    }

    #[test]
    fn a_layer_larger_than_the_cap_is_cut_evenly() {
        // DeepSeek-V3: 256 experts of 7168 x 2048 weights.
        let cap = pool_capacity(MAX_POOL_ELEMENTS, 7168, 2048);
        assert_eq!(cap, 146);
        let pools = split_by_layer(&keys(3, 256), cap);
        let sizes: Vec<usize> = pools.iter().map(Vec::len).collect();
        assert_eq!(sizes, [128; 6]);
        assert_eq!(pools.concat(), keys(3, 256));
        // One pool when everything fits (every test model).
        assert_eq!(
            split_by_layer(&keys(6, 32), MAX_POOL_ELEMENTS as usize).len(),
            1
        );
        assert_eq!(
            split_by_layer(&keys(2, 5), 0).len(),
            10,
            "a cap of 0 acts as 1"
        );
    }
}
