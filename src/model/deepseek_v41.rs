//! DeepSeek-V4.1's blocks (only it uses them): hyper-connections around each layer, and its
//! attention over a sliding window plus compressed, indexer-chosen latents, with the cache that
//! holds both.
//!
//! In: a layer's streams `[B, L, hc, H]` (hyper-connections), or the collapsed hidden state
//! `[B, L, H]` (attention), the layer's [`CompressedCache`] and the state the layers of one call
//! share ([`Shared`]: the latest KV source's latents and index keys, the latest indexer's
//! choice). Out: new streams, or the attention's output `[B, L, H]`.
//! Invariant: the op sequence of mlx-lm 0.32.2's `models/deepseek_v41.py` (`HyperConnection`,
//! `_sinkhorn`'s loop, `_collapse`, `_expand`, `Attention.__call__`, `Compressor`, `Indexer`
//! with its candidate blocks, `_sparse_attention`, `_fake_quant_fp8`, `_fake_quant_fp4`,
//! `_apply_rope`), so logits are mlx-lm's bit for bit. The positions each query may see (window
//! rows, visible compressed groups) depend on positions alone and are built on the host as
//! mlx-lm builds them with `mx.arange` (int32).

use super::attention::Yarn;
use super::layers::{check_quantized, check_shape, require, Linear, Matrix, RmsNorm};
use super::weights::Weights;
use super::ComputeError;
use crate::arch::{CompressedAttention, HyperConnections, ModelConfig};
use crate::mlx::{self, concatenate, fast, Array, Dtype, QuantizedMatrix};

type Result<T> = std::result::Result<T, ComputeError>;

fn i32_of(n: usize) -> Result<i32> {
    i32::try_from(n).map_err(|_| ComputeError::Unsupported {
        what: format!("size {n} beyond i32"),
    })
}

fn dims_i32(a: &Array) -> Vec<i32> {
    a.shape().iter().map(|&d| d as i32).collect()
}

fn f32s(v: f64) -> Result<Array> {
    Ok(Array::scalar(v, Dtype::F32)?)
}

/// `a[..., start:stop]` along the last axis.
fn last_axis(a: &Array, start: i32, stop: i32) -> Result<Array> {
    let shape = dims_i32(a);
    let mut from = vec![0; shape.len()];
    let mut to = shape.clone();
    if let (Some(f), Some(t)) = (from.last_mut(), to.last_mut()) {
        *f = start;
        *t = stop;
    }
    Ok(a.slice(&from, &to)?)
}

/// `a[:, start:stop]` along axis 1.
fn axis1(a: &Array, start: i32, stop: i32) -> Result<Array> {
    let shape = dims_i32(a);
    let mut from = vec![0; shape.len()];
    let mut to = shape.clone();
    from[1] = start;
    to[1] = stop;
    Ok(a.slice(&from, &to)?)
}

/// `_append(cached, new)`: `new` after `cached` along axis 1.
fn append(cached: Option<&Array>, new: &Array) -> Result<Array> {
    Ok(match cached {
        None => new.clone(),
        Some(c) => concatenate(&[c, new], 1)?,
    })
}

/// One layer's cache (mlx-lm's `LayerCache`): the window's last `window_size` rows, the
/// compressed latents and index keys of a KV source layer, and the rows of its open group.
#[derive(Debug, Clone)]
pub struct CompressedCache {
    window_size: usize,
    offset: usize,
    window: Option<Array>,
    compress_kv: Option<Array>,
    index_k: Option<Array>,
    pending_kv: Option<Array>,
    pending_gate: Option<Array>,
}

impl CompressedCache {
    pub fn new(window_size: usize) -> CompressedCache {
        CompressedCache {
            window_size,
            offset: 0,
            window: None,
            compress_kv: None,
            index_k: None,
            pending_kv: None,
            pending_gate: None,
        }
    }

    /// Positions processed.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// Rows the window holds now.
    pub fn window_rows(&self) -> usize {
        self.window.as_ref().and_then(|w| w.dim(1)).unwrap_or(0)
    }

    pub fn arrays(&self) -> Vec<&Array> {
        [
            self.window.as_ref(),
            self.compress_kv.as_ref(),
            self.index_k.as_ref(),
            self.pending_kv.as_ref(),
            self.pending_gate.as_ref(),
        ]
        .into_iter()
        .flatten()
        .collect()
    }

    /// `update_window`: the window with `kv` appended; keeps its last `window_size` rows.
    fn update_window(&mut self, kv: &Array) -> Result<Array> {
        let window = append(self.window.as_ref(), kv)?;
        let rows = window.dim(1).unwrap_or(0);
        let keep = rows.min(self.window_size);
        self.window = Some(axis1(&window, i32_of(rows - keep)?, i32_of(rows)?)?);
        self.offset += kv.dim(1).unwrap_or(0);
        Ok(window)
    }
}

/// What the layers of one call share (mlx-lm's `shared` dict).
#[derive(Debug, Default)]
pub struct Shared {
    compress_kv: Option<Array>,
    index_k: Option<Array>,
    topk_idx: Option<Array>,
    /// The candidate source's mask of the latents later indexers may choose, `[B, L, K]`.
    candidates: Option<Array>,
}

