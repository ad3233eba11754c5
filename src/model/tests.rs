//! Forward-pass tests: logits against mlx-lm's (committed goldens from scripts/golden_logits.py),
//! expert placement and mixed-precision pools, the KV cache, and load-time errors.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::*;
use crate::arch::Arch;
use crate::mlx::{self, Array, Dtype, QuantizedMatrix};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

fn golden(name: &str) -> BTreeMap<String, Array> {
    mlx::load_safetensors(&fixture(&format!("golden/{name}/golden.safetensors"))).unwrap()
}

fn ids(a: &Array) -> Vec<u32> {
    a.to_vec::<i32>()
        .unwrap()
        .into_iter()
        .map(|x| x as u32)
        .collect()
}

/// The first index of the largest value (greedy decoding, as `mx.argmax`).
fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Largest |a - b| and the largest |b| (the logit scale).
fn max_diff(a: &Array, b: &Array) -> (f32, f32) {
    assert_eq!(a.shape(), b.shape());
    let (a, b) = (a.to_vec_f32().unwrap(), b.to_vec_f32().unwrap());
    let diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    let scale = b.iter().map(|y| y.abs()).fold(0f32, f32::max);
    (diff, scale)
}

/// Rows `from..to` of a 2-D array.
fn rows(a: &Array, from: usize, to: usize) -> Array {
    let cols = a.dim(-1).unwrap() as i32;
    a.slice(&[from as i32, 0], &[to as i32, cols]).unwrap()
}

// Tolerance for logits against mlx-lm on the same quantized weights. Both sides run the same MLX
// kernels on the same graph, so on one machine the results are identical (measured: 0.0 for
// every architecture and bit width). We still allow one bf16 rounding step at the largest logit
// (2^-8 relative: bf16 keeps 8 significant bits) so that a different CPU vector path in CI, which
// can round a reduction differently, does not fail the test; a real modelling error (a wrong
// norm, mask or routing) moves logits by far more than that.
const LOGIT_TOL_REL: f32 = 1.0 / 256.0;

/// Prefill + cached decode against mlx-lm's logits for one golden folder; returns the max diff.
fn check_golden(name: &str) -> f32 {
    let (cfg, w) = MlxLmWeights::open(&fixture(&format!("golden/{name}"))).unwrap();
    let model = Model::load(&cfg, &w).unwrap();
    let mut experts = ResidentExperts::load(&cfg, &w).unwrap();
    let g = golden(name);
    let prompt = ids(&g["prompt"]);
    let mut cache = model.new_cache();
    let logits = model
        .forward_ids(&prompt, &mut cache, &mut experts)
        .unwrap();
    let logits = logits.reshape(&[prompt.len() as i32, -1]).unwrap();
    let (mut worst, scale) = max_diff(&logits, &g["prefill_logits"]);
    assert!(
        scale > 1.0,
        "{name}: degenerate golden logits (max {scale})"
    );
    assert!(
        worst <= LOGIT_TOL_REL * scale,
        "{name} prefill: {worst} > tol at scale {scale}"
    );
    for (step, &t) in ids(&g["decode_tokens"]).iter().enumerate() {
        let logits = model.forward_ids(&[t], &mut cache, &mut experts).unwrap();
        let logits = logits.reshape(&[1, -1]).unwrap();
        let (d, s) = max_diff(&logits, &rows(&g["decode_logits"], step, step + 1));
        assert!(
            d <= LOGIT_TOL_REL * s,
            "{name} decode step {step}: {d} at scale {s}"
        );
        worst = worst.max(d);
    }
    assert_eq!(cache.offset(), prompt.len() + 8);
    eprintln!("{name}: max |logit diff| vs mlx-lm = {worst} (scale {scale})");
    worst
}

