//! Kimi K2 Thinking / K2.5's INT4 experts: compressed-tensors `pack-quantized` (symmetric INT4,
//! groups of 32 columns; `weight_packed` int32 words of eight codes stored as `q + 8`, lowest bits
//! first, `weight_scale` bf16, `weight_shape`). A tiny Kimi K2.5 checkpoint written in that
//! layout converts to the very pack its bf16 twin converts to, the twin holding the values the
//! codes stand for (`(u - 8) * scale` in bf16, compressed-tensors' `dequantize`): same tensors,
//! same expert bytes, so the same logits. By default (and with `--group-size 32`) the INT4 codes
//! are kept, copied into MLX's affine layout (the twin's groups span the whole grid, so quantizing
//! its values at groups of 32 finds the same codes: the copy is checked against MLX's quantizer;
//! a second test checks it on codes that do not); with `--group-size 64` the INT4 values are
//! quantized again, as the twin's are.
//! Unsupported settings are refused, naming them.

use std::path::Path;
use std::process::Command;

use crate::common::fixtures::FixtureSpec;
use flashpack::arch::Arch;
use flashpack::format::Pack;
use flashpack::model::Model;
use flashpack::run::experts::{ExpertCache, StoreOptions};
use flashpack::run::open;
use flashpack::run::stream::resident_store;
use half::bf16;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};

const GROUP: usize = 32;

/// Kimi K2 Thinking's `quantization_config` (config.json), for `bits`-bit groups of `GROUP`.
fn quantization_config() -> Value {
    json!({
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "kv_cache_scheme": null,
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "input_activations": null, "output_activations": null,
            "weights": {"num_bits": 4, "type": "int", "symmetric": true, "strategy": "group",
                        "group_size": GROUP, "actorder": null, "dynamic": false,
                        "observer": "minmax", "observer_kwargs": {}, "block_structure": null}}},
        "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*",
                   "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"]
    })
}

fn is_expert_weight(name: &str) -> bool {
    name.contains(".mlp.experts.") && name.ends_with("_proj.weight")
}

/// `w` ([rows, cols] bf16) quantized to symmetric INT4 groups: q = clamp(round(w / scale), -8, 7)
/// with a power-of-two scale near max|w| / 7, and each group's first two codes set to -8 and 7.
/// So every group spans the whole grid and its values `q * scale` are exact in bf16: MLX's affine
/// quantization of those values at 4 bits and groups of 32 finds the very codes, the scale and a
/// bias of -8 x scale, which is what copying the codes gives (`--group-size 32`). Returns the
/// packed int32 words (`q + 8`, eight to a word, lowest bits first), the bf16 scales, and the
/// bf16 values the codes stand for.
/// With `aligned` false: scale = max|w| / 7 rounded to bf16, no code forced, as
/// compressed-tensors' minmax observer gives them.
fn int4(w: &[u8], rows: usize, cols: usize, aligned: bool) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let vals: Vec<f32> = w
        .chunks_exact(2)
        .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
        .collect();
    let (mut packed, mut scales, mut deq) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..rows {
        let row = &vals[r * cols..(r + 1) * cols];
        let mut codes = Vec::with_capacity(cols);
        for g in row.chunks(GROUP) {
            let amax = g.iter().fold(1e-6f32, |m, x| m.max(x.abs()));
            let scale = bf16::from_f32(if aligned {
                (amax / 7.0).log2().floor().exp2()
            } else {
                amax / 7.0
            });
            scales.extend_from_slice(&scale.to_le_bytes());
            for (i, &x) in g.iter().enumerate() {
                let q = match i {
                    0 if aligned => -8,
                    1 if aligned => 7,
                    _ => (x / scale.to_f32()).round().clamp(-8.0, 7.0) as i32,
                };
                codes.push((q + 8) as u32);
                deq.extend_from_slice(&bf16::from_f32(q as f32 * scale.to_f32()).to_le_bytes());
            }
        }
        for word in codes.chunks(8) {
            let packed_word = word
                .iter()
                .enumerate()
                .fold(0u32, |acc, (i, &u)| acc | (u << (4 * i)));
            packed.extend_from_slice(&packed_word.to_le_bytes());
        }
    }
    (packed, scales, deq)
}

