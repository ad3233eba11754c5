//! The router block: a layer's input -> the experts each token goes to and their weights.
//!
//! In: hidden states `[.., H]`, the router's linear layer (`[E, H]`), an optional selection bias
//! `[E]`, and a [`RouterSpec`] saying how to score and pick. Out: [`Routing`], expert ids (u32)
//! and weights, both `[.., k]`. Invariant: one implementation for every architecture; an
//! architecture only describes its router as data (its table entry's `RouterDef`, combined with
//! the config by `RouterSpec::of` in arch/router.rs), so its graph is the op sequence
//! its mlx-lm model builds (the golden tests hold that bit for bit). Prefetch prediction runs the
//! next layer's router through the same block ([`Router::route`]).
//!
//! Steps, each optional except scoring and top-k (mlx-lm deepseek_v3.py `group_expert_select`,
//! qwen3_moe.py, mixtral.py, olmoe.py, qwen2_moe.py):
//! 1. scores: softmax over all experts, or sigmoid in f32;
//! 2. choice scores = scores + selection bias (DeepSeek's `e_score_correction_bias`);
//! 3. groups: experts in `n_group` equal groups; each group scored by the sum of its two best
//!    choice scores; all but the `topk_group` best groups set to 0;
//! 4. top-k of the choice scores; weights are the (unbiased) scores of the chosen;
//! 5. renormalise the k weights to sum to 1 (`norm_topk_prob`);
//! 6. multiply by `routed_scaling_factor`.

use super::layers::{compiling, Linear};
use super::ComputeError;
use crate::arch::{ExpertGroups, RouterSpec, Scoring, TopKOrder};
use crate::mlx::{self, Array, Dtype};

type Result<T> = std::result::Result<T, ComputeError>;

/// The router's choice for each token: `indices` (u32) and `scores`, both `[.., k]`.
#[derive(Debug, Clone)]
pub struct Routing {
    pub indices: Array,
    pub scores: Array,
}

/// A layer's router: its linear layer, its selection bias when the spec has one, and the spec.
#[derive(Debug, Clone)]
pub struct Router {
    pub gate: Linear,
    pub bias: Option<Array>,
    pub spec: RouterSpec,
    /// [`RouterSpec::input_norm`]: the norm's weight (`scale * hidden^-0.5`) and epsilon.
    pub input_norm: Option<(Array, f32)>,
    /// [`RouterSpec::per_expert_scale`]: `[E]`.
    pub expert_scale: Option<Array>,
}

impl Router {
    /// `<module>` (`[E, H]`, mlx-lm's `gate`) and, when `spec.selection_bias`,
    /// `<module>.e_score_correction_bias` `[E]`.
    pub fn load(
        w: &dyn super::Weights,
        module: &str,
        experts: usize,
        hidden: usize,
        spec: RouterSpec,
    ) -> Result<Router> {
        let gate = Linear::load(w, module, experts, hidden)?;
        let vector = |suffix: &str, len: usize| -> Result<Array> {
            let name = format!("{module}.{suffix}");
            let b = super::layers::require(w, &name)?;
            super::layers::check_shape(&name, &b, &[len])?;
            Ok(b)
        };
        let bias = if spec.selection_bias {
            Some(vector("e_score_correction_bias", experts)?)
        } else {
            None
        };
        let input_norm = match spec.input_norm {
            Some(eps) => {
                // self.scale * self._root_size (a Python float: the scale's dtype)
                let scale = vector("scale", hidden)?;
                let root = Array::scalar((hidden as f64).powf(-0.5), scale.dtype())?;
                Some((scale.mul(&root)?, eps as f32))
            }
            None => None,
        };
        let expert_scale = if spec.per_expert_scale {
            Some(vector("per_expert_scale", experts)?)
        } else {
            None
        };
        Ok(Router {
            gate,
            bias,
            spec,
            input_norm,
            expert_scale,
        })
    }

