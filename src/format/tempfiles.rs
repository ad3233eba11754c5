//! Temporary pack files: named after the process that writes them, removed when that process is
//! interrupted (SIGINT, SIGTERM), and recognised as stale by a later writer once it is gone.
//!
//! A pack is written to `.flashpack-tmp-<pid>-<random>` beside its destination and renamed at the
//! end (write.rs). A `kill -9` or a power cut still leaves the file; the next writer into the same
//! folder removes every such file whose process no longer exists and says so.

use std::ffi::{c_char, CString};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicPtr, Ordering};

pub(crate) const PREFIX: &str = ".flashpack-tmp-";

/// The prefix of this process's temporary files.
pub(crate) fn prefix() -> String {
    format!("{PREFIX}{}-", std::process::id())
}

/// Removes the temporary pack files in `dir` whose writing process no longer exists; returns
/// them. Files of live processes (another conversion running now) are left alone, and so are
/// names without a process id (written by older versions: nothing says whether they are stale).
pub fn remove_stale(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(PREFIX)) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !alive(pid) && std::fs::remove_file(entry.path()).is_ok() {
            removed.push(entry.path());
        }
    }
    removed.sort();
    removed
}

#[cfg(unix)]
fn alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks that the process exists and may be signalled.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

#[cfg(not(unix))]
fn alive(_pid: u32) -> bool {
    true
}

/// Paths to unlink if the process is interrupted; a null slot is free.
static SLOTS: [AtomicPtr<c_char>; 16] = [const { AtomicPtr::new(std::ptr::null_mut()) }; 16];

/// A temporary file registered for removal on SIGINT / SIGTERM until this is dropped.
pub(crate) struct Registered(Option<usize>);

impl Drop for Registered {
    fn drop(&mut self) {
        if let Some(i) = self.0 {
            // The string is leaked on purpose: a signal handler may be reading it right now.
            SLOTS[i].store(std::ptr::null_mut(), Ordering::SeqCst);
        }
    }
}

/// Registers `path` for removal if the process gets SIGINT or SIGTERM (installing the handler
/// the first time, and only where the signal still has its default action, so a host program's
/// own handler is kept). With all slots taken the file is simply not registered.
pub(crate) fn register(path: &Path) -> Registered {
    install_handlers();
    let Ok(c) = CString::new(path.as_os_str().to_string_lossy().into_owned()) else {
        return Registered(None);
    };
    let raw = c.into_raw();
    for (i, slot) in SLOTS.iter().enumerate() {
        if slot
            .compare_exchange(
                std::ptr::null_mut(),
                raw,
                Ordering::SeqCst,
                Ordering::SeqCst,
            )
            .is_ok()
        {
            return Registered(Some(i));
        }
    }
    // SAFETY: `raw` came from `into_raw` just above and was never shared.
    drop(unsafe { CString::from_raw(raw) });
    Registered(None)
}

#[cfg(unix)]
fn install_handlers() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        for sig in [libc::SIGINT, libc::SIGTERM] {
            // SAFETY: sigaction with zeroed structs we own; we only replace the default action.
            unsafe {
                let mut old: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(sig, std::ptr::null(), &mut old) != 0
                    || old.sa_sigaction != libc::SIG_DFL
                {
                    continue;
                }
                let mut new: libc::sigaction = std::mem::zeroed();
                new.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as *const () as usize;
                libc::sigemptyset(&mut new.sa_mask);
                libc::sigaction(sig, &new, std::ptr::null_mut());
            }
        }
    });
}

#[cfg(not(unix))]
fn install_handlers() {}

/// Unlinks the registered files, then dies of the same signal with its default action, so the
/// exit status still says what happened. Only async-signal-safe calls.
#[cfg(unix)]
extern "C" fn on_signal(sig: libc::c_int) {
    for slot in &SLOTS {
        let p = slot.load(Ordering::SeqCst);
        if !p.is_null() {
            // SAFETY: a registered path is a leaked, NUL-terminated CString that is never freed.
            unsafe { libc::unlink(p) };
        }
    }
    // SAFETY: restoring the default action and re-raising are async-signal-safe.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}
