//! Download stage: `org/name[@revision]` -> a snapshot folder holding what conversion needs.
//!
//! In: a repo id and revision, the [`HubConfig`] of the [`Hub`]. Out: a [`Snapshot`].
//! Order: resolve the revision to a commit (`GET /api/models/{repo}/revision/{rev}`, or
//! `refs/` when offline) -> plan the files (`config.json`, tokenizer and generation files when
//! present, then `model.safetensors` or the index and every shard it lists) -> fetch what the
//! snapshot lacks (fetch.rs: etag by `HEAD`, resumable `GET`, checks, link).
//! Invariant: a snapshot entry exists only for a complete, checked blob. No request is made
//! when `HF_HUB_OFFLINE` is set, or when the revision is a commit hash whose snapshot already
//! holds every file; a file already in the snapshot is never requested again.

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde::Deserialize;

use super::cache::{is_commit_hash, RepoCache};
use super::error::{io_err, Access};
use super::fetch::Fetch;
use super::http::{encode, Body, Ctx, Follow, Method};
use super::{check_revision, Hub, HubError, RepoId};
use crate::convert::load::safetensors::ShardIndex;
use crate::progress::Progress;

const CONFIG: &str = "config.json";
const SINGLE_WEIGHTS: &str = "model.safetensors";
const INDEX: &str = "model.safetensors.index.json";
/// Files conversion reads when the repo has them (tokenizer, chat template, defaults).
pub const OPTIONAL_FILES: [&str; 4] = [
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
];
/// Largest JSON answer read (the revision listing of a repo with many files).
const JSON_LIMIT: u64 = 64 << 20;

/// A checkpoint folder in the cache, ready for `Checkpoint::open`.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// `{cache}/models--org--name/snapshots/<commit>`.
    pub dir: PathBuf,
    pub repo: String,
    /// The revision asked for (`main` by default).
    pub revision: String,
    /// The commit it resolved to: record it as the pack's provenance revision.
    pub commit: String,
    /// The files conversion uses, relative to `dir`, in download order.
    pub files: Vec<String>,
    /// Bytes received over the network by this call.
    pub downloaded_bytes: u64,
    /// Files that were already in the cache.
    pub reused_files: usize,
    /// No request was made: everything came from the cache.
    pub from_cache_only: bool,
}

#[derive(Deserialize)]
struct RepoInfo {
    sha: String,
    #[serde(default)]
    siblings: Vec<Sibling>,
}

#[derive(Deserialize)]
struct Sibling {
    rfilename: String,
}

/// A relative path inside a repo: no absolute path, no `..`, no empty segment; it names a
/// file under the snapshot folder and nothing outside it.
pub(super) fn safe_repo_path(p: &str) -> bool {
    !p.is_empty()
        && !p.starts_with('/')
        && !p.contains('\\')
        && p.split('/')
            .all(|s| !s.is_empty() && s != "." && s != ".." && !s.starts_with(".git"))
}

/// The shards `model.safetensors.index.json` lists, sorted and unique.
fn index_shards(text: &str) -> Result<Vec<String>, String> {
    let index = ShardIndex::parse(text).map_err(|e| format!("{INDEX}: {e}"))?;
    let shards = index.shards();
    if let Some(s) = shards.iter().find(|s| !safe_repo_path(s)) {
        return Err(format!(
            "{INDEX} names shard {s:?}, which is not a file in the repo"
        ));
    }
    if shards.is_empty() {
        return Err(format!("{INDEX} lists no shard"));
    }
    Ok(shards.into_iter().map(str::to_string).collect())
}

