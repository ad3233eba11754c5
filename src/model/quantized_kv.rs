//! The quantized KV cache (`--kv-bits 8|4`) and the attention that reads it, as mlx-lm 0.32.2's
//! `QuantizedKVCache` (models/cache.py) and `quantized_scaled_dot_product_attention`
//! (models/base.py).
//!
//! In: per call, a layer's new keys and values `[B, kv_heads, L, D]` (keys after RoPE) and the
//! call's queries. Out: the attention over every cached position, read from MLX affine codes.
//! Invariant: as [`super::LayerKv`]: capacity grows in whole steps of 256 positions, position `p`
//! holds the codes of what the caller wrote for `p`, and cutting back lowers the offset only. A
//! call's keys and values are quantized before its own queries read them (mlx-lm's order), so
//! every score comes from quantized keys, the first token's included: flashpack quantizes from
//! the first position (mlx-lm's `generate` waits for `quantized_kv_start`, 5000 by default, then
//! converts the cache; decision 0031 says why not).
//!
//! Which layers get this cache is `arch::ModelConfig::kv_group`'s rule; gpt-oss's sinks, which
//! mlx-lm's function refuses, are added as `mx.fast.scaled_dot_product_attention`'s reference
//! path adds them (one more logit per head before the softmax, dropped after it).

use super::kv_cache::{to_i32, write_at};
use super::mla::lowest;
use super::ComputeError;
use crate::mlx::fast::Mask;
use crate::mlx::{quantize, quantized_matmul, Array, Dtype, QuantizedMatrix};

type Result<T> = std::result::Result<T, ComputeError>;

/// One layer's keys and values as MLX affine codes (`[B, kv_heads, capacity, D * bits / 32]`
/// `u32`, scales and biases `[B, kv_heads, capacity, D / group]` in the keys' dtype), of which
/// the first `offset` positions are valid.
#[derive(Debug, Clone)]
pub struct QuantizedKv {
    keys: Option<QuantizedMatrix>,
    values: Option<QuantizedMatrix>,
    offset: usize,
    bits: i32,
    group_size: i32,
}

impl QuantizedKv {
    /// An empty cache of `bits` (8 or 4) per value in groups of `group_size`.
    pub fn new(bits: u8, group_size: usize) -> QuantizedKv {
        QuantizedKv {
            keys: None,
            values: None,
            offset: 0,
            bits: bits as i32,
            group_size: group_size as i32,
        }
    }

    pub fn offset(&self) -> usize {
        self.offset
    }

    pub fn bits(&self) -> i32 {
        self.bits
    }

    pub fn group_size(&self) -> i32 {
        self.group_size
    }

    /// Forgets every position from `position` on (mlx-lm's `QuantizedKVCache.trim`).
    pub(super) fn truncate(&mut self, position: usize) {
        self.offset = position.min(self.offset);
    }

    /// The arrays to evaluate to materialize the cache.
    pub fn arrays(&self) -> impl Iterator<Item = &Array> {
        [self.keys.as_ref(), self.values.as_ref()]
            .into_iter()
            .flatten()
            .flat_map(|m| [Some(&m.weight), Some(&m.scales), m.biases.as_ref()])
            .flatten()
    }

    /// Quantizes `keys`/`values` `[B, kv_heads, L, D]`, appends them and returns every valid
    /// position's codes (`QuantizedKVCache.update_and_fetch`).
    pub fn update_and_fetch(
        &mut self,
        keys: &Array,
        values: &Array,
    ) -> Result<(QuantizedMatrix, QuantizedMatrix)> {
        let (ks, vs) = (keys.shape(), values.shape());
        if ks.len() != 4 || vs.len() != 4 || ks[..3] != vs[..3] {
            return Err(ComputeError::BadShape {
                name: "quantized kv cache update".into(),
                found: vs,
                expected: ks,
            });
        }
        let prev = self.offset;
        // keys = mx.quantize(keys, group_size=self.group_size, bits=self.bits)
        let k = quantize(keys, self.group_size, self.bits)?;
        let v = quantize(values, self.group_size, self.bits)?;
        // self.keys[i][..., prev : self.offset, :] = keys[i], growing by whole steps first
        let all_k = append(self.keys.take(), &k, prev)?;
        let all_v = append(self.values.take(), &v, prev)?;
        self.offset = prev + ks[2];
        let fetched = (valid(&all_k, self.offset)?, valid(&all_v, self.offset)?);
        self.keys = Some(all_k);
        self.values = Some(all_v);
        Ok(fetched)
    }
}

/// `new`'s codes, scales and biases written at positions `prev ..` of `buf`'s (each grown by
/// whole steps as `KVCache` grows, so the three always have the same capacity).
fn append(
    buf: Option<QuantizedMatrix>,
    new: &QuantizedMatrix,
    prev: usize,
) -> Result<QuantizedMatrix> {
    let (weight, scales, biases) = match buf {
        Some(b) => (Some(b.weight), Some(b.scales), b.biases),
        None => (None, None, None),
    };
    let new_biases = new
        .biases
        .as_ref()
        .ok_or_else(|| ComputeError::Unsupported {
            what: "a KV cache quantized without biases".into(),
        })?;
    Ok(QuantizedMatrix {
        weight: write_at(weight, &new.weight, prev)?,
        scales: write_at(scales, &new.scales, prev)?,
        biases: Some(write_at(biases, new_biases, prev)?),
        ..new.clone()
    })
}

