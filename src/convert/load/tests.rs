use super::*;
use crate::arch::{Arch, ArchError};
use crate::convert::fixtures::{Dialect, FixtureLayout, FixtureSpec};
use crate::convert::quantize::{build_segments, ProjSource, QuantParams, SegmentPlan};
use std::path::Path;

fn write(spec: &FixtureSpec) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    spec.write(dir.path()).unwrap();
    dir
}

fn float_bytes<'a>(p: &ProjSource<'a>) -> &'a [u8] {
    match p {
        ProjSource::Float(m) => m.bytes(),
        _ => panic!("expected float weights"),
    }
}

#[test]
fn opens_every_arch_layout_dialect_and_sharding() {
    for arch in Arch::ALL.iter().copied() {
        for layout in [FixtureLayout::PerExpert, FixtureLayout::Fused] {
            for (dialect, shard) in [
                (Dialect::Transformers5, None),
                (Dialect::Legacy, Some(100_000)),
                (Dialect::Both, Some(1)),
            ] {
                let mut spec = FixtureSpec::tiny(arch);
                spec.layout = layout;
                spec.dialect = dialect;
                spec.max_shard_bytes = shard;
                let dir = write(&spec);
                let ck = Checkpoint::open(dir.path())
                    .unwrap_or_else(|e| panic!("{arch} {layout:?} {dialect:?}: {e}"));
                let c = &ck.config;
                assert_eq!((c.arch, c.num_experts, c.hidden_size), (arch, 8, 128));
                assert_eq!(c.moe_intermediate_size, 64);
                let want = match layout {
                    // gpt-oss ships MXFP4 blocks whatever the layout asked for.
                    _ if arch == Arch::GptOss => ExpertLayout::MxBlocks,
                    // Gemma 4 ships fused experts only.
                    _ if arch == Arch::Gemma4Text => ExpertLayout::Fused,
                    // Kimi-K3 ships per-expert `w1`/`w3`/`w2` only.
                    _ if arch == Arch::KimiK3 => ExpertLayout::PerExpert,
                    FixtureLayout::PerExpert => ExpertLayout::PerExpert,
                    FixtureLayout::Fused => ExpertLayout::Fused,
                };
                assert_eq!(ck.expert_layout(1).unwrap(), want);
                let x = ck.expert(1, 7).unwrap();
                match (x.down, x.gate) {
                    (ProjSource::Float(m), _) => assert_eq!((m.rows, m.cols), (128, 64)),
                    (ProjSource::Quantized(d), ProjSource::Interleaved { all, first: 0 })
                        if arch == Arch::GptOss =>
                    {
                        assert_eq!((d.rows, d.cols, all.rows, all.cols), (128, 64, 128, 128));
                        assert_eq!(x.gate.shape(), [64, 128]);
                        let b = x.bias.expect("gpt-oss experts have biases");
                        assert_eq!((b.gate.len, b.gate.step, b.down.len), (64, 2, 128));
                    }
                    _ => panic!("{arch}: unexpected expert sources"),
                }
                // All but the multi-token-prediction module (Qwen3-Next, Qwen3.5, Kimi-K3) and
                // Kimi K2.5's vision modules, dropped.
                let dropped = ["mtp.", "model.mtp.", "vision_tower.", "mm_projector."];
                let kept = spec
                    .tensors()
                    .iter()
                    .filter(|t| !dropped.iter().any(|d| t.0.starts_with(d)))
                    .count();
                assert_eq!(ck.tensor_count(), kept, "{arch}");
                // Everything that is not an expert is in the dense set, routers included.
                let dense = ck.dense_tensors().unwrap();
                let routers = dense
                    .iter()
                    .filter(|d| matches!(d.role, crate::arch::TensorRole::Router { .. }))
                    .count();
                assert_eq!(routers, c.sparse_layers().len(), "{arch}");
            }
        }
    }
}

#[test]
fn fused_and_per_expert_fixtures_hold_the_same_experts() {
    for arch in [Arch::Qwen3Moe, Arch::Mixtral] {
        let per = FixtureSpec::tiny(arch);
        let fused = FixtureSpec {
            layout: FixtureLayout::Fused,
            ..FixtureSpec::tiny(arch)
        };
        let (a, b) = (write(&per), write(&fused));
        let (a, b) = (
            Checkpoint::open(a.path()).unwrap(),
            Checkpoint::open(b.path()).unwrap(),
        );
        for e in [0, 3, 7] {
            let (x, y) = (a.expert(0, e).unwrap(), b.expert(0, e).unwrap());
            assert_eq!(float_bytes(&x.gate), float_bytes(&y.gate));
            assert_eq!(float_bytes(&x.up), float_bytes(&y.up));
            assert_eq!(float_bytes(&x.down), float_bytes(&y.down));
        }
    }
}

