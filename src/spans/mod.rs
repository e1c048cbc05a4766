//! The stack under the span reader: cache first, then the fetchers, one fetch per missing span
//! however many readers want it, and every fetched span verified before it is cached or served.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::FutureExt;
use tokio::sync::OnceCell;

use crate::cache::{SpanCache, SpanKey};
use crate::fetch::{BlobLocator, FetchError, FetcherChain};
use crate::ztoc::reader::verify_span;
use crate::ztoc::Ztoc;

mod remote;
pub use remote::RemoteLayer;

type Flight = Arc<OnceCell<Result<Bytes, Arc<FetchError>>>>;

/// Counters of the span stack (read by the metrics endpoint).
#[derive(Debug, Default)]
pub(crate) struct SpanStats {
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    pub spans_fetched: AtomicU64,
    pub bytes_fetched: AtomicU64,
    pub fetch_errors: AtomicU64,
    /// Readers blocked on a span that is being fetched (background work yields to them).
    pub waiting: std::sync::atomic::AtomicUsize,
    /// When a reader last had to wait for a fetch (ms since the Unix epoch).
    pub last_demand_ms: AtomicU64,
    /// Woken when a reader starts waiting for a fetch (background fetches give way).
    pub demand: tokio::sync::Notify,
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Cache + fetchers with single-flight fetching.
#[derive(Debug)]
pub struct SpanStore {
    fetchers: FetcherChain,
    cache: Arc<dyn SpanCache>,
    inflight: Mutex<HashMap<SpanKey, Flight>>,
    pub(crate) stats: SpanStats,
    trace: crate::trace::Tracer,
}

/// Why a span is fetched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// A reader waits for it.
    Demand,
    /// Read-ahead: a reader is likely to want it next (the rest of the file it reads).
    Ahead,
    /// Making the layer local; gives way to demand.
    Background,
}

impl Purpose {
    fn as_str(self) -> &'static str {
        match self {
            Purpose::Demand => "demand",
            Purpose::Ahead => "ahead",
            Purpose::Background => "background",
        }
    }
}

/// Records a fetch in the trace when it ends, or as cancelled when it is dropped first.
struct Traced<'a> {
    trace: &'a crate::trace::Tracer,
    started: std::time::Instant,
    event: Option<crate::trace::Event>,
}

impl Traced<'_> {
    fn done(mut self, bytes: u64, outcome: &str) {
        if let Some(mut e) = self.event.take() {
            e.bytes = bytes;
            e.outcome = outcome.to_string();
            self.trace.record(self.started, e);
        }
    }
}

impl Drop for Traced<'_> {
    fn drop(&mut self) {
        if let Some(mut e) = self.event.take() {
            e.outcome = "cancelled".into();
            self.trace.record(self.started, e);
        }
    }
}

impl SpanStore {
    pub fn new(fetchers: FetcherChain, cache: Arc<dyn SpanCache>) -> Self {
        SpanStore {
            fetchers,
            cache,
            inflight: Mutex::default(),
            stats: SpanStats::default(),
            trace: crate::trace::Tracer::off(),
        }
    }

    /// Records fetches (and, through [`Self::trace`], whatever the store adds) in `trace`.
    pub fn set_tracer(&mut self, trace: crate::trace::Tracer) {
        self.trace = trace;
    }

    pub fn trace(&self) -> &crate::trace::Tracer {
        &self.trace
    }

