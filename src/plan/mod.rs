//! `flashpack plan`: what fits this machine and how fast it will run, from a checkpoint's or a
//! pack's headers alone (issue 31, decision 0032).
//!
//! Stages, in order, one file each: `read` (the source -> a header-only copy, every byte read
//! counted; I/O) -> `model` (an opened copy -> what the runtime holds and reads; pure) ->
//! `options` (the conversions worth making: faithful 4-bit and mixes at target sizes, sized by
//! convert's own planning; pure over the headers) -> `budgets` (each expert budget: what is
//! resident, the hit rate, bytes per token, by the runtime's own budget rules; pure) -> `probe`
//! and `disk` (this machine's compute per token and cost per miss; measured) -> `speed`
//! (predicted tokens per second; pure) -> `report` (the table, the JSON, the recommended
//! command and, for a Mac, the wired limit; pure).
//! Invariant: no weight byte of the source is read (`read`'s module doc says how that holds);
//! the rates can be given instead of measured (`FLASHPACK_PLAN_RATES`), and then the report is
//! a function of the source's headers and the options alone.

pub mod budgets;
pub mod disk;
pub mod model;
pub mod options;
pub mod probe;
pub mod read;
pub mod replay;
pub mod report;
pub mod speed;

use std::path::{Path, PathBuf};

use crate::arch::{ArchError, ModelConfig};
use crate::convert::load::{Checkpoint, LoadError};
use crate::convert::ConvertError;
use crate::format::{Pack, PackError};
use crate::hub::{Hub, HubError};
use crate::model::ComputeError;
use crate::run::budget::BudgetError;
use budgets::Machine;
pub use report::PlanReport;
use speed::{Compute, Disk, Rates};

