//! Download stage: `org/name[@revision]` -> a snapshot folder holding what conversion needs.
//!
//! In: a repo id and revision, the [`HubConfig`] of the [`Hub`]. Out: a [`Snapshot`].
//! Order: resolve the revision to a commit (`GET /api/models/{repo}/revision/{rev}`, or
//! `refs/` when offline) -> plan the files (`config.json`, tokenizer and generation files when
//! present, then `model.safetensors`, or `config.json` and the index first and every shard the
//! index lists except those holding only tensors conversion drops, multi-token-prediction layers
//! or a vision tower: [`ShardIndex::plan`] with [`TensorFilter`], the loader's own rule) -> fetch what the snapshot lacks (fetch.rs:
//! etag by `HEAD`, resumable `GET`, checks, link).
//! Invariant: a snapshot entry exists only for a complete, checked blob. No request is made
//! when `HF_HUB_OFFLINE` is set, or when the revision is a commit hash whose snapshot already
//! holds every file; a file already in the snapshot is never requested again.

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde::Deserialize;
use serde_json::Value;

use super::cache::{is_commit_hash, RepoCache};
use super::error::{io_err, Access};
use super::fetch::Fetch;
use super::http::{encode, Body, Ctx, Follow, Method};
use super::{check_revision, Hub, HubError, RepoId};
use crate::checkpoint::{ShardIndex, TensorFilter};
use crate::progress::Progress;

const CONFIG: &str = "config.json";
const SINGLE_WEIGHTS: &str = "model.safetensors";
const INDEX: &str = "model.safetensors.index.json";
/// Files conversion reads when the repo has them (tokenizer, chat template, defaults).
pub const OPTIONAL_FILES: [&str; 5] = [
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "chat_template.json",
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
    /// Shards the index lists that were left out: they hold only tensors conversion drops
    /// (multi-token-prediction layers, a vision tower).
    pub skipped_shards: Vec<String>,
    /// Bytes received over the network by this call.
    pub downloaded_bytes: u64,
    /// Files that were already in the cache.
    pub reused_files: usize,
    /// No request was made: everything came from the cache.
    pub from_cache_only: bool,
}

#[derive(Deserialize)]
pub(super) struct RepoInfo {
    pub(super) sha: String,
    #[serde(default)]
    pub(super) siblings: Vec<Sibling>,
}

#[derive(Deserialize)]
pub(super) struct Sibling {
    pub(super) rfilename: String,
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

/// The shards of `model.safetensors.index.json` that conversion reads, and those it skips.
#[derive(Debug, PartialEq, Eq)]
struct ShardsNeeded {
    /// Sorted and unique.
    needed: Vec<String>,
    /// Shards holding only tensors conversion drops, sorted.
    skipped: Vec<String>,
    /// What those shards hold, for the note: (MTP tensors, vision tensors).
    dropped: (usize, usize),
}

/// Plans the shards from the texts of `config.json` and the index: every shard the index
/// lists must be a path inside the repo; those holding only tensors conversion drops (of the
/// MTP layers that `config.json` declares, `num_nextn_predict_layers`, or of no text model, as
/// the architecture's sanitize rule names them: a vision tower) are skipped, by the loader's
/// own rule ([`ShardIndex::plan`], [`TensorFilter`]). Pure: the caller reads the files.
fn plan_shards(config: &str, index: &str) -> Result<ShardsNeeded, String> {
    let index = ShardIndex::parse(index).map_err(|e| format!("{INDEX}: {e}"))?;
    let shards = index.shards();
    if let Some(s) = shards.iter().find(|s| !safe_repo_path(s)) {
        return Err(format!(
            "{INDEX} names shard {s:?}, which is not a file in the repo"
        ));
    }
    if shards.is_empty() {
        return Err(format!("{INDEX} lists no shard"));
    }
    let config: Value =
        serde_json::from_str(config).map_err(|e| format!("{CONFIG} is not JSON: {e}"))?;
    let filter = TensorFilter::from_config(&config).map_err(|e| e.to_string())?;
    let plan = index.plan(&filter);
    let owned = |v: Vec<&str>| v.into_iter().map(str::to_string).collect();
    Ok(ShardsNeeded {
        needed: owned(plan.needed),
        skipped: owned(plan.skipped),
        dropped: (plan.skipped_mtp_tensors, plan.skipped_other_tensors),
    })
}

/// [`plan_shards`] on the snapshot's `config.json` and index.
fn plan_cached_shards(cache: &RepoCache, commit: &str) -> Result<ShardsNeeded, String> {
    let dir = cache.snapshot_dir(commit);
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).map_err(|e| format!("{f}: {e}"));
    plan_shards(&read(CONFIG)?, &read(INDEX)?)
}

