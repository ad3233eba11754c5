//! Load stage: a Hugging Face checkpoint folder, mapped and indexed, nothing copied.
//!
//! In: a [`SourceSpec`] (a local folder, or `org/model[@rev]` that a [`Resolver`] turns into a
//! folder) holding `config.json` and either `model.safetensors` or shards listed by
//! `model.safetensors.index.json`; weights in bf16/f16/f32, or MLX-quantized (U32 codes with
//! scales and biases, `quantization` in `config.json`).
//! Out: a [`Checkpoint`]: the normalized [`ModelConfig`], every tensor's dtype, shape and bytes
//! (borrowed from the mapped shards), each expert's projections whatever the layout
//! (per-expert, transformers 5.x fused, mlx-lm stacked), and the [`Provenance`] of the source.
//! The multi-token-prediction layers some checkpoints carry after their own
//! (`num_nextn_predict_layers`, [`safetensors::MtpLayers`]) are left out here, as mlx-lm leaves
//! them out: no later stage sees them, and a shard holding nothing else is not opened.
//! Invariant: every tensor range was checked against its file's length at open, and every
//! tensor the index names was found in its shard; later stages only slice checked ranges.

mod check;
pub mod derived;
mod experts;
pub mod safetensors;

pub use crate::arch::ExpertLayout;
pub use experts::{DenseTensor, TensorData};

use crate::arch::{ArchError, ModelConfig};
use crate::convert::quantize::{QuantError, QuantParams};
use crate::convert::tensor::Dtype;
use crate::mapped::Bytes;
pub use crate::quant_mode::MlxQuantization;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

pub use safetensors::TensorInfo;
// Where a checkpoint is: neutral ground shared with the Hub client (docs/architecture.md).
pub use crate::checkpoint::{LocalResolver, ResolveError, Resolver, SourceSpec};

/// What the loader left out of a checkpoint: its multi-token-prediction layers
/// ([`safetensors::MtpLayers`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DroppedMtp {
    /// The layers dropped (`num_hidden_layers ..`); empty when config.json names none.
    pub layers: std::ops::Range<usize>,
    /// Tensors of those layers left out: those in the shards read, and those the index lists
    /// for the shards skipped.
    pub tensors: usize,
    /// Shards the index lists only for such tensors: never opened, so they may be absent.
    pub skipped_shards: Vec<String>,
}

