//! The sliding-window layers' KV cache: mlx-lm 0.32.2's `RotatingKVCache(max_size, keep=0)`
//! (models/cache.py) and the mask that goes with it (`make_mask`, models/base.py
//! `create_causal_mask`), as gpt-oss uses them (models/gpt_oss.py `make_cache`).
//!
//! In: per call, a layer's new keys and values `[B, kv_heads, L, D]`. Out: the keys and values
//! the call attends to, in mlx-lm's order, and the mask that goes with them.
//! Invariant: the arrays are the ones mlx-lm's cache holds after the same calls, position for
//! position and in the same order, so attention over them adds up the same terms in the same
//! order. That order is not always temporal:
//! - a call of several tokens (`_update_concat`) puts the buffer back in temporal order, keeps
//!   its last `max_size - 1` positions and appends the new ones, so every new query sees a full
//!   window; the result can be longer than `max_size`, and the mask ([`RotatingKv::mask`]) is a
//!   causal window over exactly those keys;
//! - a call of one token (`_update_in_place`) writes into a buffer of `max_size` positions at
//!   `idx`, wrapping to the front once it is full, so after the wrap the keys come rotated (the
//!   newest before the oldest) and need no mask: all `max_size` of them are in the window.
//!
//! mlx-lm's `keep` (positions never evicted) is 0 for gpt-oss and is not implemented.
//!
//! ## Cutting back
//! While the cache holds every position it has seen (`offset <= max_size`: nothing evicted yet)
//! lowering `offset` and `idx` gives the cache the kept positions alone would have built (what
//! lies past them is never returned, and later writes go over it). Once it has evicted a
//! position it cannot go back: the evicted keys are gone, and the buffer's layout no longer
//! matches the kept positions. [`RotatingKv::can_truncate`] says which.

use super::kv_cache::to_i32;
use super::ComputeError;
use crate::mlx::{concatenate, Array, Dtype};

type Result<T> = std::result::Result<T, ComputeError>;

/// mlx-lm's `RotatingKVCache.step`: the buffer grows this many positions at a time, up to
/// `max_size`.
const STEP: usize = 256;

/// One sliding-window layer's keys and values (`RotatingKVCache`, `keep = 0`).
#[derive(Debug, Clone)]
pub struct RotatingKv {
    keys: Option<Array>,
    values: Option<Array>,
    /// Positions seen (the next token's position).
    offset: usize,
    /// Where the next single-token write goes (`_idx`).
    idx: usize,
    max_size: usize,
}

/// A mask that a layer's attention applies: none, causal, or an array it owns.
#[derive(Debug, Clone)]
pub enum AttnMask {
    None,
    Causal,
    Array(Array),
}

impl AttnMask {
    /// The mask as `fast::scaled_dot_product_attention` takes it.
    pub fn as_mask(&self) -> crate::mlx::fast::Mask<'_> {
        use crate::mlx::fast::Mask;
        match self {
            AttnMask::None => Mask::None,
            AttnMask::Causal => Mask::Causal,
            AttnMask::Array(a) => Mask::Array(a),
        }
    }
}

impl RotatingKv {
    /// An empty cache for a window of `max_size` positions.
    pub fn new(max_size: usize) -> RotatingKv {
        RotatingKv {
            keys: None,
            values: None,
            offset: 0,
            idx: 0,
            max_size,
        }
    }

    /// Positions seen (the next token's position).
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// The window: most positions kept.
    pub fn max_size(&self) -> usize {
        self.max_size
    }

    /// The buffers to evaluate.
    pub(super) fn arrays(&self) -> impl Iterator<Item = &Array> {
        [self.keys.as_ref(), self.values.as_ref()]
            .into_iter()
            .flatten()
    }

    /// Whether the cache can be cut back to `position` (see "Cutting back" above).
    pub fn can_truncate(&self, position: usize) -> bool {
        position == self.offset || (position < self.offset && self.offset <= self.max_size)
    }

    /// Cuts back to `position`; the caller checked [`RotatingKv::can_truncate`].
    pub(super) fn truncate_unchecked(&mut self, position: usize) {
        // trim(n): self.offset -= n; self._idx -= n
        let n = self.offset - position;
        self.offset = position;
        self.idx = self.idx.saturating_sub(n);
    }

