//! DeepSeek-V4.1 (`deepseek_v41`: hyper-connections, a sliding window plus the compressed
//! latents of a KV source layer chosen by indexers, a grouped low-rank output, the
//! `sqrtsoftplus` router, f32 clamped SwiGLU) through the default CLI: `flashpack convert SRC -o
//! P` of the upstream layout in bf16 (`embed.weight`, `layers.L.attn.wq_a.weight`,
//! `layers.L.hc_attn_fn`, `layers.L.ffn.experts.N.w1.weight`, `head.weight`, an `mtp.*` module)
//! and of mlx-lm's 4-bit conversion give mlx-lm's logits for a 24-token prompt, in one call and
//! in chunks of 5, plus 8 cached decode steps, every expert resident and streaming through 3
//! slots for 8 experts top-2. The window (8) and `index_topk` (3 of the prompt's 6 latents)
//! drop positions. Then greedy tokens through `flashpack run` on 3 prompts, and every stage.
//! Odd widths (hidden 192, 4 heads of 64 in 2 output groups). Needs python3 with mlx-lm (CI
//! installs it) for the mlx-lm comparisons; skipped with a note otherwise.

use std::path::{Path, PathBuf};

use crate::common::fixtures::FixtureSpec;
use crate::common::texts_of;
use flashpack::arch::{Arch, Scoring};
use flashpack::format::Pack;

use crate::common::mlx_lm;
use mlx_lm::{
    check_resident_and_streaming, convert_every_stage, eval_against, flashpack, flashpack_out,
    greedy_tokens_equal_mlx_lms, mlx_lm_convert_q4, mlx_lm_logits_chunked, python_has_mlx_lm,
    streaming_keeps_the_tokens,
};

const PROMPT: &[u32] = &[
    785, 3840, 315, 279, 1879, 374, 264, 3364, 911, 1246, 11, 323, 13, 5112, 42, 977, 8000, 12, 1,
    2048, 333, 4444, 5, 6001,
];
const DECODE: &[u32] = &[17, 4093, 220, 7, 8191, 300, 1500, 64];
const CHUNK: usize = 5;

/// 4 layers (layer 0 the window only, layer 1 the KV source, layers 1 and 2 indexers), 4 heads
/// of 64 (16 rotated), query rank 64, 8 experts top-2 of width 64, 3 index heads keeping 3.
fn spec() -> FixtureSpec {
    FixtureSpec {
        hidden_size: 192,
        num_layers: 4,
        num_experts: 8,
        top_k: 2,
        moe_intermediate_size: 64,
        num_heads: 4,
        head_dim: 64,
        q_lora_rank: Some(64),
        qk_rope_head_dim: 16,
        index_heads: 3,
        index_head_dim: 64,
        index_topk: 3,
        sliding_window: 8,
        swiglu_limit: 1.0,
        vocab_size: 8192,
        tokenizer_from: Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/qwen3moe-tiny")),
        ..FixtureSpec::tiny(Arch::DeepseekV41)
    }
}