impl Shared {
    /// The four arrays in a fixed order (latents, index keys, the indexer's choice, its
    /// candidates), each present or not: what a pipeline stage hands on.
    pub fn into_parts(self) -> [Option<Array>; 4] {
        [
            self.compress_kv,
            self.index_k,
            self.topk_idx,
            self.candidates,
        ]
    }

    /// [`Shared::into_parts`] back; `None` unless exactly four parts.
    pub fn from_parts(parts: &[Option<Array>]) -> Option<Shared> {
        let [compress_kv, index_k, topk_idx, candidates] = parts else {
            return None;
        };
        Some(Shared {
            compress_kv: compress_kv.clone(),
            index_k: index_k.clone(),
            topk_idx: topk_idx.clone(),
            candidates: candidates.clone(),
        })
    }
}

/// `_window_indices(previous, length, window)`, broadcast to `batch`: `[B, L, width]` int32,
/// -1 for none.
pub fn window_indices(
    previous: usize,
    length: usize,
    window: usize,
    batch: usize,
) -> Result<Array> {
    let width = window.min(previous + length);
    let mut v = Vec::with_capacity(batch * length * width);
    for _ in 0..batch {
        for t in 0..length {
            let end = (previous + t) as i64;
            let start = (end - window as i64 + 1).max(0);
            for j in 0..width as i64 {
                let i = start + j;
                v.push(if i > end { -1 } else { i as i32 });
            }
        }
    }
    Ok(Array::from_slice(&v, &[batch, length, width])?)
}

/// The hyper-connections' mixes (`HyperConnection`): `hc_fn` `[(2 + hc) * hc, hc * H]`,
/// `hc_base`, and the 3 scales of the pre, post and comb columns.
#[derive(Debug, Clone)]
pub struct HyperConnection {
    fn_t: Array,
    base: Array,
    scales: Array,
    hc: usize,
    iters: usize,
    eps: f64,
    norm_eps: f32,
}

impl HyperConnection {
    pub fn load(w: &dyn Weights, module: &str, cfg: &ModelConfig) -> Result<HyperConnection> {
        let h = cfg
            .hyper_connections
            .as_ref()
            .ok_or_else(|| ComputeError::Unsupported {
                what: "hyper-connections without their config".into(),
            })?;
        let HyperConnections {
            mult: hc,
            sinkhorn_iters,
            eps,
        } = *h;
        let mix = (2 + hc) * hc;
        let get = |part: &str, shape: &[usize]| -> Result<Array> {
            let name = format!("{module}.{part}");
            let a = require(w, &name)?;
            check_shape(&name, &a, shape)?;
            Ok(a)
        };
        let fn_w = get("fn", &[mix, hc * cfg.hidden_size])?;
        let scale = get("scale", &[3])?;
        // self.scale[self._scale_ids]: pre, post, then comb columns.
        let ids: Vec<i32> = (0..mix)
            .map(|i| {
                if i < hc {
                    0
                } else if i < 2 * hc {
                    1
                } else {
                    2
                }
            })
            .collect();
        let scales = scale.take(&Array::from_slice(&ids, &[mix])?, 0)?;
        Ok(HyperConnection {
            fn_t: fn_w.transpose(&[1, 0])?,
            base: get("base", &[mix])?,
            scales,
            hc,
            iters: sinkhorn_iters,
            eps,
            norm_eps: cfg.rms_norm_eps as f32,
        })
    }

    /// `(pre, post, comb)` of `streams` `[B, L, hc, H]`: `[B, L, hc]`, `[B, L, hc]`,
    /// `[B, L, hc, hc]`, all f32.
    pub fn forward(&self, streams: &Array) -> Result<(Array, Array, Array)> {
        let s = dims_i32(streams);
        let hc = i32_of(self.hc)?;
        // flat = streams.reshape(B, L, -1).astype(f32); flat = rms_norm(flat, None, eps)
        let flat = streams.reshape(&[s[0], s[1], -1])?.astype(Dtype::F32)?;
        let flat = fast::rms_norm(&flat, None, self.norm_eps)?;
        // mix = (flat @ self.fn.T) * self.scale[self._scale_ids] + self.base
        let mix = flat
            .matmul(&self.fn_t)?
            .mul(&self.scales)?
            .add(&self.base)?;
        let n = i32_of((2 + self.hc) * self.hc)?;
        let pre = last_axis(&mix, 0, hc)?;
        let post = last_axis(&mix, hc, 2 * hc)?;
        let comb = last_axis(&mix, 2 * hc, n)?;
        let eps = f32s(self.eps)?;
        // pre = mx.sigmoid(pre) + hc_eps; post = 2.0 * mx.sigmoid(post)
        let pre = pre.sigmoid()?.add(&eps)?;
        let post = f32s(2.0)?.mul(&post.sigmoid()?)?;
        // comb = mx.softmax(comb.reshape(..., hc, hc), axis=-1) + hc_eps
        let comb = comb
            .reshape(&[s[0], s[1], hc, hc])?
            .softmax(-1, false)?
            .add(&eps)?;
        Ok((pre, post, self.sinkhorn(comb)?))
    }

