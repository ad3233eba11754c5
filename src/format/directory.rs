//! Tensor and expert directories: formats/flashpack-v1.md §5-§6.
//!
//! In: the decoded bytes of TENSOR_DIR / EXPERT_DIR and the byte range of their data sections.
//! Out: validated entries. Invariant: every entry returned lies inside its data section, its
//! sizes agree with its shape, and the directory is sorted and unique; so a reader may slice
//! payloads without further checks.

use std::ops::Range;

use super::header::{hex, le_u16, le_u32, le_u64};
use super::{
    codec_id, expert_bias_len, segment_part_lens, valid_bits, DType, PackError, QuantMode,
};

/// formats/flashpack-v1.md §5
pub const TENSOR_ENTRY_SIZE: usize = 112;
/// formats/flashpack-v1.md §6.1
pub const EXPERT_ENTRY_SIZE: usize = 112;
const DIR_HEADER_SIZE: usize = 16;
/// Expert entry flag bit 0 (§6.4, format 1.2): the segment's AUX part ends with expert biases.
const EXPERT_FLAG_BIASES: u32 = 1;

const TENSOR_DIR: &str = "TENSOR_DIR";
const EXPERT_DIR: &str = "EXPERT_DIR";

/// One dense tensor, formats/flashpack-v1.md §5.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: DType,
    /// 0 for plain tensors; bits per code for packed quantization codes.
    pub bits: u8,
    pub codec: u8,
    pub group_size: u32,
    /// Quantization mode of packed codes (affine for plain tensors). Its scales are the
    /// `.scales` tensor beside it, and affine codes have `.biases` too (§5).
    pub mode: QuantMode,
    pub shape: Vec<u64>,
    pub offset: u64,
    pub stored_len: u64,
    pub decoded_len: u64,
    pub blake3: [u8; 32],
}

impl TensorEntry {
    pub fn stored_range(&self) -> Range<usize> {
        self.offset as usize..(self.offset + self.stored_len) as usize
    }

    /// Elements in the tensor; `None` on overflow.
    pub fn numel(shape: &[u64]) -> Option<u64> {
        shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d))
    }
}

/// Bits per code of an expert's three projections, gate, up and down (formats/flashpack-v1.md
/// §6.1). Usually all three are equal; mlx-lm's mixed recipes give `down_proj` more bits in some
/// layers, and a pack keeps that (flag `PROJECTION_BITS`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProjBits(pub [u8; 3]);

impl ProjBits {
    pub const fn uniform(bits: u8) -> ProjBits {
        ProjBits([bits; 3])
    }

    /// Bits of projection `i`: 0 gate, 1 up, 2 down.
    pub fn get(self, i: usize) -> u8 {
        self.0[i]
    }

    pub fn gate(self) -> u8 {
        self.0[0]
    }

    pub fn up(self) -> u8 {
        self.0[1]
    }

    pub fn down(self) -> u8 {
        self.0[2]
    }

    /// The largest of the three: the entry's `bits` field.
    pub fn max(self) -> u8 {
        self.0.into_iter().max().unwrap_or(0)
    }

    pub fn is_uniform(self) -> bool {
        self.0[0] == self.0[1] && self.0[1] == self.0[2]
    }

    /// Sum of the three, as u64: a segment's packed codes take `rows * hidden * sum / 8` bytes.
    pub fn sum(self) -> u64 {
        self.0.iter().map(|&b| b as u64).sum()
    }

    /// Mean bits per weight of the codes (the three projections have equal sizes).
    pub fn mean(self) -> f64 {
        self.sum() as f64 / 3.0
    }
}

/// `bits == 4`: every projection has 4 bits.
impl PartialEq<u8> for ProjBits {
    fn eq(&self, other: &u8) -> bool {
        self.0 == [*other; 3]
    }
}

impl std::fmt::Display for ProjBits {
    /// `4` when uniform, else `gate/up/down` such as `2/2/6`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_uniform() {
            write!(f, "{}", self.0[0])
        } else {
            write!(f, "{}/{}/{}", self.0[0], self.0[1], self.0[2])
        }
    }
}