/// The files of a snapshot already in the cache, if it holds everything conversion needs
/// (with the shards skipped), else the missing ones.
fn cached_files(
    cache: &RepoCache,
    commit: &str,
) -> Result<(Vec<String>, Vec<String>), Vec<String>> {
    let mut files = vec![CONFIG.to_string()];
    let mut skipped = Vec::new();
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
        // Without config.json the shards cannot be planned; it is already named as missing.
        if cache.has_file(commit, CONFIG) {
            match plan_cached_shards(cache, commit) {
                Ok(plan) => {
                    for s in plan.needed {
                        if !cache.has_file(commit, &s) {
                            missing.push(s.clone());
                        }
                        files.push(s);
                    }
                    skipped = plan.skipped;
                }
                Err(e) => missing.push(format!("a readable {INDEX} and {CONFIG} ({e})")),
            }
        }
    } else if cache.has_file(commit, SINGLE_WEIGHTS) {
        files.push(SINGLE_WEIGHTS.to_string());
    } else {
        missing.push(format!("{SINGLE_WEIGHTS} or {INDEX}"));
    }
    if missing.is_empty() {
        Ok((files, skipped))
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
        let from_cache =
            |commit: String, (files, skipped_shards): (Vec<String>, Vec<String>)| Snapshot {
                dir: cache.snapshot_dir(&commit),
                repo: repo.to_string(),
                revision: revision.to_string(),
                reused_files: files.len(),
                commit,
                files,
                skipped_shards,
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

        // 3. Plan: config, optional files, weights (config.json and the index first: they name
        // the shards and the layers conversion drops).
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
        let mut skipped_shards = Vec::new();
        // Fetched before the rest, to plan it.
        let mut planning: Vec<String> = Vec::new();
        if listed.contains(INDEX) {
            planning = vec![CONFIG.to_string(), INDEX.to_string()];
            fetch.all(&planning, "config and index")?;
            let dir = cache.snapshot_dir(&commit);
            let read = |f: &str| std::fs::read_to_string(dir.join(f)).map_err(io_err(dir.join(f)));
            let plan = plan_shards(&read(CONFIG)?, &read(INDEX)?).map_err(not_ckpt)?;
            if let Some(s) = plan.needed.iter().find(|s| !listed.contains(s.as_str())) {
                return Err(not_ckpt(format!(
                    "{INDEX} lists shard {s}, which the repo does not have"
                )));
            }
            if !plan.skipped.is_empty() {
                let (mtp, vision) = plan.dropped;
                let what = match (mtp > 0, vision > 0) {
                    (true, false) => "multi-token-prediction layers (num_nextn_predict_layers)",
                    (false, true) => "a vision tower",
                    _ => {
                        "multi-token-prediction layers (num_nextn_predict_layers) or a vision tower"
                    }
                };
                progress.note(&format!(
                    "not downloading {} shard(s) of {repo} that hold only {what}, which \
                     conversion drops: {}",
                    plan.skipped.len(),
                    plan.skipped.join(", ")
                ));
            }
            files.push(INDEX.to_string());
            files.extend(plan.needed);
            skipped_shards = plan.skipped;
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
        let rest: Vec<String> = files
            .iter()
            .filter(|f| !planning.contains(f))
            .cloned()
            .collect();
        fetch.all(&rest, "files")?;
        let (downloaded_bytes, reused_files) = fetch.totals();
        Ok(Snapshot {
            dir: cache.snapshot_dir(&commit),
            repo: repo.to_string(),
            revision: revision.to_string(),
            commit,
            files,
            skipped_shards,
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
    pub(super) fn repo_info(&self, repo: &RepoId, revision: &str) -> Result<RepoInfo, HubError> {
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
    fn shard_plans_are_sorted_unique_and_checked() {
        let cfg = r#"{"num_hidden_layers": 2}"#;
        let text = r#"{"weight_map": {"a": "m-2.safetensors", "b": "m-1.safetensors", "c": "m-2.safetensors"}}"#;
        assert_eq!(
            plan_shards(cfg, text).unwrap(),
            ShardsNeeded {
                needed: vec!["m-1.safetensors".into(), "m-2.safetensors".into()],
                skipped: vec![],
                dropped: (0, 0),
            }
        );
        assert!(plan_shards(cfg, r#"{"weight_map": {"a": "../x"}}"#).is_err());
        assert!(plan_shards(cfg, r#"{"weight_map": {}}"#).is_err());
        assert!(plan_shards(cfg, r#"{"metadata": {}}"#).is_err());
    }

    #[test]
    fn shards_of_mtp_layers_alone_are_skipped() {
        let index = r#"{"weight_map": {
            "model.layers.0.mlp.gate.weight": "m-1.safetensors",
            "model.layers.1.mlp.gate.weight": "m-2.safetensors",
            "model.layers.2.mlp.gate.weight": "m-2.safetensors",
            "model.layers.2.eh_proj.weight": "m-3.safetensors",
            "model.layers.2.enorm.weight": "m-3.safetensors"}}"#;
        let plan = |cfg: &str| plan_shards(cfg, index);
        let with_mtp = plan(r#"{"num_hidden_layers": 2, "num_nextn_predict_layers": 1}"#).unwrap();
        assert_eq!(with_mtp.needed, ["m-1.safetensors", "m-2.safetensors"]);
        assert_eq!(with_mtp.skipped, ["m-3.safetensors"]);
        for none in [
            r#"{"num_hidden_layers": 3}"#,
            r#"{"num_hidden_layers": 3, "num_nextn_predict_layers": null}"#,
            r#"{"num_hidden_layers": 2, "num_nextn_predict_layers": 0}"#,
        ] {
            assert!(plan(none).unwrap().skipped.is_empty(), "{none}");
        }
        let e = plan(r#"{"num_hidden_layers": 2, "num_nextn_predict_layers": "1"}"#).unwrap_err();
        assert!(e.contains("num_nextn_predict_layers"), "{e}");
        let e = plan(r#"{"num_nextn_predict_layers": 1}"#).unwrap_err();
        assert!(e.contains("num_hidden_layers"), "{e}");
        assert!(plan("not json").unwrap_err().contains(CONFIG));
    }

    #[test]
    fn shards_of_a_vision_tower_alone_are_skipped() {
        // Kimi K2.5: the text model under `language_model.`, its MTP layer counted in
        // text_config, the vision tower and projector beside it.
        let cfg = r#"{"model_type": "kimi_k25", "text_config": {"num_hidden_layers": 2,
            "num_nextn_predict_layers": 1}}"#;
        let index = r#"{"weight_map": {
            "language_model.model.embed_tokens.weight": "m-1.safetensors",
            "language_model.model.layers.1.mlp.gate.weight": "m-1.safetensors",
            "vision_tower.blocks.0.mlp.fc0.weight": "m-1.safetensors",
            "vision_tower.patch_embed.proj.weight": "m-2.safetensors",
            "mm_projector.proj.0.weight": "m-2.safetensors",
            "language_model.model.layers.2.eh_proj.weight": "m-3.safetensors",
            "language_model.model.layers.2.mlp.gate.weight": "m-4.safetensors",
            "mm_projector.proj.2.weight": "m-4.safetensors"}}"#;
        let plan = plan_shards(cfg, index).unwrap();
        assert_eq!(plan.needed, ["m-1.safetensors"]);
        assert_eq!(
            plan.skipped,
            ["m-2.safetensors", "m-3.safetensors", "m-4.safetensors"]
        );
        assert_eq!(plan.dropped, (2, 3));
        // An unknown model_type keeps every shard (convert then names the model_type).
        let plan = plan_shards(r#"{"model_type": "nope"}"#, index).unwrap();
        assert_eq!(plan.needed.len(), 4);
    }
}
