//! The pack writer: formats/flashpack-v1.md, produced in one sequential pass.
//!
//! In: dense tensors (sorted by name), then expert segments (sorted by layer, expert, segment),
//! each already encoded; then the metadata. Out: a pack at the destination, atomically.
//! Invariants: bytes go to a temporary file in the destination folder, which is fsynced and
//! renamed over the destination only when complete, so an interrupted write never leaves a file
//! at the destination and never truncates an existing pack. Offsets come from the pure
//! [`Planner`]; the same inputs give the same bytes. Before anything is renamed, the encoded
//! directories are parsed back with the reader's own checks.

use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::directory::{
    decode_expert_dir, decode_tensor_dir, encode_expert_dir, encode_tensor_dir,
};
use super::header::{SectionEntry, SECTION_ZSTD};
use super::layout::{Planner, SECTION_COUNT};
use super::metadata::{Directories, Metadata};
use super::{
    codec_id, expert_bias_len, optional, required, segment_part_lens, valid_page_size, DType,
    ExpertEntry, Header, PackError, ProjBits, QuantMode, SectionKind, TensorEntry, MAJOR_VERSION,
    MINOR_VERSION,
};

/// zstd level for the metadata section: fast enough, and deterministic (single-threaded).
const METADATA_ZSTD_LEVEL: i32 = 10;

/// A dense tensor to write (its stored bytes are passed alongside).
#[derive(Clone, Debug)]
pub struct TensorDesc {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    /// 0 for a plain tensor, else bits per packed code (dtype U32).
    pub bits: u8,
    /// Quantization mode of packed codes; affine for plain tensors.
    pub mode: QuantMode,
    /// Quantization group size for packed codes, else 0.
    pub group_size: u32,
    pub codec: u8,
}

/// An expert segment to write (its two stored parts are passed alongside).
#[derive(Clone, Debug)]
pub struct ExpertSegmentDesc {
    pub layer: u32,
    pub expert: u32,
    pub segment: u16,
    pub segment_count: u16,
    pub row_start: u32,
    pub row_count: u32,
    pub bits: ProjBits,
    pub group_size: u32,
    pub scale_dtype: DType,
    pub mode: QuantMode,
    /// The expert's projection biases' float type, when its AUX part ends with them (§6.4).
    pub bias_dtype: Option<DType>,
    pub weight_codec: u8,
    pub aux_codec: u8,
}

/// What was written.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PackSummary {
    pub path: PathBuf,
    pub file_size: u64,
    pub dense_bytes: u64,
    pub expert_bytes: u64,
    pub padding_bytes: u64,
    pub tensors: usize,
    pub segments: usize,
    pub required_features: u64,
    pub optional_features: u64,
    pub blake3: String,
    /// Temporary files of interrupted writers that this one found in the folder and removed.
    pub removed_stale_temp_files: Vec<PathBuf>,
}

enum Phase {
    Dense,
    Experts,
}

/// Writes one pack; see the module docs for the order of calls.
pub struct PackWriter {
    dest: PathBuf,
    tmp: tempfile::NamedTempFile<File>,
    /// Removes the temporary file on SIGINT / SIGTERM until the pack is renamed into place.
    cleanup: super::tempfiles::Registered,
    removed_stale: Vec<PathBuf>,
    out: BufWriter<File>,
    hasher_pos: u64,
    planner: Planner,
    page_size: u32,
    hidden_size: u32,
    intermediate_size: u32,
    phase: Phase,
    dense_start: u64,
    dense_end: u64,
    experts_start: u64,
    tensors: Vec<TensorEntry>,
    experts: Vec<ExpertEntry>,
    payload_bytes: u64,
}