/// One stored (layer, expert, segment), formats/flashpack-v1.md §6.1.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpertEntry {
    pub layer: u32,
    pub expert: u32,
    pub segment: u16,
    pub segment_count: u16,
    /// Bits of each projection. On disk: `bits` holds the largest, and the three are stored
    /// at offset 104 only when they differ (zero there means all equal `bits`, as in 1.0).
    pub bits: ProjBits,
    pub weight_codec: u8,
    pub aux_codec: u8,
    pub scale_dtype: DType,
    pub group_size: u32,
    /// Quantization mode of all three projections (§7.3); stored at offset 107 (zero: affine).
    pub mode: QuantMode,
    /// The float type of the expert's projection biases when it has them (§6.4, format 1.2:
    /// flag bit 0 at offset 28, the dtype at offset 108); `None` for an expert without.
    pub bias_dtype: Option<DType>,
    pub row_start: u32,
    pub row_count: u32,
    pub offset: u64,
    pub stored_len: u64,
    pub decoded_len: u64,
    pub weights_stored_len: u64,
    pub weights_decoded_len: u64,
    pub blake3: [u8; 32],
}

impl ExpertEntry {
    pub fn stored_range(&self) -> Range<usize> {
        self.offset as usize..(self.offset + self.stored_len) as usize
    }

    pub fn aux_decoded_len(&self) -> u64 {
        self.decoded_len - self.weights_decoded_len
    }

    pub fn key(&self) -> (u32, u32, u16) {
        (self.layer, self.expert, self.segment)
    }
}

/// Bytes of a directory of `entries` entries of `entry_size` bytes and `strings_len` bytes of
/// names (§5-6): what [`encode_tensor_dir`] and [`encode_expert_dir`] write, for a layout
/// planned before them.
pub fn dir_len(entries: usize, entry_size: usize, strings_len: u64) -> u64 {
    (DIR_HEADER_SIZE + entries * entry_size) as u64 + strings_len
}

/// Encodes a tensor directory; `tensors` must already be sorted by name.
pub(crate) fn encode_tensor_dir(tensors: &[TensorEntry]) -> Vec<u8> {
    let strings_len: usize = tensors.iter().map(|t| t.name.len()).sum();
    let mut out =
        Vec::with_capacity(DIR_HEADER_SIZE + tensors.len() * TENSOR_ENTRY_SIZE + strings_len);
    out.extend_from_slice(&(tensors.len() as u32).to_le_bytes());
    out.extend_from_slice(&(TENSOR_ENTRY_SIZE as u32).to_le_bytes());
    out.extend_from_slice(&(strings_len as u64).to_le_bytes());
    let mut name_offset = 0u32;
    for t in tensors {
        out.extend_from_slice(&name_offset.to_le_bytes());
        out.extend_from_slice(&(t.name.len() as u32).to_le_bytes());
        name_offset += t.name.len() as u32;
        out.extend_from_slice(&[t.dtype as u8, t.bits, t.codec, t.shape.len() as u8]);
        out.extend_from_slice(&t.group_size.to_le_bytes());
        for i in 0..4 {
            out.extend_from_slice(&t.shape.get(i).copied().unwrap_or(0).to_le_bytes());
        }
        out.extend_from_slice(&t.offset.to_le_bytes());
        out.extend_from_slice(&t.stored_len.to_le_bytes());
        out.extend_from_slice(&t.decoded_len.to_le_bytes());
        out.extend_from_slice(&t.blake3);
        out.extend_from_slice(&[t.mode as u8, 0, 0, 0, 0, 0, 0, 0]);
    }
    for t in tensors {
        out.extend_from_slice(t.name.as_bytes());
    }
    out
}

