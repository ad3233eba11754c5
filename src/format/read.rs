//! The pack reader: formats/flashpack-v1.md §8, "what a reader does with damage".
//!
//! In: the bytes of a pack (a read-only map, or a buffer in tests). Out: a [`Pack`] whose
//! header, directories and metadata were checked (structure and blake3) at open, in the order
//! of §8. Payload checksums are opt-in ([`Pack::verify`], [`Pack::check_segment`]).
//! Invariant: every range a `Pack` hands out lies inside the file.

use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::directory::{decode_expert_dir, decode_tensor_dir};
use super::header::{hex, SECTION_ZSTD};
use super::metadata::{Directories, Metadata};
use super::write::features;
use super::{
    required, ExpertEntry, Header, PackError, SectionEntry, SectionKind, TensorEntry,
    MAX_METADATA_LEN,
};
use crate::mapped::Bytes;

/// An opened pack.
pub struct Pack {
    bytes: Bytes,
    path: Option<PathBuf>,
    header: Header,
    tensors: Vec<TensorEntry>,
    experts: Vec<ExpertEntry>,
    hidden_size: u32,
    intermediate_size: u32,
    metadata: Metadata,
}

impl Pack {
    /// Maps and opens the pack at `path`.
    pub fn open(path: &Path) -> Result<Pack, PackError> {
        // Opening a FIFO for reading would wait for a writer forever, and a folder or device
        // gives a confusing error: refuse anything but a regular file first.
        let meta = std::fs::metadata(path).map_err(|e| PackError::io(path, e))?;
        if meta.is_dir() {
            return Err(PackError::NotAPack {
                reason: format!("{} is a folder", path.display()),
            });
        }
        if !meta.is_file() {
            return Err(PackError::NotAPack {
                reason: format!(
                    "{} is not a regular file (a pipe, socket or device)",
                    path.display()
                ),
            });
        }
        let bytes = Bytes::map(path).map_err(|e| PackError::io(path, e))?;
        let mut pack = Pack::from_bytes(bytes)?;
        pack.path = Some(path.to_path_buf());
        Ok(pack)
    }

    /// Opens a pack held in memory (tests, fuzzing).
    pub fn from_bytes(bytes: Bytes) -> Result<Pack, PackError> {
        let header = Header::decode(&bytes)?;
        let file_len = bytes.len() as u64;
        let region = header.region_len();
        if file_len < region {
            return Err(PackError::Truncated {
                what: "header region",
                expected: region,
                file_len,
            });
        }
        if file_len < header.file_size {
            return Err(PackError::Truncated {
                what: "file_size",
                expected: header.file_size,
                file_len,
            });
        }
        if file_len > header.file_size {
            return Err(PackError::TrailingData {
                file_size: header.file_size,
                extra: file_len - header.file_size,
            });
        }
        check_sections(&header, region, file_len)?;
        let section = |kind: SectionKind| -> &SectionEntry {
            header
                .sections
                .iter()
                .find(|s| s.kind == kind as u32)
                .expect("checked by check_sections")
        };
        let range = |s: &SectionEntry| s.offset..s.offset + s.stored_len;
        let dense = range(section(SectionKind::DenseData));
        let expert_data = range(section(SectionKind::ExpertData));
        let tensor_dir = load_section(
            &bytes,
            section(SectionKind::TensorDir),
            SectionKind::TensorDir,
        )?;
        let expert_dir = load_section(
            &bytes,
            section(SectionKind::ExpertDir),
            SectionKind::ExpertDir,
        )?;
        let meta = load_section(
            &bytes,
            section(SectionKind::Metadata),
            SectionKind::Metadata,
        )?;
        let tensors = decode_tensor_dir(&tensor_dir, &dense)?;
        let dir = decode_expert_dir(&expert_dir, &expert_data, header.page_size)?;
        let metadata = serde_json::from_slice(&meta).map_err(|e| PackError::BadMetadata {
            key: "metadata".into(),
            value: "not JSON".into(),
            rule: e.to_string(),
        })?;
        let metadata = Metadata::parse(metadata)?;
        let (needed, _) = features(&tensors, &dir.entries, &metadata);
        let undeclared = needed & !header.required_features;
        if undeclared != 0 {
            return Err(PackError::UndeclaredFeature {
                feature: feature_name(undeclared),
            });
        }
        metadata.validate(&Directories {
            tensors: &tensors,
            experts: &dir.entries,
            hidden_size: dir.hidden_size,
            intermediate_size: dir.intermediate_size,
        })?;
        Ok(Pack {
            bytes,
            path: None,
            header,
            tensors,
            experts: dir.entries,
            hidden_size: dir.hidden_size,
            intermediate_size: dir.intermediate_size,
            metadata,
        })
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The path the pack was opened from, when it came from a file.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// All bytes of the file.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// The metadata JSON as stored (for tools that show it verbatim); [`Pack::meta`] has it
    /// typed and checked.
    pub fn metadata(&self) -> &Value {
        self.metadata.raw()
    }

    /// The metadata, typed and checked against the directories at open
    /// (formats/flashpack-v1.md §4).
    pub fn meta(&self) -> &Metadata {
        &self.metadata
    }

    pub fn page_size(&self) -> u32 {
        self.header.page_size
    }

    /// The model width H of the expert directory.
    pub fn hidden_size(&self) -> u32 {
        self.hidden_size
    }

    /// Rows I of one expert's gate projection.
    pub fn intermediate_size(&self) -> u32 {
        self.intermediate_size
    }

    /// Dense tensors, sorted by name.
    pub fn tensors(&self) -> &[TensorEntry] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors
            .binary_search_by(|t| t.name.as_str().cmp(name))
            .ok()
            .map(|i| &self.tensors[i])
    }

