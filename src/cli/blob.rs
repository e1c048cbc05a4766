//! `soci-store blob …` and `soci-store mirror`: blobs through the configured fetchers.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;

use super::CliContext;
use crate::digest::Digest;
use crate::fetch::registry::RegistryClient;
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
        let client = crate::backends::registry_client(&ctx.config()?)?;
        let rt = ctx.runtime()?;
        let (copied, skipped, bytes, tags) = rt.block_on(mirror(&client, &s3, &image))?;
        super::print_out(&format!(
            "{image}: copied {copied} blobs ({bytes} bytes), {skipped} already there; {tags} tags recorded\n"
        ))
    }
}

/// What a mirror-only host needs of an image: every blob (manifests and indexes included) and
/// the tags that name manifests.
#[derive(Default)]
struct Needed {
    /// Digest and, for manifests and indexes, the bytes already read.
    blobs: Vec<(Digest, Option<bytes::Bytes>)>,
    /// Tag → (manifest digest, media type): the reference's own tag and the SOCI v1 referrers
    /// fallback tags (`sha256-<hex>`), so discovery works from the mirror alone.
    tags: Vec<(Reference, Digest, String)>,
}

impl Needed {
    fn add_blob(&mut self, digest: &Digest, data: Option<bytes::Bytes>) -> bool {
        if self.blobs.iter().any(|(d, _)| d == digest) {
            return false;
        }
        self.blobs.push((digest.clone(), data));
        true
    }
}

/// Walks the image from its reference: image indexes, manifests, their configs and layers, SOCI
/// v2 indexes (manifest annotation) and v1 indexes (referrers API or fallback tag) with their
/// zTOCs, tables, windows and prefetch artifacts.
async fn collect(client: &RegistryClient, image: &Reference) -> Result<Needed> {
    use crate::index::{
        declared_media_type, is_index_type, parse_index, parse_manifest, ANN_INDEX_DIGEST,
        MANIFEST_TYPES, MT_OCI_INDEX, MT_SOCI_INDEX_V1, MT_SOCI_INDEX_V2,
    };
    let mut out = Needed::default();
    let mut queue = vec![image.clone()];
    while let Some(r) = queue.pop() {
        let (data, served, digest) = client.manifest(&r, MANIFEST_TYPES).await?;
        let media_type = declared_media_type(&data, &served);
        if r.digest.is_none() {
            out.tags
                .push((r.clone(), digest.clone(), media_type.clone()));
        }
        if !out.add_blob(&digest, Some(data.clone())) {
            continue;
        }
        if is_index_type(&media_type) {
            let index = parse_index(&data).with_context(|| format!("{r}"))?;
            queue.extend(index.manifests.iter().map(|m| image.with_digest(&m.digest)));
            continue;
        }
        let m = parse_manifest(&data).with_context(|| format!("{r}"))?;
        for b in std::iter::once(&m.config).chain(&m.layers) {
            out.add_blob(&b.digest, None);
        }
        if let Some(d) = m.annotations.get(ANN_INDEX_DIGEST) {
            let d = Digest::parse(d).with_context(|| format!("{r}: {ANN_INDEX_DIGEST}"))?;
            queue.push(image.with_digest(&d));
        }
        // SOCI v1 indexes name this manifest as their subject: a listing of them, kept under
        // the fallback tag (what discovery reads when a mirror has no referrers API).
        let is_soci = [MT_SOCI_INDEX_V1, MT_SOCI_INDEX_V2].contains(&m.config.media_type.as_str());
        if is_soci || m.subject.is_some() {
            continue;
        }
        let fallback = Reference {
            tag: Some(format!("sha256-{}", digest.hex())),
            digest: None,
            ..image.clone()
        };
        let listing = match client.referrers(image, &digest, MT_SOCI_INDEX_V1).await? {
            Some(b) => Some(b),
            None => match client.manifest(&fallback, &[MT_OCI_INDEX]).await {
                Ok((b, _, _)) => Some(b),
                Err(crate::fetch::FetchError::NotFound(_)) => None,
                Err(e) => return Err(e.into()),
            },
        };
        if let Some(listing) = listing {
            let index = parse_index(&listing).with_context(|| format!("{fallback}"))?;
            let socis: Vec<_> = index
                .manifests
                .iter()
                .filter(|d| d.artifact_type.as_deref() == Some(MT_SOCI_INDEX_V1))
                .collect();
            if socis.is_empty() {
                continue;
            }
            queue.extend(socis.iter().map(|d| image.with_digest(&d.digest)));
            let listing_digest = crate::index::sha256_digest(&listing);
            out.add_blob(&listing_digest, Some(listing));
            out.tags
                .push((fallback, listing_digest, MT_OCI_INDEX.to_string()));
        }
    }
    Ok(out)
}

async fn mirror(
    client: &RegistryClient,
    s3: &S3Fetcher,
    image: &Reference,
) -> Result<(usize, usize, u64, usize)> {
    let (mut copied, mut skipped, mut bytes) = (0, 0, 0u64);
    let needed = collect(client, image).await?;
    for (digest, inline) in needed.blobs {
        let loc = BlobLocator::new(image.clone(), digest.clone());
        let hex = loc.hex().to_string();
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
    // Tags last: a tag never names a manifest the mirror does not hold.
    for (tag, digest, media_type) in &needed.tags {
        s3.put_tag(tag, digest, media_type)
            .await
            .with_context(|| format!("recording tag {tag}"))?;
    }
    Ok((copied, skipped, bytes, needed.tags.len()))
}
