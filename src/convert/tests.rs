use super::*;
use crate::arch::Arch;
use crate::codec::CodecChoice;
use crate::codec::{Codec, CodecId, Decoder};
use crate::convert::fixtures::{FixtureLayout, FixtureSpec};
use crate::convert::load::LocalResolver;
use crate::convert::load::{ExpertLayout, LoadError};
use crate::convert::python::python_imports;
use crate::convert::quantize::QuantError;
use crate::format::{DType, ExpertEntry};
use crate::progress::Silent;
use std::path::Path;

fn fixture(spec: &FixtureSpec) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    spec.write(dir.path()).unwrap();
    dir
}

fn run(src: &Path, out: &Path, opts: &ConvertOptions) -> Result<ConvertReport, ConvertError> {
    convert(
        &SourceSpec::Local(src.to_path_buf()),
        &LocalResolver { hub_cache: None },
        out,
        opts,
        &Silent,
    )
}

/// Decoded WEIGHTS and AUX of a stored segment.
fn decode_segment(pack: &Pack, e: &ExpertEntry) -> (Vec<u8>, Vec<u8>) {
    let stored = pack.segment_stored(e);
    let (ws, aux) = stored.split_at(e.weights_stored_len as usize);
    let mut w = vec![0u8; e.weights_decoded_len as usize];
    let mut a = vec![0u8; e.aux_decoded_len() as usize];
    let mut d = Decoder::new();
    d.decode_into(CodecId::try_from(e.weight_codec).unwrap(), ws, &mut w)
        .unwrap();
    d.decode_into(CodecId::try_from(e.aux_codec).unwrap(), aux, &mut a)
        .unwrap();
    (w, a)
}

#[test]
fn converts_a_tiny_model_whose_segments_decode_to_the_quantized_experts() {
    let src = fixture(&FixtureSpec::tiny(Arch::Qwen3Moe));
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("m.flashpack");
    let report = run(src.path(), &dest, &ConvertOptions::default()).unwrap();
    let pack = Pack::open(&dest).unwrap();
    assert!(pack.verify().is_ok());
    assert_eq!(pack.experts().len(), 2 * 8);
    assert_eq!(report.pack_bytes, std::fs::metadata(&dest).unwrap().len());
    let ck = Checkpoint::open(src.path()).unwrap();
    let p = QuantParams::new(4, 64).unwrap();
    for e in pack.experts() {
        let want = build_segments(
            e.layer as usize,
            e.expert as usize,
            &ck.expert(e.layer as usize, e.expert as usize).unwrap(),
            p,
            SegmentPlan::default(),
        )
        .unwrap();
        let (w, a) = decode_segment(&pack, e);
        assert_eq!(
            (w, a),
            (want[0].weights.clone(), want[0].aux.clone()),
            "{:?}",
            e.key()
        );
        assert_eq!(
            (e.bits.max(), e.group_size, e.scale_dtype),
            (4, 64, DType::BF16)
        );
        assert_eq!(e.bits, 4);
    }
    // Dense policy: attention and embeddings 4-bit, router and norms full precision.
    let t = |n: &str| pack.tensor(n).unwrap_or_else(|| panic!("{n} missing"));
    assert_eq!(
        t("model.layers.0.self_attn.q_proj.weight").dtype,
        DType::U32
    );
    assert_eq!(t("model.layers.0.self_attn.q_proj.weight").bits, 4);
    assert_eq!(
        t("model.layers.0.self_attn.q_proj.scales").dtype,
        DType::BF16
    );
    assert_eq!(t("model.embed_tokens.weight").dtype, DType::U32);
    assert_eq!(t("model.layers.1.mlp.gate.weight").dtype, DType::BF16);
    assert_eq!(
        t("model.layers.1.self_attn.q_norm.weight").dtype,
        DType::BF16
    );
    assert!(pack
        .tensor("model.layers.0.mlp.experts.0.gate_proj.weight")
        .is_none());
    // Metadata: the normalized config and the provenance are there.
    let m = pack.metadata();
    assert_eq!(m["model"]["num_experts"], 8);
    assert_eq!(m["quantization"]["expert_bits"], 4);
    assert_eq!(m["provenance"]["files"].as_array().unwrap().len(), 2);
    assert!(report.pack.experts.bits_per_weight > 4.0 && report.pack.experts.bits_per_weight < 5.0);
}

