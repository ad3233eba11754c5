//! Merge stage: near-duplicate experts of one layer become one stored expert.
//!
//! In: the checkpoint's expert weights, the profile (selection counts weight the averages and
//! pick which id is kept), and `--merge-threshold` (cosine similarity) or `--merge-ratio`
//! (fraction of each layer's experts merged away). Out: a [`MergePlan`]: per layer, the stored
//! expert computing each router expert (metadata `merge_map`, formats/flashpack-v1.md §4.3),
//! and for each kept expert the members whose weights it averages.
//! How: each expert is the vector gate|up|down (f32). Clusters start as single experts; the two
//! clusters whose count-weighted mean vectors have the highest cosine similarity merge, again
//! and again, until the best similarity falls below the threshold or the ratio is reached. A
//! merged expert's weights are the count-weighted (counts + 1, so unrouted experts still count
//! a little) mean of its members. The kept id is the member with the most routing mass.
//! The runtime applies the map after the router's top-k: two routed experts that share a stored
//! expert run it twice with their own weights, which is the same as running it once with the
//! weights added.
//! Invariant: deterministic (ties broken by the lowest ids); memory is one layer of experts in
//! f32 while planning, one expert while writing.

use rayon::prelude::*;
use serde::Serialize;
use serde_json::{json, Value};

use super::load::Checkpoint;
use super::profile::Profile;
use super::quantize::{BiasVector, ExpertBiases, ExpertProjections, ProjSource};
use super::tensor::{FloatDtype, MatrixView};
use super::{ConvertError, ConvertOptions};

/// Which stored expert computes each router expert, and what each stored expert averages.
#[derive(Clone, Debug, Serialize)]
pub struct MergePlan {
    /// `map[l][e]`: the stored expert of router expert `e` in layer `l` (identity for dense
    /// layers and unmerged experts).
    pub map: Vec<Vec<u32>>,
    /// Per layer: how many experts were merged away.
    pub merged: Vec<usize>,
    /// Per layer: the cosine similarity of each merge, in order.
    pub similarities: Vec<Vec<f64>>,
    /// Averaging weights per router expert (counts + 1).
    #[serde(skip)]
    weights: Vec<Vec<f64>>,
}

impl MergePlan {
    /// Whether expert `e` of layer `l` is stored (it is its own representative).
    pub fn is_stored(&self, l: usize, e: usize) -> bool {
        self.map
            .get(l)
            .and_then(|m| m.get(e))
            .is_none_or(|&s| s as usize == e)
    }

    /// Router experts computed by stored expert `e` of layer `l` (itself included), ascending.
    pub fn members(&self, l: usize, e: usize) -> Vec<usize> {
        self.map[l]
            .iter()
            .enumerate()
            .filter(|&(_, &s)| s as usize == e)
            .map(|(i, _)| i)
            .collect()
    }

    pub fn to_json(&self) -> Value {
        json!(self.map)
    }

    pub fn summary(&self) -> Value {
        json!({ "merged_per_layer": self.merged, "similarities": self.similarities })
    }
}

fn io(e: super::load::LoadError) -> ConvertError {
    ConvertError::Load(e)
}

fn expert_f32(ck: &Checkpoint, l: usize, e: usize) -> Result<[Vec<f32>; 3], ConvertError> {
    let x = ck.expert(l, e).map_err(io)?;
    Ok([x.gate.to_f32(), x.up.to_f32(), x.down.to_f32()])
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x as f64, y as f64);
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    if aa == 0.0 || bb == 0.0 {
        return 0.0;
    }
    ab / (aa.sqrt() * bb.sqrt())
}

