//! On-disk span cache: survives restarts, bounded by bytes, crash-safe.
//!
//! Each span is one file `spans/<layer hex>/<span id>` holding a header (magic, length, CRC32)
//! and the bytes. Files are written under `tmp/` and renamed into place, so a reader never sees a
//! partial file, concurrent writers of one span each rename a complete copy, and a kill -9 leaves
//! at most a stray temp file (removed on the next open). Reads check length and CRC and drop
//! entries that fail.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use bytes::Bytes;

use super::{SpanCache, SpanKey};

const MAGIC: &[u8; 8] = b"SOCISPN1";
const HEADER: usize = 8 + 8 + 4;

#[derive(Debug, Default)]
struct Index {
    entries: HashMap<SpanKey, (u64, u64)>,
    lru: BTreeMap<u64, SpanKey>,
    tick: u64,
    used: u64,
}

/// A directory of verified span files.
#[derive(Debug)]
pub struct DiskCache {
    root: PathBuf,
    capacity: u64,
    index: Mutex<Index>,
    seq: AtomicU64,
}

/// The directory name for a layer digest (its hex; anything else is hashed so it stays a name).
fn layer_dir(layer: &str) -> String {
    match crate::digest::Digest::parse(layer) {
        Ok(d) => d.hex().to_string(),
        Err(_) => {
            use sha2::Digest;
            format!("x{}", hex::encode(sha2::Sha256::digest(layer.as_bytes())))
        }
    }
}

fn encode(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + data.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(data.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(data).to_le_bytes());
    out.extend_from_slice(data);
    out
}

fn decode(mut file: Vec<u8>) -> Option<Bytes> {
    if file.len() < HEADER || &file[..8] != MAGIC {
        return None;
    }
    let len = u64::from_le_bytes(file[8..16].try_into().ok()?);
    let crc = u32::from_le_bytes(file[16..20].try_into().ok()?);
    if len != (file.len() - HEADER) as u64 || crc32fast::hash(&file[HEADER..]) != crc {
        return None;
    }
    let data = file.split_off(HEADER);
    Some(Bytes::from(data))
}

impl DiskCache {
    /// Opens (creating) a cache directory holding at most `capacity` bytes of span data, and
    /// indexes what an earlier run left there.
    /// Errors name the cache directory.
    pub fn open(root: impl Into<PathBuf>, capacity: u64) -> std::io::Result<Self> {
        let root = root.into();
        Self::open_at(root.clone(), capacity).map_err(|e| {
            std::io::Error::new(e.kind(), format!("disk cache {}: {e}", root.display()))
        })
    }

    fn open_at(root: PathBuf, capacity: u64) -> std::io::Result<Self> {
        std::fs::create_dir_all(root.join("spans"))?;
        let tmp = root.join("tmp");
        // Leftovers of writes interrupted by a crash.
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        std::fs::create_dir_all(&tmp)?;
        let mut found = Vec::new();
        for layer in std::fs::read_dir(root.join("spans"))? {
            let layer = layer?;
            let Some(name) = layer.file_name().to_str().map(String::from) else {
                continue;
            };
            let digest = if name.len() == 64 {
                format!("sha256:{name}")
            } else {
                continue;
            };
            for f in std::fs::read_dir(layer.path())? {
                let f = f?;
                let Some(span) = f.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                    continue;
                };
                let meta = f.metadata()?;
                let mtime = meta.modified().ok();
                found.push((
                    mtime,
                    SpanKey {
                        layer: digest.clone(),
                        span,
                    },
                    meta.len().saturating_sub(HEADER as u64),
                ));
            }
        }
        // Oldest first, so that the least recently written go first when over the bound.
        found.sort_by_key(|f| f.0);
        let cache = DiskCache {
            root,
            capacity,
            index: Mutex::default(),
            seq: AtomicU64::new(0),
        };
        {
            let mut idx = cache.lock();
            for (_, key, size) in found {
                idx.tick += 1;
                let t = idx.tick;
                idx.used += size;
                idx.lru.insert(t, key.clone());
                idx.entries.insert(key, (size, t));
            }
        }
        cache.evict();
        Ok(cache)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn path(&self, key: &SpanKey) -> PathBuf {
        self.root
            .join("spans")
            .join(layer_dir(&key.layer))
            .join(key.span.to_string())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn forget(&self, key: &SpanKey) {
        let mut idx = self.lock();
        if let Some((size, tick)) = idx.entries.remove(key) {
            idx.lru.remove(&tick);
            idx.used -= size;
        }
    }

    fn evict(&self) {
        let mut victims = Vec::new();
        {
            let mut idx = self.lock();
            while idx.used > self.capacity {
                let Some((_, key)) = idx.lru.pop_first() else {
                    break;
                };
                if let Some((size, _)) = idx.entries.remove(&key) {
                    idx.used -= size;
                }
                victims.push(key);
            }
        }
        for key in victims {
            let _ = std::fs::remove_file(self.path(&key));
        }
    }

    fn write(&self, key: &SpanKey, data: &[u8]) -> std::io::Result<()> {
        let dest = self.path(key);
        if let Some(dir) = dest.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = self.root.join("tmp").join(format!(
            "{}-{}-{}",
            std::process::id(),
            self.seq.fetch_add(1, Ordering::Relaxed),
            key.span
        ));
        let result = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&encode(data))?;
            std::fs::rename(&tmp, &dest)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}

impl SpanCache for DiskCache {
    fn name(&self) -> &str {
        "disk"
    }

