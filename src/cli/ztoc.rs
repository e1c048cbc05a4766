//! `soci-store ztoc …`: build, inspect and read zTOCs.

use std::io::{IsTerminal, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Subcommand;

use super::parse_size;
use crate::ztoc::{self, format, verify, BuildOptions, Compression, LayerReader, Ztoc};

#[derive(Subcommand, Debug)]
pub enum ZtocCommand {
    /// Build the zTOC of a layer blob (gzip or plain tar).
    Build {
        /// The layer blob.
        layer: PathBuf,
        /// Where to write the zTOC.
        #[arg(short, long)]
        output: PathBuf,
        /// Uncompressed bytes per span (e.g. 4MiB).
        #[arg(long, default_value = "4MiB", value_parser = parse_size)]
        span_size: u64,
        /// Refuse layers smaller than this (upstream does not index them).
        #[arg(long, default_value = "10MiB", value_parser = parse_size)]
        min_layer_size: u64,
    },
    /// Show a zTOC's sizes, spans and entry count (a file, or a digest in the artifact store).
    Info {
        ztoc: PathBuf,
        /// Machine-readable output, with every span.
        #[arg(long)]
        json: bool,
    },
    /// List the entries of a zTOC (a file, or a digest in the artifact store).
    Ls { ztoc: PathBuf },
    /// Extract one file from a layer through its zTOC.
    GetFile {
        ztoc: PathBuf,
        layer: PathBuf,
        /// Path in the layer; `./a/b`, `a/b` and `/a/b` name the same file.
        path: PathBuf,
        /// Write here instead of standard output.
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// The zTOC's digest as the SOCI index lists it: the zTOC is checked against it before
        /// use. Its span digests vouch for the layer's bytes, but nothing in the layer vouches
        /// for the zTOC itself (its file table and checkpoint windows); a zTOC named by digest
        /// is checked against that digest.
        #[arg(long, value_name = "DIGEST")]
        ztoc_digest: Option<String>,
    },
    /// Check that every file read through the zTOC equals a plain sequential read of the layer.
    Verify {
        ztoc: PathBuf,
        layer: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

/// Where zTOCs named by digest are looked up.
static ARTIFACTS: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();

/// A zTOC file, or a `sha256:` digest of one in the local artifact store.
/// The digest `path` names when it is not a file but a zTOC in the artifact store.
fn stored_digest(path: &Path) -> Option<crate::digest::Digest> {
    if path.exists() {
        return None;
    }
    crate::digest::Digest::parse(&path.to_string_lossy()).ok()
}

fn load(path: &Path) -> Result<(Vec<u8>, Ztoc)> {
    let bytes = if let Some(name) = stored_digest(path) {
        let dir = ARTIFACTS
            .get()
            .cloned()
            .flatten()
            .context("no artifact store configured")?;
        let store = crate::index::ArtifactStore::open(&dir)?;
        store
            .get(&name)?
            .with_context(|| format!("{name} is not in the artifact store {}", dir.display()))?
    } else {
        // Never more than a zTOC may be: the decoder refuses the rest anyway.
        use std::io::Read;
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(ztoc::MAX_ZTOC_BYTES + 1).read_to_end(&mut bytes))
            .with_context(|| format!("reading {}", path.display()))?;
        bytes
    };
    let z = format::decode(&bytes).with_context(|| format!("loading {}", path.display()))?;
    Ok((bytes, z))
}

impl ZtocCommand {
    /// Runs the command; `artifacts` is the local artifact store, for zTOCs named by digest.
    pub fn run(self, artifacts: Option<PathBuf>) -> Result<()> {
        let _ = ARTIFACTS.set(artifacts);
        match self {
            ZtocCommand::Build {
                layer,
                output,
                span_size,
                min_layer_size,
            } => build(&layer, &output, span_size, min_layer_size),
            ZtocCommand::Info { ztoc, json } => info(&ztoc, json),
            ZtocCommand::Ls { ztoc } => ls(&ztoc),
            ZtocCommand::GetFile {
                ztoc,
                layer,
                path,
                output,
                ztoc_digest,
            } => get_file(
                &ztoc,
                &layer,
                &path,
                output.as_deref(),
                ztoc_digest.as_deref(),
            ),
            ZtocCommand::Verify { ztoc, layer, json } => verify(&ztoc, &layer, json),
        }
    }
}

fn build(layer: &Path, output: &Path, span_size: u64, min_layer_size: u64) -> Result<()> {
    let file =
        std::fs::File::open(layer).with_context(|| format!("opening {}", layer.display()))?;
    let size = file.metadata()?.len();
    if size < min_layer_size {
        bail!(ztoc::ZtocError::LayerTooSmall {
            size,
            min: min_layer_size
        });
    }
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(size);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("static template")
            .progress_chars("=> "),
        );
        bar.set_message("indexing");
        bar
    });
    let opts = BuildOptions {
        span_size,
        min_layer_size,
        ..Default::default()
    };
    let mut last = 0u64;
    let z = ztoc::build(std::io::BufReader::new(file), &opts, &mut |n| {
        if let Some(bar) = &bar {
            // Redraw at most every MiB; the callback runs per deflate block.
            if n - last >= 1 << 20 {
                bar.set_position(n);
                last = n;
            }
        }
    })
    .with_context(|| format!("indexing {}", layer.display()))?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let bytes = format::encode(&z)?;
    write_atomic(output, &bytes)?;
    let mut out = super::stdout();
    writeln!(
        out,
        "{} {} entries, {} spans, {} bytes",
        Ztoc::digest_of(&bytes),
        z.entries.len(),
        z.span_count(),
        bytes.len()
    )?;
    out.flush()?;
    Ok(())
}