/// Writes the tiny Kimi K2.5 checkpoint twice: `int4` in compressed-tensors' layout, `bf16` with
/// the values its codes stand for. `edit` changes the INT4 config's `quantization_config`.
/// Returns the packed words of every expert weight, by the weight's name.
fn write_pair(
    int4_dir: &Path,
    bf16_dir: &Path,
    aligned: bool,
    edit: impl Fn(&mut Value),
) -> Vec<(String, Vec<u8>)> {
    let spec = FixtureSpec::tiny(Arch::KimiK25);
    spec.write(bf16_dir).unwrap();
    let path = bf16_dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    // name -> (dtype, shape, bytes) of each file.
    let mut plain: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut packed: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut experts = 0;
    let mut all_words = Vec::new();
    for (name, view) in st.tensors() {
        if !is_expert_weight(&name) {
            let t = (
                name,
                view.dtype(),
                view.shape().to_vec(),
                view.data().to_vec(),
            );
            plain.push(t.clone());
            packed.push(t);
            continue;
        }
        experts += 1;
        assert_eq!(view.dtype(), Dtype::BF16, "{name}");
        let [rows, cols] = view.shape() else {
            panic!("{name}")
        };
        let (rows, cols) = (*rows, *cols);
        let (words, scales, deq) = int4(view.data(), rows, cols, aligned);
        all_words.push((name.clone(), words.clone()));
        plain.push((name.clone(), Dtype::BF16, vec![rows, cols], deq));
        let stem = name.strip_suffix(".weight").unwrap();
        packed.push((
            format!("{stem}.weight_packed"),
            Dtype::I32,
            vec![rows, cols / 8],
            words,
        ));
        packed.push((
            format!("{stem}.weight_scale"),
            Dtype::BF16,
            vec![rows, cols / GROUP],
            scales,
        ));
        let shape: Vec<u8> = [rows as i32, cols as i32]
            .iter()
            .flat_map(|d| d.to_le_bytes())
            .collect();
        packed.push((format!("{stem}.weight_shape"), Dtype::I32, vec![2], shape));
    }
    assert!(experts > 0);
    let save = |tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)], to: &Path| {
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, None, to).unwrap();
    };
    drop(st);
    save(&plain, &path);
    std::fs::create_dir_all(int4_dir).unwrap();
    save(&packed, &int4_dir.join("model.safetensors"));
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(bf16_dir.join("config.json")).unwrap())
            .unwrap();
    config["quantization_config"] = quantization_config();
    edit(&mut config["quantization_config"]);
    std::fs::write(int4_dir.join("config.json"), config.to_string()).unwrap();
    all_words
}

fn convert(src: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_flashpack"))
        .args([
            "convert",
            src.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--quiet",
        ])
        .args(extra)
        .output()
        .unwrap()
}

/// The logits of every position of `ids` through the pack, every expert resident.
fn logits(pack: &Path, ids: &[u32]) -> Vec<f32> {
    let (pack, cfg, weights) = open::open(pack, true).unwrap();
    let model = Model::load(&cfg, &weights).unwrap();
    let mut cache = ExpertCache::new(&pack, &StoreOptions::default()).unwrap();
    cache.warm_all(&pack).unwrap();
    let mut store = resident_store(&cache, &cfg.sparse_layers(), cfg.num_experts)
        .unwrap()
        .unwrap();
    let mut kv = model.new_cache();
    let out = model.forward_ids(ids, &mut kv, &mut store).unwrap();
    out.to_vec_f32().unwrap()
}

/// The experts of two packs are stored alike: the same segments, bits, checksums and bytes
/// (where the segments start may differ, with the dense tensors before them).
fn same_experts(a: &Pack, b: &Pack) {
    assert_eq!(a.experts().len(), b.experts().len());
    for (x, y) in a.experts().iter().zip(b.experts()) {
        assert_eq!(
            (x.key(), x.bits, x.group_size, x.blake3),
            (y.key(), y.bits, y.group_size, y.blake3)
        );
        assert!(a.segment_stored(x) == b.segment_stored(y), "{:?}", x.key());
    }
}