#[test]
fn fixture_bytes_are_deterministic() {
    let spec = FixtureSpec {
        max_shard_bytes: Some(200_000),
        ..FixtureSpec::tiny(Arch::Olmoe)
    };
    let (a, b) = (write(&spec), write(&spec));
    let (pa, pb) = (
        Checkpoint::open(a.path()).unwrap().provenance().unwrap(),
        Checkpoint::open(b.path()).unwrap().provenance().unwrap(),
    );
    assert_eq!(pa.files, pb.files);
    assert!(
        pa.files.len() > 3,
        "sharded: config, index and several shards"
    );
    let other = FixtureSpec { seed: 1, ..spec };
    let c = write(&other);
    let pc = Checkpoint::open(c.path()).unwrap().provenance().unwrap();
    assert_ne!(
        pa.files.last().unwrap().blake3,
        pc.files.last().unwrap().blake3
    );
}

#[test]
fn provenance_hashes_match_blake3_of_the_files() {
    let dir = write(&FixtureSpec::tiny(Arch::Qwen3Moe));
    let ck = Checkpoint::open(dir.path()).unwrap();
    let p = ck.provenance().unwrap();
    for f in &p.files {
        let bytes = std::fs::read(dir.path().join(&f.name)).unwrap();
        assert_eq!(f.size, bytes.len() as u64);
        assert_eq!(
            f.blake3,
            blake3::hash(&bytes).to_hex().to_string(),
            "{}",
            f.name
        );
    }
    assert_eq!(
        ck.weight_bytes(),
        p.files
            .iter()
            .find(|f| f.name == "model.safetensors")
            .unwrap()
            .size
    );
}

#[test]
fn opens_the_bundled_trained_model() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/qwen3moe-tiny");
    let ck = Checkpoint::open(&dir).unwrap();
    assert_eq!(ck.config.num_experts, 32);
    assert_eq!(ck.config.sparse_layers().len(), 6);
    let x = ck.expert(5, 31).unwrap();
    let direct = ck
        .tensor("model.layers.5.mlp.experts.31.up_proj.weight")
        .unwrap();
    assert_eq!(float_bytes(&x.up), direct.data);
    assert_eq!(direct.shape, &[128, 256]);
}

// ---- errors ----

fn sharded_qwen3() -> tempfile::TempDir {
    write(&FixtureSpec {
        max_shard_bytes: Some(300_000),
        ..FixtureSpec::tiny(Arch::Qwen3Moe)
    })
}

/// Shard file names of a sharded fixture, in order.
fn shards(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("model-"))
        .collect();
    v.sort();
    assert!(v.len() >= 3, "expected several shards, got {v:?}");
    v
}

#[test]
fn rejects_missing_shard() {
    let dir = sharded_qwen3();
    let name = shards(dir.path())[1].clone();
    std::fs::remove_file(dir.path().join(&name)).unwrap();
    let err = Checkpoint::open(dir.path()).err().unwrap();
    assert!(
        matches!(&err, LoadError::MissingShard { shard, tensors, .. }
            if *shard == name && *tensors > 0),
        "{err}"
    );
}

#[test]
fn rejects_truncated_shard() {
    let dir = sharded_qwen3();
    let name = shards(dir.path())[2].clone();
    let shard = dir.path().join(&name);
    let len = std::fs::metadata(&shard).unwrap().len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&shard)
        .unwrap();
    f.set_len(len - 10).unwrap();
    let err = Checkpoint::open(dir.path()).err().unwrap();
    assert!(
        matches!(&err, LoadError::TensorOutOfBounds { end, data_len, .. } if end > data_len),
        "{err}"
    );
    assert!(err.to_string().contains(&name), "{err}");
    // Cut inside the header too.
    f.set_len(12).unwrap();
    let err = Checkpoint::open(dir.path()).err().unwrap();
    assert!(
        matches!(err, LoadError::Truncated { file_len: 12, .. }),
        "{err}"
    );
}

#[test]
fn rejects_shape_that_disagrees_with_config() {
    let dir = write(&FixtureSpec::tiny(Arch::Mixtral));
    let cfg_path = dir.path().join("config.json");
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["intermediate_size"] = 128.into(); // experts on disk are 64 wide
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let err = Checkpoint::open(dir.path()).err().unwrap();
    assert!(
        matches!(&err, LoadError::Shape { expected, found, .. }
            if expected == &vec![128, 128] && found == &vec![64, 128]),
        "{err}"
    );
}

