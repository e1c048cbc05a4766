//! A lazily served layer: what podman reads of it besides its files (the `info` record and the
//! compressed `blob`).

use std::sync::atomic::AtomicI64;
use std::sync::Arc;

use super::context::StoreContext;
use super::tree::LayerTree;
use crate::digest::Digest;
use crate::fetch::BlobLocator;
use crate::index::Descriptor;
use crate::reference::Reference;
use crate::spans::RemoteLayer;
use crate::ztoc::{Compression, LayerReader, Ztoc};

/// A lazily served layer.
pub struct Layer {
    pub reference: Reference,
    pub blob: BlobLocator,
    pub ztoc_digest: Digest,
    /// The encoded zTOC's size (with its digest, enough to fetch it again).
    pub ztoc_size: u64,
    /// The zTOC table served from instead of the zTOC (digest, size), when the index has one.
    pub table: Option<(Digest, u64)>,
    pub ztoc: Arc<Ztoc>,
    pub tree: LayerTree,
    /// The `info` file.
    pub info: Vec<u8>,
    pub blob_size: u64,
    pub reader: LayerReader<RemoteLayer>,
    /// podman's reference count (`use` creates minus layer-directory rmdirs).
    pub uses: AtomicI64,
}

/// The layer's `info` file: what podman records for a layer it takes from the store
/// (podman-store.md).
pub(super) fn podman_info(
    layer: &Descriptor,
    diff_id: &str,
    diff_size: u64,
    ztoc: &Ztoc,
    toc_digest: &str,
) -> Vec<u8> {
    let compression = match ztoc.compression {
        Compression::Gzip { .. } => 2,
        Compression::Uncompressed { .. } => 0,
        Compression::ZstdChunked { .. } => 4,
    };
    let info = serde_json::json!({
        "compressed-diff-digest": layer.digest,
        "compressed-size": layer.size,
        "diff-digest": diff_id,
        "diff-size": diff_size,
        "compression": compression,
        "toc-digest": toc_digest,
        "flags": {"expected-layer-diffid": diff_id},
    });
    serde_json::to_vec(&info).expect("json")
}

impl StoreContext {
    /// Bytes `range` of a layer's compressed blob (the `blob` file, which podman reads to push or
    /// save an image): span by span through the cache, each verified against its digest. The few
    /// bytes before the first span (the gzip header, which no span digest covers) come from the
    /// fetchers; podman checks the whole blob against the layer's diff ID as it reads it.
    pub async fn read_blob(
        &self,
        layer: &Layer,
        range: std::ops::Range<u64>,
    ) -> Result<Vec<u8>, Arc<crate::fetch::FetchError>> {
        let z = &layer.ztoc;
        if let Compression::ZstdChunked { .. } = z.compression {
            // Its tar headers and metadata frames have no digest of their own to check as they
            // are read: not served until they can be verified.
            return Err(Arc::new(crate::fetch::FetchError::Invalid(
                "the blob of a zstd:chunked layer served lazily is not readable (podman push/save of it): pull the image normally for that".into(),
            )));
        }
        let end = range.end.min(layer.blob_size);
        let mut out = Vec::with_capacity(end.saturating_sub(range.start) as usize);
        let mut off = range.start;
        while off < end {
            // The first span whose compressed range ends after `off`.
            let (mut lo, mut hi) = (0, z.span_count());
            while lo < hi {
                let mid = (lo + hi) / 2;
                if z.span(mid).compressed.end <= off {
                    lo = mid + 1;
                } else {
                    hi = mid;
                }
            }
            let span = (lo < z.span_count()).then(|| z.span(lo));
            match span {
                Some(s) if s.compressed.start <= off => {
                    let bytes = self
                        .spans
                        .span_for(&layer.blob, z, s.id, crate::spans::Purpose::Demand)
                        .await?;
                    let to = end.min(s.compressed.end);
                    let (a, b) = (off - s.compressed.start, to - s.compressed.start);
                    out.extend_from_slice(&bytes[a as usize..b as usize]);
                    off = to;
                }
                _ => {
                    let to = span.map_or(end, |s| s.compressed.start.min(end));
                    let bytes = self.fetchers().read_range(&layer.blob, off..to).await?;
                    out.extend_from_slice(&bytes);
                    off = to;
                }
            }
        }
        Ok(out)
    }

    /// The uncompressed tar size podman records (`diff-size`): the zTOC knows the archive up to
    /// its end blocks; writers may pad after them, which the gzip trailer's ISIZE tells.
    pub(super) async fn diff_size(&self, blob: &BlobLocator, z: &Ztoc) -> u64 {
        match z.compression {
            Compression::Gzip { .. } => {}
            Compression::Uncompressed { .. } => return z.compressed_size,
            // From the tar-split data: exact.
            Compression::ZstdChunked { .. } => return z.uncompressed_size,
        }
        let n = z.compressed_size;
        let Ok(tail) = self
            .fetchers()
            .read_range(blob, n.saturating_sub(4)..n)
            .await
        else {
            return z.uncompressed_size;
        };
        let isize = u32::from_le_bytes(tail[..4].try_into().unwrap_or([0; 4])) as u64;
        let u = z.uncompressed_size;
        [u, u.div_ceil(10240) * 10240, u.div_ceil(512) * 512]
            .into_iter()
            .find(|c| c % (1 << 32) == isize)
            .unwrap_or(u)
    }
}