impl PackWriter {
    /// Starts a pack for a model of width `hidden_size` whose experts have `intermediate_size`
    /// rows. Creates the temporary file next to `dest` (so the final rename stays on one disk).
    pub fn create(
        dest: &Path,
        page_size: u32,
        hidden_size: u32,
        intermediate_size: u32,
    ) -> Result<PackWriter, PackError> {
        if !valid_page_size(page_size) {
            return Err(PackError::Writer {
                reason: format!("page size {page_size} is not a power of two from 4096 to 65536"),
            });
        }
        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if dest.is_dir() {
            return Err(PackError::Writer {
                reason: format!(
                    "destination {} is a directory; give a file name such as model.flashpack",
                    dest.display()
                ),
            });
        }
        // The name is registered for removal on SIGINT/SIGTERM before the file exists, so no
        // signal can leave it behind. Created with mode 0666 less the umask, like any other file
        // (tempfile's default is 0600, which the rename would carry over to the pack).
        let mut builder = tempfile::Builder::new();
        let prefix = super::tempfiles::prefix();
        builder.prefix(&prefix);
        let mut cleanup = None;
        let tmp = builder
            .make_in(&dir, |path| {
                cleanup = Some(super::tempfiles::register(path));
                let mut o = std::fs::OpenOptions::new();
                o.read(true).write(true).create_new(true);
                #[cfg(unix)]
                {
                    use std::os::unix::fs::OpenOptionsExt;
                    o.mode(0o666);
                }
                o.open(path)
            })
            .map_err(|e| PackError::io(&dir, e))?;
        let cleanup = cleanup.expect("registered before the file was created");
        let removed_stale = super::tempfiles::remove_stale(&dir);
        let file = tmp.reopen().map_err(|e| PackError::io(tmp.path(), e))?;
        let mut planner = Planner::new(page_size, SECTION_COUNT);
        let dense_start = planner.align_page();
        let mut w = PackWriter {
            dest: dest.to_path_buf(),
            out: BufWriter::with_capacity(1 << 20, file),
            tmp,
            cleanup,
            removed_stale,
            hasher_pos: 0,
            planner,
            page_size,
            hidden_size,
            intermediate_size,
            phase: Phase::Dense,
            dense_start,
            dense_end: dense_start,
            experts_start: 0,
            tensors: Vec::new(),
            experts: Vec::new(),
            payload_bytes: 0,
        };
        // The header is written last, over this placeholder.
        w.pad_to(dense_start)?;
        Ok(w)
    }

    fn io_err(&self, e: std::io::Error) -> PackError {
        PackError::io(self.tmp.path(), e)
    }

    fn pad_to(&mut self, offset: u64) -> Result<(), PackError> {
        const ZEROS: [u8; 4096] = [0; 4096];
        while self.hasher_pos < offset {
            let n = (offset - self.hasher_pos).min(ZEROS.len() as u64) as usize;
            self.out
                .write_all(&ZEROS[..n])
                .map_err(|e| self.io_err(e))?;
            self.hasher_pos += n as u64;
        }
        Ok(())
    }

    fn put(&mut self, offset: u64, bytes: &[u8]) -> Result<(), PackError> {
        self.pad_to(offset)?;
        self.out.write_all(bytes).map_err(|e| self.io_err(e))?;
        self.hasher_pos += bytes.len() as u64;
        self.payload_bytes += bytes.len() as u64;
        Ok(())
    }

    /// Adds a dense tensor. Names must come in strictly increasing byte order.
    pub fn add_tensor(&mut self, desc: TensorDesc, stored: &[u8]) -> Result<(), PackError> {
        if !matches!(self.phase, Phase::Dense) {
            return Err(PackError::Writer {
                reason: format!(
                    "tensor {} added after expert segments; add all dense tensors first",
                    desc.name
                ),
            });
        }
        if let Some(prev) = self.tensors.last() {
            if prev.name >= desc.name {
                return Err(PackError::Writer {
                    reason: format!(
                        "tensor {} added after {}; add tensors sorted by name",
                        desc.name, prev.name
                    ),
                });
            }
        }
        let decoded_len = TensorEntry::numel(&desc.shape)
            .and_then(|n| n.checked_mul(desc.dtype.size()))
            .ok_or_else(|| PackError::Writer {
                reason: format!("tensor {}: shape {:?} overflows", desc.name, desc.shape),
            })?;
        let offset = self.planner.place_tensor(stored.len() as u64);
        self.put(offset, stored)?;
        self.dense_end = self.planner.cursor();
        self.tensors.push(TensorEntry {
            name: desc.name,
            dtype: desc.dtype,
            bits: desc.bits,
            codec: desc.codec,
            group_size: desc.group_size,
            mode: desc.mode,
            shape: desc.shape,
            offset,
            stored_len: stored.len() as u64,
            decoded_len,
            blake3: *blake3::hash(stored).as_bytes(),
        });
        Ok(())
    }

