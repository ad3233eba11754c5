//! Read stage of `flashpack plan`: a source -> a header-only copy of it, and a count of every
//! byte read.
//!
//! In: a [`Source`]: a checkpoint folder, a Hub repository (`org/name[@rev]`), or a pack.
//! Out: a [`Shadow`]: a temporary folder holding `config.json`, the shard index when there is
//! one, and each shard the loader opens as a sparse file of the shard's length whose only
//! written bytes are its safetensors header; for a pack, one sparse file of the pack's length
//! holding its header region, directories and metadata. And a [`ReadLog`] of every range read.
//! Invariant: the source is read only through [`Files::read`], and only `config.json`, the
//! index, each shard's 8-byte length and header (and the few bytes of compressed-tensors'
//! `*.weight_shape` integers, which the loader reads to size packed weights), or a pack's header
//! region, directories and metadata: no weight byte enters the process. The loader (`Checkpoint::open`) and the pack
//! reader (`Pack::open`) then run unchanged on the shadow, whose weights are holes.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io::{Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use super::PlanError;
use crate::checkpoint::{ShardIndex, SourceSpec, TensorFilter};
use crate::format::{Header, SectionKind, HEADER_SIZE, MAX_SECTIONS, SECTION_ENTRY_SIZE};
use crate::hub::{Hub, RemoteFiles};

/// The config, the index and the single-file weights of a checkpoint.
const CONFIG: &str = "config.json";
const INDEX: &str = "model.safetensors.index.json";
const SINGLE: &str = "model.safetensors";
/// Largest safetensors header read (the format's own limit is 100 MB).
const MAX_HEADER: u64 = 100_000_000;
/// Largest config or index read whole.
const MAX_JSON: u64 = 64 << 20;

/// What the user named.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Folder(PathBuf),
    Pack(PathBuf),
    Hub {
        repo: String,
        revision: Option<String>,
    },
}

impl Source {
    /// An existing file is a pack, an existing folder a checkpoint; otherwise `org/name[@rev]`
    /// is a Hub repository, and anything else a missing path (the error names it).
    pub fn parse(s: &str) -> Source {
        let path = Path::new(s);
        if path.is_file() || s.ends_with(".flashpack") {
            return Source::Pack(path.to_path_buf());
        }
        match SourceSpec::parse(s) {
            SourceSpec::Local(p) => Source::Folder(p),
            SourceSpec::Hub { repo, revision } => Source::Hub { repo, revision },
        }
    }
}

/// Where a source's files are read from, by ranges.
pub trait Files {
    /// The files there are (paths relative to the source).
    fn list(&self) -> Result<Vec<String>, PlanError>;
    /// The size of `file`.
    fn len(&self, file: &str) -> Result<u64, PlanError>;
    /// Bytes `range` of `file`.
    fn read(&self, file: &str, range: Range<u64>) -> Result<Vec<u8>, PlanError>;
}

/// A folder on disk.
pub struct LocalFiles {
    pub root: PathBuf,
}

impl Files for LocalFiles {
    fn list(&self) -> Result<Vec<String>, PlanError> {
        let io = |e| PlanError::io(&self.root, e);
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.root).map_err(io)? {
            let entry = entry.map_err(io)?;
            out.push(entry.file_name().to_string_lossy().into_owned());
        }
        out.sort();
        Ok(out)
    }

    fn len(&self, file: &str) -> Result<u64, PlanError> {
        let path = self.root.join(file);
        let meta = std::fs::metadata(&path).map_err(|e| PlanError::io(&path, e))?;
        Ok(meta.len())
    }

    fn read(&self, file: &str, range: Range<u64>) -> Result<Vec<u8>, PlanError> {
        use std::os::unix::fs::FileExt;
        let path = self.root.join(file);
        let f = std::fs::File::open(&path).map_err(|e| PlanError::io(&path, e))?;
        let mut buf = vec![0u8; (range.end - range.start) as usize];
        f.read_exact_at(&mut buf, range.start)
            .map_err(|e| PlanError::io(&path, e))?;
        Ok(buf)
    }
}

/// A Hub repository at one commit.
pub struct HubFiles<'h>(pub RemoteFiles<'h>);

