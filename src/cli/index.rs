//! `soci-store convert`, `create`, and `index …`: making and finding SOCI indexes.

use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use std::io::{IsTerminal, Write};

use super::{parse_size, CliContext};
use crate::fetch::registry::RegistryClient;
use crate::index::convert::{self, ConvertOptions, LayerReport, Platforms, Progress};
use crate::index::image::{Endpoint, ImageRef};
use crate::index::{discover, ArtifactStore, Platform};
use crate::reference::Reference;

#[derive(Args, Debug)]
pub struct BuildArgs {
    /// Convert this platform (os/arch[/variant]); repeatable. Default: the host's.
    #[arg(long = "platform")]
    platforms: Vec<String>,
    /// Convert every platform of a multi-platform image.
    #[arg(long, conflicts_with = "platforms")]
    all_platforms: bool,
    /// Uncompressed bytes per span (the unit fetched on demand). Upstream SOCI uses 4MiB; smaller
    /// spans start containers sooner over real links (docs/benchmarks.md) for a larger zTOC.
    #[arg(long, default_value = "512KiB", value_parser = parse_size)]
    span_size: u64,
    /// Smaller layers are not indexed (podman pulls them normally).
    #[arg(long, default_value = "10MiB", value_parser = parse_size)]
    min_layer_size: u64,
    /// Layers processed at once.
    #[arg(long, default_value_t = 3)]
    jobs: usize,
    /// A file the image's start reads (path in the image; repeatable, most urgent first): its
    /// spans go into a SOCI prefetch artifact, which the store fetches before the rest.
    #[arg(long = "prefetch-file", value_name = "PATH")]
    prefetch_files: Vec<String>,
    /// Write only what upstream SOCI writes: no zTOC tables beside the zTOCs (the store then
    /// fetches each layer's whole zTOC at lookup, as upstream's snapshotter does).
    #[arg(long)]
    no_ztoc_table: bool,
    /// Uncompressed bytes per span of the zTOC tables the store reads (at most --span-size):
    /// smaller spans (e.g. 128KiB) fetch less for a start but take more requests; the zTOC
    /// itself keeps --span-size.
    #[arg(long, default_value = "512KiB", value_parser = parse_size, conflicts_with = "no_ztoc_table")]
    table_span_size: u64,
    /// No progress or summary; errors only.
    #[arg(long, conflicts_with = "json")]
    quiet: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

impl BuildArgs {
    fn options(&self, podman_annotations: bool) -> Result<ConvertOptions> {
        let platforms = if self.all_platforms {
            Platforms::All
        } else if self.platforms.is_empty() {
            Platforms::Host
        } else {
            Platforms::These(
                self.platforms
                    .iter()
                    .map(|p| Platform::parse(p))
                    .collect::<Result<_, _>>()?,
            )
        };
        for (flag, size) in [
            ("--span-size", self.span_size),
            ("--table-span-size", self.table_span_size),
        ] {
            if size == 0 || size > crate::ztoc::MAX_BUILD_SPAN_SIZE {
                anyhow::bail!(
                    "{flag} {size}: must be between 1 and {} bytes (spans are read whole)",
                    crate::ztoc::MAX_BUILD_SPAN_SIZE
                );
            }
        }
        Ok(ConvertOptions {
            span_size: self.span_size,
            min_layer_size: self.min_layer_size,
            platforms,
            podman_annotations,
            concurrency: self.jobs.max(1),
            prefetch_files: self.prefetch_files.clone(),
            ztoc_tables: !self.no_ztoc_table,
            table_span_size: self.table_span_size,
            zstd_chunked: Default::default(),
        })
    }
}

#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// Source image: a registry reference or oci:DIR[:tag].
    src: String,
    /// Destination: a registry reference or oci:DIR[:tag].
    dst: String,
    /// Leave out the layer TOC annotation podman >= 5.1 needs.
    #[arg(long)]
    no_podman_annotations: bool,
    /// Rewrite layers as zstd:chunked, which the store (and podman 5) read lazily without any
    /// index: `--zstd-chunked` rewrites plain zstd layers, `--zstd-chunked=all` gzip and
    /// uncompressed ones too. Rewritten layers get new digests (content and diff IDs stay).
    #[arg(long, value_name = "LAYERS", num_args = 0..=1, require_equals = true, default_missing_value = "zstd",
          value_parser = ["zstd", "all"])]
    zstd_chunked: Option<String>,
    #[command(flatten)]
    build: BuildArgs,
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    /// The image (registry reference) to index.
    image: String,
    #[command(flatten)]
    build: BuildArgs,
}

