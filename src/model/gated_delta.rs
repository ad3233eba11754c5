//! Gated DeltaNet linear attention (Qwen3-Next, Qwen3.5) and Kimi Delta Attention (Kimi-K3), as
//! mlx-lm 0.32.2 computes them on the CPU: `Qwen3NextGatedDeltaNet` (models/qwen3_next.py),
//! `GatedDeltaNet` (models/qwen3_5.py), `KimiK3DeltaAttention` (models/kimi_k3.py, with
//! kimi_linear.py's `ShortConv1d`) and the ops path of `gated_delta_update` (models/gated_delta.py:
//! `compute_g`, `compute_lower_bound_g`, `normalize_qk`, `gated_delta_ops`,
//! `_gated_delta_step_ops`). Kimi's variant differs in its projections (one `qkv_proj`, a decay
//! per channel from `f_b_proj(f_a_proj(x))` instead of one per head, `b_proj`) and its output
//! (`o_norm(y) * sigmoid(g_b_proj(g_a_proj(x)))` instead of `norm(y) * silu(z)`); the convolution
//! and the recurrence are the same, with the decay applied per key channel.
//!
//! In: hidden states `[B, S, H]` and the layer's [`LinearState`]. Out: `[B, S, H]`, and the
//! state advanced by `S` positions: the convolution state holds the last `conv_kernel_dim - 1`
//! inputs of the causal depthwise convolution, the recurrent state `[B, Hv, Dv, Dk]` (f32) every
//! position so far. Invariant: the recurrence runs one position at a time in the op order of
//! `_gated_delta_step_ops`, so a prompt prefilled in chunks gives the state, and the logits,
//! of one call over the whole prompt.

use super::kv_cache::{to_i32, LinearState};
use super::layers::{check_shape, compiling, elementwise2, require, Linear, RmsNorm};
use super::weights::Weights;
use super::ComputeError;
use crate::arch::{DeltaProjections, LinearAttention, ModelConfig};
use crate::mlx::{self, fast, Array, Dtype};

type Result<T> = std::result::Result<T, ComputeError>;

/// The input projections, as each architecture names and lays them out.
#[derive(Debug, Clone)]
enum Projections {
    /// Qwen3-Next: `in_proj_qkvz` `[nk * (2 dk + 2 r dv), H]` and `in_proj_ba` `[nk * 2r, H]`,
    /// both grouped per key head (`r = nv / nk`).
    Qkvz { qkvz: Linear, ba: Linear },
    /// Qwen3.5: `in_proj_qkv` `[2 nk dk + nv dv, H]`, `in_proj_z` `[nv dv, H]`, `in_proj_b` and
    /// `in_proj_a` `[nv, H]`.
    Split {
        qkv: Linear,
        z: Linear,
        b: Linear,
        a: Linear,
    },
    /// Kimi-K3: `qkv_proj` `[3 h d, H]`, the decay's `f_a_proj` `[d, H]` and `f_b_proj`
    /// `[h d, d]`, `b_proj` `[h, H]`, and the output gate.
    Kda {
        qkv: Linear,
        f_a: Linear,
        f_b: Linear,
        b: Linear,
        gate: KdaGate,
    },
}

/// Kimi Delta Attention's output gate: `g_b_proj(g_a_proj(x))`, or `g_proj(x)` with
/// `use_full_rank_gate`.
#[derive(Debug, Clone)]
enum KdaGate {
    LowRank { a: Linear, b: Linear },
    Full(Linear),
}

impl KdaGate {
    fn forward(&self, x: &Array) -> Result<Array> {
        match self {
            KdaGate::LowRank { a, b } => b.forward(&a.forward(x)?),
            KdaGate::Full(g) => g.forward(x),
        }
    }
}

