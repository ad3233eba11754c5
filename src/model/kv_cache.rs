//! The per-layer cache of the forward pass: one [`LayerCache`] per layer, of the kind its
//! attention needs (mlx-lm's `make_cache`: a `KVCache` for softmax attention, an
//! `ArraysCache(size=2)` for linear attention; models/cache.py).
//!
//! - [`LayerKv`]: keys and values. In: per call, a layer's new keys and values
//!   `[B, kv_heads, L, D]`. Out: all valid positions so far. Invariant: capacity grows in whole
//!   steps of 256 positions and position `p` of the cache always holds what the caller wrote for
//!   position `p` (keys after RoPE, so never rotated twice).
//!   Under DeepSeek Sparse Attention it also holds the indexer's keys ([`IndexKeys`]), cut back
//!   with it.
//! - [`RotatingKv`] (`rotating.rs`): a sliding-window layer's keys and values, at most the
//!   window's worth once the window is full, in mlx-lm's rotated order (gpt-oss).
//! - [`QuantizedKv`] (`quantized_kv.rs`, `--kv-bits`): a plain KV layer's keys and values as
//!   MLX affine codes, with [`LayerKv`]'s invariant (steps of 256, position `p` holds `p`).
//! - [`LinearState`]: Gated DeltaNet's convolution state (the last `conv_kernel_dim - 1` inputs)
//!   and recurrent state, of a fixed size; each call replaces both. Invariant: they are the state
//!   after exactly `offset` positions, so prefill in chunks carries them exactly.
//!
//! Another kind is one more [`LayerCache`] variant with its `offset`, `arrays`, `mask` and
//! `truncate` arms.
//!
//! ## Reusing a prefix
//! A KV cache can be cut back to any earlier position ([`KvCache::truncate`]: it lowers the
//! offset only; what lies past it is never fetched, and the next update writes over it, so a
//! truncated cache is the cache the kept positions alone would have built). A linear-attention state cannot: it folds every position into
//! one matrix, and no earlier state can be recovered from it. A prefix is therefore reusable only
//! from a state saved at a known position: after prefilling the prefix's `p` tokens, take
//! [`KvCache::snapshot`] and keep it with those tokens; a later sequence that starts with the
//! same `p` tokens starts from a copy of the snapshot and prefills only the rest. `truncate`
//! refuses ([`ComputeError::CannotTruncate`]) any position but the current one for a model with
//! linear-attention layers, and for a model with sliding-window layers once they have dropped
//! a position (`rotating.rs`, "Cutting back"), so a caller falls back to its snapshot (or to a
//! fresh cache) and never decodes from a state that does not match its tokens. A snapshot is cheap: MLX arrays are
//! immutable, so it shares the buffers, and a later write copies instead of updating in place.
//! [`KvCache::checkpoint`] keeps less: only the layers that cannot be cut back (a window, a
//! state: fixed sizes) and the position, to which [`KvCache::restore`] cuts the others back, so
//! keeping one never doubles the growing KV cache. `run::generate::Prefix` takes one at the end
//! of every prompt.

use super::deepseek_v41::CompressedCache;
use super::quantized_kv::QuantizedKv;
use super::rotating::{AttnMask, RotatingKv};
use super::ComputeError;
use crate::mlx::{concatenate, Array};

type Result<T> = std::result::Result<T, ComputeError>;

/// One layer's cached keys and values, `[B, kv_heads, capacity, head_dim]`, of which the first
/// `offset` positions are valid; under DeepSeek Sparse Attention also the indexer's keys.
#[derive(Debug, Default, Clone)]
pub struct LayerKv {
    keys: Option<Array>,
    values: Option<Array>,
    offset: usize,
    /// The DSA indexer's keys (mlx-lm's second `KVCache` of the layer's `CacheList`).
    index: Option<IndexKeys>,
}

/// The DSA indexer's cached keys, `[B, 1, capacity, index_head_dim]`, of which the first
/// `offset` positions are valid. mlx-lm's cache also holds "values", zeros as large as the keys,
/// which nothing reads: they are not kept here.
#[derive(Debug, Default, Clone)]
pub struct IndexKeys {
    keys: Option<Array>,
    offset: usize,
}

