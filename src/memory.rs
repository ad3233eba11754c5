//! What the process holds and the machine has: physical RAM (within a container's cgroup memory
//! limit), resident set size (now and at its peak), and the process's CPU time.
//!
//! Shared by run (budgets as a share of RAM, the run's peak and CPU seconds in its stats) and
//! convert (each stage's peak with `FLASHPACK_STAGE_PEAKS=1`), so neither pipeline reaches into
//! the other for it.

/// Memory this process may use, in bytes (0 when unknown): the machine's physical memory, or
/// the memory limit of its cgroup (a container's `--memory`) when that is less.
pub fn total_ram() -> u64 {
    let physical = physical_ram();
    match cgroup_memory() {
        Some(cg) if physical == 0 || cg.limit < physical => cg.limit,
        _ => physical,
    }
}

/// A cgroup's memory limit and what its processes use of it, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CgroupMemory {
    /// The tightest `memory.max` (v2) or `memory.limit_in_bytes` (v1) on the way to the root.
    pub limit: u64,
    /// What the cgroup uses (`memory.current`, `memory.usage_in_bytes`), less its inactive
    /// file pages, which the kernel reclaims before it would kill (as `docker stats` counts).
    pub used: u64,
}

impl CgroupMemory {
    /// What may still be allocated under the limit.
    pub fn available(&self) -> u64 {
        self.limit.saturating_sub(self.used)
    }
}

/// This process's cgroup memory limit, when one is set (Linux; `None` elsewhere or unlimited).
pub fn cgroup_memory() -> Option<CgroupMemory> {
    if !cfg!(target_os = "linux") {
        return None;
    }
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    cgroup_memory_at(std::path::Path::new("/sys/fs/cgroup"), &own)
}

/// [`cgroup_memory`] with the cgroup file system at `root` and `/proc/self/cgroup`'s text
/// `own`. v2 (`0::/path`): the least `memory.max` of the cgroup and its parents, its
/// `memory.current` and `memory.stat`'s `inactive_file`. v1 (`N:memory:/path` or
/// `N:...,memory,...:/path`): `memory/path/memory.limit_in_bytes` (values near 2^63 mean none),
/// `memory.usage_in_bytes` and `total_inactive_file`. Inside a container the path may not exist
/// under `root` (the namespace's root is the cgroup itself): the root's files are read then.
pub fn cgroup_memory_at(root: &std::path::Path, own: &str) -> Option<CgroupMemory> {
    let read_u64 = |p: &std::path::Path| -> Option<u64> {
        std::fs::read_to_string(p).ok()?.trim().parse().ok()
    };
    let stat_field = |p: &std::path::Path, key: &str| -> u64 {
        std::fs::read_to_string(p)
            .ok()
            .and_then(|t| {
                t.lines().find_map(|l| {
                    let mut w = l.split_whitespace();
                    (w.next() == Some(key)).then(|| w.next()?.parse().ok())?
                })
            })
            .unwrap_or(0)
    };
    let dir_of = |base: &std::path::Path, path: &str| {
        let d = base.join(path.trim_start_matches('/'));
        if d.is_dir() {
            d
        } else {
            base.to_path_buf()
        }
    };
    // v1 first: a hybrid system lists both, and the memory controller is then v1's.
    let v1 = own.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        controllers
            .split(',')
            .any(|c| c == "memory")
            .then_some(path)
    });
    if let Some(path) = v1 {
        let dir = dir_of(&root.join("memory"), path);
        let limit = read_u64(&dir.join("memory.limit_in_bytes"))?;
        if limit >= 1 << 62 {
            return None;
        }
        let usage = read_u64(&dir.join("memory.usage_in_bytes")).unwrap_or(0);
        let inactive = stat_field(&dir.join("memory.stat"), "total_inactive_file");
        return Some(CgroupMemory {
            limit,
            used: usage.saturating_sub(inactive),
        });
    }
    let path = own.lines().find_map(|l| l.strip_prefix("0::"))?;
    let dir = dir_of(root, path);
    // The tightest limit from the cgroup up to the root of the mount.
    let mut limit: Option<u64> = None;
    let mut d = dir.as_path();
    loop {
        if let Ok(t) = std::fs::read_to_string(d.join("memory.max")) {
            if let Ok(v) = t.trim().parse::<u64>() {
                limit = Some(limit.map_or(v, |l| l.min(v)));
            }
        }
        if d == root {
            break;
        }
        match d.parent() {
            Some(p) if p.starts_with(root) => d = p,
            _ => break,
        }
    }
    let limit = limit?;
    let usage = read_u64(&dir.join("memory.current")).unwrap_or(0);
    let inactive = stat_field(&dir.join("memory.stat"), "inactive_file");
    Some(CgroupMemory {
        limit,
        used: usage.saturating_sub(inactive),
    })
}

