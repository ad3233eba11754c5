//! Codec round trips (proptest) and robustness: arbitrary or damaged input gives a typed error,
//! never a panic, and never a wrong-sized output.

use flashpack::codec::huffman::{self, MAX_STREAMS};
use flashpack::codec::{
    encode, encode_auto, AutoPolicy, Codec, CodecChoice, CodecError, CodecId, Decoder,
};
use proptest::prelude::*;

const CODECS: [Codec; 5] = [
    Codec::Raw,
    Codec::Huffman,
    Codec::Lz4,
    Codec::Zstd { level: 1 },
    Codec::Zstd { level: 19 },
];

fn roundtrip(codec: Codec, data: &[u8]) -> (CodecId, Vec<u8>) {
    let mut out = Vec::new();
    let id = encode(codec, 4, data, &mut out).unwrap();
    let mut dst = vec![0u8; data.len()];
    let n = Decoder::new().decode_into(id, &out, &mut dst).unwrap();
    assert_eq!(n, data.len());
    assert_eq!(dst, data, "{codec:?} did not round-trip");
    (id, out)
}

/// Bytes drawn from a skewed distribution, like packed quantization codes (a few values common).
fn skewed(len: usize, seed: u64, spread: u32) -> Vec<u8> {
    let mut rng = Rng(seed | 1);
    (0..len)
        .map(|_| {
            // Sum of uniforms: a bell shape around 128 whose width is `spread`.
            let s: i64 = (0..4)
                .map(|_| (rng.next() % (spread as u64 + 1)) as i64)
                .sum();
            (128 + s - 2 * spread as i64).clamp(0, 255) as u8
        })
        .collect()
}

/// xorshift64*: deterministic randomness for the bounded robustness tests.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn every_codec_round_trips(data in prop::collection::vec(any::<u8>(), 0..5000)) {
        for c in CODECS {
            roundtrip(c, &data);
        }
    }

    #[test]
    fn huffman_round_trips_skewed(len in 0usize..70_000, seed in any::<u64>(), spread in 0u32..64) {
        let data = skewed(len, seed, spread);
        let (id, out) = roundtrip(Codec::Huffman, &data);
        // Deterministic: the same input gives the same bytes.
        let mut again = Vec::new();
        prop_assert_eq!(encode(Codec::Huffman, 4, &data, &mut again).unwrap(), id);
        prop_assert_eq!(again, out);
    }

    #[test]
    fn huffman_any_stream_count(data in prop::collection::vec(0u8..6, 0..3000), streams in 1usize..=MAX_STREAMS) {
        let mut out = Vec::new();
        huffman::encode(&data, streams, &mut out).unwrap();
        let mut dst = vec![0u8; data.len()];
        Decoder::new().decode_into(CodecId::Huffman, &out, &mut dst).unwrap();
        prop_assert_eq!(dst, data);
    }

    #[test]
    fn auto_round_trips_and_is_never_larger_than_raw(len in 0usize..20_000, seed in any::<u64>(), spread in 0u32..128) {
        let data = skewed(len, seed, spread);
        let mut out = Vec::new();
        let mut scratch = Vec::new();
        let policy = AutoPolicy { zstd_level: Some(3), ..AutoPolicy::default() };
        let id = encode_auto(4, &data, &mut out, &policy, &mut scratch).unwrap();
        prop_assert!(out.len() <= data.len());
        let mut dst = vec![0u8; data.len()];
        Decoder::new().decode_into(id, &out, &mut dst).unwrap();
        prop_assert_eq!(dst, data);
    }
}

#[test]
fn single_symbol_and_empty_inputs() {
    for len in [0usize, 1, 2, 7, 100, 70_000] {
        let data = vec![42u8; len];
        for c in CODECS {
            roundtrip(c, &data);
        }
        // Forced Huffman (through the codec module, not `encode`, which may fall back to raw).
        let mut out = Vec::new();
        huffman::encode(&data, 4, &mut out).unwrap();
        let mut dst = vec![0u8; len];
        Decoder::new()
            .decode_into(CodecId::Huffman, &out, &mut dst)
            .unwrap();
        assert_eq!(dst, data);
    }
}