/// Encodes an expert directory; `experts` must already be sorted by (layer, expert, segment).
pub(crate) fn encode_expert_dir(
    experts: &[ExpertEntry],
    hidden: u32,
    intermediate: u32,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(DIR_HEADER_SIZE + experts.len() * EXPERT_ENTRY_SIZE);
    out.extend_from_slice(&(experts.len() as u32).to_le_bytes());
    out.extend_from_slice(&(EXPERT_ENTRY_SIZE as u32).to_le_bytes());
    out.extend_from_slice(&hidden.to_le_bytes());
    out.extend_from_slice(&intermediate.to_le_bytes());
    for e in experts {
        out.extend_from_slice(&e.layer.to_le_bytes());
        out.extend_from_slice(&e.expert.to_le_bytes());
        out.extend_from_slice(&e.segment.to_le_bytes());
        out.extend_from_slice(&e.segment_count.to_le_bytes());
        out.extend_from_slice(&[
            e.bits.max(),
            e.weight_codec,
            e.aux_codec,
            e.scale_dtype as u8,
        ]);
        out.extend_from_slice(&e.group_size.to_le_bytes());
        out.extend_from_slice(&e.row_start.to_le_bytes());
        out.extend_from_slice(&e.row_count.to_le_bytes());
        let flags: u32 = if e.bias_dtype.is_some() {
            EXPERT_FLAG_BIASES
        } else {
            0
        };
        out.extend_from_slice(&flags.to_le_bytes());
        out.extend_from_slice(&e.offset.to_le_bytes());
        out.extend_from_slice(&e.stored_len.to_le_bytes());
        out.extend_from_slice(&e.decoded_len.to_le_bytes());
        out.extend_from_slice(&e.weights_stored_len.to_le_bytes());
        out.extend_from_slice(&e.weights_decoded_len.to_le_bytes());
        out.extend_from_slice(&e.blake3);
        let proj = if e.bits.is_uniform() {
            [0; 3]
        } else {
            e.bits.0
        };
        out.extend_from_slice(&proj);
        let bias = e.bias_dtype.map_or(0, |d| d as u8);
        out.extend_from_slice(&[e.mode as u8, bias, 0, 0, 0]);
    }
    out
}

fn bad(
    section: &'static str,
    index: usize,
    field: &'static str,
    value: impl ToString,
    reason: &'static str,
) -> PackError {
    PackError::BadEntry {
        section,
        index,
        field,
        value: value.to_string(),
        reason,
    }
}

/// Reads the count and entry size of a directory and checks the total against `len`.
fn dir_shape(
    section: &'static str,
    bytes: &[u8],
    min_entry: usize,
    extra: u64,
) -> Result<(usize, usize), PackError> {
    if bytes.len() < DIR_HEADER_SIZE {
        return Err(PackError::BadDirectory {
            section,
            reason: format!(
                "{} bytes, less than the 16-byte directory header",
                bytes.len()
            ),
        });
    }
    let count = le_u32(bytes, 0) as u64;
    let entry_size = le_u32(bytes, 4) as u64;
    if entry_size < min_entry as u64 {
        return Err(PackError::BadDirectory {
            section,
            reason: format!("entry_size {entry_size} is less than {min_entry}"),
        });
    }
    let expected = count
        .checked_mul(entry_size)
        .and_then(|v| v.checked_add(DIR_HEADER_SIZE as u64))
        .and_then(|v| v.checked_add(extra));
    if expected != Some(bytes.len() as u64) {
        return Err(PackError::BadDirectory {
            section,
            reason: format!(
                "{count} entries of {entry_size} bytes plus {extra} bytes of strings do not fill its {} bytes",
                bytes.len()
            ),
        });
    }
    Ok((count as usize, entry_size as usize))
}

/// Checks that `[offset, offset+len)` lies in `data`.
fn check_in(
    section: &'static str,
    index: usize,
    offset: u64,
    len: u64,
    data_section: &'static str,
    data: &Range<u64>,
) -> Result<(), PackError> {
    let end = offset.checked_add(len);
    match end {
        Some(end) if offset >= data.start && end <= data.end => Ok(()),
        _ => Err(PackError::EntryOutOfBounds {
            section,
            index,
            offset,
            len,
            data_section,
            start: data.start,
            end: data.end,
        }),
    }
}

