//! Quantize stage: MLX affine quantization, bit-exact with `mx.quantize` (mlx 0.32).
//!
//! In: row-major float matrices (bf16/f16/f32) whose last axis is a multiple of the group size.
//! Out: [`QuantizedMatrix`]: u32 words of packed codes, and per-group scales and biases in the
//! input's float type, so that `w ~= scale * q + bias` with `q` in `[0, 2^bits)`.
//! Invariant: for the same input bytes and [`QuantParams`], the output bytes equal what
//! `mx.quantize(w, group_size, bits)` returns on the MLX CPU backend. This is proven against
//! golden files made by `scripts/golden_quantize.py` (tests in `tests.rs`).
//!
//! The rule (read from MLX's `affine_quantize` kernel in
//! `mlx/include/mlx/backend/metal/kernels/quantized.h` and confirmed by experiment against the
//! CPU backend, which differs from that Metal kernel in starting `w_max` at -inf, not 0), per
//! group, all in f32:
//! 1. `scale = max((w_max - w_min) / (2^bits - 1), 1e-7)`;
//! 2. the edge of larger magnitude becomes the bias: if `|w_min| > |w_max|` the edge is `w_min`
//!    and the scale stays positive, else the edge is `w_max` and the scale is negated;
//! 3. `q0 = round_half_even(edge / scale)`; if `q0 != 0` then `scale = edge / q0` and
//!    `bias = edge` (so `bias / scale` is the integer `q0` and zero is representable exactly),
//!    else `bias = 0`;
//! 4. `q = clamp(round_half_even((w - bias) / scale), 0, 2^bits - 1)` with the f32 scale and
//!    bias (the opposite edge may clip); the scale and bias are rounded to the input type
//!    (round to nearest even) only when stored;
//! 5. code k of a word sits at bits `[k * bits, (k + 1) * bits)`, lowest first.

mod dense;
mod expert;

pub use dense::{plan_dense, stored_shapes, DenseOut, DensePolicy, StoredShape};

pub use expert::{
    build_segments, BiasVector, ExpertBiases, ExpertProjections, ExpertQuant, ProjSource,
    QuantizedExpertSegment, SegmentParts, SegmentPlan,
};

use super::tensor::{FloatDtype, MatrixView};
use crate::format::QuantMode;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Bit widths flashpack quantizes to (2 and 4 for experts, 4 and 8 for dense tensors).
pub const SUPPORTED_BITS: [u8; 6] = [2, 3, 4, 5, 6, 8];
/// Group sizes along the input axis.
pub const SUPPORTED_GROUP_SIZES: [usize; 3] = [32, 64, 128];

/// `eps` of MLX's affine quantization: the smallest scale, so constant groups do not divide
/// by zero.
const EPS: f32 = 1e-7;

/// Errors of the quantize stage.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum QuantError {
    #[error("{bits}-bit quantization is not supported; use one of {supported:?}")]
    UnsupportedBits { bits: u8, supported: [u8; 6] },
    #[error("group size {group_size} is not supported; use one of {supported:?}")]
    UnsupportedGroupSize {
        group_size: usize,
        supported: [usize; 3],
    },
    #[error(
        "{what}: {cols} input columns are not a multiple of the group size {group_size}; \
         keep this tensor unquantized or pick a group size that divides {cols}"
    )]
    NotGroupAligned {
        what: String,
        cols: usize,
        group_size: usize,
    },
    #[error("{what}: expected shape {expected:?}, found {found:?}")]
    Shape {
        what: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{what}: {detail}")]
    Invalid { what: String, detail: String },
}

/// Bits per code, values per group, and MLX's quantization mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct QuantParams {
    pub bits: u8,
    pub group_size: usize,
    /// Affine unless a source holds microscaling codes (mxfp4, mxfp8), which flashpack keeps
    /// but never produces.
    #[serde(default)]
    pub mode: QuantMode,
}

