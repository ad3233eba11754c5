//! The convert pipeline: Hugging Face checkpoint -> `.flashpack`.
//!
//! Stages, in order, one file each: `load` (map and index the source, hash it) -> profile ->
//! merge -> `quantize` (MLX affine, bit-exact with `mx.quantize`) -> `encode` (a codec per
//! part) -> layout (`format::layout::Planner`, driven by the writer) -> `write` (metadata,
//! `format::PackWriter`). `profile` runs calibration text through the source when an option
//! needs it (usage-based cold experts, merging, `--profile`); `merge` plans merged experts.
//! `tensor` holds the element types and views the stages share; `fixtures` makes seeded tiny
//! checkpoints for tests and benchmarks.
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

use crate::codec::{AutoPolicy, CodecChoice, CodecError};
use crate::format::{
    Pack, PackError, PackSummary, PackWriter, ProjBits, QuantMode, DEFAULT_PAGE_SIZE,
};
use crate::inspect::PackReport;
use crate::progress::Progress;
use encode::{EncodedSegment, Encoder};
use load::{Checkpoint, ExpertLayout, LoadError, Resolver, SourceSpec};
use quantize::{
    build_segments, plan_dense, DensePolicy, ExpertQuant, QuantError, QuantParams, SegmentPlan,
};
use rayon::prelude::*;
use serde::Serialize;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Errors of a conversion, by stage.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConvertError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Quant(#[from] QuantError),
    #[error("encoding: {0}")]
    Codec(#[from] CodecError),
    #[error(transparent)]
    Pack(#[from] PackError),
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "{tensor} has a non-finite value ({value}) at {at}; the checkpoint is damaged or was \
         saved from a diverged run: convert a checkpoint whose weights are all finite"
    )]
    NonFinite {
        tensor: String,
        at: String,
        value: f32,
    },
    /// An option out of its range, or options that do not go together.
    #[error("{option} {value}: {why}")]
    BadOption {
        option: &'static str,
        value: String,
        why: String,
    },
    /// A tokenizer that cannot be loaded, or that cannot encode the calibration text.
    #[error("{what}")]
    Tokenizer {
        what: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// A JSON file of the source that does not parse.
    #[error("{path} is not valid JSON; replace it with the model's own file")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// Running the model failed (profiling, the quality report).
    #[error("{stage} failed")]
    Compute {
        stage: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Calibration text that cannot profile the model.
    #[error("calibration: {what}")]
    Calibration { what: String },
    /// Something in the source that the format cannot hold.
    #[error("{what}")]
    Unrepresentable { what: String },
    /// A broken invariant of the pipeline: a bug.
    #[error("internal error: {what}; please report it")]
    Internal { what: String },
    #[error("cannot write the pack to {path}: {why}")]
    Destination { path: PathBuf, why: String },
}

/// A `tokenizer.json` that is present must be one the runtime can load: found now, not when
/// `run` first needs it. A source without one converts, with a warning: its pack takes token
/// ids only. A dangling link or a link loop in its place is an error, not a missing file.
fn check_tokenizer(ck: &Checkpoint, progress: &dyn Progress) -> Result<(), ConvertError> {
    let path = ck.root().join("tokenizer.json");
    if !write::optional_file(&path)? {
        progress.warn(&format!(
            "{} has no tokenizer.json: the pack will take token ids only, and `flashpack run \
             --prompt` will refuse it; copy the model's tokenizer.json into the folder and \
             convert again to run text prompts",
            ck.root().display()
        ));
        return Ok(());
    }
    let text = std::fs::read_to_string(&path).map_err(|source| ConvertError::Io {
        path: path.display().to_string(),
        source,
    })?;
    text.parse::<tokenizers::Tokenizer>()
        .map(|_| ())
        .map_err(|e| ConvertError::Tokenizer {
            what: format!(
                "{} is not a tokenizer that can be loaded; replace it with the model's own \
                 tokenizer.json",
                path.display()
            ),
            source: Some(e),
        })
}

/// Says once what the loader left out of a checkpoint with multi-token-prediction layers.
fn note_dropped_mtp(ck: &Checkpoint, progress: &dyn Progress) {
    let d = ck.dropped_mtp();
    if d.tensors == 0 {
        return;
    }
    let skipped = match d.skipped_shards.len() {
        0 => String::new(),
        n => format!(
            "; {n} shard(s) holding only them were not read ({})",
            d.skipped_shards.join(", ")
        ),
    };
    progress.note(&format!(
        "dropped {} tensor(s) of the multi-token-prediction layer(s) {}..={} \
         (num_nextn_predict_layers in config.json), as mlx-lm does: the pack holds the model's \
         {} decoder layers{skipped}",
        d.tensors,
        d.layers.start,
        d.layers.end.saturating_sub(1),
        ck.config.num_hidden_layers
    ));
}

/// Refuses a destination the conversion must not write: one ending in a slash (a folder, not a
/// file name), one in a folder that does not exist, an existing file that is not a regular file
/// (a device or a pipe, which renaming over would replace), or any file the conversion reads
/// (`inputs`), through whatever links. Checked before any work, so a bad `-o` costs nothing.
pub fn check_destination(dest: &std::path::Path, inputs: &[PathBuf]) -> Result<(), ConvertError> {
    let bad = |why: String| ConvertError::Destination {
        path: dest.to_path_buf(),
        why,
    };
    let text = dest.as_os_str().to_string_lossy();
    if text.ends_with('/') || text.ends_with(std::path::MAIN_SEPARATOR) {
        return Err(bad(
            "it ends with a slash; give a file name such as DIR/model.flashpack".into(),
        ));
    }
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !parent.is_dir() {
        return Err(bad(format!(
            "the folder {} does not exist; create it first",
            parent.display()
        )));
    }
    if let Ok(meta) = std::fs::metadata(dest) {
        if !meta.is_file() && !meta.is_dir() {
            return Err(bad(
                "it exists and is not a regular file (a device, pipe or socket); \
                 writing the pack would replace it"
                    .into(),
            ));
        }
        if let Ok(target) = std::fs::canonicalize(dest) {
            let read = inputs
                .iter()
                .filter_map(|p| std::fs::canonicalize(p).ok())
                .any(|p| p == target);
            if read {
                return Err(bad(format!(
                    "it is a file of the source ({}), which the conversion reads; write the \
                     pack elsewhere",
                    target.display()
                )));
            }
        }
    }
    Ok(())
}

/// What to produce. `Default` is the plain conversion: 4-bit experts, group 64, 4-bit dense
/// weights, automatic codec choice, one segment per expert, 16 KiB pages.
#[derive(Clone, Debug)]
pub struct ConvertOptions {
    pub codec: CodecChoice,
    pub expert_bits: u8,
    pub group_size: usize,
    /// 2 to 6 or 8 quantize dense weights; 16 keeps them in the source float type.
    pub dense_bits: u8,
    /// Vertical segments per expert (formats/flashpack-v1.md §6.3).
    pub segments: usize,
    pub page_size: u32,
    /// Bits of cold experts; needs the profile stage.
    pub cold_bits: Option<u8>,
    /// Fraction of experts stored at `cold_bits`; needs the profile stage.
    pub cold_fraction: Option<f64>,
    /// Pick cold experts until the pack fits this many GB; needs the profile stage.
    pub target_size_gb: Option<f64>,
    /// Merge experts more similar than this; needs the merge stage.
    pub merge_threshold: Option<f64>,
    /// Profiling, calibration text, merge ratio, quality report (profile stage).
    pub plan: profile::PlanOptions,
    /// Tensors that the source already holds as MLX codes (an mlx-lm folder) keep their own
    /// bits and group size, whatever `expert_bits`, `dense_bits` and `group_size` say; only
    /// experts that the bit plan sends to other bits (`cold_bits`) are requantized. `false`
    /// requantizes every such tensor to the options (what `flashpack convert` does when
    /// `--expert-bits`, `--dense-bits` or `--group-size` is given).
    pub keep_source_codes: bool,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            codec: CodecChoice::Auto(AutoPolicy::default()),
            expert_bits: 4,
            group_size: 64,
            dense_bits: 4,
            segments: 1,
            page_size: DEFAULT_PAGE_SIZE,
            cold_bits: None,
            cold_fraction: None,
            target_size_gb: None,
            merge_threshold: None,
            plan: profile::PlanOptions::default(),
            keep_source_codes: true,
        }
    }
}