/// mlx-lm's `KVCache.step`: capacity grows in chunks of this many positions.
const KV_STEP: usize = 256;

/// Writes `new` `[B, H, L, D]` at positions `prev ..` of `buf`, growing it by whole steps first
/// when it is too short (mlx-lm `KVCache.update_and_fetch`); returns the buffer.
pub(super) fn write_at(buf: Option<Array>, new: &Array, prev: usize) -> Result<Array> {
    let s = new.shape();
    if s.len() != 4 {
        return Err(ComputeError::BadShape {
            name: "kv cache update".into(),
            found: s,
            expected: vec![0; 4],
        });
    }
    let (b, heads, len, dim) = (s[0], s[1], s[2], s[3]);
    let buf = match buf {
        Some(k) if prev + len <= k.shape()[2] => k,
        old => {
            // n_steps = (step + L - 1) // step: grow by whole steps, enough for this call.
            let grow = len.div_ceil(KV_STEP) * KV_STEP;
            let fresh = Array::zeros(&[b, heads, grow, dim], new.dtype())?;
            match old {
                // if prev % step != 0: keys = keys[..., :prev, :] (drop the unused tail)
                Some(k) if prev % KV_STEP != 0 => concatenate(&[&trim(&k, prev)?, &fresh], 2)?,
                Some(k) => concatenate(&[&k, &fresh], 2)?,
                None => fresh,
            }
        }
    };
    // self.keys[..., prev : self.offset, :] = keys
    let start = [0, 0, to_i32(prev)?, 0];
    let end = [
        to_i32(b)?,
        to_i32(heads)?,
        to_i32(prev + len)?,
        to_i32(dim)?,
    ];
    Ok(buf.slice_update(new, &start, &end)?)
}

/// The first `offset` positions of `buf`.
pub(super) fn valid(buf: &Array, offset: usize) -> Result<Array> {
    if offset < buf.shape()[2] {
        trim(buf, offset)
    } else {
        Ok(buf.clone())
    }
}

impl LayerKv {
    /// A layer's cache with room for the DSA indexer's keys.
    pub fn with_index() -> LayerKv {
        LayerKv {
            index: Some(IndexKeys::default()),
            ..LayerKv::default()
        }
    }

    pub fn offset(&self) -> usize {
        self.offset
    }

    /// The indexer's keys, in a layer of DeepSeek Sparse Attention.
    pub(super) fn index_mut(&mut self) -> Option<&mut IndexKeys> {
        self.index.as_mut()
    }

    /// Forgets every position from `position` on, the indexer's keys' included.
    fn truncate(&mut self, position: usize) {
        self.offset = position;
        if let Some(i) = &mut self.index {
            i.offset = position;
        }
    }

    /// Append `keys`/`values` `[B, kv_heads, L, D]` and return all valid positions
    /// (mlx-lm `KVCache.update_and_fetch`).
    pub fn update_and_fetch(&mut self, keys: &Array, values: &Array) -> Result<(Array, Array)> {
        let (ks, vs) = (keys.shape(), values.shape());
        if ks.len() != 4 || vs.len() != 4 || ks[..3] != vs[..3] {
            return Err(ComputeError::BadShape {
                name: "kv cache update".into(),
                found: vs,
                expected: ks,
            });
        }
        let prev = self.offset;
        let all_k = write_at(self.keys.take(), keys, prev)?;
        let all_v = write_at(self.values.take(), values, prev)?;
        self.offset = prev + ks[2];
        let fetched = (valid(&all_k, self.offset)?, valid(&all_v, self.offset)?);
        self.keys = Some(all_k);
        self.values = Some(all_v);
        Ok(fetched)
    }
}