/// One linear-attention layer.
#[derive(Debug, Clone)]
pub struct GatedDeltaNet {
    module: String,
    proj: Projections,
    /// Depthwise `[conv_dim, K, 1]` (mlx.nn.Conv1d's layout; a Hugging Face `[conv_dim, 1, K]`
    /// holds the same values in the same order).
    conv: Array,
    /// `[nv]`, or Kimi's `[h, d]` (one per channel).
    dt_bias: Array,
    /// `[nv]`, or Kimi's `[h, 1]`.
    a_log: Array,
    /// `Qwen3NextRMSNormGated` over each value head (its weight is not offset by one), or
    /// Kimi's `o_norm`.
    norm: RmsNorm,
    /// `out_proj`, or Kimi's `o_proj`.
    out_proj: Linear,
    nk: usize,
    nv: usize,
    dk: usize,
    dv: usize,
    kernel: usize,
    /// Kimi's `gate_lower_bound` (`compute_lower_bound_g`).
    lower_bound: Option<f64>,
}

impl GatedDeltaNet {
    pub fn load(
        w: &dyn Weights,
        module: &str,
        cfg: &ModelConfig,
        la: &LinearAttention,
    ) -> Result<GatedDeltaNet> {
        let h = cfg.hidden_size;
        let (nk, nv, dk, dv) = (
            la.num_key_heads,
            la.num_value_heads,
            la.key_head_dim,
            la.value_head_dim,
        );
        let (key_dim, value_dim) = (nk * dk, nv * dv);
        let conv_dim = la.conv_dim();
        let m = |n: &str| format!("{module}.{n}");
        let proj = match la.projections {
            DeltaProjections::Qkvz => {
                let r = nv / nk;
                let qkvz = Linear::load(w, &m("in_proj_qkvz"), 2 * key_dim + 2 * value_dim, h)?;
                let ba = Linear::load(w, &m("in_proj_ba"), 2 * nv, h)?;
                Projections::Qkvz {
                    qkvz: qkvz.permute_rows(&qkvz_rows(nk, &[dk, dk, r * dv, r * dv]))?,
                    ba: ba.permute_rows(&qkvz_rows(nk, &[r, r]))?,
                }
            }
            DeltaProjections::Split => Projections::Split {
                qkv: Linear::load(w, &m("in_proj_qkv"), conv_dim, h)?,
                z: Linear::load(w, &m("in_proj_z"), value_dim, h)?,
                b: Linear::load(w, &m("in_proj_b"), nv, h)?,
                a: Linear::load(w, &m("in_proj_a"), nv, h)?,
            },
            DeltaProjections::Kda => Projections::Kda {
                qkv: Linear::load(w, &m("qkv_proj"), conv_dim, h)?,
                f_a: Linear::load(w, &m("f_a_proj"), dk, h)?,
                f_b: Linear::load(w, &m("f_b_proj"), key_dim, dk)?,
                b: Linear::load(w, &m("b_proj"), nv, h)?,
                gate: if la.full_rank_gate {
                    KdaGate::Full(Linear::load(w, &m("g_proj"), value_dim, h)?)
                } else {
                    KdaGate::LowRank {
                        a: Linear::load(w, &m("g_a_proj"), dv, h)?,
                        b: Linear::load(w, &m("g_b_proj"), value_dim, dv)?,
                    }
                },
            },
        };
        let kda = la.projections == DeltaProjections::Kda;
        // self.qkv_conv = ShortConv1d(3 * projection_dim, kernel): its conv under `conv`.
        let conv_name = if kda {
            m("qkv_conv.conv.weight")
        } else {
            m("conv1d.weight")
        };
        let conv = require(w, &conv_name)?;
        let k = la.conv_kernel_dim;
        // sanitize: if "conv1d.weight" in k and v.shape[-1] != 1: v.moveaxis(2, 1)
        let conv = if conv.shape() == [conv_dim, 1, k] {
            conv.reshape(&[to_i32(conv_dim)?, to_i32(k)?, 1])?
        } else {
            check_shape(&conv_name, &conv, &[conv_dim, k, 1])?;
            conv
        };
        let vector = |n: &str, len: usize| -> Result<Array> {
            let name = m(n);
            let a = require(w, &name)?;
            check_shape(&name, &a, &[len])?;
            Ok(a)
        };
        let (dt_bias, a_log) = if kda {
            // self.A_log.reshape(self.num_heads, 1), self.dt_bias.reshape(num_heads, head_dim)
            let (heads, d) = (to_i32(nv)?, to_i32(dk)?);
            (
                vector("dt_bias", key_dim)?.reshape(&[heads, d])?,
                vector("A_log", nv)?.reshape(&[heads, 1])?,
            )
        } else {
            (vector("dt_bias", nv)?, vector("A_log", nv)?)
        };
        let (norm, out_proj) = if kda {
            ("o_norm", "o_proj")
        } else {
            ("norm", "out_proj")
        };
        Ok(GatedDeltaNet {
            module: module.to_string(),
            proj,
            conv,
            dt_bias,
            a_log,
            norm: RmsNorm::load(w, &m(norm), dv, cfg.rms_norm_eps)?,
            out_proj: Linear::load(w, &m(out_proj), h, value_dim)?,
            nk,
            nv,
            dk,
            dv,
            kernel: k,
            lower_bound: la.gate_lower_bound,
        })
    }

