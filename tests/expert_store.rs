//! The expert store puts exactly the pack's experts into MLX slots: gather_qmm on a slot equals
//! quantized_matmul on the original quantized matrices, through codecs, vertical segments and
//! evictions.

use flashpack::codec::{self, Codec};
use flashpack::format::{DType, ExpertSegmentDesc, Pack, PackWriter, ProjBits, QuantMode};
use flashpack::mlx::{self, Array, QuantizedMatrix};
use flashpack::run::experts::{ExpertCache, PolicyKind, StoreOptions};
use flashpack::run::read::IoMode;
use half::bf16;

const H: usize = 128;
const I: usize = 128;
const G: usize = 64;
const BITS: usize = 4;
const LAYERS: u32 = 2;
const EXPERTS: u32 = 4;

/// Bell-shaped values in (-1, 1) (the mean of three uniform draws), so that their 4-bit codes
/// are skewed as trained weights' are and Huffman coding pays: uniform codes would be stored
/// raw whatever codec the pack asks for.
fn noise(seed: u64, n: usize) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut uniform = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    };
    (0..n)
        .map(|_| ((uniform() + uniform() + uniform()) / 3.0) as f32)
        .collect()
}

fn quantized(seed: u64, rows: usize, cols: usize) -> QuantizedMatrix {
    let w: Vec<bf16> = noise(seed, rows * cols)
        .into_iter()
        .map(bf16::from_f32)
        .collect();
    let a = Array::from_slice(&w, &[rows, cols]).unwrap();
    mlx::quantize(&a, G as i32, BITS as i32).unwrap()
}

fn bytes_u32(a: &Array) -> Vec<u8> {
    a.to_vec::<u32>()
        .unwrap()
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect()
}

fn bytes_bf16(a: &Array) -> Vec<u8> {
    a.to_vec::<bf16>()
        .unwrap()
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect()
}

/// Rows r0..r1 of a row-major matrix with `row` bytes per row.
fn rows(b: &[u8], row: usize, r0: usize, r1: usize) -> Vec<u8> {
    b[r0 * row..r1 * row].to_vec()
}

/// Columns [c0, c1) (in bytes) of each row of a row-major matrix with `row` bytes per row.
fn cols(b: &[u8], row: usize, c0: usize, c1: usize) -> Vec<u8> {
    b.chunks_exact(row)
        .flat_map(|r| r[c0..c1].to_vec())
        .collect()
}

struct Expert {
    gate: QuantizedMatrix,
    up: QuantizedMatrix,
    down: QuantizedMatrix,
}

fn expert(layer: u32, e: u32) -> Expert {
    let s = (layer * 100 + e * 10) as u64;
    Expert {
        gate: quantized(s + 1, I, H),
        up: quantized(s + 2, I, H),
        down: quantized(s + 3, H, I),
    }
}

/// Writes a pack with every expert split into `segments` vertical segments.
fn write_pack(dir: &std::path::Path, segments: usize) -> std::path::PathBuf {
    write_pack_with(dir, segments, Codec::Huffman)
}

