//! A pack on the Hub, for `flashpack run org/name[@revision][:FILE]`: the whole file into the
//! cache for one process, or, for a pipeline rank, only the byte ranges it serves.
//!
//! In: a [`PackRef`] (repo, revision, optional file name). Out: a local path: the snapshot's
//! complete file ([`Hub::download_pack`], resumable through fetch.rs as every download is), or a
//! [`RemotePack`] whose sparse copy holds the pack's header, directories and metadata (what
//! `Pack::open` reads) and then whatever pieces [`RemotePack::fetch`] is given (a rank's
//! layers, `run::pipeline::stage_pieces`).
//! Order for a rank: `GET /api/models/{repo}/revision/{rev}` (the commit and the files: exactly
//! one `.flashpack`, or the one named) -> `HEAD` of its resolve URL (the size) -> `GET` with
//! `Range` of its first 4,192 bytes (the header, checked by its checksum) -> `GET` with `Range`
//! of the directory and metadata sections (checked by the section table's blake3) -> after the
//! pipeline's split, `GET`s of the rank's pieces, merged across small gaps (sparse.rs).
//! Invariant: nothing is written to the sparse copy before it passed its check; with
//! `HF_HUB_OFFLINE` no request is made, and a piece the copy lacks is `NotInCache`.

use std::path::{Path, PathBuf};

use super::cache::{free_bytes, RepoCache};
use super::download::safe_repo_path;
use super::fetch::Fetch;
use super::sparse::{parse_record_size, plan_requests, SparseFile, MAX_GAP, MAX_REQUEST};
use super::{check_revision, Hub, HubError, RemoteFiles, RepoId};
use crate::checkpoint::SourceSpec;
use crate::format::{open_pieces, Check, Header, Piece, MAX_HEADER_LEN};
use crate::progress::Progress;

/// The file name packs end with.
const PACK_SUFFIX: &str = ".flashpack";

/// `org/name[@revision][:FILE]`: a pack on the Hub. Neither repo ids nor git revisions can
/// hold `:`, so the first one starts the file name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackRef {
    pub repo: String,
    pub revision: Option<String>,
    pub file: Option<String>,
}

impl PackRef {
    /// A Hub pack, or `None` for a local path: a name that exists on disk is local, as for
    /// `convert` and `plan` (`SourceSpec::parse`), and so is anything not shaped `org/name`.
    pub fn parse(s: &str) -> Option<PackRef> {
        if std::fs::symlink_metadata(s).is_ok() {
            return None;
        }
        let (spec, file) = match s.split_once(':') {
            Some((spec, file)) => (spec, Some(file.to_string())),
            None => (s, None),
        };
        match SourceSpec::parse(spec) {
            SourceSpec::Hub { repo, revision } => Some(PackRef {
                repo,
                revision,
                file,
            }),
            SourceSpec::Local(_) => None,
        }
    }

    fn revision(&self) -> &str {
        self.revision.as_deref().unwrap_or("main")
    }
}

impl std::fmt::Display for PackRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.repo, self.revision())?;
        if let Some(file) = &self.file {
            write!(f, ":{file}")?;
        }
        Ok(())
    }
}

/// The pack among `files`: the one `want` names, else the only `.flashpack` file. Pure.
fn choose_pack(files: &[String], want: Option<&str>, r: &PackRef) -> Result<String, HubError> {
    let (repo, revision) = (r.repo.clone(), r.revision().to_string());
    if let Some(want) = want {
        if !safe_repo_path(want) || !files.iter().any(|f| f == want) {
            return Err(HubError::FileNotFound {
                repo,
                revision,
                file: want.to_string(),
            });
        }
        return Ok(want.to_string());
    }
    let packs: Vec<String> = files
        .iter()
        .filter(|f| f.ends_with(PACK_SUFFIX) && safe_repo_path(f))
        .cloned()
        .collect();
    match packs.len() {
        1 => Ok(packs[0].clone()),
        0 => {
            let shown: Vec<&str> = files.iter().take(5).map(String::as_str).collect();
            let detail = match shown.is_empty() {
                true => "it has no files".to_string(),
                false => format!(
                    "its files: {}{}",
                    shown.join(", "),
                    if files.len() > 5 { ", ..." } else { "" }
                ),
            };
            Err(HubError::NoPack {
                repo,
                revision,
                detail,
            })
        }
        _ => Err(HubError::SeveralPacks {
            repo,
            revision,
            packs,
        }),
    }
}

/// The `.flashpack` files of a folder of the cache (a snapshot or a rank's sparse copies).
fn packs_in(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(PACK_SUFFIX))
        .collect();
    out.sort();
    out
}

