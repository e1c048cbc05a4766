//! Caches of verified span bytes, keyed by (layer digest, span id) and bounded by bytes.
//!
//! Callers put only bytes that matched their span digest. The trait is synchronous on purpose:
//! a FUSE thread answers a cache hit without a trip through the async runtime.

pub mod disk;
pub mod memory;
pub mod tiered;

use std::fmt::Debug;

use bytes::Bytes;

pub use disk::DiskCache;
pub use memory::MemoryCache;
pub use tiered::TieredCache;

/// Which span of which layer.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpanKey {
    /// The layer blob's digest, `sha256:<hex>`.
    pub layer: String,
    pub span: u32,
}

impl SpanKey {
    pub fn new(layer: impl AsRef<str>, span: usize) -> Self {
        SpanKey {
            layer: layer.as_ref().to_string(),
            span: span as u32,
        }
    }
}

/// A byte-bounded store of verified span bytes.
pub trait SpanCache: Send + Sync + Debug {
    /// A short name for logs (the configured `type`).
    fn name(&self) -> &str;
    fn get(&self, key: &SpanKey) -> Option<Bytes>;
    /// Stores verified bytes; may evict others, or decline entries larger than the bound.
    fn put(&self, key: &SpanKey, data: Bytes);
    /// Bytes currently held.
    fn used_bytes(&self) -> u64;
    fn contains(&self, key: &SpanKey) -> bool {
        self.get(key).is_some()
    }
    /// The layer's files now have decompressed local copies, which reads use instead of its
    /// spans: a tier in front of a persistent one may let the layer's spans go (the daemon's
    /// memory then stays small once layers are complete). The default keeps everything.
    fn settle(&self, layer: &str) {
        let _ = layer;
    }
}
