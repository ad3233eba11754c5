//! Memory pressure: `run`, `chat` and `serve` watch the system's memory and give expert-cache
//! memory back while it is short, taking it again once it is not (issue 31, item 3;
//! docs/decisions/0033-memory-pressure.md).
//!
//! In: readings from a [`PressureSource`] (`source.rs`: the system, or a script), polled by the
//! engine between forward passes. Out: a [`Verdict`] of the pure [`Policy`] (`policy.rs`), which
//! the engine applies by resizing the expert cache (`run::experts`'s `resize.rs`), and the
//! [`PressureStatus`] that `run`'s report and `serve`'s `/health` show.
//! Invariant: the budget stays between one token's experts of one layer (the floor) and the
//! size the cache was built with (`--mem-budget` is the upper bound); a reading that wants
//! less than the floor is said once per episode, and the run goes on, slower.

mod policy;
mod source;

pub use policy::{Bounds, Level, Policy, PolicyState, Reading, Verdict, LOW_CAP, LOW_SHARE};
pub use source::{
    parse_meminfo, parse_psi, PressureError, PressureSource, ScriptedSource, SystemSource,
};

use std::sync::{Arc, Mutex};

use crate::run::experts::{CacheBounds, Resize};

/// A file of readings that stands in for the system's (tests, demonstrations):
/// [`ScriptedSource`]'s format, one reading per forward pass.
pub const SCRIPT_ENV: &str = "FLASHPACK_PRESSURE_SCRIPT";

/// `FLASHPACK_PRESSURE=0` turns the watch off (a benchmark that wants a fixed cache).
pub const SWITCH_ENV: &str = "FLASHPACK_PRESSURE";

/// Changes [`PressureStatus::changes`] keeps (the latest).
pub const KEPT_CHANGES: usize = 64;

/// The process's memory at one moment: its resident set (`None` where the platform does not
/// say) and MLX's active memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Sample {
    pub rss_bytes: Option<u64>,
    pub mlx_active_bytes: u64,
}

impl Sample {
    /// Now (a file read on Linux, a call on macOS: once per resize, never per token).
    pub fn now() -> Sample {
        Sample {
            rss_bytes: crate::memory::current_rss(),
            mlx_active_bytes: crate::mlx::active_memory() as u64,
        }
    }
}

/// One resize, for the report.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Change {
    /// Which reading (counting from 1) asked for it.
    pub reading: u64,
    pub from_bytes: u64,
    pub to_bytes: u64,
    /// What the reading asked for (below `to_bytes` when the floor held).
    pub wanted_bytes: u64,
    pub evicted: usize,
    /// The process's memory just before and just after it.
    pub before: Sample,
    pub after: Sample,
    /// How long it took: waiting for the step in flight, copying the kept experts, and on
    /// growing back to every expert, reading the others.
    pub ms: f64,
}

/// What the watch has seen and done: `run --json`'s `pressure`, `serve`'s `/health`.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct PressureStatus {
    /// Where readings come from: `system` or `script`.
    pub source: &'static str,
    /// The expert cache's size now, the most it may take (its budget), and the least
    /// (one token's experts of one layer).
    pub expert_budget_bytes: u64,
    pub max_expert_budget_bytes: u64,
    pub floor_bytes: u64,
    /// The low and high marks of the last reading (`None` without its machine's memory).
    pub low_mark_bytes: Option<u64>,
    pub high_mark_bytes: Option<u64>,
    pub readings: u64,
    /// The last reading, and whether it showed pressure.
    pub reading: Option<Reading>,
    pub pressure: bool,
    pub shrinks: u64,
    pub grows: u64,
    /// Whether the cache is at its floor while memory is still short.
    pub at_floor: bool,
    /// Episodes in which a reading wanted less than the floor (each said once on stderr).
    pub floor_warnings: u64,
    /// The latest resizes, oldest first (at most [`KEPT_CHANGES`]).
    pub changes: Vec<Change>,
}

/// A source, the policy and what they have done.
pub struct PressureWatch {
    source: Box<dyn PressureSource>,
    policy: Policy,
    state: PolicyState,
    status: Arc<Mutex<PressureStatus>>,
    /// The floor was said in this episode of pressure.
    warned: bool,
}

impl PressureWatch {
    pub fn new(source: Box<dyn PressureSource>, policy: Policy) -> PressureWatch {
        let status = PressureStatus {
            source: source.name(),
            ..PressureStatus::default()
        };
        PressureWatch {
            source,
            policy,
            state: PolicyState::default(),
            status: Arc::new(Mutex::new(status)),
            warned: false,
        }
    }