#[test]
fn int4_pack_quantized_experts_convert_as_the_bf16_values_they_stand_for() {
    let dir = tempfile::tempdir().unwrap();
    let (int4_dir, bf16_dir) = (dir.path().join("int4"), dir.path().join("bf16"));
    write_pair(&int4_dir, &bf16_dir, true, |_| {});
    let pack = |name: &str| dir.path().join(format!("{name}.flashpack"));
    let report = |src: &Path, name: &str, extra: &[&str]| -> Value {
        let o = convert(src, &pack(name), &[extra, &["--json"][..]].concat());
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    // By default the INT4 codes are kept at their own bits and group size (4, 32)...
    let r = report(&int4_dir, "int4", &[]);
    assert_eq!(
        r["source_packed_int"],
        json!({"bits": 4, "group_size": GROUP}),
        "{r}"
    );
    assert_eq!(r["requantized_source"], false, "{r}");
    // ... asked for explicitly too; and at another group size they are quantized again.
    report(&int4_dir, "int4-32", &["--group-size", "32"]);
    let r = report(&int4_dir, "int4-64", &["--group-size", "64"]);
    assert_eq!(r["requantized_source"], true, "{r}");
    report(&bf16_dir, "bf16-32", &["--group-size", "32"]);
    report(&bf16_dir, "bf16-64", &["--group-size", "64"]);

    let ids = [1, 17, 200, 33, 5, 480, 2, 64];
    for (int4, bf16) in [("int4-32", "bf16-32"), ("int4-64", "bf16-64")] {
        // The same logits, exactly: the same pack but for the source's record.
        assert_eq!(
            logits(&pack(int4), &ids),
            logits(&pack(bf16), &ids),
            "{int4}"
        );
        let (a, b) = (
            Pack::open(&pack(int4)).unwrap(),
            Pack::open(&pack(bf16)).unwrap(),
        );
        assert_eq!(a.tensors(), b.tensors());
        for (x, y) in a.tensors().iter().zip(b.tensors()) {
            assert!(a.tensor_stored(x) == b.tensor_stored(y), "{}", x.name);
        }
        same_experts(&a, &b);
        assert!(!a.tensors().iter().any(|t| t.name.contains("weight_")));
    }
    // The default's experts are those of groups of 32 (its dense tensors use the default 64).
    same_experts(
        &Pack::open(&pack("int4")).unwrap(),
        &Pack::open(&pack("bf16-32")).unwrap(),
    );
}

/// Codes as a minmax observer leaves them (groups that do not span the grid): by default, and
/// at 4 bits and groups of 32 asked for, every expert's packed words are in the pack as they are
/// (raw experts, decision 0014), where quantizing the values again finds other codes.
#[test]
fn int4_codes_are_kept_at_their_own_bits_and_group_size() {
    let dir = tempfile::tempdir().unwrap();
    let (int4_dir, bf16_dir) = (dir.path().join("int4"), dir.path().join("bf16"));
    let words = write_pair(&int4_dir, &bf16_dir, false, |_| {});
    let stored = |p: &Pack| -> Vec<u8> {
        p.experts()
            .iter()
            .flat_map(|x| p.segment_stored(x).to_vec())
            .collect()
    };
    let found = |hay: &[u8], w: &[u8]| hay.windows(w.len()).any(|x| x == w);
    let converted = |src: &Path, name: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        let o = convert(src, &out, &[extra, &["--codec", "raw"][..]].concat());
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        stored(&Pack::open(&out).unwrap())
    };
    let requantized = converted(&bf16_dir, "b.flashpack", &["--group-size", "32"]);
    assert!(
        words.iter().any(|(_, w)| !found(&requantized, w)),
        "quantizing the values again gives the same codes: the check proves nothing"
    );
    for (name, extra) in [("default", &[][..]), ("gs32", &["--group-size", "32"][..])] {
        let kept = converted(&int4_dir, name, extra);
        for (tensor, w) in &words {
            assert!(
                found(&kept, w),
                "{name}: {tensor}'s codes are not in the pack"
            );
        }
    }
}