    /// `x` `[B, S, H]` -> `[B, S, H]`, reading and advancing `cache`.
    pub fn forward(&self, x: &Array, cache: &mut LinearState) -> Result<Array> {
        let s = x.shape();
        let (b, sl) = (to_i32(s[0])?, to_i32(s[1])?);
        let (nk, nv, dk, dv) = (
            to_i32(self.nk)?,
            to_i32(self.nv)?,
            to_i32(self.dk)?,
            to_i32(self.dv)?,
        );
        let (mixed, z, beta_in, a) = match &self.proj {
            Projections::Qkvz { qkvz, ba } => {
                // fix_query_key_value_ordering gives per key head [q | k | v | z] and [b | a];
                // the rows were reordered at load ([`qkvz_rows`]), so mixed_qkv = concat(q, k,
                // v), z, b and a are contiguous ranges of the outputs.
                let (kd, vd) = (nk * dk, nv * dv);
                let qkvz = qkvz.forward(x)?;
                let ba = ba.forward(x)?;
                let cut = |t: &Array, from: i32, to: i32| -> Result<Array> {
                    Ok(t.slice(&[0, 0, from], &[b, sl, to])?)
                };
                let mixed = cut(&qkvz, 0, 2 * kd + vd)?;
                let z = cut(&qkvz, 2 * kd + vd, 2 * kd + 2 * vd)?.reshape(&[b, sl, nv, dv])?;
                (mixed, z, cut(&ba, 0, nv)?, cut(&ba, nv, 2 * nv)?)
            }
            Projections::Split { qkv, z, b: pb, a } => (
                qkv.forward(x)?,
                z.forward(x)?.reshape(&[b, sl, nv, dv])?,
                pb.forward(x)?,
                a.forward(x)?,
            ),
            // a_logits = self.f_b_proj(self.f_a_proj(x)).reshape(B, T, num_heads, head_dim)
            // b_logits = self.b_proj(x).reshape(B, T, num_heads)
            // gate = self.g_b_proj(self.g_a_proj(x)).reshape(B, T, num_heads, head_dim)
            Projections::Kda {
                qkv,
                f_a,
                f_b,
                b: pb,
                gate,
            } => (
                qkv.forward(x)?,
                gate.forward(x)?.reshape(&[b, sl, nv, dv])?,
                pb.forward(x)?.reshape(&[b, sl, nv])?,
                f_b.forward(&f_a.forward(x)?)?.reshape(&[b, sl, nv, dk])?,
            ),
        };
        let conv_dim = to_i32(self.conv.shape()[0])?;
        let keep = to_i32(self.kernel - 1)?;
        let conv_state = match &cache.conv {
            Some(c) => c.clone(),
            None => Array::zeros(&[s[0], self.kernel - 1, self.conv.shape()[0]], x.dtype())?,
        };
        let conv_input = mlx::concatenate(&[&conv_state, &mixed], 1)?;
        // cache[0] = mx.contiguous(conv_input[:, -n_keep:, :])
        let total = keep + sl;
        cache.conv = Some(
            conv_input
                .slice(&[0, total - keep, 0], &[b, total, conv_dim])?
                .contiguous()?,
        );
        // conv_out = nn.silu(self.conv1d(conv_input))
        let conv_out = mlx::conv1d(&conv_input, &self.conv, 1, 0, 1, conv_dim)?.silu()?;
        let key_dim = nk * dk;
        let part = |from: i32, to: i32, heads: i32, d: i32| -> Result<Array> {
            Ok(conv_out
                .slice(&[0, 0, from], &[b, sl, to])?
                .reshape(&[b, sl, heads, d])?)
        };
        let q = part(0, key_dim, nk, dk)?;
        let k = part(key_dim, 2 * key_dim, nk, dk)?;
        let v = part(2 * key_dim, conv_dim, nv, dv)?;

        // normalize_qk(q, k, inv_scale=head_k_dim**-0.5, eps=1e-6)
        let inv_scale = (self.dk as f64).powf(-0.5);
        let inv2 = inv_scale.powi(2);
        let rms_eps = (1e-6 * inv2) as f32;
        let q = Array::scalar(inv2, q.dtype())?.mul(&fast::rms_norm(&q, None, rms_eps)?)?;
        let k = Array::scalar(inv_scale, k.dtype())?.mul(&fast::rms_norm(&k, None, rms_eps)?)?;

        let (g, beta) = self.gates(&a, &beta_in, compiling())?;
        let state = match &cache.recurrent {
            Some(st) => st.clone(),
            None => Array::zeros(&[s[0], self.nv, self.dv, self.dk], Dtype::F32)?,
        };
        let (y, state) = self.recurrence(&q, &k, &v, &g, &beta, state)?;
        cache.recurrent = Some(state);
        cache.advance(s[1]);

        if let Projections::Kda { .. } = self.proj {
            // out = (self.o_norm(out.reshape(B, T, H, D)) * mx.sigmoid(gate)).reshape(B, T, -1)
            let out = self.norm.forward(&y)?.mul(&z.sigmoid()?)?;
            return self.out_proj.forward(&out.reshape(&[b, sl, -1])?);
        }
        // out = self.norm(out, z): precise_swiglu(out, z, rms_norm(out, w, eps))
        let normed = self.norm.forward(&y)?;
        // silu(z) * norm(y) in f32, back in y's type: one kernel where compiling.
        static GATE_OUT: mlx::CompileId = mlx::CompileId::new();
        let dt = y.dtype();
        let out = elementwise2(&GATE_OUT, &[dt as u64], &z, &normed, &|z, n| {
            z.astype(Dtype::F32)?
                .silu()?
                .mul(&n.astype(Dtype::F32)?)?
                .astype(dt)
        })?;
        self.out_proj.forward(&out.reshape(&[b, sl, -1])?)
    }

