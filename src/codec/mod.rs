//! Byte codecs for pack segments: raw, canonical Huffman, zstd and lz4 (formats/codecs-v1.md).
//!
//! In: bytes (MLX packed quantization codes, or scale/bias bytes) and a codec choice.
//! Out: stored bytes plus the `CodecId` actually used; `Decoder::decode_into` turns stored
//! bytes back into exactly `dst.len()` bytes. Invariants: codecs know nothing about models;
//! encoding is deterministic (same input and choice, same bytes); decoding never allocates on
//! the hot path, never panics, and reports malformed input as a typed `CodecError`.

pub mod entropy;
pub mod huffman;

use huffman::HuffmanDecoder;

/// Codec ids as stored on disk. formats/codecs-v1.md §1; formats/flashpack-v1.md §7.2.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CodecId {
    Raw = 0,
    Huffman = 1,
    Zstd = 2,
    Lz4 = 3,
}

impl CodecId {
    pub const ALL: [CodecId; 4] = [CodecId::Raw, CodecId::Huffman, CodecId::Zstd, CodecId::Lz4];

    pub fn name(self) -> &'static str {
        match self {
            CodecId::Raw => "raw",
            CodecId::Huffman => "huffman",
            CodecId::Zstd => "zstd",
            CodecId::Lz4 => "lz4",
        }
    }
}

impl TryFrom<u8> for CodecId {
    type Error = CodecError;
    fn try_from(id: u8) -> Result<Self, CodecError> {
        match id {
            0 => Ok(CodecId::Raw),
            1 => Ok(CodecId::Huffman),
            2 => Ok(CodecId::Zstd),
            3 => Ok(CodecId::Lz4),
            _ => Err(CodecError::UnknownCodec { id }),
        }
    }
}

impl From<CodecId> for u8 {
    fn from(id: CodecId) -> u8 {
        id as u8
    }
}

/// An encoder choice: a codec with its parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Raw,
    Huffman,
    Zstd { level: i32 },
    Lz4,
}

impl Codec {
    pub fn id(self) -> CodecId {
        match self {
            Codec::Raw => CodecId::Raw,
            Codec::Huffman => CodecId::Huffman,
            Codec::Zstd { .. } => CodecId::Zstd,
            Codec::Lz4 => CodecId::Lz4,
        }
    }

    /// Short label: `raw`, `huffman`, `zstd-3`, `lz4`.
    pub fn label(self) -> String {
        match self {
            Codec::Zstd { level } => format!("zstd-{level}"),
            c => c.id().name().to_string(),
        }
    }
}

/// What `--codec` asks for: a fixed codec, or per-segment automatic selection.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CodecChoice {
    Auto(AutoPolicy),
    Fixed(Codec),
}

impl std::str::FromStr for CodecChoice {
    type Err = CodecError;
    /// `auto`, `raw`, `huffman`, `lz4`, `zstd` (level 3) or `zstd-N` / `zstd:N`.
    fn from_str(s: &str) -> Result<Self, CodecError> {
        let bad = || CodecError::UnknownCodecName {
            name: s.to_string(),
        };
        Ok(match s {
            "auto" => CodecChoice::Auto(AutoPolicy::default()),
            "raw" => CodecChoice::Fixed(Codec::Raw),
            "huffman" => CodecChoice::Fixed(Codec::Huffman),
            "lz4" => CodecChoice::Fixed(Codec::Lz4),
            "zstd" => CodecChoice::Fixed(Codec::Zstd {
                level: DEFAULT_ZSTD_LEVEL,
            }),
            _ => {
                let level = s
                    .strip_prefix("zstd-")
                    .or_else(|| s.strip_prefix("zstd:"))
                    .ok_or_else(bad)?;
                let level: i32 = level.parse().map_err(|_| bad())?;
                if !(1..=22).contains(&level) {
                    return Err(bad());
                }
                CodecChoice::Fixed(Codec::Zstd { level })
            }
        })
    }
}

/// zstd level used when none is given.
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;

/// How `encode_auto` chooses. Deterministic: it compares sizes, never timings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AutoPolicy {
    /// zstd is a candidate (at this level) only when set. Off by default: on quantization codes
    /// zstd is Huffman with a slower decoder (docs/benchmarks.md, "Codecs").
    pub zstd_level: Option<i32>,
    /// A coded form must be at least this fraction smaller than raw, else raw is stored:
    /// a saving below it does not pay for the decode work.
    pub min_saving: f64,
    /// zstd must be this fraction smaller than the best faster candidate to be chosen, since it
    /// decodes slower than Huffman and lz4.
    pub zstd_min_advantage: f64,
}

/// `auto`'s bar for expert segments: coded experts are kept only when they are at least this
/// much smaller than raw. Experts are read and decoded on the critical path of a cache miss,
/// where a decode costs more than the read its saving spares: measured on the H100 machine
/// (`flashpack bench io`, docs/decisions/0014-raw-experts.md), a 4-bit expert that Huffman
/// makes 7% smaller loads in 2.5x the time of a plain read of it, the raw one in 1.0x. Dense
/// tensors, read once at start, keep `min_saving`.
pub const EXPERT_MIN_SAVING: f64 = 0.25;