/// The files of a snapshot already in the cache, if it holds everything conversion needs;
/// else the missing ones.
fn cached_files(cache: &RepoCache, commit: &str) -> Result<Vec<String>, Vec<String>> {
    let mut files = vec![CONFIG.to_string()];
    let mut missing = Vec::new();
    if !cache.has_file(commit, CONFIG) {
        missing.push(CONFIG.to_string());
    }
    files.extend(
        OPTIONAL_FILES
            .iter()
            .filter(|f| cache.has_file(commit, f))
            .map(|f| f.to_string()),
    );
    if cache.has_file(commit, INDEX) {
        files.push(INDEX.to_string());
        let text = std::fs::read_to_string(cache.snapshot_dir(commit).join(INDEX));
        match text
            .map_err(|e| e.to_string())
            .and_then(|t| index_shards(&t))
        {
            Ok(shards) => {
                for s in shards {
                    if !cache.has_file(commit, &s) {
                        missing.push(s.clone());
                    }
                    files.push(s);
                }
            }
            Err(e) => missing.push(format!("a readable {INDEX} ({e})")),
        }
    } else if cache.has_file(commit, SINGLE_WEIGHTS) {
        files.push(SINGLE_WEIGHTS.to_string());
    } else {
        missing.push(format!("{SINGLE_WEIGHTS} or {INDEX}"));
    }
    if missing.is_empty() {
        Ok(files)
    } else {
        Err(missing)
    }
}

impl Hub {
    /// Downloads (or finds in the cache) what `flashpack convert` needs from `repo` at
    /// `revision` (default `main`). See the module doc for the order and the invariant.
    pub fn download_checkpoint(
        &self,
        repo: &str,
        revision: Option<&str>,
        progress: &dyn Progress,
    ) -> Result<Snapshot, HubError> {
        let repo = RepoId::parse(repo)?;
        let revision = revision.unwrap_or("main");
        check_revision(revision)?;
        let cache = RepoCache::new(&self.cfg.cache_dir, &repo);
        let from_cache = |commit: String, files: Vec<String>| Snapshot {
            dir: cache.snapshot_dir(&commit),
            repo: repo.to_string(),
            revision: revision.to_string(),
            reused_files: files.len(),
            commit,
            files,
            downloaded_bytes: 0,
            from_cache_only: true,
        };

        // 1. No request at all: offline, or a commit hash already complete in the cache.
        if self.cfg.offline || is_commit_hash(revision) {
            let cached = cache
                .read_ref(revision)
                .ok_or_else(|| vec![format!("refs/{revision}")])
                .and_then(|c| cached_files(&cache, &c).map(|f| (c, f)));
            match cached {
                Ok((commit, files)) => return Ok(from_cache(commit, files)),
                Err(missing) if self.cfg.offline => {
                    return Err(HubError::NotInCache {
                        repo: repo.to_string(),
                        revision: revision.to_string(),
                        cache: self.cfg.cache_dir.clone(),
                        missing,
                    })
                }
                Err(_) => {}
            }
        }

        // 2. Resolve the revision and list the repo's files.
        let info = match self.repo_info(&repo, revision) {
            Ok(info) => info,
            Err(e @ HubError::Transport { .. }) => {
                // The Hub is unreachable: a complete snapshot from an earlier download will do.
                let cached = cache
                    .read_ref(revision)
                    .and_then(|c| cached_files(&cache, &c).ok().map(|f| (c, f)));
                let Some((commit, files)) = cached else {
                    return Err(e);
                };
                progress.note(&format!(
                    "{e}; using the cached snapshot {commit} of {repo}@{revision}"
                ));
                return Ok(from_cache(commit, files));
            }
            Err(e) => return Err(e),
        };
        if !is_commit_hash(&info.sha) {
            return Err(HubError::BadResponse {
                url: self.revision_url(&repo, revision),
                detail: format!("sha {:?} is not a commit hash", info.sha),
            });
        }
        let commit = info.sha.clone();
        cache.write_ref(revision, &commit)?;
        let listed: BTreeSet<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
        let not_ckpt = |detail: String| HubError::NotACheckpoint {
            repo: repo.to_string(),
            revision: revision.to_string(),
            detail,
        };

        // 3. Plan: config, optional files, weights (the index first: it names the shards).
        if !listed.contains(CONFIG) {
            return Err(not_ckpt(format!("it has no {CONFIG}")));
        }
        let mut files = vec![CONFIG.to_string()];
        files.extend(
            OPTIONAL_FILES
                .iter()
                .filter(|f| listed.contains(*f))
                .map(|f| f.to_string()),
        );
        let mut fetch = Fetch::new(self, &repo, revision, &commit, &cache, progress);
        if listed.contains(INDEX) {
            fetch.all(&[INDEX.to_string()], "index")?;
            let text = std::fs::read_to_string(cache.snapshot_dir(&commit).join(INDEX))
                .map_err(io_err(cache.snapshot_dir(&commit).join(INDEX)))?;
            let shards = index_shards(&text).map_err(not_ckpt)?;
            if let Some(s) = shards.iter().find(|s| !listed.contains(s.as_str())) {
                return Err(not_ckpt(format!(
                    "{INDEX} lists shard {s}, which the repo does not have"
                )));
            }
            files.push(INDEX.to_string());
            files.extend(shards);
        } else if listed.contains(SINGLE_WEIGHTS) {
            files.push(SINGLE_WEIGHTS.to_string());
        } else {
            let other: Vec<&str> = listed
                .iter()
                .copied()
                .filter(|f| f.ends_with(".bin") || f.ends_with(".gguf") || f.ends_with(".pt"))
                .take(3)
                .collect();
            return Err(not_ckpt(format!(
                "it has neither {SINGLE_WEIGHTS} nor {INDEX} (weights found: {}); flashpack \
                 reads safetensors checkpoints",
                if other.is_empty() {
                    "none".to_string()
                } else {
                    other.join(", ")
                }
            )));
        }

        // 4. Fetch what is missing.
        let rest: Vec<String> = files.iter().filter(|f| *f != INDEX).cloned().collect();
        fetch.all(&rest, "files")?;
        let (downloaded_bytes, reused_files) = fetch.totals();
        Ok(Snapshot {
            dir: cache.snapshot_dir(&commit),
            repo: repo.to_string(),
            revision: revision.to_string(),
            commit,
            files,
            downloaded_bytes,
            reused_files,
            from_cache_only: false,
        })
    }

