//! A Hugging Face checkpoint as files: where it is ([`SourceSpec`], turned into a folder by a
//! [`Resolver`]) and which of its shards hold the model ([`ShardIndex`], [`TensorFilter`]: not
//! the multi-token-prediction layers, [`MtpLayers`], nor a vision tower).
//!
//! In: what the user named, `config.json` and `model.safetensors.index.json` texts. Out: a
//! folder, and the shards a conversion reads. Invariant: one rule decides which shards are
//! read, for the loader (`convert::load`) and the Hub download (`hub`) alike; this module
//! imports neither (docs/architecture.md, "Who may import whom"), so they do not import each
//! other.

use crate::arch::{Arch, ArchError};
use serde::Deserialize;
use serde_json::Value;
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::path::{Path, PathBuf};

/// What the user named as the source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceSpec {
    /// A folder on disk.
    Local(PathBuf),
    /// A Hugging Face Hub repository, optionally at a revision (`org/model@rev`).
    Hub {
        repo: String,
        revision: Option<String>,
    },
}

impl SourceSpec {
    /// An existing path is local; otherwise `org/name[@rev]` is a Hub repository; anything else
    /// is taken as a (missing) local path so the error names it.
    ///
    /// A name that exists on disk in any form, a link that leads nowhere or a link loop
    /// included, is local: opening it then says what is wrong with it, instead of the name
    /// being tried on the Hub.
    pub fn parse(s: &str) -> SourceSpec {
        let path = Path::new(s);
        if std::fs::symlink_metadata(path).is_ok() {
            return SourceSpec::Local(path.to_path_buf());
        }
        let (repo, revision) = match s.split_once('@') {
            Some((r, rev)) => (r, Some(rev.to_string())),
            None => (s, None),
        };
        let parts: Vec<&str> = repo.split('/').collect();
        let is_repo = parts.len() == 2
            && parts.iter().all(|p| {
                !p.is_empty()
                    && p.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                    && !p.starts_with('.')
            });
        if is_repo {
            SourceSpec::Hub {
                repo: repo.to_string(),
                revision,
            }
        } else {
            SourceSpec::Local(path.to_path_buf())
        }
    }
}

/// Turns a [`SourceSpec`] into a local folder: [`LocalResolver`] here, the Hub download
/// (`hub::HubResolver`) above; the loader only ever sees folders.
pub trait Resolver {
    fn resolve(&self, spec: &SourceSpec) -> Result<PathBuf, ResolveError>;
}

/// Why a [`SourceSpec`] gave no folder.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ResolveError {
    #[error(
        "{repo}{} is not a local folder and no Hub download is available in this build; \
         download it (`huggingface-cli download {repo} --local-dir DIR`) and pass DIR",
        revision.as_ref().map(|r| format!("@{r}")).unwrap_or_default()
    )]
    HubUnavailable {
        repo: String,
        revision: Option<String>,
    },
    /// The resolver's own error: the Hub client's `HubError` when a download failed (boxed, so
    /// that this module does not depend on the client).
    #[error(transparent)]
    Fetch(Box<dyn std::error::Error + Send + Sync>),
}

/// Resolves local folders, and Hub repositories only when a snapshot is already in the
/// Hugging Face cache.
pub struct LocalResolver {
    /// The hub cache folder (`models--org--name/snapshots/<commit>/`), if any.
    pub hub_cache: Option<PathBuf>,
}

impl Resolver for LocalResolver {
    fn resolve(&self, spec: &SourceSpec) -> Result<PathBuf, ResolveError> {
        match spec {
            SourceSpec::Local(p) => Ok(p.clone()),
            SourceSpec::Hub { repo, revision } => self
                .hub_cache
                .as_deref()
                .and_then(|c| hub_cache_snapshot(c, repo, revision.as_deref()))
                .ok_or_else(|| ResolveError::HubUnavailable {
                    repo: repo.clone(),
                    revision: revision.clone(),
                }),
        }
    }
}

