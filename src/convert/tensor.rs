//! Tensor element types and borrowed views shared by the convert stages.
//!
//! In: bytes of a safetensors tensor (little-endian, row-major) with its dtype and shape.
//! Out: typed views that can hand out rows as `f32` without copying the whole tensor.
//! Invariant: a [`MatrixView`] always has `data.len() == rows * cols * dtype.size()`; the
//! constructor checks it, so row accessors never go out of bounds.

use serde::{Deserialize, Serialize};

/// Element types of safetensors files (the `dtype` strings of its header).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Dtype {
    Bool,
    U8,
    I8,
    F8E4M3,
    F8E5M2,
    /// OCP MX E8M0: a power-of-two scale, `2^(code - 127)` (255 is NaN).
    F8E8M0,
    I16,
    U16,
    F16,
    Bf16,
    I32,
    U32,
    F32,
    F64,
    I64,
    U64,
}

impl Dtype {
    /// Parses a safetensors dtype string (`"BF16"`).
    pub fn from_safetensors(s: &str) -> Option<Dtype> {
        Some(match s {
            "BOOL" => Dtype::Bool,
            "U8" => Dtype::U8,
            "I8" => Dtype::I8,
            "F8_E4M3" => Dtype::F8E4M3,
            "F8_E5M2" => Dtype::F8E5M2,
            "F8_E8M0" => Dtype::F8E8M0,
            "I16" => Dtype::I16,
            "U16" => Dtype::U16,
            "F16" => Dtype::F16,
            "BF16" => Dtype::Bf16,
            "I32" => Dtype::I32,
            "U32" => Dtype::U32,
            "F32" => Dtype::F32,
            "F64" => Dtype::F64,
            "I64" => Dtype::I64,
            "U64" => Dtype::U64,
            _ => return None,
        })
    }

    /// The safetensors dtype string.
    pub fn safetensors_name(self) -> &'static str {
        match self {
            Dtype::Bool => "BOOL",
            Dtype::U8 => "U8",
            Dtype::I8 => "I8",
            Dtype::F8E4M3 => "F8_E4M3",
            Dtype::F8E5M2 => "F8_E5M2",
            Dtype::F8E8M0 => "F8_E8M0",
            Dtype::I16 => "I16",
            Dtype::U16 => "U16",
            Dtype::F16 => "F16",
            Dtype::Bf16 => "BF16",
            Dtype::I32 => "I32",
            Dtype::U32 => "U32",
            Dtype::F32 => "F32",
            Dtype::F64 => "F64",
            Dtype::I64 => "I64",
            Dtype::U64 => "U64",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::Bool | Dtype::U8 | Dtype::I8 | Dtype::F8E4M3 | Dtype::F8E5M2 | Dtype::F8E8M0 => {
                1
            }
            Dtype::I16 | Dtype::U16 | Dtype::F16 | Dtype::Bf16 => 2,
            Dtype::I32 | Dtype::U32 | Dtype::F32 => 4,
            Dtype::F64 | Dtype::I64 | Dtype::U64 => 8,
        }
    }

    /// The float type this is, if it is one flashpack can quantize from or store scales in.
    pub fn float(self) -> Option<FloatDtype> {
        match self {
            Dtype::F32 => Some(FloatDtype::F32),
            Dtype::F16 => Some(FloatDtype::F16),
            Dtype::Bf16 => Some(FloatDtype::Bf16),
            _ => None,
        }
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.safetensors_name())
    }
}

/// Float types that weights come in and that scales/biases are stored in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FloatDtype {
    F32,
    F16,
    Bf16,
}

impl FloatDtype {
    pub fn size(self) -> usize {
        match self {
            FloatDtype::F32 => 4,
            FloatDtype::F16 | FloatDtype::Bf16 => 2,
        }
    }

    pub fn dtype(self) -> Dtype {
        match self {
            FloatDtype::F32 => Dtype::F32,
            FloatDtype::F16 => Dtype::F16,
            FloatDtype::Bf16 => Dtype::Bf16,
        }
    }

    /// Rounds `x` to this type (round to nearest even, as `astype` does) and writes its
    /// little-endian bytes to `out` (`out.len() == self.size()`).
    #[inline]
    pub fn write(self, x: f32, out: &mut [u8]) {
        match self {
            FloatDtype::F32 => out.copy_from_slice(&x.to_le_bytes()),
            FloatDtype::F16 => out.copy_from_slice(&half::f16::from_f32(x).to_le_bytes()),
            FloatDtype::Bf16 => out.copy_from_slice(&half::bf16::from_f32(x).to_le_bytes()),
        }
    }