    /// Stores `keys`/`values` `[B, kv_heads, L, D]` and returns what the call attends to
    /// (`update_and_fetch`: one token in place, several by concatenation).
    pub fn update_and_fetch(&mut self, keys: &Array, values: &Array) -> Result<(Array, Array)> {
        let (ks, vs) = (keys.shape(), values.shape());
        if ks.len() != 4 || vs.len() != 4 || ks[..3] != vs[..3] {
            return Err(ComputeError::BadShape {
                name: "rotating kv cache update".into(),
                found: vs,
                expected: ks,
            });
        }
        if ks[2] == 1 {
            self.update_in_place(keys, values)
        } else {
            self.update_concat(keys, values)
        }
    }

    /// `_update_concat`.
    fn update_concat(&mut self, keys: &Array, values: &Array) -> Result<(Array, Array)> {
        let (k, v) = match (self.keys.take(), self.values.take()) {
            (Some(k), Some(v)) => {
                // Put the keys/values in temporal order to preserve context.
                let (k, v) = (self.temporal_order(&k)?, self.temporal_order(&v)?);
                self.idx = k.shape()[2];
                // The largest size is max_size + S - 1 so every token gets max_size context.
                let trim = self.idx as i64 - self.max_size as i64 + 1;
                (
                    trim_front(trim, &k, Some(keys))?,
                    trim_front(trim, &v, Some(values))?,
                )
            }
            _ => (keys.clone(), values.clone()),
        };
        self.offset += keys.shape()[2];
        self.idx = k.shape()[2];
        self.keys = Some(k.clone());
        self.values = Some(v.clone());
        Ok((k, v))
    }

    /// `_update_in_place`.
    fn update_in_place(&mut self, keys: &Array, values: &Array) -> Result<(Array, Array)> {
        let (ks, vs) = (keys.shape(), values.shape());
        let (b, heads, s) = (ks[0], ks[1], ks[2]);
        let prev = self.offset;
        let (mut k, mut v) = match (self.keys.take(), self.values.take()) {
            (Some(k), Some(v)) if !(prev >= k.shape()[2] && k.shape()[2] < self.max_size) => (k, v),
            old => {
                // Not at max_size yet: grow by a step, at most to max_size.
                let grow = STEP.min(self.max_size.saturating_sub(prev)).max(1);
                let new_k = Array::zeros(&[b, heads, grow, ks[3]], keys.dtype())?;
                let new_v = Array::zeros(&[b, heads, grow, vs[3]], values.dtype())?;
                self.idx = prev;
                match old {
                    (Some(k), Some(v)) => (
                        concatenate(&[&k, &new_k], 2)?,
                        concatenate(&[&v, &new_v], 2)?,
                    ),
                    _ => (new_k, new_v),
                }
            }
        };
        // Trim if needed (a buffer left longer than max_size by a multi-token call).
        let trim = k.shape()[2] as i64 - self.max_size as i64;
        if trim > 0 {
            k = trim_front(trim, &k, None)?;
            v = trim_front(trim, &v, None)?;
            self.idx = self.max_size;
        }
        // Rotate.
        if self.idx == self.max_size {
            self.idx = 0;
        }
        // self.keys[..., self._idx : self._idx + S, :] = keys
        let at = [0, 0, to_i32(self.idx)?, 0];
        let end = |d: usize| -> Result<[i32; 4]> {
            Ok([
                to_i32(b)?,
                to_i32(heads)?,
                to_i32(self.idx + s)?,
                to_i32(d)?,
            ])
        };
        k = k.slice_update(keys, &at, &end(ks[3])?)?;
        v = v.slice_update(values, &at, &end(vs[3])?)?;
        self.offset += s;
        self.idx += s;
        // keys_and_values(): the first `offset` positions until the buffer is full.
        let fetched = if self.offset < k.shape()[2] {
            (head(&k, self.offset)?, head(&v, self.offset)?)
        } else {
            (k.clone(), v.clone())
        };
        self.keys = Some(k);
        self.values = Some(v);
        Ok(fetched)
    }

