//! Tests of the MLX binding against values computed by hand or by MLX's Python API semantics.

use super::*;
use half::bf16;

fn arr(data: &[f32], shape: &[usize]) -> Array {
    Array::from_slice(data, shape).unwrap()
}

#[test]
fn links_the_pinned_mlx() {
    assert_eq!(version(), "0.32.4");
}

#[test]
fn round_trips_every_constructor_dtype() {
    let a = Array::from_slice(&[1.5f32, -2.0, 3.25, 4.0], &[2, 2]).unwrap();
    assert_eq!(a.shape(), vec![2, 2]);
    assert_eq!(a.dtype(), Dtype::F32);
    assert_eq!(a.to_vec::<f32>().unwrap(), vec![1.5, -2.0, 3.25, 4.0]);

    let b: Vec<bf16> = [1.0f32, 2.5, -3.0]
        .iter()
        .map(|&x| bf16::from_f32(x))
        .collect();
    let b = Array::from_slice(&b, &[3]).unwrap();
    assert_eq!(b.dtype(), Dtype::BF16);
    assert_eq!(b.to_vec_f32().unwrap(), vec![1.0, 2.5, -3.0]);

    let h: Vec<half::f16> = [0.5f32, 8.0]
        .iter()
        .map(|&x| half::f16::from_f32(x))
        .collect();
    let h = Array::from_slice(&h, &[2, 1]).unwrap();
    assert_eq!(h.dtype(), Dtype::F16);
    assert_eq!(h.to_vec_f32().unwrap(), vec![0.5, 8.0]);

    let u = Array::from_slice(&[7u32, u32::MAX], &[2]).unwrap();
    assert_eq!(u.to_vec::<u32>().unwrap(), vec![7, u32::MAX]);
    let i = Array::from_slice(&[-7i32, 9], &[1, 2]).unwrap();
    assert_eq!(i.to_vec::<i32>().unwrap(), vec![-7, 9]);
}

#[test]
fn rejects_wrong_length_and_dtype() {
    let err = Array::from_slice(&[1.0f32, 2.0, 3.0], &[2, 2]).unwrap_err();
    assert!(matches!(
        err,
        Error::LengthMismatch {
            len: 3,
            expected: 4,
            ..
        }
    ));
    let a = arr(&[1.0], &[1]);
    let err = a.to_vec::<u32>().unwrap_err();
    assert!(matches!(
        err,
        Error::DtypeMismatch {
            expected: Dtype::U32,
            found: Dtype::F32
        }
    ));
}

