//! Publish stage: a `.flashpack` file -> a commit on a Hub model repo, with a model card.
//!
//! In: [`PublishOptions`] (pack, repo, private, revision), a token with write access.
//! Out: [`Published`] (the commit).
//! Order: open the pack and write its card -> sha256 of the pack -> create the repo
//! (`POST /api/repos/create`; 409 = it exists) and, for a revision other than `main`, the
//! branch -> ask the LFS batch API where to put the bytes
//! (`POST /{repo}.git/info/lfs/objects/batch`) -> PUT them (one request, or the numbered
//! parts of a multipart upload then its completion), then the verify action -> commit the
//! pack as an LFS pointer and README.md inline (`POST /api/models/{repo}/commit/{revision}`,
//! NDJSON).
//! Invariant: nothing is committed until the LFS object is uploaded and verified, so a
//! failed publish leaves the repo as it was; re-running skips an object the Hub already has.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;

use base64::Engine;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::error::{io_err, Access};
use super::http::{encode, Body, Ctx, Follow, Method, Reply};
use super::{card, check_revision, Hub, HubError, RepoId};
use crate::format::Pack;
use crate::inspect::PackReport;
use crate::progress::Progress;

/// Attempts per PUT (whole file or one part) before giving up.
const MAX_ATTEMPTS: u32 = 3;
const JSON_LIMIT: u64 = 16 << 20;
const LFS_JSON: &str = "application/vnd.git-lfs+json";

/// What to publish where.
#[derive(Clone, Debug)]
pub struct PublishOptions {
    pub pack: PathBuf,
    /// `user/name` or `org/name`.
    pub repo: String,
    /// Create the repo private (ignored when it exists).
    pub private: bool,
    /// The branch to commit to; created from `main` when missing.
    pub revision: String,
    /// Commit summary; a default names the file and flashpack's version.
    pub message: Option<String>,
}

/// What a publish did.
#[derive(Clone, Debug)]
pub struct Published {
    pub repo_url: String,
    pub commit_url: String,
    pub commit_oid: String,
    /// The pack's path in the repo (its file name).
    pub path_in_repo: String,
    /// The repo did not exist and was created.
    pub created_repo: bool,
    /// Pack bytes sent (0 when the Hub already had the object).
    pub uploaded_bytes: u64,
    /// The model card committed as README.md.
    pub card: String,
}

#[derive(Deserialize)]
struct BatchResponse {
    #[serde(default)]
    transfer: Option<String>,
    objects: Vec<BatchObject>,
}

#[derive(Deserialize)]
struct BatchObject {
    oid: String,
    size: u64,
    #[serde(default)]
    actions: Option<Actions>,
    #[serde(default)]
    error: Option<LfsObjectError>,
}

#[derive(Deserialize)]
struct Actions {
    upload: Option<Action>,
    verify: Option<Action>,
}

#[derive(Deserialize)]
struct Action {
    href: String,
    #[serde(default)]
    header: BTreeMap<String, Value>,
}

#[derive(Deserialize)]
struct LfsObjectError {
    code: i64,
    message: String,
}

#[derive(Deserialize)]
struct CommitResponse {
    #[serde(rename = "commitUrl")]
    commit_url: String,
    #[serde(rename = "commitOid")]
    commit_oid: String,
}

/// Counts bytes read into the progress.
struct Counting<'a, R> {
    inner: R,
    progress: &'a dyn Progress,
    sent: &'a mut u64,
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        *self.sent += n as u64;
        self.progress.advance(n as u64);
        Ok(n)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A header value of an LFS action as a string (the Hub sends strings; numbers are accepted).
