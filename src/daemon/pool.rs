//! The candidate pool: recently received responses, grouped by prompt, that selection may pair up.
//!
//! Bounded three ways: `pool.capacity` (the oldest response is evicted when a new one arrives at a full
//! pool), `pool.ttl_secs` (a response leaves when older than that) and `pool.max_uses` (a response leaves
//! once it appeared in that many requests). The pool is soft state: it is not checkpointed, because
//! responses are plentiful and cheap to lose, while checkpointing d floats per pooled response would
//! dominate the checkpoint size.

use std::collections::{BTreeSet, VecDeque};
use std::hash::BuildHasher;
use std::sync::Arc;

use hashbrown::HashTable;

use super::messages::Metadata;

/// Holes tolerated beyond the number of entries before the queue is compacted (small in tests, so the
/// model test exercises compaction).
const COMPACT_SLACK: usize = if cfg!(test) { 2 } else { 64 };

/// One pooled response.
#[derive(Clone, Debug)]
pub struct PoolEntry {
    pub prompt_id: Arc<str>,
    pub response_id: Arc<str>,
    /// As received: requests carry raw embeddings, and selection rounds scale them with the frozen
    /// scaler (not stored: a pooled response is often evicted before any round uses it).
    pub raw: Vec<f32>,
    pub metadata: Option<Metadata>,
    /// Milliseconds since the epoch when the response (first) entered the pool.
    pub arrived_ms: i64,
    pub uses: u32,
}

/// A queue cell: a slot, the hash of its key, and its entry (`None`: removed, a hole).
#[derive(Debug)]
struct Cell {
    slot: u64,
    hash: u64,
    entry: Option<PoolEntry>,
}

/// Why responses left the pool, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Evicted {
    pub capacity: u64,
    pub ttl: u64,
}

/// Insertion-ordered, bounded map of responses keyed by (prompt id, response id).
///
/// Every ingested response is inserted and (at a busy, full pool) soon evicted, so both are O(1) with
/// no tree updates: entries sit in a queue in slot order (slots grow with every insert), and a removal
/// from the middle leaves a hole that the front skips and that compaction clears once holes outnumber
/// entries. Slots are stable across compaction (a slot is found by binary search). TTL order is slot
/// order except for entries inserted with an arrival time older than an earlier entry's (a lapsed
/// request's responses coming back, a wall clock stepping back): only those are kept in a sorted set.
#[derive(Debug)]
pub struct Pool {
    capacity: usize,
    ttl_ms: i64,
    /// Strictly increasing slots; the front is never a hole.
    queue: VecDeque<Cell>,
    live: usize,
    /// The slot of every entry, by the hash of its (prompt id, response id). Removing an entry finds its
    /// slot by the stored hash alone: an evicted entry's ids were last touched thousands of responses
    /// ago, and re-hashing them (a `HashMap` keyed by the ids) cost more than the rest of pooling.
    /// Holds (slot, hash): re-hashing (the table rehashes in place to clear removal markers) must not
    /// look up the queue.
    index: HashTable<(u64, u64)>,
    /// foldhash: randomly seeded, several times faster than std's SipHash on short keys.
    hasher: foldhash::fast::RandomState,
    /// (arrived_ms, slot) of the entries that arrived before an entry inserted earlier. Every other entry
    /// arrived no earlier than all entries in front of it, so the TTL purge pops those from the front.
    late: BTreeSet<(i64, u64)>,
    /// Latest arrival time inserted so far.
    latest_arrival: i64,
    next_slot: u64,
}

