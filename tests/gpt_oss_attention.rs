//! gpt-oss attention against a live mlx-lm: one `AttentionBlock` (q/k/v/o with biases, YaRN
//! RoPE, a learned sink per head) run by mlx-lm 0.32.2 and by flashpack's `Attention` on the same
//! bf16 weights and inputs, call after call through the same cache, gives the same outputs.
//! The sliding-window layer keeps mlx-lm's `RotatingKVCache(max_size=window)` and the mask of
//! `create_attention_mask(x, cache, window_size=window)`; the full layer a `KVCache` and
//! `create_attention_mask(x, cache)`. The calls cover a first prompt longer than the window, a
//! first prompt shorter than it, chunked prefill (several multi-token calls, before and after
//! the window fills), single-token decode steps past the point where the rotating buffer wraps,
//! and a multi-token call after the wrap (which puts the buffer back in temporal order).
//! Needs python3 with mlx-lm; skipped with a note otherwise.

use std::path::Path;
use std::process::Command;

use flashpack::arch::ModelConfig;
use flashpack::mlx::{self, Array};
use flashpack::model::{Attention, LayerCache, LayerKv, MlxLmWeights, RotatingKv};

use crate::common::mlx_lm;
use mlx_lm::{max_diff, python_has_mlx_lm, run_ok};

const WINDOW: usize = 8;
const HIDDEN: usize = 64;

/// Tokens per call of each scenario: prompt first, then more calls through the same cache.
const SCENARIOS: &[&[usize]] = &[
    // A prompt past the window; a chunk; decode across the wrap; a chunk after it; decode.
    &[13, 5, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 4, 1, 1, 1, 2, 1],
    // A prompt inside the window; decode that grows the buffer; chunks that fill it.
    &[
        3, 1, 1, 4, 1, 1, 1, 1, 1, 1, 6, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 3, 1,
    ],
    // Exactly the window, then one token at a time.
    &[8, 1, 1, 1, 1, 1, 1, 1, 1, 1],
];

/// Both sides run the same MLX kernels on the same graph (measured: identical outputs); allow
/// one bf16 rounding step of the largest output in case a CPU vector path rounds a reduction
/// differently, far below what a wrong key, mask or sink moves.
const MAX_REL_DIFF: f32 = 1.0 / 256.0;

fn config() -> serde_json::Value {
    serde_json::json!({
        "model_type": "gpt_oss",
        "architectures": ["GptOssForCausalLM"],
        "num_hidden_layers": 2,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "vocab_size": 256,
        "rms_norm_eps": 1e-5,
        "hidden_size": HIDDEN,
        "intermediate_size": 64,
        "head_dim": 16,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "sliding_window": WINDOW,
        "rope_theta": 150000,
        "rope_scaling": {
            "rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
            "truncate": false, "original_max_position_embeddings": 4096
        },
        "layer_types": ["sliding_attention", "full_attention"],
        "max_position_embeddings": 131072,
        "tie_word_embeddings": false,
        "torch_dtype": "bfloat16",
    })
}

/// mlx-lm's side: random bf16 weights (sinks included), one input per call, one output per call
/// for the sliding layer and the full layer, into `dir/attention.safetensors`.
fn mlx_lm_outputs(dir: &Path) {
    let calls: Vec<String> = SCENARIOS
        .iter()
        .map(|s| {
            format!(
                "[{}]",
                s.iter()
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
        .collect();
    let script = format!(
        r#"
import json
import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models.gpt_oss import AttentionBlock, ModelArgs
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache, RotatingKVCache

cfg = json.loads({cfg:?})
args = ModelArgs.from_dict(cfg)
mx.random.seed(7)
attn = AttentionBlock(args)
params = {{k: (mx.random.normal(v.shape) * 0.3).astype(mx.bfloat16) for k, v in tree_flatten(attn.parameters())}}
attn.load_weights(list(params.items()))
out = {{"model.layers.0.self_attn." + k: v for k, v in params.items()}}
for s, calls in enumerate([{calls}]):
    caches = {{"swa": RotatingKVCache(max_size=args.sliding_window), "full": KVCache()}}
    for i, n in enumerate(calls):
        x = (mx.random.normal((1, n, args.hidden_size)) * 2.0).astype(mx.bfloat16)
        out[f"x.{{s}}.{{i}}"] = x
        for kind, c in caches.items():
            w = args.sliding_window if kind == "swa" else None
            mask = create_attention_mask(x, c, window_size=w) if w else create_attention_mask(x, c)
            y = attn(x, mask, c)
            mx.eval(y)
            out[f"{{kind}}.{{s}}.{{i}}"] = y
mx.save_safetensors({out:?}, out)
"#,
        cfg = config().to_string(),
        calls = calls.join(", "),
        out = dir.join("attention.safetensors").display().to_string(),
    );
    run_ok(
        Command::new("python3").args(["-c", &script]),
        "mlx-lm attention",
    );
}

#[test]
fn sliding_and_full_attention_with_sinks_match_mlx_lm_call_for_call() {
    if !python_has_mlx_lm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    mlx_lm_outputs(dir.path());
    let g = mlx::load_safetensors(&dir.path().join("attention.safetensors")).unwrap();
    let cfg = ModelConfig::from_json(&config()).unwrap();
    assert_eq!(cfg.window_of(0), Some(WINDOW));
    assert_eq!(cfg.window_of(1), None);
    let weights = MlxLmWeights {
        tensors: g
            .iter()
            .filter(|(k, _)| k.starts_with("model."))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        ..MlxLmWeights::default()
    };
    let attn = Attention::load(&weights, "model.layers.0.self_attn", &cfg).unwrap();
    let mut worst = 0f32;
    for (s, calls) in SCENARIOS.iter().enumerate() {
        for (kind, window) in [("swa", Some(WINDOW)), ("full", None)] {
            let layer = attn.clone().windowed(window);
            let mut cache = match window {
                Some(w) => LayerCache::Rotating(RotatingKv::new(w)),
                None => LayerCache::Kv(LayerKv::default()),
            };
            let mut seen = 0;
            for (i, &n) in calls.iter().enumerate() {
                let x: &Array = &g[&format!("x.{s}.{i}")];
                assert_eq!(x.shape(), vec![1, n, HIDDEN]);
                let mask = cache.mask(n).unwrap();
                let y = layer.forward(x, mask.as_mask(), &mut cache).unwrap();
                seen += n;
                assert_eq!(cache.offset(), seen);
                let (d, scale) = max_diff(&y, &g[&format!("{kind}.{s}.{i}")]);
                assert!(
                    d <= MAX_REL_DIFF * scale,
                    "{kind}, scenario {s}, call {i} ({n} tokens, {seen} seen): {d} at scale {scale}"
                );
                worst = worst.max(d);
            }
        }
    }
    eprintln!("gpt-oss attention: max |diff| {worst}");
}
