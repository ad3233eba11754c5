//! Qwen3-Next and Qwen3.5 MoE (Gated DeltaNet linear attention with its convolution and
//! recurrent state, gated full attention with partial rotary every `full_attention_interval`
//! layers, a sigmoid-gated shared expert, norms stored offset by one) through the default CLI:
//! `flashpack convert SRC -o P` of a Hugging Face bf16 folder and of mlx-lm's 4-bit conversion
//! of it give mlx-lm's logits (for the bf16 folder, those of mlx-lm's 4-bit conversion with the
//! router and shared-expert gate kept in bf16, as flashpack's dense policy keeps them) for a 41-token prefill plus 8 cached decode steps, with every
//! expert resident and streaming through a cache smaller than one layer's experts, and again
//! with the prompt prefilled in chunks of 16 (the state carried across chunks). Qwen3.5 in both
//! checkpoint layouts: text-only, and multimodal (`text_config`, `model.language_model.*`, a
//! vision tower dropped); each source also carries a multi-token-prediction module (`mtp.*`),
//! dropped. Odd widths (hidden 192, 3 heads), no BOS token. Needs python3 with mlx-lm (CI
//! installs it); skipped with a note otherwise.

use crate::common::short_texts;
use std::path::{Path, PathBuf};

use crate::common::fixtures::{FixtureLayout, FixtureSpec};
use flashpack::arch::Arch;
use flashpack::format::Pack;

use crate::common::mlx_lm;
use mlx_lm::{
    check, convert_every_stage, eval_against, flashpack, flashpack_out, mlx_lm_convert_q4,
    mlx_lm_convert_q4_keeping, mlx_lm_logits, python_has_mlx_lm, run_report,
};

const PROMPT: &[u32] = &[
    785, 3840, 315, 279, 1879, 374, 264, 3364, 911, 1246, 11, 323, 13, 5112, 42, 977, 8000, 12, 1,
    2048, 333, 4444, 5, 6001, 77, 1999, 4321, 18, 902, 6502, 44, 3, 7000, 256, 1024, 610, 95, 5150,
    2, 4096, 123,
];
const DECODE: &[u32] = &[17, 4093, 220, 7, 8191, 300, 1500, 64];
/// Prefill chunk of the chunked pass (generation uses 2,048; smaller here so that the 41-token
/// prompt crosses chunk boundaries).
const CHUNK: usize = 16;

/// The test model of `arch`: 4 layers of which the last has full attention, 3 heads of 64 with
/// one KV head (a quarter rotated), 3 key and 6 value heads of 64 in the linear attention, 12
/// experts top-3 of width 128 and a shared expert of 192.
fn spec(arch: Arch) -> FixtureSpec {
    FixtureSpec {
        hidden_size: 192,
        num_layers: 4,
        full_attention_interval: 4,
        num_experts: 12,
        top_k: 3,
        moe_intermediate_size: 128,
        shared_expert_intermediate_size: 192,
        num_heads: 3,
        num_kv_heads: 1,
        head_dim: 64,
        linear_key_heads: 3,
        linear_value_heads: 6,
        linear_key_head_dim: 64,
        linear_value_head_dim: 64,
        conv_kernel: 4,
        vocab_size: 8192,
        // mlx-lm's qwen3_5 sanitize reads only fused experts; qwen3_next's only per-expert ones.
        layout: if arch == Arch::Qwen35Moe {
            FixtureLayout::Fused
        } else {
            FixtureLayout::PerExpert
        },
        tokenizer_from: Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/qwen3moe-tiny")),
        ..FixtureSpec::tiny(arch)
    }
}

