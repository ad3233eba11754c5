//! Read stage: the stored bytes of expert segments, off the disk.
//!
//! In: directory entries of a [`Pack`]. Out: their stored bytes in caller-owned buffers.
//! Two paths, chosen by measurement (docs/benchmarks.md): parallel positional reads (`pread`)
//! of whole pages with a bounded queue depth, or the memory map with `madvise`. After a pread the
//! pages are dropped from the OS page cache (Linux `POSIX_FADV_DONTNEED`; macOS `F_NOCACHE`), so a
//! segment does not sit in memory twice: once decoded in the expert cache, once in the page cache.
//! After a mapped read the segment's pages are unmapped from the process (`MADV_DONTNEED`; they
//! stay in the page cache), so mapped reads never count against the resident set either.
//! Invariant: every range read lies inside the EXPERT_DATA section (checked by `Pack::open`), and a
//! mapped read lies inside the file as it is when read (a pack that shrank is an error, not SIGBUS).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rayon::prelude::*;

use crate::format::{ExpertEntry, Pack};
use crate::mapped::Bytes;

/// How segments come off the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IoMode {
    /// Positional reads into our own buffers, `queue_depth` at a time.
    Pread,
    /// Slices of the memory map; the kernel pages them in (with `MADV_WILLNEED` ahead).
    Mmap,
}

impl std::str::FromStr for IoMode {
    type Err = String;
    fn from_str(s: &str) -> Result<IoMode, String> {
        match s {
            "pread" => Ok(IoMode::Pread),
            "mmap" => Ok(IoMode::Mmap),
            _ => Err(format!("unknown I/O mode {s:?}: use pread or mmap")),
        }
    }
}

/// Why a segment could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    #[error("reading {path} at offset {offset} (+{len}): {source}")]
    Io {
        path: PathBuf,
        offset: u64,
        len: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("pack was opened from memory; pread needs a file (use mmap mode)")]
    NoFile,
    #[error("{}: the pack shrank to {file_len} bytes while in use, and the segment at offset {offset} (+{len}) is no longer inside it; another program truncated or rewrote the file: do not modify a pack while it runs, then check it with `flashpack verify {}`", .path.display(), .path.display())]
    Shrunk {
        path: PathBuf,
        offset: u64,
        len: u64,
        file_len: u64,
    },
}

/// Reads segments of one pack. Cheap to share between threads.
pub struct SegmentReader {
    mode: IoMode,
    file: Option<File>,
    /// Linux: the same file opened with `O_DIRECT`, when the file system allows it. A segment
    /// then comes off the disk in one request of whole pages that the block layer splits and
    /// issues in parallel, instead of a buffered read that trickles in readahead-sized steps
    /// (measured on the H200 machine: 17 ms for a cold 1.2 MB expert, docs/benchmarks.md), and
    /// it never enters the page cache.
    direct: Option<File>,
    /// Mmap mode: the mapped file, kept open to check its length before each mapped read.
    mapped_file: Option<File>,
    path: PathBuf,
    bytes: Bytes,
    pool: rayon::ThreadPool,
    bytes_read: AtomicU64,
    /// Part size of a pipelined load ([`SegmentReader::read_parts`]; 0: one request).
    split: usize,
    /// Part size of a pipelined Huffman-coded load ([`SegmentReader::read_parts_ordered`]; 0:
    /// read whole, then decoded).
    huffman_part: usize,
}

/// Default part size of a pipelined load (`FLASHPACK_READ_SPLIT_KIB` overrides; 0: off): a
/// lone miss of a raw expert is read in parts of this size, in order, several in flight, and
/// its checksum advances as each part arrives (docs/decisions/0014-raw-experts.md;
/// `flashpack bench io --split-kib 0,256` compares).
pub const DEFAULT_SPLIT_KIB: usize = 256;

