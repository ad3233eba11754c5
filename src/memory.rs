//! What the process holds and the machine has: physical RAM, resident set size (now and at its
//! peak), and the process's CPU time.
//!
//! Shared by run (budgets as a share of RAM, the run's peak and CPU seconds in its stats) and
//! convert (each stage's peak with `FLASHPACK_STAGE_PEAKS=1`), so neither pipeline reaches into
//! the other for it.

/// Physical memory of this machine, in bytes (0 when unknown).
pub fn total_ram() -> u64 {
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