    /// `g = exp(-exp(A_log) * softplus(a + dt_bias))` (in f32), or under a lower bound
    /// `exp(lower_bound * sigmoid(exp(A_log) * (a + dt_bias)))`, and `beta = sigmoid(b)`: one
    /// compiled function where `fuse` (mlx-lm `@mx.compile`s its `compute_g`), else op by op.
    /// Kimi's `a` and `dt_bias` are per channel, its `A_log` per head (`[h, 1]`), so `g` is.
    fn gates(&self, a: &Array, b: &Array, fuse: bool) -> Result<(Array, Array)> {
        static GATES: mlx::CompileId = mlx::CompileId::new();
        let lower_bound = self.lower_bound;
        let ops = |a_log: &Array,
                   a: &Array,
                   dt_bias: &Array,
                   b: &Array|
         -> std::result::Result<Vec<Array>, mlx::Error> {
            // gated_delta_update: beta = sigmoid(b); g = compute_g(A_log, a, dt_bias)
            let beta = b.sigmoid()?;
            let decay = a_log.astype(Dtype::F32)?.exp()?;
            let g = match lower_bound {
                // compute_lower_bound_g: mx.exp(lower_bound * mx.sigmoid(
                //     mx.exp(A_log.astype(mx.float32)) * (a.astype(mx.float32) + dt_bias)))
                Some(lb) => {
                    let ad = a.astype(Dtype::F32)?.add(dt_bias)?;
                    let s = decay.mul(&ad)?.sigmoid()?;
                    Array::scalar(lb, Dtype::F32)?.mul(&s)?.exp()?
                }
                None => {
                    // softplus(a + dt_bias) = logaddexp(a + dt_bias, 0)
                    let ad = a.add(dt_bias)?;
                    let softplus = ad.logaddexp(&Array::scalar(0.0, ad.dtype())?)?;
                    // mx.exp(-mx.exp(A_log.astype(mx.float32)) * nn.softplus(a + dt_bias))
                    decay.neg()?.mul(&softplus)?.exp()?
                }
            };
            Ok(vec![g, beta])
        };
        let out = if fuse {
            let f = |xs: &[Array]| ops(&xs[0], &xs[1], &xs[2], &xs[3]);
            let constants = [
                lower_bound.is_some() as u64,
                lower_bound.map_or(0, f64::to_bits),
            ];
            let inputs = [&self.a_log, a, &self.dt_bias, b];
            mlx::compiled(&GATES, &constants, &inputs, 2, &f)?
        } else {
            ops(&self.a_log, a, &self.dt_bias, b)?
        };
        let mut out = out.into_iter();
        match (out.next(), out.next()) {
            (Some(g), Some(beta)) => Ok((g, beta)),
            _ => Err(ComputeError::Unsupported {
                what: "the gated-delta gates gave fewer than 2 arrays".into(),
            }),
        }
    }

