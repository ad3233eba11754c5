//! Budget stage of `flashpack plan`: a pack's facts and the machine's memory -> what each expert
//! budget holds and reads per token.
//!
//! In: [`Facts`], the RAM the run may use ([`Machine`]), the context to plan for. Out: one
//! [`Row`] per budget: the `run` option that sets it, experts resident, the memory it takes,
//! the expected hit rate, misses and bytes read per decoded token and per prompt chunk. Pure.
//! Invariant: what fits is decided by the runtime's own rules: `run::budget::plan` divides a
//! `--mem-budget` (dense weights, KV cache, activations, logits, then experts) exactly as
//! `Engine::new` does, and `run::budget::pool_slots` gives each pool its slots as the expert
//! cache does, so `plan` and `run` agree on what fits.
//!
//! The routing model: a sparse layer picks expert `e` for a token with probability
//! `p = k x share(e)` (capped at 1), `share` its part of the layer's routing mass in the pack's
//! profile, or `1/E` without one (uniform routing: the floor, since real routing is skewed and
//! a cache of the most-used experts then hits more). The cache is taken to hold the experts of
//! highest `p` (what the profile-weighted policy aims at); a routed expert outside them misses.
//! A prompt chunk of `C` tokens needs expert `e` with probability `1 - (1 - p)^C`.
//! Where the pack's profile has a routing trace, decode's figures (hit rate, misses, bytes and
//! layers with a miss per token) come from replaying it through the runtime's cache instead
//! ([`super::replay`]); prompt chunks keep the model above.

use super::model::Facts;
use crate::run::budget::{self, Budget, BudgetError, Needs, Plan, Size};

/// The memory a plan may use.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Machine {
    /// Physical RAM (this machine's, or `--ram`).
    pub ram: u64,
    /// What a run may take of it: RAM less [`reserve`], left to the system and other programs.
    pub usable: u64,
}

/// Memory left to the system: a quarter of RAM, at least 2 GiB and at most 8 GiB (16 GB
/// keeps 4 GB, 64 GB keeps 8 GB: the 8-16 GB commonly left to macOS when its GPU limit is
/// raised, and a desktop's share on Linux).
pub fn reserve(ram: u64) -> u64 {
    (ram / 4).clamp(2 << 30, 8 << 30).min(ram)
}

impl Machine {
    pub fn with_ram(ram: u64) -> Machine {
        Machine {
            ram,
            usable: ram - reserve(ram),
        }
    }
}

/// Where the hit rate comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HitModel {
    /// The pack's routing profile.
    Profile,
    /// Every expert of a layer equally likely.
    Uniform,
    /// The profile's routing trace replayed through the runtime's cache (`plan::replay`).
    Trace,
}

/// One expert budget.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Row {
    /// `100%`, `50%`, ..., or `fits` (the most this machine holds).
    pub label: String,
    /// The `run` option that gives this budget (empty: every expert resident).
    pub flag: String,
    /// The expert cache's bytes; `None`: every expert resident, no streaming.
    pub expert_budget_bytes: Option<u64>,
    pub resident_experts: u64,
    pub stored_experts: u64,
    /// Dense weights, resident experts, KV cache for the context, activations and logits.
    pub memory_bytes: u64,
    /// `memory_bytes` within the machine's usable memory.
    pub fits: bool,
    /// Each pool has room for one token's experts (what `run` requires to start).
    pub runnable: bool,
    pub hit_rate: f64,
    pub hit_model: HitModel,
    /// Expected experts read per decoded token, and their bytes.
    pub misses_per_token: f64,
    pub bytes_read_per_token: f64,
    /// Sparse layers, and the expected ones with at least one miss per token.
    pub sparse_layers: usize,
    pub layers_missing_per_token: f64,
    /// Expected experts read per prompt chunk of [`Row::chunk_tokens`] tokens, their bytes,
    /// and the layers with a miss.
    pub chunk_tokens: usize,
    pub misses_per_chunk: f64,
    pub bytes_read_per_chunk: f64,
    pub layers_missing_per_chunk: f64,
}

