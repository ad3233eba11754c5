//! Kimi K2 Thinking / K2.5's INT4 experts: compressed-tensors `pack-quantized` (symmetric INT4,
//! groups of 32 columns; `weight_packed` int32 words of eight codes stored as `q + 8`, lowest bits
//! first, `weight_scale` bf16, `weight_shape`). A tiny Kimi K2.5 checkpoint written in that
//! layout converts to the very pack its bf16 twin converts to, the twin holding the values the
//! codes stand for (`(u - 8) * scale` in bf16, compressed-tensors' `dequantize`): same tensors,
//! same expert bytes, so the same logits. Unsupported settings are refused, naming them.

use std::path::Path;
use std::process::Command;

use crate::common::fixtures::FixtureSpec;
use flashpack::arch::Arch;
use flashpack::format::Pack;
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

/// `w` ([rows, cols] bf16) quantized as compressed-tensors does for symmetric INT4 groups:
/// scale = max|w| / 7 per group (in bf16), q = clamp(round(w / scale), -8, 7). Returns the packed
/// int32 words (`q + 8`, eight to a word, lowest bits first), the bf16 scales, and the bf16 values
/// the codes stand for.
fn int4(w: &[u8], rows: usize, cols: usize) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let vals: Vec<f32> = w
        .chunks_exact(2)
        .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
        .collect();
    let (mut packed, mut scales, mut deq) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..rows {
        let row = &vals[r * cols..(r + 1) * cols];
        let mut codes = Vec::with_capacity(cols);
        for g in row.chunks(GROUP) {
            let amax = g.iter().fold(0f32, |m, x| m.max(x.abs()));
            let scale = bf16::from_f32(if amax > 0.0 { amax / 7.0 } else { 1.0 });
            scales.extend_from_slice(&scale.to_le_bytes());
            for &x in g {
                let q = (x / scale.to_f32()).round().clamp(-8.0, 7.0) as i32;
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
fn write_pair(int4_dir: &Path, bf16_dir: &Path, edit: impl Fn(&mut Value)) {
    let spec = FixtureSpec::tiny(Arch::KimiK25);
    spec.write(bf16_dir).unwrap();
    let path = bf16_dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    // name -> (dtype, shape, bytes) of each file.
    let mut plain: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut packed: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut experts = 0;
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
        let (words, scales, deq) = int4(view.data(), rows, cols);
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

#[test]
fn int4_pack_quantized_experts_convert_as_the_bf16_values_they_stand_for() {
    let dir = tempfile::tempdir().unwrap();
    let (int4_dir, bf16_dir) = (dir.path().join("int4"), dir.path().join("bf16"));
    write_pair(&int4_dir, &bf16_dir, |_| {});
    for (i, extra) in [&[][..], &["--group-size", "32"][..]].iter().enumerate() {
        let (a, b) = (
            dir.path().join(format!("int4-{i}.flashpack")),
            dir.path().join(format!("bf16-{i}.flashpack")),
        );
        for (src, out) in [(&int4_dir, &a), (&bf16_dir, &b)] {
            let o = convert(src, out, extra);
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        }
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
        write_pair(&int4_dir, &bf16_dir, edit);
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
    write_pair(&int4_dir, &bf16_dir, |_| {});
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