#[test]
fn same_input_same_bytes_whatever_the_thread_count() {
    let src = fixture(&FixtureSpec::tiny(Arch::Olmoe));
    let out = tempfile::tempdir().unwrap();
    let (a, b) = (
        out.path().join("a.flashpack"),
        out.path().join("b.flashpack"),
    );
    run(src.path(), &a, &ConvertOptions::default()).unwrap();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    pool.install(|| run(src.path(), &b, &ConvertOptions::default()))
        .unwrap();
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
}

#[test]
fn fused_and_per_expert_sources_give_the_same_experts() {
    for arch in [Arch::Mixtral, Arch::Qwen2Moe] {
        let per = fixture(&FixtureSpec::tiny(arch));
        let fused = fixture(&FixtureSpec {
            layout: FixtureLayout::Fused,
            ..FixtureSpec::tiny(arch)
        });
        let out = tempfile::tempdir().unwrap();
        let (a, b) = (
            out.path().join("a.flashpack"),
            out.path().join("b.flashpack"),
        );
        let opts = ConvertOptions {
            codec: CodecChoice::Fixed(Codec::Huffman),
            ..Default::default()
        };
        run(per.path(), &a, &opts).unwrap();
        let r = run(fused.path(), &b, &opts).unwrap();
        assert_eq!(r.expert_layout, Some(ExpertLayout::Fused));
        let (a, b) = (Pack::open(&a).unwrap(), Pack::open(&b).unwrap());
        assert_eq!(a.experts().len(), b.experts().len());
        for (x, y) in a.experts().iter().zip(b.experts()) {
            assert_eq!(
                a.segment_stored(x),
                b.segment_stored(y),
                "{arch} {:?}",
                x.key()
            );
        }
        let names = |p: &Pack| {
            p.tensors()
                .iter()
                .map(|t| t.name.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&a), names(&b));
    }
}

#[test]
fn every_architecture_converts_and_verifies() {
    for arch in Arch::ALL.iter().copied() {
        for dense_bits in [4, 8, 16] {
            let src = fixture(&FixtureSpec::tiny(arch));
            let out = tempfile::tempdir().unwrap();
            let dest = out.path().join("m.flashpack");
            // gpt-oss's experts are MXFP4 codes, kept unless asked for other bits (the CLI's
            // --expert-bits does).
            let opts = ConvertOptions {
                dense_bits,
                expert_bits: 2,
                keep_source_codes: false,
                ..Default::default()
            };
            run(src.path(), &dest, &opts).unwrap_or_else(|e| panic!("{arch}: {e}"));
            let pack = Pack::open(&dest).unwrap();
            assert!(pack.verify().is_ok(), "{arch}");
            assert!(pack.experts().iter().all(|e| e.bits == 2));
            // The first layer of full attention (Qwen3-Next's first layers are linear).
            let cfg = &pack.meta().model;
            let l = (0..cfg.num_hidden_layers)
                .find(|&l| !cfg.is_linear_layer(l))
                .unwrap();
            // DeepSeek-V4.1's output projection is low-rank: `o_b_proj` after the groups' `o_a_proj`.
            let o = if arch == Arch::DeepseekV41 {
                "o_b_proj"
            } else {
                "o_proj"
            };
            let q = pack
                .tensor(&format!("model.layers.{l}.self_attn.{o}.weight"))
                .unwrap();
            match dense_bits {
                16 => assert_eq!((q.dtype, q.bits), (DType::BF16, 0)),
                b => assert_eq!((q.dtype, q.bits), (DType::U32, b)),
            }
            if matches!(arch, Arch::Qwen2Moe | Arch::Qwen3Next | Arch::Qwen35Moe) {
                // The shared expert gate stays full precision; the shared expert follows policy.
                let g = pack
                    .tensor("model.layers.0.mlp.shared_expert_gate.weight")
                    .unwrap();
                assert_eq!(g.dtype, DType::BF16);
            }
        }
    }
}

#[test]
fn vertical_segments_tile_each_expert() {
    let spec = FixtureSpec {
        moe_intermediate_size: 128,
        ..FixtureSpec::tiny(Arch::Qwen3Moe)
    };
    let src = fixture(&spec);
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("m.flashpack");
    let opts = ConvertOptions {
        segments: 2,
        ..Default::default()
    };
    run(src.path(), &dest, &opts).unwrap();
    let pack = Pack::open(&dest).unwrap();
    assert!(pack.verify().is_ok());
    let segs = pack.expert_segments(1, 3);
    assert_eq!(segs.len(), 2);
    assert_eq!((segs[1].row_start, segs[1].row_count), (64, 64));
}