#[test]
fn mlx_exceptions_become_errors() {
    let a = arr(&[1.0, 2.0, 3.0], &[3]);
    let b = arr(&[1.0, 2.0], &[2]);
    let err = a.add(&b).unwrap_err();
    match err {
        Error::Mlx { op, message } => {
            assert_eq!(op, "add");
            assert!(message.contains("broadcast"), "{message}");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(matches!(
        a.reshape(&[2, 2]),
        Err(Error::Mlx { op: "reshape", .. })
    ));
}

#[test]
fn elementwise_and_reductions() {
    let a = arr(&[1.0, 2.0, 3.0, 4.0], &[2, 2]);
    let b = arr(&[10.0, 20.0], &[2]);
    assert_eq!(
        a.add(&b).unwrap().to_vec_f32().unwrap(),
        [11.0, 22.0, 13.0, 24.0]
    );
    assert_eq!(
        a.sub(&b).unwrap().to_vec_f32().unwrap(),
        [-9.0, -18.0, -7.0, -16.0]
    );
    assert_eq!(
        a.mul(&b).unwrap().to_vec_f32().unwrap(),
        [10.0, 40.0, 30.0, 80.0]
    );
    assert_eq!(
        b.div(&a).unwrap().to_vec_f32().unwrap(),
        [10.0, 10.0, 10.0 / 3.0, 5.0]
    );
    assert_eq!(a.sum(-1, false).unwrap().to_vec_f32().unwrap(), [3.0, 7.0]);
    assert_eq!(a.sum(0, true).unwrap().shape(), vec![1, 2]);
    let e = a.exp().unwrap().to_vec_f32().unwrap();
    for (x, y) in e.iter().zip([1f32, 2.0, 3.0, 4.0]) {
        assert!((x - y.exp()).abs() <= 1e-6 * y.exp());
    }
    let s = arr(&[0.0, 2.0], &[2]).silu().unwrap().to_vec_f32().unwrap();
    assert_eq!(s[0], 0.0);
    assert!((s[1] - 2.0 / (1.0 + (-2f32).exp())).abs() < 1e-6);
    let q = Array::from_slice(&[7u32, 9, 2], &[3]).unwrap();
    let two = Array::scalar(2.0, Dtype::U32).unwrap();
    assert_eq!(
        q.floor_div(&two).unwrap().to_vec::<u32>().unwrap(),
        [3, 4, 1]
    );
}

#[test]
fn matmul_reshape_transpose_slice_concat() {
    let a = arr(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]);
    let b = arr(&[1.0, 0.0, 0.0, 1.0, 1.0, 1.0], &[3, 2]);
    assert_eq!(
        a.matmul(&b).unwrap().to_vec_f32().unwrap(),
        [4.0, 5.0, 10.0, 11.0]
    );
    let t = a.transpose(&[1, 0]).unwrap();
    assert_eq!(t.shape(), vec![3, 2]);
    assert_eq!(t.to_vec_f32().unwrap(), [1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
    assert_eq!(a.reshape(&[-1]).unwrap().shape(), vec![6]);
    assert_eq!(a.expand_dims(1).unwrap().shape(), vec![2, 1, 3]);
    let s = a.slice(&[0, 1], &[2, 3]).unwrap();
    assert_eq!(s.to_vec_f32().unwrap(), [2.0, 3.0, 5.0, 6.0]);
    let c = concatenate(&[&a, &a.slice(&[0, 0], &[1, 3]).unwrap()], 0).unwrap();
    assert_eq!(c.shape(), vec![3, 3]);
    let z = Array::zeros(&[2, 3], Dtype::F32).unwrap();
    let u = z
        .slice_update(&arr(&[9.0, 8.0], &[1, 2]), &[1, 1], &[2, 3])
        .unwrap();
    assert_eq!(u.to_vec_f32().unwrap(), [0.0, 0.0, 0.0, 0.0, 9.0, 8.0]);
}

#[test]
fn softmax_topk_and_gathers() {
    let g = arr(&[0.1, 3.0, -1.0, 2.0, 5.0, 0.0, 1.0, 4.0], &[2, 4]);
    let p = g.softmax(-1, true).unwrap().to_vec_f32().unwrap();
    let row0: f32 = p[..4].iter().sum();
    assert!((row0 - 1.0).abs() < 1e-6);
    // Top-2 per row, as mlx-lm takes it: argpartition(-g, kth=1)[..., :2].
    let idx = g.neg().unwrap().argpartition(1, -1).unwrap();
    let top = idx.slice(&[0, 0], &[2, 2]).unwrap();
    let mut r0 = top.to_vec::<u32>().unwrap();
    r0[..2].sort();
    r0[2..].sort();
    assert_eq!(r0, [1, 3, 0, 3]);
    let vals = g.take_along_axis(&top, -1).unwrap().to_vec_f32().unwrap();
    let mut v0 = vals[..2].to_vec();
    v0.sort_by(f32::total_cmp);
    assert_eq!(v0, [2.0, 3.0]);
    let order = arr(&[3.0, 1.0, 2.0], &[3]).argsort(0).unwrap();
    assert_eq!(order.to_vec::<u32>().unwrap(), [1, 2, 0]);
    let table = arr(&[0.0, 1.0, 10.0, 11.0, 20.0, 21.0], &[3, 2]);
    let ids = Array::from_slice(&[2u32, 0], &[2]).unwrap();
    let rows = table.take(&ids, 0).unwrap();
    assert_eq!(rows.to_vec_f32().unwrap(), [20.0, 21.0, 0.0, 1.0]);
}

/// Deterministic pseudo-random f32s in [-1, 1) (a test-local LCG; no statistics needed).
fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Reference `x @ w.T` in f64 over already-dequantized weights.
fn matmul_t(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut out = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0f64;
            for t in 0..k {
                acc += x[i * k + t] as f64 * w[j * k + t] as f64;
            }
            out[i * n + j] = acc as f32;
        }
    }
    out
}

#[test]
fn quantize_dequantize_and_quantized_matmul() {
    let (m, k, n) = (3usize, 128usize, 8usize);
    let w = arr(&noise(n * k, 1), &[n, k]);
    let x = arr(&noise(m * k, 2), &[m, k]);
    for bits in [2, 4, 8] {
        let q = quantize(&w, 64, bits).unwrap();
        assert_eq!(q.weight.shape(), vec![n, k * bits as usize / 32]);
        assert_eq!(q.weight.dtype(), Dtype::U32);
        assert_eq!(q.scales.shape(), vec![n, k / 64]);
        assert_eq!(q.input_dims(), Some(k));
        let wd = dequantize(&q).unwrap().to_vec_f32().unwrap();
        // Affine rounding error is at most half a step; a step is range / (2^bits - 1) <= 2 /
        // (2^bits - 1) for values in [-1, 1), plus MLX's scale nudge (<= one more step).
        let step = 2.0 / ((1u32 << bits) - 1) as f32;
        let w_host = w.to_vec_f32().unwrap();
        for (a, b) in wd.iter().zip(&w_host) {
            assert!((a - b).abs() <= 1.5 * step, "bits {bits}: {a} vs {b}");
        }
        let y = quantized_matmul(&x, &q, true)
            .unwrap()
            .to_vec_f32()
            .unwrap();
        let want = matmul_t(&x.to_vec_f32().unwrap(), &wd, m, k, n);
        // f32 accumulation over k=128 products of |x|,|w| <= 1: rounding << 1e-4.
        for (a, b) in y.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-4, "bits {bits}: {a} vs {b}");
        }
    }
}

