//! Cache stage, memory given back: the expert cache resized while it runs (memory pressure,
//! `run::pressure`).
//!
//! In: a new expert budget in bytes, and the fewest experts of one layer that one token needs.
//! Out: pools of the new size, each holding the experts its table kept (the policy's best),
//! the old arrays freed. Each pool is reallocated array by array: a new array of the new slot
//! count, the kept experts' bytes copied from their old slots to their new ones, then the old
//! array dropped, so the process holds at most one array more than the larger of the two sizes
//! while it works, and MLX's allocator (and the process's resident memory) falls by what was
//! given back. Giving back unused pages of the same arrays instead (`madvise`) would leave
//! MLX's count and, on Metal and CUDA, the memory itself where they were (decision 0033).
//! Invariants: a pool never has fewer slots than one token's experts of one layer (or all it
//! stores), nor more than it was built with; the resize joins any background load first and
//! runs between evaluations (the caller makes sure nothing scheduled still reads the pools),
//! so no expert moves under a computation and results are those of a cache of either size.

use super::{ExpertCache, ExpertError, Pool};
use crate::mlx::{self, Array};
use crate::run::cache::ExpertKey;

/// The expert cache's size now and the bounds a resize keeps to, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CacheBounds {
    /// Bytes of slots now.
    pub bytes: u64,
    /// The size it was built with (the budget): never more.
    pub max_bytes: u64,
    /// One token's working set of one layer in every pool: never less.
    pub floor_bytes: u64,
}

/// What a resize did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resize {
    pub from_bytes: u64,
    pub to_bytes: u64,
    /// Experts evicted to fit the smaller size.
    pub evicted: usize,
    /// Bytes copied from old arrays into new ones (each pool's first slots, as many as both
    /// sizes have).
    pub copied_bytes: u64,
}

impl ExpertCache {
    /// Bytes one slot of pool `pool` takes.
    fn pool_slot_bytes(&self, pool: usize) -> u64 {
        let p = &self.pools[pool];
        Pool::slot_bytes(p.shape, p.hidden, p.inter)
            .iter()
            .sum::<usize>() as u64
    }

    /// Stored experts of pool `pool`, sorted: the order warming places them in its slots.
    fn pool_keys(&self, pool: usize) -> Vec<ExpertKey> {
        self.pool_of
            .iter()
            .filter(|&(_, &p)| p == pool)
            .map(|(&(layer, expert), _)| ExpertKey { layer, expert })
            .collect()
    }

    /// The fewest slots pool `pool` may have: `floor` experts (one token's in one layer), or all
    /// it stores where it stores fewer.
    fn floor_slots(&self, pool: usize, floor: usize) -> u32 {
        let stored = self.pool_of.values().filter(|&&p| p == pool).count();
        floor.min(stored).min(self.max_slots[pool] as usize).max(1) as u32
    }

    /// Slots per pool for an expert budget of `bytes`: each pool its share of the bytes, as
    /// [`ExpertCache::new`] divides a budget, within its floor and the size it was built with.
    fn slots_for(&self, bytes: u64, floor: usize) -> Vec<u32> {
        let max: u64 = (0..self.pools.len())
            .map(|i| self.max_slots[i] as u64 * self.pool_slot_bytes(i))
            .sum();
        (0..self.pools.len())
            .map(|i| {
                let share = if bytes >= max {
                    self.max_slots[i]
                } else {
                    let mine = self.max_slots[i] as u64 * self.pool_slot_bytes(i);
                    let part = bytes as f64 * mine as f64 / max.max(1) as f64;
                    (part / self.pool_slot_bytes(i).max(1) as f64) as u32
                };
                share.min(self.max_slots[i]).max(self.floor_slots(i, floor))
            })
            .collect()
    }

    /// The cache's size and the bounds [`ExpertCache::resize`] keeps to, where one token needs
    /// `floor` experts of a layer.
    pub fn bounds(&self, floor: usize) -> CacheBounds {
        let sum = |slots: &dyn Fn(usize) -> u32| -> u64 {
            (0..self.pools.len())
                .map(|i| slots(i) as u64 * self.pool_slot_bytes(i))
                .sum()
        };
        CacheBounds {
            bytes: sum(&|i| self.pools[i].table.capacity()),
            max_bytes: sum(&|i| self.max_slots[i]),
            floor_bytes: sum(&|i| self.floor_slots(i, floor)),
        }
    }

