//! Memory pressure, the pure part: a reading of the system's memory -> the expert cache's next
//! budget.
//!
//! In: a [`Reading`] (bytes available and in all, the PSI stall share, the macOS pressure
//! level), the cache's budget now and its bounds ([`Bounds`]). Out: a [`Verdict`], the budget to
//! resize to. No I/O, no clock: the same readings give the same budgets.
//! Invariant: the budget stays within `floor..=max`. It shrinks only on a reading that shows
//! pressure, by what brings the available memory back to the middle of the band between the
//! low and the high mark; it grows only after [`Policy::calm_readings`] calm readings in a row
//! (available above the high mark, no stalls, the level normal), and only by what leaves the
//! available memory at that middle. A reading inside the band changes nothing, so the budget
//! never flaps between two sizes on readings that wander around one mark.

/// The macOS memory-pressure level (`kern.memorystatus_vm_pressure_level`; the dispatch source's
/// normal, warning and critical).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Normal,
    Warn,
    Critical,
}

/// One look at the system's memory. A source fills what its platform has.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Reading {
    /// Bytes the system can give without swapping (Linux `MemAvailable`; macOS the
    /// `kern.memorystatus_level` share of RAM).
    pub available_bytes: Option<u64>,
    /// The machine's memory (Linux `MemTotal`, macOS `hw.memsize`): the marks are shares of it.
    pub total_bytes: Option<u64>,
    /// Linux PSI: the share of the last 10 s in which some task waited for memory
    /// (`/proc/pressure/memory`, `some avg10`, percent).
    pub stall_pct: Option<f64>,
    /// macOS's pressure level.
    pub level: Option<Level>,
}

/// The budget now and the bounds it keeps to, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bounds {
    pub current: u64,
    pub max: u64,
    pub floor: u64,
}

/// What a reading asks of the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// The budget to have, within the bounds (`current` when nothing changes).
    pub target: u64,
    /// The budget the reading asked for, before the floor: below `floor` the cache cannot give
    /// what is asked (the runtime says so, and slows down).
    pub wanted: u64,
    /// Whether the reading showed pressure.
    pub pressure: bool,
}

/// The marks and steps. [`Policy::default`] is what `run`, `chat` and `serve` use.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Policy {
    /// The low mark as a share of the machine's memory: below it the cache shrinks. The high
    /// mark, above which it may grow, is twice the low one.
    pub low_share: f64,
    /// The low mark at most (a machine of 512 GB need not keep 25 GB free).
    pub low_cap: u64,
    /// PSI `some avg10` (percent) at or above which memory counts as short, and below which
    /// it counts as calm.
    pub stall_high: f64,
    pub stall_calm: f64,
    /// Calm readings in a row before the cache grows.
    pub calm_readings: u32,
    /// Share of the budget given back on a reading that says memory is short without saying by
    /// how much (PSI stalls, macOS `warn`; twice that on `critical`).
    pub step: f64,
    /// Readings after such a step before the next one: PSI's 10-second average and the macOS
    /// level lag behind what was given back.
    pub cooldown: u32,
}

/// The low mark's share of RAM: at 5%, a 16 GB machine shrinks below 0.8 GB available and may
/// grow again above 1.6 GB (decision 0033).
pub const LOW_SHARE: f64 = 0.05;

/// The low mark's cap: 4 GiB.
pub const LOW_CAP: u64 = 4 << 30;

impl Default for Policy {
    fn default() -> Self {
        Policy {
            low_share: LOW_SHARE,
            low_cap: LOW_CAP,
            stall_high: 10.0,
            stall_calm: 1.0,
            calm_readings: 3,
            step: 0.25,
            cooldown: 4,
        }
    }
}

/// What the policy remembers between readings (its hysteresis).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyState {
    /// Calm readings in a row.
    calm: u32,
    /// Readings left before a stall or level may shrink the cache again.
    cooldown: u32,
}

impl Policy {
    /// The low and high marks for a machine of `total` bytes.
    pub fn marks(&self, total: u64) -> (u64, u64) {
        let low = ((total as f64 * self.low_share) as u64).min(self.low_cap);
        (low, low.saturating_mul(2))
    }

