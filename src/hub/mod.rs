//! Hugging Face Hub: download what a conversion needs into the standard cache, and publish a
//! pack with a generated model card.
//!
//! In: a repo id `org/name` and a revision (download), or a `.flashpack` file (publish), and a
//! [`HubConfig`] read from the environment like huggingface_hub does (`HF_ENDPOINT`,
//! `HF_TOKEN`, `HF_HOME`, `HF_HUB_CACHE`, `HF_HUB_OFFLINE`).
//! Out: a [`Snapshot`] folder in the huggingface_hub cache layout, or a [`Published`] commit.
//! Invariant: a file appears in a snapshot folder only once it is complete and checked (size,
//! and sha256 for LFS files); partial downloads live as `blobs/<etag>.incomplete` and resume
//! with HTTP `Range`. The endpoints and the exact API behaviour followed are in docs/hub.md.
//!
//! Pipelines: download: resolve revision -> plan files (download.rs) -> fetch blobs -> link
//! snapshot (fetch.rs, cache.rs); publish: card -> hash -> create repo -> LFS transfer -> commit
//! (card.rs, upload.rs); ranges of files without a download (ranges.rs, for `flashpack plan`);
//! a pack for `flashpack run org/name`: whole, or a pipeline rank's ranges into a sparse copy
//! (pack.rs, sparse.rs).
//! http.rs is the one place that speaks HTTP.

mod cache;
mod card;
mod download;
mod error;
mod fetch;
mod http;
mod pack;
mod ranges;
pub mod sparse;
mod upload;

use std::path::PathBuf;

use crate::progress::Progress;

pub use card::{base_model_of, model_card};
pub use download::{Snapshot, OPTIONAL_FILES};
pub use error::HubError;
pub use pack::{Fetched, PackAt, PackRef, RemotePack};
pub use ranges::RemoteFiles;
pub use upload::{PublishOptions, Published};

/// The public Hub; `HF_ENDPOINT` overrides it.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Where and how to talk to the Hub, and where the cache lives.
#[derive(Clone)]
pub struct HubConfig {
    /// Base URL without a trailing slash (`https://huggingface.co`).
    pub endpoint: String,
    /// Bearer token, sent only to `endpoint`'s origin, never to the CDN it redirects to.
    pub token: Option<String>,
    /// The hub cache folder holding `models--org--name/` (`$HF_HUB_CACHE`, `$HF_HOME/hub`).
    pub cache_dir: PathBuf,
    /// `HF_HUB_OFFLINE`: make no request; use the cache alone.
    pub offline: bool,
}

impl std::fmt::Debug for HubConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubConfig")
            .field("endpoint", &self.endpoint)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("cache_dir", &self.cache_dir)
            .field("offline", &self.offline)
            .finish()
    }
}

impl HubConfig {
    /// Reads the process environment (see [`HubConfig::from_vars`]).
    pub fn from_env() -> HubConfig {
        HubConfig::from_vars(|k| std::env::var(k).ok())
    }

    /// Builds the configuration from variables looked up with `var`, with huggingface_hub's
    /// precedence: `HF_HUB_CACHE` over `HF_HOME/hub`; `HF_HOME` defaults to
    /// `$XDG_CACHE_HOME/huggingface` then `~/.cache/huggingface`; the token is `HF_TOKEN`
    /// (then the legacy `HUGGING_FACE_HUB_TOKEN`), else the file `HF_TOKEN_PATH` or
    /// `$HF_HOME/token`.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> HubConfig {
        let set = |k: &str| var(k).filter(|v| !v.trim().is_empty());
        let endpoint = set("HF_ENDPOINT")
            .map(|e| e.trim().trim_end_matches('/').to_string())
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        let hf_home = set("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            set("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| set("HOME").map(|h| PathBuf::from(h).join(".cache")))
                .unwrap_or_else(|| PathBuf::from(".cache"))
                .join("huggingface")
        });
        let cache_dir = set("HF_HUB_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("hub"));
        let token = set("HF_TOKEN")
            .or_else(|| set("HUGGING_FACE_HUB_TOKEN"))
            .or_else(|| {
                let path = set("HF_TOKEN_PATH")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| hf_home.join("token"));
                std::fs::read_to_string(path).ok()
            })
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty());
        let offline = set("HF_HUB_OFFLINE").is_some_and(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "on" | "yes" | "true"
            )
        });
        HubConfig {
            endpoint,
            token,
            cache_dir,
            offline,
        }
    }
}