/// `forward_last` and `prefill` (what generation uses) give the last row of mlx-lm's prefill
/// logits and the same cache as `forward`.
#[test]
fn forward_last_is_the_last_row() {
    let (cfg, w) = q4_fixture();
    let model = Model::load(&cfg, &w).unwrap();
    let mut experts = ResidentExperts::load(&cfg, &w).unwrap();
    let g = golden("qwen3_moe-q4");
    let prompt = ids(&g["prompt"]);
    let mut cache = model.new_cache();
    let last = model
        .forward_last_ids(&prompt, &mut cache, &mut experts)
        .unwrap();
    assert_eq!(last.shape(), vec![1, 1, cfg.vocab_size]);
    let last = last.reshape(&[1, -1]).unwrap();
    let n = prompt.len();
    let (d, s) = max_diff(&last, &rows(&g["prefill_logits"], n - 1, n));
    // The head runs on one row here instead of n: another matmul kernel may round differently.
    assert!(d <= LOGIT_TOL_REL * s, "last row: {d} > tol at scale {s}");
    assert_eq!(cache.offset(), n);
    let step = model
        .forward_last_ids(&ids(&g["decode_tokens"])[..1], &mut cache, &mut experts)
        .unwrap()
        .reshape(&[1, -1])
        .unwrap();
    let (d, s) = max_diff(&step, &rows(&g["decode_logits"], 0, 1));
    assert!(
        d <= LOGIT_TOL_REL * s,
        "decode step: {d} > tol at scale {s}"
    );

    // Generation's prefill: all but the last position only fill the cache (the last layer's
    // experts are skipped), then the last position alone.
    let mut cache = model.new_cache();
    model
        .prefill_ids(&prompt[..n - 1], &mut cache, &mut experts)
        .unwrap();
    assert_eq!(cache.offset(), n - 1);
    let last = model
        .forward_last_ids(&prompt[n - 1..], &mut cache, &mut experts)
        .unwrap()
        .reshape(&[1, -1])
        .unwrap();
    let (d, s) = max_diff(&last, &rows(&g["prefill_logits"], n - 1, n));
    assert!(
        d <= LOGIT_TOL_REL * s,
        "prefill then last: {d} > tol at scale {s}"
    );
}

/// The golden folders of `arch` (`fixtures/golden/<model_type>-<recipe>`, written by
/// scripts/golden_logits.py): 4-bit and 2-bit always, plus mlx-lm's mixed recipes where the
/// script makes one (qwen3_moe's mixed_2_6: experts' down_proj 6-bit in layer 1; mixtral's
/// mixed_3_4: 3-bit experts in layer 0, 4-bit down_proj in layer 1).
fn goldens_of(arch: Arch) -> Vec<String> {
    let prefix = format!("{}-", arch.model_type());
    let mut names: Vec<String> = std::fs::read_dir(fixture("golden"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&prefix))
        .collect();
    names.sort();
    for bits in ["q4", "q2"] {
        let want = format!("{prefix}{bits}");
        assert!(
            names.contains(&want),
            "{arch} has no golden {want}: run scripts/golden_logits.py --all"
        );
    }
    names
}

/// Every architecture's goldens, prefill and cached decode, against mlx-lm's logits.
#[test]
fn every_architecture_matches_mlx_lm() {
    for &arch in Arch::ALL {
        for name in goldens_of(arch) {
            check_golden(&name);
        }
    }
}

/// DeepSeek-V4.1 (hyper-connections, a window of 8, layer 1's compressed latents, indexers
/// keeping 3 of them; at 4 and 2 bits, and with YaRN on the compressed layers) against mlx-lm,
/// prefill in one call and 8 cached decode steps: max |diff| 0.
#[test]
fn deepseek_v41_matches_mlx_lm_exactly() {
    for name in goldens_of(Arch::DeepseekV41) {
        assert_eq!(check_golden(&name), 0.0, "{name}");
    }
}

/// DeepSeek-V4.1's prompt in chunks (5, 11 and 24 tokens: across the window of 8 and the
/// compressor's groups of 4, whose open rows carry from one call to the next), then 8 decode
/// steps, and generation's path (all but the last token filling the cache, then the last):
/// mlx-lm's one-call logits, max |diff| 0.
#[test]
fn deepseek_v41_chunked_prefill_matches_mlx_lm() {
    for name in goldens_of(Arch::DeepseekV41) {
        let (cfg, w) = MlxLmWeights::open(&fixture(&format!("golden/{name}"))).unwrap();
        let model = Model::load(&cfg, &w).unwrap();
        let mut experts = ResidentExperts::load(&cfg, &w).unwrap();
        let g = golden(&name);
        let prompt = ids(&g["prompt"]);
        let mut cache = model.new_cache();
        let mut worst = 0f32;
        let mut at = 0;
        for len in [5, 11, 24] {
            let logits = model
                .forward_ids(&prompt[at..at + len], &mut cache, &mut experts)
                .unwrap()
                .reshape(&[len as i32, -1])
                .unwrap();
            let (d, _) = max_diff(&logits, &rows(&g["prefill_logits"], at, at + len));
            worst = worst.max(d);
            at += len;
        }
        assert_eq!(at, prompt.len());
        for (step, &t) in ids(&g["decode_tokens"]).iter().enumerate() {
            let logits = model.forward_ids(&[t], &mut cache, &mut experts).unwrap();
            let logits = logits.reshape(&[1, -1]).unwrap();
            let (d, _) = max_diff(&logits, &rows(&g["decode_logits"], step, step + 1));
            worst = worst.max(d);
        }
        let n = prompt.len();
        let mut cache = model.new_cache();
        model
            .prefill_ids(&prompt[..n - 1], &mut cache, &mut experts)
            .unwrap();
        let last = model
            .forward_last_ids(&prompt[n - 1..], &mut cache, &mut experts)
            .unwrap()
            .reshape(&[1, -1])
            .unwrap();
        let (d, _) = max_diff(&last, &rows(&g["prefill_logits"], n - 1, n));
        worst = worst.max(d);
        eprintln!("{name}: chunks, decode, prefill + last: max |diff| {worst}");
        assert_eq!(worst, 0.0, "{name}");
    }
}

