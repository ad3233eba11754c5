//! Benchmark (not a test): our Huffman codec against the `huffman-compress` crate on the same
//! segments, for decision 0007 (docs/decisions/0007-huffman-vs-huffman-compress.md).
//!
//! Usage: `cargo bench --bench huffman_compress -- PACK...`: each pack's expert WEIGHTS parts
//! (decoded, one bench segment per pack segment) are coded by both. Per segment, each coder
//! gets its own code from that segment's byte counts. Printed: bits per code (our stored bytes
//! with header and length table; the crate's payload, and with a 128-byte table added as ours
//! would need), and single-thread decode GB/s of decoded bytes per CPU-second of the decoding
//! thread, best of `ROUNDS`.

use bit_vec::BitVec;
use flashpack::codec::{encode, Codec, CodecId, Decoder};
use flashpack::format::Pack;
use std::collections::BTreeMap;

const ROUNDS: usize = 5;
/// Our length table: 4-bit lengths of up to 256 symbols (codecs-v1.md §2).
const TABLE_BYTES: usize = 128;

fn thread_cpu() -> f64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
}

/// Best CPU seconds of `ROUNDS` runs of `f`.
fn best(mut f: impl FnMut()) -> f64 {
    (0..ROUNDS)
        .map(|_| {
            let t = thread_cpu();
            f();
            thread_cpu() - t
        })
        .fold(f64::INFINITY, f64::min)
}

/// Decoded WEIGHTS parts of `pack`'s expert segments, by the bits of their codes.
fn segments(pack: &Pack) -> BTreeMap<u8, Vec<Vec<u8>>> {
    let mut d = Decoder::new();
    let mut out: BTreeMap<u8, Vec<Vec<u8>>> = BTreeMap::new();
    for e in pack.experts() {
        let stored = pack.segment_stored(e);
        let mut w = vec![0u8; e.weights_decoded_len as usize];
        let codec = CodecId::try_from(e.weight_codec).expect("a known codec");
        d.decode_into(codec, &stored[..e.weights_stored_len as usize], &mut w)
            .expect("a valid pack");
        out.entry(e.bits.max()).or_default().push(w);
    }
    out
}

fn main() {
    let packs: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    if packs.is_empty() {
        eprintln!("usage: cargo bench --bench huffman_compress -- PACK...");
        return;
    }
    println!("| pack | bits | segments | MiB | ours bits/code | crate bits/code (payload) | crate bits/code (+128 B table) | ours decode GB/s | crate decode GB/s |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for path in packs {
        let pack = Pack::open(std::path::Path::new(&path)).expect("a pack");
        for (bits, segs) in segments(&pack) {
            let raw: usize = segs.iter().map(Vec::len).sum();
            let codes = (raw * 8 / bits as usize) as f64;

            // Ours: stored bytes as they go into a pack, then decode each segment.
            let ours: Vec<Vec<u8>> = segs
                .iter()
                .map(|s| {
                    let mut out = Vec::new();
                    let id = encode(Codec::Huffman, bits, s, &mut out).expect("encode");
                    assert_eq!(id, CodecId::Huffman);
                    out
                })
                .collect();
            let ours_bytes: usize = ours.iter().map(Vec::len).sum();
            let mut d = Decoder::new();
            let mut dst = vec![0u8; segs.iter().map(Vec::len).max().unwrap_or(0)];
            for (s, o) in segs.iter().zip(&ours) {
                d.decode_into(CodecId::Huffman, o, &mut dst[..s.len()])
                    .unwrap();
                assert_eq!(&dst[..s.len()], &s[..]);
            }
            let ours_s = best(|| {
                for (s, o) in segs.iter().zip(&ours) {
                    d.decode_into(CodecId::Huffman, o, &mut dst[..s.len()])
                        .unwrap();
                }
            });

            // The crate: a code book and tree per segment from its byte counts.
            let coded: Vec<_> = segs
                .iter()
                .map(|s| {
                    let mut counts = [0u64; 256];
                    for &b in s {
                        counts[b as usize] += 1;
                    }
                    let weights: BTreeMap<u8, u64> = (0..=255u8)
                        .filter(|&b| counts[b as usize] > 0)
                        .map(|b| (b, counts[b as usize]))
                        .collect();
                    let (book, tree) = huffman_compress::codebook(&weights);
                    let mut bv = BitVec::new();
                    for b in s {
                        book.encode(&mut bv, b).expect("a symbol of the book");
                    }
                    (tree, bv)
                })
                .collect();
            let crate_payload: usize = coded.iter().map(|(_, bv)| bv.len().div_ceil(8)).sum();
            for (s, (tree, bv)) in segs.iter().zip(&coded) {
                let back: Vec<u8> = tree.decoder(bv, s.len()).collect();
                assert_eq!(&back, s);
            }
            let crate_s = best(|| {
                for (s, (tree, bv)) in segs.iter().zip(&coded) {
                    for (k, b) in tree.decoder(bv, s.len()).enumerate() {
                        dst[k] = b;
                    }
                }
                std::hint::black_box(&dst);
            });

            let per_code = |bytes: usize| bytes as f64 * 8.0 / codes;
            println!(
                "| {path} | {bits} | {} | {:.1} | {:.4} | {:.4} | {:.4} | {:.3} | {:.3} |",
                segs.len(),
                raw as f64 / (1 << 20) as f64,
                per_code(ours_bytes),
                per_code(crate_payload),
                per_code(crate_payload + TABLE_BYTES * segs.len()),
                raw as f64 / ours_s / 1e9,
                raw as f64 / crate_s / 1e9,
            );
        }
    }
}
