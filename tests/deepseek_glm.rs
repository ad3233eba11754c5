//! DeepSeek-V3 (MLA, YaRN, grouped sigmoid routing, shared experts, dense first layer) and
//! GLM-4.5 (partial rotary, q/k/v biases, q/k norm, the same router) through the default CLI:
//! `flashpack convert SRC -o P` of a Hugging Face bf16 folder and of mlx-lm's 4-bit conversion
//! of it give mlx-lm's logits for a prefill plus 8 cached decode steps, with every expert
//! resident and streaming through a cache smaller than one layer's experts. The configs have
//! odd widths (hidden 192, 3 heads), no BOS token, and a non-default RoPE (YaRN with mscale for
//! DeepSeek-V3, a half-rotary head and theta 50,000 for GLM-4.5). Needs python3 with mlx-lm (CI
//! installs it); skipped with a note otherwise.

use std::path::{Path, PathBuf};

use crate::common::fixtures::FixtureSpec;
use crate::common::short_texts;
use flashpack::arch::Arch;
use flashpack::format::Pack;

use crate::common::mlx_lm;
use mlx_lm::{
    check, convert_every_stage, eval_against, flashpack, flashpack_out, mlx_lm_convert_q4,
    mlx_lm_logits, python_has_mlx_lm, streaming_keeps_the_tokens,
};

const PROMPT: &[u32] = &[
    785, 3840, 315, 279, 1879, 374, 264, 3364, 911, 1246, 11, 323, 13, 5112, 42, 977, 8000, 12, 1,
    2048, 333, 4444, 5, 6001,
];
const DECODE: &[u32] = &[17, 4093, 220, 7, 8191, 300, 1500, 64];

