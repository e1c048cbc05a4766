//! Memory in front of disk: hits on disk are promoted to memory; puts go to both.

use bytes::Bytes;

use super::{DiskCache, MemoryCache, SpanCache, SpanKey};

/// A memory cache backed by a disk cache.
#[derive(Debug)]
pub struct TieredCache {
    memory: MemoryCache,
    disk: DiskCache,
}

impl TieredCache {
    pub fn new(memory: MemoryCache, disk: DiskCache) -> Self {
        TieredCache { memory, disk }
    }
}

impl SpanCache for TieredCache {
    fn name(&self) -> &str {
        "tiered"
    }

    fn get(&self, key: &SpanKey) -> Option<Bytes> {
        if let Some(b) = self.memory.get(key) {
            return Some(b);
        }
        let b = self.disk.get(key)?;
        self.memory.put(key, b.clone());
        Some(b)
    }

    fn put(&self, key: &SpanKey, data: Bytes) {
        self.disk.put(key, data.clone());
        self.memory.put(key, data);
    }

    fn used_bytes(&self) -> u64 {
        self.disk.used_bytes()
    }

    fn contains(&self, key: &SpanKey) -> bool {
        self.memory.contains(key) || self.disk.contains(key)
    }

    /// The disk keeps the layer's spans; memory lets them go.
    fn settle(&self, layer: &str) {
        self.memory.remove_layer(layer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn promotes_disk_hits() {
        let dir = tempfile::tempdir().unwrap();
        let key = SpanKey::new(format!("sha256:{}", "cd".repeat(32)), 3);
        {
            let disk = DiskCache::open(dir.path(), 1 << 20).unwrap();
            disk.put(&key, Bytes::from_static(b"span bytes"));
        }
        let t = TieredCache::new(
            MemoryCache::new(1 << 20),
            DiskCache::open(dir.path(), 1 << 20).unwrap(),
        );
        assert!(!t.memory.contains(&key));
        assert_eq!(&t.get(&key).unwrap()[..], b"span bytes");
        assert!(t.memory.contains(&key));
    }
}