    /// Starts a traced event of kind `ev` about `what`.
    fn traced(&self, ev: &str, what: String, purpose: Purpose) -> Traced<'_> {
        Traced {
            trace: &self.trace,
            started: std::time::Instant::now(),
            event: self.trace.enabled().then(|| crate::trace::Event {
                ev: ev.into(),
                what,
                kind: purpose.as_str().into(),
                ..Default::default()
            }),
        }
    }

    pub fn cache(&self) -> &Arc<dyn SpanCache> {
        &self.cache
    }

    pub fn fetchers(&self) -> &FetcherChain {
        &self.fetchers
    }

    /// A cached span, without touching the network.
    pub fn cached(&self, blob: &BlobLocator, id: usize) -> Option<Bytes> {
        let hit = self.cache.get(&SpanKey::new(&blob.digest, id));
        if hit.is_some() {
            self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
        }
        hit
    }

    /// Span `id` of `blob`, verified: from the cache, or fetched once for all concurrent callers.
    pub async fn span(
        &self,
        blob: &BlobLocator,
        ztoc: &Ztoc,
        id: usize,
    ) -> Result<Bytes, Arc<FetchError>> {
        self.span_for(blob, ztoc, id, Purpose::Demand).await
    }

    /// [`Self::span`], saying why (for the trace).
    pub async fn span_for(
        &self,
        blob: &BlobLocator,
        ztoc: &Ztoc,
        id: usize,
        purpose: Purpose,
    ) -> Result<Bytes, Arc<FetchError>> {
        let key = SpanKey::new(&blob.digest, id);
        if let Some(b) = self.cache.get(&key) {
            self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(b);
        }
        self.stats.cache_misses.fetch_add(1, Ordering::Relaxed);
        let fetch = self.fetch_verified(blob, ztoc, id, &key, purpose);
        self.single_flight(&key, async { fetch.await.map_err(Arc::new) })
            .await
    }

    /// Runs `fetch` for `key` unless a fetch of it is already under way, which is joined instead.
    async fn single_flight(
        &self,
        key: &SpanKey,
        fetch: impl std::future::Future<Output = Result<Bytes, Arc<FetchError>>>,
    ) -> Result<Bytes, Arc<FetchError>> {
        let flight: Flight = self
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default()
            .clone();
        let result = flight.get_or_init(|| fetch).await.clone();
        let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        if inflight.get(key).is_some_and(|f| Arc::ptr_eq(f, &flight)) {
            inflight.remove(key);
        }
        result
    }

    /// The inflate window of span `id` for a zTOC whose windows are stored apart, read from the
    /// windows blob `windows`: from the cache, or fetched once, verified and inflated.
    pub async fn window(
        &self,
        windows: &BlobLocator,
        ztoc: &Ztoc,
        id: usize,
        purpose: Purpose,
    ) -> Result<Bytes, Arc<FetchError>> {
        let key = SpanKey::new(&windows.digest, id);
        if let Some(b) = self.cache.get(&key) {
            return Ok(b);
        }
        let fetch = self.fetch_window(windows, ztoc, id, &key, purpose);
        self.single_flight(&key, async { fetch.await.map_err(Arc::new) })
            .await
    }

    /// `range` of `blob` from the fetchers, counted in the stats (bytes, or an error).
    async fn read_counted(
        &self,
        blob: &BlobLocator,
        range: Range<u64>,
    ) -> Result<Bytes, FetchError> {
        let read = self.fetchers.read_range(blob, range).await;
        match &read {
            Ok(d) => self
                .stats
                .bytes_fetched
                .fetch_add(d.len() as u64, Ordering::Relaxed),
            Err(_) => self.stats.fetch_errors.fetch_add(1, Ordering::Relaxed),
        };
        read
    }

    /// Whether `key` is cached or being fetched.
    pub(crate) fn cached_or_pending(&self, key: &SpanKey) -> bool {
        self.cache.contains(key)
            || self
                .inflight
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(key)
    }

    /// Of spans `ids` of `blob`, those neither cached nor being fetched, now counted as being
    /// fetched (the caller fetches them next): a reader reaching one meanwhile joins that fetch
    /// instead of fetching it again.
    fn claim_missing(&self, blob: &BlobLocator, ids: Range<usize>) -> Vec<usize> {
        let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        ids.filter(|&i| {
            let key = SpanKey::new(&blob.digest, i);
            if self.cache.contains(&key) || inflight.contains_key(&key) {
                return false;
            }
            inflight.insert(key, Flight::default());
            true
        })
        .collect()
    }

    /// Spans `ids` of `blob` (in blob order) with one ranged request covering them and whatever
    /// lies between (a zstd:chunked layer's tar headers); each verified and cached through its
    /// own single-flight cell (one that fails verification is fetched again alone). The bytes of
    /// span `want` (one of `ids`; the first when it is none of them).
    pub async fn span_run(
        &self,
        blob: &BlobLocator,
        ztoc: &Ztoc,
        ids: &[usize],
        want: usize,
        purpose: Purpose,
    ) -> Result<Bytes, Arc<FetchError>> {
        let (Some(&first), Some(&last)) = (ids.first(), ids.last()) else {
            return Err(Arc::new(FetchError::Invalid(
                "an empty run of spans".into(),
            )));
        };
        let range = ztoc.span(first).compressed.start..ztoc.span(last).compressed.end;
        let what = format!("{}#{first}-{last}", blob.digest);
        let fetched = async {
            let traced = self.traced("span", what, purpose);
            let read = self.read_counted(blob, range.clone()).await;
            match &read {
                Ok(d) => traced.done(d.len() as u64, ""),
                Err(_) => traced.done(0, "error"),
            }
            read.map_err(Arc::new)
        }
        .shared();
        let flights = ids.iter().map(|&id| {
            let fetched = fetched.clone();
            let key = SpanKey::new(&blob.digest, id);
            let s = ztoc.span(id).compressed;
            let (a, b) = ((s.start - range.start) as usize, (s.end - range.start) as usize);
            async move {
                let one = async {
                    let all = fetched.await?;
                    let data = all.slice(a..b.min(all.len()));
                    match verify_span(ztoc, id, &data) {
                        Ok(()) => {
                            self.stats.spans_fetched.fetch_add(1, Ordering::Relaxed);
                            self.cache.put(&key, data.clone());
                            Ok(data)
                        }
                        Err(e) => {
                            tracing::warn!(%blob, span = id, "fetched span failed verification: {e}");
                            let again = self.fetch_verified(blob, ztoc, id, &key, purpose);
                            again.await.map_err(Arc::new)
                        }
                    }
                };
                self.single_flight(&key, one).await
            }
        });
        let mut results = futures::future::join_all(flights).await;
        let at = ids.iter().position(|&i| i == want).unwrap_or(0);
        results.swap_remove(at)
    }

    async fn fetch_window(
        &self,
        windows: &BlobLocator,
        ztoc: &Ztoc,
        id: usize,
        key: &SpanKey,
        purpose: Purpose,
    ) -> Result<Bytes, FetchError> {
        let r = match &ztoc.compression {
            crate::ztoc::Compression::Gzip { checkpoints } => match &checkpoints[id].window {
                crate::ztoc::Window::Remote(r) => r.clone(),
                crate::ztoc::Window::Inline(w) => return Ok(Bytes::copy_from_slice(w)),
            },
            crate::ztoc::Compression::Uncompressed { .. }
            | crate::ztoc::Compression::ZstdChunked { .. } => {
                return Err(FetchError::Invalid(
                    "only gzip layers have inflate windows".into(),
                ))
            }
        };
        let traced = self.traced("window", format!("{}#{id}", windows.digest), purpose);
        let range = r.offset..r.offset + u64::from(r.len);
        let mut last = String::new();
        for _ in 0..2 {
            let data = match self.read_counted(windows, range.clone()).await {
                Ok(d) => d,
                Err(e) => {
                    traced.done(0, "error");
                    return Err(e);
                }
            };
            match crate::ztoc::table::open_window(&r, &data) {
                Ok(w) => {
                    let w = Bytes::from(w.into_vec());
                    self.cache.put(key, w.clone());
                    traced.done(data.len() as u64, "");
                    return Ok(w);
                }
                Err(e) => {
                    tracing::warn!(%windows, span = id, "fetched window failed verification: {e}");
                    last = e.to_string();
                }
            }
        }
        traced.done(0, "integrity");
        Err(FetchError::Integrity(format!(
            "{windows} window {id}: {last}"
        )))
    }

    async fn fetch_verified(
        &self,
        blob: &BlobLocator,
        ztoc: &Ztoc,
        id: usize,
        key: &SpanKey,
        purpose: Purpose,
    ) -> Result<Bytes, FetchError> {
        let traced = self.traced("span", format!("{}#{id}", blob.digest), purpose);
        let range = ztoc.span(id).compressed;
        let mut last = None;
        // One more try on a digest mismatch: a proxy or connection may have altered the bytes.
        for _ in 0..2 {
            let data = match self.read_counted(blob, range.clone()).await {
                Ok(d) => d,
                Err(e) => {
                    traced.done(0, "error");
                    return Err(e);
                }
            };
            match verify_span(ztoc, id, &data) {
                Ok(()) => {
                    self.stats.spans_fetched.fetch_add(1, Ordering::Relaxed);
                    self.cache.put(key, data.clone());
                    traced.done(data.len() as u64, "");
                    return Ok(data);
                }
                Err(e) => {
                    tracing::warn!(%blob, span = id, "fetched span failed verification: {e}");
                    last = Some(e);
                }
            }
        }
        traced.done(0, "integrity");
        Err(FetchError::Integrity(format!(
            "{blob} span {id}: {}",
            last.map(|e| e.to_string()).unwrap_or_default()
        )))
    }
}
