//! Opening a checkpoint: the folder resolved, `config.json` parsed and checked against what the
//! runtime can run, the shards the model needs mapped (those holding only MTP layers or a
//! vision tower never opened: `TensorFilter`, the Hub download's rule too),
//! every safetensors header checked against its file and the index, and the tensors renamed as
//! the architecture's sanitize rule says (`ArchDef::sanitize`: Qwen3.5's `model.language_model.*`
//! is `model.*`, its vision tower left out).
//! Invariant: a [`Checkpoint`] exists only once every check of `open` has passed.

use super::{
    experts, io_err, quantization, safetensors, Checkpoint, DroppedMtp, LoadError, ResolveError,
    Resolver, SourceSpec, TensorInfo,
};
use crate::arch::{ArchError, ModelConfig};
use crate::convert::tensor::Dtype;
use crate::mapped::Bytes;
use crate::quant_mode::MlxQuantization;
use rayon::prelude::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A mapped safetensors shard.
pub(super) struct Shard {
    pub(super) name: String,
    pub(super) path: PathBuf,
    pub(super) bytes: Bytes,
}

/// Where a tensor lives.
#[derive(Clone, Debug)]
pub(super) struct Entry {
    pub(super) shard: usize,
    pub(super) info: TensorInfo,
}

/// The tensors under the names a pack gives them ([`crate::arch::Arch::text_model_name`]:
/// Qwen3.5's `model.language_model.*` is `model.*`), those of no text model (a vision tower)
/// left out.
fn text_model_tensors(
    arch: crate::arch::Arch,
    tensors: BTreeMap<String, Entry>,
    shards: &[Shard],
) -> Result<BTreeMap<String, Entry>, LoadError> {
    let mut out = BTreeMap::new();
    for (name, mut e) in tensors {
        let Some(renamed) = arch.text_model_name(&name).map(|n| n.into_owned()) else {
            continue;
        };
        let shard = e.shard;
        e.info.name = renamed.clone();
        if let Some(prev) = out.insert(renamed.clone(), e) {
            return Err(LoadError::DuplicateTensor {
                tensor: renamed,
                first: shards[prev.shard].name.clone(),
                second: format!("{} (as {name})", shards[shard].name),
            });
        }
    }
    Ok(out)
}

/// The tensors, and each packed weight's unpacked column count by its new name.
type PackedTensors = (BTreeMap<String, Entry>, BTreeMap<String, usize>);

/// compressed-tensors' names ([`quantization::PackedInt`]): `W.weight_packed` (int32 words) is
/// read as `W.weight`, dequantized as it is read (`Checkpoint::float_matrix`); `W.weight_scale`
/// travels with it (one scale per group of a row); `W.weight_shape`, the unpacked `[rows, cols]`,
/// is checked against the two and left out. A packed weight without its scales, or with shapes
/// that disagree, is refused here.
/// Returns the renamed tensors and the column counts ([`PackedTensors`]).
fn packed_int_tensors(
    mut tensors: BTreeMap<String, Entry>,
    p: quantization::PackedInt,
    shards: &[Shard],
) -> Result<PackedTensors, LoadError> {
    let mut packed_cols = BTreeMap::new();
    let stems: Vec<String> = tensors
        .keys()
        .filter_map(|n| n.strip_suffix(".weight_packed"))
        .map(str::to_string)
        .collect();
    for stem in stems {
        let packed_name = format!("{stem}.weight_packed");
        let scale_name = format!("{stem}.weight_scale");
        let shape_name = format!("{stem}.weight_shape");
        let Some(mut e) = tensors.remove(&packed_name) else {
            continue;
        };
        if e.info.dtype != Dtype::I32 || e.info.shape.len() != 2 {
            return Err(LoadError::Dtype {
                tensor: packed_name,
                found: e.info.dtype,
                expected: "a 2-D I32 tensor of packed codes (compressed-tensors pack-quantized)",
            });
        }
        let scale_shape = tensors
            .get(&scale_name)
            .map(|s| s.info.shape.clone())
            .ok_or_else(|| LoadError::MissingTensor {
                tensor: scale_name.clone(),
                hint: format!(" ({packed_name} is pack-quantized and needs its group scales)"),
            })?;
        let (rows, words) = (e.info.shape[0], e.info.shape[1]);
        let per_word = 32 / p.bits;
        // Columns: weight_shape's, else as many as the groups of scales allow.
        let cols = match tensors.remove(&shape_name) {
            Some(se) => {
                let bytes = &shards[se.shard].bytes[se.info.range.clone()];
                let dims: Option<Vec<usize>> = match (se.info.dtype, se.info.shape.as_slice()) {
                    (Dtype::I32, [2]) => Some(
                        bytes
                            .chunks_exact(4)
                            .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
                            .collect(),
                    ),
                    (Dtype::I64, [2]) => Some(
                        bytes
                            .chunks_exact(8)
                            .map(|b| i64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as usize)
                            .collect(),
                    ),
                    _ => None,
                };
                match dims.as_deref() {
                    Some(&[r, c]) if r == rows => c,
                    _ => {
                        return Err(LoadError::Shape {
                            tensor: shape_name,
                            expected: vec![rows, words * per_word],
                            found: se.info.shape.clone(),
                            why: format!(
                                "two I32 or I64 numbers, the unpacked shape of {packed_name}"
                            ),
                        })
                    }
                }
            }
            None => scale_shape.get(1).copied().unwrap_or(0) * p.group_size,
        };
        let want_scales = [rows, cols.div_ceil(p.group_size)];
        if cols == 0 || words != cols.div_ceil(per_word) || scale_shape != want_scales {
            return Err(LoadError::Shape {
                tensor: scale_name,
                expected: want_scales.to_vec(),
                found: scale_shape.clone(),
                why: format!(
                    "one scale per {} columns of {packed_name} {:?} ({} bits, {per_word} to a word, \
                     {cols} columns)",
                    p.group_size, e.info.shape, p.bits
                ),
            });
        }
        let weight_name = format!("{stem}.weight");
        e.info.name = weight_name.clone();
        packed_cols.insert(weight_name.clone(), cols);
        if tensors.insert(weight_name.clone(), e).is_some() {
            return Err(LoadError::DuplicateTensor {
                tensor: weight_name,
                first: "the checkpoint".into(),
                second: format!("{packed_name} read as it"),
            });
        }
    }
    Ok((tensors, packed_cols))
}

