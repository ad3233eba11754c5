//! The sparse MoE block: router -> top-k -> experts through `gather_qmm` -> weighted sum.
//!
//! In: hidden states `[B, L, H]`, the router, and an [`ExpertStore`] that says where each routed
//! expert's quantized weights live. Out: `[B, L, H]`. Invariant: an expert's weights are reached
//! only through (pool, slot) pairs the store hands out for this call; with one pool and the
//! identity table the graph is exactly mlx-lm's `SwitchGLU` (models/switch_layers.py), so logits
//! match mlx-lm bit for bit.
//!
//! Mixed precision within a layer (hot 4-bit pool + cold 2-bit pool): each pool runs
//! `gather_qmm` on all `k` routed entries and [`Array::select`] keeps, per entry, the result of
//! the pool that holds that expert. That costs one extra expert pass per extra pool; a store that
//! already knows the indices on the host (the streaming cache must, to load experts) could pass
//! each pool only its own entries instead.

use std::collections::BTreeMap;

use super::layers::{
    check_quantized, compiling, fused, geglu_ops, situ_as, swiglu_ops, GateAct, Linear, Mlp,
    RmsNorm, GEGLU, SWIGLU,
};
use super::router::{Router, Routing};
use super::weights::Weights;
use super::ComputeError;
use crate::arch::{ModelConfig, Proj, RouterSpec, Situ};
use crate::mlx::{self, Array, Dtype, QuantizedMatrix};

type Result<T> = std::result::Result<T, ComputeError>;

/// How routed experts combine their gate and up projections into the down projection's input.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum ExpertAct {
    /// `silu(gate) * up` (mlx-lm's `SwiGLU`).
    #[default]
    Swiglu,
    /// gpt-oss's `swiglu_oai(gate, up, alpha, limit)`: `g = min(gate, limit)`,
    /// `u = clip(up, -limit, limit)`, `(u + 1) * (g * sigmoid(alpha * g))`.
    Clamped { alpha: f64, limit: f64 },
    /// `gelu_approx(gate) * up` (Gemma 4's `GeGLU`).
    Geglu,
    /// DeepSeek-V4.1's `DeepseekV41SwiGLU(limit)`: gate and up cast to f32, `gate =
    /// min(gate, limit)` and `up = clip(up, -limit, limit)` when `limit > 0`, then
    /// `silu(gate) * up`, cast back to the input's dtype.
    F32Clamped { limit: f64 },
    /// Kimi-K3's SiTU (`SiTU(beta, linear_beta)`, [`super::layers::situ`]).
    Situ(Situ),
}

impl ExpertAct {
    pub fn of(cfg: &ModelConfig) -> ExpertAct {
        if let Some(limit) = cfg.f32_swiglu_limit {
            return ExpertAct::F32Clamped { limit };
        }
        if let Some(s) = cfg.situ {
            return ExpertAct::Situ(s);
        }
        match cfg.clamped_swiglu {
            Some(c) => ExpertAct::Clamped {
                alpha: c.alpha,
                limit: c.limit,
            },
            None if cfg.gemma4.is_some() => ExpertAct::Geglu,
            None => ExpertAct::Swiglu,
        }
    }

    /// `self.activation(x_up, x_gate)` of mlx-lm's `SwitchGLU`: one fused kernel where
    /// compiling (a GPU), as mlx-lm `@mx.compile`s both activations.
    pub fn apply(&self, gate: &Array, up: &Array) -> Result<Array> {
        self.apply_as(gate, up, compiling())
    }

