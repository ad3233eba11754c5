//! A sparse local copy of a remote file: some byte ranges present, holes elsewhere, and a
//! record of which ranges are present, so that a pipeline rank downloads only its own ranges
//! of a pack, a second run downloads nothing and an interrupted one resumes.
//!
//! In: the file's size, the [`Piece`]s wanted (ranges with their checks), a source of ranges
//! (HTTP ranges of the Hub's file, [`super::RemoteFiles::read`]). Out: the pieces' bytes in the
//! local file at their own offsets.
//! Pure planning ([`RangeSet`], [`plan_requests`]: which pieces are missing, merged into few
//! requests) is separate from the I/O ([`SparseFile`]).
//! Invariant: every range the record lists was checked (its piece's blake3, or the header
//! checksum) before it was written, and its bytes were synced to disk before the record named
//! it; the record is append-only, so a crash loses at most the last request's ranges.

use std::fs::File;
use std::io::{Read, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use super::error::io_err;
use super::HubError;
use crate::format::Piece;

/// Requests are merged across gaps up to this many bytes (bytes of other pieces or padding,
/// downloaded and dropped): fewer round trips for a little more traffic.
pub const MAX_GAP: u64 = 256 << 10;
/// A merged request holds at most this many bytes (a larger piece is one request alone): it is
/// held in memory before it is checked and written.
pub const MAX_REQUEST: u64 = 64 << 20;

/// Disjoint byte ranges, sorted, touching ones merged.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeSet {
    ranges: Vec<Range<u64>>,
}

impl RangeSet {
    pub fn insert(&mut self, r: Range<u64>) {
        if r.is_empty() {
            return;
        }
        let (mut start, mut end) = (r.start, r.end);
        // Every range that touches or overlaps [start, end) is absorbed.
        let first = self.ranges.partition_point(|x| x.end < start);
        let mut last = first;
        while last < self.ranges.len() && self.ranges[last].start <= end {
            start = start.min(self.ranges[last].start);
            end = end.max(self.ranges[last].end);
            last += 1;
        }
        self.ranges.splice(first..last, std::iter::once(start..end));
    }

    /// Whether every byte of `r` is in the set.
    pub fn covers(&self, r: &Range<u64>) -> bool {
        if r.is_empty() {
            return true;
        }
        let i = self.ranges.partition_point(|x| x.end <= r.start);
        self.ranges
            .get(i)
            .is_some_and(|x| x.start <= r.start && r.end <= x.end)
    }

    pub fn ranges(&self) -> &[Range<u64>] {
        &self.ranges
    }

    /// Bytes in the set.
    pub fn len(&self) -> u64 {
        self.ranges.iter().map(|r| r.end - r.start).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }
}

/// One HTTP range request and the pieces it brings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub range: Range<u64>,
    /// Indices into the planned pieces, in offset order.
    pub pieces: Vec<usize>,
}

/// The requests that bring every piece of `pieces` that `present` does not cover: pieces in
/// offset order, a request extended to the next missing piece while the gap is at most
/// `max_gap` and the request stays within `max_len` (a piece longer than that is a request of
/// its own). Pure.
pub fn plan_requests(
    pieces: &[Piece],
    present: &RangeSet,
    max_gap: u64,
    max_len: u64,
) -> Vec<Request> {
    let mut order: Vec<usize> = (0..pieces.len())
        .filter(|&i| !present.covers(&pieces[i].range))
        .collect();
    order.sort_by_key(|&i| (pieces[i].range.start, pieces[i].range.end));
    let mut out: Vec<Request> = Vec::new();
    for i in order {
        let r = &pieces[i].range;
        if let Some(last) = out.last_mut() {
            let end = last.range.end.max(r.end);
            let joins = r.start <= last.range.end.saturating_add(max_gap)
                && end - last.range.start <= max_len;
            if joins {
                last.range.end = end;
                last.pieces.push(i);
                continue;
            }
        }
        out.push(Request {
            range: r.clone(),
            pieces: vec![i],
        });
    }
    out
}

