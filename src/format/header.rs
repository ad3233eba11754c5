//! Fixed header and section table: formats/flashpack-v1.md §2-§3.
//!
//! In: the first bytes of a file. Out: a [`Header`] and its [`SectionEntry`]s, or a typed error.
//! Invariant: nothing here trusts a length before comparing it with the bytes at hand.

use super::{PackError, MAGIC, MAJOR_VERSION, MAX_SECTIONS};

/// formats/flashpack-v1.md §2.1
pub const HEADER_SIZE: usize = 64;
/// formats/flashpack-v1.md §3
pub const SECTION_ENTRY_SIZE: usize = 64;
/// formats/flashpack-v1.md §2.3
pub const HEADER_HASH_SIZE: usize = 32;

/// Section kinds, formats/flashpack-v1.md §3.1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SectionKind {
    Metadata = 1,
    TensorDir = 2,
    ExpertDir = 3,
    DenseData = 4,
    ExpertData = 5,
}

impl SectionKind {
    pub const ALL: [SectionKind; 5] = [
        SectionKind::Metadata,
        SectionKind::TensorDir,
        SectionKind::ExpertDir,
        SectionKind::DenseData,
        SectionKind::ExpertData,
    ];

    pub fn from_code(code: u32) -> Option<SectionKind> {
        SectionKind::ALL.into_iter().find(|k| *k as u32 == code)
    }

    pub fn name(self) -> &'static str {
        match self {
            SectionKind::Metadata => "METADATA",
            SectionKind::TensorDir => "TENSOR_DIR",
            SectionKind::ExpertDir => "EXPERT_DIR",
            SectionKind::DenseData => "DENSE_DATA",
            SectionKind::ExpertData => "EXPERT_DATA",
        }
    }

    /// Whether the section carries a blake3 checked at every open.
    pub fn hashed(self) -> bool {
        matches!(
            self,
            SectionKind::Metadata | SectionKind::TensorDir | SectionKind::ExpertDir
        )
    }
}

/// Section flag bit 0: the stored bytes are one zstd frame.
pub const SECTION_ZSTD: u32 = 1;

/// One section table entry, formats/flashpack-v1.md §3.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SectionEntry {
    /// Raw kind code; unknown kinds are kept so that readers can skip them.
    pub kind: u32,
    pub flags: u32,
    pub offset: u64,
    pub stored_len: u64,
    pub decoded_len: u64,
    pub blake3: [u8; 32],
}

impl SectionEntry {
    pub fn known_kind(&self) -> Option<SectionKind> {
        SectionKind::from_code(self.kind)
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.kind.to_le_bytes());
        out.extend_from_slice(&self.flags.to_le_bytes());
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&self.stored_len.to_le_bytes());
        out.extend_from_slice(&self.decoded_len.to_le_bytes());
        out.extend_from_slice(&self.blake3);
    }

    fn decode(b: &[u8; SECTION_ENTRY_SIZE]) -> SectionEntry {
        SectionEntry {
            kind: le_u32(b, 0),
            flags: le_u32(b, 4),
            offset: le_u64(b, 8),
            stored_len: le_u64(b, 16),
            decoded_len: le_u64(b, 24),
            blake3: b[32..64].try_into().expect("32-byte slice"),
        }
    }
}

/// The fixed header, formats/flashpack-v1.md §2.1.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub major: u16,
    pub minor: u16,
    pub required_features: u64,
    pub optional_features: u64,
    pub page_size: u32,
    pub file_size: u64,
    pub sections: Vec<SectionEntry>,
}

impl Header {
    /// Bytes of the fixed header plus section table (what the header checksum covers).
    pub fn hashed_len(section_count: usize) -> usize {
        HEADER_SIZE + SECTION_ENTRY_SIZE * section_count
    }

    /// Bytes of header, table and checksum, before page padding.
    pub fn encoded_len(section_count: usize) -> usize {
        Header::hashed_len(section_count) + HEADER_HASH_SIZE
    }

