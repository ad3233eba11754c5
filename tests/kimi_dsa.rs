//! Kimi K2.5 (DeepSeek-V3's text model in a multimodal wrapper: `text_config`,
//! `language_model.*` names, a vision tower and projector dropped), DeepSeek-V3.2 and GLM-5
//! (MLA with DeepSeek Sparse Attention's lightning indexer) through the default CLI:
//! `flashpack convert SRC -o P` of a Hugging Face bf16 folder and of mlx-lm's 4-bit conversion
//! of it give mlx-lm's logits for a 24-token prompt, in one call and in chunks of 5, plus 8
//! cached decode steps, every expert resident and streaming through 4 slots for 12 experts top-3.
//! The configs have odd widths (hidden 192, 3 heads, 3 indexer heads), no BOS token, an
//! `index_topk` of 8, far below the prompt, so the sparse attention drops positions in the
//! prefill, in every chunk past the eighth position and in every decode step, and DeepSeek-V3.2
//! has YaRN (the indexer's RoPE is scaled too). Then greedy tokens through `flashpack run`, every
//! stage (profile, cold experts, merge, inspect with the indexer's keys counted, eval, run under
//! budgets). The sparse attention's effect (index_topk raised past the context changes the
//! logits) is checked on the goldens, src/model/tests.rs. Needs python3 with mlx-lm (CI installs it); skipped with a note otherwise.

use std::path::{Path, PathBuf};

use crate::common::fixtures::FixtureSpec;
use crate::common::texts_of;
use flashpack::arch::Arch;
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
/// Prefill chunk of the chunked pass: the 23 prefilled positions cross four chunk boundaries,
/// and the indexer starts choosing in the second chunk.
const CHUNK: usize = 5;
const ARCHS: [Arch; 3] = [Arch::KimiK25, Arch::DeepseekV32, Arch::GlmMoeDsa];

/// The test model of `arch`: 3 layers of which the first is dense, 3 heads of 64 (rotary 32,
/// latent 192, query rank 128), 12 experts top-3 of width 128 in 4 groups, 3 indexer heads of 64
/// choosing 8 positions; DeepSeek-V3.2 with YaRN.
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
        num_kv_heads: 3,
        head_dim: 64,
        vocab_size: 8192,
        q_lora_rank: Some(128),
        kv_lora_rank: 192,
        qk_rope_head_dim: 32,
        first_k_dense_replace: 1,
        index_heads: 3,
        index_head_dim: 64,
        index_topk: 8,
        rope_scaling: (arch == Arch::DeepseekV32).then_some(yarn),
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

/// `flashpack convert SRC -o PACK --quiet`.
fn convert(src: &Path, pack: &Path) {
    flashpack(&[
        "convert",
        src.to_str().unwrap(),
        "-o",
        pack.to_str().unwrap(),
        "--quiet",
    ]);
}

#[test]
fn kimi_k25_deepseek_v32_and_glm_moe_dsa_give_mlx_lms_logits_and_greedy_tokens() {
    if !python_has_mlx_lm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut worst = Vec::new();
    for (k, arch) in ARCHS.into_iter().enumerate() {
        let what = arch.model_type();
        let hf = write(&spec(arch), &d.join(format!("hf-{k}")));
        let mlx_dir = d.join(format!("mlx-{k}"));
        mlx_lm_convert_q4(&hf, &mlx_dir);
        mlx_lm_logits_chunked(&mlx_dir, PROMPT, DECODE, CHUNK);
        for (src, label) in [(&hf, "hf bf16"), (&mlx_dir, "mlx-lm 4-bit")] {
            let pack = d.join(format!("{k}-{}.flashpack", label.replace(' ', "-")));
            convert(src, &pack);
            if src == &hf {
                greedy_tokens_equal_mlx_lms(&pack, &mlx_dir, what);
            }
            let meta = Pack::open(&pack).unwrap().meta().model.clone();
            assert_eq!(meta.arch, arch);
            assert_eq!(meta.bos_token_id, None, "{what}: no BOS");
            assert!(meta.mla.is_some(), "{what}");
            assert_eq!(meta.router.n_group, 4, "{what}");
            match arch {
                Arch::KimiK25 => assert!(meta.indexer.is_none()),
                _ => assert_eq!(meta.indexer.as_ref().map(|i| i.topk), Some(8), "{what}"),
            }
            let w = check_resident_and_streaming(
                &pack,
                &mlx_dir,
                4,
                (PROMPT, DECODE, Some(CHUNK)),
                &format!("{what} {label}"),
            );
            worst.push(format!("{what} {label}: {w}"));
        }
    }
    eprintln!("max |logit diff| against mlx-lm: {worst:?}");
}

/// Every stage through the CLI: convert with profiling, cold 2-bit experts and merging,
/// `inspect` (MLA's latent and the indexer's keys counted in the KV cache), `eval` against the
/// bf16 source, and `run` under budgets that stream the experts, giving the resident tokens.
#[test]
fn every_stage_runs_on_kimi_k25_deepseek_v32_and_glm_moe_dsa() {
    let dir = tempfile::tempdir().unwrap();
    // 400 characters of each (profiling and eval cost about 1 s per 200 here, per model).
    let (calib, text) = texts_of(dir.path(), 400);
    for arch in ARCHS {
        let name = arch.model_type();
        let s = FixtureSpec {
            routing_skew: 0.2,
            ..spec(arch)
        };
        let src = write(&s, &dir.path().join(format!("src-{name}")));
        let pack = dir.path().join(format!("{name}.flashpack"));
        let (src_s, pack_s) = (src.to_str().unwrap(), pack.to_str().unwrap());
        let (_, p) = convert_every_stage(&src, &pack, &calib, name);
        // Kimi K2.5's vision modules are no part of the pack.
        assert!(
            p.tensors()
                .iter()
                .all(|t| !t.name.starts_with("vision_tower") && !t.name.starts_with("mm_")),
            "{name}"
        );

        let inspect = flashpack_out(&["inspect", pack_s, "--json"]);
        let r: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
        let kv = r["kv_cache_bytes_per_token"].as_u64().unwrap();
        let attention = r["attention"].as_str().unwrap();
        match arch {
            // 3 layers x (latent 192 + rotary 32) values x 2 bytes.
            Arch::KimiK25 => assert_eq!(kv, 3 * (192 + 32) * 2),
            // ... + the indexer's key of 64.
            _ => {
                assert_eq!(kv, 3 * (192 + 32 + 64) * 2);
                assert!(attention.contains("indexer"), "{r}");
            }
        }
        assert!(attention.starts_with("MLA"), "{r}");

        let (kl, top1, e) = eval_against(pack_s, &text, src_s);
        assert!(kl > 0.0 && kl < 2.0, "{name}: {e}");
        assert!((0.0..=1.0).contains(&top1), "{name}: {e}");

        streaming_keeps_the_tokens(
            pack_s,
            "The history of the sparse attention, told in full",
            "25%",
            p.experts().len() as u64,
            name,
        );
    }
}
