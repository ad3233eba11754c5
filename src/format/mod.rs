//! The `.flashpack` v1 format in code: formats/flashpack-v1.md.
//!
//! Shared by the writer and the reader; no MLX, no threads, no I/O policy beyond the
//! temp-file-and-rename writer. Every constant names the spec section that defines it.

mod directory;
mod error;
mod header;
pub mod layout;
pub mod metadata;
mod pieces;
mod read;
pub mod tempfiles;
mod verify;
mod write;

pub use directory::{
    dir_len, ExpertEntry, ProjBits, TensorEntry, EXPERT_ENTRY_SIZE, TENSOR_ENTRY_SIZE,
};
pub use error::PackError;
pub use header::{Header, SectionEntry, SectionKind, HEADER_SIZE, SECTION_ENTRY_SIZE};
pub use metadata::{Metadata, RoutingTrace};
pub use pieces::{open_pieces, Check, Piece, MAX_HEADER_LEN};
pub use read::Pack;
pub use verify::{Damage, VerifyReport};
pub use write::{ExpertSegmentDesc, PackSummary, PackWriter, TensorDesc};

/// formats/flashpack-v1.md §2.1
pub const MAGIC: [u8; 8] = *b"\x89FPACK\r\n";
/// formats/flashpack-v1.md §2.1
pub const MAJOR_VERSION: u16 = 1;
/// formats/flashpack-v1.md §2.1
pub const MINOR_VERSION: u16 = 3;
/// formats/flashpack-v1.md §2.1: the Apple Silicon page.
pub const DEFAULT_PAGE_SIZE: u32 = 16 * 1024;
/// formats/flashpack-v1.md §2.1
pub const MIN_PAGE_SIZE: u32 = 4 * 1024;
/// formats/flashpack-v1.md §2.1
pub const MAX_PAGE_SIZE: u32 = 64 * 1024;
/// formats/flashpack-v1.md §2.1
pub const MAX_SECTIONS: u32 = 64;
/// formats/flashpack-v1.md §4: readers may refuse larger metadata.
pub const MAX_METADATA_LEN: u64 = 1 << 30;
/// formats/flashpack-v1.md §5: alignment of dense tensors chosen by the reference writer.
pub const TENSOR_ALIGN: u64 = 64;

/// Required feature flags, formats/flashpack-v1.md §2.2.
pub mod required {
    pub const CODEC_HUFFMAN: u64 = 1 << 0;
    pub const CODEC_ZSTD: u64 = 1 << 1;
    pub const CODEC_LZ4: u64 = 1 << 2;
    pub const MERGED_EXPERTS: u64 = 1 << 3;
    pub const VERTICAL_SEGMENTS: u64 = 1 << 4;
    pub const MIXED_EXPERT_BITS: u64 = 1 << 5;
    /// formats/flashpack-v1.md §6.1, format 1.1: an expert's projections have their own bits.
    pub const PROJECTION_BITS: u64 = 1 << 6;
    /// formats/flashpack-v1.md §7.3, format 1.1: some tensor or expert uses a microscaling
    /// quantization mode (mxfp4, mxfp8).
    pub const MX_MODES: u64 = 1 << 7;
    /// formats/flashpack-v1.md §6.4, format 1.2: some expert carries biases on its projections.
    pub const EXPERT_BIASES: u64 = 1 << 8;
    /// formats/flashpack-v1.md §7.3, format 1.3: some tensor or expert uses nvfp4 (a 1.2
    /// reader knows `MX_MODES` but not its mode code).
    pub const NVFP4: u64 = 1 << 9;
    /// Every required flag this reader implements.
    pub const KNOWN: u64 = (1 << 10) - 1;
}

/// Optional feature flags, formats/flashpack-v1.md §2.2.
pub mod optional {
    pub const EXPERT_PROFILE: u64 = 1 << 0;
    pub const CHAT_TEMPLATE: u64 = 1 << 1;
}

/// Codec ids, formats/flashpack-v1.md §7.2 (stream formats in formats/codecs-v1.md).
pub mod codec_id {
    pub const RAW: u8 = 0;
    pub const HUFFMAN: u8 = 1;
    pub const ZSTD: u8 = 2;
    pub const LZ4: u8 = 3;

    /// The required feature flag a codec needs, or `None` for an unknown codec.
    pub fn required_flag(codec: u8) -> Option<u64> {
        match codec {
            RAW => Some(0),
            HUFFMAN => Some(super::required::CODEC_HUFFMAN),
            ZSTD => Some(super::required::CODEC_ZSTD),
            LZ4 => Some(super::required::CODEC_LZ4),
            _ => None,
        }
    }