fn header_str(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Whether a failed PUT is worth retrying: the connection broke, or the server had a
/// transient failure.
fn retryable(e: &HubError) -> bool {
    match e {
        HubError::Transport { .. } => true,
        HubError::Http { status, .. } => *status >= 500 || *status == 408 || *status == 429,
        _ => false,
    }
}

impl Hub {
    /// Uploads a pack and its model card; see the module doc for the order and invariant.
    pub fn publish(
        &self,
        opts: &PublishOptions,
        progress: &dyn Progress,
    ) -> Result<Published, HubError> {
        let repo = RepoId::parse(&opts.repo)?;
        check_revision(&opts.revision)?;
        if self.cfg.token.is_none() {
            return Err(HubError::NoToken {
                endpoint: self.cfg.endpoint.clone(),
            });
        }
        let repo_s = repo.to_string();
        let ctx = Ctx {
            repo: &repo_s,
            revision: Some(&opts.revision),
            file: None,
            access: Access::Write,
        };

        // 1. Card, from the pack's own report.
        let path_in_repo = opts
            .pack
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| !n.is_empty() && *n != "README.md" && !n.starts_with('.'))
            .map(str::to_string)
            .ok_or_else(|| HubError::Io {
                path: opts.pack.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "the pack needs a plain UTF-8 file name to be its name in the repo",
                ),
            })?;
        let (card, summary_line) = {
            let pack = Pack::open(&opts.pack).map_err(|source| HubError::Pack {
                path: opts.pack.clone(),
                source,
            })?;
            let report = PackReport::new(&pack);
            let card = card::model_card(
                &report,
                pack.metadata(),
                &repo_s,
                &path_in_repo,
                &self.cfg.endpoint,
                &opts.revision,
            );
            let line = format!(
                "{} packed by flashpack {}: {:.2} bits per weight.",
                report.architecture,
                env!("CARGO_PKG_VERSION"),
                report.overall.bits_per_weight
            );
            (card, line)
        };

        // 2. sha256 and size: the LFS object id.
        let (oid, size) = self.hash_file(&opts.pack, progress)?;

        // 3. The repo and the branch.
        let created_repo = self.create_repo(&repo, opts.private, &ctx)?;
        if opts.revision != "main" {
            self.create_branch(&repo, &opts.revision, &ctx)?;
        }

        // 4. LFS transfer.
        let uploaded_bytes = self.lfs_upload(
            &repo,
            &opts.revision,
            &opts.pack,
            &oid,
            size,
            &ctx,
            progress,
        )?;

        // 5. Commit.
        let summary = opts.message.clone().unwrap_or_else(|| {
            format!(
                "Upload {path_in_repo} with flashpack {}",
                env!("CARGO_PKG_VERSION")
            )
        });
        let lines = [
            json!({"key": "header", "value": {"summary": summary, "description": summary_line}}),
            json!({"key": "lfsFile", "value": {"path": path_in_repo, "algo": "sha256", "oid": oid, "size": size}}),
            json!({"key": "file", "value": {
                "path": "README.md",
                "content": base64::engine::general_purpose::STANDARD.encode(card.as_bytes()),
                "encoding": "base64",
            }}),
        ];
        let mut body = Vec::new();
        for l in &lines {
            body.extend_from_slice(l.to_string().as_bytes());
            body.push(b'\n');
        }
        let url = format!(
            "{}/api/models/{repo}/commit/{}",
            self.cfg.endpoint,
            encode(&opts.revision, false)
        );
        let reply = self.client.send(
            Method::Post,
            &url,
            &[("content-type", "application/x-ndjson")],
            Body::Bytes(&body),
            Follow::All,
        )?;
        let commit: CommitResponse = self.client.check(reply, &ctx)?.json(JSON_LIMIT)?;
        Ok(Published {
            repo_url: format!("{}/{repo}", self.cfg.endpoint),
            commit_url: commit.commit_url,
            commit_oid: commit.commit_oid,
            path_in_repo,
            created_repo,
            uploaded_bytes,
            card,
        })
    }

    fn hash_file(
        &self,
        path: &std::path::Path,
        progress: &dyn Progress,
    ) -> Result<(String, u64), HubError> {
        let mut f = File::open(path).map_err(io_err(path))?;
        let size = f.metadata().map_err(io_err(path))?.len();
        progress.stage("sha256 of the pack", Some(size), "B");
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 8 << 20];
        let mut seen = 0u64;
        loop {
            let n = f.read(&mut buf).map_err(io_err(path))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            seen += n as u64;
            progress.advance(n as u64);
        }
        progress.finish_stage();
        if seen != size {
            return Err(io_err(path)(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("the file changed while it was hashed ({seen} of {size} bytes)"),
            )));
        }
        Ok((hex(&hasher.finalize()), size))
    }

    /// `POST /api/repos/create`; returns whether the repo was created (409: it exists).
    fn create_repo(&self, repo: &RepoId, private: bool, ctx: &Ctx<'_>) -> Result<bool, HubError> {
        let url = format!("{}/api/repos/create", self.cfg.endpoint);
        let body = json!({
            "name": repo.name(),
            "organization": repo.org(),
            "private": private,
            "type": "model",
        })
        .to_string();
        let reply = self.client.send(
            Method::Post,
            &url,
            &[("content-type", "application/json")],
            Body::Bytes(body.as_bytes()),
            Follow::All,
        )?;
        if reply.status == 409 {
            return Ok(false);
        }
        self.client.check(reply, ctx)?;
        Ok(true)
    }

    /// `POST /api/models/{repo}/branch/{branch}` (from `main`); 409: it exists.
    fn create_branch(&self, repo: &RepoId, branch: &str, ctx: &Ctx<'_>) -> Result<(), HubError> {
        let url = format!(
            "{}/api/models/{repo}/branch/{}",
            self.cfg.endpoint,
            encode(branch, false)
        );
        let reply = self.client.send(
            Method::Post,
            &url,
            &[("content-type", "application/json")],
            Body::Bytes(b"{}"),
            Follow::All,
        )?;
        if reply.status == 409 {
            return Ok(());
        }
        self.client.check(reply, ctx)?;
        Ok(())
    }

    /// Batch request, transfer and verify of one LFS object; returns the bytes sent.
    #[allow(clippy::too_many_arguments)]
    fn lfs_upload(
        &self,
        repo: &RepoId,
        revision: &str,
        path: &std::path::Path,
        oid: &str,
        size: u64,
        ctx: &Ctx<'_>,
        progress: &dyn Progress,
    ) -> Result<u64, HubError> {
        let url = format!("{}/{repo}.git/info/lfs/objects/batch", self.cfg.endpoint);
        let body = json!({
            "operation": "upload",
            "transfers": ["basic", "multipart"],
            "objects": [{"oid": oid, "size": size}],
            "hash_algo": "sha256",
            "ref": {"name": revision},
        })
        .to_string();
        let reply = self.client.send(
            Method::Post,
            &url,
            &[("accept", LFS_JSON), ("content-type", LFS_JSON)],
            Body::Bytes(body.as_bytes()),
            Follow::All,
        )?;
        let batch: BatchResponse = self.client.check(reply, ctx)?.json(JSON_LIMIT)?;
        let bad = |detail: String| HubError::BadResponse {
            url: url.clone(),
            detail,
        };
        if let Some(t) = batch.transfer.as_deref() {
            if t != "basic" && t != "multipart" {
                return Err(bad(format!(
                    "the server chose transfer {t:?}; flashpack speaks basic and multipart"
                )));
            }
        }
        let obj = batch
            .objects
            .into_iter()
            .find(|o| o.oid == oid)
            .ok_or_else(|| bad(format!("no entry for object {oid}")))?;
        if let Some(e) = obj.error {
            return Err(HubError::LfsRefused {
                oid: oid.to_string(),
                size,
                code: e.code,
                message: e.message,
            });
        }
        if obj.size != size {
            return Err(bad(format!("object size {} instead of {size}", obj.size)));
        }
        let Some(actions) = obj.actions else {
            progress.note("the Hub already has this pack's bytes; committing only");
            return Ok(0);
        };
        let mut sent = 0u64;
        if let Some(upload) = &actions.upload {
            progress.stage("upload the pack", Some(size), "B");
            match upload.header.get("chunk_size") {
                Some(c) => {
                    let chunk = header_str(c)
                        .and_then(|s| s.trim().parse::<u64>().ok())
                        .filter(|&c| c > 0)
                        .ok_or_else(|| bad(format!("chunk_size {c} is not a positive integer")))?;
                    self.multipart(ctx, upload, path, oid, size, chunk, progress, &mut sent)?;
                }
                None => self.single_part(ctx, upload, path, size, progress, &mut sent)?,
            }
            progress.finish_stage();
        }
        if let Some(verify) = &actions.verify {
            let body = json!({"oid": oid, "size": size}).to_string();
            let mut headers: Vec<(String, String)> = verify
                .header
                .iter()
                .filter_map(|(k, v)| header_str(v).map(|v| (k.clone(), v)))
                .collect();
            headers.push(("accept".into(), LFS_JSON.into()));
            headers.push(("content-type".into(), LFS_JSON.into()));
            let h: Vec<(&str, &str)> = headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let reply = self.client.send(
                Method::Post,
                &verify.href,
                &h,
                Body::Bytes(body.as_bytes()),
                Follow::All,
            )?;
            self.client.check(reply, ctx)?;
        }
        Ok(sent)
    }

    /// PUTs `len` bytes of `path` from `offset` to `url`, retrying transient failures.
    #[allow(clippy::too_many_arguments)]
    fn put_range(
        &self,
        ctx: &Ctx<'_>,
        url: &str,
        headers: &[(&str, &str)],
        path: &std::path::Path,
        offset: u64,
        len: u64,
        progress: &dyn Progress,
        sent: &mut u64,
    ) -> Result<Reply, HubError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut f = File::open(path).map_err(io_err(path))?;
            f.seek(SeekFrom::Start(offset)).map_err(io_err(path))?;
            let mut reader = Counting {
                inner: f.take(len),
                progress,
                sent,
            };
            let result = self
                .client
                .send(
                    Method::Put,
                    url,
                    headers,
                    Body::Reader(&mut reader, len),
                    Follow::All,
                )
                .and_then(|r| self.client.check(r, ctx));
            match result {
                Ok(r) => return Ok(r),
                Err(e) if attempt < MAX_ATTEMPTS && retryable(&e) => {
                    progress.note(&format!("upload attempt {attempt} failed ({e}); retrying"));
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn single_part(
        &self,
        ctx: &Ctx<'_>,
        upload: &Action,
        path: &std::path::Path,
        size: u64,
        progress: &dyn Progress,
        sent: &mut u64,
    ) -> Result<(), HubError> {
        let headers: Vec<(String, String)> = upload
            .header
            .iter()
            .filter_map(|(k, v)| header_str(v).map(|v| (k.clone(), v)))
            .collect();
        let h: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        self.put_range(ctx, &upload.href, &h, path, 0, size, progress, sent)?;
        Ok(())
    }

    /// Multipart transfer: the upload action's header holds `chunk_size` and one presigned
    /// URL per part under the keys "1", "2", ...; each part's ETag goes into the completion
    /// request sent to the action's href.
    #[allow(clippy::too_many_arguments)]
    fn multipart(
        &self,
        ctx: &Ctx<'_>,
        upload: &Action,
        path: &std::path::Path,
        oid: &str,
        size: u64,
        chunk: u64,
        progress: &dyn Progress,
        sent: &mut u64,
    ) -> Result<(), HubError> {
        let mut parts: Vec<(u64, String)> = upload
            .header
            .iter()
            .filter(|(k, _)| !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit()))
            .filter_map(|(k, v)| Some((k.parse::<u64>().ok()?, header_str(v)?)))
            .collect();
        parts.sort();
        let expected = size.div_ceil(chunk);
        let numbered = parts
            .iter()
            .enumerate()
            .all(|(i, (n, _))| *n == i as u64 + 1);
        if parts.len() as u64 != expected || !numbered {
            return Err(HubError::BadResponse {
                url: upload.href.clone(),
                detail: format!(
                    "multipart upload of {size} bytes in chunks of {chunk} needs parts 1..={expected}, \
                     the server gave {} part URL(s)",
                    parts.len()
                ),
            });
        }
        let mut done = Vec::with_capacity(parts.len());
        for (n, url) in &parts {
            let offset = (n - 1) * chunk;
            let len = chunk.min(size - offset);
            let reply = self.put_range(ctx, url, &[], path, offset, len, progress, sent)?;
            let etag = reply
                .header("etag")
                .map(str::to_string)
                .filter(|e| !e.is_empty())
                .ok_or_else(|| HubError::BadResponse {
                    url: reply.url.clone(),
                    detail: format!("no ETag for part {n}"),
                })?;
            done.push(json!({"partNumber": n, "etag": etag}));
        }
        let body = json!({"oid": oid, "parts": done}).to_string();
        let reply = self.client.send(
            Method::Post,
            &upload.href,
            &[("accept", LFS_JSON), ("content-type", LFS_JSON)],
            Body::Bytes(body.as_bytes()),
            Follow::All,
        )?;
        self.client.check(reply, ctx)?;
        Ok(())
    }
}
