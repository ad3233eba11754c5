//! Disk probe of `flashpack plan`: what a miss costs on the disk a pack lives on, measured the
//! way the runtime loads an expert, and remembered per disk.
//!
//! In: a folder on the disk, the bytes one miss reads, the misses a layer reads together (its
//! top-k). Out: [`Disk`] (`latency_s`, `bytes_per_s`) and where it came from.
//! How: a scratch file of [`SCRATCH_BYTES`] (or 32 misses, if larger) of pseudo-random bytes is
//! written in the folder and synced; misses are then loaded from random page-aligned offsets as
//! `run` loads them: `O_DIRECT` reads of whole pages (`run::read`'s own reader; buffered where
//! the file system refuses `O_DIRECT`), the blake3 of the bytes, a copy into a slot-sized
//! buffer, `k` at once on [`QUEUE_DEPTH`] threads. One miss alone gives the latency, `k`
//! together the rate of the rest. The file is removed, and the result is cached in the user's
//! cache folder under the disk's device number, the read size and `k`, so the next `plan` on
//! that disk measures nothing (`--measure` measures again).
//! Invariant: the pack itself is never read.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::speed::Disk;

/// The smallest scratch file.
pub const SCRATCH_BYTES: u64 = 64 << 20;
/// Loads in flight, as `run`'s default `--queue-depth`.
pub const QUEUE_DEPTH: usize = 8;
const ALIGN: u64 = 16 << 10;

/// Where the numbers came from.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    Measured,
    Cached,
    /// `FLASHPACK_PLAN_RATES` or `--disk-speed`.
    Given,
}

/// The cache file: `$XDG_CACHE_HOME/flashpack/disks.json`, else `~/.cache/flashpack/disks.json`.
pub fn cache_file() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("flashpack").join("disks.json"))
}

/// The cache key of a disk, read size and batch.
fn key(dir: &Path, read_bytes: u64, batch: usize) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(dir).ok()?.dev();
    Some(format!("dev {dev}, {read_bytes} B x {batch}"))
}