    fn revision_url(&self, repo: &RepoId, revision: &str) -> String {
        format!(
            "{}/api/models/{repo}/revision/{}",
            self.cfg.endpoint,
            encode(revision, false)
        )
    }

    /// `GET /api/models/{repo}/revision/{rev}`: the commit and the file list.
    fn repo_info(&self, repo: &RepoId, revision: &str) -> Result<RepoInfo, HubError> {
        let url = self.revision_url(repo, revision);
        let reply = self
            .client
            .send(Method::Get, &url, &[], Body::Empty, Follow::All)?;
        let ctx = Ctx {
            repo: &repo.to_string(),
            revision: Some(revision),
            file: None,
            access: Access::Read,
        };
        self.client.check(reply, &ctx)?.json(JSON_LIMIT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_paths_stay_inside_the_snapshot() {
        for ok in ["config.json", "sub/model-00001-of-00002.safetensors"] {
            assert!(safe_repo_path(ok), "{ok}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a//b",
            ".git/config",
            "a\\b",
        ] {
            assert!(!safe_repo_path(bad), "{bad}");
        }
    }

    #[test]
    fn index_shards_are_sorted_unique_and_checked() {
        let text = r#"{"weight_map": {"a": "m-2.safetensors", "b": "m-1.safetensors", "c": "m-2.safetensors"}}"#;
        assert_eq!(
            index_shards(text).unwrap(),
            vec!["m-1.safetensors", "m-2.safetensors"]
        );
        assert!(index_shards(r#"{"weight_map": {"a": "../x"}}"#).is_err());
        assert!(index_shards(r#"{"weight_map": {}}"#).is_err());
        assert!(index_shards(r#"{"metadata": {}}"#).is_err());
    }
}