impl QuantParams {
    /// Checks that MLX supports this combination and flashpack packs it in whole u32 words.
    pub fn new(bits: u8, group_size: usize) -> Result<QuantParams, QuantError> {
        if !SUPPORTED_BITS.contains(&bits) {
            return Err(QuantError::UnsupportedBits {
                bits,
                supported: SUPPORTED_BITS,
            });
        }
        if !SUPPORTED_GROUP_SIZES.contains(&group_size) {
            return Err(QuantError::UnsupportedGroupSize {
                group_size,
                supported: SUPPORTED_GROUP_SIZES,
            });
        }
        Ok(QuantParams {
            bits,
            group_size,
            mode: QuantMode::Affine,
        })
    }

    /// Parameters of a source's codes in `mode`: affine as [`QuantParams::new`]; mxfp4, mxfp8
    /// and nvfp4 only at their own bits and group size (4 or 8 bits in groups of 32; 4 in 16).
    pub fn with_mode(
        bits: u8,
        group_size: usize,
        mode: QuantMode,
    ) -> Result<QuantParams, QuantError> {
        match mode.fixed() {
            None => QuantParams::new(bits, group_size),
            Some((b, g)) if (b, g as usize) == (bits, group_size) => Ok(QuantParams {
                bits,
                group_size,
                mode,
            }),
            Some((b, g)) => Err(QuantError::Invalid {
                what: format!("{} quantization", mode.name()),
                detail: format!(
                    "{bits} bits in groups of {group_size}; {} is {b} bits in groups of {g}",
                    mode.name()
                ),
            }),
        }
    }

    /// Bytes of one scale (and one bias): the float type's size for affine, 1 for the u8
    /// scales of mxfp4 and mxfp8 (E8M0) and nvfp4 (E4M3).
    pub fn scale_size(self, scale_dtype: FloatDtype) -> usize {
        if self.mode == QuantMode::Affine {
            scale_dtype.size()
        } else {
            1
        }
    }

    /// Whether codes of this mode have biases (only affine).
    pub fn has_biases(self) -> bool {
        self.mode.has_biases()
    }

    /// Whether a row of `cols` values can be quantized (whole groups).
    pub fn fits(self, cols: usize) -> bool {
        cols > 0 && cols % self.group_size == 0
    }

    /// u32 words per row of `cols` values (`cols` must fit: a whole number of groups of at
    /// least 32 values, so `cols * bits` is a multiple of 32 for every supported `bits`).
    pub fn words_per_row(self, cols: usize) -> usize {
        cols * self.bits as usize / 32
    }

    /// Groups (scales, biases) per row of `cols` values.
    pub fn groups_per_row(self, cols: usize) -> usize {
        cols / self.group_size
    }

    fn n_bins(self) -> f32 {
        ((1u32 << self.bits) - 1) as f32
    }
}

/// Scale and bias of one group, in f32, before rounding to the storage type.
#[inline(always)]
pub fn group_scale_bias(w: &[f32], bits: u8) -> (f32, f32) {
    let (w_min, w_max) = min_max(w);
    scale_bias(w_min, w_max, bits)
}

/// Smallest and largest value, with eight running lanes so the loop vectorizes (min and max
/// are exact, so lane order does not matter). NaN inputs give an unspecified group (MLX
/// propagates them instead); every other input gives MLX's result.
#[inline(always)]
fn min_max(w: &[f32]) -> (f32, f32) {
    let mut lo = [f32::INFINITY; 8];
    let mut hi = [f32::NEG_INFINITY; 8];
    let chunks = w.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        let c: &[f32; 8] = c.try_into().unwrap_or(&[0.0; 8]); // always 8: chunks_exact
        for k in 0..8 {
            lo[k] = lo[k].min(c[k]);
            hi[k] = hi[k].max(c[k]);
        }
    }
    for &x in tail {
        lo[0] = lo[0].min(x);
        hi[0] = hi[0].max(x);
    }
    (
        lo.iter().fold(f32::INFINITY, |m, &x| m.min(x)),
        hi.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)),
    )
}

