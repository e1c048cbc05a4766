//! Background completion: once a layer is resolved, every span (and window) of it is fetched into
//! the cache, prefetch-artifact spans first, but only while the store is idle, so that a start
//! never shares the link with it.

use std::sync::Arc;
use std::time::Duration;

use super::context::StoreContext;
use super::layers::Layer;
use super::tree::NodeKind;
use crate::fetch::BlobLocator;
use crate::reference::Reference;
use crate::report::Chain;

/// How long background fetching waits after the last on-demand fetch or layer resolution: longer
/// than the gap between podman's pull and its container's first reads.
const BACKGROUND_QUIET_MS: u64 = 1500;

/// Background fetching takes spans in runs of at most this many compressed bytes a request.
const BACKGROUND_RUN_BYTES: u64 = 1 << 20;

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

    /// The spans of `ztoc` (the layer's zTOC, or its table, whose spans may be finer) that hold
    /// the zTOC spans a SOCI prefetch artifact lists, highest priority (lowest number) first.
    pub(super) async fn prefetch_spans(
        &self,
        r: &Reference,
        d: &crate::index::Descriptor,
        ztoc: &crate::ztoc::Ztoc,
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
        let starts = crate::ztoc::table::ztoc_span_starts(ztoc);
        let first_of = |j: usize| starts.get(j).copied().unwrap_or(ztoc.span_count());
        p.prefetch_spans
            .iter()
            .filter(|r| r.start_span <= r.end_span && r.start_span < starts.len())
            .flat_map(|r| first_of(r.start_span)..first_of(r.end_span.saturating_add(1)))
            .collect()
    }

    /// Completes a resolved layer: every span local ([`Self::fetch_all`]), then its files'
    /// decompressed copies ([`Self::copy_files`]).
    pub(super) async fn complete(self: Arc<Self>, layer: Arc<Layer>, first: Vec<usize>) {
        if self.fetch_all(&layer, first).await && self.local.is_some() {
            let ctx = self.clone();
            let done = tokio::task::spawn_blocking(move || ctx.copy_files(&layer)).await;
            if let Ok(Err(e)) = done {
                tracing::warn!("local copies stopped: {e}");
            }
        }
    }

    /// Fetches every span of the layer, prefetch spans first, one at a time, so that it ends up
    /// fully local: pausing while on-demand readers wait, paced to `background_rate`. Returns
    /// whether the layer is complete.
    pub(super) async fn fetch_all(&self, layer: &Layer, first: Vec<usize>) -> bool {
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
                            return false;
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
        true
    }

    /// Writes the decompressed copy of each file of a fully local layer that has none yet
    /// (`local`), in the layer's order so that each span is inflated about once, while the store
    /// is idle (it costs CPU a start may need). Blocking: run it on a blocking thread.
    pub(super) fn copy_files(&self, layer: &Layer) -> std::io::Result<()> {
        let Some(local) = &self.local else {
            return Ok(());
        };
        let mut entries: Vec<usize> = layer
            .tree
            .nodes
            .iter()
            .filter_map(|n| match n.kind {
                NodeKind::File { entry, .. } => layer.ztoc.resolve_hardlink(entry).ok(),
                _ => None,
            })
            .collect();
        entries.sort_unstable();
        entries.dedup();
        let blob = &layer.blob.digest;
        let mut writer = local.writer(blob)?;
        let mut buf = vec![0u8; 1 << 20];
        let (mut files, mut bytes) = (0u64, 0u64);
        for idx in entries {
            if local.contains(blob, idx) {
                continue;
            }
            while !self.idle() {
                std::thread::sleep(Duration::from_millis(20));
            }
            let size = layer.ztoc.entries[idx].size;
            let kept = writer.add(idx, size, |out| {
                let mut off = 0;
                while off < size {
                    let n = layer
                        .reader
                        .read_entry(idx, off, &mut buf)
                        .map_err(std::io::Error::other)?;
                    if n == 0 {
                        return Err(std::io::ErrorKind::UnexpectedEof.into());
                    }
                    out.write_all(&buf[..n])?;
                    off += n as u64;
                }
                Ok(())
            })?;
            if kept {
                files += 1;
                bytes += size;
            }
        }
        writer.commit()?;
        // Reads of this layer now use the copies: its spans may leave memory.
        self.spans.cache().settle(blob);
        self.inflated.clear();
        crate::sys::mem::trim();
        self.stats
            .layers_copied
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(blob = %layer.blob, files, bytes, "local copies written");
        Ok(())
    }

    /// Fetches span `id` of `layer` into the cache with the missing spans after it (one
    /// request of at most [`BACKGROUND_RUN_BYTES`]) and the window of the first, when windows
    /// are stored apart and it is not at hand (the others are derived from the spans before
    /// them when read); paced to `background_rate`.
    async fn background_span(
        &self,
        layer: &Layer,
        id: usize,
    ) -> Result<(), Arc<crate::fetch::FetchError>> {
        let bg = crate::spans::Purpose::Background;
        let source = layer.reader.source();
        let key = crate::cache::SpanKey::new(&layer.blob.digest, id);
        if self.spans.cached_or_pending(&key) {
            self.spans
                .span_for(&layer.blob, &layer.ztoc, id, bg)
                .await?;
            return Ok(());
        }
        let run = source.run_from(&layer.ztoc, id, BACKGROUND_RUN_BYTES);
        let (spans, window) = futures::join!(
            self.spans.span_run(&layer.blob, &layer.ztoc, &run, id, bg),
            source.fetch_window_unless_at_hand(&layer.ztoc, id, bg)
        );
        window?;
        spans?;
        if let Some(rate) = self.background_rate {
            let bytes: u64 = run
                .iter()
                .map(|&i| {
                    let c = layer.ztoc.span(i).compressed;
                    c.end - c.start
                })
                .sum();
            let secs = bytes as f64 / rate.max(1) as f64;
            tokio::time::sleep(Duration::from_secs_f64(secs)).await;
        }
        Ok(())
    }
}
