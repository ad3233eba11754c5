//! Typed errors of the pack reader and writer; each names the section, entry and numbers.

use std::path::PathBuf;

/// Why a pack could not be written, opened or trusted. See formats/flashpack-v1.md §8.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PackError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("not a .flashpack file ({reason}); check the path, or re-download the pack")]
    NotAPack { reason: String },
    #[error("pack format version {found_major}.{found_minor} is not supported by this flashpack (reads {supported}.x); upgrade flashpack")]
    UnsupportedVersion {
        found_major: u16,
        found_minor: u16,
        supported: u16,
    },
    #[error("pack needs features this flashpack does not implement (required flag bits {unknown:#x}); upgrade flashpack")]
    UnknownRequiredFeatures { unknown: u64 },
    #[error("pack uses {feature} without declaring it in the required flags; the file is damaged or was written by a broken tool")]
    UndeclaredFeature { feature: &'static str },
    #[error("bad header field {field} = {value}: {reason}")]
    BadHeader {
        field: &'static str,
        value: u64,
        reason: &'static str,
    },
    #[error("pack is truncated: {what} needs {expected} bytes but the file has {file_len}; re-download or re-convert it")]
    Truncated {
        what: &'static str,
        expected: u64,
        file_len: u64,
    },
    #[error("pack has {extra} bytes after its declared end ({file_size}); the file was appended to or damaged")]
    TrailingData { file_size: u64, extra: u64 },
    #[error("header checksum mismatch (expected {expected}, computed {found}); the pack is damaged: re-download or re-convert it")]
    HeaderChecksum { expected: String, found: String },
    #[error("section {section} (offset {offset}, length {len}) lies outside the file body [{start}, {file_len})")]
    SectionOutOfBounds {
        section: &'static str,
        offset: u64,
        len: u64,
        start: u64,
        file_len: u64,
    },
    #[error("sections {a} and {b} overlap")]
    SectionOverlap { a: &'static str, b: &'static str },
    #[error("section {section} is missing")]
    MissingSection { section: &'static str },
    #[error("section {section} appears more than once")]
    DuplicateSection { section: &'static str },
    #[error("section {section} checksum mismatch (expected {expected}, computed {found}); the pack is damaged: re-download or re-convert it")]
    SectionChecksum {
        section: &'static str,
        expected: String,
        found: String,
    },
    #[error("section {section} declares {len} decoded bytes, over the limit of {limit}")]
    SectionTooLarge {
        section: &'static str,
        len: u64,
        limit: u64,
    },
    #[error("section {section} could not be decompressed: {reason}")]
    Decompress {
        section: &'static str,
        reason: String,
    },
    #[error("section {section} is malformed: {reason}")]
    BadDirectory {
        section: &'static str,
        reason: String,
    },
    #[error("{section} entry {index}: field {field} = {value} is invalid: {reason}")]
    BadEntry {
        section: &'static str,
        index: usize,
        field: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("{section} entry {index}: bytes [{offset}, +{len}) lie outside {data_section} [{start}, {end})")]
    EntryOutOfBounds {
        section: &'static str,
        index: usize,
        offset: u64,
        len: u64,
        data_section: &'static str,
        start: u64,
        end: u64,
    },
    #[error("{what} at offset {offset} is not aligned to the page size {page_size}")]
    Misaligned {
        what: String,
        offset: u64,
        page_size: u32,
    },
    #[error("metadata key {key} = {value} is invalid: {rule}; the pack was damaged or written by a broken tool: re-convert it")]
    BadMetadata {
        key: String,
        value: String,
        rule: String,
    },
    #[error("tensor {name}: checksum mismatch; the pack is damaged: re-download or re-convert it")]
    TensorChecksum { name: String },
    #[error("expert segment (layer {layer}, expert {expert}, segment {segment}): checksum mismatch; the pack is damaged: re-download or re-convert it")]
    SegmentChecksum {
        layer: u32,
        expert: u32,
        segment: u16,
    },
    #[error("writer: {reason}")]
    Writer { reason: String },
}

impl PackError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> PackError {
        PackError::Io {
            path: path.into(),
            source,
        }
    }
}