#[test]
fn rejects_unknown_architecture() {
    let dir = write(&FixtureSpec::tiny(Arch::Qwen3Moe));
    let cfg_path = dir.path().join("config.json");
    let text = std::fs::read_to_string(&cfg_path)
        .unwrap()
        .replace("qwen3_moe", "llama4");
    std::fs::write(&cfg_path, text).unwrap();
    let err = Checkpoint::open(dir.path()).err().unwrap();
    assert!(
        matches!(err, LoadError::Arch(ArchError::Unsupported { .. })),
        "{err}"
    );
}

#[test]
fn rejects_folder_without_weights() {
    let dir = write(&FixtureSpec::tiny(Arch::Qwen3Moe));
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let err = Checkpoint::open(dir.path()).err().unwrap();
    assert!(matches!(err, LoadError::NoWeights { .. }), "{err}");
    let err = Checkpoint::open(&dir.path().join("config.json"))
        .err()
        .unwrap();
    assert!(matches!(err, LoadError::NotAFolder { .. }), "{err}");
}

#[test]
fn rejects_index_naming_a_tensor_its_shard_lacks() {
    let dir = sharded_qwen3();
    let p = dir.path().join("model.safetensors.index.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    v["weight_map"]["model.layers.9.extra.weight"] = shards(dir.path())[0].clone().into();
    std::fs::write(&p, v.to_string()).unwrap();
    let err = Checkpoint::open(dir.path()).err().unwrap();
    assert!(
        matches!(&err, LoadError::TensorNotInShard { tensor, .. } if tensor == "model.layers.9.extra.weight"),
        "{err}"
    );
}

#[test]
fn rejects_missing_expert() {
    // Drop one expert from the header of a single-file checkpoint by renaming it.
    let dir = write(&FixtureSpec::tiny(Arch::Olmoe));
    let p = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    let from = b"model.layers.1.mlp.experts.5.up_proj.weight";
    let to = b"model.layers.1.mlp.experts.5.up_proX.weight";
    let at = bytes.windows(from.len()).position(|w| w == from).unwrap();
    bytes[at..at + from.len()].copy_from_slice(to);
    std::fs::write(&p, bytes).unwrap();
    let err = Checkpoint::open(dir.path()).err().unwrap();
    assert!(
        matches!(&err, LoadError::MissingTensor { tensor, .. }
            if tensor == "model.layers.1.mlp.experts.5.up_proj.weight"),
        "{err}"
    );
}

#[test]
fn rejects_corrupt_header() {
    let dir = write(&FixtureSpec::tiny(Arch::Qwen3Moe));
    let p = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[8] = b'#';
    std::fs::write(&p, &bytes).unwrap();
    assert!(matches!(
        Checkpoint::open(dir.path()).err().unwrap(),
        LoadError::BadHeader { .. }
    ));
    bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&p, &bytes).unwrap();
    assert!(matches!(
        Checkpoint::open(dir.path()).err().unwrap(),
        LoadError::BadHeader { .. }
    ));
}

// ---- sources ----

#[test]
fn parses_source_specs() {
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().to_str().unwrap();
    assert_eq!(
        SourceSpec::parse(local),
        SourceSpec::Local(dir.path().to_path_buf())
    );
    assert_eq!(
        SourceSpec::parse("Qwen/Qwen3-30B-A3B@main"),
        SourceSpec::Hub {
            repo: "Qwen/Qwen3-30B-A3B".into(),
            revision: Some("main".into())
        }
    );
    assert_eq!(
        SourceSpec::parse("mistralai/Mixtral-8x7B-v0.1"),
        SourceSpec::Hub {
            repo: "mistralai/Mixtral-8x7B-v0.1".into(),
            revision: None
        }
    );
    assert_eq!(
        SourceSpec::parse("./no/such/dir"),
        SourceSpec::Local("./no/such/dir".into())
    );
}