    /// `_sinkhorn`'s loop: the columns normalized, then the rows and the columns `iters - 1`
    /// more times, each sum plus `eps`.
    fn sinkhorn(&self, mut comb: Array) -> Result<Array> {
        if self.iters == 0 {
            return Ok(comb);
        }
        let eps = Array::from_slice(&[self.eps as f32], &[1])?;
        comb = comb.div(&comb.sum(-2, true)?.add(&eps)?)?;
        for _ in 1..self.iters {
            comb = comb.div(&comb.sum(-1, true)?.add(&eps)?)?;
            comb = comb.div(&comb.sum(-2, true)?.add(&eps)?)?;
        }
        Ok(comb)
    }
}

/// `_collapse(streams, mix)`: `sum(mix[..., None] * streams.astype(f32), axis=2)` in the
/// streams' dtype.
pub fn collapse(streams: &Array, mix: &Array) -> Result<Array> {
    let out = mix
        .expand_dims(-1)?
        .mul(&streams.astype(Dtype::F32)?)?
        .sum(2, false)?;
    Ok(out.astype(streams.dtype())?)
}

/// `_expand(x, residual, post, comb)`: `post[..., None] * x[..., None, :] + sum(comb[..., None]
/// * residual[..., :, None, :], axis=2)`, in the residual's dtype.
pub fn expand(x: &Array, residual: &Array, post: &Array, comb: &Array) -> Result<Array> {
    let mixed = comb
        .expand_dims(-1)?
        .mul(&residual.expand_dims(-2)?)?
        .sum(2, false)?;
    let out = post
        .expand_dims(-1)?
        .mul(&x.expand_dims(-2)?)?
        .add(&mixed)?;
    Ok(out.astype(residual.dtype())?)
}

/// mlx-lm's `YarnRoPE` with `traditional=True` as V4.1 builds it (its `mscale` is 1): explicit
/// frequencies, negated for the inverse rotation.
#[derive(Debug, Clone)]
struct Rotary {
    dims: i32,
    freqs: Array,
    inverse: Array,
}

impl Rotary {
    fn new(dims: usize, base: f64, scaling: &serde_json::Value) -> Result<Rotary> {
        let y = Yarn::new(dims, base, scaling)?;
        let freqs = y.freqs().clone();
        Ok(Rotary {
            dims: i32_of(dims)?,
            inverse: freqs.neg()?,
            freqs,
        })
    }

    /// `_apply_rope(x, rope, rope_dim, offset, scale, inverse)`: the last `dims` values of
    /// each row rotated in f32, the rest as they are.
    fn apply(&self, x: &Array, offset: usize, scale: f32, inverse: bool) -> Result<Array> {
        let d = *x.shape().last().unwrap_or(&0) as i32;
        let head = last_axis(x, 0, d - self.dims)?;
        let mut tail = last_axis(x, d - self.dims, d)?.astype(Dtype::F32)?;
        let four = x.ndim() == 4;
        if four {
            tail = tail.transpose(&[0, 2, 1, 3])?;
        }
        let freqs = if inverse { &self.inverse } else { &self.freqs };
        tail = fast::rope_freqs(&tail, self.dims, true, scale, i32_of(offset)?, freqs)?;
        if four {
            tail = tail.transpose(&[0, 2, 1, 3])?;
        }
        Ok(concatenate(&[&head, &tail.astype(x.dtype())?], -1)?)
    }
}

/// `_fake_quant_fp8(x, block_size)`: a round trip through FP8 E4M3 with power-of-two block
/// scales.
fn fake_quant_fp8(x: &Array, block: usize) -> Result<Array> {
    let shape = dims_i32(x);
    let last = *shape.last().unwrap_or(&0);
    if last % block as i32 != 0 {
        return Ok(x.clone());
    }
    let mut blocked = shape[..shape.len() - 1].to_vec();
    blocked.extend([-1, block as i32]);
    let blocks = x.astype(Dtype::F32)?.reshape(&blocked)?;
    let amax = blocks.abs()?.max(-1, true)?.maximum(&f32s(1e-4)?)?;
    let exponent = amax.div(&f32s(448.0)?)?.log2()?.ceil()?;
    let scale = f32s(2.0)?.power(&exponent)?;
    let q = blocks
        .div(&scale)?
        .maximum(&f32s(-448.0)?)?
        .minimum(&f32s(448.0)?)?;
    let out = q.to_fp8()?.from_fp8_f32()?.mul(&scale)?;
    Ok(out.reshape(&shape)?.astype(x.dtype())?)
}

/// `_round_fp4(x)`: the nearest E2M1 value, by the thresholds mlx-lm counts.
fn round_fp4(x: &Array) -> Result<Array> {
    let mag = x.abs()?;
    let mut idx = Array::zeros(&mag.shape(), Dtype::I32)?;
    for t in [0.25, 1.25, 2.5, 5.0] {
        idx = idx.add(&mag.greater(&f32s(t)?)?.astype(Dtype::I32)?)?;
    }
    for t in [0.75, 1.75, 3.5] {
        idx = idx.add(&mag.greater_equal(&f32s(t)?)?.astype(Dtype::I32)?)?;
    }
    let lut = Array::from_slice(&[0.0f32, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], &[8])?;
    Ok(x.sign()?.mul(&lut.take(&idx, 0)?)?)
}

