//! Dense tensors: what the pack stores for every tensor that is not an expert.
//!
//! In: a [`DenseTensor`] from the loader (float, MLX-quantized or other) and the dense policy
//! (`dense_bits` 4, 8, or 16 = keep floats; the group size).
//! Out: the tensors to store, named as MLX names them: a quantized linear layer `P.weight`
//! becomes `P.weight` (U32 codes `[out, in*bits/32]`), `P.scales` and `P.biases`
//! (`[out, in/group]`, in the source float type); kept tensors are borrowed from the source.
//! Invariants: the router and every [`TensorRole::KeepFull`] tensor (norms, linear biases, the
//! shared-expert gate) stay at full precision; if the source had already quantized them, their
//! codes are kept as they are (docs/decisions/0004-mlx-source-codes.md);
//! a weight whose input width is not a whole number of groups, or that is not 2-D, stays float;
//! MLX codes whose bits and group size match are copied, not requantized.

use super::{quantize, requantize, QuantError, QuantParams, QuantizedMatrix, QuantizedView};
use crate::arch::TensorRole;
use crate::convert::load::{DenseTensor, TensorData};
use crate::convert::tensor::{Dtype, FloatDtype, MatrixView};
use crate::format::QuantMode;
use std::borrow::Cow;

/// How dense (non-expert) weights are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DensePolicy {
    /// 2, 3, 4, 5, 6 or 8: quantize 2-D weights; 16: keep them in the source float type.
    pub bits: u8,
    pub group_size: usize,
    /// Tensors the source holds as MLX codes keep them (their own bits and group size).
    pub keep_source_codes: bool,
}

impl DensePolicy {
    /// The same policy, keeping (or not) the codes of tensors the source already quantized.
    pub fn keeping_source_codes(self, keep: bool) -> DensePolicy {
        DensePolicy {
            keep_source_codes: keep,
            ..self
        }
    }

    /// Checks `bits` is 2, 3, 4, 5, 6, 8 or 16 and the group size is supported.
    pub fn new(bits: u8, group_size: usize) -> Result<DensePolicy, QuantError> {
        match bits {
            2..=6 | 8 => {
                QuantParams::new(bits, group_size)?;
            }
            16 => {}
            _ => {
                return Err(QuantError::Invalid {
                    what: "dense bits".into(),
                    detail: format!("{bits}: use 2, 3, 4, 5, 6, 8, or 16 (keep the source floats)"),
                })
            }
        }
        Ok(DensePolicy {
            bits,
            group_size,
            keep_source_codes: false,
        })
    }

    fn params(self) -> Option<QuantParams> {
        (self.bits != 16).then_some(QuantParams {
            mode: QuantMode::Affine,
            bits: self.bits,
            group_size: self.group_size,
        })
    }
}

/// One tensor to store.
#[derive(Clone, Debug)]
pub struct DenseOut<'a> {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Bits per code of U32 packed codes, else 0.
    pub bits: u8,
    /// Group size of packed codes, else 0.
    pub group_size: usize,
    /// Mode of packed codes (affine for everything else).
    pub mode: QuantMode,
    pub bytes: Cow<'a, [u8]>,
}

impl<'a> DenseOut<'a> {
    fn kept(name: &str, dtype: Dtype, shape: &[usize], bytes: &'a [u8]) -> DenseOut<'a> {
        DenseOut {
            name: name.to_string(),
            dtype,
            shape: shape.to_vec(),
            bits: 0,
            group_size: 0,
            mode: QuantMode::Affine,
            bytes: Cow::Borrowed(bytes),
        }
    }
}

/// Names, types, shapes and bits of the tensors of a quantized linear layer named
/// `weight_name` (`P.weight`), in the order [`quantized_outs`] gives them: biases (affine only),
/// scales, codes. mxfp4 and mxfp8 scales are u8.
fn quantized_layout(
    weight_name: &str,
    rows: usize,
    cols: usize,
    p: QuantParams,
    sd: FloatDtype,
) -> Vec<(String, Dtype, Vec<usize>, u8)> {
    let module = weight_name.strip_suffix(".weight").unwrap_or(weight_name);
    let sshape = vec![rows, p.groups_per_row(cols)];
    let sd = if p.has_biases() {
        sd.dtype()
    } else {
        Dtype::U8
    };
    let mut out = Vec::with_capacity(3);
    if p.has_biases() {
        out.push((format!("{module}.biases"), sd, sshape.clone(), 0));
    }
    out.push((format!("{module}.scales"), sd, sshape, 0));
    out.push((
        format!("{module}.weight"),
        Dtype::U32,
        vec![rows, p.words_per_row(cols)],
        p.bits,
    ));
    out
}

/// The tensors of a quantized linear layer named `weight_name` (`P.weight`): codes, scales
/// and (affine only) biases, borrowed from an MLX source or owned after quantizing.
fn quantized_outs<'a>(weight_name: &str, q: Quantized<'a>) -> Vec<DenseOut<'a>> {
    let (rows, cols, p, sd) = q.shape;
    let mut bytes = Vec::with_capacity(3);
    if p.has_biases() {
        bytes.push(q.biases);
    }
    bytes.extend([q.scales, q.codes]);
    quantized_layout(weight_name, rows, cols, p, sd)
        .into_iter()
        .zip(bytes)
        .map(|((name, dtype, shape, bits), bytes)| DenseOut {
            name,
            dtype,
            shape,
            bits,
            group_size: if bits > 0 { p.group_size } else { 0 },
            mode: if bits > 0 { p.mode } else { QuantMode::Affine },
            bytes,
        })
        .collect()
}