    /// `gated_delta_ops`: q, k `[B, T, Hk, Dk]`, v `[B, T, Hv, Dv]`, g and beta `[B, T, Hv]`,
    /// state `[B, Hv, Dv, Dk]` -> y `[B, T, Hv, Dv]` (q's dtype) and the new state.
    fn recurrence(
        &self,
        q: &Array,
        k: &Array,
        v: &Array,
        g: &Array,
        beta: &Array,
        mut state: Array,
    ) -> Result<(Array, Array)> {
        let s = q.shape();
        let (b, t_len) = (to_i32(s[0])?, to_i32(s[1])?);
        let (hk, hv, dk, dv) = (
            to_i32(self.nk)?,
            to_i32(self.nv)?,
            to_i32(self.dk)?,
            to_i32(self.dv)?,
        );
        // if (repeat_factor := Hv // Hk) > 1: q = mx.repeat(q, repeat_factor, -2) (and k)
        let repeat = |x: &Array| -> Result<Array> {
            let r = hv / hk;
            if r == 1 {
                return Ok(x.clone());
            }
            let e = x.expand_dims(3)?;
            let copies: Vec<&Array> = (0..r).map(|_| &e).collect();
            Ok(mlx::concatenate(&copies, 3)?.reshape(&[b, t_len, hv, dk])?)
        };
        let (q, k) = (repeat(q)?, repeat(k)?);
        let dtype = q.dtype();
        let at = |x: &Array, t: i32, tail: &[i32]| -> Result<Array> {
            // x[:, t]
            let shape = x.shape();
            let mut start = vec![0i32; shape.len()];
            let mut stop: Vec<i32> = shape.iter().map(|&d| d as i32).collect();
            start[1] = t;
            stop[1] = t + 1;
            let mut to = vec![b];
            to.extend_from_slice(tail);
            // A decode step's one position is all of it: no slice to take.
            if t_len == 1 {
                return Ok(x.reshape(&to)?);
            }
            Ok(x.slice(&start, &stop)?.reshape(&to)?)
        };
        // One position: mlx-lm's `_gated_delta_step_ops`, which it `@mx.compile`s; one compiled
        // function where compiling.
        let ops = move |[qt, kt, vt, decay, bt, state]: [&Array; 6]|
         -> std::result::Result<Vec<Array>, mlx::Error> {
            let state = state.mul(decay)?;
            // kv_mem = (state * k[..., None, :]).sum(axis=-1)
            let kv_mem = state.mul(kt)?.sum(-1, false)?;
            // delta = (v - kv_mem) * beta[..., None]
            let delta = vt.sub(&kv_mem)?.mul(bt)?;
            // state = state + k[..., None, :] * delta[..., None]
            let state = state.add(&kt.mul(&delta.expand_dims(-1)?)?)?;
            // y = (state * q[..., None, :]).sum(axis=-1)
            let y = state.mul(qt)?.sum(-1, false)?.astype(dtype)?;
            Ok(vec![y.expand_dims(1)?, state])
        };
        static STEP: mlx::CompileId = mlx::CompileId::new();
        let fuse = compiling();
        // Scalar gating (g [B, T, Hv]): decay = g[..., None, None]; a gate per key channel
        // (Kimi's g [B, T, Hv, Dk]): decay = g[..., None, :].
        let decay_tail = if g.ndim() == 4 { dk } else { 1 };
        let mut ys = Vec::with_capacity(s[1]);
        for t in 0..t_len {
            let qt = at(&q, t, &[hv, 1, dk])?;
            let kt = at(&k, t, &[hv, 1, dk])?;
            let vt = at(v, t, &[hv, dv])?;
            let decay = at(g, t, &[hv, 1, decay_tail])?;
            let bt = at(beta, t, &[hv, 1])?;
            let inputs = [&qt, &kt, &vt, &decay, &bt, &state];
            let out = if fuse {
                let f = |xs: &[Array]| ops([&xs[0], &xs[1], &xs[2], &xs[3], &xs[4], &xs[5]]);
                mlx::compiled(&STEP, &[], &inputs, 2, &f)?
            } else {
                ops(inputs)?
            };
            let mut out = out.into_iter();
            let (Some(y), Some(next)) = (out.next(), out.next()) else {
                return Err(ComputeError::Unsupported {
                    what: "the gated-delta step gave fewer than 2 arrays".into(),
                });
            };
            state = next;
            ys.push(y);
        }
        let refs: Vec<&Array> = ys.iter().collect();
        // y = mx.stack(ys, axis=1)
        let y = mlx::concatenate(&refs, 1)?;
        Ok((y, state))
    }

