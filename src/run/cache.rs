//! Cache stage, the pure part: which experts hold which slots, and who is evicted.
//!
//! In: requests for (layer, expert) keys, in the order the forward pass needs them. Out: a slot
//! per key and, on a miss, the key that slot held before (so the caller loads the new expert into
//! it). No MLX and no I/O here: the slot memory lives in `run::experts`.
//! Invariant: a key is in at most one slot; keys marked in use for the current layer are never
//! evicted; the number of occupied slots never exceeds the capacity fixed at construction.

use std::collections::HashMap;

/// An expert of one layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExpertKey {
    pub layer: u32,
    pub expert: u32,
}

/// Chooses victims. Implementations see every hit and insert, with a logical clock.
pub trait EvictionPolicy: Send {
    fn name(&self) -> &'static str;
    /// `key` was used at time `now` (hit or fresh load).
    fn touch(&mut self, key: ExpertKey, now: u64);
    /// `key` left the cache.
    fn forget(&mut self, key: ExpertKey);
    /// Among `candidates` (evictable keys), the one to evict.
    fn victim(
        &mut self,
        candidates: &mut dyn Iterator<Item = ExpertKey>,
        now: u64,
    ) -> Option<ExpertKey>;
    /// `keys` in the order this policy would evict them (first: the first victim), for a
    /// cache that gives back many slots at once ([`SlotTable::resize`]). By default `victim`
    /// asked again for each (quadratic); the policies here sort by their score instead.
    fn eviction_order(&mut self, keys: &[ExpertKey], now: u64) -> Vec<ExpertKey> {
        let mut left = keys.to_vec();
        let mut out = Vec::with_capacity(left.len());
        while let Some(v) = self.victim(&mut left.iter().copied(), now) {
            left.retain(|k| *k != v);
            out.push(v);
        }
        out.extend(left);
        out
    }
}

/// The half-life, in requests, of the runtime's recency scores (`Lfu`, and `ProfileWeighted`'s
/// recent part); `flashpack plan` replays traces with it (`plan::replay`).
pub const PROFILE_HALF_LIFE: u64 = 256;

/// Least recently used.
#[derive(Default)]
pub struct Lru {
    last: HashMap<ExpertKey, u64>,
}

impl EvictionPolicy for Lru {
    fn name(&self) -> &'static str {
        "lru"
    }
    fn touch(&mut self, key: ExpertKey, now: u64) {
        self.last.insert(key, now);
    }
    fn forget(&mut self, key: ExpertKey) {
        self.last.remove(&key);
    }
    fn victim(
        &mut self,
        candidates: &mut dyn Iterator<Item = ExpertKey>,
        _now: u64,
    ) -> Option<ExpertKey> {
        candidates.min_by_key(|k| (self.last.get(k).copied().unwrap_or(0), *k))
    }
    fn eviction_order(&mut self, keys: &[ExpertKey], _now: u64) -> Vec<ExpertKey> {
        let mut out = keys.to_vec();
        out.sort_by_key(|k| (self.last.get(k).copied().unwrap_or(0), *k));
        out
    }
}

/// Least frequently used, with counts halved every `half_life` uses so old popularity fades.
pub struct Lfu {
    count: HashMap<ExpertKey, (f64, u64)>,
    half_life: f64,
}

impl Lfu {
    pub fn new(half_life: u64) -> Lfu {
        Lfu {
            count: HashMap::new(),
            half_life: half_life.max(1) as f64,
        }
    }

    fn score(&self, k: &ExpertKey, now: u64) -> f64 {
        self.count.get(k).map_or(0.0, |&(c, t)| {
            c * 0.5f64.powf((now - t) as f64 / self.half_life)
        })
    }
}

impl EvictionPolicy for Lfu {
    fn name(&self) -> &'static str {
        "lfu"
    }
    fn touch(&mut self, key: ExpertKey, now: u64) {
        let s = self.score(&key, now);
        self.count.insert(key, (s + 1.0, now));
    }
    fn forget(&mut self, key: ExpertKey) {
        self.count.remove(&key);
    }
    fn victim(
        &mut self,
        candidates: &mut dyn Iterator<Item = ExpertKey>,
        now: u64,
    ) -> Option<ExpertKey> {
        candidates.min_by(|a, b| {
            self.score(a, now)
                .total_cmp(&self.score(b, now))
                .then(a.cmp(b))
        })
    }
    fn eviction_order(&mut self, keys: &[ExpertKey], now: u64) -> Vec<ExpertKey> {
        let mut scored: Vec<(f64, ExpertKey)> =
            keys.iter().map(|k| (self.score(k, now), *k)).collect();
        scored.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        scored.into_iter().map(|(_, k)| k).collect()
    }
}