/// The `memory.pressure` file (PSI, the format of `/proc/pressure/memory`) of this process's v2
/// cgroup, when there is one: it counts the stalls of this cgroup's tasks alone, such as reclaim
/// forced by the cgroup's own `memory.high` or `memory.max`, which the system-wide file dilutes
/// among every other task of the host (Linux; `None` elsewhere, on v1, or without the file).
pub fn cgroup_pressure_file() -> Option<std::path::PathBuf> {
    if !cfg!(target_os = "linux") {
        return None;
    }
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    cgroup_pressure_file_at(std::path::Path::new("/sys/fs/cgroup"), &own)
}

/// [`cgroup_pressure_file`] with the cgroup file system at `root` and `/proc/self/cgroup`'s
/// text `own`: the v2 cgroup's `memory.pressure` (or the root's, inside a container whose
/// namespace root is the cgroup), `None` when the memory controller is v1's.
pub fn cgroup_pressure_file_at(root: &std::path::Path, own: &str) -> Option<std::path::PathBuf> {
    let v1 = own.lines().any(|l| {
        l.split(':')
            .nth(1)
            .is_some_and(|c| c.split(',').any(|c| c == "memory"))
    });
    if v1 {
        return None;
    }
    let path = own.lines().find_map(|l| l.strip_prefix("0::"))?;
    let dir = root.join(path.trim().trim_start_matches('/'));
    let dir = if dir.is_dir() {
        dir
    } else {
        root.to_path_buf()
    };
    let file = dir.join("memory.pressure");
    file.is_file().then_some(file)
}

/// Physical memory of this machine, in bytes (0 when unknown).
fn physical_ram() -> u64 {
    #[cfg(unix)]
    {
        // SAFETY: sysconf reads system constants and has no memory effects.
        let (pages, page) = unsafe {
            (
                libc::sysconf(libc::_SC_PHYS_PAGES),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        if pages > 0 && page > 0 {
            return pages as u64 * page as u64;
        }
    }
    0
}

/// Peak resident set size of this process so far, in bytes.
pub fn peak_rss() -> u64 {
    #[cfg(unix)]
    {
        let mut u = std::mem::MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: getrusage writes one rusage into the pointer we give it.
        let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, u.as_mut_ptr()) };
        if rc == 0 {
            // SAFETY: getrusage succeeded, so the struct is initialised.
            let max = unsafe { u.assume_init() }.ru_maxrss as u64;
            // Linux reports KiB, macOS bytes.
            return if cfg!(target_os = "macos") {
                max
            } else {
                max * 1024
            };
        }
    }
    0
}

/// Resident set size of this process now, in bytes (`None` where unknown): Linux from
/// `/proc/self/statm`, macOS from `proc_pidinfo`. One file read or one call; for reports and
/// the memory-pressure log, not for every token.
pub fn current_rss() -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
        let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
        // SAFETY: sysconf reads a system constant and has no memory effects.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        (page > 0).then(|| pages * page as u64)
    }
    #[cfg(target_os = "macos")]
    {
        let mut info = std::mem::MaybeUninit::<libc::proc_taskinfo>::zeroed();
        let size = std::mem::size_of::<libc::proc_taskinfo>() as libc::c_int;
        // SAFETY: proc_pidinfo writes at most `size` bytes into `info`, which has that many.
        let n = unsafe {
            libc::proc_pidinfo(
                libc::getpid(),
                libc::PROC_PIDTASKINFO,
                0,
                info.as_mut_ptr().cast(),
                size,
            )
        };
        // SAFETY: a full answer (n == size) initialised the struct.
        (n == size).then(|| unsafe { info.assume_init() }.pti_resident_size)
    }
    #[cfg(not(any(target_os = "linux", target_os = "macos")))]
    None
}

/// CPU time of this process (all threads), in seconds; 0 where unknown.
pub fn process_cpu_s() -> f64 {
    #[cfg(unix)]
    {
        let mut t = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec into the pointer we give it.
        if unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut t) } == 0 {
            return t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9;
        }
    }
    0.0
}

/// Peak resident set size since the last call (the first call: since the process started),
/// then starts a new period. Linux only (`VmHWM`, reset through `/proc/self/clear_refs`); `None`
/// elsewhere or where the reset is refused, so a caller never reports a stale peak as new.
pub fn take_peak_rss() -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        std::fs::write("/proc/self/clear_refs", "5").ok()?;
        Some(kb * 1024)
    }
    #[cfg(not(target_os = "linux"))]
    None
}