    /// The stored bytes of a tensor (decode them with its codec).
    pub fn tensor_stored(&self, t: &TensorEntry) -> &[u8] {
        &self.bytes[t.stored_range()]
    }

    /// Drops `t`'s stored bytes from this process's resident set once they were copied out
    /// (mapped packs only: they stay in the page cache and fault back in if read again).
    pub fn release_tensor(&self, t: &TensorEntry) {
        let r = t.stored_range();
        self.bytes.release(r.start, r.end - r.start);
    }

    /// Expert segments, sorted by (layer, expert, segment).
    pub fn experts(&self) -> &[ExpertEntry] {
        &self.experts
    }

    /// The segments of one stored expert, in order; empty when it is not stored.
    pub fn expert_segments(&self, layer: u32, expert: u32) -> &[ExpertEntry] {
        let start = self
            .experts
            .partition_point(|e| (e.layer, e.expert) < (layer, expert));
        let end = self
            .experts
            .partition_point(|e| (e.layer, e.expert) <= (layer, expert));
        &self.experts[start..end]
    }

    /// The stored bytes of a segment: the WEIGHTS part, then the AUX part.
    pub fn segment_stored(&self, e: &ExpertEntry) -> &[u8] {
        &self.bytes[e.stored_range()]
    }

    /// The byte range of a section.
    pub fn section_range(&self, kind: SectionKind) -> Range<u64> {
        let s = self
            .header
            .sections
            .iter()
            .find(|s| s.kind == kind as u32)
            .expect("checked at open");
        s.offset..s.offset + s.stored_len
    }

    /// Checks a tensor's stored bytes against its checksum.
    pub fn check_tensor(&self, t: &TensorEntry) -> Result<(), PackError> {
        if blake3::hash(self.tensor_stored(t)).as_bytes() == &t.blake3 {
            Ok(())
        } else {
            Err(PackError::TensorChecksum {
                name: t.name.clone(),
            })
        }
    }

    /// Checks a segment's stored bytes against its checksum.
    pub fn check_segment(&self, e: &ExpertEntry) -> Result<(), PackError> {
        if blake3::hash(self.segment_stored(e)).as_bytes() == &e.blake3 {
            Ok(())
        } else {
            Err(PackError::SegmentChecksum {
                layer: e.layer,
                expert: e.expert,
                segment: e.segment,
            })
        }
    }
}

fn feature_name(bits: u64) -> &'static str {
    let lowest = bits & bits.wrapping_neg();
    match lowest {
        required::CODEC_HUFFMAN => "codec huffman (flag CODEC_HUFFMAN)",
        required::CODEC_ZSTD => "codec zstd (flag CODEC_ZSTD)",
        required::CODEC_LZ4 => "codec lz4 (flag CODEC_LZ4)",
        required::MERGED_EXPERTS => "a merge map (flag MERGED_EXPERTS)",
        required::VERTICAL_SEGMENTS => "multi-segment experts (flag VERTICAL_SEGMENTS)",
        required::MIXED_EXPERT_BITS => "mixed expert bits in a layer (flag MIXED_EXPERT_BITS)",
        required::PROJECTION_BITS => "per-projection expert bits (flag PROJECTION_BITS)",
        required::EXPERT_BIASES => "expert biases (flag EXPERT_BIASES)",
        required::NVFP4 => "nvfp4 quantization (flag NVFP4)",
        _ => "mxfp4/mxfp8 quantization (flag MX_MODES)",
    }
}