/// Writes `spec` into `dir` without a BOS token.
fn write(spec: &FixtureSpec, dir: &Path) -> PathBuf {
    spec.write(dir).unwrap();
    let path = dir.join("config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    c.as_object_mut().unwrap().remove("bos_token_id");
    if let Some(t) = c.get_mut("text_config").and_then(|t| t.as_object_mut()) {
        t.remove("bos_token_id");
    }
    std::fs::write(&path, c.to_string()).unwrap();
    dir.to_path_buf()
}

#[test]
fn qwen3_next_and_qwen3_5_moe_give_mlx_lms_logits_from_hf_and_mlx_lm_sources() {
    if !python_has_mlx_lm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cases = [
        (Arch::Qwen3Next, "qwen3_next", spec(Arch::Qwen3Next)),
        (
            Arch::Qwen35Moe,
            "qwen3_5_moe text-only",
            spec(Arch::Qwen35Moe),
        ),
        (
            Arch::Qwen35Moe,
            "qwen3_5_moe multimodal",
            FixtureSpec {
                multimodal: true,
                ..spec(Arch::Qwen35Moe)
            },
        ),
    ];
    for (k, (arch, what, s)) in cases.into_iter().enumerate() {
        let hf = write(&s, &d.join(format!("hf-{k}")));
        let mlx_dir = d.join(format!("mlx-{k}"));
        mlx_lm_convert_q4(&hf, &mlx_dir);
        mlx_lm_logits(&mlx_dir, PROMPT, DECODE);
        // The reference for the bf16 source: mlx-lm's 4-bit conversion with the router and the
        // shared-expert gate left in bf16, as flashpack's dense policy keeps them (mlx-lm's own
        // recipe stores them at 8 bits; a pack of its folder keeps those codes).
        let hf_ref = d.join(format!("ref-{k}"));
        mlx_lm_convert_q4_keeping(&hf, &hf_ref, &["mlp.gate", "shared_expert_gate"]);
        mlx_lm_logits(&hf_ref, PROMPT, DECODE);
        for (src, reference, label) in [
            (&hf, &hf_ref, "hf bf16"),
            (&mlx_dir, &mlx_dir, "mlx-lm 4-bit"),
        ] {
            let pack = d.join(format!("{k}-{}.flashpack", label.replace(' ', "-")));
            flashpack(&[
                "convert",
                src.to_str().unwrap(),
                "-o",
                pack.to_str().unwrap(),
                "--quiet",
            ]);
            let p = Pack::open(&pack).unwrap();
            let meta = p.meta().model.clone();
            assert_eq!(meta.arch, arch);
            assert_eq!(meta.bos_token_id, None, "{what}: no BOS");
            let la = meta.linear_attention.as_ref().expect("linear attention");
            assert_eq!(la.full_attention_interval, 4, "{what}");
            assert!(
                meta.attn_output_gate && meta.shared_expert.is_some(),
                "{what}"
            );
            assert_eq!(
                meta.rope_dims(),
                16,
                "{what}: a quarter of the head rotates"
            );
            assert!(
                (0..3).all(|l| meta.is_linear_layer(l)) && !meta.is_linear_layer(3),
                "{what}"
            );
            // Neither the MTP module nor the vision tower reaches the pack; names are mlx-lm's.
            let names: Vec<&str> = p.tensors().iter().map(|t| t.name.as_str()).collect();
            assert!(
                names.iter().all(|n| !n.contains("mtp.")
                    && !n.contains("visual")
                    && !n.contains("language_model")),
                "{what}: {names:?}"
            );
            assert!(
                names.contains(&"model.layers.0.linear_attn.conv1d.weight"),
                "{what}"
            );
            check(
                &pack,
                reference,
                None,
                (PROMPT, DECODE, Some(CHUNK)),
                &format!("{what} {label} resident"),
            );
            // 4 slots for 12 experts top-3: every layer evicts, and prefill chunks route to
            // more experts than fit.
            check(
                &pack,
                reference,
                Some(4),
                (PROMPT, DECODE, Some(CHUNK)),
                &format!("{what} {label} streaming"),
            );
        }
    }
}

/// Qwen3-Next as transformers 5 writes its config: `layer_types` and no
/// `full_attention_interval`, here with full attention every 2nd layer (not the default 4th).
/// The pack runs the layers `layer_types` names: its logits, resident and streaming, in one
/// call and in chunks, are mlx-lm's on the same weights with the interval spelled out (mlx-lm
/// reads only the interval).
#[test]
fn qwen3_next_layer_types_without_an_interval_give_mlx_lms_logits() {
    if !python_has_mlx_lm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let s = FixtureSpec {
        full_attention_interval: 2,
        ..spec(Arch::Qwen3Next)
    };
    // The reference folder: the interval spelled out, as mlx-lm reads it.
    let with_interval = write(&s, &d.join("interval"));
    let hf = write(&s, &d.join("hf"));
    let path = hf.join("config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(
        c["full_attention_interval"], 2,
        "the fixture writes the interval"
    );
    c["full_attention_interval"] = serde_json::Value::Null;
    c["layer_types"] = serde_json::json!([
        "linear_attention",
        "full_attention",
        "linear_attention",
        "full_attention"
    ]);
    std::fs::write(&path, c.to_string()).unwrap();
    let reference = d.join("ref");
    mlx_lm_convert_q4_keeping(
        &with_interval,
        &reference,
        &["mlp.gate", "shared_expert_gate"],
    );
    mlx_lm_logits(&reference, PROMPT, DECODE);
    let pack = d.join("layer-types.flashpack");
    flashpack(&[
        "convert",
        hf.to_str().unwrap(),
        "-o",
        pack.to_str().unwrap(),
        "--quiet",
    ]);
    let meta = Pack::open(&pack).unwrap().meta().model.clone();
    assert_eq!(
        (0..4).map(|l| meta.is_linear_layer(l)).collect::<Vec<_>>(),
        [true, false, true, false]
    );
    for (slots, what) in [(None, "resident"), (Some(4), "streaming")] {
        check(
            &pack,
            &reference,
            slots,
            (PROMPT, DECODE, Some(CHUNK)),
            &format!("qwen3_next layer_types {what}"),
        );
    }
}

/// Every stage on both architectures through the CLI: convert with profiling (the source run
/// layer by layer, each linear-attention layer with its own state), cold 2-bit experts and
/// merging, `inspect` (only the full-attention layers' KV cache per token, the linear state
/// apart), `eval` against the bf16 source, and `run` under a memory budget that streams the
/// experts. Shared experts stay with the dense tensors, never in the expert directory.
#[test]
fn every_stage_runs_on_qwen3_next_and_qwen3_5_moe() {
    let dir = tempfile::tempdir().unwrap();
    // The first 1,200 characters of each text: the linear attention runs one position at a time
    // on the CPU (as mlx-lm's ops path does), so whole files would take minutes here.
    let (calib, text) = short_texts(dir.path());
    for arch in [Arch::Qwen3Next, Arch::Qwen35Moe] {
        let name = arch.model_type();
        let s = FixtureSpec {
            routing_skew: 0.2,
            ..spec(arch)
        };
        let src = write(&s, &dir.path().join(format!("src-{name}")));
        let pack = dir.path().join(format!("{name}.flashpack"));
        let (src_s, pack_s) = (src.to_str().unwrap(), pack.to_str().unwrap());
        // Four sparse layers of 12 experts, half of them cold at 2 bits.
        let (_, p) = convert_every_stage(&src, &pack, &calib, name);
        assert!(
            p.tensors()
                .iter()
                .any(|t| t.name == "model.layers.1.mlp.shared_expert.down_proj.weight"),
            "{name}: the shared expert is a dense tensor"
        );

        let inspect = flashpack_out(&["inspect", pack_s, "--json"]);
        let r: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
        let kv = r["kv_cache_bytes_per_token"].as_u64().unwrap();
        // One full-attention layer x keys and values of 1 KV head of 64 x 2 bytes.
        assert_eq!(kv, 2 * 64 * 2, "{r}");
        // 3 linear layers x (3 conv inputs of 3 x 64 x 2 + 6 x 64 channels in bf16 + 6 x 64 x 64 f32).
        let state = r["recurrent_state_bytes"].as_u64().unwrap();
        assert_eq!(state, 3 * (3 * 768 * 2 + 6 * 64 * 64 * 4), "{r}");
        assert!(
            r["attention"]
                .as_str()
                .unwrap()
                .contains("3 Gated DeltaNet"),
            "{r}"
        );
        let human = flashpack_out(&["inspect", pack_s]);
        let human = String::from_utf8_lossy(&human.stdout);
        assert!(human.contains("KV cache") && human.contains("linear-attention state"));

        let (kl, _, e) = eval_against(pack_s, &text, src_s);
        assert!(kl > 0.0 && kl.is_finite(), "{name}: {e}");
        // The random model's logits are nearly flat (its perplexity is about its vocabulary), so
        // the 2-bit cold and merged experts move the top token often; at 8 bits the pack and
        // its f32 reference agree (measured: KL 0.03, top-1 0.62 for qwen3_next).
        let p8 = dir.path().join(format!("{name}-8.flashpack"));
        let p8_s = p8.to_str().unwrap();
        flashpack_out(&[
            "convert",
            src_s,
            "-o",
            p8_s,
            "--dense-bits",
            "8",
            "--expert-bits",
            "8",
            "--quiet",
        ]);
        let (kl8, top1, e8) = eval_against(p8_s, &text, src_s);
        assert!(kl8 < 0.1 && kl8 < kl, "{name}: {e8}");
        assert!(top1 > 0.5 && top1 <= 1.0, "{name}: {e8}");

        // A budget that holds the dense part and only some of the experts: they stream.
        let all = p.experts().iter().map(|e| e.decoded_len).sum::<u64>();
        let dense: u64 = p.tensors().iter().map(|t| t.decoded_len).sum();
        let budget = format!("{}KiB", (dense + all / 3 + (12 << 20)) / 1024);
        let j = run_report(&[
            "run",
            pack_s,
            "--prompt",
            "The history of",
            "--max-tokens",
            "8",
            "--mem-budget",
            &budget,
            "--json",
        ]);
        assert_eq!(
            j["token_ids"].as_array().map(Vec::len),
            Some(8),
            "{name}: {j}"
        );
    }
}
