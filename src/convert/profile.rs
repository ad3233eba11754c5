//! Profile stage: how the source model's routers use each expert on calibration text, and the
//! per-expert bit plan chosen from it.
//!
//! In: an opened [`Checkpoint`] with its tokenizer, calibration texts by task (the built-in set
//! of prose, code, math and chat in `fixtures/calibration/`, or `--calibration FILE`).
//! Out: a [`Profile`]: per sparse layer, how often each expert is selected (`counts`), the
//! routing weight it receives (`mass`), which experts are selected together for one token
//! (`coactivation`) and which expert of the next sparse layer follows (`transitions`), overall
//! and per task; stored in the pack as metadata `profile` (formats/flashpack-v1.md §4.3).
//! [`plan_bits`] turns it into bits per (layer, expert): the experts with the least routing
//! mass go cold.
//!
//! How it runs: the source itself, through the runtime's forward pass, with dense weights in
//! f32 and each layer's experts quantized at 8 bits when the router first reaches it
//! ([`crate::run::source`]). All calibration windows of a batch go through together, so each
//! layer is built once per batch and dropped when the next one is built: memory is the dense
//! weights in f32, about two layers of 8-bit experts and the activations of one batch.
//! Invariant: counts are exact integers from the router's top-k; the profile depends only on
//! the source, the texts and the window, never on thread count or timing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::{json, Value};

use super::load::Checkpoint;
use super::ConvertError;
use crate::mlx::{self, Array};
use crate::run::compute::{ComputeError, ExpertStore, Model, PoolRoute, Routing};
use crate::run::source::{SourceExperts, SourceWeights};

/// One task's calibration text.
#[derive(Clone, Debug)]
pub struct CalibrationText {
    pub task: String,
    pub text: String,
}

/// The built-in calibration set: prose, code, math, chat (see fixtures/calibration/README.md).
pub fn builtin_calibration() -> Vec<CalibrationText> {
    [
        (
            "prose",
            include_str!("../../fixtures/calibration/prose.txt"),
        ),
        ("code", include_str!("../../fixtures/calibration/code.txt")),
        ("math", include_str!("../../fixtures/calibration/math.txt")),
        ("chat", include_str!("../../fixtures/calibration/chat.txt")),
    ]
    .into_iter()
    .map(|(task, text)| CalibrationText {
        task: task.into(),
        text: text.into(),
    })
    .collect()
}

/// A calibration file: one task, named after the file's stem.
pub fn read_calibration(path: &Path) -> Result<Vec<CalibrationText>, ConvertError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConvertError::Io {
        path: path.display().to_string(),
        source,
    })?;
    if text.trim().is_empty() {
        return Err(ConvertError::Unsupported {
            what: format!("calibration file {} is empty", path.display()),
        });
    }
    let task = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "calibration".into());
    Ok(vec![CalibrationText { task, text }])
}

/// What the profile stage does and what the plan asks for.
#[derive(Clone, Debug, Default)]
pub struct PlanOptions {
    /// Profile even when no option needs it (to store the profile in the pack).
    pub profile: bool,
    /// Calibration text instead of the built-in set.
    pub calibration: Option<PathBuf>,
    /// Tokens per calibration window (0: 256, capped by the context length).
    pub window: usize,
    /// Merge this fraction of each layer's experts into others (needs the profile).
    pub merge_ratio: Option<f64>,
    /// After writing, evaluate the pack against the source on this text (convert report).
    pub eval_text: Option<PathBuf>,
}

/// Usage statistics of one sparse layer (empty for dense layers).
#[derive(Clone, Debug, Default, Serialize)]
pub struct LayerProfile {
    pub counts: Vec<u64>,
    pub mass: Vec<f64>,
    /// `coactivation[a][b]`: tokens for which a and b (a != b) were both selected.
    pub coactivation: Vec<Vec<u64>>,
    /// `transitions[a][b]`: tokens that selected a here and b in the next sparse layer.
    pub transitions: Vec<Vec<u64>>,
}

/// Counts and mass of one task.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TaskProfile {
    pub tokens: u64,
    pub layers: Vec<TaskLayer>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct TaskLayer {
    pub counts: Vec<u64>,
    pub mass: Vec<f64>,
}