#[test]
fn gather_qmm_picks_the_indexed_expert() {
    let (e, k, n) = (4usize, 64usize, 8usize);
    let stack = arr(&noise(e * n * k, 3), &[e, n, k]);
    let q = quantize(&stack, 64, 4).unwrap();
    assert_eq!(q.weight.shape(), vec![e, n, k / 8]);
    let wd = dequantize(&q).unwrap().to_vec_f32().unwrap();
    // Two tokens, each routed to two experts: x [2, 1, 1, k] against indices [2, 2].
    let x = arr(&noise(2 * k, 4), &[2, 1, 1, k]);
    let inds = Array::from_slice(&[3u32, 1, 0, 3], &[2, 2]).unwrap();
    let y = gather_qmm(&x, &q, None, Some(&inds), true, false).unwrap();
    assert_eq!(y.shape(), vec![2, 2, 1, n]);
    let y = y.to_vec_f32().unwrap();
    let xs = x.to_vec_f32().unwrap();
    for (slot, (tok, ex)) in [(0usize, 3usize), (0, 1), (1, 0), (1, 3)]
        .iter()
        .enumerate()
    {
        let want = matmul_t(
            &xs[tok * k..(tok + 1) * k],
            &wd[ex * n * k..(ex + 1) * n * k],
            1,
            k,
            n,
        );
        for (a, b) in y[slot * n..(slot + 1) * n].iter().zip(&want) {
            assert!((a - b).abs() <= 1e-4, "slot {slot}: {a} vs {b}");
        }
    }
}

