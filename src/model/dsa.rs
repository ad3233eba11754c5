//! DeepSeek Sparse Attention's lightning indexer (DeepSeek-V3.2, GLM-5): which cached positions
//! each query of a multi-head latent attention layer (mla.rs) attends to.
//!
//! In: the attention's input `x` `[B, L, H]`, the query bottleneck's normed output `qr`
//! `[B, L, q_lora_rank]`, the causal mask of a chunk, and the indexer's keys cache. Out: `None`
//! while the context (cached and new positions) is at most `index_topk` long, so every position
//! is kept; else the `index_topk` positions of the best scores per query, `[B, 1, L, topk]`. The
//! cache grows by `L` keys either way.
//! Invariant: the op sequence of mlx-lm 0.32.2's `Indexer.__call__` (models/deepseek_v32.py),
//! the order of the sum over heads included (a chunk adds the heads one by one, a lone token
//! reduces them at once, as mlx-lm does), so the chosen positions, ties broken by MLX's
//! `argpartition`, are mlx-lm's.

use super::attention::RopeSpec;
use super::kv_cache::{to_i32, IndexKeys};
use super::layers::{check_shape, require, Linear};
use super::weights::Weights;
use super::ComputeError;
use crate::arch::{Indexer, ModelConfig};
use crate::mlx::{fast, Array, Dtype};

type Result<T> = std::result::Result<T, ComputeError>;

/// `nn.LayerNorm`'s default `eps`.
const LAYER_NORM_EPS: f32 = 1e-5;

/// One layer's indexer (`self_attn.indexer`).
#[derive(Debug, Clone)]
pub struct DsaIndexer {
    wq_b: Linear,
    wk: Linear,
    k_norm_weight: Array,
    k_norm_bias: Array,
    weights_proj: Linear,
    heads: usize,
    head_dim: usize,
    topk: usize,
    /// `n_heads**-0.5 * head_dim**-0.5`, the per-head weights' scale.
    weight_scale: f64,
    rope: RopeSpec,
}

impl DsaIndexer {
    pub fn load(
        w: &dyn Weights,
        module: &str,
        cfg: &ModelConfig,
        ix: &Indexer,
        q_lora_rank: usize,
    ) -> Result<DsaIndexer> {
        let (h, heads, d) = (cfg.hidden_size, ix.n_heads, ix.head_dim);
        let norm = |part: &str| -> Result<Array> {
            let name = format!("{module}.k_norm.{part}");
            let a = require(w, &name)?;
            check_shape(&name, &a, &[d])?;
            Ok(a)
        };
        // self.rope = initialize_rope(qk_rope_head_dim, rope_theta,
        //     traditional=indexer_rope_interleave, scaling_config=rope_scaling)
        let mut rope = RopeSpec::from_config(cfg)?;
        rope.traditional = ix.rope_traditional;
        Ok(DsaIndexer {
            wq_b: Linear::load(w, &format!("{module}.wq_b"), heads * d, q_lora_rank)?,
            wk: Linear::load(w, &format!("{module}.wk"), d, h)?,
            k_norm_weight: norm("weight")?,
            k_norm_bias: norm("bias")?,
            weights_proj: Linear::load(w, &format!("{module}.weights_proj"), heads, h)?,
            heads,
            head_dim: d,
            topk: ix.topk,
            // weights_proj(x) * (self.n_heads**-0.5 * self.softmax_scale)
            weight_scale: (heads as f64).powf(-0.5) * (d as f64).powf(-0.5),
            rope,
        })
    }

    /// The positions each query keeps, or `None` for all of them (see the module header);
    /// `keep` is the chunk's causal mask `[L, T]` (`None` for a lone token).
    pub fn select(
        &self,
        x: &Array,
        qr: &Array,
        keep: Option<&Array>,
        cache: &mut IndexKeys,
    ) -> Result<Option<Array>> {
        let s = x.shape();
        let (b, l) = (to_i32(s[0])?, to_i32(s[1])?);
        let (heads, d) = (to_i32(self.heads)?, to_i32(self.head_dim)?);
        // q = wq_b(qr).reshape(b, s, n_heads, head_dim).swapaxes(1, 2)
        let q = self
            .wq_b
            .forward(qr)?
            .reshape(&[b, l, heads, d])?
            .transpose(&[0, 2, 1, 3])?;
        // k = k_norm(wk(x)).reshape(b, 1, s, head_dim)
        let k = fast::layer_norm(
            &self.wk.forward(x)?,
            Some(&self.k_norm_weight),
            Some(&self.k_norm_bias),
            LAYER_NORM_EPS,
        )?
        .reshape(&[b, 1, l, d])?;
        let offset = cache.offset();
        let q = self.rope.apply(&q, offset)?;
        let k = self.rope.apply(&k, offset)?;
        let k = cache.update_and_fetch(&k)?;
        // if k.shape[2] <= self.index_topk: return None
        let total = k.shape()[2];
        if total <= self.topk {
            return Ok(None);
        }
        // scores = max(q @ k.swapaxes(-1, -2), 0)  [B, heads, L, T]
        let scores = q.matmul(&k.transpose(&[0, 1, 3, 2])?)?;
        let dtype = scores.dtype();
        let scores = scores.maximum(&Array::scalar(0.0, dtype)?)?;
        // weights = weights_proj(x) * scale, as [B, heads, L, 1]
        let weights = self.weights_proj.forward(x)?;
        let weights = weights
            .mul(&Array::scalar(self.weight_scale, weights.dtype())?)?
            .transpose(&[0, 2, 1])?
            .expand_dims(-1)?;
        let scores = scores.mul(&weights)?;
        let t = to_i32(total)?;
        let scores = if l > 1 {
            // sum(scores[:, h : h + 1] for h in range(n_heads)), from Python's start of 0
            let mut acc = Array::scalar(0.0, dtype)?;
            for h in 0..heads {
                let head = scores.slice(&[0, h, 0, 0], &[b, h + 1, l, t])?;
                acc = acc.add(&head)?;
            }
            acc
        } else {
            scores.sum(1, true)?
        };
        let scores = match keep {
            // mx.where(mask, scores, -inf)
            Some(m) => m.select(&scores, &Array::scalar(f64::NEG_INFINITY, scores.dtype())?)?,
            None => scores,
        };
        // mx.argpartition(scores, kth=-index_topk, axis=-1)[..., -index_topk:]
        let topk = to_i32(self.topk)?;
        let part = scores.argpartition(t - topk, -1)?;
        Ok(Some(part.slice(&[0, 0, 0, t - topk], &[b, 1, l, t])?))
    }
}

/// A prompt chunk's mask `[B, 1, L, T]`: the causal `keep` `[L, T]` where the indexer chose
/// the position (`sparse_mask = put_along_axis(zeros, topk_indices, True)`, `& mask`).
pub fn sparse_mask(topk: &Array, keep: &Array) -> Result<Array> {
    let mut shape = topk.shape();
    let last = shape.len() - 1;
    shape[last] = keep.shape()[1];
    let chosen = Array::zeros(&shape, Dtype::Bool)?.put_along_axis(
        topk,
        &Array::scalar(1.0, Dtype::Bool)?,
        -1,
    )?;
    // sparse_mask & mask
    Ok(keep.select(&chosen, &Array::scalar(0.0, Dtype::Bool)?)?)
}