/// Errors of the load stage. Each names the file or tensor and the numbers involved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("config.json asks for what flashpack cannot run: {detail}; nothing was converted")]
    Unsupported { detail: String },
    #[error("{path} is not a folder; pass the folder that holds config.json and the safetensors")]
    NotAFolder { path: String },
    #[error(
        "{dir} has neither model.safetensors nor model.safetensors.index.json; \
         is it a Hugging Face checkpoint folder?"
    )]
    NoWeights { dir: String },
    #[error(
        "shard {shard} is listed by {index} for {tensors} tensor(s) but is missing; \
         download it again (every shard holding a tensor of the model's own layers is needed)"
    )]
    MissingShard {
        shard: String,
        index: String,
        tensors: usize,
    },
    #[error("{path} is truncated: {needed} bytes needed, file has {file_len}; download it again")]
    Truncated {
        path: String,
        needed: u64,
        file_len: u64,
    },
    #[error("{path}: bad safetensors header: {detail}")]
    BadHeader { path: String, detail: String },
    #[error(
        "{path}: tensor {tensor} spans bytes {begin}..{end} of a {data_len}-byte data section \
         (file truncated or corrupt; download it again)"
    )]
    TensorOutOfBounds {
        path: String,
        tensor: String,
        begin: u64,
        end: u64,
        data_len: u64,
    },
    #[error(
        "{path}: tensor {tensor} is {dtype} {shape:?} = {expected} bytes but its offsets \
         span {found}"
    )]
    SizeMismatch {
        path: String,
        tensor: String,
        dtype: Dtype,
        shape: Vec<usize>,
        expected: u64,
        found: u64,
    },
    #[error(
        "{path}: the header names tensor {tensor} twice; readers disagree on which entry counts \
         (the safetensors crate keeps the last, others the first), so the file is refused: \
         export it again"
    )]
    DuplicateName { path: String, tensor: String },
    #[error(
        "{path}: tensors {first} and {second} share bytes {begin}..{end} of the data section; \
         each tensor must have bytes of its own (the file is corrupt: download or export it again)"
    )]
    TensorsOverlap {
        path: String,
        first: String,
        second: String,
        begin: u64,
        end: u64,
    },
    #[error(
        "{path}: tensor {tensor} is {dtype}, a safetensors dtype flashpack does not read \
         (it reads BOOL, U8, I8, F8_E4M3, F8_E5M2, I16, U16, F16, BF16, I32, U32, F32, F64, I64, U64)"
    )]
    UnsupportedDtype {
        path: String,
        tensor: String,
        dtype: String,
    },
    #[error("{index} maps tensor {tensor} to {shard}, which does not contain it")]
    TensorNotInShard {
        tensor: String,
        shard: String,
        index: String,
    },
    #[error("tensor {tensor} appears in both {first} and {second}")]
    DuplicateTensor {
        tensor: String,
        first: String,
        second: String,
    },
    #[error("tensor {tensor} is missing{hint}")]
    MissingTensor { tensor: String, hint: String },
    #[error("tensor {tensor} has shape {found:?}; expected {expected:?} ({why})")]
    Shape {
        tensor: String,
        expected: Vec<usize>,
        found: Vec<usize>,
        why: String,
    },
    #[error("tensor {tensor} is {found}; expected {expected}")]
    Dtype {
        tensor: String,
        found: Dtype,
        expected: &'static str,
    },
    #[error("layer {layer}: {detail}")]
    Experts { layer: usize, detail: String },
    #[error("config.json quantization: {detail}")]
    MlxQuantization { detail: String },
    #[error(
        "config.json says {field} = {value}, but {tensors}; the config does not describe these \
         weights: use the config.json that came with them"
    )]
    ConfigContradictsTensors {
        field: &'static str,
        value: String,
        tensors: String,
    },
    #[error("{path} is a link that leads nowhere (a missing target or a loop): {source}; pass the checkpoint folder itself")]
    BrokenLink {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "there is no local folder {repo}, so it was taken for the Hugging Face Hub repository \
         {repo}{}, which could not be fetched (check the path, or the repository name and your \
         network): {source}",
        revision.as_ref().map(|r| format!("@{r}")).unwrap_or_default()
    )]
    NotLocalNorHub {
        repo: String,
        revision: Option<String>,
        #[source]
        source: Box<LoadError>,
    },
    #[error("cancelled")]
    Cancelled,
    #[error(transparent)]
    Arch(#[from] ArchError),
    #[error(transparent)]
    Quant(#[from] QuantError),
}

/// Bits, group size and mode of the quantized module `module` (its path without `.weight`) of
/// an mlx-lm source, checked as the loader needs them.
pub fn quant_params(q: &MlxQuantization, module: &str) -> Result<QuantParams, LoadError> {
    let (bits, gs, mode) = q.setting(module);
    QuantParams::with_mode(bits, gs, mode).map_err(|e| LoadError::MlxQuantization {
        detail: format!("module {module}: {e}"),
    })
}

/// The weight block size of an FP8 checkpoint: `quantization_config` with `quant_method`
/// `"fp8"`, `fmt` `"e4m3"` (the default) and `weight_block_size` (default 128 x 128). `None`
/// for any other checkpoint.
fn fp8_block_size(config: &Value) -> Result<Option<[usize; 2]>, LoadError> {
    let Some(q) = config.get("quantization_config") else {
        return Ok(None);
    };
    if q.get("quant_method").and_then(Value::as_str) != Some("fp8") {
        return Ok(None);
    }
    let bad = |detail: String| LoadError::MlxQuantization { detail };
    if let Some(fmt) = q.get("fmt").and_then(Value::as_str) {
        if fmt != "e4m3" {
            return Err(bad(format!(
                "FP8 format {fmt:?} is not supported (e4m3 is); convert from the bf16 checkpoint"
            )));
        }
    }
    match q.get("weight_block_size") {
        None | Some(Value::Null) => Ok(Some([128, 128])),
        Some(v) => {
            let dims: Option<Vec<usize>> = v.as_array().map(|a| {
                a.iter()
                    .filter_map(|d| d.as_u64().map(|d| d as usize))
                    .filter(|&d| d > 0)
                    .collect()
            });
            match dims.as_deref() {
                Some(&[r, c]) => Ok(Some([r, c])),
                _ => Err(bad(format!(
                    "FP8 weight_block_size {v} is not two positive integers"
                ))),
            }
        }
    }
}

/// One source file and its fingerprint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceFile {
    /// Path relative to the checkpoint folder.
    pub name: String,
    pub size: u64,
    /// blake3 of the whole file, hex.
    pub blake3: String,
}