    /// [`Self::apply`], fused through one compiled function (`fuse`) or op by op.
    pub(super) fn apply_as(&self, gate: &Array, up: &Array, fuse: bool) -> Result<Array> {
        // gpt-oss's clamped SwiGLU, compiled once per (alpha, limit).
        static CLAMPED: mlx::CompileId = mlx::CompileId::new();
        let clamped = |alpha: f64, limit: f64| {
            move |gate: &Array, up: &Array| -> std::result::Result<Array, mlx::Error> {
                let dt = gate.dtype();
                let s = |v: f64| Array::scalar(v, dt);
                // gate = mx.minimum(gate, limit); x = mx.clip(x, -limit, limit)
                let g = gate.minimum(&s(limit)?)?;
                let u = up.maximum(&s(-limit)?)?.minimum(&s(limit)?)?;
                // (x + 1.0) * (gate * mx.sigmoid(alpha * gate))
                let glu = g.mul(&g.mul(&s(alpha)?)?.sigmoid()?)?;
                u.add(&s(1.0)?)?.mul(&glu)
            }
        };
        // DeepseekV41SwiGLU.__call__(up, gate)
        let f32_clamped = |limit: f64| {
            move |gate: &Array, up: &Array| -> std::result::Result<Array, mlx::Error> {
                let dt = up.dtype();
                let mut g = gate.astype(Dtype::F32)?;
                let mut u = up.astype(Dtype::F32)?;
                if limit > 0.0 {
                    let s = |v: f64| Array::scalar(v, Dtype::F32);
                    g = g.minimum(&s(limit)?)?;
                    u = u.maximum(&s(-limit)?)?.minimum(&s(limit)?)?;
                }
                swiglu_ops(&g, &u)?.astype(dt)
            }
        };
        match (*self, fuse) {
            (ExpertAct::F32Clamped { limit }, _) => Ok(f32_clamped(limit)(gate, up)?),
            // SiTU(x, gate) = _situ(x, gate, ...) with x the up projection
            (ExpertAct::Situ(s), fuse) => situ_as(gate, up, s, fuse),
            (ExpertAct::Swiglu, true) => fused(&SWIGLU, &[], gate, up, &swiglu_ops),
            (ExpertAct::Swiglu, false) => Ok(swiglu_ops(gate, up)?),
            (ExpertAct::Geglu, true) => fused(&GEGLU, &[], gate, up, &geglu_ops),
            (ExpertAct::Geglu, false) => Ok(geglu_ops(gate, up)?),
            (ExpertAct::Clamped { alpha, limit }, true) => fused(
                &CLAMPED,
                &[alpha.to_bits(), limit.to_bits()],
                gate,
                up,
                &clamped(alpha, limit),
            ),
            (ExpertAct::Clamped { alpha, limit }, false) => Ok(clamped(alpha, limit)(gate, up)?),
        }
    }
}

/// The routed experts' projection biases, stacked along the pool's slot axis like the weights:
/// gate and up `[slots, I]`, down `[slots, H]` (gpt-oss).
#[derive(Debug, Clone)]
pub struct ExpertBias {
    pub gate: Array,
    pub up: Array,
    pub down: Array,
}

/// Quantized SwiGLU experts stacked along a slot axis: gate/up `[slots, I, H*bits/32]`, down
/// `[slots, H, I*bits/32]` (mlx-lm's `switch_mlp`), with their biases when they have them and
/// the activation they use. All three share one bit width.
#[derive(Debug, Clone)]
pub struct ExpertPool {
    pub gate: QuantizedMatrix,
    pub up: QuantizedMatrix,
    pub down: QuantizedMatrix,
    pub bias: Option<ExpertBias>,
    pub act: ExpertAct,
}

impl ExpertPool {
    /// Bias-free SwiGLU experts (every architecture but gpt-oss).
    pub fn swiglu(gate: QuantizedMatrix, up: QuantizedMatrix, down: QuantizedMatrix) -> Self {
        ExpertPool {
            gate,
            up,
            down,
            bias: None,
            act: ExpertAct::Swiglu,
        }
    }

    pub fn slots(&self) -> usize {
        self.gate.weight.dim(0).unwrap_or(0)
    }

