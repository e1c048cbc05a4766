//! Indexing an image's layers, shared by `convert` and `create`: each eligible layer is streamed
//! once from the source into the zTOC builder (and, when the destination is elsewhere, on to it);
//! zTOCs, their split form (table + windows) and prefetch artifacts are pushed; the SOCI index
//! manifest is assembled.

use std::collections::BTreeMap;
use std::io::Read;

use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;

use super::convert::{ConvertOptions, LayerReport, Progress};
use super::discover::IndexKind;
use super::image::{Endpoint, ImageRef};
use super::*;
use crate::fetch::FetchError;
use crate::ztoc::{self, format, BuildOptions, Ztoc};

/// A blocking reader over chunks sent by the async side.
pub(super) struct ChannelReader {
    rx: mpsc::Receiver<Bytes>,
    cur: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(c) => self.cur = c,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        let _ = self.cur.split_to(n);
        Ok(n)
    }
}

pub(super) fn indexable(layer: &Descriptor) -> Result<(), &'static str> {
    let media_type = layer.media_type.as_str();
    if media_type.contains("zstd") {
        if layer
            .annotations
            .contains_key(crate::chunked::ANN_TOC_DIGEST)
        {
            Err("zstd:chunked: served lazily from its own table of contents (podman 5), no index needed")
        } else {
            Err("plain zstd: not indexed, pulled normally (`convert --zstd-chunked`, or `podman push --compression-format zstd:chunked`, makes it lazy)")
        }
    } else if media_type.ends_with("tar+gzip")
        || media_type.ends_with("tar.gzip")
        || media_type.ends_with(".tar")
        || media_type.ends_with("diff.tar")
    {
        Ok(())
    } else {
        Err("not a gzip or tar layer")
    }
}

/// Streams one layer from `src` once: into the zTOC builder when `build`, and to `dst` when
/// `upload`. The stream is checked against the layer digest.
pub(super) async fn process_layer(
    src: &Endpoint,
    dst: &Endpoint,
    layer: &Descriptor,
    build: Option<(BuildOptions, Option<u64>)>,
    upload: bool,
    progress: &dyn Progress,
) -> Result<Option<Built>, IndexError> {
    let mut stream = src.blob_stream(&layer.digest).await?;
    let (ztx, zrx) = mpsc::channel::<Bytes>(8);
    let builder = build.map(|(opts, table_span_size)| {
        tokio::task::spawn_blocking(move || {
            let reader = ChannelReader {
                rx: zrx,
                cur: Bytes::new(),
            };
            ztoc::builder::build_with_table(
                std::io::BufReader::with_capacity(256 << 10, reader),
                &opts,
                table_span_size,
                &mut |_| {},
            )
        })
    });
    let (utx, urx) = mpsc::channel::<Result<Bytes, FetchError>>(8);
    let uploader = upload.then(|| {
        let dst = dst.clone();
        let digest = layer.digest.clone();
        let chunks: BoxStream<'static, Result<Bytes, FetchError>> = futures::stream::unfold(
            urx,
            |mut rx| async move { rx.recv().await.map(|c| (c, rx)) },
        )
        .boxed();
        tokio::spawn(async move { dst.put_blob_stream(&digest, chunks).await })
    });
    let mut hasher = Sha256::new();
    let mut done = 0u64;
    let mut feed_err = None;
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                feed_err = Some(IndexError::from(e));
                break;
            }
        };
        hasher.update(&chunk);
        done += chunk.len() as u64;
        progress.layer_bytes(&layer.digest, done);
        if builder.is_some() && ztx.send(chunk.clone()).await.is_err() {
            // The builder stopped early (an error it will report); keep feeding the upload.
        }
        if uploader.is_some() && utx.send(Ok(chunk)).await.is_err() {
            break;
        }
    }
    let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
    if feed_err.is_none() && actual != layer.digest {
        feed_err = Some(IndexError::Other(format!(
            "layer {} arrived with digest {actual}",
            layer.digest
        )));
    }
    if feed_err.is_none() && done != layer.size {
        feed_err = Some(IndexError::Manifest(format!(
            "layer {} is {done} bytes, its descriptor says {}",
            layer.digest, layer.size
        )));
    }
    if let Some(e) = &feed_err {
        // Make the upload fail rather than complete a wrong blob.
        let _ = utx.send(Err(FetchError::Integrity(e.to_string()))).await;
    }
    drop(ztx);
    drop(utx);
    if let Some(u) = uploader {
        u.await.map_err(|e| IndexError::Other(e.to_string()))??;
    }
    if let Some(e) = feed_err {
        return Err(e);
    }
    match builder {
        None => Ok(None),
        Some(b) => {
            let (ztoc, table) = b.await.map_err(|e| IndexError::Other(e.to_string()))??;
            let bytes = format::encode(&ztoc)?;
            Ok(Some(Built { ztoc, bytes, table }))
        }
    }
}