fn hub_cache_snapshot(cache: &Path, repo: &str, revision: Option<&str>) -> Option<PathBuf> {
    let dir = cache.join(format!("models--{}", repo.replace('/', "--")));
    let rev = revision.unwrap_or("main");
    if rev.is_empty() || rev.contains("..") || rev.starts_with('/') {
        return None;
    }
    // refs/<branch> holds the commit hash; a full hash may also be given directly.
    let commit = std::fs::read_to_string(dir.join("refs").join(rev))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| rev.to_string());
    let snap = dir.join("snapshots").join(commit);
    snap.join("config.json").is_file().then_some(snap)
}

/// `model.safetensors.index.json`: which shard holds each tensor (the `metadata` part is not
/// read). A transformers convention, not part of the safetensors format, so the crate has no
/// type for it; this one is shared by the loader and the Hub download.
#[derive(Debug, Deserialize)]
pub struct ShardIndex {
    /// Tensor name -> shard file name, relative to the index's folder.
    pub weight_map: BTreeMap<String, String>,
}

impl ShardIndex {
    /// Parses the index text; the error is serde's message (the caller names the file).
    pub fn parse(text: &str) -> Result<ShardIndex, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// The shard file names, sorted and unique.
    pub fn shards(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.weight_map.values().map(String::as_str).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Which shards a conversion reads: a shard is skipped when every tensor the index maps to
    /// it is one that `filter` drops (a multi-token-prediction layer, a vision tower); a shard
    /// holding any other tensor is needed (what it holds of the dropped ones is dropped as the
    /// shard is indexed). Pure: no file is opened.
    pub fn plan(&self, filter: &TensorFilter) -> ShardPlan<'_> {
        let mut needed = BTreeSet::new();
        // shard -> (MTP tensors, other dropped tensors)
        let mut dropped: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
        for (tensor, shard) in &self.weight_map {
            match filter.drops(tensor) {
                None => {
                    needed.insert(shard.as_str());
                }
                Some(why) => {
                    let n = dropped.entry(shard.as_str()).or_default();
                    match why {
                        Dropped::Mtp => n.0 += 1,
                        Dropped::NotText => n.1 += 1,
                    }
                }
            }
        }
        let (mut skipped_mtp_tensors, mut skipped_other_tensors) = (0, 0);
        let skipped = dropped
            .into_iter()
            .filter(|(shard, _)| !needed.contains(shard))
            .map(|(shard, (mtp, other))| {
                skipped_mtp_tensors += mtp;
                skipped_other_tensors += other;
                shard
            })
            .collect();
        ShardPlan {
            needed: needed.into_iter().collect(),
            skipped,
            skipped_mtp_tensors,
            skipped_other_tensors,
        }
    }
}

/// The shards of an index a conversion reads, and those it leaves alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardPlan<'a> {
    /// Shards holding at least one tensor the conversion keeps, sorted.
    pub needed: Vec<&'a str>,
    /// Shards holding only tensors it drops, sorted: never opened, never downloaded.
    pub skipped: Vec<&'a str>,
    /// Tensors of MTP layers the index maps to the skipped shards.
    pub skipped_mtp_tensors: usize,
    /// Other dropped tensors (a vision tower) the index maps to the skipped shards.
    pub skipped_other_tensors: usize,
}

/// Why a conversion leaves a source tensor out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dropped {
    /// A tensor of a multi-token-prediction layer ([`MtpLayers`]).
    Mtp,
    /// A tensor of no text model: the vision tower or projector of a multimodal checkpoint,
    /// which the architecture's sanitize rule leaves out (`Arch::text_model_name`).
    NotText,
}

/// Which tensors of a checkpoint a conversion keeps, by name alone: the architecture's rename
/// first (a multimodal checkpoint's vision modules have no name in the text model), then the
/// MTP layers among the renamed names (Kimi K2.5's `language_model.model.layers.{N}.*` is layer
/// N). The one rule the loader and the Hub download apply.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TensorFilter {
    pub mtp: MtpLayers,
    /// `None` (a `model_type` flashpack does not know): every name is its own; the loader
    /// refuses such a checkpoint anyway, naming its `model_type`.
    pub arch: Option<Arch>,
}