    /// Slots `start..start + n` as a pool of their own: views of the same memory (no copy),
    /// evaluated here so a forward pass reads them as plain arrays. A resident layer whose experts
    /// sit in one run of a larger pool computes on its own rows: MLX's CUDA backend counts every
    /// input's bytes towards a command graph's limit (`MLX_MAX_MB_PER_BUFFER`, 1000 MB on an
    /// H100), so a multi-layer pool made each expert matmul close a graph of its own (docs/
    /// benchmarks.md, "Issue 26 ... eighth session").
    pub fn slots_view(&self, start: usize, n: usize) -> Result<ExpertPool> {
        let (a, b) = (start as i32, (start + n) as i32);
        let rows = |x: &Array| -> Result<Array> {
            let nd = x.ndim();
            let mut lo = vec![0i32; nd];
            let mut hi: Vec<i32> = x.shape().iter().map(|&d| d as i32).collect();
            lo[0] = a;
            hi[0] = b;
            Ok(x.slice(&lo, &hi)?)
        };
        let matrix = |m: &QuantizedMatrix| -> Result<QuantizedMatrix> {
            Ok(QuantizedMatrix {
                weight: rows(&m.weight)?,
                scales: rows(&m.scales)?,
                biases: m.biases.as_ref().map(rows).transpose()?,
                ..m.clone()
            })
        };
        let view = ExpertPool {
            gate: matrix(&self.gate)?,
            up: matrix(&self.up)?,
            down: matrix(&self.down)?,
            bias: match &self.bias {
                Some(b) => Some(ExpertBias {
                    gate: rows(&b.gate)?,
                    up: rows(&b.up)?,
                    down: rows(&b.down)?,
                }),
                None => None,
            },
            act: self.act,
        };
        let mut all: Vec<&Array> = Vec::new();
        for m in [&view.gate, &view.up, &view.down] {
            all.push(&m.weight);
            all.push(&m.scales);
            all.extend(m.biases.as_ref());
        }
        if let Some(b) = &view.bias {
            all.extend([&b.gate, &b.up, &b.down]);
        }
        mlx::eval(&all)?;
        Ok(view)
    }

    pub fn bits(&self) -> i32 {
        self.gate.bits
    }

    /// Check the three stacks against `slots` experts of width `inter` over `hidden` features.
    pub fn check(&self, module: &str, slots: usize, hidden: usize, inter: usize) -> Result<()> {
        check_quantized(
            &format!("{module}.gate_proj"),
            &self.gate,
            &[slots],
            inter,
            hidden,
        )?;
        check_quantized(
            &format!("{module}.up_proj"),
            &self.up,
            &[slots],
            inter,
            hidden,
        )?;
        check_quantized(
            &format!("{module}.down_proj"),
            &self.down,
            &[slots],
            hidden,
            inter,
        )?;
        if let Some(b) = &self.bias {
            for (name, a, out) in [
                ("gate_proj", &b.gate, inter),
                ("up_proj", &b.up, inter),
                ("down_proj", &b.down, hidden),
            ] {
                super::layers::check_shape(&format!("{module}.{name}.bias"), a, &[slots, out])?;
            }
        }
        Ok(())
    }
}

/// Which pool and slot serve the routed entries of one call, as arrays shaped like the router's
/// `indices`. `serves` (bool) marks the entries this pool answers; `None` means all of them.
pub struct PoolRoute<'a> {
    pub pool: &'a ExpertPool,
    pub slots: Array,
    pub serves: Option<Array>,
}

/// Hands out expert weights for one MoE layer at a time. A resident model answers from memory;
/// the streaming cache makes sure the routed experts are in its slot pools first.
pub trait ExpertStore {
    /// `indices`: the router's top-k expert ids (u32, `[.., k]`, lazy) for `layer`.
    fn route(&mut self, layer: usize, indices: &Array) -> Result<Vec<PoolRoute<'_>>>;

    /// Like [`ExpertStore::route`], seeing the routing weights too. A store may drop entries
    /// (e.g. experts that are not resident and carry little weight) by returning new scores,
    /// with the dropped entries at 0 and each token's rest renormalized.
    fn route_scored(
        &mut self,
        layer: usize,
        routing: &Routing,
    ) -> Result<(Vec<PoolRoute<'_>>, Option<Array>)> {
        Ok((self.route(layer, &routing.indices)?, None))
    }

    /// The routed experts' weighted sum `sum_k scores[.., k] * expert_k(x)` (`[.., H]`, f32),
    /// computed by the store itself, or `None` (the default) to let the block run `gather_qmm`
    /// over the pools [`ExpertStore::route_scored`] hands out. A store that streams experts one
    /// at a time from a source (the profile stage) answers here.
    fn mix(&mut self, _layer: usize, _x: &Array, _routing: &Routing) -> Result<Option<Array>> {
        Ok(None)
    }

