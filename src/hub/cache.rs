//! The huggingface_hub cache layout, shared with the Python tools so neither downloads twice:
//! `{cache}/models--org--name/blobs/<etag>` (file bytes), `snapshots/<commit>/<file>` (a
//! relative symlink to `../../blobs/<etag>`), `refs/<revision>` (the commit hash), and the
//! lock files `{cache}/.locks/models--org--name/<etag>.lock`.
//! Invariant: every write is atomic (temporary name, then rename), so a crash leaves either
//! the old state or the new one; partial downloads are `blobs/<etag>.incomplete`.

use std::fs::File;
use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use super::error::io_err;
use super::{HubError, RepoId};

/// A 40-hex-digit git commit hash (what `refs/` files hold and snapshot folders are named).
pub(crate) fn is_commit_hash(s: &str) -> bool {
    s.len() == 40
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A repo's folder in the cache.
pub(crate) struct RepoCache {
    root: PathBuf,
    locks: PathBuf,
}

impl RepoCache {
    pub(crate) fn new(cache_dir: &Path, repo: &RepoId) -> RepoCache {
        RepoCache {
            root: cache_dir.join(repo.cache_folder()),
            locks: cache_dir.join(".locks").join(repo.cache_folder()),
        }
    }

    /// The commit `revision` names: itself when it is a hash, else the content of
    /// `refs/<revision>` if a previous download wrote it.
    pub(crate) fn read_ref(&self, revision: &str) -> Option<String> {
        if is_commit_hash(revision) {
            return Some(revision.to_string());
        }
        let text = std::fs::read_to_string(self.root.join("refs").join(revision)).ok()?;
        let commit = text.trim();
        is_commit_hash(commit).then(|| commit.to_string())
    }

    /// Records that `revision` points at `commit` (no file for a commit hash itself).
    pub(crate) fn write_ref(&self, revision: &str, commit: &str) -> Result<(), HubError> {
        if revision == commit {
            return Ok(());
        }
        let path = self.root.join("refs").join(revision);
        if std::fs::read_to_string(&path).is_ok_and(|t| t.trim() == commit) {
            return Ok(());
        }
        write_atomic(&path, commit.as_bytes())
    }

    pub(crate) fn snapshot_dir(&self, commit: &str) -> PathBuf {
        self.root.join("snapshots").join(commit)
    }

    /// Whether the snapshot holds `file` as a readable regular file (a dangling link does
    /// not count).
    pub(crate) fn has_file(&self, commit: &str, file: &str) -> bool {
        self.snapshot_dir(commit).join(file).is_file()
    }

    /// Where a pipeline rank keeps its sparse copy of `file` of `commit` (its own ranges of
    /// the pack, holes elsewhere), beside its record `<file>.ranges`: not a blob, since it is
    /// not complete, and never linked into the snapshot.
    pub(crate) fn sparse_dir(&self, commit: &str) -> PathBuf {
        self.root.join("flashpack-ranges").join(commit)
    }

    pub(crate) fn blobs_dir(&self) -> PathBuf {
        self.root.join("blobs")
    }

    pub(crate) fn blob(&self, etag: &str) -> PathBuf {
        self.blobs_dir().join(etag)
    }

    pub(crate) fn incomplete(&self, etag: &str) -> PathBuf {
        self.blobs_dir().join(format!("{etag}.incomplete"))
    }

    /// Points `snapshots/<commit>/<file>` at `blobs/<etag>` with a relative link, replacing
    /// whatever was there atomically.
    pub(crate) fn link(&self, commit: &str, file: &str, etag: &str) -> Result<(), HubError> {
        let dest = self.snapshot_dir(commit).join(file);
        let parent = dest.parent().unwrap_or(&self.root).to_path_buf();
        std::fs::create_dir_all(&parent).map_err(io_err(&parent))?;
        // snapshots/<commit>/ is two levels below the repo root, plus one per folder in file.
        let depth = 2 + file.matches('/').count();
        let target = PathBuf::from("../".repeat(depth)).join("blobs").join(etag);
        let tmp = tmp_name(&dest);
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&target, &tmp).map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, &dest).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            io_err(&dest)(e)
        })
    }

    /// Takes the inter-process lock huggingface_hub also takes for this blob, so two
    /// downloads of one file (flashpack or Python) never write the same `.incomplete`.
    /// `waiting` is called once if another process holds it.
    pub(crate) fn lock(&self, etag: &str, waiting: impl FnOnce()) -> Result<BlobLock, HubError> {
        std::fs::create_dir_all(&self.locks).map_err(io_err(&self.locks))?;
        let path = self.locks.join(format!("{etag}.lock"));
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        let fd = file.as_raw_fd();
        // SAFETY: flock on a descriptor this function owns; no memory is shared.
        if unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            waiting();
            // SAFETY: as above; this call blocks until the other holder releases.
            if unsafe { libc::flock(fd, libc::LOCK_EX) } != 0 {
                return Err(io_err(&path)(std::io::Error::last_os_error()));
            }
        }
        Ok(BlobLock { _file: file })
    }
}

/// Held while a blob is downloaded; closing the file releases the lock.
pub(crate) struct BlobLock {
    _file: File,
}

fn tmp_name(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{}.tmp", std::process::id()));
    dest.with_file_name(name)
}

/// Writes `bytes` to `path` through a temporary file and a rename.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), HubError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io_err(parent))?;
    }
    let tmp = tmp_name(path);
    let result = File::create(&tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()))
        .and_then(|()| std::fs::rename(&tmp, path));
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io_err(path)(e)
    })
}

/// Bytes available to this user on the file system holding `dir` (None if unknown).
pub(crate) fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: all-zero bytes are a valid `statvfs` (plain integers).
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is NUL-terminated and `st` is ours, alive for the call.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    (st.f_bavail as u64).checked_mul(st.f_frsize as u64)
}

/// Whether an I/O error means the disk (or quota) is full.
pub(crate) fn is_disk_full(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::StorageFull
        || matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_are_relative_and_replace_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let repo = RepoId::parse("org/model").unwrap();
        let cache = RepoCache::new(dir.path(), &repo);
        let commit = "0123456789abcdef0123456789abcdef01234567";
        std::fs::create_dir_all(cache.blobs_dir()).unwrap();
        std::fs::write(cache.blob("e1"), b"one").unwrap();
        std::fs::write(cache.blob("e2"), b"two").unwrap();
        cache.link(commit, "sub/a.json", "e1").unwrap();
        let p = cache.snapshot_dir(commit).join("sub/a.json");
        assert_eq!(
            std::fs::read_link(&p).unwrap(),
            PathBuf::from("../../../blobs/e1")
        );
        cache.link(commit, "sub/a.json", "e2").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert!(cache.has_file(commit, "sub/a.json"));
        cache.write_ref("main", commit).unwrap();
        assert_eq!(cache.read_ref("main").as_deref(), Some(commit));
        assert_eq!(cache.read_ref(commit).as_deref(), Some(commit));
        assert_eq!(cache.read_ref("other"), None);
    }
}