#[test]
fn uncompressible_input_is_stored_raw() {
    let mut rng = Rng(7);
    let data: Vec<u8> = (0..10_000).map(|_| rng.next() as u8).collect();
    for c in [Codec::Huffman, Codec::Lz4, Codec::Zstd { level: 3 }] {
        let (id, out) = roundtrip(c, &data);
        assert_eq!(id, CodecId::Raw, "{c:?}");
        assert_eq!(out, data);
    }
}

#[test]
fn huffman_is_near_entropy_on_skewed_data() {
    // 256 KiB of bell-shaped bytes: the stored size must be within 1% of the order-0 bound
    // (package-merge codes limited to 11 bits plus a ~150-byte header; the 1% is the issue's
    // target for segments of 64 KiB and more).
    let data = skewed(256 * 1024, 99, 20);
    let (id, out) = roundtrip(Codec::Huffman, &data);
    assert_eq!(id, CodecId::Huffman);
    let bound = flashpack::codec::entropy::byte_entropy_bits(&data) / 8.0;
    assert!(
        (out.len() as f64) < bound * 1.01,
        "stored {} bytes, entropy bound {bound:.0}",
        out.len()
    );
}

#[test]
fn codec_ids_parse_and_reject() {
    for id in CodecId::ALL {
        assert_eq!(CodecId::try_from(id as u8), Ok(id));
    }
    assert_eq!(
        CodecId::try_from(4),
        Err(CodecError::UnknownCodec { id: 4 })
    );
    assert_eq!(
        "zstd-7".parse::<CodecChoice>(),
        Ok(CodecChoice::Fixed(Codec::Zstd { level: 7 }))
    );
    assert!(matches!(
        "zstd-99".parse::<CodecChoice>(),
        Err(CodecError::UnknownCodecName { .. })
    ));
    assert!(matches!(
        "auto".parse::<CodecChoice>(),
        Ok(CodecChoice::Auto(_))
    ));
}

fn huffman_segment(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    huffman::encode(data, 4, &mut out).unwrap();
    out
}

#[test]
fn rejects_wrong_output_length() {
    // Repeats, so that lz4 and zstd do compress it.
    let data: Vec<u8> = skewed(100, 3, 10).repeat(10);
    let seg = huffman_segment(&data);
    let mut dst = vec![0u8; 999];
    assert_eq!(
        Decoder::new().decode_into(CodecId::Huffman, &seg, &mut dst),
        Err(CodecError::LengthMismatch {
            expected: 999,
            got: 1000
        })
    );
    let mut dst = vec![0u8; 10];
    assert_eq!(
        Decoder::new().decode_into(CodecId::Raw, &data, &mut dst),
        Err(CodecError::LengthMismatch {
            expected: 10,
            got: 1000
        })
    );
    for c in [Codec::Lz4, Codec::Zstd { level: 3 }] {
        let mut out = Vec::new();
        let id = encode(c, 4, &data, &mut out).unwrap();
        assert_eq!(id, c.id());
        let mut dst = vec![0u8; 1001];
        assert!(matches!(
            Decoder::new().decode_into(id, &out, &mut dst),
            Err(CodecError::LengthMismatch {
                expected: 1001,
                got: 1000
            })
        ));
    }
}

#[test]
fn rejects_truncated_huffman() {
    let data = skewed(5000, 4, 10);
    let seg = huffman_segment(&data);
    let mut dst = vec![0u8; data.len()];
    for cut in [0, 1, 2, 50, seg.len() / 2, seg.len() - 1] {
        let r = Decoder::new().decode_into(CodecId::Huffman, &seg[..cut], &mut dst);
        assert!(
            matches!(r, Err(CodecError::Truncated { .. })),
            "cut {cut}: {r:?}"
        );
    }
    let mut longer = seg.clone();
    longer.push(0);
    assert!(matches!(
        Decoder::new().decode_into(CodecId::Huffman, &longer, &mut dst),
        Err(CodecError::TrailingBytes { .. })
    ));
}