fn load_cache(file: &Path) -> BTreeMap<String, Disk> {
    std::fs::read(file)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// A miss's cost on the disk of `dir`: from the cache, else measured (and cached).
pub fn of(
    dir: &Path,
    read_bytes: u64,
    batch: usize,
    remeasure: bool,
) -> std::io::Result<(Disk, Origin)> {
    let read_bytes = read_bytes.max(ALIGN);
    let batch = batch.max(1);
    let cache = cache_file();
    let k = key(dir, read_bytes, batch);
    if let (false, Some(file), Some(k)) = (remeasure, &cache, &k) {
        if let Some(d) = load_cache(file).get(k) {
            return Ok((*d, Origin::Cached));
        }
    }
    let disk = measure(dir, read_bytes, batch)?;
    if let (Some(file), Some(k)) = (cache, k) {
        let mut all = load_cache(&file);
        all.insert(k, disk);
        // A cache that cannot be written only costs the next run a measurement.
        if let Some(parent) = file.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        if let Ok(text) = serde_json::to_vec_pretty(&all) {
            let tmp = file.with_extension(format!("tmp-{}", std::process::id()));
            if std::fs::write(&tmp, text).is_ok() {
                let _ = std::fs::rename(&tmp, &file);
            }
        }
    }
    Ok((disk, Origin::Measured))
}

/// Removes the scratch file when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Measures a miss's cost on the disk of `dir` (see the module doc).
pub fn measure(dir: &Path, read_bytes: u64, batch: usize) -> std::io::Result<Disk> {
    let read_bytes = read_bytes.max(ALIGN).div_ceil(ALIGN) * ALIGN;
    let len = SCRATCH_BYTES.max(32 * read_bytes);
    let path = dir.join(format!(".flashpack-plan-probe-{}", std::process::id()));
    let scratch = Scratch(path.clone());
    {
        let mut f = std::fs::File::create(&path)?;
        no_cache(&f);
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut block = vec![0u8; 1 << 20];
        let mut left = len;
        while left > 0 {
            for w in block.chunks_exact_mut(8) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                w.copy_from_slice(&state.to_le_bytes());
            }
            let n = left.min(block.len() as u64) as usize;
            f.write_all(&block[..n])?;
            left -= n as u64;
        }
        f.sync_all()?;
        drop_cached(&f);
    }
    let direct = crate::run::read::open_direct(&path);
    let buffered = std::fs::File::open(&path)?;
    no_cache(&buffered);
    // What one load does: read the pages, hash them, copy them into a slot.
    let load = |offset: u64, buf: &mut Vec<u8>, slot: &mut Vec<u8>| -> std::io::Result<()> {
        let range = match &direct {
            Some(f) => match crate::run::read::read_direct(f, offset, read_bytes as usize, buf) {
                Ok(r) => r,
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    buffered_read(&buffered, offset, read_bytes, buf)?
                }
                Err(e) => return Err(e),
            },
            None => buffered_read(&buffered, offset, read_bytes, buf)?,
        };
        std::hint::black_box(blake3::hash(&buf[range.clone()]));
        slot.resize(range.len(), 0);
        slot.copy_from_slice(&buf[range]);
        Ok(())
    };
    let slots = len / read_bytes;
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut offset = move || {
        rng = rng
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (rng >> 33) % slots * read_bytes
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(QUEUE_DEPTH)
        .build()
        .map_err(std::io::Error::other)?;
    let mut time_batch = |n: usize| -> std::io::Result<f64> {
        let offsets: Vec<u64> = (0..n).map(|_| offset()).collect();
        let t = Instant::now();
        pool.install(|| {
            use rayon::prelude::*;
            offsets.par_iter().try_for_each_init(
                || (Vec::new(), Vec::new()),
                |(buf, slot), &o| load(o, buf, slot),
            )
        })?;
        Ok(t.elapsed().as_secs_f64())
    };
    // Warm the threads and buffers, then time lone misses and whole layers' worth.
    time_batch(batch)?;
    let mut one = Vec::new();
    let mut many = Vec::new();
    let started = Instant::now();
    for i in 0..24 {
        one.push(time_batch(1)?);
        if batch > 1 {
            many.push(time_batch(batch)?);
        }
        if i >= 6 && started.elapsed().as_secs_f64() > 1.5 {
            break;
        }
    }
    drop(scratch);
    // Means, not medians: what a run pays over many tokens, throttling and bursts included.
    let mean = |v: Vec<f64>| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let t1 = mean(one);
    let (latency_s, bytes_per_s) = if batch > 1 {
        let tk = mean(many);
        // t(k) = latency + k x bytes / rate, t(1) = latency + bytes / rate.
        let per = ((tk - t1) / (batch - 1) as f64).max(t1 / batch as f64);
        ((t1 - per).max(0.0), read_bytes as f64 / per)
    } else {
        (0.0, read_bytes as f64 / t1)
    };
    Ok(Disk {
        latency_s,
        bytes_per_s,
    })
}

/// A buffered read of `len` bytes at `offset` into `buf`.
fn buffered_read(
    f: &std::fs::File,
    offset: u64,
    len: u64,
    buf: &mut Vec<u8>,
) -> std::io::Result<std::ops::Range<usize>> {
    use std::os::unix::fs::FileExt;
    buf.resize(len as usize, 0);
    f.read_exact_at(&mut buf[..len as usize], offset)?;
    Ok(0..len as usize)
}

/// macOS: reads and writes of `f` bypass the unified buffer cache (`F_NOCACHE`, as `run`'s
/// reader sets it), so the scratch file is read from the disk.
fn no_cache(f: &std::fs::File) {
    #[cfg(target_os = "macos")]
    {
        use std::os::unix::io::AsRawFd;
        // SAFETY: fcntl on a descriptor this function borrows; no memory is passed.
        unsafe {
            libc::fcntl(f.as_raw_fd(), libc::F_NOCACHE, 1);
        }
    }
    #[cfg(not(target_os = "macos"))]
    let _ = f;
}

/// Linux: drops the scratch file's pages from the page cache, for a file system that refuses
/// `O_DIRECT` (buffered reads then come from the disk too).
fn drop_cached(f: &std::fs::File) {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::io::AsRawFd;
        // SAFETY: posix_fadvise on a descriptor this function borrows; no memory is passed.
        unsafe {
            libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = f;
}