/// Parses and validates a decoded tensor directory (§5) against the DENSE_DATA range.
pub(crate) fn decode_tensor_dir(
    bytes: &[u8],
    data: &Range<u64>,
) -> Result<Vec<TensorEntry>, PackError> {
    let s = TENSOR_DIR;
    if bytes.len() < DIR_HEADER_SIZE {
        return Err(PackError::BadDirectory {
            section: s,
            reason: format!(
                "{} bytes, less than the 16-byte directory header",
                bytes.len()
            ),
        });
    }
    let strings_len = le_u64(bytes, 8);
    let (count, entry_size) = dir_shape(s, bytes, TENSOR_ENTRY_SIZE, strings_len)?;
    let strings_start = DIR_HEADER_SIZE + count * entry_size;
    let strings = &bytes[strings_start..];
    let mut out: Vec<TensorEntry> = Vec::with_capacity(count);
    for i in 0..count {
        let b = &bytes[DIR_HEADER_SIZE + i * entry_size..][..TENSOR_ENTRY_SIZE];
        let name_offset = le_u32(b, 0) as usize;
        let name_len = le_u32(b, 4) as usize;
        let name_bytes = name_offset
            .checked_add(name_len)
            .and_then(|end| strings.get(name_offset..end))
            .ok_or_else(|| {
                bad(
                    s,
                    i,
                    "name_offset",
                    name_offset,
                    "name lies outside the string table",
                )
            })?;
        let name = std::str::from_utf8(name_bytes)
            .map_err(|_| bad(s, i, "name", hex(name_bytes), "not UTF-8"))?
            .to_string();
        if name.is_empty() {
            return Err(bad(s, i, "name_len", 0, "names must not be empty"));
        }
        if let Some(prev) = out.last() {
            if prev.name.as_str() >= name.as_str() {
                return Err(bad(
                    s,
                    i,
                    "name",
                    &name,
                    "entries must be sorted by name, without duplicates",
                ));
            }
        }
        let dtype =
            DType::from_code(b[8]).ok_or_else(|| bad(s, i, "dtype", b[8], "unknown dtype"))?;
        let bits = b[9];
        let codec = b[10];
        if codec_id::required_flag(codec).is_none() {
            return Err(bad(s, i, "codec", codec, "unknown codec"));
        }
        let ndim = b[11] as usize;
        if ndim > 4 {
            return Err(bad(s, i, "ndim", ndim, "at most 4 dimensions"));
        }
        let group_size = le_u32(b, 12);
        let mode = QuantMode::from_code(b[104])
            .filter(|m| bits != 0 || *m == QuantMode::Affine)
            .ok_or_else(|| {
                bad(
                    s,
                    i,
                    "mode",
                    b[104],
                    "0 (affine), 1 (mxfp4), 2 (mxfp8) or 3 (nvfp4); 0 for plain tensors",
                )
            })?;
        if b[105..112].iter().any(|&x| x != 0) {
            return Err(bad(
                s,
                i,
                "reserved",
                format!("{:?}", &b[105..112]),
                "must be zero",
            ));
        }
        if bits != 0 && mode != QuantMode::Affine && mode.fixed() != Some((bits, group_size)) {
            return Err(bad(
                s,
                i,
                "mode",
                mode.name(),
                "mxfp4 codes are 4 bits and mxfp8 codes 8 bits, in groups of 32; nvfp4 4 bits in \
                 groups of 16",
            ));
        }
        if bits != 0 {
            if !valid_bits(bits) || dtype != DType::U32 {
                return Err(bad(
                    s,
                    i,
                    "bits",
                    bits,
                    "packed codes need bits in {2,3,4,5,6,8} and dtype u32",
                ));
            }
            if !super::valid_group_size_in(mode, group_size) {
                return Err(bad(
                    s,
                    i,
                    "group_size",
                    group_size,
                    "must be 32, 64 or 128 (16 in nvfp4)",
                ));
            }
        } else if group_size != 0 {
            return Err(bad(
                s,
                i,
                "group_size",
                group_size,
                "must be 0 for a plain tensor",
            ));
        }
        let dims: Vec<u64> = (0..4).map(|d| le_u64(b, 16 + 8 * d)).collect();
        if dims[ndim..].iter().any(|&d| d != 0) {
            return Err(bad(
                s,
                i,
                "shape",
                format!("{dims:?}"),
                "unused dimensions must be 0",
            ));
        }
        let shape = dims[..ndim].to_vec();
        let offset = le_u64(b, 48);
        let stored_len = le_u64(b, 56);
        let decoded_len = le_u64(b, 64);
        let expected = TensorEntry::numel(&shape).and_then(|n| n.checked_mul(dtype.size()));
        if expected != Some(decoded_len) {
            return Err(bad(
                s,
                i,
                "decoded_len",
                decoded_len,
                "must equal the shape's element count times the dtype size",
            ));
        }
        if codec == codec_id::RAW && stored_len != decoded_len {
            return Err(bad(
                s,
                i,
                "stored_len",
                stored_len,
                "a raw tensor stores exactly its decoded bytes",
            ));
        }
        check_in(s, i, offset, stored_len, "DENSE_DATA", data)?;
        out.push(TensorEntry {
            name,
            dtype,
            bits,
            codec,
            group_size,
            mode,
            shape,
            offset,
            stored_len,
            decoded_len,
            blake3: b[72..104].try_into().expect("32 bytes"),
        });
    }
    Ok(out)
}

