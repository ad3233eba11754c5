//! `flashpack run PACK --hostfile hosts.json --rank N`: one rank of a pipeline
//! (docs/decisions/0034-pipeline-ranks.md). Rank 0 reads the prompt, prints the answer and the
//! stats, as `run` does; the other ranks run their layers and print one stats line each.
//! A Hub pack (`org/name[@revision][:FILE]`) is read by ranges: the header, directories and
//! metadata before the start handshake, this rank's layers after the split (`hub::RemotePack`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use flashpack::format::Pack;
use flashpack::hub::{Hub, PackAt, PackRef, RemotePack};
use flashpack::memory::{peak_rss, total_ram};
use flashpack::progress::Warnings;
use flashpack::run::engine::{Engine, EngineOptions, Stage};
use flashpack::run::open::{self, PackWeights};
use flashpack::run::pipeline::{self, JoinOptions, Pipeline};
use flashpack::units::{self, Style};

use crate::run::{
    answer, engine_options, model_text, prompt_progress_after, prompt_text, PromptProgress,
    RankArgs, RunArgs,
};

/// This process's rank: `--rank`, else `MLX_RANK`.
pub fn rank_of(ranks: &RankArgs) -> anyhow::Result<usize> {
    let from_env = std::env::var("MLX_RANK").ok();
    Ok(match (ranks.rank, from_env) {
        (Some(r), _) => r,
        (None, Some(v)) => v
            .trim()
            .parse()
            .with_context(|| format!("MLX_RANK={v:?} is not a rank number"))?,
        (None, None) => anyhow::bail!(
            "give this process's rank with --rank N (or MLX_RANK=N), in the hostfile's order"
        ),
    })
}

/// A rank after the first (of `run` or `serve`): loads its layers, runs the forward passes
/// rank 0 sends until rank 0 stops, and prints its stats line.
pub fn follow(
    p: &Pipeline,
    pack: &Pack,
    cfg: &flashpack::arch::ModelConfig,
    opts: &EngineOptions,
) -> anyhow::Result<ExitCode> {
    let n = cfg.num_hidden_layers;
    let layers = p.layers.clone();
    let weights = PackWeights::load_where(pack, opts.verify, |name| {
        pipeline::stage_tensor(name, &layers, n, cfg.tie_word_embeddings)
    })
    .with_context(|| {
        let name = pack
            .path()
            .map_or("the pack".into(), |p| p.display().to_string());
        format!("cannot run {name}")
    })?;
    let stage = Stage {
        layers: layers.clone(),
        downstream: None,
    };
    let mut engine = Engine::new_stage(pack, cfg, &weights, opts, &Warnings, Some(stage))
        .with_context(|| format!("rank {}: layers {layers:?}", p.rank))?;
    let dense = weights.bytes;
    let experts = engine.cache_stats().resident_bytes;
    drop(weights);
    let report = pipeline::serve_stage(&mut engine, p.rank, p.size)
        .with_context(|| format!("rank {} (layers {layers:?})", p.rank))?;
    p.finish()?;
    stage_line(p, dense, experts, Some(&report));
    Ok(ExitCode::SUCCESS)
}

pub fn run(args: RunArgs, hostfile: &Path) -> anyhow::Result<ExitCode> {
    let rank = rank_of(&args.ranks)?;
    let hub = Hub::from_env();
    let (path, mut remote) = resolve_pack(&hub, &args.pack, rank)?;
    let pack = Pack::open(&path).with_context(|| format!("cannot run {}", args.pack.display()))?;
    let cfg = open::model_config(&pack)?;
    // Rank 0 alone reads the prompt; it tells the others how long a sequence to plan for.
    let (text, positions) = if rank == 0 {
        let prompt = prompt_text(&args)?;
        let text = model_text(&args, &pack, &prompt)?;
        let positions = text.len().saturating_add(args.max_tokens);
        (Some(text), positions)
    } else {
        (None, 0)
    };
    let ram = total_ram();
    let budget = args
        .mem_budget
        .as_ref()
        .map_or(ram, |b| b.size.resolve(ram));
    let p = Pipeline::join(
        &JoinOptions {
            hostfile,
            rank,
            budget,
            positions,
            connect_timeout: Duration::from_secs(args.ranks.connect_timeout),
        },
        &pack,
        &cfg,
    )
    .with_context(|| format!("cannot start rank {rank} of {}", hostfile.display()));
    let p = p?;
    let result = match remote.as_mut() {
        Some(remote) => fetch_stage(remote, &pack, &p, &cfg).and_then(|()| {
            // Opened again: the copy now holds this rank's pieces.
            let pack =
                Pack::open(&path).with_context(|| format!("cannot run {}", remote.name()))?;
            run_rank(&args, &p, &pack, &cfg, text.as_deref())
        }),
        None => run_rank(&args, &p, &pack, &cfg, text.as_deref()),
    };
    if result.is_err() {
        p.disarm();
    }
    result
}

