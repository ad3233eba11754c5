//! Expert segments: one expert's three projections, quantized and cut into row ranges.
//!
//! In: gate `[I, H]`, up `[I, H]`, down `[H, I]` of one expert, as float matrices or as MLX
//! codes (an MLX-quantized checkpoint), and the wanted [`ExpertQuant`]: one group size, and bits
//! per projection (equal unless the source's mixed recipe gave them different bits).
//! Out: [`QuantizedExpertSegment`]s covering intermediate rows `[r0, r1)`, each with two byte
//! parts, all little-endian row-major:
//! - WEIGHTS = gate_w `[R, H*bg/32]` u32 | up_w `[R, H*bu/32]` u32 | down_w `[H, R*bd/32]`
//!   u32 (down's columns r0..r1), with each projection's own bits;
//! - AUX = gate_scales `[R, H/g]` | gate_biases | up_scales | up_biases | down_scales `[H, R/g]`
//!   | down_biases, in the scale type; then, for experts with projection biases (gpt-oss), the
//!   gate and up biases of rows r0..r1 and, in segment 0 only, the `[H]` down bias, in the
//!   biases' own float type (formats/flashpack-v1.md §6.4).
//!
//! Invariant: `r1 - r0` is a multiple of the group size, so a segment's groups are whole groups
//! of the full matrix and quantizing the whole expert then cutting equals quantizing each cut.
//! MLX codes whose bits and group size match are copied, never requantized.

use super::{
    quantize, quantize_into, requantize, QuantError, QuantParams, QuantizedMatrix, QuantizedView,
};
use crate::convert::tensor::{FloatDtype, MatrixView};
use crate::format::{ProjBits, QuantMode};
use serde::{Deserialize, Serialize};
use std::ops::Range;

/// Where one projection's values come from.
#[derive(Clone, Copy, Debug)]
pub enum ProjSource<'a> {
    /// Float weights `[out, in]`.
    Float(MatrixView<'a>),
    /// Codes of an MLX-quantized checkpoint.
    Quantized(QuantizedView<'a>),
    /// Every other row of quantized codes, starting at row `first`: gpt-oss's upstream
    /// `gate_up_proj` `[2I, H]` holds gate (`first` 0) and up (`first` 1) interleaved. The codes
    /// are copied out ([`ProjSource::own`]) only when a stage needs them.
    Interleaved {
        all: QuantizedView<'a>,
        first: usize,
    },
}

impl<'a> ProjSource<'a> {
    /// `[out, in]`.
    pub fn shape(&self) -> [usize; 2] {
        match self {
            ProjSource::Float(m) => [m.rows, m.cols],
            ProjSource::Quantized(q) => [q.rows, q.cols],
            ProjSource::Interleaved { all, first } => [(all.rows - first).div_ceil(2), all.cols],
        }
    }

    /// The values as f32 rows (dequantized if the source is MLX-quantized).
    pub fn to_f32(&self) -> Vec<f32> {
        let [rows, cols] = self.shape();
        let mut v = vec![0f32; rows * cols];
        for (r, row) in v.chunks_exact_mut(cols.max(1)).enumerate() {
            match self {
                ProjSource::Float(m) => m.row_f32(r, row),
                ProjSource::Quantized(q) => q.dequantize_row(r, row),
                ProjSource::Interleaved { all, first } => all.dequantize_row(2 * r + first, row),
            }
        }
        v
    }

    /// The source bytes behind the projection: the floats, or the codes, scales and biases
    /// (for interleaved rows, those of both projections that share them).
    pub fn source_bytes(&self) -> Vec<&'a [u8]> {
        match self {
            ProjSource::Float(m) => {
                let mut v = vec![m.bytes()];
                v.extend(m.scale_bytes());
                v
            }
            ProjSource::Quantized(q) | ProjSource::Interleaved { all: q, .. } => {
                vec![q.codes, q.scales, q.biases]
            }
        }
    }

    /// The parameters of the source's codes, for a quantized source: MLX codes, or
    /// compressed-tensors packed integers that MLX's affine layout holds as they are
    /// (`copy_packed_codes`), so that they are kept unless the options ask for others.
    pub fn quant_params(&self) -> Option<QuantParams> {
        match self {
            ProjSource::Float(m) => {
                let g = m.packed_int_groups()?;
                let p = QuantParams::new(u8::try_from(g.bits).ok()?, g.group_size).ok()?;
                (p.fits(m.cols) && m.cols % g.per_word() == 0).then_some(p)
            }
            ProjSource::Quantized(q) | ProjSource::Interleaved { all: q, .. } => Some(q.params),
        }
    }

    /// Interleaved rows copied out into a matrix of their own; `None` for the other sources,
    /// which are already contiguous.
    pub fn own(&self) -> Option<QuantizedMatrix> {
        let ProjSource::Interleaved { all, first } = *self else {
            return None;
        };
        let [rows, cols] = self.shape();
        let p = all.params;
        let (w, s) = (
            p.words_per_row(cols) * 4,
            p.groups_per_row(cols) * p.scale_size(all.scale_dtype),
        );
        let pick = |buf: &[u8], n: usize| -> Vec<u8> {
            let mut out = Vec::with_capacity(rows * n);
            for r in 0..rows {
                out.extend_from_slice(&buf[(2 * r + first) * n..][..n]);
            }
            out
        };
        Some(QuantizedMatrix {
            rows,
            cols,
            params: p,
            scale_dtype: all.scale_dtype,
            codes: pick(all.codes, w),
            scales: pick(all.scales, s),
            biases: if p.has_biases() {
                pick(all.biases, s)
            } else {
                Vec::new()
            },
        })
    }

    /// The type scales are stored in: the float input's own type (as MLX does), or the
    /// scale type of existing codes.
    pub fn scale_dtype(&self) -> FloatDtype {
        match self {
            ProjSource::Float(m) => m.dtype,
            ProjSource::Quantized(q) | ProjSource::Interleaved { all: q, .. } => q.scale_dtype,
        }
    }
}