/// What the runtime sets aside beside the experts, for `context` positions: as
/// `Engine::new` builds its [`Needs`].
pub fn needs_plan(
    facts: &Facts,
    ram: u64,
    context: usize,
    mem: Option<&Budget>,
    expert: Option<&Budget>,
) -> Result<Plan, BudgetError> {
    let cfg = &facts.cfg;
    let positions = budget::planned_positions(cfg, context);
    let kv = |chunk: u64| budget::kv_bytes_for_chunk(cfg, positions, None, 0, chunk);
    budget::plan(
        mem,
        expert,
        &Needs {
            ram,
            dense: facts.dense_bytes,
            all_experts: facts.all_experts_bytes(),
            per_token: budget::activation_bytes_per_token(cfg),
            logits: budget::logits_bytes(cfg),
            kv: &kv,
        },
    )
}

/// Each pool's slots under `experts` bytes (`None`: all).
pub fn slots(facts: &Facts, experts: Option<u64>) -> Vec<u32> {
    let pools: Vec<(u32, u64)> = facts
        .pools
        .iter()
        .map(|p| (p.stored, p.resident_bytes))
        .collect();
    budget::pool_slots(experts, &pools)
}

/// Per sparse layer, each stored expert's probability of being routed per token.
fn routing(facts: &Facts) -> (Vec<(usize, usize, f64)>, HitModel) {
    let cfg = &facts.cfg;
    let k = cfg.num_experts_per_tok as f64;
    let mut out = Vec::new();
    let model = if facts.profile.is_some() {
        HitModel::Profile
    } else {
        HitModel::Uniform
    };
    for l in cfg.sparse_layers() {
        let share = facts.profile.as_ref().and_then(|p| p.get(&l));
        let mut stored: std::collections::BTreeMap<usize, f64> = Default::default();
        for e in 0..cfg.num_experts {
            let s = share.map_or(1.0 / cfg.num_experts as f64, |s| {
                s.get(e).copied().unwrap_or(0.0)
            });
            *stored.entry(facts.stored(l, e)).or_default() += s;
        }
        for (e, s) in stored {
            out.push((l, e, (k * s).min(1.0)));
        }
    }
    (out, model)
}