#[test]
fn rejects_bad_tables() {
    let data = skewed(5000, 5, 10);
    let seg = huffman_segment(&data);
    let mut dst = vec![0u8; data.len()];
    // Byte 2 holds the lengths of symbols 0 and 1; all lengths 1 oversubscribe the code.
    let mut bad = seg.clone();
    for b in &mut bad[2..2 + (seg[1] as usize + 1).div_ceil(2)] {
        *b = 0x11;
    }
    assert!(matches!(
        Decoder::new().decode_into(CodecId::Huffman, &bad, &mut dst),
        Err(CodecError::BadTable { .. })
    ));
    // A length of 12 or more is over the limit.
    let mut bad = seg.clone();
    bad[2] = 0xcc;
    assert!(matches!(
        Decoder::new().decode_into(CodecId::Huffman, &bad, &mut dst),
        Err(CodecError::BadTable { .. })
    ));
    // All zero: incomplete.
    let mut bad = seg.clone();
    for b in &mut bad[2..2 + (seg[1] as usize + 1).div_ceil(2)] {
        *b = 0;
    }
    assert!(matches!(
        Decoder::new().decode_into(CodecId::Huffman, &bad, &mut dst),
        Err(CodecError::BadTable { .. })
    ));
    // Zero or too many streams.
    for s in [0u8, 17, 255] {
        let mut bad = seg.clone();
        bad[0] = s;
        assert!(matches!(
            Decoder::new().decode_into(CodecId::Huffman, &bad, &mut dst),
            Err(CodecError::BadHeader {
                field: "streams",
                ..
            })
        ));
    }
}

#[test]
fn rejects_stream_that_ends_early_or_late() {
    // Move one byte from stream 0 to stream 1 by editing the stream sizes: both streams now
    // decode past or short of their stored ends.
    let data = skewed(5000, 6, 10);
    let seg = huffman_segment(&data);
    let lens_at = 2 + (seg[1] as usize + 1).div_ceil(2) + 4;
    let read = |s: &[u8], at: usize| u32::from_le_bytes(s[at..at + 4].try_into().unwrap());
    let mut bad = seg.clone();
    let (a, b) = (read(&bad, lens_at), read(&bad, lens_at + 4));
    bad[lens_at..lens_at + 4].copy_from_slice(&(a - 1).to_le_bytes());
    bad[lens_at + 4..lens_at + 8].copy_from_slice(&(b + 1).to_le_bytes());
    let mut dst = vec![0u8; data.len()];
    let r = Decoder::new().decode_into(CodecId::Huffman, &bad, &mut dst);
    assert!(
        matches!(r, Err(CodecError::StreamLength { stream: 0, .. })),
        "{r:?}"
    );
}

