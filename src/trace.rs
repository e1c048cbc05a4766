//! The start breakdown: `serve --trace FILE` writes one JSON line per event that costs a lazy
//! start time (a layer lookup, an artifact fetch, a span or window fetch, a FUSE read), and
//! `soci-store trace summary FILE` adds them up. Off by default; when off, recording is a branch.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// One traced event. `t_ms` is when it started, since the daemon started; `ms` how long it took.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// `lookup`, `artifact`, `span`, `window`, `read`.
    pub ev: String,
    pub t_ms: f64,
    pub ms: f64,
    /// Bytes moved (fetched for fetches, returned for reads).
    #[serde(default)]
    pub bytes: u64,
    /// What it was about: a digest, `blob#span`, `blob:path:offset+size` for a read.
    #[serde(default)]
    pub what: String,
    /// For fetches: `demand` (a reader waits) or `background`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub kind: String,
    /// Ended by an error, or (background) cancelled because a reader started waiting.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub outcome: String,
}

/// Where events go; [`Tracer::off`] records nothing.
#[derive(Debug)]
pub struct Tracer {
    start: Instant,
    out: Option<Mutex<std::io::BufWriter<std::fs::File>>>,
}

impl Default for Tracer {
    fn default() -> Self {
        Self::off()
    }
}

impl Tracer {
    pub fn off() -> Self {
        Tracer {
            start: Instant::now(),
            out: None,
        }
    }

    /// Appends events to `path` (created or truncated).
    pub fn to_file(path: &Path) -> std::io::Result<Self> {
        let f = std::fs::File::create(path)?;
        Ok(Tracer {
            start: Instant::now(),
            out: Some(Mutex::new(std::io::BufWriter::new(f))),
        })
    }

    pub fn enabled(&self) -> bool {
        self.out.is_some()
    }

    /// Records an event that started at `started` and ends now.
    pub fn record(&self, started: Instant, mut e: Event) {
        let Some(out) = &self.out else { return };
        e.t_ms = ms(started.saturating_duration_since(self.start));
        e.ms = ms(started.elapsed());
        let mut line = serde_json::to_vec(&e).unwrap_or_default();
        line.push(b'\n');
        let mut w = out.lock().unwrap_or_else(|p| p.into_inner());
        // Flushed per event: the trace is read while the daemon runs, and a crash keeps it.
        if w.write_all(&line).and_then(|()| w.flush()).is_err() {
            tracing::warn!("trace: write failed");
        }
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// Reads a trace file.
pub fn load(path: &Path) -> std::io::Result<Vec<Event>> {
    let f = std::io::BufReader::new(std::fs::File::open(path)?);
    let mut events = Vec::new();
    for (i, line) in f.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        events.push(serde_json::from_str(&line).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("line {}: {e}", i + 1),
            )
        })?);
    }
    Ok(events)
}

/// Totals per event kind (and fetch kind), as `trace summary` prints them.
#[derive(Debug, Default, Clone, PartialEq, Serialize)]
pub struct Totals {
    pub count: u64,
    pub bytes: u64,
    /// Sum of durations.
    pub ms: f64,
    /// Wall time covered by at least one such event (overlaps counted once).
    pub busy_ms: f64,
    pub failed: u64,
}

/// The breakdown of a trace: totals by `ev` (fetches split as `span/demand`, `span/background`).
pub fn summarize(events: &[Event]) -> BTreeMap<String, Totals> {
    let mut groups: BTreeMap<String, Vec<&Event>> = BTreeMap::new();
    for e in events {
        let key = if e.kind.is_empty() {
            e.ev.clone()
        } else {
            format!("{}/{}", e.ev, e.kind)
        };
        groups.entry(key).or_default().push(e);
    }
    groups
        .into_iter()
        .map(|(k, es)| {
            let mut t = Totals::default();
            let mut spans: Vec<(f64, f64)> = Vec::new();
            for e in &es {
                t.count += 1;
                t.bytes += e.bytes;
                t.ms += e.ms;
                t.failed += u64::from(!e.outcome.is_empty());
                spans.push((e.t_ms, e.t_ms + e.ms));
            }
            spans.sort_by(|a, b| a.0.total_cmp(&b.0));
            let mut end = f64::MIN;
            for (s, e) in spans {
                if e > end {
                    t.busy_ms += e - s.max(end);
                    end = e;
                }
            }
            t.ms = (t.ms * 1e3).round() / 1e3;
            t.busy_ms = (t.busy_ms * 1e3).round() / 1e3;
            (k, t)
        })
        .collect()
}