/// The whole profile; `layers[l]` is model layer `l`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Profile {
    pub tokens: u64,
    pub window: usize,
    pub top_k: usize,
    /// How the source ran: "f32 dense, 8-bit group-32 experts" or the source's own codes.
    pub method: String,
    pub layers: Vec<LayerProfile>,
    pub tasks: BTreeMap<String, TaskProfile>,
}

impl Profile {
    fn new(layers: usize, sparse: &[usize], experts: usize, top_k: usize) -> Profile {
        let mut p = Profile {
            top_k,
            layers: vec![LayerProfile::default(); layers],
            ..Profile::default()
        };
        for &l in sparse {
            p.layers[l] = LayerProfile {
                counts: vec![0; experts],
                mass: vec![0.0; experts],
                coactivation: vec![vec![0; experts]; experts],
                transitions: vec![vec![0; experts]; experts],
            };
        }
        p
    }

    /// Share of its layer's routing mass for each expert of `layer` (0 when nothing routed).
    pub fn mass_share(&self, layer: usize) -> Vec<f64> {
        let m = &self.layers[layer].mass;
        let total: f64 = m.iter().sum();
        m.iter()
            .map(|x| if total > 0.0 { x / total } else { 0.0 })
            .collect()
    }

    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

/// An [`ExpertStore`] that records the router's choices and passes them on.
struct Recorder<'a, 'c> {
    inner: &'a mut SourceExperts<'c>,
    profile: &'a mut Profile,
    task: String,
    /// The previous sparse layer of this forward call and its top-k ids.
    last: Option<(usize, Vec<u32>)>,
}

impl Recorder<'_, '_> {
    fn record(&mut self, layer: usize, ids: &[u32], scores: &[f32]) {
        let k = self.profile.top_k.max(1);
        let tokens = (ids.len() / k) as u64;
        let task = self.profile.tasks.entry(self.task.clone()).or_default();
        if task.layers.len() < self.profile.layers.len() {
            task.layers
                .resize(self.profile.layers.len(), TaskLayer::default());
        }
        let n = self.profile.layers[layer].counts.len();
        let tl = &mut task.layers[layer];
        if tl.counts.len() != n {
            tl.counts = vec![0; n];
            tl.mass = vec![0.0; n];
        }
        let lp = &mut self.profile.layers[layer];
        for (row, srow) in ids.chunks(k).zip(scores.chunks(k)) {
            for (j, (&e, &s)) in row.iter().zip(srow).enumerate() {
                let e = e as usize;
                if e >= n {
                    continue;
                }
                lp.counts[e] += 1;
                lp.mass[e] += s as f64;
                tl.counts[e] += 1;
                tl.mass[e] += s as f64;
                for &other in &row[j + 1..] {
                    let o = other as usize;
                    if o < n && o != e {
                        lp.coactivation[e][o] += 1;
                        lp.coactivation[o][e] += 1;
                    }
                }
            }
        }
        if let Some((prev, prev_ids)) = self.last.take() {
            if prev < layer && prev_ids.len() == ids.len() {
                let pl = &mut self.profile.layers[prev];
                for (a_row, b_row) in prev_ids.chunks(k).zip(ids.chunks(k)) {
                    for &a in a_row {
                        for &b in b_row {
                            if (a as usize) < n && (b as usize) < n {
                                pl.transitions[a as usize][b as usize] += 1;
                            }
                        }
                    }
                }
            }
        }
        if layer
            == self
                .profile
                .layers
                .iter()
                .rposition(|l| !l.counts.is_empty())
                .unwrap_or(0)
        {
            self.profile.tokens += tokens;
            task.tokens += tokens;
        }
        self.last = Some((layer, ids.to_vec()));
    }
}

impl ExpertStore for Recorder<'_, '_> {
    fn route(&mut self, layer: usize, indices: &Array) -> Result<Vec<PoolRoute<'_>>, ComputeError> {
        self.inner.route(layer, indices)
    }

    fn route_scored(
        &mut self,
        layer: usize,
        routing: &Routing,
    ) -> Result<(Vec<PoolRoute<'_>>, Option<Array>), ComputeError> {
        mlx::eval(&[&routing.indices, &routing.scores])?;
        let ids = routing.indices.to_vec::<u32>()?;
        let scores = routing.scores.to_vec_f32()?;
        self.record(layer, &ids, &scores);
        Ok((self.inner.route(layer, &routing.indices)?, None))
    }
}

/// Windows of calibration tokens per forward call: at most this many windows together.
const BATCH_WINDOWS: usize = 8;

