//! The pieces of a pack: byte ranges that each carry their own check (formats/flashpack-v1.md
//! §2.3, §3, §5, §6), so that a reader holding only some of a file's bytes (a pipeline rank
//! that downloaded its layers' ranges) can check each range it has on its own.
//!
//! In: a header (its directory sections) or an opened [`Pack`] (its tensors and segments).
//! Out: [`Piece`]s sorted by offset: a range, a name for messages, and how to check its bytes.
//! Invariant: pure; every range lies inside the file (`Pack::open` checked the entries, and
//! the header's sections are checked here against `file_size`).

use std::ops::Range;

use super::{Header, Pack, PackError, SectionKind};

/// How the bytes of a [`Piece`] are checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    /// blake3 of the bytes (directories and metadata §3, a tensor §5, a segment §6.1).
    Blake3([u8; 32]),
    /// The header and section table, by the header checksum that follows them (§2.3).
    Header,
}

/// A byte range of a pack and how to check it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Piece {
    pub range: Range<u64>,
    /// What the range holds, for messages: `tensor model.layers.3.mlp.gate.weight`.
    pub what: String,
    pub check: Check,
}

impl Piece {
    /// Whether `bytes` (the whole range) pass the piece's check.
    pub fn checks(&self, bytes: &[u8]) -> bool {
        if bytes.len() as u64 != self.range.end - self.range.start {
            return false;
        }
        match self.check {
            Check::Blake3(h) => blake3::hash(bytes).as_bytes() == &h,
            Check::Header => Header::decode(bytes).is_ok(),
        }
    }
}

/// The most bytes the header and section table take (§2.1, §2.3: 64 sections at most): what to
/// read of a file before its header can be decoded.
pub const MAX_HEADER_LEN: u64 = 64 + 64 * super::MAX_SECTIONS as u64 + 32;

/// The header's own piece and its three checked sections (METADATA, TENSOR_DIR, EXPERT_DIR):
/// what `Pack::open` reads. `header` was decoded (and checked) from the file's first bytes.
pub fn open_pieces(header: &Header) -> Result<Vec<Piece>, PackError> {
    let mut out = vec![Piece {
        range: 0..Header::encoded_len(header.sections.len()) as u64,
        what: "the pack header".into(),
        check: Check::Header,
    }];
    for kind in [
        SectionKind::Metadata,
        SectionKind::TensorDir,
        SectionKind::ExpertDir,
    ] {
        let s = header
            .sections
            .iter()
            .find(|s| s.kind == kind as u32)
            .ok_or(PackError::MissingSection {
                section: kind.name(),
            })?;
        let end = s
            .offset
            .checked_add(s.stored_len)
            .filter(|&e| e <= header.file_size)
            .ok_or(PackError::SectionOutOfBounds {
                section: kind.name(),
                offset: s.offset,
                len: s.stored_len,
                start: header.region_len(),
                file_len: header.file_size,
            })?;
        out.push(Piece {
            range: s.offset..end,
            what: format!("section {}", kind.name()),
            check: Check::Blake3(s.blake3),
        });
    }
    out.sort_by_key(|p| p.range.start);
    Ok(out)
}

impl Pack {
    /// The dense tensors `keep_tensor` names and the expert segments of the layers
    /// `keep_layer` accepts, sorted by offset.
    pub fn pieces_where(
        &self,
        keep_tensor: impl Fn(&str) -> bool,
        keep_layer: impl Fn(u32) -> bool,
    ) -> Vec<Piece> {
        let tensors = self.tensors().iter().filter(|t| keep_tensor(&t.name));
        let mut out: Vec<Piece> = tensors
            .map(|t| Piece {
                range: t.offset..t.offset + t.stored_len,
                what: format!("tensor {}", t.name),
                check: Check::Blake3(t.blake3),
            })
            .collect();
        out.extend(
            self.experts()
                .iter()
                .filter(|e| keep_layer(e.layer))
                .map(|e| Piece {
                    range: e.offset..e.offset + e.stored_len,
                    what: format!(
                        "expert segment (layer {}, expert {}, segment {})",
                        e.layer, e.expert, e.segment
                    ),
                    check: Check::Blake3(e.blake3),
                }),
        );
        out.sort_by_key(|p| p.range.start);
        out
    }
}
