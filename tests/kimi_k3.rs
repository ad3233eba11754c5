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
//! Then greedy tokens through `flashpack run` on 3 prompts from both sources, the other variants
//! of the layer (text-only layout, full-rank gate, no lower bound, no attention residuals, a plain
//! `q_proj`, the bias on the block, top-1, the latent MoE), every stage (with the latent MoE), and
//! a chat in Kimi's `<|im_user|>` turns. Odd widths:
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
        greedy_tokens_equal_mlx_lms(&pack, reference, label);
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

/// The layer's other variants against mlx-lm's 4-bit conversion, resident and streaming through
/// 2 slots, in one call and in chunks: the text-only layout (the selection bias on the block),
/// 4 layers alternating KDA and MLA from a sparse first layer, a full-rank KDA output gate, the
/// decay without a lower bound (`compute_g`), plain residuals, a plain `q_proj`, top-1 routing
/// (weights not renormalised), and the latent MoE (experts of 128 on a down-projected input of
/// 128, their sum normed and projected back up).
#[test]
fn kimi_k3_variants_give_mlx_lms_logits() {
    if !python_has_mlx_lm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let s = FixtureSpec {
        num_layers: 4,
        full_attention_interval: 2,
        first_k_dense_replace: 0,
        top_k: 1,
        q_lora_rank: None,
        attn_res_block_size: 0,
        full_rank_gate: true,
        gate_lower_bound: None,
        multimodal: false,
        latent_size: 128,
        latent_norm: true,
        ..spec()
    };
    let src = write(&s, &d.join("hf"));
    let c: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    assert!(c.get("text_config").is_none(), "{c}");
    let mlx_dir = d.join("mlx");
    mlx_lm_convert_q4(&src, &mlx_dir);
    mlx_lm_logits_chunked(&mlx_dir, PROMPT, DECODE, CHUNK);
    let pack = d.join("p.flashpack");
    let p = convert(&mlx_dir, &pack);
    let meta = &p.meta().model;
    let la = meta.linear_attention.as_ref().unwrap();
    assert!(la.full_rank_gate && la.gate_lower_bound.is_none());
    assert_eq!(
        (meta.attn_res_block_size, meta.situ.is_some()),
        (None, true)
    );
    assert_eq!(meta.sparse_layers(), [0, 1, 2, 3]);
    assert_eq!(meta.expert_hidden_size(), 128);
    assert_eq!(
        p.hidden_size(),
        128,
        "the expert directory's width is the latent's"
    );
    assert!(p
        .tensor("model.layers.1.mlp.routed_expert_norm.weight")
        .is_some());
    assert!(p.tensor("model.layers.0.self_attn.g_proj.weight").is_some());
    assert!(p.tensor("model.layers.1.self_attn.q_proj.weight").is_some());
    let w = check_resident_and_streaming(
        &pack,
        &mlx_dir,
        2,
        (PROMPT, DECODE, Some(CHUNK)),
        "kimi_k3 variants",
    );
    // The upstream folder converts to the same layer kinds, its bias read from the block.
    let q = convert(&src, &d.join("hf.flashpack"));
    assert!(q
        .tensor("model.layers.2.mlp.gate.e_score_correction_bias")
        .is_some());
    eprintln!("max |logit diff| against mlx-lm: {w}");
}