/// Step 6 of §8: every section inside the file body, no overlaps, each known kind once.
fn check_sections(header: &Header, region: u64, file_len: u64) -> Result<(), PackError> {
    let name = |s: &SectionEntry| s.known_kind().map_or("UNKNOWN", |k| k.name());
    let mut spans = Vec::with_capacity(header.sections.len());
    for s in &header.sections {
        let end = s.offset.checked_add(s.stored_len);
        if s.offset < region || end.is_none_or(|e| e > file_len) {
            return Err(PackError::SectionOutOfBounds {
                section: name(s),
                offset: s.offset,
                len: s.stored_len,
                start: region,
                file_len,
            });
        }
        spans.push((s.offset, s.offset + s.stored_len, name(s)));
    }
    spans.sort();
    for w in spans.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(PackError::SectionOverlap {
                a: w[0].2,
                b: w[1].2,
            });
        }
    }
    for kind in SectionKind::ALL {
        let n = header
            .sections
            .iter()
            .filter(|s| s.kind == kind as u32)
            .count();
        if n == 0 {
            return Err(PackError::MissingSection {
                section: kind.name(),
            });
        }
        if n > 1 {
            return Err(PackError::DuplicateSection {
                section: kind.name(),
            });
        }
    }
    for s in &header.sections {
        let Some(kind) = s.known_kind() else { continue };
        let compressed = s.flags & SECTION_ZSTD != 0;
        let bad_flags = s.flags & !SECTION_ZSTD != 0
            || (compressed && !kind.hashed())
            || (kind == SectionKind::Metadata && !compressed);
        if bad_flags {
            return Err(PackError::BadHeader {
                field: "section flags",
                value: s.flags as u64,
                reason: "METADATA must be zstd-compressed, data sections must not be, other bits must be 0",
            });
        }
        if !kind.hashed() && (s.decoded_len != s.stored_len || s.blake3 != [0; 32]) {
            return Err(PackError::BadHeader {
                field: "data section decoded_len/blake3",
                value: s.decoded_len,
                reason: "data sections have decoded_len = stored_len and a zero checksum",
            });
        }
        if kind == SectionKind::ExpertData && s.offset % header.page_size as u64 != 0 {
            return Err(PackError::Misaligned {
                what: "section EXPERT_DATA".into(),
                offset: s.offset,
                page_size: header.page_size,
            });
        }
    }
    Ok(())
}

/// Step 7 of §8: checksum, then (bounded) decompression of a hashed section.
fn load_section(bytes: &[u8], s: &SectionEntry, kind: SectionKind) -> Result<Vec<u8>, PackError> {
    let stored = &bytes[s.offset as usize..(s.offset + s.stored_len) as usize];
    let found = blake3::hash(stored);
    if found.as_bytes() != &s.blake3 {
        return Err(PackError::SectionChecksum {
            section: kind.name(),
            expected: hex(&s.blake3),
            found: found.to_hex().to_string(),
        });
    }
    if s.flags & SECTION_ZSTD == 0 {
        if s.decoded_len != s.stored_len {
            return Err(PackError::BadDirectory {
                section: kind.name(),
                reason: format!(
                    "uncompressed, yet decoded_len {} != stored_len {}",
                    s.decoded_len, s.stored_len
                ),
            });
        }
        return Ok(stored.to_vec());
    }
    if s.decoded_len > MAX_METADATA_LEN {
        return Err(PackError::SectionTooLarge {
            section: kind.name(),
            len: s.decoded_len,
            limit: MAX_METADATA_LEN,
        });
    }
    let decompress = |reason: String| PackError::Decompress {
        section: kind.name(),
        reason,
    };
    // Stream with a cap instead of trusting decoded_len for the allocation.
    let decoder =
        zstd::stream::read::Decoder::with_buffer(stored).map_err(|e| decompress(e.to_string()))?;
    let mut out = Vec::new();
    decoder
        .take(s.decoded_len + 1)
        .read_to_end(&mut out)
        .map_err(|e| decompress(e.to_string()))?;
    if out.len() as u64 != s.decoded_len {
        return Err(decompress(format!(
            "decoded {}{} bytes, the section table says {}",
            if out.len() as u64 > s.decoded_len {
                "more than "
            } else {
                ""
            },
            out.len().min(s.decoded_len as usize),
            s.decoded_len
        )));
    }
    Ok(out)
}