    /// Whether the forward pass should schedule (`async_eval`) each sparse layer's output as
    /// soon as it is built. A store that evaluates every layer's routing on the host (the
    /// streaming cache) answers yes: the device then computes this layer's experts while the
    /// host builds the next layer's graph, instead of idling until the next routing is asked for.
    fn eager(&self) -> bool {
        false
    }

    /// Whether the forward pass of a call of `tokens` positions may run ahead of the routing
    /// checks ([`Model::hidden`](super::Model) then builds and schedules each layer before
    /// the previous sparse layer's experts are confirmed, see `ExpertStore::confirm`). A store
    /// that must learn each layer's routing on the host (the streaming cache) can answer yes
    /// to save the device a round trip per layer. Default: no.
    fn runs_ahead(&self, _tokens: usize) -> bool {
        false
    }

    /// While on, [`ExpertStore::route_scored`] answers without waiting for the routing: from
    /// where the store last put each expert, to be confirmed by [`ExpertStore::confirm`].
    fn set_ahead(&mut self, _on: bool) {}

    /// For a layer routed ahead: whether every expert its routing picked was resident, where
    /// the answer said, and untouched since, so that the layer's output stands. On `false`
    /// nothing changed: the caller routes the layer again with this mode off, and recomputes
    /// every layer after it.
    fn confirm(&mut self, _layer: usize) -> Result<bool> {
        Ok(true)
    }

    /// A forward pass of `entries` routed entries per sparse layer (positions x top-k) starts;
    /// `first` is its first sparse layer. Called before anything of the pass is evaluated, so a
    /// store can start reading what the pass will need while the device computes up to the
    /// first routing (a long prompt's first layer). Default: nothing.
    fn begin_pass(&mut self, _first: usize, _entries: usize) -> Result<()> {
        Ok(())
    }

    /// Whether the store wants a guess of the next sparse layer's routing (for prefetch).
    fn wants_prediction(&self) -> bool {
        false
    }

    /// Whether to build a guess of `layer`'s routing now (for a pass of `entries` routed
    /// entries per sparse layer), asked before the guess's graph is built, which costs the
    /// host a few graph nodes per layer (3.5 ms per token at 48 layers on the GPU). Default:
    /// [`ExpertStore::wants_prediction`].
    fn wants_guess(&mut self, _layer: usize, _entries: usize) -> bool {
        self.wants_prediction()
    }

    /// A guess of what `layer`'s router will pick (lazy ids and weights, `[.., k]`): its router
    /// applied to the current layer's input. Called before the current layer's
    /// [`ExpertStore::route`].
    fn predict(&mut self, _layer: usize, _guess: &Routing) -> Result<()> {
        Ok(())
    }
}

/// One layer's pools and its expert -> (pool, slot) table.
#[derive(Debug)]
pub struct LayerExperts {
    pools: Vec<PoolTable>,
}

#[derive(Debug)]
struct PoolTable {
    pool: ExpertPool,
    /// expert id -> slot (u32 `[E]`); `None`: the identity (slot == expert id).
    slot_of: Option<Array>,
    /// expert id -> held by this pool (bool `[E]`); `None`: every expert.
    holds: Option<Array>,
}

impl LayerExperts {
    /// Every expert in one pool at the slot of its own id.
    pub fn resident(pool: ExpertPool) -> LayerExperts {
        LayerExperts {
            pools: vec![PoolTable {
                pool,
                slot_of: None,
                holds: None,
            }],
        }
    }