#[derive(Subcommand, Debug)]
pub enum IndexCommand {
    /// List the SOCI indexes in the local artifact store.
    Ls,
    /// Show one stored SOCI index (its manifest and what it indexes).
    Info { digest: crate::digest::Digest },
    /// Find the SOCI index of an image in its registry (and keep it in the store).
    Discover {
        image: String,
        /// os/arch[/variant]; default: the host's.
        #[arg(long)]
        platform: Option<String>,
    },
}

/// Per-layer progress bars on a terminal.
struct Bars {
    multi: indicatif::MultiProgress,
    bars: Mutex<Vec<(String, indicatif::ProgressBar)>>,
}

impl Progress for Bars {
    fn layer_started(&self, layer: &str, size: u64) {
        let bar = self.multi.add(indicatif::ProgressBar::new(size));
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
            )
            .expect("static template")
            .progress_chars("=> "),
        );
        bar.set_message(layer.get(7..19).unwrap_or(layer).to_string());
        self.bars
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((layer.to_string(), bar));
    }
    fn layer_bytes(&self, layer: &str, done: u64) {
        if let Some((_, b)) = self
            .bars
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|(l, _)| l == layer)
        {
            b.set_position(done);
        }
    }
    fn layer_done(&self, r: &LayerReport) {
        if let Some((_, b)) = self
            .bars
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|(l, _)| *l == r.digest)
        {
            b.finish_with_message(format!(
                "{} {}",
                r.digest.get(7..19).unwrap_or(&r.digest),
                summary(r)
            ));
        }
    }
}

/// One line per finished layer when stderr is not a terminal.
struct Lines;

impl Progress for Lines {
    fn layer_done(&self, r: &LayerReport) {
        eprintln!("{} {}", r.digest, summary(r));
    }
}

fn summary(r: &LayerReport) -> String {
    match &r.ztoc {
        Some(z) => format!(
            "indexed: zTOC {z}, {} spans{}",
            r.spans,
            if r.note.is_empty() {
                String::new()
            } else {
                format!(" ({})", r.note)
            }
        ),
        None => format!("not indexed: {}", r.note),
    }
}

fn progress(build: &BuildArgs) -> Box<dyn Progress> {
    if build.quiet || build.json {
        Box::new(convert::Quiet)
    } else if std::io::stderr().is_terminal() {
        Box::new(Bars {
            multi: indicatif::MultiProgress::new(),
            bars: Mutex::new(Vec::new()),
        })
    } else {
        Box::new(Lines)
    }
}

fn client(ctx: &CliContext) -> Result<Arc<RegistryClient>> {
    crate::backends::registry_client(&ctx.config()?)
}

fn store(ctx: &CliContext) -> Result<ArtifactStore> {
    let dir = ctx.config()?.artifacts;
    ArtifactStore::open(&dir)
        .with_context(|| format!("opening the artifact store {}", dir.display()))
}

fn print_report(report: &convert::ConvertReport, build: &BuildArgs, what: &str) -> Result<()> {
    let mut out = super::stdout();
    if build.json {
        writeln!(out, "{}", serde_json::to_string_pretty(report)?)?;
    } else if !build.quiet {
        for p in &report.platforms {
            let indexed = p.layers.iter().filter(|l| l.ztoc.is_some()).count();
            writeln!(
                out,
                "{}: image manifest {}, SOCI index {} ({indexed} of {} layers indexed)",
                p.platform,
                p.image_manifest,
                p.soci_index,
                p.layers.len()
            )?;
        }
        if let Some(i) = &report.index {
            writeln!(out, "{what} {i}")?;
        }
    }
    out.flush()?;
    Ok(())
}