/// The part size of pipelined loads, from `FLASHPACK_READ_SPLIT_KIB` or the default, in bytes
/// (a multiple of the direct-I/O alignment).
pub fn split_bytes() -> usize {
    let kib = crate::env::number("FLASHPACK_READ_SPLIT_KIB").unwrap_or(DEFAULT_SPLIT_KIB);
    (kib * 1024).div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN
}

/// Default part size of a lone Huffman-coded miss read in decoder order and decoded as it
/// arrives (`FLASHPACK_HUFFMAN_PART_KIB` sets it; 0: read whole, then decoded), on machines of
/// 4 cores or more: 64 KiB (a fraction of one stream, a power of two so each part is a BLAKE3
/// subtree). There, decoded in two stream groups at once, a lone miss costs 1.32-1.50x a plain
/// read against 1.63-1.73x read whole, and 8 at a time 1.64-1.72x against 1.75-1.80x (the H100
/// host, decision 0024). Machines of fewer cores read whole: with one group it measured no
/// faster on the 2-core VM.
pub const DEFAULT_HUFFMAN_PART_KIB: usize = 64;

/// The Huffman part size `bench io` tries beside reading whole.
pub const TRIED_HUFFMAN_PART_KIB: usize = 64;

/// The part size of pipelined Huffman-coded loads, from `FLASHPACK_HUFFMAN_PART_KIB` or the
/// default, in bytes.
pub fn huffman_part_bytes() -> usize {
    let default = if crate::env::cores() >= 4 {
        DEFAULT_HUFFMAN_PART_KIB
    } else {
        0
    };
    let kib = crate::env::number("FLASHPACK_HUFFMAN_PART_KIB").unwrap_or(default);
    huffman_part_of(kib * 1024)
}

/// `bytes` rounded up to a power of two of at least the direct-I/O alignment (0 stays 0).
fn huffman_part_of(bytes: usize) -> usize {
    if bytes == 0 {
        0
    } else {
        bytes.max(DIRECT_ALIGN).next_power_of_two()
    }
}

impl SegmentReader {
    /// `queue_depth` is how many reads are in flight at once (pread mode).
    pub fn new(pack: &Pack, mode: IoMode, queue_depth: usize) -> Result<SegmentReader, ReadError> {
        let path = pack.path().map(Path::to_path_buf).unwrap_or_default();
        let open = |p: &Path| {
            File::open(p).map_err(|source| ReadError::Io {
                path: p.to_path_buf(),
                offset: 0,
                len: 0,
                source,
            })
        };
        let (file, mapped_file) = match (mode, pack.path()) {
            (IoMode::Pread, Some(p)) => (Some(open(p)?), None),
            (IoMode::Pread, None) => return Err(ReadError::NoFile),
            (IoMode::Mmap, Some(p)) if pack.bytes().is_mapped() => (None, Some(open(p)?)),
            (IoMode::Mmap, _) => (None, None),
        };
        if let Some(f) = &file {
            no_cache(f);
        }
        let direct = match (&file, pack.path()) {
            (Some(_), Some(p)) if std::env::var_os("FLASHPACK_NO_DIRECT_IO").is_none() => {
                open_direct(p)
            }
            _ => None,
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(queue_depth.max(1))
            .thread_name(|i| format!("flashpack-io-{i}"))
            .build()
            .expect("spawning I/O threads");
        Ok(SegmentReader {
            mode,
            file,
            direct,
            mapped_file,
            path,
            bytes: pack.bytes().clone(),
            pool,
            bytes_read: AtomicU64::new(0),
            split: split_bytes(),
            huffman_part: huffman_part_bytes(),
        })
    }

    /// Sets the part size of pipelined Huffman-coded loads (bytes, rounded up to a power of two
    /// of at least the direct-I/O alignment; 0: read whole, then decoded), overriding
    /// `FLASHPACK_HUFFMAN_PART_KIB`.
    pub fn set_huffman_part(&mut self, bytes: usize) {
        self.huffman_part = huffman_part_of(bytes);
    }

    /// The part size of pipelined Huffman-coded loads (0: off).
    pub fn huffman_part(&self) -> usize {
        self.huffman_part
    }

    /// Sets the part size of pipelined loads (bytes, rounded up to the direct-I/O alignment;
    /// 0: one request per segment), overriding `FLASHPACK_READ_SPLIT_KIB`.
    pub fn set_split(&mut self, bytes: usize) {
        self.split = bytes.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
    }

    /// The part size of pipelined loads ([`Self::read_parts`]; 0: off).
    pub fn split(&self) -> usize {
        self.split
    }

    /// I/O threads (the queue depth).
    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    /// Runs `f` on this reader's I/O threads (`queue_depth` of them): parallel work inside it
    /// keeps that many reads in flight.
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.pool.install(f)
    }

