//! Profile, usage-based mixed precision, merging and eval on the bundled trained model.
//!
//! Mixed 4/2-bit layers are checked against a reference that holds every expert in one 4-bit
//! pool: a 2-bit code q with scale s and bias b means s*q + b, and the same q, s, b at 4 bits
//! mean exactly the same weight, so the reference computes the same model through a single
//! `gather_qmm` per projection, without the runtime's pool selection.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use flashpack::codec::{Codec, CodecChoice};
use flashpack::convert::{convert_checkpoint, load::Checkpoint, ConvertOptions};
use flashpack::eval::{evaluate_text, EvalError, Source};
use flashpack::format::{ExpertEntry, Pack};
use flashpack::mlx::{Array, Dtype, QuantizedMatrix};
use flashpack::model::{ExpertPool, LayerExperts, Model, ResidentExperts};
use flashpack::progress::Silent;
use flashpack::run::experts::{ExpertCache, StoreOptions};
use flashpack::run::open;
use flashpack::run::stream::StreamingExperts;

fn trained() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/qwen3moe-tiny")
}

fn convert(out: &Path, opts: ConvertOptions) {
    let ck = Checkpoint::open(&trained()).unwrap();
    let opts = ConvertOptions {
        codec: CodecChoice::Fixed(Codec::Raw),
        ..opts
    };
    convert_checkpoint(&ck, out, &opts, &Silent, Instant::now()).unwrap();
}

/// Logits of `prompt` (one call) through the pack's streaming store, all experts resident.
fn pack_logits(path: &Path, prompt: &[u32]) -> Vec<f32> {
    let (pack, cfg, weights) = open::open(path, true).unwrap();
    let model = Model::load(&cfg, &weights).unwrap();
    let mut cache = ExpertCache::new(&pack, &StoreOptions::default()).unwrap();
    cache.warm_all(&pack).unwrap();
    let mut store = StreamingExperts::new(&pack, cache, cfg.num_experts, false);
    let mut kv = model.new_cache();
    model
        .forward_ids(prompt, &mut kv, &mut store)
        .unwrap()
        .to_vec_f32()
        .unwrap()
}

/// 2-bit codes (16 per little-endian u32) as 4-bit codes (8 per word).
fn widen_2_to_4(words2: &[u8]) -> Vec<u8> {
    let mut codes = Vec::with_capacity(words2.len() * 4);
    for w in words2.chunks_exact(4) {
        let w = u32::from_le_bytes(w.try_into().unwrap());
        codes.extend((0..16).map(|k| (w >> (2 * k)) & 3));
    }
    let mut out = Vec::with_capacity(codes.len() / 2);
    for c in codes.chunks_exact(8) {
        let w = c
            .iter()
            .enumerate()
            .fold(0u32, |w, (k, &q)| w | (q << (4 * k)));
        out.extend_from_slice(&w.to_le_bytes());
    }
    out
}

/// One expert's nine parts (raw codec, one segment), codes widened to 4 bits.
fn expert_parts(pack: &Pack, e: &ExpertEntry, hidden: usize, inter: usize) -> [Vec<u8>; 9] {
    let stored = pack.segment_stored(e);
    let (w, aux) = stored.split_at(e.weights_stored_len as usize);
    assert!(e.bits.is_uniform(), "uniform experts");
    let b = e.bits.max() as usize;
    let proj_w = inter * hidden * b / 8;
    let widen = |x: &[u8]| {
        if b == 2 {
            widen_2_to_4(x)
        } else {
            assert_eq!(b, 4);
            x.to_vec()
        }
    };
    let g = e.group_size as usize;
    let s = inter * hidden / g * 2; // bf16 scales of one projection
    let a = |i: usize| aux[i * s..(i + 1) * s].to_vec();
    [
        widen(&w[..proj_w]),
        a(0),
        a(1),
        widen(&w[proj_w..2 * proj_w]),
        a(2),
        a(3),
        widen(&w[2 * proj_w..3 * proj_w]),
        a(4),
        a(5),
    ]
}

/// Every stored expert of the pack in one 4-bit pool per layer.
fn widened_reference(pack: &Pack, layers: usize, experts: usize) -> ResidentExperts {
    let (h, i) = (
        pack.hidden_size() as usize,
        pack.intermediate_size() as usize,
    );
    let mut out = ResidentExperts {
        layers: BTreeMap::new(),
    };
    for l in 0..layers {
        let mut parts: Vec<Vec<u8>> = vec![Vec::new(); 9];
        for e in 0..experts {
            let segs = pack.expert_segments(l as u32, e as u32);
            assert_eq!(segs.len(), 1);
            for (p, bytes) in expert_parts(pack, &segs[0], h, i).into_iter().enumerate() {
                parts[p].extend(bytes);
            }
        }
        let m = |p: usize, rows: usize, cols: usize| QuantizedMatrix {
            weight: Array::from_bytes(&parts[p], &[experts, rows, cols / 8], Dtype::U32).unwrap(),
            scales: Array::from_bytes(&parts[p + 1], &[experts, rows, cols / 64], Dtype::BF16)
                .unwrap(),
            biases: Some(
                Array::from_bytes(&parts[p + 2], &[experts, rows, cols / 64], Dtype::BF16).unwrap(),
            ),
            group_size: 64,
            bits: 4,
            mode: flashpack::mlx::QuantMode::Affine,
        };
        let pool = ExpertPool::swiglu(m(0, i, h), m(3, i, h), m(6, h, i));
        out.layers.insert(l, LayerExperts::resident(pool));
    }
    out
}

