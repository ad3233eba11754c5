//! Where a pack came from: the blake3 of every file a conversion reads ([`Provenance`]), hashed
//! in parallel or beside the conversion, and the list of the source's files no pack may be
//! written over ([`Checkpoint::input_files`]).
//! Invariant: hashing a model bigger than memory does not make the process as big (each chunk's
//! pages are released once hashed).

use super::{io_err, Checkpoint, LoadError};
use crate::mapped::Bytes;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// One source file and its fingerprint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceFile {
    /// Path relative to the checkpoint folder.
    pub name: String,
    pub size: u64,
    /// blake3 of the whole file, hex.
    pub blake3: String,
}

/// Where a pack came from: stored in its metadata so a pack can be traced to its source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provenance {
    pub source: String,
    /// The commit a Hub source resolved to.
    pub revision: Option<String>,
    pub files: Vec<SourceFile>,
}

/// blake3 of one file (mapped when `mapped` is given, else read), released from the resident
/// set chunk by chunk so hashing a model bigger than memory does not make the process as big.
fn hash_file(
    name: &str,
    path: &Path,
    mapped: Option<&Bytes>,
    cancel: &AtomicBool,
) -> Result<SourceFile, LoadError> {
    let owned;
    let bytes: &[u8] = match mapped {
        Some(b) => b,
        None => {
            owned = std::fs::read(path).map_err(io_err(path))?;
            &owned
        }
    };
    let mut h = blake3::Hasher::new();
    const CHUNK: usize = 8 << 20;
    for (i, c) in bytes.chunks(CHUNK).enumerate() {
        if cancel.load(Ordering::Relaxed) {
            return Err(LoadError::Cancelled);
        }
        h.update(c);
        if let Some(b) = mapped {
            b.release(i * CHUNK, c.len());
        }
    }
    Ok(SourceFile {
        name: name.to_string(),
        size: bytes.len() as u64,
        blake3: h.finalize().to_hex().to_string(),
    })
}

impl Checkpoint {
    /// Hashes `config.json`, the index (if any) and every shard with blake3, files in parallel.
    pub fn provenance(&self) -> Result<Provenance, LoadError> {
        let never = AtomicBool::new(false);
        let files = self
            .hash_jobs()
            .par_iter()
            .map(|(name, path, mapped)| hash_file(name, path, *mapped, &never))
            .collect::<Result<Vec<_>, LoadError>>()?;
        Ok(self.provenance_of(files))
    }

    /// [`Checkpoint::provenance`] on the calling thread, one file after another, so it can run
    /// beside the conversion (which has the rayon pool) and overlap its reads with that work.
    /// Stops with [`LoadError::Cancelled`] soon after `cancel` is set.
    pub fn provenance_in_order(&self, cancel: &AtomicBool) -> Result<Provenance, LoadError> {
        let files = self
            .hash_jobs()
            .iter()
            .map(|(name, path, mapped)| hash_file(name, path, *mapped, cancel))
            .collect::<Result<Vec<_>, LoadError>>()?;
        Ok(self.provenance_of(files))
    }

    /// The record for `files`: the Hub repository and commit when the source came from the Hub,
    /// else the folder.
    fn provenance_of(&self, files: Vec<SourceFile>) -> Provenance {
        Provenance {
            source: self
                .origin
                .as_ref()
                .map_or_else(|| self.root.display().to_string(), |(repo, _)| repo.clone()),
            revision: self.origin.as_ref().and_then(|(_, c)| c.clone()),
            files,
        }
    }

    /// Every file of the source folder that a conversion reads: the fingerprinted ones, and the
    /// tokenizer and generation files that go into the metadata; also the shards of MTP layers
    /// it skips, which are the source's files all the same (no pack may be written over them).
    pub fn input_files(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = self.hash_jobs().into_iter().map(|(_, p, _)| p).collect();
        files.extend(
            self.dropped_mtp
                .skipped_shards
                .iter()
                .map(|s| self.root.join(s)),
        );
        for name in [
            "tokenizer.json",
            "tokenizer_config.json",
            "generation_config.json",
            "chat_template.jinja",
            "chat_template.json",
        ] {
            files.push(self.root.join(name));
        }
        files
    }

    /// Files to fingerprint: `config.json`, the index (if any), every shard.
    fn hash_jobs(&self) -> Vec<(String, PathBuf, Option<&Bytes>)> {
        let mut names: Vec<String> = vec!["config.json".into()];
        if self.root.join("model.safetensors.index.json").is_file() {
            names.push("model.safetensors.index.json".into());
        }
        let mut jobs: Vec<(String, PathBuf, Option<&Bytes>)> = names
            .into_iter()
            .map(|n| (n.clone(), self.root.join(n), None))
            .collect();
        jobs.extend(
            self.shards
                .iter()
                .map(|s| (s.name.clone(), s.path.clone(), Some(&s.bytes))),
        );
        jobs
    }
}
