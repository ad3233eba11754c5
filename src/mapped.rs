//! The one place that maps files into memory.
//!
//! Everything that reads large files (packs, safetensors shards) goes through [`Bytes`], which
//! is either a read-only memory map or an owned buffer (tests, fuzzing). Readers only ever see
//! `&[u8]` and check every offset against its length.

use std::fs::File;
use std::ops::Deref;
use std::path::Path;
use std::sync::Arc;

/// Read-only bytes of a file or of a buffer. Cheap to clone.
#[derive(Clone)]
pub struct Bytes(Arc<Backing>);

enum Backing {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Bytes {
    /// Maps `path` read-only. An empty file gives an empty buffer (mapping zero bytes fails on
    /// some platforms).
    pub fn map(path: &Path) -> std::io::Result<Bytes> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        if len == 0 {
            return Ok(Bytes::from_vec(Vec::new()));
        }
        // SAFETY: the map is read-only and we never create a mutable view of it. What can still
        // go wrong is outside this process: if another process truncates or rewrites the file
        // while it is mapped, reads may see changed bytes or fault (SIGBUS). Changed bytes are
        // caught by the blake3 checks of the format (on by default at run time). Against the
        // fault, the runtime's mapped expert reads check the file's length first
        // (`run::read::SegmentReader::check_still_mapped`), which leaves a truncation between
        // that check and the copy as the one window where SIGBUS can still end the process.
        // flashpack itself never modifies a file in place (writers go through a temporary file
        // and rename), so a pack it wrote stays valid while mapped.
        let map = unsafe { memmap2::Mmap::map(&file)? };
        Ok(Bytes(Arc::new(Backing::Mapped(map))))
    }

    /// Wraps an owned buffer: the same readers work over it (tests, fuzzing).
    pub fn from_vec(bytes: Vec<u8>) -> Bytes {
        Bytes(Arc::new(Backing::Owned(bytes)))
    }

    /// Asks the kernel to page in `[offset, offset + len)` ahead of use (mapped bytes only).
    pub fn will_need(&self, offset: usize, len: usize) {
        if let Backing::Mapped(m) = &*self.0 {
            let end = offset.saturating_add(len).min(m.len());
            if offset < end {
                #[cfg(unix)]
                let _ = m.advise_range(memmap2::Advice::WillNeed, offset, end - offset);
            }
        }
    }

    /// Says this process is done with `[offset, offset + len)` for now: its pages leave the
    /// process's resident set but stay in the OS page cache, and fault back in if read again
    /// (mapped bytes only; a no-op on owned buffers). Lets the converter stream a model bigger
    /// than memory through a map without its resident set growing to the model's size.
    pub fn release(&self, offset: usize, len: usize) {
        if let Backing::Mapped(m) = &*self.0 {
            let end = offset.saturating_add(len).min(m.len());
            if offset < end {
                // SAFETY: MADV_DONTNEED on a read-only shared file mapping only drops page-table
                // entries: the next read faults the file's bytes back in, so no reader ever sees
                // zeroed memory (which DONTNEED gives only on private or anonymous mappings).
                #[cfg(unix)]
                let _ = unsafe {
                    m.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        offset,
                        end - offset,
                    )
                };
            }
        }
    }

    /// Whether these bytes come from a memory map (and so may be advised to the kernel).
    pub fn is_mapped(&self) -> bool {
        matches!(*self.0, Backing::Mapped(_))
    }
}

impl Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &*self.0 {
            Backing::Mapped(m) => m,
            Backing::Owned(v) => v,
        }
    }
}

impl AsRef<[u8]> for Bytes {
    fn as_ref(&self) -> &[u8] {
        self
    }
}
