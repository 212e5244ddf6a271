//! A byte-bounded LRU cache of decoded archived flows. Archive objects are immutable, so an entry keyed
//! by (DB, flow id, location) stays valid until the flow's index entry points elsewhere, as long as
//! the settings it was read under hold: the key carries their read scope, so after a change of the
//! store, the roots, the read cap or the state, an earlier entry is never found (it ages out).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::format::reader::Decoded;

/// An archived flow's place in the cache and among the fetches in flight: its DB, id and location,
/// and the read scope it is fetched under (`Settings::read_scope`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CacheKey {
    pub db: i32,
    pub id: String,
    pub location: String,
    pub scope: u64,
}

#[derive(Default)]
pub struct Lru {
    entries: HashMap<CacheKey, (Arc<Decoded>, u64)>,
    order: BTreeMap<u64, CacheKey>,
    tick: u64,
    bytes: usize,
}

impl Lru {
    pub fn get(&mut self, key: &CacheKey) -> Option<Arc<Decoded>> {
        self.tick += 1;
        let tick = self.tick;
        let (value, last) = self.entries.get_mut(key)?;
        self.order.remove(last);
        *last = tick;
        self.order.insert(tick, key.clone());
        Some(value.clone())
    }

    /// Inserts within `budget` bytes, evicting least recently used entries. An entry larger than the
    /// whole budget is not cached.
    pub fn insert(&mut self, key: CacheKey, value: Arc<Decoded>, budget: usize) {
        self.remove(&key);
        let size = value.size();
        if size > budget {
            self.shrink_to(budget);
            return;
        }
        self.shrink_to(budget - size);
        self.tick += 1;
        self.order.insert(self.tick, key.clone());
        self.entries.insert(key, (value, self.tick));
        self.bytes += size;
    }

    fn remove(&mut self, key: &CacheKey) {
        if let Some((value, tick)) = self.entries.remove(key) {
            self.order.remove(&tick);
            self.bytes -= value.size();
        }
    }

    pub fn shrink_to(&mut self, budget: usize) {
        while self.bytes > budget {
            let Some((_, key)) = self.order.pop_first() else {
                break;
            };
            if let Some((value, _)) = self.entries.remove(&key) {
                self.bytes -= value.size();
            }
        }
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(n: usize) -> Arc<Decoded> {
        Arc::new(Decoded::for_test("x".repeat(n), &[]))
    }

    fn key(id: &str) -> CacheKey {
        CacheKey {
            db: 0,
            id: id.to_string(),
            location: format!("s3://b/flows/{id}.jsonl.gz"),
            scope: 1,
        }
    }

    #[test]
    fn evicts_least_recently_used_within_budget() {
        let mut lru = Lru::default();
        let size = flow(100).size();
        let budget = size * 2;
        lru.insert(key("a"), flow(100), budget);
        lru.insert(key("b"), flow(100), budget);
        assert!(lru.get(&key("a")).is_some());
        lru.insert(key("c"), flow(100), budget);
        assert!(lru.get(&key("b")).is_none(), "b was least recently used");
        assert!(lru.get(&key("a")).is_some() && lru.get(&key("c")).is_some());
        assert_eq!(lru.bytes(), budget);
        assert_eq!(lru.len(), 2);
    }

    #[test]
    fn too_large_entries_and_zero_budget_are_not_cached() {
        let mut lru = Lru::default();
        lru.insert(key("a"), flow(10), 1000);
        lru.insert(key("big"), flow(5000), 1000);
        assert!(lru.get(&key("big")).is_none());
        assert!(lru.get(&key("a")).is_some());
        lru.insert(key("z"), flow(1), 0);
        assert_eq!(lru.len(), 0);
        assert_eq!(lru.bytes(), 0);
    }

    #[test]
    fn a_new_location_db_or_scope_is_a_new_entry() {
        let mut lru = Lru::default();
        lru.insert(key("a"), flow(1), 10_000);
        let other = [
            CacheKey {
                location: "s3://b/other.jsonl.gz".into(),
                ..key("a")
            },
            CacheKey { db: 1, ..key("a") },
            CacheKey {
                scope: 2,
                ..key("a")
            },
        ];
        for k in other {
            assert!(lru.get(&k).is_none(), "{k:?}");
        }
        assert!(lru.get(&key("a")).is_some());
    }
}
