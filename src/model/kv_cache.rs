//! The KV cache: each layer's keys and values, as mlx-lm's `KVCache` (models/cache.py) keeps them.
//!
//! In: per call, a layer's new keys and values `[B, kv_heads, L, D]`. Out: all valid positions so
//! far. Invariant: capacity grows in whole steps of 256 positions and position `p` of the cache
//! always holds what the caller wrote for position `p` (keys after RoPE, so never rotated twice).

use super::ComputeError;
use crate::mlx::{concatenate, Array};

type Result<T> = std::result::Result<T, ComputeError>;

/// One layer's cached keys and values, `[B, kv_heads, capacity, head_dim]`, of which the first
/// `offset` positions are valid.
#[derive(Debug, Default)]
pub struct LayerKv {
    keys: Option<Array>,
    values: Option<Array>,
    offset: usize,
}

/// mlx-lm's `KVCache.step`: capacity grows in chunks of this many positions.
const KV_STEP: usize = 256;

impl LayerKv {
    pub fn offset(&self) -> usize {
        self.offset
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
        let (b, heads, len, k_dim, v_dim) = (ks[0], ks[1], ks[2], ks[3], vs[3]);
        let prev = self.offset;
        let (mut all_k, mut all_v) = match (self.keys.take(), self.values.take()) {
            (Some(k), Some(v)) if prev + len <= k.shape()[2] => (k, v),
            old => {
                // n_steps = (step + L - 1) // step: grow by whole steps, enough for this call.
                let grow = len.div_ceil(KV_STEP) * KV_STEP;
                let new_k = Array::zeros(&[b, heads, grow, k_dim], keys.dtype())?;
                let new_v = Array::zeros(&[b, heads, grow, v_dim], values.dtype())?;
                match old {
                    (Some(k), Some(v)) => {
                        // if prev % step != 0: keys = keys[..., :prev, :] (drop the unused tail)
                        let (k, v) = if prev % KV_STEP != 0 {
                            (trim(&k, prev)?, trim(&v, prev)?)
                        } else {
                            (k, v)
                        };
                        (
                            concatenate(&[&k, &new_k], 2)?,
                            concatenate(&[&v, &new_v], 2)?,
                        )
                    }
                    _ => (new_k, new_v),
                }
            }
        };
        self.offset = prev + len;
        // self.keys[..., prev : self.offset, :] = keys
        let start = [0, 0, to_i32(prev)?, 0];
        let end = |d| -> Result<[i32; 4]> {
            Ok([to_i32(b)?, to_i32(heads)?, to_i32(self.offset)?, to_i32(d)?])
        };
        all_k = all_k.slice_update(keys, &start, &end(k_dim)?)?;
        all_v = all_v.slice_update(values, &start, &end(v_dim)?)?;
        let fetched = if self.offset < all_k.shape()[2] {
            (trim(&all_k, self.offset)?, trim(&all_v, self.offset)?)
        } else {
            (all_k.clone(), all_v.clone())
        };
        self.keys = Some(all_k);
        self.values = Some(all_v);
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

/// The KV caches of all layers (mlx-lm's `make_prompt_cache`: one `KVCache` per layer).
#[derive(Debug, Default)]
pub struct KvCache {
    pub layers: Vec<LayerKv>,
}

impl KvCache {
    pub fn new(layers: usize) -> KvCache {
        KvCache {
            layers: (0..layers).map(|_| LayerKv::default()).collect(),
        }
    }

    /// Positions already processed (the next token's position).
    pub fn offset(&self) -> usize {
        self.layers.first().map_or(0, LayerKv::offset)
    }

    /// Every layer's key and value buffers, for `mlx::eval` (mlx-lm's `cache.state`).
    pub fn state(&self) -> Vec<&Array> {
        self.layers
            .iter()
            .flat_map(|l| [l.keys.as_ref(), l.values.as_ref()])
            .flatten()
            .collect()
    }
}
