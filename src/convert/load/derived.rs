//! Tensors the pack stores under other names than the source: mlx-lm's `sanitize` done at
//! conversion, so a pack holds what mlx-lm's model reads and the runtime needs no source names.
//!
//! In: source tensors' float views (bf16, or FP8 codes with block scales). Out: the derived
//! tensor's values on request ([`HeadSplit::values`]); nothing is computed before the quantize
//! stage asks, so conversion holds one derived tensor at a time.
//! Four rules ([`Derived`]), chosen by an architecture's table entry
//! ([`crate::arch::Sanitize::derive`], [`crate::arch::Derive`]), never by its name:
//! - DeepSeek-V3's `self_attn.kv_b_proj.weight` `[heads * (nope + v), kv_lora]` becomes
//!   `embed_q.weight` `[heads * kv_lora, nope]` (each head's key rows, transposed) and
//!   `unembed_out.weight` `[heads * v, kv_lora]` (each head's value rows), as mlx-lm 0.32.2's
//!   deepseek_v3.py `sanitize` splits it. Stored as 2-D rows they quantize exactly as mlx-lm
//!   quantizes its `[heads, out, in]` `MultiLinear` weights (groups run along the last axis).
//! - Qwen3-Next's and Qwen3.5's RMSNorm weights, which Hugging Face checkpoints store offset by
//!   one (the model computes with `1 + w`), get the one added in their own float type
//!   (`weights[k] = v + 1.0` in qwen3_next.py / qwen3_5.py `sanitize`; the norms are those the
//!   entry's `Derive::NormsPlusOne` lists).
//!   mlx-lm folders already hold the sums and are read as they are.
//! - Kimi-K3's weights stored apart and joined along the first axis (`self_attn.{q,k,v}_proj`
//!   -> `qkv_proj`, the three depthwise convolutions -> `qkv_conv.conv.weight` in mlx.nn.Conv1d's
//!   `[C, K, 1]`; the entry's `Derive::Concat`), and its `A_log` / `dt_bias` flattened to 1-D,
//!   `A_log` cut to the linear-attention heads (`Derive::Flatten`): the source's values, moved.

use crate::arch::Mla;
use crate::convert::tensor::{FloatDtype, MatrixView};

/// A tensor computed from a source tensor at conversion.
#[derive(Clone, Debug)]
pub enum Derived<'a> {
    /// One half of DeepSeek-V3's `kv_b_proj`.
    HeadSplit(HeadSplit<'a>),
    /// A 1-D norm weight plus one, `source` seen as one row.
    PlusOne(MatrixView<'a>),
    /// Weights joined along their first axis (boxed: three views are large beside the others).
    Concat(Box<Concat<'a>>),
    /// A tensor seen as one row, flattened to its first `len` values.
    Flat { source: MatrixView<'a>, len: usize },
}

/// Up to three weights, each seen as `[rows, rest]`, joined along their first axis into
/// `shape` (`ndim` axes).
#[derive(Clone, Copy, Debug)]
pub struct Concat<'a> {
    pub parts: [Option<MatrixView<'a>>; 3],
    pub shape: [usize; 3],
    pub ndim: usize,
}

impl<'a> Derived<'a> {
    /// The source tensors' views (to release their pages once read).
    pub fn sources(&self) -> Vec<MatrixView<'a>> {
        match self {
            Derived::HeadSplit(h) => vec![h.source],
            Derived::PlusOne(m) | Derived::Flat { source: m, .. } => vec![*m],
            Derived::Concat(c) => c.parts.iter().flatten().copied().collect(),
        }
    }

    pub fn dtype(&self) -> FloatDtype {
        match self {
            Derived::HeadSplit(h) => h.source.dtype,
            Derived::PlusOne(m) | Derived::Flat { source: m, .. } => m.dtype,
            Derived::Concat(c) => c
                .parts
                .iter()
                .flatten()
                .next()
                .map_or(FloatDtype::F32, |m| m.dtype),
        }
    }

    /// The shape as stored.
    pub fn shape(&self) -> Vec<usize> {
        match self {
            Derived::HeadSplit(h) => h.shape().to_vec(),
            Derived::PlusOne(m) => vec![m.cols],
            Derived::Flat { len, .. } => vec![*len],
            Derived::Concat(c) => c.shape[..c.ndim].to_vec(),
        }
    }

    /// The values, row-major, as f32 (for `PlusOne` already rounded to the source's type, as
    /// MLX's `v + 1.0` in that type rounds them).
    pub fn values(&self) -> Vec<f32> {
        match self {
            Derived::HeadSplit(h) => h.values(),
            Derived::Flat { source, len } => {
                let mut row = vec![0f32; source.cols];
                source.row_f32(0, &mut row);
                row.truncate(*len);
                row
            }
            Derived::Concat(c) => {
                let mut out = Vec::new();
                for m in c.parts.iter().flatten() {
                    let mut row = vec![0f32; m.cols];
                    for r in 0..m.rows {
                        m.row_f32(r, &mut row);
                        out.extend_from_slice(&row);
                    }
                }
                out
            }
            Derived::PlusOne(m) => {
                let mut row = vec![0f32; m.cols];
                m.row_f32(0, &mut row);
                let mut b = [0u8; 4];
                row.iter()
                    .map(|&x| {
                        let es = m.dtype.size();
                        m.dtype.write(x + 1.0, &mut b[..es]);
                        m.dtype.read(&b[..es])
                    })
                    .collect()
            }
        }
    }

    /// The values in [`Derived::dtype`], little-endian.
    pub fn bytes(&self) -> Vec<u8> {
        let vals = self.values();
        let dtype = self.dtype();
        let mut out = vec![0u8; vals.len() * dtype.size()];
        dtype.write_all(&vals, &mut out);
        out
    }
}

/// Which half of `kv_b_proj`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvPart {
    /// `embed_q`: per head, the `qk_nope_head_dim` key rows, transposed.
    Keys,
    /// `unembed_out`: per head, the `v_head_dim` value rows.
    Values,
}

/// One half of a `kv_b_proj`, split per head.
#[derive(Clone, Copy, Debug)]
pub struct HeadSplit<'a> {
    pub source: MatrixView<'a>,
    pub heads: usize,
    pub nope: usize,
    pub v: usize,
    pub part: KvPart,
}

