//! The convert pipeline: Hugging Face checkpoint -> `.flashpack`.
//!
//! Stages, in order, one file each: `load` (map and index the source, hash it) -> profile ->
//! merge -> `quantize` (MLX affine, bit-exact with `mx.quantize`) -> `encode` (a codec per
//! part) -> layout (`format::layout::Planner`, driven by the writer) -> `write` (metadata,
//! `format::PackWriter`). `profile` runs calibration text through the source when an option
//! needs it (usage-based cold experts, merging, `--profile`); `merge` plans merged experts.
//! `tensor` holds the element types and views the stages share; `fixtures` makes seeded tiny
//! checkpoints for tests and benchmarks. This file runs the stages; beside it, `options.rs`
//! (what to produce, checked before any work), `check.rs` (refusals: destination, tokenizer,
//! non-finite values), `metadata.rs` (the `quantization` record), `report.rs` (the report and
//! stage times), `error.rs`.
//!
//! Memory stays near (threads x one expert) plus the dense tensors: experts are quantized and
//! encoded in windows of a few per thread, straight from the mapped shards, and each window is
//! written while the next one is computed. Output is identical whatever the thread count:
//! windows are processed in parallel, then written in (layer, expert, segment) order.

pub mod encode;
pub mod load;
pub mod merge;
pub mod profile;
pub mod quantize;
pub mod size;
pub mod source;
pub mod write;

/// Seeded tiny checkpoints: test scaffolding, kept out of the library build (the integration
/// tests and `examples/make_fixture.rs` include the same file).
#[cfg(test)]
#[path = "../../tests/common/fixtures.rs"]
pub mod fixtures;
#[cfg(test)]
#[path = "../../tests/common/python.rs"]
pub(crate) mod python;
pub mod tensor;

mod check;
mod error;
mod metadata;
mod options;
mod report;

pub use check::check_destination;
pub use error::ConvertError;
pub use options::ConvertOptions;
pub use report::{ConvertReport, StageTime};

use crate::format::{Pack, PackWriter, ProjBits, QuantMode};
use crate::inspect::PackReport;
use crate::progress::Progress;
use check::{
    check_dense_against_model, check_finite_dense, check_finite_expert, check_tokenizer,
    note_dropped_mtp,
};
use encode::{EncodedSegment, Encoder};
use load::{Checkpoint, Resolver, SourceSpec};
use metadata::StoredQuantization;
use quantize::{build_segments, plan_dense, ExpertQuant, QuantParams, SegmentPlan};
use rayon::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Resolves `source` and converts it to `output`.
pub fn convert(
    source: &SourceSpec,
    resolver: &dyn Resolver,
    output: &std::path::Path,
    opts: &ConvertOptions,
    progress: &dyn Progress,
) -> Result<ConvertReport, ConvertError> {
    opts.check()?;
    // Before any download: the destination's own problems (the source's files are known later).
    check_destination(output, &[])?;
    let t0 = Instant::now();
    progress.stage("load", None, "");
    let ck = Checkpoint::open_spec(source, resolver)?;
    progress.finish_stage();
    convert_checkpoint(&ck, output, opts, progress, t0)
}

