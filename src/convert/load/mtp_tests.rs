//! Multi-token-prediction layers (`num_nextn_predict_layers`, DeepSeek-V3 / Kimi-K2 / GLM-4.5):
//! dropped at open, their own shards never opened, and the pack the same as without them.

use super::*;
use crate::arch::{Arch, ArchError};
use crate::convert::fixtures::FixtureSpec;
use crate::convert::{convert, ConvertError, ConvertOptions};
use crate::format::Pack;
use crate::progress::{Progress, Silent};
use serde_json::json;

const MTP_SHARD: &str = "model-mtp.safetensors";

fn write(spec: &FixtureSpec) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    spec.write(dir.path()).unwrap();
    dir
}

fn sharded() -> FixtureSpec {
    FixtureSpec {
        max_shard_bytes: Some(300_000),
        ..FixtureSpec::tiny(Arch::Qwen3Moe)
    }
}

/// The tensors of an MTP layer `layer` as DeepSeek-V3 ships it: a decoder layer of the spec's
/// shapes, plus the block's own norms, projection, embedding and head. All bf16 0.5: nothing
/// reads their values.
fn mtp_tensors(spec: &FixtureSpec, layer: usize) -> Vec<(String, Dtype, Vec<usize>, Vec<u8>)> {
    let deeper = FixtureSpec {
        num_layers: layer + 1,
        ..spec.clone()
    };
    let prefix = format!("model.layers.{layer}.");
    let (h, v) = (spec.hidden_size, spec.vocab_size);
    let mut shapes: Vec<(String, Vec<usize>)> = deeper
        .tensors()
        .into_iter()
        .filter(|(n, ..)| n.starts_with(&prefix))
        .map(|(n, s, _)| (n, s))
        .collect();
    assert!(shapes.len() > 10, "a whole decoder layer: {shapes:?}");
    for (name, shape) in [
        ("enorm.weight", vec![h]),
        ("hnorm.weight", vec![h]),
        ("eh_proj.weight", vec![h, 2 * h]),
        ("embed_tokens.weight", vec![v, h]),
        ("shared_head.norm.weight", vec![h]),
        ("shared_head.head.weight", vec![v, h]),
    ] {
        shapes.push((format!("{prefix}{name}"), shape));
    }
    shapes
        .into_iter()
        .map(|(n, s)| {
            let bytes = 0.5f32.to_bits().to_le_bytes()[2..].repeat(s.iter().product());
            (n, Dtype::Bf16, s, bytes)
        })
        .collect()
}