    /// The routing of `x` `[.., H]`.
    pub fn route(&self, x: &Array) -> Result<Routing> {
        let normed;
        let x = match &self.input_norm {
            Some((weight, eps)) => {
                // x = mx.fast.rms_norm(x, self.scale * self._root_size, self.eps)
                normed = mlx::fast::rms_norm(x, Some(weight), *eps)?;
                &normed
            }
            None => x,
        };
        let logits = if self.spec.f32_input {
            // gates = self.gate(x.astype(mx.float32))
            self.gate.forward(&x.astype(Dtype::F32)?)?
        } else {
            self.gate.forward(x)?
        };
        let mut r = route_logits(&logits, self.bias.as_ref(), &self.spec)?;
        if self.spec.weights_in_input_dtype {
            // scores = scores.astype(x.dtype)
            r.scores = r.scores.astype(x.dtype())?;
        }
        if let Some(scale) = &self.expert_scale {
            // top_k_weights = top_k_weights * self.per_expert_scale[top_k_indices]
            r.scores = r.scores.mul(&scale.take(&r.indices, 0)?)?;
        }
        Ok(r)
    }
}

/// The sigmoid router's steps as one compiled MLX function (mlx-lm compiles its
/// `group_expert_select` with `@mx.compile`), where [`compiling`].
static SIGMOID_ROUTER: mlx::CompileId = mlx::CompileId::new();

/// Steps 1-6 of the module header on router logits `[.., E]`.
pub fn route_logits(logits: &Array, bias: Option<&Array>, spec: &RouterSpec) -> Result<Routing> {
    if spec.scoring == Scoring::Sigmoid && compiling() {
        return route_compiled(logits, bias, spec);
    }
    route_steps(logits, bias, spec)
}

/// [`route_steps`] through [`mlx::compiled`]: the same ops, traced once per shape and spec.
fn route_compiled(logits: &Array, bias: Option<&Array>, spec: &RouterSpec) -> Result<Routing> {
    {
        let g = spec.groups.unwrap_or(ExpertGroups {
            n_group: 1,
            topk_group: 1,
        });
        let constants = [
            spec.top_k as u64,
            spec.order as u64,
            spec.renormalize as u64,
            bias.is_some() as u64,
            g.n_group as u64,
            g.topk_group as u64,
            spec.groups.is_some() as u64,
            spec.scaling.map_or(0, f64::to_bits),
        ];
        let mut inputs = vec![logits];
        inputs.extend(bias);
        let f = |xs: &[Array]| -> std::result::Result<Vec<Array>, mlx::Error> {
            let r = route_steps(&xs[0], xs.get(1), spec).map_err(|e| match e {
                ComputeError::Mlx(e) => e,
                other => mlx::Error::Mlx {
                    op: "router",
                    message: other.to_string(),
                },
            })?;
            Ok(vec![r.indices, r.scores])
        };
        let mut out = mlx::compiled(&SIGMOID_ROUTER, &constants, &inputs, 2, &f)?.into_iter();
        if let (Some(indices), Some(scores)) = (out.next(), out.next()) {
            return Ok(Routing { indices, scores });
        }
        Err(ComputeError::Unsupported {
            what: "the compiled router returned fewer than 2 arrays".into(),
        })
    }
}