/// [`write_pack`] with the experts' codes stored with `weights` (scales and biases: zstd).
fn write_pack_with(dir: &std::path::Path, segments: usize, weights: Codec) -> std::path::PathBuf {
    let weight_choice = weights;
    let path = dir.join("experts.flashpack");
    let mut w = PackWriter::create(&path, 4096, H as u32, I as u32).unwrap();
    let r = I / segments;
    for layer in 0..LAYERS {
        for e in 0..EXPERTS {
            let x = expert(layer, e);
            for s in 0..segments {
                let (r0, r1) = (s * r, (s + 1) * r);
                let mut weights = Vec::new();
                for m in [&x.gate, &x.up] {
                    weights.extend(rows(&bytes_u32(&m.weight), H * BITS / 8, r0, r1));
                }
                weights.extend(cols(
                    &bytes_u32(&x.down.weight),
                    I * BITS / 8,
                    r0 * BITS / 8,
                    r1 * BITS / 8,
                ));
                let mut aux = Vec::new();
                for m in [&x.gate, &x.up] {
                    aux.extend(rows(&bytes_bf16(&m.scales), H / G * 2, r0, r1));
                    aux.extend(rows(
                        &bytes_bf16(m.biases.as_ref().unwrap()),
                        H / G * 2,
                        r0,
                        r1,
                    ));
                }
                for a in [&x.down.scales, x.down.biases.as_ref().unwrap()] {
                    aux.extend(cols(&bytes_bf16(a), I / G * 2, r0 / G * 2, r1 / G * 2));
                }
                let mut coded = Vec::new();
                let wc = codec::encode(weight_choice, BITS as u8, &weights, &mut coded).unwrap();
                let mut aux_coded = Vec::new();
                let ac = codec::encode(Codec::Zstd { level: 3 }, 16, &aux, &mut aux_coded).unwrap();
                w.add_expert_segment(
                    ExpertSegmentDesc {
                        layer,
                        expert: e,
                        segment: s as u16,
                        segment_count: segments as u16,
                        row_start: r0 as u32,
                        row_count: r as u32,
                        bits: ProjBits::uniform(BITS as u8),
                        group_size: G as u32,
                        scale_dtype: DType::BF16,
                        mode: QuantMode::Affine,
                        weight_codec: wc as u8,
                        aux_codec: ac as u8,
                        bias_dtype: None,
                    },
                    &coded,
                    &aux_coded,
                )
                .unwrap();
            }
        }
    }
    let config = serde_json::json!({
        "model_type": "qwen3_moe", "hidden_size": H, "num_hidden_layers": LAYERS,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 64, "vocab_size": 16,
        "intermediate_size": I, "moe_intermediate_size": I, "num_experts": EXPERTS,
        "num_experts_per_tok": 2,
    });
    let model = flashpack::arch::ModelConfig::from_json(&config).unwrap();
    let meta = serde_json::json!({
        "format": "flashpack", "architecture": "qwen3_moe", "config": config, "model": model,
        "quantization": {"group_size": G, "expert_bits": BITS, "dense_bits": 16, "mode": "affine"},
        "provenance": {"source": "test"},
    });
    w.finish(&meta).unwrap();
    path
}