impl IndexKeys {
    /// Positions held (before this call's).
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// Append `keys` `[B, 1, L, D]` and return all valid positions
    /// (`k, _ = cache.update_and_fetch(k, k)` in mlx-lm's `Indexer`).
    pub fn update_and_fetch(&mut self, keys: &Array) -> Result<Array> {
        let all = write_at(self.keys.take(), keys, self.offset)?;
        self.offset += keys.shape()[2];
        let fetched = valid(&all, self.offset)?;
        self.keys = Some(all);
        Ok(fetched)
    }
}

pub(super) fn to_i32(n: usize) -> Result<i32> {
    i32::try_from(n).map_err(|_| ComputeError::Unsupported {
        what: format!("size {n} beyond i32"),
    })
}

/// `x[..., :n, :]` of a `[B, H, T, D]` array.
fn trim(x: &Array, n: usize) -> Result<Array> {
    let s = x.shape();
    Ok(x.slice(
        &[0, 0, 0, 0],
        &[to_i32(s[0])?, to_i32(s[1])?, to_i32(n)?, to_i32(s[3])?],
    )?)
}

/// One linear-attention layer's state (mlx-lm's `ArraysCache(size=2)`: `cache[0]` the
/// convolution state `[B, conv_kernel_dim - 1, conv_dim]`, `cache[1]` the recurrent state
/// `[B, value_heads, value_head_dim, key_head_dim]` in f32); `None` before the first call.
#[derive(Debug, Default, Clone)]
pub struct LinearState {
    pub(super) conv: Option<Array>,
    pub(super) recurrent: Option<Array>,
    offset: usize,
}

impl LinearState {
    /// Positions folded into the state.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// `cache.advance(S)` after a call of `len` positions.
    pub(super) fn advance(&mut self, len: usize) {
        self.offset += len;
    }
}

/// One layer's cache, of the kind its attention keeps.
#[derive(Debug, Clone)]
pub enum LayerCache {
    /// Softmax attention (grouped-query or latent): keys and values per position.
    Kv(LayerKv),
    /// Grouped-query softmax attention under `--kv-bits`: keys and values as affine codes.
    Quantized(QuantizedKv),
    /// Sliding-window attention: keys and values of the last positions only.
    Rotating(RotatingKv),
    /// Gated DeltaNet linear attention: a fixed-size state.
    Linear(LinearState),
    /// DeepSeek-V4.1: a sliding window plus compressed latents (model/deepseek_v41.rs); it
    /// keeps no position apart once the window has moved, so it is never cut back.
    Compressed(CompressedCache),
}

impl Default for LayerCache {
    fn default() -> Self {
        LayerCache::Kv(LayerKv::default())
    }
}

impl LayerCache {
    /// Positions processed (the next token's position).
    pub fn offset(&self) -> usize {
        match self {
            LayerCache::Kv(kv) => kv.offset(),
            LayerCache::Quantized(q) => q.offset(),
            LayerCache::Rotating(r) => r.offset(),
            LayerCache::Linear(s) => s.offset(),
            LayerCache::Compressed(c) => c.offset(),
        }
    }

    /// The mask a call of `len` tokens attends with, from this cache before the call updates
    /// it (mlx-lm's `create_attention_mask(h, cache)`: `KVCache.make_mask`, or
    /// `RotatingKVCache.make_mask` with the layer's window).
    pub fn mask(&self, len: usize) -> Result<AttnMask> {
        match self {
            // KVCache.make_mask: "causal" for several tokens, None for one. (A linear layer
            // ignores its mask; it gets the same, so one mask serves both kinds of a hybrid.)
            LayerCache::Kv(_) | LayerCache::Quantized(_) | LayerCache::Linear(_) if len > 1 => {
                Ok(AttnMask::Causal)
            }
            LayerCache::Kv(_) | LayerCache::Quantized(_) | LayerCache::Linear(_) => {
                Ok(AttnMask::None)
            }
            LayerCache::Rotating(r) => r.mask(len),
            // Its attention builds its own row indices (model/deepseek_v41.rs).
            LayerCache::Compressed(_) => Ok(AttnMask::None),
        }
    }

