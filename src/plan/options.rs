//! Options stage of `flashpack plan`: the conversions worth making of a checkpoint, sized by
//! convert's own planning.
//!
//! In: an opened checkpoint (headers) or pack, the machine. Out: [`Choice`]s: for a pack, the
//! pack itself; for a checkpoint, the faithful conversion (uniform 4-bit experts, convert's
//! defaults) and mixes of 4-bit hot and 2-bit cold experts at target sizes, as
//! `convert --target-size` makes them: `convert::profile::plan_bits` picks how many experts go
//! cold, `convert::size::pack_sizes` sizes the result. The targets: the size whose experts all
//! fit the machine's memory beside the dense weights and the runtime's margin, and three
//! quarters and three fifths of the faithful pack, each where it lies between the faithful
//! size and every expert cold.
//! Invariant: nothing here reads a weight. A checkpoint has no routing profile, so which
//! experts a mix sends cold (convert profiles the source to choose) and what that costs in
//! quality are not known here; the size is, since it depends only on how many.

use super::model::{self, Facts};
use super::read::Shadow;
use super::PlanError;
use crate::arch::ModelConfig;
use crate::convert::load::Checkpoint;
use crate::convert::profile::{self, ColdTarget, LayerProfile, Profile};
use crate::convert::size::pack_sizes;
use crate::convert::ConvertOptions;
use crate::format::Pack;

/// What `plan` opened. One value per command, moved once: the size difference costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Opened {
    Pack(Box<Pack>),
    Checkpoint(Box<Checkpoint>),
}

impl Opened {
    pub fn config(&self) -> ModelConfig {
        match self {
            Opened::Pack(p) => p.meta().model.clone(),
            Opened::Checkpoint(ck) => ck.config.clone(),
        }
    }
}

/// One way to have the model on disk.
#[derive(Clone, Debug)]
pub struct Choice {
    /// `this pack`, `faithful 4-bit`, `mix 4/2-bit at 12.5 GB`.
    pub name: String,
    /// The options `convert` takes for it (`None`: a pack, already converted).
    pub convert_args: Option<String>,
    pub facts: Facts,
    /// Experts stored at fewer bits than the most, and those bits.
    pub cold_experts: u64,
    pub cold_bits: Option<u8>,
    /// The share of the routing mass the cold experts carry, from a profile (the pack's).
    pub cold_mass: Option<f64>,
}

/// Bytes of the metadata section, guessed: the config, and the tokenizer zstd-compressed
/// about three to one (it is most of the metadata).
fn metadata_guess(shadow: &Shadow) -> u64 {
    shadow.files.get("config.json").copied().unwrap_or(0) + shadow.tokenizer_bytes / 3 + 4096
}

/// Cold experts of a pack (bits below its most) and their share of the routing mass.
fn pack_cold(pack: &Pack, facts: &Facts) -> (u64, Option<u8>, Option<f64>) {
    let Some(plan) = pack.meta().quantization.expert_plan.as_ref() else {
        return (0, None, None);
    };
    let most = plan.iter().flatten().copied().max().unwrap_or(0);
    let mut cold = 0u64;
    let mut bits = None;
    let mut mass = 0.0;
    let mut layers = 0usize;
    for (l, row) in plan.iter().enumerate() {
        if row.is_empty() {
            continue;
        }
        layers += 1;
        let share = facts.profile.as_ref().and_then(|p| p.get(&l));
        for (e, &b) in row.iter().enumerate() {
            if b < most {
                cold += 1;
                bits = Some(b);
                mass += share.and_then(|s| s.get(e)).copied().unwrap_or(0.0);
            }
        }
    }
    let mass = facts.profile.as_ref().map(|_| mass / layers.max(1) as f64);
    (cold, bits, mass)
}

/// The pack itself, or a checkpoint's faithful conversion.
pub fn main_option(opened: &Opened, shadow: &Shadow) -> Result<Choice, PlanError> {
    Ok(match opened {
        Opened::Pack(pack) => {
            let facts = model::of_pack(pack);
            let (cold_experts, cold_bits, cold_mass) = pack_cold(pack, &facts);
            Choice {
                name: "this pack".into(),
                convert_args: None,
                facts,
                cold_experts,
                cold_bits,
                cold_mass,
            }
        }
        Opened::Checkpoint(ck) => {
            let opts = ConvertOptions::default();
            let sizes = pack_sizes(ck, &opts, None, metadata_guess(shadow))?;
            Choice {
                name: format!("faithful {}-bit", opts.expert_bits),
                convert_args: Some(String::new()),
                facts: model::of_conversion(&ck.config, &sizes),
                cold_experts: 0,
                cold_bits: None,
                cold_mass: Some(0.0),
            }
        }
    })
}