/// Where a rank's pack comes from.
pub enum PackAt<'h> {
    /// The whole file is in the snapshot already (a single process downloaded it).
    Whole(PathBuf),
    /// A sparse copy with the pack's header, directories and metadata.
    Ranges(Box<RemotePack<'h>>),
}

/// What one [`RemotePack::fetch`] brought.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fetched {
    /// Pieces asked for that the copy lacked.
    pub pieces: usize,
    pub requests: usize,
    /// Bytes of those pieces.
    pub bytes: u64,
}

/// A pack on the Hub read by ranges into a sparse local copy (sparse.rs).
pub struct RemotePack<'h> {
    /// `None` offline.
    remote: Option<RemoteFiles<'h>>,
    name: String,
    repo: String,
    file: String,
    path: PathBuf,
    size: u64,
    requests: usize,
}

impl Hub {
    /// Downloads the whole pack `r` names into the cache (or finds it there) and returns its
    /// snapshot path: one process runs it as a local pack.
    pub fn download_pack(&self, r: &PackRef, progress: &dyn Progress) -> Result<PathBuf, HubError> {
        let repo = RepoId::parse(&r.repo)?;
        let revision = r.revision();
        check_revision(revision)?;
        let cache = RepoCache::new(&self.cfg.cache_dir, &repo);
        if self.cfg.offline {
            let (commit, file) = self.cached_pack(&cache, r, |c| cache.snapshot_dir(c))?;
            return Ok(cache.snapshot_dir(&commit).join(file));
        }
        let info = match self.repo_info(&repo, revision) {
            Ok(info) => info,
            Err(e @ HubError::Transport { .. }) => {
                // The Hub is unreachable: a pack downloaded before will do.
                let Ok((commit, file)) = self.cached_pack(&cache, r, |c| cache.snapshot_dir(c))
                else {
                    return Err(e);
                };
                progress.note(&format!("{e}; using the cached {file} of {r}"));
                return Ok(cache.snapshot_dir(&commit).join(file));
            }
            Err(e) => return Err(e),
        };
        let remote_commit = info.sha.clone();
        if !super::cache::is_commit_hash(&remote_commit) {
            return Err(HubError::BadResponse {
                url: format!(
                    "{}/api/models/{repo}/revision/{revision}",
                    self.cfg.endpoint
                ),
                detail: format!("sha {remote_commit:?} is not a commit hash"),
            });
        }
        cache.write_ref(revision, &remote_commit)?;
        let files: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
        let file = choose_pack(&files, r.file.as_deref(), r)?;
        let mut fetch = Fetch::new(self, &repo, revision, &remote_commit, &cache, progress);
        fetch.all(std::slice::from_ref(&file), "pack")?;
        Ok(cache.snapshot_dir(&remote_commit).join(file))
    }

    /// Offline: the commit `refs/` names and the pack `dir(commit)` holds.
    fn cached_pack(
        &self,
        cache: &RepoCache,
        r: &PackRef,
        dir: impl Fn(&str) -> PathBuf,
    ) -> Result<(String, String), HubError> {
        let revision = r.revision();
        let missing = |what: String| HubError::NotInCache {
            repo: r.repo.clone(),
            revision: revision.to_string(),
            cache: self.cfg.cache_dir.clone(),
            missing: vec![what],
        };
        let commit = cache
            .read_ref(revision)
            .ok_or_else(|| missing(format!("refs/{revision}")))?;
        let dir = dir(&commit);
        let file = match &r.file {
            Some(f) if !safe_repo_path(f) => {
                return Err(HubError::FileNotFound {
                    repo: r.repo.clone(),
                    revision: revision.to_string(),
                    file: f.clone(),
                })
            }
            Some(f) if dir.join(f).is_file() => f.clone(),
            Some(f) => return Err(missing(f.clone())),
            None => match packs_in(&dir).as_slice() {
                [one] => one.clone(),
                [] => return Err(missing(format!("a {PACK_SUFFIX} file"))),
                several => choose_pack(several, None, r)?,
            },
        };
        Ok((commit, file))
    }