/// A layer's zTOC, encoded, and its table form when asked for.
pub(super) struct Built {
    pub ztoc: Ztoc,
    pub bytes: Vec<u8>,
    pub table: Option<ztoc::table::Split>,
}

/// The zTOC layer descriptor for an indexed image layer.
pub(super) fn ztoc_descriptor(layer: &Descriptor, z: &Ztoc, bytes: &[u8]) -> Descriptor {
    let mut d = Descriptor::new(MT_ZTOC, sha256_digest(bytes), bytes.len() as u64);
    d.annotations
        .insert(ANN_LAYER_DIGEST.into(), layer.digest.to_string());
    d.annotations
        .insert(ANN_LAYER_MEDIA_TYPE.into(), layer.media_type.clone());
    d.annotations
        .insert(ANN_SPAN_SIZE.into(), z.span_size.to_string());
    let has_xattrs = z.entries.iter().any(|e| e.xattrs().next().is_some());
    let has_opaque = z.entries.iter().any(|e| e.name.ends_with(b".wh..wh..opq"));
    if !has_xattrs && !has_opaque {
        d.annotations
            .insert(ANN_DISABLE_XATTRS.into(), "true".into());
    }
    d
}

/// The split form of a layer's zTOC as index blobs: its table, and its windows (gzip layers).
pub(super) fn table_artifacts(
    layer: &Descriptor,
    zdesc: &Descriptor,
    split: ztoc::table::Split,
) -> Vec<(Descriptor, Vec<u8>)> {
    let mut out = Vec::new();
    for (mt, bytes) in [
        (MT_ZTOC_TABLE, split.table),
        (MT_ZTOC_WINDOWS, split.windows),
    ] {
        if bytes.is_empty() {
            continue;
        }
        let mut d = Descriptor::new(mt, sha256_digest(&bytes), bytes.len() as u64);
        d.annotations
            .insert(ANN_TABLE_LAYER_DIGEST.into(), layer.digest.to_string());
        d.annotations
            .insert(ANN_TABLE_ZTOC_DIGEST.into(), zdesc.digest.to_string());
        out.push((d, bytes));
    }
    out
}

/// The SOCI prefetch artifact (formats.md §2.1) for the `files` of one layer: the spans holding
/// their data, priority by position in `files` (0 first). None when the layer holds none of them.
pub fn prefetch_artifact(z: &Ztoc, files: &[String]) -> Option<Vec<u8>> {
    fn norm(p: &[u8]) -> &[u8] {
        let p = p.strip_prefix(b".").unwrap_or(p);
        let start = p.iter().position(|&b| b != b'/').unwrap_or(p.len());
        &p[start..]
    }
    let mut ranges = Vec::new();
    for (priority, f) in files.iter().enumerate() {
        let want = norm(f.as_bytes());
        // The last copy of a name listed twice is the file (tar semantics).
        let found = z
            .entries
            .iter()
            .rev()
            .find(|e| norm(&e.name) == want)
            .filter(|e| e.kind == crate::ztoc::EntryType::Reg && e.size > 0);
        if let Some(e) = found {
            ranges.push(serde_json::json!({
                "start_span": z.span_for_offset(e.offset),
                "end_span": z.span_for_offset(e.offset + e.size - 1),
                "priority": priority,
            }));
        }
    }
    (!ranges.is_empty()).then(|| {
        serde_json::to_vec(&serde_json::json!({"version": "1.0", "prefetch_spans": ranges}))
            .expect("json")
    })
}