    /// The module name (`model.layers.L.linear_attn`), for errors.
    pub fn module(&self) -> &str {
        &self.module
    }
}

/// The row order that turns a projection stored per key head as `[part 0 | part 1 | ..]`
/// (`in_proj_qkvz`: q, k, v, z; `in_proj_ba`: b, a; `groups` key heads) into each part for all
/// heads in a row: part 0 of head 0, of head 1, .., then part 1 of every head, and so on.
fn qkvz_rows(groups: usize, parts: &[usize]) -> Vec<u32> {
    let group: usize = parts.iter().sum();
    let mut rows = Vec::with_capacity(groups * group);
    let mut offset = 0;
    for &len in parts {
        for g in 0..groups {
            let start = g * group + offset;
            rows.extend((start..start + len).map(|r| r as u32));
        }
        offset += len;
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::qkvz_rows;

    /// Two key heads of `[q q | k | v v v]`: every head's q first, then the k's, then the v's.
    #[test]
    fn qkvz_rows_gather_each_part_of_every_head() {
        assert_eq!(
            qkvz_rows(2, &[2, 1, 3]),
            [0, 1, 6, 7, 2, 8, 3, 4, 5, 9, 10, 11]
        );
        assert_eq!(qkvz_rows(3, &[1, 1]), [0, 2, 4, 1, 3, 5]);
    }
}