impl Files for HubFiles<'_> {
    fn list(&self) -> Result<Vec<String>, PlanError> {
        Ok(self.0.files().to_vec())
    }

    fn len(&self, file: &str) -> Result<u64, PlanError> {
        Ok(self.0.size(file)?)
    }

    fn read(&self, file: &str, range: Range<u64>) -> Result<Vec<u8>, PlanError> {
        Ok(self.0.read(file, range)?)
    }
}

/// Every range read from a source, in order.
#[derive(Clone, Debug, Default)]
pub struct ReadLog {
    pub reads: Vec<(String, Range<u64>)>,
}

impl ReadLog {
    /// Bytes read per file.
    pub fn per_file(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for (f, r) in &self.reads {
            *out.entry(f.clone()).or_insert(0) += r.end - r.start;
        }
        out
    }

    pub fn total(&self) -> u64 {
        self.reads.iter().map(|(_, r)| r.end - r.start).sum()
    }
}

/// [`Files`] that records every read in a [`ReadLog`].
pub struct Counted<'f> {
    inner: &'f dyn Files,
    log: RefCell<ReadLog>,
}

impl<'f> Counted<'f> {
    pub fn new(inner: &'f dyn Files) -> Counted<'f> {
        Counted {
            inner,
            log: RefCell::new(ReadLog::default()),
        }
    }

    pub fn log(&self) -> ReadLog {
        self.log.borrow().clone()
    }
}

impl Files for Counted<'_> {
    fn list(&self) -> Result<Vec<String>, PlanError> {
        self.inner.list()
    }

    fn len(&self, file: &str) -> Result<u64, PlanError> {
        self.inner.len(file)
    }

    fn read(&self, file: &str, range: Range<u64>) -> Result<Vec<u8>, PlanError> {
        let out = self.inner.read(file, range.clone())?;
        self.log.borrow_mut().reads.push((file.to_string(), range));
        Ok(out)
    }
}

/// What the shadow holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShadowKind {
    /// A checkpoint folder (the shadow's folder).
    Checkpoint,
    /// A pack: this file in the shadow's folder.
    Pack(PathBuf),
}

/// The header-only copy of a source.
pub struct Shadow {
    dir: tempfile::TempDir,
    pub kind: ShadowKind,
    /// Each copied file's length in the source.
    pub files: BTreeMap<String, u64>,
    /// The Hub commit, for a Hub source.
    pub commit: Option<String>,
    /// The length of the checkpoint's `tokenizer.json` (not read: the metadata's size guess).
    pub tokenizer_bytes: u64,
}

impl Shadow {
    /// The folder (a checkpoint's root).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// Copies `file` into the shadow as a sparse file of `len` bytes holding `parts` at their
/// offsets.
fn write_sparse(
    dir: &Path,
    file: &str,
    len: u64,
    parts: &[(u64, Vec<u8>)],
) -> Result<(), PlanError> {
    let path = dir.join(file);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| PlanError::io(parent, e))?;
    }
    let mut f = std::fs::File::create(&path).map_err(|e| PlanError::io(&path, e))?;
    for (at, bytes) in parts {
        f.seek(SeekFrom::Start(*at))
            .and_then(|_| f.write_all(bytes))
            .map_err(|e| PlanError::io(&path, e))?;
    }
    f.set_len(len).map_err(|e| PlanError::io(&path, e))?;
    Ok(())
}

/// A file read whole (config, index), refused above [`MAX_JSON`].
fn read_small(files: &dyn Files, file: &str) -> Result<(u64, Vec<u8>), PlanError> {
    let len = files.len(file)?;
    if len > MAX_JSON {
        return Err(PlanError::NotACheckpoint {
            detail: format!("{file} is {len} bytes, more than a config or index has"),
        });
    }
    Ok((len, files.read(file, 0..len)?))
}

/// File ranges of the `*.weight_shape` tensors a safetensors header lists (`data` starts at
/// `base`; ranges past `len` or larger than a few integers are left out, for the loader to
/// refuse).
fn shape_tensors(header: &[u8], base: u64, len: u64) -> Vec<Range<u64>> {
    let Ok(serde_json::Value::Object(map)) = serde_json::from_slice(header) else {
        return Vec::new();
    };
    let mut out: Vec<Range<u64>> = map
        .iter()
        .filter(|(name, _)| name.ends_with(".weight_shape"))
        .filter_map(|(_, v)| {
            let o = v.get("data_offsets")?.as_array()?;
            let (a, b) = (o.first()?.as_u64()?, o.get(1)?.as_u64()?);
            let r = base.checked_add(a)?..base.checked_add(b)?;
            (a <= b && b - a <= 64 && r.end <= len).then_some(r)
        })
        .collect();
    out.sort_by_key(|r| r.start);
    out
}

