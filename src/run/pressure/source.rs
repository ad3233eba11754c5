//! Memory pressure, where readings come from: the system ([`SystemSource`]: Linux's
//! `/proc/meminfo` and PSI, macOS's pressure level) or a script ([`ScriptedSource`]: tests, and
//! `FLASHPACK_PRESSURE_SCRIPT=FILE` for the command line).
//!
//! In: a poll, once per forward pass (a token, or a prompt chunk) and once a second while a
//! server is idle. Out: a [`Reading`], or `None` when there is nothing new. The system source
//! reads at most every [`SystemSource::EVERY`] (a clock read per poll, two small file reads per
//! reading on Linux, three `sysctl`s on macOS); a script gives one reading per poll.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::policy::{Level, Reading};

/// Something that reads the system's memory.
pub trait PressureSource: Send {
    /// A reading, or `None` when there is nothing new yet (a source may limit how often it
    /// really reads).
    fn read(&mut self) -> Option<Reading>;
    /// What the reports call it: `system` or `script`.
    fn name(&self) -> &'static str;
}

/// Why a pressure script cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PressureError {
    #[error("cannot read the pressure script {}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pressure script {}, line {line}: {reason}; a line is `available=SIZE total=SIZE stall=PERCENT level=normal|warn|critical repeat=N`, any of them", .path.display())]
    Script {
        path: PathBuf,
        line: usize,
        reason: String,
    },
}

/// The system's own readings.
pub struct SystemSource {
    last: Option<Instant>,
    /// `/proc/pressure/memory`, when the kernel has PSI.
    #[cfg(target_os = "linux")]
    psi: bool,
    /// The process's own cgroup's `memory.pressure` (v2), when it has one.
    #[cfg(target_os = "linux")]
    cgroup_psi: Option<PathBuf>,
}

impl SystemSource {
    /// The least time between two readings: the policy's steps count readings, and PSI's
    /// shortest average is over 10 s.
    pub const EVERY: Duration = Duration::from_millis(500);

    /// The system's source, where this platform has one (Linux, macOS).
    pub fn new() -> Option<SystemSource> {
        #[cfg(target_os = "linux")]
        {
            let src = SystemSource {
                last: None,
                psi: Path::new("/proc/pressure/memory").exists(),
                cgroup_psi: crate::memory::cgroup_pressure_file(),
            };
            std::fs::metadata("/proc/meminfo").ok().map(|_| src)
        }
        #[cfg(target_os = "macos")]
        {
            Some(SystemSource { last: None })
        }
        #[cfg(not(any(target_os = "linux", target_os = "macos")))]
        {
            None
        }
    }

    #[cfg(target_os = "linux")]
    fn read_now(&mut self) -> Reading {
        let (mut total_bytes, mut available_bytes) = std::fs::read_to_string("/proc/meminfo")
            .map(|t| parse_meminfo(&t))
            .unwrap_or((None, None));
        // In a container with a memory limit, the limit is the machine: its cgroup runs out
        // (and is killed) while the host's MemAvailable still looks ample.
        if let Some(cg) = crate::memory::cgroup_memory() {
            let min = |a: Option<u64>, b: u64| Some(a.map_or(b, |a| a.min(b)));
            total_bytes = min(total_bytes, cg.limit);
            available_bytes = min(available_bytes, cg.available());
        }
        // The larger of the system's stall share and the cgroup's own: a container that
        // reclaims against its own limit stalls while the host's average stays low.
        let psi_of = |p: &Path| std::fs::read_to_string(p).ok().and_then(|t| parse_psi(&t));
        let system = if self.psi {
            psi_of(Path::new("/proc/pressure/memory"))
        } else {
            None
        };
        let own = self.cgroup_psi.as_deref().and_then(psi_of);
        let stall_pct = match (system, own) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        Reading {
            available_bytes,
            total_bytes,
            stall_pct,
            level: None,
        }
    }

