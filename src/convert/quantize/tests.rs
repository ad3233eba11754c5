use super::*;
use crate::convert::load::safetensors;
use crate::convert::tensor::Dtype;
use crate::mapped::Bytes;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Tensors of a golden file by name: (dtype, shape, bytes).
fn read_golden(path: &Path) -> BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)> {
    let bytes = Bytes::map(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    safetensors::parse(path, &bytes)
        .unwrap()
        .into_iter()
        .map(|t| (t.name, (t.dtype, t.shape, bytes[t.range].to_vec())))
        .collect()
}

/// Quantizes every `CASE.w` of every golden file in `dir` for every bits/group pair the file
/// holds and compares codes, scales and biases byte for byte. Returns the comparisons made.
fn check_golden_dir(dir: &Path) -> usize {
    let mut checked = 0;
    for dname in ["bf16", "f16", "f32"] {
        let golden = read_golden(&dir.join(format!("golden_{dname}.safetensors")));
        for (name, (dtype, shape, w)) in &golden {
            let Some(case) = name.strip_suffix(".w") else {
                continue;
            };
            let fd = dtype.float().unwrap();
            let m = MatrixView::new(fd, shape[0], shape[1], w).unwrap();
            for bits in SUPPORTED_BITS {
                for gs in SUPPORTED_GROUP_SIZES {
                    let key = format!("{case}.b{bits}g{gs}");
                    let Some((_, _, wq)) = golden.get(&format!("{key}.wq")) else {
                        continue;
                    };
                    let q = quantize(&key, m, QuantParams::new(bits, gs).unwrap(), fd).unwrap();
                    let (_, _, s) = &golden[&format!("{key}.scales")];
                    let (_, _, b) = &golden[&format!("{key}.biases")];
                    assert_eq!(&q.codes, wq, "{dname} {key}: packed codes differ");
                    assert_eq!(&q.scales, s, "{dname} {key}: scales differ");
                    assert_eq!(&q.biases, b, "{dname} {key}: biases differ");
                    checked += 1;
                }
            }
        }
    }
    checked
}

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/golden/quantize")
}

#[test]
fn bit_exact_with_committed_mlx_goldens() {
    // 4 cases x 3 dtypes x 3 bits x 3 group sizes, made by scripts/golden_quantize.py.
    assert_eq!(check_golden_dir(&golden_dir()), 4 * 3 * 3 * 3);
}

