//! Background completion: once a layer is resolved, every span (and window) of it is fetched into
//! the cache, prefetch-artifact spans first, but only while the store is idle, so that a start
//! never shares the link with it.

use std::sync::Arc;
use std::time::Duration;

use super::context::StoreContext;
use super::layers::Layer;
use crate::fetch::BlobLocator;
use crate::reference::Reference;
use crate::report::Chain;

/// How long background fetching waits after the last on-demand fetch or layer resolution: longer
/// than the gap between podman's pull and its container's first reads.
const BACKGROUND_QUIET_MS: u64 = 1500;

impl StoreContext {
    /// Whether background work may use the link now: no resolution under way, no reader
    /// waiting, and nothing of either for a while (a start reads in bursts; pull, container
    /// creation and the first reads leave short gaps that background fetching must not fill).
    pub fn idle(&self) -> bool {
        use std::sync::atomic::Ordering::{Relaxed, SeqCst};
        let st = &self.spans.stats;
        if self.resolving.load(SeqCst) > 0 || st.waiting.load(SeqCst) > 0 {
            return false;
        }
        let last = st
            .last_demand_ms
            .load(Relaxed)
            .max(self.last_resolution_ms.load(Relaxed));
        crate::spans::now_ms().saturating_sub(last) >= BACKGROUND_QUIET_MS
    }

    /// The spans a SOCI prefetch artifact lists, highest priority (lowest number) first.
    pub(super) async fn prefetch_spans(
        &self,
        r: &Reference,
        d: &crate::index::Descriptor,
    ) -> Vec<usize> {
        #[derive(serde::Deserialize)]
        struct Range {
            start_span: usize,
            end_span: usize,
            #[serde(default)]
            priority: i64,
        }
        #[derive(serde::Deserialize)]
        struct Prefetch {
            prefetch_spans: Vec<Range>,
        }
        if d.size > 1 << 20 {
            return Vec::new();
        }
        let loc = BlobLocator::new(r.clone(), &d.digest);
        let parsed = match self.fetchers().read_blob(&loc, d.size).await {
            Ok(b) => serde_json::from_slice::<Prefetch>(&b).ok(),
            Err(_) => None,
        };
        let Some(mut p) = parsed else {
            tracing::warn!(%loc, "ignoring an unreadable prefetch artifact");
            return Vec::new();
        };
        p.prefetch_spans.sort_by_key(|r| r.priority);
        p.prefetch_spans
            .iter()
            .flat_map(|r| r.start_span..=r.end_span.min(r.start_span + 100_000))
            .collect()
    }

    /// Fetches every span of the layer, prefetch spans first, one at a time, so that it ends up
    /// fully local: pausing while on-demand readers wait, paced to `background_rate`.
    pub(super) async fn fetch_all(&self, layer: &Layer, first: Vec<usize>) {
        let n = layer.ztoc.span_count();
        let mut seen = vec![false; n];
        let order = first
            .into_iter()
            .filter(|&i| i < n)
            .chain(0..n)
            .filter(|&i| !std::mem::replace(&mut seen[i], true));
        for id in order.collect::<Vec<_>>() {
            // Fill idle time only (see `idle`); a reader that starts waiting meanwhile cancels
            // this fetch (it is done again later), so background bytes never delay its span.
            loop {
                while !self.idle() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let demand = self.spans.stats.demand.notified();
                tokio::pin!(demand);
                demand.as_mut().enable();
                if !self.idle() {
                    continue;
                }
                tokio::select! {
                    r = self.background_span(layer, id) => match r {
                        Ok(()) => break,
                        Err(e) => {
                            tracing::warn!(blob = %layer.blob, span = id, "background fetch stopped: {}", Chain(&*e));
                            return;
                        }
                    },
                    _ = &mut demand => {}
                }
            }
        }
        self.stats
            .layers_local
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(blob = %layer.blob, "layer fully local");
    }

    /// Fetches span `id` of `layer` into the cache, paced to `background_rate`.
    async fn background_span(
        &self,
        layer: &Layer,
        id: usize,
    ) -> Result<(), Arc<crate::fetch::FetchError>> {
        let was_cached = self
            .spans
            .cache()
            .contains(&crate::cache::SpanKey::new(&layer.blob.digest, id));
        let bg = crate::spans::Purpose::Background;
        // The window first: a span counted as fetched is then readable on its own.
        if let Some(w) = layer.reader.source().windows() {
            self.spans.window(w, &layer.ztoc, id, bg).await?;
        }
        let bytes = self
            .spans
            .span_for(&layer.blob, &layer.ztoc, id, bg)
            .await?;
        if let (Some(rate), false) = (self.background_rate, was_cached) {
            let secs = bytes.len() as f64 / rate.max(1) as f64;
            tokio::time::sleep(Duration::from_secs_f64(secs)).await;
        }
        Ok(())
    }
}
