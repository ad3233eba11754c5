//! Kimi K2 Thinking / K2.5's INT4 experts: compressed-tensors `pack-quantized` (symmetric INT4,
//! groups of 32 columns; `weight_packed` int32 words of eight codes stored as `q + 8`, lowest bits
//! first, `weight_scale` bf16, `weight_shape`). A tiny Kimi K2.5 checkpoint written in that
//! layout converts to the very pack its bf16 twin converts to, the twin holding the values the
//! codes stand for (`(u - 8) * scale` in bf16, compressed-tensors' `dequantize`): same tensors,
//! same expert bytes, so the same logits. With the default group size of 64 the INT4 values are
//! quantized again as the twin's are; with `--group-size 32` the codes are copied (the twin's
//! groups span the whole grid, so quantizing its values finds the same codes: the copy is checked
//! against MLX's quantizer; src/convert/quantize/tests.rs checks it on codes that do not).
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

#[test]
fn int4_pack_quantized_experts_convert_as_the_bf16_values_they_stand_for() {
    let dir = tempfile::tempdir().unwrap();
    let (int4_dir, bf16_dir) = (dir.path().join("int4"), dir.path().join("bf16"));
    write_pair(&int4_dir, &bf16_dir, true, |_| {});
    for (i, extra) in [&[][..], &["--group-size", "32"][..]].iter().enumerate() {
        let (a, b) = (
            dir.path().join(format!("int4-{i}.flashpack")),
            dir.path().join(format!("bf16-{i}.flashpack")),
        );
        for (src, out) in [(&int4_dir, &a), (&bf16_dir, &b)] {
            let o = convert(src, out, extra);
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        }
        // The same logits, exactly: the same pack but for the source's record.
        let ids = [1, 17, 200, 33, 5, 480, 2, 64];
        assert_eq!(logits(&a, &ids), logits(&b, &ids), "{extra:?}");
        let (a, b) = (Pack::open(&a).unwrap(), Pack::open(&b).unwrap());
        assert_eq!(a.tensors(), b.tensors());
        for (x, y) in a.tensors().iter().zip(b.tensors()) {
            assert!(a.tensor_stored(x) == b.tensor_stored(y), "{}", x.name);
        }
        assert_eq!(a.experts(), b.experts());
        for (x, y) in a.experts().iter().zip(b.experts()) {
            assert!(a.segment_stored(x) == b.segment_stored(y), "{:?}", x.key());
        }
        assert!(!a.tensors().iter().any(|t| t.name.contains("weight_")));
    }
}

/// Codes as a minmax observer leaves them (groups that do not span the grid): at 4 bits and
/// groups of 32 every expert's packed words are in the pack as they are (raw experts, decision
/// 0014), where quantizing the values again would have found other codes.
#[test]
fn int4_codes_are_kept_at_their_own_bits_and_group_size() {
    let dir = tempfile::tempdir().unwrap();
    let (int4_dir, bf16_dir) = (dir.path().join("int4"), dir.path().join("bf16"));
    let words = write_pair(&int4_dir, &bf16_dir, false, |_| {});
    let (a, b) = (
        dir.path().join("a.flashpack"),
        dir.path().join("b.flashpack"),
    );
    for (src, out) in [(&int4_dir, &a), (&bf16_dir, &b)] {
        let o = convert(src, out, &["--group-size", "32", "--codec", "raw"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let (a, b) = (Pack::open(&a).unwrap(), Pack::open(&b).unwrap());
    let stored = |p: &Pack| -> Vec<u8> {
        p.experts()
            .iter()
            .flat_map(|x| p.segment_stored(x).to_vec())
            .collect()
    };
    let (kept, requantized) = (stored(&a), stored(&b));
    let found = |hay: &[u8], w: &[u8]| hay.windows(w.len()).any(|x| x == w);
    for (name, w) in &words {
        assert!(
            found(&kept, w),
            "{name}: the source's codes are not in the pack"
        );
    }
    assert!(
        words.iter().any(|(_, w)| !found(&requantized, w)),
        "quantizing the values again gives the same codes: the check proves nothing"
    );
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