#[test]
fn unsupported_compressed_tensors_settings_are_refused_by_name() {
    type Edit = fn(&mut Value);
    let cases: [(&str, Edit); 4] = [
        ("symmetric", |q| {
            q["config_groups"]["group_0"]["weights"]["symmetric"] = json!(false)
        }),
        ("format", |q| q["format"] = json!("float-quantized")),
        ("actorder", |q| {
            q["config_groups"]["group_0"]["weights"]["actorder"] = json!("group")
        }),
        ("num_bits", |q| {
            q["config_groups"]["group_0"]["weights"]["num_bits"] = json!(3)
        }),
    ];
    for (what, edit) in cases {
        let dir = tempfile::tempdir().unwrap();
        let (int4_dir, bf16_dir) = (dir.path().join("int4"), dir.path().join("bf16"));
        write_pair(&int4_dir, &bf16_dir, true, edit);
        let out = dir.path().join("p.flashpack");
        let o = convert(&int4_dir, &out, &[]);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{what}: {stderr}");
        assert!(
            stderr.contains(what) && stderr.contains("compressed-tensors"),
            "{what}: {stderr}"
        );
        assert!(!out.exists());
    }

    // A packed weight without its scales.
    let dir = tempfile::tempdir().unwrap();
    let (int4_dir, bf16_dir) = (dir.path().join("int4"), dir.path().join("bf16"));
    write_pair(&int4_dir, &bf16_dir, true, |_| {});
    let path = int4_dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let missing = st
        .names()
        .into_iter()
        .find(|n| n.ends_with(".weight_scale"))
        .unwrap()
        .to_string();
    let kept: Vec<(String, TensorView<'_>)> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| *n != missing)
        .collect();
    let out_bytes = safetensors::serialize(kept, None).unwrap();
    std::fs::write(&path, out_bytes).unwrap();
    let o = convert(&int4_dir, &dir.path().join("p.flashpack"), &[]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("weight_scale"), "{stderr}");
}

#[test]
fn plan_reads_a_packed_checkpoint_s_headers_and_weight_shapes_only() {
    let dir = tempfile::tempdir().unwrap();
    let (int4_dir, bf16_dir) = (dir.path().join("int4"), dir.path().join("bf16"));
    write_pair(&int4_dir, &bf16_dir, true, |_| {});
    let opts = flashpack::plan::PlanOptions {
        source: int4_dir.to_str().unwrap().to_string(),
        ram: Some(64 << 30),
        context: 256,
        mac: false,
        remeasure: false,
        disk_speed: None,
        rates: Some(
            flashpack::plan::GivenRates::parse(
                r#"{"disk": {"latency_s": 1e-4, "bytes_per_s": 1e9},
                    "compute": {"decode_s": 0.01, "streamed_decode_s": 0.01, "prefill_s": 0.1,
                                "streamed_prefill_s": 0.1, "chunk_tokens": 8}}"#,
            )
            .unwrap(),
        ),
    };
    let hub = flashpack::hub::Hub::new(flashpack::hub::HubConfig {
        endpoint: "http://127.0.0.1:9".into(),
        token: None,
        cache_dir: dir.path().join("cache"),
        offline: false,
    });
    let report = flashpack::plan::plan(&opts, &hub).unwrap();
    let shard = int4_dir.join("model.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let shapes = st
        .tensors()
        .iter()
        .filter(|(n, _)| n.ends_with(".weight_shape"))
        .count() as u64;
    assert!(shapes > 0);
    let header = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap());
    // The header and 8 bytes (two i32) per weight_shape: no code or scale.
    assert_eq!(report.read.files["model.safetensors"], header + 8 * shapes);
    // Sized as convert keeps them: 4-bit codes in groups of 32.
    let o = &report.options[0];
    assert!(o.expert_bytes > 0 && o.experts > 0);
}