    /// The command line's watch: readings from the script `FLASHPACK_PRESSURE_SCRIPT` names,
    /// none with `FLASHPACK_PRESSURE=0`, else the system's where this platform has them.
    pub fn from_env() -> Result<Option<PressureWatch>, PressureError> {
        if crate::env::number::<u64>(SWITCH_ENV) == Some(0) {
            return Ok(None);
        }
        if let Some(path) = std::env::var_os(SCRIPT_ENV) {
            let script = ScriptedSource::from_file(std::path::Path::new(&path))?;
            return Ok(Some(PressureWatch::new(
                Box::new(script),
                Policy::default(),
            )));
        }
        Ok(SystemSource::new().map(|s| PressureWatch::new(Box::new(s), Policy::default())))
    }

    /// What the watch has seen and done, now.
    pub fn status(&self) -> PressureStatus {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The status as the watch updates it (for a server's `/health`, on another thread).
    pub fn status_handle(&self) -> Arc<Mutex<PressureStatus>> {
        self.status.clone()
    }

    fn update(&self, f: impl FnOnce(&mut PressureStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Sets the cache's size in the status (at the start, and after the engine changes it).
    pub fn set_bounds(&self, b: CacheBounds) {
        self.update(|s| {
            s.expert_budget_bytes = b.bytes;
            s.max_expert_budget_bytes = b.max_bytes;
            s.floor_bytes = b.floor_bytes;
        });
    }

    /// Reads the source; with a new reading, the policy's verdict for a cache of `b`. A verdict
    /// whose reading wants less than the floor comes with the warning to give, once per episode
    /// of pressure.
    pub fn poll(&mut self, b: CacheBounds) -> Option<(Verdict, Option<String>)> {
        let reading = self.source.read()?;
        let v = self.policy.decide(
            &mut self.state,
            &reading,
            Bounds {
                current: b.bytes,
                max: b.max_bytes,
                floor: b.floor_bytes,
            },
        );
        let short = v.pressure && v.wanted < b.floor_bytes;
        let warning = (short && !self.warned).then(|| floor_warning(&reading, b));
        if !v.pressure {
            self.warned = false;
        } else if short {
            self.warned = true;
        }
        let marks = reading.total_bytes.map(|t| self.policy.marks(t));
        self.update(|s| {
            s.readings += 1;
            s.reading = Some(reading);
            s.pressure = v.pressure;
            s.low_mark_bytes = marks.map(|m| m.0);
            s.high_mark_bytes = marks.map(|m| m.1);
            s.at_floor = short && v.target <= b.floor_bytes;
            s.floor_warnings += warning.is_some() as u64;
        });
        Some((v, warning))
    }

    /// Records a resize the engine made for `v` (the process's memory `before` it, and now),
    /// and the cache's size after it.
    pub fn resized(
        &self,
        v: &Verdict,
        done: &Resize,
        bounds: CacheBounds,
        before: Sample,
        started: std::time::Instant,
    ) {
        let change = Change {
            reading: 0,
            from_bytes: done.from_bytes,
            to_bytes: done.to_bytes,
            wanted_bytes: v.wanted,
            evicted: done.evicted,
            before,
            after: Sample::now(),
            ms: started.elapsed().as_secs_f64() * 1e3,
        };
        self.set_bounds(bounds);
        self.update(|s| {
            if done.to_bytes < done.from_bytes {
                s.shrinks += 1;
            } else if done.to_bytes > done.from_bytes {
                s.grows += 1;
            }
            if s.changes.len() == KEPT_CHANGES {
                s.changes.remove(0);
            }
            s.changes.push(Change {
                reading: s.readings,
                ..change
            });
        });
    }
}

/// What the runtime says when memory is short and the cache is at its floor.
fn floor_warning(r: &Reading, b: CacheBounds) -> String {
    use crate::units::{bytes, Style};
    let what = match (r.available_bytes, r.stall_pct, r.level) {
        (Some(av), _, _) => format!("{} available", bytes(av, Style::RUN)),
        (None, Some(s), _) => format!("memory stalls {s:.0}% of the time"),
        (None, None, Some(l)) => format!("the system's memory pressure is {l:?}").to_lowercase(),
        _ => "memory is short".into(),
    };
    format!(
        "memory pressure ({what}): the expert cache is at its floor, {} (one token's experts of \
         one layer), and cannot give back more; generation goes on, slower, and the system may \
         swap",
        bytes(b.floor_bytes, Style::RUN)
    )
}