    /// Experts spread over `pools`: `placement[e] = (pool, slot)` for each expert `e`.
    pub fn placed(pools: Vec<ExpertPool>, placement: &[(usize, u32)]) -> Result<LayerExperts> {
        let n_pools = pools.len();
        let mut tables = Vec::with_capacity(n_pools);
        for (p, pool) in pools.into_iter().enumerate() {
            let mut slot_of = vec![0u32; placement.len()];
            let mut holds = vec![0u8; placement.len()];
            for (e, &(at, slot)) in placement.iter().enumerate() {
                if at >= n_pools {
                    return Err(ComputeError::BadPlacement {
                        expert: e,
                        what: format!("pool {at} of {n_pools}"),
                    });
                }
                if at == p {
                    if slot as usize >= pool.slots() {
                        return Err(ComputeError::BadPlacement {
                            expert: e,
                            what: format!("slot {slot} of pool {p} with {} slots", pool.slots()),
                        });
                    }
                    slot_of[e] = slot;
                    holds[e] = 1;
                }
            }
            let n = [placement.len()];
            tables.push(PoolTable {
                pool,
                slot_of: Some(Array::from_slice(&slot_of, &n)?),
                holds: Some(Array::from_slice(&holds, &n)?.astype(Dtype::Bool)?),
            });
        }
        Ok(LayerExperts { pools: tables })
    }

    /// Whether routing looks up a device table (expert id -> slot) before the experts' matmuls.
    pub fn uses_table(&self) -> bool {
        self.pools.iter().any(|t| t.slot_of.is_some())
    }

    /// Pools and slots for router `indices` (u32, any shape).
    pub fn route(&self, indices: &Array) -> Result<Vec<PoolRoute<'_>>> {
        self.pools
            .iter()
            .map(|t| {
                Ok(PoolRoute {
                    pool: &t.pool,
                    slots: match &t.slot_of {
                        None => indices.clone(),
                        Some(table) => table.take(indices, 0)?,
                    },
                    serves: t.holds.as_ref().map(|h| h.take(indices, 0)).transpose()?,
                })
            })
            .collect()
    }
}

/// All experts in memory: what mlx-lm does, and the reference the streaming cache must match.
#[derive(Debug, Default)]
pub struct ResidentExperts {
    pub layers: BTreeMap<usize, LayerExperts>,
}

impl ResidentExperts {
    /// The stacked `switch_mlp` tensors of every sparse layer (mlx-lm names), one pool each.
    pub fn load(cfg: &ModelConfig, w: &dyn Weights) -> Result<ResidentExperts> {
        let names = cfg.arch.names();
        let mut layers = BTreeMap::new();
        for layer in cfg.sparse_layers() {
            let stack = |proj: Proj| -> Result<QuantizedMatrix> {
                let module = names
                    .stacked(layer, proj, crate::arch::Part::Weight)
                    .trim_end_matches(".weight")
                    .to_string();
                let get = |suffix: &str| {
                    let name = format!("{module}.{suffix}");
                    w.get(&name).ok_or(ComputeError::MissingTensor { name })
                };
                let q =
                    w.quantization(&module)
                        .ok_or_else(|| ComputeError::MissingQuantization {
                            module: module.clone(),
                        })?;
                Ok(QuantizedMatrix {
                    weight: get("weight")?,
                    scales: get("scales")?,
                    biases: if q.mode.has_biases() {
                        Some(get("biases")?)
                    } else {
                        None
                    },
                    group_size: q.group_size,
                    bits: q.bits,
                    mode: q.mode,
                })
            };
            let bias = if cfg.expert_bias {
                let get = |proj: Proj| {
                    let name = format!("{}.bias", names.stacked_module(layer, proj));
                    w.get(&name).ok_or(ComputeError::MissingTensor { name })
                };
                Some(ExpertBias {
                    gate: get(Proj::Gate)?,
                    up: get(Proj::Up)?,
                    down: get(Proj::Down)?,
                })
            } else {
                None
            };
            let pool = ExpertPool {
                gate: stack(Proj::Gate)?,
                up: stack(Proj::Up)?,
                down: stack(Proj::Down)?,
                bias,
                act: ExpertAct::of(cfg),
            };
            let module = format!(
                "model.layers.{layer}.{}.{}",
                names.moe_blocks[0], names.stacked_module
            );
            pool.check(
                &module,
                cfg.num_experts,
                cfg.expert_hidden_size(),
                cfg.moe_intermediate_size,
            )?;
            layers.insert(layer, LayerExperts::resident(pool));
        }
        Ok(ResidentExperts { layers })
    }
}