fn write_safetensors(path: &Path, tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)]) {
    let header: Vec<_> = tensors
        .iter()
        .map(|(n, d, s, _)| (n.clone(), *d, s.clone()))
        .collect();
    let mut out = safetensors::serialize_header(&header).unwrap();
    for (.., bytes) in tensors {
        out.extend_from_slice(bytes);
    }
    std::fs::write(path, out).unwrap();
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut Value)) {
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

/// `config.json` of `dir` with `num_nextn_predict_layers` set to `n` (removed for `None`).
fn set_nextn(dir: &Path, n: Option<Value>) {
    edit_json(&dir.join("config.json"), |c| match n {
        Some(n) => c["num_nextn_predict_layers"] = n,
        None => {
            c.as_object_mut()
                .unwrap()
                .remove("num_nextn_predict_layers");
        }
    });
}

/// A sharded fixture of `spec` plus MTP layer `spec.num_layers` in a shard of its own that the
/// index lists, and `num_nextn_predict_layers: 1` in config.json.
fn with_mtp_shard(spec: &FixtureSpec) -> tempfile::TempDir {
    let dir = write(spec);
    let mtp = mtp_tensors(spec, spec.num_layers);
    write_safetensors(&dir.path().join(MTP_SHARD), &mtp);
    edit_json(&dir.path().join("model.safetensors.index.json"), |i| {
        for (name, ..) in &mtp {
            i["weight_map"][name] = MTP_SHARD.into();
        }
    });
    set_nextn(dir.path(), Some(1.into()));
    dir
}

/// A single-file fixture of `spec` whose `model.safetensors` also holds MTP layer
/// `spec.num_layers` (a shard that is needed and holds MTP tensors too).
fn with_mtp_in_single_file(spec: &FixtureSpec) -> tempfile::TempDir {
    assert!(spec.max_shard_bytes.is_none());
    let dir = write(spec);
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let mut all: Vec<_> = safetensors::parse(&path, &bytes)
        .unwrap()
        .into_iter()
        .map(|t| (t.name, t.dtype, t.shape, bytes[t.range].to_vec()))
        .collect();
    all.extend(mtp_tensors(spec, spec.num_layers));
    write_safetensors(&path, &all);
    set_nextn(dir.path(), Some(1.into()));
    dir
}

fn names(ck: &Checkpoint) -> Vec<String> {
    ck.tensor_names().map(str::to_string).collect()
}

#[test]
fn mtp_layer_is_dropped_and_its_own_shard_never_opened() {
    let spec = sharded();
    let plain_dir = write(&spec);
    let plain = Checkpoint::open(plain_dir.path()).unwrap();
    let dir = with_mtp_shard(&spec);
    let n_mtp = mtp_tensors(&spec, 2).len();
    let ck = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(names(&ck), names(&plain));
    assert!(ck.tensor_names().all(|n| !n.starts_with("model.layers.2.")));
    assert_eq!(ck.config.num_hidden_layers, 2);
    assert_eq!(
        ck.dropped_mtp(),
        &DroppedMtp {
            layers: 2..3,
            tensors: n_mtp,
            other_tensors: 0,
            skipped_shards: vec![MTP_SHARD.to_string()],
        }
    );
    let dense: Vec<String> = ck
        .dense_tensors()
        .unwrap()
        .iter()
        .map(|d| d.name.clone())
        .collect();
    assert!(dense.iter().all(|n| !n.starts_with("model.layers.2.")));
    assert!(ck.expert(2, 0).is_err());
    let files = ck.provenance().unwrap().files;
    assert!(files.iter().all(|f| f.name != MTP_SHARD), "{files:?}");
    assert_eq!(ck.weight_bytes(), plain.weight_bytes());

    // Not opened at all: a corrupt file in its place, or none, opens the same.
    std::fs::write(dir.path().join(MTP_SHARD), b"not a safetensors file").unwrap();
    assert_eq!(names(&Checkpoint::open(dir.path()).unwrap()), names(&plain));
    std::fs::remove_file(dir.path().join(MTP_SHARD)).unwrap();
    let ck = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(names(&ck), names(&plain));
    assert_eq!(ck.dropped_mtp().skipped_shards, [MTP_SHARD]);

    // A missing shard that holds any needed tensor is still an error.
    let needed = ck.provenance().unwrap().files.last().unwrap().name.clone();
    std::fs::remove_file(dir.path().join(&needed)).unwrap();
    let err = Checkpoint::open(dir.path()).err().unwrap();
    assert!(
        matches!(&err, LoadError::MissingShard { shard, .. } if *shard == needed),
        "{err}"
    );
}

#[test]
fn mtp_tensors_in_a_needed_shard_are_dropped_from_it() {
    let spec = FixtureSpec::tiny(Arch::Qwen3Moe);
    let plain_dir = write(&spec);
    let plain = Checkpoint::open(plain_dir.path()).unwrap();
    let dir = with_mtp_in_single_file(&spec);
    let ck = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(names(&ck), names(&plain));
    assert_eq!(ck.tensor_count(), spec.tensors().len());
    let d = ck.dropped_mtp();
    assert_eq!(
        (d.layers.clone(), d.tensors, d.skipped_shards.len()),
        (2..3, mtp_tensors(&spec, 2).len(), 0)
    );
}

/// The tensor and expert directories, every stored byte, and the metadata other than the
/// source's record (provenance, and config.json, which differs by `num_nextn_predict_layers`).
fn assert_same_payload(a: &Path, b: &Path) {
    let (a, b) = (Pack::open(a).unwrap(), Pack::open(b).unwrap());
    assert_eq!(a.tensors(), b.tensors());
    for (x, y) in a.tensors().iter().zip(b.tensors()) {
        assert!(a.tensor_stored(x) == b.tensor_stored(y), "{}", x.name);
    }
    assert_eq!(a.experts(), b.experts());
    for (x, y) in a.experts().iter().zip(b.experts()) {
        assert!(a.segment_stored(x) == b.segment_stored(y), "{:?}", x.key());
    }
    let strip = |p: &Pack| {
        let mut m = p.metadata().clone();
        let o = m.as_object_mut().unwrap();
        o.remove("provenance");
        let mut config = o.remove("config").unwrap();
        config
            .as_object_mut()
            .unwrap()
            .remove("num_nextn_predict_layers");
        (m, config)
    };
    assert_eq!(strip(&a), strip(&b));
}

fn convert_with(
    src: &Path,
    out: &Path,
    progress: &dyn Progress,
) -> Result<crate::convert::ConvertReport, ConvertError> {
    convert(
        &SourceSpec::Local(src.to_path_buf()),
        &LocalResolver { hub_cache: None },
        out,
        &ConvertOptions::default(),
        progress,
    )
}

fn convert_to(src: &Path, out: &Path) -> Result<crate::convert::ConvertReport, ConvertError> {
    convert_with(src, out, &Silent)
}

/// The notes and warnings of a conversion.
#[derive(Default)]
struct Notes(std::sync::Mutex<Vec<String>>);

impl Progress for Notes {
    fn stage(&self, _: &str, _: Option<u64>, _: &str) {}
    fn advance(&self, _: u64) {}
    fn finish_stage(&self) {}
    fn note(&self, msg: &str) {
        self.0.lock().unwrap().push(msg.to_string());
    }
}

#[test]
fn mtp_layers_convert_to_the_pack_of_the_model_without_them() {
    let out = tempfile::tempdir().unwrap();
    let pack = |name: &str| out.path().join(name);
    let spec = sharded();
    convert_to(write(&spec).path(), &pack("plain.flashpack")).unwrap();

    let dir = with_mtp_shard(&spec);
    let notes = Notes::default();
    let report = convert_with(dir.path(), &pack("mtp.flashpack"), &notes).unwrap();
    let n_mtp = mtp_tensors(&spec, 2).len();
    assert_eq!(report.dropped_mtp.tensors, n_mtp);
    // Said once, with the count and the shard not read.
    let notes = notes.0.into_inner().unwrap();
    let said: Vec<&String> = notes.iter().filter(|n| n.contains("multi-token")).collect();
    assert_eq!(said.len(), 1, "{notes:?}");
    assert!(
        said[0].contains(&format!("dropped {n_mtp} tensor(s)")) && said[0].contains(MTP_SHARD),
        "{}",
        said[0]
    );
    // A skipped shard is still the source's: no pack is written over it.
    let err = convert_to(dir.path(), &dir.path().join(MTP_SHARD)).unwrap_err();
    assert!(matches!(err, ConvertError::Destination { .. }), "{err}");
    assert_same_payload(&pack("plain.flashpack"), &pack("mtp.flashpack"));
    // The MTP shard is no input of the conversion: without it, the very same file.
    std::fs::remove_file(dir.path().join(MTP_SHARD)).unwrap();
    convert_to(dir.path(), &pack("mtp-absent.flashpack")).unwrap();
    assert_eq!(
        std::fs::read(pack("mtp.flashpack")).unwrap(),
        std::fs::read(pack("mtp-absent.flashpack")).unwrap()
    );

    // MTP tensors inside a shard the model needs.
    let spec = FixtureSpec::tiny(Arch::Qwen3Moe);
    convert_to(write(&spec).path(), &pack("single.flashpack")).unwrap();
    let dir = with_mtp_in_single_file(&spec);
    convert_to(dir.path(), &pack("single-mtp.flashpack")).unwrap();
    assert_same_payload(&pack("single.flashpack"), &pack("single-mtp.flashpack"));
}

#[test]
fn extra_layers_not_declared_as_mtp_are_refused() {
    let spec = sharded();
    let dir = with_mtp_shard(&spec);
    let layers_err = |dir: &Path| match Checkpoint::open(dir).err() {
        Some(LoadError::ConfigContradictsTensors {
            field: "num_hidden_layers",
            tensors,
            ..
        }) => tensors,
        other => panic!("{other:?}"),
    };
    // Without num_nextn_predict_layers (absent, null or 0), layer 2 is an undeclared layer.
    for n in [None, Some(Value::Null), Some(0.into())] {
        set_nextn(dir.path(), n.clone());
        let tensors = layers_err(dir.path());
        assert!(tensors.contains("0..=2 (3 layers)"), "{n:?}: {tensors}");
        let err = convert_to(dir.path(), &dir.path().join("x.flashpack")).unwrap_err();
        assert!(
            matches!(
                err,
                ConvertError::Load(LoadError::ConfigContradictsTensors { .. })
            ),
            "{err}"
        );
    }
    // A layer past the MTP ones is still a mismatch, and the message says what was dropped.
    set_nextn(dir.path(), Some(1.into()));
    let extra = vec![(
        "model.layers.3.input_layernorm.weight".to_string(),
        Dtype::Bf16,
        vec![spec.hidden_size],
        vec![0u8; 2 * spec.hidden_size],
    )];
    write_safetensors(&dir.path().join("model-extra.safetensors"), &extra);
    edit_json(&dir.path().join("model.safetensors.index.json"), |i| {
        i["weight_map"][&extra[0].0] = "model-extra.safetensors".into();
    });
    let tensors = layers_err(dir.path());
    assert!(
        tensors.contains("0..=3") && tensors.contains("multi-token-prediction layers 2..=2"),
        "{tensors}"
    );
}

#[test]
fn num_nextn_predict_layers_must_be_a_count() {
    let dir = with_mtp_shard(&sharded());
    for bad in [json!("1"), json!(-1), json!(1.5), json!([1])] {
        set_nextn(dir.path(), Some(bad.clone()));
        let err = Checkpoint::open(dir.path()).err().unwrap();
        assert!(
            matches!(
                &err,
                LoadError::Arch(ArchError::BadField {
                    field: "num_nextn_predict_layers",
                    ..
                })
            ),
            "{bad}: {err}"
        );
        assert!(err.to_string().contains("non-negative integer"), "{err}");
    }
}
