//! [`RemoteLayer`]: one layer's spans through a [`SpanStore`], for the synchronous span reader.

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;

use std::sync::atomic::Ordering;

use super::{now_ms, Purpose, SpanStore};
use crate::cache::SpanKey;
use crate::fetch::{BlobLocator, FetchError};
use crate::report::Chain;
use crate::ztoc::reader::SpanSource;
use crate::ztoc::{Ztoc, ZtocError, WINDOW_SIZE};

/// A zstd:chunked chunk missed is fetched with the chunks after it, in one request, up to this
/// many compressed bytes from its start: small files lie together (a package's modules), and a
/// request per file costs a round trip each.
const CHUNK_RUN_BYTES: u64 = 256 << 10;

/// A span of a table (windows stored apart) missed while reading a file is fetched with the
/// file's other missing spans in its aligned group of this many uncompressed bytes, in one
/// request, and with one window: a library's page faults come in clusters, and a request per
/// span costs a round trip each. Small files get their own span alone.
const GROUP_BYTES: u64 = 512 << 10;

/// A window is derived from the spans before it (inflating them from a window at hand) when
/// one at most this many spans back is: longer chains cost more CPU than a fetch.
const DERIVE_SPANS: usize = 32;
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

    fn window_key(&self, id: usize) -> Option<SpanKey> {
        self.windows.as_ref().map(|w| SpanKey::new(&w.digest, id))
    }

    fn span_cached(&self, id: usize) -> bool {
        self.store
            .cache
            .contains(&SpanKey::new(&self.blob.digest, id))
    }

    /// Whether span `id`'s window needs no fetch: cached, or derivable from the span before it
    /// and that one's window, both cached.
    pub fn window_at_hand(&self, id: usize) -> bool {
        let has = |i| {
            self.window_key(i)
                .is_some_and(|k| self.store.cache.contains(&k))
        };
        has(id) || (id > 0 && self.span_cached(id - 1) && has(id - 1))
    }

    /// Span `id`'s window from the spans before it: from the nearest window at hand at most
    /// [`DERIVE_SPANS`] back, every span up to `id` cached, each inflated in turn (every window
    /// met on the way is cached too). None when that chain is not all at hand. Trusted as
    /// much as a fetched window: each span was verified against its digest, the first window
    /// against its reference.
    fn derive_window(&self, ztoc: &Ztoc, id: usize) -> Option<Bytes> {
        let cache = &self.store.cache;
        let mut from = id;
        let mut window = loop {
            if from == 0 || id - from >= DERIVE_SPANS || !self.span_cached(from - 1) {
                return None;
            }
            from -= 1;
            if let Some(w) = cache.get(&self.window_key(from)?) {
                break w;
            }
        };
        for k in from..id {
            let bytes = cache.get(&SpanKey::new(&self.blob.digest, k))?;
            let span = ztoc.span(k);
            let mut out = vec![0u8; (span.uncompressed.end - span.uncompressed.start) as usize];
            crate::ztoc::reader::inflate_span_with(ztoc, k, &bytes, Some(&window), 0, &mut out)
                .ok()?;
            window = next_window(&window, &out);
            cache.put(&self.window_key(k + 1)?, window.clone());
        }
        Some(window)
    }

    /// The missing spans around `id` (itself missing) that hold part of `file` and lie in
    /// `id`'s aligned group of [`GROUP_BYTES`], consecutive.
    fn group_run(&self, ztoc: &Ztoc, id: usize, file: &Range<u64>) -> Vec<usize> {
        let per_group = (GROUP_BYTES / ztoc.span_size.max(1)).max(1) as usize;
        let lo = id / per_group * per_group;
        let hi = (lo + per_group).min(ztoc.span_count());
        let wanted = |i: usize| {
            let u = ztoc.span(i).uncompressed;
            u.start < file.end
                && file.start < u.end
                && !self
                    .store
                    .cached_or_pending(&SpanKey::new(&self.blob.digest, i))
        };
        let mut first = id;
        while first > lo && wanted(first - 1) {
            first -= 1;
        }
        let mut end = id + 1;
        while end < hi && wanted(end) {
            end += 1;
        }
        (first..end).collect()
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
    /// Span `id` and the spans after it that are neither cached nor being fetched, within
    /// `max_bytes` compressed bytes of its start (at least `id`) and [`DERIVE_SPANS`] spans
    /// (so that the run's first window is near enough to derive the others' from).
    pub fn run_from(&self, ztoc: &Ztoc, id: usize, max_bytes: u64) -> Vec<usize> {
        let start = ztoc.span(id).compressed.start;
        let mut run = vec![id];
        for next in id + 1..ztoc.span_count().min(id + DERIVE_SPANS) {
            if ztoc.span(next).compressed.end - start > max_bytes
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

    /// Read-ahead: fetches spans `ids` (in order), each run of consecutive ones with one
    /// request, and the window of each run's first span unless it is at hand (the others are
    /// derived from the spans before them when read). A reader reaching one of them joins its
    /// fetch. Errors are only logged: a reader that needs one of these spans fetches it itself.
    async fn fetch_ahead(&self, ztoc: &Ztoc, ids: &[usize]) {
        let mut runs: Vec<Vec<usize>> = Vec::new();
        for &id in ids {
            match runs.last_mut() {
                Some(run) if run.last() == Some(&(id.wrapping_sub(1))) => run.push(id),
                _ => runs.push(vec![id]),
            }
        }
        let fetches = runs.iter().map(|run| async move {
            let first = run[0];
            let (s, w) = futures::join!(
                self.store
                    .span_run(&self.blob, ztoc, run, first, Purpose::Ahead),
                self.fetch_window_unless_at_hand(ztoc, first, Purpose::Ahead)
            );
            if let Err(e) = s.and(w) {
                tracing::debug!(blob = %self.blob, span = first, "read-ahead: {}", Chain(&*e));
            }
        });
        futures::future::join_all(fetches).await;
    }

    /// The window of span `id` when it is stored apart and not at hand, fetched for `purpose`.
    pub async fn fetch_window_unless_at_hand(
        &self,
        ztoc: &Ztoc,
        id: usize,
        purpose: Purpose,
    ) -> Result<(), Arc<FetchError>> {
        match self.needs_window(ztoc, id) {
            Some(w) if !self.window_at_hand(id) => {
                self.store.window(w, ztoc, id, purpose).await.map(drop)
            }
            _ => Ok(()),
        }
    }
}

/// The window after a span: the last 32 KiB of the stream up to the span's end (`prev` is the
/// window before it, for a span shorter than a window).
fn next_window(prev: &[u8], out: &[u8]) -> Bytes {
    if out.len() >= WINDOW_SIZE {
        return Bytes::copy_from_slice(&out[out.len() - WINDOW_SIZE..]);
    }
    let mut w = Vec::with_capacity(WINDOW_SIZE);
    w.extend_from_slice(&prev[out.len()..]);
    w.extend_from_slice(out);
    w.into()
}

impl SpanSource for RemoteLayer {
    fn span_bytes_for(
        &self,
        ztoc: &Ztoc,
        id: usize,
        file: Option<&Range<u64>>,
    ) -> Result<Bytes, ZtocError> {
        if let Some(b) = self.store.cached(&self.blob, id) {
            return Ok(b);
        }
        let (Some(file), Some(_)) = (file, self.needs_window(ztoc, id)) else {
            return self.span_bytes(ztoc, id);
        };
        if self
            .store
            .cached_or_pending(&SpanKey::new(&self.blob.digest, id))
        {
            return self.span_bytes(ztoc, id);
        }
        let run = self.group_run(ztoc, id, file);
        if run.len() < 2 {
            return self.span_bytes(ztoc, id);
        }
        // One window, the run's first; the others follow from the spans before them.
        let (span, window) = self.wait_for(async {
            futures::join!(
                self.store
                    .span_run(&self.blob, ztoc, &run, id, Purpose::Demand),
                self.fetch_window_unless_at_hand(ztoc, run[0], Purpose::Demand)
            )
        });
        let source = |e| ZtocError::Source {
            span: id,
            source: Box::new(ArcError(e)),
        };
        window.map_err(source)?;
        span.map_err(source)
    }

    fn inflated(&self, ztoc: &Ztoc, id: usize, data: &[u8]) {
        if id + 1 >= ztoc.span_count()
            || data.len() < WINDOW_SIZE
            || self.needs_window(ztoc, id + 1).is_none()
        {
            return;
        }
        if let Some(key) = self.window_key(id + 1) {
            if !self.store.cache.contains(&key) {
                let w = Bytes::copy_from_slice(&data[data.len() - WINDOW_SIZE..]);
                self.store.cache.put(&key, w);
            }
        }
    }

    fn span_bytes(&self, ztoc: &Ztoc, id: usize) -> Result<Bytes, ZtocError> {
        if let Some(b) = self.store.cached(&self.blob, id) {
            return Ok(b);
        }
        let source = |e| ZtocError::Source {
            span: id,
            source: Box::new(ArcError(e)),
        };
        if let crate::ztoc::Compression::ZstdChunked { .. } = ztoc.compression {
            let run = self.run_from(ztoc, id, CHUNK_RUN_BYTES);
            if run.len() > 1 {
                return self
                    .wait_for(
                        self.store
                            .span_run(&self.blob, ztoc, &run, id, Purpose::Demand),
                    )
                    .map_err(source);
            }
        }
        // A span read also needs its window: fetch both at once (the window lands in the cache),
        // unless the window follows from the span before.
        match self
            .needs_window(ztoc, id)
            .filter(|_| !self.window_at_hand(id))
        {
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
        let missing = self.store.claim_missing(&self.blob, ids);
        if missing.is_empty() {
            return;
        }
        let this = self.clone();
        let ztoc = ztoc.clone();
        self.runtime
            .spawn(async move { this.fetch_ahead(&ztoc, &missing).await });
    }

    fn window(&self, ztoc: &Ztoc, id: usize) -> Result<Bytes, ZtocError> {
        let w = self.windows.as_ref().ok_or_else(|| {
            ZtocError::Invalid(format!("span {id}: its window is stored apart, but where?"))
        })?;
        if let Some(b) = self.store.cache.get(&SpanKey::new(&w.digest, id)) {
            return Ok(b);
        }
        if let Some(b) = self.derive_window(ztoc, id) {
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