/// [`min_max`] with AVX intrinsics: LLVM does not turn the portable loop into plain
/// `vminps`/`vmaxps` (it keeps NaN fix-ups), and this reduction is a third of the kernel.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn min_max_avx2(w: &[f32]) -> (f32, f32) {
    use std::arch::x86_64::*;
    let chunks = w.chunks_exact(8);
    let tail = chunks.remainder();
    let mut lo = _mm256_set1_ps(f32::INFINITY);
    let mut hi = _mm256_set1_ps(f32::NEG_INFINITY);
    for c in chunks {
        // SAFETY: `c` holds exactly 8 f32 (chunks_exact); loadu has no alignment requirement.
        let v = unsafe { _mm256_loadu_ps(c.as_ptr()) };
        lo = _mm256_min_ps(v, lo);
        hi = _mm256_max_ps(v, hi);
    }
    let (mut l, mut h) = ([0f32; 8], [0f32; 8]);
    // SAFETY: both arrays hold 8 f32; storeu has no alignment requirement.
    unsafe {
        _mm256_storeu_ps(l.as_mut_ptr(), lo);
        _mm256_storeu_ps(h.as_mut_ptr(), hi);
    }
    let mut w_min = l.iter().fold(f32::INFINITY, |m, &x| m.min(x));
    let mut w_max = h.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    for &x in tail {
        w_min = w_min.min(x);
        w_max = w_max.max(x);
    }
    (w_min, w_max)
}

/// MLX's scale and bias from a group's range (see the module docs, steps 1-3).
#[inline(always)]
fn scale_bias(w_min: f32, w_max: f32, bits: u8) -> (f32, f32) {
    let n_bins = ((1u32 << bits) - 1) as f32;
    let scale = ((w_max - w_min) / n_bins).max(EPS);
    // bool side = abs(w_min) > abs(w_max); scale = side ? scale : -scale;
    let side = w_min.abs() > w_max.abs();
    let scale = if side { scale } else { -scale };
    let edge = if side { w_min } else { w_max };
    let q0 = round_half_even(edge / scale);
    if q0 != 0.0 {
        (edge / q0, edge)
    } else {
        (scale, 0.0)
    }
}

/// `x.round_ties_even()` in a form that vectorizes without SSE4.1: adding 2^23 to |x| leaves
/// no fraction bits, so the FPU's round-to-nearest-even does the rounding; values of 2^23 and
/// more are integers already.
#[inline(always)]
fn round_half_even(x: f32) -> f32 {
    const TWO_23: f32 = 8_388_608.0;
    let a = x.abs();
    let r = if a < TWO_23 { (a + TWO_23) - TWO_23 } else { a };
    r.copysign(x)
}

/// Quantizes one row: `codes` holds `words_per_row` little-endian u32 words, `scales`/`biases`
/// `groups_per_row` values of `scale_dtype` each. `row.len()` must fit `p`.
pub fn quantize_row(
    row: &[f32],
    p: QuantParams,
    scale_dtype: FloatDtype,
    codes: &mut [u8],
    scales: &mut [u8],
    biases: &mut [u8],
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked above); the function is otherwise safe.
        return unsafe { quantize_row_avx2(row, p, scale_dtype, codes, scales, biases) };
    }
    quantize_row_generic(row, p, scale_dtype, codes, scales, biases)
}

/// The same code compiled for AVX2: 8-wide division and rounding. No FMA is enabled, and Rust
/// never contracts `a * b + c` on its own, so results are identical to the generic path.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_row_avx2(
    row: &[f32],
    p: QuantParams,
    scale_dtype: FloatDtype,
    codes: &mut [u8],
    scales: &mut [u8],
    biases: &mut [u8],
) {
    // With AVX (and so SSE4.1) enabled, round_ties_even is one vroundps.
    quantize_row_with(
        row,
        p,
        scale_dtype,
        codes,
        scales,
        biases,
        |w| min_max_avx2(w),
        |x| x.round_ties_even(),
    )
}

fn quantize_row_generic(
    row: &[f32],
    p: QuantParams,
    scale_dtype: FloatDtype,
    codes: &mut [u8],
    scales: &mut [u8],
    biases: &mut [u8],
) {
    quantize_row_with(
        row,
        p,
        scale_dtype,
        codes,
        scales,
        biases,
        min_max,
        round_half_even,
    )
}