/// Where a pack came from: stored in its metadata so a pack can be traced to its source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provenance {
    pub source: String,
    /// The commit a Hub source resolved to.
    pub revision: Option<String>,
    pub files: Vec<SourceFile>,
}

/// blake3 of one file (mapped when `mapped` is given, else read), released from the resident
/// set chunk by chunk so hashing a model bigger than memory does not make the process as big.
fn hash_file(
    name: &str,
    path: &Path,
    mapped: Option<&Bytes>,
    cancel: &AtomicBool,
) -> Result<SourceFile, LoadError> {
    let owned;
    let bytes: &[u8] = match mapped {
        Some(b) => b,
        None => {
            owned = std::fs::read(path).map_err(io_err(path))?;
            &owned
        }
    };
    let mut h = blake3::Hasher::new();
    const CHUNK: usize = 8 << 20;
    for (i, c) in bytes.chunks(CHUNK).enumerate() {
        if cancel.load(Ordering::Relaxed) {
            return Err(LoadError::Cancelled);
        }
        h.update(c);
        if let Some(b) = mapped {
            b.release(i * CHUNK, c.len());
        }
    }
    Ok(SourceFile {
        name: name.to_string(),
        size: bytes.len() as u64,
        blake3: h.finalize().to_hex().to_string(),
    })
}

/// A mapped safetensors shard.
struct Shard {
    name: String,
    path: PathBuf,
    bytes: Bytes,
}