/// A model repo id, `org/name`, checked so it can name a cache folder safely.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepoId {
    org: String,
    name: String,
}

impl RepoId {
    /// Accepts `org/name` where both parts use letters, digits, `-`, `_`, `.`, do not start
    /// or end with `-` or `.`, hold no `--` or `..` (the cache folder uses `--` as its
    /// separator), and have at most 96 characters: the Hub's own rules.
    pub fn parse(s: &str) -> Result<RepoId, HubError> {
        let bad = || HubError::BadRepoId {
            given: s.to_string(),
        };
        let (org, name) = s.split_once('/').ok_or_else(bad)?;
        let ok = |p: &str| {
            !p.is_empty()
                && p.len() <= 96
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                && !p.starts_with(['-', '.'])
                && !p.ends_with(['-', '.'])
                && !p.contains("--")
                && !p.contains("..")
        };
        if !ok(org) || !ok(name) {
            return Err(bad());
        }
        Ok(RepoId {
            org: org.to_string(),
            name: name.to_string(),
        })
    }

    pub fn org(&self) -> &str {
        &self.org
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `models--org--name`, the repo's folder in the hub cache.
    pub fn cache_folder(&self) -> String {
        format!("models--{}--{}", self.org, self.name)
    }
}

impl std::fmt::Display for RepoId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.org, self.name)
    }
}

/// A revision usable in a URL and as a `refs/` file name: a branch, tag or commit hash.
pub(crate) fn check_revision(rev: &str) -> Result<(), HubError> {
    let bad = rev.is_empty()
        || rev.len() > 255
        || rev.starts_with('/')
        || rev.ends_with('/')
        || rev.contains("..")
        || rev.contains("//")
        || rev.chars().any(|c| c.is_control() || c == '\\');
    if bad {
        return Err(HubError::BadRevision {
            given: rev.to_string(),
        });
    }
    Ok(())
}

/// A client of one Hub endpoint with one cache.
pub struct Hub {
    cfg: HubConfig,
    client: http::Client,
}

impl Hub {
    pub fn new(cfg: HubConfig) -> Hub {
        let client = http::Client::new(&cfg);
        Hub { cfg, client }
    }

    /// A client configured from the environment.
    pub fn from_env() -> Hub {
        Hub::new(HubConfig::from_env())
    }

    pub fn config(&self) -> &HubConfig {
        &self.cfg
    }
}

/// Downloads (or finds in the cache) what `flashpack convert` needs from `repo` at `revision`
/// (default `main`) and returns the snapshot folder, configured from the environment. This is
/// the resolver the convert loader calls for `org/model[@rev]`.
pub fn download_checkpoint(
    repo: &str,
    revision: Option<&str>,
    progress: &dyn Progress,
) -> Result<Snapshot, HubError> {
    Hub::from_env().download_checkpoint(repo, revision, progress)
}

/// Resolves `org/model[@rev]` sources of `flashpack convert` by downloading (or reusing from the
/// Hugging Face cache) the files conversion needs; local folders pass through.
pub struct HubResolver<'a> {
    pub progress: &'a dyn Progress,
}

impl crate::checkpoint::Resolver for HubResolver<'_> {
    fn resolve(
        &self,
        spec: &crate::checkpoint::SourceSpec,
    ) -> Result<std::path::PathBuf, crate::checkpoint::ResolveError> {
        use crate::checkpoint::{ResolveError, SourceSpec};
        match spec {
            SourceSpec::Local(p) => Ok(p.clone()),
            SourceSpec::Hub { repo, revision } => {
                download_checkpoint(repo, revision.as_deref(), self.progress)
                    .map(|snap| snap.dir)
                    .map_err(|e| ResolveError::Fetch(Box::new(e)))
            }
        }
    }
}