/// Profile-informed, depth-biased: an expert's worth is its measured routing mass (from the
/// pack's calibration profile, a prior) plus its recent use (decayed), and deeper layers weigh
/// a little less, since a miss there stalls the same but the layer's experts are read later
/// and have more time to be prefetched. Evicts the least worth.
pub struct ProfileWeighted {
    prior: HashMap<ExpertKey, f64>,
    recent: Lfu,
    layers: u32,
    depth_bias: f64,
}

impl ProfileWeighted {
    /// `prior` maps keys to routing mass shares (summing to about 1 per layer).
    pub fn new(prior: HashMap<ExpertKey, f64>, layers: u32, half_life: u64) -> ProfileWeighted {
        ProfileWeighted {
            prior,
            recent: Lfu::new(half_life),
            layers: layers.max(1),
            depth_bias: 0.25,
        }
    }

    fn worth(&self, k: &ExpertKey, now: u64) -> f64 {
        let prior = self.prior.get(k).copied().unwrap_or(0.0);
        let depth = 1.0 - self.depth_bias * k.layer as f64 / self.layers as f64;
        (self.recent.score(k, now) + 4.0 * prior) * depth
    }
}

impl EvictionPolicy for ProfileWeighted {
    fn name(&self) -> &'static str {
        "profile"
    }
    fn touch(&mut self, key: ExpertKey, now: u64) {
        self.recent.touch(key, now);
    }
    fn forget(&mut self, key: ExpertKey) {
        self.recent.forget(key);
    }
    fn victim(
        &mut self,
        candidates: &mut dyn Iterator<Item = ExpertKey>,
        now: u64,
    ) -> Option<ExpertKey> {
        candidates.min_by(|a, b| {
            self.worth(a, now)
                .total_cmp(&self.worth(b, now))
                .then(a.cmp(b))
        })
    }
    fn eviction_order(&mut self, keys: &[ExpertKey], now: u64) -> Vec<ExpertKey> {
        let mut scored: Vec<(f64, ExpertKey)> =
            keys.iter().map(|k| (self.worth(k, now), *k)).collect();
        scored.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        scored.into_iter().map(|(_, k)| k).collect()
    }
}

/// The result of asking for a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// Already resident in this slot.
    Hit(u32),
    /// Assigned this slot; the caller must load the expert. `evicted` held it before.
    Miss {
        slot: u32,
        evicted: Option<ExpertKey>,
    },
}

/// Hit and miss counts.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct CacheCounters {
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
}

/// A fixed number of slots shared by all layers.
pub struct SlotTable {
    capacity: u32,
    slots: HashMap<ExpertKey, u32>,
    owners: Vec<Option<ExpertKey>>,
    free: Vec<u32>,
    in_use: Vec<ExpertKey>,
    policy: Box<dyn EvictionPolicy>,
    clock: u64,
    /// While a prompt chunk passes through the layers: the layer it has reached. Experts of
    /// layers up to it are evicted before those of later layers (see [`Self::set_passed`]).
    passed: Option<u32>,
    pub counters: CacheCounters,
}

/// Why a request cannot be served.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum CacheError {
    #[error("the expert cache has {capacity} slots, fewer than the {needed} experts one layer uses at once; raise --mem-budget (or --expert-budget)")]
    TooSmall { capacity: u32, needed: usize },
}

/// What [`SlotTable::resize`] did: the keys it evicted, and where each key it kept was and is
/// now (`(from, to)`, one pair per kept key, `from == to` for a key that stayed), so the caller
/// can copy the kept experts' bytes into slot memory of the new size.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resized {
    pub evicted: Vec<ExpertKey>,
    pub kept: Vec<(u32, u32)>,
}