#[test]
fn bit_exact_with_live_mlx() {
    if !crate::convert::python::python_imports("mlx.core", "the live mx.quantize check") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/golden_quantize.py");
    // A different seed than the committed files: fresh random tensors every run of this test.
    let out = std::process::Command::new("python3")
        .arg(script)
        .args(["--out", dir.path().to_str().unwrap(), "--seed", "99"])
        .args(["--bits", "2,3,4,5,6,8"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Every supported width, 3, 5 and 6 bits included (MLX's straddling packing).
    assert_eq!(check_golden_dir(dir.path()), 4 * 3 * 6 * 3);
}

fn bf16_matrix(rows: usize, cols: usize, seed: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(rows * cols * 2);
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    for _ in 0..rows * cols {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let v = (x as f32 / u32::MAX as f32 - 0.5) * 0.2;
        out.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes());
    }
    out
}

#[test]
fn dequantized_error_is_within_one_step() {
    // Budget: one unrounded step s0 = (max - min) / (2^bits - 1) of the group. Values between
    // levels round to within s0/2; the nudge that makes bias/scale an integer can clip the
    // opposite edge by at most n_bins * s0 / (n_bins + 1) < s0 (|q0| <= |edge|/s0 + 1/2 and
    // |edge| >= n_bins * s0 / 2). Plus the bf16 rounding of scale and bias: 2^-8 relative of
    // |scale| * 2^bits + |bias|.
    let (rows, cols, g) = (16, 256, 64);
    let data = bf16_matrix(rows, cols, 3);
    let m = MatrixView::new(FloatDtype::Bf16, rows, cols, &data).unwrap();
    for bits in SUPPORTED_BITS {
        let p = QuantParams::new(bits, g).unwrap();
        let q = quantize("t", m, p, FloatDtype::Bf16).unwrap();
        let mut row = vec![0f32; cols];
        let mut deq = vec![0f32; cols];
        let n_bins = ((1u32 << bits) - 1) as f32;
        for r in 0..rows {
            m.row_f32(r, &mut row);
            q.view().dequantize_row(r, &mut deq);
            for gi in 0..cols / g {
                let group = &row[gi * g..(gi + 1) * g];
                let lo = group.iter().copied().fold(f32::INFINITY, f32::min);
                let hi = group.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let at = (r * (cols / g) + gi) * 2;
                let s = FloatDtype::Bf16.read(&q.scales[at..at + 2]).abs();
                let b = FloatDtype::Bf16.read(&q.biases[at..at + 2]).abs();
                let budget = (hi - lo) / n_bins + (s * (1 << bits) as f32 + b) / 256.0;
                for k in gi * g..(gi + 1) * g {
                    let err = (row[k] - deq[k]).abs();
                    assert!(
                        err <= budget,
                        "bits {bits} row {r} col {k}: err {err} > {budget}"
                    );
                }
            }
        }
    }
}

#[test]
fn rejects_unaligned_columns_and_bad_params() {
    let data = bf16_matrix(2, 96, 1);
    let m = MatrixView::new(FloatDtype::Bf16, 2, 96, &data).unwrap();
    let err = quantize("x", m, QuantParams::new(4, 64).unwrap(), FloatDtype::Bf16).unwrap_err();
    assert!(matches!(
        err,
        QuantError::NotGroupAligned {
            cols: 96,
            group_size: 64,
            ..
        }
    ));
    assert!(matches!(
        QuantParams::new(7, 64),
        Err(QuantError::UnsupportedBits { bits: 7, .. })
    ));
    assert!(matches!(
        QuantParams::new(4, 48),
        Err(QuantError::UnsupportedGroupSize { group_size: 48, .. })
    ));
}

#[test]
fn same_output_on_one_thread_and_many() {
    let data = bf16_matrix(200, 128, 5);
    let m = MatrixView::new(FloatDtype::Bf16, 200, 128, &data).unwrap();
    let p = QuantParams::new(2, 32).unwrap();
    let many = quantize("t", m, p, FloatDtype::Bf16).unwrap();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let one = pool.install(|| quantize("t", m, p, FloatDtype::Bf16).unwrap());
    assert_eq!(many, one);
}

#[test]
fn requantize_with_same_params_reproduces_codes() {
    // Dequantized values sit exactly on the levels, so quantizing them again must give the
    // same levels; scales may differ in the last bit only if the range shrank, which a group
    // that used both edge levels cannot. Check codes.
    let data = bf16_matrix(8, 128, 9);
    let m = MatrixView::new(FloatDtype::F32, 8, 64, &data).unwrap();
    let p = QuantParams::new(4, 32).unwrap();
    let q = quantize("t", m, p, FloatDtype::F32).unwrap();
    let again = requantize("t", q.view(), p).unwrap();
    let mut a = vec![0f32; 64];
    let mut b = vec![0f32; 64];
    for r in 0..8 {
        q.view().dequantize_row(r, &mut a);
        again.view().dequantize_row(r, &mut b);
        for (x, y) in a.iter().zip(&b) {
            // Budget: one f32 rounding of scale*q+bias per pass (relative 2^-23 of |w|).
            assert!((x - y).abs() <= x.abs().max(1e-3) * 1e-5, "{x} vs {y}");
        }
    }
}

// ---- expert segments ----

struct Expert {
    gate: Vec<u8>,
    up: Vec<u8>,
    down: Vec<u8>,
}

fn expert(i: usize, h: usize) -> Expert {
    Expert {
        gate: bf16_matrix(i, h, 11),
        up: bf16_matrix(i, h, 12),
        down: bf16_matrix(h, i, 13),
    }
}

fn float(d: &[u8], r: usize, c: usize) -> ProjSource<'_> {
    ProjSource::Float(MatrixView::new(FloatDtype::Bf16, r, c, d).unwrap())
}

fn projections(x: &Expert, i: usize, h: usize) -> ExpertProjections<'_> {
    let v = float;
    ExpertProjections {
        gate: v(&x.gate, i, h),
        up: v(&x.up, i, h),
        down: v(&x.down, h, i),
        bias: None,
    }
}

