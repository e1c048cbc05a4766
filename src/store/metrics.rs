//! A Prometheus text endpoint (`metrics_address` in the config; off by default).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::spans::SpanStore;

/// Upper bounds (seconds) of the on-demand read latency histogram.
const BUCKETS: [f64; 7] = [0.001, 0.005, 0.02, 0.1, 0.5, 2.0, 10.0];

/// Counters of the FUSE side.
#[derive(Debug, Default)]
pub struct StoreStats {
    pub reads: AtomicU64,
    pub read_seconds_micros: AtomicU64,
    buckets: [AtomicU64; 7],
    pub fuse_errors: AtomicU64,
    pub layers_served: AtomicU64,
    pub layers_local: AtomicU64,
    /// Layers whose files' decompressed copies were written.
    pub layers_copied: AtomicU64,
    /// Opens answered from a local copy, and of those, with FUSE passthrough.
    pub local_opens: AtomicU64,
    pub passthrough_opens: AtomicU64,
}

impl StoreStats {
    /// Records one on-demand read.
    pub fn read_done(&self, took: Duration) {
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.read_seconds_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        let s = took.as_secs_f64();
        for (b, le) in self.buckets.iter().zip(BUCKETS) {
            if s <= le {
                b.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The metrics in Prometheus text format.
    pub fn render(&self, spans: &SpanStore) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let st = &spans.stats;
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
            ));
        };
        metric(
            "soci_store_bytes_fetched_total",
            "counter",
            "Compressed bytes fetched from backends.",
            g(&st.bytes_fetched),
        );
        metric(
            "soci_store_spans_fetched_total",
            "counter",
            "Spans fetched and verified.",
            g(&st.spans_fetched),
        );
        metric(
            "soci_store_fetch_errors_total",
            "counter",
            "Span fetches that failed.",
            g(&st.fetch_errors),
        );
        metric(
            "soci_store_cache_hits_total",
            "counter",
            "Span cache hits.",
            g(&st.cache_hits),
        );
        metric(
            "soci_store_cache_misses_total",
            "counter",
            "Span cache misses.",
            g(&st.cache_misses),
        );
        metric(
            "soci_store_layers_served",
            "gauge",
            "Layers resolved for lazy serving.",
            g(&self.layers_served),
        );
        metric(
            "soci_store_layers_local",
            "gauge",
            "Layers completely in the cache.",
            g(&self.layers_local),
        );
        metric(
            "soci_store_layers_copied",
            "gauge",
            "Layers whose files have decompressed local copies.",
            g(&self.layers_copied),
        );
        metric(
            "soci_store_local_opens_total",
            "counter",
            "File opens answered from a decompressed local copy.",
            g(&self.local_opens),
        );
        metric(
            "soci_store_passthrough_opens_total",
            "counter",
            "File opens the kernel serves directly from a local copy (FUSE passthrough).",
            g(&self.passthrough_opens),
        );
        metric(
            "soci_store_fuse_errors_total",
            "counter",
            "FUSE requests answered with EIO.",
            g(&self.fuse_errors),
        );
        out.push_str("# HELP soci_store_read_seconds Latency of file reads through the mount.\n# TYPE soci_store_read_seconds histogram\n");
        for (b, le) in self.buckets.iter().zip(BUCKETS) {
            out.push_str(&format!(
                "soci_store_read_seconds_bucket{{le=\"{le}\"}} {}\n",
                g(b)
            ));
        }
        let n = g(&self.reads);
        out.push_str(&format!(
            "soci_store_read_seconds_bucket{{le=\"+Inf\"}} {n}\n"
        ));
        out.push_str(&format!(
            "soci_store_read_seconds_sum {}\nsoci_store_read_seconds_count {n}\n",
            g(&self.read_seconds_micros) as f64 / 1e6
        ));
        out
    }
}

/// Serves `GET /metrics` (any path) on a bound listener until the runtime stops.
pub async fn serve_metrics_on(
    listener: tokio::net::TcpListener,
    stats: Arc<StoreStats>,
    spans: Arc<SpanStore>,
) -> std::io::Result<()> {
    if let Ok(address) = listener.local_addr() {
        tracing::info!("metrics at http://{address}/metrics");
    }
    loop {
        let (mut conn, _) = listener.accept().await?;
        let (stats, spans) = (stats.clone(), spans.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            let mut got = 0;
            // Read the request head (bounded), then answer and close.
            while got < buf.len() {
                match tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf[got..])).await
                {
                    Ok(Ok(0)) | Err(_) | Ok(Err(_)) => break,
                    Ok(Ok(n)) => got += n,
                }
                if buf[..got].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            let body = stats.render(&spans);
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(resp.as_bytes()).await;
        });
    }
}