    /// Stores a softmax-attention layer's new `keys`/`values` and returns the keys and values
    /// the call attends to; `layer` names it in the error. A quantized cache is read through
    /// [`LayerCache::quantized`] instead.
    pub(super) fn update_and_fetch(
        &mut self,
        layer: &str,
        keys: &Array,
        values: &Array,
    ) -> Result<(Array, Array)> {
        match self {
            LayerCache::Kv(kv) => kv.update_and_fetch(keys, values),
            LayerCache::Rotating(r) => r.update_and_fetch(keys, values),
            LayerCache::Quantized(_) | LayerCache::Linear(_) | LayerCache::Compressed(_) => {
                Err(ComputeError::CacheKind {
                    module: layer.to_string(),
                    wanted: "a KV cache",
                })
            }
        }
    }

    /// The arrays to evaluate to materialize the cache.
    pub fn arrays(&self) -> Vec<&Array> {
        match self {
            LayerCache::Kv(kv) => [
                kv.keys.as_ref(),
                kv.values.as_ref(),
                kv.index.as_ref().and_then(|i| i.keys.as_ref()),
            ]
            .into_iter()
            .flatten()
            .collect(),
            LayerCache::Quantized(q) => q.arrays().collect(),
            LayerCache::Rotating(r) => r.arrays().collect(),
            LayerCache::Linear(s) => [s.conv.as_ref(), s.recurrent.as_ref()]
                .into_iter()
                .flatten()
                .collect(),
            LayerCache::Compressed(c) => c.arrays(),
        }
    }

    /// The keys and values of a softmax-attention layer; `layer` names it in the error.
    pub(super) fn kv(&mut self, layer: &str) -> Result<&mut LayerKv> {
        match self {
            LayerCache::Kv(kv) => Ok(kv),
            LayerCache::Quantized(_)
            | LayerCache::Rotating(_)
            | LayerCache::Linear(_)
            | LayerCache::Compressed(_) => Err(ComputeError::CacheKind {
                module: layer.to_string(),
                wanted: "a KV cache",
            }),
        }
    }

    /// The quantized keys and values of a layer under `--kv-bits`, when it has them.
    pub(super) fn quantized(&mut self) -> Option<&mut QuantizedKv> {
        match self {
            LayerCache::Quantized(q) => Some(q),
            _ => None,
        }
    }

    /// The cache of a DeepSeek-V4.1 layer; `layer` names it in the error.
    pub(super) fn compressed(&mut self, layer: &str) -> Result<&mut CompressedCache> {
        match self {
            LayerCache::Compressed(c) => Ok(c),
            _ => Err(ComputeError::CacheKind {
                module: layer.to_string(),
                wanted: "a window-and-compressed cache",
            }),
        }
    }

    /// The state of a linear-attention layer; `layer` names it in the error.
    pub(super) fn linear(&mut self, layer: &str) -> Result<&mut LinearState> {
        match self {
            LayerCache::Linear(s) => Ok(s),
            LayerCache::Kv(_)
            | LayerCache::Quantized(_)
            | LayerCache::Rotating(_)
            | LayerCache::Compressed(_) => Err(ComputeError::CacheKind {
                module: layer.to_string(),
                wanted: "a linear-attention state",
            }),
        }
    }

    /// Whether [`LayerCache::truncate`] to `position` would succeed.
    pub fn can_truncate(&self, position: usize) -> bool {
        match self {
            LayerCache::Kv(kv) => position <= kv.offset(),
            LayerCache::Quantized(q) => position <= q.offset(),
            LayerCache::Rotating(r) => r.can_truncate(position),
            LayerCache::Linear(s) => position == s.offset(),
            LayerCache::Compressed(c) => position == c.offset(),
        }
    }

    /// Forget every position from `position` on (mlx-lm's `KVCache.trim`). A linear state
    /// holds no positions apart, so only its current position is accepted; a sliding-window
    /// cache goes back only while it has dropped nothing.
    pub fn truncate(&mut self, position: usize) -> Result<()> {
        if !self.can_truncate(position) {
            return Err(self.cannot_truncate(position));
        }
        match self {
            LayerCache::Kv(kv) => kv.truncate(position),
            LayerCache::Quantized(q) => q.truncate(position),
            LayerCache::Rotating(r) => r.truncate_unchecked(position),
            LayerCache::Linear(_) | LayerCache::Compressed(_) => {}
        }
        Ok(())
    }

