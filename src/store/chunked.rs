//! zstd:chunked layers, served without any SOCI index: the layer's TOC and tar-split data are
//! fetched by range (where its annotations say), each verified against its digest, and turned
//! into a file table with one span per chunk (`crate::chunked`); chunks are then fetched and
//! verified like spans.

use std::sync::atomic::AtomicI64;
use std::sync::Arc;

use super::context::{memoized, mismatch, ImageInfo, Lookup, LookupError, StoreContext};
use super::layers::Layer;
use super::tree::LayerTree;
use crate::chunked::ChunkedLayer;
use crate::digest::Digest;
use crate::fetch::BlobLocator;
use crate::index::Descriptor;
use crate::ztoc::Ztoc;

impl StoreContext {
    /// The served layer for the zstd:chunked layer `desc` of `image`.
    pub(super) async fn resolve_chunked(
        self: &Arc<Self>,
        image: &ImageInfo,
        desc: &Descriptor,
        diff_id: &Digest,
        chunked: &ChunkedLayer,
    ) -> Lookup<Arc<Layer>> {
        let blob = BlobLocator::new(image.reference.clone(), &desc.digest);
        let ztoc = self.chunked_table(&blob, desc, chunked).await?;
        let tree = LayerTree::build(&ztoc);
        if let Some(maps) = &self.id_maps {
            maps.check(tree.nodes.iter().map(|n| (n.uid, n.gid)))
                .map_err(|why| mismatch(format!("layer {}: {why}", desc.digest)))?;
        }
        let info = super::layers::podman_info(
            desc,
            diff_id,
            ztoc.uncompressed_size,
            &ztoc,
            &chunked.toc_digest,
        );
        let layer = Layer {
            reference: image.reference.clone(),
            reader: self.reader_for(&ztoc, &blob, None),
            table: None,
            blob,
            ztoc_digest: chunked.toc_digest.clone(),
            ztoc_size: chunked.toc.compressed,
            tree,
            ztoc,
            info,
            blob_size: desc.size,
            uses: AtomicI64::new(0),
        };
        Ok(self.start(layer, Vec::new()))
    }

    /// The file table of the zstd:chunked layer a previous daemon served (its journal record):
    /// the image manifest gives the layer's annotations again, which must name the same TOC.
    pub(super) async fn restore_chunked_table(
        &self,
        reference: &crate::reference::Reference,
        rec: &super::journal::LayerRecord,
    ) -> Lookup<Arc<Ztoc>> {
        let image = self.image(&reference.to_string()).await?;
        let desc = image
            .manifest
            .layers
            .iter()
            .find(|l| l.digest == rec.blob)
            .ok_or_else(|| mismatch(format!("{reference} no longer has layer {}", rec.blob)))?;
        let chunked = ChunkedLayer::from_annotations(&desc.annotations, desc.size)
            .map_err(|e| mismatch(format!("layer {}: {e}", desc.digest)))?
            .filter(|c| c.toc_digest == rec.ztoc)
            .ok_or_else(|| {
                mismatch(format!(
                    "layer {} is no longer the zstd:chunked layer with TOC {}",
                    desc.digest, rec.ztoc
                ))
            })?;
        let blob = BlobLocator::new(reference.clone(), &desc.digest);
        self.chunked_table(&blob, desc, &chunked).await
    }

    /// The file table of a zstd:chunked layer, once per TOC digest.
    async fn chunked_table(
        &self,
        blob: &BlobLocator,
        desc: &Descriptor,
        chunked: &ChunkedLayer,
    ) -> Lookup<Arc<Ztoc>> {
        memoized(&self.ztocs, &chunked.toc_digest, async {
            let started = std::time::Instant::now();
            let built = self.chunked_table_uncached(blob, desc, chunked).await;
            let event = crate::trace::Event {
                ev: "artifact".into(),
                what: chunked.toc_digest.to_string(),
                bytes: chunked.toc.compressed
                    + chunked.tar_split.as_ref().map_or(0, |t| t.compressed),
                outcome: if built.is_ok() { "" } else { "error" }.into(),
                ..Default::default()
            };
            self.spans.trace().record(started, event);
            built
        })
        .await
    }

    async fn chunked_table_uncached(
        &self,
        blob: &BlobLocator,
        desc: &Descriptor,
        chunked: &ChunkedLayer,
    ) -> Lookup<Arc<Ztoc>> {
        let bad = |e: &dyn std::fmt::Display| mismatch(format!("layer {}: {e}", desc.digest));
        let fetch = |range: std::ops::Range<u64>| async move {
            self.fetchers()
                .read_range(blob, range)
                .await
                .map_err(|e| Arc::new(LookupError::from(e)))
        };
        let split_range = chunked
            .tar_split
            .as_ref()
            .ok_or_else(|| bad(&"no tar-split position annotation"))?
            .range();
        // Both at once: they are next to each other at the end of the blob.
        let (toc_bytes, split_bytes) =
            futures::future::try_join(fetch(chunked.toc.range()), fetch(split_range)).await?;
        let toc = chunked.decode_toc(&toc_bytes).map_err(|e| bad(&e))?;
        let files = toc.files(chunked.toc.offset).map_err(|e| bad(&e))?;
        let layout =
            crate::chunked::tar_layout(chunked, &toc, &split_bytes).map_err(|e| bad(&e))?;
        let z = crate::chunked::to_ztoc(&files, &layout, desc.size).map_err(|e| bad(&e))?;
        Ok(Arc::new(z))
    }
}