/// Why a plan could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    #[error("{} does not exist: give a checkpoint folder, a .flashpack or a Hub id org/name", .path.display())]
    MissingSource { path: PathBuf },
    #[error("not a checkpoint: {detail}")]
    NotACheckpoint { detail: String },
    #[error("{file} is not a pack: {reason}")]
    NotAPack { file: String, reason: String },
    #[error(
        "{model_type} is not a Mixture-of-Experts model: its config has no routed experts \
         (num_experts {experts}, {sparse} sparse layers); flashpack streams experts, so there is \
         nothing to plan"
    )]
    NotMoe {
        model_type: String,
        experts: usize,
        sparse: usize,
    },
    #[error(
        "{what} does not fit {usable} of memory ({ram} of RAM{given}, less what is left to the \
         system): {detail}"
    )]
    DoesNotFit {
        what: String,
        usable: String,
        ram: String,
        given: &'static str,
        detail: String,
    },
    #[error("reading {}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Hub(#[from] HubError),
    #[error(transparent)]
    Config(#[from] ArchError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Pack(#[from] PackError),
    #[error(transparent)]
    Convert(#[from] ConvertError),
    #[error("timing the model on this machine")]
    Probe(#[source] ComputeError),
    #[error("FLASHPACK_PLAN_RATES: {0}")]
    BadRates(String),
}

impl PlanError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> PlanError {
        PlanError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// What to plan for.
#[derive(Clone, Debug)]
pub struct PlanOptions {
    /// As the user wrote it: a folder, a pack, or `org/name[@rev]`.
    pub source: String,
    /// `--ram`: plan for this much RAM instead of this machine's.
    pub ram: Option<u64>,
    /// `--context`: the positions the KV cache is sized for.
    pub context: usize,
    /// `--mac`: plan for a Mac (the wired-memory limit); always on macOS.
    pub mac: bool,
    /// `--measure`: measure the disk again instead of using the cached numbers.
    pub remeasure: bool,
    /// `--disk-speed`: bytes per second of a miss's reads, instead of measuring.
    pub disk_speed: Option<f64>,
    /// Rates given instead of measured (`FLASHPACK_PLAN_RATES`, JSON).
    pub rates: Option<GivenRates>,
}

/// Rates given instead of measured: any part left out is measured.
#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GivenRates {
    pub disk: Option<Disk>,
    pub compute: Option<Compute>,
}

impl GivenRates {
    /// Parses `FLASHPACK_PLAN_RATES`: `{"disk": {"latency_s": .., "bytes_per_s": ..},
    /// "compute": {"decode_s": .., "streamed_decode_s": .., "prefill_s": ..,
    /// "streamed_prefill_s": .., "chunk_tokens": ..}}`.
    pub fn parse(text: &str) -> Result<GivenRates, PlanError> {
        serde_json::from_str(text).map_err(|e| PlanError::BadRates(e.to_string()))
    }
}

/// The disk a pack of `source` lives on, or will: the pack's folder, the checkpoint's folder,
/// else (a Hub id) the current folder.
fn disk_folder(source: &read::Source) -> PathBuf {
    let dir = match source {
        read::Source::Pack(p) => p.parent().map(Path::to_path_buf).unwrap_or_default(),
        read::Source::Folder(d) => d.clone(),
        read::Source::Hub { .. } => PathBuf::new(),
    };
    if dir.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        dir
    }
}

/// Plans `opts.source` (see the module doc); `hub` answers Hub ids.
pub fn plan(opts: &PlanOptions, hub: &Hub) -> Result<PlanReport, PlanError> {
    let source = read::Source::parse(&opts.source);
    let (shadow, log) = read::shadow_of(&source, hub)?;
    // A config without routed experts is refused before its tensors are looked at.
    let not_moe = |cfg: &ModelConfig| {
        let sparse = cfg.sparse_layers().len();
        (cfg.num_experts == 0 || sparse == 0).then(|| PlanError::NotMoe {
            model_type: cfg.arch.model_type().to_string(),
            experts: cfg.num_experts,
            sparse,
        })
    };
    let opened = match &shadow.kind {
        read::ShadowKind::Pack(path) => options::Opened::Pack(Box::new(Pack::open(path)?)),
        read::ShadowKind::Checkpoint => {
            let path = shadow.dir().join("config.json");
            let text = std::fs::read(&path).map_err(|e| PlanError::io(&path, e))?;
            let raw: serde_json::Value =
                serde_json::from_slice(&text).map_err(|e| PlanError::NotACheckpoint {
                    detail: format!("config.json is not JSON: {e}"),
                })?;
            if let Some(e) = not_moe(&ModelConfig::from_json(&raw)?) {
                return Err(e);
            }
            options::Opened::Checkpoint(Box::new(Checkpoint::open(shadow.dir())?))
        }
    };
    let cfg = opened.config();
    if let Some(e) = not_moe(&cfg) {
        return Err(e);
    }
    let ram = opts.ram.unwrap_or_else(crate::memory::total_ram);
    let machine = Machine::with_ram(ram);
    let main = options::main_option(&opened, &shadow)?;
    // This machine's rates: given, cached or measured.
    let given = opts.rates.clone().unwrap_or_default();
    let (compute, compute_origin) = match given.compute {
        Some(c) => (c, disk::Origin::Given),
        None => (
            probe::measure(&main.facts).map_err(PlanError::Probe)?,
            disk::Origin::Measured,
        ),
    };
    let read_bytes = main.facts.main_pool().map_or(0, |p| p.read_bytes);
    let (disk, disk_origin) = match (given.disk, opts.disk_speed) {
        (_, Some(bps)) => (
            Disk {
                latency_s: 0.0,
                bytes_per_s: bps,
            },
            disk::Origin::Given,
        ),
        (Some(d), None) => (d, disk::Origin::Given),
        (None, None) => {
            let k = cfg.num_experts_per_tok;
            let folder = disk_folder(&source);
            // A folder that cannot take the scratch file (read-only): the temporary folder's
            // disk stands in.
            disk::of(&folder, read_bytes, k, opts.remeasure)
                .or_else(|_| disk::of(&std::env::temp_dir(), read_bytes, k, opts.remeasure))
                .map_err(|e| PlanError::io(&folder, e))?
        }
    };
    let rates = Rates { disk, compute };
    let mut all = vec![main];
    all.extend(options::mixes(
        &opened,
        &shadow,
        &all[0],
        &machine,
        opts.context,
    )?);
    let planned = all
        .into_iter()
        .map(|o| report::plan_option(o, &machine, opts.context, &rates))
        .collect::<Result<Vec<_>, BudgetError>>()
        .map_err(|e| report::does_not_fit(e, &machine, opts.ram.is_some()))?;
    report::check_working_set(&planned, &cfg, &machine, opts.ram.is_some())?;
    Ok(report::assemble(report::Inputs {
        source: &opts.source,
        kind: &shadow.kind,
        commit: shadow.commit.clone(),
        cfg: &cfg,
        machine,
        ram_given: opts.ram.is_some(),
        context: opts.context,
        mac: opts.mac || cfg!(target_os = "macos"),
        log: &log,
        rates,
        origins: (compute_origin, disk_origin),
        options: planned,
    }))
}
