//! Download stage: `org/name[@revision]` -> a snapshot folder holding what conversion needs.
//!
//! In: a repo id and revision, the [`HubConfig`] of the [`Hub`]. Out: a [`Snapshot`].
//! Order: resolve the revision to a commit (`GET /api/models/{repo}/revision/{rev}`, or
//! `refs/` when offline) -> plan the files (`config.json`, tokenizer and generation files when
//! present, then `model.safetensors` or the index and every shard it lists) -> read each
//! missing file's etag and size (`HEAD /{repo}/resolve/{commit}/{file}`) -> fetch the blob,
//! resuming `blobs/<etag>.incomplete` with `Range`, checking size and (LFS) sha256 -> link it
//! into `snapshots/<commit>/`.
//! Invariant: a snapshot entry exists only for a complete, checked blob. No request is made
//! when `HF_HUB_OFFLINE` is set, or when the revision is a commit hash whose snapshot already
//! holds every file; a file already in the snapshot is never requested again.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::cache::{free_bytes, is_commit_hash, is_disk_full, RepoCache};
use super::error::{io_err, Access};
use super::http::{encode, Body, Ctx, Follow, Method};
use super::{check_revision, Hub, HubError, RepoId};
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
/// Attempts per file before an interrupted transfer is reported (each resumes).
const MAX_ATTEMPTS: u32 = 4;
/// Largest JSON answer read (the revision listing of a repo with many files).
const JSON_LIMIT: u64 = 64 << 20;
const CHUNK: usize = 1 << 20;

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

/// What a `HEAD` on `resolve/` says about a file.
struct FileMeta {
    file: String,
    etag: String,
    size: u64,
    /// Where to GET the bytes: the CDN location for LFS files, else the resolve URL.
    location: String,
    /// The etag is the sha256 of the content (LFS files).
    sha256: bool,
}

/// A relative path inside a repo: no absolute path, no `..`, no empty segment; it names a
/// file under the snapshot folder and nothing outside it.
fn safe_repo_path(p: &str) -> bool {
    !p.is_empty()
        && !p.starts_with('/')
        && !p.contains('\\')
        && p.split('/')
            .all(|s| !s.is_empty() && s != "." && s != ".." && !s.starts_with(".git"))
}

/// The shards `model.safetensors.index.json` lists, sorted and unique.
fn index_shards(text: &str) -> Result<Vec<String>, String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("{INDEX}: {e}"))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| format!("{INDEX} has no weight_map object"))?;
    let mut shards = BTreeSet::new();
    for (tensor, shard) in map {
        let s = shard
            .as_str()
            .ok_or_else(|| format!("{INDEX} maps {tensor} to {shard}, not a file name"))?;
        if !safe_repo_path(s) {
            return Err(format!(
                "{INDEX} names shard {s:?}, which is not a file in the repo"
            ));
        }
        shards.insert(s.to_string());
    }
    if shards.is_empty() {
        return Err(format!("{INDEX} lists no shard"));
    }
    Ok(shards.into_iter().collect())
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