impl ExpertStore for ResidentExperts {
    fn route(&mut self, layer: usize, indices: &Array) -> Result<Vec<PoolRoute<'_>>> {
        self.layers
            .get(&layer)
            .ok_or(ComputeError::NoExperts { layer })?
            .route(indices)
    }
}

/// `SwitchGLU.__call__` (mlx-lm models/switch_layers.py) over one pool: `x` `[.., H]`,
/// `slots` `[.., k]` -> `[.., k, H]`.
pub fn switch_glu(x: &Array, pool: &ExpertPool, slots: &Array) -> Result<Array> {
    // x = mx.expand_dims(x, (-2, -3))
    let x = x.expand_dims(-2)?.expand_dims(-3)?;
    let shape = slots.shape();
    // do_sort = indices.size >= 64: many tokens, so visit each expert's rows together.
    let do_sort = shape.iter().product::<usize>() >= 64;
    // QuantizedSwitchLinear.__call__: gather_qmm, then `x + expand_dims(bias[indices], -2)`.
    let linear = |x: &Array, m: &QuantizedMatrix, bias: Option<&Array>, idx: &Array| {
        let y = mlx::gather_qmm(x, m, None, Some(idx), true, do_sort)?;
        Ok::<_, ComputeError>(match bias {
            Some(b) => y.add(&b.take(idx, 0)?.expand_dims(-2)?)?,
            None => y,
        })
    };
    let b = pool.bias.as_ref();
    if !do_sort {
        let up = linear(&x, &pool.up, b.map(|b| &b.up), slots)?;
        let gate = linear(&x, &pool.gate, b.map(|b| &b.gate), slots)?;
        // self.down_proj(self.activation(x_up, x_gate)); SwiGLU(x, gate) = swiglu(gate, x)
        let y = linear(
            &pool.act.apply(&gate, &up)?,
            &pool.down,
            b.map(|b| &b.down),
            slots,
        )?;
        return Ok(y.reshape(&squeeze_shape(&y, -2)?)?);
    }
    // _gather_sort: order = argsort(indices.flatten()); x.flatten(0, -3)[order // M]
    let k = *shape.last().unwrap_or(&1);
    let flat = slots.reshape(&[-1])?;
    let order = flat.argsort(0)?;
    let inv_order = order.argsort(0)?;
    let hidden = x.dim(-1).unwrap_or(0) as i32;
    let rows = x.reshape(&[-1, 1, hidden])?;
    let m = Array::scalar(k as f64, order.dtype())?;
    let x = rows.take(&order.floor_div(&m)?, 0)?;
    let idx = flat.take(&order, 0)?;
    let up = linear(&x, &pool.up, b.map(|b| &b.up), &idx)?;
    let gate = linear(&x, &pool.gate, b.map(|b| &b.gate), &idx)?;
    let y = linear(
        &pool.act.apply(&gate, &up)?,
        &pool.down,
        b.map(|b| &b.down),
        &idx,
    )?;
    // _scatter_unsort: x[inv_order], unflattened back to indices.shape
    let y = y.take(&inv_order, 0)?;
    let mut back: Vec<i32> = shape.iter().map(|&d| d as i32).collect();
    back.extend([1, y.dim(-1).unwrap_or(0) as i32]);
    let y = y.reshape(&back)?;
    Ok(y.reshape(&squeeze_shape(&y, -2)?)?)
}

fn squeeze_shape(y: &Array, axis: i32) -> Result<Vec<i32>> {
    let mut s: Vec<i32> = y.shape().iter().map(|&d| d as i32).collect();
    let at = (s.len() as i32 + axis) as usize;
    s.remove(at);
    Ok(s)
}

