//! The miss path against the disk: `flashpack bench io PACK`.
//!
//! In: a pack. Out: for the same randomly chosen experts, (1) plain positional reads of their
//! stored bytes (`O_DIRECT` on Linux, one request per segment, nothing else), one at a time and
//! 16 at a time, and (2) the runtime's load of each (`ExpertCache::prepare` into a tiny cache:
//! table lookup, read, checksum, decode, write into the slot; on CUDA the slot is usable on the
//! GPU when it returns), alone and a layer's worth at a time. The ratio of (2) to (1) is what a
//! miss costs beyond the disk (issue 25, target 1). Timings only; nothing is asserted here.

use std::fs::File;
use std::path::Path;
use std::time::Instant;

use rayon::prelude::*;

use super::experts::{ExpertCache, ExpertError, StoreOptions};
use super::read::{evict_from_page_cache, open_direct, read_direct, IoMode};
use super::sample::SplitMix64;
use crate::format::{ExpertEntry, Pack};

/// What to measure.
#[derive(Clone, Debug)]
pub struct IoBenchOptions {
    /// Distinct experts read in each phase.
    pub experts: usize,
    /// Experts loaded together in the batched phases (a layer's misses).
    pub batch: usize,
    pub seed: u64,
    /// Part sizes (KiB) of pipelined loads to try in the runtime phases; 0: one request, then decode.
    pub splits_kib: Vec<usize>,
    /// For packs with Huffman-coded experts: part sizes (KiB) of lone misses read in decoder
    /// order and decoded as they arrive, tried with each nonzero split; 0: read whole, then
    /// decoded.
    pub huffman_parts_kib: Vec<usize>,
    /// Check checksums in the runtime phases, as `run` does by default.
    pub verify: bool,
}

impl Default for IoBenchOptions {
    fn default() -> Self {
        IoBenchOptions {
            experts: 64,
            batch: 8,
            seed: 1,
            splits_kib: vec![0, 256],
            huffman_parts_kib: vec![0, super::read::TRIED_HUFFMAN_PART_KIB],
            verify: true,
        }
    }
}