/// A vector of floats, possibly every `step`-th value of a buffer (gpt-oss's interleaved gate
/// and up biases).
#[derive(Clone, Copy, Debug)]
pub struct BiasVector<'a> {
    pub dtype: FloatDtype,
    /// Starts at the vector's first value.
    pub bytes: &'a [u8],
    pub len: usize,
    pub step: usize,
}

impl<'a> BiasVector<'a> {
    /// Values `range`, contiguous, in the vector's type.
    pub fn bytes_of(&self, range: Range<usize>) -> Vec<u8> {
        let s = self.dtype.size();
        if self.step == 1 {
            return self.bytes[range.start * s..range.end * s].to_vec();
        }
        range
            .flat_map(|i| {
                self.bytes[i * self.step * s..(i * self.step + 1) * s]
                    .iter()
                    .copied()
            })
            .collect()
    }

    /// Every value as f32.
    pub fn to_f32(&self) -> Vec<f32> {
        let s = self.dtype.size();
        self.bytes_of(0..self.len)
            .chunks_exact(s)
            .map(|b| self.dtype.read(b))
            .collect()
    }
}

/// The biases of an expert's projections (gpt-oss): gate and up `[I]`, down `[H]`, one type.
#[derive(Clone, Copy, Debug)]
pub struct ExpertBiases<'a> {
    pub gate: BiasVector<'a>,
    pub up: BiasVector<'a>,
    pub down: BiasVector<'a>,
}

/// How one expert is stored: bits per projection (gate, up, down), one group size and one
/// quantization mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExpertQuant {
    pub bits: ProjBits,
    pub group_size: usize,
    pub mode: QuantMode,
}

impl ExpertQuant {
    /// Checks each projection's bits and the group size for `mode` (as
    /// [`QuantParams::with_mode`] does).
    pub fn new(
        bits: ProjBits,
        group_size: usize,
        mode: QuantMode,
    ) -> Result<ExpertQuant, QuantError> {
        for b in bits.0 {
            QuantParams::with_mode(b, group_size, mode)?;
        }
        Ok(ExpertQuant {
            bits,
            group_size,
            mode,
        })
    }

    /// The parameters of projection `i`: 0 gate, 1 up, 2 down.
    pub fn proj(&self, i: usize) -> QuantParams {
        QuantParams {
            bits: self.bits.get(i),
            group_size: self.group_size,
            mode: self.mode,
        }
    }
}

impl From<QuantParams> for ExpertQuant {
    fn from(p: QuantParams) -> ExpertQuant {
        ExpertQuant {
            bits: ProjBits::uniform(p.bits),
            group_size: p.group_size,
            mode: p.mode,
        }
    }
}