/// Converts an opened checkpoint; `t0` is when the conversion started (for the report).
pub fn convert_checkpoint(
    ck: &Checkpoint,
    output: &std::path::Path,
    opts: &ConvertOptions,
    progress: &dyn Progress,
    t0: Instant,
) -> Result<ConvertReport, ConvertError> {
    opts.check()?;
    check_destination(output, &ck.input_files())?;
    check_tokenizer(ck, progress)?;
    note_dropped_mtp(ck, progress);
    let mut stages = vec![StageTime::ended("load", t0)];
    // profile: how the routers use the experts, when an option needs it.
    let profile = if profile::needed(opts) {
        progress.stage("profile", None, "");
        let lap = Instant::now();
        let p = profile::stage(ck, opts)?;
        progress.finish_stage();
        stages.push(StageTime::ended("profile", lap));
        p
    } else {
        None
    };
    // merge: near-duplicate experts of a layer share one stored expert.
    let lap = Instant::now();
    let merges = merge::stage(ck, opts, profile.as_ref())?;
    if merges.is_some() {
        stages.push(StageTime::ended("merge", lap));
    }

    let c = &ck.config;
    let writer = PackWriter::create(
        output,
        opts.page_size,
        // The experts' width: the model's, or its latent MoE's (Kimi-K3).
        c.expert_hidden_size() as u32,
        c.moe_intermediate_size as u32,
    )?;
    // load (cont.): the source's fingerprint for the provenance record is computed on a thread
    // of its own beside quantization, so its reads overlap that work (on a cold page cache the
    // hashing is disk-bound while quantization is CPU-bound).
    let cancel = AtomicBool::new(false);
    let (payload, hashed) = std::thread::scope(|scope| {
        let hashing = scope.spawn(|| {
            let t = Instant::now();
            ck.provenance_in_order(&cancel)
                .map(|p| (p, t.elapsed().as_secs_f64()))
        });
        let payload = write_payload(
            ck,
            writer,
            opts,
            (profile.as_ref(), merges.as_ref()),
            progress,
            &mut stages,
        );
        if payload.is_err() {
            cancel.store(true, Ordering::Relaxed);
        }
        (payload, hashing.join())
    });
    let (writer, bit_plan, stored_quant) = payload?;
    let (provenance, hash_seconds) = hashed.map_err(|_| ConvertError::Internal {
        what: "the hashing thread panicked".into(),
    })??;
    stages.push(StageTime {
        stage: "hash (beside dense and experts)",
        seconds: hash_seconds,
        peak_rss_bytes: None,
    });
    let lap = Instant::now();

    progress.stage("finish", None, "");
    let mut meta = write::metadata(ck, &provenance, opts)?;
    stored_quant.record(&mut meta["quantization"]);
    if let Some(b) = &bit_plan {
        meta["quantization"]["expert_plan"] = profile::plan_json(b);
        meta["quantization"]["cold_bits"] = opts.cold_bits.unwrap_or(2).into();
    }
    if let Some(p) = &profile {
        meta["profile"] = p.to_json();
    }
    if let Some(m) = &merges {
        meta["merge_map"] = m.to_json();
        meta["merge"] = m.summary();
    }
    let summary = writer.finish(&meta)?;
    let pack = Pack::open(&summary.path)?;
    let report = PackReport::new(&pack);
    progress.finish_stage();
    stages.push(StageTime::ended("finish", lap));

    // The quality price of the choices above, when a text to measure it on was given.
    let quality = match opts
        .plan
        .eval_text
        .as_ref()
        .or(opts.plan.calibration.as_ref())
    {
        Some(text) => {
            progress.stage("eval", None, "");
            let lap = Instant::now();
            use crate::eval::{evaluate_text, Source};
            let q = evaluate_text(
                &Source::Pack(summary.path.clone()),
                Some(&Source::Checkpoint(ck.root().to_path_buf())),
                text,
                512,
                None,
            )
            .map_err(|e| ConvertError::Compute {
                stage: format!("the quality report on {}", text.display()),
                source: Box::new(e),
            })?;
            progress.finish_stage();
            stages.push(StageTime::ended("eval", lap));
            Some(q)
        }
        None => None,
    };

    let seconds = t0.elapsed().as_secs_f64();
    let source_bytes = ck.weight_bytes();
    Ok(ConvertReport {
        source: provenance.source.clone(),
        output: summary.path.clone(),
        architecture: c.arch.model_type().to_string(),
        expert_layout: c
            .sparse_layers()
            .first()
            .and_then(|&l| ck.expert_layout(l).ok()),
        source_mlx_quantized: ck.mlx_quantization.is_some(),
        source_packed_int: ck.packed_int,
        requantized_source: (ck.mlx_quantization.is_some() || ck.packed_int.is_some())
            && (!opts.keep_source_codes || stored_quant.requantized_experts > 0),
        requantized_experts: stored_quant.requantized_experts,
        removed_stale_temp_files: summary.removed_stale_temp_files.clone(),
        dropped_mtp: ck.dropped_mtp().clone(),
        seconds,
        stages,
        source_bytes,
        pack_bytes: summary.file_size,
        source_bytes_per_s: source_bytes as f64 / seconds.max(1e-9),
        summary,
        pack: report,
        quality,
    })
}