/// zTOCs for the image's eligible layers; copies config and layers to `dst` when `copy`.
pub(super) async fn index_layers(
    src: &Endpoint,
    dst: &Endpoint,
    image: &Manifest,
    opts: &ConvertOptions,
    copy: bool,
    progress: &dyn Progress,
) -> Result<Vec<(LayerReport, Vec<(Descriptor, Vec<u8>)>)>, IndexError> {
    if copy {
        dst.copy_blob_from(src, &image.config.digest).await?;
    }
    let build_opts = BuildOptions {
        span_size: opts.span_size,
        min_layer_size: opts.min_layer_size,
        ..Default::default()
    };
    // Images repeat layers (empty layers, identical steps): each distinct layer is copied and
    // indexed once, its later places get its report (and no second set of artifacts).
    let mut distinct: Vec<&Descriptor> = Vec::new();
    for layer in &image.layers {
        if !distinct.iter().any(|d| d.digest == layer.digest) {
            distinct.push(layer);
        }
    }
    let jobs = distinct.iter().map(|&layer| {
        let build_opts = build_opts.clone();
        async move {
            progress.layer_started(&layer.digest, layer.size);
            let eligible = match indexable(layer) {
                Ok(()) if layer.size < opts.min_layer_size => {
                    Err("smaller than the minimum layer size (pulled normally)")
                }
                other => other,
            };
            let mut note = match eligible {
                Ok(()) => String::new(),
                Err(n) => n.to_string(),
            };
            let mut upload = false;
            if copy {
                // Within a registry: already there, or mounted; otherwise streamed with the build.
                upload = !dst.has_blob(&layer.digest).await?;
                if upload {
                    if let (ImageRef::Registry(d), ImageRef::Registry(s)) = (&dst.image, &src.image)
                    {
                        if d.registry == s.registry
                            && dst
                                .client
                                .mount_blob(d, &layer.digest, &s.repository)
                                .await?
                        {
                            upload = false;
                            note_push(&mut note, "mounted");
                        }
                    }
                }
            }
            let table_span = opts.ztoc_tables.then_some(opts.table_span_size);
            let build = eligible.is_ok().then_some((build_opts, table_span));
            let built = if build.is_some() || upload {
                process_layer(src, dst, layer, build, upload, progress).await?
            } else {
                None
            };
            if upload {
                note_push(&mut note, "copied");
            }
            let mut artifacts = Vec::new();
            let mut built = built;
            if let Some(Built {
                ztoc: z,
                bytes,
                table,
            }) = &mut built
            {
                let zdesc = ztoc_descriptor(layer, z, bytes);
                if let Some(split) = table.take() {
                    artifacts.extend(table_artifacts(layer, &zdesc, split));
                }
                artifacts.insert(0, (zdesc, bytes.clone()));
                if let Some(p) = prefetch_artifact(z, &opts.prefetch_files) {
                    let mut d =
                        Descriptor::new(MT_SOCI_PREFETCH, sha256_digest(&p), p.len() as u64);
                    d.annotations
                        .insert(ANN_LAYER_DIGEST.into(), layer.digest.to_string());
                    artifacts.push((d, p));
                    note_push(&mut note, "prefetch artifact");
                }
            }
            let report = LayerReport {
                digest: layer.digest.clone(),
                size: layer.size,
                ztoc: built.as_ref().map(|b| sha256_digest(&b.bytes)),
                spans: built.as_ref().map_or(0, |b| b.ztoc.span_count()),
                note,
            };
            progress.layer_done(&report);
            Ok::<_, IndexError>((report, artifacts))
        }
    });
    let results: Vec<_> = futures::stream::iter(jobs)
        .buffered(opts.concurrency.max(1))
        .collect()
        .await;
    let mut built = results
        .into_iter()
        .map(|r| r.map(Some))
        .collect::<Result<Vec<_>, _>>()?;
    let mut out = Vec::with_capacity(image.layers.len());
    for (i, layer) in image.layers.iter().enumerate() {
        let first = image
            .layers
            .iter()
            .position(|l| l.digest == layer.digest)
            .expect("the layer itself");
        if first == i {
            let at = distinct
                .iter()
                .position(|d| d.digest == layer.digest)
                .expect("listed");
            out.push(built[at].take().expect("each distinct layer once"));
        } else {
            let report = out[first].0.clone();
            let note = format!("same layer as layer {first}");
            out.push((LayerReport { note, ..report }, Vec::new()));
        }
    }
    Ok(out)
}

pub(super) fn note_push(note: &mut String, what: &str) {
    if !note.is_empty() {
        note.push_str("; ");
    }
    note.push_str(what);
}

/// Each layer's report and index artifacts (its zTOC, then its prefetch artifact).
pub(super) type BuiltLayers = [(LayerReport, Vec<(Descriptor, Vec<u8>)>)];

/// Uploads the built zTOCs, prefetch artifacts and the index config blob; returns their
/// descriptors and bytes.
pub(super) async fn push_ztocs(
    dst: &Endpoint,
    layers: &BuiltLayers,
) -> Result<(Vec<Descriptor>, Vec<Vec<u8>>), IndexError> {
    let mut ztocs = Vec::new();
    let mut blobs = Vec::new();
    for (desc, bytes) in layers.iter().flat_map(|(_, built)| built) {
        dst.put_blob(&desc.digest, Bytes::from(bytes.clone()))
            .await?;
        blobs.push(bytes.clone());
        ztocs.push(desc.clone());
    }
    dst.put_blob(&empty_json_digest(), Bytes::from_static(EMPTY_JSON))
        .await?;
    Ok((ztocs, blobs))
}

/// The SOCI index manifest for these zTOCs (v1 with a subject, or v2).
pub(super) fn soci_index(
    kind: IndexKind,
    ztocs: Vec<Descriptor>,
    subject: Option<Descriptor>,
) -> Manifest {
    let config_type = match kind {
        IndexKind::V1 => MT_SOCI_INDEX_V1,
        IndexKind::V2 => MT_SOCI_INDEX_V2,
    };
    Manifest {
        schema_version: 2,
        media_type: Some(MT_OCI_MANIFEST.into()),
        artifact_type: None,
        config: Descriptor::new(config_type, empty_json_digest(), EMPTY_JSON.len() as u64),
        layers: ztocs,
        subject,
        annotations: BTreeMap::from([(ANN_BUILD_TOOL.to_string(), ztoc::BUILD_TOOL.to_string())]),
    }
}