#[cfg(test)]
mod tests {
    #[test]
    fn cgroup_v2_limits_take_the_tightest_and_leave_inactive_files_out() {
        let root = tempfile::tempdir().unwrap();
        let leaf = root.path().join("system.slice/box.scope");
        std::fs::create_dir_all(&leaf).unwrap();
        std::fs::write(root.path().join("system.slice/memory.max"), "8000000\n").unwrap();
        std::fs::write(leaf.join("memory.max"), "max\n").unwrap();
        std::fs::write(leaf.join("memory.current"), "5000000\n").unwrap();
        std::fs::write(
            leaf.join("memory.stat"),
            "anon 3000000\ninactive_file 1000000\n",
        )
        .unwrap();
        let own = "0::/system.slice/box.scope\n";
        let cg = cgroup_memory_at(root.path(), own).unwrap();
        assert_eq!(
            cg,
            CgroupMemory {
                limit: 8_000_000,
                used: 4_000_000
            }
        );
        assert_eq!(cg.available(), 4_000_000);
        // No limit anywhere: none.
        std::fs::write(root.path().join("system.slice/memory.max"), "max\n").unwrap();
        assert_eq!(cgroup_memory_at(root.path(), own), None);
        // Inside a container the namespace's root is the cgroup: its own files.
        std::fs::write(root.path().join("memory.max"), "2000000\n").unwrap();
        std::fs::write(root.path().join("memory.current"), "500000\n").unwrap();
        let cg = cgroup_memory_at(root.path(), "0::/\n").unwrap();
        assert_eq!(
            cg,
            CgroupMemory {
                limit: 2_000_000,
                used: 500_000
            }
        );
    }

    #[test]
    fn cgroup_v1_limits_are_read_and_an_unlimited_one_is_none() {
        let root = tempfile::tempdir().unwrap();
        let mem = root.path().join("memory/docker/abc");
        std::fs::create_dir_all(&mem).unwrap();
        std::fs::write(mem.join("memory.limit_in_bytes"), "4000000\n").unwrap();
        std::fs::write(mem.join("memory.usage_in_bytes"), "3000000\n").unwrap();
        std::fs::write(
            mem.join("memory.stat"),
            "cache 10\ntotal_inactive_file 500000\n",
        )
        .unwrap();
        let own = "12:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n0::/\n";
        let cg = cgroup_memory_at(root.path(), own).unwrap();
        assert_eq!(
            cg,
            CgroupMemory {
                limit: 4_000_000,
                used: 2_500_000
            }
        );
        std::fs::write(mem.join("memory.limit_in_bytes"), "9223372036854771712\n").unwrap();
        assert_eq!(cgroup_memory_at(root.path(), own), None);
        assert_eq!(cgroup_memory_at(root.path(), "garbage"), None);
    }

    #[test]
    fn the_cgroups_own_pressure_file_is_found_on_v2_only() {
        let root = tempfile::tempdir().unwrap();
        let leaf = root.path().join("user.slice/app.scope");
        std::fs::create_dir_all(&leaf).unwrap();
        let own = "0::/user.slice/app.scope\n";
        assert_eq!(cgroup_pressure_file_at(root.path(), own), None);
        std::fs::write(
            leaf.join("memory.pressure"),
            "some avg10=1.00 avg60=0 avg300=0 total=1\n",
        )
        .unwrap();
        assert_eq!(
            cgroup_pressure_file_at(root.path(), own),
            Some(leaf.join("memory.pressure"))
        );
        // A namespace's root is the cgroup: the root's own file.
        std::fs::write(root.path().join("memory.pressure"), "some avg10=0.00\n").unwrap();
        assert_eq!(
            cgroup_pressure_file_at(root.path(), "0::/\n"),
            Some(root.path().join("memory.pressure"))
        );
        // The memory controller on v1: v1 has no per-cgroup PSI file.
        assert_eq!(
            cgroup_pressure_file_at(root.path(), "4:memory:/docker/abc\n0::/\n"),
            None
        );
    }

    use super::*;

    #[test]
    #[cfg(target_os = "linux")]
    fn current_rss_follows_a_touched_buffer() {
        let before = current_rss().expect("statm on Linux");
        let v = vec![1u8; 64 << 20];
        std::hint::black_box(&v);
        let during = current_rss().unwrap();
        drop(v);
        let after = current_rss().unwrap();
        assert!(during >= before + (48 << 20), "{before} -> {during}");
        assert!(during >= after + (48 << 20), "{during} -> {after}");
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn peak_periods_restart() {
        let _ = take_peak_rss();
        // A 64 MiB buffer, touched, then freed: the period's peak holds it...
        let v = vec![1u8; 64 << 20];
        std::hint::black_box(&v);
        drop(v);
        let first = take_peak_rss().expect("VmHWM on Linux");
        // ...and the next period's does not.
        let second = take_peak_rss().expect("VmHWM on Linux");
        assert!(first >= second + (48 << 20), "{first} vs {second}");
    }
}
