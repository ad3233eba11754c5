//! Report stage of `flashpack plan`: the options with their budgets and predicted speeds ->
//! one recommendation, the wired-memory limit a Mac needs, the table and the JSON.
//!
//! In: the planned options ([`PlannedOption`]: a choice, its budget rows and their speeds), the
//! machine, what was read. Out: [`PlanReport`] (serialized as is by `plan --json`, a stable
//! object: new keys may come, none goes) and its text ([`PlanReport::text`]). Pure.
//! The recommendation: the first option (the pack, or the faithful conversion) with every
//! expert resident when that fits; otherwise the option and budget of the highest predicted
//! decode speed among those that fit, where a mix must beat the faithful pack by
//! [`MIX_SPEEDUP`] to be chosen (its quality cost is unknown without a profile). A Mac wires
//! what the engine keeps resident (dense weights, expert slots, KV cache and activations,
//! `Engine::new`), which Metal refuses past `iogpu.wired_limit_mb` (by default about three
//! quarters of RAM): [`WiredLimit`] gives the value that budget needs.

use std::collections::BTreeMap;

use super::budgets::{self, Machine, Row};
use super::disk::Origin;
use super::options::Choice;
use super::read::{ReadLog, ShadowKind};
use super::speed::{predict, Compute, Disk, Rates, Speed};
use super::PlanError;
use crate::arch::ModelConfig;
use crate::run::budget::BudgetError;
use crate::units::{bytes, Style};

/// How much faster a mix must be than the faithful pack to be recommended.
pub const MIX_SPEEDUP: f64 = 1.5;

/// One budget row with its predicted speeds (`None` where `run` would refuse the budget: a
/// pool without room for one token's experts).
#[derive(Clone, Debug, serde::Serialize)]
pub struct BudgetRow {
    #[serde(flatten)]
    pub row: Row,
    pub decode_tokens_per_s: Option<f64>,
    pub prefill_tokens_per_s: Option<f64>,
    /// Of a decoded token's predicted seconds, those waiting for reads.
    pub decode_read_s: Option<f64>,
}

/// One option with its budgets.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PlannedOption {
    pub name: String,
    /// `convert`'s options for it; absent for a pack.
    pub convert: Option<String>,
    pub pack_bytes: u64,
    pub dense_bytes: u64,
    pub expert_bytes: u64,
    pub experts: u64,
    pub cold_experts: u64,
    pub cold_bits: Option<u8>,
    /// The routing mass on cold experts (0 for a faithful conversion), where a profile says.
    pub cold_mass: Option<f64>,
    pub quality: String,
    pub budgets: Vec<BudgetRow>,
}

impl PlannedOption {
    /// The fastest row that fits and runs.
    fn best(&self) -> Option<&BudgetRow> {
        self.budgets
            .iter()
            .filter(|b| b.row.fits && b.row.runnable)
            .max_by(|a, b| {
                a.decode_tokens_per_s
                    .unwrap_or(0.0)
                    .total_cmp(&b.decode_tokens_per_s.unwrap_or(0.0))
            })
    }
}

/// The command `plan` recommends.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Recommendation {
    pub command: String,
    pub option: String,
    /// The budget row's label (`100%`, `fits`, ...).
    pub budget: String,
    pub decode_tokens_per_s: Option<f64>,
    pub why: String,
}

/// What to set on a Mac, and why.
#[derive(Clone, Debug, serde::Serialize)]
pub struct WiredLimit {
    pub megabytes: u64,
    pub command: String,
    pub why: String,
}