impl AutoPolicy {
    /// This policy for expert segments: `min_saving` raised to [`EXPERT_MIN_SAVING`].
    pub fn for_experts(self) -> AutoPolicy {
        AutoPolicy {
            min_saving: self.min_saving.max(EXPERT_MIN_SAVING),
            ..self
        }
    }
}

impl Default for AutoPolicy {
    fn default() -> Self {
        Self {
            zstd_level: None,
            min_saving: 0.01,
            zstd_min_advantage: 0.05,
        }
    }
}

/// Everything that can go wrong encoding or decoding. Messages say what to check.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum CodecError {
    #[error("unknown codec id {id} (known: 0 raw, 1 huffman, 2 zstd, 3 lz4); the pack may be newer than this reader")]
    UnknownCodec { id: u8 },
    #[error(
        "unknown codec name {name:?}: use auto, raw, huffman, lz4, zstd or zstd-N (N in 1..=22)"
    )]
    UnknownCodecName { name: String },
    #[error("stored segment truncated: needs {needed} bytes, has {available}")]
    Truncated { needed: usize, available: usize },
    #[error("stored segment has trailing bytes: {used} of {len} bytes used")]
    TrailingBytes { used: usize, len: usize },
    #[error("bad Huffman table: {reason}")]
    BadTable { reason: &'static str },
    #[error("bad header field {field} = {value}")]
    BadHeader { field: &'static str, value: u64 },
    #[error("decoded length mismatch: the caller expects {expected} bytes, the stored segment holds {got}")]
    LengthMismatch { expected: usize, got: usize },
    #[error("Huffman stream {stream} is corrupt: it decodes {consumed_bits} bits but stores {stored_bytes} bytes")]
    StreamLength {
        stream: usize,
        consumed_bits: usize,
        stored_bytes: usize,
    },
    #[error("input of {len} bytes is larger than a segment may be ({max} bytes); split it")]
    InputTooLarge { len: usize, max: usize },
    #[error(
        "{codec} output does not round-trip (segment {segment}): a codec bug, please report it"
    )]
    RoundTrip { codec: String, segment: usize },
    #[error("{codec} failed: {message}")]
    Backend {
        codec: &'static str,
        message: String,
    },
}

/// Encode `src` with `codec`, appending the stored bytes to `out`, and return the codec actually
/// stored: `Raw` when the coded form is not smaller than `src`.
///
/// `bits` is the width of the codes packed in `src` (2, 3, 4, 5, 6 or 8 for MLX quantization
/// codes; 16 or 32 for scale/bias bytes). The codecs themselves work on bytes; `bits` is kept so
/// callers state what they store and so policies can differ by kind.
pub fn encode(
    codec: Codec,
    bits: u8,
    src: &[u8],
    out: &mut Vec<u8>,
) -> Result<CodecId, CodecError> {
    let _ = bits;
    let start = out.len();
    match codec {
        Codec::Raw => {}
        Codec::Huffman => huffman::encode(src, huffman::DEFAULT_STREAMS, out)?,
        Codec::Zstd { level } => {
            let bound = zstd::zstd_safe::compress_bound(src.len());
            out.resize(start + bound, 0);
            let n = zstd::bulk::compress_to_buffer(src, &mut out[start..], level).map_err(|e| {
                CodecError::Backend {
                    codec: "zstd",
                    message: e.to_string(),
                }
            })?;
            out.truncate(start + n);
        }
        Codec::Lz4 => {
            let n = u32::try_from(src.len()).map_err(|_| CodecError::InputTooLarge {
                len: src.len(),
                max: u32::MAX as usize,
            })?;
            out.extend_from_slice(&n.to_le_bytes());
            let at = out.len();
            out.resize(at + lz4_flex::block::get_maximum_output_size(src.len()), 0);
            let m = lz4_flex::block::compress_into(src, &mut out[at..]).map_err(|e| {
                CodecError::Backend {
                    codec: "lz4",
                    message: e.to_string(),
                }
            })?;
            out.truncate(at + m);
        }
    }
    if codec == Codec::Raw || out.len() - start >= src.len() {
        out.truncate(start);
        out.extend_from_slice(src);
        return Ok(CodecId::Raw);
    }
    Ok(codec.id())
}