    /// Adds one expert segment: its encoded WEIGHTS part, then its encoded AUX part (§6.2).
    /// Segments must come sorted by (layer, expert, segment).
    pub fn add_expert_segment(
        &mut self,
        desc: ExpertSegmentDesc,
        weights: &[u8],
        aux: &[u8],
    ) -> Result<(), PackError> {
        if matches!(self.phase, Phase::Dense) {
            self.phase = Phase::Experts;
            self.experts_start = self.planner.align_page();
        }
        let key = (desc.layer, desc.expert, desc.segment);
        if let Some(prev) = self.experts.last() {
            if prev.key() >= key {
                return Err(PackError::Writer {
                    reason: format!(
                        "segment {key:?} added after {:?}; add segments sorted",
                        prev.key()
                    ),
                });
            }
        }
        let (weights_decoded, aux_decoded) = segment_part_lens(
            self.hidden_size,
            desc.row_count,
            desc.bits,
            desc.group_size,
            desc.scale_dtype,
            desc.mode,
        )
        .and_then(|(w, a)| {
            let b = expert_bias_len(
                self.hidden_size,
                desc.row_count,
                desc.segment == 0,
                desc.bias_dtype,
            )?;
            Some((w, a.checked_add(b)?))
        })
        .ok_or_else(|| PackError::Writer {
            reason: format!(
                "segment {key:?}: {} rows of width {} do not divide into groups of {}",
                desc.row_count, self.hidden_size, desc.group_size
            ),
        })?;
        let stored_len = (weights.len() + aux.len()) as u64;
        let offset = self.planner.place_segment(stored_len);
        let mut hasher = blake3::Hasher::new();
        hasher.update(weights);
        hasher.update(aux);
        self.put(offset, weights)?;
        let aux_at = offset + weights.len() as u64;
        self.put(aux_at, aux)?;
        self.experts.push(ExpertEntry {
            layer: desc.layer,
            expert: desc.expert,
            segment: desc.segment,
            segment_count: desc.segment_count,
            bits: desc.bits,
            weight_codec: desc.weight_codec,
            aux_codec: desc.aux_codec,
            scale_dtype: desc.scale_dtype,
            group_size: desc.group_size,
            mode: desc.mode,
            bias_dtype: desc.bias_dtype,
            row_start: desc.row_start,
            row_count: desc.row_count,
            offset,
            stored_len,
            decoded_len: weights_decoded + aux_decoded,
            weights_stored_len: weights.len() as u64,
            weights_decoded_len: weights_decoded,
            blake3: *hasher.finalize().as_bytes(),
        });
        Ok(())
    }

    /// Writes directories, metadata and header, then fsyncs and renames onto the destination.
    pub fn finish(mut self, metadata: &Value) -> Result<PackSummary, PackError> {
        if matches!(self.phase, Phase::Dense) {
            self.experts_start = self.planner.align_page();
        }
        let experts_end = self.planner.align_page();
        // Parse back with the reader's checks: a pack this writer finishes is one readers accept.
        let typed = Metadata::parse(metadata.clone()).map_err(self_check)?;
        let (required, optional) = features(&self.tensors, &self.experts, &typed);

        let tensor_dir = encode_tensor_dir(&self.tensors);
        let expert_dir = encode_expert_dir(&self.experts, self.hidden_size, self.intermediate_size);
        let dense = self.dense_start..self.dense_end;
        decode_tensor_dir(&tensor_dir, &dense).map_err(self_check)?;
        let experts = self.experts_start..experts_end;
        let dir = decode_expert_dir(&expert_dir, &experts, self.page_size).map_err(self_check)?;
        typed
            .validate(&Directories {
                tensors: &self.tensors,
                experts: &dir.entries,
                hidden_size: dir.hidden_size,
                intermediate_size: dir.intermediate_size,
            })
            .map_err(self_check)?;
        let meta_json = canonical_json(metadata);
        let meta = zstd::bulk::compress(&meta_json, METADATA_ZSTD_LEVEL).map_err(|e| {
            PackError::Writer {
                reason: format!("compressing metadata: {e}"),
            }
        })?;

        let mut sections = vec![
            SectionEntry {
                kind: SectionKind::DenseData as u32,
                flags: 0,
                offset: dense.start,
                stored_len: dense.end - dense.start,
                decoded_len: dense.end - dense.start,
                blake3: [0; 32],
            },
            SectionEntry {
                kind: SectionKind::ExpertData as u32,
                flags: 0,
                offset: experts.start,
                stored_len: experts.end - experts.start,
                decoded_len: experts.end - experts.start,
                blake3: [0; 32],
            },
        ];
        for (kind, bytes, flags, decoded_len) in [
            (SectionKind::TensorDir, &tensor_dir, 0, tensor_dir.len()),
            (SectionKind::ExpertDir, &expert_dir, 0, expert_dir.len()),
            (SectionKind::Metadata, &meta, SECTION_ZSTD, meta_json.len()),
        ] {
            let offset = self.planner.place_section(bytes.len() as u64);
            self.pad_to(offset)?;
            self.out.write_all(bytes).map_err(|e| self.io_err(e))?;
            self.hasher_pos += bytes.len() as u64;
            sections.push(SectionEntry {
                kind: kind as u32,
                flags,
                offset,
                stored_len: bytes.len() as u64,
                decoded_len: decoded_len as u64,
                blake3: *blake3::hash(bytes).as_bytes(),
            });
        }
        sections.sort_by_key(|s| s.kind);
        let file_size = self.planner.cursor();
        debug_assert_eq!(file_size, self.hasher_pos);
        let header = Header {
            major: MAJOR_VERSION,
            minor: MINOR_VERSION,
            required_features: required,
            optional_features: optional,
            page_size: self.page_size,
            file_size,
            sections,
        };
        let header_bytes = header.encode();
        let mut file = self
            .out
            .into_inner()
            .map_err(|e| PackError::io(self.tmp.path(), e.into_error()))?;
        let tmp_path = self.tmp.path().to_path_buf();
        let io = |e| PackError::io(&tmp_path, e);
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        file.write_all(&header_bytes).map_err(io)?;
        file.sync_all().map_err(io)?;
        drop(file);
        let header_hash = blake3::hash(&header_bytes).to_hex().to_string();
        self.tmp
            .persist(&self.dest)
            .map_err(|e| PackError::io(&self.dest, e.error))?;
        drop(self.cleanup);
        sync_parent(&self.dest);
        let dense_bytes: u64 = self.tensors.iter().map(|t| t.stored_len).sum();
        let expert_bytes: u64 = self.experts.iter().map(|e| e.stored_len).sum();
        Ok(PackSummary {
            path: self.dest,
            file_size,
            dense_bytes,
            expert_bytes,
            padding_bytes: file_size
                - self.payload_bytes
                - (tensor_dir.len() + expert_dir.len() + meta.len() + header_bytes.len()) as u64,
            tensors: self.tensors.len(),
            segments: self.experts.len(),
            required_features: required,
            optional_features: optional,
            blake3: header_hash,
            removed_stale_temp_files: self.removed_stale,
        })
    }
}

