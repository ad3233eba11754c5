//! Kimi-K3's attention residuals (mlx-lm 0.32.2 models/kimi_k3.py: `ResidualBlocks`,
//! `_attn_res_combine`, `KimiK3DecoderLayer.__call__` under `attn_res_block_size`), chosen by
//! [`crate::arch::ModelConfig::attn_res_block_size`].
//!
//! In: the layers' partial sums `[B, L, H]` as they run, and per mix a weight vector `w_eff`
//! `[H]` (`norm.weight.astype(f32) * proj.weight.reshape(-1)`). Out: the input of each
//! attention, each feed-forward and the final norm: a softmax-weighted sum of the blocks'
//! starting states and the current partial sum, the weights being each state's dot product with
//! `w_eff` over its RMS (in f32, softmax over the states, `precise=True`), cast to the partial
//! sum's type. A layer that starts a block (`layer % attn_res_block_size == 0`) appends its
//! input to the blocks (with its inverse RMS) before its attention, and its partial sum starts
//! again from the attention's output.
//! Invariant: the op sequence of mlx-lm's CPU path (`_attn_res_combine`, `@mx.compile`d: one
//! compiled function where compiling, as there), on states stacked along a new first axis as
//! `ResidualBlocks.append` concatenates them, so a prompt in chunks mixes exactly as in one call
//! (the blocks hold one call's positions only: they are no cache).

use super::layers::{check_shape, compiling, require};
use super::weights::Weights;
use super::ComputeError;
use crate::arch::ModelConfig;
use crate::mlx::{self, Array, Dtype};

type Result<T> = std::result::Result<T, ComputeError>;

/// `norm.weight.astype(mx.float32) * proj.weight.reshape(-1)` of the residual mix `prefix`
/// (`model.layers.L.self_attention_res`, `..mlp_res`, `model.output_attn_res`): `[H]`, f32.
pub fn w_eff(w: &dyn Weights, prefix: &str, hidden: usize) -> Result<Array> {
    let norm_name = format!("{prefix}_norm.weight");
    let norm = require(w, &norm_name)?;
    check_shape(&norm_name, &norm, &[hidden])?;
    // A one-row linear layer, never quantized (quant_predicate: res_proj -> False): mlx-lm
    // reads its weight as it is.
    let proj_name = format!("{prefix}_proj.weight");
    let proj = require(w, &proj_name)?;
    check_shape(&proj_name, &proj, &[1, hidden])?;
    let h = i32::try_from(hidden).map_err(|_| ComputeError::Unsupported {
        what: format!("hidden size {hidden}"),
    })?;
    let out = norm.astype(Dtype::F32)?.mul(&proj.reshape(&[h])?)?;
    out.eval()?;
    Ok(out)
}

/// A layer's two mixes and whether it starts a block.
#[derive(Debug, Clone)]
pub struct LayerMix {
    /// Before the attention (`self_attention_res`).
    pub attn: Array,
    /// Before the feed-forward (`mlp_res`).
    pub mlp: Array,
    /// `layer_idx % attn_res_block_size == 0`.
    pub block_start: bool,
}

impl LayerMix {
    /// Layer `l`'s mixes, when the model has attention residuals.
    pub fn load(w: &dyn Weights, cfg: &ModelConfig, l: usize) -> Result<Option<LayerMix>> {
        let Some(size) = cfg.attn_res_block_size else {
            return Ok(None);
        };
        let p = format!("model.layers.{l}");
        Ok(Some(LayerMix {
            attn: w_eff(w, &format!("{p}.self_attention_res"), cfg.hidden_size)?,
            mlp: w_eff(w, &format!("{p}.mlp_res"), cfg.hidden_size)?,
            block_start: l % size.max(1) == 0,
        }))
    }
}

/// The blocks' starting states of one forward call (mlx-lm's `ResidualBlocks`): `raw`
/// `[K, B, L, H]` in the activations' type and `inv_rms` `[K, B, L]` (f32).
#[derive(Debug, Clone, Default)]
pub struct ResidualBlocks {
    raw: Option<Array>,
    inv_rms: Option<Array>,
    eps: f64,
}

impl ResidualBlocks {
    /// No block yet; `eps` is `rms_norm_eps`.
    pub fn new(eps: f64) -> ResidualBlocks {
        ResidualBlocks {
            raw: None,
            inv_rms: None,
            eps,
        }
    }

    /// The blocks and their inverse RMS (both absent before the first block): what a pipeline
    /// stage hands on.
    pub fn into_parts(self) -> Vec<Option<Array>> {
        vec![self.raw, self.inv_rms]
    }

