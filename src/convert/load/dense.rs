//! Every tensor of a checkpoint that is not a routed expert's, grouped by module: float,
//! MLX-quantized (weight + scales + biases), FP8 with block scales, computed as mlx-lm's
//! `sanitize` computes it (the architecture's `Derive` rules, `derived.rs`), or other.
//!
//! In: an opened [`Checkpoint`]. Out: [`DenseTensor`]s sorted by name. Invariant: a tensor that
//! travels with another (`.scales` / `.biases` of a quantized module, an FP8 weight's
//! `weight_scale_inv`) is not listed on its own.

use super::derived::{kv_b_split_names, Concat, Derived, HeadSplit, KvPart};
use super::{Checkpoint, LoadError};
use crate::arch::{Derive, TensorRole};
use crate::convert::quantize::{QuantParams, QuantizedView};
use crate::convert::tensor::{Dtype, FloatDtype, MatrixView};

/// A non-expert tensor's values.
#[derive(Clone, Debug)]
pub enum TensorData<'a> {
    /// Float values of any shape.
    Float {
        dtype: FloatDtype,
        shape: &'a [usize],
        bytes: &'a [u8],
    },
    /// An MLX-quantized 2-D weight (logical shape `[rows, cols]`).
    Quantized(QuantizedView<'a>),
    /// A 2-D weight of codes with their scales, standing for float values: FP8 with block scales
    /// (bf16 values), or a compressed-tensors packed integer weight with group scales.
    Fp8(MatrixView<'a>),
    /// A float tensor computed from a source tensor on request (`derived.rs`).
    Derived(Derived<'a>),
    /// Anything else (integer buffers): copied as is.
    Other {
        dtype: Dtype,
        shape: &'a [usize],
        bytes: &'a [u8],
    },
}

/// What a [`Derive::Concat`] rule makes of a tensor.
enum Joined<'a> {
    /// No rule joins it.
    No,
    /// A later part of a joined weight: stored in the first part's place.
    Part,
    /// The joined weight, in the first part's place.
    Whole(DenseTensor<'a>),
}

/// A non-expert tensor, grouped by module for MLX-quantized ones.
#[derive(Clone, Debug)]
pub struct DenseTensor<'a> {
    /// The tensor name (`...weight` for a quantized module).
    pub name: String,
    pub role: TensorRole,
    pub data: TensorData<'a>,
}

impl Checkpoint {
    /// The norm suffixes to add one to: those of the architecture's [`Derive::NormsPlusOne`]
    /// when the source stores them offset by one (Hugging Face, not mlx-lm). mlx-lm's qwen3_5.py
    /// tells by the convolution weights still in Hugging Face's `[C, 1, K]` layout
    /// (`"conv1d.weight" in k and v.shape[-1] != 1`); qwen3_next.py by per-expert tensors, which
    /// only Hugging Face checkpoints of it have. Both agree on both kinds of source; the first
    /// rule is used for both.
    fn norms_offset_by_one(&self) -> &'static [&'static str] {
        let suffixes = self
            .config
            .arch
            .def()
            .sanitize
            .derive
            .iter()
            .find_map(|d| match d {
                Derive::NormsPlusOne(s) => Some(*s),
                _ => None,
            });
        let hf_layout = || {
            self.tensors.iter().any(|(name, e)| {
                name.ends_with(".conv1d.weight") && e.info.shape.last().is_some_and(|&k| k != 1)
            })
        };
        match suffixes {
            Some(s) if hf_layout() => s,
            _ => &[],
        }
    }

    /// What the architecture's [`Derive::Concat`] rules make of `name`: the first part of a
    /// module that holds them all becomes the joined weight, the others are left out.
    fn joined(&self, name: &str) -> Result<Joined<'_>, LoadError> {
        for d in self.config.arch.def().sanitize.derive {
            let Derive::Concat { parts, into, conv } = *d else {
                continue;
            };
            let Some((at, module)) = parts
                .iter()
                .enumerate()
                .find_map(|(i, p)| Some((i, name.strip_suffix(p)?)))
            else {
                continue;
            };
            let names: Vec<String> = parts.iter().map(|p| format!("{module}{p}")).collect();
            if parts.len() > 3 || names.iter().any(|n| self.get(n).is_none()) {
                continue;
            }
            if at > 0 {
                return Ok(Joined::Part);
            }
            let mut views = [None; 3];
            let mut rows = 0usize;
            let mut rest: Option<Vec<usize>> = None;
            for (slot, n) in views.iter_mut().zip(&names) {
                let t = self.tensor(n)?;
                let bad = |why: &str| LoadError::Shape {
                    tensor: n.clone(),
                    expected: rest.clone().unwrap_or_default(),
                    found: t.shape.to_vec(),
                    why: why.into(),
                };
                let want_ndim = if conv { 3 } else { 2 };
                if t.shape.len() != want_ndim || (conv && t.shape[1] != 1) {
                    return Err(bad(if conv {
                        "a depthwise convolution [channels, 1, kernel], joined with the others                          as mlx-lm's sanitize joins them"
                    } else {
                        "a 2-D weight, joined with the module's other parts as mlx-lm's                          sanitize joins them"
                    }));
                }
                let tail = t.shape[1..].to_vec();
                if rest.as_ref().is_some_and(|r| *r != tail) {
                    return Err(bad("the same trailing shape as the module's other parts"));
                }
                let cols: usize = tail.iter().product();
                *slot = Some(self.float_matrix(t, t.data, t.shape[0], cols)?);
                rows += t.shape[0];
                rest = Some(tail);
            }
            let rest = rest.unwrap_or_default();
            let (shape, ndim) = if conv {
                // w.moveaxis(2, 1): [C, 1, K] -> [C, K, 1], the values in the same order
                ([rows, rest[1], 1], 3)
            } else {
                ([rows, rest[0], 0], 2)
            };
            let dtypes: Vec<_> = views.iter().flatten().map(|m| m.dtype).collect();
            if dtypes.windows(2).any(|w| w[0] != w[1]) {
                return Err(LoadError::Dtype {
                    tensor: names[1].clone(),
                    found: self.tensor(&names[1])?.dtype,
                    expected:
                        "the float type of the module's other parts, which are joined into one",
                });
            }
            let joined = format!("{module}{into}");
            return Ok(Joined::Whole(DenseTensor {
                role: self.config.arch.classify(&joined),
                name: joined,
                data: TensorData::Derived(Derived::Concat(Box::new(Concat {
                    parts: views,
                    shape,
                    ndim,
                }))),
            }));
        }
        Ok(Joined::No)
    }

    /// What the architecture's [`Derive::Flatten`] rules make of `name`: a float tensor of
    /// more than one axis flattened (mlx-lm's `mx.reshape(w, (-1,))`), one of the `per_head`
    /// suffixes cut to the linear-attention heads (`w[:num_heads]`); `None` when no rule applies
    /// or the tensor is already so.
    fn flattened(&self, name: &str) -> Result<Option<DenseTensor<'_>>, LoadError> {
        for d in self.config.arch.def().sanitize.derive {
            let Derive::Flatten { suffixes, per_head } = *d else {
                continue;
            };
            if !suffixes.iter().any(|sfx| name.ends_with(sfx)) {
                continue;
            }
            let t = self.tensor(name)?;
            let Some(dtype) = t.dtype.float() else {
                continue;
            };
            let n: usize = t.shape.iter().product();
            let heads = self
                .config
                .linear_attention
                .as_ref()
                .map_or(n, |la| la.num_value_heads);
            let len = if per_head.iter().any(|sfx| name.ends_with(sfx)) {
                n.min(heads)
            } else {
                n
            };
            if t.shape.len() == 1 && len == n {
                return Ok(None);
            }
            let source = MatrixView::new(dtype, 1, n, t.data).ok_or_else(|| LoadError::Shape {
                tensor: name.to_string(),
                expected: t.shape.to_vec(),
                found: t.shape.to_vec(),
                why: "its bytes do not match its shape".into(),
            })?;
            return Ok(Some(DenseTensor {
                name: name.to_string(),
                role: self.config.arch.classify(name),
                data: TensorData::Derived(Derived::Flat { source, len }),
            }));
        }
        Ok(None)
    }

    /// Every tensor that is not an expert projection, sorted by name, MLX-quantized modules
    /// grouped under their `.weight` name.
    pub fn dense_tensors(&self) -> Result<Vec<DenseTensor<'_>>, LoadError> {
        let arch = self.config.arch;
        let offset_norms = self.norms_offset_by_one();
        let split_kv_b = (self.config.arch.def().sanitize.derive)
            .contains(&Derive::SplitKvB)
            .then_some(self.config.mla.as_ref())
            .flatten();
        let mut out = Vec::new();
        for name in self.tensor_names() {
            let role = arch.classify(name);
            if matches!(
                role,
                TensorRole::Expert { .. }
                    | TensorRole::FusedGateUp { .. }
                    | TensorRole::FusedDown { .. }
                    | TensorRole::Stacked { .. }
                    | TensorRole::MxBlocks { .. }
                    | TensorRole::ExpertBias { .. }
            ) {
                continue;
            }
            // An FP8 weight's block scales travel with it.
            if self.fp8_block.is_some()
                && name
                    .strip_suffix("_scale_inv")
                    .and_then(|w| self.get(w))
                    .is_some_and(|w| w.dtype == Dtype::F8E4M3)
            {
                continue;
            }
            // A packed weight's group scales travel with it (compressed-tensors).
            if name
                .strip_suffix("_scale")
                .is_some_and(|w| self.packed_cols(w).is_some())
            {
                continue;
            }
            // `.scales` / `.biases` of a quantized module travel with its `.weight`.
            if let Some(module) = name
                .strip_suffix(".scales")
                .or_else(|| name.strip_suffix(".biases"))
            {
                if self
                    .get(&format!("{module}.weight"))
                    .is_some_and(|w| w.dtype == Dtype::U32)
                {
                    continue;
                }
            }
            // Kimi-K3's parts joined into one weight (derived.rs), and flattened vectors.
            match self.joined(name)? {
                Joined::Part => continue,
                Joined::Whole(t) => {
                    out.push(t);
                    continue;
                }
                Joined::No => {}
            }
            if let Some(t) = self.flattened(name)? {
                out.push(t);
                continue;
            }
            let t = self.tensor(name)?;
            // mlx-lm's sanitize: kv_b_proj -> embed_q + unembed_out (derived.rs).
            if let (Some(m), Some((keys, values))) = (split_kv_b, kv_b_split_names(name)) {
                if t.shape.len() == 2 && (t.dtype.float().is_some() || t.dtype == Dtype::F8E4M3) {
                    let view = self.float_matrix(t, t.data, t.shape[0], t.shape[1])?;
                    for (n, part) in [(keys, KvPart::Keys), (values, KvPart::Values)] {
                        let split = HeadSplit::new(view, self.config.num_attention_heads, m, part)
                            .ok_or_else(|| LoadError::Shape {
                                tensor: name.to_string(),
                                expected: vec![
                                    self.config.num_attention_heads
                                        * (m.qk_nope_head_dim + m.v_head_dim),
                                    m.kv_lora_rank,
                                ],
                                found: t.shape.to_vec(),
                                why: "num_attention_heads x (qk_nope_head_dim + v_head_dim) rows of kv_lora_rank".into(),
                            })?;
                        out.push(DenseTensor {
                            name: n,
                            role: TensorRole::Dense,
                            data: TensorData::Derived(Derived::HeadSplit(split)),
                        });
                    }
                    continue;
                }
                return Err(LoadError::Dtype {
                    tensor: name.to_string(),
                    found: t.dtype,
                    expected: "a 2-D BF16, F16, F32 or FP8 (E4M3) weight, which conversion splits into \
                               embed_q and unembed_out as mlx-lm does; convert the original checkpoint, \
                               or mlx-lm's conversion of it (which stores the two halves)",
                });
            }
            // Qwen3-Next / Qwen3.5 norms stored offset by one: sanitize's `v + 1.0`.
            if offset_norms.iter().any(|s| name.ends_with(s)) && t.shape.len() == 1 {
                if let Some(dtype) = t.dtype.float() {
                    let view = MatrixView::new(dtype, 1, t.shape[0], t.data).ok_or_else(|| {
                        LoadError::Shape {
                            tensor: name.to_string(),
                            expected: t.shape.to_vec(),
                            found: t.shape.to_vec(),
                            why: "its bytes do not match its shape".into(),
                        }
                    })?;
                    out.push(DenseTensor {
                        name: name.to_string(),
                        role,
                        data: TensorData::Derived(Derived::PlusOne(view)),
                    });
                    continue;
                }
            }
            let data = match (t.dtype, t.dtype.float()) {
                (Dtype::F8E4M3, _) if t.shape.len() == 2 => {
                    TensorData::Fp8(self.fp8_matrix(t, t.data, t.shape[0], t.shape[1])?)
                }
                (Dtype::I32, _) if t.shape.len() == 2 && self.packed_cols(name).is_some() => {
                    let cols = self.packed_cols(name).unwrap_or(0);
                    TensorData::Fp8(self.packed_matrix(t, t.data, t.shape[0], cols)?)
                }
                (_, Some(dtype)) => TensorData::Float {
                    dtype,
                    shape: t.shape,
                    bytes: t.data,
                },
                // 2-D, or mlx-lm's [heads, out, in] MultiLinear codes (stored as their rows).
                (Dtype::U32, None) if name.ends_with(".weight") && t.shape.len() >= 2 => {
                    let rows: usize = t.shape[..t.shape.len() - 1].iter().product();
                    let words = t.shape[t.shape.len() - 1];
                    let module = &name[..name.len() - ".weight".len()];
                    let sn = format!("{module}.scales");
                    let bn = format!("{module}.biases");
                    if self.get(&sn).is_none() {
                        TensorData::Other {
                            dtype: t.dtype,
                            shape: t.shape,
                            bytes: t.data,
                        }
                    } else {
                        let q = self.mlx_quantization.as_ref().ok_or_else(|| {
                            LoadError::MlxQuantization {
                                detail: format!(
                                    "{name} is U32 but config.json has no quantization"
                                ),
                            }
                        })?;
                        let p: QuantParams = super::quant_params(q, module)?;
                        let cols = words * 32 / p.bits as usize;
                        TensorData::Quantized(self.quantized_view(
                            name,
                            Some(&sn),
                            Some(&bn),
                            None,
                            rows,
                            cols,
                        )?)
                    }
                }
                _ => TensorData::Other {
                    dtype: t.dtype,
                    shape: t.shape,
                    bytes: t.data,
                },
            };
            out.push(DenseTensor {
                name: name.to_string(),
                role,
                data,
            });
        }
        Ok(out)
    }
}