/// Bounded randomized robustness (the fuzz target's property, in `cargo test`): random bytes and
/// damaged valid segments, for every codec id, into outputs of random sizes. Each call must
/// return Ok(dst.len()) or a typed error; a panic fails the test.
#[test]
fn random_and_damaged_input_never_panics() {
    let mut rng = Rng(0x0f0f_1234_5678_9abc);
    let mut dec = Decoder::new();
    let mut valid: Vec<(CodecId, Vec<u8>, usize)> = Vec::new();
    for (i, c) in CODECS.iter().enumerate() {
        for len in [0usize, 1, 33, 4096, 20_000] {
            let data = skewed(len, i as u64 * 31 + len as u64, 12);
            let mut out = Vec::new();
            let id = encode(*c, 4, &data, &mut out).unwrap();
            valid.push((id, out, len));
        }
        let data = skewed(3000, 77, 12);
        let mut out = Vec::new();
        huffman::encode(&data, 1 + i * 3, &mut out).unwrap();
        valid.push((CodecId::Huffman, out, data.len()));
    }
    let mut oks = 0;
    // FLASHPACK_ROBUSTNESS_CASES raises the count for a longer soak (`cargo test --release`).
    let cases: usize = std::env::var("FLASHPACK_ROBUSTNESS_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4000);
    for case in 0..cases {
        let (id, mut src, mut len) = if case % 2 == 0 {
            let id = CodecId::ALL[rng.below(4)];
            let n = rng.below(300);
            let src: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            (id, src, rng.below(2000))
        } else {
            valid[rng.below(valid.len())].clone()
        };
        match rng.below(5) {
            0 => {
                // Flip a few bits.
                for _ in 0..1 + rng.below(4) {
                    if !src.is_empty() {
                        let at = rng.below(src.len());
                        src[at] ^= 1 << rng.below(8);
                    }
                }
            }
            1 => {
                let cut = rng.below(src.len() + 1);
                src.truncate(cut);
            }
            2 => len = rng.below(len * 2 + 2),
            3 if !src.is_empty() => {
                // Overwrite a random run (hits tables and stream sizes).
                let at = rng.below(src.len());
                let end = (at + 1 + rng.below(16)).min(src.len());
                for b in &mut src[at..end] {
                    *b = rng.next() as u8;
                }
            }
            _ => {}
        }
        let mut dst = vec![0u8; len];
        if let Ok(n) = dec.decode_into(id, &src, &mut dst) {
            assert_eq!(n, len);
            oks += 1;
        }
    }
    // Unchanged valid segments (about a fifth of half the cases) must have decoded.
    assert!(oks > cases / 20, "only {oks} of {cases} cases decoded");
}

#[test]
fn parallel_stream_decode_gives_the_lock_step_bytes_and_errors() {
    // A pool with a thread per stream, so the parallel path runs on any machine.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(MAX_STREAMS)
        .build()
        .unwrap();
    pool.install(|| {
        let mut rng = Rng(99);
        for streams in [2, 3, 7, 8, MAX_STREAMS] {
            for len in [300 << 10, (1 << 20) + 17, 700_001] {
                let data = skewed(len, rng.next(), 1 + rng.below(40) as u32);
                let mut seg = Vec::new();
                huffman::encode(&data, streams, &mut seg).unwrap();
                let mut dst = vec![0u8; len];
                let n = Decoder::new()
                    .decode_into_parallel(CodecId::Huffman, &seg, &mut dst)
                    .unwrap();
                assert_eq!(n, len);
                assert_eq!(dst, data, "{streams} streams, {len} bytes");
                // Damage: a flipped byte in the streams or a cut segment is an error on both
                // paths (or, for a flip that still decodes, the same wrong bytes).
                for _ in 0..20 {
                    let mut bad = seg.clone();
                    let at = rng.below(bad.len());
                    bad[at] ^= 1 << rng.below(8);
                    if rng.below(4) == 0 {
                        bad.truncate(rng.below(bad.len()));
                    }
                    let (mut a, mut b) = (vec![0u8; len], vec![0u8; len]);
                    let ra = Decoder::new().decode_into(CodecId::Huffman, &bad, &mut a);
                    let rb = Decoder::new().decode_into_parallel(CodecId::Huffman, &bad, &mut b);
                    assert_eq!(ra.is_ok(), rb.is_ok(), "flip at {at}: {ra:?} vs {rb:?}");
                    if ra.is_ok() {
                        assert_eq!(a, b);
                    }
                }
            }
        }
    });
}

/// A segment decoded while its parts arrive in any order (`HuffmanDecoder::advance`, then
/// `finish`) gives `decode_into`'s bytes, with every symbol decoded before `finish` already
/// right; damaged segments fail `finish` where `decode_into` fails.
#[test]
fn progressive_decode_in_any_arrival_order_gives_the_whole_decode() {
    let mut rng = Rng(7);
    for streams in [1, 3, 4, 7, 8] {
        for len in [5_000, 300 << 10, 700_001] {
            let data = skewed(len, rng.next(), 1 + rng.below(40) as u32);
            let mut seg = Vec::new();
            huffman::encode(&data, streams, &mut seg).unwrap();
            for (part, groups) in [(512usize, 1), (4096, 2), (65536, 3), (4096, 1), (512, 2)] {
                // Parts arrive in a random order; after each, the decoder goes as far as it can.
                // With several stream groups (one per thread in the runtime), each group is
                // advanced or not at random after each part, as lagging threads would.
                let parts = seg.len().div_ceil(part);
                let mut order: Vec<usize> = (0..parts).collect();
                for i in (1..parts).rev() {
                    order.swap(i, rng.below(i + 1));
                }
                let first = order.iter().position(|&p| p == 0).unwrap();
                order.swap(0, first); // the header first, as the runtime's order has it
                let mut arrived = vec![false; parts];
                let mut dec = huffman::HuffmanDecoder::new();
                let head = &seg[..part.min(seg.len())];
                let prog = dec.start(head, seg.len()).unwrap();
                let q = prog.quota();
                let mut progs = prog.split(groups);
                assert_eq!(progs.len(), groups.min(streams));
                assert_eq!(progs[0].stream_range().start, 0);
                assert_eq!(progs.last().unwrap().stream_range().end, streams);
                let mut dst = vec![0u8; len];
                let mut last = vec![0; progs.len()];
                for &p in &order {
                    arrived[p] = true;
                    let to = |pos: usize| {
                        let mut i = pos / part;
                        while i < parts && arrived[i] {
                            i += 1;
                        }
                        (i * part).min(seg.len()).max(pos)
                    };
                    for (g, prog) in progs.iter_mut().enumerate() {
                        if groups > 1 && rng.below(2) == 0 {
                            continue;
                        }
                        // SAFETY: `seg` is whole; `to` reports only parts marked arrived.
                        let done =
                            unsafe { dec.advance(prog, seg.as_ptr(), &to, dst.as_mut_ptr()) };
                        assert!(done >= last[g]);
                        last[g] = done;
                        for s in prog.stream_range() {
                            let (lo, hi) = ((s * q).min(len), ((s + 1) * q).min(len));
                            let n = done.min(hi - lo);
                            assert_eq!(&dst[lo..lo + n], &data[lo..lo + n], "stream {s}");
                        }
                    }
                }
                // The groups finish in reverse order, each writing only its own streams.
                for prog in progs.into_iter().rev() {
                    // SAFETY: `dst` is `len` bytes, and no other group runs beside this one.
                    unsafe { dec.finish_streams(prog, &seg, dst.as_mut_ptr()) }.unwrap();
                }
                assert_eq!(
                    dst, data,
                    "{streams} streams in {groups} groups, {len} bytes, parts of {part}"
                );
            }
            // Damage: `finish` fails exactly when the whole decode does, else the same bytes.
            for _ in 0..10 {
                let mut bad = seg.clone();
                let at = 200 + rng.below(bad.len() - 200); // past the header
                bad[at] ^= 1 << rng.below(8);
                let mut want = vec![0u8; len];
                let whole = Decoder::new().decode_into(CodecId::Huffman, &bad, &mut want);
                let mut dec = huffman::HuffmanDecoder::new();
                let mut got = vec![0u8; len];
                let prog = dec.start(&bad, bad.len()).unwrap();
                let n = bad.len();
                // In two groups: the decode fails if either group's does.
                let mut fin = Ok(());
                for mut prog in prog.split(2) {
                    // SAFETY: all of `bad` is there; `got` is `len` bytes, one group at a time.
                    unsafe { dec.advance(&mut prog, bad.as_ptr(), &|_| n, got.as_mut_ptr()) };
                    let r = unsafe { dec.finish_streams(prog, &bad, got.as_mut_ptr()) };
                    fin = fin.and(r);
                }
                assert_eq!(
                    whole.is_ok(),
                    fin.is_ok(),
                    "flip at {at}: {whole:?} vs {fin:?}"
                );
                if fin.is_ok() {
                    assert_eq!(got, want);
                }
            }
        }
    }
}