    /// The pack `r` names for a pipeline rank: the snapshot's complete file if the cache has
    /// it, else a sparse copy holding what `Pack::open` reads (fetched now where missing).
    pub fn pack_ranges(&self, r: &PackRef) -> Result<PackAt<'_>, HubError> {
        let repo = RepoId::parse(&r.repo)?;
        let revision = r.revision();
        check_revision(revision)?;
        let cache = RepoCache::new(&self.cfg.cache_dir, &repo);
        // Unreachable, the Hub's error says to set HF_HUB_OFFLINE=1 to run from the cache.
        let remote = match self.cfg.offline {
            true => None,
            false => Some(self.remote_files(&r.repo, Some(revision))?),
        };
        let mut pack = if let Some(remote) = remote {
            let commit = remote.commit().to_string();
            cache.write_ref(revision, &commit)?;
            let file = choose_pack(remote.files(), r.file.as_deref(), r)?;
            if cache.has_file(&commit, &file) {
                return Ok(PackAt::Whole(cache.snapshot_dir(&commit).join(file)));
            }
            let size = remote.size(&file)?;
            RemotePack {
                remote: Some(remote),
                name: format!("{}@{revision}:{file}", r.repo),
                repo: r.repo.clone(),
                path: cache.sparse_dir(&commit).join(&file),
                file,
                size,
                requests: 0,
            }
        } else {
            if let Ok((commit, file)) = self.cached_pack(&cache, r, |c| cache.snapshot_dir(c)) {
                return Ok(PackAt::Whole(cache.snapshot_dir(&commit).join(file)));
            }
            let (commit, file) = self.cached_pack(&cache, r, |c| cache.sparse_dir(c))?;
            let path = cache.sparse_dir(&commit).join(&file);
            let mut record = path.as_os_str().to_os_string();
            record.push(".ranges");
            let size = std::fs::read_to_string(&record)
                .ok()
                .and_then(|t| parse_record_size(&t))
                .ok_or_else(|| HubError::NotInCache {
                    repo: r.repo.clone(),
                    revision: revision.to_string(),
                    cache: self.cfg.cache_dir.clone(),
                    missing: vec![format!("the record of {}", path.display())],
                })?;
            RemotePack {
                remote: None,
                name: format!("{}@{revision}:{file}", r.repo),
                repo: r.repo.clone(),
                file,
                path,
                size,
                requests: 0,
            }
        };
        pack.fetch_open()?;
        Ok(PackAt::Ranges(Box::new(pack)))
    }
}

impl RemotePack<'_> {
    /// The sparse copy: open it as a local pack (only the fetched pieces may be read).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `org/name@revision:FILE`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The pack's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes received over the network so far (gaps between pieces included).
    pub fn received(&self) -> u64 {
        self.remote.as_ref().map_or(0, RemoteFiles::received)
    }

    /// Range requests made so far.
    pub fn requests(&self) -> usize {
        self.requests
    }

    /// Brings the pieces the copy lacks, each checked before it is written.
    pub fn fetch(&mut self, pieces: &[Piece]) -> Result<Fetched, HubError> {
        let mut sparse = SparseFile::open(&self.path, self.size)?;
        self.fetch_into(&mut sparse, pieces)
    }

    /// The header (its first bytes, checked by its checksum), then the sections `Pack::open`
    /// reads.
    fn fetch_open(&mut self) -> Result<(), HubError> {
        let mut sparse = SparseFile::open(&self.path, self.size)?;
        let head = 0..MAX_HEADER_LEN.min(self.size);
        let local = sparse.read(head.clone())?;
        let header = match Header::decode(&local) {
            Ok(h)
                if sparse
                    .present()
                    .covers(&(0..Header::encoded_len(h.sections.len()) as u64)) =>
            {
                h
            }
            _ => {
                let Some(remote) = &self.remote else {
                    return Err(self.not_in_cache(vec!["the pack header".into()]));
                };
                let bytes = read_retrying(remote, &self.file, head, &mut self.requests)?;
                let header = Header::decode(&bytes).map_err(|source| HubError::NotAPack {
                    repo: self.repo.clone(),
                    file: self.file.clone(),
                    source: Box::new(source),
                })?;
                let len = Header::encoded_len(header.sections.len());
                sparse.commit(&[(0, &bytes[..len])])?;
                header
            }
        };
        if header.file_size != self.size {
            return Err(HubError::NotAPack {
                repo: self.repo.clone(),
                file: self.file.clone(),
                source: Box::new(crate::format::PackError::Truncated {
                    what: "file_size",
                    expected: header.file_size,
                    file_len: self.size,
                }),
            });
        }
        let pieces = open_pieces(&header).map_err(|source| HubError::NotAPack {
            repo: self.repo.clone(),
            file: self.file.clone(),
            source: Box::new(source),
        })?;
        let sections: Vec<Piece> = pieces
            .into_iter()
            .filter(|p| p.check != Check::Header)
            .collect();
        self.fetch_into(&mut sparse, &sections)?;
        Ok(())
    }

    fn not_in_cache(&self, missing: Vec<String>) -> HubError {
        let (repo, rest) = self.name.split_once('@').unwrap_or((&self.name, ""));
        let revision = rest.split(':').next().unwrap_or("main");
        HubError::NotInCache {
            repo: repo.to_string(),
            revision: revision.to_string(),
            cache: self.path.clone(),
            missing,
        }
    }

    fn fetch_into(
        &mut self,
        sparse: &mut SparseFile,
        pieces: &[Piece],
    ) -> Result<Fetched, HubError> {
        let requests = plan_requests(pieces, sparse.present(), MAX_GAP, MAX_REQUEST);
        let wanted: Vec<usize> = requests.iter().flat_map(|q| q.pieces.clone()).collect();
        let bytes: u64 = wanted
            .iter()
            .map(|&i| pieces[i].range.end - pieces[i].range.start)
            .sum();
        let fetched = Fetched {
            pieces: wanted.len(),
            requests: requests.len(),
            bytes,
        };
        if requests.is_empty() {
            return Ok(fetched);
        }
        let Some(remote) = &self.remote else {
            let mut missing: Vec<String> = wanted
                .iter()
                .take(3)
                .map(|&i| pieces[i].what.clone())
                .collect();
            if wanted.len() > 3 {
                missing.push(format!("{} more pieces of the pack", wanted.len() - 3));
            }
            return Err(self.not_in_cache(missing));
        };
        let dir = self.path.parent().unwrap_or(&self.path);
        if let Some(available) = free_bytes(dir) {
            if available < bytes {
                return Err(HubError::DiskFull {
                    path: self.path.clone(),
                    needed: bytes,
                    available,
                });
            }
        }
        for q in &requests {
            let got = read_retrying(remote, &self.file, q.range.clone(), &mut self.requests)?;
            let mut parts = Vec::with_capacity(q.pieces.len());
            for &i in &q.pieces {
                let p = &pieces[i];
                let at = (p.range.start - q.range.start) as usize;
                let slice = &got[at..at + (p.range.end - p.range.start) as usize];
                if !p.checks(slice) {
                    return Err(HubError::DamagedRange {
                        repo: self.repo.clone(),
                        file: self.file.clone(),
                        what: p.what.clone(),
                    });
                }
                parts.push((p.range.start, slice));
            }
            sparse.commit(&parts)?;
        }
        Ok(fetched)
    }
}