/// Codes, scales and biases with their shape (rows, cols, params, scale type).
struct Quantized<'a> {
    shape: (usize, usize, QuantParams, FloatDtype),
    codes: Cow<'a, [u8]>,
    scales: Cow<'a, [u8]>,
    biases: Cow<'a, [u8]>,
}

impl<'a> Quantized<'a> {
    fn owned(m: QuantizedMatrix) -> Quantized<'a> {
        Quantized {
            shape: (m.rows, m.cols, m.params, m.scale_dtype),
            codes: Cow::Owned(m.codes),
            scales: Cow::Owned(m.scales),
            biases: Cow::Owned(m.biases),
        }
    }

    fn borrowed(v: QuantizedView<'a>) -> Quantized<'a> {
        Quantized {
            shape: (v.rows, v.cols, v.params, v.scale_dtype),
            codes: Cow::Borrowed(v.codes),
            scales: Cow::Borrowed(v.scales),
            biases: Cow::Borrowed(v.biases),
        }
    }
}

/// `q` dequantized into `out` (F32 for full-precision roles, else the scale type).
fn dequantized(name: &str, q: &QuantizedView<'_>, out: FloatDtype) -> DenseOut<'static> {
    let mut bytes = vec![0u8; q.rows * q.cols * out.size()];
    let mut row = vec![0f32; q.cols];
    let w = q.cols * out.size();
    for r in 0..q.rows {
        q.dequantize_row(r, &mut row);
        out.write_all(&row, &mut bytes[r * w..(r + 1) * w]);
    }
    DenseOut {
        name: name.to_string(),
        dtype: out.dtype(),
        shape: vec![q.rows, q.cols],
        bits: 0,
        group_size: 0,
        mode: QuantMode::Affine,
        bytes: Cow::Owned(bytes),
    }
}

/// What is stored for one tensor, decided from its kind, role and shape alone (never its
/// values): [`plan_dense`] stores it, [`stored_shapes`] sizes it without reading a weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    /// Stored as it is: the source's bytes, or the floats an FP8 or derived tensor stands for.
    Keep,
    /// Quantized (floats) or requantized (MLX codes) to these parameters.
    Quantize(QuantParams),
    /// The source's MLX codes, copied.
    Codes,
    /// The source's MLX codes, dequantized to their scale type.
    Dequantize,
}

/// The [`Target`] of `t` under `policy`, with the logical shape and the float type of what is
/// stored (the scale type of quantized codes).
fn target(t: &DenseTensor<'_>, policy: DensePolicy) -> (Target, Vec<usize>, Option<FloatDtype>) {
    let full_precision = matches!(t.role, TensorRole::Router { .. } | TensorRole::KeepFull);
    let name = t.name.as_str();
    // A 2-D `.weight` of whole groups that is not kept at full precision is quantized.
    let quantize = |shape: &[usize]| {
        policy
            .params()
            .filter(|p| {
                !full_precision && shape.len() == 2 && p.fits(shape[1]) && name.ends_with(".weight")
            })
            .map_or(Target::Keep, Target::Quantize)
    };
    match t.data {
        TensorData::Other { shape, .. } => (Target::Keep, shape.to_vec(), None),
        TensorData::Fp8(m) => {
            let shape = vec![m.rows, m.cols];
            (quantize(&shape), shape, Some(m.dtype))
        }
        TensorData::Derived(ref d) => {
            let shape = d.shape();
            (quantize(&shape), shape, Some(d.dtype()))
        }
        TensorData::Float { dtype, shape, .. } => (quantize(shape), shape.to_vec(), Some(dtype)),
        TensorData::Quantized(q) => {
            let target = if full_precision || policy.keep_source_codes {
                // The source already quantized it (mlx-lm keeps routers at 8 bits): dequantizing
                // restores no precision and would change the router's arithmetic, so the pack
                // would no longer compute what the source computes. Keep its codes.
                Target::Codes
            } else {
                match policy.params() {
                    None => Target::Dequantize,
                    Some(p) if p == q.params => Target::Codes,
                    Some(p) => Target::Quantize(p),
                }
            };
            (target, vec![q.rows, q.cols], Some(q.scale_dtype))
        }
    }
}

/// One tensor as [`plan_dense`] would store it: name, type, shape, codes and bytes, without
/// its contents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredShape {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Bits per code of U32 packed codes, else 0.
    pub bits: u8,
    /// Group size of packed codes, else 0.
    pub group_size: usize,
    pub mode: QuantMode,
    pub bytes: u64,
}

