//! The KV cache: each layer's keys and values, as mlx-lm's `KVCache` (models/cache.py) keeps them.
//!
//! In: per call, a layer's new keys and values `[B, kv_heads, L, D]`. Out: all valid positions so
//! far. Invariant: capacity grows in whole steps of 256 positions and position `p < offset` of
//! the cache always holds what the caller wrote for position `p` (keys after RoPE, so never
//! rotated twice). [`KvCache::truncate`] lowers the offset only: what lies past it is never
//! fetched, and the next update writes over it, so a truncated cache is the cache the kept
//! positions alone would have built (prefix reuse across requests relies on this).

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

    /// Keep the first `n` positions (all of them if fewer are held); mlx-lm's `KVCache.trim`.
    pub fn truncate(&mut self, n: usize) {
        self.offset = self.offset.min(n);
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

    /// Keep the first `n` positions of every layer: the next token goes to position `n` (or
    /// stays where it was, if fewer are held). The buffers are kept for reuse.
    pub fn truncate(&mut self, n: usize) {
        self.layers.iter_mut().for_each(|l| l.truncate(n));
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `[1, 1, len, 2]` keys whose values name their position and a tag.
    fn rows(first: usize, len: usize, tag: f32) -> Array {
        let v: Vec<f32> = (first..first + len).flat_map(|p| [p as f32, tag]).collect();
        Array::from_slice(&v, &[1, 1, len, 2]).unwrap()
    }

    /// Truncating and writing again gives exactly what a cache holding only the kept positions
    /// and the new ones gives, also across a capacity step (300 > 256) and back below it.
    #[test]
    fn a_truncated_cache_equals_one_built_from_the_kept_positions() {
        for (held, keep, more) in [(5, 3, 2), (300, 10, 4), (200, 200, 100), (260, 0, 3)] {
            let mut kv = LayerKv::default();
            kv.update_and_fetch(&rows(0, held, 1.0), &rows(0, held, 1.0))
                .unwrap();
            kv.truncate(keep);
            assert_eq!(kv.offset(), keep.min(held));
            let (k, v) = kv
                .update_and_fetch(&rows(keep, more, 2.0), &rows(keep, more, 2.0))
                .unwrap();

            let mut fresh = LayerKv::default();
            if keep > 0 {
                fresh
                    .update_and_fetch(&rows(0, keep, 1.0), &rows(0, keep, 1.0))
                    .unwrap();
            }
            let (fk, fv) = fresh
                .update_and_fetch(&rows(keep, more, 2.0), &rows(keep, more, 2.0))
                .unwrap();
            assert_eq!(k.shape(), vec![1, 1, keep + more, 2]);
            assert_eq!(k.to_vec_f32().unwrap(), fk.to_vec_f32().unwrap());
            assert_eq!(v.to_vec_f32().unwrap(), fv.to_vec_f32().unwrap());
        }
        // Truncating past the end keeps everything.
        let mut kv = LayerKv::default();
        kv.update_and_fetch(&rows(0, 4, 1.0), &rows(0, 4, 1.0))
            .unwrap();
        kv.truncate(10);
        assert_eq!(kv.offset(), 4);
    }
}