// The two closures pick the instruction-set-specific pieces; the rest is `quantize_row`'s list.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn quantize_row_with(
    row: &[f32],
    p: QuantParams,
    scale_dtype: FloatDtype,
    codes: &mut [u8],
    scales: &mut [u8],
    biases: &mut [u8],
    min_max: impl Fn(&[f32]) -> (f32, f32),
    round: impl Fn(f32) -> f32,
) {
    // Groups are handled in blocks: first every group's range and scale/bias (independent
    // scalar chains of divisions that the CPU overlaps, rather than one chain per group that
    // stalls the value loop behind it), then the values.
    const BLOCK: usize = 64;
    let g = p.group_size;
    let ss = scale_dtype.size();
    let n_bins = p.n_bins();
    let group_bytes = g * p.bits as usize / 8;
    let mut q = [0u8; 128];
    let mut sb = [(0f32, 0f32); BLOCK];
    for (bi, block) in row.chunks(g * BLOCK).enumerate() {
        let g0 = bi * BLOCK;
        let n = block.len() / g;
        for (gi, group) in block.chunks_exact(g).enumerate() {
            let (w_min, w_max) = min_max(group);
            sb[gi] = scale_bias(w_min, w_max, p.bits);
        }
        for (gi, &(scale, bias)) in sb[..n].iter().enumerate() {
            let at = (g0 + gi) * ss;
            scale_dtype.write(scale, &mut scales[at..at + ss]);
            scale_dtype.write(bias, &mut biases[at..at + ss]);
        }
        for (gi, group) in block.chunks_exact(g).enumerate() {
            let (scale, bias) = sb[gi];
            for (qi, &x) in q.iter_mut().zip(group) {
                // A true division, not a multiply by 1/scale: the reciprocal rounds differently.
                let v = round((x - bias) / scale);
                let v = if v > 0.0 { v } else { 0.0 };
                let v = if v < n_bins { v } else { n_bins };
                // SAFETY: v is finite and in [0, n_bins] <= 255 (the comparisons above map NaN
                // to 0), so the conversion is exact; unlike `as`, it needs no saturation and
                // vectorizes.
                *qi = unsafe { v.to_int_unchecked::<i32>() } as u8;
            }
            // Codes fill u32 words from the lowest bits up and the words are little-endian, so
            // byte m of the output holds codes m * 8 / bits onwards, lowest first: packing by
            // bytes is the same layout and lets the compiler vectorize it.
            let at = (g0 + gi) * group_bytes;
            let out = &mut codes[at..at + group_bytes];
            let q = &q[..g];
            match p.bits {
                8 => out.copy_from_slice(q),
                4 => {
                    for (o, c) in out.iter_mut().zip(q.chunks_exact(2)) {
                        *o = c[0] | c[1] << 4;
                    }
                }
                2 => {
                    for (o, c) in out.iter_mut().zip(q.chunks_exact(4)) {
                        *o = c[0] | c[1] << 2 | c[2] << 4 | c[3] << 6;
                    }
                }
                // 3, 5 and 6 bits: MLX's packing is the same little-endian bit stream (code j
                // at bits j * bits ..), with codes straddling bytes.
                _ => pack_bits(q, p.bits, out),
            }
        }
    }
}

/// Packs `codes` (each below `2^bits`) into `out` as a little-endian bit stream: code `j` at bits
/// `j * bits .. (j + 1) * bits`. `out` holds exactly `codes.len() * bits / 8` bytes.
fn pack_bits(codes: &[u8], bits: u8, out: &mut [u8]) {
    let mut acc = 0u64;
    let mut n = 0u32;
    let mut at = 0;
    for &c in codes {
        acc |= (c as u64) << n;
        n += bits as u32;
        while n >= 8 {
            out[at] = acc as u8;
            at += 1;
            acc >>= 8;
            n -= 8;
        }
    }
    if n > 0 && at < out.len() {
        out[at] = acc as u8;
    }
}