#[test]
fn one_segment_is_the_three_quantized_matrices_concatenated() {
    let (i, h) = (128, 256);
    let x = expert(i, h);
    let p = QuantParams::new(4, 64).unwrap();
    let segs = build_segments(3, 5, &projections(&x, i, h), p, SegmentPlan::default()).unwrap();
    assert_eq!(segs.len(), 1);
    let s = &segs[0];
    assert_eq!(
        (s.layer, s.expert, s.segment, s.row_start, s.row_count),
        (3, 5, 0, 0, i)
    );
    let q = |d: &[u8], r, c| {
        quantize(
            "m",
            MatrixView::new(FloatDtype::Bf16, r, c, d).unwrap(),
            p,
            FloatDtype::Bf16,
        )
        .unwrap()
    };
    let (g, u, d) = (q(&x.gate, i, h), q(&x.up, i, h), q(&x.down, h, i));
    assert_eq!(
        s.weights,
        [g.codes.clone(), u.codes.clone(), d.codes.clone()].concat()
    );
    assert_eq!(
        s.aux,
        [g.scales, g.biases, u.scales, u.biases, d.scales, d.biases].concat()
    );
    let parts = s.parts();
    assert_eq!(parts.weights_len(), s.weights.len());
    assert_eq!(parts.aux_len(), s.aux.len());
    assert_eq!(parts.down_w.len(), h * i * 4 / 8);
}

#[test]
fn segments_equal_quantizing_each_row_range() {
    let (i, h) = (256, 128);
    let x = expert(i, h);
    let p = QuantParams::new(2, 64).unwrap();
    let segs = build_segments(
        0,
        0,
        &projections(&x, i, h),
        p,
        SegmentPlan { segment_count: 2 },
    )
    .unwrap();
    assert_eq!(segs.len(), 2);
    for s in &segs {
        let (r0, r) = (s.row_start, s.row_count);
        // Cut the float inputs first, then quantize: must equal the segment.
        let gate = &x.gate[r0 * h * 2..(r0 + r) * h * 2];
        let up = &x.up[r0 * h * 2..(r0 + r) * h * 2];
        let down: Vec<u8> = (0..h)
            .flat_map(|row| x.down[(row * i + r0) * 2..(row * i + r0 + r) * 2].to_vec())
            .collect();
        let one = build_segments(
            0,
            0,
            &ExpertProjections {
                gate: ProjSource::Float(MatrixView::new(FloatDtype::Bf16, r, h, gate).unwrap()),
                up: ProjSource::Float(MatrixView::new(FloatDtype::Bf16, r, h, up).unwrap()),
                down: ProjSource::Float(MatrixView::new(FloatDtype::Bf16, h, r, &down).unwrap()),
                bias: None,
            },
            p,
            SegmentPlan::default(),
        )
        .unwrap();
        assert_eq!(one[0].weights, s.weights, "segment {}", s.segment);
        assert_eq!(one[0].aux, s.aux, "segment {}", s.segment);
    }
}

#[test]
fn mlx_codes_with_matching_params_are_copied_not_requantized() {
    let (i, h) = (64, 128);
    let x = expert(i, h);
    let p = QuantParams::new(4, 64).unwrap();
    let from_float =
        build_segments(0, 1, &projections(&x, i, h), p, SegmentPlan::default()).unwrap();
    let q = |d: &[u8], r, c| {
        quantize(
            "m",
            MatrixView::new(FloatDtype::Bf16, r, c, d).unwrap(),
            p,
            FloatDtype::Bf16,
        )
        .unwrap()
    };
    let (g, u, d) = (q(&x.gate, i, h), q(&x.up, i, h), q(&x.down, h, i));
    let from_codes = build_segments(
        0,
        1,
        &ExpertProjections {
            gate: ProjSource::Quantized(g.view()),
            up: ProjSource::Quantized(u.view()),
            down: ProjSource::Quantized(d.view()),
            bias: None,
        },
        p,
        SegmentPlan::default(),
    )
    .unwrap();
    assert_eq!(from_float, from_codes);
    // Asking for 2 bits from 4-bit codes requantizes: different size, valid layout.
    let p2 = QuantParams::new(2, 64).unwrap();
    let re = build_segments(
        0,
        1,
        &ExpertProjections {
            gate: ProjSource::Quantized(g.view()),
            up: ProjSource::Quantized(u.view()),
            down: ProjSource::Quantized(d.view()),
            bias: None,
        },
        p2,
        SegmentPlan::default(),
    )
    .unwrap();
    assert_eq!(re[0].weights.len(), from_float[0].weights.len() / 2);
    assert_eq!(re[0].bits, 2);
}