fn compute_err(e: ComputeError) -> ConvertError {
    ConvertError::Unsupported {
        what: format!("profile stage: {e}"),
    }
}

/// Runs `texts` through the source and records the routing of every sparse layer.
pub fn profile(
    ck: &Checkpoint,
    texts: &[CalibrationText],
    window: usize,
) -> Result<Profile, ConvertError> {
    let c = &ck.config;
    let tok_path = ck.root().join("tokenizer.json");
    if !tok_path.is_file() {
        return Err(ConvertError::Unsupported {
            what: format!(
                "profiling needs the source's tokenizer.json ({} is missing)",
                tok_path.display()
            ),
        });
    }
    let tok =
        tokenizers::Tokenizer::from_file(&tok_path).map_err(|e| ConvertError::Unsupported {
            what: format!("{}: {e}", tok_path.display()),
        })?;
    let mut window = if window == 0 { 256 } else { window };
    if let Some(ctx) = c.max_position_embeddings {
        window = window.min(ctx.max(2));
    }
    let weights = SourceWeights::load(ck).map_err(compute_err)?;
    let model = Model::load(c, &weights).map_err(compute_err)?;
    let mut experts = SourceExperts::new(ck, 1);
    let mut p = Profile::new(
        c.num_hidden_layers,
        &c.sparse_layers(),
        c.num_experts,
        c.num_experts_per_tok,
    );
    p.window = window;
    p.method = if ck.mlx_quantization.is_some() {
        "the source's own MLX codes".into()
    } else {
        format!(
            "dense weights in f32, experts quantized at {} bits (group {})",
            crate::run::source::REFERENCE_EXPERT_BITS,
            crate::run::source::REFERENCE_EXPERT_GROUP
        )
    };
    for t in texts {
        let ids = tok
            .encode(t.text.as_str(), false)
            .map_err(|e| ConvertError::Unsupported {
                what: format!("tokenizing calibration text {}: {e}", t.task),
            })?
            .get_ids()
            .to_vec();
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= c.vocab_size) {
            return Err(ConvertError::Unsupported {
                what: format!("the tokenizer produced id {bad} outside the vocabulary"),
            });
        }
        let full: Vec<&[u32]> = ids.chunks_exact(window).collect();
        let rest = &ids[full.len() * window..];
        let mut calls: Vec<Vec<&[u32]>> = full.chunks(BATCH_WINDOWS).map(|b| b.to_vec()).collect();
        if !rest.is_empty() {
            calls.push(vec![rest]);
        }
        for batch in calls {
            let len = batch[0].len();
            let flat: Vec<u32> = batch.iter().flat_map(|w| w.iter().copied()).collect();
            let tokens =
                Array::from_slice(&flat, &[batch.len(), len]).map_err(|e| compute_err(e.into()))?;
            let mut rec = Recorder {
                inner: &mut experts,
                profile: &mut p,
                task: t.task.clone(),
                last: None,
            };
            let mut kv = model.new_cache();
            // The last router was recorded when the forward pass asked for its experts; the
            // logits are never needed, so the rest of the graph is dropped unevaluated.
            drop(
                model
                    .forward(&tokens, &mut kv, &mut rec)
                    .map_err(compute_err)?,
            );
        }
    }
    Ok(p)
}

/// Bits per (layer, expert): `layers[l][e]`; dense layers have an empty list.
pub type BitPlan = Vec<Vec<u8>>;

/// Stored bytes of one expert at `bits` before entropy coding: codes, scales and biases of
/// gate, up and down.
pub fn expert_bytes(hidden: usize, inter: usize, bits: u8, group: usize, scale_size: usize) -> u64 {
    let w = (hidden * inter) as u64;
    3 * (w * bits as u64 / 8 + 2 * (w / group as u64) * scale_size as u64)
}

/// What the plan should achieve.
#[derive(Clone, Copy, Debug)]
pub enum ColdTarget {
    /// This fraction of all experts (rounded) goes cold.
    Fraction(f64),
    /// Cold experts until dense + experts fit this many bytes.
    Bytes { target: u64, dense: u64 },
}