/// One measured way of getting experts off the disk.
#[derive(Clone, Debug, serde::Serialize)]
pub struct IoRow {
    pub what: String,
    /// Experts at a time (queue depth of the plain reads, batch size of the loads).
    pub at_once: usize,
    pub experts: usize,
    /// Median wall time of one request (one expert, or one batch).
    pub median_ms: f64,
    /// Wall time of the whole phase divided by the experts in it.
    pub ms_per_expert: f64,
    /// Stored bytes over the phase's wall time.
    pub gb_per_s: f64,
    /// Runtime phases: ms per expert of each load step, summed over threads (read, checksum,
    /// decode, copy into the slot).
    pub steps_ms: Option<[f64; 4]>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct IoReport {
    pub stored_bytes_per_expert: f64,
    pub rows: Vec<IoRow>,
    /// Runtime load per expert over the plain read per expert, one at a time (against queue
    /// depth 1) and `batch` at a time (against queue depth `batch`), for each way of loading
    /// (read part and Huffman part sizes): (way, ratio alone, ratio batched).
    pub ratios: Vec<(String, f64, f64)>,
}

/// For each phase, up to `n` distinct (layer, stored expert) keys, in runs of `batch` from one
/// layer (a layer's misses), each phase shuffled anew. Phases may share experts: each runtime
/// phase starts with an empty cache, and every read bypasses (or first drops) the page cache.
fn pick(pack: &Pack, n: usize, batch: usize, phases: usize, seed: u64) -> Vec<Vec<(u32, u32)>> {
    let mut by_layer: std::collections::BTreeMap<u32, Vec<u32>> = Default::default();
    for e in pack.experts().iter().filter(|e| e.segment == 0) {
        by_layer.entry(e.layer).or_default().push(e.expert);
    }
    let total: usize = by_layer.values().map(Vec::len).sum();
    let n = n.min(total);
    let layers: Vec<u32> = by_layer.keys().copied().collect();
    let mut rng = SplitMix64(seed);
    let mut out = Vec::with_capacity(phases);
    for _ in 0..phases {
        let mut pools = by_layer.clone();
        for experts in pools.values_mut() {
            // Fisher-Yates with the seeded generator.
            for i in (1..experts.len()).rev() {
                let j = (rng.next_u64() % (i as u64 + 1)) as usize;
                experts.swap(i, j);
            }
        }
        let mut keys = Vec::with_capacity(n);
        while keys.len() < n {
            let layer = layers[(rng.next_u64() % layers.len() as u64) as usize];
            let pool = pools.get_mut(&layer).expect("listed");
            let take = batch.min(n - keys.len()).min(pool.len());
            keys.extend(pool.drain(..take).map(|e| (layer, e)));
        }
        out.push(keys);
    }
    out
}

fn median(mut xs: Vec<f64>) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Plain reads of whole segments, `depth` at a time; per-request times in ms and the wall time.
fn plain_reads(
    path: &Path,
    segments: &[Vec<ExpertEntry>],
    depth: usize,
) -> std::io::Result<(Vec<f64>, f64)> {
    let file = open_plain(path)?;
    let read_one = |segs: &Vec<ExpertEntry>| -> std::io::Result<f64> {
        let t = Instant::now();
        let mut buf = Vec::new();
        for e in segs {
            read_direct(&file, e.offset, e.stored_len as usize, &mut buf)?;
        }
        Ok(t.elapsed().as_secs_f64() * 1e3)
    };
    let started = Instant::now();
    let times: Vec<f64> = if depth <= 1 {
        segments.iter().map(read_one).collect::<Result<_, _>>()?
    } else {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(depth)
            .build()
            .map_err(std::io::Error::other)?;
        pool.install(|| segments.par_iter().map(read_one).collect::<Result<_, _>>())?
    };
    Ok((times, started.elapsed().as_secs_f64() * 1e3))
}

/// The pack opened for plain reads: `O_DIRECT` where the system has it, else buffered.
fn open_plain(path: &Path) -> std::io::Result<File> {
    open_direct(path).map_or_else(|| File::open(path), Ok)
}

/// The ways of loading to time: each read part size, and for a pack with Huffman-coded experts
/// each Huffman part size with every nonzero read part (Huffman-coded lone misses are pipelined
/// only when loads are: `Some(h)`; `None`: not a Huffman pack, or no pipelining).
fn ways(pack: &Pack, opts: &IoBenchOptions) -> Vec<(usize, Option<usize>)> {
    let splits = if opts.splits_kib.is_empty() {
        vec![super::read::DEFAULT_SPLIT_KIB]
    } else {
        opts.splits_kib.clone()
    };
    let huffman = pack
        .experts()
        .iter()
        .any(|e| e.weight_codec == crate::codec::CodecId::Huffman as u8);
    let mut out = Vec::new();
    for split in splits {
        if split == 0 || !huffman || opts.huffman_parts_kib.is_empty() {
            out.push((split, None));
        } else {
            out.extend(opts.huffman_parts_kib.iter().map(|&h| (split, Some(h))));
        }
    }
    out
}

/// Runs every phase on `pack` (opened from `path`).
pub fn bench_io(pack: &Pack, path: &Path, opts: &IoBenchOptions) -> Result<IoReport, ExpertError> {
    let n = opts.experts.max(1);
    let batch = opts.batch.max(1);
    let ways = ways(pack, opts);
    let phases = 3 + 2 * ways.len();
    let keys = pick(pack, n, batch, phases, opts.seed);
    let io = |e: std::io::Error| {
        ExpertError::Read(super::read::ReadError::Io {
            path: path.to_path_buf(),
            offset: 0,
            len: 0,
            source: e,
        })
    };
    let segs = |ks: &[(u32, u32)]| -> Vec<Vec<ExpertEntry>> {
        ks.iter()
            .map(|&(l, e)| pack.expert_segments(l, e).to_vec())
            .collect()
    };
    let stored: u64 = keys[0]
        .iter()
        .flat_map(|&(l, e)| pack.expert_segments(l, e))
        .map(|e| e.stored_len)
        .sum();
    let per_expert = stored as f64 / keys[0].len().max(1) as f64;
    let mut rows = Vec::new();
    let row =
        |what: String, at_once: usize, times: Vec<f64>, wall: f64, count: usize, bytes: f64| {
            IoRow {
                what,
                at_once,
                experts: count,
                median_ms: median(times),
                ms_per_expert: wall / count.max(1) as f64,
                gb_per_s: bytes / (wall / 1e3).max(1e-12) / 1e9,
                steps_ms: None,
            }
        };
    let bytes_of = |ks: &[(u32, u32)]| -> f64 {
        ks.iter()
            .flat_map(|&(l, e)| pack.expert_segments(l, e))
            .map(|e| e.stored_len as f64)
            .sum()
    };
    // Plain reads.
    for (phase, depth) in [(0usize, 1usize), (1, batch)] {
        let _ = evict_from_page_cache(path);
        let (times, wall) = plain_reads(path, &segs(&keys[phase]), depth).map_err(io)?;
        rows.push(row(
            format!("plain pread, queue depth {depth}"),
            depth,
            times,
            wall,
            keys[phase].len(),
            bytes_of(&keys[phase]),
        ));
    }
    // And queue depth 16, the disk's best for random reads (../shared/gpu/iotest.py).
    {
        let _ = evict_from_page_cache(path);
        let (times, wall) = plain_reads(path, &segs(&keys[2]), 16).map_err(io)?;
        rows.push(row(
            "plain pread, queue depth 16".into(),
            16,
            times,
            wall,
            keys[2].len(),
            bytes_of(&keys[2]),
        ));
    }
    let plain1 = rows[0].ms_per_expert;
    let plain_batch = rows[1].ms_per_expert;
    let mut ratios = Vec::new();
    for (i, &(split, huffman)) in ways.iter().enumerate() {
        let way = match huffman {
            Some(0) => format!("read part {split} KiB, Huffman read whole"),
            Some(h) => format!("read part {split} KiB, Huffman parts {h} KiB"),
            None => format!("read part {split} KiB"),
        };
        let mut loads = [0.0f64; 2];
        for (j, at_once) in [1usize, batch].into_iter().enumerate() {
            let ks = &keys[3 + 2 * i + j];
            // Room for one batch in every pool; every key of the phase is a miss.
            let slot = ExpertCache::all_resident_bytes(pack) as f64
                / pack
                    .experts()
                    .iter()
                    .filter(|e| e.segment == 0)
                    .count()
                    .max(1) as f64;
            let store = StoreOptions {
                budget_bytes: Some((slot * (batch as f64 + 1.0) * 4.0) as u64),
                io: IoMode::Pread,
                verify: opts.verify,
                ..StoreOptions::default()
            };
            let mut cache = ExpertCache::new(pack, &store)?;
            cache.set_read_split(split * 1024);
            cache.set_huffman_part(huffman.unwrap_or(0) * 1024);
            let _ = evict_from_page_cache(path);
            let before = cache.stats().thread_ms;
            let started = Instant::now();
            let mut times = Vec::new();
            for group in ks.chunks(at_once) {
                let layer = group[0].0;
                let experts: Vec<u32> = group.iter().map(|&(_, e)| e).collect();
                let t = Instant::now();
                cache.prepare_stored(pack, layer, &experts)?;
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
            let wall = started.elapsed().as_secs_f64() * 1e3;
            let r = row(
                format!("runtime load, {way}"),
                at_once,
                times,
                wall,
                ks.len(),
                bytes_of(ks),
            );
            let after = cache.stats().thread_ms;
            let k = ks.len().max(1) as f64;
            let r = IoRow {
                steps_ms: Some([
                    (after.read - before.read) / k,
                    (after.verify - before.verify) / k,
                    (after.decode - before.decode) / k,
                    (after.scatter - before.scatter) / k,
                ]),
                ..r
            };
            loads[j] = r.ms_per_expert;
            rows.push(r);
        }
        ratios.push((way, loads[0] / plain1, loads[1] / plain_batch));
    }
    Ok(IoReport {
        stored_bytes_per_expert: per_expert,
        rows,
        ratios,
    })
}

/// The report as a Markdown table.
pub fn format_report(r: &IoReport) -> String {
    let mut s = format!(
        "stored bytes per expert: {:.2} MB\n\n| what | at once | experts | median ms per request | ms per expert | GB/s | thread ms per expert: read / checksum / decode / copy |\n|---|---|---|---|---|---|---|\n",
        r.stored_bytes_per_expert / 1e6
    );
    for row in &r.rows {
        s.push_str(&format!(
            "| {} | {} | {} | {:.3} | {:.3} | {:.2} | {} |\n",
            row.what,
            row.at_once,
            row.experts,
            row.median_ms,
            row.ms_per_expert,
            row.gb_per_s,
            row.steps_ms.map_or(String::new(), |s| format!(
                "{:.3} / {:.3} / {:.3} / {:.3}",
                s[0], s[1], s[2], s[3]
            ))
        ));
    }
    s.push_str("\n| load | runtime / plain, one at a time (QD1) | runtime batched / plain at the batch's queue depth |\n|---|---|---|\n");
    for (way, a, b) in &r.ratios {
        s.push_str(&format!("| {way} | {a:.2}x | {b:.2}x |\n"));
    }
    s
}