    /// `_temporal_order`: the buffer with its positions oldest first, the unused end cut off.
    fn temporal_order(&self, x: &Array) -> Result<Array> {
        let n = x.shape()[2];
        if self.idx == n {
            Ok(x.clone())
        } else if self.idx < self.offset {
            // [v[..., :keep], v[..., idx:], v[..., keep:idx]] with keep = 0.
            Ok(concatenate(
                &[&range(x, self.idx, n)?, &range(x, 0, self.idx)?],
                2,
            )?)
        } else {
            head(x, self.idx)
        }
    }

    /// The mask for a call of `len` tokens made before it updates the cache (`make_mask(N,
    /// window_size=max_size)`): causal for several tokens, as a boolean window once some of
    /// them reach past the window; none for one token (every key the call gets is in its
    /// window, since the window is the cache's size).
    pub fn mask(&self, len: usize) -> Result<AttnMask> {
        if len <= 1 {
            return Ok(AttnMask::None);
        }
        let window = self.max_size;
        // offset = min(self.max_size - 1, self.offset): the old keys the call will see.
        let offset = self.offset.min(self.max_size - 1);
        if offset + len > window {
            Ok(AttnMask::Array(causal_window(len, offset, window)?))
        } else {
            Ok(AttnMask::Causal)
        }
    }
}

/// `create_causal_mask(N, offset, window_size)`: `[N, offset + N]` booleans, query `i` (at
/// position `offset + i`) keeping key `j` when `j <= offset + i < j + window`.
pub fn causal_window(len: usize, offset: usize, window: usize) -> Result<Array> {
    let keys = offset + len;
    let keep: Vec<u8> = (0..len)
        .flat_map(|i| (0..keys).map(move |j| u8::from(j <= offset + i && offset + i < j + window)))
        .collect();
    Ok(Array::from_slice(&keep, &[len, keys])?.astype(Dtype::Bool)?)
}

/// `x[..., from:to, :]` of a `[B, H, T, D]` array.
fn range(x: &Array, from: usize, to: usize) -> Result<Array> {
    let s = x.shape();
    Ok(x.slice(
        &[0, 0, to_i32(from)?, 0],
        &[to_i32(s[0])?, to_i32(s[1])?, to_i32(to)?, to_i32(s[3])?],
    )?)
}

/// `x[..., :n, :]`.
fn head(x: &Array, n: usize) -> Result<Array> {
    range(x, 0, n)
}

/// `_trim(trim_size, v, append)`: drops the first `trim` positions (if positive) and appends.
fn trim_front(trim: i64, x: &Array, append: Option<&Array>) -> Result<Array> {
    let kept = if trim > 0 {
        range(x, trim as usize, x.shape()[2])?
    } else {
        x.clone()
    };
    Ok(match append {
        Some(a) => concatenate(&[&kept, a], 2)?,
        None => kept,
    })
}

#[cfg(test)]
mod tests {
    use super::super::kv_cache::LayerCache;
    use super::*;

    /// `[1, 1, len, 2]` rows naming their position and a tag.
    fn rows(first: usize, len: usize, tag: f32) -> Array {
        let v: Vec<f32> = (first..first + len).flat_map(|p| [p as f32, tag]).collect();
        Array::from_slice(&v, &[1, 1, len, 2]).unwrap()
    }

    /// Feeds calls of `lens` tokens from position `cache.offset()`; the positions the last
    /// call's keys hold, in the order returned, and its mask as booleans (`None` without one).
    fn feed(c: &mut LayerCache, lens: &[usize], tag: f32) -> (Vec<f32>, Option<Vec<bool>>) {
        let mut last = (Vec::new(), None);
        for &n in lens {
            let at = c.offset();
            let mask = match c.mask(n).unwrap() {
                AttnMask::None => None,
                AttnMask::Causal => Some(vec![]),
                AttnMask::Array(a) => Some(
                    a.astype(Dtype::F32)
                        .unwrap()
                        .to_vec_f32()
                        .unwrap()
                        .into_iter()
                        .map(|x| x != 0.0)
                        .collect(),
                ),
            };
            let (k, _) = c
                .update_and_fetch("test", &rows(at, n, tag), &rows(at, n, tag))
                .unwrap();
            let keys = k.to_vec_f32().unwrap();
            last = (keys, mask);
        }
        last
    }

