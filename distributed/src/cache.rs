//! The bounded caches of a node: [`Lru`], which keeps the most recently used entries up to a
//! capacity, and [`FailureCache`], which remembers why something failed for a short time.
//!
//! Plans come from clients and each may name a different function, library or limits: what a
//! node keeps for them must not grow with the number of plans it has seen.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// A map of at most `capacity` entries; inserting into a full one drops the least recently used
/// entry (and with it whatever the entry held: a loaded library, a worker pool).
#[derive(Debug)]
pub struct Lru<K, V> {
    capacity: usize,
    /// Counts uses: each entry carries the count of its last use.
    clock: u64,
    entries: HashMap<K, (V, u64)>,
}

impl<K: Eq + Hash + Clone, V> Lru<K, V> {
    /// An empty cache of at most `capacity` entries (at least one).
    pub fn new(capacity: usize) -> Lru<K, V> {
        Lru {
            capacity: capacity.max(1),
            clock: 0,
            entries: HashMap::new(),
        }
    }

    /// The most entries it keeps.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry for `key`, now the most recently used.
    pub fn get<Q>(&mut self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Eq + Hash + ?Sized,
    {
        self.clock += 1;
        let clock = self.clock;
        self.entries.get_mut(key).map(|(value, used)| {
            *used = clock;
            &*value
        })
    }

    /// Inserts (or replaces) the entry for `key`; returns the entry dropped to make room, if
    /// one was.
    pub fn insert(&mut self, key: K, value: V) -> Option<(K, V)> {
        self.clock += 1;
        let mut evicted = None;
        if !self.entries.contains_key(&key) && self.entries.len() >= self.capacity {
            let oldest = self
                .entries
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                evicted = self.entries.remove_entry(&oldest).map(|(k, (v, _))| (k, v));
            }
        }
        self.entries.insert(key, (value, self.clock));
        evicted
    }

    /// Removes the entry for `key`.
    pub fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Eq + Hash + ?Sized,
    {
        self.entries.remove(key).map(|(v, _)| v)
    }
}

/// Why something failed, remembered for `ttl` (in an [`Lru`]), so that a failure is not
/// recomputed for every request that meets it, while a cause that is fixed (a library copied into
/// place) is seen once the time is up.
#[derive(Debug)]
pub struct FailureCache<K> {
    ttl: Duration,
    failures: Lru<K, (String, Instant)>,
}

impl<K: Eq + Hash + Clone> FailureCache<K> {
    /// Remembers at most `capacity` failures, each for `ttl` (zero: none at all).
    pub fn new(capacity: usize, ttl: Duration) -> FailureCache<K> {
        FailureCache {
            ttl,
            failures: Lru::new(capacity),
        }
    }

    /// How long a failure is remembered.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The reason `key` failed, if it failed less than the time limit before `now`.
    pub fn get(&mut self, key: &K, now: Instant) -> Option<String> {
        let (reason, at) = self.failures.get(key)?;
        if now.saturating_duration_since(*at) < self.ttl {
            return Some(reason.clone());
        }
        self.failures.remove(key);
        None
    }

    /// Remembers that `key` failed at `now` for `reason`.
    pub fn insert(&mut self, key: K, reason: String, now: Instant) {
        if !self.ttl.is_zero() {
            self.failures.insert(key, (reason, now));
        }
    }

    /// The number of failures held (some may have expired).
    pub fn len(&self) -> usize {
        self.failures.len()
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.failures.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Weak};

    use super::*;

    #[test]
    fn the_least_recently_used_entry_is_evicted_and_released() {
        let mut cache = Lru::new(2);
        let (a, b, c) = (Arc::new("a"), Arc::new("b"), Arc::new("c"));
        let weak_a: Weak<&str> = Arc::downgrade(&a);
        let weak_b: Weak<&str> = Arc::downgrade(&b);
        assert!(cache.insert("a", a).is_none());
        assert!(cache.insert("b", b).is_none());
        // "a" is used, so "b" is now the least recently used.
        assert_eq!(cache.get("a").map(|v| **v), Some("a"));
        let evicted = cache.insert("c", c).expect("one evicted");
        assert_eq!(evicted.0, "b");
        drop(evicted);
        assert!(weak_b.upgrade().is_none(), "the evicted value is released");
        assert!(weak_a.upgrade().is_some());
        assert_eq!(cache.len(), 2);
        assert!(cache.get("b").is_none());
        // Replacing an entry evicts nothing.
        assert!(cache.insert("a", Arc::new("a2")).is_none());
        assert!(weak_a.upgrade().is_none(), "the replaced value is released");
        assert_eq!(cache.get("a").map(|v| **v), Some("a2"));
        assert_eq!(cache.len(), 2);
    }

    #[test]
    fn a_cache_holds_at_most_its_capacity() {
        let mut cache = Lru::new(3);
        for i in 0..1000 {
            cache.insert(i, i);
            assert!(cache.len() <= 3);
        }
        // The three most recent remain.
        for i in 997..1000 {
            assert_eq!(cache.get(&i), Some(&i));
        }
        assert_eq!(Lru::<u8, u8>::new(0).capacity(), 1);
    }

    #[test]
    fn failures_are_remembered_until_their_time_is_up() {
        let start = Instant::now();
        let ttl = Duration::from_secs(5);
        let mut failures = FailureCache::new(2, ttl);
        failures.insert("lib", "no such file".to_string(), start);
        assert_eq!(
            failures
                .get(&"lib", start + Duration::from_secs(4))
                .as_deref(),
            Some("no such file")
        );
        // Expired: forgotten, so that the next request tries again.
        assert_eq!(failures.get(&"lib", start + ttl), None);
        assert!(failures.is_empty());
        // Bounded like any Lru.
        for key in ["a", "b", "c", "d"] {
            failures.insert(key, format!("{key} failed"), start);
        }
        assert_eq!(failures.len(), 2);
        assert_eq!(failures.get(&"d", start).as_deref(), Some("d failed"));
        assert_eq!(failures.get(&"a", start), None);
        // A zero time limit remembers nothing.
        let mut none = FailureCache::new(2, Duration::ZERO);
        none.insert("x", "failed".into(), start);
        assert_eq!(none.get(&"x", start), None);
    }
}