#[test]
fn rms_norm_rope_and_attention() {
    let x = arr(&[1.0, 2.0, 3.0, 4.0], &[1, 4]);
    let w = arr(&[1.0, 1.0, 2.0, 2.0], &[4]);
    let y = fast::rms_norm(&x, Some(&w), 0.0)
        .unwrap()
        .to_vec_f32()
        .unwrap();
    let r = (30f32 / 4.0).sqrt();
    for (a, b) in y.iter().zip([1.0 / r, 2.0 / r, 6.0 / r, 8.0 / r]) {
        assert!((a - b).abs() < 1e-6);
    }

    // RoPE at position 1 with base 10000, dims 4, non-traditional: pairs (0,2), (1,3) rotate by
    // theta_i = 1 * 10000^(-2i/4).
    let v = arr(&[1.0, 2.0, 3.0, 4.0], &[1, 1, 1, 4]);
    let out = fast::rope(&v, 4, false, 10000.0, 1.0, 1)
        .unwrap()
        .to_vec_f32()
        .unwrap();
    let (t0, t1) = (1f32, 0.01f32);
    let want = [
        1.0 * t0.cos() - 3.0 * t0.sin(),
        2.0 * t1.cos() - 4.0 * t1.sin(),
        3.0 * t0.cos() + 1.0 * t0.sin(),
        4.0 * t1.cos() + 2.0 * t1.sin(),
    ];
    for (a, b) in out.iter().zip(want) {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }

    // Causal attention with one head, 2 positions: the first query sees only the first key.
    let q = arr(&[1.0, 0.0, 0.0, 1.0], &[1, 1, 2, 2]);
    let k = arr(&[1.0, 0.0, 0.0, 1.0], &[1, 1, 2, 2]);
    let vv = arr(&[10.0, 0.0, 0.0, 10.0], &[1, 1, 2, 2]);
    let o = fast::scaled_dot_product_attention(&q, &k, &vv, 1.0, fast::Mask::Causal)
        .unwrap()
        .to_vec_f32()
        .unwrap();
    assert_eq!(&o[..2], &[10.0, 0.0]);
    let p = 1.0 / (1.0 + (-1f32).exp()); // softmax([0, 1])[1]
    assert!((o[2] - 10.0 * (1.0 - p)).abs() < 1e-5 && (o[3] - 10.0 * p).abs() < 1e-5);
    let none = fast::scaled_dot_product_attention(&q, &k, &vv, 1.0, fast::Mask::None)
        .unwrap()
        .to_vec_f32()
        .unwrap();
    assert!((none[0] - 10.0 * p).abs() < 1e-5);
    let keep = Array::from_slice(&[1u8, 0, 1, 1], &[2, 2])
        .unwrap()
        .astype(Dtype::Bool)
        .unwrap();
    let masked = fast::scaled_dot_product_attention(&q, &k, &vv, 1.0, fast::Mask::Array(&keep))
        .unwrap()
        .to_vec_f32()
        .unwrap();
    assert_eq!(masked, o);
}