    /// The next budget after `reading`, given the budget now and its bounds.
    pub fn decide(&self, state: &mut PolicyState, reading: &Reading, b: Bounds) -> Verdict {
        let marks = reading.total_bytes.map(|t| self.marks(t));
        let mid = marks.map(|(low, high)| low + (high - low) / 2);
        let keep = |pressure| Verdict {
            target: b.current,
            wanted: b.current,
            pressure,
        };
        // By how much memory is short, where a byte count says so: enough to bring the
        // available memory back to the middle of the band.
        let mut wanted: Option<u64> = match (reading.available_bytes, marks, mid) {
            (Some(av), Some((low, _)), Some(mid)) if av < low => {
                Some(b.current.saturating_sub(mid - av))
            }
            _ => None,
        };
        state.cooldown = state.cooldown.saturating_sub(1);
        let stalled = reading.stall_pct.is_some_and(|s| s >= self.stall_high);
        let level = reading.level.unwrap_or(Level::Normal);
        let signal = stalled || level != Level::Normal;
        if signal && state.cooldown == 0 {
            let share = match level {
                Level::Critical => 2.0 * self.step,
                _ => self.step,
            };
            let step = b.current.saturating_sub((b.current as f64 * share) as u64);
            wanted = Some(wanted.map_or(step, |w| w.min(step)));
            state.cooldown = self.cooldown;
        }
        if let Some(w) = wanted {
            state.calm = 0;
            return Verdict {
                target: w.max(b.floor).min(b.current),
                wanted: w,
                pressure: true,
            };
        }
        let plenty = match (reading.available_bytes, marks) {
            (Some(av), Some((_, high))) => av >= high,
            // Nothing says how much is free: calm means no stall and a normal level.
            _ => true,
        };
        let calm = plenty
            && reading.stall_pct.is_none_or(|s| s < self.stall_calm)
            && level == Level::Normal;
        if !calm {
            state.calm = 0;
            return keep(signal);
        }
        state.calm += 1;
        if state.calm < self.calm_readings || b.current >= b.max {
            return keep(false);
        }
        state.calm = 0;
        let more = match (reading.available_bytes, mid) {
            (Some(av), Some(mid)) => av.saturating_sub(mid),
            _ => (b.max as f64 * self.step) as u64,
        };
        let target = b.current.saturating_add(more).min(b.max).max(b.current);
        Verdict {
            target,
            wanted: target,
            pressure: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn bytes(available: u64, total: u64) -> Reading {
        Reading {
            available_bytes: Some(available),
            total_bytes: Some(total),
            ..Reading::default()
        }
    }

    fn bounds(current: u64) -> Bounds {
        Bounds {
            current,
            max: 8 * GIB,
            floor: GIB / 2,
        }
    }

    #[test]
    fn marks_are_a_share_of_ram_with_a_cap() {
        let p = Policy::default();
        assert_eq!(p.marks(16 * GIB), (16 * GIB / 20, 16 * GIB / 10));
        assert_eq!(p.marks(512 * GIB), (4 * GIB, 8 * GIB));
    }

    #[test]
    fn short_memory_shrinks_to_the_middle_of_the_band() {
        // 16 GiB: low 0.8 GiB, high 1.6 GiB, middle 1.2 GiB.
        let p = Policy::default();
        let mut s = PolicyState::default();
        let total = 16 * GIB;
        let (low, high) = p.marks(total);
        let mid = low + (high - low) / 2;
        let v = p.decide(&mut s, &bytes(low - 100 * MIB, total), bounds(6 * GIB));
        assert!(v.pressure);
        assert_eq!(v.target, 6 * GIB - (mid - (low - 100 * MIB)));
        assert_eq!(v.wanted, v.target);
    }

    #[test]
    fn the_floor_holds_and_says_what_was_wanted() {
        let p = Policy::default();
        let mut s = PolicyState::default();
        let v = p.decide(&mut s, &bytes(10 * MIB, 16 * GIB), bounds(GIB));
        assert_eq!(v.target, GIB / 2, "never below the floor");
        assert!(v.wanted < GIB / 2, "what was asked is reported");
        let at_floor = Bounds {
            current: GIB / 2,
            ..bounds(GIB)
        };
        let v = p.decide(&mut s, &bytes(10 * MIB, 16 * GIB), at_floor);
        assert_eq!(v.target, GIB / 2);
        assert!(v.pressure && v.wanted < v.target);
    }

    #[test]
    fn growth_waits_for_calm_readings_and_stops_at_the_middle_and_the_max() {
        let p = Policy::default();
        let mut s = PolicyState::default();
        let total = 16 * GIB;
        let (low, high) = p.marks(total);
        let mid = low + (high - low) / 2;
        let plenty = bytes(high + 2 * GIB, total);
        for _ in 1..p.calm_readings {
            assert_eq!(p.decide(&mut s, &plenty, bounds(GIB)).target, GIB);
        }
        let v = p.decide(&mut s, &plenty, bounds(GIB));
        assert!(!v.pressure);
        assert_eq!(v.target, GIB + (high + 2 * GIB - mid));
        // And again only after as many calm readings; never past the max.
        for _ in 1..p.calm_readings {
            assert_eq!(p.decide(&mut s, &plenty, bounds(v.target)).target, v.target);
        }
        let lots = bytes(total, total);
        assert_eq!(p.decide(&mut s, &lots, bounds(v.target)).target, 8 * GIB);
        // A reading inside the band breaks the run of calm ones.
        let mut s = PolicyState::default();
        for _ in 1..p.calm_readings {
            p.decide(&mut s, &plenty, bounds(GIB));
        }
        let inside = bytes(low + 10 * MIB, total);
        assert_eq!(p.decide(&mut s, &inside, bounds(GIB)).target, GIB);
        assert_eq!(p.decide(&mut s, &plenty, bounds(GIB)).target, GIB);
    }

    #[test]
    fn readings_that_wander_around_a_mark_do_not_flap() {
        // Once shrunk, readings just below and just above the high mark (the memory given
        // back showing up) never grow it, and readings just above the low one never shrink it.
        let p = Policy::default();
        let mut s = PolicyState::default();
        let total = 16 * GIB;
        let (low, high) = p.marks(total);
        let mut budget = 4 * GIB;
        let mut changes = 0;
        for i in 0..60u64 {
            let av = if i % 2 == 0 { high - MIB } else { low + MIB };
            let v = p.decide(&mut s, &bytes(av, total), bounds(budget));
            changes += (v.target != budget) as u32;
            budget = v.target;
        }
        assert_eq!((changes, budget), (0, 4 * GIB));
    }

    #[test]
    fn stalls_and_levels_step_down_with_a_cooldown() {
        let p = Policy::default();
        let mut s = PolicyState::default();
        let stall = Reading {
            stall_pct: Some(30.0),
            ..Reading::default()
        };
        let v = p.decide(&mut s, &stall, bounds(8 * GIB));
        assert_eq!(v.target, 6 * GIB);
        // The 10-second average still shows the stall: no second step until the cooldown ends.
        for _ in 1..p.cooldown {
            let v = p.decide(&mut s, &stall, bounds(6 * GIB));
            assert_eq!(v.target, 6 * GIB);
            assert!(v.pressure);
        }
        assert_eq!(p.decide(&mut s, &stall, bounds(6 * GIB)).target, 4608 * MIB);
        // macOS: critical gives back twice the step; normal readings with no byte count grow
        // by a step of the max after the calm readings.
        let mut s = PolicyState::default();
        let critical = Reading {
            level: Some(Level::Critical),
            ..Reading::default()
        };
        assert_eq!(p.decide(&mut s, &critical, bounds(8 * GIB)).target, 4 * GIB);
        let normal = Reading {
            level: Some(Level::Normal),
            ..Reading::default()
        };
        for _ in 1..p.calm_readings {
            assert_eq!(p.decide(&mut s, &normal, bounds(4 * GIB)).target, 4 * GIB);
        }
        assert_eq!(p.decide(&mut s, &normal, bounds(4 * GIB)).target, 6 * GIB);
        // A stall between calm and high neither shrinks nor lets it grow.
        let mut s = PolicyState::default();
        let mild = Reading {
            stall_pct: Some(5.0),
            ..Reading::default()
        };
        for _ in 0..10 {
            let v = p.decide(&mut s, &mild, bounds(4 * GIB));
            assert_eq!((v.target, v.pressure), (4 * GIB, false));
        }
    }

    #[test]
    fn an_empty_reading_keeps_the_budget() {
        let p = Policy::default();
        let mut s = PolicyState::default();
        for _ in 0..10 {
            let v = p.decide(&mut s, &Reading::default(), bounds(8 * GIB));
            assert_eq!(v.target, 8 * GIB);
        }
    }
}