fn max_diff(a: &Array, b: &Array) -> f32 {
    let (a, b) = (a.to_vec_f32().unwrap(), b.to_vec_f32().unwrap());
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// gather_qmm on slot `slot` of the store equals quantized_matmul on the original expert.
fn check_slot(store: &ExpertCache, pool: usize, slot: u32, x: &Expert) {
    let [gate, up, down] = store.matrices(pool);
    let xh: Vec<f32> = noise(7, H);
    let xh = Array::from_slice(&xh, &[1, 1, H])
        .unwrap()
        .astype(mlx::Dtype::BF16)
        .unwrap();
    let xi: Vec<f32> = noise(8, I);
    let xi = Array::from_slice(&xi, &[1, 1, I])
        .unwrap()
        .astype(mlx::Dtype::BF16)
        .unwrap();
    let idx = Array::from_slice(&[slot], &[1]).unwrap();
    // Same kernel family on the same bytes: results must be identical.
    const EXACT: f32 = 0.0;
    for (pooled, original, input) in [
        (&gate, &x.gate, &xh),
        (&up, &x.up, &xh),
        (&down, &x.down, &xi),
    ] {
        let got = mlx::gather_qmm(input, pooled, None, Some(&idx), true, false).unwrap();
        let want = mlx::quantized_matmul(input, original, true).unwrap();
        assert!(max_diff(&got, &want) <= EXACT, "slot {slot}");
    }
}

fn run_store(segments: usize, io: IoMode) {
    let dir = tempfile::tempdir().unwrap();
    let path = write_pack(dir.path(), segments);
    let pack = Pack::open(&path).unwrap();
    let slot_bytes = (3 * I * H * BITS / 8 + 6 * I * (H / G) * 2) as u64;
    let opts = StoreOptions {
        budget_bytes: Some(3 * slot_bytes),
        io,
        queue_depth: 4,
        policy: PolicyKind::Lru,
        verify: true,
        naive: false,
        ..StoreOptions::default()
    };
    let mut store = ExpertCache::new(&pack, &opts).unwrap();
    assert_eq!(store.stats().slots, 3);
    // Several layers and experts through 3 slots: loads, hits and evictions.
    let requests: [(u32, &[u32]); 5] = [
        (0, &[1, 3]),
        (0, &[3, 2]),
        (1, &[0, 2]),
        (0, &[2, 1]),
        (1, &[3, 0]),
    ];
    for (layer, experts) in requests {
        let slots = store.prepare(&pack, layer, experts).unwrap();
        for (&e, &(pool, slot)) in experts.iter().zip(&slots) {
            check_slot(&store, pool, slot, &expert(layer, e));
        }
    }
    let stats = store.stats();
    assert!(stats.experts_loaded >= 5, "{stats:?}");
    assert!(stats.hits_per_layer.values().sum::<u64>() >= 1, "{stats:?}");
}

#[test]
fn slots_hold_the_packed_experts_pread() {
    run_store(1, IoMode::Pread);
}

#[test]
fn slots_hold_the_packed_experts_vertical_segments_mmap() {
    run_store(2, IoMode::Mmap);
}

#[test]
fn all_resident_warm_start_and_too_small_budget() {
    let dir = tempfile::tempdir().unwrap();
    let pack = Pack::open(&write_pack(dir.path(), 1)).unwrap();
    let mut store = ExpertCache::new(&pack, &StoreOptions::default()).unwrap();
    store.warm_all(&pack).unwrap();
    assert_eq!(store.stats().experts_loaded, (LAYERS * EXPERTS) as u64);
    let slots = store.prepare(&pack, 1, &[2]).unwrap();
    check_slot(&store, slots[0].0, slots[0].1, &expert(1, 2));
    assert_eq!(store.stats().hits_per_layer[&1], 1);

    let opts = StoreOptions {
        budget_bytes: Some(1),
        ..StoreOptions::default()
    };
    let mut tiny = ExpertCache::new(&pack, &opts).unwrap();
    let err = tiny.prepare(&pack, 0, &[0]).unwrap_err();
    assert!(err.to_string().contains("--mem-budget"), "{err}");
}

#[test]
fn damaged_segment_is_refused_when_verifying() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_pack(dir.path(), 1);
    let e = Pack::open(&path).unwrap().expert_segments(0, 2)[0].clone();
    let mut b = std::fs::read(&path).unwrap();
    b[e.offset as usize + 3] ^= 1;
    std::fs::write(&path, &b).unwrap();
    let pack = Pack::open(&path).unwrap();
    let opts = StoreOptions {
        verify: true,
        naive: false,
        ..StoreOptions::default()
    };
    let mut store = ExpertCache::new(&pack, &opts).unwrap();
    let err = store.prepare(&pack, 0, &[2]).unwrap_err();
    assert!(
        err.to_string().contains("layer 0, expert 2, segment 0"),
        "{err}"
    );
    // The failed expert is not left in the cache: asking again fails again, never uses bad bytes.
    assert!(store.prepare(&pack, 0, &[2]).is_err());
}

/// A lone miss of a raw expert is read in parts, its checksum fed as they arrive
/// (`load_segment_pipelined`): the slot holds the expert, row segments included, and a flipped
/// byte in a late part is refused, naming the segment, and never reaches the slot.
#[test]
fn raw_experts_read_in_parts_fill_their_slots_and_are_checked() {
    for segments in [1, 2] {
        let dir = tempfile::tempdir().unwrap();
        let path = write_pack_with(dir.path(), segments, Codec::Raw);
        let pack = Pack::open(&path).unwrap();
        assert!(pack.experts().iter().all(|e| e.weight_codec == 0), "raw");
        let opts = StoreOptions {
            budget_bytes: Some(1 << 20),
            queue_depth: 8,
            ..StoreOptions::default()
        };
        for part in [0, 4096] {
            let mut store = ExpertCache::new(&pack, &opts).unwrap();
            assert!(store.set_read_split(part));
            for (layer, e) in [(0, 1), (1, 3), (0, 2)] {
                let slots = store.prepare(&pack, layer, &[e]).unwrap();
                check_slot(&store, slots[0].0, slots[0].1, &expert(layer, e));
            }
        }
        let e = pack.expert_segments(0, 2)[0].clone();
        drop(pack);
        let mut b = std::fs::read(&path).unwrap();
        b[e.offset as usize + e.stored_len as usize - 100] ^= 1;
        std::fs::write(&path, &b).unwrap();
        let pack = Pack::open(&path).unwrap();
        let mut store = ExpertCache::new(&pack, &opts).unwrap();
        store.set_read_split(4096);
        let err = store.prepare(&pack, 0, &[2]).unwrap_err();
        assert!(
            err.to_string().contains("layer 0, expert 2, segment 0"),
            "{err}"
        );
        assert!(store.prepare(&pack, 0, &[2]).is_err());
    }
}