/// Plans the merges the options ask for, or `None`.
pub fn stage(
    ck: &Checkpoint,
    opts: &ConvertOptions,
    profile: Option<&Profile>,
) -> Result<Option<MergePlan>, ConvertError> {
    let (threshold, ratio) = (opts.merge_threshold, opts.plan.merge_ratio);
    if threshold.is_none() && ratio.is_none() {
        return Ok(None);
    }
    if let Some(t) = threshold {
        if !(-1.0..=1.0).contains(&t) {
            return Err(ConvertError::BadOption {
                option: "--merge-threshold",
                value: t.to_string(),
                why: "a cosine similarity lies in [-1, 1]".into(),
            });
        }
    }
    if let Some(r) = ratio {
        if !(0.0..1.0).contains(&r) {
            return Err(ConvertError::BadOption {
                option: "--merge-ratio",
                value: r.to_string(),
                why: "give a fraction in [0, 1)".into(),
            });
        }
    }
    let p = profile.ok_or_else(|| ConvertError::Internal {
        what: "merging was planned without a profile".into(),
    })?;
    let c = &ck.config;
    let n = c.num_experts;
    let mut plan = MergePlan {
        map: (0..c.num_hidden_layers)
            .map(|_| (0..n as u32).collect())
            .collect(),
        merged: vec![0; c.num_hidden_layers],
        similarities: vec![Vec::new(); c.num_hidden_layers],
        weights: vec![vec![1.0; n]; c.num_hidden_layers],
    };
    for l in c.sparse_layers() {
        let counts = &p.layers[l].counts;
        let mass = &p.layers[l].mass;
        let w: Vec<f64> = (0..n)
            .map(|e| counts.get(e).copied().unwrap_or(0) as f64 + 1.0)
            .collect();
        plan.weights[l] = w.clone();
        // Flattened gate|up|down of every expert.
        let vecs: Vec<Vec<f32>> = (0..n)
            .into_par_iter()
            .map(|e| expert_f32(ck, l, e).map(|[g, u, d]| [g, u, d].concat()))
            .collect::<Result<_, _>>()?;
        // Clusters: members and count-weighted mean vector.
        let mut members: Vec<Vec<usize>> = (0..n).map(|e| vec![e]).collect();
        let mut means: Vec<Option<Vec<f32>>> = vecs.into_iter().map(Some).collect();
        let mut sim = vec![vec![f64::NEG_INFINITY; n]; n];
        let pairs: Vec<(usize, usize)> = (0..n)
            .flat_map(|a| (a + 1..n).map(move |b| (a, b)))
            .collect();
        let vals: Vec<f64> = pairs
            .par_iter()
            .map(|&(a, b)| cosine(means[a].as_ref().unwrap(), means[b].as_ref().unwrap()))
            .collect();
        for (&(a, b), v) in pairs.iter().zip(vals) {
            sim[a][b] = v;
            sim[b][a] = v;
        }
        let budget = ratio
            .map(|r| (r * n as f64).round() as usize)
            .unwrap_or(n - 1);
        let mut done = 0;
        while done < budget {
            let mut best: Option<(f64, usize, usize)> = None;
            for a in 0..n {
                if means[a].is_none() {
                    continue;
                }
                for b in a + 1..n {
                    if means[b].is_some() && best.is_none_or(|(s, _, _)| sim[a][b] > s) {
                        best = Some((sim[a][b], a, b));
                    }
                }
            }
            let Some((s, a, b)) = best else { break };
            if threshold.is_some_and(|t| s < t) {
                break;
            }
            // Merge b into a: weighted mean of the two cluster means.
            let wa: f64 = members[a].iter().map(|&e| w[e]).sum();
            let wb: f64 = members[b].iter().map(|&e| w[e]).sum();
            let mb = means[b].take().expect("live cluster");
            let ma = means[a].as_mut().expect("live cluster");
            let (fa, fb) = ((wa / (wa + wb)) as f32, (wb / (wa + wb)) as f32);
            for (x, &y) in ma.iter_mut().zip(&mb) {
                *x = *x * fa + y * fb;
            }
            let moved = std::mem::take(&mut members[b]);
            members[a].extend(moved);
            let ma = means[a].as_ref().expect("live cluster");
            let new: Vec<(usize, f64)> = (0..n)
                .into_par_iter()
                .filter(|&o| o != a && means[o].is_some())
                .map(|o| (o, cosine(ma, means[o].as_ref().expect("live"))))
                .collect();
            for (o, v) in new {
                sim[a][o] = v;
                sim[o][a] = v;
            }
            plan.similarities[l].push(s);
            done += 1;
        }
        for group in members.iter().filter(|m| m.len() > 1) {
            // Keep the id of the member with the most routing mass (lowest id on ties).
            let keep = *group
                .iter()
                .max_by(|&&x, &&y| {
                    let (mx, my) = (
                        mass.get(x).copied().unwrap_or(0.0),
                        mass.get(y).copied().unwrap_or(0.0),
                    );
                    mx.total_cmp(&my).then(y.cmp(&x))
                })
                .expect("non-empty");
            for &e in group {
                plan.map[l][e] = keep as u32;
            }
        }
        plan.merged[l] = done;
    }
    Ok(Some(plan))
}