impl ConvertOptions {
    /// The options as recorded in the pack's provenance.
    pub fn describe(&self) -> Value {
        let codec = match self.codec {
            CodecChoice::Auto(_) => "auto".to_string(),
            CodecChoice::Fixed(c) => c.label(),
        };
        json!({
            "codec": codec,
            "expert_bits": self.expert_bits,
            "group_size": self.group_size,
            "dense_bits": self.dense_bits,
            "segments": self.segments,
            "page_size": self.page_size,
            "keep_source_codes": self.keep_source_codes,
        })
    }

    fn check(&self) -> Result<(QuantParams, DensePolicy), ConvertError> {
        if self.cold_bits.is_some() && self.cold_fraction.is_none() && self.target_size_gb.is_none()
        {
            return Err(ConvertError::BadOption {
                option: "--cold-bits",
                value: self.cold_bits.unwrap_or(0).to_string(),
                why: "needs --cold-fraction F or --target-size GB to say how many experts go cold"
                    .into(),
            });
        }
        if let Some(b) = self.cold_bits {
            QuantParams::new(b, self.group_size)?;
        }
        let out_of = |option: &'static str, v: f64, ok: bool, why: &str| {
            if ok {
                Ok(())
            } else {
                Err(ConvertError::BadOption {
                    option,
                    value: v.to_string(),
                    why: why.into(),
                })
            }
        };
        // Checked here, before any work, as well as where they are used.
        if let Some(f) = self.cold_fraction {
            out_of(
                "--cold-fraction",
                f,
                (0.0..=1.0).contains(&f),
                "give a fraction between 0 and 1",
            )?;
        }
        if let Some(t) = self.merge_threshold {
            out_of(
                "--merge-threshold",
                t,
                (-1.0..=1.0).contains(&t),
                "a cosine similarity lies in [-1, 1]",
            )?;
        }
        if let Some(r) = self.plan.merge_ratio {
            out_of(
                "--merge-ratio",
                r,
                (0.0..1.0).contains(&r),
                "give a fraction in [0, 1)",
            )?;
        }
        if self.segments == 0 {
            return Err(ConvertError::BadOption {
                option: "--segments",
                value: "0".into(),
                why: "give at least 1".into(),
            });
        }
        Ok((
            QuantParams::new(self.expert_bits, self.group_size)?,
            DensePolicy::new(self.dense_bits, self.group_size)?
                .keeping_source_codes(self.keep_source_codes),
        ))
    }
}

