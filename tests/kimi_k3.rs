//! Kimi-K3 (`kimi_k3`: Kimi Delta Attention layers (a per-channel decay with a lower bound, its
//! own short convolution, a gated output norm) beside MLA layers without RoPE and with an output
//! gate, attention residuals over blocks of 2 layers, SiTU in every MLP and expert, a sigmoid
//! router in 4 expert groups with its selection bias and scaling, a shared expert) through the
//! default CLI: `flashpack convert SRC -o P` of the upstream layout in bf16 (the multimodal
//! wrapper: `text_config`, `language_model.*`, `block_sparse_moe.experts.N.w1`, the attention's
//! `q/k/v_proj` and `q/k/v_conv1d` apart, `A_log` `[1, 1, heads, 1]`, `kv_b_proj`,
//! `self_attention_res.proj_weight`, a vision tower and an MTP tensor) and of mlx-lm's 4-bit
//! conversion give mlx-lm's logits for a 24-token prompt, in one call and in chunks of 5, plus 8
//! cached decode steps, every expert resident and streaming through 3 slots for 8 experts top-2.
//! For the upstream folder the reference is mlx-lm's conversion with the router kept in bf16, as
//! flashpack's dense policy keeps routers (the residual projections mlx-lm never quantizes).
//! Then greedy tokens through `flashpack run` on 3 prompts, the other variants of the layer
//! (text-only layout, full-rank gate, no lower bound, no attention residuals, a plain `q_proj`,
//! the bias on the block), every stage, and a chat in Kimi's `<|im_user|>` turns. Odd widths:
//! hidden 192, 3 MLA heads of 64 + 32 over one latent of 64, 2 KDA heads of 64. Needs python3 with
//! mlx-lm (CI installs it) for the mlx-lm comparisons; skipped with a note otherwise.

use std::path::{Path, PathBuf};

use crate::common::chat_two_turns;
use crate::common::fixtures::FixtureSpec;
use crate::common::http::{post, Server};
use crate::common::texts_of;
use flashpack::arch::{Arch, DeltaProjections, Scoring};
use flashpack::format::Pack;
use serde_json::{json, Value};

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

/// 3 layers (KDA with a dense SiTU MLP, KDA, MLA; the last two sparse), blocks of 2 layers, 8
/// experts of width 64 top-2 in 4 groups of which 2 are chosen, the multimodal layout, the
/// bundled model's tokenizer.
fn spec() -> FixtureSpec {
    FixtureSpec {
        hidden_size: 192,
        num_layers: 3,
        full_attention_interval: 3,
        num_experts: 8,
        top_k: 2,
        moe_intermediate_size: 64,
        intermediate_size: 128,
        num_heads: 3,
        head_dim: 64,
        q_lora_rank: Some(64),
        kv_lora_rank: 64,
        qk_rope_head_dim: 32,
        linear_key_heads: 2,
        linear_value_heads: 2,
        linear_key_head_dim: 64,
        linear_value_head_dim: 64,
        conv_kernel: 4,
        first_k_dense_replace: 1,
        attn_res_block_size: 2,
        vocab_size: 8192,
        multimodal: true,
        tokenizer_from: Some(tiny_tokenizer()),
        ..FixtureSpec::tiny(Arch::KimiK3)
    }
}

fn tiny_tokenizer() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/qwen3moe-tiny")
}

fn write(spec: &FixtureSpec, dir: &Path) -> PathBuf {
    spec.write(dir).unwrap();
    dir.to_path_buf()
}

/// `flashpack convert SRC -o PACK --quiet`, opened.
fn convert(src: &Path, pack: &Path) -> Pack {
    flashpack(&[
        "convert",
        src.to_str().unwrap(),
        "-o",
        pack.to_str().unwrap(),
        "--quiet",
    ]);
    Pack::open(pack).unwrap()
}