/// quantize -> encode -> write of every dense tensor, then every expert segment.
fn write_payload(
    ck: &Checkpoint,
    mut writer: PackWriter,
    opts: &ConvertOptions,
    (profile, merges): (Option<&profile::Profile>, Option<&merge::MergePlan>),
    progress: &dyn Progress,
    stages: &mut Vec<StageTime>,
) -> Result<(PackWriter, Option<profile::BitPlan>, StoredQuantization), ConvertError> {
    let stored = |l: usize, e: usize| merges.is_none_or(|m| m.is_stored(l, e));
    let (expert_params, dense_policy) = opts.check()?;
    let c = &ck.config;
    let mut lap = Instant::now();
    let mut done = |stage: &'static str, lap: &mut Instant| {
        stages.push(StageTime::ended(stage, *lap));
        *lap = Instant::now();
    };

    // quantize + encode + write: dense tensors.
    let dense_in = ck.dense_tensors()?;
    let dense_src: u64 = dense_in.iter().map(|d| dense_bytes(&d.data)).sum();
    progress.stage("dense", Some(dense_src), "B");
    let mut planned: Vec<quantize::DenseOut<'_>> = dense_in
        .par_iter()
        .map(|t| {
            check_finite_dense(t)?;
            let out = plan_dense(t, dense_policy).map_err(ConvertError::from);
            progress.advance(dense_bytes(&t.data));
            out
        })
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .flatten()
        .collect();
    planned.sort_by(|a, b| a.name.cmp(&b.name));
    let dense_stored: u64 = planned.iter().map(|t| t.bytes.len() as u64).sum();
    let dense_quant: Vec<(u8, usize, QuantMode)> = planned
        .iter()
        .filter(|t| t.bits > 0)
        .map(|t| (t.bits, t.group_size, t.mode))
        .collect();
    if let Some(w) = planned.windows(2).find(|w| w[0].name == w[1].name) {
        return Err(ConvertError::Unrepresentable {
            what: format!(
                "two tensors would be stored as {}: the source has both a float and a quantized \
                 form of it",
                w[0].name
            ),
        });
    }
    check_dense_against_model(c, &ck.raw_config, &planned)?;
    for chunk in planned.chunks(64) {
        let encoded = chunk
            .par_iter()
            .map_init(
                || Encoder::new(opts.codec),
                |enc, t| {
                    let bits = if t.bits > 0 {
                        t.bits
                    } else {
                        (t.dtype.size() * 8) as u8
                    };
                    enc.encode(bits, t.bytes.to_vec())
                },
            )
            .collect::<Result<Vec<_>, _>>()?;
        for (t, (stored, codec)) in chunk.iter().zip(encoded) {
            write::add_tensor(&mut writer, t, &stored, codec)?;
        }
    }
    drop(planned);
    for t in &dense_in {
        match t.data {
            load::TensorData::Float { bytes, .. } | load::TensorData::Other { bytes, .. } => {
                ck.release(bytes)
            }
            load::TensorData::Quantized(q) => [q.codes, q.scales, q.biases]
                .iter()
                .for_each(|b| ck.release(b)),
            load::TensorData::Fp8(m) => {
                ck.release(m.bytes());
                if let Some(b) = m.scale_bytes() {
                    ck.release(b);
                }
            }
            load::TensorData::Derived(ref d) => {
                for m in d.sources() {
                    ck.release(m.bytes());
                    if let Some(b) = m.scale_bytes() {
                        ck.release(b);
                    }
                }
            }
        }
    }
    progress.finish_stage();
    done("dense", &mut lap);

    // quantize + encode + write: experts, in windows.
    let jobs: Vec<(usize, usize)> = c
        .sparse_layers()
        .into_iter()
        .flat_map(|l| (0..c.num_experts).map(move |e| (l, e)))
        .filter(|&(l, e)| stored(l, e))
        .collect();
    let job_bytes = |&(l, e): &(usize, usize)| -> Result<u64, ConvertError> {
        let x = ck.expert(l, e)?;
        Ok([x.gate, x.up, x.down].iter().map(proj_bytes).sum())
    };
    let expert_src: u64 = jobs.iter().map(job_bytes).sum::<Result<u64, _>>()?;
    let bit_plan = profile::bit_plan(ck, opts, profile, dense_stored, &|l, e| !stored(l, e))?;
    progress.stage("experts", Some(expert_src), "B");
    let plan = SegmentPlan {
        segment_count: opts.segments,
    };
    let window = (rayon::current_num_threads() * 4).max(8);
    let stored_as: std::sync::Mutex<Vec<(usize, usize, ExpertQuant, bool)>> = Default::default();
    let compute = |chunk: &[(usize, usize)]| -> Result<Vec<EncodedSegment>, ConvertError> {
        let per_job = chunk
            .par_iter()
            .map_init(
                || Encoder::new(opts.codec),
                |enc, &(l, e)| -> Result<Vec<EncodedSegment>, ConvertError> {
                    let merged = match merges {
                        Some(m) => merge::merged_expert(ck, m, l, e)?,
                        None => None,
                    };
                    let x = match &merged {
                        Some(m) => m.projections(),
                        None => ck.expert(l, e)?,
                    };
                    check_finite_expert(ck, &x, l, e)?;
                    let params = expert_target(opts, &bit_plan, expert_params, &x, l, e)?;
                    stored_as.lock().unwrap_or_else(|p| p.into_inner()).push((
                        l,
                        e,
                        params,
                        requantizes(&x, params),
                    ));
                    let segs = build_segments(l, e, &x, params, plan)?;
                    let out = segs
                        .into_iter()
                        .map(|s| enc.segment(s).map_err(ConvertError::from))
                        .collect::<Result<Vec<_>, _>>()?;
                    for p in [x.gate, x.up, x.down] {
                        release_proj(ck, &p);
                    }
                    progress.advance([x.gate, x.up, x.down].iter().map(proj_bytes).sum());
                    Ok(out)
                },
            )
            .collect::<Result<Vec<_>, _>>()?;
        Ok(per_job.into_iter().flatten().collect())
    };
    let mut pending: Option<Vec<EncodedSegment>> = None;
    for chunk in jobs.chunks(window) {
        // Write the previous window on this thread while the pool computes this one.
        let (written, computed) = rayon::join(
            || -> Result<(), ConvertError> {
                for s in pending.take().into_iter().flatten() {
                    write::add_segment(&mut writer, &s)?;
                }
                Ok(())
            },
            || compute(chunk),
        );
        written?;
        pending = Some(computed?);
    }
    for s in pending.take().into_iter().flatten() {
        write::add_segment(&mut writer, &s)?;
    }
    progress.finish_stage();
    done("experts", &mut lap);

    let stored_as = stored_as.into_inner().unwrap_or_else(|p| p.into_inner());
    Ok((
        writer,
        bit_plan,
        StoredQuantization::of(c, &stored_as, &dense_quant),
    ))
}