    fn cannot_truncate(&self, position: usize) -> ComputeError {
        ComputeError::CannotTruncate {
            offset: self.offset(),
            position,
            linear: matches!(self, LayerCache::Linear(_) | LayerCache::Compressed(_)),
            window: match self {
                LayerCache::Rotating(r) => Some(r.max_size()),
                _ => None,
            },
        }
    }
}

/// The caches of all layers (mlx-lm's `make_prompt_cache`: one per layer, of its kind).
#[derive(Debug, Default, Clone)]
pub struct KvCache {
    pub layers: Vec<LayerCache>,
}

/// A position of a [`KvCache`] it can be brought back to ([`KvCache::checkpoint`]).
#[derive(Debug, Clone)]
pub struct KvCheckpoint {
    offset: usize,
    /// The layers that cannot be cut back, as they were; `None` for the others.
    layers: Vec<Option<LayerCache>>,
}

impl KvCheckpoint {
    /// The position it holds.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// The arrays it keeps (the fixed-size layers' state).
    pub fn arrays(&self) -> Vec<&Array> {
        self.layers
            .iter()
            .flatten()
            .flat_map(|l| l.arrays())
            .collect()
    }
}

impl KvCache {
    /// `layers` KV caches (a model of softmax attention only); [`super::Model::new_cache`]
    /// gives each layer its own kind.
    pub fn new(layers: usize) -> KvCache {
        KvCache {
            layers: (0..layers).map(|_| LayerCache::default()).collect(),
        }
    }

    /// Positions already processed (the next token's position).
    pub fn offset(&self) -> usize {
        self.layers.first().map_or(0, LayerCache::offset)
    }

    /// Every layer's buffers (keys and values, or the linear-attention states), for
    /// `mlx::eval` (mlx-lm's `cache.state`).
    pub fn state(&self) -> Vec<&Array> {
        self.layers.iter().flat_map(LayerCache::arrays).collect()
    }

    /// The mask of each layer for a call of `len` tokens, made before the call updates the
    /// cache: one per kind of layer, from the first layer of that kind, as mlx-lm's
    /// gpt_oss.py makes `full_mask` from `cache[ga_idx]` and `swa_mask` from `cache[swa_idx]`
    /// (layers of one kind have seen the same positions, so any one of them gives the same).
    pub fn masks(&self, len: usize) -> Result<Vec<AttnMask>> {
        let mut made: Vec<(Option<usize>, AttnMask)> = Vec::new();
        self.layers
            .iter()
            .map(|l| {
                let kind = match l {
                    LayerCache::Rotating(r) => Some(r.max_size()),
                    _ => None,
                };
                if let Some((_, m)) = made.iter().find(|(k, _)| *k == kind) {
                    return Ok(m.clone());
                }
                let m = l.mask(len)?;
                made.push((kind, m.clone()));
                Ok(m)
            })
            .collect()
    }

    /// A copy of the cache as it is now, to restart from later (see "Reusing a prefix" above).
    /// Shares the buffers: nothing is copied until one of the two is written.
    pub fn snapshot(&self) -> KvCache {
        self.clone()
    }

    /// What [`KvCache::restore`] needs to bring this cache back to the position it is at now,
    /// however far it goes on: the layers that cannot be cut back (linear-attention states,
    /// sliding windows) as they are, and the position, to which the others are cut back. Only
    /// those fixed-size layers are kept, so a checkpoint costs a window and a state per layer,
    /// never a second copy of the growing KV cache; `None` for a model of plain KV caches,
    /// which [`KvCache::truncate`] brings back to any position.
    pub fn checkpoint(&self) -> Option<KvCheckpoint> {
        let fixed = |l: &LayerCache| !matches!(l, LayerCache::Kv(_) | LayerCache::Quantized(_));
        if !self.layers.iter().any(fixed) {
            return None;
        }
        Some(KvCheckpoint {
            offset: self.offset(),
            layers: self
                .layers
                .iter()
                .map(|l| fixed(l).then(|| l.clone()))
                .collect(),
        })
    }