    /// Slots of pool `pool` now (its table's; an array that could not be reallocated may be
    /// larger, never smaller).
    pub fn capacity(&self, pool: usize) -> usize {
        self.pools[pool].table.capacity() as usize
    }

    /// Whether every pool has every expert it stores resident, at the slots warming gives them
    /// (what the device-routed store of an all-resident engine needs, `stream::resident_store`).
    pub fn is_whole(&self) -> bool {
        (0..self.pools.len()).all(|i| {
            self.pool_keys(i)
                .iter()
                .enumerate()
                .all(|(slot, &k)| self.pools[i].table.slot_of(k) == Some(slot as u32))
        })
    }

    /// Resizes the pools to an expert budget of `bytes` (within [`CacheBounds`]; `floor`: the
    /// experts one token needs in one layer). Each pool whose slot count changes keeps the
    /// experts its policy values most, in the slots below its new end, and gets new arrays of
    /// the new size; a pool grown back to all it stores puts each expert at the slot warming
    /// gives it. Joins a background load first. The caller must make sure that no scheduled
    /// evaluation still reads the pools (`mlx::synchronize`) and drop its own handles to them
    /// (`expert_pool`) first, or their memory stays held until it does.
    ///
    /// A shrink moves the kept experts below the new end inside the old arrays first, so an
    /// array that cannot be reallocated (MLX out of memory) leaves a larger array whose first
    /// slots are right; a growth reallocates before the table grows. Either way the table and
    /// the arrays agree whatever fails, and the error is returned.
    pub fn resize(&mut self, bytes: u64, floor: usize) -> Result<Resize, ExpertError> {
        self.join_prefetch()?;
        let target = self.slots_for(bytes, floor);
        let mut done = Resize {
            from_bytes: self.bounds(floor).bytes,
            ..Resize::default()
        };
        let mut result = Ok(());
        for (i, &slots) in target.iter().enumerate() {
            let old = self.pools[i].table.capacity();
            if slots == old {
                continue;
            }
            done.copied_bytes += old.min(slots) as u64 * self.pool_slot_bytes(i);
            if slots < old {
                let resized = self.pools[i].table.resize(slots, None);
                for k in &resized.evicted {
                    self.prefetched.remove(k);
                }
                done.evicted += resized.evicted.len();
                self.pools[i].move_slots(&resized.kept)?;
                result = self.pools[i].reallocate(slots);
            } else {
                result = self.pools[i].reallocate(slots);
                if result.is_err() {
                    break;
                }
                let keys = self.pool_keys(i);
                let whole = slots as usize == keys.len();
                let canonical = move |k: ExpertKey| keys.binary_search(&k).unwrap_or(0) as u32;
                let resized = self.pools[i].table.resize(
                    slots,
                    whole.then_some(&canonical as &dyn Fn(ExpertKey) -> u32),
                );
                self.pools[i].move_slots(&resized.kept)?;
            }
            if result.is_err() {
                break;
            }
        }
        self.stats.slots = self.pools.iter().map(|p| p.table.capacity()).sum();
        done.to_bytes = self.bounds(floor).bytes;
        self.stats.resident_bytes = done.to_bytes;
        // Metal and CUDA keep freed buffers for reuse; under pressure they go back now.
        mlx::clear_cache();
        result.map(|()| done)
    }
}

/// One step of moving slots' bytes inside an array: a copy, or a cycle's first slot saved
/// aside and written back at its end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    Copy { from: u32, to: u32 },
    Save(u32),
    Restore(u32),
}

/// The steps that move each `(from, to)` of `kept` (distinct sources, distinct targets) in
/// place: chains from their free end, so no slot is overwritten before it is read, then each
/// cycle through one saved slot.
fn move_steps(kept: &[(u32, u32)]) -> Vec<Step> {
    use std::collections::BTreeMap;
    let mut pending: BTreeMap<u32, u32> = kept.iter().filter(|(f, t)| f != t).copied().collect();
    let src_of: BTreeMap<u32, u32> = pending.iter().map(|(&f, &t)| (t, f)).collect();
    let mut steps = Vec::with_capacity(pending.len());
    let mut ready: Vec<u32> = pending
        .iter()
        .filter(|(_, t)| !pending.contains_key(t))
        .map(|(&f, _)| f)
        .collect();
    while let Some(from) = ready.pop() {
        let to = pending.remove(&from).expect("a ready move is pending");
        steps.push(Step::Copy { from, to });
        // `from` is read: the move into it may run.
        if let Some(&g) = src_of.get(&from) {
            if pending.contains_key(&g) {
                ready.push(g);
            }
        }
    }
    while let Some(&a) = pending.keys().next() {
        steps.push(Step::Save(a));
        let mut cur = a;
        loop {
            let s = src_of[&cur];
            pending.remove(&s);
            if s == a {
                steps.push(Step::Restore(cur));
                break;
            }
            steps.push(Step::Copy { from: s, to: cur });
            cur = s;
        }
    }
    steps
}