/// The first `offset` positions of each of `m`'s arrays (`keys_and_values`).
fn valid(m: &QuantizedMatrix, offset: usize) -> Result<QuantizedMatrix> {
    let cut = |a: &Array| super::kv_cache::valid(a, offset);
    Ok(QuantizedMatrix {
        weight: cut(&m.weight)?,
        scales: cut(&m.scales)?,
        biases: m.biases.as_ref().map(cut).transpose()?,
        ..m.clone()
    })
}

/// `m`'s arrays with an axis of 1 inserted before the positions (`mx.expand_dims(x, axis=-3)`).
fn expand(m: &QuantizedMatrix) -> Result<QuantizedMatrix> {
    Ok(QuantizedMatrix {
        weight: m.weight.expand_dims(-3)?,
        scales: m.scales.expand_dims(-3)?,
        biases: m.biases.as_ref().map(|b| b.expand_dims(-3)).transpose()?,
        ..m.clone()
    })
}

/// `softmax(q k^T * scale + mask) v` over quantized keys and values
/// (`quantized_scaled_dot_product_attention`): `q` `[B, Hq, L, D]`, `k`/`v` codes
/// `[B, Hkv, K, ..]`; grouped-query heads by reshaping the queries to
/// `[B, Hkv, Hq / Hkv, L, D]`. `sinks` `[Hq]` as [`crate::mlx::fast::scaled_dot_product_attention_sinks`].
pub fn quantized_attention(
    q: &Array,
    k: &QuantizedMatrix,
    v: &QuantizedMatrix,
    scale: f32,
    mask: Mask<'_>,
    sinks: Option<&Array>,
) -> Result<Array> {
    let s = q.shape();
    let (b, hq, l, d) = (to_i32(s[0])?, s[1], to_i32(s[2])?, to_i32(s[3])?);
    let hkv = k.weight.shape()[1];
    if hkv == 0 || hq % hkv != 0 {
        return Err(ComputeError::BadShape {
            name: "quantized attention heads".into(),
            found: vec![hq],
            expected: vec![hkv],
        });
    }
    let repeats = hq / hkv;
    // queries *= scale
    let mut queries = q.mul(&Array::scalar(scale as f64, q.dtype())?)?;
    let (mut k, mut v) = (k.clone(), v.clone());
    if repeats > 1 {
        // queries = mx.reshape(queries, (B, n_kv_heads, n_repeats, L, D))
        queries = queries.reshape(&[b, to_i32(hkv)?, to_i32(repeats)?, l, d])?;
        // q_keys = tree_map(lambda x: mx.expand_dims(x, axis=-3), q_keys); likewise values
        k = expand(&k)?;
        v = expand(&v)?;
    }
    // scores = mx.quantized_matmul(queries, *q_keys, transpose=True, ...)
    let mut scores = quantized_matmul(&queries, &k, true)?;
    let keys = scores.dim(-1).unwrap_or(0);
    let dtype = scores.dtype();
    let keep = match mask {
        Mask::None => None,
        // q_indices = mx.arange(kL - qL, kL); k_indices = mx.arange(kL)
        // mask = q_indices[:, None] >= k_indices[None]
        Mask::Causal => Some(causal(s[2], keys)?),
        Mask::Array(m) => Some(if repeats > 1 && m.ndim() > 3 {
            m.expand_dims(-3)?
        } else {
            m.clone()
        }),
    };
    if let Some(m) = keep {
        scores = if m.dtype() == Dtype::Bool {
            // mx.where(mask, scores, mx.finfo(scores.dtype).min)
            m.select(&scores, &Array::scalar(lowest(dtype), dtype)?)?
        } else {
            scores.add(&m)?
        };
    }
    if let Some(sinks) = sinks {
        scores = with_sinks(&scores, sinks, hkv, repeats)?;
    }
    // scores = mx.softmax(scores, axis=-1, precise=True)
    let mut weights = scores.softmax(-1, true)?;
    if sinks.is_some() {
        // the sink column carries no value: drop it after the softmax
        let stop = weights
            .shape()
            .into_iter()
            .map(to_i32)
            .collect::<Result<Vec<_>>>()?;
        let mut start = vec![0; stop.len()];
        if let Some(first) = start.last_mut() {
            *first = 1;
        }
        weights = weights.slice(&start, &stop)?;
    }
    // out = mx.quantized_matmul(scores, *q_values, transpose=False, ...)
    let out = quantized_matmul(&weights, &v, false)?;
    if repeats > 1 {
        // out = mx.reshape(out, (B, n_q_heads, L, D))
        return Ok(out.reshape(&[b, to_i32(hq)?, l, -1])?);
    }
    Ok(out)
}

