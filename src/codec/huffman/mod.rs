//! Canonical Huffman coding of bytes, in interleaved LSB-first bitstreams (formats/codecs-v1.md §2).
//!
//! In: any bytes (for quantized experts: MLX packed words, so one byte is two 4-bit codes, four
//! 2-bit codes or one 8-bit code). Out: a self-describing segment (code lengths, decoded length,
//! stream sizes, streams). Invariant: `decode(encode(x)) == x` for every `x`, and decoding
//! arbitrary bytes either fills the output exactly or returns a typed error: every code table
//! the decoder accepts is complete, so no bit pattern is undecodable, and every stream must end
//! exactly at its stored length.
//!
//! Why bytes and not 4-bit codes as symbols: docs/decisions/0002-huffman-symbols.md.

mod decode;
mod encode;
mod lengths;

pub use decode::{HuffmanDecoder, Progressive};
pub use encode::encode;
pub use lengths::{canonical_codes_reversed, code_lengths};

use super::CodecError;

/// Symbols per alphabet: bytes. formats/codecs-v1.md §2.1.
pub const SYMBOLS: usize = 256;
/// Longest code the format allows: the decoder resolves any code with one lookup in a table of
/// `1 << MAX_CODE_LEN` entries (4 KiB of u16, well inside L1). formats/codecs-v1.md §2.2.
pub const MAX_CODE_LEN: u8 = 11;
/// Most interleaved streams a segment may have. formats/codecs-v1.md §2.3.
pub const MAX_STREAMS: usize = 16;
/// Streams the encoder writes by default. Decoding is bound by the latency of each stream's
/// lookup chain, so more streams decode faster until their state no longer fits in registers:
/// on x86-64 (per CPU-second), 4 streams 1.43 GB/s, 5: 1.65, 6: 1.79, 7: 1.87, 8: 1.09 (spills).
/// Measured in docs/decisions/0002-huffman-symbols.md.
pub const DEFAULT_STREAMS: usize = 7;

/// The parsed fixed part of a Huffman segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub lens: [u8; SYMBOLS],
    pub decoded_len: usize,
    pub stream_lens: [usize; MAX_STREAMS],
    pub streams: usize,
    /// Offset of the first stream byte in the segment.
    pub data_start: usize,
}

/// Bytes of output each stream produces: stream `s` covers `[s * q, min(n, (s + 1) * q))` with
/// `q = ceil(n / streams)`. formats/codecs-v1.md §2.3.
pub fn stream_quota(decoded_len: usize, streams: usize) -> usize {
    decoded_len.div_ceil(streams)
}

/// Parse and validate a segment's header: code lengths (complete code, none over
/// `MAX_CODE_LEN`), decoded length, stream count and stream sizes (which must add up to the
/// segment's remaining bytes exactly).
pub fn parse_header(src: &[u8]) -> Result<Header, CodecError> {
    parse_header_of(src, src.len())
}

/// [`parse_header`] of a segment of `seg_len` bytes of which only the first `src.len()` (at
/// least the header) are at hand: a segment still being read.
pub fn parse_header_of(src: &[u8], seg_len: usize) -> Result<Header, CodecError> {
    let need = |needed: usize| -> Result<(), CodecError> {
        if src.len() < needed {
            Err(CodecError::Truncated {
                needed,
                available: src.len(),
            })
        } else {
            Ok(())
        }
    };
    need(2)?;
    let streams = src[0] as usize;
    if streams == 0 || streams > MAX_STREAMS {
        return Err(CodecError::BadHeader {
            field: "streams",
            value: streams as u64,
        });
    }
    let nsym = src[1] as usize + 1;
    let len_bytes = nsym.div_ceil(2);
    let mut pos = 2;
    need(pos + len_bytes)?;
    let mut lens = [0u8; SYMBOLS];
    for (s, l) in lens.iter_mut().enumerate().take(nsym) {
        let byte = src[pos + s / 2];
        *l = if s % 2 == 0 { byte & 15 } else { byte >> 4 };
    }
    if nsym % 2 == 1 && src[pos + len_bytes - 1] >> 4 != 0 {
        return Err(CodecError::BadTable {
            reason: "the unused high nibble of the last length byte is not zero",
        });
    }
    pos += len_bytes;
    check_lengths(&lens)?;

    need(pos + 4 + 4 * streams)?;
    let decoded_len = read_u32(src, pos) as usize;
    pos += 4;
    let mut stream_lens = [0usize; MAX_STREAMS];
    let mut total: usize = 0;
    for l in stream_lens.iter_mut().take(streams) {
        *l = read_u32(src, pos) as usize;
        pos += 4;
        total = total.checked_add(*l).ok_or(CodecError::BadHeader {
            field: "stream_len",
            value: *l as u64,
        })?;
    }
    let end = pos.checked_add(total).ok_or(CodecError::BadHeader {
        field: "stream_len",
        value: total as u64,
    })?;
    if end > seg_len {
        return Err(CodecError::Truncated {
            needed: end,
            available: seg_len,
        });
    }
    if end < seg_len {
        return Err(CodecError::TrailingBytes {
            used: end,
            len: seg_len,
        });
    }
    Ok(Header {
        lens,
        decoded_len,
        stream_lens,
        streams,
        data_start: pos,
    })
}

/// A table is valid when no length exceeds `MAX_CODE_LEN` and the code is complete
/// (Kraft sum exactly 1), which also implies at least two used symbols.
pub fn check_lengths(lens: &[u8; SYMBOLS]) -> Result<(), CodecError> {
    let mut kraft: u64 = 0;
    for &l in lens.iter() {
        if l > MAX_CODE_LEN {
            return Err(CodecError::BadTable {
                reason: "a code length exceeds 11 bits",
            });
        }
        if l > 0 {
            kraft += 1u64 << (MAX_CODE_LEN - l);
        }
    }
    match kraft.cmp(&(1u64 << MAX_CODE_LEN)) {
        std::cmp::Ordering::Equal => Ok(()),
        std::cmp::Ordering::Less => Err(CodecError::BadTable {
            reason:
                "incomplete code: Kraft sum below 1 (some bit patterns would decode to nothing)",
        }),
        std::cmp::Ordering::Greater => Err(CodecError::BadTable {
            reason: "oversubscribed code: Kraft sum above 1 (not a prefix code)",
        }),
    }
}

fn read_u32(src: &[u8], pos: usize) -> u32 {
    u32::from_le_bytes([src[pos], src[pos + 1], src[pos + 2], src[pos + 3]])
}

/// Size in bytes of the header for a table whose last used symbol is `last` and `streams` streams.
pub fn header_len(last: u8, streams: usize) -> usize {
    2 + (last as usize + 1).div_ceil(2) + 4 + 4 * streams
}
