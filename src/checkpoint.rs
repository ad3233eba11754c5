//! A Hugging Face checkpoint as files: where it is ([`SourceSpec`], turned into a folder by a
//! [`Resolver`]) and which of its shards hold the model ([`ShardIndex`], [`MtpLayers`]).
//!
//! In: what the user named, `config.json` and `model.safetensors.index.json` texts. Out: a
//! folder, and the shards a conversion reads. Invariant: one rule decides which shards are
//! read, for the loader (`convert::load`) and the Hub download (`hub`) alike; this module
//! imports neither (docs/architecture.md, "Who may import whom"), so they do not import each
//! other.

use crate::arch::ArchError;
use serde::Deserialize;
use serde_json::Value;
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
    /// it belongs to a layer of `mtp`; a shard holding any other tensor is needed (its MTP
    /// tensors, if any, are dropped as the shard is indexed). Pure: no file is opened.
    pub fn plan(&self, mtp: &MtpLayers) -> ShardPlan<'_> {
        let mut needed = BTreeSet::new();
        let mut mtp_tensors: BTreeMap<&str, usize> = BTreeMap::new();
        for (tensor, shard) in &self.weight_map {
            if mtp.holds(tensor) {
                *mtp_tensors.entry(shard.as_str()).or_default() += 1;
            } else {
                needed.insert(shard.as_str());
            }
        }
        let mut skipped_tensors = 0;
        let skipped = mtp_tensors
            .into_iter()
            .filter(|(shard, _)| !needed.contains(shard))
            .map(|(shard, n)| {
                skipped_tensors += n;
                shard
            })
            .collect();
        ShardPlan {
            needed: needed.into_iter().collect(),
            skipped,
            skipped_tensors,
        }
    }
}

/// The shards of an index a conversion reads, and those it leaves alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardPlan<'a> {
    /// Shards holding at least one tensor outside the MTP layers, sorted.
    pub needed: Vec<&'a str>,
    /// Shards holding only MTP tensors, sorted: never opened, never downloaded.
    pub skipped: Vec<&'a str>,
    /// Tensors the index maps to the skipped shards.
    pub skipped_tensors: usize,
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
    /// `num_hidden_layers` from a raw `config.json`, whatever its architecture.
    pub fn from_config(config: &Value) -> Result<MtpLayers, ArchError> {
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