/// DeepSeek-V4.1's indexers really drop compressed latents in the goldens: with `index_topk`
/// raised past the context every query attends to every closed group, and the logits move;
/// the first 15 positions (at most 3 closed groups of 4) keep all of them either way.
#[test]
fn deepseek_v41_raising_index_topk_changes_the_logits() {
    let name = "deepseek_v41-q4";
    let (mut cfg, w) = MlxLmWeights::open(&fixture(&format!("golden/{name}"))).unwrap();
    let c = cfg.compressed_attention.as_mut().unwrap();
    assert_eq!(c.index_topk, 3);
    c.index_topk = 1 << 20;
    let model = Model::load(&cfg, &w).unwrap();
    let mut experts = ResidentExperts::load(&cfg, &w).unwrap();
    let g = golden(name);
    let prompt = ids(&g["prompt"]);
    let mut cache = model.new_cache();
    let logits = model
        .forward_ids(&prompt, &mut cache, &mut experts)
        .unwrap()
        .reshape(&[prompt.len() as i32, -1])
        .unwrap();
    let (early, _) = max_diff(&rows(&logits, 0, 15), &rows(&g["prefill_logits"], 0, 15));
    let (late, scale) = max_diff(&logits, &g["prefill_logits"]);
    assert_eq!(early, 0.0, "the first 15 positions keep every latent");
    assert!(
        late > 0.05 * scale,
        "index_topk changes nothing ({late} at scale {scale})"
    );
    eprintln!("{name}: every latent kept moves the logits by {late} (scale {scale})");
}

/// DeepSeek Sparse Attention is exercised by the goldens (DeepSeek-V3.2, GLM-5): their
/// `index_topk` of 8 is below the 40-token prompt, and raised past the context (every query then
/// attends to every position) the logits move far from mlx-lm's, which
/// `every_architecture_matches_mlx_lm` matches exactly with the top-k the checkpoint has.
#[test]
fn raising_index_topk_past_the_context_changes_the_logits() {
    for name in ["deepseek_v32-q4", "glm_moe_dsa-q4"] {
        let (mut cfg, w) = MlxLmWeights::open(&fixture(&format!("golden/{name}"))).unwrap();
        assert_eq!(cfg.indexer.as_ref().map(|i| i.topk), Some(8), "{name}");
        if let Some(i) = &mut cfg.indexer {
            i.topk = 1 << 20;
        }
        let model = Model::load(&cfg, &w).unwrap();
        let mut experts = ResidentExperts::load(&cfg, &w).unwrap();
        let g = golden(name);
        let prompt = ids(&g["prompt"]);
        let mut cache = model.new_cache();
        let logits = model
            .forward_ids(&prompt, &mut cache, &mut experts)
            .unwrap()
            .reshape(&[prompt.len() as i32, -1])
            .unwrap();
        // The first 8 positions see at most 8 positions either way; only later ones move.
        let (early, _) = max_diff(&rows(&logits, 0, 8), &rows(&g["prefill_logits"], 0, 8));
        let (late, scale) = max_diff(&logits, &g["prefill_logits"]);
        assert_eq!(
            early, 0.0,
            "{name}: the first 8 positions keep every position"
        );
        assert!(
            late > 0.1 * scale,
            "{name}: index_topk changes nothing ({late} at scale {scale})"
        );
        eprintln!("{name}: dense attention moves the logits by {late} (scale {scale})");
    }
}

/// The transformers 5.x spelling of a config (`rope_parameters`, `num_local_experts`, no legacy
/// keys) must give the same model as the legacy one mlx-lm reads.
#[test]
fn both_config_dialects_give_the_same_logits() {
    let dir = fixture("golden/qwen3_moe-q4");
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let o = v.as_object_mut().unwrap();
    let theta = o.remove("rope_theta").unwrap();
    let experts = o.remove("num_experts").unwrap();
    o.insert("num_local_experts".into(), experts);
    o.insert(
        "rope_parameters".into(),
        serde_json::json!({"rope_theta": theta, "rope_type": "default"}),
    );
    let new = ModelConfig::from_json(&v).unwrap();
    let (legacy, w) = MlxLmWeights::open(&dir).unwrap();
    assert_eq!(new, legacy);
    let prompt = ids(&golden("qwen3_moe-q4")["prompt"]);
    let run = |cfg: &ModelConfig| {
        let model = Model::load(cfg, &w).unwrap();
        let mut experts = ResidentExperts::load(cfg, &w).unwrap();
        model
            .forward_ids(&prompt, &mut model.new_cache(), &mut experts)
            .unwrap()
    };
    assert_eq!(max_diff(&run(&new), &run(&legacy)).0, 0.0);
}