    /// Reads one little-endian value (`b.len() == self.size()`).
    #[inline]
    pub fn read(self, b: &[u8]) -> f32 {
        match self {
            FloatDtype::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            FloatDtype::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
            FloatDtype::Bf16 => half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        }
    }

    /// Decodes a run of little-endian values into `out` (`src.len() == out.len() * size`).
    #[inline]
    pub fn read_into(self, src: &[u8], out: &mut [f32]) {
        match self {
            FloatDtype::F32 => {
                for (o, c) in out.iter_mut().zip(src.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            FloatDtype::F16 => {
                for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                    *o = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
            FloatDtype::Bf16 => {
                // bf16 is the top half of an f32: widening is a shift, exact.
                for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                    *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
                }
            }
        }
    }

    /// The index of the first NaN or infinity among the little-endian values of `src`, and
    /// that value. One pass over the bits (an all-ones exponent), with no conversion, so it
    /// costs a read of the bytes and nothing per value that is finite.
    pub fn first_non_finite(self, src: &[u8]) -> Option<(usize, f32)> {
        fn scan<const N: usize>(src: &[u8], bad: impl Fn([u8; N]) -> bool) -> Option<usize> {
            let bad = |c: &[u8]| bad(c.try_into().expect("N bytes"));
            let src = &src[..src.len() / N * N];
            // Blocks of 256 values without an early exit inside, which the compiler vectorizes;
            // the block with a bad value is searched again for its position.
            for (k, block) in src.chunks(256 * N).enumerate() {
                if block.chunks_exact(N).fold(false, |acc, c| acc | bad(c)) {
                    let at = block.chunks_exact(N).position(bad).expect("found above");
                    return Some(k * 256 + at);
                }
            }
            None
        }
        let i = match self {
            FloatDtype::F32 => {
                scan::<4>(src, |b| u32::from_le_bytes(b) & 0x7F80_0000 == 0x7F80_0000)
            }
            FloatDtype::F16 => scan::<2>(src, |b| u16::from_le_bytes(b) & 0x7C00 == 0x7C00),
            FloatDtype::Bf16 => scan::<2>(src, |b| u16::from_le_bytes(b) & 0x7F80 == 0x7F80),
        }?;
        let n = self.size();
        Some((i, self.read(&src[i * n..(i + 1) * n])))
    }

    /// Encodes `src` into little-endian bytes of this type.
    pub fn write_all(self, src: &[f32], out: &mut [u8]) {
        for (x, o) in src.iter().zip(out.chunks_exact_mut(self.size())) {
            self.write(*x, o);
        }
    }
}

/// An FP8 E4M3 ("fn": no infinities, S.1111.111 is NaN) value.
pub fn e4m3_to_f32(code: u8) -> f32 {
    let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
    let (e, m) = ((code >> 3) & 15, code & 7);
    if e == 15 && m == 7 {
        return f32::NAN;
    }
    let v = if e == 0 {
        m as f32 / 8.0 * (-6f32).exp2()
    } else {
        (1.0 + m as f32 / 8.0) * (e as f32 - 7.0).exp2()
    };
    sign * v
}

/// An FP4 E2M1 value (1 sign, 2 exponent, 1 mantissa bit): 0, 0.5, 1, 1.5, 2, 3, 4, 6 and
/// their negatives (OCP MX's element type; DeepSeek's `FP4_TABLE`).
pub fn e2m1_to_f32(code: u8) -> f32 {
    const MAGNITUDE: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];
    let v = MAGNITUDE[(code & 7) as usize];
    if code & 8 != 0 {
        -v
    } else {
        v
    }
}

/// An E8M0 scale: `2^(code - 127)`, 255 NaN (OCP MX's scale type, DeepSeek's `ue8m0`).
pub fn e8m0_to_f32(code: u8) -> f32 {
    if code == 255 {
        f32::NAN
    } else {
        // 2^-127 is below f32's normals: built from its bits (exact, as a subnormal).
        f32::from_bits(if code == 0 {
            1 << 22
        } else {
            (code as u32) << 23
        })
    }
}

/// How the scales of block-scaled codes are stored: floats that are the scale (DeepSeek-V3's
/// and Qwen3 FP8's `weight_scale_inv`), or E8M0 exponents (DeepSeek's own `ue8m0` `.scale`,
/// as `F8_E8M0` or `U8`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockScale {
    Float(FloatDtype),
    E8m0,
}