/// `_fake_quant_fp4(x, block_size, e4m3_scale)`: a round trip through E2M1 with per-block
/// scales (E4M3, or powers of two).
fn fake_quant_fp4(x: &Array, block: usize, e4m3_scale: bool) -> Result<Array> {
    let shape = dims_i32(x);
    let last = *shape.last().unwrap_or(&0);
    if last % block as i32 != 0 {
        return Ok(x.clone());
    }
    let mut blocked = shape[..shape.len() - 1].to_vec();
    blocked.extend([-1, block as i32]);
    let blocks = x.astype(Dtype::F32)?.reshape(&blocked)?;
    let floor = if e4m3_scale {
        6.0 * 2f64.powi(-9)
    } else {
        6.0 * 2f64.powi(-126)
    };
    let amax = blocks.abs()?.max(-1, true)?.maximum(&f32s(floor)?)?;
    let scale = if e4m3_scale {
        amax.div(&f32s(6.0)?)?.to_fp8()?.from_fp8_f32()?
    } else {
        f32s(2.0)?.power(&amax.div(&f32s(6.0)?)?.log2()?.ceil()?)?
    };
    let clipped = blocks
        .div(&scale)?
        .maximum(&f32s(-6.0)?)?
        .minimum(&f32s(6.0)?)?;
    let q = round_fp4(&clipped)?.mul(&scale)?;
    Ok(q.reshape(&shape)?.astype(x.dtype())?)
}

/// A KV source layer's `Compressor`: each full group of `ratio` positions pooled into one latent
/// by a softmax over its gate.
#[derive(Debug, Clone)]
struct Compressor {
    ratio: usize,
    kv_proj: Linear,
    gate_proj: Option<Linear>,
    kv_norm: RmsNorm,
}

impl Compressor {
    /// The latents of the groups this call closes (`None`: none) and the index of the first.
    fn forward(
        &self,
        x: &Array,
        start_pos: usize,
        cache: &mut CompressedCache,
    ) -> Result<(Option<Array>, usize)> {
        let Some(gate_proj) = self.gate_proj.as_ref().filter(|_| self.ratio > 1) else {
            return Ok((
                Some(self.kv_norm.forward(&self.kv_proj.forward(x)?)?),
                start_pos,
            ));
        };
        let h = x.astype(Dtype::F32)?;
        let pending = cache
            .pending_kv
            .as_ref()
            .and_then(|p| p.dim(1))
            .unwrap_or(0);
        let kv = append(cache.pending_kv.as_ref(), &self.kv_proj.forward(&h)?)?;
        let gate = append(cache.pending_gate.as_ref(), &gate_proj.forward(&h)?)?;
        let n = kv.dim(1).unwrap_or(0);
        let full = n - n % self.ratio;
        cache.pending_kv = Some(axis1(&kv, i32_of(full)?, i32_of(n)?)?);
        cache.pending_gate = Some(axis1(&gate, i32_of(full)?, i32_of(n)?)?);
        let first = (start_pos - pending) / self.ratio;
        if full == 0 {
            return Ok((None, first));
        }
        let s = dims_i32(&kv);
        let grouped = [s[0], -1, i32_of(self.ratio)?, s[2]];
        let kv = axis1(&kv, 0, i32_of(full)?)?.reshape(&grouped)?;
        let gate = axis1(&gate, 0, i32_of(full)?)?.reshape(&grouped)?;
        // latent = mx.sum(kv * mx.softmax(gate, axis=2), axis=2)
        let latent = kv.mul(&gate.softmax(2, false)?)?.sum(2, false)?;
        Ok((
            Some(self.kv_norm.forward(&latent.astype(x.dtype())?)?),
            first,
        ))
    }
}

/// An index source layer's `Indexer` (its keys come from the KV source's latents).
#[derive(Debug, Clone)]
struct LatentIndexer {
    q_b_proj: Linear,
    weights_proj: Linear,
    /// `k_proj` and `k_norm`, in a layer that is also a KV source.
    keys: Option<(Linear, RmsNorm)>,
    heads: usize,
    head_dim: usize,
    topk: usize,
    ratio: usize,
    /// In the candidate source layer: `(candidate_topk_blocks, candidate_block_size)`.
    candidate_source: Option<(usize, usize)>,
}