/// A parsed expert directory.
pub(crate) struct ExpertDir {
    pub hidden_size: u32,
    pub intermediate_size: u32,
    pub entries: Vec<ExpertEntry>,
}

/// Parses and validates a decoded expert directory (§6) against the EXPERT_DATA range.
pub(crate) fn decode_expert_dir(
    bytes: &[u8],
    data: &Range<u64>,
    page_size: u32,
) -> Result<ExpertDir, PackError> {
    let s = EXPERT_DIR;
    let (count, entry_size) = dir_shape(s, bytes, EXPERT_ENTRY_SIZE, 0)?;
    let hidden = le_u32(bytes, 8);
    let intermediate = le_u32(bytes, 12);
    let mut out: Vec<ExpertEntry> = Vec::with_capacity(count);
    for i in 0..count {
        let b = &bytes[DIR_HEADER_SIZE + i * entry_size..][..EXPERT_ENTRY_SIZE];
        let flags = le_u32(b, 28);
        if flags & !EXPERT_FLAG_BIASES != 0 {
            return Err(bad(
                s,
                i,
                "flags",
                flags,
                "only bit 0 (expert biases, format 1.2) may be set",
            ));
        }
        let bias_dtype = if flags & EXPERT_FLAG_BIASES != 0 {
            Some(
                DType::from_code(b[108])
                    .filter(|d| d.is_float())
                    .ok_or_else(|| bad(s, i, "bias_dtype", b[108], "must be f32, f16 or bf16"))?,
            )
        } else {
            if b[108] != 0 {
                return Err(bad(
                    s,
                    i,
                    "bias_dtype",
                    b[108],
                    "must be 0 when flags bit 0 (expert biases) is clear",
                ));
            }
            None
        };
        let e = ExpertEntry {
            layer: le_u32(b, 0),
            expert: le_u32(b, 4),
            segment: le_u16(b, 8),
            segment_count: le_u16(b, 10),
            bits: expert_bits(b, i)?,
            weight_codec: b[13],
            aux_codec: b[14],
            scale_dtype: DType::from_code(b[15])
                .filter(|d| d.is_float() || *d == DType::U8)
                .ok_or_else(|| bad(s, i, "scale_dtype", b[15], "must be f32, f16, bf16 or u8"))?,
            group_size: le_u32(b, 16),
            mode: QuantMode::from_code(b[107]).ok_or_else(|| {
                bad(
                    s,
                    i,
                    "mode",
                    b[107],
                    "must be 0 (affine), 1 (mxfp4) or 2 (mxfp8)",
                )
            })?,
            bias_dtype,
            row_start: le_u32(b, 20),
            row_count: le_u32(b, 24),
            offset: le_u64(b, 32),
            stored_len: le_u64(b, 40),
            decoded_len: le_u64(b, 48),
            weights_stored_len: le_u64(b, 56),
            weights_decoded_len: le_u64(b, 64),
            blake3: b[72..104].try_into().expect("32 bytes"),
        };
        check_expert_entry(&e, i, hidden, intermediate, out.last())?;
        check_in(s, i, e.offset, e.stored_len, "EXPERT_DATA", data)?;
        if e.offset % page_size as u64 != 0 {
            return Err(PackError::Misaligned {
                what: format!(
                    "expert segment (layer {}, expert {}, segment {})",
                    e.layer, e.expert, e.segment
                ),
                offset: e.offset,
                page_size,
            });
        }
        out.push(e);
    }
    if let Some(last) = out.last() {
        if last.segment + 1 != last.segment_count {
            return Err(bad(
                s,
                count - 1,
                "segment",
                last.segment,
                "the expert's last segments are missing",
            ));
        }
    }
    Ok(ExpertDir {
        hidden_size: hidden,
        intermediate_size: intermediate,
        entries: out,
    })
}