impl BlockScale {
    /// Bytes per scale.
    pub fn size(self) -> usize {
        match self {
            BlockScale::Float(d) => d.size(),
            BlockScale::E8m0 => 1,
        }
    }

    /// Scale `k` of `scales`.
    #[inline]
    fn read(self, scales: &[u8], k: usize) -> f32 {
        match self {
            BlockScale::Float(d) => d.read(&scales[k * d.size()..(k + 1) * d.size()]),
            BlockScale::E8m0 => e8m0_to_f32(scales[k]),
        }
    }

    /// The index of the first NaN or infinite scale, and its value.
    fn first_non_finite(self, scales: &[u8]) -> Option<(usize, f32)> {
        match self {
            BlockScale::Float(d) => d.first_non_finite(scales),
            BlockScale::E8m0 => scales.iter().position(|&c| c == 255).map(|k| (k, f32::NAN)),
        }
    }
}

/// The element codes of block-scaled weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockCodes {
    /// FP8 E4M3, one byte each.
    E4m3,
    /// FP4 E2M1, two to a byte, the first in the low nibble (DeepSeek's `float4_e2m1fn_x2`,
    /// and MLX's mxfp4 words read as bytes).
    E2m1,
}

impl BlockCodes {
    /// Bytes of a row of `cols` codes.
    pub fn row_bytes(self, cols: usize) -> usize {
        match self {
            BlockCodes::E4m3 => cols,
            BlockCodes::E2m1 => cols.div_ceil(2),
        }
    }
}

/// Block scales of FP8 or FP4 codes, as DeepSeek-V3 and Qwen3 FP8 checkpoints ship them
/// (`quantization_config.quant_method = "fp8"`: `W.weight` E4M3 codes, `W.weight_scale_inv` one
/// float per `block_rows x block_cols` block, the last blocks partial) and as DeepSeek's own
/// releases (V4.1) do (`W.weight` E4M3 or packed E2M1, `W.scale` E8M0 exponents, per block of
/// the config's `weight_block_size`, or per 32 columns of a row for FP4 experts), so
/// `w[r, c] = code[r, c] * scale[r / block_rows, c / block_cols]`.
#[derive(Clone, Copy, Debug)]
pub struct Fp8Blocks<'a> {
    pub scales: &'a [u8],
    pub scale: BlockScale,
    pub codes: BlockCodes,
    pub block_rows: usize,
    pub block_cols: usize,
}

/// Group scales of a compressed-tensors `pack-quantized` weight, as Kimi K2 Thinking and K2.5
/// ship their experts (`quantization_config.quant_method = "compressed-tensors"`, `format =
/// "pack-quantized"`, symmetric integer groups): `W.weight_packed` holds `bits`-bit codes,
/// `32 / bits` to an int32 word, the first in the lowest bits (compressed-tensors
/// `pack_to_int32`: `packed |= value[:, i::pack_factor] << num_bits * i`), each stored as
/// `q + 2^(bits-1)` so that it is unsigned, a row's last word padded with zeros; `W.weight_scale`
/// holds one float per `group_size` columns of a row. So `w[r, c] = (u[r, c] - 2^(bits-1)) *
/// scale[r, c / group_size]` (`unpack_from_int32`, then `dequantize`: `x_q * scale`).
#[derive(Clone, Copy, Debug)]
pub struct PackedIntGroups<'a> {
    pub scales: &'a [u8],
    pub scale_dtype: FloatDtype,
    pub bits: usize,
    pub group_size: usize,
}

impl PackedIntGroups<'_> {
    /// Codes per int32 word.
    pub fn per_word(&self) -> usize {
        32 / self.bits
    }
}

/// How the stored elements stand for the matrix's float values.
#[derive(Clone, Copy, Debug)]
enum Coded<'a> {
    /// Floats of the matrix's `dtype`.
    Plain,
    Fp8(Fp8Blocks<'a>),
    PackedInt(PackedIntGroups<'a>),
    /// Floats of `dtype` at element strides (row, column): a transposed or interleaved part of
    /// a larger tensor (transformers' gpt-oss experts).
    Strided(usize, usize),
}

/// A float matrix borrowed from a file or buffer: row-major floats of `dtype`, codes with scales
/// that stand for `dtype` values (FP8 with block scales, packed integers with group scales), or
/// floats at any element strides.
#[derive(Clone, Copy, Debug)]
pub struct MatrixView<'a> {
    pub dtype: FloatDtype,
    pub rows: usize,
    pub cols: usize,
    data: &'a [u8],
    coded: Coded<'a>,
}