/// Attention sinks as gpt-oss uses them: each query head's softmax gets one more logit, its
/// sink, which has no value. Checked against the sum written out by hand, for grouped heads
/// (two query heads on one KV head), a causal mask with more keys than queries, and a
/// boolean mask; without sinks the same call is plain attention.
#[test]
fn sdpa_with_sinks_adds_one_logit_per_head_that_has_no_value() {
    // Budget: f32 softmax of a handful of logits; MLX and the f64 sum differ in rounding only.
    const MAX_ABS_ERR: f64 = 1e-5;
    let (hq, len, keys, d) = (2usize, 3usize, 5usize, 4usize);
    let val = |i: usize, scale: f32| ((i * 7 % 11) as f32 - 5.0) * scale;
    let qd: Vec<f32> = (0..hq * len * d).map(|i| val(i, 0.25)).collect();
    let kd: Vec<f32> = (0..keys * d).map(|i| val(i + 3, 0.2)).collect();
    let vd: Vec<f32> = (0..keys * d).map(|i| val(i + 5, 1.0)).collect();
    let sinks = [0.5f32, -1.25];
    let scale = 0.5f32;
    let (q, k, v) = (
        arr(&qd, &[1, hq, len, d]),
        arr(&kd, &[1, 1, keys, d]),
        arr(&vd, &[1, 1, keys, d]),
    );
    let s = arr(&sinks, &[hq]);
    // Query i sits at position keys - len + i and sees keys up to it (MLX's causal mask).
    let want = |sinks: Option<&[f32]>| -> Vec<f64> {
        let mut out = Vec::new();
        for h in 0..hq {
            for i in 0..len {
                let seen = keys - len + i + 1;
                let logits: Vec<f64> = (0..seen)
                    .map(|j| {
                        (0..d)
                            .map(|x| qd[(h * len + i) * d + x] as f64 * kd[j * d + x] as f64)
                            .sum::<f64>()
                            * scale as f64
                    })
                    .collect();
                let sink = sinks.map(|s| s[h] as f64);
                let top = logits.iter().copied().chain(sink).fold(f64::MIN, f64::max);
                let total: f64 = logits
                    .iter()
                    .chain(sink.as_ref())
                    .map(|l| (l - top).exp())
                    .sum();
                for x in 0..d {
                    let o: f64 = (0..seen)
                        .map(|j| (logits[j] - top).exp() / total * vd[j * d + x] as f64)
                        .sum();
                    out.push(o);
                }
            }
        }
        out
    };
    let close = |got: Vec<f32>, want: Vec<f64>| {
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert!((*g as f64 - w).abs() < MAX_ABS_ERR, "{got:?} vs {want:?}");
        }
    };
    let with =
        fast::scaled_dot_product_attention_sinks(&q, &k, &v, scale, fast::Mask::Causal, Some(&s))
            .unwrap();
    assert_eq!(with.shape(), vec![1, hq, len, d]);
    close(with.to_vec_f32().unwrap(), want(Some(&sinks)));
    let without = fast::scaled_dot_product_attention(&q, &k, &v, scale, fast::Mask::Causal)
        .unwrap()
        .to_vec_f32()
        .unwrap();
    close(without, want(None));
    // The same causal pattern as a boolean mask [len, keys] gives the same output.
    let keep: Vec<u8> = (0..len)
        .flat_map(|i| (0..keys).map(move |j| u8::from(j <= keys - len + i)))
        .collect();
    let keep = Array::from_slice(&keep, &[len, keys])
        .unwrap()
        .astype(Dtype::Bool)
        .unwrap();
    let masked = fast::scaled_dot_product_attention_sinks(
        &q,
        &k,
        &v,
        scale,
        fast::Mask::Array(&keep),
        Some(&s),
    )
    .unwrap();
    close(masked.to_vec_f32().unwrap(), want(Some(&sinks)));
}