impl Pool {
    pub fn new(capacity: usize, ttl_ms: i64) -> Self {
        Self {
            capacity,
            ttl_ms,
            queue: VecDeque::new(),
            live: 0,
            index: HashTable::with_capacity(capacity.min(1 << 20)),
            hasher: Default::default(),
            late: BTreeSet::new(),
            latest_arrival: i64::MIN,
            next_slot: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.live
    }

    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    fn key_hash(&self, prompt_id: &str, response_id: &str) -> u64 {
        self.hasher.hash_one((prompt_id, response_id))
    }

    /// The slot holding (prompt id, response id), if pooled.
    fn find(&self, hash: u64, prompt_id: &str, response_id: &str) -> Option<u64> {
        self.index
            .find(hash, |&(slot, _)| {
                self.get(slot)
                    .is_some_and(|e| *e.prompt_id == *prompt_id && *e.response_id == *response_id)
            })
            .map(|&(slot, _)| slot)
    }

    pub fn contains(&self, prompt_id: &str, response_id: &str) -> bool {
        let hash = self.key_hash(prompt_id, response_id);
        self.find(hash, prompt_id, response_id).is_some()
    }

    /// Adds a response; returns `false` (and changes nothing) when it is already pooled. Evicts the oldest
    /// entries when full.
    pub fn insert(&mut self, entry: PoolEntry, evicted: &mut Evicted) -> bool {
        let hash = self.key_hash(&entry.prompt_id, &entry.response_id);
        if self
            .find(hash, &entry.prompt_id, &entry.response_id)
            .is_some()
        {
            return false;
        }
        while self.live >= self.capacity && self.pop_front().is_some() {
            evicted.capacity += 1;
        }
        let slot = self.next_slot;
        self.next_slot += 1;
        self.index.insert_unique(hash, (slot, hash), |&(_, h)| h);
        if entry.arrived_ms < self.latest_arrival {
            self.late.insert((entry.arrived_ms, slot));
        } else {
            self.latest_arrival = entry.arrived_ms;
        }
        self.queue.push_back(Cell {
            slot,
            hash,
            entry: Some(entry),
        });
        self.live += 1;
        true
    }

    /// Removes the oldest entry (lowest slot).
    fn pop_front(&mut self) -> Option<PoolEntry> {
        let cell = self.queue.pop_front()?;
        let e = cell.entry.expect("the front is never a hole");
        self.forget(cell.slot, cell.hash, &e);
        self.skip_holes();
        Some(e)
    }

    /// Drops the index and TTL records of a removed entry.
    fn forget(&mut self, slot: u64, hash: u64, e: &PoolEntry) {
        self.live -= 1;
        if !self.late.is_empty() {
            self.late.remove(&(e.arrived_ms, slot));
        }
        if let Ok(found) = self.index.find_entry(hash, |&(s, _)| s == slot) {
            found.remove();
        }
    }

    fn skip_holes(&mut self) {
        while self.queue.front().is_some_and(|c| c.entry.is_none()) {
            self.queue.pop_front();
        }
    }

    pub fn remove(&mut self, slot: u64) -> Option<PoolEntry> {
        let i = position(&self.queue, slot)?;
        let e = self.queue[i].entry.take()?;
        self.forget(slot, self.queue[i].hash, &e);
        self.skip_holes();
        // Holes cost a queue cell each: clear them once they outnumber the entries (amortised O(1)).
        if self.queue.len() > 2 * self.live + COMPACT_SLACK {
            self.queue.retain(|c| c.entry.is_some());
        }
        Some(e)
    }

    /// Drops responses older than the TTL (cost proportional to the number dropped).
    pub fn purge_expired(&mut self, now_ms: i64, evicted: &mut Evicted) {
        while let Some(Cell { entry: Some(e), .. }) = self.queue.front() {
            if self.is_fresh(e.arrived_ms, now_ms) {
                break;
            }
            self.pop_front();
            evicted.ttl += 1;
        }
        while let Some(&(arrived, slot)) = self.late.first() {
            if self.is_fresh(arrived, now_ms) {
                break;
            }
            self.late.pop_first();
            if self.remove(slot).is_some() {
                evicted.ttl += 1;
            }
        }
    }

    /// Whether an entry that arrived at `arrived_ms` would still be young enough to pool at `now_ms`.
    pub fn is_fresh(&self, arrived_ms: i64, now_ms: i64) -> bool {
        now_ms - arrived_ms <= self.ttl_ms
    }

    /// Entries in slot order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &PoolEntry)> {
        self.queue
            .iter()
            .filter_map(|c| c.entry.as_ref().map(|e| (c.slot, e)))
    }

    /// The most recently inserted entry (slots grow with every insert).
    pub fn newest(&self) -> Option<&PoolEntry> {
        self.queue.iter().rev().find_map(|c| c.entry.as_ref())
    }

    pub fn get(&self, slot: u64) -> Option<&PoolEntry> {
        self.queue[position(&self.queue, slot)?].entry.as_ref()
    }

    pub fn get_mut(&mut self, slot: u64) -> Option<&mut PoolEntry> {
        let i = position(&self.queue, slot)?;
        self.queue[i].entry.as_mut()
    }
}

/// Where `slot` sits in the queue. Slots are strictly increasing and, until a compaction, consecutive
/// (holes keep their cells), so the offset from the front is tried first; a binary search otherwise.
fn position(queue: &VecDeque<Cell>, slot: u64) -> Option<usize> {
    let guess = usize::try_from(slot.checked_sub(queue.front()?.slot)?).ok()?;
    if queue.get(guess).is_some_and(|c| c.slot == slot) {
        return Some(guess);
    }
    queue.binary_search_by_key(&slot, |c| c.slot).ok()
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
        assert!(pool.late.is_empty() && pool.queue.is_empty());
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
            // Per slot, the latest arrival inserted before it.
            let (mut latest, mut latest_before) = (i64::MIN, std::collections::HashMap::<u64, i64>::new());
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
                            latest_before.insert(next, latest);
                            latest = latest.max(t);
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
                for e in &model {
                    proptest::prop_assert!(pool.get(e.0).is_some_and(|x| *x.response_id == e.2));
                }
                proptest::prop_assert!(pool.get(next).is_none());
                proptest::prop_assert_eq!(
                    pool.newest().map(|e| e.response_id.to_string()),
                    model.last().map(|e| e.2.clone())
                );
                proptest::prop_assert_eq!(pool.index.len(), model.len());
                proptest::prop_assert_eq!(pool.len(), model.len());
                // Late entries are exactly those that arrived before an entry inserted earlier.
                let late: Vec<u64> = model
                    .iter()
                    .filter(|e| e.3 < latest_before[&e.0])
                    .map(|e| e.0)
                    .collect();
                let mut got_late: Vec<u64> = pool.late.iter().map(|&(_, s)| s).collect();
                got_late.sort_unstable();
                proptest::prop_assert_eq!(got_late, late);
                proptest::prop_assert!(pool.queue.front().is_none_or(|c| c.entry.is_some()));
                proptest::prop_assert!(pool.queue.len() <= 2 * cap + COMPACT_SLACK);
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