#[test]
fn rejects_mismatched_expert_shapes() {
    let (i, h) = (64, 128);
    let x = expert(i, h);
    let mut src = projections(&x, i, h);
    src.down = ProjSource::Float(MatrixView::new(FloatDtype::Bf16, i, h, &x.down).unwrap());
    let err = build_segments(
        0,
        0,
        &src,
        QuantParams::new(4, 64).unwrap(),
        SegmentPlan::default(),
    )
    .unwrap_err();
    assert!(matches!(err, QuantError::Shape { .. }), "{err}");
    let err = build_segments(
        0,
        0,
        &projections(&x, i, h),
        QuantParams::new(4, 64).unwrap(),
        SegmentPlan { segment_count: 2 },
    )
    .unwrap_err();
    assert!(matches!(err, QuantError::Invalid { .. }), "{err}");
}

#[test]
fn round_half_even_matches_std_everywhere_it_is_used() {
    let mut x = 0x1234_5678u32;
    let mut vals = vec![
        0.5f32,
        1.5,
        2.5,
        -0.5,
        -1.5,
        -2.5,
        0.0,
        -0.0,
        8_388_607.5,
        8_388_608.0,
        -8_388_609.0,
        1.0e20,
        -1.0e20,
        f32::INFINITY,
        f32::NEG_INFINITY,
        4_194_303.5,
        254.5,
        255.5,
    ];
    for _ in 0..100_000 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        vals.push(f32::from_bits(x));
        vals.push((x % 2048) as f32 / 4.0 - 256.0); // quarter steps: many exact ties
    }
    for v in vals.into_iter().filter(|v| !v.is_nan()) {
        assert_eq!(
            round_half_even(v).to_bits(),
            v.round_ties_even().to_bits(),
            "{v:e}"
        );
    }
}

#[test]
fn dispatched_row_kernel_equals_the_generic_one() {
    let data = bf16_matrix(4, 256, 21);
    let m = MatrixView::new(FloatDtype::Bf16, 4, 256, &data).unwrap();
    let mut row = vec![0f32; 256];
    for bits in SUPPORTED_BITS {
        for gs in SUPPORTED_GROUP_SIZES {
            let p = QuantParams::new(bits, gs).unwrap();
            let (w, g) = (p.words_per_row(256), p.groups_per_row(256) * 2);
            for r in 0..4 {
                m.row_f32(r, &mut row);
                let mut a = (vec![0u8; w * 4], vec![0u8; g], vec![0u8; g]);
                let mut b = a.clone();
                quantize_row(&row, p, FloatDtype::Bf16, &mut a.0, &mut a.1, &mut a.2);
                quantize_row_generic(&row, p, FloatDtype::Bf16, &mut b.0, &mut b.1, &mut b.2);
                assert_eq!(a, b, "bits {bits} group {gs} row {r}");
            }
        }
    }
}

