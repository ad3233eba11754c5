//! Fuzz the codec decoders with arbitrary stored bytes, tables and output sizes.
//!
//! Input layout: byte 0 picks the mode and codec; bytes 1..4 give the output length (up to
//! 1 MiB); the rest is the stored segment. Mode "decode" feeds it to the decoder as is: the
//! result must be Ok(dst.len()) or a typed error, never a panic or an out-of-bounds access.
//! Mode "round trip" treats the rest as data instead: every codec must give it back exactly.
//! Mode "damage" encodes the first part of the rest with Huffman, applies the second part as
//! (offset, xor) edits to the stored bytes, and decodes: valid tables with corrupt streams are
//! what random bytes almost never reach.
#![no_main]

use flashpack::codec::{encode, Codec, CodecId, Decoder};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    if input.len() < 4 {
        return;
    }
    let mode = input[0];
    let len = u32::from_le_bytes([input[1], input[2], input[3], 0]) as usize % (1 << 20);
    let rest = &input[4..];
    let mut dec = Decoder::new();
    if mode & 0xc0 == 0x40 {
        let split = (len % (rest.len() + 1)).min(rest.len());
        let (data, edits) = rest.split_at(split);
        let mut seg = Vec::new();
        flashpack::codec::huffman::encode(data, 1 + (mode as usize & 15), &mut seg).expect("small input");
        for e in edits.chunks_exact(3) {
            let at = u16::from_le_bytes([e[0], e[1]]) as usize;
            if let Some(b) = seg.get_mut(at) {
                *b ^= e[2];
            }
        }
        let mut dst = vec![0u8; data.len()];
        if let Ok(n) = dec.decode_into(CodecId::Huffman, &seg, &mut dst) {
            assert_eq!(n, data.len());
        }
    } else if mode & 0x80 == 0 {
        let id = CodecId::ALL[(mode & 3) as usize];
        let mut dst = vec![0u8; len];
        if let Ok(n) = dec.decode_into(id, rest, &mut dst) {
            assert_eq!(n, len);
        }
    } else {
        let codec = match mode & 3 {
            0 => Codec::Raw,
            1 => Codec::Huffman,
            2 => Codec::Zstd { level: 1 },
            _ => Codec::Lz4,
        };
        let mut out = Vec::new();
        let id = encode(codec, 4, rest, &mut out).expect("inputs under 4 GiB encode");
        let mut dst = vec![0u8; rest.len()];
        dec.decode_into(id, &out, &mut dst).expect("own output decodes");
        assert_eq!(dst, rest);
    }
});