    /// Encodes header, section table and header checksum (§2.3).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(Header::encoded_len(self.sections.len()));
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&self.major.to_le_bytes());
        out.extend_from_slice(&self.minor.to_le_bytes());
        out.extend_from_slice(&(HEADER_SIZE as u32).to_le_bytes());
        out.extend_from_slice(&self.required_features.to_le_bytes());
        out.extend_from_slice(&self.optional_features.to_le_bytes());
        out.extend_from_slice(&self.page_size.to_le_bytes());
        out.extend_from_slice(&(self.sections.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.file_size.to_le_bytes());
        out.extend_from_slice(&[0u8; 16]);
        debug_assert_eq!(out.len(), HEADER_SIZE);
        for s in &self.sections {
            s.encode(&mut out);
        }
        let hash = blake3::hash(&out);
        out.extend_from_slice(hash.as_bytes());
        out
    }

    /// Parses and checks the header: steps 1-4 of formats/flashpack-v1.md §8.
    pub fn decode(bytes: &[u8]) -> Result<Header, PackError> {
        let file_len = bytes.len() as u64;
        if bytes.len() < HEADER_SIZE {
            return Err(PackError::NotAPack {
                reason: format!("file has {file_len} bytes, a header needs {HEADER_SIZE}"),
            });
        }
        if bytes[0..8] != MAGIC {
            return Err(PackError::NotAPack {
                reason: format!("magic is {:02x?}", &bytes[0..8]),
            });
        }
        let major = u16::from_le_bytes([bytes[8], bytes[9]]);
        let minor = u16::from_le_bytes([bytes[10], bytes[11]]);
        if major != MAJOR_VERSION {
            return Err(PackError::UnsupportedVersion {
                found_major: major,
                found_minor: minor,
                supported: MAJOR_VERSION,
            });
        }
        let required_features = le_u64(bytes, 16);
        let unknown = required_features & !super::required::KNOWN;
        if unknown != 0 {
            return Err(PackError::UnknownRequiredFeatures { unknown });
        }
        let header_size = le_u32(bytes, 12);
        if header_size as usize != HEADER_SIZE {
            return Err(PackError::BadHeader {
                field: "header_size",
                value: header_size as u64,
                reason: "must be 64 in format 1.x",
            });
        }
        let page_size = le_u32(bytes, 32);
        if !super::valid_page_size(page_size) {
            return Err(PackError::BadHeader {
                field: "page_size",
                value: page_size as u64,
                reason: "must be a power of two from 4096 to 65536",
            });
        }
        let section_count = le_u32(bytes, 36);
        if section_count == 0 || section_count > MAX_SECTIONS {
            return Err(PackError::BadHeader {
                field: "section_count",
                value: section_count as u64,
                reason: "must be 1 to 64",
            });
        }
        let hashed = Header::hashed_len(section_count as usize);
        let needed = hashed + HEADER_HASH_SIZE;
        if bytes.len() < needed {
            return Err(PackError::Truncated {
                what: "header and section table",
                expected: needed as u64,
                file_len,
            });
        }
        let computed = blake3::hash(&bytes[..hashed]);
        let stored: [u8; 32] = bytes[hashed..needed].try_into().expect("32 bytes");
        if computed.as_bytes() != &stored {
            return Err(PackError::HeaderChecksum {
                expected: hex(&stored),
                found: computed.to_hex().to_string(),
            });
        }
        Ok(Header::decode_unchecked(bytes).expect("length checked above"))
    }

    /// Parses the fields without any check beyond having enough bytes. For tools and tests
    /// that inspect damaged files; readers use [`Header::decode`].
    #[doc(hidden)]
    pub fn decode_unchecked(bytes: &[u8]) -> Option<Header> {
        let count = le_u32(bytes.get(..HEADER_SIZE)?, 36) as usize;
        let table = bytes
            .get(HEADER_SIZE..HEADER_SIZE.checked_add(count.checked_mul(SECTION_ENTRY_SIZE)?)?)?;
        let sections = table
            .chunks_exact(SECTION_ENTRY_SIZE)
            .map(|c| SectionEntry::decode(c.try_into().expect("entry size")))
            .collect();
        Some(Header {
            major: le_u16(bytes, 8),
            minor: le_u16(bytes, 10),
            required_features: le_u64(bytes, 16),
            optional_features: le_u64(bytes, 24),
            page_size: le_u32(bytes, 32),
            file_size: le_u64(bytes, 40),
            sections,
        })
    }

    /// Where the first section may start: the header region padded to the page size (§2.3).
    pub fn region_len(&self) -> u64 {
        let len = Header::encoded_len(self.sections.len()) as u64;
        super::align_up(len, self.page_size as u64).expect("small header")
    }
}

pub(crate) fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().expect("2 bytes"))
}

pub(crate) fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

pub(crate) fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