#[test]
fn resolves_hub_repo_from_local_cache_only() {
    let cache = tempfile::tempdir().unwrap();
    let snap = cache.path().join("models--org--tiny/snapshots/abc123");
    FixtureSpec::tiny(Arch::Qwen3Moe).write(&snap).unwrap();
    std::fs::create_dir_all(cache.path().join("models--org--tiny/refs")).unwrap();
    std::fs::write(cache.path().join("models--org--tiny/refs/main"), "abc123\n").unwrap();
    let r = LocalResolver {
        hub_cache: Some(cache.path().to_path_buf()),
    };
    let spec = SourceSpec::parse("org/tiny");
    assert_eq!(r.resolve(&spec).unwrap(), snap);
    let ck = Checkpoint::open_spec(&spec, &r).unwrap();
    assert_eq!(ck.config.arch, Arch::Qwen3Moe);
    let err = r.resolve(&SourceSpec::parse("org/other@v2")).unwrap_err();
    assert!(
        matches!(&err, ResolveError::HubUnavailable { repo, .. } if repo == "org/other"),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("huggingface-cli download org/other"),
        "{err}"
    );
}

// ---- MLX-quantized folders (live: needs python mlx_lm) ----

fn mlx_lm_available(skipped: &str) -> bool {
    crate::convert::python::python_imports("mlx_lm", skipped)
}