/// mlx-lm's `convert -q` on a bf16 Hugging Face folder, done here with the same MLX calls:
/// experts stacked per layer into `switch_mlp`, every linear and embedding whose input width is
/// a multiple of 64 quantized at `bits` (group 64), routers at 8 bits (qwen3_moe's
/// quant_predicate), norms kept.
fn quantize_like_mlx_lm(dir: &Path, bits: i32) -> (ModelConfig, MlxLmWeights) {
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let mut raw = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            raw.extend(mlx::load_safetensors(&p).unwrap());
        }
    }
    let names = cfg.arch.names();
    let mut plain: BTreeMap<String, Array> = BTreeMap::new();
    for l in cfg.sparse_layers() {
        for proj in crate::arch::Proj::ALL {
            let parts: Vec<Array> = (0..cfg.num_experts)
                .map(|e| {
                    let n = names.expert(l, e, proj, crate::arch::Part::Weight);
                    raw.remove(&n).unwrap().expand_dims(0).unwrap()
                })
                .collect();
            let refs: Vec<&Array> = parts.iter().collect();
            let name = names.stacked(l, proj, crate::arch::Part::Weight);
            plain.insert(name, mlx::concatenate(&refs, 0).unwrap());
        }
    }
    plain.extend(raw);
    let mut w = MlxLmWeights {
        default_quant: Some(Quant {
            group_size: 64,
            bits,
            mode: mlx::QuantMode::Affine,
        }),
        ..Default::default()
    };
    for (name, t) in plain {
        let module = name.trim_end_matches(".weight");
        let is_norm = module
            .rsplit('.')
            .next()
            .is_some_and(|m| m.contains("norm"));
        if !name.ends_with(".weight") || is_norm || t.ndim() < 2 || t.dim(-1).unwrap() % 64 != 0 {
            w.tensors.insert(name, t);
            continue;
        }
        let b = if module.ends_with(".mlp.gate") {
            8
        } else {
            bits
        };
        let q = mlx::quantize(&t, 64, b).unwrap();
        if b != bits {
            w.module_quant.insert(
                module.to_string(),
                Quant {
                    group_size: 64,
                    bits: b,
                    mode: mlx::QuantMode::Affine,
                },
            );
        }
        w.tensors.insert(format!("{module}.weight"), q.weight);
        w.tensors.insert(format!("{module}.scales"), q.scales);
        w.tensors
            .insert(format!("{module}.biases"), q.biases.unwrap());
    }
    (cfg, w)
}

// The trained model's golden keeps mlx-lm's 32 largest logits per step. Same tolerance as above.
#[test]
fn trained_qwen3moe_tiny_continues_like_mlx_lm() {
    let (cfg, w) = quantize_like_mlx_lm(&fixture("qwen3moe-tiny"), 4);
    let model = Model::load(&cfg, &w).unwrap();
    let mut experts = ResidentExperts::load(&cfg, &w).unwrap();
    let g = golden("qwen3moe-tiny-q4");
    let prompt = ids(&g["prompt"]);
    let want = ids(&g["greedy_tokens"]);
    let (top_idx, top_val) = (&g["top_indices"], &g["top_values"]);
    let mut cache = model.new_cache();
    let mut logits = model
        .forward_ids(&prompt, &mut cache, &mut experts)
        .unwrap();
    let mut got = Vec::new();
    let mut worst = 0f32;
    for step in 0..=want.len() {
        let last = logits.reshape(&[-1, cfg.vocab_size as i32]).unwrap();
        let n = last.dim(0).unwrap();
        let last = rows(&last, n - 1, n);
        let picked = last
            .take_along_axis(&rows(top_idx, step, step + 1), -1)
            .unwrap();
        let (d, s) = max_diff(&picked, &rows(top_val, step, step + 1));
        assert!(d <= LOGIT_TOL_REL * s, "step {step}: {d} at scale {s}");
        worst = worst.max(d);
        if step == want.len() {
            break;
        }
        let next = argmax(&last.to_vec_f32().unwrap());
        got.push(next);
        logits = model
            .forward_ids(&[next], &mut cache, &mut experts)
            .unwrap();
    }
    assert_eq!(got, want, "greedy continuation differs from mlx-lm's");
    eprintln!("qwen3moe-tiny q4: greedy {got:?}, max top-32 logit diff {worst}");
}

/// A layer's expert pool from the qwen3_moe q4 fixture, with its config and weights.
fn q4_fixture() -> (ModelConfig, MlxLmWeights) {
    MlxLmWeights::open(&fixture("golden/qwen3_moe-q4")).unwrap()
}

