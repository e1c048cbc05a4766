//! `soci-store serve MOUNTPOINT`: the podman additional layer store.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;

use super::CliContext;
use crate::index::ArtifactStore;
use crate::store::{self, StoreContext};

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Where to mount, e.g. /var/lib/soci-store/store (podman's additionallayerstores entry).
    mountpoint: PathBuf,
    /// FUSE worker threads.
    #[arg(long, default_value_t = 4)]
    threads: usize,
    /// Longest a layer lookup may take before podman is told to download the layer itself.
    #[arg(long, default_value_t = 30.0)]
    lookup_timeout: f64,
    /// Fetch only what is read (no background completion of layers).
    #[arg(long)]
    no_background_fetch: bool,
    /// Pace background fetching to this many bytes per second (e.g. 20MiB); default: as fast as
    /// possible while no read waits.
    #[arg(long, value_parser = super::parse_size)]
    background_rate: Option<u64>,
    /// When a file read sequentially misses a span, fetch up to this many of the file's next
    /// spans at once (at most 4 MiB compressed); 0 fetches only the spans reads need.
    #[arg(long, value_name = "SPANS", default_value_t = crate::ztoc::reader::READ_AHEAD_SPANS)]
    read_ahead: usize,
    /// Read local copies through the daemon even where the kernel offers FUSE passthrough.
    #[arg(long)]
    no_passthrough: bool,
    /// Write a start breakdown to FILE: one JSON line per lookup, artifact fetch, span fetch
    /// and FUSE read (`soci-store trace summary FILE` adds them up).
    #[arg(long, value_name = "FILE")]
    trace: Option<PathBuf>,
}

impl ServeArgs {
    pub fn run(self, ctx: &CliContext) -> Result<()> {
        // First, while the process has one thread: a user's store serves that user's rootless
        // podman, from inside its namespaces (unless started there, by `podman unshare`).
        if crate::paths::host_user().is_some() && !crate::paths::in_user_namespace() {
            store::rootless::join_podman()?;
        }
        let config = ctx.config()?;
        let mut spans = ctx.backends.build_span_store(&config)?;
        if let Some(path) = &self.trace {
            let t = crate::trace::Tracer::to_file(path)
                .with_context(|| format!("creating the trace file {}", path.display()))?;
            spans.set_tracer(t);
        }
        let spans = Arc::new(spans);
        let artifacts = ArtifactStore::open(&config.artifacts).with_context(|| {
            format!("opening the artifact store {}", config.artifacts.display())
        })?;
        let rt = ctx.runtime()?;
        let mut sc = StoreContext::new(spans, Some(artifacts), rt.handle().clone());
        sc.lookup_timeout = Duration::from_secs_f64(self.lookup_timeout);
        sc.background_fetch = !self.no_background_fetch;
        sc.background_rate = self.background_rate;
        sc.read_ahead = self.read_ahead;
        sc.passthrough = !self.no_passthrough;
        if config.local_files_max_bytes > 0 {
            let local =
                store::local::LocalFiles::open(&config.local_files, config.local_files_max_bytes)
                    .with_context(|| {
                    format!("opening the local copies {}", config.local_files.display())
                })?;
            sc.local = Some(Arc::new(local));
        }
        let opts = store::ServeOptions {
            threads: self.threads,
            metrics_address: config.metrics_address.clone(),
            state_dir: Some(config.state_dir.clone()),
        };
        store::serve(Arc::new(sc), &self.mountpoint, &opts)
    }
}