/// One expert's SwiGLU projections.
#[derive(Clone, Copy, Debug)]
pub struct ExpertProjections<'a> {
    pub gate: ProjSource<'a>,
    pub up: ProjSource<'a>,
    pub down: ProjSource<'a>,
    /// The projections' biases, for experts that have them (gpt-oss).
    pub bias: Option<ExpertBiases<'a>>,
}

impl ExpertProjections<'_> {
    /// Decoded bytes of each of the `n` segments [`build_segments`] cuts this expert into when
    /// stored as `q` (codes, scales and biases, and the expert's own biases), from the shapes
    /// and types alone: no weight is read. `None` when the rows do not cut into `n` segments of
    /// whole groups (which `build_segments` refuses).
    pub fn segment_lens(&self, q: ExpertQuant, n: usize) -> Option<Vec<u64>> {
        let [i, h] = self.gate.shape();
        if n == 0 || i % (n * q.group_size) != 0 {
            return None;
        }
        let rows = i / n;
        let parts = SegmentParts::new(h, rows, q, self.gate.scale_dtype());
        Some(
            (0..n)
                .map(|seg| {
                    let bias = self.bias.map_or(0, |b| {
                        (2 * rows + if seg == 0 { h } else { 0 }) * b.gate.dtype.size()
                    });
                    (parts.weights_len() + parts.aux_len() + bias) as u64
                })
                .collect(),
        )
    }
}

/// How an expert's intermediate rows are cut. One segment (all rows) is the default; more
/// segments allow loading the top rows of an expert without the bottom ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentPlan {
    pub segment_count: usize,
}

impl Default for SegmentPlan {
    fn default() -> Self {
        SegmentPlan { segment_count: 1 }
    }
}

/// A quantized row range of one expert, ready to encode and lay out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuantizedExpertSegment {
    pub layer: usize,
    pub expert: usize,
    pub segment: usize,
    pub segment_count: usize,
    /// First intermediate row (r0).
    pub row_start: usize,
    /// Rows in this segment (R = r1 - r0).
    pub row_count: usize,
    /// Model width H (columns of gate/up, rows of down).
    pub hidden_size: usize,
    pub bits: ProjBits,
    pub group_size: usize,
    /// Float type of affine scales and biases (mxfp4/mxfp8 scales are u8 whatever it says).
    pub scale_dtype: FloatDtype,
    pub mode: QuantMode,
    /// The type of the expert's projection biases, which end the AUX part, when it has them.
    pub bias_dtype: Option<FloatDtype>,
    pub weights: Vec<u8>,
    pub aux: Vec<u8>,
}

/// Byte ranges of each part inside a segment's WEIGHTS and AUX buffers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentParts {
    pub gate_w: Range<usize>,
    pub up_w: Range<usize>,
    pub down_w: Range<usize>,
    pub gate_scales: Range<usize>,
    pub gate_biases: Range<usize>,
    pub up_scales: Range<usize>,
    pub up_biases: Range<usize>,
    pub down_scales: Range<usize>,
    pub down_biases: Range<usize>,
}

impl SegmentParts {
    /// Offsets for a segment of `rows` intermediate rows of an expert of width `hidden`.
    pub fn new(hidden: usize, rows: usize, q: ExpertQuant, scale_dtype: FloatDtype) -> Self {
        let (pg, pu, pd) = (q.proj(0), q.proj(1), q.proj(2));
        let ss = pg.scale_size(scale_dtype);
        let up_gate_s = rows * pg.groups_per_row(hidden) * ss;
        let down_s = hidden * pd.groups_per_row(rows) * ss;
        // mxfp4/mxfp8 codes have no biases: their ranges are empty.
        let bias = |n: usize| if pg.has_biases() { n } else { 0 };
        let mut at = 0;
        let mut next = |n: usize| {
            let r = at..at + n;
            at += n;
            r
        };
        let (gate_w, up_w, down_w) = (
            next(rows * pg.words_per_row(hidden) * 4),
            next(rows * pu.words_per_row(hidden) * 4),
            next(hidden * pd.words_per_row(rows) * 4),
        );
        at = 0;
        let mut next = |n: usize| {
            let r = at..at + n;
            at += n;
            r
        };
        SegmentParts {
            gate_w,
            up_w,
            down_w,
            gate_scales: next(up_gate_s),
            gate_biases: next(bias(up_gate_s)),
            up_scales: next(up_gate_s),
            up_biases: next(bias(up_gate_s)),
            down_scales: next(down_s),
            down_biases: next(bias(down_s)),
        }
    }

