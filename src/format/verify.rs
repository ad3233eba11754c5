//! Full verification: hash every byte of an opened pack (formats/flashpack-v1.md §8).
//!
//! In: a [`Pack`] (whose header, directories and metadata were checked at open). Out: every
//! damaged tensor, segment and padding range, not just the first.

use super::{Pack, PackError, SectionKind};
use crate::format::header::Header;

/// One damaged place of a pack.
#[derive(Debug)]
pub enum Damage {
    Payload(PackError),
    /// Bytes that must be zero are not: `[offset, offset + len)`.
    Padding {
        offset: u64,
        len: u64,
    },
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Damage::Payload(e) => write!(f, "{e}"),
            Damage::Padding { offset, len } => {
                write!(
                    f,
                    "padding [{offset}, +{len}) holds non-zero bytes; the pack is damaged"
                )
            }
        }
    }
}

/// What [`Pack::verify`] found.
#[derive(Debug, Default)]
pub struct VerifyReport {
    pub bytes_checked: u64,
    pub damages: Vec<Damage>,
}

impl VerifyReport {
    pub fn is_ok(&self) -> bool {
        self.damages.is_empty()
    }
}

impl Pack {
    /// Hashes every tensor and segment, and checks that every byte no checksum covers is zero.
    pub fn verify(&self) -> VerifyReport {
        let mut report = VerifyReport::default();
        let mut covered: Vec<(u64, u64)> = Vec::new();
        covered.push((0, Header::encoded_len(self.header().sections.len()) as u64));
        for s in &self.header().sections {
            let hashed =
                s.known_kind().is_some_and(SectionKind::hashed) || s.known_kind().is_none();
            if hashed {
                covered.push((s.offset, s.offset + s.stored_len));
            }
        }
        for t in self.tensors() {
            covered.push((t.offset, t.offset + t.stored_len));
            if let Err(e) = self.check_tensor(t) {
                report.damages.push(Damage::Payload(e));
            }
        }
        for e in self.experts() {
            covered.push((e.offset, e.offset + e.stored_len));
            if let Err(err) = self.check_segment(e) {
                report.damages.push(Damage::Payload(err));
            }
        }
        covered.sort();
        let bytes = self.bytes();
        let mut pos = 0u64;
        let check_gap = |from: u64, to: u64, report: &mut VerifyReport| {
            if to > from {
                let gap = &bytes[from as usize..to as usize];
                if let Some(first) = gap.iter().position(|&b| b != 0) {
                    let last = gap.iter().rposition(|&b| b != 0).unwrap_or(first);
                    report.damages.push(Damage::Padding {
                        offset: from + first as u64,
                        len: (last - first + 1) as u64,
                    });
                }
            }
        };
        for (start, end) in covered {
            check_gap(pos, start, &mut report);
            pos = pos.max(end);
        }
        check_gap(pos, bytes.len() as u64, &mut report);
        report.bytes_checked = bytes.len() as u64;
        report
    }
}