/// Experts ordered coldest first: least share of their layer's routing mass, then fewest
/// selections, then (layer, expert) so the order is total and deterministic.
pub fn coldest_first(p: &Profile, sparse: &[usize]) -> Vec<(usize, usize)> {
    let mut all: Vec<(f64, u64, usize, usize)> = Vec::new();
    for &l in sparse {
        let share = p.mass_share(l);
        for (e, s) in share.iter().enumerate() {
            all.push((*s, p.layers[l].counts[e], l, e));
        }
    }
    all.sort_by(|a, b| {
        a.0.total_cmp(&b.0)
            .then(a.1.cmp(&b.1))
            .then(a.2.cmp(&b.2))
            .then(a.3.cmp(&b.3))
    });
    all.into_iter().map(|(_, _, l, e)| (l, e)).collect()
}

/// Chooses hot or cold bits per expert from the profile. `excluded` experts (merged away) are
/// not stored, so they neither count toward the size nor take a cold slot.
#[allow(clippy::too_many_arguments)]
pub fn plan_bits(
    p: &Profile,
    sparse: &[usize],
    layers: usize,
    experts: usize,
    hot: u8,
    cold: u8,
    target: ColdTarget,
    one_expert: impl Fn(u8) -> u64,
    excluded: &dyn Fn(usize, usize) -> bool,
) -> Result<BitPlan, ConvertError> {
    let mut plan: BitPlan = vec![Vec::new(); layers];
    for &l in sparse {
        plan[l] = vec![hot; experts];
    }
    let order: Vec<(usize, usize)> = coldest_first(p, sparse)
        .into_iter()
        .filter(|&(l, e)| !excluded(l, e))
        .collect();
    match target {
        ColdTarget::Fraction(f) => {
            if !(0.0..=1.0).contains(&f) {
                return Err(ConvertError::Unsupported {
                    what: format!("--cold-fraction {f}: give a fraction between 0 and 1"),
                });
            }
            let n = (f * order.len() as f64).round() as usize;
            for &(l, e) in &order[..n] {
                plan[l][e] = cold;
            }
        }
        ColdTarget::Bytes { target, dense } => {
            let (hb, cb) = (one_expert(hot), one_expert(cold));
            let mut size = dense + hb * order.len() as u64;
            let mut cold_n = 0;
            while size > target && cold_n < order.len() {
                let (l, e) = order[cold_n];
                plan[l][e] = cold;
                size = size - hb + cb;
                cold_n += 1;
            }
            if size > target {
                return Err(ConvertError::Unsupported {
                    what: format!(
                        "--target-size {:.4} GB cannot be reached: with every expert at {cold} \
                         bits the weights take {:.4} GB; lower --dense-bits or raise the target",
                        target as f64 / 1e9,
                        size as f64 / 1e9
                    ),
                });
            }
        }
    }
    Ok(plan)
}

/// The plan as metadata `quantization.expert_plan` (one array per layer).
pub fn plan_json(plan: &BitPlan) -> Value {
    json!(plan)
}

/// Whether the options need the profile stage.
pub fn needed(opts: &super::ConvertOptions) -> bool {
    opts.plan.profile
        || opts.plan.calibration.is_some()
        || opts.cold_fraction.is_some()
        || opts.target_size_gb.is_some()
        || opts.merge_threshold.is_some()
        || opts.plan.merge_ratio.is_some()
}

/// The profile stage of convert: `None` when no option needs it.
pub fn stage(
    ck: &Checkpoint,
    opts: &super::ConvertOptions,
) -> Result<Option<Profile>, ConvertError> {
    if !needed(opts) {
        return Ok(None);
    }
    let texts = match &opts.plan.calibration {
        Some(path) => read_calibration(path)?,
        None => builtin_calibration(),
    };
    profile(ck, &texts, opts.plan.window).map(Some)
}