    /// The pack's path (empty for a pack opened from memory).
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn mode(&self) -> IoMode {
        self.mode
    }

    /// Total stored bytes read so far.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read.load(Ordering::Relaxed)
    }

    /// Reads the stored bytes of each entry into the buffer of the same index (resized to fit).
    pub fn read_batch(
        &self,
        entries: &[&ExpertEntry],
        bufs: &mut [Vec<u8>],
    ) -> Result<(), ReadError> {
        assert_eq!(entries.len(), bufs.len(), "one buffer per entry");
        let read_one = |(e, buf): (&&ExpertEntry, &mut Vec<u8>)| {
            let range = self.read_range(e, buf)?;
            buf.copy_within(range.clone(), 0);
            buf.truncate(range.len());
            Ok(())
        };
        if entries.len() <= 1 || self.mode == IoMode::Mmap {
            entries.iter().zip(bufs.iter_mut()).try_for_each(read_one)
        } else {
            self.pool.install(|| {
                entries
                    .par_iter()
                    .zip(bufs.par_iter_mut())
                    .try_for_each(read_one)
            })
        }
    }

    /// Reads one segment's stored bytes into `buf` (resized as needed) and returns them, a
    /// slice of `buf` (not necessarily at its start: direct reads need aligned memory).
    pub fn read_into<'b>(
        &self,
        e: &ExpertEntry,
        buf: &'b mut Vec<u8>,
    ) -> Result<&'b [u8], ReadError> {
        let range = self.read_range(e, buf)?;
        Ok(&buf[range])
    }

    /// [`Self::read_into`], giving where in `buf` the bytes are.
    fn read_range(
        &self,
        e: &ExpertEntry,
        buf: &mut Vec<u8>,
    ) -> Result<std::ops::Range<usize>, ReadError> {
        let len = e.stored_len as usize;
        let io_err = |source| ReadError::Io {
            path: self.path.clone(),
            offset: e.offset,
            len: e.stored_len,
            source,
        };
        let range = match (&self.direct, &self.file) {
            (Some(d), _) => match read_direct(d, e.offset, len, buf) {
                Ok(range) => range,
                // A file system may refuse O_DIRECT for some ranges: read it buffered.
                Err(err) if err.raw_os_error() == Some(libc::EINVAL) => {
                    buf.resize(len, 0);
                    let f = self.file.as_ref().expect("direct implies a file");
                    read_exact_at(f, buf, e.offset).map_err(io_err)?;
                    drop_cached(f, e.offset, e.stored_len);
                    0..len
                }
                Err(err) => return Err(io_err(err)),
            },
            (None, Some(f)) => {
                buf.resize(len, 0);
                read_exact_at(f, buf, e.offset).map_err(io_err)?;
                drop_cached(f, e.offset, e.stored_len);
                0..len
            }
            (None, None) => {
                self.check_still_mapped(e)?;
                buf.resize(len, 0);
                buf.copy_from_slice(&self.bytes[e.stored_range()]);
                // The bytes now live in `buf` (then in a slot): unmap the file's pages from the
                // process so mapped reads do not grow the resident set past the budget. They
                // stay in the OS page cache, and a later read maps them back in.
                self.bytes.release(e.offset as usize, e.stored_len as usize);
                0..len
            }
        };
        self.bytes_read.fetch_add(e.stored_len, Ordering::Relaxed);
        Ok(range)
    }

    /// Reads one segment in aligned parts of about `part` bytes, `lanes` of them in flight, each
    /// lane reading its parts in order (lane i: parts i, i + lanes, ...), so the bytes arrive
    /// from the segment's start onward. Each time the run of arrived bytes from the start grows,
    /// `arrived(from, to, bytes)` is called on the thread whose read grew it, `bytes` being the
    /// segment's first `to` bytes (they are never written again); every range `from..to` is
    /// reported exactly once, and together they cover the segment. Calls may overlap in time.
    /// This is what lets a lone miss hash its first parts while the rest is still on the disk
    /// (docs/decisions/0014-raw-experts.md). Without direct I/O (or for a short
    /// segment) the segment is read at once and reported in one call. Returns where the bytes
    /// are in `buf`, as [`Self::read_into`].
    pub fn read_parts(
        &self,
        e: &ExpertEntry,
        buf: &mut Vec<u8>,
        part: usize,
        lanes: usize,
        arrived: &(dyn Fn(usize, usize, &[u8]) + Sync),
    ) -> Result<std::ops::Range<usize>, ReadError> {
        let len = e.stored_len as usize;
        let part = part.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
        let direct = match &self.direct {
            Some(d) if part > 0 && len > part => d,
            _ => {
                let range = self.read_range(e, buf)?;
                arrived(0, len, &buf[range.clone()]);
                return Ok(range);
            }
        };
        let io_err = |source| ReadError::Io {
            path: self.path.clone(),
            offset: e.offset,
            len: e.stored_len,
            source,
        };
        match read_direct_parts(&self.pool, direct, e.offset, len, buf, part, lanes, arrived) {
            Ok(range) => {
                self.bytes_read.fetch_add(e.stored_len, Ordering::Relaxed);
                Ok(range)
            }
            // A file system may refuse O_DIRECT for some ranges: read it at once, buffered, and
            // report what had not been reported yet (the first `reported` bytes had).
            Err((err, reported)) if err.raw_os_error() == Some(libc::EINVAL) => {
                buf.resize(len, 0);
                let f = self.file.as_ref().expect("direct implies a file");
                read_exact_at(f, buf, e.offset).map_err(io_err)?;
                drop_cached(f, e.offset, e.stored_len);
                self.bytes_read.fetch_add(e.stored_len, Ordering::Relaxed);
                if reported < len {
                    arrived(reported, len, &buf[..len]);
                }
                Ok(0..len)
            }
            Err((err, _)) => Err(io_err(err)),
        }
    }

    /// Reads one segment in aligned parts of about `part` bytes, `lanes` in flight, the parts
    /// taken in ascending `key(from, to)` (their ranges in the segment; ties in segment order)
    /// rather than front to back. Each part is reported once as it arrives, with
    /// `arrived(from, to, bytes)` on the thread that read it, `bytes` giving the whole
    /// segment's buffer (only reported ranges may be read from it). Calls may overlap in time.
    /// A lone Huffman miss reads its streams side by side this way so its decoder can run
    /// behind the read (`run::experts`). Without direct I/O (or for a short segment) the
    /// segment is read at once and reported in one call; after a direct read that the file
    /// system refused part-way, the whole segment is reported again (reports are idempotent
    /// for the callers). Returns where the bytes are in `buf`, as [`Self::read_into`].
    pub fn read_parts_ordered(
        &self,
        e: &ExpertEntry,
        buf: &mut Vec<u8>,
        part: usize,
        lanes: usize,
        key: &(dyn Fn(usize, usize) -> u64 + Sync),
        arrived: &(dyn Fn(usize, usize, Arriving) + Sync),
    ) -> Result<std::ops::Range<usize>, ReadError> {
        let len = e.stored_len as usize;
        let part = part.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
        let whole = |buf: &mut Vec<u8>, range: std::ops::Range<usize>| {
            let bytes = Arriving {
                base: buf[range.clone()].as_ptr(),
                len,
            };
            arrived(0, len, bytes);
            range
        };
        let direct = match &self.direct {
            Some(d) if part > 0 && len > part => d,
            _ => {
                let range = self.read_range(e, buf)?;
                return Ok(whole(buf, range));
            }
        };
        let io_err = |source| ReadError::Io {
            path: self.path.clone(),
            offset: e.offset,
            len: e.stored_len,
            source,
        };
        let parts = Parts {
            offset: e.offset,
            len,
            part,
            lanes,
        };
        match read_direct_ordered(&self.pool, direct, parts, buf, key, arrived) {
            Ok(range) => {
                self.bytes_read.fetch_add(e.stored_len, Ordering::Relaxed);
                Ok(range)
            }
            Err(err) if err.raw_os_error() == Some(libc::EINVAL) => {
                buf.resize(len, 0);
                let f = self.file.as_ref().expect("direct implies a file");
                read_exact_at(f, buf, e.offset).map_err(io_err)?;
                drop_cached(f, e.offset, e.stored_len);
                self.bytes_read.fetch_add(e.stored_len, Ordering::Relaxed);
                Ok(whole(buf, 0..len))
            }
            Err(err) => Err(io_err(err)),
        }
    }

    /// Mmap mode: fails if the file no longer holds the segment. Touching a mapped page past the
    /// end of a file that shrank after it was mapped raises SIGBUS, which would end the process
    /// with no message; this `fstat` turns the common case (a pack truncated or rewritten in
    /// place during a run) into an error naming the pack.
    ///
    /// A race remains: a truncation between this check and the copy just after it still faults.
    /// The window is one segment's copy (microseconds against the whole run). Closing it would
    /// take a SIGBUS handler that jumps out of the faulting copy (`sigsetjmp`/`siglongjmp`), which
    /// Rust cannot do soundly across frames, or giving up the map for `pread`, which `--io pread`
    /// (the default) already is; so the check stays a check and the SAFETY comment of
    /// `mapped.rs` names what it does not cover.
    fn check_still_mapped(&self, e: &ExpertEntry) -> Result<(), ReadError> {
        let Some(f) = &self.mapped_file else {
            return Ok(()); // owned bytes cannot shrink
        };
        let io_err = |source| ReadError::Io {
            path: self.path.clone(),
            offset: e.offset,
            len: e.stored_len,
            source,
        };
        let file_len = f.metadata().map_err(io_err)?.len();
        if e.offset.saturating_add(e.stored_len) > file_len {
            return Err(ReadError::Shrunk {
                path: self.path.clone(),
                offset: e.offset,
                len: e.stored_len,
                file_len,
            });
        }
        Ok(())
    }

    /// Hints that these segments will be read soon (prefetch without reading them ourselves).
    pub fn will_need(&self, entries: &[&ExpertEntry]) {
        for e in entries {
            match &self.file {
                Some(f) => advise_willneed(f, e.offset, e.stored_len),
                None => self
                    .bytes
                    .will_need(e.offset as usize, e.stored_len as usize),
            }
        }
    }
}