impl LatentIndexer {
    /// The top-k compressed entries of each query, `[B, L, k]` int32, -1 for none, and the
    /// candidate mask: the one this layer selects (the candidate source), else `candidates`.
    fn select(
        &self,
        x: &Array,
        q_residual: &Array,
        index_k: Option<&Array>,
        candidates: Option<&Array>,
        rope: &Rotary,
        start_pos: usize,
    ) -> Result<(Array, Option<Array>)> {
        let s = x.shape();
        let (b, l) = (s[0], s[1]);
        let entries = index_k.and_then(|k| k.dim(1)).unwrap_or(0);
        let Some(index_k) = index_k.filter(|_| entries > 0) else {
            return Ok((Array::zeros(&[b, l, 0], Dtype::I32)?, candidates.cloned()));
        };
        let (bi, li) = (i32_of(b)?, i32_of(l)?);
        let q = self.q_b_proj.forward(q_residual)?.reshape(&[
            bi,
            li,
            i32_of(self.heads)?,
            i32_of(self.head_dim)?,
        ])?;
        let q = rope.apply(&q, start_pos, 1.0, false)?;
        let q = fake_quant_fp4(&q, 32, false)?;
        let keys = index_k.astype(Dtype::F32)?;
        // weights = weights_proj(x).astype(f32) * n_heads**-0.5
        let weights = self
            .weights_proj
            .forward(x)?
            .astype(Dtype::F32)?
            .mul(&f32s((self.heads as f64).powf(-0.5))?)?;
        // scores = q.astype(f32) @ keys[:, None].swapaxes(-1, -2)
        let scores = q
            .astype(Dtype::F32)?
            .matmul(&keys.expand_dims(1)?.transpose(&[0, 1, 3, 2])?)?;
        let scores = scores
            .maximum(&f32s(0.0)?)?
            .mul(&f32s((self.head_dim as f64).powf(-0.5))?)?;
        let scores = scores.mul(&weights.expand_dims(-1)?)?.sum(2, false)?;
        // lens = (start_pos + 1 + arange(L)) // ratio; visible = arange(K) < lens
        let lens: Vec<i32> = (0..l)
            .map(|t| ((start_pos + 1 + t) / self.ratio) as i32)
            .collect();
        let mut visible = Vec::with_capacity(l * entries);
        for &n in &lens {
            visible.extend((0..entries).map(|k| u8::from((k as i32) < n)));
        }
        let visible = Array::from_slice(&visible, &[1, l, entries])?.astype(Dtype::Bool)?;
        let scores = visible.select(&scores, &f32s(f64::NEG_INFINITY)?)?;
        let (scores, candidates) = match (self.candidate_source, candidates) {
            (Some((topk_blocks, block)), _) => {
                let mask = self.candidate_blocks(&scores, &lens, topk_blocks, block)?;
                (scores, Some(mask))
            }
            // scores = mx.where(candidates, scores, -mx.inf)
            (None, Some(c)) => (
                c.select(&scores, &f32s(f64::NEG_INFINITY)?)?,
                Some(c.clone()),
            ),
            (None, None) => (scores, None),
        };
        let k = self.topk.min(entries);
        let ki = i32_of(k)?;
        let part = scores.neg()?.argpartition(ki - 1, -1)?;
        let chosen = last_axis(&part, 0, ki)?.astype(Dtype::I32)?;
        let lens = Array::from_slice(&lens, &[1, l, 1])?;
        let none = Array::scalar(-1.0, Dtype::I32)?;
        Ok((chosen.less(&lens)?.select(&chosen, &none)?, candidates))
    }

    /// The candidate source's mask `[B, L, K]`: per query, the latents of its best
    /// `topk_blocks` blocks of `block` by their best score, the newest (partly full) block
    /// always among them, blocks no latent of which is visible never.
    fn candidate_blocks(
        &self,
        scores: &Array,
        lens: &[i32],
        topk_blocks: usize,
        block: usize,
    ) -> Result<Array> {
        let s = scores.shape();
        let (b, l, k) = (s[0], s[1], s[2]);
        let neg_inf = f32s(f64::NEG_INFINITY)?;
        // padded = mx.pad(scores, [.., (0, pad)], constant_values=-mx.inf)
        let pad = (block - k % block) % block;
        let padded = if pad > 0 {
            let fill = Array::zeros(&[b, l, pad], Dtype::F32)?.add(&neg_inf)?;
            concatenate(&[scores, &fill], -1)?
        } else {
            scores.clone()
        };
        let nb = (k + pad) / block;
        let (bi, li, nbi, blocki) = (i32_of(b)?, i32_of(l)?, i32_of(nb)?, i32_of(block)?);
        let block_scores = padded.reshape(&[bi, li, nbi, blocki])?.max(-1, false)?;
        // last = where(lens > 0, (lens - 1) // block, -1); the newest block scores inf
        let mut newest = Vec::with_capacity(l * nb);
        for &n in lens {
            let last = if n > 0 { (n - 1) / block as i32 } else { -1 };
            newest.extend((0..nb).map(|j| u8::from(j as i32 == last)));
        }
        let newest = Array::from_slice(&newest, &[1, l, nb])?.astype(Dtype::Bool)?;
        let block_scores = newest.select(&f32s(f64::INFINITY)?, &block_scores)?;
        let kb = i32_of(topk_blocks.min(nb))?;
        let part = block_scores.neg()?.argpartition(kb - 1, -1)?;
        let chosen = last_axis(&part, 0, kb)?;
        // reachable = take_along_axis(block_scores, chosen) > -inf
        let reachable = block_scores
            .take_along_axis(&chosen, -1)?
            .greater(&neg_inf)?;
        let picked =
            Array::zeros(&[b, l, nb], Dtype::Bool)?.put_along_axis(&chosen, &reachable, -1)?;
        // mx.repeat(candidates, block, axis=-1)[..., :K]
        let one = picked.expand_dims(-1)?;
        let copies: Vec<&Array> = (0..block).map(|_| &one).collect();
        let repeated = concatenate(&copies, -1)?.reshape(&[bi, li, nbi * blocki])?;
        last_axis(&repeated, 0, i32_of(k)?)
    }
}

