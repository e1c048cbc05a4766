//! `soci-store trace summary FILE`: where a lazy start spent its time (from `serve --trace`).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum TraceCommand {
    /// Totals per event kind: count, bytes, summed and wall-clock time, failures.
    Summary {
        /// A trace file written by `serve --trace`.
        file: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

impl TraceCommand {
    pub fn run(self) -> Result<()> {
        match self {
            TraceCommand::Summary { file, json } => {
                let events = crate::trace::load(&file)
                    .with_context(|| format!("reading the trace {}", file.display()))?;
                let totals = crate::trace::summarize(&events);
                let first_read = events
                    .iter()
                    .filter(|e| e.ev == "read")
                    .map(|e| e.t_ms)
                    .reduce(f64::min);
                let mut out = String::new();
                if json {
                    let v = serde_json::json!({"first_read_ms": first_read, "events": totals});
                    out = serde_json::to_string_pretty(&v)? + "\n";
                } else {
                    out.push_str(&format!(
                        "{:<22} {:>7} {:>12} {:>11} {:>11} {:>7}\n",
                        "EVENT", "COUNT", "BYTES", "SUM_MS", "WALL_MS", "FAILED"
                    ));
                    for (k, t) in &totals {
                        out.push_str(&format!(
                            "{:<22} {:>7} {:>12} {:>11.1} {:>11.1} {:>7}\n",
                            k, t.count, t.bytes, t.ms, t.busy_ms, t.failed
                        ));
                    }
                    if let Some(t) = first_read {
                        out.push_str(&format!("first read at {t:.1} ms\n"));
                    }
                }
                super::print_out(&out)
            }
        }
    }
}