/// A sparse block: router, experts (through the store), optional shared expert.
#[derive(Debug, Clone)]
pub struct MoeBlock {
    pub(crate) layer: usize,
    router: Router,
    shared: Option<SharedExpert>,
    /// The weighted sum is cast back to the activations' dtype ([`crate::arch::ArchDef`]).
    cast_output: bool,
    /// The experts' input is this norm of the block's input, which the router sees as it is
    /// (Gemma 4's `pre_feedforward_layernorm_2`).
    expert_norm: Option<RmsNorm>,
    /// The sum and the shared expert's output are added in f32 and cast to the activations'
    /// dtype after (DeepSeek-V4.1: `(routed + shared(x).astype(f32)).astype(x.dtype)`).
    cast_after_shared: bool,
    /// Kimi-K3's latent MoE around the routed experts.
    latent: Option<Box<Latent>>,
}

/// Kimi-K3's latent MoE (`KimiK3SparseMoE` with `routed_expert_hidden_size`): the experts see
/// `down(x)`, and their weighted sum goes back through `norm` (when set) and `up` before the
/// shared experts' output, which sees `x`, is added.
#[derive(Debug, Clone)]
struct Latent {
    down: Linear,
    norm: Option<RmsNorm>,
    up: Linear,
}

impl Latent {
    fn load(w: &dyn Weights, cfg: &ModelConfig, block: &str) -> Result<Option<Box<Latent>>> {
        let Some(l) = cfg.latent_moe else {
            return Ok(None);
        };
        let (h, d) = (cfg.hidden_size, l.hidden_size);
        Ok(Some(Box::new(Latent {
            down: Linear::load(w, &format!("{block}.routed_expert_down_proj"), d, h)?,
            norm: l
                .norm
                .then(|| {
                    RmsNorm::load(
                        w,
                        &format!("{block}.routed_expert_norm"),
                        d,
                        cfg.rms_norm_eps,
                    )
                })
                .transpose()?,
            up: Linear::load(w, &format!("{block}.routed_expert_up_proj"), h, d)?,
        })))
    }

    /// `y = self.routed_expert_norm(y)` (when there is one); `y = self.routed_expert_up_proj(y)`.
    fn back(&self, y: &Array) -> Result<Array> {
        match &self.norm {
            Some(n) => self.up.forward(&n.forward(y)?),
            None => self.up.forward(y),
        }
    }
}

/// The always-on expert(s) of a sparse block: one SwiGLU MLP (N shared experts are one MLP N
/// times as wide), optionally scaled by the sigmoid of a one-row gate.
#[derive(Debug, Clone)]
pub struct SharedExpert {
    pub mlp: Mlp,
    pub gate: Option<Linear>,
    /// The activation when not SwiGLU (DeepSeek-V4.1's `SharedMLP`:
    /// `down(activation(up, gate).astype(x.dtype))`).
    pub act: Option<ExpertAct>,
}

impl SharedExpert {
    /// The config's shared expert of the block `block` (`model.layers.L.mlp`), named as the
    /// architecture names it; `None` when the config has none.
    pub fn load(w: &dyn Weights, cfg: &ModelConfig, block: &str) -> Result<Option<SharedExpert>> {
        let Some(s) = &cfg.shared_expert else {
            return Ok(None);
        };
        let names = cfg
            .arch
            .names()
            .shared
            .as_ref()
            .ok_or_else(|| ComputeError::Unsupported {
                what: format!("a shared expert in {}, which names none", cfg.arch),
            })?;
        let h = cfg.hidden_size;
        let mut mlp = Mlp::load(w, &format!("{block}.{}", names.mlp), h, s.intermediate_size)?;
        if let Some(situ) = cfg.situ {
            // self.shared_experts = KimiK3MLP(args, intermediate_size=shared_hidden)
            mlp = mlp.with_act(GateAct::Situ(situ));
        }
        Ok(Some(SharedExpert {
            mlp,
            gate: s
                .gated
                .then(|| Linear::load(w, &format!("{block}.{}", names.gate), 1, h))
                .transpose()?,
            act: cfg
                .f32_swiglu_limit
                .map(|limit| ExpertAct::F32Clamped { limit }),
        }))
    }