#[test]
fn failure_mid_way_leaves_no_file_at_the_destination() {
    // 64 expert rows cannot be cut into 3 segments of whole groups: fails while writing experts.
    let src = fixture(&FixtureSpec::tiny(Arch::Qwen3Moe));
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("m.flashpack");
    let opts = ConvertOptions {
        segments: 3,
        ..Default::default()
    };
    let err = run(src.path(), &dest, &opts).unwrap_err();
    assert!(
        matches!(err, ConvertError::Quant(QuantError::Invalid { .. })),
        "{err}"
    );
    let left: Vec<_> = std::fs::read_dir(out.path()).unwrap().collect();
    assert!(left.is_empty(), "nothing may be left behind: {left:?}");
    // An existing pack at the destination survives a failed conversion untouched.
    std::fs::write(&dest, b"previous pack").unwrap();
    run(src.path(), &dest, &opts).unwrap_err();
    assert_eq!(std::fs::read(&dest).unwrap(), b"previous pack");
}

#[test]
fn bad_source_gives_a_typed_error_and_no_file() {
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("m.flashpack");
    let err = run(
        &out.path().join("missing"),
        &dest,
        &ConvertOptions::default(),
    )
    .unwrap_err();
    assert!(
        matches!(err, ConvertError::Load(LoadError::NotAFolder { .. })),
        "{err}"
    );
    assert!(!dest.exists());
}

