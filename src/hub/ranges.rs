//! Byte ranges of a repository's files, read without downloading them (what `flashpack plan`
//! reads of a Hub checkpoint: its config, shard index and safetensors headers).
//!
//! In: a repo id and revision. Out: [`RemoteFiles`]: the commit the revision resolves to, the
//! files it lists, each file's size (`HEAD /{repo}/resolve/{commit}/{file}`: `X-Linked-Size`
//! for an LFS file, else `Content-Length`) and any byte range of a file (`GET` with
//! `Range: bytes=a-b`, redirects to the CDN followed).
//! Invariant: nothing is written to the cache, and no more than the range asked for is read
//! from a response: a server that ignores `Range` (a `200` with the whole file) is read up to
//! the range's end and then dropped, so a weight shard is never downloaded whole.

use std::cell::Cell;
use std::io::Read;
use std::ops::Range;

use super::cache::is_commit_hash;
use super::error::Access;
use super::http::{encode, Body, Ctx, Follow, Method};
use super::{check_revision, Hub, HubError, RepoId};

/// Files of one commit of a repository, read by ranges.
pub struct RemoteFiles<'h> {
    hub: &'h Hub,
    repo: RepoId,
    revision: String,
    commit: String,
    files: Vec<String>,
    received: Cell<u64>,
}

impl Hub {
    /// Resolves `repo` at `revision` (default `main`) and lists its files, without downloading
    /// any (one request: `GET /api/models/{repo}/revision/{rev}`).
    pub fn remote_files(
        &self,
        repo: &str,
        revision: Option<&str>,
    ) -> Result<RemoteFiles<'_>, HubError> {
        let repo = RepoId::parse(repo)?;
        let revision = revision.unwrap_or("main");
        check_revision(revision)?;
        let info = self.repo_info(&repo, revision)?;
        if !is_commit_hash(&info.sha) {
            return Err(HubError::BadResponse {
                url: format!(
                    "{}/api/models/{repo}/revision/{revision}",
                    self.cfg.endpoint
                ),
                detail: format!("sha {:?} is not a commit hash", info.sha),
            });
        }
        Ok(RemoteFiles {
            hub: self,
            revision: revision.to_string(),
            commit: info.sha,
            files: info.siblings.into_iter().map(|s| s.rfilename).collect(),
            repo,
            received: Cell::new(0),
        })
    }
}

impl RemoteFiles<'_> {
    /// The commit the revision resolved to.
    pub fn commit(&self) -> &str {
        &self.commit
    }

    /// `org/name`.
    pub fn repo(&self) -> String {
        self.repo.to_string()
    }

    /// The files the commit holds (repository paths).
    pub fn files(&self) -> &[String] {
        &self.files
    }

    /// Body bytes received so far by [`RemoteFiles::read`].
    pub fn received(&self) -> u64 {
        self.received.get()
    }

    fn url(&self, file: &str) -> String {
        format!(
            "{}/{}/resolve/{}/{}",
            self.hub.cfg.endpoint,
            self.repo,
            self.commit,
            encode(file, true)
        )
    }

    fn ctx<'a>(&'a self, file: &'a str, repo: &'a str) -> Ctx<'a> {
        Ctx {
            repo,
            revision: Some(&self.revision),
            file: Some(file),
            access: Access::Read,
        }
    }

    /// The size of `file` in bytes.
    pub fn size(&self, file: &str) -> Result<u64, HubError> {
        let url = self.url(file);
        let repo = self.repo.to_string();
        let reply =
            self.hub
                .client
                .send(Method::Head, &url, &[], Body::Empty, Follow::SameOrigin)?;
        let reply = self.hub.client.check(reply, &self.ctx(file, &repo))?;
        reply
            .header("x-linked-size")
            .or_else(|| {
                (!reply.is_redirect())
                    .then(|| reply.header("content-length"))
                    .flatten()
            })
            .and_then(|s| s.trim().parse::<u64>().ok())
            .ok_or_else(|| HubError::BadResponse {
                url: reply.url.clone(),
                detail: format!("no size for {file}"),
            })
    }

    /// Bytes `range` of `file` (`range.end` at most the file's size).
    pub fn read(&self, file: &str, range: Range<u64>) -> Result<Vec<u8>, HubError> {
        if range.is_empty() {
            return Ok(Vec::new());
        }
        let url = self.url(file);
        let repo = self.repo.to_string();
        let header = format!("bytes={}-{}", range.start, range.end - 1);
        let reply = self.hub.client.send(
            Method::Get,
            &url,
            &[("range", header.as_str())],
            Body::Empty,
            Follow::All,
        )?;
        let reply = self.hub.client.check(reply, &self.ctx(file, &repo))?;
        let final_url = reply.url.clone();
        let want = range.end - range.start;
        // 206: the range; 200: the whole file from its start (skip to the range, stop at its end).
        let skip = match reply.status {
            206 => 0,
            200 => range.start,
            s => {
                return Err(HubError::BadResponse {
                    url: final_url,
                    detail: format!("status {s} for the range {header} of {file}"),
                })
            }
        };
        let mut body = reply.into_reader().take(skip + want);
        let mut out = Vec::with_capacity(want as usize);
        body.read_to_end(&mut out)
            .map_err(|e| HubError::Transport {
                url: final_url.clone(),
                detail: e.to_string(),
            })?;
        self.received.set(self.received.get() + out.len() as u64);
        if out.len() as u64 != skip + want {
            return Err(HubError::BadResponse {
                url: final_url,
                detail: format!(
                    "{} bytes for the range {header} of {file}, {want} expected",
                    out.len() as u64 - skip.min(out.len() as u64)
                ),
            });
        }
        Ok(out.split_off(skip as usize))
    }
}