/// Every stage through the CLI, with the latent MoE (experts of width 64 on a latent of 128):
/// convert with profiling (each calibration window's residual blocks carried layer to layer, the
/// experts streamed at the latent's width), cold 2-bit experts and merging, `verify`, `inspect`
/// (the MLA layer's latent and key per token, the KDA layers' fixed state, both layer kinds and
/// the experts' latent named), `eval` against the bf16 source, and `run` under a budget that
/// streams the experts, giving the resident tokens.
#[test]
fn every_stage_runs_on_kimi_k3() {
    let dir = tempfile::tempdir().unwrap();
    let (calib, text) = texts_of(dir.path(), 400);
    let s = FixtureSpec {
        routing_skew: 0.2,
        latent_size: 128,
        latent_norm: true,
        ..spec()
    };
    let src = write(&s, &dir.path().join("src"));
    let pack = dir.path().join("kimi_k3.flashpack");
    let (src_s, pack_s) = (src.to_str().unwrap(), pack.to_str().unwrap());
    let (_, p) = convert_every_stage(&src, &pack, &calib, "kimi_k3");
    assert_eq!(p.meta().model.arch, Arch::KimiK3);
    let inspect = flashpack_out(&["inspect", pack_s, "--json"]);
    let r: Value = serde_json::from_slice(&inspect.stdout).unwrap();
    // The MLA layer: a latent of 64 and an unrotated key of 32 per token, x 2 bytes.
    assert_eq!(
        r["kv_cache_bytes_per_token"].as_u64(),
        Some((64 + 32) * 2),
        "{r}"
    );
    // 2 KDA layers: the last 3 inputs of the 3 x 128-channel convolution (bf16) and 2 heads'
    // 64 x 64 state (f32).
    assert_eq!(
        r["recurrent_state_bytes"].as_u64(),
        Some(2 * (3 * 384 * 2 + 2 * 64 * 64 * 4)),
        "{r}"
    );
    let report = String::from_utf8_lossy(&flashpack_out(&["inspect", pack_s]).stdout).into_owned();
    assert!(
        report.contains(
            "1 of 3 layers MLA, 3 heads, latent 64 + unrotated 32, query rank 64, output gate; \
             2 Kimi Delta Attention (2 heads of 64, conv 4)"
        ),
        "{report}"
    );
    assert!(
        report.contains("(hidden 192, experts on a latent of 128, expert rows 64)"),
        "{report}"
    );
    let (kl, top1, e) = eval_against(pack_s, &text, src_s);
    assert!(kl > 0.0 && kl < 2.0, "{e}");
    assert!((0.0..=1.0).contains(&top1), "{e}");
    streaming_keeps_the_tokens(
        pack_s,
        "The history of the lighthouse, told in full",
        "25%",
        p.experts().len() as u64,
        "kimi_k3",
    );
}

/// A prompt format in Kimi's turns (`<|im_user|>user<|im_middle|>...<|im_end|>`, a default
/// system turn when the conversation has none, the model's turn opened by
/// `<|im_assistant|>assistant<|im_middle|>`), as Kimi's repositories ship it in
/// `chat_template.jinja`: `chat` and `serve` render it, and the prompt's token count says the
/// model read that text.
const TEMPLATE: &str = "{%- for message in messages -%}\
{%- if loop.first and messages[0]['role'] != 'system' -%}\
<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>\
{%- endif -%}\
{%- if message['role'] == 'system' -%}<|im_system|>system<|im_middle|>\
{%- elif message['role'] == 'user' -%}<|im_user|>user<|im_middle|>\
{%- elif message['role'] == 'assistant' -%}<|im_assistant|>assistant<|im_middle|>\
{%- endif -%}\
{{ message['content'] }}<|im_end|>\
{%- endfor -%}\
{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|>{%- endif -%}";

#[test]
fn kimi_k3_chats_and_serves_with_its_turn_format() {
    let dir = tempfile::tempdir().unwrap();
    let src = write(&spec(), &dir.path().join("src"));
    std::fs::write(src.join("chat_template.jinja"), TEMPLATE).unwrap();
    let path = src.join("tokenizer_config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config.as_object_mut().unwrap().remove("chat_template");
    std::fs::write(&path, config.to_string()).unwrap();
    let pack = dir.path().join("p.flashpack");
    convert(&src, &pack);
    let tokens = |text: &str| -> u64 {
        let tok =
            tokenizers::Tokenizer::from_file(tiny_tokenizer().join("tokenizer.json")).unwrap();
        tok.encode(text, false).unwrap().get_ids().len() as u64
    };
    let system =
        "<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>";
    let first = format!(
        "{system}<|im_user|>user<|im_middle|>Hi<|im_end|><|im_assistant|>assistant<|im_middle|>"
    );
    let second = format!(
        "{system}<|im_user|>user<|im_middle|>Hi<|im_end|><|im_assistant|>assistant<|im_middle|>\
         Hello!<|im_end|><|im_user|>user<|im_middle|>Bye<|im_end|>\
         <|im_assistant|>assistant<|im_middle|>"
    );

    // chat: two turns; the first prompt is exactly that text.
    let (turns, stderr) = chat_two_turns(&pack, &[]);
    assert_eq!(turns.len(), 2, "{stderr}");
    assert_eq!(turns[0]["prompt_tokens"], tokens(&first), "{stderr}");

    // serve: the whole conversation in one request.
    let server = Server::start(&pack, &[]);
    let body = json!({
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Bye"},
        ],
        "max_tokens": 2, "temperature": 0,
    });
    let r = post(server.addr, "/v1/chat/completions", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["usage"]["prompt_tokens"], tokens(&second));
}
