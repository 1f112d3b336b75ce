//! The candidate pool: recently received responses, grouped by prompt, that selection may pair up.
//!
//! Bounded three ways: `pool.capacity` (the oldest response is evicted when a new one arrives at a full
//! pool), `pool.ttl_secs` (a response leaves when older than that) and `pool.max_uses` (a response leaves
//! once it appeared in that many requests). The pool is soft state: it is not checkpointed, because
//! responses are plentiful and cheap to lose, while checkpointing d floats per pooled response would
//! dominate the checkpoint size.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use serde_json::Value;

/// One pooled response.
#[derive(Clone, Debug)]
pub struct PoolEntry {
    pub prompt_id: Arc<str>,
    pub response_id: Arc<str>,
    /// As received: requests carry raw embeddings, and selection rounds scale them with the frozen
    /// scaler (not stored: a pooled response is often evicted before any round uses it).
    pub raw: Vec<f32>,
    pub metadata: Option<Value>,
    /// Milliseconds since the epoch when the response (first) entered the pool.
    pub arrived_ms: i64,
    pub uses: u32,
}

/// Why responses left the pool, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Evicted {
    pub capacity: u64,
    pub ttl: u64,
}

/// Insertion-ordered, bounded map of responses keyed by (prompt id, response id).
#[derive(Debug)]
pub struct Pool {
    capacity: usize,
    ttl_ms: i64,
    entries: BTreeMap<u64, PoolEntry>,
    /// foldhash (randomly seeded, several times faster than std's SipHash on short keys): the index is
    /// updated twice per ingested response.
    index: HashMap<(Arc<str>, Arc<str>), u64, foldhash::fast::RandomState>,
    /// (arrived_ms, slot) of every entry: the TTL purge pops stale entries from the front instead of
    /// scanning the whole pool (it runs after every engine wake-up). Slots are not in arrival order: a
    /// lapsed request's responses come back with their original arrival time.
    by_arrival: BTreeSet<(i64, u64)>,
    next_slot: u64,
}