/// A lone miss of a Huffman-coded expert is read in decoder order and decoded as its parts
/// arrive (`run::experts::huffman`): the slot holds the expert, row segments included, for
/// every part size; a flipped byte in a late part is refused by the checksum, naming the
/// segment; and with checksums off, a damaged stream is still refused by the decoder.
#[test]
fn huffman_experts_decoded_as_they_arrive_fill_their_slots_and_are_checked() {
    for segments in [1, 2] {
        let dir = tempfile::tempdir().unwrap();
        let path = write_pack_with(dir.path(), segments, Codec::Huffman);
        let pack = Pack::open(&path).unwrap();
        assert!(
            pack.experts().iter().all(|e| e.weight_codec == 1),
            "Huffman"
        );
        let opts = StoreOptions {
            budget_bytes: Some(1 << 20),
            queue_depth: 8,
            ..StoreOptions::default()
        };
        for part in [0, 4096, 8192, 1 << 20] {
            let mut store = ExpertCache::new(&pack, &opts).unwrap();
            assert!(store.set_read_split(4096));
            assert!(store.set_huffman_part(part));
            for (layer, e) in [(0, 1), (1, 3), (0, 2), (1, 0)] {
                let slots = store.prepare(&pack, layer, &[e]).unwrap();
                check_slot(&store, slots[0].0, slots[0].1, &expert(layer, e));
            }
        }
        let e = pack.expert_segments(0, 2)[0].clone();
        drop(pack);
        let clean = std::fs::read(&path).unwrap();
        // A byte inside the last stream of the weights (its last part to arrive).
        let at = e.offset as usize + e.weights_stored_len as usize - 50;
        let mut b = clean.clone();
        b[at] ^= 0x5a;
        std::fs::write(&path, &b).unwrap();
        let pack = Pack::open(&path).unwrap();
        let mut store = ExpertCache::new(&pack, &opts).unwrap();
        store.set_read_split(4096);
        store.set_huffman_part(4096);
        let err = store.prepare(&pack, 0, &[2]).unwrap_err();
        assert!(
            err.to_string().contains("layer 0, expert 2, segment 0"),
            "{err}"
        );
        assert!(store.prepare(&pack, 0, &[2]).is_err());
        // Checksums off: the header's stream sizes no longer add up, so the decode fails.
        let mut b = clean;
        b[e.offset as usize + 140] ^= 0xff;
        std::fs::write(&path, &b).unwrap();
        let pack = Pack::open(&path).unwrap();
        let opts = StoreOptions {
            verify: false,
            ..opts.clone()
        };
        let mut store = ExpertCache::new(&pack, &opts).unwrap();
        store.set_read_split(4096);
        store.set_huffman_part(4096);
        assert!(store.prepare(&pack, 0, &[2]).is_err());
    }
}

