//! `convert --zstd-chunked`: layers rewritten as zstd:chunked (`chunked::write`), so that images
//! whose layers are plain zstd (which nothing can read lazily) start lazily too. The rewritten
//! layer decompresses to the same tar (the diff ID stays), under a new digest.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use futures::StreamExt;
use sha2::{Digest as _, Sha256};

use super::convert::Progress;
use super::image::Endpoint;
use super::{Descriptor, IndexError, Manifest};
use crate::digest::Digest;
use crate::fetch::FetchError;

/// Which layers `convert` rewrites as zstd:chunked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ZstdChunked {
    /// None.
    #[default]
    Off,
    /// Plain zstd layers (not chunked already).
    Zstd,
    /// Plain zstd, gzip and uncompressed tar layers.
    All,
}

/// The media type of a rewritten layer.
pub const MT_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
/// zstd level of rewritten layers (podman's default for zstd:chunked).
const LEVEL: i32 = 3;

impl ZstdChunked {
    fn wants(self, layer: &Descriptor) -> bool {
        let mt = layer.media_type.as_str();
        let chunked = layer
            .annotations
            .contains_key(crate::chunked::ANN_TOC_DIGEST);
        let zstd = mt.contains("zstd") && !chunked;
        match self {
            ZstdChunked::Off => false,
            ZstdChunked::Zstd => zstd,
            ZstdChunked::All => zstd || (!chunked && super::build::indexable(layer).is_ok()),
        }
    }
}

/// A scratch directory, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> std::io::Result<Scratch> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "soci-store-rewrite-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p)?;
        Ok(Scratch(p))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Rewrites the layers of `image` that `which` selects, pushing each new blob to `dst` and
/// replacing its descriptor in `image`; returns (old digest, new digest) per rewritten layer.
pub(super) async fn rewrite_layers(
    src: &Endpoint,
    dst: &Endpoint,
    image: &mut Manifest,
    which: ZstdChunked,
    progress: &dyn Progress,
) -> Result<Vec<(Digest, Digest)>, IndexError> {
    let mut done: Vec<(Digest, Descriptor)> = Vec::new();
    for layer in image.layers.iter_mut() {
        if !which.wants(layer) {
            continue;
        }
        // A layer listed twice is rewritten once.
        let new = match done.iter().find(|(old, _)| *old == layer.digest) {
            Some((_, d)) => d.clone(),
            None => {
                progress.layer_started(&layer.digest, layer.size);
                let d = rewrite_one(src, dst, layer).await?;
                done.push((layer.digest.clone(), d.clone()));
                d
            }
        };
        *layer = new;
    }
    Ok(done.into_iter().map(|(old, d)| (old, d.digest)).collect())
}

async fn rewrite_one(
    src: &Endpoint,
    dst: &Endpoint,
    layer: &Descriptor,
) -> Result<Descriptor, IndexError> {
    let scratch = Scratch::new()?;
    let blob_path = scratch.0.join("blob");
    // The source blob, checked against its digest and size.
    {
        let mut f = BufWriter::new(std::fs::File::create(&blob_path)?);
        let mut hasher = Sha256::new();
        let mut n = 0u64;
        let mut stream = src.blob_stream(&layer.digest).await?;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            hasher.update(&chunk);
            n += chunk.len() as u64;
            f.write_all(&chunk)?;
        }
        f.flush()?;
        let got = Digest::from_sha256(hasher.finalize().into());
        if got != layer.digest || n != layer.size {
            return Err(IndexError::Other(format!(
                "layer {} arrived as {got} ({n} bytes, {} expected)",
                layer.digest, layer.size
            )));
        }
    }
    let media_type = layer.media_type.clone();
    let dir = scratch.0.clone();
    let written = tokio::task::spawn_blocking(move || rewrite_file(&dir, &media_type))
        .await
        .map_err(|e| IndexError::Other(format!("rewriting a layer: {e}")))??;
    let out = scratch.0.join("chunked");
    let stream = futures::stream::unfold(
        Some(tokio::fs::File::open(&out).await?),
        |file| async move {
            use tokio::io::AsyncReadExt;
            let mut file = file?;
            let mut buf = vec![0u8; 1 << 20];
            match file.read(&mut buf).await {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    Some((Ok(Bytes::from(buf)), Some(file)))
                }
                Err(e) => Some((
                    Err(FetchError::backend("reading the rewritten layer", e)),
                    None,
                )),
            }
        },
    )
    .boxed();
    if !dst.has_blob(&written.digest).await? {
        dst.put_blob_stream(&written.digest, stream).await?;
    }
    let mut d = Descriptor::new(MT_LAYER_ZSTD, written.digest, written.size);
    d.annotations = written.annotations;
    Ok(d)
}

/// `dir/blob` (compressed as `media_type` says) → `dir/tar` → `dir/chunked`.
fn rewrite_file(
    dir: &Path,
    media_type: &str,
) -> Result<crate::chunked::write::Written, IndexError> {
    let blob = std::io::BufReader::new(std::fs::File::open(dir.join("blob"))?);
    let mut tar = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(dir.join("tar"))?;
    {
        let mut out = BufWriter::new(&mut tar);
        if media_type.contains("zstd") {
            std::io::copy(&mut zstd::stream::read::Decoder::new(blob)?, &mut out)?;
        } else if media_type.contains("gzip") {
            std::io::copy(&mut flate2::bufread::MultiGzDecoder::new(blob), &mut out)?;
        } else {
            std::io::copy(&mut { blob }, &mut out)?;
        }
        out.flush()?;
    }
    let out = std::fs::File::create(dir.join("chunked"))?;
    crate::chunked::write::write(&mut tar, BufWriter::new(out), LEVEL)
        .map_err(|e| IndexError::Other(format!("writing the layer as zstd:chunked: {e}")))
}