/// Writes through a temporary file and rename, so an interrupted run leaves no partial zTOC.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp-soci-store");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn info(path: &Path, json: bool) -> Result<()> {
    let (bytes, z) = load(path)?;
    let mut out = super::stdout();
    let (algo, checkpoints) = match &z.compression {
        Compression::Gzip { checkpoints } => ("gzip", checkpoints.len()),
        Compression::Uncompressed { .. } => ("uncompressed", 0),
        Compression::ZstdChunked { .. } => ("zstd:chunked", 0),
    };
    let files = z
        .entries
        .iter()
        .filter(|e| e.kind == ztoc::EntryType::Reg)
        .count();
    if json {
        let spans: Vec<_> = (0..z.span_count())
            .map(|i| {
                let s = z.span(i);
                serde_json::json!({
                    "span_id": i,
                    "compressed": [s.compressed.start, s.compressed.end],
                    "uncompressed": [s.uncompressed.start, s.uncompressed.end],
                    "digest": format!("sha256:{}", hex::encode(s.digest)),
                })
            })
            .collect();
        let v = serde_json::json!({
            "digest": Ztoc::digest_of(&bytes),
            "size": bytes.len(),
            "version": String::from_utf8_lossy(&z.version),
            "build_tool": String::from_utf8_lossy(&z.build_tool),
            "compression": algo,
            "compressed_size": z.compressed_size,
            "uncompressed_size": z.uncompressed_size,
            "span_size": z.span_size,
            "spans": spans,
            "entries": z.entries.len(),
            "regular_files": files,
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
        out.flush()?;
        return Ok(());
    }
    writeln!(out, "digest:            {}", Ztoc::digest_of(&bytes))?;
    writeln!(out, "size:              {} bytes", bytes.len())?;
    writeln!(
        out,
        "version:           {}",
        String::from_utf8_lossy(&z.version)
    )?;
    writeln!(
        out,
        "build tool:        {}",
        String::from_utf8_lossy(&z.build_tool)
    )?;
    writeln!(out, "compression:       {algo}")?;
    writeln!(out, "compressed size:   {}", z.compressed_size)?;
    writeln!(out, "uncompressed size: {}", z.uncompressed_size)?;
    writeln!(out, "span size:         {}", z.span_size)?;
    writeln!(out, "spans:             {}", z.span_count())?;
    if algo == "gzip" {
        writeln!(out, "checkpoints:       {checkpoints}")?;
    }
    writeln!(
        out,
        "entries:           {} ({files} regular files)",
        z.entries.len()
    )?;
    out.flush()?;
    Ok(())
}

fn ls(path: &Path) -> Result<()> {
    let (_, z) = load(path)?;
    let mut out = super::stdout();
    for e in &z.entries {
        write!(
            out,
            "{:<8} {:06o} {:>5}:{:<5} {:>12} {} ",
            e.kind.as_str(),
            e.mode,
            e.uid,
            e.gid,
            e.size,
            String::from_utf8_lossy(&e.mod_time)
        )?;
        // Names are raw bytes and need not be UTF-8.
        out.write_all(&e.name)?;
        if !e.linkname.is_empty() {
            out.write_all(b" -> ")?;
            out.write_all(&e.linkname)?;
        }
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}

fn get_file(
    ztoc_path: &Path,
    layer: &Path,
    name: &Path,
    output: Option<&Path>,
    ztoc_digest: Option<&str>,
) -> Result<()> {
    let (bytes, z) = load(ztoc_path)?;
    // A zTOC named by digest (artifact store) is checked against that name.
    match ztoc_digest
        .map(str::to_string)
        .or_else(|| stored_digest(ztoc_path).map(String::from))
    {
        Some(want) => {
            let got = Ztoc::digest_of(&bytes);
            if got != want {
                bail!(
                    "{} is not the zTOC {want} (its digest is {got})",
                    ztoc_path.display()
                );
            }
        }
        None => eprintln!(
            "note: {} is trusted as given: its checkpoint windows and file table are not covered \
             by the layer's span digests (--ztoc-digest checks it against the SOCI index)",
            ztoc_path.display()
        ),
    }
    let idx = z
        .find(name.as_os_str().as_bytes())
        .with_context(|| format!("{} is not in the layer", name.display()))?;
    let source =
        std::fs::File::open(layer).with_context(|| format!("opening {}", layer.display()))?;
    let reader = LayerReader::new(Arc::new(z), source)
        .with_span_cache(1)
        .verify_headers(true);
    let mut sink: Box<dyn Write> = match output {
        Some(p) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
        )),
        None => Box::new(super::stdout()),
    };
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    loop {
        let n = reader.read_entry(idx, off, &mut buf)?;
        if n == 0 {
            break;
        }
        sink.write_all(&buf[..n])?;
        off += n as u64;
    }
    sink.flush()?;
    Ok(())
}

fn verify(ztoc_path: &Path, layer: &Path, json: bool) -> Result<()> {
    let (_, z) = load(ztoc_path)?;
    let report = verify::verify_layer(Arc::new(z), layer)?;
    let mut out = super::stdout();
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        for p in &report.problems {
            writeln!(out, "FAIL {p}")?;
        }
        writeln!(
            out,
            "{}: {} spans, {} files, {} hardlinks checked, {} problems",
            if report.ok() { "ok" } else { "FAILED" },
            report.spans,
            report.files,
            report.hardlinks,
            report.problems.len()
        )?;
    }
    out.flush()?;
    if !report.ok() {
        bail!("the layer does not match its zTOC");
    }
    Ok(())
}