/// DeepSeek's own names for block scales (its V4.1 release: `W.scale`, E8M0 exponents beside
/// E4M3 or packed E2M1 codes in `W.weight`), renamed to those the loader reads: beside FP8
/// codes, `W.weight_scale_inv` (the FP8 blocks of `quantization_config`'s `weight_block_size`,
/// read by `Checkpoint::fp8_matrix` as DeepSeek-V3's are); beside FP4 codes (I8 or U8, two to
/// a byte), `W.scales` (one per 32 values of a row: MXFP4, read by `experts.rs`). A `W.scale`
/// beside a float weight is some other tensor and stays. Every pair is checked here, so a
/// scale of the wrong type or shape is refused, naming it, before anything is converted.
fn scale_companions(
    mut tensors: BTreeMap<String, Entry>,
    fp8_block: Option<[usize; 2]>,
) -> Result<BTreeMap<String, Entry>, LoadError> {
    let stems: Vec<String> = tensors
        .keys()
        .filter_map(|n| n.strip_suffix(".scale"))
        .filter(|stem| {
            tensors
                .get(&format!("{stem}.weight"))
                .is_some_and(|w| matches!(w.info.dtype, Dtype::F8E4M3 | Dtype::I8 | Dtype::U8))
        })
        .map(str::to_string)
        .collect();
    for stem in stems {
        let (wn, sn) = (format!("{stem}.weight"), format!("{stem}.scale"));
        let (wd, ws) = {
            let w = &tensors[&wn].info;
            (w.dtype, w.shape.clone())
        };
        let Some(mut e) = tensors.remove(&sn) else {
            continue;
        };
        let sd = e.info.dtype;
        if !(matches!(sd, Dtype::F8E8M0 | Dtype::U8) || sd.float().is_some()) {
            return Err(LoadError::Dtype {
                tensor: sn,
                found: sd,
                expected: "F8_E8M0 or U8 exponents (ue8m0), or F32, BF16 or F16 scales",
            });
        }
        let [rows, cols] = ws[..] else {
            return Err(LoadError::Shape {
                tensor: wn,
                expected: vec![0, 0],
                found: ws,
                why: "a 2-D weight of codes, which its .scale goes with".into(),
            });
        };
        let (new, want, why) = if wd == Dtype::F8E4M3 {
            let [br, bc] = fp8_block.ok_or_else(|| LoadError::MlxQuantization {
                detail: format!(
                    "{wn} is F8_E4M3 with block scales ({sn}), but config.json has no \
                     quantization_config with quant_method \"fp8\" and its weight_block_size; \
                     add the release's quantization_config back"
                ),
            })?;
            (
                format!("{wn}_scale_inv"),
                vec![rows.div_ceil(br), cols.div_ceil(bc)],
                format!(
                    "one scale per {br} x {bc} block (quantization_config.weight_block_size) \
                     of the FP8 codes {wn} {ws:?}"
                ),
            )
        } else {
            (
                format!("{stem}.scales"),
                vec![rows, (2 * cols).div_ceil(32)],
                format!(
                    "one scale per 32 values of a row of the FP4 codes {wn} {ws:?} (two to a \
                     byte: {} values a row)",
                    2 * cols
                ),
            )
        };
        if e.info.shape != want || (wd != Dtype::F8E4M3 && (2 * cols) % 32 != 0) {
            return Err(LoadError::Shape {
                tensor: sn,
                expected: want,
                found: e.info.shape.clone(),
                why: format!(
                    "{why}; the checkpoint is damaged or its config.json is not the one it \
                     was released with"
                ),
            });
        }
        e.info.name = new.clone();
        if tensors.insert(new.clone(), e).is_some() {
            return Err(LoadError::DuplicateTensor {
                tensor: new,
                first: "the checkpoint".into(),
                second: format!("{sn} read as it"),
            });
        }
    }
    // An FP8 weight without its scales stands for no values.
    if let Some(w) = tensors.iter().find_map(|(n, e)| {
        (e.info.dtype == Dtype::F8E4M3
            && n.ends_with(".weight")
            && !tensors.contains_key(&format!("{n}_scale_inv")))
        .then_some(n)
    }) {
        let stem = w.strip_suffix(".weight").unwrap_or(w);
        return Err(LoadError::MissingTensor {
            tensor: format!("{w}_scale_inv"),
            hint: format!(
                " ({w} is FP8 and needs its block scales: {w}_scale_inv, or {stem}.scale in \
                 DeepSeek's own layout; the checkpoint is incomplete)"
            ),
        });
    }
    Ok(tensors)
}

