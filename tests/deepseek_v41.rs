//! DeepSeek-V4.1 (`deepseek_v41`: hyper-connections, a sliding window plus the compressed
//! latents of a KV source layer chosen by indexers, a grouped low-rank output, the
//! `sqrtsoftplus` router, f32 clamped SwiGLU) through the default CLI: `flashpack convert SRC -o
//! P` of the upstream layout in bf16 (`embed.weight`, `layers.L.attn.wq_a.weight`,
//! `layers.L.hc_attn_fn`, `layers.L.ffn.experts.N.w1.weight`, `head.weight`, an `mtp.*` module)
//! and of mlx-lm's 4-bit conversion give mlx-lm's logits for a 24-token prompt, in one call and
//! in chunks of 5, plus 8 cached decode steps, every expert resident and streaming through 3
//! slots for 8 experts top-2. The window (8) and `index_topk` (3 of the prompt's 6 latents)
//! drop positions. Then greedy tokens through `flashpack run` on 3 prompts, and every stage.
//! Odd widths (hidden 192, 4 heads of 64 in 2 output groups). DeepSeek's own release layout (FP8
//! weights with E8M0 `.scale` blocks, FP4 experts) converts as the bf16 values it stands for, and its
//! bad scales are refused (decision 0027). Needs python3 with mlx-lm (CI
//! installs it) for the mlx-lm comparisons; skipped with a note otherwise.

use std::path::{Path, PathBuf};

use crate::common::fixtures::{FixtureSpec, Fp8Fixture};
use crate::common::texts_of;
use flashpack::arch::{Arch, Scoring};
use flashpack::format::Pack;
use flashpack::quant_mode::QuantMode;

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

/// [`spec`] in DeepSeek's own release layout ([`Fp8Fixture::Release`]: FP8 weights with `W.scale`
/// E8M0 exponents per 32 x 32 block, FP4 experts two codes to an `I8` with an E8M0 scale per
/// 32 values, an FP8 `mtp.*` module), or the same model in bf16.
fn release(fp8: Fp8Fixture, dir: &Path) -> PathBuf {
    write(&FixtureSpec { fp8, ..spec() }, dir)
}

/// The dtype and shape of `name` in the safetensors file `path`.
fn header_entry(path: &Path, name: &str) -> (String, Vec<usize>) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let h: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let t = &h[name];
    let shape = t["shape"].as_array().map_or_else(Vec::new, |s| {
        s.iter().map(|d| d.as_u64().unwrap() as usize).collect()
    });
    (t["dtype"].as_str().unwrap_or("missing").to_string(), shape)
}