/// `W/"abc"` -> `abc`.
fn normalize_etag(e: &str) -> String {
    e.trim()
        .trim_start_matches("W/")
        .trim_matches('"')
        .to_string()
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Why one attempt at a transfer stopped early.
enum Stop {
    /// The connection broke or closed early: resume.
    Broken(String),
    /// Anything else: give up now.
    Fatal(HubError),
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
        let mut fetch = Fetch {
            hub: self,
            repo: &repo,
            revision,
            commit: &commit,
            cache: &cache,
            progress,
            downloaded: 0,
            reused: 0,
        };
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
        let (downloaded_bytes, reused_files) = (fetch.downloaded, fetch.reused);
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

/// The state of one download: where files go and what was done.
struct Fetch<'a> {
    hub: &'a Hub,
    repo: &'a RepoId,
    revision: &'a str,
    commit: &'a str,
    cache: &'a RepoCache,
    progress: &'a dyn Progress,
    downloaded: u64,
    reused: usize,
}

impl Fetch<'_> {
    /// Brings every file of `files` into the snapshot: the ones already there cost nothing,
    /// the others are looked up, checked against free space, then downloaded in order.
    fn all(&mut self, files: &[String], what: &str) -> Result<(), HubError> {
        let mut metas = Vec::new();
        for file in files {
            if !safe_repo_path(file) {
                return Err(HubError::NotACheckpoint {
                    repo: self.repo.to_string(),
                    revision: self.revision.to_string(),
                    detail: format!("file name {file:?} would leave the snapshot folder"),
                });
            }
            if self.cache.has_file(self.commit, file) {
                self.reused += 1;
                continue;
            }
            let meta = self.head(file)?;
            if self.blob_complete(&meta) {
                // Same bytes under another revision: link, no download.
                self.cache.link(self.commit, file, &meta.etag)?;
                self.reused += 1;
                continue;
            }
            metas.push(meta);
        }
        if metas.is_empty() {
            return Ok(());
        }
        let have = |m: &FileMeta| {
            std::fs::metadata(self.cache.incomplete(&m.etag))
                .map(|md| md.len().min(m.size))
                .unwrap_or(0)
        };
        let needed: u64 = metas.iter().map(|m| m.size - have(m)).sum();
        let blobs = self.cache.blobs_dir();
        std::fs::create_dir_all(&blobs).map_err(io_err(&blobs))?;
        if let Some(available) = free_bytes(&blobs) {
            if available < needed {
                return Err(HubError::DiskFull {
                    path: blobs,
                    needed,
                    available,
                });
            }
        }
        self.progress.stage(
            &format!("download {} {what} ({} file(s))", self.repo, metas.len()),
            Some(needed),
            "B",
        );
        for meta in &metas {
            self.blob(meta)?;
            self.cache.link(self.commit, &meta.file, &meta.etag)?;
        }
        self.progress.finish_stage();
        Ok(())
    }

    fn resolve_url(&self, file: &str) -> String {
        format!(
            "{}/{}/resolve/{}/{}",
            self.hub.cfg.endpoint,
            self.repo,
            self.commit,
            encode(file, true)
        )
    }

    fn ctx<'b>(&'b self, file: &'b str, repo: &'b str) -> Ctx<'b> {
        Ctx {
            repo,
            revision: Some(self.revision),
            file: Some(file),
            access: Access::Read,
        }
    }

    /// `HEAD /{repo}/resolve/{commit}/{file}` without following the redirect to the CDN, so
    /// the Hub's own headers (`X-Linked-Etag`, `X-Linked-Size`) can be read.
    fn head(&self, file: &str) -> Result<FileMeta, HubError> {
        let url = self.resolve_url(file);
        let repo = self.repo.to_string();
        let reply =
            self.hub
                .client
                .send(Method::Head, &url, &[], Body::Empty, Follow::SameOrigin)?;
        let reply = self.hub.client.check(reply, &self.ctx(file, &repo))?;
        let bad = |detail: String| HubError::BadResponse {
            url: reply.url.clone(),
            detail,
        };
        let linked = reply.header("x-linked-etag").map(normalize_etag);
        let etag = linked
            .clone()
            .or_else(|| reply.header("etag").map(normalize_etag))
            .filter(|e| !e.is_empty())
            .ok_or_else(|| bad(format!("no ETag for {file}")))?;
        // The etag names a blob file: keep it to plain hex-like characters.
        if !etag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(bad(format!("ETag {etag:?} of {file} is not a blob name")));
        }
        let size = reply
            .header("x-linked-size")
            .or_else(|| {
                (!reply.is_redirect())
                    .then(|| reply.header("content-length"))
                    .flatten()
            })
            .and_then(|s| s.trim().parse::<u64>().ok())
            .ok_or_else(|| bad(format!("no size for {file}")))?;
        if let Some(c) = reply.header("x-repo-commit") {
            if c != self.commit {
                return Err(bad(format!(
                    "{file} resolved to commit {c}, expected {}",
                    self.commit
                )));
            }
        }
        let location = match reply.header("location").filter(|_| reply.is_redirect()) {
            Some(loc) if loc.starts_with("http://") || loc.starts_with("https://") => {
                loc.to_string()
            }
            _ => url.clone(),
        };
        Ok(FileMeta {
            file: file.to_string(),
            sha256: linked.is_some() && is_sha256_hex(&etag),
            etag,
            size,
            location,
        })
    }

    fn blob_complete(&self, meta: &FileMeta) -> bool {
        std::fs::metadata(self.cache.blob(&meta.etag))
            .is_ok_and(|m| m.is_file() && m.len() == meta.size)
    }

    /// Downloads one blob into `blobs/<etag>`, resuming its `.incomplete` file, under the
    /// blob's lock; retries a broken transfer from where it stopped.
    fn blob(&mut self, meta: &FileMeta) -> Result<(), HubError> {
        let file = meta.file.as_str();
        let _lock = self.cache.lock(&meta.etag, || {
            self.progress
                .note(&format!("waiting for another download of {file} to finish"))
        })?;
        if self.blob_complete(meta) {
            return Ok(());
        }
        let partial = self.cache.incomplete(&meta.etag);
        let mut hasher = Sha256::new();
        let mut hashed: u64 = 0;
        let mut attempts = 0;
        loop {
            attempts += 1;
            match self.attempt(meta, &partial, &mut hasher, &mut hashed) {
                Ok(()) => break,
                Err(Stop::Fatal(e)) => return Err(e),
                Err(Stop::Broken(detail)) => {
                    let received = std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
                    if attempts >= MAX_ATTEMPTS {
                        return Err(HubError::Interrupted {
                            file: file.to_string(),
                            received,
                            expected: meta.size,
                            attempts,
                            detail,
                            partial,
                        });
                    }
                    self.progress.note(&format!(
                        "{file}: transfer broke at {received} of {} bytes ({detail}); resuming",
                        meta.size
                    ));
                }
            }
        }
        // Complete: check, then move into place.
        let found_len = std::fs::metadata(&partial).map_err(io_err(&partial))?.len();
        if found_len != meta.size {
            let _ = std::fs::remove_file(&partial);
            return Err(HubError::SizeMismatch {
                file: file.to_string(),
                expected: meta.size,
                found: found_len,
            });
        }
        if meta.sha256 {
            let found = hex(&hasher.finalize());
            if !found.eq_ignore_ascii_case(&meta.etag) {
                let _ = std::fs::remove_file(&partial);
                return Err(HubError::Integrity {
                    file: file.to_string(),
                    expected: meta.etag.clone(),
                    found,
                });
            }
        }
        File::open(&partial)
            .and_then(|f| f.sync_all())
            .map_err(io_err(&partial))?;
        let blob = self.cache.blob(&meta.etag);
        std::fs::rename(&partial, &blob).map_err(io_err(&blob))?;
        Ok(())
    }

    /// One GET of the rest of the file, appended to `partial`. `hasher` has seen the first
    /// `hashed` bytes of `partial`.
    fn attempt(
        &mut self,
        meta: &FileMeta,
        partial: &Path,
        hasher: &mut Sha256,
        hashed: &mut u64,
    ) -> Result<(), Stop> {
        let fatal = Stop::Fatal;
        let mut out = File::options()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(partial)
            .map_err(|e| fatal(io_err(partial)(e)))?;
        let on_disk = out.metadata().map(|m| m.len()).unwrap_or(0);
        let mut have = on_disk;
        if have > meta.size {
            have = 0;
        }
        if have == meta.size && have > 0 {
            return self.hash_prefix(&mut out, partial, have, hasher, hashed);
        }
        let range = format!("bytes={have}-");
        let headers: Vec<(&str, &str)> = if have > 0 {
            vec![("range", range.as_str())]
        } else {
            vec![]
        };
        let reply = match self.hub.client.send(
            Method::Get,
            &meta.location,
            &headers,
            Body::Empty,
            Follow::All,
        ) {
            Ok(r) => r,
            Err(HubError::Transport { detail, .. }) => return Err(Stop::Broken(detail)),
            Err(e) => return Err(fatal(e)),
        };
        let repo = self.repo.to_string();
        let reply = match self.hub.client.check(reply, &self.ctx(&meta.file, &repo)) {
            Ok(r) => r,
            Err(HubError::Http { status: 416, .. }) => {
                // The server has no bytes past what we hold, yet the size says more: the
                // partial file is not a prefix of this blob. Start over on the next attempt.
                out.set_len(0).map_err(|e| fatal(io_err(partial)(e)))?;
                *hasher = Sha256::new();
                *hashed = 0;
                return Err(Stop::Broken(
                    "the server refused to resume; restarting".into(),
                ));
            }
            Err(e) => return Err(fatal(e)),
        };
        let resumed = reply.status == 206
            && reply
                .header("content-range")
                .and_then(|r| r.trim().strip_prefix("bytes "))
                .and_then(|r| r.split('-').next())
                .and_then(|s| s.parse::<u64>().ok())
                == Some(have);
        let start = if resumed { have } else { 0 };
        if reply.status == 206 && !resumed {
            return Err(fatal(HubError::BadResponse {
                url: reply.url.clone(),
                detail: format!("206 with a Content-Range that does not start at {have}"),
            }));
        }
        self.hash_prefix(&mut out, partial, start, hasher, hashed)?;
        if on_disk != start {
            out.set_len(start).map_err(|e| fatal(io_err(partial)(e)))?;
        }
        out.seek(SeekFrom::Start(start))
            .map_err(|e| fatal(io_err(partial)(e)))?;
        let mut body = reply.into_reader();
        let mut buf = vec![0u8; CHUNK];
        let mut pos = start;
        while pos < meta.size {
            let want = CHUNK.min((meta.size - pos) as usize);
            let n = match body.read(&mut buf[..want]) {
                Ok(0) => {
                    return Err(Stop::Broken(format!(
                        "connection closed at {pos} of {} bytes",
                        meta.size
                    )))
                }
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Stop::Broken(e.to_string())),
            };
            if let Err(e) = out.write_all(&buf[..n]) {
                return Err(fatal(self.write_error(partial, e, meta.size - pos)));
            }
            if meta.sha256 {
                hasher.update(&buf[..n]);
                *hashed += n as u64;
            }
            pos += n as u64;
            self.downloaded += n as u64;
            self.progress.advance(n as u64);
        }
        if let Err(e) = out.flush() {
            return Err(fatal(self.write_error(partial, e, 0)));
        }
        Ok(())
    }

    /// Brings `hasher` to cover exactly the first `upto` bytes of `partial`.
    fn hash_prefix(
        &self,
        out: &mut File,
        partial: &Path,
        upto: u64,
        hasher: &mut Sha256,
        hashed: &mut u64,
    ) -> Result<(), Stop> {
        if *hashed > upto {
            *hasher = Sha256::new();
            *hashed = 0;
        }
        if *hashed == upto {
            return Ok(());
        }
        let err = |e| Stop::Fatal(io_err(partial)(e));
        out.seek(SeekFrom::Start(*hashed)).map_err(err)?;
        let mut buf = vec![0u8; CHUNK];
        while *hashed < upto {
            let want = CHUNK.min((upto - *hashed) as usize);
            out.read_exact(&mut buf[..want]).map_err(err)?;
            hasher.update(&buf[..want]);
            *hashed += want as u64;
        }
        Ok(())
    }

    fn write_error(&self, partial: &Path, e: std::io::Error, needed: u64) -> HubError {
        if is_disk_full(&e) {
            let dir = partial.parent().unwrap_or(partial);
            return HubError::DiskFull {
                path: partial.to_path_buf(),
                needed,
                available: free_bytes(dir).unwrap_or(0),
            };
        }
        io_err(partial)(e)
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

    #[test]
    fn etags_are_normalized() {
        assert_eq!(normalize_etag("W/\"abc\""), "abc");
        assert_eq!(normalize_etag("\"def\""), "def");
    }
}