/// `wo_a`: `o_groups` matrices `[o_lora_rank, in]`, each applied to its own group of heads
/// (mlx-lm's `SwitchLinear` with the group ids as indices).
#[derive(Debug, Clone)]
struct GroupedLinear {
    weight: Matrix,
    ids: Array,
}

impl GroupedLinear {
    /// mlx-lm's `[G, R, in]` stack, or upstream's `[G * R, in]` read as one.
    fn load(
        w: &dyn Weights,
        module: &str,
        groups: usize,
        rank: usize,
        in_dim: usize,
    ) -> Result<GroupedLinear> {
        let (g, r) = (i32_of(groups)?, i32_of(rank)?);
        let stacked = |a: &Array| -> Result<Array> {
            let s = dims_i32(a);
            Ok(if s.len() == 2 {
                a.reshape(&[g, r, s[1]])?
            } else {
                a.clone()
            })
        };
        let name = format!("{module}.weight");
        let weight = require(w, &name)?;
        let weight = match w.get(&format!("{module}.scales")) {
            None => {
                let wt = stacked(&weight)?;
                check_shape(&name, &wt, &[groups, rank, in_dim])?;
                Matrix::Plain(wt)
            }
            Some(scales) => {
                let q =
                    w.quantization(module)
                        .ok_or_else(|| ComputeError::MissingQuantization {
                            module: module.to_string(),
                        })?;
                let m = QuantizedMatrix {
                    weight: stacked(&weight)?,
                    scales: stacked(&scales)?,
                    biases: w
                        .get(&format!("{module}.biases"))
                        .map(|b| stacked(&b))
                        .transpose()?,
                    group_size: q.group_size,
                    bits: q.bits,
                    mode: q.mode,
                };
                check_quantized(module, &m, &[groups], rank, in_dim)?;
                Matrix::Quantized(m)
            }
        };
        let ids: Vec<i32> = (0..g).collect();
        Ok(GroupedLinear {
            weight,
            ids: Array::from_slice(&ids, &[1, groups])?,
        })
    }

    /// `x` `[N, G, 1, in]` -> `[N, G, 1, R]`.
    fn forward(&self, x: &Array) -> Result<Array> {
        Ok(match &self.weight {
            Matrix::Quantized(q) => mlx::gather_qmm(x, q, None, Some(&self.ids), true, false)?,
            Matrix::Plain(wt) => {
                mlx::gather_mm(x, &wt.transpose(&[0, 2, 1])?, None, Some(&self.ids), false)?
            }
        })
    }
}

/// A layer's attention (mlx-lm's `Attention` of deepseek_v41.py).
#[derive(Debug, Clone)]
pub struct CompressedAttentionLayer {
    q_a_proj: Linear,
    q_a_norm: RmsNorm,
    q_b_proj: Linear,
    kv_proj: Linear,
    kv_norm: RmsNorm,
    o_a_proj: GroupedLinear,
    o_b_proj: Linear,
    sinks: Array,
    heads: usize,
    head_dim: usize,
    o_groups: usize,
    ratio: usize,
    compressor: Option<Compressor>,
    indexer: Option<LatentIndexer>,
    rope: Rotary,
    window: usize,
}