fn pool_of(w: &MlxLmWeights, layer: usize) -> ExpertPool {
    let get = |p: &str, bits: i32| {
        let m = format!("model.layers.{layer}.mlp.switch_mlp.{p}");
        QuantizedMatrix {
            weight: w.get(&format!("{m}.weight")).unwrap(),
            scales: w.get(&format!("{m}.scales")).unwrap(),
            biases: w.get(&format!("{m}.biases")),
            group_size: 64,
            bits,
            mode: mlx::QuantMode::Affine,
        }
    };
    ExpertPool::swiglu(get("gate_proj", 4), get("up_proj", 4), get("down_proj", 4))
}

/// `pool` with its experts reordered: slot `s` holds expert `order[s]`.
fn permuted(pool: &ExpertPool, order: &[u32]) -> ExpertPool {
    let idx = Array::from_slice(order, &[order.len()]).unwrap();
    let p = |m: &QuantizedMatrix| QuantizedMatrix {
        weight: m.weight.take(&idx, 0).unwrap(),
        scales: m.scales.take(&idx, 0).unwrap(),
        biases: m.biases.as_ref().map(|b| b.take(&idx, 0).unwrap()),
        ..m.clone()
    };
    ExpertPool::swiglu(p(&pool.gate), p(&pool.up), p(&pool.down))
}

fn logits_with(experts: &mut dyn ExpertStore) -> Array {
    let (cfg, w) = q4_fixture();
    let model = Model::load(&cfg, &w).unwrap();
    let prompt = ids(&golden("qwen3_moe-q4")["prompt"]);
    let mut cache = model.new_cache();
    let a = model.forward_ids(&prompt, &mut cache, experts).unwrap();
    let b = model.forward_ids(&[3], &mut cache, experts).unwrap();
    mlx::concatenate(&[&a, &b], 1).unwrap()
}

#[test]
fn slot_tables_and_split_pools_give_the_same_logits() {
    let (cfg, w) = q4_fixture();
    let reference = logits_with(&mut ResidentExperts::load(&cfg, &w).unwrap());

    // Slots shuffled: slot s holds expert order[s], so expert e sits at slot position(e).
    let order = [2u32, 0, 3, 1];
    let place: Vec<(usize, u32)> = (0..4u32)
        .map(|e| (0, order.iter().position(|&x| x == e).unwrap() as u32))
        .collect();
    let mut shuffled = ResidentExperts::default();
    // Two pools holding the same permuted 4-bit weights: experts {0, 3} served by pool 1,
    // {1, 2} by pool 0, each at its slot in the permuted stack.
    let two: Vec<(usize, u32)> = place
        .iter()
        .enumerate()
        .map(|(e, &(_, slot))| (usize::from(e == 0 || e == 3), slot))
        .collect();
    let mut split = ResidentExperts::default();
    for l in cfg.sparse_layers() {
        let pool = pool_of(&w, l);
        let perm = permuted(&pool, &order);
        shuffled
            .layers
            .insert(l, LayerExperts::placed(vec![perm.clone()], &place).unwrap());
        split.layers.insert(
            l,
            LayerExperts::placed(vec![perm.clone(), perm], &two).unwrap(),
        );
    }
    assert_eq!(max_diff(&logits_with(&mut shuffled), &reference).0, 0.0);
    assert_eq!(max_diff(&logits_with(&mut split), &reference).0, 0.0);
}

/// Requantize a 4-bit pool to `bits` through its dequantized values.
fn requantize(pool: &ExpertPool, bits: i32) -> ExpertPool {
    let r = |m: &QuantizedMatrix| mlx::quantize(&mlx::dequantize(m).unwrap(), 64, bits).unwrap();
    ExpertPool::swiglu(r(&pool.gate), r(&pool.up), r(&pool.down))
}

/// One expert of a pool as a dense f32 matrix (dequantized with f32 scales and biases, as the
/// quantized kernels do internally, so no bf16 rounding of the weights creeps in).
fn dense(m: &QuantizedMatrix, slot: usize) -> Array {
    let take = |a: &Array| {
        let sh = a.shape();
        a.slice(
            &[slot as i32, 0, 0],
            &[slot as i32 + 1, sh[1] as i32, sh[2] as i32],
        )
        .unwrap()
        .reshape(&[sh[1] as i32, sh[2] as i32])
        .unwrap()
    };
    let f32 = |a: &Array| take(a).astype(Dtype::F32).unwrap();
    let one = QuantizedMatrix {
        weight: take(&m.weight),
        scales: f32(&m.scales),
        biases: m.biases.as_ref().map(f32),
        ..m.clone()
    };
    mlx::dequantize(&one).unwrap()
}