/// The row of an expert budget of `experts` bytes (`None`: all resident, no streaming).
#[allow(clippy::too_many_arguments)]
fn row(
    facts: &Facts,
    machine: &Machine,
    label: &str,
    flag: String,
    experts: Option<u64>,
    margin: u64,
    chunk: usize,
) -> Row {
    let slots = slots(facts, experts);
    let (probs, hit_model) = routing(facts);
    // The most likely experts of each pool are resident (ties: layer then expert order).
    let mut resident = std::collections::BTreeSet::new();
    for (pool, &n) in slots.iter().enumerate() {
        let mut mine: Vec<&(usize, usize, f64)> = probs
            .iter()
            .filter(|(l, e, _)| facts.experts.get(&(*l, *e)) == Some(&pool))
            .collect();
        mine.sort_by(|a, b| b.2.total_cmp(&a.2).then((a.0, a.1).cmp(&(b.0, b.1))));
        for (l, e, _) in mine.into_iter().take(n as usize) {
            resident.insert((*l, *e));
        }
    }
    let read_of = |l: usize, e: usize| {
        facts
            .experts
            .get(&(l, e))
            .map_or(0, |&p| facts.pools[p].read_bytes) as f64
    };
    let (mut wanted, mut missed, mut bytes) = (0.0, 0.0, 0.0);
    let (mut chunk_missed, mut chunk_bytes) = (0.0, 0.0);
    let mut layer_miss: std::collections::BTreeMap<usize, (f64, f64)> = Default::default();
    for &(l, e, p) in &probs {
        wanted += p;
        let entry = layer_miss.entry(l).or_insert((0.0, 0.0));
        if !resident.contains(&(l, e)) {
            let pc = 1.0 - (1.0 - p).powi(chunk as i32);
            missed += p;
            bytes += p * read_of(l, e);
            chunk_missed += pc;
            chunk_bytes += pc * read_of(l, e);
            entry.0 += p;
            entry.1 += pc;
        }
    }
    // A layer with m expected misses has at least one with probability about 1 - e^-m.
    let any = |m: f64| 1.0 - (-m).exp();
    let resident_bytes: u64 = facts
        .pools
        .iter()
        .zip(&slots)
        .map(|(p, &n)| n as u64 * p.resident_bytes)
        .sum();
    let memory_bytes = facts.dense_bytes + resident_bytes + margin;
    let k = facts.cfg.num_experts_per_tok;
    let runnable = facts
        .pools
        .iter()
        .zip(&slots)
        .all(|(p, &n)| n as usize >= k.min(p.stored as usize));
    // With a routing trace, decode's figures are the runtime's cache replaying it.
    let replayed = experts
        .and(facts.trace.as_ref())
        .and_then(|t| super::replay::replay(facts, &slots, t));
    let (hit_rate, hit_model) = match &replayed {
        Some(r) => {
            missed = r.misses_per_token;
            bytes = r.bytes_read_per_token;
            (r.hit_rate, HitModel::Trace)
        }
        None if wanted > 0.0 => (1.0 - missed / wanted, hit_model),
        None => (1.0, hit_model),
    };
    let layers_missing_per_token = match &replayed {
        Some(r) => r.layers_missing_per_token,
        None => layer_miss.values().map(|m| any(m.0)).sum(),
    };
    Row {
        label: label.to_string(),
        flag,
        expert_budget_bytes: experts,
        resident_experts: slots.iter().map(|&n| n as u64).sum(),
        stored_experts: facts.experts.len() as u64,
        memory_bytes,
        fits: memory_bytes <= machine.usable,
        runnable,
        hit_rate,
        hit_model,
        misses_per_token: missed,
        bytes_read_per_token: bytes,
        sparse_layers: layer_miss.len(),
        layers_missing_per_token,
        chunk_tokens: chunk,
        misses_per_chunk: chunk_missed,
        bytes_read_per_chunk: chunk_bytes,
        layers_missing_per_chunk: layer_miss.values().map(|m| any(m.1)).sum(),
    }
}

/// The shares of the experts `plan` tabulates, in percent.
pub const SHARES: [f64; 4] = [100.0, 50.0, 25.0, 12.0];

/// The rows of `SHARES` (`--expert-budget P%`; 100%: no option, every expert resident), and,
/// when the 100% row does not fit, the most the machine holds (`--mem-budget` of its usable
/// memory).
/// `chunk`: the prompt tokens per forward call the prefill figures assume.
/// Errors: the usable memory does not hold the dense weights and the runtime's margin
/// ([`BudgetError::TooSmall`]).
pub fn rows(
    facts: &Facts,
    machine: &Machine,
    context: usize,
    chunk: usize,
) -> Result<Vec<Row>, BudgetError> {
    let mut out = Vec::new();
    for share in SHARES {
        let (flag, expert) = if share >= 100.0 {
            (String::new(), None)
        } else {
            let b = Budget {
                text: format!("{share}%"),
                size: Size::Percent(share),
            };
            (format!("--expert-budget {share}%"), Some(b))
        };
        let plan = needs_plan(facts, machine.ram, context, None, expert.as_ref())?;
        out.push(row(
            facts,
            machine,
            &format!("{share}%"),
            flag,
            plan.experts,
            plan.margin,
            chunk,
        ));
    }
    // Unless every expert fits as it is, what `--mem-budget` of the usable memory gives (all
    // experts still, where a budget's smaller prefill chunk leaves room for them).
    let mem = mem_budget(machine.usable);
    let plan = needs_plan(facts, machine.ram, context, Some(&mem), None)?;
    if !out[0].fits {
        out.push(row(
            facts,
            machine,
            "fits",
            format!("--mem-budget {}", mem.text),
            plan.experts,
            plan.margin,
            chunk,
        ));
    }
    Ok(out)
}

/// `--mem-budget` of `bytes`, written as `run` reads it (whole MiB).
pub fn mem_budget(bytes: u64) -> Budget {
    let mib = bytes >> 20;
    Budget {
        text: format!("{mib}MiB"),
        size: Size::Bytes(mib << 20),
    }
}