/// The shadow of a checkpoint whose files `files` lists.
pub fn checkpoint_shadow(files: &dyn Files) -> Result<Shadow, PlanError> {
    let listed = files.list()?;
    let has = |f: &str| listed.iter().any(|l| l == f);
    if !has(CONFIG) {
        return Err(PlanError::NotACheckpoint {
            detail: format!("it has no {CONFIG}"),
        });
    }
    let dir = tempfile::Builder::new()
        .prefix("flashpack-plan-")
        .tempdir()
        .map_err(|e| PlanError::io(&std::env::temp_dir(), e))?;
    let mut copied = BTreeMap::new();
    let (len, config) = read_small(files, CONFIG)?;
    write_sparse(dir.path(), CONFIG, len, &[(0, config.clone())])?;
    copied.insert(CONFIG.to_string(), len);
    let shards: Vec<String> = if has(INDEX) {
        let (len, text) = read_small(files, INDEX)?;
        write_sparse(dir.path(), INDEX, len, &[(0, text.clone())])?;
        copied.insert(INDEX.to_string(), len);
        let bad = |detail: String| PlanError::NotACheckpoint {
            detail: format!("{INDEX}: {detail}"),
        };
        let index = ShardIndex::parse(&String::from_utf8_lossy(&text))
            .map_err(|e| bad(format!("not a shard index: {e}")))?;
        let config: serde_json::Value =
            serde_json::from_slice(&config).map_err(|e| PlanError::NotACheckpoint {
                detail: format!("{CONFIG} is not JSON: {e}"),
            })?;
        // The loader's own rule: shards holding only what it drops are never opened.
        let filter = TensorFilter::from_config(&config).map_err(|e| bad(e.to_string()))?;
        let plan = index.plan(&filter);
        let needed: Vec<String> = plan.needed.iter().map(|s| s.to_string()).collect();
        if let Some(s) = needed
            .iter()
            .find(|s| s.contains("..") || s.starts_with('/'))
        {
            return Err(bad(format!("shard name {s:?} leaves the folder")));
        }
        needed
    } else if has(SINGLE) {
        vec![SINGLE.to_string()]
    } else {
        return Err(PlanError::NotACheckpoint {
            detail: format!("it has neither {SINGLE} nor {INDEX}"),
        });
    };
    for shard in &shards {
        if !has(shard) && !listed.iter().any(|l| Path::new(l) == Path::new(shard)) {
            // Nested shard paths are not in a folder's top-level listing: ask for the size.
            if files.len(shard).is_err() {
                return Err(PlanError::NotACheckpoint {
                    detail: format!("{INDEX} lists shard {shard}, which is missing"),
                });
            }
        }
        let len = files.len(shard)?;
        let short = |what: &str| PlanError::NotACheckpoint {
            detail: format!("{shard} ({len} bytes) is not a safetensors file: {what}"),
        };
        if len < 8 {
            return Err(short("shorter than its 8-byte header length"));
        }
        let n = u64::from_le_bytes(files.read(shard, 0..8)?.try_into().expect("8 bytes"));
        if n > MAX_HEADER || 8 + n > len {
            return Err(short(&format!(
                "its header claims {n} bytes, past the file's end or the 100 MB limit"
            )));
        }
        let header = files.read(shard, 8..8 + n)?;
        let mut parts = vec![(0, n.to_le_bytes().to_vec())];
        // compressed-tensors' `W.weight_shape`: two integers the loader reads to size a packed
        // weight (the unpacked columns), metadata stored as a tensor, not a weight.
        for range in shape_tensors(&header, 8 + n, len) {
            parts.push((range.start, files.read(shard, range)?));
        }
        parts.insert(1, (8, header));
        write_sparse(dir.path(), shard, len, &parts)?;
        copied.insert(shard.clone(), len);
    }
    let tokenizer_bytes = if has("tokenizer.json") {
        files.len("tokenizer.json").unwrap_or(0)
    } else {
        0
    };
    Ok(Shadow {
        dir,
        kind: ShadowKind::Checkpoint,
        files: copied,
        commit: None,
        tokenizer_bytes,
    })
}