impl SlotTable {
    pub fn new(capacity: u32, policy: Box<dyn EvictionPolicy>) -> SlotTable {
        SlotTable {
            capacity,
            slots: HashMap::new(),
            owners: vec![None; capacity as usize],
            free: (0..capacity).rev().collect(),
            in_use: Vec::new(),
            policy,
            clock: 0,
            passed: None,
            counters: CacheCounters::default(),
        }
    }

    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    pub fn policy_name(&self) -> &'static str {
        self.policy.name()
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub fn contains(&self, key: ExpertKey) -> bool {
        self.slots.contains_key(&key)
    }

    pub fn slot_of(&self, key: ExpertKey) -> Option<u32> {
        self.slots.get(&key).copied()
    }

    /// Starts a new group of requests (one layer of one step): earlier groups' keys become evictable.
    pub fn begin_group(&mut self) {
        self.in_use.clear();
    }

    /// Moves the logical clock forward to `now` (never back). Tables that split one cache
    /// between layers share the store's clock, so a policy's ages and half-lives count every
    /// request of the store, as one table's would (decision 0020).
    pub fn advance_clock(&mut self, now: u64) {
        self.clock = self.clock.max(now);
    }

    /// A prompt chunk has reached `layer` (`None`: a decode step, or no chunk). A chunk visits
    /// each layer once, in order, and uses nearly every expert of each: the experts of the
    /// layers it has passed are not needed again before the next step, while those of the
    /// layers ahead are needed within this chunk. So while it passes, victims come from layers
    /// up to `layer` first (the policy choosing among them), and from the layers ahead only when
    /// there is nothing else. Without this, a depth-biased or recency policy evicts the experts
    /// of the layers ahead first, and the chunk reads them again a few layers later.
    pub fn set_passed(&mut self, layer: Option<u32>) {
        self.passed = layer;
    }

    /// The logical clock: requests (and unrequested insertions) so far.
    pub fn clock(&self) -> u64 {
        self.clock
    }

    /// A slot for `key`, protected from eviction until the next [`Self::begin_group`].
    pub fn request(&mut self, key: ExpertKey) -> Result<Lookup, CacheError> {
        self.clock += 1;
        if !self.in_use.contains(&key) {
            self.in_use.push(key);
        }
        if let Some(&slot) = self.slots.get(&key) {
            self.counters.hits += 1;
            self.policy.touch(key, self.clock);
            return Ok(Lookup::Hit(slot));
        }
        self.counters.misses += 1;
        let (slot, evicted) = match self.free.pop() {
            Some(slot) => (slot, None),
            None => {
                let in_use = &self.in_use;
                let free = |k: &ExpertKey| !in_use.contains(k);
                let behind = self.passed.and_then(|p| {
                    let mut c = self
                        .slots
                        .keys()
                        .copied()
                        .filter(|k| free(k) && k.layer <= p);
                    self.policy.victim(&mut c, self.clock)
                });
                let victim = behind.or_else(|| {
                    let mut c = self.slots.keys().copied().filter(free);
                    self.policy.victim(&mut c, self.clock)
                });
                let Some(victim) = victim else {
                    self.in_use.retain(|k| *k != key);
                    return Err(CacheError::TooSmall {
                        capacity: self.capacity,
                        needed: self.in_use.len() + 1,
                    });
                };
                let slot = self.slots.remove(&victim).expect("victim is resident");
                self.policy.forget(victim);
                self.counters.evictions += 1;
                (slot, Some(victim))
            }
        };
        self.slots.insert(key, slot);
        self.owners[slot as usize] = Some(key);
        self.policy.touch(key, self.clock);
        Ok(Lookup::Miss { slot, evicted })
    }

    /// Places `key` without counting a request (warm start, prefetch); `None` when no slot is
    /// free and nothing may be evicted, or when it is already resident. The key stays protected
    /// until the next [`Self::begin_group`], like a requested one: a batch of insertions never
    /// evicts its own members (two loads would otherwise race for one slot).
    pub fn insert_unrequested(&mut self, key: ExpertKey) -> Option<Lookup> {
        if self.slots.contains_key(&key) {
            return None;
        }
        let (h, m) = (self.counters.hits, self.counters.misses);
        let r = self.request(key).ok();
        self.counters.hits = h;
        self.counters.misses = m;
        r
    }