/// Attempts at one range request before its error is reported: a connection that breaks
/// (or closes early) is asked again, as fetch.rs resumes a whole file.
const MAX_ATTEMPTS: u32 = 4;

/// [`RemoteFiles::read`], asked again when the transfer breaks; `requests` counts each try.
fn read_retrying(
    remote: &RemoteFiles<'_>,
    file: &str,
    range: std::ops::Range<u64>,
    requests: &mut usize,
) -> Result<Vec<u8>, HubError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        *requests += 1;
        match remote.read(file, range.clone()) {
            Err(HubError::Transport { .. } | HubError::BadResponse { .. })
                if attempt < MAX_ATTEMPTS => {}
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(file: Option<&str>) -> PackRef {
        PackRef {
            repo: "org/m".into(),
            revision: None,
            file: file.map(str::to_string),
        }
    }

    #[test]
    fn pack_refs_parse_repo_revision_and_file() {
        let p = PackRef::parse("org/m@v2:sub/x.flashpack").unwrap();
        assert_eq!(p.repo, "org/m");
        assert_eq!(p.revision.as_deref(), Some("v2"));
        assert_eq!(p.file.as_deref(), Some("sub/x.flashpack"));
        assert_eq!(p.to_string(), "org/m@v2:sub/x.flashpack");
        let p = PackRef::parse("org/m").unwrap();
        assert_eq!((p.revision, p.file), (None, None));
        assert_eq!(
            PackRef::parse("org/m:a.flashpack").unwrap().file.as_deref(),
            Some("a.flashpack")
        );
        for local in ["model.flashpack", "./a/b", "/tmp", "a/b/c"] {
            assert_eq!(PackRef::parse(local), None, "{local}");
        }
    }

    #[test]
    fn the_one_pack_is_chosen_and_several_are_named() {
        let files = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let one = files(&["README.md", "m.flashpack"]);
        assert_eq!(choose_pack(&one, None, &r(None)).unwrap(), "m.flashpack");
        let two = files(&["a.flashpack", "b.flashpack"]);
        let e = choose_pack(&two, None, &r(None)).unwrap_err();
        assert!(matches!(e, HubError::SeveralPacks { .. }), "{e}");
        assert!(e.to_string().contains("org/m@main:a.flashpack"), "{e}");
        assert_eq!(
            choose_pack(&two, Some("b.flashpack"), &r(None)).unwrap(),
            "b.flashpack"
        );
        let e = choose_pack(&two, Some("c.flashpack"), &r(None)).unwrap_err();
        assert!(matches!(e, HubError::FileNotFound { .. }), "{e}");
        let e = choose_pack(&files(&["config.json"]), None, &r(None)).unwrap_err();
        assert!(matches!(e, HubError::NoPack { .. }), "{e}");
        assert!(e.to_string().contains("config.json"), "{e}");
    }
}
