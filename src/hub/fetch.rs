//! Fetch stage of a download: the files of a plan -> complete blobs linked into the snapshot.
//!
//! In: file names of one commit, the repo's [`RepoCache`]. Out: `snapshots/<commit>/<file>`
//! links to checked blobs, and the bytes received.
//! Order per file: `HEAD /{repo}/resolve/{commit}/{file}` for its etag, size and CDN location
//! (the Hub's own headers, so the redirect to the CDN is not followed) -> free-space check for
//! all files -> under the blob's lock, GET the rest of `blobs/<etag>.incomplete` with `Range`,
//! resuming up to [`MAX_ATTEMPTS`] times when the connection breaks -> check size and (LFS)
//! sha256 -> rename into `blobs/<etag>` -> link.
//! Invariant: nothing is linked into the snapshot before its blob is complete and checked; a
//! failure leaves at most the `.incomplete` file, which the next run resumes.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use sha2::{Digest, Sha256};

use super::cache::{free_bytes, is_disk_full, RepoCache};
use super::download::safe_repo_path;
use super::error::{io_err, Access};
use super::http::{encode, Body, Ctx, Follow, Method};
use super::{Hub, HubError, RepoId};
use crate::progress::Progress;

/// Attempts per file before an interrupted transfer is reported (each resumes).
const MAX_ATTEMPTS: u32 = 4;
const CHUNK: usize = 1 << 20;

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

/// The state of one download: where files go and what was done.
pub(super) struct Fetch<'a> {
    hub: &'a Hub,
    repo: &'a RepoId,
    revision: &'a str,
    commit: &'a str,
    cache: &'a RepoCache,
    progress: &'a dyn Progress,
    downloaded: u64,
    reused: usize,
}

impl<'a> Fetch<'a> {
    pub(super) fn new(
        hub: &'a Hub,
        repo: &'a RepoId,
        revision: &'a str,
        commit: &'a str,
        cache: &'a RepoCache,
        progress: &'a dyn Progress,
    ) -> Fetch<'a> {
        Fetch {
            hub,
            repo,
            revision,
            commit,
            cache,
            progress,
            downloaded: 0,
            reused: 0,
        }
    }

    /// Bytes received and files found already cached, so far.
    pub(super) fn totals(&self) -> (u64, usize) {
        (self.downloaded, self.reused)
    }

    /// Brings every file of `files` into the snapshot: the ones already there cost nothing,
    /// the others are looked up, checked against free space, then downloaded in order.
    pub(super) fn all(&mut self, files: &[String], what: &str) -> Result<(), HubError> {
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
        write_error(partial, e, needed)
    }
}

/// A failed write to a download: `DiskFull` when the disk (or quota) is full.
pub(super) fn write_error(partial: &Path, e: std::io::Error, needed: u64) -> HubError {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_are_normalized() {
        assert_eq!(normalize_etag("W/\"abc\""), "abc");
        assert_eq!(normalize_etag("\"def\""), "def");
    }
}