/// Code `j` of a row packed as [`pack_bits`] does.
fn unpack_code(row: &[u8], bits: u8, j: usize) -> u32 {
    let bit = j * bits as usize;
    let (byte, shift) = (bit / 8, bit % 8);
    let mut w = [0u8; 4];
    let end = (byte + 4).min(row.len());
    w[..end - byte].copy_from_slice(&row[byte..end]);
    (u32::from_le_bytes(w) >> shift) & ((1u32 << bits) - 1)
}

/// An MLX-quantized matrix `[rows, cols]`: `codes` are `rows * cols * bits / 32` little-endian
/// u32 words, `scales` and `biases` `rows * cols / group_size` values of `scale_dtype`, all
/// row-major (exactly MLX's `(w_q, scales, biases)`). In mxfp4/mxfp8 mode the scales are u8
/// (E8M0) whatever `scale_dtype` says (then the model's float type), and `biases` is empty.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuantizedMatrix {
    pub rows: usize,
    pub cols: usize,
    pub params: QuantParams,
    pub scale_dtype: FloatDtype,
    pub codes: Vec<u8>,
    pub scales: Vec<u8>,
    pub biases: Vec<u8>,
}

/// A borrowed quantized matrix (from a [`QuantizedMatrix`] or an MLX-quantized checkpoint).
#[derive(Clone, Copy, Debug)]
pub struct QuantizedView<'a> {
    pub rows: usize,
    pub cols: usize,
    pub params: QuantParams,
    pub scale_dtype: FloatDtype,
    pub codes: &'a [u8],
    pub scales: &'a [u8],
    pub biases: &'a [u8],
}

impl<'a> QuantizedView<'a> {
    /// Checks that the three buffers have the sizes `rows`, `cols` and `params` imply.
    pub fn checked(self, what: &str) -> Result<QuantizedView<'a>, QuantError> {
        let QuantizedView {
            rows,
            cols,
            params,
            scale_dtype,
            codes,
            scales,
            biases,
        } = self;
        if !params.fits(cols) {
            return Err(QuantError::NotGroupAligned {
                what: what.to_string(),
                cols,
                group_size: params.group_size,
            });
        }
        let words = rows * params.words_per_row(cols);
        let groups = rows * params.groups_per_row(cols);
        let ss = params.scale_size(scale_dtype);
        let want = [
            words * 4,
            groups * ss,
            if params.has_biases() { groups * ss } else { 0 },
        ];
        let got = [codes.len(), scales.len(), biases.len()];
        if want != got {
            return Err(QuantError::Invalid {
                what: what.to_string(),
                detail: format!(
                    "codes/scales/biases hold {got:?} bytes; [{rows}, {cols}] at {} bits, \
                     group {} needs {want:?}",
                    params.bits, params.group_size
                ),
            });
        }
        Ok(QuantizedView {
            rows,
            cols,
            params,
            scale_dtype,
            codes,
            scales,
            biases,
        })
    }

    /// Row `r` back to f32: `scale * q + bias` (for requantizing; not bit-exact with
    /// `mx.dequantize`, which computes in the scale type). mxfp4 and mxfp8 codes are exact:
    /// the code's float value times the group's power of two; nvfp4 the E2M1 value times the
    /// group's E4M3 scale.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let p = self.params;
        let wpr = p.words_per_row(self.cols);
        let gpr = p.groups_per_row(self.cols);
        let row = &self.codes[r * wpr * 4..(r + 1) * wpr * 4];
        if p.mode != QuantMode::Affine {
            for (j, o) in out.iter_mut().enumerate().take(self.cols) {
                let s = self.scales[r * gpr + j / p.group_size];
                let scale = match p.mode {
                    QuantMode::Nvfp4 => super::tensor::e4m3_to_f32(s),
                    _ => e8m0(s),
                };
                let code = unpack_code(row, p.bits, j) as u8;
                let v = match p.mode {
                    QuantMode::Mxfp4 | QuantMode::Nvfp4 => e2m1(code),
                    _ => super::tensor::e4m3_to_f32(code),
                };
                *o = v * scale;
            }
            return;
        }
        let ss = self.scale_dtype.size();
        for (j, o) in out.iter_mut().enumerate().take(self.cols) {
            let gi = r * gpr + j / p.group_size;
            let s = self.scale_dtype.read(&self.scales[gi * ss..(gi + 1) * ss]);
            let b = self.scale_dtype.read(&self.biases[gi * ss..(gi + 1) * ss]);
            *o = s * unpack_code(row, p.bits, j) as f32 + b;
        }
    }
}