impl CompressedAttentionLayer {
    pub fn load(
        w: &dyn Weights,
        module: &str,
        layer: usize,
        cfg: &ModelConfig,
    ) -> Result<CompressedAttentionLayer> {
        let c: &CompressedAttention =
            cfg.compressed_attention
                .as_ref()
                .ok_or_else(|| ComputeError::Unsupported {
                    what: "compressed attention without its config".into(),
                })?;
        let (h, d, heads, eps) = (
            cfg.hidden_size,
            cfg.head_dim,
            cfg.num_attention_heads,
            cfg.rms_norm_eps,
        );
        let ratio = c.ratio(layer);
        let lin = |name: &str, out: usize, inp: usize| {
            Linear::load(w, &format!("{module}.{name}"), out, inp)
        };
        let norm = |name: &str, dim: usize| RmsNorm::load(w, &format!("{module}.{name}"), dim, eps);
        let compressor = if c.is_kv_source(layer) && ratio > 0 {
            Some(Compressor {
                ratio,
                kv_proj: lin("compressor.kv_proj", d, h)?,
                gate_proj: (ratio > 1)
                    .then(|| lin("compressor.gate_proj", d, h))
                    .transpose()?,
                kv_norm: norm("compressor.kv_norm", d)?,
            })
        } else {
            None
        };
        let (ih, id) = (c.index_n_heads, c.index_head_dim);
        let indexer = if c.is_index_source(layer) && ratio > 0 {
            Some(LatentIndexer {
                q_b_proj: lin("indexer.q_b_proj", ih * id, c.q_lora_rank)?,
                weights_proj: lin("indexer.weights_proj", ih, h)?,
                keys: if c.is_kv_source(layer) {
                    Some((lin("indexer.k_proj", id, d)?, norm("indexer.k_norm", id)?))
                } else {
                    None
                },
                heads: ih,
                head_dim: id,
                topk: c.index_topk,
                ratio,
                candidate_source: c
                    .candidates
                    .as_ref()
                    .filter(|b| b.source_layer == layer)
                    .map(|b| (b.topk_blocks, b.block_size)),
            })
        } else {
            None
        };
        let rope = if ratio > 0 {
            let scaling = cfg.rope.scaling.clone().unwrap_or_default();
            let num = |k: &str, default: f64| {
                scaling
                    .get(k)
                    .and_then(serde_json::Value::as_f64)
                    .unwrap_or(default)
            };
            let original = num(
                "original_max_position_embeddings",
                cfg.max_position_embeddings.unwrap_or(1_048_576) as f64,
            );
            let yarn = serde_json::json!({
                "factor": num("factor", 1.0),
                "original_max_position_embeddings": original.trunc(),
                "beta_fast": num("beta_fast", 32.0).trunc(),
                "beta_slow": num("beta_slow", 1.0).trunc(),
                "mscale": 0.0,
                "mscale_all_dim": 0.0,
            });
            Rotary::new(c.rope_dim, c.compress_rope_theta, &yarn)?
        } else {
            Rotary::new(
                c.rope_dim,
                cfg.rope.theta,
                &serde_json::json!({ "factor": 1.0 }),
            )?
        };
        let sinks_name = format!("{module}.sinks");
        let sinks = require(w, &sinks_name)?;
        check_shape(&sinks_name, &sinks, &[heads])?;
        Ok(CompressedAttentionLayer {
            q_a_proj: lin("q_a_proj", c.q_lora_rank, h)?,
            q_a_norm: norm("q_a_norm", c.q_lora_rank)?,
            q_b_proj: lin("q_b_proj", heads * d, c.q_lora_rank)?,
            kv_proj: lin("kv_proj", d, h)?,
            kv_norm: norm("kv_norm", d)?,
            o_a_proj: GroupedLinear::load(
                w,
                &format!("{module}.o_a_proj"),
                c.o_groups,
                c.o_lora_rank,
                heads * d / c.o_groups,
            )?,
            o_b_proj: lin("o_b_proj", h, c.o_groups * c.o_lora_rank)?,
            sinks,
            heads,
            head_dim: d,
            o_groups: c.o_groups,
            ratio,
            compressor,
            indexer,
            rope,
            window: c.sliding_window,
        })
    }

    /// The sliding window this layer's cache keeps.
    pub fn window(&self) -> usize {
        self.window
    }

    /// `Attention.__call__` on the collapsed, normed hidden state `x` `[B, L, H]`.
    pub fn forward(
        &self,
        x: &Array,
        start_pos: usize,
        window_idx: &Array,
        cache: &mut CompressedCache,
        shared: &mut Shared,
    ) -> Result<Array> {
        let s = x.shape();
        let (b, l) = (i32_of(s[0])?, i32_of(s[1])?);
        let (heads, d) = (i32_of(self.heads)?, i32_of(self.head_dim)?);
        let q_residual = self.q_a_norm.forward(&self.q_a_proj.forward(x)?)?;
        let q = self
            .q_b_proj
            .forward(&q_residual)?
            .reshape(&[b, l, heads, d])?;
        let q = self.rope.apply(&q, start_pos, 1.0, false)?;
        let kv = self.kv_norm.forward(&self.kv_proj.forward(x)?)?;
        let kv = self.rope.apply(&kv, start_pos, 1.0, false)?;
        let kv = fake_quant_fp8(&kv, 32)?;
        let mut kvs = vec![cache.update_window(&kv)?];
        let mut indices = vec![window_idx.clone()];
        if self.ratio > 0 {
            if let Some(comp) = &self.compressor {
                self.compress(comp, x, start_pos, cache, shared)?;
            }
            if let Some(ix) = &self.indexer {
                let (topk, candidates) = ix.select(
                    x,
                    &q_residual,
                    shared.index_k.as_ref(),
                    shared.candidates.as_ref(),
                    &self.rope,
                    start_pos,
                )?;
                shared.topk_idx = Some(topk);
                if ix.candidate_source.is_some() {
                    shared.candidates = candidates;
                }
            }
            if let (Some(compressed), Some(topk)) = (&shared.compress_kv, &shared.topk_idx) {
                if topk.dim(-1).unwrap_or(0) > 0 {
                    kvs.push(compressed.clone());
                    indices.push(topk.clone());
                }
            }
        }
        let out = self.sparse_attention(&q, &kvs, &indices)?;
        let out = self.rope.apply(&out, start_pos, 1.0, true)?;
        let g = i32_of(self.o_groups)?;
        let out = out.reshape(&[b * l, g, 1, -1])?;
        let out = self.o_a_proj.forward(&out)?;
        self.o_b_proj.forward(&out.reshape(&[b, l, -1])?)
    }