/// The names of the two halves: `(embed_q, unembed_out)` weight names for a
/// `...self_attn.kv_b_proj.weight`, else `None`.
pub fn kv_b_split_names(name: &str) -> Option<(String, String)> {
    let module = name.strip_suffix(".kv_b_proj.weight")?;
    Some((
        format!("{module}.embed_q.weight"),
        format!("{module}.unembed_out.weight"),
    ))
}

impl<'a> HeadSplit<'a> {
    /// `None` when `source`'s shape is not `[heads * (nope + v), kv_lora]`.
    pub fn new(source: MatrixView<'a>, heads: usize, m: &Mla, part: KvPart) -> Option<Self> {
        let per_head = m.qk_nope_head_dim + m.v_head_dim;
        (source.rows == heads * per_head && source.cols == m.kv_lora_rank).then_some(HeadSplit {
            source,
            heads,
            nope: m.qk_nope_head_dim,
            v: m.v_head_dim,
            part,
        })
    }

    /// The float type of the values (bf16 for an FP8 source).
    pub fn dtype(&self) -> FloatDtype {
        self.source.dtype
    }

    /// `[rows, cols]` as stored.
    pub fn shape(&self) -> [usize; 2] {
        let lora = self.source.cols;
        match self.part {
            KvPart::Keys => [self.heads * lora, self.nope],
            KvPart::Values => [self.heads * self.v, lora],
        }
    }

    /// The values, row-major, as f32 (exact: they are the source's values, only moved).
    pub fn values(&self) -> Vec<f32> {
        let lora = self.source.cols;
        let [rows, cols] = self.shape();
        let mut out = vec![0f32; rows * cols];
        let mut row = vec![0f32; lora];
        let per_head = self.nope + self.v;
        for h in 0..self.heads {
            match self.part {
                KvPart::Keys => {
                    // wk = v[:, :nope, :].swapaxes(-1, -2): out[h, c, j] = src[h, j, c]
                    for j in 0..self.nope {
                        self.source.row_f32(h * per_head + j, &mut row);
                        for (c, &x) in row.iter().enumerate() {
                            out[(h * lora + c) * cols + j] = x;
                        }
                    }
                }
                KvPart::Values => {
                    // wv = v[:, nope:, :]
                    for j in 0..self.v {
                        let at = (h * self.v + j) * cols;
                        self.source
                            .row_f32(h * per_head + self.nope + j, &mut out[at..at + cols]);
                    }
                }
            }
        }
        out
    }

    /// The values in [`HeadSplit::dtype`], little-endian.
    pub fn bytes(&self) -> Vec<u8> {
        let vals = self.values();
        let dtype = self.dtype();
        let mut out = vec![0u8; vals.len() * dtype.size()];
        dtype.write_all(&vals, &mut out);
        out
    }
}