    /// `y` plus this expert's output on `x`.
    pub fn add_to(&self, y: &Array, x: &Array) -> Result<Array> {
        // shared_expert_output = self.shared_expert(x)                  (qwen2_moe.py)
        // shared_expert_output = mx.sigmoid(self.shared_expert_gate(x)) * shared_expert_output
        // return y + shared_expert_output         (deepseek_v3.py: y = y + self.shared_experts(x))
        let mut s = match &self.act {
            Some(act) => {
                let m = &self.mlp;
                let a = act.apply(&m.gate.forward(x)?, &m.up.forward(x)?)?;
                m.down.forward(&a.astype(x.dtype())?)?
            }
            None => self.mlp.forward(x)?,
        };
        if let Some(gate) = &self.gate {
            s = gate.forward(x)?.sigmoid()?.mul(&s)?;
        }
        Ok(y.add(&s)?)
    }
}

impl MoeBlock {
    pub(crate) fn load(w: &dyn Weights, cfg: &ModelConfig, layer: usize) -> Result<MoeBlock> {
        let names = cfg.arch.names();
        let block = format!("model.layers.{layer}.{}", names.moe_blocks[0]);
        let router = Router::load(
            w,
            &format!("{block}.{}", names.router),
            cfg.num_experts,
            cfg.hidden_size,
            RouterSpec::of(cfg),
        )?;
        let shared = SharedExpert::load(w, cfg, &block)?;
        Ok(MoeBlock {
            layer,
            router,
            shared,
            cast_output: cfg.arch.def().cast_moe_output,
            expert_norm: None,
            cast_after_shared: cfg.f32_swiglu_limit.is_some(),
            latent: Latent::load(w, cfg, &block)?,
        })
    }

    /// The same block with the experts' input normed by `norm` (the router's is not).
    pub(crate) fn with_expert_norm(self, norm: RmsNorm) -> MoeBlock {
        MoeBlock {
            expert_norm: Some(norm),
            ..self
        }
    }

    /// The router's decision for `x` (exposed for the cache's prefetch and for tests).
    pub fn route(&self, x: &Array) -> Result<Routing> {
        self.router.route(x)
    }

    pub fn forward(&self, x: &Array, experts: &mut dyn ExpertStore) -> Result<Array> {
        let mut routing = self.route(x)?;
        let normed;
        let x = match &self.expert_norm {
            // h2 = self.pre_feedforward_layernorm_2(h); self.experts(h2, ...)
            Some(norm) => {
                normed = norm.forward(x)?;
                &normed
            }
            None => x,
        };
        // y = self.routed_expert_down_proj(x) if self.latent_size is not None else x
        let down;
        let ex = match &self.latent {
            Some(l) => {
                down = l.down.forward(x)?;
                &down
            }
            None => x,
        };
        if let Some(mut out) = experts.mix(self.layer, ex, &routing)? {
            if self.cast_output {
                out = out.astype(x.dtype())?;
            }
            if let Some(l) = &self.latent {
                out = l.back(&out)?;
            }
            if let Some(shared) = &self.shared {
                out = shared.add_to(&out, x)?;
            }
            if self.cast_after_shared {
                out = out.astype(x.dtype())?;
            }
            return Ok(out);
        }
        let (routes, scores) = experts.route_scored(self.layer, &routing)?;
        if let Some(scores) = scores {
            routing.scores = scores;
        }
        let mut y: Option<Array> = None;
        for r in routes {
            let part = switch_glu(ex, r.pool, &r.slots)?;
            y = Some(match (y, r.serves) {
                (None, _) | (Some(_), None) => part,
                (Some(acc), Some(serves)) => serves.expand_dims(-1)?.select(&part, &acc)?,
            });
        }
        let y = y.ok_or(ComputeError::NoExperts { layer: self.layer })?;
        // y = (y * scores[..., None]).sum(axis=-2)
        let mut out = y.mul(&routing.scores.expand_dims(-1)?)?.sum(-2, false)?;
        if self.cast_output {
            // qwen3_moe.py: .astype(y.dtype)
            out = out.astype(y.dtype())?;
        }
        if let Some(l) = &self.latent {
            out = l.back(&out)?;
        }
        if let Some(shared) = &self.shared {
            out = shared.add_to(&out, x)?;
        }
        if self.cast_after_shared {
            out = out.astype(x.dtype())?;
        }
        Ok(out)
    }
}