    #[cfg(target_os = "macos")]
    fn read_now(&mut self) -> Reading {
        let total = macos::sysctl_u64("hw.memsize");
        // kern.memorystatus_level: the share of memory free for use, percent.
        let free_pct = macos::sysctl_u32("kern.memorystatus_level");
        let level = macos::sysctl_u32("kern.memorystatus_vm_pressure_level").map(|l| match l {
            4 => Level::Critical,
            2 => Level::Warn,
            _ => Level::Normal,
        });
        Reading {
            available_bytes: match (total, free_pct) {
                (Some(t), Some(p)) if p <= 100 => Some(t / 100 * p as u64),
                _ => None,
            },
            total_bytes: total,
            stall_pct: None,
            level,
        }
    }

    #[cfg(not(any(target_os = "linux", target_os = "macos")))]
    fn read_now(&mut self) -> Reading {
        Reading::default()
    }
}

impl PressureSource for SystemSource {
    fn read(&mut self) -> Option<Reading> {
        let now = Instant::now();
        if self.last.is_some_and(|t| now - t < Self::EVERY) {
            return None;
        }
        self.last = Some(now);
        Some(self.read_now())
    }

    fn name(&self) -> &'static str {
        "system"
    }
}

#[cfg(target_os = "macos")]
mod macos {
    use std::ffi::CString;

    fn sysctl<T: Copy + Default>(name: &str) -> Option<T> {
        let name = CString::new(name).ok()?;
        let mut value = T::default();
        let mut len = std::mem::size_of::<T>();
        // SAFETY: sysctlbyname writes at most `len` bytes into `value`, which has that many,
        // and sets `len` to what it wrote; the name is NUL-terminated.
        let rc = unsafe {
            libc::sysctlbyname(
                name.as_ptr(),
                (&mut value as *mut T).cast(),
                &mut len,
                std::ptr::null_mut(),
                0,
            )
        };
        (rc == 0 && len == std::mem::size_of::<T>()).then_some(value)
    }

    pub fn sysctl_u64(name: &str) -> Option<u64> {
        sysctl::<u64>(name)
    }

    pub fn sysctl_u32(name: &str) -> Option<u32> {
        sysctl::<u32>(name)
    }
}

/// `MemTotal` and `MemAvailable` of `/proc/meminfo`, in bytes.
pub fn parse_meminfo(text: &str) -> (Option<u64>, Option<u64>) {
    let field = |name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        let kb: u64 = line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        kb.checked_mul(1024)
    };
    (field("MemTotal:"), field("MemAvailable:"))
}

/// PSI's `some avg10` of `/proc/pressure/memory`: the share of the last 10 s in which some task
/// waited for memory, percent.
pub fn parse_psi(text: &str) -> Option<f64> {
    let some = text.lines().find(|l| l.starts_with("some "))?;
    some.split_whitespace()
        .find_map(|f| f.strip_prefix("avg10="))?
        .parse()
        .ok()
}

/// Readings from a script: one per poll, in order; the last one repeats once the script is
/// done. A line names what changes from the line before (`available=SIZE`, `total=SIZE`,
/// `stall=PERCENT`, `level=normal|warn|critical`) and how many polls it lasts (`repeat=N`, 1
/// by default); `#` starts a comment.
pub struct ScriptedSource {
    readings: Vec<Reading>,
    next: usize,
}

impl ScriptedSource {
    pub fn new(readings: Vec<Reading>) -> ScriptedSource {
        ScriptedSource { readings, next: 0 }
    }

    /// The script in `text` (`path` names it in errors).
    pub fn parse(text: &str, path: &Path) -> Result<ScriptedSource, PressureError> {
        let mut readings = Vec::new();
        let mut now = Reading::default();
        for (i, raw) in text.lines().enumerate() {
            let bad = |reason: String| PressureError::Script {
                path: path.to_path_buf(),
                line: i + 1,
                reason,
            };
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let mut repeat = 1usize;
            for field in line.split_whitespace() {
                let (key, value) = field
                    .split_once('=')
                    .ok_or_else(|| bad(format!("{field:?} is not KEY=VALUE")))?;
                let size = || -> Result<u64, PressureError> {
                    if value == "0" {
                        return Ok(0); // nothing left: no unit needed
                    }
                    match crate::run::budget::parse_size(value).map_err(&bad)? {
                        crate::run::budget::Size::Bytes(b) => Ok(b),
                        crate::run::budget::Size::Percent(_) => {
                            Err(bad(format!("{key} is a size in bytes, not a percentage")))
                        }
                    }
                };
                match key {
                    "available" => now.available_bytes = Some(size()?),
                    "total" => now.total_bytes = Some(size()?),
                    "stall" => {
                        now.stall_pct = Some(
                            value
                                .trim_end_matches('%')
                                .parse()
                                .map_err(|_| bad(format!("stall={value} is not a percentage")))?,
                        )
                    }
                    "level" => {
                        now.level = Some(match value {
                            "normal" => Level::Normal,
                            "warn" => Level::Warn,
                            "critical" => Level::Critical,
                            _ => return Err(bad(format!("level={value} is not a level"))),
                        })
                    }
                    "repeat" => {
                        repeat = value
                            .parse()
                            .ok()
                            .filter(|&n| n >= 1)
                            .ok_or_else(|| bad(format!("repeat={value} is not a count")))?
                    }
                    _ => return Err(bad(format!("unknown key {key:?}"))),
                }
            }
            readings.extend(std::iter::repeat_n(now, repeat));
        }
        Ok(ScriptedSource::new(readings))
    }

