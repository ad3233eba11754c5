//! Huffman encoder: bytes in, one Huffman segment (formats/codecs-v1.md §2) appended to `out`.
//!
//! Invariant: the output is a pure function of (`src`, `streams`): frequencies, package-merge
//! lengths with symbol-order tie breaks and canonical codes leave no choice open.

use super::{
    canonical_codes_reversed, code_lengths, stream_quota, MAX_CODE_LEN, MAX_STREAMS, SYMBOLS,
};
use crate::codec::CodecError;

/// Append the Huffman segment of `src` split into `streams` interleaved streams to `out`.
pub fn encode(src: &[u8], streams: usize, out: &mut Vec<u8>) -> Result<(), CodecError> {
    if streams == 0 || streams > MAX_STREAMS {
        return Err(CodecError::BadHeader {
            field: "streams",
            value: streams as u64,
        });
    }
    let n = u32::try_from(src.len()).map_err(|_| CodecError::InputTooLarge {
        len: src.len(),
        max: u32::MAX as usize,
    })?;
    let freq = histogram(src);
    let lens = code_lengths(&freq, MAX_CODE_LEN);
    let codes = canonical_codes_reversed(&lens);
    // code bits in the low 16, length in the high 16: one load per symbol while encoding.
    let mut book = [0u32; SYMBOLS];
    for s in 0..SYMBOLS {
        book[s] = codes[s] as u32 | (lens[s] as u32) << 16;
    }

    let last = (0..SYMBOLS).rev().find(|&s| lens[s] > 0).unwrap_or(0);
    out.push(streams as u8);
    out.push(last as u8);
    for pair in lens[..=last].chunks(2) {
        let hi = pair.get(1).copied().unwrap_or(0);
        out.push(pair[0] | hi << 4);
    }
    out.extend_from_slice(&n.to_le_bytes());
    let sizes_at = out.len();
    out.resize(sizes_at + 4 * streams, 0);

    let q = stream_quota(src.len(), streams).max(1);
    let mut chunks = src.chunks(q);
    for s in 0..streams {
        let start = out.len();
        write_stream(chunks.next().unwrap_or(&[]), &book, out);
        let len = (out.len() - start) as u32;
        out[sizes_at + 4 * s..sizes_at + 4 * s + 4].copy_from_slice(&len.to_le_bytes());
    }
    Ok(())
}

/// Byte frequencies, counted in four interleaved tables so that runs of one byte value do not
/// serialise on a single counter.
pub fn histogram(src: &[u8]) -> [u64; SYMBOLS] {
    let mut t = [[0u32; SYMBOLS]; 4];
    let mut total = [0u64; SYMBOLS];
    // Blocks of 2^30 bytes keep every u32 counter below 2^28, so the sums below cannot overflow.
    for block in src.chunks(1 << 30) {
        let mut quads = block.chunks_exact(4);
        for q in &mut quads {
            t[0][q[0] as usize] += 1;
            t[1][q[1] as usize] += 1;
            t[2][q[2] as usize] += 1;
            t[3][q[3] as usize] += 1;
        }
        for &b in quads.remainder() {
            t[0][b as usize] += 1;
        }
        for s in 0..SYMBOLS {
            total[s] += (t[0][s] + t[1][s]) as u64 + (t[2][s] + t[3][s]) as u64;
        }
        t = [[0u32; SYMBOLS]; 4];
    }
    total
}

/// LSB-first bit writer: the first code goes into the lowest bits of the first byte; the last
/// byte is padded with zero bits. Four codes (at most 44 bits) are added to the 64-bit
/// accumulator between flushes, and each flush stores 8 bytes and advances by the whole bytes
/// filled, so there is no data-dependent branch per symbol.
fn write_stream(src: &[u8], book: &[u32; SYMBOLS], out: &mut Vec<u8>) {
    let start = out.len();
    // Worst case: every code 11 bits, plus 8 bytes of slack for the last 8-byte store.
    out.resize(start + src.len() * MAX_CODE_LEN as usize / 8 + 16, 0);
    let buf = &mut out[start..];
    let mut pos = 0usize;
    let mut acc: u64 = 0;
    let mut nbits: u32 = 0;
    let put = |b: u8, acc: &mut u64, nbits: &mut u32| {
        let e = book[b as usize];
        *acc |= ((e & 0xffff) as u64) << *nbits;
        *nbits += e >> 16;
    };
    let mut quads = src.chunks_exact(4);
    for q in &mut quads {
        for &b in q {
            put(b, &mut acc, &mut nbits);
        }
        buf[pos..pos + 8].copy_from_slice(&acc.to_le_bytes());
        let whole = nbits & !7;
        pos += (whole >> 3) as usize;
        acc >>= whole; // whole <= 48: at most 7 + 4 * 11 bits were held
        nbits -= whole;
    }
    for &b in quads.remainder() {
        put(b, &mut acc, &mut nbits);
    }
    // At most 7 + 3 * 11 = 40 bits remain.
    buf[pos..pos + 8].copy_from_slice(&acc.to_le_bytes());
    pos += nbits.div_ceil(8) as usize;
    out.truncate(start + pos);
}