/// Alignment of `O_DIRECT` offsets, lengths and buffers (the logical block size of common
/// devices is 512 or 4096 bytes).
const DIRECT_ALIGN: usize = 4096;

#[cfg(target_os = "linux")]
pub(crate) fn open_direct(path: &Path) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok()
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn open_direct(_path: &Path) -> Option<File> {
    None
}

/// The aligned pages around `offset..offset+len`: their first byte's offset in the file, the
/// segment's offset within them, where an aligned run of them starts in `buf` (resized to hold
/// it), and their length.
fn aligned_pages(offset: u64, len: usize, buf: &mut Vec<u8>) -> (u64, usize, usize, usize) {
    let start = offset & !(DIRECT_ALIGN as u64 - 1);
    let head = (offset - start) as usize;
    let total = (head + len).div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
    buf.resize(total + DIRECT_ALIGN, 0);
    let pad = (DIRECT_ALIGN - buf.as_ptr() as usize % DIRECT_ALIGN) % DIRECT_ALIGN;
    (start, head, pad, total)
}

/// Reads `len` bytes at `offset` through an `O_DIRECT` descriptor: the aligned pages around
/// them go into an aligned part of `buf`; returns where the bytes are. Reading past the end of
/// the file stops short there (the last segment's pages may end before the next 4 KiB).
pub(crate) fn read_direct(
    f: &File,
    offset: u64,
    len: usize,
    buf: &mut Vec<u8>,
) -> std::io::Result<std::ops::Range<usize>> {
    let (start, head, pad, total) = aligned_pages(offset, len, buf);
    let dst = &mut buf[pad..pad + total];
    let mut done = 0;
    while done < head + len {
        let n = read_at(f, &mut dst[done..], start + done as u64)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        done += n;
        if done % DIRECT_ALIGN != 0 && done < head + len {
            // A short read not on a block boundary: the file ended.
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(pad + head..pad + head + len)
}

/// A raw pointer to a buffer whose disjoint parts several threads write at once.
#[derive(Clone, Copy)]
struct SharedBuf(*mut u8);
// SAFETY: only used by `read_direct_parts` and `read_direct_ordered`, whose threads touch
// disjoint ranges (each part is written by one lane; arrived bytes are only read, after the
// lock or report that orders them).
unsafe impl Send for SharedBuf {}
// SAFETY: as above.
unsafe impl Sync for SharedBuf {}

impl SharedBuf {
    /// The pointer (a method, so closures capture the `Sync` wrapper, not the bare pointer).
    fn at(&self, offset: usize) -> *mut u8 {
        self.0.wrapping_add(offset)
    }
}

/// Reads one aligned part of a pipelined load into `chunk` from file offset `at`: the first
/// `wanted` bytes of it at least (the segment's; the file may end inside the last part's final
/// block, so a short read is an error only off a block boundary before `wanted`).
fn read_part(f: &File, chunk: &mut [u8], at: u64, wanted: usize) -> std::io::Result<()> {
    let need = wanted.min(chunk.len());
    let mut done = 0;
    while done < need {
        let got = read_at(f, &mut chunk[done..], at + done as u64)?;
        if got == 0 || (done + got < need && (done + got) % DIRECT_ALIGN != 0) {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
        }
        done += got;
    }
    Ok(())
}

/// [`SegmentReader::read_parts`] through an `O_DIRECT` descriptor, on `pool`.
#[allow(clippy::too_many_arguments)]
fn read_direct_parts(
    pool: &rayon::ThreadPool,
    f: &File,
    offset: u64,
    len: usize,
    buf: &mut Vec<u8>,
    part: usize,
    lanes: usize,
    arrived: &(dyn Fn(usize, usize, &[u8]) + Sync),
) -> Result<std::ops::Range<usize>, (std::io::Error, usize)> {
    let (start, head, pad, total) = aligned_pages(offset, len, buf);
    let wanted = head + len;
    let parts = total.div_ceil(part);
    let lanes = lanes.clamp(1, parts);
    // SAFETY: `pad + total <= buf.len()` (aligned_pages sized it); `buf` is not touched again
    // until the lanes are done.
    let base = SharedBuf(unsafe { buf.as_mut_ptr().add(pad) });
    // Which parts have arrived, and how many from the first are all there.
    let state = std::sync::Mutex::new((vec![false; parts], 0usize));
    // Bytes of the segment in its first `parts` parts.
    let seg = |parts: usize| (parts * part).min(wanted).saturating_sub(head);
    let done: std::io::Result<()> = pool.install(|| {
        (0..lanes).into_par_iter().try_for_each(|lane| {
            for p in (lane..parts).step_by(lanes) {
                let at = p * part;
                let n = part.min(total - at);
                // SAFETY: part `p` is `at..at + n` of the aligned run, inside `buf`, and only
                // this lane writes it.
                let chunk = unsafe { std::slice::from_raw_parts_mut(base.at(at), n) };
                read_part(f, chunk, start + at as u64, wanted.saturating_sub(at))?;
                let (from, to) = {
                    let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
                    st.0[p] = true;
                    let from = st.1;
                    while st.1 < parts && st.0[st.1] {
                        st.1 += 1;
                    }
                    (from, st.1)
                };
                if to > from {
                    let (a, b) = (seg(from), seg(to));
                    // SAFETY: parts `..to` have all arrived (the lock orders their writes
                    // before this read) and are never written again.
                    let bytes = unsafe { std::slice::from_raw_parts(base.at(head), b) };
                    if b > a {
                        arrived(a, b, bytes);
                    }
                }
            }
            Ok(())
        })
    });
    match done {
        Ok(()) => Ok(pad + head..pad + head + len),
        // How much was reported: the arrived run from the start (reports follow it).
        Err(err) => Err((err, seg(state.lock().unwrap_or_else(|e| e.into_inner()).1))),
    }
}

/// A segment's buffer while its parts are still arriving ([`SegmentReader::read_parts_ordered`]):
/// its first byte and its length. Only ranges reported as arrived may be read through it.
#[derive(Clone, Copy)]
pub struct Arriving {
    base: *const u8,
    len: usize,
}
// SAFETY: a read-only view; the ranges it is read at have arrived and are never written again
// (the contract of `range` and `ptr`), so threads may share it.
unsafe impl Send for Arriving {}
// SAFETY: as above.
unsafe impl Sync for Arriving {}

impl Arriving {
    /// The segment's first byte.
    pub fn ptr(&self) -> *const u8 {
        self.base
    }

    /// The segment's length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the segment is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes `from..to` of the segment.
    ///
    /// # Safety
    /// The range lies inside the segment and has been reported as arrived.
    pub unsafe fn range(&self, from: usize, to: usize) -> &[u8] {
        debug_assert!(from <= to && to <= self.len);
        // SAFETY: forwarded from this function's contract; the buffer outlives every report.
        unsafe { std::slice::from_raw_parts(self.base.add(from), to - from) }
    }
}

/// Where and how one segment is read in parts.
struct Parts {
    offset: u64,
    len: usize,
    part: usize,
    lanes: usize,
}

/// [`SegmentReader::read_parts_ordered`] through an `O_DIRECT` descriptor, on `pool`.
fn read_direct_ordered(
    pool: &rayon::ThreadPool,
    f: &File,
    Parts {
        offset,
        len,
        part,
        lanes,
    }: Parts,
    buf: &mut Vec<u8>,
    key: &(dyn Fn(usize, usize) -> u64 + Sync),
    arrived: &(dyn Fn(usize, usize, Arriving) + Sync),
) -> std::io::Result<std::ops::Range<usize>> {
    let (start, head, pad, total) = aligned_pages(offset, len, buf);
    let wanted = head + len;
    let parts = total.div_ceil(part);
    // Part p's bytes of the segment (the first part starts at the segment's first byte).
    let range = |p: usize| {
        (
            (p * part).max(head) - head,
            ((p + 1) * part).min(wanted) - head,
        )
    };
    let mut order: Vec<usize> = (0..parts).collect();
    order.sort_by_key(|&p| {
        let (a, b) = range(p);
        (key(a, b), p)
    });
    let lanes = lanes.clamp(1, parts);
    // SAFETY: `pad + total <= buf.len()` (aligned_pages sized it); `buf` is not touched again
    // until the lanes are done.
    let base = SharedBuf(unsafe { buf.as_mut_ptr().add(pad) });
    let seg = Arriving {
        base: base.at(head),
        len,
    };
    let next = std::sync::atomic::AtomicUsize::new(0);
    pool.install(|| {
        (0..lanes).into_par_iter().try_for_each(|_| loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(&p) = order.get(i) else {
                return Ok::<(), std::io::Error>(());
            };
            let at = p * part;
            let n = part.min(total - at);
            // SAFETY: part `p` is `at..at + n` of the aligned run, inside `buf`, and only the
            // lane that took its index writes it.
            let chunk = unsafe { std::slice::from_raw_parts_mut(base.at(at), n) };
            read_part(f, chunk, start + at as u64, wanted.saturating_sub(at))?;
            let (a, b) = range(p);
            if b > a {
                arrived(a, b, seg);
            }
        })
    })?;
    Ok(pad + head..pad + head + len)
}

#[cfg(unix)]
fn read_at(f: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    std::os::unix::fs::FileExt::read_at(f, buf, offset)
}

#[cfg(windows)]
fn read_at(f: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    std::os::windows::fs::FileExt::seek_read(f, buf, offset)
}

#[cfg(unix)]
fn read_exact_at(f: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(f, buf, offset)
}

#[cfg(windows)]
fn read_exact_at(f: &File, mut buf: &mut [u8], mut offset: u64) -> std::io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        let n = f.seek_read(buf, offset)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf = &mut buf[n..];
        offset += n as u64;
    }
    Ok(())
}