#[test]
fn prefetched_experts_are_hits_and_correct() {
    let dir = tempfile::tempdir().unwrap();
    let pack = Pack::open(&write_pack(dir.path(), 2)).unwrap();
    let slot_bytes = (3 * I * H * BITS / 8 + 6 * I * (H / G) * 2) as u64;
    let opts = StoreOptions {
        budget_bytes: Some(4 * slot_bytes),
        policy: PolicyKind::Lru,
        ..StoreOptions::default()
    };
    let mut store = ExpertCache::new(&pack, &opts).unwrap();
    store.prepare(&pack, 0, &[0, 1]).unwrap();
    // While layer 0 "computes", the next layer's predicted experts load in the background.
    store.prefetch(&pack, 1, &[2, 3]).unwrap();
    let slots = store.prepare(&pack, 1, &[3, 2]).unwrap();
    for (&e, &(pool, slot)) in [3u32, 2].iter().zip(&slots) {
        check_slot(&store, pool, slot, &expert(1, e));
    }
    let s = store.stats();
    assert_eq!(
        (s.prefetch_issued, s.prefetch_loaded, s.prefetch_used),
        (2, 2, 2),
        "{s:?}"
    );
    assert_eq!(s.misses_per_layer.get(&1), None, "{s:?}");
    // The in-use experts of layer 0 were not evicted by the prefetch (4 slots, 4 experts).
    let again = store.prepare(&pack, 0, &[0, 1]).unwrap();
    assert_eq!(again.len(), 2);
    assert_eq!(store.stats().hits_per_layer[&0], 2);
}

/// A layer's resident experts are asked for before its misses: with two slots holding experts 1
/// and 2 of layer 0 (1 the least recently used), asking for [3, 1] must evict 2, not 1 (which
/// LRU would pick if 3 were placed first, only for 1 to be read again at once).
#[test]
fn a_miss_never_evicts_an_expert_its_own_layer_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_pack(dir.path(), 1);
    let pack = Pack::open(&path).unwrap();
    let slot_bytes = (3 * I * H * BITS / 8 + 6 * I * (H / G) * 2) as u64;
    let opts = StoreOptions {
        budget_bytes: Some(2 * slot_bytes),
        io: IoMode::Pread,
        queue_depth: 2,
        policy: PolicyKind::Lru,
        verify: true,
        naive: false,
        ..StoreOptions::default()
    };
    let mut store = ExpertCache::new(&pack, &opts).unwrap();
    store.prepare(&pack, 0, &[1]).unwrap();
    store.prepare(&pack, 0, &[2]).unwrap();
    assert_eq!(store.stats().experts_loaded, 2);
    let slots = store.prepare(&pack, 0, &[3, 1]).unwrap();
    assert_eq!(store.stats().experts_loaded, 3, "only expert 3 is read");
    assert!(store.is_resident(0, 1) && store.is_resident(0, 3) && !store.is_resident(0, 2));
    for (&e, &(pool, slot)) in [3u32, 1].iter().zip(&slots) {
        check_slot(&store, pool, slot, &expert(0, e));
    }
}

/// `bench io` measures both ways of reading the same number of experts and reports a ratio for
/// each split size asked for (its numbers are timings: only their presence is checked here).
#[test]
fn bench_io_reports_plain_reads_and_runtime_loads() {
    use flashpack::run::bench_io::{bench_io, format_report, IoBenchOptions};
    let dir = tempfile::tempdir().unwrap();
    let path = write_pack(dir.path(), 2);
    let pack = Pack::open(&path).unwrap();
    let opts = IoBenchOptions {
        experts: 6,
        batch: 3,
        splits_kib: vec![0, 4],
        ..IoBenchOptions::default()
    };
    let r = bench_io(&pack, &path, &opts).unwrap();
    let whats: Vec<(&str, usize)> = r
        .rows
        .iter()
        .map(|x| (x.what.as_str(), x.at_once))
        .collect();
    assert_eq!(
        whats,
        [
            ("plain pread, queue depth 1", 1),
            ("plain pread, queue depth 3", 3),
            ("plain pread, queue depth 16", 16),
            ("runtime load, read part 0 KiB", 1),
            ("runtime load, read part 0 KiB", 3),
            ("runtime load, read part 4 KiB, Huffman read whole", 1),
            ("runtime load, read part 4 KiB, Huffman read whole", 3),
            ("runtime load, read part 4 KiB, Huffman parts 64 KiB", 1),
            ("runtime load, read part 4 KiB, Huffman parts 64 KiB", 3),
        ]
    );
    assert!(r
        .rows
        .iter()
        .all(|x| x.experts == 6 && x.ms_per_expert > 0.0));
    assert!(
        pack.experts().iter().all(|e| e.weight_codec == 1),
        "Huffman"
    );
    assert_eq!(r.ratios.len(), 3);
    assert!(format_report(&r).contains("| read part 4 KiB, Huffman parts 64 KiB |"));
}