impl Pool {
    pub fn new(capacity: usize, ttl_ms: i64) -> Self {
        Self {
            capacity,
            ttl_ms,
            entries: BTreeMap::new(),
            index: HashMap::default(),
            by_arrival: BTreeSet::new(),
            next_slot: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn contains(&self, prompt_id: &str, response_id: &str) -> bool {
        self.index
            .contains_key(&(Arc::from(prompt_id), Arc::from(response_id)))
    }

    /// Adds a response; returns `false` (and changes nothing) when it is already pooled. Evicts the oldest
    /// entries when full.
    pub fn insert(&mut self, entry: PoolEntry, evicted: &mut Evicted) -> bool {
        let key = (entry.prompt_id.clone(), entry.response_id.clone());
        if self.index.contains_key(&key) {
            return false;
        }
        while self.entries.len() >= self.capacity {
            if let Some((&slot, _)) = self.entries.iter().next() {
                self.remove(slot);
                evicted.capacity += 1;
            }
        }
        let slot = self.next_slot;
        self.next_slot += 1;
        self.index.insert(key, slot);
        self.by_arrival.insert((entry.arrived_ms, slot));
        self.entries.insert(slot, entry);
        true
    }

    pub fn remove(&mut self, slot: u64) -> Option<PoolEntry> {
        let e = self.entries.remove(&slot)?;
        self.by_arrival.remove(&(e.arrived_ms, slot));
        self.index
            .remove(&(e.prompt_id.clone(), e.response_id.clone()));
        Some(e)
    }

    /// Drops responses older than the TTL (cost proportional to the number dropped).
    pub fn purge_expired(&mut self, now_ms: i64, evicted: &mut Evicted) {
        while let Some(&(arrived, slot)) = self.by_arrival.first() {
            if self.is_fresh(arrived, now_ms) {
                break;
            }
            self.by_arrival.pop_first();
            if self.remove(slot).is_some() {
                evicted.ttl += 1;
            }
        }
    }

    /// Whether an entry that arrived at `arrived_ms` would still be young enough to pool at `now_ms`.
    pub fn is_fresh(&self, arrived_ms: i64, now_ms: i64) -> bool {
        now_ms - arrived_ms <= self.ttl_ms
    }

    pub fn iter(&self) -> impl Iterator<Item = (u64, &PoolEntry)> {
        self.entries.iter().map(|(&s, e)| (s, e))
    }

    /// The most recently inserted entry (slots grow with every insert).
    pub fn newest(&self) -> Option<&PoolEntry> {
        self.entries.last_key_value().map(|(_, e)| e)
    }

    pub fn get(&self, slot: u64) -> Option<&PoolEntry> {
        self.entries.get(&slot)
    }

    pub fn get_mut(&mut self, slot: u64) -> Option<&mut PoolEntry> {
        self.entries.get_mut(&slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(p: &str, r: &str, t: i64) -> PoolEntry {
        PoolEntry {
            prompt_id: p.into(),
            response_id: r.into(),
            raw: vec![0.0],
            metadata: None,
            arrived_ms: t,
            uses: 0,
        }
    }

    #[test]
    fn capacity_evicts_oldest_and_duplicates_are_ignored() {
        let mut pool = Pool::new(3, 1000);
        let mut ev = Evicted::default();
        for (i, r) in ["a", "b", "c"].iter().enumerate() {
            assert!(pool.insert(entry("p", r, i as i64), &mut ev));
        }
        assert!(!pool.insert(entry("p", "a", 9), &mut ev));
        assert!(pool.insert(entry("q", "a", 9), &mut ev)); // other prompt, same response id
        assert_eq!(pool.len(), 3);
        assert_eq!(ev.capacity, 1);
        assert!(!pool.contains("p", "a") && pool.contains("q", "a") && pool.contains("p", "c"));
    }

    #[test]
    fn ttl_purges_old_entries() {
        let mut pool = Pool::new(10, 100);
        let mut ev = Evicted::default();
        pool.insert(entry("p", "a", 0), &mut ev);
        pool.insert(entry("p", "b", 50), &mut ev);
        pool.purge_expired(120, &mut ev);
        assert_eq!(pool.len(), 1);
        assert_eq!(ev.ttl, 1);
        assert!(pool.contains("p", "b"));
        assert!(!pool.is_fresh(0, 101) && pool.is_fresh(0, 100));
    }

    #[test]
    fn ttl_purge_follows_arrival_time_not_insertion_order() {
        let mut pool = Pool::new(10, 100);
        let mut ev = Evicted::default();
        pool.insert(entry("p", "new", 90), &mut ev);
        // Re-offered from a lapsed request: inserted later, arrived earlier.
        pool.insert(entry("p", "old", 10), &mut ev);
        pool.insert(entry("p", "mid", 40), &mut ev);
        pool.purge_expired(120, &mut ev); // only "old" (110 ms) is past the 100 ms TTL
        assert_eq!((pool.len(), ev.ttl), (2, 1));
        assert!(!pool.contains("p", "old") && pool.contains("p", "mid"));
        // Entries removed otherwise (capacity, use) are not counted again by a later purge.
        let mid = pool
            .iter()
            .find(|(_, e)| &*e.response_id == "mid")
            .unwrap()
            .0;
        pool.remove(mid);
        pool.purge_expired(1000, &mut ev);
        assert_eq!((pool.len(), ev.ttl), (0, 2));
        assert!(pool.by_arrival.is_empty());
    }

    #[derive(Clone, Debug)]
    enum Op {
        Insert(u8, u8, i64),
        Remove(proptest::sample::Index),
        Purge(i64),
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            4 => (0u8..6, 0u8..6, 0i64..200).prop_map(|(p, r, t)| Op::Insert(p, r, t)),
            1 => any::<proptest::sample::Index>().prop_map(Op::Remove),
            1 => (0i64..300).prop_map(Op::Purge),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config { failure_persistence: None, ..Default::default() })]

        /// Against a plain list of (slot, prompt, response, arrived) with the same rules: the same
        /// entries in the same slot order after every operation, the same answers to `contains`, the
        /// same eviction counts.
        #[test]
        fn pool_matches_a_plain_list_model(ops in proptest::collection::vec(op(), 0..200), cap in 1usize..8) {
            let ttl = 100;
            let mut pool = Pool::new(cap, ttl);
            let mut model: Vec<(u64, String, String, i64)> = Vec::new();
            let (mut next, mut ev, mut model_ev) = (0u64, Evicted::default(), Evicted::default());
            for op in ops {
                match op {
                    Op::Insert(p, r, t) => {
                        let (p, r) = (format!("p{p}"), format!("r{r}"));
                        let fresh = !model.iter().any(|e| e.1 == p && e.2 == r);
                        if fresh {
                            while model.len() >= cap {
                                model.remove(0);
                                model_ev.capacity += 1;
                            }
                            model.push((next, p.clone(), r.clone(), t));
                            next += 1;
                        }
                        proptest::prop_assert_eq!(pool.insert(entry(&p, &r, t), &mut ev), fresh);
                    }
                    Op::Remove(ix) => {
                        if !model.is_empty() {
                            let (slot, ..) = model.remove(ix.index(model.len()));
                            proptest::prop_assert!(pool.remove(slot).is_some());
                            proptest::prop_assert!(pool.remove(slot).is_none());
                        }
                    }
                    Op::Purge(now) => {
                        let before = model.len();
                        model.retain(|e| now - e.3 <= ttl);
                        model_ev.ttl += (before - model.len()) as u64;
                        pool.purge_expired(now, &mut ev);
                    }
                }
                let got: Vec<(u64, String, String, i64)> = pool
                    .iter()
                    .map(|(s, e)| (s, e.prompt_id.to_string(), e.response_id.to_string(), e.arrived_ms))
                    .collect();
                proptest::prop_assert_eq!(&got, &model);
                proptest::prop_assert_eq!(pool.index.len(), model.len());
                proptest::prop_assert_eq!(pool.by_arrival.len(), model.len());
                proptest::prop_assert_eq!(ev, model_ev);
                for p in 0..6 {
                    for r in 0..6 {
                        let (p, r) = (format!("p{p}"), format!("r{r}"));
                        let want = model.iter().any(|e| e.1 == p && e.2 == r);
                        proptest::prop_assert_eq!(pool.contains(&p, &r), want);
                    }
                }
            }
        }
    }
}