#[test]
fn mixed_bit_pools_serve_each_expert_from_its_own_pool() {
    let (_, w) = q4_fixture();
    let hot = pool_of(&w, 0);
    let cold = requantize(&hot, 2);
    assert_eq!((hot.bits(), cold.bits()), (4, 2));
    // Experts 0 and 2 hot (4-bit), 1 and 3 cold (2-bit), each at the slot of its own id.
    let place = [(0usize, 0u32), (1, 1), (0, 2), (1, 3)];
    let layer = LayerExperts::placed(vec![hot.clone(), cold.clone()], &place).unwrap();
    let mut store = ResidentExperts::default();
    store.layers.insert(0, layer);

    let hidden = 128;
    let tokens = 3;
    let xs: Vec<f32> = (0..tokens * hidden)
        .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
        .collect();
    let x = Array::from_slice(&xs, &[1, tokens, hidden]).unwrap();
    let routed: [u32; 6] = [0, 1, 3, 2, 1, 0];
    let inds = Array::from_slice(&routed, &[1, tokens, 2]).unwrap();
    let routes = store.route(0, &inds).unwrap();
    let mut y: Option<Array> = None;
    for r in routes {
        let part = switch_glu(&x, r.pool, &r.slots).unwrap();
        y = Some(match (y, r.serves) {
            (Some(acc), Some(s)) => s.expand_dims(-1).unwrap().select(&part, &acc).unwrap(),
            (_, _) => part,
        });
    }
    let y = y.unwrap().to_vec_f32().unwrap();

    // Reference: dense f32 SwiGLU per (token, expert) with that expert's dequantized weights.
    for t in 0..tokens {
        let xt = Array::from_slice(&xs[t * hidden..(t + 1) * hidden], &[1, hidden]).unwrap();
        for j in 0..2 {
            let e = routed[t * 2 + j] as usize;
            let pool = if place[e].0 == 0 { &hot } else { &cold };
            let lin = |m: &QuantizedMatrix, v: &Array| {
                v.matmul(&dense(m, e).transpose(&[1, 0]).unwrap()).unwrap()
            };
            let h = swiglu(&lin(&pool.gate, &xt), &lin(&pool.up, &xt)).unwrap();
            let want = lin(&pool.down, &h).to_vec_f32().unwrap();
            let got = &y[(t * 2 + j) * hidden..(t * 2 + j + 1) * hidden];
            let scale = want.iter().map(|v| v.abs()).fold(0f32, f32::max);
            // The model path runs in f32 here too (x is f32); the only differences are the
            // order of f32 accumulations in gather_qmm vs matmul: ~1e-6 relative, allow 1e-4.
            for (a, b) in got.iter().zip(&want) {
                assert!(
                    (a - b).abs() <= 1e-4 * scale.max(1.0),
                    "token {t} expert {e}: {a} vs {b}"
                );
            }
        }
    }
}

#[test]
fn kv_cache_grows_past_a_step_and_keeps_every_position() {
    let mut kv = LayerKv::default();
    let chunk = |n: usize, base: f32| {
        let v: Vec<f32> = (0..n * 2).map(|i| base + i as f32).collect();
        Array::from_slice(&v, &[1, 1, n, 2]).unwrap()
    };
    let mut want = Vec::new();
    for (n, base) in [(250usize, 0.0f32), (10, 1000.0), (1, 5000.0)] {
        let c = chunk(n, base);
        want.extend(c.to_vec_f32().unwrap());
        let (k, v) = kv.update_and_fetch(&c, &c).unwrap();
        assert_eq!(k.shape(), vec![1, 1, want.len() / 2, 2]);
        assert_eq!(k.to_vec_f32().unwrap(), want);
        assert_eq!(v.to_vec_f32().unwrap(), want);
    }
    assert_eq!(kv.offset(), 261);
}

#[test]
fn plain_and_quantized_linears_agree() {
    let (_, w) = q4_fixture();
    let module = "model.layers.0.self_attn.q_proj";
    let q = Linear::load(&w, module, 128, 128).unwrap();
    let Matrix::Quantized(qm) = &q.weight else {
        panic!("fixture layer is quantized")
    };
    let bias = Array::from_slice(&vec![0.5f32; 128], &[128]).unwrap();
    let plain = Linear {
        weight: Matrix::Plain(mlx::dequantize(qm).unwrap().astype(Dtype::F32).unwrap()),
        bias: Some(bias.clone()),
    };
    let quant = Linear {
        bias: Some(bias),
        ..q
    };
    let x: Vec<f32> = (0..256).map(|i| (i as f32 * 0.37).sin()).collect();
    let x = Array::from_slice(&x, &[2, 128]).unwrap();
    let (d, s) = max_diff(
        &plain.forward(&x).unwrap(),
        &quant.forward(&x).unwrap().astype(Dtype::F32).unwrap(),
    );
    // Quantized matmul returns the scales' dtype (bf16): one bf16 rounding of the output.
    assert!(d <= s / 128.0, "{d} at scale {s}");
}