/// `[L, K]` booleans: query `i` (at position `K - L + i`) keeps keys `0 ..= K - L + i`. Built
/// from two index rows on the device, so a long context costs `L + K` host values, not `L * K`.
fn causal(len: usize, keys: usize) -> Result<Array> {
    let first = keys.saturating_sub(len);
    let q: Vec<i32> = (first..keys).map(|p| p as i32).collect();
    let k: Vec<i32> = (0..keys).map(|p| p as i32).collect();
    let q = Array::from_slice(&q, &[len, 1])?;
    let k = Array::from_slice(&k, &[1, keys])?;
    Ok(q.greater_equal(&k)?)
}

/// `scores` with each head's sink logit as a first key (MLX's reference attention:
/// `concatenate({broadcast_to(sinks, ..), scores}, -1)`, sinks unflattened to
/// `[Hkv, repeats]` under grouped heads).
fn with_sinks(scores: &Array, sinks: &Array, hkv: usize, repeats: usize) -> Result<Array> {
    let mut shape = scores.shape();
    let heads: Vec<i32> = if repeats > 1 {
        vec![1, to_i32(hkv)?, to_i32(repeats)?, 1, 1]
    } else {
        vec![1, to_i32(hkv)?, 1, 1]
    };
    let sinks = sinks.astype(scores.dtype())?.reshape(&heads)?;
    if let Some(last) = shape.last_mut() {
        *last = 1;
    }
    let column = Array::zeros(&shape, scores.dtype())?.add(&sinks)?;
    Ok(crate::mlx::concatenate(&[&column, scores], -1)?)
}

#[cfg(test)]
mod tests {
    use super::super::kv_cache::LayerCache;
    use super::*;
    use crate::mlx::dequantize;

    /// `[1, 2, len, 64]` rows (two heads) whose values depend on head, position and a tag.
    fn rows(first: usize, len: usize, tag: f32) -> Array {
        let v: Vec<f32> = (0..2)
            .flat_map(|h| {
                (first..first + len).flat_map(move |p| {
                    (0..64).map(move |i| ((p * 31 + h * 17 + i * 7) % 97) as f32 / 97.0 - tag)
                })
            })
            .collect();
        Array::from_slice(&v, &[1, 2, len, 64]).unwrap()
    }

    fn fetch(c: &mut LayerCache, first: usize, len: usize, tag: f32) -> (Vec<f32>, Vec<f32>) {
        let (k, v) = c
            .quantized()
            .unwrap()
            .update_and_fetch(&rows(first, len, tag), &rows(first, len, tag + 1.0))
            .unwrap();
        assert_eq!(k.weight.shape()[2], v.scales.shape()[2]);
        (
            dequantize(&k).unwrap().to_vec_f32().unwrap(),
            dequantize(&v).unwrap().to_vec_f32().unwrap(),
        )
    }

    /// As [`LayerKv`](super::super::LayerKv)'s test: truncating and writing again gives exactly
    /// the codes a cache holding only the kept positions and the new ones gives (a position's
    /// codes depend on its own values alone: groups run along the head), also across a capacity
    /// step (300 > 256) and back below it; a position past the held ones is refused.
    #[test]
    fn a_truncated_quantized_cache_equals_one_built_from_the_kept_positions() {
        for bits in [8, 4] {
            for (held, keep, more) in [(5, 3, 2), (300, 10, 4), (200, 200, 100), (260, 0, 3)] {
                let mut c = LayerCache::Quantized(QuantizedKv::new(bits, 64));
                fetch(&mut c, 0, held, 1.0);
                c.truncate(keep).unwrap();
                assert_eq!(c.offset(), keep);
                let got = fetch(&mut c, keep, more, 2.0);
                let mut fresh = LayerCache::Quantized(QuantizedKv::new(bits, 64));
                if keep > 0 {
                    fetch(&mut fresh, 0, keep, 1.0);
                }
                assert_eq!(got, fetch(&mut fresh, keep, more, 2.0), "{bits} bits");
                assert_eq!(got.0.len(), 2 * (keep + more) * 64);
            }
            let mut c = LayerCache::Quantized(QuantizedKv::new(bits, 64));
            fetch(&mut c, 0, 4, 1.0);
            assert!(c.truncate(10).is_err());
            assert_eq!(c.offset(), 4);
        }
    }

    /// A snapshot keeps what it held after the cache it came from is cut back and written over
    /// (MLX arrays are immutable: the write copies the shared buffer).
    #[test]
    fn a_snapshot_keeps_its_positions_when_the_original_is_written_over() {
        let mut c = LayerCache::Quantized(QuantizedKv::new(8, 64));
        let held = fetch(&mut c, 0, 6, 1.0);
        let mut snap = c.clone();
        c.truncate(2).unwrap();
        fetch(&mut c, 2, 4, 5.0);
        let again = fetch(&mut snap, 6, 1, 1.0);
        // `[1, 2, positions, 64]`: head 0's positions, then head 1's.
        for h in 0..2 {
            let (a, b) = (h * 7 * 64, h * 6 * 64);
            assert_eq!(again.0[a..a + 6 * 64], held.0[b..b + 6 * 64]);
        }
    }
}