impl<'a> MatrixView<'a> {
    /// Wraps `data`, which must hold exactly `rows * cols` values of `dtype`.
    pub fn new(dtype: FloatDtype, rows: usize, cols: usize, data: &'a [u8]) -> Option<Self> {
        let want = rows.checked_mul(cols)?.checked_mul(dtype.size())?;
        (data.len() == want).then_some(MatrixView {
            dtype,
            rows,
            cols,
            data,
            coded: Coded::Plain,
        })
    }

    /// Element `(r, c)` is the value at element `r * row_stride + c * col_stride` of `data`
    /// (floats of `dtype`), which must reach the last element and may hold more (the values of
    /// other views of the same tensor). `None` when it does not reach.
    pub fn strided(
        dtype: FloatDtype,
        rows: usize,
        cols: usize,
        data: &'a [u8],
        row_stride: usize,
        col_stride: usize,
    ) -> Option<Self> {
        let last = if rows == 0 || cols == 0 {
            0
        } else {
            (rows - 1)
                .checked_mul(row_stride)?
                .checked_add((cols - 1).checked_mul(col_stride)?)?
                .checked_add(1)?
        };
        (data.len() >= last.checked_mul(dtype.size())?).then_some(MatrixView {
            dtype,
            rows,
            cols,
            data,
            coded: Coded::Strided(row_stride, col_stride),
        })
    }

    /// FP8 (or FP4) codes `data` (`rows` rows of [`BlockCodes::row_bytes`]) with their block
    /// scales; the values it gives are `code * scale` computed in f32 and rounded to bf16, as
    /// DeepSeek's own dequantization (`weight_dequant`, then `.to(bfloat16)`) gives them (exact
    /// for E8M0 scales: a power of two times a code fits bf16). `None` when the sizes disagree.
    pub fn fp8(rows: usize, cols: usize, data: &'a [u8], blocks: Fp8Blocks<'a>) -> Option<Self> {
        let (br, bc) = (blocks.block_rows, blocks.block_cols);
        if br == 0 || bc == 0 || data.len() != rows.checked_mul(blocks.codes.row_bytes(cols))? {
            return None;
        }
        let want = rows.div_ceil(br) * cols.div_ceil(bc) * blocks.scale.size();
        (blocks.scales.len() == want).then_some(MatrixView {
            dtype: FloatDtype::Bf16,
            rows,
            cols,
            data,
            coded: Coded::Fp8(blocks),
        })
    }

    /// Packed integer codes `data` (`rows` rows of `cols.div_ceil(32 / bits)` little-endian
    /// int32 words) with their group scales ([`PackedIntGroups`]); the values it gives are
    /// `(u - 2^(bits-1)) * scale` rounded to the scales' type, as compressed-tensors'
    /// `dequantize` computes them in that type. `None` when the sizes disagree or `bits` does not
    /// divide 32.
    pub fn packed_int(
        rows: usize,
        cols: usize,
        data: &'a [u8],
        groups: PackedIntGroups<'a>,
    ) -> Option<Self> {
        if !matches!(groups.bits, 1 | 2 | 4 | 8) || groups.group_size == 0 {
            return None;
        }
        let words = rows.checked_mul(cols.div_ceil(groups.per_word()))?;
        let scales = rows.checked_mul(cols.div_ceil(groups.group_size))?;
        (data.len() == words.checked_mul(4)?
            && groups.scales.len() == scales.checked_mul(groups.scale_dtype.size())?)
        .then_some(MatrixView {
            dtype: groups.scale_dtype,
            rows,
            cols,
            data,
            coded: Coded::PackedInt(groups),
        })
    }