/// macOS: reads on this descriptor bypass the unified buffer cache (`F_NOCACHE`, macOS's
/// nearest to `O_DIRECT`), and the kernel reads no further ahead than asked (`F_RDAHEAD` 0):
/// expert reads are random, so read-ahead only fetches bytes nobody uses.
fn no_cache(_f: &File) {
    #[cfg(target_os = "macos")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: fcntl on a descriptor we own; failure only means the cache or read-ahead is
        // used.
        unsafe {
            libc::fcntl(_f.as_raw_fd(), libc::F_NOCACHE, 1);
            libc::fcntl(_f.as_raw_fd(), libc::F_RDAHEAD, 0);
        }
    }
}

/// Linux: drop the pages we just copied out, so the segment is not cached twice.
fn drop_cached(_f: &File, _offset: u64, _len: u64) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: advisory call on a descriptor we own; it cannot affect memory safety.
        unsafe {
            libc::posix_fadvise(
                _f.as_raw_fd(),
                _offset as i64,
                _len as i64,
                libc::POSIX_FADV_DONTNEED,
            )
        };
    }
}

fn advise_willneed(_f: &File, _offset: u64, _len: u64) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: advisory call on a descriptor we own.
        unsafe {
            libc::posix_fadvise(
                _f.as_raw_fd(),
                _offset as i64,
                _len as i64,
                libc::POSIX_FADV_WILLNEED,
            )
        };
    }
    #[cfg(target_os = "macos")]
    {
        use std::os::fd::AsRawFd;
        let mut ra = libc::radvisory {
            ra_offset: _offset as i64,
            ra_count: _len.min(i32::MAX as u64) as i32,
        };
        // SAFETY: F_RDADVISE takes a pointer to a radvisory that lives through the call.
        unsafe { libc::fcntl(_f.as_raw_fd(), libc::F_RDADVISE, &mut ra) };
    }
}

/// Drops a whole file from the OS page cache, so that benchmarks measure the disk
/// (Linux: `POSIX_FADV_DONTNEED`; elsewhere a no-op that returns `false`).
pub fn evict_from_page_cache(path: &Path) -> std::io::Result<bool> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let f = File::open(path)?;
        // SAFETY: advisory call on a descriptor we own.
        let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        Ok(rc == 0)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = path;
        Ok(false)
    }
}