#[test]
fn options_that_need_the_profile_are_refused_without_a_tokenizer() {
    let src = fixture(&FixtureSpec::tiny(Arch::Qwen3Moe));
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("m.flashpack");
    for opts in [
        ConvertOptions {
            cold_bits: Some(2),
            cold_fraction: Some(0.5),
            ..Default::default()
        },
        ConvertOptions {
            target_size_gb: Some(1.0),
            ..Default::default()
        },
        ConvertOptions {
            merge_threshold: Some(0.9),
            ..Default::default()
        },
    ] {
        let err = run(src.path(), &dest, &opts).unwrap_err();
        assert!(matches!(err, ConvertError::Tokenizer { .. }), "{err}");
        assert!(err.to_string().contains("tokenizer.json"), "{err}");
    }
    let err = run(
        src.path(),
        &dest,
        &ConvertOptions {
            dense_bits: 7,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(matches!(err, ConvertError::Quant(_)), "{err}");
    assert!(!dest.exists());
}

#[test]
fn converts_the_bundled_trained_model_with_its_tokenizer() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/qwen3moe-tiny");
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("m.flashpack");
    let r = run(&src, &dest, &ConvertOptions::default()).unwrap();
    let pack = Pack::open(&dest).unwrap();
    assert_eq!(pack.experts().len(), 6 * 32);
    assert!(pack.metadata()["tokenizer"]["model"].is_object());
    assert_eq!(pack.metadata()["generation_config"]["bos_token_id"], 0);
    // Huffman on trained 4-bit codes saves a few percent (REFERENCE.md: ~7% on real weights):
    // `auto` keeps that for dense tensors (read once) and stores experts raw, since a miss would
    // decode them on the critical path (decision 0014).
    assert!(
        r.pack.codecs.keys().any(|k| k == "weights:raw")
            && !r.pack.codecs.keys().any(|k| k == "weights:huffman"),
        "{:?}",
        r.pack.codecs
    );
    assert!(
        pack.tensors()
            .iter()
            .any(|t| t.codec == crate::format::codec_id::HUFFMAN),
        "dense tensors keep Huffman"
    );
}

#[test]
fn mlx_quantized_source_reuses_codes() {
    if !python_imports("mlx_lm", "the MLX-source convert check") {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let spec = FixtureSpec {
        vocab_size: 8192,
        tokenizer_from: Some(root.join("fixtures/qwen3moe-tiny")),
        ..FixtureSpec::tiny(Arch::Qwen3Moe)
    };
    let src = fixture(&spec);
    let out = tempfile::tempdir().unwrap();
    let mlx_dir = out.path().join("q4");
    let st = std::process::Command::new("python3")
        .args(["-m", "mlx_lm", "convert", "--hf-path"])
        .arg(src.path())
        .arg("--mlx-path")
        .arg(&mlx_dir)
        .args(["-q", "--q-bits", "4", "--q-group-size", "64"])
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let (a, b) = (
        out.path().join("a.flashpack"),
        out.path().join("b.flashpack"),
    );
    run(src.path(), &a, &ConvertOptions::default()).unwrap();
    let r = run(&mlx_dir, &b, &ConvertOptions::default()).unwrap();
    assert!(r.source_mlx_quantized);
    assert_eq!(r.expert_layout, Some(ExpertLayout::Stacked));
    let (a, b) = (Pack::open(&a).unwrap(), Pack::open(&b).unwrap());
    for (x, y) in a.experts().iter().zip(b.experts()) {
        assert_eq!(a.segment_stored(x), b.segment_stored(y), "{:?}", x.key());
    }
    // Dense 4-bit codes are copied too, and so are the 8-bit router's (kept, not dequantized).
    let (qa, qb) = (
        a.tensor("model.layers.0.self_attn.k_proj.weight").unwrap(),
        b.tensor("model.layers.0.self_attn.k_proj.weight").unwrap(),
    );
    assert_eq!(a.tensor_stored(qa), b.tensor_stored(qb));
    let router = b.tensor("model.layers.0.mlp.gate.weight").unwrap();
    assert_eq!((router.dtype, router.bits), (DType::U32, 8));
    assert!(b.tensor("model.layers.0.mlp.gate.scales").is_some());
    // Other bits than the source's: dequantized and quantized again.
    let c = out.path().join("c.flashpack");
    let opts = ConvertOptions {
        expert_bits: 2,
        dense_bits: 8,
        keep_source_codes: false,
        ..Default::default()
    };
    run(&mlx_dir, &c, &opts).unwrap();
    let c = Pack::open(&c).unwrap();
    assert!(c.verify().is_ok());
    assert!(c.experts().iter().all(|e| e.bits == 2));
    assert_eq!(
        c.tensor("model.layers.0.self_attn.k_proj.weight")
            .unwrap()
            .bits,
        8
    );
}

/// FP8 checkpoints (E4M3 weights with `weight_scale_inv` per 128 x 128 block, DeepSeek-V3's and
/// Qwen3 FP8's layout) convert to exactly the pack of the same model in bf16: the codes are
/// dequantized as the bf16 values they stand for (e4m3 * scale in f32, rounded to bf16), with
/// partial blocks at the edges (widths 192 and 320 are not multiples of 128).
#[test]
fn fp8_block_checkpoints_convert_to_the_pack_of_their_bf16_values() {
    use crate::convert::fixtures::Fp8Fixture;
    // gpt-oss ships MXFP4 experts and bf16 attention only: no FP8 variant (the fixture ignores
    // `fp8`).
    for &arch in Arch::ALL.iter().filter(|&&a| a != Arch::GptOss) {
        let spec = |fp8| FixtureSpec {
            hidden_size: 192,
            intermediate_size: 320,
            moe_intermediate_size: 128,
            shared_expert_intermediate_size: 192,
            decoder_sparse_step: if arch == Arch::Qwen3Moe { 2 } else { 1 },
            fp8,
            ..FixtureSpec::tiny(arch)
        };
        let fp8 = fixture(&spec(Fp8Fixture::Blocks(128)));
        let bf16 = fixture(&spec(Fp8Fixture::Dequantized(128)));
        let raw = std::fs::read_to_string(fp8.path().join("config.json")).unwrap();
        assert!(raw.contains("\"fp8\""), "{raw}");
        let out = tempfile::tempdir().unwrap();
        let (pa, pb) = (
            out.path().join("fp8.flashpack"),
            out.path().join("bf16.flashpack"),
        );
        run(fp8.path(), &pa, &ConvertOptions::default()).unwrap();
        run(bf16.path(), &pb, &ConvertOptions::default()).unwrap();
        let (a, b) = (Pack::open(&pa).unwrap(), Pack::open(&pb).unwrap());
        let names = |p: &Pack| {
            p.tensors()
                .iter()
                .map(|t| t.name.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&a), names(&b), "{arch:?}: no _scale_inv is stored");
        for (x, y) in a.tensors().iter().zip(b.tensors()) {
            assert_eq!(
                (x.dtype, x.bits, &x.shape),
                (y.dtype, y.bits, &y.shape),
                "{}",
                x.name
            );
            assert!(
                a.tensor_stored(x) == b.tensor_stored(y),
                "{arch:?} {}",
                x.name
            );
        }
        assert_eq!(a.experts().len(), b.experts().len());
        for (x, y) in a.experts().iter().zip(b.experts()) {
            assert!(
                a.segment_stored(x) == b.segment_stored(y),
                "{arch:?} expert {:?}",
                x.key()
            );
        }
    }
}

/// Profiling runs the FP8 model itself (dense FP8 weights dequantized for the forward pass):
/// with cold experts chosen from the profile, the FP8 and bf16 checkpoints still give the same
/// pack.
#[test]
fn fp8_checkpoints_profile_as_their_bf16_values() {
    use crate::convert::fixtures::Fp8Fixture;
    let spec = |fp8| FixtureSpec {
        hidden_size: 192,
        moe_intermediate_size: 128,
        shared_expert_intermediate_size: 192,
        vocab_size: 8192,
        tokenizer_from: Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/qwen3moe-tiny")),
        fp8,
        ..FixtureSpec::tiny(Arch::Qwen2Moe)
    };
    let fp8 = fixture(&spec(Fp8Fixture::Blocks(128)));
    let bf16 = fixture(&spec(Fp8Fixture::Dequantized(128)));
    let out = tempfile::tempdir().unwrap();
    let (pa, pb) = (
        out.path().join("fp8.flashpack"),
        out.path().join("bf16.flashpack"),
    );
    let opts = ConvertOptions {
        cold_bits: Some(2),
        cold_fraction: Some(0.5),
        ..ConvertOptions::default()
    };
    run(fp8.path(), &pa, &opts).unwrap();
    run(bf16.path(), &pb, &opts).unwrap();
    let (a, b) = (Pack::open(&pa).unwrap(), Pack::open(&pb).unwrap());
    assert!(
        a.experts().iter().any(|e| e.bits == 2),
        "a cold plan was made"
    );
    assert_eq!(a.experts(), b.experts());
    assert_eq!(
        a.metadata()["profile"]["layers"],
        b.metadata()["profile"]["layers"]
    );
}

/// The fixture generator (tests/common/fixtures.rs) against the config parser it feeds.
mod fixtures {
    use crate::arch::{Arch, ClampedSwiglu, ModelConfig, SlidingWindow};
    use crate::convert::fixtures::{Dialect, FixtureLayout, FixtureSpec, MXFP4_EXPONENTS};
    use crate::convert::tensor::Dtype;
    use serde_json::json;

    /// The gpt-oss test model of tests/gpt_oss.rs and scripts/tiny_moe.py.
    fn gpt_oss(dialect: Dialect) -> FixtureSpec {
        FixtureSpec {
            hidden_size: 192,
            num_layers: 3,
            num_heads: 3,
            num_kv_heads: 1,
            head_dim: 64,
            moe_intermediate_size: 128,
            top_k: 3,
            rope_scaling: Some(
                json!({"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0,
                "beta_slow": 1.0, "original_max_position_embeddings": 16, "truncate": false}),
            ),
            dialect,
            ..FixtureSpec::tiny(Arch::GptOss)
        }
    }

    /// The config a gpt-oss fixture writes (upstream's keys) parses, in each dialect, into the
    /// model the spec describes.
    #[test]
    fn gpt_oss_config_parses_into_the_spec() {
        for dialect in [Dialect::Legacy, Dialect::Transformers5, Dialect::Both] {
            let spec = gpt_oss(dialect);
            let c = spec.config();
            assert_eq!(c["quantization_config"]["quant_method"], "mxfp4");
            assert_eq!(
                c["layer_types"],
                json!(["sliding_attention", "full_attention", "sliding_attention"])
            );
            assert!(c.get("bos_token_id").is_none(), "{c}");
            let cfg = ModelConfig::from_json(&c).unwrap_or_else(|e| panic!("{dialect:?}: {e}"));
            assert_eq!(cfg.arch, Arch::GptOss);
            assert_eq!(
                (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size),
                (192, 3, 512)
            );
            assert_eq!(
                (
                    cfg.num_attention_heads,
                    cfg.num_key_value_heads,
                    cfg.head_dim
                ),
                (3, 1, 64)
            );
            assert_eq!((cfg.num_experts, cfg.num_experts_per_tok), (8, 3));
            assert_eq!(cfg.moe_intermediate_size, 128);
            assert_eq!(cfg.sparse_layers(), vec![0, 1, 2]);
            assert_eq!(
                cfg.sliding_window,
                Some(SlidingWindow {
                    size: 8,
                    layers: vec![0, 2]
                })
            );
            assert_eq!(
                (cfg.window_of(0), cfg.window_of(1), cfg.window_of(2)),
                (Some(8), None, Some(8))
            );
            assert_eq!(
                cfg.clamped_swiglu,
                Some(ClampedSwiglu {
                    alpha: 1.702,
                    limit: 7.0
                })
            );
            assert!(cfg.attention_sinks && cfg.expert_bias && cfg.attention_bias);
            assert_eq!(cfg.rope.theta, 150_000.0);
            assert_eq!(cfg.rope.rope_type, "yarn", "{dialect:?}");
            let scaling = cfg.rope.scaling.as_ref().expect("YaRN's parameters");
            assert_eq!(scaling["factor"], 4.0, "{dialect:?}");
            assert_eq!(scaling["original_max_position_embeddings"], 16);
            assert_eq!(cfg.max_position_embeddings, Some(64));
            assert_eq!(cfg.bos_token_id, None);
            assert!(!cfg.tie_word_embeddings);
        }
    }

    /// gpt-oss's experts are written as upstream ships them: U8 MXFP4 codes and E8M0 exponents
    /// in their ranges, gate and up interleaved in one tensor, biases beside them; the bf16
    /// attention carries biases and sinks. Whatever `layout` says.
    #[test]
    fn gpt_oss_writes_the_upstream_mxfp4_layout() {
        let spec = FixtureSpec {
            layout: FixtureLayout::Fused,
            ..gpt_oss(Dialect::Both)
        };
        let t: std::collections::BTreeMap<String, (Dtype, Vec<usize>)> = spec
            .file_tensors()
            .into_iter()
            .map(|(n, d, s, _)| (n, (d, s)))
            .collect();
        let x = "model.layers.1.mlp.experts";
        for (name, dtype, shape) in [
            (
                format!("{x}.gate_up_proj_blocks"),
                Dtype::U8,
                vec![8, 256, 6, 16],
            ),
            (
                format!("{x}.gate_up_proj_scales"),
                Dtype::U8,
                vec![8, 256, 6],
            ),
            (format!("{x}.gate_up_proj_bias"), Dtype::Bf16, vec![8, 256]),
            (
                format!("{x}.down_proj_blocks"),
                Dtype::U8,
                vec![8, 192, 4, 16],
            ),
            (format!("{x}.down_proj_scales"), Dtype::U8, vec![8, 192, 4]),
            (format!("{x}.down_proj_bias"), Dtype::Bf16, vec![8, 192]),
            (
                "model.layers.1.mlp.router.weight".into(),
                Dtype::Bf16,
                vec![8, 192],
            ),
            (
                "model.layers.1.mlp.router.bias".into(),
                Dtype::Bf16,
                vec![8],
            ),
            (
                "model.layers.1.self_attn.o_proj.bias".into(),
                Dtype::Bf16,
                vec![192],
            ),
            (
                "model.layers.1.self_attn.sinks".into(),
                Dtype::Bf16,
                vec![3],
            ),
        ] {
            assert_eq!(t.get(&name), Some(&(dtype, shape)), "{name}");
        }
        assert!(!t
            .keys()
            .any(|n| n.contains(".experts.0.") || n.contains("q_norm")));
        for (proj, range) in MXFP4_EXPONENTS {
            let name = format!("{x}.{proj}_scales");
            let n = t[&name].1.iter().product();
            let e = spec.mxfp4_bytes(&name, n);
            assert!(e.iter().all(|b| range.contains(b)), "{name}");
            assert!(
                range.clone().all(|r| e.contains(&r)),
                "{name}: every exponent drawn"
            );
        }
        let codes = spec.mxfp4_bytes(&format!("{x}.down_proj_blocks"), 8 * 192 * 64);
        assert!(codes.iter().any(|&b| b < 16) && codes.iter().any(|&b| b >= 0xF0));
        assert_ne!(
            codes,
            spec.mxfp4_bytes(&format!("{x}.gate_up_proj_blocks"), 8 * 192 * 64)
        );
    }
}