    /// The block scales, for an FP8 matrix.
    pub fn fp8_blocks(&self) -> Option<Fp8Blocks<'a>> {
        match self.coded {
            Coded::Fp8(b) => Some(b),
            _ => None,
        }
    }

    /// The group scales and layout, for a packed integer matrix.
    pub fn packed_int_groups(&self) -> Option<PackedIntGroups<'a>> {
        match self.coded {
            Coded::PackedInt(g) => Some(g),
            _ => None,
        }
    }

    /// The scales that travel with the codes (FP8 blocks, integer groups), if any: source bytes
    /// read with [`MatrixView::bytes`].
    pub fn scale_bytes(&self) -> Option<&'a [u8]> {
        match self.coded {
            Coded::Plain | Coded::Strided(..) => None,
            Coded::Fp8(b) => Some(b.scales),
            Coded::PackedInt(g) => Some(g.scales),
        }
    }

    /// The first NaN or infinity among the values, as (row, column, value). For FP8, a NaN code
    /// or a non-finite block scale; for packed integers, a non-finite group scale.
    pub fn first_non_finite(&self) -> Option<(usize, usize, f32)> {
        match self.coded {
            Coded::Plain => {
                let (i, v) = self.dtype.first_non_finite(self.data)?;
                Some((i / self.cols.max(1), i % self.cols.max(1), v))
            }
            Coded::Fp8(b) => {
                // E2M1 has no NaN; E4M3's is S.1111.111.
                if b.codes == BlockCodes::E4m3 {
                    if let Some(i) = self.data.iter().position(|&c| c & 0x7f == 0x7f) {
                        return Some((i / self.cols, i % self.cols, f32::NAN));
                    }
                }
                let (k, v) = b.scale.first_non_finite(b.scales)?;
                let per_row = self.cols.div_ceil(b.block_cols);
                Some((
                    (k / per_row) * b.block_rows,
                    (k % per_row) * b.block_cols,
                    v,
                ))
            }
            Coded::PackedInt(g) => {
                let (k, v) = g.scale_dtype.first_non_finite(g.scales)?;
                let per_row = self.cols.div_ceil(g.group_size);
                Some((k / per_row, (k % per_row) * g.group_size, v))
            }
            Coded::Strided(..) => {
                let mut row = vec![0f32; self.cols];
                (0..self.rows).find_map(|r| {
                    self.row_f32(r, &mut row);
                    let c = row.iter().position(|x| !x.is_finite())?;
                    Some((r, c, row[c]))
                })
            }
        }
    }

    /// The raw little-endian bytes (of a strided view: the span its elements lie in).
    pub fn bytes(&self) -> &'a [u8] {
        self.data
    }

    /// Bytes of one stored row (a strided view's rows are not stored apart; it never asks).
    fn row_width(&self) -> usize {
        match self.coded {
            Coded::Plain | Coded::Strided(..) => self.cols * self.dtype.size(),
            Coded::Fp8(b) => b.codes.row_bytes(self.cols),
            Coded::PackedInt(g) => self.cols.div_ceil(g.per_word()) * 4,
        }
    }

    /// Bytes of stored row `r`, not of a strided view (panics if `r >= rows`; callers iterate
    /// `0..rows`).
    fn row_bytes(&self, r: usize) -> &'a [u8] {
        let w = self.row_width();
        &self.data[r * w..(r + 1) * w]
    }

    /// Row `r` widened to f32 into `out` (`out.len() == cols`).
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        match self.coded {
            Coded::Plain => self.dtype.read_into(self.row_bytes(r), out),
            Coded::Strided(rs, cs) => {
                let es = self.dtype.size();
                for (c, o) in out.iter_mut().enumerate() {
                    let at = (r * rs + c * cs) * es;
                    *o = self.dtype.read(&self.data[at..at + es]);
                }
            }
            Coded::Fp8(b) => {
                let per_row = self.cols.div_ceil(b.block_cols);
                let srow = (r / b.block_rows) * per_row;
                let codes = self.row_bytes(r);
                for (c0, o) in out.chunks_mut(b.block_cols).enumerate() {
                    let scale = b.scale.read(b.scales, srow + c0);
                    for (j, o) in o.iter_mut().enumerate() {
                        let c = c0 * b.block_cols + j;
                        let v = match b.codes {
                            BlockCodes::E4m3 => e4m3_to_f32(codes[c]),
                            BlockCodes::E2m1 => e2m1_to_f32(codes[c / 2] >> (4 * (c % 2))),
                        };
                        *o = half::bf16::from_f32(v * scale).to_f32();
                    }
                }
            }
            Coded::PackedInt(g) => {
                let (pf, ss) = (g.per_word(), g.scale_dtype.size());
                let per_row = self.cols.div_ceil(g.group_size);
                let words = self.row_bytes(r);
                let mask = (1u32 << g.bits) - 1;
                let offset = 1i32 << (g.bits - 1);
                let mut rounded = [0u8; 4];
                for (c, o) in out.iter_mut().enumerate().take(self.cols) {
                    let w = c / pf;
                    let word = u32::from_le_bytes([
                        words[4 * w],
                        words[4 * w + 1],
                        words[4 * w + 2],
                        words[4 * w + 3],
                    ]);
                    let u = ((word >> (g.bits * (c % pf))) & mask) as i32;
                    let k = r * per_row + c / g.group_size;
                    let scale = g.scale_dtype.read(&g.scales[k * ss..(k + 1) * ss]);
                    // x_q.to(scale.dtype) * scale: the product rounded to the scales' type.
                    g.scale_dtype
                        .write((u - offset) as f32 * scale, &mut rounded[..ss]);
                    *o = g.scale_dtype.read(&rounded[..ss]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::FloatDtype;

    /// compressed-tensors' own example (`pack_to_int32`'s docstring, 8 bits): [1, 2] is stored
    /// as [129, 130, 0, 0], the word 33409; and 4 bits, eight codes to a word, lowest first.
    #[test]
    fn packed_int_rows_read_as_compressed_tensors_packs_them() {
        use super::{FloatDtype, MatrixView, PackedIntGroups};
        let half = half::bf16::from_f32(0.5).to_le_bytes();
        let view = |bits, cols, words: &[u32], scales: &'static [u8]| {
            let data: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
            let data: &'static [u8] = Box::leak(data.into_boxed_slice());
            let groups = PackedIntGroups {
                scales,
                scale_dtype: FloatDtype::Bf16,
                bits,
                group_size: 32,
            };
            MatrixView::packed_int(1, cols, data, groups).unwrap()
        };
        let scales: &'static [u8] = Box::leak(Box::new(half));
        let mut out = [0f32; 2];
        view(8, 2, &[33409], scales).row_f32(0, &mut out);
        assert_eq!(out, [0.5, 1.0]);
        // q = -8, -1, 0, 1, 7, 3, -4, 2 stored as q + 8, the first in bits 0..4.
        let q = [-8i32, -1, 0, 1, 7, 3, -4, 2];
        let word = q
            .iter()
            .enumerate()
            .fold(0u32, |w, (i, &q)| w | (((q + 8) as u32) << (4 * i)));
        let mut out = [0f32; 8];
        view(4, 8, &[word], scales).row_f32(0, &mut out);
        assert_eq!(out, q.map(|q| q as f32 * 0.5));
        // Sizes that disagree are refused; a non-finite scale is found.
        let groups = PackedIntGroups {
            scales,
            scale_dtype: FloatDtype::Bf16,
            bits: 4,
            group_size: 32,
        };
        assert!(MatrixView::packed_int(1, 9, &[0u8; 4], groups).is_none());
        assert!(
            MatrixView::packed_int(1, 8, &[0u8; 4], PackedIntGroups { bits: 3, ..groups })
                .is_none()
        );
        let nan: &'static [u8] = Box::leak(Box::new(half::bf16::NAN.to_le_bytes()));
        let m = MatrixView::packed_int(
            1,
            8,
            &[0u8; 4],
            PackedIntGroups {
                scales: nan,
                ..groups
            },
        );
        assert_eq!(
            m.unwrap().first_non_finite().map(|(r, c, _)| (r, c)),
            Some((0, 0))
        );
    }

    #[test]
    fn finds_the_first_non_finite_value_in_every_float_type() {
        for dtype in [FloatDtype::F32, FloatDtype::F16, FloatDtype::Bf16] {
            for (at, bad) in [
                (0, f32::NAN),
                (255, f32::INFINITY),
                (700, f32::NEG_INFINITY),
            ] {
                let mut v = vec![0.5f32; 1000];
                v[999] = 65000.0; // large but finite in every type
                v[at] = bad;
                if at < 999 {
                    v[at + 1] = f32::NAN; // only the first is reported
                }
                let mut bytes = vec![0u8; v.len() * dtype.size()];
                dtype.write_all(&v, &mut bytes);
                let (i, x) = dtype.first_non_finite(&bytes).unwrap();
                assert_eq!(i, at, "{dtype:?}");
                assert!(!x.is_finite());
                v[at] = 1.0;
                v[at + 1] = 1.0;
                dtype.write_all(&v, &mut bytes);
                assert_eq!(dtype.first_non_finite(&bytes), None, "{dtype:?}");
            }
        }
    }
}