    /// Total WEIGHTS bytes.
    pub fn weights_len(&self) -> usize {
        self.down_w.end
    }

    /// Total AUX bytes.
    pub fn aux_len(&self) -> usize {
        self.down_biases.end
    }
}

impl QuantizedExpertSegment {
    /// Where each part lies in `weights` and `aux`.
    pub fn parts(&self) -> SegmentParts {
        let q = ExpertQuant {
            bits: self.bits,
            group_size: self.group_size,
            mode: self.mode,
        };
        SegmentParts::new(self.hidden_size, self.row_count, q, self.scale_dtype)
    }
}

/// Quantized or borrowed codes of one projection.
enum Quant<'a> {
    Owned(QuantizedMatrix),
    Borrowed(QuantizedView<'a>),
}

impl Quant<'_> {
    fn view(&self) -> QuantizedView<'_> {
        match self {
            Quant::Owned(m) => m.view(),
            Quant::Borrowed(v) => *v,
        }
    }
}

fn to_quant<'a>(what: &str, src: ProjSource<'a>, p: QuantParams) -> Result<Quant<'a>, QuantError> {
    Ok(match src {
        ProjSource::Float(m) => Quant::Owned(quantize(what, m, p, m.dtype)?),
        ProjSource::Quantized(q) if q.params == p => Quant::Borrowed(q),
        ProjSource::Quantized(q) => Quant::Owned(requantize(what, q, p)?),
        ProjSource::Interleaved { all, .. } => {
            let own = src.own().ok_or_else(|| QuantError::Invalid {
                what: what.to_string(),
                detail: "interleaved rows".into(),
            })?;
            if all.params == p {
                Quant::Owned(own)
            } else {
                Quant::Owned(requantize(what, own.view(), p)?)
            }
        }
    })
}

/// Appends the expert biases of rows `rows` (and the down bias in segment 0) to `aux`.
fn push_biases(aux: &mut Vec<u8>, b: &ExpertBiases<'_>, rows: Range<usize>, first: bool) {
    aux.extend(b.gate.bytes_of(rows.clone()));
    aux.extend(b.up.bytes_of(rows));
    if first {
        aux.extend(b.down.bytes_of(0..b.down.len));
    }
}

/// A projection's scales, then its biases when the mode has them.
fn scale_parts<'a>(m: &QuantizedView<'a>, biases: bool) -> Vec<&'a [u8]> {
    if biases {
        vec![m.scales, m.biases]
    } else {
        vec![m.scales]
    }
}