#[test]
fn load_errors_name_the_tensor() {
    let (cfg, mut w) = q4_fixture();
    w.tensors.remove("model.layers.1.self_attn.k_norm.weight");
    let err = Model::load(&cfg, &w).unwrap_err();
    assert!(
        matches!(&err, ComputeError::MissingTensor { name } if name == "model.layers.1.self_attn.k_norm.weight"),
        "{err}"
    );

    let (cfg, mut w) = q4_fixture();
    let bad = Array::from_slice(&[1f32; 64], &[64]).unwrap();
    w.tensors.insert("model.norm.weight".into(), bad);
    let err = Model::load(&cfg, &w).unwrap_err();
    assert!(
        matches!(&err, ComputeError::BadShape { found, .. } if found == &vec![64]),
        "{err}"
    );

    let (cfg, mut w) = q4_fixture();
    w.default_quant = None;
    let err = Model::load(&cfg, &w).unwrap_err();
    assert!(
        matches!(err, ComputeError::MissingQuantization { .. }),
        "{err}"
    );

    let (mut cfg, w) = q4_fixture();
    cfg.rope.rope_type = "longrope".into();
    assert!(matches!(
        Model::load(&cfg, &w),
        Err(ComputeError::Unsupported { .. })
    ));

    let (cfg, w) = q4_fixture();
    let model = Model::load(&cfg, &w).unwrap();
    let mut experts = ResidentExperts::load(&cfg, &w).unwrap();
    let err = model
        .forward_ids(&[256], &mut model.new_cache(), &mut experts)
        .unwrap_err();
    assert!(matches!(
        err,
        ComputeError::TokenOutOfRange {
            id: 256,
            vocab: 256
        }
    ));
    let err = model
        .forward_ids(
            &[1],
            &mut model.new_cache(),
            &mut ResidentExperts::default(),
        )
        .unwrap_err();
    assert!(matches!(err, ComputeError::NoExperts { layer: 0 }));
    let mut wrong = KvCache::new(5);
    let err = model
        .forward_ids(&[1], &mut wrong, &mut experts)
        .unwrap_err();
    assert!(matches!(
        err,
        ComputeError::CacheMismatch {
            layers: 5,
            model: 2
        }
    ));
}

#[test]
fn placement_errors_are_reported() {
    let (_, w) = q4_fixture();
    let pool = pool_of(&w, 0);
    let err = LayerExperts::placed(vec![pool.clone()], &[(1, 0)]).unwrap_err();
    assert!(matches!(err, ComputeError::BadPlacement { expert: 0, .. }));
    let err = LayerExperts::placed(vec![pool], &[(0, 0), (0, 4)]).unwrap_err();
    assert!(matches!(err, ComputeError::BadPlacement { expert: 1, .. }));
}

/// The shared-expert block: gated (Qwen2-MoE) scales the MLP by the gate's sigmoid, ungated
/// (N shared experts, DeepSeek-V3 / GLM-4.5) adds the MLP as it is, none loads nothing, and an
/// architecture that names no shared expert refuses a config that has one.
#[test]
fn shared_experts_gated_ungated_or_none() {
    let (mut cfg, w) = MlxLmWeights::open(&fixture("golden/qwen2_moe-q4")).unwrap();
    let block = "model.layers.0.mlp";
    let gated = SharedExpert::load(&w, &cfg, block).unwrap().unwrap();
    assert!(gated.gate.is_some());
    cfg.shared_expert.as_mut().unwrap().gated = false;
    let plain = SharedExpert::load(&w, &cfg, block).unwrap().unwrap();
    assert!(plain.gate.is_none());

    let h = cfg.hidden_size;
    let xs: Vec<f32> = (0..3 * h).map(|i| (i as f32 * 0.11).sin()).collect();
    let x = Array::from_slice(&xs, &[1, 3, h]).unwrap();
    let y = Array::from_slice(&vec![0.25f32; 3 * h], &[1, 3, h]).unwrap();
    let m = plain.mlp.forward(&x).unwrap();
    let want_plain = y.add(&m).unwrap();
    assert_eq!(max_diff(&plain.add_to(&y, &x).unwrap(), &want_plain).0, 0.0);
    let g = gated.gate.as_ref().unwrap().forward(&x).unwrap();
    let want_gated = y.add(&g.sigmoid().unwrap().mul(&m).unwrap()).unwrap();
    assert_eq!(max_diff(&gated.add_to(&y, &x).unwrap(), &want_gated).0, 0.0);

    cfg.shared_expert = None;
    assert!(SharedExpert::load(&w, &cfg, block).unwrap().is_none());

    let n = crate::arch::SharedExpert::experts(2, 64).unwrap();
    assert_eq!((n.intermediate_size, n.gated), (128, false));
    assert!(crate::arch::SharedExpert::experts(0, 64).is_none());

    let (mut q3, w3) = q4_fixture();
    q3.shared_expert = crate::arch::SharedExpert::experts(1, 64);
    assert!(matches!(
        SharedExpert::load(&w3, &q3, "model.layers.0.mlp"),
        Err(ComputeError::Unsupported { .. })
    ));
}

