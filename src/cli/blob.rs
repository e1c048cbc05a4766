//! `soci-store blob …` and `soci-store mirror`: blobs through the configured fetchers.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::CliContext;
use crate::fetch::registry::{RegistryClient, RegistryOptions};
use crate::fetch::s3::{parse_s3_url, S3Fetcher, S3Options};
use crate::fetch::BlobLocator;
use crate::reference::Reference;

#[derive(Subcommand, Debug)]
pub enum BlobCommand {
    /// Write a blob (or a byte range of it) read through the configured fetchers.
    Get {
        /// `registry/repository@sha256:<blob digest>`.
        blob: String,
        /// Only bytes START-END (end exclusive).
        #[arg(long)]
        range: Option<String>,
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
}

fn parse_range(s: &str) -> Result<std::ops::Range<u64>> {
    let (a, b) = s.split_once('-').context("range must be START-END")?;
    let (a, b): (u64, u64) = (a.trim().parse()?, b.trim().parse()?);
    if a > b {
        bail!("range start {a} is after its end {b}");
    }
    Ok(a..b)
}

/// Bytes per read: what `blob get` holds in memory at once, whatever range it was asked for.
const STEP: u64 = 8 << 20;

impl BlobCommand {
    pub fn run(self, ctx: &CliContext) -> Result<()> {
        let BlobCommand::Get {
            blob,
            range,
            output,
        } = self;
        let reference = Reference::parse(&blob)?;
        let digest = reference
            .digest
            .clone()
            .context("the blob must be named by digest (…@sha256:…)")?;
        let loc = BlobLocator::new(reference, digest.clone());
        let range = range.as_deref().map(parse_range).transpose()?;
        let chain = ctx.backends.build_fetchers(&ctx.config()?)?;
        let rt = ctx.runtime()?;
        let mut sink: Box<dyn Write> = match &output {
            Some(p) => Box::new(std::io::BufWriter::new(
                std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
            )),
            None => Box::new(super::stdout()),
        };
        let result = rt.block_on(async {
            let size = chain.blob_size(&loc).await?;
            // Like an HTTP range, a range ending past the blob ends with the blob.
            let want = match &range {
                Some(r) if r.start > size || (r.start == size && r.end > r.start) => {
                    bail!(
                        "range {}-{} starts past the end of the {size}-byte blob",
                        r.start,
                        r.end
                    )
                }
                Some(r) => r.start..r.end.min(size),
                None => 0..size,
            };
            // Streamed a step at a time: memory stays bounded however large the range.
            let mut hasher = Sha256::new();
            let mut off = want.start;
            while off < want.end {
                let end = off.saturating_add(STEP).min(want.end);
                let data = chain.read_range(&loc, off..end).await?;
                if range.is_none() {
                    hasher.update(&data);
                }
                sink.write_all(&data)?;
                off = end;
            }
            if range.is_none() {
                let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
                if actual != digest {
                    bail!("blob content has digest {actual}, expected {digest}");
                }
            }
            sink.flush()?;
            Ok(())
        });
        if result.is_err() {
            if let Some(p) = &output {
                let _ = std::fs::remove_file(p);
            }
        }
        result
    }
}

#[derive(Args, Debug)]
pub struct MirrorArgs {
    /// The image (tag or digest) in its registry.
    image: String,
    /// `s3://bucket/prefix`
    target: String,
    /// S3 endpoint for S3-compatible servers (e.g. http://127.0.0.1:9000).
    #[arg(long)]
    endpoint: Option<String>,
    #[arg(long)]
    region: Option<String>,
}

const MANIFEST_TYPES: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

/// The registry options of the first configured `registry` fetcher (for insecure registries and
/// auth files), else the defaults.
fn registry_options(ctx: &CliContext) -> Result<RegistryOptions> {
    let config = ctx.config()?;
    match config.fetchers.iter().find(|f| f.kind == "registry") {
        Some(b) => crate::backends::parse_options(&b.options),
        None => Ok(RegistryOptions::default()),
    }
}

impl MirrorArgs {
    pub fn run(self, ctx: &CliContext) -> Result<()> {
        let image = Reference::parse(&self.image)?;
        let (bucket, prefix) = parse_s3_url(&self.target)?;
        let s3 = S3Fetcher::new(&S3Options {
            bucket,
            prefix,
            endpoint: self.endpoint.clone(),
            region: self.region.clone(),
            ..Default::default()
        })?;
        let client = Arc::new(RegistryClient::new(registry_options(ctx)?)?);
        let rt = ctx.runtime()?;
        let (copied, skipped, bytes) = rt.block_on(mirror(&client, &s3, &image))?;
        super::print_out(&format!(
            "{image}: copied {copied} blobs ({bytes} bytes), {skipped} already there\n"
        ))
    }
}

/// Every blob digest an image needs, manifests included, walking indexes and SOCI indexes.
async fn collect(
    client: &RegistryClient,
    image: &Reference,
) -> Result<Vec<(String, Option<bytes::Bytes>)>> {
    let mut out: Vec<(String, Option<bytes::Bytes>)> = Vec::new();
    let mut queue = vec![image.clone()];
    while let Some(r) = queue.pop() {
        let (data, _media_type, digest) = client.manifest(&r, MANIFEST_TYPES).await?;
        if out.iter().any(|(d, _)| *d == digest) {
            continue;
        }
        let doc: serde_json::Value =
            serde_json::from_slice(&data).with_context(|| format!("{r}: manifest is not JSON"))?;
        out.push((digest, Some(data)));
        if let Some(manifests) = doc.get("manifests").and_then(|m| m.as_array()) {
            for m in manifests {
                if let Some(d) = m.get("digest").and_then(|d| d.as_str()) {
                    queue.push(image.with_digest(d));
                }
            }
        }
        if let Some(d) = doc
            .pointer("/annotations/com.amazon.soci.index-digest")
            .and_then(|d| d.as_str())
        {
            queue.push(image.with_digest(d));
        }
        let blobs = doc.get("config").into_iter().chain(
            doc.get("layers")
                .and_then(|l| l.as_array())
                .into_iter()
                .flatten(),
        );
        for b in blobs {
            if let Some(d) = b.get("digest").and_then(|d| d.as_str()) {
                if !out.iter().any(|(x, _)| x == d) {
                    out.push((d.to_string(), None));
                }
            }
        }
    }
    Ok(out)
}

async fn mirror(
    client: &RegistryClient,
    s3: &S3Fetcher,
    image: &Reference,
) -> Result<(usize, usize, u64)> {
    let (mut copied, mut skipped, mut bytes) = (0, 0, 0u64);
    for (digest, inline) in collect(client, image).await? {
        let loc = BlobLocator::new(image.clone(), digest.clone());
        let hex = loc.hex()?.to_string();
        if s3.exists(&hex).await? {
            skipped += 1;
            continue;
        }
        let mut w = object_store::buffered::BufWriter::new(s3.store().clone(), s3.blob_path(&hex));
        let mut hasher = Sha256::new();
        let result: Result<u64> = async {
            let mut n = 0u64;
            match inline {
                Some(data) => {
                    hasher.update(&data);
                    w.write_all(&data).await?;
                    n += data.len() as u64;
                }
                None => {
                    let mut resp = client.blob_stream(&loc).await?;
                    while let Some(chunk) =
                        resp.chunk().await.context("reading from the registry")?
                    {
                        hasher.update(&chunk);
                        w.write_all(&chunk).await?;
                        n += chunk.len() as u64;
                    }
                }
            }
            let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
            if actual != digest {
                bail!("{loc}: content has digest {actual}");
            }
            Ok(n)
        }
        .await;
        match result {
            Ok(n) => {
                w.shutdown()
                    .await
                    .with_context(|| format!("uploading {digest}"))?;
                copied += 1;
                bytes += n;
            }
            Err(e) => {
                let _ = w.abort().await;
                return Err(e);
            }
        }
    }
    Ok((copied, skipped, bytes))
}