    /// The positions of `feed`'s keys.
    fn positions(keys: &[f32]) -> Vec<usize> {
        keys.chunks(2).map(|r| r[0] as usize).collect()
    }

    /// A window of 8: a prompt longer than the window gets a windowed causal mask over all its
    /// keys; single tokens then wrap the buffer (newest first, no mask); a chunk after the wrap
    /// gets the last 7 positions back in temporal order and a windowed mask.
    #[test]
    fn keys_come_back_in_mlx_lm_order_with_the_window_mask() {
        let mut c = LayerCache::Rotating(RotatingKv::new(8));
        let (k, m) = feed(&mut c, &[10], 1.0);
        assert_eq!(positions(&k), (0..10).collect::<Vec<_>>());
        let m = m.unwrap();
        assert_eq!(m.len(), 100);
        // Query 9 sees keys 2..=9.
        assert_eq!(
            &m[90..100],
            &[false, false, true, true, true, true, true, true, true, true]
        );
        let (k, m) = feed(&mut c, &[1], 1.0);
        assert_eq!(positions(&k), [10, 3, 4, 5, 6, 7, 8, 9]);
        assert!(m.is_none());
        let (k, _) = feed(&mut c, &[1, 1], 1.0);
        assert_eq!(positions(&k), [10, 11, 12, 5, 6, 7, 8, 9]);
        let (k, m) = feed(&mut c, &[3], 1.0);
        assert_eq!(positions(&k), (6..16).collect::<Vec<_>>());
        // offset min(7, 13) = 7: [3, 10] booleans, query 0 (position 13) sees keys 6..=13.
        assert_eq!(m.unwrap().len(), 30);
        // Inside the window a chunk is plainly causal.
        let mut d = LayerCache::Rotating(RotatingKv::new(8));
        assert_eq!(feed(&mut d, &[3, 1], 1.0).1, None);
        assert_eq!(feed(&mut d, &[4], 1.0).1, Some(vec![]));
        assert!(feed(&mut d, &[2], 1.0).1.unwrap().len() == 2 * 9);
    }

    /// Cutting back a cache that has dropped nothing gives what a cache built from the kept
    /// positions gives for the next calls (keys, their order and masks); once a position has
    /// been dropped any earlier position is refused (the current one is always accepted).
    #[test]
    fn truncates_only_while_nothing_was_dropped() {
        let cases: &[(&[usize], usize, &[usize])] = &[
            (&[5], 3, &[1, 1, 1, 1, 1, 1, 1, 2, 1]),
            (&[3, 1, 1, 1, 1, 1], 2, &[4, 1, 1, 1, 1, 3]),
            (&[8], 6, &[1, 1, 1, 1]),
            (&[2, 1, 1, 1, 1, 1, 1], 1, &[1, 5, 1]),
        ];
        for &(held, keep, more) in cases {
            let mut c = LayerCache::Rotating(RotatingKv::new(8));
            feed(&mut c, held, 1.0);
            c.truncate(keep).unwrap();
            assert_eq!(c.offset(), keep);
            let mut fresh = LayerCache::Rotating(RotatingKv::new(8));
            feed(&mut fresh, &[keep], 1.0);
            for &n in more {
                assert_eq!(
                    feed(&mut c, &[n], 2.0),
                    feed(&mut fresh, &[n], 2.0),
                    "held {held:?}, kept {keep}, then {more:?}"
                );
            }
        }
        for held in [&[9][..], &[5, 1, 1, 1, 1], &[8, 2]] {
            let mut c = LayerCache::Rotating(RotatingKv::new(8));
            feed(&mut c, held, 1.0);
            let offset = c.offset();
            let err = c.truncate(4).unwrap_err();
            assert!(
                matches!(
                    err,
                    ComputeError::CannotTruncate {
                        position: 4,
                        linear: false,
                        window: Some(8),
                        ..
                    }
                ),
                "{err}"
            );
            assert_eq!(c.offset(), offset, "a refused truncate changes nothing");
            c.truncate(offset).unwrap();
        }
    }
}