/// Prefix reuse: a KV cache cuts back to any earlier position; a model with linear-attention
/// layers refuses to (its state holds no earlier positions) and instead restarts from a snapshot
/// taken at the prefix's end. Both continue to mlx-lm's logits.
#[test]
fn prefix_reuse_truncates_kv_and_restores_linear_state_from_a_snapshot() {
    for (name, hybrid) in [("qwen3_moe-q4", false), ("qwen3_next-q4", true)] {
        let (cfg, w) = MlxLmWeights::open(&fixture(&format!("golden/{name}"))).unwrap();
        let model = Model::load(&cfg, &w).unwrap();
        let mut experts = ResidentExperts::load(&cfg, &w).unwrap();
        let g = golden(name);
        let prompt = ids(&g["prompt"]);
        let n = prompt.len();
        let (p, q) = (20, 30);
        let mut cache = model.new_cache();
        model
            .prefill_ids(&prompt[..p], &mut cache, &mut experts)
            .unwrap();
        let saved = cache.snapshot();
        model
            .prefill_ids(&prompt[p..q], &mut cache, &mut experts)
            .unwrap();
        assert_eq!(cache.offset(), q);
        let cut = cache.truncate(p);
        let mut resumed = if hybrid {
            assert!(
                matches!(
                    cut,
                    Err(ComputeError::CannotTruncate {
                        offset: 30,
                        position: 20,
                        linear: true,
                        window: None
                    })
                ),
                "{name}: {cut:?}"
            );
            assert_eq!(
                cache.offset(),
                q,
                "{name}: a refused truncate changes nothing"
            );
            saved
        } else {
            cut.unwrap();
            assert_eq!(cache.offset(), p);
            cache
        };
        // The current position is always accepted.
        resumed.truncate(p).unwrap();
        let last = model
            .forward_last_ids(&prompt[p..], &mut resumed, &mut experts)
            .unwrap()
            .reshape(&[1, -1])
            .unwrap();
        let (d, s) = max_diff(&last, &rows(&g["prefill_logits"], n - 1, n));
        assert!(d <= LOGIT_TOL_REL * s, "{name}: {d} at scale {s}");
        assert_eq!(resumed.offset(), n);
    }
}

/// The experts' activations fused into one compiled function (what a GPU runs, as mlx-lm
/// `@mx.compile`s its `swiglu`s) give the op-by-op values, for both activations, two dtypes,
/// the decode and a prompt shape, inputs past gpt-oss's clamp, and two (alpha, limit) pairs:
/// the compile cache keys on the constants, so one pair never replays another's graph.
#[test]
fn fused_activations_equal_the_op_by_op_ones() {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        // [-12, 12): past the clamp limits below on both sides.
        (seed >> 40) as f32 / (1u64 << 24) as f32 * 24.0 - 12.0
    };
    let acts = [
        ExpertAct::Swiglu,
        ExpertAct::Clamped {
            alpha: 1.702,
            limit: 7.0,
        },
        ExpertAct::Clamped {
            alpha: 1.5,
            limit: 3.0,
        },
    ];
    for shape in [[1usize, 1, 4, 24], [1, 5, 4, 24]] {
        let n: usize = shape.iter().product();
        for dtype in [Dtype::BF16, Dtype::F32] {
            let mk = |v: Vec<f32>| {
                Array::from_slice(&v, &shape)
                    .unwrap()
                    .astype(dtype)
                    .unwrap()
            };
            let gate = mk((0..n).map(|_| next()).collect());
            let up = mk((0..n).map(|_| next()).collect());
            for act in &acts {
                // Twice: the second call replays the cached graph.
                for _ in 0..2 {
                    let a = act.apply_as(&gate, &up, false).unwrap();
                    let f = act.apply_as(&gate, &up, true).unwrap();
                    assert_eq!(a.shape(), f.shape());
                    assert_eq!(a.dtype(), f.dtype());
                    let (a, f) = (a.to_vec_f32().unwrap(), f.to_vec_f32().unwrap());
                    assert!(a.iter().any(|&x| x != 0.0), "{act:?}: all zero");
                    assert_eq!(a, f, "{act:?} {dtype:?} {shape:?}");
                }
            }
        }
    }
}