/// Encode with every candidate of `policy` and keep the smallest acceptable one (see
/// `AutoPolicy`); returns the codec stored. `scratch` is reused between calls.
pub fn encode_auto(
    bits: u8,
    src: &[u8],
    out: &mut Vec<u8>,
    policy: &AutoPolicy,
    scratch: &mut Vec<u8>,
) -> Result<CodecId, CodecError> {
    let limit = src.len() as f64 * (1.0 - policy.min_saving);
    let start = out.len();
    // The best candidate so far lives in out[start..]; each candidate is encoded once.
    let mut best: Option<(CodecId, usize)> = None;
    if encode(Codec::Huffman, bits, src, out)? == CodecId::Huffman {
        best = Some((CodecId::Huffman, out.len() - start));
    } else {
        out.truncate(start);
    }
    let mut candidates = vec![(Codec::Lz4, 0.0)];
    if let Some(level) = policy.zstd_level {
        candidates.push((Codec::Zstd { level }, policy.zstd_min_advantage));
    }
    for (codec, advantage) in candidates {
        scratch.clear();
        if encode(codec, bits, src, scratch)? != codec.id() {
            continue;
        }
        // Fast candidates must be strictly smaller; slower ones by `advantage` as well.
        let bar = best.map_or(f64::INFINITY, |(_, b)| b as f64 * (1.0 - advantage));
        if (scratch.len() as f64) < bar {
            out.truncate(start);
            out.extend_from_slice(scratch);
            best = Some((codec.id(), scratch.len()));
        }
    }
    match best {
        Some((id, len)) if (len as f64) <= limit => Ok(id),
        _ => {
            out.truncate(start);
            out.extend_from_slice(src);
            Ok(CodecId::Raw)
        }
    }
}

/// A reusable decoder for every codec: holds the Huffman table and the zstd context, so
/// decoding a segment allocates nothing after the first zstd segment.
#[derive(Default)]
pub struct Decoder {
    huffman: HuffmanDecoder,
    zstd: Option<zstd::bulk::Decompressor<'static>>,
}

impl Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// The Huffman decoder, for decoding a segment while it arrives
    /// ([`huffman::HuffmanDecoder::start`]).
    pub fn huffman(&mut self) -> &mut HuffmanDecoder {
        &mut self.huffman
    }

    /// [`Self::decode_into`], spreading one large Huffman segment's streams over the rayon
    /// pool's threads (see [`huffman::HuffmanDecoder::decode_into_parallel`]); same bytes out.
    pub fn decode_into_parallel(
        &mut self,
        codec: CodecId,
        src: &[u8],
        dst: &mut [u8],
    ) -> Result<usize, CodecError> {
        match codec {
            CodecId::Huffman => self.huffman.decode_into_parallel(src, dst),
            _ => self.decode_into(codec, src, dst),
        }
    }

    /// Decode `src` (stored with `codec`) into all of `dst`; returns `dst.len()` or an error.
    pub fn decode_into(
        &mut self,
        codec: CodecId,
        src: &[u8],
        dst: &mut [u8],
    ) -> Result<usize, CodecError> {
        match codec {
            CodecId::Raw => {
                if src.len() != dst.len() {
                    return Err(CodecError::LengthMismatch {
                        expected: dst.len(),
                        got: src.len(),
                    });
                }
                dst.copy_from_slice(src);
                Ok(dst.len())
            }
            CodecId::Huffman => self.huffman.decode_into(src, dst),
            CodecId::Lz4 => {
                if src.len() < 4 {
                    return Err(CodecError::Truncated {
                        needed: 4,
                        available: src.len(),
                    });
                }
                let n = u32::from_le_bytes([src[0], src[1], src[2], src[3]]) as usize;
                if n != dst.len() {
                    return Err(CodecError::LengthMismatch {
                        expected: dst.len(),
                        got: n,
                    });
                }
                let got = lz4_flex::block::decompress_into(&src[4..], dst).map_err(|e| {
                    CodecError::Backend {
                        codec: "lz4",
                        message: e.to_string(),
                    }
                })?;
                check_len(dst.len(), got)
            }
            CodecId::Zstd => {
                match zstd::zstd_safe::get_frame_content_size(src) {
                    Ok(Some(n)) if n != dst.len() as u64 => {
                        return Err(CodecError::LengthMismatch {
                            expected: dst.len(),
                            got: usize::try_from(n).unwrap_or(usize::MAX),
                        })
                    }
                    Ok(_) => {}
                    Err(_) => {
                        return Err(CodecError::Backend {
                            codec: "zstd",
                            message: "not a zstd frame".to_string(),
                        })
                    }
                }
                // One frame, nothing after it (formats/codecs-v1.md §3).
                match zstd::zstd_safe::find_frame_compressed_size(src) {
                    Ok(n) if n == src.len() => {}
                    Ok(n) => {
                        return Err(CodecError::TrailingBytes {
                            used: n,
                            len: src.len(),
                        })
                    }
                    Err(_) => {
                        return Err(CodecError::Backend {
                            codec: "zstd",
                            message: "truncated or corrupt zstd frame".to_string(),
                        })
                    }
                }
                let ctx = match &mut self.zstd {
                    Some(c) => c,
                    None => self
                        .zstd
                        .insert(zstd::bulk::Decompressor::new().map_err(|e| {
                            CodecError::Backend {
                                codec: "zstd",
                                message: e.to_string(),
                            }
                        })?),
                };
                let got = ctx
                    .decompress_to_buffer(src, dst)
                    .map_err(|e| CodecError::Backend {
                        codec: "zstd",
                        message: e.to_string(),
                    })?;
                check_len(dst.len(), got)
            }
        }
    }
}

fn check_len(expected: usize, got: usize) -> Result<usize, CodecError> {
    if expected != got {
        return Err(CodecError::LengthMismatch { expected, got });
    }
    Ok(got)
}