/// The shadow of the pack `file` of `files`.
pub fn pack_shadow(files: &dyn Files, file: &str) -> Result<Shadow, PlanError> {
    let len = files.len(file)?;
    let not = |reason: String| PlanError::NotAPack {
        file: file.to_string(),
        reason,
    };
    if len < HEADER_SIZE as u64 {
        return Err(not(format!("{len} bytes, shorter than a pack's header")));
    }
    // The header region: the fixed header, the section table, its hash.
    let most = (HEADER_SIZE + MAX_SECTIONS as usize * SECTION_ENTRY_SIZE + 32) as u64;
    let region = files.read(file, 0..most.min(len))?;
    let header = Header::decode(&region).map_err(|e| not(e.to_string()))?;
    if header.file_size != len {
        return Err(not(format!(
            "its header gives {} bytes, the file has {len}",
            header.file_size
        )));
    }
    let region_len = (header.region_len()).min(region.len() as u64) as usize;
    let mut parts = vec![(0, region[..region_len].to_vec())];
    for s in &header.sections {
        let wanted = matches!(
            s.known_kind(),
            Some(SectionKind::TensorDir | SectionKind::ExpertDir | SectionKind::Metadata)
        );
        let end = s.offset.checked_add(s.stored_len).filter(|&e| e <= len);
        match (wanted, end) {
            (true, Some(end)) => parts.push((s.offset, files.read(file, s.offset..end)?)),
            (true, None) => return Err(not("a section runs past the file's end".into())),
            (false, _) => {}
        }
    }
    let dir = tempfile::Builder::new()
        .prefix("flashpack-plan-")
        .tempdir()
        .map_err(|e| PlanError::io(&std::env::temp_dir(), e))?;
    let name = Path::new(file).file_name().map_or_else(
        || "pack.flashpack".into(),
        |n| n.to_string_lossy().into_owned(),
    );
    write_sparse(dir.path(), &name, len, &parts)?;
    Ok(Shadow {
        kind: ShadowKind::Pack(dir.path().join(&name)),
        dir,
        files: BTreeMap::from([(file.to_string(), len)]),
        commit: None,
        tokenizer_bytes: 0,
    })
}

/// Reads `source` into a shadow, through a [`Counted`] reader whose log comes back with it.
pub fn shadow_of(source: &Source, hub: &Hub) -> Result<(Shadow, ReadLog), PlanError> {
    match source {
        Source::Folder(dir) => {
            if !dir.exists() {
                return Err(PlanError::MissingSource { path: dir.clone() });
            }
            if !dir.is_dir() {
                return Err(PlanError::NotACheckpoint {
                    detail: format!("{} is not a folder", dir.display()),
                });
            }
            let local = LocalFiles { root: dir.clone() };
            let counted = Counted::new(&local);
            let shadow = checkpoint_shadow(&counted)?;
            Ok((shadow, counted.log()))
        }
        Source::Pack(path) => {
            if !path.exists() {
                return Err(PlanError::MissingSource { path: path.clone() });
            }
            let root = path.parent().filter(|p| !p.as_os_str().is_empty());
            let local = LocalFiles {
                root: root.map_or_else(|| PathBuf::from("."), Path::to_path_buf),
            };
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            let counted = Counted::new(&local);
            let shadow = pack_shadow(&counted, name.as_deref().unwrap_or_default())?;
            Ok((shadow, counted.log()))
        }
        Source::Hub { repo, revision } => {
            if hub.config().offline {
                // No request may be made: a complete snapshot in the cache is planned as a folder.
                let snap =
                    hub.download_checkpoint(repo, revision.as_deref(), &crate::progress::Silent)?;
                return shadow_of(&Source::Folder(snap.dir), hub);
            }
            let remote = HubFiles(hub.remote_files(repo, revision.as_deref())?);
            let commit = remote.0.commit().to_string();
            let listed = remote.0.files().to_vec();
            let counted = Counted::new(&remote);
            let packs: Vec<&String> = listed
                .iter()
                .filter(|f| f.ends_with(".flashpack"))
                .collect();
            let mut shadow = match (listed.iter().any(|f| f == CONFIG), packs.as_slice()) {
                (false, [one]) => pack_shadow(&counted, one)?,
                _ => checkpoint_shadow(&counted)?,
            };
            shadow.commit = Some(commit);
            Ok((shadow, counted.log()))
        }
    }
}