/// Seconds spent in one stage.
#[derive(Clone, Debug, Serialize)]
pub struct StageTime {
    pub stage: &'static str,
    pub seconds: f64,
    /// Peak resident set of the process during the stage, with `FLASHPACK_STAGE_PEAKS=1` on
    /// Linux; `None` otherwise, and for a stage that ran beside others.
    pub peak_rss_bytes: Option<u64>,
}

/// Whether to measure each stage's peak RSS (`FLASHPACK_STAGE_PEAKS=1`). Off by default: the
/// measurement restarts the kernel's high-water mark at every stage, so afterwards the
/// process's own peak (`getrusage`, `/usr/bin/time`) covers only the last stage. With it on,
/// the process's peak is the largest stage peak.
fn stage_peaks() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("FLASHPACK_STAGE_PEAKS").is_ok_and(|v| v == "1"))
}

impl StageTime {
    /// A stage that started at `lap` and ends now; also closes the stage's peak-RSS period.
    fn ended(stage: &'static str, lap: Instant) -> StageTime {
        StageTime {
            stage,
            seconds: lap.elapsed().as_secs_f64(),
            peak_rss_bytes: if stage_peaks() {
                crate::memory::take_peak_rss()
            } else {
                None
            },
        }
    }
}

/// What a conversion did.
#[derive(Clone, Debug, Serialize)]
pub struct ConvertReport {
    pub source: String,
    pub output: PathBuf,
    pub architecture: String,
    /// How the source stored its experts (first sparse layer).
    pub expert_layout: Option<ExpertLayout>,
    /// Whether the source was MLX-quantized.
    pub source_mlx_quantized: bool,
    /// Whether some of the source's MLX codes were requantized to other bits or group size
    /// (only when asked for: explicit bits or group size, or a cold-expert plan).
    pub requantized_source: bool,
    /// Stored experts among them.
    pub requantized_experts: usize,
    /// Temporary files of interrupted conversions found beside the output and removed.
    pub removed_stale_temp_files: Vec<PathBuf>,
    /// The source's multi-token-prediction layers, left out of the pack.
    pub dropped_mtp: load::DroppedMtp,
    pub seconds: f64,
    pub stages: Vec<StageTime>,
    /// Bytes of the source's weight files.
    pub source_bytes: u64,
    pub pack_bytes: u64,
    /// Source bytes per second of the whole conversion.
    pub source_bytes_per_s: f64,
    pub summary: PackSummary,
    /// Sizes and bits per weight by kind, as `flashpack inspect` reports them.
    pub pack: PackReport,
    /// The pack against the source on `--eval-text` (or the calibration file), when given.
    pub quality: Option<crate::eval::EvalReport>,
}

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
        c.hidden_size as u32,
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
        requantized_source: ck.mlx_quantization.is_some()
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
                if let Some(b) = m.fp8_blocks() {
                    ck.release(b.scales);
                }
            }
            load::TensorData::Derived(d) => {
                let m = d.source();
                ck.release(m.bytes());
                if let Some(b) = m.fp8_blocks() {
                    ck.release(b.scales);
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

/// What the pack really holds (for the metadata's `quantization` record): experts' bits and
/// group sizes as stored, and the quantized dense tensors' bits.
struct StoredQuantization {
    /// Experts whose source codes were requantized (other bits or group size).
    requantized_experts: usize,
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
    fn of(
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
    fn record(&self, q: &mut Value) {
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

/// The bits and group size expert `e` of layer `l` is stored with. A source that holds the
/// expert as MLX codes keeps them (each projection's own bits, and their common group size) when
/// `keep_source_codes`, unless the bit plan sends the expert to other bits (then every projection
/// at the planned bits and the source's group size). mlx-lm's mixed recipes give `down_proj` more
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
            QuantParams::new(bits, sq.group_size)?.into()
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
            (m.bytes().len() + m.fp8_blocks().map_or(0, |b| b.scales.len())) as u64
        }
        // A head split is half of its source (the two halves of one tensor).
        load::TensorData::Derived(d) => {
            let m = d.source();
            let n = (m.bytes().len() + m.fp8_blocks().map_or(0, |b| b.scales.len())) as u64;
            match d {
                load::derived::Derived::HeadSplit(_) => n / 2,
                load::derived::Derived::PlusOne(_) => n,
            }
        }
    }
}

/// Refuses NaN and infinity in float values (weights, or the scales and biases of MLX codes),
/// naming the tensor and the first bad element: quantizing them would give NaN logits at run.
fn check_finite(
    tensor: impl FnOnce() -> String,
    dtype: tensor::FloatDtype,
    bytes: &[u8],
    cols: usize,
) -> Result<(), ConvertError> {
    match dtype.first_non_finite(bytes) {
        None => Ok(()),
        Some((i, value)) => Err(ConvertError::NonFinite {
            tensor: tensor(),
            at: match i.checked_div(cols) {
                Some(row) => format!("row {row}, column {} (element {i})", i % cols),
                None => format!("element {i}"),
            },
            value,
        }),
    }
}

fn check_finite_quantized(
    tensor: &dyn Fn(&str) -> String,
    q: &quantize::QuantizedView<'_>,
) -> Result<(), ConvertError> {
    let groups = q.cols / q.params.group_size.max(1);
    if !q.params.has_biases() {
        // mxfp4/mxfp8: u8 E8M0 scales, whose only non-finite value is 255 (NaN).
        return match q.scales.iter().position(|&e| e == 255) {
            None => Ok(()),
            Some(i) => Err(ConvertError::NonFinite {
                tensor: tensor("scales"),
                at: format!(
                    "row {}, group {} (element {i})",
                    i / groups.max(1),
                    i % groups.max(1)
                ),
                value: f32::NAN,
            }),
        };
    }
    check_finite(|| tensor("scales"), q.scale_dtype, q.scales, groups)?;
    check_finite(|| tensor("biases"), q.scale_dtype, q.biases, groups)
}

/// [`check_finite`] of a float or FP8 matrix.
fn check_finite_matrix(
    tensor: impl FnOnce() -> String,
    m: &tensor::MatrixView<'_>,
) -> Result<(), ConvertError> {
    match m.first_non_finite() {
        None => Ok(()),
        Some((row, col, value)) => Err(ConvertError::NonFinite {
            tensor: tensor(),
            at: format!("row {row}, column {col}"),
            value,
        }),
    }
}

fn check_finite_dense(t: &load::DenseTensor<'_>) -> Result<(), ConvertError> {
    match &t.data {
        load::TensorData::Float {
            dtype,
            shape,
            bytes,
        } => {
            let cols = if shape.len() >= 2 {
                shape[shape.len() - 1]
            } else {
                0
            };
            check_finite(|| t.name.clone(), *dtype, bytes, cols)
        }
        load::TensorData::Quantized(q) => {
            let module = t.name.strip_suffix(".weight").unwrap_or(&t.name);
            check_finite_quantized(&|part| format!("{module}.{part}"), q)
        }
        load::TensorData::Fp8(m) => check_finite_matrix(|| t.name.clone(), m),
        load::TensorData::Derived(d) => check_finite_matrix(|| t.name.clone(), &d.source()),
        load::TensorData::Other { .. } => Ok(()),
    }
}

fn check_finite_expert(
    ck: &Checkpoint,
    x: &quantize::ExpertProjections<'_>,
    l: usize,
    e: usize,
) -> Result<(), ConvertError> {
    let names = ck.config.arch.names();
    for (proj, p) in crate::arch::Proj::ALL
        .into_iter()
        .zip([&x.gate, &x.up, &x.down])
    {
        let name = |part: &str| {
            format!(
                "layer {l} expert {e} {} ({})",
                proj.mlx_name(),
                names.expert(l, e, proj, crate::arch::Part::Weight)
            )
            .replace(".weight)", &format!(".{part})"))
        };
        match p {
            quantize::ProjSource::Float(m) => check_finite_matrix(|| name("weight"), m)?,
            quantize::ProjSource::Quantized(q)
            | quantize::ProjSource::Interleaved { all: q, .. } => check_finite_quantized(&name, q)?,
        }
    }
    Ok(())
}

fn release_proj(ck: &Checkpoint, p: &quantize::ProjSource<'_>) {
    p.source_bytes().iter().for_each(|b| ck.release(b));
}

fn proj_bytes(p: &quantize::ProjSource<'_>) -> u64 {
    p.source_bytes().iter().map(|b| b.len() as u64).sum()
}

#[cfg(test)]
mod tests;