    fn get(&self, key: &SpanKey) -> Option<Bytes> {
        let file = match std::fs::read(self.path(key)) {
            Ok(f) => f,
            Err(_) => {
                self.forget(key);
                return None;
            }
        };
        match decode(file) {
            Some(data) => {
                let mut idx = self.lock();
                idx.tick += 1;
                let t = idx.tick;
                let size = data.len() as u64;
                if let Some((_, old)) = idx.entries.insert(key.clone(), (size, t)) {
                    idx.lru.remove(&old);
                } else {
                    idx.used += size;
                }
                idx.lru.insert(t, key.clone());
                Some(data)
            }
            None => {
                tracing::warn!(?key, "dropping a corrupt disk cache entry");
                let _ = std::fs::remove_file(self.path(key));
                self.forget(key);
                None
            }
        }
    }

    fn put(&self, key: &SpanKey, data: Bytes) {
        let size = data.len() as u64;
        if size > self.capacity || self.lock().entries.contains_key(key) {
            return;
        }
        if let Err(e) = self.write(key, &data) {
            tracing::warn!(
                ?key,
                "disk cache write in {} failed: {e}",
                self.root.display()
            );
            return;
        }
        {
            let mut idx = self.lock();
            idx.tick += 1;
            let t = idx.tick;
            if let Some((old_size, old)) = idx.entries.insert(key.clone(), (size, t)) {
                idx.lru.remove(&old);
                idx.used -= old_size;
            }
            idx.used += size;
            idx.lru.insert(t, key.clone());
        }
        self.evict();
    }

    fn used_bytes(&self) -> u64 {
        self.lock().used
    }

    fn contains(&self, key: &SpanKey) -> bool {
        self.lock().entries.contains_key(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(i: usize) -> SpanKey {
        SpanKey::new(format!("sha256:{}", "ab".repeat(32)), i)
    }

    #[test]
    fn survives_reopen_and_keeps_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        {
            let c = DiskCache::open(dir.path(), 10_000).unwrap();
            for i in 0..30 {
                c.put(&k(i), Bytes::from(vec![i as u8; 1000]));
                assert!(c.used_bytes() <= 10_000);
            }
        }
        let c = DiskCache::open(dir.path(), 10_000).unwrap();
        assert_eq!(c.used_bytes(), 10_000);
        assert_eq!(&c.get(&k(29)).unwrap()[..], &[29u8; 1000][..]);
        assert!(c.get(&k(0)).is_none());
        // A smaller bound on reopen evicts down to it.
        let c = DiskCache::open(dir.path(), 3000).unwrap();
        assert!(c.used_bytes() <= 3000);
    }

    #[test]
    fn corrupt_entries_are_dropped_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let c = DiskCache::open(dir.path(), 1 << 20).unwrap();
        c.put(&k(1), Bytes::from(vec![7u8; 5000]));
        let path = c.path(&k(1));
        let mut raw = std::fs::read(&path).unwrap();
        raw[HEADER + 100] ^= 1;
        std::fs::write(&path, &raw).unwrap();
        assert!(c.get(&k(1)).is_none());
        assert!(!path.exists());
        assert_eq!(c.used_bytes(), 0);
        // Truncated file.
        c.put(&k(2), Bytes::from(vec![7u8; 5000]));
        let path = c.path(&k(2));
        let raw = std::fs::read(&path).unwrap();
        std::fs::write(&path, &raw[..raw.len() - 1]).unwrap();
        assert!(c.get(&k(2)).is_none());
    }
}
