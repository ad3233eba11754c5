//! Layout planning: where every byte of a pack goes, with no I/O (formats/flashpack-v1.md §1).
//!
//! In: lengths of tensors, segments, directories and metadata, in file order.
//! Out: their offsets and the file size. Invariant: the header region, DENSE_DATA and every
//! segment start on page boundaries; tensors on 64-byte boundaries; the expert data ends on a
//! page boundary so that reading any segment's whole pages stays inside its section.
//! The streaming writer drives [`Planner`] one item at a time; [`plan`] runs it on known lengths.

use std::ops::Range;

use super::{align_up, header::Header, TENSOR_ALIGN};

/// Places items one after another; pure arithmetic.
#[derive(Clone, Debug)]
pub struct Planner {
    page: u64,
    cursor: u64,
}

impl Planner {
    /// Starts after the header region of a pack with `section_count` sections.
    pub fn new(page_size: u32, section_count: usize) -> Planner {
        let page = page_size as u64;
        let header = Header::encoded_len(section_count) as u64;
        Planner {
            page,
            cursor: align_up(header, page).expect("small header"),
        }
    }

    /// Current end of the planned bytes.
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    /// Moves to the next page boundary (section starts, end of expert data).
    pub fn align_page(&mut self) -> u64 {
        self.cursor = align_up(self.cursor, self.page).expect("offset overflow");
        self.cursor
    }

    /// Places a dense tensor of `len` stored bytes.
    pub fn place_tensor(&mut self, len: u64) -> u64 {
        self.place(len, TENSOR_ALIGN)
    }

    /// Places an expert segment of `len` stored bytes on a page boundary.
    pub fn place_segment(&mut self, len: u64) -> u64 {
        self.place(len, self.page)
    }

    /// Places a directory or metadata section.
    pub fn place_section(&mut self, len: u64) -> u64 {
        self.place(len, TENSOR_ALIGN)
    }

    fn place(&mut self, len: u64, align: u64) -> u64 {
        let at = align_up(self.cursor, align).expect("offset overflow");
        self.cursor = at.checked_add(len).expect("offset overflow");
        at
    }
}

/// Where everything of a pack goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayoutPlan {
    pub dense: Range<u64>,
    pub tensors: Vec<u64>,
    pub experts: Range<u64>,
    pub segments: Vec<u64>,
    pub tensor_dir: u64,
    pub expert_dir: u64,
    pub metadata: u64,
    pub file_size: u64,
}

/// Number of sections the reference writer emits.
pub const SECTION_COUNT: usize = 5;

/// Plans a whole pack from its lengths: dense tensors, then segments, then the directories and
/// the metadata (the order of formats/flashpack-v1.md §1).
pub fn plan(
    page_size: u32,
    tensor_lens: &[u64],
    segment_lens: &[u64],
    tensor_dir_len: u64,
    expert_dir_len: u64,
    metadata_len: u64,
) -> LayoutPlan {
    let mut p = Planner::new(page_size, SECTION_COUNT);
    let dense_start = p.align_page();
    let tensors = tensor_lens.iter().map(|&l| p.place_tensor(l)).collect();
    let dense_end = p.cursor();
    let experts_start = p.align_page();
    let segments = segment_lens.iter().map(|&l| p.place_segment(l)).collect();
    let experts_end = p.align_page();
    let tensor_dir = p.place_section(tensor_dir_len);
    let expert_dir = p.place_section(expert_dir_len);
    let metadata = p.place_section(metadata_len);
    LayoutPlan {
        dense: dense_start..dense_end,
        tensors,
        experts: experts_start..experts_end,
        segments,
        tensor_dir,
        expert_dir,
        metadata,
        file_size: p.cursor(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_start_on_pages_and_data_ends_on_a_page() {
        let plan = plan(16384, &[100, 7], &[1, 16384, 16385], 30, 40, 50);
        // header: 64 + 5*64 + 32 = 416 bytes -> one page
        assert_eq!(plan.dense, 16384..16384 + 128 + 7);
        assert_eq!(plan.tensors, vec![16384, 16384 + 128]);
        assert_eq!(plan.experts.start, 32768);
        assert_eq!(plan.segments, vec![32768, 49152, 65536]);
        // 16385 bytes spill into a second page, padded to its end
        assert_eq!(plan.experts.end, 65536 + 32768);
        assert_eq!(plan.tensor_dir, 98304);
        assert_eq!(plan.expert_dir, 98304 + 64);
        assert_eq!(plan.metadata, 98304 + 128);
        assert_eq!(plan.file_size, 98304 + 128 + 50);
    }

    #[test]
    fn empty_pack_still_has_page_aligned_sections() {
        let plan = plan(4096, &[], &[], 16, 16, 10);
        assert_eq!(plan.dense, 4096..4096);
        assert_eq!(plan.experts, 4096..4096);
        assert_eq!(plan.file_size, 4096 + 64 + 16 + 10);
    }

    #[test]
    fn large_header_spills_to_next_page() {
        let p = Planner::new(4096, 64); // 64 + 64*64 + 32 = 4192 bytes
        assert_eq!(p.cursor(), 8192);
    }
}