/// An E8M0 scale: `2^(e - 127)`; 255 is NaN.
fn e8m0(e: u8) -> f32 {
    if e == 255 {
        f32::NAN
    } else {
        (e as f32 - 127.0).exp2()
    }
}

/// An FP4 E2M1 code (sign, 2 exponent bits, 1 mantissa bit): 0, 0.5, 1, 1.5, 2, 3, 4, 6.
fn e2m1(code: u8) -> f32 {
    const V: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];
    let v = V[(code & 7) as usize];
    if code & 8 != 0 {
        -v
    } else {
        v
    }
}

impl QuantizedMatrix {
    /// Borrows this matrix.
    pub fn view(&self) -> QuantizedView<'_> {
        QuantizedView {
            rows: self.rows,
            cols: self.cols,
            params: self.params,
            scale_dtype: self.scale_dtype,
            codes: &self.codes,
            scales: &self.scales,
            biases: &self.biases,
        }
    }

    /// Bytes of codes, scales and biases together.
    pub fn byte_len(&self) -> usize {
        self.codes.len() + self.scales.len() + self.biases.len()
    }
}

/// Rows quantized per rayon task: enough work to amortise scheduling, small enough to split
/// an expert's few hundred rows over the cores.
const ROWS_PER_TASK: usize = 32;

/// Quantizes `m` with `p`, storing scales and biases in `scale_dtype` (MLX uses the input
/// type). Rows are spread over rayon's pool; output is identical whatever the thread count.
pub fn quantize(
    what: &str,
    m: MatrixView<'_>,
    p: QuantParams,
    scale_dtype: FloatDtype,
) -> Result<QuantizedMatrix, QuantError> {
    let words = m.rows * p.words_per_row(m.cols);
    let groups = m.rows * p.groups_per_row(m.cols) * scale_dtype.size();
    let mut codes = vec![0u8; words * 4];
    let mut scales = vec![0u8; groups];
    let mut biases = vec![0u8; groups];
    quantize_into(
        what,
        m,
        p,
        scale_dtype,
        &mut codes,
        &mut scales,
        &mut biases,
    )?;
    Ok(QuantizedMatrix {
        rows: m.rows,
        cols: m.cols,
        params: p,
        scale_dtype,
        codes,
        scales,
        biases,
    })
}

/// A compressed-tensors packed integer matrix (`tensor::PackedIntGroups`) asked for at its own
/// bits and group size is MLX's affine layout already, so its codes are copied, not quantized
/// again: both store the codes of a row `32 / bits` to a little-endian 32-bit word, the first in
/// the lowest bits, as `q + 2^(bits-1)`; MLX's `w = scale * u + bias` with `bias =
/// -2^(bits-1) * scale` is `(u - 2^(bits-1)) * scale`, the value the codes stand for (computed
/// exactly in f32, where compressed-tensors rounds it to the scales' type). So the scales are
/// copied and the biases are the scales times `-2^(bits-1)`, exact in any float type (a power of
/// two) unless it overflows, which falls back to quantizing. Returns whether it copied; the
/// buffers have been checked to be the sizes `quantize_into` needs.
fn copy_packed_codes(
    m: MatrixView<'_>,
    p: QuantParams,
    scale_dtype: FloatDtype,
    codes: &mut [u8],
    scales: &mut [u8],
    biases: &mut [u8],
) -> bool {
    let Some(g) = m.packed_int_groups() else {
        return false;
    };
    // Rows without padding words: MLX's words per row are the packed ones.
    if g.bits != p.bits as usize
        || g.group_size != p.group_size
        || g.scale_dtype != scale_dtype
        || m.cols % g.per_word() != 0
        || codes.len() != m.bytes().len()
        || scales.len() != g.scales.len()
    {
        return false;
    }
    let ss = scale_dtype.size();
    let offset = -((1i32 << (g.bits - 1)) as f32);
    for (b, s) in biases.chunks_exact_mut(ss).zip(g.scales.chunks_exact(ss)) {
        let bias = offset * scale_dtype.read(s);
        if !bias.is_finite() {
            return false;
        }
        scale_dtype.write(bias, b);
        if scale_dtype.read(b) != bias {
            return false;
        }
    }
    codes.copy_from_slice(m.bytes());
    scales.copy_from_slice(g.scales);
    true
}