/// Where a tensor lives.
#[derive(Clone, Debug)]
struct Entry {
    shard: usize,
    info: TensorInfo,
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

/// An opened checkpoint: config, index of tensors, mapped shards.
pub struct Checkpoint {
    root: PathBuf,
    /// `config.json` as written.
    pub raw_config: Value,
    pub config: ModelConfig,
    /// MLX quantization of the source, if it is an mlx-lm quantized folder.
    pub mlx_quantization: Option<MlxQuantization>,
    /// Block size (rows, columns) of an FP8 checkpoint's weight scales
    /// (`quantization_config.quant_method = "fp8"`, as DeepSeek-V3 and Qwen3 FP8 ship).
    pub fp8_block: Option<[usize; 2]>,
    shards: Vec<Shard>,
    tensors: BTreeMap<String, Entry>,
    index: experts::ExpertIndex,
    /// The Hub repository and commit this folder is a snapshot of, when it came from the Hub.
    origin: Option<(String, Option<String>)>,
    dropped_mtp: DroppedMtp,
}

/// A borrowed tensor.
#[derive(Clone, Copy, Debug)]
pub struct TensorRef<'a> {
    pub name: &'a str,
    pub dtype: Dtype,
    pub shape: &'a [usize],
    pub data: &'a [u8],
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> LoadError + '_ {
    move |source| LoadError::Io {
        path: path.display().to_string(),
        source,
    }
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
        let fp8_block = fp8_block_size(&raw_config)?;
        let mtp = safetensors::MtpLayers::from_config(&raw_config)?;
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
            let plan = index.plan(&mtp);
            dropped_mtp.tensors = plan.skipped_tensors;
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
        tensors.retain(|name, _| !mtp.holds(name));
        dropped_mtp.tensors += before - tensors.len();
        let tensors = text_model_tensors(config.arch, tensors, &shards)?;
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
            shards,
            tensors,
        };
        ckpt.check_config_against_tensors()?;
        ckpt.check_experts()?;
        Ok(ckpt)
    }

    /// The checkpoint folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The multi-token-prediction layers left out at open, and what of them.
    pub fn dropped_mtp(&self) -> &DroppedMtp {
        &self.dropped_mtp
    }

    /// Tensor names, sorted.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Number of tensors.
    pub fn tensor_count(&self) -> usize {
        self.tensors.len()
    }

    /// The tensor called `name`, if present.
    pub fn get(&self, name: &str) -> Option<TensorRef<'_>> {
        let e = self.tensors.get(name)?;
        Some(TensorRef {
            name: &e.info.name,
            dtype: e.info.dtype,
            shape: &e.info.shape,
            data: &self.shards[e.shard].bytes[e.info.range.clone()],
        })
    }

    /// The tensor called `name`, or an error naming it.
    pub fn tensor(&self, name: &str) -> Result<TensorRef<'_>, LoadError> {
        self.get(name).ok_or_else(|| LoadError::MissingTensor {
            tensor: name.to_string(),
            hint: String::new(),
        })
    }

    /// Drops the pages behind `bytes` (a slice of a tensor of this checkpoint) from this
    /// process's resident set; they stay in the page cache. A slice that is not from a shard
    /// is ignored.
    pub fn release(&self, bytes: &[u8]) {
        let p = bytes.as_ptr() as usize;
        for s in &self.shards {
            let base = s.bytes.as_ptr() as usize;
            if p >= base && p + bytes.len() <= base + s.bytes.len() {
                s.bytes.release(p - base, bytes.len());
                return;
            }
        }
    }

    /// Bytes of all weight files (the "source size" of a conversion).
    pub fn weight_bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.bytes.len() as u64).sum()
    }

    /// Hashes `config.json`, the index (if any) and every shard with blake3, files in parallel.
    pub fn provenance(&self) -> Result<Provenance, LoadError> {
        let never = AtomicBool::new(false);
        let files = self
            .hash_jobs()
            .par_iter()
            .map(|(name, path, mapped)| hash_file(name, path, *mapped, &never))
            .collect::<Result<Vec<_>, LoadError>>()?;
        Ok(self.provenance_of(files))
    }

    /// [`Checkpoint::provenance`] on the calling thread, one file after another, so it can run
    /// beside the conversion (which has the rayon pool) and overlap its reads with that work.
    /// Stops with [`LoadError::Cancelled`] soon after `cancel` is set.
    pub fn provenance_in_order(&self, cancel: &AtomicBool) -> Result<Provenance, LoadError> {
        let files = self
            .hash_jobs()
            .iter()
            .map(|(name, path, mapped)| hash_file(name, path, *mapped, cancel))
            .collect::<Result<Vec<_>, LoadError>>()?;
        Ok(self.provenance_of(files))
    }

    /// The record for `files`: the Hub repository and commit when the source came from the Hub,
    /// else the folder.
    fn provenance_of(&self, files: Vec<SourceFile>) -> Provenance {
        Provenance {
            source: self
                .origin
                .as_ref()
                .map_or_else(|| self.root.display().to_string(), |(repo, _)| repo.clone()),
            revision: self.origin.as_ref().and_then(|(_, c)| c.clone()),
            files,
        }
    }

    /// Every file of the source folder that a conversion reads: the fingerprinted ones, and the
    /// tokenizer and generation files that go into the metadata; also the shards of MTP layers
    /// it skips, which are the source's files all the same (no pack may be written over them).
    pub fn input_files(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = self.hash_jobs().into_iter().map(|(_, p, _)| p).collect();
        files.extend(
            self.dropped_mtp
                .skipped_shards
                .iter()
                .map(|s| self.root.join(s)),
        );
        for name in [
            "tokenizer.json",
            "tokenizer_config.json",
            "generation_config.json",
            "chat_template.jinja",
        ] {
            files.push(self.root.join(name));
        }
        files
    }

    /// Files to fingerprint: `config.json`, the index (if any), every shard.
    fn hash_jobs(&self) -> Vec<(String, PathBuf, Option<&Bytes>)> {
        let mut names: Vec<String> = vec!["config.json".into()];
        if self.root.join("model.safetensors.index.json").is_file() {
            names.push("model.safetensors.index.json".into());
        }
        let mut jobs: Vec<(String, PathBuf, Option<&Bytes>)> = names
            .into_iter()
            .map(|n| (n.clone(), self.root.join(n), None))
            .collect();
        jobs.extend(
            self.shards
                .iter()
                .map(|s| (s.name.clone(), s.path.clone(), Some(&s.bytes))),
        );
        jobs
    }
}

#[cfg(test)]
mod mtp_tests;
#[cfg(test)]
mod tests;