    /// [`ResidualBlocks::into_parts`] back, with `eps` (`rms_norm_eps`).
    pub fn from_parts(parts: &[Option<Array>], eps: f64) -> Result<ResidualBlocks> {
        match parts {
            [raw, inv_rms] if raw.is_some() == inv_rms.is_some() => Ok(ResidualBlocks {
                raw: raw.clone(),
                inv_rms: inv_rms.clone(),
                eps,
            }),
            _ => Err(ComputeError::Unsupported {
                what: format!(
                    "attention residuals' blocks given as {} parts (want the blocks and their \
                     inverse RMS, both or neither)",
                    parts.len()
                ),
            }),
        }
    }

    /// `ResidualBlocks.append(x)`: `x` `[B, L, H]` and its inverse RMS join the blocks.
    pub fn append(&mut self, x: &Array) -> Result<()> {
        // xf = x.astype(mx.float32)
        // n = mx.rsqrt((xf * xf).mean(axis=-1) + self.eps)[None]
        let xf = x.astype(Dtype::F32)?;
        let n = xf
            .mul(&xf)?
            .mean(-1, false)?
            .add(&Array::scalar(self.eps, Dtype::F32)?)?
            .rsqrt()?
            .expand_dims(0)?;
        let r = x.expand_dims(0)?;
        (self.raw, self.inv_rms) = match (self.raw.take(), self.inv_rms.take()) {
            // self.raw = mx.concatenate([self.raw, r]); likewise inv_rms
            (Some(raw), Some(inv)) => (
                Some(mlx::concatenate(&[&raw, &r], 0)?),
                Some(mlx::concatenate(&[&inv, &n], 0)?),
            ),
            _ => (Some(r), Some(n)),
        };
        Ok(())
    }

    /// `_attn_res_mix(blocks, partial_sum, w_eff, eps)`: `partial` itself while there is no
    /// block, else `_attn_res_combine`.
    pub fn mix(&self, partial: &Array, w_eff: &Array) -> Result<Array> {
        let (Some(raw), Some(inv_rms)) = (&self.raw, &self.inv_rms) else {
            return Ok(partial.clone());
        };
        let eps = self.eps;
        if !compiling() {
            return Ok(combine(raw, inv_rms, partial, w_eff, eps)?);
        }
        static COMBINE: mlx::CompileId = mlx::CompileId::new();
        let f = |xs: &[Array]| -> std::result::Result<Vec<Array>, mlx::Error> {
            Ok(vec![combine(&xs[0], &xs[1], &xs[2], &xs[3], eps)?])
        };
        let inputs = [raw, inv_rms, partial, w_eff];
        mlx::compiled(&COMBINE, &[eps.to_bits()], &inputs, 1, &f)?
            .into_iter()
            .next()
            .ok_or_else(|| ComputeError::Unsupported {
                what: "the compiled residual mix returned no array".into(),
            })
    }
}

/// `_attn_res_combine(raw, inv_rms, partial_sum, w_eff, eps)`, op by op.
fn combine(
    raw: &Array,
    inv_rms: &Array,
    partial: &Array,
    w_eff: &Array,
    eps: f64,
) -> std::result::Result<Array, mlx::Error> {
    let k = raw.dim(0).unwrap_or(0) as i32;
    // pf = partial_sum.astype(mx.float32)
    // p_logit = (pf @ w_eff) * mx.rsqrt((pf * pf).mean(axis=-1) + eps)
    let pf = partial.astype(Dtype::F32)?;
    let rms = pf
        .mul(&pf)?
        .mean(-1, false)?
        .add(&Array::scalar(eps, Dtype::F32)?)?
        .rsqrt()?;
    let p_logit = pf.matmul(w_eff)?.mul(&rms)?;
    // logits = mx.concatenate([(raw.astype(mx.float32) @ w_eff) * inv_rms, p_logit[None]])
    let raw_logits = raw.astype(Dtype::F32)?.matmul(w_eff)?.mul(inv_rms)?;
    let logits = mlx::concatenate(&[&raw_logits, &p_logit.expand_dims(0)?], 0)?;
    // p = mx.softmax(logits, axis=0, precise=True)
    let p = logits.softmax(0, true)?;
    let stop: Vec<i32> = p.shape().iter().map(|&d| d as i32).collect();
    let mut start = vec![0i32; stop.len()];
    // p[:-1, ..., None], p[-1, ..., None]
    let mut head_stop = stop.clone();
    head_stop[0] = k;
    let p_raw = p.slice(&start, &head_stop)?.expand_dims(-1)?;
    start[0] = k;
    let mut last_shape: Vec<i32> = stop[1..].to_vec();
    last_shape.push(1);
    let p_last = p.slice(&start, &stop)?.reshape(&last_shape)?;
    // out = (p[:-1, ..., None] * raw).sum(axis=0) + p[-1, ..., None] * partial_sum
    let out = p_raw.mul(raw)?.sum(0, false)?.add(&p_last.mul(partial)?)?;
    // return out.astype(partial_sum.dtype)
    out.astype(partial.dtype())
}