/// Quantizes one expert with `q` and cuts it into `plan.segment_count` segments of equal rows.
pub fn build_segments(
    layer: usize,
    expert: usize,
    src: &ExpertProjections<'_>,
    q: impl Into<ExpertQuant>,
    plan: SegmentPlan,
) -> Result<Vec<QuantizedExpertSegment>, QuantError> {
    let q: ExpertQuant = q.into();
    let group = q.group_size;
    let what = |proj: &str| format!("layer {layer} expert {expert} {proj}");
    let [i, h] = src.gate.shape();
    for (name, s, want) in [("up", &src.up, [i, h]), ("down", &src.down, [h, i])] {
        if s.shape() != want {
            return Err(QuantError::Shape {
                what: what(name),
                expected: want.to_vec(),
                found: s.shape().to_vec(),
            });
        }
    }
    let sd = src.gate.scale_dtype();
    if src.up.scale_dtype() != sd || src.down.scale_dtype() != sd {
        return Err(QuantError::Invalid {
            what: what("projections"),
            detail: format!(
                "gate/up/down differ in type ({sd:?}, {:?}, {:?}); convert them to one type",
                src.up.scale_dtype(),
                src.down.scale_dtype()
            ),
        });
    }
    let n = plan.segment_count;
    if n == 0 || i % (n * group) != 0 {
        return Err(QuantError::Invalid {
            what: what("segments"),
            detail: format!(
                "{i} intermediate rows cannot be cut into {n} segments of whole groups of {group}"
            ),
        });
    }
    let (pg, pu, pd) = (q.proj(0), q.proj(1), q.proj(2));
    if let Some(b) = &src.bias {
        let want = [("gate", b.gate, i), ("up", b.up, i), ("down", b.down, h)];
        for (name, v, len) in want {
            if v.len != len || v.dtype != b.gate.dtype {
                return Err(QuantError::Shape {
                    what: what(&format!("{name} bias")),
                    expected: vec![len],
                    found: vec![v.len],
                });
            }
        }
    }
    let bias_dtype = src.bias.map(|b| b.gate.dtype);
    if let (
        1,
        QuantMode::Affine,
        ProjSource::Float(g),
        ProjSource::Float(u),
        ProjSource::Float(d),
        None,
    ) = (n, q.mode, src.gate, src.up, src.down, src.bias)
    {
        // One segment from floats: quantize straight into the segment's buffers, whose layout
        // is the three matrices' codes, then their scales and biases, one after the other.
        let parts = SegmentParts::new(h, i, q, sd);
        let mut weights = vec![0u8; parts.weights_len()];
        let mut aux = vec![0u8; parts.aux_len()];
        let (gw, rest) = weights.split_at_mut(parts.up_w.start);
        let (uw, dw) = rest.split_at_mut(parts.up_w.len());
        let (gs, rest) = aux.split_at_mut(parts.gate_biases.start);
        let (gb, rest) = rest.split_at_mut(parts.gate_biases.len());
        let (us, rest) = rest.split_at_mut(parts.up_scales.len());
        let (ub, rest) = rest.split_at_mut(parts.up_biases.len());
        let (ds, db) = rest.split_at_mut(parts.down_scales.len());
        quantize_into(&what("gate"), g, pg, sd, gw, gs, gb)?;
        quantize_into(&what("up"), u, pu, sd, uw, us, ub)?;
        quantize_into(&what("down"), d, pd, sd, dw, ds, db)?;
        return Ok(vec![QuantizedExpertSegment {
            layer,
            expert,
            segment: 0,
            segment_count: 1,
            row_start: 0,
            row_count: i,
            hidden_size: h,
            bits: q.bits,
            group_size: group,
            scale_dtype: sd,
            mode: q.mode,
            bias_dtype: None,
            weights,
            aux,
        }]);
    }
    let gate = to_quant(&what("gate"), src.gate, pg)?;
    let up = to_quant(&what("up"), src.up, pu)?;
    let down = to_quant(&what("down"), src.down, pd)?;
    let (gate, up, down) = (gate.view(), up.view(), down.view());
    let rows = i / n;
    Ok((0..n)
        .map(|seg| {
            let r0 = seg * rows;
            let parts = SegmentParts::new(h, rows, q, sd);
            let mut weights = Vec::with_capacity(parts.weights_len());
            let mut aux = Vec::with_capacity(parts.aux_len());
            let ss = pg.scale_size(sd);
            // gate/up: rows r0..r1 are contiguous.
            for (m, p) in [(&gate, pg), (&up, pu)] {
                let wrow = p.words_per_row(h) * 4;
                weights.extend_from_slice(&m.codes[r0 * wrow..(r0 + rows) * wrow]);
            }
            // down: columns r0..r1 of every one of its H rows.
            let dw = pd.words_per_row(i) * 4;
            let (c0, c1) = (pd.words_per_row(r0) * 4, pd.words_per_row(r0 + rows) * 4);
            for r in 0..h {
                weights.extend_from_slice(&down.codes[r * dw + c0..r * dw + c1]);
            }
            let srow = pg.groups_per_row(h) * ss;
            // Scales, then biases (none for mxfp4/mxfp8), of each projection.
            let biases = pg.has_biases();
            for m in [&gate, &up] {
                for buf in scale_parts(m, biases) {
                    aux.extend_from_slice(&buf[r0 * srow..(r0 + rows) * srow]);
                }
            }
            let ds = pd.groups_per_row(i) * ss;
            let (g0, g1) = (
                pd.groups_per_row(r0) * ss,
                pd.groups_per_row(r0 + rows) * ss,
            );
            for buf in scale_parts(&down, biases) {
                for r in 0..h {
                    aux.extend_from_slice(&buf[r * ds + g0..r * ds + g1]);
                }
            }
            debug_assert_eq!(weights.len(), parts.weights_len());
            debug_assert_eq!(aux.len(), parts.aux_len());
            if let Some(b) = &src.bias {
                push_biases(&mut aux, b, r0..r0 + rows, seg == 0);
            }
            QuantizedExpertSegment {
                layer,
                expert,
                segment: seg,
                segment_count: n,
                row_start: r0,
                row_count: rows,
                hidden_size: h,
                bits: q.bits,
                group_size: group,
                scale_dtype: sd,
                mode: q.mode,
                bias_dtype,
                weights,
                aux,
            }
        })
        .collect())
}