#[test]
fn kimi_k3_gives_mlx_lms_logits_and_greedy_tokens_from_upstream_and_mlx_lm_sources() {
    if !python_has_mlx_lm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let bf16 = write(&spec(), &d.join("hf-bf16"));
    let mlx_dir = d.join("mlx");
    mlx_lm_convert_q4(&bf16, &mlx_dir);
    mlx_lm_logits_chunked(&mlx_dir, PROMPT, DECODE, CHUNK);
    // flashpack keeps routers in the source's floats; mlx-lm's recipe stores them at 8 bits.
    // The reference keeps them (and, as its own recipe does, the residual projections).
    let bf16_ref = d.join("ref-bf16");
    mlx_lm_convert_q4_keeping(&bf16, &bf16_ref, &["mlp.gate", "res_proj"]);
    mlx_lm_logits_chunked(&bf16_ref, PROMPT, DECODE, CHUNK);
    let mut worst = Vec::new();
    for (src, reference, label) in [
        (&bf16, &bf16_ref, "upstream bf16"),
        (&mlx_dir, &mlx_dir, "mlx-lm 4-bit"),
    ] {
        let pack = d.join(format!("{}.flashpack", label.replace(' ', "-")));
        let p = convert(src, &pack);
        let meta = p.meta().model.clone();
        assert_eq!(meta.arch, Arch::KimiK3, "{label}");
        let la = meta.linear_attention.as_ref().expect("KDA layers");
        assert_eq!(la.projections, DeltaProjections::Kda, "{label}");
        assert_eq!(la.gate_lower_bound, Some(-5.0), "{label}");
        assert_eq!(
            (0..3).map(|l| meta.is_linear_layer(l)).collect::<Vec<_>>(),
            [true, true, false]
        );
        let mla = meta.mla.as_ref().expect("MLA layers");
        assert!(mla.no_rope && mla.output_gate, "{label}");
        assert_eq!(meta.attn_res_block_size, Some(2), "{label}");
        let situ = meta.situ.expect("SiTU");
        assert_eq!((situ.beta, situ.linear_beta), (1.5, Some(3.0)), "{label}");
        assert_eq!(meta.router.scoring, Scoring::Sigmoid, "{label}");
        assert_eq!(
            (meta.router.n_group, meta.router.topk_group),
            (4, 2),
            "{label}"
        );
        // mlx-lm's names; the vision tower and the MTP module dropped.
        for name in [
            "model.layers.0.self_attn.qkv_proj.weight",
            "model.layers.0.self_attn.qkv_conv.conv.weight",
            "model.layers.0.self_attn.A_log",
            "model.layers.0.self_attention_res_proj.weight",
            "model.layers.1.mlp.gate.e_score_correction_bias",
            "model.layers.1.mlp.shared_experts.down_proj.weight",
            "model.layers.2.self_attn.embed_q.weight",
            "model.layers.2.self_attn.g_proj.weight",
            "model.output_attn_res_norm.weight",
        ] {
            assert!(p.tensor(name).is_some(), "{label}: {name}");
        }
        assert_eq!(
            p.tensor("model.layers.0.self_attn.A_log")
                .map(|t| t.shape.clone()),
            Some(vec![2]),
            "{label}"
        );
        assert_eq!(
            p.tensor("model.layers.1.self_attn.qkv_conv.conv.weight")
                .map(|t| t.shape.clone()),
            Some(vec![384, 4, 1]),
            "{label}"
        );
        // The residual projections stay floats (mlx-lm's quant_predicate never quantizes them).
        assert_eq!(
            p.tensor("model.layers.1.mlp_res_proj.weight")
                .map(|t| t.bits),
            Some(0),
            "{label}"
        );
        assert!(
            p.tensors()
                .iter()
                .all(|t| !t.name.contains("mtp.") && !t.name.contains("vision")),
            "{label}: MTP and vision tensors are dropped"
        );
        if src == &bf16 {
            greedy_tokens_equal_mlx_lms(&pack, reference, label);
        }
        let w = check_resident_and_streaming(
            &pack,
            reference,
            3,
            (PROMPT, DECODE, Some(CHUNK)),
            &format!("kimi_k3 {label}"),
        );
        worst.push(format!("{label}: {w}"));
    }
    eprintln!("max |logit diff| against mlx-lm: {worst:?}");
}