impl Pool {
    /// Moves slot `from`'s bytes to slot `to` for each `(from, to)` of `kept`, in every array,
    /// in place (one slot's bytes of scratch).
    fn move_slots(&mut self, kept: &[(u32, u32)]) -> Result<(), ExpertError> {
        let steps = move_steps(kept);
        if steps.is_empty() {
            return Ok(());
        }
        let sizes = Pool::slot_bytes(self.shape, self.hidden, self.inter);
        for (arr, size) in self.arrays.iter_mut().zip(sizes) {
            let Some(a) = arr.as_mut() else { continue };
            // SAFETY: an evaluated, row-contiguous host buffer (`host_buffer`) that no
            // evaluation reads now (`ExpertCache::resize`'s contract).
            let bytes = unsafe { a.data_mut()? };
            let mut saved = vec![0u8; size];
            let at = |slot: u32| slot as usize * size;
            for &step in &steps {
                match step {
                    Step::Copy { from, to } => bytes.copy_within(at(from)..at(from) + size, at(to)),
                    Step::Save(s) => saved.copy_from_slice(&bytes[at(s)..at(s) + size]),
                    Step::Restore(s) => bytes[at(s)..at(s) + size].copy_from_slice(&saved),
                }
            }
        }
        Ok(())
    }

    /// New arrays of `slots` slots, the first slots (as many as both have) copied from the old
    /// ones, the rest zero (free). Array by array, each old one dropped as soon as it is
    /// copied; on an error the arrays not reached keep their size.
    fn reallocate(&mut self, slots: u32) -> Result<(), ExpertError> {
        let sizes = Pool::slot_bytes(self.shape, self.hidden, self.inter);
        for (arr, size) in self.arrays.iter_mut().zip(sizes) {
            let Some(old) = arr.as_mut() else { continue };
            let mut shape = old.shape();
            let keep = shape[0].min(slots as usize) * size;
            shape[0] = slots as usize;
            let mut fresh = Array::host_buffer(&shape, old.dtype())?;
            {
                // SAFETY: both are evaluated, row-contiguous host buffers (`host_buffer`); no
                // evaluation reads the old one (`ExpertCache::resize`'s contract), and the new
                // one is not handed out yet.
                let src = unsafe { old.data_mut()? };
                // SAFETY: as above; `fresh` is this function's own.
                let dst = unsafe { fresh.data_mut()? };
                dst[..keep].copy_from_slice(&src[..keep]);
            }
            *arr = Some(fresh);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Applies `steps` to slot contents, as `move_slots` does to bytes.
    fn apply(steps: &[Step], slots: &mut [u32]) {
        let mut saved = 0;
        for &s in steps {
            match s {
                Step::Copy { from, to } => slots[to as usize] = slots[from as usize],
                Step::Save(a) => saved = slots[a as usize],
                Step::Restore(a) => slots[a as usize] = saved,
            }
        }
    }

    #[test]
    fn slots_move_in_place_through_chains_and_cycles() {
        for kept in [
            vec![(5, 0), (4, 1), (2, 2)],
            vec![(0, 1), (1, 2), (2, 3)],
            vec![(0, 1), (1, 0), (2, 2), (3, 5), (5, 6), (6, 3)],
            vec![(7, 0), (0, 4), (4, 7), (1, 2)],
            vec![],
        ] {
            let mut slots: Vec<u32> = (0..8).map(|i| 100 + i).collect();
            let before = slots.clone();
            apply(&move_steps(&kept), &mut slots);
            for &(from, to) in &kept {
                assert_eq!(slots[to as usize], before[from as usize], "{kept:?}");
            }
        }
    }
}