// 40 token ids below the vocabulary size (8192); any ids do for comparing two runs.
const PROMPT: &[u32] = &[
    464, 1502, 373, 257, 1110, 286, 262, 1578, 13, 383, 3290, 2068, 284, 262, 3952, 290, 3114, 351,
    4120, 13, 632, 531, 1327, 11, 475, 340, 373, 407, 1479, 13, 198, 4299, 2163, 7, 87, 2599, 198,
    220, 220, 1441,
];

fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0f32, |m, x| m.max(x.abs()))
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

#[test]
fn usage_based_mixed_precision_runs_like_a_single_pool_reference() {
    let dir = tempfile::tempdir().unwrap();
    let mixed = dir.path().join("mixed.flashpack");
    convert(
        &mixed,
        ConvertOptions {
            cold_bits: Some(2),
            cold_fraction: Some(0.5),
            ..ConvertOptions::default()
        },
    );
    let pack = Pack::open(&mixed).unwrap();
    let meta = pack.metadata().clone();
    let plan: Vec<Vec<u8>> =
        serde_json::from_value(meta["quantization"]["expert_plan"].clone()).unwrap();
    // Half of the 192 experts are cold, and they are the ones with the least routing mass.
    let cold: Vec<(usize, usize)> = (0..6)
        .flat_map(|l| (0..32).map(move |e| (l, e)))
        .filter(|&(l, e)| plan[l][e] == 2)
        .collect();
    assert_eq!(cold.len(), 96);
    let share = |l: usize, e: usize| {
        let m: Vec<f64> =
            serde_json::from_value(meta["profile"]["layers"][l]["mass"].clone()).unwrap();
        m[e] / m.iter().sum::<f64>()
    };
    let hottest_cold = cold.iter().map(|&(l, e)| share(l, e)).fold(0f64, f64::max);
    let coldest_hot = (0..6)
        .flat_map(|l| (0..32).map(move |e| (l, e)))
        .filter(|&(l, e)| plan[l][e] == 4)
        .map(|(l, e)| share(l, e))
        .fold(f64::INFINITY, f64::min);
    assert!(
        hottest_cold <= coldest_hot,
        "{hottest_cold} > {coldest_hot}"
    );
    // Each stored expert has the bits of the plan.
    for e in pack.experts() {
        assert_eq!(e.bits, plan[e.layer as usize][e.expert as usize]);
    }
    // The routing trace: every calibration token's top-4 of every layer, in text order, and so
    // exactly the profile's counts.
    let trace = pack
        .meta()
        .profile_trace()
        .expect("the profile stores its routing trace");
    assert_eq!((trace.k, trace.layers.len()), (4, 6));
    assert_eq!(
        trace.tokens as u64,
        meta["profile"]["tokens"].as_u64().unwrap()
    );
    for (l, ids) in &trace.layers {
        let counts: Vec<u64> =
            serde_json::from_value(meta["profile"]["layers"][*l]["counts"].clone()).unwrap();
        let mut seen = vec![0u64; 32];
        for &e in ids {
            seen[e as usize] += 1;
        }
        assert_eq!(seen, counts, "layer {l}");
        // Each token's four experts are distinct.
        assert!(ids
            .chunks(4)
            .all(|t| (1..4).all(|i| !t[..i].contains(&t[i]))));
    }
    // A damaged trace is ignored, not misread.
    let damaged = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut m = meta.clone();
        f(&mut m["profile"]["trace"]);
        flashpack::format::Metadata::parse(m)
            .unwrap()
            .profile_trace()
    };
    assert!(damaged(&|t| t["ids"] = "u32le".into()).is_none());
    assert!(damaged(&|t| t["layers"]["3"] = "AAAA".into()).is_none());
    assert!(damaged(&|t| t["layers"]["3"] = "not base64!".into()).is_none());
    assert!(damaged(&|t| t["k"] = 0.into()).is_none());
    assert!(damaged(&|t| *t = serde_json::Value::Null).is_none());
    // `plan` replays it through the runtime's cache for each expert budget.
    let facts = flashpack::plan::model::of_pack(&pack);
    let machine = flashpack::plan::budgets::Machine::with_ram(64 << 30);
    let rows = flashpack::plan::budgets::rows(&facts, &machine, 4096, 64).unwrap();
    for row in &rows {
        let want = if row.expert_budget_bytes.is_some() {
            flashpack::plan::budgets::HitModel::Trace
        } else {
            flashpack::plan::budgets::HitModel::Profile
        };
        assert_eq!(row.hit_model, want, "{}", row.label);
        assert!(row.hit_rate > 0.0 && row.hit_rate <= 1.0, "{}", row.label);
    }
    // Fewer slots, fewer hits.
    assert!(rows[1].hit_rate > rows[2].hit_rate && rows[2].hit_rate > rows[3].hit_rate);

    let got = pack_logits(&mixed, PROMPT);
    let (_, cfg, weights) = open::open(&mixed, true).unwrap();
    let model = Model::load(&cfg, &weights).unwrap();
    let mut reference = widened_reference(&pack, 6, 32);
    let mut kv = model.new_cache();
    let want = model
        .forward_ids(PROMPT, &mut kv, &mut reference)
        .unwrap()
        .to_vec_f32()
        .unwrap();
    let scale = max_abs(&want);
    let d = max_diff(&got, &want);
    // Same weights, same graph but for the pool selection: allow one bf16 step (1/256) of the
    // largest logit for a different accumulation order of the 2- and 4-bit kernels.
    assert!(
        d <= scale / 256.0,
        "mixed vs reference: {d} at scale {scale}"
    );

    // The check can fail: a uniform 4-bit pack gives clearly different logits.
    let u4 = dir.path().join("u4.flashpack");
    convert(&u4, ConvertOptions::default());
    let other = pack_logits(&u4, PROMPT);
    assert!(max_diff(&other, &want) > 4.0 * scale / 256.0);
}