    /// Forgets every resident expert (the naive, cache-less baseline calls this before each group).
    pub fn clear(&mut self) {
        let keys: Vec<ExpertKey> = self.slots.keys().copied().collect();
        for k in keys {
            self.remove(k);
        }
        self.in_use.clear();
    }

    /// Changes the number of slots to `capacity` (memory pressure, `run::pressure`). Shrinking
    /// evicts, in the policy's order, as many keys as no longer fit; the keys kept in slots
    /// past the new end move to freed slots below it. With `canonical`, every kept key goes to
    /// the slot it names instead (distinct, below `capacity`): an all-resident cache grown back
    /// to every expert puts each at the slot warming it would have given. Called between
    /// groups: nothing is in use.
    pub fn resize(
        &mut self,
        capacity: u32,
        canonical: Option<&dyn Fn(ExpertKey) -> u32>,
    ) -> Resized {
        self.in_use.clear();
        let mut keys: Vec<ExpertKey> = self.slots.keys().copied().collect();
        keys.sort_unstable();
        let excess = keys.len().saturating_sub(capacity as usize);
        let evicted: Vec<ExpertKey> = if excess > 0 {
            let order = self.policy.eviction_order(&keys, self.clock);
            order.into_iter().take(excess).collect()
        } else {
            Vec::new()
        };
        for &k in &evicted {
            self.slots.remove(&k);
            self.policy.forget(k);
            self.counters.evictions += 1;
        }
        let old: Vec<(ExpertKey, u32)> = {
            let mut v: Vec<(ExpertKey, u32)> = self.slots.iter().map(|(&k, &s)| (k, s)).collect();
            v.sort_unstable_by_key(|&(_, s)| s);
            v
        };
        let mut owners: Vec<Option<ExpertKey>> = vec![None; capacity as usize];
        let mut kept = Vec::with_capacity(old.len());
        match canonical {
            Some(place) => {
                for &(k, from) in &old {
                    let to = place(k);
                    assert!(
                        (to as usize) < owners.len() && owners[to as usize].is_none(),
                        "canonical slots are distinct and below the capacity"
                    );
                    owners[to as usize] = Some(k);
                    kept.push((from, to));
                }
            }
            None => {
                // Keys already below the new end stay; the others fill the free slots.
                let mut movers = Vec::new();
                for &(k, from) in &old {
                    if from < capacity {
                        owners[from as usize] = Some(k);
                        kept.push((from, from));
                    } else {
                        movers.push((k, from));
                    }
                }
                let free: Vec<u32> = (0..capacity)
                    .filter(|&s| owners[s as usize].is_none())
                    .collect();
                let mut free = free.into_iter();
                for (k, from) in movers {
                    let to = free.next().expect("no more kept keys than slots");
                    owners[to as usize] = Some(k);
                    kept.push((from, to));
                }
            }
        }
        self.slots = owners
            .iter()
            .enumerate()
            .filter_map(|(s, k)| k.map(|k| (k, s as u32)))
            .collect();
        self.free = (0..capacity)
            .rev()
            .filter(|&s| owners[s as usize].is_none())
            .collect();
        self.owners = owners;
        self.capacity = capacity;
        Resized { evicted, kept }
    }