    /// Brings the cache back to `cp`'s position: its fixed-size layers as `cp` kept them, the
    /// others cut back. Refused (nothing changed) when `cp` is of another model, or ahead of
    /// the cache.
    pub fn restore(&mut self, cp: &KvCheckpoint) -> Result<()> {
        let fits = cp.layers.len() == self.layers.len()
            && self.offset() >= cp.offset
            && self.layers.iter().zip(&cp.layers).all(|(l, c)| match c {
                Some(c) => std::mem::discriminant(l) == std::mem::discriminant(c),
                None => l.can_truncate(cp.offset),
            });
        if !fits {
            return Err(ComputeError::CannotTruncate {
                offset: self.offset(),
                position: cp.offset,
                linear: false,
                window: None,
            });
        }
        for (l, c) in self.layers.iter_mut().zip(&cp.layers) {
            match c {
                Some(c) => *l = c.clone(),
                None => l.truncate(cp.offset)?,
            }
        }
        Ok(())
    }

    /// Whether [`KvCache::truncate`] to `position` would succeed.
    pub fn can_truncate(&self, position: usize) -> bool {
        self.layers.iter().all(|l| l.can_truncate(position))
    }

    /// Cuts every layer back to `position` when all of them can be (a linear-attention layer only
    /// to its current position, a sliding-window layer only while it has dropped nothing);
    /// otherwise changes nothing and says why.
    pub fn truncate(&mut self, position: usize) -> Result<()> {
        if let Some(l) = self.layers.iter().find(|l| !l.can_truncate(position)) {
            return Err(l.cannot_truncate(position));
        }
        self.layers
            .iter_mut()
            .try_for_each(|l| l.truncate(position))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `[1, 1, len, 2]` keys whose values name their position and a tag.
    fn rows(first: usize, len: usize, tag: f32) -> Array {
        let v: Vec<f32> = (first..first + len).flat_map(|p| [p as f32, tag]).collect();
        Array::from_slice(&v, &[1, 1, len, 2]).unwrap()
    }

    fn fetch(c: &mut LayerCache, first: usize, len: usize, tag: f32) -> (Array, Array) {
        c.update_and_fetch("test", &rows(first, len, tag), &rows(first, len, tag))
            .unwrap()
    }

    /// Truncating and writing again gives exactly what a cache holding only the kept positions
    /// and the new ones gives, also across a capacity step (300 > 256) and back below it; a
    /// position past the held ones is refused.
    #[test]
    fn a_truncated_cache_equals_one_built_from_the_kept_positions() {
        for (held, keep, more) in [(5, 3, 2), (300, 10, 4), (200, 200, 100), (260, 0, 3)] {
            let mut c = LayerCache::Kv(LayerKv::default());
            fetch(&mut c, 0, held, 1.0);
            c.truncate(keep).unwrap();
            assert_eq!(c.offset(), keep);
            let (k, v) = fetch(&mut c, keep, more, 2.0);
            let mut fresh = LayerCache::Kv(LayerKv::default());
            if keep > 0 {
                fetch(&mut fresh, 0, keep, 1.0);
            }
            let (fk, fv) = fetch(&mut fresh, keep, more, 2.0);
            assert_eq!(k.shape(), vec![1, 1, keep + more, 2]);
            assert_eq!(k.to_vec_f32().unwrap(), fk.to_vec_f32().unwrap());
            assert_eq!(v.to_vec_f32().unwrap(), fv.to_vec_f32().unwrap());
        }
        let mut c = LayerCache::Kv(LayerKv::default());
        fetch(&mut c, 0, 4, 1.0);
        assert!(c.truncate(10).is_err());
        assert_eq!(c.offset(), 4);
    }
}