#[test]
fn mlx_lm_quantized_folder_codes_equal_ours() {
    if !mlx_lm_available("the MLX-quantized load check") {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // (arch, router name, router bits): mlx-lm keeps Qwen3-MoE's router at 8 bits through a
    // per-module override in config.json; Mixtral's gets the default bits.
    for (arch, router, router_bits) in [
        (
            Arch::Mixtral,
            "model.layers.0.block_sparse_moe.gate.weight",
            4,
        ),
        (Arch::Qwen3Moe, "model.layers.0.mlp.gate.weight", 8),
    ] {
        // mlx_lm convert needs a tokenizer: use the trained model's (vocab 8192).
        let spec = FixtureSpec {
            vocab_size: 8192,
            tokenizer_from: Some(root.join("fixtures/qwen3moe-tiny")),
            ..FixtureSpec::tiny(arch)
        };
        let src = write(&spec);
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
        let float = Checkpoint::open(src.path()).unwrap();
        let quant = Checkpoint::open(&mlx_dir).unwrap();
        assert_eq!(quant.expert_layout(0).unwrap(), ExpertLayout::Stacked);
        let p = QuantParams::new(4, 64).unwrap();
        for (layer, e) in [(0, 0), (1, 6)] {
            let x = quant.expert(layer, e).unwrap();
            assert!(matches!(x.gate, ProjSource::Quantized(q) if q.params == p));
            // MLX's codes copied through equal our quantization of the bf16 source, bit for bit.
            let f = float.expert(layer, e).unwrap();
            let ours = build_segments(layer, e, &f, p, SegmentPlan::default()).unwrap();
            let theirs = build_segments(layer, e, &x, p, SegmentPlan::default()).unwrap();
            assert_eq!(ours, theirs, "{arch} layer {layer} expert {e}");
        }
        let dense = quant.dense_tensors().unwrap();
        let r = dense.iter().find(|d| d.name == router).unwrap();
        assert!(
            matches!(r.data, TensorData::Quantized(q) if q.params.bits == router_bits && q.cols == 128),
            "{arch}: {:?}",
            r.data
        );
        // Scales and biases travel with their weights, never as tensors of their own.
        assert!(!dense
            .iter()
            .any(|d| d.name.ends_with(".scales") || d.name.ends_with(".biases")));
    }
}

#[test]
fn mlx_lm_float_folder_stacks_the_same_experts() {
    if !mlx_lm_available("the MLX float-stack check") {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let spec = FixtureSpec {
        vocab_size: 8192,
        tokenizer_from: Some(root.join("fixtures/qwen3moe-tiny")),
        ..FixtureSpec::tiny(Arch::Olmoe)
    };
    let src = write(&spec);
    let out = tempfile::tempdir().unwrap();
    let mlx_dir = out.path().join("f32");
    let st = std::process::Command::new("python3")
        .args(["-m", "mlx_lm", "convert", "--hf-path"])
        .arg(src.path())
        .arg("--mlx-path")
        .arg(&mlx_dir)
        .args(["--dtype", "float32"])
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let (a, b) = (
        Checkpoint::open(src.path()).unwrap(),
        Checkpoint::open(&mlx_dir).unwrap(),
    );
    assert_eq!(b.expert_layout(1).unwrap(), ExpertLayout::Stacked);
    let widen = |p: &ProjSource<'_>| -> Vec<f32> {
        let ProjSource::Float(m) = p else {
            panic!("float stack expected")
        };
        let mut all = vec![0f32; m.rows * m.cols];
        for r in 0..m.rows {
            m.row_f32(r, &mut all[r * m.cols..(r + 1) * m.cols]);
        }
        all
    };
    for e in [0, 5] {
        let (x, y) = (a.expert(1, e).unwrap(), b.expert(1, e).unwrap());
        // bf16 -> f32 is exact, so the stacked f32 experts equal the bf16 ones widened.
        assert_eq!(widen(&x.gate), widen(&y.gate));
        assert_eq!(widen(&x.up), widen(&y.up));
        assert_eq!(widen(&x.down), widen(&y.down));
    }
}

/// issue 14: fewer experts (or layers) in config.json than in the tensors once dropped the
/// rest silently; in every architecture and layout the config must match the tensors.
#[test]
fn rejects_config_counts_that_disagree_with_the_tensors() {
    for arch in Arch::ALL.iter().copied() {
        for layout in [FixtureLayout::PerExpert, FixtureLayout::Fused] {
            let spec = FixtureSpec {
                layout,
                ..FixtureSpec::tiny(arch)
            };
            let dir = write(&spec);
            let cfg_path = dir.path().join("config.json");
            let cfg: Value =
                serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
            let edits: [(&[&str], u64, &str); 3] = [
                (
                    &["num_local_experts", "num_experts", "n_routed_experts"],
                    spec.num_experts as u64 / 2,
                    "num_experts",
                ),
                (
                    &["num_hidden_layers"],
                    spec.num_layers as u64 - 1,
                    "num_hidden_layers",
                ),
                // (2^40 is refused earlier, by name, as past MLX's 32-bit shapes.)
                (&["vocab_size"], spec.vocab_size as u64 * 2, "vocab_size"),
            ];
            for (keys, value, field) in edits {
                let mut c = cfg.clone();
                // A multimodal wrapper (Kimi K2.5) holds the text model's fields in text_config.
                let text = if c.get("text_config").is_some() {
                    &mut c["text_config"]
                } else {
                    &mut c
                };
                for k in keys {
                    if text.get(*k).is_some() {
                        text[*k] = value.into();
                    }
                }
                if field == "num_experts" && text.get("n_group").is_some() {
                    // Half the experts no longer split into DeepSeek-V3's 4 groups of 2.
                    text["n_group"] = 1.into();
                    text["topk_group"] = 1.into();
                }
                if field == "num_experts" && text.get("num_expert_group").is_some() {
                    // Kimi-K3's spelling of them.
                    text["num_expert_group"] = 1.into();
                    text["topk_group"] = 1.into();
                }
                std::fs::write(&cfg_path, c.to_string()).unwrap();
                let err = Checkpoint::open(dir.path()).err().unwrap();
                assert!(
                    matches!(&err, LoadError::ConfigContradictsTensors { field: f, .. } if *f == field),
                    "{arch:?} {layout:?} {field}: {err}"
                );
            }
        }
    }
}

/// DeepSeek-V3's `kv_b_proj` is split into mlx-lm's `embed_q` / `unembed_out` from its float
/// (or FP8) values; a checkpoint that holds it as anything else is refused by name at
/// `dense_tensors`, not turned into a pack the runtime cannot load.
#[test]
fn deepseek_v3_kv_b_proj_splits_and_a_non_float_one_is_refused() {
    let dir = write(&FixtureSpec::tiny(Arch::DeepseekV3));
    let ck = Checkpoint::open(dir.path()).unwrap();
    let dense = ck.dense_tensors().unwrap();
    let names: Vec<&str> = dense.iter().map(|d| d.name.as_str()).collect();
    assert!(names.contains(&"model.layers.0.self_attn.embed_q.weight"));
    assert!(names.contains(&"model.layers.0.self_attn.unembed_out.weight"));
    assert!(!names.iter().any(|n| n.contains("kv_b_proj")), "{names:?}");
    drop(ck);

    // Retype layer 1's kv_b_proj (bf16 [4 * 64, 128]) as U32 [256, 64]: same bytes.
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let t = &mut header["model.layers.1.self_attn.kv_b_proj.weight"];
    assert_eq!(t["dtype"], "BF16");
    t["dtype"] = "U32".into();
    t["shape"] = serde_json::json!([256, 64]);
    let mut text = serde_json::to_vec(&header).unwrap();
    while text.len() % 8 != 0 {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(text);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(&path, out).unwrap();
    let ck = Checkpoint::open(dir.path()).unwrap();
    let err = ck.dense_tensors().err().unwrap().to_string();
    assert!(
        err.contains("kv_b_proj") && err.contains("embed_q and unembed_out"),
        "{err}"
    );
}