    /// The script in the file at `path`.
    pub fn from_file(path: &Path) -> Result<ScriptedSource, PressureError> {
        let text = std::fs::read_to_string(path).map_err(|source| PressureError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }
}

impl PressureSource for ScriptedSource {
    fn read(&mut self) -> Option<Reading> {
        let r = self
            .readings
            .get(self.next.min(self.readings.len().checked_sub(1)?))
            .copied();
        self.next += 1;
        r
    }

    fn name(&self) -> &'static str {
        "script"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_and_psi_parse() {
        let meminfo =
            "MemTotal:       24576000 kB\nMemFree:         1000 kB\nMemAvailable:   12288000 kB\n";
        assert_eq!(
            parse_meminfo(meminfo),
            (Some(24576000 * 1024), Some(12288000 * 1024))
        );
        assert_eq!(parse_meminfo("nothing"), (None, None));
        let psi = "some avg10=12.50 avg60=3.00 avg300=0.50 total=123\nfull avg10=1.00 avg60=0.00 avg300=0.00 total=4\n";
        assert_eq!(parse_psi(psi), Some(12.5));
        assert_eq!(parse_psi("full avg10=1.00"), None);
    }

    #[test]
    fn a_script_gives_a_reading_per_poll_and_repeats_its_last() {
        let text = "# a test\ntotal=100MiB available=50MiB repeat=2\navailable=4MiB stall=20\n\nlevel=warn # macOS\navailable=0\n";
        let mut s = ScriptedSource::parse(text, Path::new("t")).unwrap();
        let r: Vec<Reading> = (0..6).map(|_| s.read().unwrap()).collect();
        assert_eq!(r[0], r[1]);
        assert_eq!(r[0].available_bytes, Some(50 << 20));
        assert_eq!(r[0].total_bytes, Some(100 << 20));
        assert_eq!(r[2].available_bytes, Some(4 << 20));
        assert_eq!(
            r[2].total_bytes,
            Some(100 << 20),
            "kept from the line before"
        );
        assert_eq!(r[2].stall_pct, Some(20.0));
        assert_eq!(r[3].level, Some(Level::Warn));
        assert_eq!(r[4].available_bytes, Some(0));
        assert_eq!(r[4], r[5], "the last reading repeats");
        let mut empty = ScriptedSource::parse("# nothing\n", Path::new("t")).unwrap();
        assert_eq!(empty.read(), None);
    }

    #[test]
    fn bad_script_lines_are_named() {
        for (text, line) in [
            ("available=4", 1),
            ("total=1GiB\navailable=50%", 2),
            ("level=high", 1),
            ("\nrepeat=0", 2),
            ("free=1GiB", 1),
            ("available", 1),
        ] {
            match ScriptedSource::parse(text, Path::new("p.txt")) {
                Err(PressureError::Script { line: l, .. }) => assert_eq!(l, line, "{text}"),
                other => panic!("{text}: {:?}", other.map(|_| ())),
            }
        }
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn the_system_source_reads_this_machine() {
        let mut s = SystemSource::new().expect("/proc/meminfo");
        let r = s.read().expect("a first reading");
        let (total, available) = (r.total_bytes.unwrap(), r.available_bytes.unwrap());
        assert!(available <= total && total > 0);
        assert_eq!(r.level, None);
    }
}