/// A merged expert's weights, owned, in the source's float type (and its biases, the same
/// weighted mean, in theirs).
pub struct MergedExpert {
    dtype: FloatDtype,
    inter: usize,
    hidden: usize,
    parts: [Vec<u8>; 3],
    bias: Option<(FloatDtype, [Vec<u8>; 3])>,
}

impl MergedExpert {
    pub fn projections(&self) -> ExpertProjections<'_> {
        let (i, h, d) = (self.inter, self.hidden, self.dtype);
        let view = |p: usize, rows, cols| {
            ProjSource::Float(
                MatrixView::new(d, rows, cols, &self.parts[p]).expect("sized at construction"),
            )
        };
        fn vector(dtype: FloatDtype, bytes: &[u8]) -> BiasVector<'_> {
            BiasVector {
                dtype,
                bytes,
                len: bytes.len() / dtype.size(),
                step: 1,
            }
        }
        ExpertProjections {
            gate: view(0, i, h),
            up: view(1, i, h),
            down: view(2, h, i),
            bias: self.bias.as_ref().map(|(bd, b)| ExpertBiases {
                gate: vector(*bd, &b[0]),
                up: vector(*bd, &b[1]),
                down: vector(*bd, &b[2]),
            }),
        }
    }
}

/// The weights stored for expert `e` of layer `l` when it represents others; `None` when it
/// stands alone (the source's weights are used as they are).
pub fn merged_expert(
    ck: &Checkpoint,
    plan: &MergePlan,
    l: usize,
    e: usize,
) -> Result<Option<MergedExpert>, ConvertError> {
    let members = plan.members(l, e);
    if members.len() < 2 {
        return Ok(None);
    }
    let c = &ck.config;
    let (i, h) = (c.moe_intermediate_size, c.expert_hidden_size());
    let first = ck.expert(l, e).map_err(io)?;
    let dtype = match first.gate {
        ProjSource::Float(m) => m.dtype,
        ProjSource::Quantized(q) | ProjSource::Interleaved { all: q, .. } => q.scale_dtype,
    };
    let bias_dtype = first.bias.map(|b| b.gate.dtype);
    let total: f64 = members.iter().map(|&m| plan.weights[l][m]).sum();
    let mut acc = [vec![0f32; i * h], vec![0f32; i * h], vec![0f32; i * h]];
    for &m in &members {
        let f = (plan.weights[l][m] / total) as f32;
        for (a, x) in acc.iter_mut().zip(expert_f32(ck, l, m)?) {
            for (y, v) in a.iter_mut().zip(x) {
                *y += f * v;
            }
        }
    }
    let parts = acc.map(|a| {
        let mut b = vec![0u8; a.len() * dtype.size()];
        dtype.write_all(&a, &mut b);
        b
    });
    let bias =
        match bias_dtype {
            None => None,
            Some(bd) => {
                let mut acc = [vec![0f32; i], vec![0f32; i], vec![0f32; h]];
                for &m in &members {
                    let f = (plan.weights[l][m] / total) as f32;
                    let b = ck.expert(l, m).map_err(io)?.bias.ok_or_else(|| {
                        ConvertError::Internal {
                            what: format!("layer {l} expert {m} has no biases, expert {e} does"),
                        }
                    })?;
                    for (a, v) in acc.iter_mut().zip([b.gate, b.up, b.down]) {
                        for (y, x) in a.iter_mut().zip(v.to_f32()) {
                            *y += f * x;
                        }
                    }
                }
                Some((
                    bd,
                    acc.map(|a| {
                        let mut b = vec![0u8; a.len() * bd.size()];
                        bd.write_all(&a, &mut b);
                        b
                    }),
                ))
            }
        };
    Ok(Some(MergedExpert {
        dtype,
        inter: i,
        hidden: h,
        parts,
        bias,
    }))
}