impl ConvertArgs {
    pub fn run(self, ctx: &CliContext) -> Result<()> {
        let client = client(ctx)?;
        let src = Endpoint::new(ImageRef::parse(&self.src)?, client.clone());
        let dst = Endpoint::new(ImageRef::parse(&self.dst)?, client);
        let mut opts = self.build.options(!self.no_podman_annotations)?;
        opts.zstd_chunked = match self.zstd_chunked.as_deref() {
            None => crate::index::rewrite::ZstdChunked::Off,
            Some("all") => crate::index::rewrite::ZstdChunked::All,
            Some(_) => crate::index::rewrite::ZstdChunked::Zstd,
        };
        let store = store(ctx)?;
        let progress = progress(&self.build);
        let report = ctx
            .runtime()?
            .block_on(convert::convert(
                &src,
                &dst,
                &opts,
                Some(&store),
                progress.as_ref(),
            ))
            .with_context(|| format!("converting {} to {}", self.src, self.dst))?;
        print_report(&report, &self.build, "image index")
    }
}

impl CreateArgs {
    pub fn run(self, ctx: &CliContext) -> Result<()> {
        let client = client(ctx)?;
        let image = Endpoint::new(ImageRef::Registry(Reference::parse(&self.image)?), client);
        let opts = self.build.options(false)?;
        let store = store(ctx)?;
        let progress = progress(&self.build);
        let report = ctx
            .runtime()?
            .block_on(crate::index::create::create(
                &image,
                &opts,
                Some(&store),
                progress.as_ref(),
            ))
            .with_context(|| format!("creating a SOCI index for {}", self.image))?;
        print_report(&report, &self.build, "fallback tag index")
    }
}

impl IndexCommand {
    pub fn run(self, ctx: &CliContext) -> Result<()> {
        match self {
            IndexCommand::Ls => {
                let store = store(ctx)?;
                let mut out = super::stdout();
                writeln!(
                    out,
                    "{:<73} {:<3} {:<7} {:>5} {:<12} IMAGE",
                    "INDEX", "V", "ORIGIN", "ZTOCS", "PLATFORM"
                )?;
                for r in store.indexes()? {
                    writeln!(
                        out,
                        "{:<73} {:<3} {:<7} {:>5} {:<12} {}",
                        r.digest, r.kind, r.origin, r.ztocs, r.platform, r.image
                    )?;
                }
                out.flush()?;
                Ok(())
            }
            IndexCommand::Info { digest } => {
                let store = store(ctx)?;
                let data = store
                    .get(&digest)?
                    .with_context(|| format!("{digest} is not in the artifact store"))?;
                let v: serde_json::Value = serde_json::from_slice(&data)?;
                if let Some(rec) = store.index_record(&digest)? {
                    eprintln!(
                        "{} index of {} ({}), image manifest {}",
                        rec.kind, rec.image, rec.platform, rec.image_manifest
                    );
                }
                super::print_out(&format!("{}\n", serde_json::to_string_pretty(&v)?))
            }
            IndexCommand::Discover { image, platform } => {
                let fetchers = ctx.backends.build_fetchers(&ctx.config()?)?;
                let store = store(ctx)?;
                let r = Reference::parse(&image)?;
                let platform = match platform {
                    Some(p) => Platform::parse(&p)?,
                    None => Platform::host(),
                };
                let found =
                    ctx.runtime()?
                        .block_on(discover(&fetchers, Some(&store), &r, &platform))?;
                match found {
                    Some(d) => {
                        let count =
                            |mt: &str| d.index.layers.iter().filter(|l| l.media_type == mt).count();
                        super::print_out(&format!(
                            "{} {:?} index for image manifest {} ({} zTOCs, {} prefetch artifacts)\n",
                            d.index_digest,
                            d.kind,
                            d.image_manifest_digest,
                            count(crate::index::MT_ZTOC),
                            count(crate::index::MT_SOCI_PREFETCH),
                        ))
                    }
                    None => anyhow::bail!("{r} has no SOCI index (it is pulled normally)"),
                }
            }
        }
    }
}