/// Writes `spec` into `dir` without a BOS token.
fn write(spec: &FixtureSpec, dir: &Path) -> PathBuf {
    spec.write(dir).unwrap();
    let path = dir.join("config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    c.as_object_mut().unwrap().remove("bos_token_id");
    std::fs::write(&path, c.to_string()).unwrap();
    dir.to_path_buf()
}

#[test]
fn deepseek_v41_gives_mlx_lms_logits_and_greedy_tokens_from_upstream_and_mlx_lm_sources() {
    if !python_has_mlx_lm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let bf16 = write(&spec(), &d.join("hf-bf16"));
    // mlx-lm never quantizes the router (a plain array) nor the hyper-connections: its 4-bit
    // conversion is the reference for the upstream folder too.
    let mlx_dir = d.join("mlx");
    mlx_lm_convert_q4(&bf16, &mlx_dir);
    mlx_lm_logits_chunked(&mlx_dir, PROMPT, DECODE, CHUNK);
    let mut worst = Vec::new();
    for (src, label) in [(&bf16, "upstream bf16"), (&mlx_dir, "mlx-lm 4-bit")] {
        let pack = d.join(format!("{}.flashpack", label.replace(' ', "-")));
        flashpack(&[
            "convert",
            src.to_str().unwrap(),
            "-o",
            pack.to_str().unwrap(),
            "--quiet",
        ]);
        let p = Pack::open(&pack).unwrap();
        let meta = p.meta().model.clone();
        assert_eq!(meta.arch, Arch::DeepseekV41, "{label}");
        assert_eq!(meta.bos_token_id, None, "{label}: no BOS");
        assert_eq!(meta.hyper_connections.as_ref().map(|h| h.mult), Some(2));
        let c = meta.compressed_attention.as_ref().unwrap();
        assert_eq!((c.index_topk, c.sliding_window), (3, 8), "{label}");
        assert_eq!(meta.router.scoring, Scoring::SqrtSoftplus, "{label}");
        // mlx-lm's names; the MTP module dropped.
        for name in [
            "model.layers.1.attn_hc.fn",
            "model.layers.1.self_attn.sinks",
            "model.layers.1.self_attn.compressor.kv_norm.weight",
            "model.layers.1.self_attn.indexer.k_proj.weight",
            "model.layers.2.mlp.gate.e_score_correction_bias",
            "model.layers.3.self_attn.o_a_proj.weight",
        ] {
            assert!(p.tensor(name).is_some(), "{label}: {name}");
        }
        assert!(
            p.tensors().iter().all(|t| !t.name.contains("mtp.")),
            "{label}: MTP tensors are dropped"
        );
        if src == &bf16 {
            greedy_tokens_equal_mlx_lms(&pack, &mlx_dir, label);
        }
        let w = check_resident_and_streaming(
            &pack,
            &mlx_dir,
            3,
            (PROMPT, DECODE, Some(CHUNK)),
            &format!("deepseek_v41 {label}"),
        );
        worst.push(format!("{label}: {w}"));
    }
    eprintln!("max |logit diff| against mlx-lm: {worst:?}");
}

/// Every stage through the CLI: convert with profiling (each calibration window's streams and
/// shared latents carried layer to layer), cold 2-bit experts and merging, `verify`, `inspect`
/// (the windows and the compressed latents and index keys counted), `eval` against the bf16
/// source, and `run` under a budget that streams the experts, giving the resident tokens.
#[test]
fn every_stage_runs_on_deepseek_v41() {
    let dir = tempfile::tempdir().unwrap();
    let (calib, text) = texts_of(dir.path(), 400);
    let s = FixtureSpec {
        routing_skew: 0.2,
        ..spec()
    };
    let src = write(&s, &dir.path().join("src"));
    let pack = dir.path().join("deepseek_v41.flashpack");
    let (src_s, pack_s) = (src.to_str().unwrap(), pack.to_str().unwrap());
    let (_, p) = convert_every_stage(&src, &pack, &calib, "deepseek_v41");
    let inspect = flashpack_out(&["inspect", pack_s, "--json"]);
    let r: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    // Per token: layer 1's latent (64) and index key (64) per 4 tokens, in bf16.
    assert_eq!(
        r["kv_cache_bytes_per_token"].as_u64(),
        Some((64 + 64) / 4 * 2),
        "{r}"
    );
    // 4 layers' windows of 8 rows of one 64-wide key, in bf16.
    assert_eq!(
        r["kv_cache_window_bytes"].as_u64(),
        Some(4 * 8 * 64 * 2),
        "{r}"
    );
    let (kl, top1, e) = eval_against(pack_s, &text, src_s);
    assert!(kl > 0.0 && kl < 2.0, "{e}");
    assert!((0.0..=1.0).contains(&top1), "{e}");
    streaming_keeps_the_tokens(
        pack_s,
        "The history of the lighthouse, told in full",
        "25%",
        p.experts().len() as u64,
        "deepseek_v41",
    );
}