/// The machine as planned for.
#[derive(Clone, Debug, serde::Serialize)]
pub struct MachineView {
    pub ram_bytes: u64,
    /// `--ram` gave it.
    pub ram_given: bool,
    pub usable_bytes: u64,
    pub context: usize,
    pub mac: bool,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct ModelView {
    pub architecture: String,
    pub layers: usize,
    pub sparse_layers: usize,
    pub experts: usize,
    pub experts_per_token: usize,
    pub hidden_size: usize,
    pub expert_width: usize,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct ReadView {
    /// Bytes read per file of the source.
    pub files: BTreeMap<String, u64>,
    pub total_bytes: u64,
    /// Reads made.
    pub reads: usize,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct RatesView {
    pub disk: Disk,
    pub disk_origin: Origin,
    pub compute: Compute,
    pub compute_origin: Origin,
}

/// `flashpack plan`'s answer.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PlanReport {
    pub source: String,
    /// `checkpoint` or `pack`.
    pub kind: &'static str,
    pub commit: Option<String>,
    pub model: ModelView,
    pub machine: MachineView,
    pub read: ReadView,
    pub rates: RatesView,
    pub options: Vec<PlannedOption>,
    pub recommendation: Recommendation,
    /// Present when planning for a Mac (on macOS, or with `--mac`).
    pub wired_limit: Option<WiredLimit>,
}

/// The rows of `choice` at this machine's rates.
pub fn plan_option(
    choice: Choice,
    machine: &Machine,
    context: usize,
    rates: &Rates,
) -> Result<PlannedOption, BudgetError> {
    let rows = budgets::rows(&choice.facts, machine, context, rates.compute.chunk_tokens)?;
    let budgets = rows
        .into_iter()
        .map(|row| {
            let speed: Option<Speed> = row.runnable.then(|| predict(&row, rates));
            BudgetRow {
                decode_tokens_per_s: speed.map(|s| s.decode_tokens_per_s),
                prefill_tokens_per_s: speed.map(|s| s.prefill_tokens_per_s),
                decode_read_s: speed.map(|s| s.decode_read_s),
                row,
            }
        })
        .collect();
    let f = &choice.facts;
    let quality = match (choice.cold_experts, choice.cold_mass) {
        (0, _) => "none: every expert at full bits".to_string(),
        (_, Some(m)) => format!(
            "cold experts carry {:.1}% of the routing mass (profile)",
            100.0 * m
        ),
        (_, None) => {
            "not known here: convert profiles the source to choose the cold experts".to_string()
        }
    };
    Ok(PlannedOption {
        name: choice.name,
        convert: choice.convert_args,
        pack_bytes: f.file_bytes,
        dense_bytes: f.dense_bytes,
        expert_bytes: f.all_experts_bytes(),
        experts: f.experts.len() as u64,
        cold_experts: choice.cold_experts,
        cold_bits: choice.cold_bits,
        cold_mass: choice.cold_mass,
        quality,
        budgets,
    })
}

fn ram_words(machine: &Machine, given: bool) -> (String, String, &'static str) {
    (
        bytes(machine.usable, Style::RUN),
        bytes(machine.ram, Style::RUN),
        if given { " as --ram gives it" } else { "" },
    )
}

/// The error for a machine whose usable memory does not hold the dense weights and margin.
pub fn does_not_fit(e: BudgetError, machine: &Machine, given: bool) -> PlanError {
    let (usable, ram, given) = ram_words(machine, given);
    let BudgetError::TooSmall { dense, margin, .. } = e;
    PlanError::DoesNotFit {
        what: format!(
            "the dense weights ({}) with the KV cache and activations ({})",
            bytes(dense, Style::RUN),
            bytes(margin, Style::RUN)
        ),
        usable,
        ram,
        given,
        detail: "they stay resident under every expert budget; plan for more RAM, or a \
                 smaller --context"
            .into(),
    }
}

/// Errs when no option can run here: every expert does not fit and the most the machine holds
/// leaves a pool without room for one token's experts.
pub fn check_working_set(
    planned: &[PlannedOption],
    cfg: &ModelConfig,
    machine: &Machine,
    given: bool,
) -> Result<(), PlanError> {
    if planned.iter().any(|o| o.best().is_some()) {
        return Ok(());
    }
    let (usable, ram, given) = ram_words(machine, given);
    let resident = planned
        .first()
        .and_then(|o| o.budgets.iter().find(|b| b.row.label == "fits"))
        .map_or(0, |b| b.row.resident_experts);
    Err(PlanError::DoesNotFit {
        what: format!(
            "one token's experts ({} per sparse layer)",
            cfg.num_experts_per_tok
        ),
        usable,
        ram,
        given,
        detail: format!(
            "beside the dense weights and the runtime's margin there is room for {resident} \
             expert(s); plan for more RAM, or a smaller --context"
        ),
    })
}

/// The name a converted pack gets: the source's last path part.
fn pack_name(source: &str) -> String {
    let base = source
        .split('@')
        .next()
        .unwrap_or(source)
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or("model");
    let base = if base.is_empty() || base == "." || base == ".." {
        "model"
    } else {
        base
    };
    format!("{base}.flashpack")
}

/// A shell word: quoted unless plain.
fn shell(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./@:%+=".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

fn recommend(
    source: &str,
    kind: &ShadowKind,
    hub_pack: Option<&str>,
    options: &[PlannedOption],
    context: usize,
) -> Recommendation {
    let first = &options[0];
    let all_fit = first
        .budgets
        .iter()
        .find(|b| b.row.label == "100%")
        .filter(|b| b.row.fits);
    let (opt, row, why) = if let Some(row) = all_fit {
        (
            first,
            row,
            "every expert fits in memory: no streaming, the fastest and the most faithful".into(),
        )
    } else {
        let speed = |o: &PlannedOption| o.best().and_then(|b| b.decode_tokens_per_s);
        let base = speed(first).unwrap_or(0.0);
        let faster = options[1..]
            .iter()
            .filter(|o| speed(o).unwrap_or(0.0) >= base * MIX_SPEEDUP)
            .max_by(|a, b| speed(a).unwrap_or(0.0).total_cmp(&speed(b).unwrap_or(0.0)));
        match faster.or_else(|| first.best().map(|_| first)) {
            Some(o) if o.best().is_some() => {
                let row = o.best().expect("checked");
                let why = if std::ptr::eq(o, first) {
                    "the most this machine holds, streaming the rest; no smaller mix is \
                     predicted 1.5x faster"
                        .to_string()
                } else {
                    format!(
                        "predicted {:.1}x the faithful pack's decode speed; its quality cost is \
                         not known until it is converted",
                        speed(o).unwrap_or(0.0) / base.max(1e-9)
                    )
                };
                (o, row, why)
            }
            // A mix alone runs: `check_working_set` guarantees one option does.
            _ => {
                let o = options.iter().find(|o| o.best().is_some()).unwrap_or(first);
                let row = o.best().unwrap_or(&o.budgets[0]);
                (
                    o,
                    row,
                    "the only option whose working set fits this machine".to_string(),
                )
            }
        }
    };
    // A pack on the Hub runs once downloaded: by its file name.
    let pack = match (kind, hub_pack) {
        (ShadowKind::Pack(_), Some(file)) => file.rsplit('/').next().unwrap_or(file).to_string(),
        (ShadowKind::Pack(_), None) => source.to_string(),
        (ShadowKind::Checkpoint, _) => pack_name(source),
    };
    let mut run = format!("flashpack chat {}", shell(&pack));
    if !row.row.flag.is_empty() {
        run.push(' ');
        run.push_str(&row.row.flag);
    }
    run.push_str(&format!(" --max-context {context}"));
    let command = match &opt.convert {
        None => run,
        Some(args) => {
            let mut c = format!("flashpack convert {} -o {}", shell(source), shell(&pack));
            if !args.is_empty() {
                c.push(' ');
                c.push_str(args);
            }
            format!("{c} && {run}")
        }
    };
    let why = match hub_pack {
        Some(file) => format!("{why} (download {file} from {source} first)"),
        None => why,
    };
    Recommendation {
        command,
        option: opt.name.clone(),
        budget: row.row.label.clone(),
        decode_tokens_per_s: row.decode_tokens_per_s,
        why,
    }
}

/// The wired limit the recommended budget needs on a Mac.
fn wired_limit(options: &[PlannedOption], rec: &Recommendation, machine: &Machine) -> WiredLimit {
    let row = options
        .iter()
        .find(|o| o.name == rec.option)
        .and_then(|o| o.budgets.iter().find(|b| b.row.label == rec.budget));
    wired_limit_for(
        row.map_or(machine.usable, |b| b.row.memory_bytes),
        machine.ram,
    )
}

/// The limit `wired` bytes need on a Mac of `ram` bytes: nothing to set within
/// [`DEFAULT_WIRED_SHARE`] of RAM, which Metal's default allows on every Mac.
fn wired_limit_for(wired: u64, ram: u64) -> WiredLimit {
    let megabytes = wired.div_ceil(1 << 20);
    let within = wired as f64 <= ram as f64 * DEFAULT_WIRED_SHARE;
    let what = format!(
        "the run keeps {} wired (dense weights, expert slots, KV cache and activations: \
         Engine::new asks MLX to wire them, as mlx-lm does)",
        bytes(wired, Style::RUN)
    );
    if within {
        return WiredLimit {
            megabytes,
            command: String::new(),
            why: format!(
                "{what}, within Metal's default limit (two thirds to three quarters of RAM): \
                 nothing to set"
            ),
        };
    }
    WiredLimit {
        megabytes,
        command: format!("sudo sysctl iogpu.wired_limit_mb={megabytes}"),
        why: format!(
            "{what}; Metal refuses to wire more than iogpu.wired_limit_mb, about three quarters \
             of RAM by default, and the run then goes on unwired, paging under pressure. The \
             setting lasts until reboot (0 restores the default); {} stays for macOS",
            bytes(ram.saturating_sub(wired), Style::RUN)
        ),
    }
}

/// The share of RAM Metal lets a process wire by default on every Mac (its
/// `recommendedMaxWorkingSetSize` is about two thirds of RAM on small Macs, three quarters on
/// larger ones).
pub const DEFAULT_WIRED_SHARE: f64 = 2.0 / 3.0;

/// Everything [`assemble`] puts together.
pub struct Inputs<'a> {
    pub source: &'a str,
    pub kind: &'a ShadowKind,
    pub commit: Option<String>,
    pub cfg: &'a ModelConfig,
    pub machine: Machine,
    pub ram_given: bool,
    pub context: usize,
    pub mac: bool,
    pub log: &'a ReadLog,
    pub rates: Rates,
    pub origins: (Origin, Origin),
    pub options: Vec<PlannedOption>,
}

pub fn assemble(i: Inputs<'_>) -> PlanReport {
    let cfg = i.cfg;
    let hub_pack = match i.kind {
        ShadowKind::Pack(_) if i.commit.is_some() => i.log.per_file().keys().next().cloned(),
        _ => None,
    };
    let recommendation = recommend(i.source, i.kind, hub_pack.as_deref(), &i.options, i.context);
    let wired = i
        .mac
        .then(|| wired_limit(&i.options, &recommendation, &i.machine));
    PlanReport {
        source: i.source.to_string(),
        kind: match i.kind {
            ShadowKind::Pack(_) => "pack",
            ShadowKind::Checkpoint => "checkpoint",
        },
        commit: i.commit,
        model: ModelView {
            architecture: cfg.arch.model_type().to_string(),
            layers: cfg.num_hidden_layers,
            sparse_layers: cfg.sparse_layers().len(),
            experts: cfg.num_experts,
            experts_per_token: cfg.num_experts_per_tok,
            hidden_size: cfg.hidden_size,
            expert_width: cfg.moe_intermediate_size,
        },
        machine: MachineView {
            ram_bytes: i.machine.ram,
            ram_given: i.ram_given,
            usable_bytes: i.machine.usable,
            context: i.context,
            mac: i.mac,
        },
        read: ReadView {
            files: i.log.per_file(),
            total_bytes: i.log.total(),
            reads: i.log.reads.len(),
        },
        rates: RatesView {
            disk: i.rates.disk,
            disk_origin: i.origins.1,
            compute: i.rates.compute,
            compute_origin: i.origins.0,
        },
        options: i.options,
        recommendation,
        wired_limit: wired,
    }
}

fn tok_s(v: Option<f64>) -> String {
    match v {
        Some(x) if x >= 100.0 => format!("{x:.0}"),
        Some(x) => format!("{x:.1}"),
        None => "-".into(),
    }
}

fn origin(o: &Origin) -> &'static str {
    match o {
        Origin::Measured => "measured",
        Origin::Cached => "cached",
        Origin::Given => "given",
    }
}

impl PlanReport {
    /// The report as `plan` prints it: a summary, the options, the budgets of the recommended
    /// option, the command.
    pub fn text(&self) -> String {
        let m = &self.model;
        let b = |n: u64| bytes(n, Style::RUN);
        let mut out = String::new();
        out.push_str(&format!(
            "{} ({}{}): {}, {} layers ({} sparse), {} experts, {} per token\n",
            self.source,
            self.kind,
            self.commit
                .as_ref()
                .map_or(String::new(), |c| format!(" at {}", &c[..c.len().min(12)])),
            m.architecture,
            m.layers,
            m.sparse_layers,
            m.experts,
            m.experts_per_token
        ));
        out.push_str(&format!(
            "read: {} of {} file(s) (config, index, headers; no weights)\n",
            b(self.read.total_bytes),
            self.read.files.len()
        ));
        let mc = &self.machine;
        out.push_str(&format!(
            "memory: {} RAM{}, {} usable; KV cache for {} tokens\n",
            b(mc.ram_bytes),
            if mc.ram_given { " (--ram)" } else { "" },
            b(mc.usable_bytes),
            mc.context
        ));
        let r = &self.rates;
        out.push_str(&format!(
            "rates: a layer's misses {:.2} ms, then {:.2} GB/s ({}); compute {:.1} ms per \
             token with every expert resident, {:.1} ms streamed, {:.0} ms per {}-token prompt \
             ({})\n\n",
            r.disk.latency_s * 1e3,
            r.disk.bytes_per_s / 1e9,
            origin(&r.disk_origin),
            r.compute.decode_s * 1e3,
            r.compute.streamed_decode_s * 1e3,
            r.compute.prefill_s * 1e3,
            r.compute.chunk_tokens,
            origin(&r.compute_origin)
        ));
        out.push_str("| option | convert options | pack | cold experts | quality cost | all resident needs | best here | decode tok/s |\n");
        out.push_str("|---|---|---:|---:|---|---:|---|---:|\n");
        for o in &self.options {
            let all = o.budgets.iter().find(|x| x.row.label == "100%");
            let best = o.best();
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {}{} | {} | {} |\n",
                o.name,
                match &o.convert {
                    None => "(converted)".to_string(),
                    Some(a) if a.is_empty() => "(defaults)".to_string(),
                    Some(a) => format!("`{a}`"),
                },
                b(o.pack_bytes),
                o.cold_experts,
                o.quality,
                all.map_or("-".into(), |a| b(a.row.memory_bytes)),
                if all.is_some_and(|a| a.row.fits) {
                    ""
                } else {
                    " (does not fit)"
                },
                best.map_or("-".into(), |x| x.row.label.clone()),
                tok_s(best.and_then(|x| x.decode_tokens_per_s)),
            ));
        }
        let rec = &self.recommendation;
        if let Some(o) = self.options.iter().find(|o| o.name == rec.option) {
            out.push_str(&format!("\nbudgets of {}\n", o.name));
            out.push_str("| experts | run option | resident | memory | fits | hit rate | read per token | decode tok/s | prefill tok/s |\n");
            out.push_str("|---|---|---:|---:|---|---:|---:|---:|---:|\n");
            for x in &o.budgets {
                let row = &x.row;
                out.push_str(&format!(
                    "| {} | {} | {}/{} | {} | {} | {:.0}% ({}) | {} | {} | {} |\n",
                    row.label,
                    if row.flag.is_empty() {
                        "(none)".to_string()
                    } else {
                        format!("`{}`", row.flag)
                    },
                    row.resident_experts,
                    row.stored_experts,
                    b(row.memory_bytes),
                    if row.fits { "yes" } else { "no" },
                    100.0 * row.hit_rate,
                    match row.hit_model {
                        budgets::HitModel::Profile => "profile",
                        budgets::HitModel::Uniform => "uniform",
                        budgets::HitModel::Trace => "trace",
                    },
                    b(row.bytes_read_per_token as u64),
                    tok_s(x.decode_tokens_per_s),
                    tok_s(x.prefill_tokens_per_s),
                ));
            }
        }
        out.push_str(&format!(
            "\nrecommended ({}; {}):\n  {}\n",
            rec.option, rec.why, rec.command
        ));
        match &self.wired_limit {
            Some(w) if !w.command.is_empty() => out.push_str(&format!(
                "on a Mac, first:\n  {}\n  ({})\n",
                w.command, w.why
            )),
            Some(w) => out.push_str(&format!("on a Mac: {}\n", w.why)),
            None => {}
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GB: u64 = 1_000_000_000;

    #[test]
    fn a_mac_raises_its_wired_limit_only_past_the_default() {
        // 56 GB of a 64 GB Mac: past two thirds, so the limit is raised to exactly that.
        let w = wired_limit_for(56 * GB, 64 * GB);
        assert_eq!(w.megabytes, (56 * GB).div_ceil(1 << 20));
        assert_eq!(
            w.command,
            format!("sudo sysctl iogpu.wired_limit_mb={}", w.megabytes)
        );
        assert!(w.why.contains("stays for macOS"), "{}", w.why);
        // 20 GB of 64: the default allows it; lowering the limit would only hurt.
        let w = wired_limit_for(20 * GB, 64 * GB);
        assert!(w.command.is_empty());
        assert!(w.why.contains("nothing to set"), "{}", w.why);
    }
}