#[test]
fn merging_stores_fewer_experts_and_the_pack_runs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("merged.flashpack");
    let mut opts = ConvertOptions::default();
    opts.plan.merge_ratio = Some(0.25);
    convert(&path, opts);
    let pack = Pack::open(&path).unwrap();
    let map: Vec<Vec<u32>> = serde_json::from_value(pack.metadata()["merge_map"].clone()).unwrap();
    assert_eq!(map.len(), 6);
    for (l, m) in map.iter().enumerate() {
        assert_eq!(m.len(), 32);
        // 8 of 32 merged away; every router expert maps to a stored expert that maps to itself.
        assert_eq!(
            m.iter()
                .enumerate()
                .filter(|&(e, &s)| s as usize != e)
                .count(),
            8
        );
        for &s in m {
            assert_eq!(m[s as usize], s);
            assert_eq!(pack.expert_segments(l as u32, s).len(), 1);
        }
        let stored = pack
            .experts()
            .iter()
            .filter(|e| e.layer as usize == l)
            .count();
        assert_eq!(stored, 24);
    }
    let logits = pack_logits(&path, PROMPT);
    assert!(logits.iter().all(|x| x.is_finite()));
    assert!(max_abs(&logits) > 0.0);
}

#[test]
fn eval_of_a_pack_against_itself_and_its_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("u4.flashpack");
    convert(&path, ConvertOptions::default());
    let text = dir.path().join("t.txt");
    std::fs::write(
        &text,
        "def mean(values):\n    return sum(values) / len(values)\n\nThe river rose for three \
         days before anyone in the valley took it seriously.\n"
            .repeat(6),
    )
    .unwrap();
    let src = Source::detect(&path).unwrap();
    assert_eq!(src, Source::Pack(path.clone()));
    // Windows of 48 tokens: the text is longer, so it is cut.
    let r = evaluate_text(&src, Some(&src), &text, 48, None).unwrap();
    assert!(r.windows > 1, "{r:?}");
    assert_eq!(r.window, 48);
    let c = r.reference.unwrap();
    // Same model and windows: identical logits, so KL is 0 up to f64 rounding of the sums.
    assert!(c.kl_mean.abs() < 1e-9, "{}", c.kl_mean);
    assert_eq!(c.top1_agreement, 1.0);
    assert_eq!(c.nll, r.nll);
    assert!(r.perplexity.is_finite() && r.perplexity > 1.0);

    // Against the bf16 source: the 4-bit pack is close but not identical.
    let source = Source::detect(&trained()).unwrap();
    assert_eq!(source, Source::Checkpoint(trained()));
    let r = evaluate_text(&src, Some(&source), &text, 512, None).unwrap();
    let c = r.reference.unwrap();
    assert!(c.kl_mean > 0.0 && c.kl_mean < 0.5, "{}", c.kl_mean);
    assert!(c.top1_agreement > 0.5, "{}", c.top1_agreement);

    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    assert!(matches!(
        evaluate_text(&src, None, &empty, 512, None),
        Err(EvalError::TooShort { tokens: 0 })
    ));
    assert!(matches!(
        evaluate_text(&src, None, &dir.path().join("missing.txt"), 512, None),
        Err(EvalError::Io { .. })
    ));
    assert!(matches!(
        Source::detect(&dir.path().join("nope")),
        Err(EvalError::NotFound { .. })
    ));
}
