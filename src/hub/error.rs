//! Typed errors of the Hub client: each names the endpoint, repo, file or status involved and
//! says what to do about it.

use std::path::PathBuf;

use crate::format::PackError;

/// Why a Hub download or publish failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HubError {
    #[error(
        "{given:?} is not a Hub repo id; expected `org/name` (letters, digits, '-', '_', '.', \
         at most 96 characters each)"
    )]
    BadRepoId { given: String },
    #[error("{given:?} is not a usable revision; give a branch, tag or commit hash")]
    BadRevision { given: String },
    /// 401 or 403: the token is missing, refused, or lacks the access asked for.
    #[error("{status} from {endpoint} for {repo}: {hint}")]
    Auth {
        status: u16,
        endpoint: String,
        repo: String,
        hint: String,
    },
    #[error(
        "{repo} does not exist on {endpoint} (or is private and the token cannot see it); \
         check the repo id"
    )]
    RepoNotFound { endpoint: String, repo: String },
    #[error("{repo} has no revision {revision:?}; give a branch, tag or commit hash that exists")]
    RevisionNotFound { repo: String, revision: String },
    #[error("{repo}@{revision} has no file {file}")]
    FileNotFound {
        repo: String,
        revision: String,
        file: String,
    },
    #[error("{method} {url}: HTTP {status}: {detail}")]
    Http {
        method: &'static str,
        url: String,
        status: u16,
        detail: String,
    },
    #[error(
        "cannot reach {url}: {detail}; check the network, HTTPS_PROXY or HF_ENDPOINT \
         (set HF_HUB_OFFLINE=1 to use the local cache alone)"
    )]
    Transport { url: String, detail: String },
    #[error("unexpected answer from {url}: {detail}")]
    BadResponse { url: String, detail: String },
    #[error(
        "{repo}@{revision} is not complete in the cache {cache} (missing: {}) and HF_HUB_OFFLINE \
         is set; unset HF_HUB_OFFLINE to download it",
        missing.join(", ")
    )]
    NotInCache {
        repo: String,
        revision: String,
        cache: PathBuf,
        missing: Vec<String>,
    },
    #[error("{repo}@{revision} is not a safetensors checkpoint flashpack can convert: {detail}")]
    NotACheckpoint {
        repo: String,
        revision: String,
        detail: String,
    },
    #[error(
        "download of {file} stopped at {received} of {expected} bytes after {attempts} \
         attempt(s) ({detail}); the partial file {} is kept: run the same command again to resume",
        partial.display()
    )]
    Interrupted {
        file: String,
        received: u64,
        expected: u64,
        attempts: u32,
        detail: String,
        partial: PathBuf,
    },
    #[error(
        "{file}: the downloaded bytes hash to sha256 {found} but the Hub announced {expected}; \
         the partial file was removed, run the command again"
    )]
    Integrity {
        file: String,
        expected: String,
        found: String,
    },
    #[error(
        "{file}: received {found} bytes but the Hub announced {expected}; the partial file was \
         removed, run the command again"
    )]
    SizeMismatch {
        file: String,
        expected: u64,
        found: u64,
    },
    #[error(
        "no space left on the disk of {}: {needed} more bytes needed, {available} free; free some \
         space or point HF_HUB_CACHE elsewhere, then run again (partial downloads are resumed)",
        path.display()
    )]
    DiskFull {
        path: PathBuf,
        needed: u64,
        available: u64,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "publishing to {endpoint} needs a token with write access: set HF_TOKEN, or log in with \
         `huggingface-cli login` (which writes $HF_HOME/token)"
    )]
    NoToken { endpoint: String },
    #[error("{}: {source}", path.display())]
    Pack {
        path: PathBuf,
        #[source]
        source: PackError,
    },
    #[error(
        "{repo}@{revision} holds no .flashpack file ({detail}); give the repo of a pack \
         (`flashpack publish` writes one) or a local .flashpack path"
    )]
    NoPack {
        repo: String,
        revision: String,
        detail: String,
    },
    #[error(
        "{repo}@{revision} holds several packs ({}); name one as {repo}@{revision}:FILE, e.g. \
         `flashpack run {repo}@{revision}:{}`",
        packs.join(", "),
        packs.first().map_or("", String::as_str)
    )]
    SeveralPacks {
        repo: String,
        revision: String,
        packs: Vec<String>,
    },
    #[error("{repo}:{file} is not a pack flashpack can read: {source}")]
    NotAPack {
        repo: String,
        file: String,
        #[source]
        source: Box<PackError>,
    },
    #[error(
        "{what} of {repo}:{file}, as downloaded, does not match its checksum in the pack; the \
         Hub's copy or the transfer is damaged: run again, or publish the pack again"
    )]
    DamagedRange {
        repo: String,
        file: String,
        what: String,
    },
    #[error("the Hub refused LFS object {oid} ({size} bytes): error {code}: {message}")]
    LfsRefused {
        oid: String,
        size: u64,
        code: i64,
        message: String,
    },
}

/// Whether a request needs read or write access; chooses the hint of an auth error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Access {
    Read,
    Write,
}

pub(crate) fn auth_hint(status: u16, access: Access, token_sent: bool) -> String {
    let want = match access {
        Access::Read => "read",
        Access::Write => "write",
    };
    match (status, token_sent) {
        (401, false) => format!(
            "no token was sent and the repo is private, gated or missing; set HF_TOKEN to a \
             token with {want} access (https://huggingface.co/settings/tokens)"
        ),
        (401, true) => format!(
            "the token was refused; check that HF_TOKEN (or $HF_HOME/token) holds a valid token \
             with {want} access"
        ),
        _ => format!(
            "the token has no {want} access to this repo; use a token with {want} access (for a \
             gated model, accept its conditions on the Hub first)"
        ),
    }
}

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> HubError {
    let path = path.into();
    move |source| HubError::Io { path, source }
}