/// What [`plan_dense`] stores for `t` under `policy`, sized from its kind, role and shape alone:
/// no weight is read (`flashpack plan` sizes a pack from the safetensors headers with it).
/// Sorted by name, as [`plan_dense`]'s outputs are.
pub fn stored_shapes(t: &DenseTensor<'_>, policy: DensePolicy) -> Vec<StoredShape> {
    let (target, shape, float) = target(t, policy);
    let elements: usize = shape.iter().product();
    let kept = |dtype: Dtype| {
        vec![StoredShape {
            name: t.name.clone(),
            dtype,
            bytes: (elements * dtype.size()) as u64,
            shape: shape.clone(),
            bits: 0,
            group_size: 0,
            mode: QuantMode::Affine,
        }]
    };
    let quantized = |p: QuantParams, sd: FloatDtype| {
        quantized_layout(&t.name, shape[0], shape[1], p, sd)
            .into_iter()
            .map(|(name, dtype, shape, bits)| StoredShape {
                bytes: (shape.iter().product::<usize>() * dtype.size()) as u64,
                name,
                dtype,
                shape,
                bits,
                group_size: if bits > 0 { p.group_size } else { 0 },
                mode: if bits > 0 { p.mode } else { QuantMode::Affine },
            })
            .collect()
    };
    match (target, &t.data, float) {
        (Target::Keep, TensorData::Other { dtype, bytes, .. }, _) => {
            let mut out = kept(*dtype);
            out[0].bytes = bytes.len() as u64;
            out
        }
        (Target::Keep | Target::Dequantize, _, Some(f)) => kept(f.dtype()),
        (Target::Codes, TensorData::Quantized(q), _) => quantized(q.params, q.scale_dtype),
        (Target::Quantize(p), _, Some(f)) => quantized(p, f),
        // `target` gives every other kind a float type.
        _ => kept(Dtype::U8),
    }
}

/// What to store for `t` under `policy`. Outputs are sorted by name.
pub fn plan_dense<'a>(
    t: &DenseTensor<'a>,
    policy: DensePolicy,
) -> Result<Vec<DenseOut<'a>>, QuantError> {
    let name = t.name.as_str();
    let (target, _, _) = target(t, policy);
    let size = || QuantError::Invalid {
        what: name.to_string(),
        detail: "size".into(),
    };
    Ok(match (&t.data, target) {
        (
            &TensorData::Other {
                dtype,
                shape,
                bytes,
            },
            _,
        ) => vec![DenseOut::kept(name, dtype, shape, bytes)],
        // FP8 with block scales: the bf16 values it stands for, quantized as a bf16 weight would
        // be, or kept as bf16 (routers, and whatever the policy keeps in floats).
        (&TensorData::Fp8(m), Target::Quantize(p)) => {
            quantized_outs(name, Quantized::owned(quantize(name, m, p, m.dtype)?))
        }
        (&TensorData::Fp8(m), _) => {
            let mut bytes = vec![0u8; m.rows * m.cols * m.dtype.size()];
            let mut row = vec![0f32; m.cols];
            let w = m.cols * m.dtype.size();
            for r in 0..m.rows {
                m.row_f32(r, &mut row);
                m.dtype.write_all(&row, &mut bytes[r * w..(r + 1) * w]);
            }
            vec![DenseOut {
                name: name.to_string(),
                dtype: m.dtype.dtype(),
                shape: vec![m.rows, m.cols],
                bits: 0,
                group_size: 0,
                mode: QuantMode::Affine,
                bytes: Cow::Owned(bytes),
            }]
        }
        // Derived tensors (load/derived.rs): computed now, then as a float tensor.
        (TensorData::Derived(d), target) => {
            let shape = d.shape();
            let bytes = d.bytes();
            let dtype = d.dtype();
            match target {
                Target::Quantize(p) => {
                    let m = MatrixView::new(dtype, shape[0], shape[1], &bytes).ok_or_else(size)?;
                    quantized_outs(name, Quantized::owned(quantize(name, m, p, dtype)?))
                }
                _ => vec![DenseOut {
                    name: name.to_string(),
                    dtype: dtype.dtype(),
                    shape,
                    bits: 0,
                    group_size: 0,
                    mode: QuantMode::Affine,
                    bytes: Cow::Owned(bytes),
                }],
            }
        }
        (
            &TensorData::Float {
                dtype,
                shape,
                bytes,
            },
            target,
        ) => match target {
            Target::Quantize(p) => {
                let m = MatrixView::new(dtype, shape[0], shape[1], bytes).ok_or_else(size)?;
                quantized_outs(name, Quantized::owned(quantize(name, m, p, dtype)?))
            }
            _ => vec![DenseOut::kept(name, dtype.dtype(), shape, bytes)],
        },
        (&TensorData::Quantized(q), Target::Dequantize) => {
            vec![dequantized(name, &q, q.scale_dtype)]
        }
        (&TensorData::Quantized(q), Target::Quantize(p)) => {
            quantized_outs(name, Quantized::owned(requantize(name, q, p)?))
        }
        (&TensorData::Quantized(q), _) => quantized_outs(name, Quantized::borrowed(q)),
    })
}