fn route_steps(logits: &Array, bias: Option<&Array>, spec: &RouterSpec) -> Result<Routing> {
    let k = i32::try_from(spec.top_k).map_err(|_| ComputeError::Unsupported {
        what: format!("top-k {}", spec.top_k),
    })?;
    if spec.scoring == Scoring::SoftmaxOfChosen {
        // inds = mx.argpartition(-gates, kth=k - 1, axis=-1)[..., :k]
        // scores = mx.softmax(mx.take_along_axis(gates, inds, axis=-1), axis=-1, precise=True)
        // (Gemma 4: argpartition(gates, kth=-k)[..., -k:], softmax without precise)
        let indices = top_k(logits, k, spec.order)?;
        let scores = logits
            .take_along_axis(&indices, -1)?
            .softmax(-1, spec.precise_softmax)?;
        return Ok(Routing { indices, scores });
    }
    let scores = match spec.scoring {
        // gates = mx.softmax(gates, axis=-1, precise=True)
        Scoring::Softmax => logits.softmax(-1, true)?,
        // scores = mx.sqrt(nn.softplus(logits)), nn.softplus being mx.logaddexp(x, 0)
        Scoring::SqrtSoftplus => logits
            .astype(Dtype::F32)?
            .logaddexp(&Array::scalar(0.0, Dtype::F32)?)?
            .sqrt()?,
        // scores = mx.sigmoid(gates.astype(mx.float32))
        _ => logits.astype(Dtype::F32)?.sigmoid()?,
    };
    let mut choice = match bias {
        // scores = scores + e_score_correction_bias
        Some(b) => scores.add(b)?,
        None => scores.clone(),
    };
    if let Some(g) = spec.groups {
        choice = keep_best_groups(&choice, g)?;
    }
    let indices = top_k(&choice, k, spec.order)?;
    // scores = mx.take_along_axis(orig_scores, inds, axis=-1)
    let mut weights = scores.take_along_axis(&indices, -1)?;
    if spec.renormalize {
        // scores /= mx.sum(scores, axis=-1, keepdims=True)
        weights = weights.div(&weights.sum(-1, true)?)?;
    }
    if let Some(f) = spec.scaling {
        // scores = scores * routed_scaling_factor
        weights = weights.mul(&Array::scalar(f, weights.dtype())?)?;
    }
    Ok(Routing {
        indices,
        scores: weights,
    })
}

/// deepseek_v3.py, `if n_group > 1:` — zero the choice scores outside the `topk_group` groups
/// whose two best scores sum highest.
fn keep_best_groups(choice: &Array, g: ExpertGroups) -> Result<Array> {
    let drop = g.n_group.saturating_sub(g.topk_group) as i32;
    if drop == 0 {
        return Ok(choice.clone());
    }
    let shape: Vec<i32> = choice.shape().iter().map(|&d| d as i32).collect();
    let mut grouped = shape[..shape.len() - 1].to_vec();
    grouped.extend([g.n_group as i32, -1]);
    // scores = mx.unflatten(scores, axis=-1, shape=(n_group, -1))
    let scores = choice.reshape(&grouped)?;
    // group_scores = mx.topk(scores, 2, axis=-1).sum(axis=-1, keepdims=True)
    let group_scores = scores.topk(2, -1)?.sum(-1, true)?;
    // group_idx = mx.argpartition(group_scores, kth=k - 1, axis=-2)[..., :k, :]
    let part = group_scores.argpartition(drop - 1, -2)?;
    let mut stop: Vec<i32> = part.shape().iter().map(|&d| d as i32).collect();
    let at = stop.len() - 2;
    stop[at] = drop;
    let group_idx = part.slice(&vec![0; stop.len()], &stop)?;
    // scores = mx.put_along_axis(scores, group_idx, mx.array(0.0), axis=-2)
    let zero = Array::scalar(0.0, scores.dtype())?;
    let masked = scores.put_along_axis(&group_idx, &zero, -2)?;
    // scores = mx.flatten(scores, -2, -1)
    Ok(masked.reshape(&shape)?)
}

/// The `k` largest along the last axis, in `order`'s spelling.
fn top_k(x: &Array, k: i32, order: TopKOrder) -> Result<Array> {
    match order {
        TopKOrder::FirstOfNegated => first_k(&x.neg()?.argpartition(k - 1, -1)?, k),
        TopKOrder::LastOf => last_k(&x.argpartition(-k, -1)?, k),
    }
}

/// `a[..., :k]`.
fn first_k(a: &Array, k: i32) -> Result<Array> {
    let shape = a.shape();
    let start = vec![0i32; shape.len()];
    let mut stop: Vec<i32> = shape.iter().map(|&d| d as i32).collect();
    if let Some(last) = stop.last_mut() {
        *last = k;
    }
    Ok(a.slice(&start, &stop)?)
}

/// `a[..., -k:]`.
fn last_k(a: &Array, k: i32) -> Result<Array> {
    let shape = a.shape();
    let n = *shape.last().unwrap_or(&0) as i32;
    let mut start = vec![0i32; shape.len()];
    if let Some(last) = start.last_mut() {
        *last = n - k;
    }
    let stop: Vec<i32> = shape.iter().map(|&d| d as i32).collect();
    Ok(a.slice(&start, &stop)?)
}

#[cfg(test)]
mod tests;
