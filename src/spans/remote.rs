//! [`RemoteLayer`]: one layer's spans through a [`SpanStore`], for the synchronous span reader.

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;

use std::sync::atomic::Ordering;

use super::{now_ms, Purpose, SpanStore};
use crate::cache::SpanKey;
use crate::fetch::{BlobLocator, FetchError};
use crate::ztoc::reader::SpanSource;
use crate::ztoc::{Ztoc, ZtocError};

/// A zstd:chunked chunk missed is fetched with the chunks after it, in one request, up to this
/// many compressed bytes from its start: small files lie together (a package's modules), and a
/// request per file costs a round trip each.
const CHUNK_RUN_BYTES: u64 = 256 << 10;

/// One layer served through a [`SpanStore`] to synchronous readers (FUSE threads, the CLI):
/// cache hits are answered on the caller's thread; misses block on the runtime.
#[derive(Debug, Clone)]
pub struct RemoteLayer {
    store: Arc<SpanStore>,
    blob: BlobLocator,
    /// The windows blob, for a zTOC whose windows are stored apart.
    windows: Option<BlobLocator>,
    runtime: tokio::runtime::Handle,
}

impl RemoteLayer {
    /// `runtime` must not be driven by the calling thread (use it from non-runtime threads).
    pub fn new(store: Arc<SpanStore>, blob: BlobLocator, runtime: tokio::runtime::Handle) -> Self {
        RemoteLayer {
            store,
            blob,
            windows: None,
            runtime,
        }
    }

    /// Reads windows stored apart from this blob.
    pub fn with_windows(mut self, windows: Option<BlobLocator>) -> Self {
        self.windows = windows;
        self
    }

    pub fn blob(&self) -> &BlobLocator {
        &self.blob
    }

    pub fn windows(&self) -> Option<&BlobLocator> {
        self.windows.as_ref()
    }

    /// Runs `fut` for a reader: counted as waiting, so background work gives way.
    fn wait_for<T>(&self, fut: impl std::future::Future<Output = T>) -> T {
        let stats = &self.store.stats;
        stats.waiting.fetch_add(1, Ordering::SeqCst);
        stats.last_demand_ms.store(now_ms(), Ordering::Relaxed);
        stats.demand.notify_waiters();
        let result = self.runtime.block_on(fut);
        stats.waiting.fetch_sub(1, Ordering::SeqCst);
        stats.last_demand_ms.store(now_ms(), Ordering::Relaxed);
        result
    }

    /// Whether span `id` needs a window from the windows blob.
    fn needs_window(&self, ztoc: &Ztoc, id: usize) -> Option<&BlobLocator> {
        match &ztoc.compression {
            crate::ztoc::Compression::Gzip { checkpoints }
                if checkpoints[id].window.inline().is_none() =>
            {
                self.windows.as_ref()
            }
            _ => None,
        }
    }
}

impl RemoteLayer {
    /// Chunk `id` and the chunks after it that are neither cached nor being fetched, within
    /// [`CHUNK_RUN_BYTES`] of its start.
    fn chunk_run(&self, ztoc: &Ztoc, id: usize) -> Vec<usize> {
        let start = ztoc.span(id).compressed.start;
        let mut run = vec![id];
        for next in id + 1..ztoc.span_count() {
            if ztoc.span(next).compressed.end - start > CHUNK_RUN_BYTES
                || self
                    .store
                    .cached_or_pending(&SpanKey::new(&self.blob.digest, next))
            {
                break;
            }
            run.push(next);
        }
        run
    }
}

impl SpanSource for RemoteLayer {
    fn span_bytes(&self, ztoc: &Ztoc, id: usize) -> Result<Bytes, ZtocError> {
        if let Some(b) = self.store.cached(&self.blob, id) {
            return Ok(b);
        }
        let source = |e| ZtocError::Source {
            span: id,
            source: Box::new(ArcError(e)),
        };
        if let crate::ztoc::Compression::ZstdChunked { .. } = ztoc.compression {
            let run = self.chunk_run(ztoc, id);
            if run.len() > 1 {
                return self
                    .wait_for(self.store.span_run(&self.blob, ztoc, &run, Purpose::Demand))
                    .map_err(source);
            }
        }
        // A span read also needs its window: fetch both at once (the window lands in the cache).
        match self.needs_window(ztoc, id) {
            Some(w) => {
                let (span, window) = self.wait_for(async {
                    futures::join!(
                        self.store.span(&self.blob, ztoc, id),
                        self.store.window(w, ztoc, id, Purpose::Demand)
                    )
                });
                window.map_err(source)?;
                span.map_err(source)
            }
            None => self
                .wait_for(self.store.span(&self.blob, ztoc, id))
                .map_err(source),
        }
    }

    fn read_ahead(&self, ztoc: &Arc<Ztoc>, ids: Range<usize>) {
        let missing = self.store.missing(&self.blob, ids);
        if missing.is_empty() {
            return;
        }
        let (store, blob) = (self.store.clone(), self.blob.clone());
        let (windows, ztoc) = (self.windows.clone(), ztoc.clone());
        self.runtime.spawn(async move {
            store
                .fetch_ahead(&blob, windows.as_ref(), &ztoc, &missing)
                .await;
        });
    }

    fn window(&self, ztoc: &Ztoc, id: usize) -> Result<Bytes, ZtocError> {
        let w = self.windows.as_ref().ok_or_else(|| {
            ZtocError::Invalid(format!("span {id}: its window is stored apart, but where?"))
        })?;
        if let Some(b) = self.store.cache.get(&SpanKey::new(&w.digest, id)) {
            return Ok(b);
        }
        self.wait_for(self.store.window(w, ztoc, id, Purpose::Demand))
            .map_err(|e| ZtocError::Source {
                span: id,
                source: Box::new(ArcError(e)),
            })
    }
}

/// Lets a shared fetch error be a boxed error source.
#[derive(Debug)]
struct ArcError(Arc<FetchError>);

impl std::fmt::Display for ArcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for ArcError {}
