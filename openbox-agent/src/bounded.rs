//! A map that forgets its oldest entries past a capacity.
//!
//! State keyed by what a peer chooses (prepared statements and portals a client names,
//! runs and activities a worker reports, activities that ended) would otherwise grow
//! without limit. "Oldest" is by insertion: inserting a key again makes it the newest,
//! so an entry still being refreshed outlives ones that are not.

use std::{
    borrow::Borrow,
    collections::{HashMap, VecDeque},
    hash::Hash,
};

/// A `HashMap` holding at most `cap` entries; inserting past it evicts the entry
/// inserted longest ago. Insertion, lookup and removal are O(1) (amortised).
#[derive(Debug)]
pub struct BoundedMap<K, V> {
    /// Each value with the insertion number that placed it.
    map: HashMap<K, (u64, V)>,
    /// Keys in insertion order with their insertion numbers. An entry whose number no
    /// longer matches the map's (the key was removed or inserted again) is stale and
    /// skipped; stale entries are compacted away so the queue stays O(cap).
    order: VecDeque<(u64, K)>,
    inserted: u64,
    cap: usize,
}

impl<K: Hash + Eq + Clone, V> BoundedMap<K, V> {
    pub fn new(cap: usize) -> Self {
        Self {
            map: HashMap::new(),
            order: VecDeque::new(),
            inserted: 0,
            cap,
        }
    }

    /// Inserts or replaces `key`'s value; `key` becomes the newest entry. Evicts the
    /// oldest entries beyond the capacity.
    pub fn insert(&mut self, key: K, value: V) {
        self.inserted += 1;
        self.map.insert(key.clone(), (self.inserted, value));
        self.order.push_back((self.inserted, key));
        while self.map.len() > self.cap {
            let Some((number, oldest)) = self.order.pop_front() else {
                break;
            };
            if self.is_current(number, &oldest) {
                self.map.remove(&oldest);
            }
        }
        if self.order.len() > 2 * self.cap.max(16) {
            let map = &self.map;
            self.order
                .retain(|(number, key)| map.get(key).is_some_and(|(n, _)| n == number));
        }
    }

    pub fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.map.get(key).map(|(_, v)| v)
    }

    pub fn contains_key<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.map.contains_key(key)
    }

    pub fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        // Its place in `order` goes stale and is skipped or compacted later.
        self.map.remove(key).map(|(_, v)| v)
    }

    /// Keeps only the entries whose key satisfies `keep`.
    pub fn retain(&mut self, mut keep: impl FnMut(&K) -> bool) {
        self.map.retain(|k, _| keep(k));
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    fn is_current(&self, number: u64, key: &K) -> bool {
        self.map.get(key).is_some_and(|(n, _)| *n == number)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_entry_goes_first() {
        let mut m = BoundedMap::new(2);
        m.insert("a", 1);
        m.insert("b", 2);
        m.insert("c", 3);
        assert_eq!(m.len(), 2);
        assert_eq!(m.get("a"), None);
        assert_eq!(m.get("b"), Some(&2));
        assert_eq!(m.get("c"), Some(&3));
    }

    #[test]
    fn inserting_again_makes_a_key_the_newest() {
        let mut m = BoundedMap::new(2);
        m.insert("a", 1);
        m.insert("b", 2);
        m.insert("a", 10);
        m.insert("c", 3);
        assert_eq!(m.get("a"), Some(&10));
        assert_eq!(m.get("b"), None);
        assert_eq!(m.get("c"), Some(&3));
    }

    #[test]
    fn a_removed_key_frees_its_place() {
        let mut m = BoundedMap::new(2);
        m.insert("a", 1);
        m.insert("b", 2);
        assert_eq!(m.remove("a"), Some(1));
        assert_eq!(m.remove("a"), None);
        m.insert("c", 3);
        assert_eq!((m.get("b"), m.get("c")), (Some(&2), Some(&3)));
        // Re-inserted after removal: it is new again, and "b" is now the oldest.
        m.insert("a", 4);
        assert_eq!((m.get("a"), m.get("b")), (Some(&4), None));
        assert!(m.contains_key("c"));
    }

    #[test]
    fn retain_keeps_what_matches() {
        let mut m = BoundedMap::new(8);
        for i in 0..6 {
            m.insert(i, ());
        }
        m.retain(|k| k % 2 == 0);
        assert_eq!(m.len(), 3);
        assert!(m.contains_key(&4) && !m.contains_key(&5));
    }

    #[test]
    fn churn_keeps_memory_bounded() {
        let mut m = BoundedMap::new(4);
        for i in 0..10_000u32 {
            m.insert(i % 3, i);
            if i % 7 == 0 {
                m.remove(&(i % 3));
            }
        }
        assert!(m.len() <= 4);
        assert!(m.order.len() <= 2 * 16 + 1, "stale entries are compacted");
        let mut m = BoundedMap::new(100);
        for i in 0..10_000u32 {
            m.insert(i, ());
        }
        assert_eq!(m.len(), 100);
        assert!(m.order.len() <= 100);
        assert!(!m.is_empty());
    }

    #[test]
    fn zero_capacity_keeps_nothing() {
        let mut m = BoundedMap::new(0);
        m.insert(1, 1);
        assert!(m.is_empty());
    }
}