fn self_check(e: PackError) -> PackError {
    PackError::Writer {
        reason: format!("the pack being written would be invalid: {e}"),
    }
}

/// Makes the rename durable where the platform allows syncing a directory.
fn sync_parent(dest: &Path) {
    if let Some(dir) = dest.parent().filter(|p| !p.as_os_str().is_empty()) {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

/// Feature flags implied by what a pack holds (formats/flashpack-v1.md §2.2).
pub(crate) fn features(
    tensors: &[TensorEntry],
    experts: &[ExpertEntry],
    metadata: &Metadata,
) -> (u64, u64) {
    let mut req = 0;
    let codecs = tensors
        .iter()
        .map(|t| t.codec)
        .chain(experts.iter().flat_map(|e| [e.weight_codec, e.aux_codec]));
    for c in codecs {
        req |= codec_id::required_flag(c).unwrap_or(0);
    }
    if experts.iter().any(|e| e.segment_count > 1) {
        req |= required::VERTICAL_SEGMENTS;
    }
    if experts
        .windows(2)
        .any(|w| w[0].layer == w[1].layer && w[0].bits != w[1].bits)
    {
        req |= required::MIXED_EXPERT_BITS;
    }
    if experts.iter().any(|e| !e.bits.is_uniform()) {
        req |= required::PROJECTION_BITS;
    }
    if experts.iter().any(|e| e.mode != QuantMode::Affine)
        || tensors.iter().any(|t| t.mode != QuantMode::Affine)
    {
        req |= required::MX_MODES;
    }
    if experts.iter().any(|e| e.mode == QuantMode::Nvfp4)
        || tensors.iter().any(|t| t.mode == QuantMode::Nvfp4)
    {
        req |= required::NVFP4;
    }
    if metadata.merges_experts() {
        req |= required::MERGED_EXPERTS;
    }
    if experts.iter().any(|e| e.bias_dtype.is_some()) {
        req |= required::EXPERT_BIASES;
    }
    let mut opt = 0;
    if metadata.profile().is_some() {
        opt |= optional::EXPERT_PROFILE;
    }
    if metadata.chat_template.is_some() {
        opt |= optional::CHAT_TEMPLATE;
    }
    (req, opt)
}

/// JSON with object keys sorted and no whitespace, whatever serde_json's map order is.
pub(crate) fn canonical_json(value: &Value) -> Vec<u8> {
    fn put(v: &Value, out: &mut Vec<u8>) {
        match v {
            Value::Object(map) => {
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                out.push(b'{');
                for (i, k) in keys.into_iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    serde_json::to_writer(&mut *out, k).expect("string");
                    out.push(b':');
                    put(&map[k], out);
                }
                out.push(b'}');
            }
            Value::Array(items) => {
                out.push(b'[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    put(item, out);
                }
                out.push(b']');
            }
            other => serde_json::to_writer(&mut *out, other).expect("scalar"),
        }
    }
    let mut out = Vec::new();
    put(value, &mut out);
    out
}