/// [`quantize`] into caller-provided buffers of exactly the right sizes (codes
/// `rows * cols * bits / 8` bytes, scales and biases `rows * cols / group_size` values), so a
/// segment can be assembled without copying.
pub fn quantize_into(
    what: &str,
    m: MatrixView<'_>,
    p: QuantParams,
    scale_dtype: FloatDtype,
    codes: &mut [u8],
    scales: &mut [u8],
    biases: &mut [u8],
) -> Result<(), QuantError> {
    // The fields are public: re-check what `QuantParams::new` guarantees (bits 2, 4 or 8).
    QuantParams::new(p.bits, p.group_size)?;
    if p.mode != QuantMode::Affine {
        return Err(QuantError::Invalid {
            what: what.to_string(),
            detail: format!(
                "flashpack quantizes to affine codes only; {} codes are kept from a source",
                p.mode.name()
            ),
        });
    }
    if !p.fits(m.cols) {
        return Err(QuantError::NotGroupAligned {
            what: what.to_string(),
            cols: m.cols,
            group_size: p.group_size,
        });
    }
    let wpr = p.words_per_row(m.cols) * 4;
    let sbytes = p.groups_per_row(m.cols) * scale_dtype.size();
    let want = [m.rows * wpr, m.rows * sbytes, m.rows * sbytes];
    if [codes.len(), scales.len(), biases.len()] != want {
        return Err(QuantError::Invalid {
            what: what.to_string(),
            detail: format!(
                "output buffers of {:?} bytes; [{}, {}] needs {want:?}",
                [codes.len(), scales.len(), biases.len()],
                m.rows,
                m.cols
            ),
        });
    }
    if copy_packed_codes(m, p, scale_dtype, codes, scales, biases) {
        return Ok(());
    }
    codes
        .par_chunks_mut(wpr * ROWS_PER_TASK)
        .zip(scales.par_chunks_mut(sbytes * ROWS_PER_TASK))
        .zip(biases.par_chunks_mut(sbytes * ROWS_PER_TASK))
        .enumerate()
        .for_each(|(t, ((c, s), b))| {
            let mut row = vec![0f32; m.cols];
            let r0 = t * ROWS_PER_TASK;
            for i in 0..c.len() / wpr {
                m.row_f32(r0 + i, &mut row);
                quantize_row(
                    &row,
                    p,
                    scale_dtype,
                    &mut c[i * wpr..(i + 1) * wpr],
                    &mut s[i * sbytes..(i + 1) * sbytes],
                    &mut b[i * sbytes..(i + 1) * sbytes],
                );
            }
        });
    Ok(())
}

/// Dequantizes `q` and quantizes again with `p` (an MLX-quantized input asked for other bits
/// or group size). The intermediate is f32 and the scale type is kept.
pub fn requantize(
    what: &str,
    q: QuantizedView<'_>,
    p: QuantParams,
) -> Result<QuantizedMatrix, QuantError> {
    let mut dense = vec![0u8; q.rows * q.cols * 4];
    let mut row = vec![0f32; q.cols];
    for r in 0..q.rows {
        q.dequantize_row(r, &mut row);
        FloatDtype::F32.write_all(&row, &mut dense[r * q.cols * 4..(r + 1) * q.cols * 4]);
    }
    let view = MatrixView::new(FloatDtype::F32, q.rows, q.cols, &dense).ok_or_else(|| {
        QuantError::Invalid {
            what: what.to_string(),
            detail: "dequantized size".into(),
        }
    })?;
    quantize(what, view, p, q.scale_dtype)
}

#[cfg(test)]
mod tests;