/// The bit plan the options ask for, or `None` for uniform `expert_bits`. `dense` is the bytes
/// of the dense tensors as stored before entropy coding; `excluded` experts are not stored.
pub fn bit_plan(
    ck: &Checkpoint,
    opts: &super::ConvertOptions,
    profile: Option<&Profile>,
    dense: u64,
    excluded: &dyn Fn(usize, usize) -> bool,
) -> Result<Option<BitPlan>, ConvertError> {
    let target = match (opts.cold_fraction, opts.target_size_gb) {
        (Some(f), _) => ColdTarget::Fraction(f),
        (None, Some(gb)) => ColdTarget::Bytes {
            target: (gb * 1e9) as u64,
            dense,
        },
        (None, None) => return Ok(None),
    };
    let p = profile.ok_or_else(|| ConvertError::Unsupported {
        what: "mixed precision needs the profile".into(),
    })?;
    let c = &ck.config;
    let scale_size = c
        .sparse_layers()
        .first()
        .and_then(|&l| ck.expert(l, 0).ok())
        .map(|x| match x.gate {
            super::quantize::ProjSource::Float(m) => m.dtype.size(),
            super::quantize::ProjSource::Quantized(q) => q.scale_dtype.size(),
        })
        .unwrap_or(2);
    let (h, i, g) = (c.hidden_size, c.moe_intermediate_size, opts.group_size);
    plan_bits(
        p,
        &c.sparse_layers(),
        c.num_hidden_layers,
        c.num_experts,
        opts.expert_bits,
        opts.cold_bits.unwrap_or(2),
        target,
        |b| expert_bytes(h, i, b, g, scale_size),
        excluded,
    )
    .map(Some)
}

/// What `flashpack inspect` shows of a pack's profile.
#[derive(Clone, Debug, Serialize)]
pub struct ProfileView {
    pub tokens: u64,
    /// Tokens per calibration task.
    pub tasks: BTreeMap<String, u64>,
    pub layers: Vec<LayerView>,
}

/// One sparse layer of [`ProfileView`].
#[derive(Clone, Debug, Serialize)]
pub struct LayerView {
    pub layer: usize,
    /// Share of the routing mass that goes to the hottest quarter of the experts.
    pub top_quarter_share: f64,
    /// exp(entropy) of the mass shares: how many experts the layer effectively uses.
    pub effective_experts: f64,
    /// The four hottest experts and their mass shares.
    pub hottest: Vec<(usize, f64)>,
    /// Experts stored at fewer bits than the layer's most, and experts merged away.
    pub cold: usize,
    pub merged: usize,
}

/// Summarizes metadata `profile` (with `quantization.expert_plan` and `merge_map` if present).
pub fn view(meta: &Value) -> Option<ProfileView> {
    let p = meta.get("profile")?;
    let layers = p.get("layers")?.as_array()?;
    let plan = meta
        .get("quantization")
        .and_then(|q| q.get("expert_plan"))
        .and_then(|v| serde_json::from_value::<Vec<Vec<u8>>>(v.clone()).ok());
    let merge = meta
        .get("merge_map")
        .and_then(|v| serde_json::from_value::<Vec<Vec<u32>>>(v.clone()).ok());
    let mut out = Vec::new();
    for (l, lp) in layers.iter().enumerate() {
        let mass: Vec<f64> = match lp.get("mass").and_then(Value::as_array) {
            Some(m) if !m.is_empty() => m.iter().filter_map(Value::as_f64).collect(),
            _ => continue,
        };
        let total: f64 = mass.iter().sum();
        let share: Vec<f64> = mass
            .iter()
            .map(|m| if total > 0.0 { m / total } else { 0.0 })
            .collect();
        let mut order: Vec<usize> = (0..share.len()).collect();
        order.sort_by(|&a, &b| share[b].total_cmp(&share[a]).then(a.cmp(&b)));
        let quarter = share.len().div_ceil(4);
        let entropy: f64 = share
            .iter()
            .filter(|&&s| s > 0.0)
            .map(|&s| -s * s.ln())
            .sum();
        let cold = plan.as_ref().and_then(|p| p.get(l)).map_or(0, |bits| {
            let max = bits.iter().copied().max().unwrap_or(0);
            bits.iter().filter(|&&b| b < max).count()
        });
        let merged = merge.as_ref().and_then(|m| m.get(l)).map_or(0, |m| {
            m.iter()
                .enumerate()
                .filter(|&(e, &s)| s as usize != e)
                .count()
        });
        out.push(LayerView {
            layer: l,
            top_quarter_share: order[..quarter].iter().map(|&e| share[e]).sum(),
            effective_experts: entropy.exp(),
            hottest: order.iter().take(4).map(|&e| (e, share[e])).collect(),
            cold,
            merged,
        });
    }
    let tasks = p
        .get("tasks")
        .and_then(Value::as_object)
        .map(|t| {
            t.iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        v.get("tokens").and_then(Value::as_u64).unwrap_or(0),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    Some(ProfileView {
        tokens: p.get("tokens").and_then(Value::as_u64).unwrap_or(0),
        tasks,
        layers: out,
    })
}