/// The `bits` field and the per-projection bits at offset 104 (§6.1, format 1.1): all zero means
/// every projection has `bits`; otherwise each is a valid width and `bits` is the largest.
fn expert_bits(b: &[u8], i: usize) -> Result<ProjBits, PackError> {
    let s = EXPERT_DIR;
    let proj: [u8; 3] = b[104..107].try_into().expect("3 bytes");
    if b[109..112].iter().any(|&x| x != 0) {
        return Err(bad(
            s,
            i,
            "reserved",
            format!("{:?}", &b[109..112]),
            "must be zero",
        ));
    }
    if proj == [0; 3] {
        return Ok(ProjBits::uniform(b[12]));
    }
    let bits = ProjBits(proj);
    if !proj.iter().all(|&x| valid_bits(x)) || bits.is_uniform() || bits.max() != b[12] {
        return Err(bad(
            s,
            i,
            "projection_bits",
            bits,
            "each must be 2, 3, 4, 5, 6 or 8, not all equal, the largest equal to bits",
        ));
    }
    Ok(bits)
}

/// Field checks of one expert entry, plus order and tiling against the previous entry.
fn check_expert_entry(
    e: &ExpertEntry,
    i: usize,
    hidden: u32,
    intermediate: u32,
    prev: Option<&ExpertEntry>,
) -> Result<(), PackError> {
    let s = EXPERT_DIR;
    if !e.bits.0.iter().all(|&b| valid_bits(b)) {
        return Err(bad(s, i, "bits", e.bits, "must be 2, 3, 4, 5, 6 or 8"));
    }
    if !super::valid_group_size_in(e.mode, e.group_size) {
        return Err(bad(
            s,
            i,
            "group_size",
            e.group_size,
            "must be 32, 64 or 128 (16 in nvfp4)",
        ));
    }
    if !super::mode_accepts(e.mode, e.bits.max(), e.group_size, e.scale_dtype)
        || (e.mode != QuantMode::Affine && !e.bits.is_uniform())
    {
        return Err(bad(
            s,
            i,
            "mode",
            e.mode.name(),
            "affine takes float scales; mxfp4 is 4 bits and mxfp8 8 bits, group 32, u8 scales",
        ));
    }
    for (field, codec) in [("weight_codec", e.weight_codec), ("aux_codec", e.aux_codec)] {
        if codec_id::required_flag(codec).is_none() {
            return Err(bad(s, i, field, codec, "unknown codec"));
        }
    }
    if e.segment_count == 0 || e.segment_count > 256 || e.segment >= e.segment_count {
        return Err(bad(
            s,
            i,
            "segment",
            format!("{}/{}", e.segment, e.segment_count),
            "segment must be < segment_count <= 256",
        ));
    }
    if e.row_count == 0 || e.row_count % e.group_size != 0 {
        return Err(bad(
            s,
            i,
            "row_count",
            e.row_count,
            "must be a positive multiple of group_size",
        ));
    }
    let (weights, aux) = segment_part_lens(
        hidden,
        e.row_count,
        e.bits,
        e.group_size,
        e.scale_dtype,
        e.mode,
    )
    .and_then(|(w, a)| {
        let b = expert_bias_len(hidden, e.row_count, e.segment == 0, e.bias_dtype)?;
        Some((w, a.checked_add(b)?))
    })
    .ok_or_else(|| {
        bad(
            s,
            i,
            "row_count",
            e.row_count,
            "hidden size and rows must be multiples of group_size",
        )
    })?;
    if e.weights_decoded_len != weights {
        return Err(bad(
            s,
            i,
            "weights_decoded_len",
            e.weights_decoded_len,
            "must equal rows * hidden * (gate + up + down bits) / 8",
        ));
    }
    if e.decoded_len.checked_sub(e.weights_decoded_len) != Some(aux) {
        return Err(bad(
            s,
            i,
            "decoded_len",
            e.decoded_len,
            "the AUX part's scales, quantization biases and expert biases do not add up (§6.1, §6.4)",
        ));
    }
    if e.weights_stored_len > e.stored_len {
        return Err(bad(
            s,
            i,
            "weights_stored_len",
            e.weights_stored_len,
            "larger than stored_len",
        ));
    }
    if e.weight_codec == codec_id::RAW && e.weights_stored_len != e.weights_decoded_len {
        return Err(bad(
            s,
            i,
            "weights_stored_len",
            e.weights_stored_len,
            "raw weights store exactly their decoded bytes",
        ));
    }
    if e.aux_codec == codec_id::RAW && e.stored_len - e.weights_stored_len != aux {
        return Err(bad(
            s,
            i,
            "stored_len",
            e.stored_len,
            "raw scales and biases store exactly their decoded bytes",
        ));
    }
    let expected_start = match prev {
        Some(p) if p.key() >= e.key() => {
            return Err(bad(
                s,
                i,
                "key",
                format!("{:?}", e.key()),
                "entries must be sorted by (layer, expert, segment) without duplicates",
            ));
        }
        Some(p) if (p.layer, p.expert) == (e.layer, e.expert) => {
            if e.segment != p.segment + 1
                || (
                    p.segment_count,
                    p.bits,
                    p.group_size,
                    p.scale_dtype,
                    p.mode,
                    p.bias_dtype,
                ) != (
                    e.segment_count,
                    e.bits,
                    e.group_size,
                    e.scale_dtype,
                    e.mode,
                    e.bias_dtype,
                )
            {
                return Err(bad(s, i, "segment", e.segment, "segments of one expert must be consecutive and share count, bits, group size, scale dtype and bias dtype"));
            }
            p.row_start + p.row_count
        }
        Some(p) => {
            if p.segment + 1 != p.segment_count {
                return Err(bad(
                    s,
                    i - 1,
                    "segment",
                    p.segment,
                    "the expert's last segments are missing",
                ));
            }
            if e.segment != 0 {
                return Err(bad(
                    s,
                    i,
                    "segment",
                    e.segment,
                    "an expert's first segment must be 0",
                ));
            }
            0
        }
        None if e.segment != 0 => {
            return Err(bad(
                s,
                i,
                "segment",
                e.segment,
                "an expert's first segment must be 0",
            ));
        }
        None => 0,
    };
    if e.row_start != expected_start {
        return Err(bad(
            s,
            i,
            "row_start",
            e.row_start,
            "segments must tile the rows in order",
        ));
    }
    let end = e.row_start.checked_add(e.row_count);
    let last = e.segment + 1 == e.segment_count;
    if end.is_none_or(|end| end > intermediate || (last && end != intermediate)) {
        return Err(bad(
            s,
            i,
            "row_count",
            e.row_count,
            "segments must end exactly at the intermediate size",
        ));
    }
    Ok(())
}