/// Asserts that packs `a` and `b` store the same dense tensors, byte for byte, and (`experts`)
/// the same expert segments.
fn same_pack(a: &Path, b: &Path, experts: bool, what: &str) {
    let (a, b) = (Pack::open(a).unwrap(), Pack::open(b).unwrap());
    let names = |p: &Pack| {
        p.tensors()
            .iter()
            .map(|t| t.name.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(names(&a), names(&b), "{what}: no scale tensor is stored");
    for (x, y) in a.tensors().iter().zip(b.tensors()) {
        assert_eq!(
            (x.dtype, x.bits, &x.shape),
            (y.dtype, y.bits, &y.shape),
            "{what} {}",
            x.name
        );
        assert!(
            a.tensor_stored(x) == b.tensor_stored(y),
            "{what}: {}",
            x.name
        );
    }
    if experts {
        assert_eq!(a.experts().len(), b.experts().len(), "{what}");
        for (x, y) in a.experts().iter().zip(b.experts()) {
            assert!(
                a.segment_stored(x) == b.segment_stored(y),
                "{what}: expert {:?}",
                x.key()
            );
        }
    }
}

/// DeepSeek's published layout converts with the default options: the FP8 weights as the bf16
/// values their codes and E8M0 block scales stand for (then quantized like any bf16 weight), so
/// every dense tensor of the pack is, byte for byte, the one of the same model given in bf16;
/// the FP4 experts keep their codes and scales as MXFP4 (decision 0027). Asked to requantize
/// the experts (`--expert-bits 4`), they are quantized from their exact values: the whole pack
/// is then the bf16 model's, so its logits are too (max |diff| 0). The `mtp.*` module and every
/// `.scale` are gone.
#[test]
fn deepseek_v41_release_layout_converts_as_its_dequantized_values() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let rel = release(Fp8Fixture::Release(32), &d.join("release"));
    let bf16 = release(Fp8Fixture::ReleaseDequantized(32), &d.join("bf16"));
    // The folder is written as DeepSeek writes it.
    let st = rel.join("model.safetensors");
    for (name, dtype, shape) in [
        ("layers.1.attn.wq_a.weight", "F8_E4M3", vec![64, 192]),
        ("layers.1.attn.wq_a.scale", "F8_E8M0", vec![2, 6]),
        ("layers.0.ffn.experts.3.w1.weight", "I8", vec![64, 96]),
        ("layers.0.ffn.experts.3.w1.scale", "F8_E8M0", vec![64, 6]),
        ("layers.0.ffn.experts.3.w2.scale", "F8_E8M0", vec![192, 2]),
        (
            "layers.2.ffn.shared_experts.w2.weight",
            "F8_E4M3",
            vec![192, 64],
        ),
        ("mtp.0.e_proj.scale", "F8_E8M0", vec![6, 6]),
        // 3 rows: one partial block.
        (
            "layers.1.attn.indexer.weights_proj.scale",
            "F8_E8M0",
            vec![1, 6],
        ),
        ("embed.weight", "BF16", vec![8192, 192]),
    ] {
        assert_eq!(
            header_entry(&st, name),
            (dtype.to_string(), shape),
            "{name}"
        );
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(rel.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["quantization_config"]["scale_fmt"], "ue8m0");
    let convert = |src: &Path, out: &str, extra: &[&str]| {
        let pack = d.join(out);
        let mut args = vec![
            "convert",
            src.to_str().unwrap(),
            "-o",
            pack.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        args.push("--quiet");
        flashpack(&args);
        pack
    };
    let requant = ["--expert-bits", "4"];
    same_pack(
        &convert(&rel, "rel-q4.flashpack", &requant),
        &convert(&bf16, "bf16-q4.flashpack", &requant),
        true,
        "experts requantized",
    );
    let (pr, pb) = (
        convert(&rel, "rel.flashpack", &[]),
        convert(&bf16, "bf16.flashpack", &[]),
    );
    same_pack(&pr, &pb, false, "default options");
    let p = Pack::open(&pr).unwrap();
    assert!(p.tensors().iter().all(|t| !t.name.contains("mtp")));
    assert!(
        p.experts()
            .iter()
            .all(|e| e.mode == QuantMode::Mxfp4 && e.bits.max() == 4),
        "the FP4 experts stay MXFP4"
    );
    let text = |pack: &Path| {
        flashpack_out(&[
            "run",
            pack.to_str().unwrap(),
            "--prompt",
            "The history of",
            "--max-tokens",
            "6",
            "--raw",
        ])
    };
    let (a, b) = (
        text(&d.join("rel-q4.flashpack")),
        text(&d.join("bf16-q4.flashpack")),
    );
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    assert_eq!(a.stdout, b.stdout, "greedy text of the requantized packs");
    let c = text(&pr);
    assert!(c.status.success(), "{}", String::from_utf8_lossy(&c.stderr));
}

/// A `.scale` that does not fit its weight, a missing one, or one of no scale type is refused
/// at open, naming the tensor as the pack would call it and what it should be; nothing is
/// written.
#[test]
fn deepseek_v41_release_layout_refuses_scales_that_do_not_fit() {
    use flashpack::convert::load::{Checkpoint, LoadError};
    let dir = tempfile::tempdir().unwrap();
    let src = release(Fp8Fixture::Release(32), &dir.path().join("release"));
    let st = src.join("model.safetensors");
    let original = std::fs::read(&st).unwrap();
    // Edits the header in place (same length: the tensors' bytes stay where they are).
    let edit = |from: &str, to: &str| {
        let n = u64::from_le_bytes(original[..8].try_into().unwrap()) as usize;
        let h = String::from_utf8(original[8..8 + n].to_vec()).unwrap();
        assert!(h.contains(from), "{from}");
        let h = h.replacen(from, to, 1);
        assert_eq!(h.len(), n);
        let mut bytes = original.clone();
        bytes[8..8 + n].copy_from_slice(h.as_bytes());
        std::fs::write(&st, bytes).unwrap();
    };
    let open = || Checkpoint::open(&src).err().expect("refused");
    // An expert's FP4 scale [64, 6] stored as [6, 64]: same bytes, wrong shape.
    edit(
        r#""layers.0.ffn.experts.3.w1.scale":{"dtype":"F8_E8M0","shape":[64,6]"#,
        r#""layers.0.ffn.experts.3.w1.scale":{"dtype":"F8_E8M0","shape":[6,64]"#,
    );
    let e = open();
    assert!(
        matches!(e, LoadError::Shape { ref tensor, .. } if tensor == "model.layers.0.mlp.experts.3.w1.scale"),
        "{e}"
    );
    assert!(e.to_string().contains("one scale per 32 values"), "{e}");
    // An FP8 block scale [2, 6] as [3, 4].
    edit(
        r#""layers.1.attn.wq_a.scale":{"dtype":"F8_E8M0","shape":[2,6]"#,
        r#""layers.1.attn.wq_a.scale":{"dtype":"F8_E8M0","shape":[3,4]"#,
    );
    let e = open();
    assert!(
        matches!(e, LoadError::Shape { ref tensor, .. } if tensor == "model.layers.1.self_attn.q_a_proj.scale"),
        "{e}"
    );
    assert!(e.to_string().contains("32 x 32 block"), "{e}");
    // Scales in a type that holds no scale.
    edit(
        r#""layers.1.attn.wq_a.scale":{"dtype":"F8_E8M0""#,
        r#""layers.1.attn.wq_a.scale":{"dtype":"F8_E5M2""#,
    );
    let e = open();
    assert!(
        matches!(e, LoadError::Dtype { ref tensor, .. } if tensor == "model.layers.1.self_attn.q_a_proj.scale"),
        "{e}"
    );
    // A missing scale: the name no longer pairs with its weight.
    edit(
        r#""layers.1.attn.wq_a.scale""#,
        r#""layers.1.attn.wq_a.scalX""#,
    );
    let e = open();
    assert!(
        matches!(e, LoadError::MissingTensor { ref tensor, .. } if tensor.ends_with("q_a_proj.weight_scale_inv")),
        "{e}"
    );
    assert!(
        e.to_string()
            .contains("q_a_proj.scale in DeepSeek's own layout"),
        "{e}"
    );
    // Through the CLI: exit 1, the tensor named, no pack.
    edit(
        r#""layers.0.ffn.experts.3.w1.scale":{"dtype":"F8_E8M0","shape":[64,6]"#,
        r#""layers.0.ffn.experts.3.w1.scale":{"dtype":"F8_E8M0","shape":[6,64]"#,
    );
    let pack = dir.path().join("bad.flashpack");
    let out = crate::common::flashpack_cli(
        &[
            "convert",
            src.to_str().unwrap(),
            "-o",
            pack.to_str().unwrap(),
        ],
        &[],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("model.layers.0.mlp.experts.3.w1.scale"),
        "{err}"
    );
    assert!(!pack.exists());
}