    /// `_compress`: the new latents (rotated at their groups' positions, FP4 round trip) and
    /// index keys appended to the cache, and shared.
    fn compress(
        &self,
        comp: &Compressor,
        x: &Array,
        start_pos: usize,
        cache: &mut CompressedCache,
        shared: &mut Shared,
    ) -> Result<()> {
        let (latent, first) = comp.forward(x, start_pos, cache)?;
        let scale = self.ratio as f32;
        if let Some(latent) = latent {
            let kv = self.rope.apply(&latent, first, scale, false)?;
            let kv = fake_quant_fp4(&kv, 16, true)?;
            cache.compress_kv = Some(append(cache.compress_kv.as_ref(), &kv)?);
            if let Some((k_proj, k_norm)) = self.indexer.as_ref().and_then(|i| i.keys.as_ref()) {
                let k = k_norm.forward(&k_proj.forward(&latent)?)?;
                let k = self.rope.apply(&k, first, scale, false)?;
                let k = fake_quant_fp4(&k, 32, false)?;
                cache.index_k = Some(append(cache.index_k.as_ref(), &k)?);
            }
        }
        shared.compress_kv = cache.compress_kv.clone();
        if self.indexer.is_some() {
            shared.index_k = cache.index_k.clone();
        }
        Ok(())
    }

    /// `_sparse_attention(q, kvs, indices, sinks, scale)`: each query attends to the rows its
    /// indices pick from each KV array (-1: none), in f32, with the sinks.
    fn sparse_attention(&self, q: &Array, kvs: &[Array], indices: &[Array]) -> Result<Array> {
        let s = dims_i32(q);
        let (b, l, heads, d) = (s[0], s[1], s[2], s[3]);
        let mut rows = Vec::with_capacity(kvs.len());
        for (kv, idx) in kvs.iter().zip(indices) {
            rows.push(gather_rows(kv, idx)?);
        }
        let row_refs: Vec<&Array> = rows.iter().collect();
        let keys = concatenate(&row_refs, 2)?
            .reshape(&[b * l, 1, -1, d])?
            .astype(Dtype::F32)?;
        let idx_refs: Vec<&Array> = indices.iter().collect();
        let mask = concatenate(&idx_refs, -1)?.greater_equal(&Array::scalar(0.0, Dtype::I32)?)?;
        let qf = q.reshape(&[b * l, heads, 1, d])?.astype(Dtype::F32)?;
        let mask = mask.reshape(&[b * l, 1, 1, -1])?;
        let sinks = self.sinks.astype(Dtype::F32)?;
        let out = fast::scaled_dot_product_attention_sinks(
            &qf,
            &keys,
            &keys,
            (self.head_dim as f32).powf(-0.5),
            fast::Mask::Array(&mask),
            Some(&sinks),
        )?;
        Ok(out.reshape(&[b, l, heads, d])?.astype(q.dtype())?)
    }
}

/// `_gather_rows(values, indices)`: `values` `[B, K, D]`, `indices` `[B, S, k]` ->
/// `[B, S, k, D]` (an index of -1 reads row 0, which the mask drops).
fn gather_rows(values: &Array, indices: &Array) -> Result<Array> {
    let s = dims_i32(values);
    let (b, len, dim) = (s[0], s[1], s[2]);
    let safe = indices.maximum(&Array::scalar(0.0, Dtype::I32)?)?;
    let base: Vec<i32> = (0..b).map(|i| i * len).collect();
    let base = Array::from_slice(&base, &[b as usize, 1, 1])?;
    let flat = values.reshape(&[b * len, dim])?;
    let mut out = dims_i32(indices);
    out.push(dim);
    Ok(flat
        .take(&safe.add(&base)?.reshape(&[-1])?, 0)?
        .reshape(&out)?)
}

/// The per-call inputs every layer of one call shares: where it starts and which window rows
/// each query sees (from the first layer's cache before the call: every layer's window holds
/// the same rows).
pub struct CallStart {
    pub start_pos: usize,
    pub window_idx: Array,
}

/// The streams at the embedding (`broadcast_to(h[:, :, None, :], (B, L, hc, H))`) and the first
/// pre-mix (`[1, 0, ..., 0]` per position, f32).
pub fn initial_streams(h: &Array, hc: usize) -> Result<(Array, Array)> {
    let s = h.shape();
    let (b, l) = (s[0], s[1]);
    let one = h.expand_dims(2)?;
    let copies: Vec<&Array> = (0..hc).map(|_| &one).collect();
    let streams = concatenate(&copies, 2)?;
    let mut pre = vec![0f32; b * l * hc];
    for p in pre.chunks_mut(hc) {
        p[0] = 1.0;
    }
    Ok((streams, Array::from_slice(&pre, &[b, l, hc])?))
}