    pub fn name(codec: u8) -> &'static str {
        match codec {
            RAW => "raw",
            HUFFMAN => "huffman",
            ZSTD => "zstd",
            LZ4 => "lz4",
            _ => "unknown",
        }
    }
}

/// Element types, formats/flashpack-v1.md §7.1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32 = 0,
    F16 = 1,
    BF16 = 2,
    U32 = 3,
    I32 = 4,
    U8 = 5,
}

impl DType {
    pub fn from_code(code: u8) -> Option<DType> {
        Some(match code {
            0 => DType::F32,
            1 => DType::F16,
            2 => DType::BF16,
            3 => DType::U32,
            4 => DType::I32,
            5 => DType::U8,
            _ => return None,
        })
    }

    pub fn size(self) -> u64 {
        match self {
            DType::F32 | DType::U32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::U8 => 1,
        }
    }

    /// Whether this dtype can hold quantization scales and biases.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16)
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::U32 => "u32",
            DType::I32 => "i32",
            DType::U8 => "u8",
        }
    }
}

pub use crate::quant_mode::QuantMode;

/// Whether `bits`, `group_size` and the scale type go with `mode` (formats/flashpack-v1.md §7.3).
pub fn mode_accepts(mode: QuantMode, bits: u8, group_size: u32, scale_dtype: DType) -> bool {
    match mode.fixed() {
        None => valid_bits(bits) && valid_group_size(group_size) && scale_dtype.is_float(),
        Some(fixed) => (bits, group_size) == fixed && scale_dtype == DType::U8,
    }
}

/// Bits per code a v1 reader accepts, formats/flashpack-v1.md §6.1.
pub fn valid_bits(bits: u8) -> bool {
    matches!(bits, 2 | 3 | 4 | 5 | 6 | 8)
}

/// Quantization group sizes a v1 reader accepts, formats/flashpack-v1.md §6.1.
pub fn valid_group_size(group_size: u32) -> bool {
    matches!(group_size, 32 | 64 | 128)
}

/// Whether `group_size` may appear with `mode`: affine's sizes, or the one a fixed mode has (16
/// for nvfp4, §7.3). Whether a fixed mode's bits and group size match is `mode_accepts`'s
/// check, reported as the mode's.
pub fn valid_group_size_in(mode: QuantMode, group_size: u32) -> bool {
    valid_group_size(group_size) || mode.fixed().is_some_and(|(_, g)| g == group_size)
}

/// Whether `page_size` is allowed, formats/flashpack-v1.md §2.1.
pub fn valid_page_size(page_size: u32) -> bool {
    page_size.is_power_of_two() && (MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&page_size)
}

/// Decoded sizes of one expert segment's two parts, formats/flashpack-v1.md §6.1-6.2.
/// `None` when the sizes overflow u64 or the shapes do not divide.
pub fn segment_part_lens(
    hidden: u32,
    rows: u32,
    bits: ProjBits,
    group_size: u32,
    scale_dtype: DType,
    mode: QuantMode,
) -> Option<(u64, u64)> {
    let (h, r, g) = (hidden as u64, rows as u64, group_size as u64);
    if g == 0 || h % g != 0 || r % g != 0 {
        return None;
    }
    let weights = r.checked_mul(h)?.checked_mul(bits.sum())? / 8;
    let aux = (3 * mode.aux_arrays())
        .checked_mul(r)?
        .checked_mul(h / g)?
        .checked_mul(scale_dtype.size())?;
    Some((weights, aux))
}

/// Bytes of a segment's expert biases (formats/flashpack-v1.md §6.4, format 1.2): the gate and
/// up biases of its `rows` rows, and in the expert's first segment the `hidden` down biases, in
/// `dtype`; 0 for an expert without biases (`None`).
pub fn expert_bias_len(
    hidden: u32,
    rows: u32,
    first_segment: bool,
    dtype: Option<DType>,
) -> Option<u64> {
    let Some(dtype) = dtype else { return Some(0) };
    let down = if first_segment { hidden as u64 } else { 0 };
    (2 * rows as u64)
        .checked_add(down)?
        .checked_mul(dtype.size())
}

pub(crate) fn align_up(x: u64, align: u64) -> Option<u64> {
    debug_assert!(align.is_power_of_two());
    x.checked_add(align - 1).map(|v| v & !(align - 1))
}