#[test]
fn host_buffer_writes_are_seen_by_later_ops() {
    let mut pool = Array::host_buffer(&[2, 3], Dtype::F32).unwrap();
    assert_eq!(pool.to_vec_f32().unwrap(), [0.0; 6]);
    let two = Array::scalar(2.0, Dtype::F32).unwrap();

    let write = |pool: &mut Array, vals: [f32; 6]| {
        // SAFETY: no evaluation of `pool` runs concurrently; earlier results were evaluated.
        let bytes = unsafe { pool.data_mut() }.unwrap();
        assert_eq!(bytes.len(), 24);
        for (chunk, v) in bytes.chunks_exact_mut(4).zip(vals) {
            chunk.copy_from_slice(&v.to_le_bytes());
        }
    };

    write(&mut pool, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let first = pool.mul(&two).unwrap();
    first.eval().unwrap();
    // A lazy op built now but evaluated after the next write reads the new bytes.
    let lazy = pool.slice(&[1, 0], &[2, 3]).unwrap().mul(&two).unwrap();
    write(&mut pool, [-1.0, -2.0, -3.0, -4.0, -5.0, -6.0]);
    let second = pool.mul(&two).unwrap();
    assert_eq!(
        first.to_vec_f32().unwrap(),
        [2.0, 4.0, 6.0, 8.0, 10.0, 12.0]
    );
    assert_eq!(
        second.to_vec_f32().unwrap(),
        [-2.0, -4.0, -6.0, -8.0, -10.0, -12.0]
    );
    assert_eq!(lazy.to_vec_f32().unwrap(), [-8.0, -10.0, -12.0]);

    // The pool also feeds gather_qmm: write u32 codes in place and compare with quantize's.
    let w = arr(&noise(2 * 8 * 64, 9), &[2, 8, 64]);
    let q = quantize(&w, 64, 4).unwrap();
    let mut slots = Array::host_buffer(&[2, 8, 8], Dtype::U32).unwrap();
    let codes = q.weight.to_vec::<u32>().unwrap();
    // SAFETY: nothing reads `slots` yet.
    let bytes = unsafe { slots.data_mut() }.unwrap();
    for (chunk, c) in bytes.chunks_exact_mut(4).zip(&codes) {
        chunk.copy_from_slice(&c.to_le_bytes());
    }
    let pooled = QuantizedMatrix {
        weight: slots,
        ..q.clone()
    };
    let x = arr(&noise(64, 10), &[1, 1, 64]);
    let idx = Array::from_slice(&[1u32], &[1]).unwrap();
    let a = gather_qmm(&x, &q, None, Some(&idx), true, false)
        .unwrap()
        .to_vec_f32()
        .unwrap();
    let b = gather_qmm(&x, &pooled, None, Some(&idx), true, false)
        .unwrap()
        .to_vec_f32()
        .unwrap();
    assert_eq!(a, b);
}

#[test]
fn data_mut_rejects_views() {
    let a = arr(&[1.0, 2.0, 3.0, 4.0], &[2, 2]);
    let mut t = a.transpose(&[1, 0]).unwrap();
    // SAFETY: the call fails before any slice exists.
    let err = unsafe { t.data_mut() }.unwrap_err();
    assert!(matches!(err, Error::Mlx { op: "data_mut", .. }));
}

#[test]
fn loads_safetensors_lazily_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.safetensors");
    // A hand-written safetensors file: 8-byte header length, JSON header, raw little-endian data.
    let header = br#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"U32","shape":[1],"data_offsets":[8,12]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(&1.5f32.to_le_bytes());
    bytes.extend_from_slice(&(-2f32).to_le_bytes());
    bytes.extend_from_slice(&7u32.to_le_bytes());
    std::fs::write(&path, bytes).unwrap();
    let map = load_safetensors(&path).unwrap();
    assert_eq!(map.keys().collect::<Vec<_>>(), ["a", "b"]);
    assert_eq!(map["a"].to_vec_f32().unwrap(), [1.5, -2.0]);
    assert_eq!(map["b"].to_vec::<u32>().unwrap(), [7]);
    let err = load_safetensors(&dir.path().join("missing.safetensors")).unwrap_err();
    assert!(matches!(
        err,
        Error::Mlx {
            op: "load_safetensors",
            ..
        }
    ));
}

/// Reading views copies them on the host in row-major order (a 3-D transpose of a slice, of
/// integers), and reading an array already scheduled with `async_eval` waits for that array.
#[test]
fn reads_of_views_and_of_scheduled_arrays() {
    let v: Vec<u32> = (0..24).collect();
    let a = Array::from_slice(&v, &[2, 3, 4]).unwrap();
    let t = a
        .slice(&[0, 1, 1], &[2, 3, 4])
        .unwrap()
        .transpose(&[2, 0, 1])
        .unwrap();
    let mut want = Vec::new();
    for k in 1..4u32 {
        for i in 0..2u32 {
            for j in 1..3u32 {
                want.push(i * 12 + j * 4 + k);
            }
        }
    }
    assert_eq!(t.shape(), vec![3, 2, 2]);
    assert_eq!(t.to_vec::<u32>().unwrap(), want);
    let b = arr(&[1.0, 2.0, 3.0], &[3]);
    let s = b.mul(&b).unwrap();
    async_eval(&[&s]).unwrap();
    assert_eq!(s.to_vec_f32().unwrap(), [1.0, 4.0, 9.0]);
}