/// The test model of `arch`: not the fixture defaults (3 heads of 64, 12 experts top-3, three
/// layers of which the first is dense), no BOS, and a non-default RoPE.
fn spec(arch: Arch) -> FixtureSpec {
    let yarn = serde_json::json!({"type": "yarn", "factor": 4.0,
        "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 0.8});
    FixtureSpec {
        hidden_size: 192,
        num_layers: 3,
        num_experts: 12,
        top_k: 3,
        moe_intermediate_size: 128,
        intermediate_size: 320,
        num_heads: 3,
        num_kv_heads: 1,
        head_dim: 64,
        vocab_size: 8192,
        q_lora_rank: Some(128),
        kv_lora_rank: 192,
        qk_rope_head_dim: 32,
        first_k_dense_replace: 1,
        rope_scaling: (arch == Arch::DeepseekV3).then_some(yarn),
        tokenizer_from: Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/qwen3moe-tiny")),
        ..FixtureSpec::tiny(arch)
    }
}

/// Writes `spec` into `dir` without a BOS token (and for GLM-4.5 with theta 50,000).
fn write(spec: &FixtureSpec, dir: &Path) -> PathBuf {
    spec.write(dir).unwrap();
    let path = dir.join("config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    c.as_object_mut().unwrap().remove("bos_token_id");
    if spec.arch == Arch::Glm4Moe {
        c["rope_theta"] = 50_000.0.into();
        c["rope_parameters"]["rope_theta"] = 50_000.0.into();
    }
    std::fs::write(&path, c.to_string()).unwrap();
    dir.to_path_buf()
}

#[test]
fn deepseek_v3_and_glm4_moe_give_mlx_lms_logits_from_hf_and_mlx_lm_sources() {
    if !python_has_mlx_lm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut cases = vec![(Arch::DeepseekV3, "deepseek_v3", spec(Arch::DeepseekV3))];
    // DeepSeek-V2-Lite style: no query bottleneck, a plain q_proj.
    cases.push((
        Arch::DeepseekV3,
        "deepseek_v3 q_lora_rank null",
        FixtureSpec {
            q_lora_rank: None,
            seed: 1,
            ..spec(Arch::DeepseekV3)
        },
    ));
    cases.push((Arch::Glm4Moe, "glm4_moe", spec(Arch::Glm4Moe)));
    for (k, (arch, what, s)) in cases.into_iter().enumerate() {
        let hf = write(&s, &d.join(format!("hf-{k}")));
        let mlx_dir = d.join(format!("mlx-{k}"));
        mlx_lm_convert_q4(&hf, &mlx_dir);
        mlx_lm_logits(&mlx_dir, PROMPT, DECODE);
        for (src, label) in [(&hf, "hf bf16"), (&mlx_dir, "mlx-lm 4-bit")] {
            let pack = d.join(format!("{k}-{}.flashpack", label.replace(' ', "-")));
            flashpack(&[
                "convert",
                src.to_str().unwrap(),
                "-o",
                pack.to_str().unwrap(),
                "--quiet",
            ]);
            let meta = Pack::open(&pack).unwrap().meta().model.clone();
            assert_eq!(meta.arch, arch);
            assert_eq!(meta.bos_token_id, None, "{what}: no BOS");
            match arch {
                Arch::DeepseekV3 => {
                    assert_eq!(meta.rope.rope_type, "yarn", "{what}");
                    assert!(meta.mla.is_some(), "{what}");
                    assert_eq!(meta.router.n_group, 4, "{what}");
                }
                _ => assert_eq!(meta.rope_dims(), 32, "{what}: half the head rotates"),
            }
            assert!(meta.router.selection_bias && meta.shared_expert.is_some());
            assert!(
                !meta.is_sparse_layer(0) && meta.is_sparse_layer(1),
                "{what}"
            );
            check(
                &pack,
                &mlx_dir,
                None,
                (PROMPT, DECODE, None),
                &format!("{what} {label} resident"),
            );
            // 4 slots for 12 experts top-3: every layer evicts, and prefill chunks route to
            // more experts than fit.
            check(
                &pack,
                &mlx_dir,
                Some(4),
                (PROMPT, DECODE, None),
                &format!("{what} {label} streaming"),
            );
        }
    }
}

/// Every stage on both architectures through the CLI: convert with profiling, cold 2-bit
/// experts and merging (routing mass from the sigmoid router), `inspect` (MLA's latent KV
/// cache counted), `eval` against the bf16 source, and `run` under a memory budget that
/// streams the experts. Shared experts stay with the dense tensors, never in the expert
/// directory.
#[test]
fn every_stage_runs_on_deepseek_v3_and_glm4_moe() {
    let dir = tempfile::tempdir().unwrap();
    let (calib, text) = short_texts(dir.path());
    for arch in [Arch::DeepseekV3, Arch::Glm4Moe] {
        let name = arch.model_type();
        let s = FixtureSpec {
            routing_skew: 0.2,
            ..spec(arch)
        };
        let src = write(&s, &dir.path().join(format!("src-{name}")));
        let pack = dir.path().join(format!("{name}.flashpack"));
        let (src_s, pack_s) = (src.to_str().unwrap(), pack.to_str().unwrap());
        // Two sparse layers of 12 experts, half of them cold at 2 bits.
        let (_, p) = convert_every_stage(&src, &pack, &calib, name);
        assert!(
            p.experts().iter().all(|e| e.layer >= 1),
            "{name}: layer 0 is dense"
        );
        assert!(
            p.tensors()
                .iter()
                .any(|t| t.name == "model.layers.1.mlp.shared_experts.down_proj.weight"),
            "{name}: shared experts are dense tensors"
        );

        let inspect = flashpack_out(&["inspect", pack_s, "--json"]);
        let r: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
        let kv = r["kv_cache_bytes_per_token"].as_u64().unwrap();
        match arch {
            // 3 layers x (latent 192 + rotary 32) values x 2 bytes.
            Arch::DeepseekV3 => {
                assert_eq!(kv, 3 * (192 + 32) * 2);
                assert!(r["attention"].as_str().unwrap().starts_with("MLA"), "{r}");
            }
            // 3 layers x keys and values of 1 KV head of 64 x 2 bytes.
            _ => {
                assert_eq!(kv, 3 * 2 * 64 * 2);
                assert!(
                    r["attention"].as_str().unwrap().contains("32 rotated"),
                    "{r}"
                );
            }
        }
        let human = flashpack_out(&["inspect", pack_s]);
        assert!(String::from_utf8_lossy(&human.stdout).contains("KV cache"));

        // A random model's next-token distribution is nearly flat, so top-1 agreement is noise
        // here; the KL of the 2-bit, merged pack against the bf16 source is what eval measures.
        let (kl, top1, e) = eval_against(pack_s, &text, src_s);
        assert!(kl > 0.0 && kl < 2.0, "{name}: {e}");
        assert!((0.0..=1.0).contains(&top1), "{name}: {e}");

        // Under an ample budget every expert stays; under an expert budget of 45% of them
        // they stream, and greedy decoding gives the same tokens.
        streaming_keeps_the_tokens(
            pack_s,
            "The history of",
            "45%",
            p.experts().len() as u64,
            name,
        );
    }
}