impl TensorFilter {
    /// From a raw `config.json`: the architecture by `model_type`, the MTP layers as
    /// [`MtpLayers::from_config`] reads them.
    pub fn from_config(config: &Value) -> Result<TensorFilter, ArchError> {
        let arch = config
            .get("model_type")
            .and_then(Value::as_str)
            .and_then(|t| Arch::from_model_type(t).ok());
        Ok(TensorFilter {
            mtp: MtpLayers::from_config(config)?,
            arch,
        })
    }

    /// The name a pack gives `tensor` (`None`: no part of the text model).
    pub fn text_name<'a>(&self, tensor: &'a str) -> Option<Cow<'a, str>> {
        match self.arch {
            Some(a) => a.text_model_name(tensor),
            None => Some(Cow::Borrowed(tensor)),
        }
    }

    /// Why `tensor` (a source name) is left out, or `None` when it is kept.
    pub fn drops(&self, tensor: &str) -> Option<Dropped> {
        match self.text_name(tensor) {
            None => Some(Dropped::NotText),
            Some(n) if self.mtp.holds(&n) => Some(Dropped::Mtp),
            Some(_) => None,
        }
    }
}

/// The multi-token-prediction (MTP) layers of a checkpoint: DeepSeek-V3, Kimi-K2 and GLM-4.5
/// ship `num_nextn_predict_layers` extra decoder layers after their `num_hidden_layers` own,
/// as `model.layers.{num_hidden_layers..}.*`, for speculative decoding that flashpack does
/// not run. mlx-lm drops them when it loads such a model (`sanitize` removes
/// `model.layers.{num_hidden_layers}.*`); so does the loader, and the Hub download does not
/// fetch a shard that holds nothing else.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MtpLayers {
    /// The layer indices dropped: `num_hidden_layers .. num_hidden_layers +
    /// num_nextn_predict_layers` (empty for a model without MTP layers).
    pub layers: Range<usize>,
}

impl MtpLayers {
    /// Reads `num_nextn_predict_layers` (absent or null: none) and, when it is above 0,
    /// `num_hidden_layers` from a raw `config.json`, whatever its architecture; from its
    /// `text_config` when the top level has no `num_nextn_predict_layers` (Kimi K2.5's and
    /// Qwen3.5's multimodal configs keep the text model's fields there).
    pub fn from_config(config: &Value) -> Result<MtpLayers, ArchError> {
        let config = match config.get("text_config") {
            Some(t @ Value::Object(_)) if config.get("num_nextn_predict_layers").is_none() => t,
            _ => config,
        };
        let count = |field: &'static str| -> Result<Option<usize>, ArchError> {
            match config.get(field) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x
                    .as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .map(Some)
                    .ok_or_else(|| ArchError::BadField {
                        field,
                        found: x.to_string(),
                        expected: "a non-negative integer",
                    }),
            }
        };
        let nextn = count("num_nextn_predict_layers")?.unwrap_or(0);
        if nextn == 0 {
            return Ok(MtpLayers::default());
        }
        let first = count("num_hidden_layers")?.ok_or_else(|| ArchError::Inconsistent {
            what: format!(
                "num_nextn_predict_layers is {nextn} but num_hidden_layers is missing, so the \
                 multi-token-prediction layers cannot be told from the model's own; add \
                 num_hidden_layers"
            ),
        })?;
        let end = first
            .checked_add(nextn)
            .ok_or_else(|| ArchError::Inconsistent {
                what: format!(
                    "num_hidden_layers {first} + num_nextn_predict_layers {nextn} overflows"
                ),
            })?;
        Ok(MtpLayers { layers: first..end })
    }

    /// Whether `tensor` belongs to one of these layers (`model.layers.{L}.*`, L in range), or
    /// to a multi-token-prediction module named apart: Qwen3-Next's and Qwen3.5's `mtp.*`
    /// (mlx-lm qwen3_next.py / qwen3_5.py `sanitize`: keep keys where `"mtp." not in key`), which
    /// their configs count as `num_nextn_predict_layers` or `mtp_num_hidden_layers`.
    pub fn holds(&self, tensor: &str) -> bool {
        layer_of(tensor).is_some_and(|l| self.layers.contains(&l))
            || tensor.starts_with("mtp.")
            || tensor.contains(".mtp.")
    }

    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }
}

/// `model.layers.{L}.` -> L.
pub fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("model.layers.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}