/// mxfp4 and mxfp8 codes dequantize exactly (OCP microscaling: E2M1 / E4M3 codes times an E8M0
/// power of two), as `mx.dequantize(.., mode=...)` gives them; the values were checked against
/// MLX 0.32.4.
#[test]
fn microscaling_codes_dequantize_exactly() {
    // One row of 32 mxfp4 codes (4 u32 words), scale 2^(130 - 127) = 8.
    let codes: Vec<u8> = (0..16u8)
        .map(|i| (2 * i % 16) | (((2 * i + 1) % 16) << 4))
        .collect();
    let scales = [130u8];
    let p = QuantParams::with_mode(4, 32, QuantMode::Mxfp4).unwrap();
    let v = QuantizedView {
        rows: 1,
        cols: 32,
        params: p,
        scale_dtype: FloatDtype::Bf16,
        codes: &codes,
        scales: &scales,
        biases: &[],
    }
    .checked("mxfp4")
    .unwrap();
    let mut row = vec![0f32; 32];
    v.dequantize_row(0, &mut row);
    let e2m1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];
    for (j, &x) in row.iter().enumerate() {
        let c = j % 16;
        let want = if c < 8 { e2m1[c] } else { -e2m1[c - 8] } * 8.0;
        assert_eq!(x, want, "code {c}");
    }
    // mxfp8 (E4M3): 0x38 = 1, 0x7e = 448 (the largest), 0x01 = 2^-9 (subnormal), 0xc0 = -2;
    // scale 2^(125 - 127) = 1/4.
    let mut codes = vec![0u8; 32];
    codes[..4].copy_from_slice(&[0x38, 0x7e, 0x01, 0xc0]);
    let p = QuantParams::with_mode(8, 32, QuantMode::Mxfp8).unwrap();
    let v = QuantizedView {
        rows: 1,
        cols: 32,
        params: p,
        scale_dtype: FloatDtype::Bf16,
        codes: &codes,
        scales: &[125],
        biases: &[],
    }
    .checked("mxfp8")
    .unwrap();
    v.dequantize_row(0, &mut row);
    assert_eq!(&row[..5], &[0.25, 112.0, (-9f32).exp2() / 4.0, -0.5, 0.0]);
    // The modes fix their bits and group size, and have no biases.
    assert!(QuantParams::with_mode(4, 64, QuantMode::Mxfp4).is_err());
    assert!(QuantParams::with_mode(2, 32, QuantMode::Mxfp8).is_err());
    let with_biases = QuantizedView {
        biases: &[0u8; 1],
        ..v
    };
    assert!(with_biases.checked("mxfp8").is_err());
    // flashpack never writes microscaling codes itself.
    let m = MatrixView::new(FloatDtype::F32, 1, 32, &[0u8; 128]).unwrap();
    assert!(quantize("w", m, p, FloatDtype::Bf16).is_err());
}

/// A compressed-tensors packed INT4 matrix asked for at 4 bits, groups of 32 is copied into
/// MLX's layout, not quantized again: the same words, the same scales, biases of -8 x scale, so
/// it dequantizes to exactly `(u - 8) * scale`; at another group size it is quantized from the
/// values it stands for.
#[test]
fn packed_int4_codes_are_copied_at_their_own_bits_and_group_size() {
    use crate::convert::tensor::{MatrixView, PackedIntGroups};
    let (rows, cols) = (3, 64);
    let mut state = 0x9e37_79b9_u32;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        state
    };
    let words: Vec<u8> = (0..rows * cols / 8)
        .flat_map(|_| next().to_le_bytes())
        .collect();
    let scales: Vec<u8> = (0..rows * cols / 32)
        .flat_map(|i| half::bf16::from_f32(0.013 + 0.007 * i as f32).to_le_bytes())
        .collect();
    let groups = PackedIntGroups {
        scales: &scales,
        scale_dtype: FloatDtype::Bf16,
        bits: 4,
        group_size: 32,
    };
    let m = MatrixView::packed_int(rows, cols, &words, groups).unwrap();
    let q = quantize(
        "packed",
        m,
        QuantParams::new(4, 32).unwrap(),
        FloatDtype::Bf16,
    )
    .unwrap();
    assert_eq!(q.codes, words);
    assert_eq!(q.scales, scales);
    let mut row = vec![0f32; cols];
    for r in 0..rows {
        q.view().dequantize_row(r, &mut row);
        for (c, &x) in row.iter().enumerate() {
            let word = u32::from_le_bytes(words[(r * cols + c) / 8 * 4..][..4].try_into().unwrap());
            let u = ((word >> (4 * (c % 8))) & 15) as f32;
            let k = r * 2 + c / 32;
            let s = half::bf16::from_le_bytes([scales[2 * k], scales[2 * k + 1]]).to_f32();
            assert_eq!(x, (u - 8.0) * s, "row {r} column {c}");
        }
    }
    // Group 64: quantized again from the bf16 values, as for any float source.
    let q64 = quantize(
        "packed",
        m,
        QuantParams::new(4, 64).unwrap(),
        FloatDtype::Bf16,
    )
    .unwrap();
    let mut floats = vec![0f32; rows * cols];
    for (r, out) in floats.chunks_exact_mut(cols).enumerate() {
        m.row_f32(r, out);
    }
    let mut bytes = vec![0u8; floats.len() * 2];
    FloatDtype::Bf16.write_all(&floats, &mut bytes);
    let plain = MatrixView::new(FloatDtype::Bf16, rows, cols, &bytes).unwrap();
    let want = quantize(
        "plain",
        plain,
        QuantParams::new(4, 64).unwrap(),
        FloatDtype::Bf16,
    )
    .unwrap();
    assert_eq!(q64, want);
}