/// The bits and group size expert `e` of layer `l` is stored with. A source that holds the
/// expert as MLX codes keeps them (each projection's own bits, and their common group size) when
/// `keep_source_codes`, unless the bit plan sends the expert to other bits (then every projection
/// at the planned bits and the source's group size, or `--group-size` where affine codes cannot
/// have the source's). mlx-lm's mixed recipes give `down_proj` more
/// bits than gate and up in some layers; the pack keeps that (formats/flashpack-v1.md §6.1).
fn expert_target(
    opts: &ConvertOptions,
    bit_plan: &Option<profile::BitPlan>,
    default: QuantParams,
    x: &quantize::ExpertProjections<'_>,
    l: usize,
    e: usize,
) -> Result<ExpertQuant, ConvertError> {
    let source = match (
        x.gate.quant_params(),
        x.up.quant_params(),
        x.down.quant_params(),
    ) {
        (Some(g), Some(u), Some(d))
            if opts.keep_source_codes
                && (g.group_size, g.mode) == (u.group_size, u.mode)
                && (u.group_size, u.mode) == (d.group_size, d.mode) =>
        {
            let bits = ProjBits([g.bits, u.bits, d.bits]);
            Some(ExpertQuant::new(bits, g.group_size, g.mode)?)
        }
        _ => None,
    };
    let planned = bit_plan.as_ref().map(|b| b[l][e]);
    Ok(match (source, planned) {
        (Some(sq), Some(bits)) if bits != opts.expert_bits => {
            // The source's group size, where affine codes can have it (nvfp4's 16 cannot).
            let group = if crate::format::valid_group_size(sq.group_size as u32) {
                sq.group_size
            } else {
                opts.group_size
            };
            QuantParams::new(bits, group)?.into()
        }
        (Some(sq), _) => sq,
        (None, Some(bits)) => QuantParams::new(bits, opts.group_size)?.into(),
        (None, None) => default.into(),
    })
}

/// Whether storing `x` as `q` requantizes codes the source already had.
fn requantizes(x: &quantize::ExpertProjections<'_>, q: ExpertQuant) -> bool {
    [x.gate, x.up, x.down]
        .iter()
        .enumerate()
        .any(|(i, s)| s.quant_params().is_some_and(|p| p != q.proj(i)))
}

fn dense_bytes(d: &load::TensorData<'_>) -> u64 {
    match d {
        load::TensorData::Float { bytes, .. } | load::TensorData::Other { bytes, .. } => {
            bytes.len() as u64
        }
        load::TensorData::Quantized(q) => (q.codes.len() + q.scales.len() + q.biases.len()) as u64,
        load::TensorData::Fp8(m) => {
            (m.bytes().len() + m.scale_bytes().map_or(0, <[u8]>::len)) as u64
        }
        // A head split is half of its source (the two halves of one tensor).
        load::TensorData::Derived(ref d) => {
            let n: u64 = d
                .sources()
                .iter()
                .map(|m| (m.bytes().len() + m.scale_bytes().map_or(0, <[u8]>::len)) as u64)
                .sum();
            match d {
                load::derived::Derived::HeadSplit(_) => n / 2,
                _ => n,
            }
        }
    }
}

fn release_proj(ck: &Checkpoint, p: &quantize::ProjSource<'_>) {
    p.source_bytes().iter().for_each(|b| ck.release(b));
}

fn proj_bytes(p: &quantize::ProjSource<'_>) -> u64 {
    p.source_bytes().iter().map(|b| b.len() as u64).sum()
}

#[cfg(test)]
mod tests;