/// The record's first line: a version and the file's size.
fn record_head(size: u64) -> String {
    format!("flashpack-ranges 1 {size}\n")
}

/// The file size a record was written for.
pub fn parse_record_size(text: &str) -> Option<u64> {
    let line = text.lines().next()?;
    line.strip_prefix("flashpack-ranges 1 ")?
        .trim()
        .parse()
        .ok()
}

/// The ranges a record lists, if it is a record of a file of `size` bytes. A last line without
/// its newline (a write cut off) is left out.
pub fn parse_record(text: &str, size: u64) -> Option<RangeSet> {
    let body = text.strip_prefix(&record_head(size))?;
    let mut set = RangeSet::default();
    let complete = body.rfind('\n').map_or("", |n| &body[..n]);
    for line in complete.lines() {
        let (a, b) = line.split_once(' ')?;
        let (a, b) = (a.parse::<u64>().ok()?, b.parse::<u64>().ok()?);
        if a > b || b > size {
            return None;
        }
        set.insert(a..b);
    }
    Some(set)
}

/// The local file and its record, locked while one process writes to them.
pub(crate) struct SparseFile {
    path: PathBuf,
    record: PathBuf,
    size: u64,
    data: File,
    log: File,
    present: RangeSet,
}

impl SparseFile {
    /// `path` beside its record `path.ranges`. Opens both (creating the file at `size` bytes,
    /// all holes, where it is missing or of another size, and starting the record over) and
    /// takes the exclusive lock on the record, waiting for another process that holds it.
    pub(crate) fn open(path: &Path, size: u64) -> Result<SparseFile, HubError> {
        let mut record = path.as_os_str().to_os_string();
        record.push(".ranges");
        let record = PathBuf::from(record);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        }
        let mut log = File::options()
            .create(true)
            .truncate(false)
            .read(true)
            .append(true)
            .open(&record)
            .map_err(io_err(&record))?;
        // SAFETY: flock on a descriptor this function owns; it blocks until another holder
        // (another rank on this machine) closes its record.
        if unsafe { libc::flock(log.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io_err(&record)(std::io::Error::last_os_error()));
        }
        let data = File::options()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_err(path))?;
        let len = data.metadata().map_err(io_err(path))?.len();
        let mut text = String::new();
        let read = log.read_to_string(&mut text).is_ok();
        let present = match parse_record(&text, size) {
            Some(set) if read && len == size => set,
            _ => {
                // A new file, or one this record does not describe: start both over.
                data.set_len(0).map_err(io_err(path))?;
                data.set_len(size).map_err(io_err(path))?;
                log.set_len(0).map_err(io_err(&record))?;
                log.write_all(record_head(size).as_bytes())
                    .and_then(|()| log.sync_all())
                    .map_err(io_err(&record))?;
                RangeSet::default()
            }
        };
        Ok(SparseFile {
            path: path.to_path_buf(),
            record,
            size,
            data,
            log,
            present,
        })
    }

    pub(crate) fn present(&self) -> &RangeSet {
        &self.present
    }

    /// Bytes `range` of the local file (holes read as zeros).
    pub(crate) fn read(&self, range: Range<u64>) -> Result<Vec<u8>, HubError> {
        let end = range.end.min(self.size);
        let mut buf = vec![0u8; end.saturating_sub(range.start) as usize];
        self.data
            .read_exact_at(&mut buf, range.start)
            .map_err(io_err(&self.path))?;
        Ok(buf)
    }

    /// Writes checked pieces (`(offset, bytes)`), syncs them, then appends their ranges to the
    /// record and syncs it.
    pub(crate) fn commit(&mut self, pieces: &[(u64, &[u8])]) -> Result<(), HubError> {
        let mut lines = String::new();
        for &(at, bytes) in pieces {
            self.data
                .write_all_at(bytes, at)
                .map_err(|e| super::fetch::write_error(&self.path, e, bytes.len() as u64))?;
            let r = at..at + bytes.len() as u64;
            lines.push_str(&format!("{} {}\n", r.start, r.end));
            self.present.insert(r);
        }
        self.data.sync_data().map_err(io_err(&self.path))?;
        self.log
            .write_all(lines.as_bytes())
            .and_then(|()| self.log.sync_data())
            .map_err(io_err(&self.record))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::Check;

    fn piece(r: Range<u64>) -> Piece {
        Piece {
            range: r,
            what: String::new(),
            check: Check::Header,
        }
    }

    #[test]
    fn range_sets_merge_and_cover() {
        let mut s = RangeSet::default();
        s.insert(10..20);
        s.insert(30..40);
        assert_eq!(s.ranges(), [10..20, 30..40]);
        s.insert(20..30);
        assert_eq!(s.ranges(), std::slice::from_ref(&(10..40)));
        s.insert(5..12);
        s.insert(50..60);
        s.insert(0..0);
        assert_eq!(s.ranges(), [5..40, 50..60]);
        assert!(s.covers(&(5..40)) && s.covers(&(52..53)) && s.covers(&(7..7)));
        assert!(!s.covers(&(39..41)) && !s.covers(&(40..50)) && !s.covers(&(0..6)));
        s.insert(0..100);
        assert_eq!(s.ranges(), std::slice::from_ref(&(0..100)));
        assert_eq!(s.len(), 100);
    }

    #[test]
    fn requests_skip_present_pieces_and_merge_small_gaps() {
        let pieces: Vec<Piece> = [300..400, 0..100, 100..150, 160..200, 1000..1100]
            .into_iter()
            .map(piece)
            .collect();
        let mut present = RangeSet::default();
        present.insert(300..400);
        let reqs = plan_requests(&pieces, &present, 10, 1 << 20);
        assert_eq!(
            reqs,
            [
                Request {
                    range: 0..200,
                    pieces: vec![1, 2, 3]
                },
                Request {
                    range: 1000..1100,
                    pieces: vec![4]
                },
            ]
        );
        // A larger gap joins the far piece; a length cap splits again.
        assert_eq!(plan_requests(&pieces, &present, 800, 1 << 20).len(), 1);
        let capped = plan_requests(&pieces, &present, 800, 150);
        assert_eq!(
            capped.iter().map(|r| r.range.clone()).collect::<Vec<_>>(),
            [0..150, 160..200, 1000..1100]
        );
        // Everything present: nothing to request.
        present.insert(0..2000);
        assert!(plan_requests(&pieces, &present, 10, 100).is_empty());
    }

    #[test]
    fn records_parse_and_drop_a_torn_last_line() {
        let text = format!("{}0 10\n20 30\n40 4", record_head(100));
        let set = parse_record(&text, 100).unwrap();
        assert_eq!(set.ranges(), [0..10, 20..30]);
        assert!(parse_record(&text, 99).is_none(), "another size");
        assert!(parse_record(&format!("{}5 200\n", record_head(100)), 100).is_none());
        assert!(parse_record("junk", 100).is_none());
    }

    #[test]
    fn sparse_files_keep_their_record_across_opens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/x.flashpack");
        let mut f = SparseFile::open(&path, 1000).unwrap();
        assert!(f.present().is_empty());
        f.commit(&[(10, b"abc"), (500, b"xyz")]).unwrap();
        drop(f);
        let f = SparseFile::open(&path, 1000).unwrap();
        assert_eq!(f.present().ranges(), [10..13, 500..503]);
        assert_eq!(f.read(9..14).unwrap(), b"\0abc\0");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1000);
        drop(f);
        // Another size: the file and its record start over.
        let f = SparseFile::open(&path, 2000).unwrap();
        assert!(f.present().is_empty());
        assert_eq!(f.read(10..13).unwrap(), b"\0\0\0");
    }
}