/// A rank's pack: `pack` itself, or for a Hub pack (`org/name[@revision][:FILE]`) its header,
/// directories and metadata now, read by ranges into a sparse copy whose path is returned with
/// it (this rank's layers come after the split: [`fetch_stage`]), or the whole pack where the
/// Hub cache already holds it.
pub fn resolve_pack<'h>(
    hub: &'h Hub,
    pack: &Path,
    rank: usize,
) -> anyhow::Result<(PathBuf, Option<RemotePack<'h>>)> {
    let at = match pack.to_str().and_then(PackRef::parse) {
        None => return Ok((pack.to_path_buf(), None)),
        Some(r) => hub
            .pack_ranges(&r)
            .with_context(|| format!("cannot open {r} as rank {rank}"))?,
    };
    Ok(match at {
        PackAt::Whole(path) => (path, None),
        PackAt::Ranges(remote) => (remote.path().to_path_buf(), Some(*remote)),
    })
}

/// Downloads the byte ranges of this rank's layers into the sparse copy (nothing when a run
/// before brought them) and says what it received.
pub fn fetch_stage(
    remote: &mut RemotePack<'_>,
    pack: &Pack,
    p: &Pipeline,
    cfg: &flashpack::arch::ModelConfig,
) -> anyhow::Result<()> {
    let pieces = pipeline::stage_pieces(pack, &p.layers, cfg);
    let fetched = remote.fetch(&pieces).with_context(|| {
        format!(
            "rank {}: downloading layers {}..{} of {}",
            p.rank,
            p.layers.start,
            p.layers.end,
            remote.name()
        )
    })?;
    eprintln!(
        "rank {}: {}: received {} of {} bytes in {} range requests ({} of this rank's {} pieces \
         were missing, {})",
        p.rank,
        remote.name(),
        remote.received(),
        remote.size(),
        remote.requests(),
        fetched.pieces,
        pieces.len(),
        units::bytes(fetched.bytes, Style::RUN),
    );
    Ok(())
}

fn run_rank(
    args: &RunArgs,
    p: &Pipeline,
    pack: &Pack,
    cfg: &flashpack::arch::ModelConfig,
    text: Option<&str>,
) -> anyhow::Result<ExitCode> {
    if p.rank != 0 {
        return follow(p, pack, cfg, &engine_options(args, p.positions.max(1)));
    }
    let n = cfg.num_hidden_layers;
    let layers = p.layers.clone();
    let weights = PackWeights::load_where(pack, !args.no_verify, |name| {
        pipeline::stage_tensor(name, &layers, n, cfg.tie_word_embeddings)
    })
    .with_context(|| format!("cannot run {}", args.pack.display()))?;
    let progress = PromptProgress::new(prompt_progress_after(), !args.json);
    let opts = engine_options(args, p.positions.max(1));
    let stage = Stage {
        layers: layers.clone(),
        downstream: Some(Arc::new(p.link()) as Arc<_>),
    };
    let mut engine = Engine::new_stage(pack, cfg, &weights, &opts, &progress, Some(stage))
        .with_context(|| format!("rank {}: layers {layers:?}", p.rank))?;
    let dense = weights.bytes;
    let experts = engine.cache_stats().resident_bytes;
    drop(weights);
    eprintln!("{}", split_line(p));
    let code = answer(args, &mut engine, cfg, text.unwrap_or_default(), &progress)?;
    p.finish()?;
    stage_line(p, dense, experts, None);
    Ok(code)
}

/// Rank 0's line on stderr: how the layers were split.
pub fn split_line(p: &Pipeline) -> String {
    let split: Vec<String> = p
        .split
        .iter()
        .enumerate()
        .map(|(r, l)| format!("{r}: {}..{}", l.start, l.end))
        .collect();
    format!("pipeline: {} ranks, layers {}", p.size, split.join(", "))
}

/// One line per rank on stderr: its layers, what it holds, its peak memory.
pub fn stage_line(p: &Pipeline, dense: u64, experts: u64, report: Option<&pipeline::StageReport>) {
    let busy = match report {
        Some(r) => format!(
            ", {} passes ({} positions) in {:.4} s",
            r.forwards, r.positions, r.busy_s
        ),
        // Rank 0: its passes down the pipeline, first message sent to reply received.
        None => {
            let d = p.downstream_report();
            format!(
                ", {} passes down ({} answered, {} sampled there) in {:.4} s",
                d.passes, d.replies, d.sampled, d.round_trip_s
            )
        }
    };
    eprintln!(
        "rank {}: layers {}..{}, dense {}, experts {}{busy}; peak RSS {}",
        p.rank,
        p.layers.start,
        p.layers.end,
        units::bytes(dense, Style::RUN),
        units::bytes(experts, Style::RUN),
        units::bytes(peak_rss(), Style::RUN),
    );
}
