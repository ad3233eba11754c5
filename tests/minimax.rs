//! MiniMax-M2 (`minimax_m2`, mlx-lm's `minimax`: q/k RMSNorm over the full projected width,
//! half of each head rotated, a sigmoid router run in f32 on an f32 copy of its input with a
//! selection bias on the MoE block, weights cast back to the input's type) through the default
//! CLI: `flashpack convert SRC -o P` of a Hugging Face folder in bf16 and in FP8 with 128x128
//! block scales (what MiniMax ships; 192 wide, so the blocks are partial), and of mlx-lm's
//! 4-bit conversion, give mlx-lm's logits for a 24-token prompt, in one call and in chunks of
//! 5, plus 8 cached decode steps, every expert resident and streaming through 4 slots for 12
//! experts top-3. For the Hugging Face folders the reference is mlx-lm's conversion with the
//! router kept in bf16, as flashpack's dense policy keeps routers (mlx-lm's own recipe stores
//! it at 8 bits; a pack of its folder keeps those codes). Then greedy tokens through
//! `flashpack run` on 3 prompts, and every stage. Odd widths (hidden 192, 3 heads of 64 over one
//! KV head), no BOS token. Needs python3 with mlx-lm (CI installs it); skipped with a note
//! otherwise.

use std::path::{Path, PathBuf};

use crate::common::fixtures::{FixtureSpec, Fp8Fixture};
use crate::common::texts_of;
use flashpack::arch::{Arch, QkNorm, Scoring};
use flashpack::format::Pack;

use crate::common::mlx_lm;
use mlx_lm::{
    check_resident_and_streaming, convert_every_stage, eval_against, flashpack, flashpack_out,
    greedy_tokens_equal_mlx_lms, mlx_lm_convert_q4, mlx_lm_convert_q4_keeping,
    mlx_lm_logits_chunked, python_has_mlx_lm, streaming_keeps_the_tokens,
};

const PROMPT: &[u32] = &[
    785, 3840, 315, 279, 1879, 374, 264, 3364, 911, 1246, 11, 323, 13, 5112, 42, 977, 8000, 12, 1,
    2048, 333, 4444, 5, 6001,
];
const DECODE: &[u32] = &[17, 4093, 220, 7, 8191, 300, 1500, 64];
const CHUNK: usize = 5;

/// 3 layers, 3 heads of 64 over one KV head (32 rotated), 12 experts top-3 of width 128.
fn spec() -> FixtureSpec {
    FixtureSpec {
        hidden_size: 192,
        num_layers: 3,
        num_experts: 12,
        top_k: 3,
        moe_intermediate_size: 128,
        num_heads: 3,
        num_kv_heads: 1,
        head_dim: 64,
        vocab_size: 8192,
        tokenizer_from: Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/qwen3moe-tiny")),
        ..FixtureSpec::tiny(Arch::Minimax)
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

/// mlx-lm's 4-bit conversion of `src` with the router kept in bf16, and its logits.
fn reference_with_a_bf16_router(src: &Path, out: &Path) {
    mlx_lm_convert_q4_keeping(src, out, &["block_sparse_moe.gate"]);
    mlx_lm_logits_chunked(out, PROMPT, DECODE, CHUNK);
}

#[test]
fn minimax_gives_mlx_lms_logits_and_greedy_tokens_from_bf16_fp8_and_mlx_lm_sources() {
    if !python_has_mlx_lm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let bf16 = write(&spec(), &d.join("hf-bf16"));
    let fp8 = write(
        &FixtureSpec {
            fp8: Fp8Fixture::Blocks(128),
            ..spec()
        },
        &d.join("hf-fp8"),
    );
    let mlx_dir = d.join("mlx");
    mlx_lm_convert_q4(&bf16, &mlx_dir);
    mlx_lm_logits_chunked(&mlx_dir, PROMPT, DECODE, CHUNK);
    let (bf16_ref, fp8_ref) = (d.join("ref-bf16"), d.join("ref-fp8"));
    reference_with_a_bf16_router(&bf16, &bf16_ref);
    reference_with_a_bf16_router(&fp8, &fp8_ref);
    let mut worst = Vec::new();
    for (src, reference, label) in [
        (&bf16, &bf16_ref, "hf bf16"),
        (&fp8, &fp8_ref, "hf fp8"),
        (&mlx_dir, &mlx_dir, "mlx-lm 4-bit"),
    ] {
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
        assert_eq!(meta.arch, Arch::Minimax, "{label}");
        assert_eq!(meta.bos_token_id, None, "{label}: no BOS");
        assert_eq!(meta.qk_norm, QkNorm::FullWidth, "{label}");
        assert_eq!(meta.rope_dims(), 32, "{label}: rotary_dim");
        assert!(
            meta.router.selection_bias && meta.router.scoring == Scoring::Sigmoid,
            "{label}"
        );
        // The block's bias is stored where the router reads it.
        assert!(
            p.tensor("model.layers.2.block_sparse_moe.gate.e_score_correction_bias")
                .is_some(),
            "{label}"
        );
        if src == &bf16 {
            greedy_tokens_equal_mlx_lms(&pack, reference, label);
        }
        let w = check_resident_and_streaming(
            &pack,
            reference,
            4,
            (PROMPT, DECODE, Some(CHUNK)),
            &format!("minimax {label}"),
        );
        worst.push(format!("{label}: {w}"));
    }
    eprintln!("max |logit diff| against mlx-lm: {worst:?}");
}

/// Every stage through the CLI: convert with profiling, cold 2-bit experts and merging,
/// `verify`, `inspect` (one KV head of 64 per layer), `eval` against the bf16 source, and `run`
/// under a budget that streams the experts, giving the resident tokens.
#[test]
fn every_stage_runs_on_minimax() {
    let dir = tempfile::tempdir().unwrap();
    let (calib, text) = texts_of(dir.path(), 400);
    let s = FixtureSpec {
        routing_skew: 0.2,
        ..spec()
    };
    let src = write(&s, &dir.path().join("src"));
    let pack = dir.path().join("minimax.flashpack");
    let (src_s, pack_s) = (src.to_str().unwrap(), pack.to_str().unwrap());
    let (_, p) = convert_every_stage(&src, &pack, &calib, "minimax");
    let inspect = flashpack_out(&["inspect", pack_s, "--json"]);
    let r: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    // 3 layers x keys and values of one KV head of 64 x 2 bytes.
    assert_eq!(
        r["kv_cache_bytes_per_token"].as_u64(),
        Some(3 * 2 * 64 * 2),
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
        "minimax",
    );
}