    /// Removes `key` (a load failed); its slot becomes free.
    pub fn remove(&mut self, key: ExpertKey) {
        if let Some(slot) = self.slots.remove(&key) {
            self.owners[slot as usize] = None;
            self.free.push(slot);
            self.policy.forget(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(layer: u32, expert: u32) -> ExpertKey {
        ExpertKey { layer, expert }
    }

    #[test]
    fn lru_evicts_the_oldest_not_in_use() {
        let mut t = SlotTable::new(2, Box::new(Lru::default()));
        t.begin_group();
        assert_eq!(
            t.request(k(0, 1)),
            Ok(Lookup::Miss {
                slot: 0,
                evicted: None
            })
        );
        assert_eq!(
            t.request(k(0, 2)),
            Ok(Lookup::Miss {
                slot: 1,
                evicted: None
            })
        );
        t.begin_group();
        assert_eq!(t.request(k(0, 1)), Ok(Lookup::Hit(0)));
        assert_eq!(
            t.request(k(1, 7)),
            Ok(Lookup::Miss {
                slot: 1,
                evicted: Some(k(0, 2))
            })
        );
        assert_eq!(t.counters.hits, 1);
        assert_eq!(t.counters.misses, 3);
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn in_use_keys_are_never_evicted() {
        let mut t = SlotTable::new(2, Box::new(Lru::default()));
        t.begin_group();
        t.request(k(0, 1)).unwrap();
        t.request(k(0, 2)).unwrap();
        assert_eq!(
            t.request(k(0, 3)),
            Err(CacheError::TooSmall {
                capacity: 2,
                needed: 3
            })
        );
        assert!(t.contains(k(0, 1)) && t.contains(k(0, 2)));
    }

    #[test]
    fn lfu_keeps_the_popular_expert() {
        let mut t = SlotTable::new(2, Box::new(Lfu::new(1000)));
        for _ in 0..5 {
            t.begin_group();
            t.request(k(0, 1)).unwrap();
        }
        t.begin_group();
        t.request(k(0, 2)).unwrap();
        t.begin_group();
        let r = t.request(k(0, 3)).unwrap();
        assert_eq!(
            r,
            Lookup::Miss {
                slot: 1,
                evicted: Some(k(0, 2))
            }
        );
    }

    #[test]
    fn profile_prior_protects_hot_experts() {
        let prior = [(k(0, 1), 0.9), (k(0, 2), 0.01)].into_iter().collect();
        let mut t = SlotTable::new(2, Box::new(ProfileWeighted::new(prior, 2, 100)));
        t.begin_group();
        t.request(k(0, 1)).unwrap();
        t.begin_group();
        t.request(k(0, 2)).unwrap();
        t.request(k(0, 2)).unwrap();
        t.begin_group();
        // expert 2 is more recent and used twice, but the profile says expert 1 carries the mass
        let r = t.request(k(0, 3)).unwrap();
        assert_eq!(
            r,
            Lookup::Miss {
                slot: 1,
                evicted: Some(k(0, 2))
            }
        );
    }

    #[test]
    fn a_batch_of_insertions_never_evicts_its_own_members() {
        // Profile-weighted eviction prefers the fresh, low-prior keys: without protection the
        // second insertion would take the first one's slot while its load is in flight.
        let prior = [(k(0, 1), 0.5), (k(0, 2), 0.5)].into_iter().collect();
        let mut t = SlotTable::new(3, Box::new(ProfileWeighted::new(prior, 2, 100)));
        t.begin_group();
        t.request(k(0, 1)).unwrap();
        t.request(k(0, 2)).unwrap();
        t.begin_group();
        t.request(k(0, 1)).unwrap();
        let a = t.insert_unrequested(k(1, 5)).unwrap();
        let b = t.insert_unrequested(k(1, 6)).unwrap();
        let slot = |l: Lookup| match l {
            Lookup::Hit(s) | Lookup::Miss { slot: s, .. } => s,
        };
        assert_ne!(slot(a), slot(b));
        assert!(t.contains(k(1, 5)) && t.contains(k(1, 6)) && t.contains(k(0, 1)));
    }

    #[test]
    fn a_chunk_evicts_the_layers_it_passed_before_the_layers_ahead() {
        // The depth-biased policy alone would evict layer 3's experts (the deepest) first;
        // a chunk at layer 1 needs them soon, and layers 0 and 1 not again in this chunk.
        let prior = HashMap::new();
        let mut t = SlotTable::new(4, Box::new(ProfileWeighted::new(prior, 4, 100)));
        for key in [k(0, 0), k(1, 0), k(3, 0), k(3, 1)] {
            t.begin_group();
            t.request(key).unwrap();
        }
        t.begin_group();
        t.set_passed(Some(1));
        t.request(k(1, 1)).unwrap();
        t.request(k(1, 2)).unwrap();
        assert!(t.contains(k(3, 0)) && t.contains(k(3, 1)));
        assert!(!t.contains(k(0, 0)) && !t.contains(k(1, 0)));
        // Nothing passed is left to evict (layer 1's are in use): a layer ahead goes.
        let third = t.request(k(1, 3)).unwrap();
        assert!(matches!(third, Lookup::Miss { evicted: Some(e), .. } if e.layer == 3));
        // Off again (a decode step): the policy alone, which takes the deepest layer's.
        t.begin_group();
        t.set_passed(None);
        t.request(k(0, 5)).unwrap();
        assert_eq!(t.len(), 4);
        assert!(!t.contains(k(3, 0)) && !t.contains(k(3, 1)));
    }

    #[test]
    fn resize_keeps_the_policys_best_below_the_new_end_and_grows_without_evicting() {
        let mut t = SlotTable::new(6, Box::new(Lru::default()));
        for e in 0..6 {
            t.begin_group();
            t.request(k(0, e)).unwrap();
        }
        t.begin_group();
        t.request(k(0, 0)).unwrap();
        t.request(k(0, 1)).unwrap();
        // Least recent first: 2, 3, 4 go; 5 (slot 5) moves to the first freed slot.
        let r = t.resize(3, None);
        assert_eq!(r.evicted, vec![k(0, 2), k(0, 3), k(0, 4)]);
        let mut kept = r.kept.clone();
        kept.sort_unstable();
        assert_eq!(kept, vec![(0, 0), (1, 1), (5, 2)]);
        assert_eq!((t.capacity(), t.len()), (3, 3));
        assert_eq!(t.slot_of(k(0, 5)), Some(2));
        assert_eq!(t.counters.evictions, 3);
        // Full at the new size: a miss evicts, never past the end.
        t.begin_group();
        assert_eq!(
            t.request(k(1, 0)),
            Ok(Lookup::Miss {
                slot: 2,
                evicted: Some(k(0, 5))
            })
        );
        // Growing frees slots and evicts nothing.
        let r = t.resize(5, None);
        assert!(r.evicted.is_empty());
        assert_eq!(r.kept.len(), 3);
        t.begin_group();
        assert_eq!(
            t.request(k(1, 1)),
            Ok(Lookup::Miss {
                slot: 3,
                evicted: None
            })
        );
        // The profile policy orders by worth, as its victims: the hot prior stays.
        let prior = [(k(0, 1), 0.9)].into_iter().collect();
        let mut p = SlotTable::new(3, Box::new(ProfileWeighted::new(prior, 1, 100)));
        for e in [1, 2, 3] {
            p.begin_group();
            p.request(k(0, e)).unwrap();
        }
        let r = p.resize(1, None);
        assert_eq!(r.evicted.len(), 2);
        assert!(p.contains(k(0, 1)));
        assert_eq!(p.slot_of(k(0, 1)), Some(0));
    }

    #[test]
    fn resize_to_canonical_slots_and_to_nothing() {
        let mut t = SlotTable::new(2, Box::new(Lfu::new(100)));
        t.begin_group();
        t.request(k(0, 3)).unwrap(); // slot 0
        t.request(k(0, 1)).unwrap(); // slot 1
        let r = t.resize(4, Some(&|key: ExpertKey| key.expert));
        let mut kept = r.kept.clone();
        kept.sort_unstable();
        assert_eq!(kept, vec![(0, 3), (1, 1)]);
        assert_eq!(t.slot_of(k(0, 3)), Some(3));
        assert_eq!(t.slot_of(k(0, 1)), Some(1));
        t.begin_group();
        assert!(matches!(
            t.request(k(0, 0)),
            Ok(Lookup::Miss { slot: 0, .. })
        ));
        assert!(matches!(
            t.request(k(0, 2)),
            Ok(Lookup::Miss { slot: 2, .. })
        ));
        let r = t.resize(0, None);
        assert_eq!(r.evicted.len(), 4);
        assert!(t.is_empty() && t.capacity() == 0);
    }

    #[test]
    fn slots_stay_within_capacity_under_random_use() {
        let mut t = SlotTable::new(8, Box::new(Lru::default()));
        let mut x = 12345u64;
        for _ in 0..500 {
            t.begin_group();
            for _ in 0..4 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let key = k((x % 3) as u32, (x >> 8) as u32 % 16);
                let r = t.request(key).unwrap();
                let slot = match r {
                    Lookup::Hit(s) | Lookup::Miss { slot: s, .. } => s,
                };
                assert!(slot < 8);
                assert_eq!(t.slot_of(key), Some(slot));
            }
            assert!(t.len() <= 8);
        }
        let mut seen: Vec<u32> = t.slots.values().copied().collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), t.len(), "no two keys share a slot");
    }
}