/// `bytes` as `--target-size` takes it (GB, decimal), rounded down to three significant
/// digits or more.
fn target_gb(bytes: u64) -> String {
    let gb = bytes as f64 / 1e9;
    let decimals = if gb >= 100.0 {
        1
    } else if gb >= 1.0 {
        2
    } else {
        4
    };
    let scale = 10f64.powi(decimals);
    format!("{:.*}", decimals as usize, (gb * scale).floor() / scale)
}

/// The mixes of a checkpoint worth listing beside `faithful` (see the module doc); none for a
/// pack.
pub fn mixes(
    opened: &Opened,
    shadow: &Shadow,
    faithful: &Choice,
    machine: &super::budgets::Machine,
    context: usize,
) -> Result<Vec<Choice>, PlanError> {
    let Opened::Checkpoint(ck) = opened else {
        return Ok(Vec::new());
    };
    let c = &ck.config;
    let base = ConvertOptions::default();
    let cold = 2u8;
    let f = &faithful.facts;
    let Some(pool) = f.main_pool() else {
        return Ok(Vec::new());
    };
    let (h, i, g) = (
        c.expert_hidden_size(),
        c.moe_intermediate_size,
        base.group_size,
    );
    let scale_size = pool.scale_dtype.size();
    let one = |b: u8| profile::expert_bytes(h, i, b, g, scale_size);
    let n = f.experts.len() as u64;
    let floor = f.dense_bytes + n * one(cold);
    let faithful_bytes = f.dense_bytes + n * one(base.expert_bits);
    // Every expert resident beside the dense weights and the margin `run --mem-budget` of the
    // usable memory sets aside.
    let mem = super::budgets::mem_budget(machine.usable);
    let margin = super::budgets::needs_plan(f, machine.ram, context, Some(&mem), None)
        .map(|p| p.margin)
        .unwrap_or(0);
    let fit = machine.usable.saturating_sub(margin);
    let mut targets: Vec<u64> = vec![fit, faithful_bytes * 3 / 4, faithful_bytes * 3 / 5];
    targets.retain(|&t| t > floor && t < faithful_bytes * 97 / 100);
    targets.sort_unstable_by(|a, b| b.cmp(a));
    targets.dedup_by(|a, b| (*b as f64) < *a as f64 * 1.05);
    // A uniform profile: the count of cold experts, which is all the size depends on.
    let sparse = c.sparse_layers();
    let mut uniform = Profile {
        layers: vec![LayerProfile::default(); c.num_hidden_layers],
        ..Profile::default()
    };
    for &l in &sparse {
        uniform.layers[l].counts = vec![1; c.num_experts];
        uniform.layers[l].mass = vec![1.0; c.num_experts];
    }
    let mut out = Vec::new();
    for t in targets {
        let gb = target_gb(t);
        let target = (gb.parse::<f64>().unwrap_or(0.0) * 1e9) as u64;
        let plan = profile::plan_bits(
            &uniform,
            &sparse,
            c.num_hidden_layers,
            c.num_experts,
            base.expert_bits,
            cold,
            ColdTarget::Bytes {
                target,
                dense: f.dense_bytes,
            },
            one,
            &|_, _| false,
        );
        let Ok(plan) = plan else { continue };
        let opts = ConvertOptions {
            cold_bits: Some(cold),
            target_size_gb: Some(target as f64 / 1e9),
            ..ConvertOptions::default()
        };
        let sizes = pack_sizes(ck, &opts, Some(&plan), metadata_guess(shadow))?;
        let cold_experts = plan.iter().flatten().filter(|&&b| b == cold).count() as u64;
        out.push(Choice {
            name: format!("mix {}/{cold}-bit at {gb} GB", base.expert_bits),
            convert_args: Some(format!("--target-size {gb}")),
            facts: model::of_conversion(c, &sizes),
            cold_experts,
            cold_bits: Some(cold),
            cold_mass: None,
        });
    }
    Ok(out)
}