impl Checkpoint {
    /// Resolves `spec` with `resolver` and opens the folder.
    pub fn open_spec(spec: &SourceSpec, resolver: &dyn Resolver) -> Result<Checkpoint, LoadError> {
        let dir = resolver.resolve(spec).map_err(|e| match (spec, e) {
            // The name was only taken for a Hub id because no local folder has it: say both.
            (SourceSpec::Hub { repo, revision }, e @ ResolveError::Fetch(_)) => {
                LoadError::NotLocalNorHub {
                    repo: repo.clone(),
                    revision: revision.clone(),
                    source: Box::new(LoadError::Resolve(e)),
                }
            }
            (_, e) => LoadError::Resolve(e),
        })?;
        let mut ck = Checkpoint::open(&dir)?;
        if let SourceSpec::Hub { repo, .. } = spec {
            // Hub snapshots live in `snapshots/<commit>`: the folder name is the commit.
            let commit = dir.file_name().map(|n| n.to_string_lossy().into_owned());
            ck.origin = Some((repo.clone(), commit));
        }
        Ok(ck)
    }

    /// Opens a checkpoint folder: parses `config.json`, maps every shard it needs (all but
    /// those holding only MTP layers) and checks every safetensors header against its file.
    pub fn open(dir: &Path) -> Result<Checkpoint, LoadError> {
        if let (Ok(_), Err(source)) = (std::fs::symlink_metadata(dir), std::fs::metadata(dir)) {
            return Err(LoadError::BrokenLink {
                path: dir.display().to_string(),
                source,
            });
        }
        if !dir.is_dir() {
            return Err(LoadError::NotAFolder {
                path: dir.display().to_string(),
            });
        }
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(io_err(&cfg_path))?;
        let raw_config: Value = serde_json::from_str(&text).map_err(|source| {
            LoadError::Arch(ArchError::Json {
                path: cfg_path.display().to_string(),
                source,
            })
        })?;
        let config = ModelConfig::from_json(&raw_config)?;
        crate::model::Model::check_supported(&config).map_err(|e| LoadError::Unsupported {
            detail: e.to_string(),
        })?;
        let mlx_quantization = MlxQuantization::from_config(&raw_config)
            .map_err(|e| LoadError::MlxQuantization { detail: e.detail })?
            .map(|mut q| {
                // Module paths under the names the tensors go by (Qwen3.5's `language_model.`).
                q.overrides = std::mem::take(&mut q.overrides)
                    .into_iter()
                    .filter_map(|(k, v)| Some((config.arch.text_model_name(&k)?.into_owned(), v)))
                    .collect();
                q
            });
        let fp8_block = quantization::fp8_block_size(&raw_config)?;
        let packed_int = quantization::packed_int(&raw_config)?;
        let filter = safetensors::TensorFilter {
            arch: Some(config.arch),
            ..safetensors::TensorFilter::from_config(&raw_config)?
        };
        let mtp = &filter.mtp;
        let mut dropped_mtp = DroppedMtp {
            layers: mtp.layers.clone(),
            ..DroppedMtp::default()
        };

        let index_path = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        // shard name -> tensors the index says it holds (None: single file, no index).
        let mut listed: BTreeMap<String, Option<Vec<String>>> = BTreeMap::new();
        if index_path.is_file() {
            let text = std::fs::read_to_string(&index_path).map_err(io_err(&index_path))?;
            let index =
                safetensors::ShardIndex::parse(&text).map_err(|e| LoadError::BadHeader {
                    path: index_path.display().to_string(),
                    detail: format!(
                        "not a shard index ({{\"weight_map\": {{tensor: file}}}}): {e}"
                    ),
                })?;
            let plan = index.plan(&filter);
            dropped_mtp.tensors = plan.skipped_mtp_tensors;
            dropped_mtp.other_tensors = plan.skipped_other_tensors;
            dropped_mtp.skipped_shards = plan.skipped.iter().map(|s| s.to_string()).collect();
            for (tensor, shard) in &index.weight_map {
                if shard.contains("..") || Path::new(shard).is_absolute() {
                    return Err(LoadError::BadHeader {
                        path: index_path.display().to_string(),
                        detail: format!("shard name {shard:?} leaves the folder"),
                    });
                }
                if plan.skipped.contains(&shard.as_str()) {
                    continue;
                }
                listed
                    .entry(shard.to_string())
                    .or_insert_with(|| Some(Vec::new()))
                    .get_or_insert_with(Vec::new)
                    .push(tensor.clone());
            }
        } else if single.is_file() {
            listed.insert("model.safetensors".into(), None);
        } else {
            return Err(LoadError::NoWeights {
                dir: dir.display().to_string(),
            });
        }
        for (shard, tensors) in &listed {
            if !dir.join(shard).is_file() {
                return Err(LoadError::MissingShard {
                    shard: shard.clone(),
                    index: index_path.display().to_string(),
                    tensors: tensors.as_ref().map_or(0, Vec::len),
                });
            }
        }
        let shard_names: Vec<&String> = listed.keys().collect();
        let parsed: Vec<(Shard, Vec<TensorInfo>)> = shard_names
            .par_iter()
            .map(|name| {
                let path = dir.join(name);
                let bytes = Bytes::map(&path).map_err(io_err(&path))?;
                let infos = safetensors::parse(&path, &bytes)?;
                Ok((
                    Shard {
                        name: (*name).clone(),
                        path,
                        bytes,
                    },
                    infos,
                ))
            })
            .collect::<Result<_, LoadError>>()?;
        let mut shards = Vec::with_capacity(parsed.len());
        let mut tensors = BTreeMap::new();
        for (i, (shard, infos)) in parsed.into_iter().enumerate() {
            for info in infos {
                if let Some(prev) = tensors.get(&info.name) {
                    let prev: &Entry = prev;
                    return Err(LoadError::DuplicateTensor {
                        tensor: info.name,
                        first: shards
                            .get(prev.shard)
                            .map_or_else(|| shard.name.clone(), |s: &Shard| s.name.clone()),
                        second: shard.name.clone(),
                    });
                }
                tensors.insert(info.name.clone(), Entry { shard: i, info });
            }
            shards.push(shard);
        }
        for (shard, names) in &listed {
            for t in names.iter().flatten() {
                let found = tensors
                    .get(t)
                    .is_some_and(|e| &shards[e.shard].name == shard);
                if !found {
                    return Err(LoadError::TensorNotInShard {
                        tensor: t.clone(),
                        shard: shard.clone(),
                        index: index_path.display().to_string(),
                    });
                }
            }
        }
        // Dropped only now, so the index's claims about mixed shards were checked like any other.
        let before = tensors.len();
        let mut tensors = text_model_tensors(config.arch, tensors, &shards)?;
        dropped_mtp.other_tensors += before - tensors.len();
        let before = tensors.len();
        tensors.retain(|name, _| !mtp.holds(name));
        dropped_mtp.tensors += before - tensors.len();
        let mut tensors = scale_companions(tensors, fp8_block)?;
        let mut packed_cols = BTreeMap::new();
        if let Some(p) = packed_int {
            (tensors, packed_cols) = packed_int_tensors(tensors, p, &shards)?;
        }
        // mlx-lm's nvfp4 with `global_scale=True`: a per-tensor scale no pack field carries.
        if let Some(name) = tensors.keys().find(|n| n.ends_with(".global_scale")) {
            return Err(LoadError::MlxQuantization {
                detail: format!(
                    "{name} is an nvfp4 per-tensor global scale (mlx-lm's conversion with \
                     global_scale=True), which a pack cannot carry; convert the float \
                     checkpoint, or an nvfp4 conversion without global scales"
                ),
            });
        }
        let index = experts::ExpertIndex::build(config.arch, tensors.keys().map(String::as_str));
        let ckpt = Checkpoint {
            origin: None,
            dropped_mtp,
            index,
            root: dir.to_path_buf(),
            raw_config,
            config,
            mlx_quantization,
            fp8_block,
            packed_int,
            packed_cols,
            shards,
            tensors,
        };
        ckpt.check_config_against_tensors()?;
        ckpt.check_experts()?;
        Ok(ckpt)
    }
}
