//! Memory budgets from the command line: `8GiB`, `4GB`, `512MiB`, `0.5` or `50%` of RAM.

/// Parses a size; fractions and percentages are of `total_ram`.
pub fn parse_size(text: &str, total_ram: u64) -> Result<u64, String> {
    let t = text.trim();
    let bad = || format!("bad size {text:?}: use e.g. 8GiB, 4GB, 512MiB, 0.5 or 50% (of RAM)");
    if let Some(p) = t.strip_suffix('%') {
        let f: f64 = p.trim().parse().map_err(|_| bad())?;
        if !(f > 0.0 && f <= 100.0) {
            return Err(bad());
        }
        return Ok((total_ram as f64 * f / 100.0) as u64);
    }
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.trim().parse().map_err(|_| bad())?;
    if !(n.is_finite() && n > 0.0) {
        return Err(bad());
    }
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" if n <= 1.0 => return Ok((total_ram as f64 * n) as u64),
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0f64.powi(4),
        _ => return Err(bad()),
    };
    Ok((n * mult) as u64)
}

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

    #[test]
    fn sizes_and_fractions() {
        let ram = 16 << 30;
        assert_eq!(parse_size("8GiB", ram), Ok(8 << 30));
        assert_eq!(parse_size("4GB", ram), Ok(4_000_000_000));
        assert_eq!(parse_size("512 MiB", ram), Ok(512 << 20));
        assert_eq!(parse_size("50%", ram), Ok(8 << 30));
        assert_eq!(parse_size("0.25", ram), Ok(4 << 30));
        assert_eq!(parse_size("1000", ram), Ok(1000));
        assert!(parse_size("lots", ram).is_err());
        assert!(parse_size("-3GB", ram).is_err());
        assert!(parse_size("150%", ram).is_err());
    }
}
