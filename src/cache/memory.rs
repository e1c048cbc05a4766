//! In-memory span cache: segmented LRU, so a one-off scan (a background fetch, a `find /`)
//! passes through the probation segment without evicting the protected hot set.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use bytes::Bytes;

use super::{SpanCache, SpanKey};

#[derive(Debug)]
struct Slot {
    data: Bytes,
    tick: u64,
    protected: bool,
}

#[derive(Debug, Default)]
struct Inner {
    map: HashMap<SpanKey, Slot>,
    probation: BTreeMap<u64, SpanKey>,
    protected: BTreeMap<u64, SpanKey>,
    tick: u64,
    used: u64,
    protected_used: u64,
}

/// A bounded, concurrent, scan-resistant memory cache.
#[derive(Debug)]
pub struct MemoryCache {
    capacity: u64,
    protected_capacity: u64,
    inner: Mutex<Inner>,
}

impl MemoryCache {
    /// A cache holding at most `capacity` bytes; 80% of it is reserved for entries hit twice.
    pub fn new(capacity: u64) -> Self {
        MemoryCache {
            capacity,
            protected_capacity: capacity / 5 * 4,
            inner: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drops every span of `layer`.
    pub fn remove_layer(&self, layer: &str) {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let gone: Vec<SpanKey> = inner
            .map
            .keys()
            .filter(|k| k.layer == layer)
            .cloned()
            .collect();
        for key in gone {
            if let Some(slot) = inner.map.remove(&key) {
                inner.used -= slot.data.len() as u64;
                if slot.protected {
                    inner.protected_used -= slot.data.len() as u64;
                    inner.protected.remove(&slot.tick);
                } else {
                    inner.probation.remove(&slot.tick);
                }
            }
        }
    }
}

impl Inner {
    fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    fn evict_to(&mut self, capacity: u64) {
        while self.used > capacity {
            let victim = self
                .probation
                .pop_first()
                .or_else(|| self.protected.pop_first());
            let Some((_, key)) = victim else { break };
            if let Some(slot) = self.map.remove(&key) {
                self.used -= slot.data.len() as u64;
                if slot.protected {
                    self.protected_used -= slot.data.len() as u64;
                }
            }
        }
    }

    /// Moves the oldest protected entries back to probation while protected is over its share.
    fn demote_to(&mut self, protected_capacity: u64) {
        while self.protected_used > protected_capacity {
            let Some((_, key)) = self.protected.pop_first() else {
                break;
            };
            let tick = self.next_tick();
            if let Some(slot) = self.map.get_mut(&key) {
                slot.protected = false;
                slot.tick = tick;
                self.protected_used -= slot.data.len() as u64;
                self.probation.insert(tick, key);
            }
        }
    }
}

impl SpanCache for MemoryCache {
    fn name(&self) -> &str {
        "memory"
    }

    fn get(&self, key: &SpanKey) -> Option<Bytes> {
        let mut g = self.lock();
        let inner = &mut *g;
        let tick = inner.next_tick();
        let slot = inner.map.get_mut(key)?;
        let data = slot.data.clone();
        if slot.protected {
            inner.protected.remove(&slot.tick);
        } else {
            inner.probation.remove(&slot.tick);
            slot.protected = true;
            inner.protected_used += data.len() as u64;
        }
        slot.tick = tick;
        inner.protected.insert(tick, key.clone());
        inner.demote_to(self.protected_capacity);
        Some(data)
    }

    fn put(&self, key: &SpanKey, data: Bytes) {
        let len = data.len() as u64;
        if len > self.capacity {
            return;
        }
        let mut g = self.lock();
        let inner = &mut *g;
        if inner.map.contains_key(key) {
            return;
        }
        let tick = inner.next_tick();
        inner.used += len;
        inner.probation.insert(tick, key.clone());
        inner.map.insert(
            key.clone(),
            Slot {
                data,
                tick,
                protected: false,
            },
        );
        inner.evict_to(self.capacity);
    }

    fn used_bytes(&self) -> u64 {
        self.lock().used
    }

    fn contains(&self, key: &SpanKey) -> bool {
        self.lock().map.contains_key(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(i: usize) -> SpanKey {
        SpanKey::new("sha256:aa", i)
    }

    #[test]
    fn a_layer_can_leave() {
        let c = MemoryCache::new(1 << 20);
        for i in 0..4 {
            c.put(&k(i), Bytes::from(vec![0u8; 100]));
            c.put(&SpanKey::new("sha256:bb", i), Bytes::from(vec![0u8; 100]));
        }
        // Hit twice: protected.
        assert!(c.get(&k(1)).is_some() && c.get(&k(1)).is_some());
        c.remove_layer("sha256:aa");
        assert_eq!(c.used_bytes(), 400);
        assert!((0..4).all(|i| !c.contains(&k(i))));
        assert!(c.contains(&SpanKey::new("sha256:bb", 3)));
        // The bookkeeping still holds: filling evicts only what it must.
        for i in 10..20 {
            c.put(&k(i), Bytes::from(vec![0u8; 100]));
        }
        assert_eq!(c.used_bytes(), 1400);
    }

    #[test]
    fn keeps_the_byte_bound() {
        let c = MemoryCache::new(10_000);
        for i in 0..100 {
            c.put(&k(i), Bytes::from(vec![i as u8; 999]));
            assert!(c.used_bytes() <= 10_000);
        }
        assert_eq!(c.used_bytes(), 10 * 999);
        assert_eq!(c.get(&k(99)).unwrap()[0], 99);
        assert!(c.get(&k(0)).is_none());
        c.put(&k(1000), Bytes::from(vec![0; 20_000]));
        assert!(!c.contains(&k(1000)), "larger than the whole cache");
    }

    #[test]
    fn a_scan_does_not_evict_the_hot_set() {
        let c = MemoryCache::new(100 * 100);
        for i in 0..50 {
            c.put(&k(i), Bytes::from(vec![1; 100]));
            c.get(&k(i));
        }
        for i in 1000..2000 {
            c.put(&k(i), Bytes::from(vec![2; 100]));
        }
        let hot = (0..50).filter(|&i| c.contains(&k(i))).count();
        assert_eq!(hot, 50, "hot entries survive a scan 10x the cache size");
        assert!(c.used_bytes() <= 100 * 100);
    }
}
